"""Contrastive losses: the public functions and their nn.Module forms."""

from __future__ import annotations

from torch import Tensor, nn

from fastssl.ops.ntxent import nt_xent

__all__ = ["NTXentLoss", "nt_xent"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (SupCon with ``labels``) as a module; see :func:`fastssl.nt_xent`.

    Example::

        loss_fn = fastssl.NTXentLoss(temperature=0.2)
        loss = loss_fn(model(view1), model(view2))
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.impl = temperature, reduction, impl

    def forward(self, z1: Tensor, z2: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        return nt_xent(z1, z2, labels=labels, temperature=self.temperature, reduction=self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, impl={self.impl!r}"
