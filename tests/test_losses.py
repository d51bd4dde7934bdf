"""The chunked, fused distillation losses against plain references over materialised logits.

Tolerances per dtype: fp64 agrees to rounding (1e-12); fp32 to 1e-5 relative (summation order);
under bf16 autocast both sides round the logits to bf16 but at different points (the plain version
rounds its [N, V] logits, the fused one its per-chunk gradient), so 2e-2.
"""
import math

import pytest
import torch

from eagle_online.losses import (
    LOSSES,
    Objective,
    StepMetrics,
    TeacherTargets,
    accuracy,
    expected_acceptance_length,
    linear_distillation,
    soft_cross_entropy,
)


def _case(dtype, n=10, m=14, hidden=6, vocab=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_(True)
    teacher_logits = 3 * torch.randn(m, vocab, generator=g, dtype=dtype)
    rows = torch.randperm(m, generator=g)[:n]
    return h, w, teacher_logits, rows


def _plain(h, w, teacher_logits, rows, scale):
    """The textbook form over materialised logits: mean_rows −Σ_v p(v) log softmax(z)(v)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    targets = teacher_logits.to(acc).softmax(-1)[rows]
    logits = h @ w.T
    loss = -(targets * logits.to(acc).log_softmax(-1)).sum(-1).mean()
    if acc == torch.float32:
        torch.testing.assert_close(soft_cross_entropy(logits, targets), loss)  # what the head used before
    (scale * loss).backward()
    return loss.detach(), accuracy(logits.detach(), targets), h.grad.clone(), w.grad.clone()


def _fused(h, w, teacher_logits, rows, scale, chunk_rows):
    h.grad = w.grad = None
    out = linear_distillation(h, w, TeacherTargets.from_logits(teacher_logits, chunk_rows=5), rows,
                              chunk_rows=chunk_rows)
    (scale * out.loss).backward()
    return out.loss.detach(), out.accuracy, h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_rows", [None, 3, 1])
def test_fused_soft_cross_entropy_matches_plain(dtype, tol, chunk_rows):
    h, w, teacher_logits, rows = _case(dtype)
    plain = _plain(h, w, teacher_logits, rows, scale=0.37)
    fused = _fused(h, w, teacher_logits, rows, scale=0.37, chunk_rows=chunk_rows)
    for a, b in zip(plain, fused):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_fused_soft_cross_entropy_under_bf16_autocast():
    h, w, teacher_logits, rows = _case(torch.float32, n=64, m=80, hidden=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _plain(h, w, teacher_logits.bfloat16(), rows, scale=1.0)
        fused = _fused(h, w, teacher_logits.bfloat16(), rows, scale=1.0, chunk_rows=16)
    for a, b in zip(plain, fused):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_fused_soft_cross_entropy_through_a_frozen_weight():
    """EAGLE-1 and the MLP read the target's frozen lm_head: hidden's gradient is the same, and none is
    formed for the weight."""
    h, w, teacher_logits, rows = _case(torch.float32)
    plain = _plain(h, w, teacher_logits, rows, scale=0.37)
    h.grad = None
    frozen = w.detach()
    out = linear_distillation(h, frozen, TeacherTargets.from_logits(teacher_logits), rows, chunk_rows=4)
    (0.37 * out.loss).backward()
    assert frozen.grad is None
    torch.testing.assert_close(out.loss.detach(), plain[0])
    torch.testing.assert_close(h.grad, plain[2])


def test_fused_soft_cross_entropy_with_no_rows():
    h, w, teacher_logits, _ = _case(torch.float32)
    rows = torch.zeros(0, dtype=torch.long)
    h = h[:0].detach().requires_grad_(True)
    out = linear_distillation(h, w, TeacherTargets.from_logits(teacher_logits), rows)
    assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
    out.loss.backward()
    assert w.grad is not None and not w.grad.any()


def test_teacher_targets_in_chunks():
    logits = torch.randn(11, 7, dtype=torch.bfloat16)
    t = TeacherTargets.from_logits(logits, chunk_rows=4)
    assert t.logits is logits and t.lse.dtype == torch.float32
    torch.testing.assert_close(t.lse, torch.logsumexp(logits.float(), -1))
    assert torch.equal(t.argmax, logits.float().argmax(-1))
    rows = torch.tensor([3, 0, 10])
    torch.testing.assert_close(t.probs(rows), logits.float().softmax(-1)[rows])


def test_logged_step_figures_weight_every_trained_position_alike():
    """A step's acc_k and loss_k are over all its positions (micro-batches with more trained positions
    count more); the logged `loss` stays the mean of the micro-batches' own losses, as the gradient."""
    from eagle_online.trainer import per_position

    small = StepMetrics([torch.tensor(4.0)], [torch.tensor(1.0)], [torch.tensor(0.5)], [1])
    large = StepMetrics([torch.tensor(2.0)], [torch.tensor(0.25)], [torch.tensor(0.1)], [3])
    totals: dict[str, float] = {}
    for m in (small, large):
        for key, value in m.position_sums().items():
            totals[key] = totals.get(key, 0.0) + value
    out = per_position({**totals, "loss": 3.0})
    assert out["acc_0"] == pytest.approx((1.0 * 1 + 0.25 * 3) / 4)  # not (1.0 + 0.25) / 2
    assert out["loss_0"] == pytest.approx((4.0 * 1 + 2.0 * 3) / 4)
    assert out["alpha_0"] == pytest.approx((0.5 * 1 + 0.1 * 3) / 4)
    assert out["loss"] == 3.0 and set(out) == {"loss", "loss_0", "acc_0", "alpha_0"}
    empty = StepMetrics([torch.tensor(0.0)], [torch.tensor(0.0)], [torch.tensor(0.0)], [0]).position_sums()
    assert per_position(empty) == {"loss_0": 0.0, "acc_0": 0.0, "alpha_0": 0.0}


