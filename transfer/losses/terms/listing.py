"""The text of ``cktf methods``: every registered term, its paper, what it needs and its options.

:func:`term_listing` is the one description of a term; ``cktf methods`` formats it as text and the generated
methods reference (``transfer/docs_reference.py``) as Markdown.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from transfer.config import NCEConfig
from transfer.config.loader import OptionRow, option_rows
from transfer.losses.terms.base import LossTerm

WIDTH = 100

PREAMBLE = ("A method is a set of loss terms: loss.terms.<name>.<option> in the config, or on the command line",
            "--loss.terms.<name>.<option> VALUE (e.g. CRD = pckt, CKTF = mckt + pckt, CKTF+KD = mckt + pckt + kd).",
            "The contrastive terms share loss.nce (embed_dim, temperature, momentum, projection, bank_init,",
            "stage_norm, stage_pool; see cktf transfer --help). A term with weight 0 is left out.")


@dataclass(frozen=True)
class TermListing:
    """What ``cktf methods`` says about one term."""

    name: str
    summary: str
    paper: str
    repdistiller: str
    taps: tuple[str, ...]
    flags: tuple[str, ...]
    options: tuple[OptionRow, ...]


def term_listing(name: str, cls: type[LossTerm]) -> TermListing:
    """The listing of term ``name``: summary, paper, declared needs (with default options) and options."""
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    needs = cls.declare(cls.Options(), NCEConfig())
    return TermListing(name, summary, cls.paper, cls.repdistiller or "", tuple(needs.taps), tuple(needs.flags()),
                       tuple(option_rows(cls.Options, f"loss.terms.{name}.")))


def describe_term(name: str, cls: type[LossTerm]) -> list[str]:
    """Lines describing term ``name``: summary, paper, declared needs (with default options), options."""
    term = term_listing(name, cls)
    lines = [f"{name}: {term.summary}", f"  paper: {term.paper}"]
    if term.repdistiller:
        lines.extend(textwrap.wrap(f"RepDistiller (the paper's Table 2 code): {term.repdistiller}", WIDTH - 2,
                                   initial_indent="  ", subsequent_indent="    "))
    lines.append(f"  reads: {', '.join(term.taps) or '-'}; needs (default options): {', '.join(term.flags) or '-'}")
    lines.append("  options:")
    for row in term.options:
        wrapped = textwrap.wrap(f"{row.kind}. {row.help} [default: {row.default}]", WIDTH - 8)
        lines.append(f"    --{row.key}")
        lines.extend(f"        {part}" for part in wrapped)
    return lines


def describe_terms(terms: dict[str, type[LossTerm]]) -> str:
    """``cktf methods``' listing of ``terms`` (name → class), in registration order."""
    lines = [*PREAMBLE, ""]
    for name, cls in terms.items():
        lines.extend(describe_term(name, cls))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
