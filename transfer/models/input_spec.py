"""What images a network expects, recorded in its checkpoint and followed by the stages that feed it.

A network pretrained elsewhere (ImageNet weights from torchvision, say) only sees the inputs it was trained
on if the pipelines resize and normalise the user's images the same way. ``cktf import-teacher`` records
that here; ``cktf transfer`` takes it from the teacher and writes it into the student's checkpoint, and
``cktf probe`` takes it from the student. A value set in the config always wins over a recorded one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transfer.config import DataConfig
from transfer.errors import CKTFError

log = logging.getLogger("cktf")


@dataclass(frozen=True)
class InputSpec:
    """Side length and normalisation statistics a network expects; ``None`` means "not recorded".

    Args:
        image_size: side length of the square inputs.
        mean: per-channel mean subtracted from pixels scaled to [0, 1].
        std: per-channel standard deviation they are divided by.
        interpolation: resize filter of the network's own evaluation pipeline (timm's ``pretrained_cfg``, e.g.
            ``bicubic``); recorded for reference, cktf's pipelines resize bilinearly with antialiasing.
        crop_pct: centre-crop fraction of that pipeline (e.g. 0.875); recorded for reference, cktf's
            pipelines crop the whole centre square.
    """

    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 1):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None:
                object.__setattr__(self, name, tuple(float(v) for v in values))
                if not getattr(self, name):
                    raise ValueError(f"{name} needs one value per channel, got none")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def to_metadata(self) -> dict[str, str]:
        """Checkpoint metadata entries of the recorded values (safetensors metadata holds strings only)."""
        meta = {}
        if self.image_size is not None:
            meta["image_size"] = str(self.image_size)
        if self.mean is not None:
            meta["mean"] = json.dumps(list(self.mean))
        if self.std is not None:
            meta["std"] = json.dumps(list(self.std))
        if self.interpolation is not None:
            meta["interpolation"] = self.interpolation
        if self.crop_pct is not None:
            meta["crop_pct"] = str(self.crop_pct)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> InputSpec:
        """The spec a checkpoint records (all ``None`` for one that records nothing, e.g. older ones).

        Raises:
            ValueError: an entry is present but malformed.
        """
        try:
            size = int(meta["image_size"]) if "image_size" in meta else None
            mean = _floats(json.loads(meta["mean"])) if "mean" in meta else None
            std = _floats(json.loads(meta["std"])) if "std" in meta else None
            crop_pct = float(meta["crop_pct"]) if "crop_pct" in meta else None
            return cls(size, mean, std, meta.get("interpolation"), crop_pct)
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed input description (image_size/mean/std/crop_pct): {err}") from None

    @classmethod
    def of_data(cls, data: DataConfig) -> InputSpec:
        """What a stage's data config asks for (``None`` where it leaves the choice to the checkpoint)."""
        return cls(data.image_size, data.mean, data.std)


def _floats(value: object) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"expected a list of numbers, got {value!r}")
    return [float(v) for v in value]


def follow_recorded_input(data: DataConfig, recorded: InputSpec, source: str) -> None:
    """Fill the unset ``data.image_size``/``mean``/``std`` from ``recorded`` (what ``source`` expects).

    Values set in the config win; where one differs from the recorded value a warning names both, since a
    pretrained network fed other statistics or sizes than it was trained on usually does worse.
    """
    for key in ("image_size", "mean", "std"):
        wanted, expected = getattr(data, key), getattr(recorded, key)
        if expected is None:
            continue
        if wanted is None:
            setattr(data, key, list(expected) if isinstance(expected, Sequence) else expected)
        elif _differs(wanted, expected):
            log.warning(f"data.{key} {wanted} differs from the {_text(expected)} that {source} expects; "
                        f"using data.{key} as configured")


def _differs(wanted: object, expected: object) -> bool:
    if isinstance(expected, tuple):
        return len(wanted) != len(expected) or any(abs(a - b) > 1e-9 for a, b in zip(wanted, expected, strict=False))
    return wanted != expected


def _text(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_channels(data: DataConfig, channels: int) -> None:
    """``data.mean``/``data.std`` must give one value per image channel (a single value would broadcast silently)."""
    for key in ("mean", "std"):
        values = getattr(data, key)
        if values is not None and len(values) != channels:
            raise CKTFError(f"data.{key} has {len(values)} values but {data.name}/{data.train_split} has "
                            f"{channels}-channel images; give one value per channel")
