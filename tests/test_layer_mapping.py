"""Layer mapping: each strategy picks the teacher block the paper's ablation describes."""

import pytest
import torch

from transfer.errors import CKTFError
from transfer.losses.layer_mapping import (
    LayerMapper,
    check_stage_counts,
    padded_cosine,
    paired_features,
    select_per_batch,
    select_teacher_blocks,
)
from transfer.models.taps import TapOutputs


def toy_pair():
    """Student with 2 stages; teacher with 3 blocks per stage. Block 1 of each teacher stage copies the student
    (largest cosine), block 2 is its negation (smallest)."""
    torch.manual_seed(0)
    s1, s2 = torch.randn(8, 4, 3, 3).abs(), torch.randn(8, 6, 2, 2).abs()
    student = TapOutputs(stem=torch.randn(8, 2, 5, 5), stages=[s1, s2], penultimate=torch.randn(8, 6),
                         logits=torch.randn(8, 3), blocks=None)

    def blocks(s, width):
        noise = torch.randn(s.shape[0], width, *s.shape[2:])
        like = torch.nn.functional.pad(s, (0, 0, 0, 0, 0, width - s.shape[1]))
        return [noise.abs() * 0.1 + 0.5, like, -like]

    tb = [blocks(s1, 5), blocks(s2, 9)]
    teacher = TapOutputs(stem=torch.randn(8, 3, 5, 5), stages=[tb[0][-1], tb[1][-1]], penultimate=torch.randn(8, 9),
                         logits=torch.randn(8, 3), blocks=tb)
    return student, teacher


def test_strategies_pick_the_expected_blocks():
    student, teacher = toy_pair()
    assert select_teacher_blocks("last", student, teacher) == [2, 2]
    assert select_teacher_blocks("first", student, teacher) == [0, 0]
    assert select_teacher_blocks("largest", student, teacher) == [1, 1]
    assert select_teacher_blocks("smallest", student, teacher) == [2, 2]
    picks = {tuple(select_teacher_blocks("random", student, teacher, torch.Generator().manual_seed(s)))
             for s in range(20)}
    assert len(picks) > 1 and all(0 <= b < 3 for pick in picks for b in pick)
    again = select_teacher_blocks("random", student, teacher, torch.Generator().manual_seed(3))
    assert again == select_teacher_blocks("random", student, teacher, torch.Generator().manual_seed(3))


def test_last_without_blocks_uses_stage_outputs():
    student, teacher = toy_pair()
    teacher.blocks = None
    mapping = select_teacher_blocks("last", student, teacher)
    assert mapping == [-1, -1]
    pairs = paired_features(student, teacher, mapping)
    assert [name for name, _, _ in pairs] == ["stem", "stage1", "stage2"]
    assert pairs[2][2] is teacher.stages[1]


def test_paired_features_follow_the_mapping():
    student, teacher = toy_pair()
    pairs = paired_features(student, teacher, [1, 0])
    assert pairs[1][2] is teacher.blocks[0][1] and pairs[2][2] is teacher.blocks[1][0]
    assert pairs[0][1] is student.stem and pairs[0][2] is teacher.stem


def test_padded_cosine_handles_odd_width_differences():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # width difference 5 (odd)
    assert padded_cosine(a, b).item() == pytest.approx(1.0)
    c = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert padded_cosine(a, c).item() == pytest.approx(0.0)


def test_errors():
    student, teacher = toy_pair()
    with pytest.raises(CKTFError, match="layer_mapping"):
        select_teacher_blocks("middle", student, teacher)
    with pytest.raises(CKTFError, match="3 stages") as info:
        check_stage_counts(3, 4, "resnet8", "vgg19")
    assert "\n" not in str(info.value)


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value into Python (``tolist``, ``item``, ``int``): a device sync on CUDA."""
    reads: list[str] = []
    for name in ("tolist", "item", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_a_fixed_mapping_is_read_once_until_a_checkpoint_load_writes_it(host_reads):
    student, teacher = toy_pair()
    mapper, mapping = LayerMapper("largest", "once"), torch.tensor([1, 2])
    assert [mapper(student, teacher, mapping) for _ in range(5)] == [[1, 2]] * 5
    assert len(host_reads) == 1
    mapping.copy_(torch.tensor([0, 0]))  # what load_state_dict does on --resume
    assert mapper(student, teacher, mapping) == [0, 0]


def test_per_batch_similarity_reaches_the_host_once_per_step(host_reads):
    student, teacher = toy_pair()
    largest, smallest = (select_per_batch(rule, student, teacher) for rule in ("largest", "smallest"))
    assert largest != smallest
    host_reads.clear()
    mapper, mapping = LayerMapper("largest", "per_batch"), torch.tensor([2, 2])
    assert [mapper(student, teacher, mapping) for _ in range(3)] == [largest] * 3
    assert len(host_reads) == 3 and mapping.tolist() == largest
    assert LayerMapper("smallest", "per_batch")(student, teacher, mapping) == smallest
    assert mapping.tolist() == smallest


def test_random_per_batch_follows_a_draw_counter_loaded_mid_run():
    student, teacher = toy_pair()
    mapper, mapping = LayerMapper("random", "per_batch", seed=3), torch.tensor([0, 0])
    draws = [mapper(student, teacher, mapping) for _ in range(8)]
    mapper.load_state_dict({"draws": torch.tensor(2)})
    assert [mapper(student, teacher, mapping) for _ in range(6)] == draws[2:]
