"""Redundancy-reduction losses: Barlow Twins and VICReg."""

from __future__ import annotations

from fastssl.ops.redundancy import barlow_twins_loss, vicreg_loss

__all__ = ["barlow_twins_loss", "vicreg_loss"]
