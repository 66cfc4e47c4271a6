"""cktf: unsupervised cross-domain knowledge transfer (CKTF, CRD, KD) in PyTorch.

The Python API lives in :mod:`transfer.api` (``from transfer.api import CKTFLoss``); ``transfer.CKTFLoss`` and
``transfer.load_teacher`` resolve to it lazily, so importing ``transfer`` (and ``cktf --help``) never imports torch.
"""

__version__ = "0.1.0"

_API = ("CKTFLoss", "load_teacher")


def __getattr__(name: str):
    if name in _API:
        from transfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
