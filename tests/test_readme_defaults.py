"""What the documentation says a default is, is the default: every "`key value` (default)" style claim in README.md
and the site's pages (docs/**/*.md, where the README's sections moved in issue 24) is read back and compared with the
schema (issue 20: the README once said bn_linear while the code said linear)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from linear_probe.config import ProbeConfig
from transfer.config import TeacherConfig, TransferConfig
from transfer.losses.terms.registry import TERMS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
KEY = r"(?:--)?([a-z_]+(?:\.[a-z_0-9]+)+)"
# `key value` (default) | `key value` (default other) | `key` (default on/off) | The library defaults (`key value`, …)
CLAIMS = [re.compile(rf"`{KEY} ([^`]+)` \((?:the )?default\)"),
          re.compile(rf"`{KEY} [^`]+` \(default:? ([\w.-]+)"),
          re.compile(rf"`{KEY}` \(default (on|off)\b")]
LIST_OF_DEFAULTS = re.compile(r"defaults \(((?:[^()]|\([^()]*\))*)\)")
PAIR = re.compile(rf"`{KEY} ([^`]+)`")


def schema_default(key: str) -> object:
    """The default of ``key`` in the stage schemas or, for loss.terms.<name>.<option>, the term's options."""
    parts = key.split(".")
    if parts[:2] == ["loss", "terms"]:
        return getattr(TERMS[parts[2]].Options(), parts[3])
    for schema in (TransferConfig, TeacherConfig, ProbeConfig):
        tp: typing.Any = schema
        for part in parts:
            fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
            if part not in fields:
                break
            field = fields[part]
            tp = typing.get_type_hints(tp)[part]
        else:
            if field.default is not dataclasses.MISSING:
                return field.default
            return field.default_factory()
    raise KeyError(key)


def parse(value: str) -> object:
    value = value.strip()
    if value in ("on", "true"):
        return True
    if value in ("off", "false"):
        return False
    try:
        return float(value) if "." in value or "e" in value else int(value)
    except ValueError:
        return value


def documentation_text() -> str:
    """README.md and every page of the site, whitespace collapsed (a claim may wrap across lines)."""
    return " ".join(" ".join(page.read_text().split()) for page in PAGES)


def readme_claims() -> list[tuple[str, str]]:
    text = documentation_text()
    claims = [(m.group(1), m.group(2)) for pattern in CLAIMS for m in pattern.finditer(text)]
    for listing in LIST_OF_DEFAULTS.finditer(text):
        claims += [(m.group(1), m.group(2)) for m in PAIR.finditer(listing.group(1))]
    return claims


def test_the_readme_states_defaults_that_this_test_reads():
    assert len(readme_claims()) >= 8, readme_claims()


@pytest.mark.parametrize("key,value", readme_claims())
def test_each_default_the_readme_states_is_the_schemas(key, value):
    if key == "sampler.shared":  # null in the schema: on for the uniform sampler, resolved by its validation
        from transfer.config import SamplerConfig

        sampler = SamplerConfig(kind="uniform")
        sampler.validate()
        assert sampler.shared is parse(value)
        return
    default = schema_default(key)
    claimed = parse(value)
    assert default == claimed, f"the docs say {key} defaults to {value!r}; the schema says {default!r}"


def test_the_readme_names_the_default_projection_head():
    text = documentation_text()
    (head,) = set(re.findall(r"default head stays the paper's `(\w+)`", text))
    assert schema_default("loss.nce.projection") == head
