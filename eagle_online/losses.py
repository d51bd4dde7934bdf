"""Distillation losses and the per-TTT-step metrics."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ_v p_teacher(v) · log p_student(v), in fp32 ([N, V] each, rows already
    selected). Equal to KL(teacher ‖ student) plus the teacher's entropy, a constant for the student.

    Written as logsumexp(z) − Σ_v p(v)·z(v) (Σ p = 1), so no [N, V] log-softmax is kept for backward.
    Returns 0 (with a graph) for no rows.
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

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, (loss, acc) in enumerate(zip(self.losses, self.accuracies)):
            out[f"loss_{k}"] = float(loss)
            out[f"acc_{k}"] = float(acc)
        out["tau_hat"] = expected_acceptance_length([float(a) for a in self.accuracies])
        return out
