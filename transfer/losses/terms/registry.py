"""Loss terms by name: the registry, validation of ``loss.terms`` against it, and building the terms.

A term is found by the name it was registered under (``@register_term("kd")``); its options are validated
against its own dataclass with the config loader's one-line errors (``loss.terms.kd.temprature`` → "unknown
config key … did you mean 'loss.terms.kd.temperature'?"). Terms are always resolved and built in
registration order, whatever the order in the YAML, so the initialisation of their modules (which draws
from the global RNG) and the order of the sum do not depend on how a config is written.

Example::

    specs = resolve_terms(cfg.loss)               # validated options + declared needs, no network built
    terms, weights = build_terms(cfg.loss, ctx)   # the modules with weight > 0, and their weights
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace

from torch import nn

from transfer.config import LossConfig
from transfer.config.loader import build_section, key_sources, suggest
from transfer.errors import CKTFError
from transfer.losses.terms.base import LossTerm, Needs, TermContext, TermOptions

TERMS: dict[str, type[LossTerm]] = {}


def register_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator adding a :class:`LossTerm` subclass to the registry under ``name``.

    The class must define ``Options`` (a dataclass subclassing :class:`TermOptions`) and ``paper`` (the
    reference ``cktf methods`` shows). Names are unique, so a config can never silently mean two terms.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a term name must be an identifier (it is a config key), got {name!r}")

    def add(cls: type[LossTerm]) -> type[LossTerm]:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is already registered ({TERMS[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, LossTerm)):
            raise TypeError(f"@register_term({name!r}) decorates LossTerm subclasses, got {cls!r}")
        options = getattr(cls, "Options", None)
        if not (is_dataclass(options) and isinstance(options, type) and issubclass(options, TermOptions)):
            raise TypeError(f"{cls.__qualname__}.Options must be a dataclass subclassing TermOptions")
        if not isinstance(cls.paper, str) or not cls.paper:
            raise TypeError(f"{cls.__qualname__}.paper must name the method's reference (shown by cktf methods)")
        cls.name = name
        TERMS[name] = cls
        return cls

    return add


def unregister_term(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive sessions that register throwaway terms)."""
    TERMS.pop(name, None)


def get_term(name: str) -> type[LossTerm]:
    """The term class registered as ``name``; an unknown name is a one-line error suggesting the closest."""
    if name not in TERMS:
        raise CKTFError(f"unknown loss term 'loss.terms.{name}'{suggest(name, list(TERMS), 'loss.terms.')} "
                        "(`cktf methods` lists the terms)")
    return TERMS[name]


def list_terms() -> list[str]:
    """Registered term names in registration order."""
    return list(TERMS)


@dataclass(frozen=True)
class TermSpec:
    """A term named in the config, with its validated options and what it declares it needs."""

    name: str
    cls: type[LossTerm]
    options: TermOptions
    needs: Needs

    @property
    def active(self) -> bool:
        """Whether the term is built (weight > 0)."""
        return self.options.weight > 0


def resolve_terms(loss: LossConfig) -> list[TermSpec]:
    """Validate every entry of ``loss.terms`` against the registry, in registration order.

    Raises:
        CKTFError: an unknown term or option, a value of the wrong type or out of range, or no term with a
            positive weight (one line naming the key).
    """
    for name in loss.terms:
        get_term(name)
    specs = []
    for name, cls in TERMS.items():
        if name not in loss.terms:
            continue
        options = build_section(cls.Options, loss.terms[name], f"loss.terms.{name}.", sources=key_sources(loss))
        specs.append(TermSpec(name, cls, options, cls.declare(options, loss.nce)))
    if not any(spec.active for spec in specs):
        raise CKTFError(f"every term of loss.terms ({', '.join(s.name for s in specs)}) has weight 0; give at "
                        "least one a positive weight")
    return specs


def options_dict(options: TermOptions) -> dict:
    """A term's options as plain data (the resolved ``loss.terms.<name>`` saved in ``config.yaml``)."""
    return {f.name: getattr(options, f.name) for f in fields(options)}


def combined_needs(specs: list[TermSpec]) -> dict[str, list[str]]:
    """For each need flag, the names of the active terms declaring it (the stage provides a need if any does)."""
    needs: dict[str, list[str]] = {}
    for spec in specs:
        if spec.active:
            for flag in spec.needs.flags():
                needs.setdefault(flag, []).append(spec.name)
    return needs


def build_terms(loss: LossConfig, ctx: TermContext) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The terms of ``loss`` with a positive weight, built for ``ctx``, and their weights.

    Args:
        loss: the loss section (``terms`` validated here; ``nce`` handed to every term as ``ctx.nce``).
        ctx: tap widths/shapes, pool size and seed of the networks the terms will see.

    Returns:
        ``(terms, weights)``: a ``ModuleDict`` name → term in registration order, and name → weight.
    """
    ctx = replace(ctx, nce=loss.nce)
    active = [spec for spec in resolve_terms(loss) if spec.active]
    terms = nn.ModuleDict({spec.name: spec.cls(spec.options, ctx) for spec in active})
    return terms, {spec.name: float(spec.options.weight) for spec in active}
