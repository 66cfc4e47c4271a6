"""Config sections shared by every stage (teacher training, transfer, probing).

Each stage's top-level config is a dataclass of these sections; later stages add
their own (``teacher``, ``student``, ``loss``, ``sampler``, ``probe``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from transfer.config.loader import option
from transfer.errors import CKTFError


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class DataConfig:
    """Which dataset and splits a stage reads."""

    name: str = option(help="dataset: stl10, tinyimagenet, fashion_mnist, fashion_split, image_folder")
    root: str | None = option(None, help="dataset directory (null: the dataset's default location, if any)")
    train_split: str = option("train", help="split to train on")
    val_split: str | None = option(None, help="validation split; null: hold out val_fraction of train_split")
    val_fraction: float = option(0.1, help="fraction of train_split held out for validation when val_split is "
                                 "null (0 disables validation)", min=0.0, max=0.5)
    test_split: str | None = option(None, help="split evaluated after every epoch for reporting only "
                                    "(never used for model selection)")
    image_size: int | None = option(None, help="input resolution (null: what the teacher/student checkpoint "
                                    "records, else the dataset's default)", min=8)
    mean: list[float] | None = option(None, help="per-channel normalisation mean (null: what the checkpoint "
                                      "records, else the dataset's statistics)")
    std: list[float] | None = option(None, help="per-channel normalisation std (null: like mean)")
    num_workers: int | Literal["auto"] = option(
        0, help="DataLoader worker processes (0: load in the main process; auto: one per CPU this process may use "
        "beyond the first, at most 4; config.yaml records the number used)", min=0)
    augment: Literal["batched", "per_image"] = option(
        "batched", help="where training augmentation runs: batched (datasets yield uint8 images; crop, flip and "
        "normalisation run on each whole batch on the training device) or per_image (torchvision transforms in "
        "the loader)")
    options: dict[str, Any] = option(default_factory=dict, help="dataset-specific options, e.g. "
                                     "--data.options.labels_per_class 20")

    def validate(self) -> None:
        if self.num_workers == "auto":
            self.num_workers = min(4, max(0, available_cpus() - 1))
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and not values:
                raise CKTFError(f"config key 'data.{key}' must list one value per channel, got []")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise CKTFError(f"config keys 'data.mean' ({len(self.mean)} values) and 'data.std' ({len(self.std)}) "
                            "must have one value per channel each")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise CKTFError(f"config key 'data.std' must be positive, got {self.std}")


@dataclass
class ModelConfig:
    """A network from the model registry."""

    name: str = option(help="model name from the registry (see `cktf models`)")
    taps: dict[str, Any] = option(default_factory=dict, help="feature-tap node names for models outside the "
                                  "registry: stem, stages, blocks, penultimate, logits")


@dataclass
class TrainConfig:
    """Optimisation settings of the shared training engine."""

    epochs: int = option(30, help="number of epochs (0 saves the initialised network: the untrained control)",
                         min=0)
    batch_size: int = option(64, help="training batch size", min=1)
    eval_batch_size: int = option(256, help="batch size for evaluation passes", min=1)
    lr: float = option(0.05, help="initial learning rate of SGD", min=0.0)
    momentum: float = option(0.9, help="SGD momentum", min=0.0, max=1.0)
    nesterov: bool = option(True, help="Nesterov momentum")
    weight_decay: float = option(5e-4, help="L2 weight decay", min=0.0)
    schedule: Literal["step", "cosine", "constant"] = option("step", help="learning-rate schedule")
    milestones: list[int] = option(default_factory=lambda: [150, 180, 210],
                                   help="epochs at which the step schedule multiplies the lr by lr_decay", min=1)
    lr_decay: float = option(0.1, help="step schedule factor", min=0.0, max=1.0)
    seed: int = option(0, help="random seed (data order, augmentation, initialisation)", min=0)
    threads: int = option(0, help="torch CPU threads (0: torch's default)", min=0)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="autocast precision of the networks "
                                                        "(fp16 uses a gradient scaler; CUDA only)")
    channels_last: bool = option(True, help="store the networks' convolution weights channels-last (NHWC), the "
                                 "faster layout for CPU (oneDNN) and GPU convolutions; same results up to rounding")
    compile: bool = option(False, help="torch.compile the networks' forward passes (opt-in: tens of seconds of "
                           "compilation per run; needs a C++ compiler on CPU, triton on CUDA)")
    sync_bn: bool = option(False, help="under torchrun: SyncBatchNorm in the trained networks (batch statistics over "
                           "the global batch; CUDA only). false: per-rank statistics, running averages averaged "
                           "across ranks every epoch")
    deterministic: bool = option(
        False, help="deterministic kernels: cuDNN without autotuning, torch.use_deterministic_algorithms (ops "
        "without a deterministic CUDA kernel warn), CUBLAS_WORKSPACE_CONFIG :4096:8. On CUDA needed for "
        "bit-identical reruns and resumes; slower there. A run resumes only with the value it started with")
    checkpoint_every: int | str = option(
        0, help="also checkpoint inside an epoch, every N training steps (an integer) or every N minutes (e.g. "
        "'10min'), so a preempted run loses little; 0: at the end of each epoch only. SIGINT/SIGTERM always "
        "checkpoint the current step")

    @property
    def checkpoint_interval(self) -> tuple[int, float]:
        """``(steps, seconds)`` between checkpoints inside an epoch; 0 means not by that measure."""
        return parse_checkpoint_every(self.checkpoint_every)

    def validate(self) -> None:
        self.checkpoint_interval  # noqa: B018 - raises on a malformed value
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise CKTFError(f"config key 'train.device': expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise CKTFError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")


def parse_checkpoint_every(value: int | str) -> tuple[int, float]:
    """``train.checkpoint_every`` as ``(steps, seconds)``: ``500`` → (500, 0), ``'10min'`` → (0, 600)."""
    if isinstance(value, int) and value >= 0:
        return value, 0.0
    text = str(value).strip().lower().replace(" ", "")
    for suffix in ("minutes", "minute", "mins", "min", "m"):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            try:
                minutes = float(number)
            except ValueError:
                break
            if minutes > 0 and minutes == minutes and minutes != float("inf"):
                return 0, 60.0 * minutes
            break
    raise CKTFError(f"config key 'train.checkpoint_every': expected a number of steps (e.g. 500), minutes "
                    f"(e.g. '10min') or 0, got {value!r}")


@dataclass
class LogConfig:
    """Where a run writes its checkpoints, TensorBoard events and config."""

    name: str = option(help="run name; the run directory is <root>/<name>")
    root: str = option("runs", help="directory holding all runs")
    tensorboard: bool = option(True, help="write TensorBoard scalars")
    progress: bool = option(True, help="show a progress bar on a terminal")
    log_every: int = option(20, help="training steps between logged scalars", min=1)
    progress_every: float = option(30.0, help="seconds between progress lines when the output is not a "
                                   "terminal (0: none)", min=0.0)


@dataclass
class TeacherConfig:
    """``cktf train-teacher``: supervised training on the labeled source domain."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    log: LogConfig


