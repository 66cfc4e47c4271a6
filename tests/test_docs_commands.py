"""Every `cktf …` command the documentation shows parses with the real command line (issue 24: docs that run).

The shell blocks (```bash, ```console, ```sh) of README.md and docs/**/*.md are read as a shell would see them:
continuation lines joined, the block's own variables (``H="…"``, ``for method in kd crd; do``) expanded, comments
dropped. Each command that runs cktf (``cktf …``, ``torchrun … -m transfer.cli …``, ``$(which cktf)``) is then
parsed by the command's click context (option names, types, ranges, required options) and, for commands taking
a config, loaded with its ``--section.key VALUE`` overrides through the config loader and the term registry,
so a renamed option, key or term cannot survive in the docs. Paths need not exist (``/data/stl10``); a config
that is a placeholder (``…``) is replaced by the shipped config of that command. Nothing runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from linear_probe.config import ProbeConfig
from transfer.cli import cli
from transfer.config import TeacherConfig, TransferConfig, load_config
from transfer.config.loader import overrides_for, parse_overrides
from transfer.config.shipped import resolve_config_path, shipped_configs_dir
from transfer.errors import CKTFError
from transfer.losses.terms.registry import TERMS, resolve_terms

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(bash|console|sh|shell)[ \t]*\n(.*?)^```", re.M | re.S)
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$")
LOOP = re.compile(r"\bfor ([A-Za-z_]\w*) in ([^;]+); do\b")
VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")
PLACEHOLDER = "…"
STAND_IN = {TeacherConfig: "fashion_lowres/teacher.yaml", TransferConfig: "fashion_lowres/cktf.yaml",
            ProbeConfig: "fashion_lowres/probe.yaml"}
SCHEMAS = (TeacherConfig, TransferConfig, ProbeConfig)


@dataclass(frozen=True)
class Invocation:
    """One cktf command of a page: where it is, its arguments after ``cktf``, and whether the block elides part
    of it (an unknown ``$VAR`` or ``…`` standing for several arguments)."""

    where: str
    argv: tuple[str, ...]
    partial: bool

    def __str__(self) -> str:
        return f"{self.where}: cktf {shlex.join(self.argv)}"


def shell_lines(block: str, console: bool) -> list[tuple[int, str]]:
    """The block's command lines (with the index of their first line), continuations joined; in a console block
    only the ``$ `` lines."""
    lines, pending, start = [], "", 0
    for number, raw in enumerate(block.splitlines()):
        if not pending:
            start = number
            if console:
                if not raw.startswith("$ "):
                    continue
                raw = raw[2:]
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + raw))
        pending = ""
    if pending:
        lines.append((start, pending))
    return lines


def shell_tokens(line: str) -> list[str]:
    """``line`` split as the shell splits words: quotes removed, ``;``/``&&``/``|`` separate, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def expand_token(token: str, variables: dict[str, list[str]]) -> tuple[list[list[str]], bool]:
    """The argument lists ``token`` stands for (one per loop value) and whether part of it is unknown."""
    whole = VARIABLE.fullmatch(token)
    if whole:
        name = whole.group(1) or whole.group(2)
        if name not in variables:
            return [[]], True
        return [shlex.split(value) for value in variables[name]], False
    names = [m.group(1) or m.group(2) for m in VARIABLE.finditer(token) if (m.group(1) or m.group(2)) in variables]
    if not names:
        return [[token]], False
    expansions = []
    for values in itertools.product(*(variables[n] for n in names)):
        text = token
        for name, value in zip(names, values, strict=True):
            text = text.replace("${" + name + "}", value).replace("$" + name, value)
        expansions.append([text])
    return expansions, False


def takes_value(command: str, option: str) -> bool:
    """Whether ``option`` of ``cktf command`` is followed by its value (config overrides always are)."""
    if not option.startswith("--"):
        return False
    if "." in option.split("=", 1)[0]:
        return "=" not in option
    found = cli.commands.get(command)
    params = [p for p in (found.params if found else []) if option in p.opts]
    return bool(params) and isinstance(params[0], click.Option) and not params[0].is_flag


