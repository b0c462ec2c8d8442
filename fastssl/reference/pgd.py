"""PGD the eager way: a step as a chain of tensor ops, and the plain attack loop around it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastssl._checks import accumulate_dtype


def pgd_step(x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor, norm: str, lo: float, hi: float):
    """The next iterate (a new tensor in x_adv's dtype), computed in fp32 (fp64 for fp64 input).

    eps, alpha: [B], one per sample (the first dim). L∞: clamp(x0 + clamp(x + α·sign(g) − x0, −ε, ε), lo, hi);
    L2: x + α·g/(‖g‖ + 1e-10), δ scaled by min(1, ε/‖δ‖), clamped. A NaN gradient gives NaN, not a zero step.
    """
    acc = accumulate_dtype(x_adv.dtype)
    x, g, x0 = x_adv.to(acc), grad.to(acc), x_orig.to(acc)
    shape = (-1,) + (1,) * (x.dim() - 1)  # per-sample values broadcast over a sample
    e, a = eps.to(acc).view(shape), alpha.to(acc).view(shape)
    if norm == "linf":
        step = torch.where(g.isnan(), g, g.sign())  # torch.sign(NaN) is 0
        delta = torch.clamp(x + a * step - x0, -e, e)
    else:
        # the norms in fp64, then rounded (fp32's vector_norm overflows at |g| ≈ 1e19 and steps by 0)
        g_norm = _norm(g).view(shape) + 1e-10
        delta = x + a * (g / g_norm) - x0
        d_norm = _norm(delta).view(shape)
        delta = delta * torch.where(d_norm > e, e / d_norm, 1.0)  # min(1, ε/‖δ‖), 1 when ε = ‖δ‖ = 0
    return torch.clamp(x0 + delta, lo, hi).to(x_adv.dtype)


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v.reshape(len(v), -1).double(), dim=1).to(v.dtype)


def pgd_attack(
    objective: Callable[[Tensor], Tensor],
    x: Tensor,
    x_start: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """`steps` reference steps from x_start, each on the gradient of the scalar objective(x_adv)."""
    b = x.shape[0]
    eps_t, alpha_t = (torch.full((b,), v, dtype=accumulate_dtype(x.dtype), device=x.device) for v in (eps, alpha))
    x_adv = x_start.detach().clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        x_adv = pgd_step(x_adv.detach(), grad, x, eps_t, alpha_t, norm, *bounds)
    return x_adv
