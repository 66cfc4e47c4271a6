"""cktf: unsupervised cross-domain knowledge transfer (CKTF, CRD, KD) in PyTorch."""

__version__ = "0.1.0"