def cktf_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments after the token that runs cktf, up to a shell operator; None if the line runs no cktf."""
    for i, token in enumerate(tokens):
        if token == "cktf" or (token == "transfer.cli" and i > 0 and tokens[i - 1] == "-m"):
            rest = tokens[i + 1:]
            for j, arg in enumerate(rest):
                if arg in (";", "&&", "||", "|", "&"):
                    return rest[:j]
            return rest
    return None


def block_invocations(block: str, console: bool, page: str, first_line: int) -> list[Invocation]:
    """Every cktf command of one shell block (whose first line is ``first_line`` of ``page``), with the block's
    variables expanded."""
    variables: dict[str, list[str]] = {}
    found = []
    for offset, line in shell_lines(block, console):
        where = f"{page}:{first_line + offset}"
        for name, values in LOOP.findall(line):
            variables[name] = shlex.split(values)
        line = LOOP.sub("", line)  # "for method in kd crd cktf; do" runs nothing itself
        line = line.replace("$(which cktf)", "cktf")
        tokens = shell_tokens(line)
        if len(tokens) == 1 and ASSIGNMENT.match(tokens[0]):
            name, value = ASSIGNMENT.match(tokens[0]).groups()
            variables[name] = [value]
            continue
        args = cktf_arguments(tokens)
        if args is None:
            continue
        partial = False
        choices = []
        for i, token in enumerate(args):
            is_value = i > 0 and takes_value(args[0], args[i - 1])
            elided = token != PLACEHOLDER and (token.startswith(PLACEHOLDER) or token.endswith(PLACEHOLDER))
            if elided or (token == PLACEHOLDER and not is_value):
                partial = True  # "…same arguments…" stands for arguments not shown
                continue
            whole = VARIABLE.fullmatch(token)
            if whole and is_value and (whole.group(1) or whole.group(2)) not in variables:
                choices.append([[token]])  # "--log.root $D": a value not shown
                continue
            options, unknown = expand_token(token, variables)
            partial |= unknown
            choices.append(options)
        for combination in itertools.product(*choices):
            argv = tuple(arg for part in combination for arg in part)
            found.append(Invocation(where, argv, partial))
    return found


def page_invocations(text: str, name: str) -> list[Invocation]:
    found = []
    for match in FENCE.finditer(text):
        first_line = text[:match.start(2)].count("\n") + 1
        found += block_invocations(match.group(2), match.group(1) == "console", name, first_line)
    return found


def key_type(schema: type, key: str) -> tuple[bool, typing.Any]:
    """Whether ``key`` names a config key of ``schema`` (a leaf, a term option, or a key below a free mapping),
    and its declared type (``typing.Any`` below a free mapping)."""
    parts = key.split(".")
    if parts[:2] == ["loss", "terms"] and len(parts) == 4 and schema is TransferConfig:
        if parts[2] not in TERMS:
            return False, None
        hints = typing.get_type_hints(TERMS[parts[2]].Options)
        return parts[3] in hints, hints.get(parts[3])
    tp: typing.Any = schema
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return typing.get_origin(tp) is dict or tp is dict, typing.Any
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False, None
        tp = hints[part]
    return True, tp


def known_key(schema: type, key: str) -> bool:
    return key_type(schema, key)[0]


def takes_text(tp: typing.Any) -> bool:
    """Whether a value of type ``tp`` may be any string (so a placeholder such as ``$D/pixels`` can stand)."""
    return tp in (str, typing.Any) or str in typing.get_args(tp)


def is_placeholder(value: str) -> bool:
    return PLACEHOLDER in value or "$" in value


def config_file(path: str, schema: type) -> Path:
    """The config a documented ``--config`` names: the repository's file, a shipped one, or for a placeholder
    the shipped stand-in of that command."""
    if is_placeholder(path):
        return shipped_configs_dir() / STAND_IN[schema]
    in_repo = REPO / path
    return in_repo if in_repo.exists() else resolve_config_path(path)


def check_overrides(schema: type, config: Path, overrides: list[str], options: list[str]) -> None:
    """Load ``config`` with ``overrides`` as the command would (raises CKTFError); a placeholder value of a key
    that is not a string (``--train.epochs $E``) is only checked to be a real key."""
    kept = []
    for key, value in parse_overrides(overrides, options):
        known, tp = key_type(schema, key)
        if is_placeholder(value) and not (known and takes_text(tp)):
            if not known:
                raise CKTFError(f"unknown config key '{key}' on the command line")
            continue
        kept += [f"--{key}", value]
    cfg = load_config(config, schema, kept, options)
    if schema is TransferConfig:
        resolve_terms(cfg.loss)


def check(invocation: Invocation) -> str | None:
    """Why ``invocation`` would not parse, or None."""
    argv = [a for a in invocation.argv if a not in ("--debug", "-q", "--quiet")]
    if not argv or argv[0] in ("--help", "-h", "--version"):
        return None
    name, args = argv[0], list(argv[1:])
    command = cli.commands.get(name)
    if command is None:
        return f"no such command 'cktf {name}'"
    if "--help" in args or "-h" in args:
        return None
    root = click.Context(cli, info_name="cktf", **cli.context_settings)
    for _ in range(len(command.params) + 1):
        try:
            ctx = command.make_context(name, list(args), parent=root)
            break
        except click.MissingParameter as missing:
            if not invocation.partial or missing.param is None:
                return missing.format_message()
            args += [missing.param.opts[0], PLACEHOLDER]  # the elided part of the command holds it
        except click.ClickException as err:
            return err.format_message()
    options = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    overrides = list(ctx.params.get("overrides", ()))
    try:
        schema = getattr(command, "schema", None)
        if schema is not None:
            if ctx.params.get("teacher_path"):
                overrides += ["--teacher.checkpoint", ctx.params["teacher_path"]]
            check_overrides(schema, config_file(ctx.params["config_path"], schema), overrides, options)
        elif overrides:  # cktf demo: every override goes to the stages whose sections it names
            for key, _ in parse_overrides(overrides, options):
                if not any(known_key(s, key) for s in SCHEMAS):
                    raise CKTFError(f"unknown config key '{key}' on the command line")
            for s in SCHEMAS:
                check_overrides(s, shipped_configs_dir() / STAND_IN[s], overrides_for(s, overrides), options)
    except CKTFError as err:
        return str(err)
    return None


INVOCATIONS = [inv for page in PAGES for inv in page_invocations(page.read_text(), str(page.relative_to(REPO)))]


def test_the_docs_show_many_cktf_commands():
    assert len(INVOCATIONS) >= 40, len(INVOCATIONS)
    commands = {inv.argv[0] for inv in INVOCATIONS if inv.argv}
    assert {"train-teacher", "import-teacher", "transfer", "probe", "compare", "demo", "configs"} <= commands


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=str)
def test_each_documented_command_parses(invocation):
    problem = check(invocation)
    assert problem is None, f"{invocation}\n  does not parse: {problem}"


BLOCK = """
```bash
H="--data.options.split_images true \\
   --train.threads 1"
cktf transfer --config configs/fashion_lowres/cktf.yaml $H \\
    --loss.terms.kd.weight 0.5   # a comment
for m in kd cktf; do cktf transfer --config configs/fashion_lowres/${m}.yaml; done
```

