"""YAML configs validated into dataclasses, with ``--section.key value`` overrides.

A config file is a mapping of sections (``data``, ``model``, ``train``, ``log``, …),
each a mapping of keys. The schema is a tree of dataclasses; every field carries
``metadata`` with ``help`` and optional ``min``/``max``. Validation errors are
one line naming the key and its source (file or command line), so a typo never
turns into a stack trace deep inside training.

Example::

    cfg = load_config("configs/fashion_split/teacher.yaml", TeacherConfig,
                      overrides=["--train.epochs", "3"])
    cfg.train.epochs  # 3
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from transfer.errors import CKTFError

T = typing.TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
           max: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a help text and an optional numeric range."""
    meta = {"help": help, "min": min, "max": max}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + nullable
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise :class:`_Mismatch`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")


def suggest(name: str, choices: list[str], prefix: str) -> str:
    """The tail of an "unknown key" message: the closest of ``choices``, or all of them (each ``prefix + choice``)."""
    close = difflib.get_close_matches(str(name), choices, n=1)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + c for c in choices)}"


def _build(cls: type[T], values: dict[str, Any], prefix: str, source: dict[str, str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = getattr(cls, "moved_keys", {})
    for key in values:
        if key not in fields:
            where = source.get(f"{prefix}{key}", source.get("", "in the config"))
            if key in moved:
                raise CKTFError(f"config key '{prefix}{key}' {where} is the old form: {prefix}{key} is now "
                                f"{moved[key]}")
            raise CKTFError(f"unknown config key '{prefix}{key}' {where}{suggest(key, sorted(fields), prefix)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = values.get(name, {})
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise CKTFError(f"config key '{path}' {source.get(path, 'in the config')}: expected a mapping of keys, "
                                f"got {sub!r}")
            kwargs[name] = _build(tp, sub, f"{path}.", source)
            continue
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CKTFError(f"config key '{path}' is required ({f.metadata.get('help', '')})")
            continue
        raw = values[name]
        try:
            value = _coerce(raw, tp)
        except _Mismatch:
            raise CKTFError(f"config key '{path}' {source.get(path, 'in the config')}: expected {_type_name(tp)}, "
                            f"got {raw!r}") from None
        _check_range(path, value, f.metadata, source)
        kwargs[name] = value
    obj = cls(**kwargs)
    object.__setattr__(obj, _SOURCES, source)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


_SOURCES = "_config_sources"


def key_sources(section: Any) -> dict[str, str]:
    """Where each dotted key of a loaded config came from (``"in FILE"``, ``"on the command line"``), for
    sections validated later with :func:`build_section`; empty for a section not made by the loader."""
    return dict(getattr(section, _SOURCES, {}))


def build_section(cls: type[T], values: Any, prefix: str, where: str = "in the config",
                  sources: dict[str, str] | None = None) -> T:
    """Validate ``values`` (a mapping read from a free-form part of a config) into the dataclass ``cls``.

    Used for sections whose schema is only known later, e.g. a loss term's options under
    ``loss.terms.<name>`` (validated against the term's options dataclass when the stage builds the terms).
    Errors are the loader's one-liners, naming each key as ``prefix + key`` (``prefix`` ends with a dot) and
    where it came from (``sources``, see :func:`key_sources`; else ``where``).
    """
    if values is None:
        values = {}
    source = {**(sources or {}), "": where}
    if not isinstance(values, dict):
        where = source.get(prefix.rstrip("."), where)
        raise CKTFError(f"config key '{prefix.rstrip('.')}' {where}: expected a mapping of keys, got {values!r}")
    return _build(cls, values, prefix, source)


def _check_range(path: str, value: Any, meta: dict, source: dict[str, str]) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if v != v:
            raise CKTFError(f"config key '{path}' {source.get(path, 'in the config')}: expected a number, got nan")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"≥ {lo}" if hi is None else (f"≤ {hi}" if lo is None else f"in [{lo}, {hi}]")
            where = source.get(path, "in the config")
            raise CKTFError(f"config key '{path}' {where}: expected a value {rng}, got {v!r}")


def _field_type(cls: type, dotted: list[str]) -> Any:
    """The declared type at ``dotted`` below ``cls``, or None when the path enters a free mapping."""
    tp: Any = cls
    for part in dotted:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def parse_overrides(args: list[str] | tuple[str, ...], options: list[str] | tuple[str, ...] = ()
                    ) -> list[tuple[str, str]]:
    """Turn ``["--train.epochs", "3", "--data.root=/x"]`` into ``[("train.epochs", "3"), ("data.root", "/x")]``.

    ``options`` are the command's own options (``--resume``, …), suggested for a misspelt one (``--resum``).
    A value is never the next option: ``--train.lr --data.root /x`` says that ``--train.lr`` needs a value.
    """
    pairs: list[tuple[str, str]] = []
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise CKTFError(f"unexpected argument '{arg}'; config overrides look like --section.key VALUE")
        key = arg[2:]
        if "." not in key.split("=", 1)[0]:
            close = difflib.get_close_matches(arg.split("=", 1)[0], list(options), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise CKTFError(f"unknown option '{arg.split('=', 1)[0]}' on the command line; {hint}config overrides "
                            "look like --section.key VALUE (see --help for the options and keys)")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or _is_option(args[i + 1]):
                raise CKTFError(f"option '--{key}' on the command line needs a value, e.g. --{key} VALUE")
            raw = args[i + 1]
            i += 2
        pairs.append((key, raw))
    return pairs


def _is_option(arg: str) -> bool:
    """``--train.lr`` or ``--resume``, not a value such as ``-1`` or ``--`` alone."""
    return arg.startswith("--") and len(arg) > 2 and arg[2].isalpha()


def _parse_raw(raw: str, tp: Any) -> Any:
    """Interpret a command-line string for a field of type ``tp`` (YAML syntax, strings kept verbatim)."""
    if tp is str:
        return raw
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("null", "none", "~"):
            return None
        if args == [str]:
            return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and (tp is float or (tp is None and _EXPONENT.fullmatch(raw.strip()))):
        try:
            return float(raw)  # YAML 1.1 reads '1e-9' (no dot) as a string
        except ValueError:
            return value
    return value


# A number in exponent form without a dot ('1e-3'), which YAML 1.1 reads as a string: inside a free mapping
# (e.g. loss.terms.<name>.<option>) the type is only known later, so such a value is read as a number.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(values: dict[str, Any], schema: type, overrides: list[tuple[str, str]],
                    source: dict[str, str]) -> None:
    """Set each dotted key of ``overrides`` into the nested ``values`` mapping (in place)."""
    for key, raw in overrides:
        parts = key.split(".")
        tp = _field_type(schema, parts)
        node = values
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise CKTFError(f"cannot set '--{key}': '{part}' is not a section")
            node = child
        value = _parse_raw(raw, tp)
        bad = first_non_name_key(value)
        if bad is not None:
            raise CKTFError(f"option --{key} on the command line: key '{bad}' in {raw!r} is not a name; "
                            "config keys are names like epochs (quote a key to make it one)")
        node[parts[-1]] = value
        for i in range(1, len(parts) + 1):
            source.setdefault(".".join(parts[:i]), "on the command line")
        source[key] = "on the command line"


def overrides_for(schema: type, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides whose section exists in ``schema`` (for options applied to several stages at once)."""
    sections = {f.name for f in dataclasses.fields(schema)}
    kept: list[str] = []
    for key, raw in parse_overrides(overrides):
        if key.split(".")[0] in sections:
            kept += [f"--{key}", raw]
    return kept


BASE_KEY = "base"


def read_config_tree(path: str | Path, source: dict[str, str] | None = None) -> dict[str, Any]:
    """The mapping of a config file with its ``base:`` chain merged in, before validation.

    A config may start with ``base: other.yaml`` (relative to its own folder): it then holds only what
    differs from that file. Mappings merge key by key, everything else (numbers, strings, lists) replaces,
    so ``cktf_sp.yaml`` can be ``base: [cktf.yaml, sp.yaml]`` (merged in that order) plus its own run name.
    Where each key came from is recorded in ``source`` (for one-line errors that name the right file).
    """
    if source is None:
        source = {}
    return _read_tree(Path(path), [], source, "option --config")


def read_yaml_mapping(p: Path, how: str) -> dict[str, Any]:
    """The mapping in the YAML file ``p``, every key a name, or one line naming ``p`` (``how``: why it is read)."""
    if not p.is_file():
        raise CKTFError(f"config file {p} does not exist ({how})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CKTFError(f"config file {p} is not a text file; expected YAML (UTF-8), like configs/*/*.yaml") \
            from None
    except OSError as err:
        raise CKTFError(f"config file {p} cannot be read ({err.strerror or err})") from None
    try:
        _check_keys_are_names(yaml.compose(text, Loader=yaml.SafeLoader), text, p)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CKTFError(f"config file {p} is not valid YAML{where}") from None
    except RecursionError:
        raise CKTFError(f"config file {p} is nested too deeply to be a config") from None
    if loaded is None:
        raise CKTFError(f"config file {p} is empty; expected a mapping of sections (data:, train:, log:, …)")
    if not isinstance(loaded, dict):
        raise CKTFError(f"config file {p}: expected a mapping of sections at the top level")
    return loaded


_NAME_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")


def _check_keys_are_names(root: yaml.Node | None, text: str, p: Path) -> None:
    """Refuse a mapping key that YAML does not read as a string (``? x``, ``1:``, ``null:``, ``true:``, ``[a]:``).

    Config keys are names; any other key would reach the loader as ``None``, a number or a list. The
    message quotes the key as written and its line, at any depth (inside lists and ``loss.terms`` too).
    """
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, path) for item in node.value)
        if not isinstance(node, yaml.MappingNode):
            continue
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag in _NAME_TAGS:
                stack.append((value, f"{path}{key.value}."))
                continue
            written = text[key.start_mark.index:key.end_mark.index].strip()
            shown = f"'{written}'" if written else "'?' with no name after it (read as null)"
            under = f" under '{path.rstrip('.')}'" if path else ""
            raise CKTFError(f"config file {p}: key {shown} at line {key.start_mark.line + 1}{under} is not a name; "
                            "config keys are names like train: or epochs: (quote a key to make it one)")


def first_non_name_key(value: Any) -> str | None:
    """The first mapping key inside ``value`` (nested lists and mappings) that is not a string, as YAML writes
    it (``null``, ``1``, ``true``), else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return _written(key)
                stack.append(child)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def _written(value: Any) -> str:
    """``value`` as YAML would write it on one line (``null``, ``true``, ``1``, ``[a, b]``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()


def _read_tree(p: Path, chain: list[Path], source: dict[str, str], how: str) -> dict[str, Any]:
    loaded = read_yaml_mapping(p, how)
    resolved = p.resolve()
    if resolved in chain:
        loop = " -> ".join(str(c) for c in [*chain, resolved])
        raise CKTFError(f"config file {p}: its '{BASE_KEY}:' chain comes back to itself ({loop})")
    values: dict[str, Any] = {}
    bases = loaded.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise CKTFError(f"config key '{BASE_KEY}' in {p}: expected the path of another config file, or a "
                        f"list of them (relative to {p.parent}), got {bases!r}")
    for base in bases:
        _merge(values, _read_tree(p.parent / base, [*chain, resolved], source, f"'{BASE_KEY}:' of {p}"))
    _record_sources(loaded, "", f"in {p}", source)
    _merge(values, loaded)
    return values


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_config(path: str | Path | None, schema: type[T], overrides: list[str] | tuple[str, ...] = (),
                options: list[str] | tuple[str, ...] = ()) -> T:
    """Read ``path`` (YAML, with its ``base:`` chain), apply command-line ``overrides`` and validate into ``schema``.

    ``options``: the command's own option names, suggested when an override looks like a misspelt one.
    """
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if path is not None:
        values = read_config_tree(path, source)
        source[""] = f"in {Path(path)}"
    apply_overrides(values, schema, parse_overrides(overrides, options), source)
    return _build(schema, values, "", source)


def _record_sources(values: dict, prefix: str, where: str, source: dict[str, str]) -> None:
    for key, value in values.items():
        source[f"{prefix}{key}"] = where
        if isinstance(value, dict):
            _record_sources(value, f"{prefix}{key}.", where, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for ``config.yaml`` and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """YAML text of the resolved config, sections in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(values: dict[str, Any], schema: type[T], where: str) -> T:
    """Validate an already-parsed mapping (e.g. a checkpoint's saved config) into ``schema``."""
    return _build(schema, values, "", {"": f"in {where}"})


@dataclasses.dataclass(frozen=True)
class OptionRow:
    """One leaf of a config schema as ``--help`` and the configuration reference show it."""

    key: str
    kind: str
    help: str
    default: str


def option_rows(schema: type, prefix: str = "") -> list[OptionRow]:
    """Every leaf of ``schema`` (nested sections flattened to dotted keys), in declaration order."""
    rows: list[OptionRow] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(option_rows(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        rows.append(OptionRow(f"{prefix}{f.name}", _type_name(tp), f.metadata.get("help", ""), str(default)))
    return rows


def describe_options(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(--key, type, help [default])`` rows for every leaf of ``schema``, for ``--help``."""
    return [(f"--{row.key}", row.kind, f"{row.help} [default: {row.default}]") for row in option_rows(schema, prefix)]
