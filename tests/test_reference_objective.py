"""The published CKTF code's objective as options: batch-dimension normalisation, family pooling, per-batch
layer mapping. Every expectation is computed independently in the test (loops, hand-worked sizes)."""

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli_helpers import invoke
from tests.data_fixtures import write_fashion_idx
from transfer.config import LossConfig, NCEConfig
from transfer.engine.checkpoint import load_checkpoint
from transfer.errors import CKTFError
from transfer.losses.layer_mapping import LayerMapper, batch_map_cosine, select_per_batch
from transfer.losses.stage_features import StageFeatures
from transfer.losses.terms import TermContext, build_terms
from transfer.models import FeatureTaps, TapOutputs, build_model, tap_spec_for
from transfer.models.registry import reference_pool
from transfer.sampling import build_sampler
from transfer.tasks.transfer import TransferTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs/fashion_split"


REFERENCE_MCKT = LossConfig(nce=NCEConfig(stage_pool="reference", stage_norm="batch"), terms={"mckt": {"weight": 1.0}})


def by_hand(x: torch.Tensor, window: int) -> torch.Tensor:
    """Batch-dim L2 normalisation then a window x window average pool, written with loops."""
    b, c, h, w = x.shape
    norm = torch.zeros(c, h, w)
    for i in range(b):
        norm += x[i] ** 2
    x = x / norm.sqrt()
    rows, cols = h // window, w // window
    out = torch.zeros(b, c * rows * cols)
    for n in range(b):
        k = 0
        for ch in range(c):
            for r in range(rows):
                for q in range(cols):
                    out[n, k] = x[n, ch, r * window:(r + 1) * window, q * window:(q + 1) * window].mean()
                    k += 1
    return out


def test_batch_norm_and_8x8_pool_match_a_hand_computation():
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    got = StageFeatures(batch_norm=True, window=8)(x)
    assert got.shape == (3, 2 * 2 * 2)
    assert torch.allclose(got, by_hand(x, 8), atol=1e-6)


def test_a_28x28_map_drops_its_last_rows_and_a_small_map_is_pooled_globally():
    x = torch.rand(2, 3, 28, 28)
    poisoned = x.clone()
    poisoned[:, :, 24:, :] = 1e6  # the reference's floor division never looks at rows/cols 24..27
    poisoned[:, :, :, 24:] = 1e6
    pool = StageFeatures(window=8)
    assert pool(x).shape == (2, 3 * 3 * 3) and torch.equal(pool(x), pool(poisoned))
    small = torch.rand(2, 3, 7, 7)
    assert torch.allclose(pool(small), small.mean(dim=(2, 3)))
    assert pool.out_dim((3, 28, 28)) == 27 and pool.out_dim((3, 7, 7)) == 3 and pool.out_dim((3, 14, 14)) == 3


def test_batch_normalisation_couples_the_samples_of_a_batch_and_the_default_does_not():
    x = torch.rand(4, 2, 8, 8)
    changed = x.clone()
    changed[1] *= 10
    coupled = StageFeatures(batch_norm=True)
    assert not torch.allclose(coupled(x)[0], coupled(changed)[0])
    plain = StageFeatures()
    assert torch.equal(plain(x)[0], plain(changed)[0])
    assert torch.allclose(plain(x), x.mean(dim=(2, 3)))


def test_registry_declares_the_reference_pool_of_each_family():
    assert [reference_pool(n) for n in ("resnet8", "resnet32x4", "wrn_16_2")] == [8, 8, 8]
    assert [reference_pool(n) for n in ("vgg8", "vgg19", "resnet18", "torchvision.resnet18")] == [None] * 4


@pytest.mark.parametrize("size,expected", [
    (32, {"stem": 16 * 16, "stage1": 16 * 16, "stage2": 32 * 4, "stage3": 64}),
    (28, {"stem": 16 * 9, "stage1": 16 * 9, "stage2": 32 * 1, "stage3": 64}),  # 28->3x3, 14->1x1, 7 clipped
])
def test_head_input_sizes_under_reference_pooling(size, expected):
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("vgg8", 1, 5), tap_spec_for("vgg8"))
    shape = (1, size, size)
    s_shapes = student.shapes(shape)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), 10,
                      student_shapes=s_shapes, teacher_shapes=teacher.shapes(shape), student_pool=8, teacher_pool=None)
    terms, _ = build_terms(REFERENCE_MCKT, ctx)
    pairs = terms["mckt"].pairs
    assert {name: pairs[name].head_student.in_dim for name in expected} == expected
    assert pairs["stage1"].head_teacher.in_dim == 128  # VGG: global pool, channels only
    # the default keeps the pooled features: channels only
    plain, _ = build_terms(LossConfig(terms={"mckt": {"weight": 1.0}}), ctx)
    assert plain["mckt"].pairs["stage1"].head_student.in_dim == 16