```console
$ cktf probe --config image_folder/probe.yaml --student runs/x/last.safetensors
done: cktf  probe test acc 70.00%
```
"""


def test_blocks_are_read_as_a_shell_reads_them():
    found = page_invocations(BLOCK, "page.md")
    assert [inv.argv for inv in found] == [
        ("transfer", "--config", "configs/fashion_lowres/cktf.yaml", "--data.options.split_images", "true",
         "--train.threads", "1", "--loss.terms.kd.weight", "0.5"),
        ("transfer", "--config", "configs/fashion_lowres/kd.yaml"),
        ("transfer", "--config", "configs/fashion_lowres/cktf.yaml"),
        ("probe", "--config", "image_folder/probe.yaml", "--student", "runs/x/last.safetensors")]
    assert [inv.where for inv in found] == ["page.md:5", "page.md:7", "page.md:7", "page.md:11"]
    assert all(check(inv) is None for inv in found)


@pytest.mark.parametrize("command,problem", [
    ("cktf transfer --config configs/fashion_lowres/cktf.yaml --train.epochz 3", "did you mean 'train.epochs'"),
    ("cktf transfer --config configs/fashion_lowres/cktf.yaml --train.epochs many", "expected an integer"),
    ("cktf transfer --config configs/fashion_lowres/cktf.yaml --loss.terms.kd.temprature 4",
     "did you mean 'loss.terms.kd.temperature'"),
    ("cktf transfer --config configs/fashion_lowres/cktf.yaml --loss.terms.hint.weight 1", "unknown loss term"),
    ("cktf transfer --config configs/fashion_lowres/ckft.yaml", "does not exist"),
    ("cktf transfer --config configs/fashion_lowres/cktf.yaml --teachr t.safetensors", "did you mean '--teacher'"),
    ("cktf transfer --config … --data.rooot $DATA", "unknown config key 'data.rooot'"),
    ("cktf import-teacher --arch torchvision.resnet50 --weights w.pth --out t.safetensors --image-size 4",
     "--image-size"),
    ("cktf import-teacher --arch torchvision.resnet50 --weights w.pth", "--out"),
    ("cktf demo --seeds 3 --train.thread 1", "unknown config key 'train.thread'"),
    ("cktf probe --config configs/fashion_lowres/probe.yaml --probe.backbone random --probe.out x",
     "needs probe.model"),
    ("cktf evaluate --config x.yaml", "no such command"),
])
def test_a_drifted_command_is_caught(command, problem):
    (invocation,) = page_invocations(f"```bash\n{command}\n```\n", "page.md")
    found = check(invocation)
    assert found is not None and problem in found, found
