"""Prototype losses (DINO, iBOT, SwAV) fused with the last layer, DINOv2's KoLeo, and their modules.

The [rows, K] logits of the prototype layer are never stored: the functions take the features
before the last layer and its weight (docs/design.md, "DINO, iBOT and SwAV prototype losses").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl import _checks
from fastssl.ops import dino as _ops
from fastssl.ops.dino import dino_loss, ibot_loss, koleo_loss, swav_loss, teacher_temperature_schedule

__all__ = [
    "DINOLoss",
    "IBOTLoss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "swav_loss",
    "teacher_temperature_schedule",
]


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
