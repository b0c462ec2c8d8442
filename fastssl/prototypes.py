"""Prototype losses (DINO, iBOT, SwAV) fused with the last layer, DINOv2's KoLeo, and their modules.

The [rows, K] logits of the prototype layer are never stored: the functions take the features
before the last layer and its weight (docs/design.md, "DINO, iBOT and SwAV prototype losses").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl import _checks
from fastssl.ops import dino as _ops

__all__ = [
    "DINOLoss",
    "IBOTLoss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "swav_loss",
    "teacher_temperature_schedule",
]


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    center: Tensor | None = None,
    *,
    n_global_crops: int = 2,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    centering: str = "center",
    sinkhorn_iterations: int = 3,
    impl: str = "auto",
) -> Tensor:
    """DINO's loss (main_dino.py's `DINOLoss`) fused with the student's and teacher's last layer.

    Args:
        student: [V·B, d] the student head's output before its last layer (DINO L2-normalises it;
            the op does not), crop-major: rows v·B … (v+1)·B − 1 are crop v, the first
            `n_global_crops` crops the global ones.
        teacher: [n_global_crops·B, d] the same for the teacher's global crops (no gradient).
        weight: [K, d] the student's last layer as used (with `weight_norm`, the normalised weight;
            its gradient flows back through the parametrisation).
        teacher_weight: [K, d] the teacher's last layer (no gradient).
        center: [K] or [1, K] DINO's center for ``centering="center"`` (None: a zero center).
        centering: "center" (softmax((t − c)/τ_t)), "sinkhorn" (DINOv2's Sinkhorn-Knopp over the
            teacher rows of every rank, `sinkhorn_iterations` iterations) or "none" (softmax(t/τ_t)).
        impl: "auto", "reference" (the logits materialised) or "cpp".

    Returns the mean over the pairs (g, v ≠ g) of mean_b −Σ_k q_{g,b,k} log softmax(s_{v,b}/τ_s)_k,
    s = student·weightᵀ, t = teacher·teacher_weightᵀ (DINOv2's `DINOLoss` sums over the pairs: multiply
    by their number). Gradients reach `student` and `weight` only. fp32 (fp64 for fp64 inputs).
    """
    return _ops.dino_loss(
        student, teacher, weight, teacher_weight, center, n_global_crops=n_global_crops,
        student_temperature=student_temperature, teacher_temperature=teacher_temperature, centering=centering,
        sinkhorn_iterations=sinkhorn_iterations, impl=impl,
    )  # fmt: skip


def ibot_loss(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    center: Tensor | None = None,
    *,
    token_weights: Tensor | None = None,
    n_images: int | None = None,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    centering: str = "center",
    sinkhorn_iterations: int = 3,
    impl: str = "auto",
) -> Tensor:
    """iBOT's masked patch loss (DINOv2's `iBOTPatchLoss.forward_masked`) fused with the last layer.

    `student`, `teacher`: the masked patch tokens [M, d] before the last layer, token p of the
    student against token p of the teacher. Returns −(1/n_images) Σ_p w_p Σ_k q_{p,k} log
    softmax(s_p/τ_s)_k with w = `token_weights` (DINOv2's `masks_weight`, 1/(masked tokens of p's
    image); None: 1) and `n_images` (None: M, the mean over tokens). With ``centering="sinkhorn"``
    the masked tokens of every rank form one assignment problem, as in DINOv2.
    """
    return _ops.ibot_loss(
        student, teacher, weight, teacher_weight, center, token_weights=token_weights, n_images=n_images,
        student_temperature=student_temperature, teacher_temperature=teacher_temperature, centering=centering,
        sinkhorn_iterations=sinkhorn_iterations, impl=impl,
    )  # fmt: skip


def swav_loss(
    z: Tensor,
    prototypes: Tensor,
    *,
    n_crops: int = 8,
    n_crops_for_assign: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    queue: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """SwAV's loss (main_swav.py) fused with the prototype layer.

    `z` [n_crops·B, d]: the normalised embeddings, crop-major; `prototypes` [K, d] (SwAV normalises
    them before each step). The codes of each of the first `n_crops_for_assign` crops come from
    `distributed_sinkhorn` (ε = `epsilon`, no gradient) over that crop's rows, after the rows of
    `queue` ([Q, d] shared by the assigned crops, or [n_crops_for_assign, Q, d] one each, as SwAV's);
    every other crop's softmax(z·prototypesᵀ/temperature) is scored against them and the terms are
    averaged as SwAV does. The queue is read, not updated (fastssl.MemoryQueue can hold it).
    """
    return _ops.swav_loss(
        z, prototypes, n_crops=n_crops, n_crops_for_assign=n_crops_for_assign, temperature=temperature,
        epsilon=epsilon, sinkhorn_iterations=sinkhorn_iterations, queue=queue, impl=impl,
    )  # fmt: skip


def koleo_loss(x: Tensor, *, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo regulariser: −mean_i log(‖x̂_i − x̂_nn(i) + eps‖ + eps), x̂ the rows normalised
    and nn(i) the row of largest cosine with x̂_i other than i itself, found in row blocks (O(N·D)
    memory; no gradient through the choice).

    Ties go to the lowest index. The row itself is never its own neighbour (lightly's −2 on the
    diagonal; DINOv2's −1 could tie with an antipodal row). A duplicate row is the nearest
    neighbour at distance eps·√D, a finite, large term. At least two rows.
    """
    return _ops.koleo_loss(x, eps=eps)


def teacher_temperature_schedule(warmup: float, final: float, warmup_epochs: int, epochs: int) -> list[float]:
    """DINO's teacher temperature per epoch (main_dino.py): `warmup_epochs` values from `warmup` to
    `final` (numpy.linspace), then `final`; index it by epoch."""
    return _ops.temperature_schedule(warmup, final, warmup_epochs, epochs)


class _CenteredLoss(nn.Module):
    """A prototype loss with DINO's center buffer [K], updated after each forward as
    c ← m·c + (1 − m)·(mean teacher logit over every rank's rows)."""

    def __init__(self, out_dim, student_temperature, teacher_temperature, center_momentum, centering):
        super().__init__()
        _checks.integer("out_dim", out_dim, minimum=1)
        _checks.positive("student_temperature", student_temperature)
        _checks.positive("teacher_temperature", teacher_temperature)
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        _checks.choice("centering", centering, _ops.CENTERINGS)
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.center_momentum, self.centering = center_momentum, centering
        self.register_buffer("center", torch.zeros(out_dim))

    def update_center(self, teacher: Tensor, teacher_weight: Tensor) -> None:
        batch = _ops.batch_center(teacher, teacher_weight).to(self.center)
        self.center.mul_(self.center_momentum).add_(batch, alpha=1 - self.center_momentum)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.center.numel()}, student_temperature={self.student_temperature}, "
            f"teacher_temperature={self.teacher_temperature}, center_momentum={self.center_momentum}, "
            f"centering={self.centering!r}"
        )


