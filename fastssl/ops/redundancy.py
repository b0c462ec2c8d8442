"""Redundancy-reduction losses (Barlow Twins, VICReg): checks, the Frobenius terms through N×N Gram
matrices, and gathering across ranks (docs/design.md, "Redundancy reduction").

Both losses need the squared Frobenius norm of a D×D matrix: Barlow Twins' cross-correlation
C = AᵀB/N and VICReg's covariance XᵀX/(N − 1). For N < D it is taken through the N×N Gram
matrices, ‖AᵀB‖²_F = tr(AᵀB BᵀA) = Σ_nm (AAᵀ)_nm (BBᵀ)_nm: 2·2N²D FLOPs forward and N² memory
instead of 2ND² and D² (at N = 1024, D = 8192: 4 MB instead of 268 MB). The diagonal terms
are O(N·D) column sums, and the off-diagonal sums are ‖·‖²_F minus the diagonal's. Autograd
differentiates the same expressions (∂‖AᵀB‖²/∂A = 2(BBᵀ)A: N×N by N×D again).

Across ranks (``gather=True``): every rank gathers all rows with gradient and computes the whole
batch's loss L; its graph holds L/W (W ranks), the value returned is L on every rank. The gathers'
backward sums the ranks' shares, so each rank's input gradients are exactly the single-process ones
(fastssl/distributed.py's convention). The normalisation statistics are the whole batch's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastssl import _checks, distributed

# Barlow Twins normalises the columns as training-mode batch norm does (biased variance, this eps).
BATCH_NORM_EPS = 1e-5


def frobenius_sq(a: Tensor, b: Tensor) -> Tensor:
    """‖aᵀb‖²_F for a, b [N, D]: through the N×N Gram matrices when N < D, else the D×D product."""
    if a.shape[0] < a.shape[1]:
        gram_b = gram_a = a @ a.T
        if b is not a:
            gram_b = b @ b.T
        return (gram_a * gram_b).sum()
    return (a.T @ b).square().sum()


def _inputs(z1: Tensor, z2: Tensor, gather: bool) -> tuple[Tensor, Tensor, int]:
    """Both views in the accumulation dtype, every rank's rows under gather, and the world size."""
    _checks.features("z1", z1)
    _checks.features("z2", z2)
    _checks.like("z2", z2, "z1", z1)
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    acc = _checks.accumulate_dtype(z1.dtype)
    z1, z2 = z1.to(acc), z2.to(acc)
    world = 1
    if gather:
        counts = distributed.row_counts(z1.shape[0], z1.device)
        z1, z2 = distributed.all_gather(z1, counts), distributed.all_gather(z2, counts)
        world = dist.get_world_size()
    if z1.shape[0] < 2:
        raise ValueError(f"z1 must have at least 2 rows (over all ranks under gather), got shape {tuple(z1.shape)}")
    return z1, z2, world


def _share(loss: Tensor, world: int, gather: bool) -> Tensor:
    """The whole batch's loss as value, this rank's share L/W in the graph."""
    return distributed.sum_over_ranks(loss / world) if gather else loss


def barlow_twins_loss(z1: Tensor, z2: Tensor, *, lambda_: float = 0.005, gather: bool = False) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021), equal to lightly's ``BarlowTwinsLoss``.

    Columns standardised over the batch (training-mode batch norm: biased variance, eps = 1e-5),
    C = ẑ1ᵀẑ2/N, loss = Σ_k (C_kk − 1)² + λ Σ_{k≠l} C_kl².

    Args:
        z1, z2: [N, D] projections of the two views, N ≥ 2.
        lambda_: λ ≥ 0, the weight of the redundancy term.
        gather: under ``torch.distributed``, the statistics and C over every rank's rows: loss and
            gradients equal one process on the concatenated batch (lightly's gather averages C but
            keeps each rank's own normalisation).

    fp32 for fp16/bf16/fp32 input (fp64 for fp64). No D×D matrix when N < D.
    """
    lam = _checks.nonnegative("lambda_", lambda_)
    a, b, world = _inputs(z1, z2, gather)
    n = a.shape[0]
    a, b = (_standardise(x) for x in (a, b))
    diag = (a * b).sum(0) / n  # C_kk
    off = frobenius_sq(a, b) / n**2 - diag.square().sum()
    return _share((diag - 1).square().sum() + lam * off, world, gather)


def _standardise(x: Tensor) -> Tensor:
    mean = x.mean(0)
    var = (x - mean).square().mean(0)
    return (x - mean) / (var + BATCH_NORM_EPS).sqrt()


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
    eps: float = 1e-4,
    gather: bool = False,
) -> Tensor:
    """VICReg (Bardes et al. 2022), equal to lightly's ``VICRegLoss``.

    invariance·mean (z1 − z2)² + variance·(v(z1) + v(z2))/2 + covariance·(c(z1) + c(z2)), with
    v(z) = mean_k relu(1 − √(Var_k z + eps)) (unbiased variance) and c(z) = Σ_{k≠l} Cov_kl²/D.

    Args:
        z1, z2: [N, D] embeddings of the two views, N ≥ 2.
        invariance, variance, covariance: the weights, each ≥ 0.
        eps: > 0, added to the variance under the square root.
        gather: under ``torch.distributed``, every term over every rank's rows: loss and gradients
            equal one process on the concatenated batch (lightly's gather keeps the invariance term local).

    fp32 for fp16/bf16/fp32 input (fp64 for fp64). No D×D matrix when N < D.
    """
    weights = [_checks.nonnegative(k, v) for k, v in (("invariance", invariance), ("variance", variance),
                                                       ("covariance", covariance))]  # fmt: skip
    eps = _checks.positive("eps", eps)
    a, b, world = _inputs(z1, z2, gather)
    inv = (a - b).square().mean()
    var_terms, cov_terms = zip(*(_variance_covariance(x, eps) for x in (a, b)), strict=True)
    loss = weights[0] * inv + weights[1] * (var_terms[0] + var_terms[1]) / 2 + weights[2] * sum(cov_terms)
    return _share(loss, world, gather)


def _variance_covariance(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """v(x) and c(x) of VICReg: Σ_{k≠l} Cov_kl² = ‖X̄ᵀX̄‖²_F/(N − 1)² − Σ_k Var_k²."""
    n, d = x.shape
    centred = x - x.mean(0)
    var = centred.square().sum(0) / (n - 1)
    v = torch.relu(1.0 - (var + eps).sqrt()).mean()
    c = (frobenius_sq(centred, centred) / (n - 1) ** 2 - var.square().sum()) / d
    return v, c
