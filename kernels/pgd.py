"""PGD in Triton: one fused projected-gradient step, in place.

Same contract as the C++ kernels (csrc/cpu/pgd.cpp, csrc/cuda/pgd.cu); fastssl/ops/pgd.py calls
`pgd_step`. x, x0 (the clean input) and g (the loss gradient) are viewed as [B, n], one row per
sample with its own radius ε_b and step α_b (Madry et al. 2018; torchattacks' PGD and PGDL2 do
the same arithmetic in the same order):

 1. L∞:  x ← clamp(x0 + clamp(x + α·sign(g) − x0, −ε, ε), lo, hi). Elementwise: one pass that
    reads x, x0, g and writes x, 16 bytes per fp32 element.
 2. L2:  x ← clamp(x0 + f·(x + c·g − x0), lo, hi), c = α/(‖g‖ + 1e-10), f = min(1, ε/‖δ‖) where
    δ = x + c·g − x0. With d = x − x0 (δ = d + c·g),
        ‖δ‖² = ‖d‖² + 2c·(d·g) + c²‖g‖²,
    so one pass of three sums gives ‖g‖ and ‖δ‖ together, and a second pass writes x.
 3. Work layout. Program `pid` takes block j = pid mod T of sample b = pid div T (T blocks of
    BLOCK elements per sample; offsets in int64). For (2) `_pgd_l2_sums_kernel` writes each
    block's three sums to partials [B, T, 3]; every program of the step kernel then sums its
    sample's T partials itself, in the same order, so all blocks of a sample agree on f: no
    atomics, no third launch, deterministic. When a sample fits in one block (T = 1, e.g.
    3×32×32 images) the step kernel takes the sums from its own tile: one pass, one launch.
    Arithmetic is fp32 (fp64 for fp64); the sums are fp64, see (6).
 4. NaN is never turned into a number: sign(NaN) = NaN (torch.sign gives 0), and the clamps
    propagate NaN as torch.clamp does.
 5. The bounds reach the kernel as a [2] tensor in ACC: a Python float argument is typed fp32 by
    compiled Triton (fp64 clamps would be off by ~1e-8), and the hi/lo pairs of kernels/_tiles.py
    cannot carry ±inf (inf − inf is NaN). No kernel argument is a Python float.
 6. The three sums of (2) are taken in fp64, their products included: in fp32, g² overflows for
    |g| > 1.8e19 and a gradient of 1e30 would give ‖g‖ = inf and a zero step. ‖g‖ and ‖δ‖ are
    rounded to ACC afterwards, as the C++ kernels do (fp64 gradients beyond ~1e154 still overflow).

Non-contiguous tensors are made contiguous by the caller (fastssl/ops/pgd.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import launcher
from torch import Tensor

# Elements per program. A module constant so that tests can shrink it to exercise many blocks
# per sample on small inputs.
_BLOCK = 4096
_SUM_BLOCK = 256  # partials summed per iteration in (3)
_NUM_WARPS = 8


@triton.jit
def _clamp(v, lo, hi):
    """torch.clamp, NaN propagated."""
    v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """IEEE-rounded division."""
    if ACC == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _pgd_l2_sums_kernel(X_ptr, X0_ptr, G_ptr, Partials_ptr, n, blocks, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(2), (3): partials[b, j] = (‖d‖², d·g, ‖g‖²) over block j of sample b."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptr_off = b * n + offs
    x = tl.load(X_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(X0_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    g = tl.load(G_ptr + ptr_off, mask=mask, other=0.0).to(tl.float64)
    d = (x - x0).to(tl.float64)  # (6): the sums in fp64
    tl.store(Partials_ptr + pid * 3, tl.sum(d * d, axis=0))
    tl.store(Partials_ptr + pid * 3 + 1, tl.sum(d * g, axis=0))
    tl.store(Partials_ptr + pid * 3 + 2, tl.sum(g * g, axis=0))


@triton.jit
def _pgd_step_kernel(
    X_ptr,  # [B, n] x_adv, updated in place
    X0_ptr,  # [B, n] the clean input
    G_ptr,  # [B, n] the gradient
    Eps_ptr,  # [B] ACC
    Alpha_ptr,  # [B] ACC
    Partials_ptr,  # [B, blocks, 3] fp64 from _pgd_l2_sums_kernel (L2 only)
    Bounds_ptr,  # [2] ACC: (lo, hi), see (5)
    n,
    blocks,
    L2: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # a sample fits in one block: (3) from the tile itself
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptr_off = b * n + offs
    eps = tl.load(Eps_ptr + b)
    alpha = tl.load(Alpha_ptr + b)
    lo = tl.load(Bounds_ptr)
    hi = tl.load(Bounds_ptr + 1)
    x = tl.load(X_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(X0_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    g = tl.load(G_ptr + ptr_off, mask=mask, other=0.0).to(ACC)
    if L2:
        if ONE_BLOCK:
            # (3) the whole sample is this tile (CIFAR-sized inputs): one pass, no partials
            d = (x - x0).to(tl.float64)
            g64 = g.to(tl.float64)
            sum_dd = tl.sum(d * d, axis=0)
            sum_dg = tl.sum(d * g64, axis=0)
            sum_gg = tl.sum(g64 * g64, axis=0)
        else:
            # (3) this sample's sums, from its blocks' partials
            dd = tl.zeros([SUM_BLOCK], tl.float64)
            dg = tl.zeros([SUM_BLOCK], tl.float64)
            gg = tl.zeros([SUM_BLOCK], tl.float64)
            for j0 in range(0, blocks, SUM_BLOCK):
                j = j0 + tl.arange(0, SUM_BLOCK)
                p = Partials_ptr + (b * blocks + j) * 3
                ok = j < blocks
                dd += tl.load(p, mask=ok, other=0.0)
                dg += tl.load(p + 1, mask=ok, other=0.0)
                gg += tl.load(p + 2, mask=ok, other=0.0)
            sum_dd = tl.sum(dd, axis=0)
            sum_dg = tl.sum(dg, axis=0)
            sum_gg = tl.sum(gg, axis=0)
        # (2) c = α/(‖g‖ + 1e-10), f = min(1, ε/‖δ‖) (1 when ε = ‖δ‖ = 0)
        # (6) ‖g‖ and ‖δ‖ from the fp64 sums, rounded to ACC as the C++ kernel does
        c = _div(alpha, tl.sqrt(sum_gg).to(ACC) + 1e-10, ACC)
        c64 = c.to(tl.float64)
        norm = tl.sqrt(tl.maximum(sum_dd + 2.0 * c64 * sum_dg + c64 * c64 * sum_gg, 0.0)).to(ACC)
        f = tl.where(norm > eps, _div(eps, norm, ACC), 1.0)
        delta = (x + c * g - x0) * f
    else:
        # (1), (4): sign(g) with NaN kept
        step = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g))
        delta = _clamp(x + alpha * step - x0, -eps, eps)
    out = _clamp(x0 + delta, lo, hi)
    tl.store(X_ptr + ptr_off, out.to(X_ptr.dtype.element_ty), mask=mask)


def _check(fn: str, x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor) -> None:
    if x_adv.dim() < 1:
        raise ValueError(f"{fn}: x_adv must be [B, ...], got a scalar")
    for name, t in (("grad", grad), ("x_orig", x_orig)):
        if t.shape != x_adv.shape or t.dtype != x_adv.dtype or t.device != x_adv.device:
            raise ValueError(f"{fn}: {name} must match x_adv in shape, dtype and device")
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x_orig", x_orig)):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    for name, t in (("eps", eps), ("alpha", alpha)):
        if t.shape != (x_adv.shape[0],):
            raise ValueError(f"{fn}: {name} must be [B] = [{x_adv.shape[0]}], got {tuple(t.shape)}")


@launcher
def pgd_step(x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor, l2: bool, lo: float, hi: float):
    """One PGD step on x_adv in place: L∞ (1), or L2 (2) when `l2`; eps, alpha: [B]."""
    _check("pgd_step", x_adv, grad, x_orig, eps, alpha)
    batch = x_adv.shape[0]
    if x_adv.numel() == 0:
        return
    n = x_adv.numel() // batch
    acc = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    eps = eps.to(device=x_adv.device, dtype=acc).contiguous()
    alpha = alpha.to(device=x_adv.device, dtype=acc).contiguous()
    block = min(_BLOCK, max(16, triton.next_power_of_2(n)))
    blocks = triton.cdiv(n, block)
    grid = (batch * blocks,)
    # 4 warps for 16-bit rows: with 8, Triton 3.6 spilled 24 B in the fp16 L2 step on sm_80 (compile check)
    num_warps = _NUM_WARPS if x_adv.element_size() >= 4 else 4
    meta = dict(ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block, num_warps=num_warps)
    one_block = blocks == 1
    partials = x_adv.new_empty(1 if one_block or not l2 else batch * blocks * 3, dtype=torch.float64)
    bounds = x_adv.new_full((2,), lo, dtype=acc)  # (5): fills on the device, no host-to-device copy (no sync)
    bounds[1] = hi
    if l2 and not one_block:
        _pgd_l2_sums_kernel[grid](x_adv, x_orig, grad, partials, n, blocks, **meta)
    _pgd_step_kernel[grid](
        x_adv,
        x_orig,
        grad,
        eps,
        alpha,
        partials,
        bounds,
        n,
        blocks,
        L2=l2,
        ONE_BLOCK=one_block,
        SUM_BLOCK=_SUM_BLOCK,
        **meta,
    )
