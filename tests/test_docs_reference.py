"""The generated reference pages of the site (docs/reference/) are what the code renders now (issue 24: one
source of truth for the config keys and loss terms that `--help` and `cktf methods` print)."""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

from linear_probe.config import ProbeConfig
from transfer.cli import cli
from transfer.config import TeacherConfig, TransferConfig
from transfer.config.loader import option_rows
from transfer.docs_reference import PAGES, WRITE_COMMAND, main, markdown_text, stale_pages
from transfer.losses.terms import TERMS

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def test_the_committed_reference_pages_are_current():
    stale = stale_pages(REFERENCE)
    changes = "".join(line for name in stale for line in itertools.islice(difflib.unified_diff(
        (REFERENCE / name).read_text().splitlines(True), PAGES[name]().splitlines(True), f"docs/reference/{name}",
        "rendered now"), 30))
    assert not stale, f"docs/reference/{', '.join(stale)} differ from the code; regenerate with: {WRITE_COMMAND}\n" \
                      f"{changes}"


def test_the_configuration_page_lists_every_key_of_every_command():
    page = (REFERENCE / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_.]+)` \|", page, re.M))
    for schema in (TeacherConfig, TransferConfig, ProbeConfig):
        keys = {row.key for row in option_rows(schema)}
        assert keys <= listed, sorted(keys - listed)
    for command in ("train-teacher", "transfer", "import-teacher", "probe", "compare", "configs", "demo"):
        assert f"### cktf {command}\n" in page
    assert "`--teacher FILE`" in page and "`--allow-change KEY`" in page
    # as `cktf <command> --help` prints it, whether or not the CLI ran before in this process
    assert page.count("| `-h, --help` | Show this message and exit. |") == len(cli.commands) + 1


def test_the_methods_page_lists_every_term_and_option():
    page = (REFERENCE / "methods.md").read_text()
    for name, cls in TERMS.items():
        assert f"## {name} {{#{name}}}" in page
        for row in option_rows(cls.Options, f"loss.terms.{name}."):
            assert f"| `{row.key}` |" in page


def test_check_names_a_stale_page_and_the_command_that_regenerates_it(tmp_path, capsys):
    for name, render in PAGES.items():
        (tmp_path / name).write_text(render())
    assert main(["--check", str(tmp_path)]) == 0
    (tmp_path / "methods.md").write_text("# edited by hand\n")
    assert main(["--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "methods.md is stale" in err and WRITE_COMMAND in err and "configuration.md" not in err


def test_help_text_is_escaped_but_code_spans_are_kept():
    assert markdown_text("Σ_c |A_c| <run>/probe, `a|b <c>`") == r"Σ\_c \|A\_c\| &lt;run&gt;/probe, `a|b <c>`"


def test_a_key_that_cannot_be_null_is_not_called_nullable():
    kinds = {row.key: row.kind for row in option_rows(TransferConfig)}
    assert kinds["train.checkpoint_every"] == "an integer or a string"
    assert kinds["data.num_workers"] == "an integer or one of 'auto'"
    assert kinds["data.root"] == "a string or null"
