"""Contrastive losses: the public functions and their nn.Module forms."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastssl import _checks
from fastssl.ops.dcl import dcl_loss
from fastssl.ops.info_nce import info_nce
from fastssl.ops.ntxent import nt_xent

__all__ = ["InfoNCELoss", "NTXentLoss", "dcl_loss", "info_nce", "nt_xent"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (SupCon with ``labels``) as a module; see :func:`fastssl.nt_xent`.

    Example::

        loss_fn = fastssl.NTXentLoss(temperature=0.2)
        loss = loss_fn(model(view1), model(view2))
    """

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", impl: str = "auto", gather: bool = False):
        super().__init__()
        self.temperature, self.reduction, self.impl, self.gather = temperature, reduction, impl, gather

    def forward(self, z1: Tensor, z2: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        return nt_xent(
            z1, z2, labels=labels, temperature=self.temperature, reduction=self.reduction, gather=self.gather,
            impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, gather={self.gather}, impl={self.impl!r}"


class InfoNCELoss(nn.Module):
    """InfoNCE between two towers (MoCo) or, with ``symmetric=True``, CLIP's loss; see :func:`fastssl.info_nce`.

    With ``learnable_temperature=True`` the module learns CLIP's logit scale, log(1/τ), starting at
    ``temperature`` (τ = exp(−logit_scale) stays positive); CLIP also clamps it to at most
    log(100) after each optimiser step. Under ``gather=True`` keep that parameter in the model that
    DDP wraps (or all-reduce its gradient), since each rank's gradient is its share.

    Example::

        loss_fn = fastssl.InfoNCELoss(learnable_temperature=True, symmetric=True)
        loss = loss_fn(image_encoder(images), text_encoder(texts))
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        reduction: str = "mean",
        gather: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        tau = _checks.positive("temperature", temperature)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau))) if learnable_temperature else None
        self._temperature = tau
        self.symmetric, self.reduction, self.gather, self.impl = symmetric, reduction, gather, impl

    @property
    def temperature(self) -> float | Tensor:
        """τ: the fixed float, or exp(−logit_scale) (a tensor with gradient) when learned."""
        return self._temperature if self.logit_scale is None else torch.exp(-self.logit_scale)

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        return info_nce(
            query, key, temperature=self.temperature, negatives=negatives, symmetric=self.symmetric,
            reduction=self.reduction, gather=self.gather, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        tau = "learned" if self.logit_scale is not None else self._temperature
        return (
            f"temperature={tau}, symmetric={self.symmetric}, reduction={self.reduction!r}, gather={self.gather}, "
            f"impl={self.impl!r}"
        )
