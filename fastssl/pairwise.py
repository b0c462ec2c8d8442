"""Pairwise losses: SigLIP (function and module), alignment, the hypersphere loss and the negative
cosine similarity of BYOL and SimSiam."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastssl import _checks, _ext
from fastssl._rows import scaled_rows
from fastssl.ops.ntxent import ntxent_lse
from fastssl.ops.siglip import siglip_loss

__all__ = [
    "SigLIPLoss",
    "alignment_loss",
    "hypersphere_loss",
    "negative_cosine_similarity",
    "siglip_loss",
    "uniformity_loss",
]


class SigLIPLoss(nn.Module):
    """SigLIP's loss with its learned logit scale and bias; see :func:`fastssl.siglip_loss`.

    Holds t′ = log(scale) (``logit_scale``; scale = exp t′ stays positive) and ``logit_bias``, as
    SigLIP trains them (Zhai et al. 2023 start at t′ = log 10, b = −10). With ``learnable=False``
    both stay fixed (buffers). Under ``gather=True`` keep the parameters in the model DDP wraps
    (or all-reduce their gradients): each rank's gradient is its share.

    Example::

        loss_fn = fastssl.SigLIPLoss()
        loss = loss_fn(image_encoder(images), text_encoder(texts))
    """

    def __init__(
        self,
        scale_init: float = 10.0,
        bias_init: float = -10.0,
        learnable: bool = True,
        *,
        reduction: str = "mean",
        gather: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        scale = _checks.positive("scale_init", scale_init)
        if isinstance(bias_init, bool) or not isinstance(bias_init, (int, float)) or not math.isfinite(bias_init):
            raise ValueError(f"bias_init must be a finite number, got {bias_init!r}")
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        t, b = torch.tensor(math.log(scale)), torch.tensor(float(bias_init))
        if learnable:
            self.logit_scale, self.logit_bias = nn.Parameter(t), nn.Parameter(b)
        else:
            self.register_buffer("logit_scale", t)
            self.register_buffer("logit_bias", b)
        self.reduction, self.gather, self.impl = reduction, gather, impl

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        return siglip_loss(
            image, text, scale=self.logit_scale.exp(), bias=self.logit_bias, gather=self.gather,
            reduction=self.reduction, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, gather={self.gather}, impl={self.impl!r}"


def alignment_loss(x: Tensor, y: Tensor, *, alpha: float = 2.0) -> Tensor:
    """Alignment (Wang & Isola 2020): mean_i ‖x̂_i − ŷ_i‖₂^α over L2-normalised rows x̂, ŷ [N, D].

    fp32 for fp16/bf16/fp32 input (fp64 for fp64). alpha > 0. Non-finite rows give a non-finite loss.
    """
    _pair("x", x, "y", y)
    return _alignment(x, y, _checks.positive("alpha", alpha))


def _pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _checks.features(name_a, a)
    _checks.features(name_b, b)
    _checks.like(name_b, b, name_a, a)


def _alignment(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    acc = _checks.accumulate_dtype(x.dtype)
    return (F.normalize(x.to(acc), dim=1) - F.normalize(y.to(acc), dim=1)).norm(dim=1).pow(alpha).mean()


def uniformity_loss(x: Tensor, *, t: float = 2.0) -> Tensor:
    """Uniformity (Wang & Isola 2020): log mean_{i<j} exp(−t‖x̂_i − x̂_j‖²) over L2-normalised rows
    x̂ of x [N, D], N ≥ 2, t > 0. Through the NT-Xent log-sum-exp op, so memory is O(N·D), never an
    N×N matrix (docs/design.md, "Uniformity"). Computed and returned in fp32 for fp16/bf16/fp32
    input (fp64 for fp64).
    Non-finite rows give a non-finite loss.
    """
    _checks.features("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"x must have at least 2 rows (one pair), got shape {tuple(x.shape)}")
    return _uniformity(x, _checks.positive("t", t))


def _uniformity(x: Tensor, t: float) -> Tensor:
    """With unit rows ‖x̂_i − x̂_j‖² = 2 − 2 x̂_i·x̂_j, so the mean over i < j (= over i ≠ j, by
    symmetry) is log Σ_i exp(lse_i) − log N(N−1) − 2t with lse_i = LSE_{j≠i} 2t·x̂_i·x̂_j, the
    NT-Xent LSE at 1/τ = 2t (docs/design.md, "Uniformity")."""
    n, acc = x.shape[0], _checks.accumulate_dtype(x.dtype)
    # 16-bit input in fp32 (unit rows rounded to bf16 would move U by ~1e-3), handed to the kernel
    # as x's own numbers and inverse norms
    lse = ntxent_lse(*scaled_rows(x, acc), 2.0 * t, _ext.resolve_impl("auto", x.device))
    return lse.logsumexp(0) - math.log(n * (n - 1)) - 2.0 * t


def hypersphere_loss(z1: Tensor, z2: Tensor, *, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0) -> Tensor:
    """Alignment plus uniformity (Wang & Isola 2020), equal to lightly's ``HypersphereLoss``:
    alignment_loss(z1, z2, alpha) + lam·(U(z1) + U(z2))/2 with U(z) = log mean_{i<j} exp(−t‖ẑ_i − ẑ_j‖²).

    z1, z2: [N, D], N ≥ 2 (uniformity needs a pair). t > 0, lam ≥ 0, alpha > 0. This uniformity
    uniformity is :func:`uniformity_loss`'s (O(N·D) memory).
    """
    _pair("z1", z1, "z2", z2)
    if z1.shape[0] < 2:
        raise ValueError(f"z1 must have at least 2 rows for the uniformity term, got shape {tuple(z1.shape)}")
    t = _checks.positive("t", t)
    lam = _checks.nonnegative("lam", lam)
    align = _alignment(z1, z2, _checks.positive("alpha", alpha))
    return align + lam * (_uniformity(z1.to(align.dtype), t) + _uniformity(z2.to(align.dtype), t)) / 2


def negative_cosine_similarity(p: Tensor, z: Tensor) -> Tensor:
    """−mean_i cos(p_i, z_i) over rows [N, D] (BYOL, SimSiam), equal to lightly's
    ``NegativeCosineSimilarity`` (``torch.nn.functional.cosine_similarity`` with eps = 1e-8).

    The caller detaches the target z, as those methods do. fp32 for fp16/bf16/fp32 input.
    """
    _pair("p", p, "z", z)
    acc = _checks.accumulate_dtype(p.dtype)
    return -F.cosine_similarity(p.to(acc), z.to(acc), dim=1, eps=1e-8).mean()
