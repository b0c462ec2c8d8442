"""Barlow Twins and VICReg the eager way: the whole D×D cross-correlation and covariance matrices,
as the papers' pseudo-code writes them."""

from __future__ import annotations

import torch
from torch import Tensor


def _off_diagonal_sq(c: Tensor) -> Tensor:
    return c.square().sum() - c.diagonal().square().sum()


def barlow_twins(z1: Tensor, z2: Tensor, lambda_: float = 0.005, eps: float = 1e-5) -> Tensor:
    n = z1.shape[0]
    a, b = ((z - z.mean(0)) / (z.var(0, unbiased=False) + eps).sqrt() for z in (z1, z2))
    c = a.T @ b / n
    return (c.diagonal() - 1).square().sum() + lambda_ * _off_diagonal_sq(c)


def vicreg(z1: Tensor, z2: Tensor, invariance=25.0, variance=25.0, covariance=1.0, eps=1e-4) -> Tensor:
    def var_cov(z):
        n, d = z.shape
        centred = z - z.mean(0)
        cov = centred.T @ centred / (n - 1)
        return torch.relu(1 - (cov.diagonal() + eps).sqrt()).mean(), _off_diagonal_sq(cov) / d

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    return invariance * (z1 - z2).square().mean() + variance * (v1 + v2) / 2 + covariance * (c1 + c2)