def _plain_objective(h, w, teacher_logits, rows, objective):
    """Each loss as written in Objective's docstring, over materialised logits, autograd for gradients."""
    p = teacher_logits.double().softmax(-1)[rows]
    log_q = (h @ w.T).double().log_softmax(-1)
    alpha = torch.minimum(p, log_q.exp()).sum(-1)
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(-1).mean()
    if objective.kind == "kl":
        loss = -(p * log_q).sum(-1).mean()
    elif objective.kind == "lk_alpha":
        loss = -alpha.log().mean()
    elif objective.kind == "tv":
        loss = 1 - alpha.mean()
    else:
        weight = objective.scale * torch.exp(-objective.decay * alpha.mean().detach())
        loss = weight * kl + (1 - weight) * (1 - alpha.mean())
    h.grad = w.grad = None
    (0.37 * loss).backward()
    return loss.detach(), alpha.mean().detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("objective", [Objective(k) for k in LOSSES] + [Objective("lk_lambda", 0.6, 1.5)],
                         ids=lambda o: f"{o.kind}-{o.scale}-{o.decay}")
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_fused_objectives_match_plain_values_gradients_and_alpha(objective, chunk_rows):
    """Every draft.loss: value, ᾱ and the gradients of hidden and weight, in fp64 to rounding."""
    h, w, teacher_logits, rows = _case(torch.float64)
    plain = _plain_objective(h, w, teacher_logits, rows, objective)
    h.grad = w.grad = None
    out = linear_distillation(h, w, TeacherTargets.from_logits(teacher_logits), rows, objective, chunk_rows)
    (0.37 * out.loss).backward()
    torch.testing.assert_close(out.loss.detach(), plain[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.alpha.double(), plain[1], rtol=1e-6, atol=1e-7)  # ᾱ is logged in fp32
    torch.testing.assert_close(h.grad, plain[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, plain[3], rtol=1e-10, atol=1e-12)
    assert 0 < out.alpha < 1


def test_objectives_differ_and_tv_plus_alpha_is_one():
    """The objectives are not one loss under several names: on the same logits their values and
    gradients differ, and tv is 1 − ᾱ."""
    h, w, teacher_logits, rows = _case(torch.float64)
    teacher = TeacherTargets.from_logits(teacher_logits)
    grads = {}
    for kind in LOSSES:
        h.grad = None
        out = linear_distillation(h, w.detach(), teacher, rows, Objective(kind))
        out.loss.backward()
        grads[kind] = h.grad.clone()
        if kind == "tv":
            assert out.loss.item() == pytest.approx(1 - out.alpha.item(), rel=1e-6)
    for a in LOSSES:
        for b in LOSSES:
            if a < b:
                assert not torch.allclose(grads[a], grads[b], rtol=1e-3), (a, b)


def test_lk_alpha_under_bf16_autocast():
    h, w, teacher_logits, rows = _case(torch.float32, n=64, m=80, hidden=32, vocab=50)
    objective = Objective("lk_alpha")
    plain = _plain_objective(h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True),
                             teacher_logits, rows, objective)
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_distillation(h, w, TeacherTargets.from_logits(teacher_logits.bfloat16()), rows, objective, 16)
    (0.37 * out.loss).backward()
    torch.testing.assert_close(out.loss.detach().double(), plain[0], rtol=2e-2, atol=2e-3)
    for got, want in ((h.grad, plain[2]), (w.grad, plain[3])):
        assert (got.double() - want).norm() / want.norm() < 5e-2


def test_soft_cross_entropy_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.1, 0.7]])
    expected = 0.0
    for row in range(2):
        zs = [math.exp(v) for v in student[row].tolist()]
        for v in range(3):
            expected += -teacher[row, v].item() * math.log(zs[v] / sum(zs))
    expected /= 2
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # The gradient is softmax(student) - teacher, per row, over the number of rows.
    z = student.clone().requires_grad_(True)
    soft_cross_entropy(z, teacher).backward()
    torch.testing.assert_close(z.grad, (torch.softmax(student, -1) - teacher) / 2)
    assert accuracy(student, teacher).item() == pytest.approx(0.5)  # argmax 1 vs 0 (tie: first), 2 vs 2
    assert soft_cross_entropy(student[:0], teacher[:0]).item() == 0.0


def test_tau_hat():
    assert expected_acceptance_length([]) == 1.0
    assert expected_acceptance_length([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_acceptance_length([1.0, 0.0, 1.0]) == pytest.approx(2.0)
