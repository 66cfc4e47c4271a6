"""What a checkpoint says about its inputs, and how a stage's data config follows it."""

from __future__ import annotations

import pytest
import torch

from tests.cli_helpers import assert_one_line
from transfer.config import DataConfig, TransferConfig, load_config
from transfer.data.batch_augment import build_batch_transform
from transfer.data.transforms import build_transform
from transfer.errors import CKTFError
from transfer.models.input_spec import InputSpec, follow_recorded_input


def test_metadata_round_trip_and_malformed_entries():
    spec = InputSpec(48, (0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    assert InputSpec.from_metadata(spec.to_metadata()) == spec
    assert InputSpec.from_metadata({}) == InputSpec() and InputSpec().to_metadata() == {}
    with pytest.raises(ValueError, match="image_size/mean/std"):
        InputSpec.from_metadata({"mean": '"red"'})
    with pytest.raises(ValueError, match="one per channel"):
        InputSpec(None, (0.5, 0.5), (0.2,))


def test_unset_keys_follow_the_checkpoint_and_set_ones_win():
    data = DataConfig(name="image_folder", image_size=None, std=[0.3, 0.3, 0.3])
    follow_recorded_input(data, InputSpec(96, (0.1, 0.2, 0.3), (0.2, 0.2, 0.2)), "teacher t")
    assert data.image_size == 96 and data.mean == [0.1, 0.2, 0.3] and data.std == [0.3, 0.3, 0.3]


def test_pipelines_normalise_with_the_given_statistics():
    white = torch.full((3, 10, 10), 255, dtype=torch.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    out = build_transform("image_folder", train=False, image_size=8, mean=mean, std=std)(white)
    assert out.shape == (3, 8, 8) and torch.allclose(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    batched = build_batch_transform("image_folder", train=False, image_size=8, mean=mean, std=std)(white[None])
    assert torch.allclose(batched[0, :, 0, 0], torch.tensor([1.0, 3.0, 0.5]), atol=1e-5)


def test_data_mean_and_std_are_checked_in_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: image_folder}\nteacher: {}\nstudent: {name: resnet8}\nloss: {}\nsampler: {}\n"
                    "train: {}\nlog: {name: x}\n")
    cfg = load_config(path, TransferConfig, ["--data.mean", "[0.5, 0.5, 0.5]", "--data.std", "[0.2, 0.2, 0.2]"])
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    with pytest.raises(CKTFError) as info:
        load_config(path, TransferConfig, ["--data.mean", "[0.5, 0.5]", "--data.std", "[0.2, 0.2, 0.2]"])
    assert_one_line(info, "data.mean", "data.std")
    with pytest.raises(CKTFError) as info:
        load_config(path, TransferConfig, ["--data.std", "[0.2, 0.0, 0.2]"])
    assert_one_line(info, "data.std", "positive")