@dataclass
class TeacherRefConfig:
    """The frozen teacher of a transfer: a checkpoint written by ``cktf train-teacher``."""

    checkpoint: str | None = option(None, help="teacher checkpoint (.safetensors from train-teacher); also --teacher")
    taps: dict[str, Any] = option(default_factory=dict, help="feature-tap node names overriding the teacher "
                                  "model's defaults")


@dataclass
class NCEConfig:
    """Settings shared by every contrastive term (CRD's NCE estimator), kept in one place (``loss.nce``).

    The contrastive terms (``pckt``, ``mckt``, and any later one) read these; a term's own options live under
    ``loss.terms.<name>``.
    """

    embed_dim: int = option(128, help="d: projection output size", min=16, max=1024)
    temperature: float = option(0.1, help="τ of the NCE objectives", min=1e-4)
    momentum: float = option(0.5, help="memory-bank momentum", min=0.0, max=1.0)
    projection: Literal["linear", "bn_linear", "mlp"] = option(
        "linear", help="projection head g(·): linear (paper), bn_linear (non-affine BatchNorm of the pooled input, "
        "then linear) or mlp")
    bank_dtype: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="storage type of the memory banks (half of the memory in bf16/fp16; scores, momentum updates "
        "and Z stay fp32)")
    bank_init: Literal["random", "embed"] = option(
        "random", help="random: CRD's uniform-noise banks; embed: fill the banks with the networks' initial "
        "embeddings of every item before training (meaningful positives from the first step)")
    stage_norm: Literal["none", "batch"] = option(
        "none", help="normalisation of each stage map before pooling: none (paper text) or batch (L2 norm "
        "across the batch dimension, every (channel, y, x) entry divided by its norm over the batch: what the "
        "published CKTF code does; couples the samples of a batch). Never applied to the stem or penultimate")
    stage_pool: Literal["global", "reference"] = option(
        "global", help="pooling of the stem and stage maps before the heads: global (average over H, W; paper "
        "eq. 2) or reference (the published CKTF code's pool per model family: 8x8 average pool, stride 8, "
        "then flatten for CIFAR-style ResNets/WRNs, e.g. C*16 values from a 32x32 map; global for VGG and "
        "ImageNet-style ResNets)")


def _paper_terms() -> dict[str, Any]:
    return {"mckt": {"weight": 0.8}, "pckt": {"weight": 0.2}}