def test_stem_is_pooled_like_the_stages_but_never_batch_normalised():
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    shape = (1, 16, 16)
    ctx = TermContext(student.channels(shape), student.channels(shape), 10,
                      student_shapes=student.shapes(shape), teacher_shapes=student.shapes(shape), student_pool=8,
                      teacher_pool=8)
    terms, _ = build_terms(REFERENCE_MCKT, ctx)
    pairs = terms["mckt"].pairs
    assert not pairs["stem"].reduce_student.batch_norm and pairs["stem"].reduce_student.window == 8
    assert pairs["stage1"].reduce_student.batch_norm and pairs["stage2"].reduce_teacher.batch_norm


def cosine_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    """Batch-normalise both maps, pad the narrower's channels equally on both sides, cosine of everything."""
    def bn(x):
        return x / x.pow(2).sum(0, keepdim=True).sqrt().clamp_min(1e-12)  # all-zero entries stay 0
    s, t = bn(s), bn(t)
    if s.shape[1] < t.shape[1]:
        extra = t.shape[1] - s.shape[1]
        zeros = torch.zeros(s.shape[0], 1, *s.shape[2:])
        s = torch.cat([zeros] * (extra // 2) + [s] + [zeros] * (extra - extra // 2), dim=1)
    return float((s * t).sum() / (s.norm() * t.norm()))


def per_batch_pair():
    """Student stage map S (4 channels); teacher stage with 4 blocks of 6 channels:
    0: S padded at the *end* (not where the reference aligns it), 1: noise, 2: S padded equally on both
    sides and scaled per (channel, y, x) — identical to S after batch normalisation —, 3: its negation."""
    g = torch.Generator().manual_seed(1)
    s = torch.rand(5, 4, 3, 3, generator=g) + 0.1
    centred = torch.nn.functional.pad(s, (0, 0, 0, 0, 1, 1))
    scale = torch.rand(1, 6, 3, 3, generator=g) + 0.5
    blocks = [torch.nn.functional.pad(s, (0, 0, 0, 0, 0, 2)), torch.rand(5, 6, 3, 3, generator=g),
              centred * scale, -centred * scale]
    student = TapOutputs(stem=torch.rand(5, 2, 6, 6), stages=[s], penultimate=torch.rand(5, 4), logits=torch.rand(5, 3))
    teacher = TapOutputs(stem=torch.rand(5, 2, 6, 6), stages=[blocks[-1]], penultimate=torch.rand(5, 6),
                         logits=torch.rand(5, 3), blocks=[blocks])
    return student, teacher


def test_per_batch_similarity_is_the_whole_batch_normalised_map_cosine():
    student, teacher = per_batch_pair()
    s, blocks = student.stages[0], teacher.blocks[0]
    for block in blocks:
        assert batch_map_cosine(s, block).item() == pytest.approx(cosine_by_hand(s, block), abs=1e-5)
    assert batch_map_cosine(s, blocks[2]).item() == pytest.approx(1.0, abs=1e-5)
    assert select_per_batch("largest", student, teacher) == [2]
    assert select_per_batch("smallest", student, teacher) == [3]
    with pytest.raises(ValueError, match="spatial"):
        batch_map_cosine(s, torch.rand(5, 6, 4, 4))


def test_largest_follows_the_current_batch():
    student, teacher = per_batch_pair()
    mapper = LayerMapper("largest", "per_batch")
    mapping = torch.tensor([3])
    assert mapper(student, teacher, mapping) == [2] and mapping.tolist() == [2]
    blocks = teacher.blocks[0]
    blocks[1], blocks[2] = blocks[2] * 2, blocks[1]  # the next batch: block 1 matches, block 2 is noise
    assert mapper(student, teacher, mapping) == [1] and mapping.tolist() == [1]
    fixed = LayerMapper("largest", "once")
    assert fixed(student, teacher, torch.tensor([3])) == [3] and not fixed.moves


def test_random_per_batch_is_seeded_resumable_and_leaves_the_global_rng_alone():
    student, teacher = per_batch_pair()
    mapper = LayerMapper("random", "per_batch", seed=7)
    state = torch.get_rng_state()
    mapping = torch.tensor([3])
    draws = [mapper(student, teacher, mapping)[0] for _ in range(30)]
    assert torch.equal(torch.get_rng_state(), state)
    assert set(draws) == {0, 1, 2, 3} and int(mapper.draws) == 30
    again = LayerMapper("random", "per_batch", seed=7)
    assert [again(student, teacher, mapping)[0] for _ in range(12)] == draws[:12]
    resumed = LayerMapper("random", "per_batch", seed=7)
    resumed.load_state_dict(again.state_dict())
    assert [resumed(student, teacher, mapping)[0] for _ in range(18)] == draws[12:]
    other = LayerMapper("random", "per_batch", seed=8)
    assert [other(student, teacher, mapping)[0] for _ in range(30)] != draws


def resnet14_pair():
    torch.manual_seed(0)
    student = FeatureTaps(build_model("resnet8", 1, 5), tap_spec_for("resnet8"))
    teacher = FeatureTaps(build_model("resnet14", 1, 5), tap_spec_for("resnet14"), with_blocks=True)
    shape = (1, 16, 16)
    ctx = TermContext(student.channels(shape), teacher.channels(shape), 40,
                      student_shapes=student.shapes(shape), teacher_shapes=teacher.shapes(shape), student_pool=8,
                      teacher_pool=8, seed=3)
    return student, teacher, ctx


def test_per_batch_mapping_is_logged_and_one_teacher_head_per_stage_reads_the_chosen_block():
    student, teacher, ctx = resnet14_pair()
    cfg = LossConfig(nce=NCEConfig(stage_norm="batch", stage_pool="reference"),
                     terms={"mckt": {"weight": 1.0, "layer_mapping": "random", "mapping_schedule": "per_batch"}})
    terms, weights = build_terms(cfg, ctx)
    task = TransferTask(student, teacher, terms, weights, build_sampler("uniform", 40, 8))
    task.train()
    seen = []
    for step in range(12):
        out = task.training_step(torch.randn(4, 1, 16, 16), torch.full((4,), -1), torch.arange(4) + 4 * (step % 10))
        logged = [int(out.terms[f"mapping/stage{i}"]) for i in (1, 2, 3)]
        assert logged == terms["mckt"].mapping.tolist()
        assert not any(k.startswith("mapping/") for k in [k for k in out.terms if "mckt" in k])
        seen.append(logged)
    assert {tuple(s) for s in seen} != {tuple(seen[0])}  # the choice moves
    heads = {name: pair.head_teacher for name, pair in terms["mckt"].pairs.items()}
    assert set(heads) == {"stem", "stage1", "stage2", "stage3"}
    # the loss is the sum of the losses only: the logged block indices never enter it
    losses = sum(v for k, v in out.terms.items() if k.startswith("mckt/"))
    assert out.loss.item() == pytest.approx(losses.item(), rel=1e-6)
    state = task.checkpoint_state()
    assert int(state["terms.mckt.mapper.draws"]) == 12


def test_static_mapping_logs_nothing_and_keeps_its_checkpoint_keys():
    student, teacher, ctx = resnet14_pair()
    terms, weights = build_terms(LossConfig(terms={"mckt": {"weight": 1.0, "layer_mapping": "random"}}), ctx)
    task = TransferTask(student, teacher, terms, weights, build_sampler("uniform", 40, 8))
    out = task.training_step(torch.randn(4, 1, 16, 16), torch.full((4,), -1), torch.arange(4))
    assert not any(k.startswith("mapping/") for k in out.terms)
    assert "terms.mckt.mapping" in task.checkpoint_state()
    assert not any("mapper" in k for k in task.checkpoint_state())


def test_per_batch_needs_one_shape_per_teacher_stage():
    student, teacher, ctx = resnet14_pair()
    blocks = [[(16, 16, 16), (16, 8, 8)], *ctx.teacher_shapes["blocks"][1:]]
    ctx.teacher_shapes = {**ctx.teacher_shapes, "blocks": blocks}
    cfg = LossConfig(terms={"mckt": {"weight": 1.0, "layer_mapping": "largest", "mapping_schedule": "per_batch"}})
    with pytest.raises(CKTFError, match="mapping_schedule") as info:
        build_terms(cfg, ctx)
    assert "\n" not in str(info.value)


def test_reference_features_give_a_finite_loss_with_gradients():
    student, teacher, ctx = resnet14_pair()
    cfg = LossConfig(nce=NCEConfig(stage_norm="batch", stage_pool="reference"),
                     terms={"mckt": {"weight": 0.04, "layer_mapping": "largest", "mapping_schedule": "per_batch"},
                            "pckt": {"weight": 1.0}})
    terms, weights = build_terms(cfg, ctx)
    task = TransferTask(student, teacher, terms, weights, build_sampler("uniform", 40, 8))
    out = task.training_step(torch.randn(4, 1, 16, 16), torch.full((4,), -1), torch.arange(4))
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    assert all(p.grad is not None for p in terms["mckt"].pairs["stage2"].head_student.parameters())


# -- end to end: `cktf transfer` with the reference objective on a tiny Fashion-MNIST fixture ---------------------

REFERENCE = ["--loss.terms.mckt.layer_mapping", "random", "--loss.terms.mckt.mapping_schedule", "per_batch",
             "--loss.nce.stage_norm", "batch", "--loss.nce.stage_pool", "reference"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    write_fashion_idx(root / "fashion", n_train=300, n_test=60)
    code, out = invoke("train-teacher", "--config", str(CONFIGS / "teacher.yaml"), "--data.root",
                       str(root / "fashion"), "--log.root", str(root / "runs"), "--log.name", "teacher",
                       "--model.name", "resnet14", "--train.epochs", "1", "--train.batch_size", "32",
                       "--log.tensorboard", "false")
    assert code == 0, out
    return root


def reference_transfer(root, name: str, *extra: str) -> list[str]:
    teacher = str(root / "runs/teacher/best.safetensors")
    return ["transfer", "--config", str(CONFIGS / "cktf.yaml"), "--teacher", teacher,
            "--data.root", str(root / "fashion"), "--log.root", str(root / "runs"), "--log.name", name,
            "--train.batch_size", "16", "--train.epochs", "2", "--sampler.num_negatives", "32", "--log.log_every", "1",
            "--sampler.shared", "false", *REFERENCE, *extra]


def test_reference_transfer_logs_the_moving_mapping_and_resumes_exactly(fashion):
    code, out = invoke(*reference_transfer(fashion, "straight"))
    assert code == 0, out
    run = fashion / "runs/straight"
    acc = EventAccumulator(str(run))
    acc.Reload()
    values = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if "mapping/" in tag}
    assert set(values) >= {f"train/mapping/stage{i}" for i in (1, 2, 3)}
    assert all(set(v) <= {0.0, 1.0} for k, v in values.items() if not k.endswith("_epoch"))  # resnet14: 2 blocks
    assert len(set(values["train/mapping/stage1"])) > 1
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.metadata["layer_mapping"] == '"per_batch"'
    state = ckpt.state["task"]
    steps = 2 * (len(state["terms.pckt.pair.objective.bank_student.weight"]) // 16)  # full batches only
    assert int(state["terms.mckt.mapper.draws"]) == steps  # one draw per training step
    linear = [v for k, v in state.items() if k.startswith("terms.mckt.pairs.stage1.head_student.") and v.dim() == 2]
    assert [w.shape[1] for w in linear] == [16 * 9]  # a 28x28 map of 16 channels -> 3x3 cells

    assert invoke(*reference_transfer(fashion, "split", "--train.epochs", "1"))[0] == 0
    code, out = invoke(*reference_transfer(fashion, "split", "--resume", "--allow-change", "train.epochs"))
    assert code == 0, out
    resumed = load_checkpoint(fashion / "runs/split/last.safetensors").state["task"]
    assert resumed.keys() == state.keys()
    for key in state:
        assert torch.equal(state[key], resumed[key]), key


def test_help_names_the_reference_options():
    code, out = invoke("transfer", "--help")
    assert code == 0
    for option in ("--loss.nce.stage_norm", "--loss.nce.stage_pool", "--loss.terms", "cktf methods"):
        assert option in out
    code, out = invoke("methods")
    assert code == 0 and "--loss.terms.mckt.mapping_schedule" in out
    code, out = invoke("probe", "--help")
    assert code == 0 and "--probe.standardize" in out
