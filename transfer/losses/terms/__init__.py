"""The terms of the transfer objective, one file per method, found by name.

``L = γ·CE(Y, S) + α1·Σ_m L_MCKT(G_m^S, G_m^T) + α2·L_PCKT(S_h, T_h) + θ·L_KD``  (CKTF eq. 1 and 5)

Each term is registered under the name used in ``loss.terms`` (``ce``, ``mckt``, ``pckt``, ``kd``); a method
is its set of terms: KD is ``kd``, CRD is ``pckt``, CKTF is ``mckt + pckt``, CKTF+KD adds ``kd``. Adding a
method is one new file here (see :mod:`transfer.losses.terms.base` for the contract) plus one YAML. The built-in
terms are imported below in a fixed order (:data:`BUILTIN_TERMS`): terms are built and summed in
registration order, which fixes the initialisation of their modules whatever the order in a config.
"""

import importlib

from transfer.losses.terms.base import (
    InitPhase,
    LossTerm,
    Needs,
    TermContext,
    TermOptions,
    TransferBatch,
)
from transfer.losses.terms.registry import (
    TERMS,
    TermSpec,
    build_terms,
    combined_needs,
    get_term,
    list_terms,
    options_dict,
    register_term,
    resolve_terms,
    unregister_term,
)

# The built-in terms, one module each, imported (= registered) in the order they are built and summed.
BUILTIN_TERMS = ("ce", "mckt", "pckt", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "nst",
                 "fsp")
for _name in BUILTIN_TERMS:
    importlib.import_module(f"transfer.losses.terms.{_name}")

__all__ = [
    "BUILTIN_TERMS", "TERMS", "InitPhase", "LossTerm", "Needs", "TermContext", "TermOptions", "TermSpec",
    "TransferBatch", "build_terms", "combined_needs", "get_term", "list_terms", "options_dict", "register_term",
    "resolve_terms", "unregister_term",
]