class DINOLoss(_CenteredLoss):
    """DINO's loss with its center (main_dino.py's `DINOLoss`); see :func:`fastssl.dino_loss`.

    ``forward(student, teacher, weight, teacher_weight, teacher_temperature=None)`` returns the loss
    with the current center, then (with ``centering="center"``) updates the center from the
    teacher's rows. Pass the epoch's value of :func:`teacher_temperature_schedule` as
    `teacher_temperature` to warm it up.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        n_global_crops: int = 2,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        centering: str = "center",
        impl: str = "auto",
    ):
        super().__init__(out_dim, student_temperature, teacher_temperature, center_momentum, centering)
        self.n_global_crops, self.impl = n_global_crops, impl

    def forward(self, student, teacher, weight, teacher_weight, teacher_temperature=None) -> Tensor:
        loss = dino_loss(
            student, teacher, weight, teacher_weight, self.center, n_global_crops=self.n_global_crops,
            student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature if teacher_temperature is None else teacher_temperature,
            centering=self.centering, impl=self.impl,
        )  # fmt: skip
        if self.centering == "center":
            self.update_center(teacher, teacher_weight)
        return loss


class IBOTLoss(_CenteredLoss):
    """iBOT's masked patch loss with its own center (an EMA over the masked teacher tokens of
    every rank); see :func:`fastssl.ibot_loss`. ``forward(student, teacher, weight, teacher_weight,
    token_weights=None, n_images=None, teacher_temperature=None)``.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        centering: str = "center",
        impl: str = "auto",
    ):
        super().__init__(out_dim, student_temperature, teacher_temperature, center_momentum, centering)
        self.impl = impl

    def forward(
        self, student, teacher, weight, teacher_weight, token_weights=None, n_images=None, teacher_temperature=None
    ) -> Tensor:
        loss = ibot_loss(
            student, teacher, weight, teacher_weight, self.center, token_weights=token_weights, n_images=n_images,
            student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature if teacher_temperature is None else teacher_temperature,
            centering=self.centering, impl=self.impl,
        )  # fmt: skip
        if self.centering == "center":
            self.update_center(teacher, teacher_weight)
        return loss
