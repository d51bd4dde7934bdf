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
    with `linear_distillation`, which the tests check against this.
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


LOSSES = ("kl", "lk_alpha", "lk_lambda", "tv")  # draft.loss; docs/algorithms.md "Losses"
LK_SCALE, LK_DECAY = 1.0, 3.0  # lk_lambda's s and d (draft.lk_scale, draft.lk_decay)


@dataclass(frozen=True)
class Objective:
    """What one step's loss is, over the scored rows, with p the teacher and q = softmax(z) the draft
    over the draft vocabulary and α_i = Σ_v min(p_i, q_i) the expected acceptance of row i:

    - `kl`: mean_i −Σ_v p log q (the soft cross-entropy: KL(p ‖ q) plus the teacher's entropy, a
      constant for the draft);
    - `lk_alpha`: mean_i −log α_i;
    - `tv`: 1 − ᾱ, ᾱ = mean_i α_i (the total-variation distance, 1 − α = TV(p, q));
    - `lk_lambda`: w·KL + (1 − w)·(1 − ᾱ), KL = mean_i KL(p_i ‖ q_i), w = scale·exp(−decay·ᾱ) taken as a
      constant (no gradient through w): KL leads while the draft is poor, acceptance once it is good.
    """

    kind: str = "kl"
    scale: float = LK_SCALE
    decay: float = LK_DECAY

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss {self.kind!r}: one of {', '.join(LOSSES)}")

    @classmethod
    def of(cls, draft) -> Objective:
        """The recipe's choice (its `draft` section)."""
        return cls(draft.loss, draft.lk_scale, draft.lk_decay)


KL = Objective()
_TINY = 1e-20  # α_i is clamped here before its log (α_i = 0 needs disjoint supports: q > 0 everywhere)


class _LinearDistillation(torch.autograd.Function):
    """An Objective over (hidden @ weight.T, teacher.probs(rows)), chunk by chunk over the rows.

    The loss is a scalar, so its gradients with respect to hidden and weight are known in the forward
    pass up to the incoming scale: they are accumulated chunk by chunk there (the logits of one chunk
    exist at a time) and only scaled in backward. Matmuls run in the autocast dtype when autocast is
    on (as nn.Linear would), softmax and loss in fp32; the gradients are kept in the matmul dtype.

    Per row, d(−Σ p log q)/dz = q − p and dα/dz = q ∘ (m − Σ_v m q) with m = [q < p]. `lk_lambda`'s
    KL weight needs ᾱ over all rows before any gradient: a first pass over the chunks measures it (one
    matmul per chunk more, where keeping the two parts' gradients apart would cost two).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, teacher_lse, rows, chunk_rows, objective):
        dtype = matmul_dtype(hidden)
        kind = objective.kind
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n = h.shape[0]
            acc = accumulation_dtype(dtype)
            teacher = TeacherTargets(teacher_logits, teacher_lse, None)
            need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen lm_head: no dw

            def chunk(s):  # the draft's softmax q and the teacher's p over rows s…s+chunk_rows, and log-sum-exp
                z = (h[s : s + chunk_rows] @ w.T).to(acc)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                return z, z.sub(lse).exp_(), teacher.probs(rows[s : s + chunk_rows]).to(acc), lse

            kl_weight = None
            if kind == "lk_lambda" and (need_dh or need_dw) and n:
                with torch.no_grad():
                    alpha_sum = sum(torch.minimum(p, q).sum() for _, q, p, _ in map(chunk, range(0, n, chunk_rows)))
                kl_weight = objective.scale * torch.exp(-objective.decay * alpha_sum / n)
            ce_sum, alpha_sum, term_sum = (torch.zeros((), dtype=acc, device=h.device) for _ in range(3))
            argmax = torch.empty(n, dtype=torch.long, device=h.device)
            dh = torch.empty_like(h) if need_dh else None
            dw = torch.zeros(w.shape, dtype=acc, device=h.device) if need_dw else None
            for s in range(0, n, chunk_rows):
                z, q, p, lse = chunk(s)
                ce_sum += (lse.squeeze(-1) - (p * z).sum(-1)).sum()
                argmax[s : s + chunk_rows] = z.argmax(dim=-1)
                del z
                alpha = torch.minimum(p, q).sum(-1)
                alpha_sum += alpha.sum()
                if kind == "lk_alpha":
                    term_sum -= alpha.clamp_min(_TINY).log().sum()
                elif kind == "lk_lambda":  # the teacher's entropy turns the cross-entropy into KL
                    term_sum -= torch.special.xlogy(p, p).sum()
                if not (need_dh or need_dw):
                    continue
                # the loss's gradient with respect to this chunk's logits
                if kind == "kl":
                    g = q.sub_(p).div_(n)
                else:
                    below = (q < p).to(acc)
                    g = q * (below - (below * q).sum(-1, keepdim=True))  # dα/dz
                    if kind == "lk_alpha":
                        g.div_(-n * alpha.clamp_min(_TINY)[:, None])
                    elif kind == "tv":
                        g.div_(-n)
                    else:
                        g.mul_(-(1 - kl_weight) / n).add_(q.sub_(p).mul_(kl_weight / n))
                g = g.to(dtype)
                if need_dh:
                    dh[s : s + chunk_rows] = g @ w
                if need_dw:
                    dw += g.T @ h[s : s + chunk_rows]
            mean_alpha = alpha_sum / max(n, 1)
            if n == 0:
                loss = ce_sum
            elif kind == "kl":
                loss = ce_sum / n
            elif kind == "lk_alpha":
                loss = term_sum / n
            elif kind == "tv":
                loss = 1 - mean_alpha
            else:
                if kl_weight is None:
                    kl_weight = objective.scale * torch.exp(-objective.decay * mean_alpha)
                loss = kl_weight * (ce_sum - term_sum) / n + (1 - kl_weight) * (1 - mean_alpha)
        if need_dh or need_dw:
            ctx.save_for_backward(dh, dw.to(dtype) if need_dw else None)
        ctx.mark_non_differentiable(argmax, mean_alpha)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss, argmax, mean_alpha

    @staticmethod
    def backward(ctx, grad_loss, grad_argmax, grad_alpha):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if dh is None else dh.to(h_dtype) * grad_loss.to(h_dtype),
                None if dw is None else dw.to(w_dtype) * grad_loss.to(w_dtype), None, None, None, None, None)


@dataclass
class StepLoss:
    """One step's loss (fp32 — fp64 for fp64 inputs —, with a graph), the argmax agreement with the
    teacher and the mean expected acceptance ᾱ (both detached; 0 for no rows)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    alpha: torch.Tensor


