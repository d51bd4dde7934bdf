"""Distillation losses and the per-TTT-step metrics.

docs/algorithms.md: the losses, the heads they train and the logged metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from eagle_online.precision import CHUNK_ELEMENTS, accumulation_dtype, matmul_dtype


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_v p_teacher(v) · log p_student(v), in fp32 ([N, V] each, rows already
    selected). Equal to KL(teacher ‖ student) plus the teacher's entropy, a constant for the student.

    Written as logsumexp(z) − Σ_v p(v)·z(v) (Σ p = 1), so no [N, V] log-softmax is kept for backward.
    Returns 0 (with a graph) for no rows. The plain definition over materialised logits: the heads train
    with `linear_soft_cross_entropy`, which the tests check against this.
    """
    z = student_logits.float()
    if z.shape[0] == 0:
        return z.sum()
    per_row = torch.logsumexp(z, dim=-1) - (teacher_probs.float() * z).sum(dim=-1)
    return per_row.mean()


def accuracy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Fraction of rows where the student's argmax equals the teacher's (0 for no rows)."""
    if student_logits.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    return (student_logits.argmax(-1) == teacher_probs.argmax(-1)).float().mean()


def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    """Rows per chunk of a [rows × vocab] fp32 temporary (CHUNK_ELEMENTS), so a 16k-token step with a 32k
    draft vocab never holds more than a few such chunks at once."""
    return chunk_rows or max(1, CHUNK_ELEMENTS // vocab)


@dataclass
class TeacherTargets:
    """The teacher distribution over the draft vocab, kept as logits in their own dtype with each row's
    fp32 log-sum-exp and argmax: probabilities are formed chunk by chunk where they are read, so no
    fp32 [tokens × vocab] copy exists."""

    logits: torch.Tensor  # [M, V], the target's dtype
    lse: torch.Tensor  # [M] fp32 (fp64 for fp64 logits)
    argmax: torch.Tensor  # [M] int64

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: torch.Tensor, chunk_rows: int | None = None) -> TeacherTargets:
        """Per-row log-sum-exp and argmax of [M, V] logits, computed in row chunks."""
        m, v = logits.shape
        acc = accumulation_dtype(logits.dtype)
        lse = torch.empty(m, dtype=acc, device=logits.device)
        argmax = torch.empty(m, dtype=torch.long, device=logits.device)
        step = _chunk_rows(v, chunk_rows)
        for s in range(0, m, step):
            z = logits[s : s + step].to(acc)
            lse[s : s + step] = torch.logsumexp(z, dim=-1)
            argmax[s : s + step] = z.argmax(dim=-1)
        return cls(logits=logits, lse=lse, argmax=argmax)

    def probs(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities at `rows`, [len(rows), V] in fp32 (fp64 for fp64 logits)."""
        return torch.exp(self.logits[rows].to(self.lse.dtype) - self.lse[rows, None])


class _LinearSoftCrossEntropy(torch.autograd.Function):
    """soft_cross_entropy(hidden @ weight.T, teacher.probs(rows)), chunk by chunk over the rows.

    The loss is a scalar, so its gradients with respect to hidden and weight are known in the forward
    pass up to the incoming scale: they are accumulated chunk by chunk there (the logits of one chunk
    exist at a time) and only scaled in backward. Matmuls run in the autocast dtype when autocast is
    on (as nn.Linear would), softmax and loss in fp32; the gradients are kept in the matmul dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, teacher_lse, rows, chunk_rows):
        dtype = matmul_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n = h.shape[0]
            acc = accumulation_dtype(dtype)
            teacher = TeacherTargets(teacher_logits, teacher_lse, None)
            need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen lm_head: no dw
            need_grad = need_dh or need_dw
            total = torch.zeros((), dtype=acc, device=h.device)
            argmax = torch.empty(n, dtype=torch.long, device=h.device)
            dh = torch.empty_like(h) if need_dh else None
            dw = torch.zeros(w.shape, dtype=acc, device=h.device) if need_dw else None
            for s in range(0, n, chunk_rows):
                z = (h[s : s + chunk_rows] @ w.T).to(acc)
                p = teacher.probs(rows[s : s + chunk_rows]).to(acc)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                total += (lse.squeeze(-1) - (p * z).sum(-1)).sum()
                argmax[s : s + chunk_rows] = z.argmax(dim=-1)
                if need_grad:
                    g = z.sub_(lse).exp_().sub_(p).div_(n).to(dtype)  # (softmax(z) - p) / n, in place of z
                    if need_dh:
                        dh[s : s + chunk_rows] = g @ w
                    if need_dw:
                        dw += g.T @ h[s : s + chunk_rows]
            loss = total / max(n, 1)
        if need_grad:
            ctx.save_for_backward(dh, dw.to(dtype) if need_dw else None)
        ctx.mark_non_differentiable(argmax)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_argmax):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if dh is None else dh.to(h_dtype) * grad_loss.to(h_dtype),
                None if dw is None else dw.to(w_dtype) * grad_loss.to(w_dtype), None, None, None, None)


@dataclass
class SoftCrossEntropy:
    """One step's soft cross-entropy (mean over rows, fp32 — fp64 for fp64 inputs —, with a graph) and the
    argmax agreement with the teacher."""

    loss: torch.Tensor
    accuracy: torch.Tensor  # detached; 0 for no rows


def linear_soft_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherTargets,
                              rows: torch.Tensor, chunk_rows: int | None = None) -> SoftCrossEntropy:
    """`soft_cross_entropy(hidden @ weight.T, teacher.probs(rows))` and `accuracy` of the same, without
    materialising the [N, V] logits: computed `chunk_rows` rows at a time (default: 2^26 elements per
    chunk), the gradients with them. hidden [N, H] pairs row i with the teacher's row rows[i]."""
    step = _chunk_rows(weight.shape[0], chunk_rows)
    loss, argmax = _LinearSoftCrossEntropy.apply(hidden, weight, teacher.logits, teacher.lse, rows, step)
    if len(rows) == 0:
        return SoftCrossEntropy(loss, loss.new_zeros((), dtype=torch.float32))
    return SoftCrossEntropy(loss, (argmax == teacher.argmax[rows]).float().mean())


def expected_acceptance_length(step_accuracies: list[float]) -> float:
    """τ̂ = 1 + Σ_k Π_{j≤k} acc_j: the chain acceptance length if step k's token is accepted with
    probability acc_k given that all earlier ones were."""
    tau, chain = 1.0, 1.0
    for acc in step_accuracies:
        chain *= acc
        tau += chain
    return tau


@dataclass
class StepMetrics:
    """Per-TTT-step loss and accuracy of one micro-batch, and how many positions they count."""

    losses: list[torch.Tensor]  # one detached scalar per TTT step
    accuracies: list[torch.Tensor]
    counts: list[int]

    def position_sums(self) -> dict[str, float]:
        """Per step k: loss and accuracy summed over its positions, and the positions (trainer.per_position
        divides them once a whole step's micro-batches and ranks are added)."""
        out: dict[str, float] = {}
        for k, (loss, acc, n) in enumerate(zip(self.losses, self.accuracies, self.counts)):
            out[f"sum_loss_{k}"] = float(loss) * n
            out[f"sum_acc_{k}"] = float(acc) * n
            out[f"positions_{k}"] = float(n)
        return out
