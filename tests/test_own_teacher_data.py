"""Your own teacher and data, end to end: an imported torchvision teacher, transfer to an unlabeled image folder
(JPEG and PNG of mixed sizes), a probe on the student; input size and normalisation follow the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from tests.cli_helpers import invoke, one_line_error
from tests.data_fixtures import write_image_folder
from transfer.engine.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs/image_folder"
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def write_unlabeled(folder: Path, n: int = 12) -> list[Path]:
    """``n`` RGB and grayscale images, JPEG and PNG, of different sizes, some in a subfolder."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = 24 + 4 * (i % 4), 40 - 3 * (i % 5)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels) if i % 3 else Image.fromarray(pixels[..., 0])
        path = folder / ("nested" if i % 2 else "") / f"img{i:02d}{'.jpg' if i % 2 else '.png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    data = root / "my_images"
    write_unlabeled(data / "unlabeled")
    write_image_folder(data, classes=("cat", "dog"), n_per_class=4, splits=("train", "test"), size=(28, 36))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), root / "r18.pth")
    code, out = invoke("import-teacher", "--arch", "torchvision.resnet18", "--weights", str(root / "r18.pth"),
                       "--out", str(root / "teacher.safetensors"), "--image-size", "32")
    assert code == 0, out
    return root


def transfer_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["transfer", "--config", str(CONFIGS / "cktf.yaml"), "--teacher", str(root / "teacher.safetensors"),
            "--data.root", str(root / "my_images"), "--data.num_workers", "0", "--log.root", str(root / "runs"),
            "--log.name", name, "--train.epochs", "1", "--train.batch_size", "4", "--sampler.num_negatives", "4",
            "--train.checkpoint_every", "0", "--log.tensorboard", "false", "--train.threads", "1", *extra]


def test_transfer_and_probe_follow_the_imported_teacher(setup):
    unreadable = setup / "my_images/unlabeled/broken.jpg"
    unreadable.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out = invoke(*transfer_args(setup, "cktf"))
    one_line_error(code, out, "cannot decode image", str(unreadable))
    unreadable.unlink()

    code, out = invoke(*transfer_args(setup, "cktf"))
    assert code == 0, out
    run = setup / "runs/cktf"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 32 and saved["data"]["mean"] == pytest.approx(IMAGENET_MEAN)
    assert "on image_folder/unlabeled (12 images, 32x32 px)" in out  # unlabeled/ only, not train/ and test/
    meta = read_metadata(run / "last.safetensors")
    assert meta["kind"] == "transfer" and meta["image_size"] == "32" and meta["teacher_model"] == "torchvision.resnet18"

    code, out = invoke("probe", "--student", str(run / "last.safetensors"), "--config", str(CONFIGS / "probe.yaml"),
                       "--data.root", str(setup / "my_images"), "--train.epochs", "2", "--train.batch_size", "4",
                       "--probe.knn_k", "3", "--log.tensorboard", "false", "--train.threads", "1")
    assert code == 0, out
    assert "probe test acc" in out
    probed = yaml.safe_load((run / "probe/config.yaml").read_text())
    assert probed["data"]["image_size"] == 32 and probed["data"]["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_explicit_image_size_wins_with_a_warning(setup):
    code, out = invoke(*transfer_args(setup, "kd40", "--config", str(CONFIGS / "kd.yaml"), "--data.image_size", "40"))
    assert code == 0, out
    assert yaml.safe_load((setup / "runs/kd40/config.yaml").read_text())["data"]["image_size"] == 40
    assert "data.image_size 40 differs from the 32 that teacher" in out, out


def test_channel_and_size_mismatches_are_one_line(setup, tmp_path):
    from transfer.models import build_model

    torch.save(build_model("resnet8", in_channels=1, num_classes=3).state_dict(), tmp_path / "gray.pt")
    code, out = invoke("import-teacher", "--arch", "resnet8", "--weights", str(tmp_path / "gray.pt"), "--out",
                       str(tmp_path / "gray.safetensors"))
    assert code == 0, out
    one_line_error(*invoke(*transfer_args(setup, "gray", "--teacher", str(tmp_path / "gray.safetensors"),
                                          "--student.name", "resnet8")), "1-channel", "3 channels")
    assert not (setup / "runs/gray").exists()
    code, out = invoke(*transfer_args(setup, "mean1", "--data.mean", "[0.5]", "--data.std", "[0.2]"))
    assert "data.mean [0.5] differs from the [0.485, 0.456, 0.406]" in out
    one_line_error(code, out.splitlines()[-1], "data.mean has 1 values", "3-channel")
    # vgg8 pools five times: an 8x8 input leaves nothing for its last stage (after the size warning, one line)
    code, out = invoke(*transfer_args(setup, "tiny", "--student.name", "vgg8", "--loss.terms.mckt.weight", "0",
                                      "--data.image_size", "8"))
    warning, error = out.splitlines()
    assert "data.image_size 8 differs" in warning
    one_line_error(code, error, "student vgg8 cannot run on 3x8x8 images")
    assert not (setup / "runs/tiny").exists()


@pytest.mark.slow(reason="the installed cktf as processes started from another directory: a torch import each")
def test_an_installed_cktf_runs_its_shipped_configs_from_anywhere(setup, tmp_path):
    """Issue 20: `--config image_folder/cktf.yaml` works outside the checkout. The package is built into a wheel
    from a copy of the sources and installed into its own folder (its dependencies come from this venv), then
    run from a directory that has no configs/."""
    import os
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("transfer", "linear_probe", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("cktf-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(tmp_path / "site")

    def cktf(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "transfer.cli", *args], env=env, cwd=elsewhere,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import transfer; print(transfer.__file__)"], env=env,
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "site"))
    listed = cktf("configs")
    assert listed.returncode == 0 and "image_folder/cktf.yaml" in listed.stdout.split()
    assert "overlap/overlap_60/cktf_kd.yaml" in listed.stdout.split()  # nested folders ship too
    args = transfer_args(setup, "installed")
    args[args.index("--config") + 1] = "image_folder/cktf.yaml"
    done = cktf(*args)
    assert done.returncode == 0, done.stderr
    assert (setup / "runs/installed/last.safetensors").is_file()
    copied = cktf("configs", "--copy", "image_folder", "--to", "mine")
    assert copied.returncode == 0 and (elsewhere / "mine/image_folder/cktf.yaml").is_file()
    again = cktf("configs", "--copy", "image_folder", "--to", "mine")
    assert again.returncode != 0 and "never overwrites" in again.stderr