def linear_distillation(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherTargets, rows: torch.Tensor,
                        objective: Objective = KL, chunk_rows: int | None = None) -> StepLoss:
    """`objective` over the logits `hidden @ weight.T` against `teacher.probs(rows)`, with `accuracy` and ᾱ
    of the same, without materialising the [N, V] logits: computed `chunk_rows` rows at a time (default:
    2^26 elements per chunk), the gradients with them. hidden [N, H] pairs row i with the teacher's row
    rows[i]. With the default objective the loss is `soft_cross_entropy`, which the tests check it against."""
    step = _chunk_rows(weight.shape[0], chunk_rows)
    loss, argmax, alpha = _LinearDistillation.apply(hidden, weight, teacher.logits, teacher.lse, rows, step,
                                                    objective)
    if len(rows) == 0:
        zero = loss.new_zeros((), dtype=torch.float32)
        return StepLoss(loss, zero, zero)
    return StepLoss(loss, (argmax == teacher.argmax[rows]).float().mean(), alpha.detach().float())


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
    """Per-TTT-step loss, accuracy and ᾱ of one micro-batch, and how many positions they count."""

    losses: list[torch.Tensor]  # one detached scalar per TTT step
    accuracies: list[torch.Tensor]
    alphas: list[torch.Tensor]
    counts: list[int]

    @classmethod
    def of(cls, steps: list[StepLoss], counts: list[int]) -> StepMetrics:
        """The metrics of a head's steps (linear_distillation's results) and their scored positions."""
        return cls([s.loss.detach() for s in steps], [s.accuracy for s in steps], [s.alpha for s in steps],
                   list(counts))

    def position_sums(self) -> dict[str, float]:
        """Per step k: loss, accuracy and ᾱ summed over its positions, and the positions
        (trainer.per_position divides them once a whole step's micro-batches and ranks are added)."""
        out: dict[str, float] = {}
        for k, (loss, acc, alpha, n) in enumerate(zip(self.losses, self.accuracies, self.alphas, self.counts)):
            out[f"sum_loss_{k}"] = float(loss) * n
            out[f"sum_acc_{k}"] = float(acc) * n
            out[f"sum_alpha_{k}"] = float(alpha) * n
            out[f"positions_{k}"] = float(n)
        return out
