"""Installable package ``cktf`` (import packages ``transfer`` and ``linear_probe``; console script ``cktf``).

timm models (``timm.<name>``) need the optional extra: ``pip install -e '.[timm]'`` (``dev`` includes it, so
``make setup`` installs it for the tests; it also brings mkdocs and mkdocs-material for ``make docs``).

faiss: ``faiss-cpu`` by default. For GPU indexes install with ``CKTF_FAISS=gpu pip install -e '.[gpu]'``,
which swaps it for ``faiss-gpu`` (both ship the same ``faiss`` module, so they must not be installed together).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

# The example configs (configs/<folder>/*.yaml) install as package data under transfer/configs/, so an installed
# cktf can run `--config image_folder/cktf.yaml` from anywhere (transfer/config/shipped.py).
HERE = Path(__file__).resolve().parent
CONFIG_FOLDERS = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "configs").rglob("*") if p.is_dir())
CONFIG_PACKAGES = {"transfer.configs": "configs", **{"transfer." + folder.replace("/", "."): folder
                                                     for folder in CONFIG_FOLDERS}}

FAISS_GPU = os.environ.get("CKTF_FAISS", "cpu").lower() == "gpu"

requirements = [
    "torch>=2.2",
    "torchvision>=0.17",
    "einops>=0.7",
    "tensorboard>=2.14",
    "click>=8.1",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "numpy>=1.24",
    "matplotlib>=3.7",
]
TIMM = ["timm>=0.9"]
if not FAISS_GPU:
    requirements.append("faiss-cpu>=1.8")

setup(
    name="cktf",
    version="0.1.0",
    description="Unsupervised cross-domain knowledge transfer: CKTF, CRD and KD with a faiss negative sampler",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["transfer", "transfer.*", "linear_probe", "linear_probe.*"]) + list(CONFIG_PACKAGES),
    package_dir=CONFIG_PACKAGES,
    package_data={name: ["*.yaml", "*.md"] for name in CONFIG_PACKAGES},
    install_requires=requirements,
    extras_require={
        "gpu": ["faiss-gpu>=1.8"],
        "timm": TIMM,
        "dev": ["pytest>=7.4", "ruff>=0.4", "hypothesis>=6.90", "mkdocs>=1.6,<2", "mkdocs-material>=9.5", *TIMM],
    },
    entry_points={"console_scripts": ["cktf = transfer.cli:main"]},
)