_SEE = "see configs/fashion_split/{}.yaml"
# Keys of the flat loss section used before terms were plugins, and where each one went.
MOVED_LOSS_KEYS = {
    "ce": "loss.terms.ce.weight; " + _SEE.format("cktf"),
    "mckt": "loss.terms.mckt.weight; " + _SEE.format("cktf"),
    "pckt": "loss.terms.pckt.weight; " + _SEE.format("crd"),
    "kd": "loss.terms.kd.weight; " + _SEE.format("kd"),
    "kd_temperature": "loss.terms.kd.temperature; " + _SEE.format("kd"),
    "layer_mapping": "loss.terms.mckt.layer_mapping; " + _SEE.format("cktf"),
    "mapping_schedule": "loss.terms.mckt.mapping_schedule; see configs/tinyimagenet_to_stl10/cktf_vgg19_vgg8.yaml",
    "temperature": "loss.nce.temperature; " + _SEE.format("crd"),
    "embed_dim": "loss.nce.embed_dim; " + _SEE.format("crd"),
    "projection": "loss.nce.projection; " + _SEE.format("crd"),
    "nce_momentum": "loss.nce.momentum; " + _SEE.format("crd"),
    "bank_init": "loss.nce.bank_init; " + _SEE.format("crd"),
    "stage_norm": "loss.nce.stage_norm; see configs/tinyimagenet_to_stl10/cktf_vgg19_vgg8.yaml",
    "stage_pool": "loss.nce.stage_pool; see configs/tinyimagenet_to_stl10/cktf_vgg19_vgg8.yaml",
}


@dataclass
class LossConfig:
    """The objective: a weighted sum of loss terms, each named under ``terms`` with its own options.

    A method is its set of terms: KD is ``kd``, CRD is ``pckt``, CKTF is ``mckt + pckt``, CKTF+KD adds ``kd``
    (``cktf methods`` lists every registered term and its options). ``terms`` is a free mapping here: it is
    validated against the term registry when the transfer stage builds the terms, so reading a config never
    imports torch. A term with weight 0 is not built.
    """

    moved_keys: ClassVar[dict[str, str]] = MOVED_LOSS_KEYS

    method: str = option("cktf", help="label of the method in logs and reports (kd, crd, cktf, cktf_kd, …)")
    nce: NCEConfig = option(default_factory=NCEConfig, help="settings shared by the contrastive terms")
    terms: dict[str, Any] = option(
        default_factory=_paper_terms, help="the terms of the objective and their options, e.g. --loss.terms.kd.weight "
        "0.9 --loss.terms.kd.temperature 4; a file's terms replace this default (CKTF, paper text: mckt 0.8, "
        "pckt 0.2). See `cktf methods` for every term and its options")

    def validate(self) -> None:
        for name, options in self.terms.items():
            if not isinstance(name, str) or not name:
                raise CKTFError(f"config key 'loss.terms': term names are strings, got {name!r}")
            if options is not None and not isinstance(options, dict):
                raise CKTFError(f"config key 'loss.terms.{name}': expected a mapping of the term's options (e.g. "
                                f"loss.terms.{name}.weight 1.0), got {options!r}")
        if not self.terms:
            raise CKTFError("config key 'loss.terms' is empty; name at least one term (see `cktf methods`)")


@dataclass
class SamplerConfig:
    """How the K negatives of every anchor are drawn (see transfer/sampling)."""

    kind: Literal["uniform", "debiased", "hard"] = option("uniform", help="uniform (CRD), debiased (exclude the "
                                                          "anchor's teacher-space neighbours) or hard")
    num_negatives: int = option(16384, help="K: negatives per anchor", min=1)
    shared: bool | None = option(None, help="one set of K negatives shared by the batch (MoCo-style; one GEMM per "
                                 "objective, 3-4x faster, same probe accuracy on fashion_split) instead of K per "
                                 "anchor (CRD/paper); null: shared for uniform, per anchor for debiased/hard")
    k: int = option(32, help="neighbours per item in the faiss table (debiased/hard exclude the first k)", min=1)
    hard_fraction: float = option(0.1, help="hard: fraction of K taken from the neighbours ranked just after k",
                                  min=0.0, max=1.0)
    hard_pool: int = option(64, help="hard: how many neighbours after the excluded k are hard candidates", min=1)
    index: Literal["auto", "flat", "ivf"] = option("auto", help="faiss index: exact flat up to 200K items, IVF "
                                                   "beyond (auto)")
    cache_dir: str = option("data_cache/neighbours", help="where neighbour tables are cached")

    def validate(self) -> None:
        if self.shared is None:
            self.shared = self.kind == "uniform"
        if self.shared and self.kind != "uniform":
            raise CKTFError(f"sampler.shared true needs sampler.kind uniform ({self.kind} negatives depend on "
                            "each anchor); set --sampler.shared false")


@dataclass
class TransferConfig:
    """``cktf transfer``: a frozen teacher teaches a student on the unlabeled target domain.

    During transfer the student's classifier has the *teacher's* (source) classes, as in the paper's step 1
    (a "student-fc200" on unlabeled STL-10); the linear probe later replaces it.
    """

    data: DataConfig
    teacher: TeacherRefConfig
    student: ModelConfig
    loss: LossConfig
    sampler: SamplerConfig
    train: TrainConfig
    log: LogConfig
