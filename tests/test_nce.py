"""NCEObjective: equality with the literal CRD oracle (losses, Z, gradients, bank updates), frozen Z,
fp32 under autocast, errors, and a small learning run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.nce_oracle import oracle_objective, oracle_scores, oracle_side_loss, oracle_update, oracle_z
from transfer.errors import CKTFError
from transfer.losses import NCEObjective, NCEOutput

N, D, B, K = 50, 8, 6, 12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def make_case(shared: bool = False, seed: int = 0, chunk_size: int = 262144, temperature: float = 0.1,
              n: int = N, d: int = D, b: int = B, k: int = K):
    gen = torch.Generator().manual_seed(seed)
    nce = NCEObjective(n, d, temperature=temperature, chunk_size=chunk_size, generator=gen)
    g_s = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
    g_t = F.normalize(torch.randn(b, d, generator=gen), dim=1).requires_grad_()
    indices = torch.randperm(n, generator=gen)[:b]
    negatives = torch.randint(0, n, (k,) if shared else (b, k), generator=gen)
    # make negatives hit rows that this step's update rewrites (and repeat them), the tricky case for backward
    if shared:
        negatives[:2] = indices[1]
    else:
        negatives[0, :2] = indices[1]
        negatives[2, 3] = indices[2]
    return nce, g_s, g_t, indices, negatives


def run_oracle(bank_s, bank_t, g_s, g_t, indices, negatives, temperature=0.1, z_s=None, z_t=None):
    """The float64 oracle, with gradients w.r.t. its own copies of g_s, g_t."""
    gs = g_s.detach().double().requires_grad_()
    gt = g_t.detach().double().requires_grad_()
    out = oracle_objective(bank_s.double(), bank_t.double(), gs, gt, indices, negatives, temperature, z_s, z_t)
    out.loss.backward()
    return out, gs.grad, gt.grad


def banks(nce: NCEObjective):
    return nce.bank_student.weight.clone(), nce.bank_teacher.weight.clone()


# chunk_size=7 with B=6: one bank column per chunk (50 chunks, many empty); 100: 16 columns per chunk
@pytest.mark.parametrize("shared,chunk_size", [(False, 262144), (False, 7), (False, 100), (True, 262144)])
def test_training_step_matches_oracle(shared, chunk_size):
    nce, g_s, g_t, indices, negatives = make_case(shared, chunk_size=chunk_size)
    old_s, old_t = banks(nce)
    out = nce(g_s, g_t, indices, negatives)
    out.loss.backward()  # after the in-place bank update: the gradient must still be the pre-update one
    ref, grad_s, grad_t = run_oracle(old_s, old_t, g_s, g_t, indices, negatives)

    assert isinstance(out, NCEOutput) and out.loss.dtype == torch.float32
    assert rel(nce.z_student, ref.z_student) < 1e-5 and rel(nce.z_teacher, ref.z_teacher) < 1e-5
    assert rel(out.teacher_anchored, ref.teacher_anchored) < 1e-5
    assert rel(out.student_anchored, ref.student_anchored) < 1e-5
    assert rel(out.loss, ref.loss) < 1e-5
    assert rel(g_s.grad, grad_s) < 1e-5 and rel(g_t.grad, grad_t) < 1e-5
    torch.testing.assert_close(nce.bank_student.weight, ref.bank_student.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nce.bank_teacher.weight, ref.bank_teacher.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [262144, 100])
def test_repeated_indices_in_a_batch_match_the_oracle(chunk_size):
    """An item twice in one (gathered) batch: the backward restores its pre-update row once, not twice."""
    nce, g_s, g_t, indices, negatives = make_case(chunk_size=chunk_size)
    indices[3] = indices[1]
    old_s, old_t = banks(nce)
    out = nce(g_s, g_t, indices, negatives)
    out.loss.backward()
    ref, grad_s, grad_t = run_oracle(old_s, old_t, g_s, g_t, indices, negatives)
    assert rel(out.loss, ref.loss) < 1e-5
    assert rel(g_s.grad, grad_s) < 1e-5 and rel(g_t.grad, grad_t) < 1e-5


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_scores_equal_unchunked(shared):
    whole, g_s, g_t, indices, negatives = make_case(shared)
    chunked, *_ = make_case(shared, chunk_size=13)
    a = whole(g_s, g_t, indices, negatives)
    a.loss.backward()
    grads = g_s.grad.clone(), g_t.grad.clone()
    g_s.grad = g_t.grad = None
    b = chunked(g_s, g_t, indices, negatives)
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close((g_s.grad, g_t.grad), grads, rtol=1e-5, atol=1e-7)


def test_shared_negatives_equal_expanded_per_anchor_negatives():
    nce_shared, g_s, g_t, indices, negatives = make_case(shared=True)
    nce_expanded, *_ = make_case(shared=True)
    a = nce_shared(g_s, g_t, indices, negatives)
    b = nce_expanded(g_s, g_t, indices, negatives.expand(B, -1))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)


def test_z_is_estimated_once_then_frozen():
    nce, g_s, g_t, indices, negatives = make_case()
    assert nce.z_student.isnan() and nce.z_teacher.isnan()
    old_s, old_t = banks(nce)
    nce(g_s, g_t, indices, negatives)
    s_t = oracle_scores(old_s.double(), g_t.detach().double(), indices, negatives)
    s_s = oracle_scores(old_t.double(), g_s.detach().double(), indices, negatives)
    assert rel(nce.z_student, oracle_z(s_t, 0.1, N)) < 1e-5
    assert rel(nce.z_teacher, oracle_z(s_s, 0.1, N)) < 1e-5
    z = nce.z_student.clone(), nce.z_teacher.clone()
    _, h_s, h_t, idx2, neg2 = make_case(seed=1)
    old_s, old_t = banks(nce)
    out = nce(h_s, h_t, idx2, neg2)
    assert torch.equal(nce.z_student, z[0]) and torch.equal(nce.z_teacher, z[1])
    ref, *_ = run_oracle(old_s, old_t, h_s, h_t, idx2, neg2, z_s=z[0].double(), z_t=z[1].double())
    assert rel(out.loss, ref.loss) < 1e-5


def test_state_dict_round_trip_keeps_z_and_banks():
    nce, g_s, g_t, indices, negatives = make_case()
    nce(g_s, g_t, indices, negatives)
    state = nce.state_dict()
    assert {"z_student", "z_teacher", "bank_student.weight", "bank_teacher.weight"} <= set(state)
    resumed, *_ = make_case(seed=5)
    resumed.load_state_dict(state)
    for key, value in nce.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    _, h_s, h_t, idx2, neg2 = make_case(seed=2)
    a = nce(h_s, h_t, idx2, neg2).loss
    b = resumed(h_s, h_t, idx2, neg2).loss
    assert torch.equal(a, b)
    assert torch.equal(resumed.z_student, state["z_student"]) and torch.equal(resumed.z_teacher, state["z_teacher"])


def test_eval_mode_neither_estimates_z_nor_updates_banks():
    nce, g_s, g_t, indices, negatives = make_case()
    nce.eval()
    old_s, old_t = banks(nce)
    out = nce(g_s, g_t, indices, negatives)
    out.loss.backward()
    assert nce.z_student.isnan() and nce.z_teacher.isnan()
    assert torch.equal(nce.bank_student.weight, old_s) and torch.equal(nce.bank_teacher.weight, old_t)
    # without a stored Z, eval uses this batch's estimate
    ref, grad_s, grad_t = run_oracle(old_s, old_t, g_s, g_t, indices, negatives)
    assert rel(out.loss, ref.loss) < 1e-5
    assert rel(g_s.grad, grad_s) < 1e-5 and rel(g_t.grad, grad_t) < 1e-5


def test_eval_mode_uses_the_frozen_z():
    nce, g_s, g_t, indices, negatives = make_case()
    nce(g_s, g_t, indices, negatives)
    z = nce.z_student.clone(), nce.z_teacher.clone()
    nce.eval()
    _, h_s, h_t, idx2, neg2 = make_case(seed=3)
    old_s, old_t = banks(nce)
    out = nce(h_s, h_t, idx2, neg2)
    ref, *_ = run_oracle(old_s, old_t, h_s, h_t, idx2, neg2, z_s=z[0].double(), z_t=z[1].double())
    assert rel(out.loss, ref.loss) < 1e-5
    assert torch.equal(nce.bank_student.weight, old_s)


def test_bank_update_touches_only_the_batch_rows_and_scores_use_the_old_bank():
    nce, g_s, g_t, indices, negatives = make_case()
    old_s, old_t = banks(nce)
    out = nce(g_s, g_t, indices, negatives)
    expected_s = F.normalize(0.5 * old_s[indices] + 0.5 * g_s.detach(), dim=1)
    expected_t = F.normalize(0.5 * old_t[indices] + 0.5 * g_t.detach(), dim=1)
    torch.testing.assert_close(nce.bank_student.weight[indices], expected_s)
    torch.testing.assert_close(nce.bank_teacher.weight[indices], expected_t)
    others = torch.ones(N, dtype=torch.bool)
    others[indices] = False
    assert torch.equal(nce.bank_student.weight[others], old_s[others])
    assert torch.equal(nce.bank_teacher.weight[others], old_t[others])
    z = nce.z_student.double(), nce.z_teacher.double()
    before, *_ = run_oracle(old_s, old_t, g_s, g_t, indices, negatives, z_s=z[0], z_t=z[1])
    after, *_ = run_oracle(nce.bank_student.weight, nce.bank_teacher.weight, g_s, g_t, indices, negatives,
                           z_s=z[0], z_t=z[1])
    assert rel(out.loss, before.loss) < 1e-5
    assert rel(out.loss, after.loss) > 1e-3  # the update matters, so the check above is meaningful


def test_autocast_bf16_computes_in_fp32():
    nce, g_s, g_t, indices, negatives = make_case()
    plain, *_ = make_case()
    b_s, b_t = g_s.detach().bfloat16(), g_t.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nce(b_s, b_t, indices, negatives)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert nce.z_student.dtype == torch.float32 and nce.bank_student.weight.dtype == torch.float32
    exact = plain(b_s.float(), b_t.float(), indices, negatives)
    torch.testing.assert_close(out.loss, exact.loss, rtol=1e-6, atol=0)  # fp32 on the bf16-valued inputs
    unrounded, *_ = run_oracle(*banks(make_case()[0]), g_s, g_t, indices, negatives)
    assert rel(out.loss, unrounded.loss) < 2e-2  # bf16 keeps ~3 significant digits of the inputs


def test_small_temperature_under_fp16_autocast_does_not_overflow():
    # exp(1/0.07) ≈ 1.6e6 > 65504, the fp16 maximum: Z and the scores must stay fp32
    nce, g_s, g_t, indices, negatives = make_case(temperature=0.07)
    old_s, old_t = banks(nce)
    h_s, h_t = g_s.detach().half(), g_t.detach().half()
    with torch.autocast("cpu", dtype=torch.float16):
        out = nce(h_s, h_t, indices, negatives)
    assert torch.isfinite(out.loss) and torch.isfinite(nce.z_student) and torch.isfinite(nce.z_teacher)
    ref, *_ = run_oracle(old_s, old_t, h_s.float(), h_t.float(), indices, negatives, temperature=0.07)
    assert rel(nce.z_student, ref.z_student) < 1e-5 and rel(out.loss, ref.loss) < 1e-5


def test_tiny_temperature_that_overflows_float32_is_a_clear_error():
    nce, g_s, g_t, indices, negatives = make_case(temperature=1e-3)  # scores ~0.5 → exp(500)
    with pytest.raises(CKTFError, match="loss.nce.temperature"):
        nce(g_s, g_t, indices, negatives)


def test_gradients_reach_the_embeddings_never_the_banks_or_z():
    nce, g_s, g_t, indices, negatives = make_case()
    nce(g_s, g_t, indices, negatives).loss.backward()
    assert g_s.grad.abs().sum() > 0 and g_t.grad.abs().sum() > 0
    assert list(nce.parameters()) == []
    for buf in nce.buffers():
        assert not buf.requires_grad and buf.grad is None


def test_each_side_only_reaches_its_own_anchor():
    nce, g_s, g_t, indices, negatives = make_case()
    out = nce(g_s, g_t, indices, negatives)
    grads = torch.autograd.grad(out.teacher_anchored, (g_s, g_t), allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0


def test_backward_after_another_training_forward_is_refused():
    nce, g_s, g_t, indices, negatives = make_case()
    first = nce(g_s, g_t, indices, negatives)
    nce(g_s, g_t, indices, negatives)  # rewrites the banks the first graph was scored against
    with pytest.raises(RuntimeError, match="written between"):
        first.loss.backward()


@pytest.mark.parametrize("change,match", [
    (lambda c: {**c, "negatives": torch.randint(0, N, (B, N))}, r"sampler\.num_negatives \(K=50\).*\(N=50\)"),
    (lambda c: {**c, "negatives": torch.randint(0, N, (N + 3,))}, r"sampler\.num_negatives \(K=53\)"),
    (lambda c: {**c, "indices": c["indices"].clone().fill_(N)}, r"\[0, N\) with N=50.*to 50"),
    (lambda c: {**c, "negatives": c["negatives"].clone().fill_(-1)}, r"\[0, N\).*from -1"),
    (lambda c: {**c, "g_s": torch.randn(B, D + 1)}, r"loss\.nce\.embed_dim \(d=8\).*student 9, teacher 8"),
    (lambda c: {**c, "g_t": torch.randn(B, 4)}, r"loss\.nce\.embed_dim \(d=8\).*teacher 4"),
    (lambda c: {**c, "indices": c["indices"][:3]}, r"batch sizes"),
    (lambda c: {**c, "negatives": c["negatives"][:2]}, r"\[B, K\]"),
    (lambda c: {**c, "indices": c["indices"].float()}, r"integer"),
])
def test_bad_inputs_raise_one_line_errors(change, match):
    nce, g_s, g_t, indices, negatives = make_case()
    case = change({"g_s": g_s, "g_t": g_t, "indices": indices, "negatives": negatives})
    with pytest.raises(CKTFError, match=match) as err:
        nce(**case)
    assert "\n" not in str(err.value)
    assert nce.z_student.isnan()  # nothing was estimated or written


def test_constructor_rejects_bad_options():
    with pytest.raises(CKTFError, match="loss.nce.temperature"):
        NCEObjective(10, 4, temperature=0.0)
    with pytest.raises(CKTFError, match="loss.nce.momentum"):
        NCEObjective(10, 4, momentum=1.5)


def test_learning_two_heads_lowers_the_loss():
    gen = torch.Generator().manual_seed(0)
    n, feat, d = 64, 12, 16
    x_t = torch.randn(n, feat, generator=gen)
    x_s = x_t @ torch.randn(feat, feat, generator=gen) / math.sqrt(feat) + 0.1 * torch.randn(n, feat, generator=gen)
    torch.manual_seed(0)  # head init
    head_s, head_t = torch.nn.Linear(feat, d), torch.nn.Linear(feat, d)
    nce = NCEObjective(n, d, temperature=0.1, generator=gen)
    opt = torch.optim.Adam([*head_s.parameters(), *head_t.parameters()], lr=0.02)
    losses = []
    for _ in range(60):
        idx = torch.randperm(n, generator=gen)[:16]
        neg = torch.randint(0, n, (16, 24), generator=gen)
        loss = nce(F.normalize(head_s(x_s[idx]), dim=1), F.normalize(head_t(x_t[idx]), dim=1), idx, neg).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)  # ≈ 11 → 3


# Golden value: float64 oracle, N=10, d=4, B=3, K=5, seed 0, τ=0.1, first (Z-estimating) training step.
GOLDEN_LOSS = 19.031995836775167


def test_golden_value():
    nce, g_s, g_t, indices, negatives = make_case(n=10, d=4, b=3, k=5)
    old_s, old_t = banks(nce)
    ref, *_ = run_oracle(old_s, old_t, g_s, g_t, indices, negatives)
    assert ref.loss.item() == pytest.approx(GOLDEN_LOSS, rel=1e-12)  # guards the oracle against drift
    out = nce(g_s, g_t, indices, negatives)
    assert out.loss.item() == pytest.approx(GOLDEN_LOSS, rel=1e-5)


def test_oracle_side_loss_matches_the_formula_by_hand():
    scores = torch.tensor([[0.5, 0.1, -0.2]], dtype=torch.float64)
    z, tau, n = torch.tensor(3.0, dtype=torch.float64), 0.5, 4
    c = 2 / 4
    p = [math.exp(s / tau) / 3.0 for s in (0.5, 0.1, -0.2)]
    by_hand = -(math.log(p[0] / (p[0] + c)) + math.log(c / (p[1] + c)) + math.log(c / (p[2] + c)))
    assert oracle_side_loss(scores, z, tau, n).item() == pytest.approx(by_hand, rel=1e-12)


def test_oracle_update_last_duplicate_wins():
    bank = torch.eye(3)
    new = oracle_update(bank, torch.tensor([1, 1]), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), 0.5)
    torch.testing.assert_close(new[1], F.normalize(torch.tensor([0, 0.5, 0.5]), dim=0))


@pytest.mark.parametrize("chunk_columns", [1, 4, 100])
def test_bank_scores_function_passes_gradcheck(chunk_columns):
    from transfer.losses.nce import _BankScores, _ColumnChunks, _PreUpdateRows

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    columns = torch.tensor([[0, 4, 4, 8], [2, 0, 7, 7], [5, 5, 5, 1]])
    chunks = _ColumnChunks(columns, 9, chunk_columns)
    g = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _BankScores.apply(x, weight, chunks, _PreUpdateRows(weight, None)), g)
    torch.testing.assert_close(_BankScores.apply(g, weight, chunks, _PreUpdateRows(weight, None)),
                               (weight[columns] @ g[:, :, None]).squeeze(2))


def test_shared_negative_softplus_passes_gradcheck():
    from transfer.losses.nce import _SharedNegativeSoftplus

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor(0.3, dtype=torch.float64)
    g = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _SharedNegativeSoftplus.apply(x, rows, 2.5, shift), g)
    torch.testing.assert_close(_SharedNegativeSoftplus.apply(g, rows, 2.5, shift),
                               F.softplus(g @ rows.T * 2.5 - shift).sum())


@pytest.mark.parametrize("shared", [False, True])
def test_second_step_with_frozen_z_matches_oracle(shared):
    nce, g_s, g_t, indices, negatives = make_case(shared)
    nce(g_s, g_t, indices, negatives).loss.backward()  # estimates Z, updates the banks
    g_s.grad = g_t.grad = None
    old_s, old_t = banks(nce)
    out = nce(g_s, g_t, indices.flip(0), negatives)
    out.loss.backward()
    ref, grad_s, grad_t = run_oracle(old_s, old_t, g_s, g_t, indices.flip(0), negatives,
                                     z_s=nce.z_student.double(), z_t=nce.z_teacher.double())
    assert rel(out.loss, ref.loss) < 1e-5
    assert rel(g_s.grad, grad_s) < 1e-5 and rel(g_t.grad, grad_t) < 1e-5


def test_objectives_of_one_step_share_one_column_plan_and_a_changed_tensor_gets_a_new_one(monkeypatch):
    import transfer.losses.nce as nce_module

    built = []
    original = nce_module._ColumnChunks

    def counting(*args, **kwargs):
        built.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(nce_module, "_ColumnChunks", counting)
    first, g_s, g_t, indices, negatives = make_case()
    others = [make_case(seed=s)[0] for s in (1, 2)]
    wide = make_case(n=80)[0]  # another bank size: its own plan
    for nce in [first, *others, wide]:
        out = nce(g_s, g_t, indices, negatives)
        out.loss.backward()
    assert built == [(N, 262144 // B), (80, 262144 // B)]
    # an in-place change of the negatives (or indices) is a new plan, and the loss follows the new columns
    negatives[1, 0] = (negatives[1, 0] + 1) % N
    bank_s, bank_t = banks(others[0])
    z_s, z_t = others[0].z_student.item(), others[0].z_teacher.item()
    got = others[0](g_s, g_t, indices, negatives)
    want = oracle_objective(bank_s.double(), bank_t.double(), g_s.detach().double(), g_t.detach().double(), indices,
                            negatives, 0.1, z_s, z_t)
    assert len(built) == 3
    assert rel(got.loss, want.loss) < 1e-6
