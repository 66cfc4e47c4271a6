"""The text of ``cktf methods``: every registered term, its paper, what it needs and its options."""

from __future__ import annotations

import textwrap

from transfer.config import NCEConfig
from transfer.config.loader import describe_options
from transfer.losses.terms.base import LossTerm

WIDTH = 100


def describe_term(name: str, cls: type[LossTerm]) -> list[str]:
    """Lines describing term ``name``: summary, paper, declared needs (with default options), options."""
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    needs = cls.declare(cls.Options(), NCEConfig())
    lines = [f"{name}: {summary}", f"  paper: {cls.paper}"]
    if cls.repdistiller:
        lines.extend(textwrap.wrap(f"RepDistiller (the paper's Table 2 code): {cls.repdistiller}", WIDTH - 2,
                                   initial_indent="  ", subsequent_indent="    "))
    taps = ", ".join(needs.taps) or "-"
    flags = ", ".join(needs.flags()) or "-"
    lines.append(f"  reads: {taps}; needs (default options): {flags}")
    lines.append("  options:")
    for key, kind, text in describe_options(cls.Options, f"loss.terms.{name}."):
        wrapped = textwrap.wrap(f"{kind}. {text}", WIDTH - 8)
        lines.append(f"    {key}")
        lines.extend(f"        {part}" for part in wrapped)
    return lines


def describe_terms(terms: dict[str, type[LossTerm]]) -> str:
    """``cktf methods``' listing of ``terms`` (name → class), in registration order."""
    lines = ["A method is a set of loss terms: loss.terms.<name>.<option> in the config, or on the command line",
             "--loss.terms.<name>.<option> VALUE (e.g. CRD = pckt, CKTF = mckt + pckt, CKTF+KD = mckt + pckt + kd).",
             "The contrastive terms share loss.nce (embed_dim, temperature, momentum, projection, bank_init,",
             "stage_norm, stage_pool; see cktf transfer --help). A term with weight 0 is left out.", ""]
    for name, cls in terms.items():
        lines.extend(describe_term(name, cls))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
