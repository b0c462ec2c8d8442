"""Decoupled contrastive learning (DCL, DCLW): checks, dispatch and gathering across ranks.

With unit rows a = z1, b = z2 (B each, positive pairs (a_i, b_i)) and s(x, y) = x·y/τ, view a's row is

    ℓ^a_i = LSE(LSE_{j≠i} s(a_i, a_j), LSE_{j≠i} s(a_i, b_j)) − w_i s(a_i, b_i)              (1)

(the positive left out of the denominator; docs/design.md, "DCL"), view b's the same with a and b
swapped, and the loss is the mean of (ℓ^a_i + ℓ^b_i)/2. w = 1 (DCL), or with σ DCLW's detached
w_i = 2 − B·softmax_i(a_i·b_i/σ). The four log-sum-exps are rows of the InfoNCE LSE op
(`fastssl::info_nce_lse`, `self_offset` leaving out the pairs (i, i)), combined with logaddexp; its
kernels never hold a B×B matrix and give exact gradients, for a tensor τ too.

Across ranks (``gather=True``, fastssl/distributed.py): rank r's rows meet every rank's rows of both
views (its own rows sit at `first` in the gathered ones, hence self_offset = first), the softmax of
DCLW runs over the whole batch, and the loss is that of one process on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl import _checks, _ext, distributed
from fastssl._reductions import reduce_rows
from fastssl._rows import unit_rows
from fastssl.ops.info_nce import info_nce_lse
from fastssl.reference import dcl as reference


def dcl_loss(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    sigma: float | None = None,
    gather: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2021): NT-Xent without the positive pair in the
    denominator; with ``sigma``, its weighted form DCLW. Equal to lightly's ``DCLLoss`` and ``DCLWLoss``.

    Args:
        z1, z2: [B, D] embeddings of two views; row i of z2 is the positive of row i of z1.
        temperature: τ > 0, a float or a one-element tensor (its gradient is exact).
        sigma: None (DCL), or σ > 0 for DCLW's weights w_i = 2 − B·softmax_i(ẑ1_i·ẑ2_i/σ) on the
            positive term (detached, as in the paper and in lightly).
        gather: under ``torch.distributed``, every rank's rows are negatives of every row and the
            loss and gradients are those of one process on the concatenated batch (the info_nce
            convention; DCLW's softmax runs over the whole batch, where lightly's runs per rank).
        impl: "auto", "reference", "cpp", "triton" or "cuda".

    Rows are L2-normalised inside the op. The loss is the mean over the batch, in fp32 (fp64 for fp64).
    """
    _checks.features("z1", z1)
    _checks.features("z2", z2)
    _checks.like("z2", z2, "z1", z1)
    if sigma is not None:
        sigma = _checks.positive("sigma", sigma)
    gather = _checks.flag("gather", gather)
    inv_tau = _checks.inverse_temperature("temperature", temperature, z1.device)
    impl = _ext.resolve_impl(impl, z1.device)
    b = z1.shape[0]
    counts, first = distributed.rows_layout(b, z1.device) if gather else ([b], 0)
    if sum(counts) < 2:
        raise ValueError(f"z1 must have at least 2 rows in the batch (one negative each), got {sum(counts)}")
    if impl == "reference":
        a_all, b_all = (distributed.all_gather(x, counts) for x in (z1, z2)) if gather else (z1, z2)
        rows = reference.dcl_rows(a_all, b_all, inv_tau, sigma)[first : first + b]
    else:
        rows = _fused_rows(z1, z2, inv_tau, sigma, impl, counts if gather else None, first)
    return reduce_rows(rows, "mean", sum(counts), gather)


def _fused_rows(z1, z2, inv_tau, sigma, impl, counts, first) -> Tensor:
    """This rank's rows (ℓ^a + ℓ^b)/2 of (1) through `fastssl::info_nce_lse`; counts: None, or the
    ranks' row counts under gather."""
    acc = _checks.accumulate_dtype(z1.dtype)
    # the kernels and the positive term read the same rounded unit rows (as info_nce does)
    a, b = (unit_rows(x.to(acc)).to(z1.dtype) for x in (z1, z2))
    a_all, b_all = (a, b) if counts is None else (distributed.all_gather(x, counts) for x in (a, b))
    pos = (a.to(acc) * b.to(acc)).sum(1)
    if sigma is not None:
        sim = pos.detach() / sigma
        sims = sim if counts is None else distributed.all_gather(sim, counts)
        pos = pos * (2 - sims.shape[0] * torch.softmax(sims, 0)[first : first + a.shape[0]])

    def negatives(x, x_all, y_all):
        same, _ = info_nce_lse(x, x_all, inv_tau, False, first, impl)
        other, _ = info_nce_lse(x, y_all, inv_tau, False, first, impl)
        return torch.logaddexp(same, other)

    return 0.5 * (negatives(a, a_all, b_all) + negatives(b, b_all, a_all)) - inv_tau * pos
