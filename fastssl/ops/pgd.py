"""One fused PGD step (Madry et al. 2018): checks, dispatch, torch.library registration.

For every sample b of x_adv [B, ...] (the clean input x0, the loss gradient g, radius ε_b, step
α_b and the box [lo, hi]):

    L∞:  x ← clamp(x0 + clamp(x + α·sign(g) − x0, −ε, ε), lo, hi)                             (1)
    L2:  x' = x + α·g/(‖g‖ + 1e-10),  δ = x' − x0,  x ← clamp(x0 + min(1, ε/‖δ‖)·δ, lo, hi)    (2)

(torchattacks' PGD and PGDL2, in the same order of operations). The step is named `pgd_step` in
every layer (docs/design.md, "PGD"): the custom op `fastssl::pgd_step` (:func:`pgd_step` here),
which mutates x_adv, and :func:`pgd_step_`, its checked public form (a trailing underscore for
in place, as torch's `add_`); `reference.pgd.pgd_step`; the kernels `pgd_step_cpu`, `pgd_step_cuda`
and `kernels/pgd.py` `pgd_step`: the C++ kernel (csrc/cpu/pgd.cpp) on CPU tensors, the
Triton kernel (kernels/pgd.py) on CUDA tensors, and the CUDA C++ kernel (csrc/cuda/pgd.cu) with
impl="cuda" (not the default until a GPU run shows it correct and faster). Each is one pass over
memory for (1) and two for (2), where eager PyTorch makes a dozen or more.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.reference import pgd as reference

NORMS = ("linf", "l2")


@torch.library.custom_op("fastssl::pgd_step", mutates_args=("x_adv",))
def pgd_step(
    x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor, norm: str, lo: float, hi: float, impl: str
) -> None:
    """Unchecked step (1)/(2) on x_adv in place; eps, alpha: [B] in x's accumulation dtype."""
    if impl == "reference":
        x_adv.copy_(reference.pgd_step(x_adv, grad, x_orig, eps, alpha, norm, lo, hi))
        return
    kernel = _ext.kernel(impl, x_adv.device, cpp="pgd_step_cpu", cuda="pgd_step_cuda", triton="pgd.pgd_step")
    # the kernels read [B, n] rows: a non-contiguous x_adv is stepped in a copy and written back
    work = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
    args = (work, grad.contiguous(), x_orig.contiguous(), eps, alpha, norm == "l2", lo, hi)
    if impl == "cuda":  # the .cu kernels take torch's current stream as an integer (see Makefile, cuda-check)
        args += (torch.cuda.current_stream(x_adv.device).cuda_stream,)
    kernel(*args)
    if work is not x_adv:
        x_adv.copy_(work)


@pgd_step.register_fake
def _(x_adv, grad, x_orig, eps, alpha, norm, lo, hi, impl):
    return None


def pgd_step_(
    x_adv: Tensor,
    grad: Tensor,
    x_orig: Tensor,
    *,
    eps: float | Tensor,
    alpha: float | Tensor,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    impl: str = "auto",
) -> Tensor:
    """One projected-gradient step on ``x_adv`` in place, fused into one pass (two for L2); returns ``x_adv``.

    Args:
        x_adv: [B, ...] the current adversarial examples (B samples of any shape), updated in place.
        grad: gradient of the loss to maximise at ``x_adv``, same shape, dtype and device.
        x_orig: the clean inputs, same shape, dtype and device.
        eps: radius ε ≥ 0 of the ball around ``x_orig``: a number, or a [B] tensor (one per sample).
        alpha: step size α > 0, a number or a [B] tensor.
        norm: "linf" (sign step, projection on the ε-box) or "l2" (step along g/(‖g‖ + 1e-10),
            projection on the ε-ball of each sample).
        bounds: (lo, hi) the valid input range, or None for no clamp.
        impl: "auto", "reference", "cpp", "triton" or "cuda"; $FASTSSL_IMPL overrides "auto".

    The arithmetic is fp32 (fp64 for fp64 input) and the result is rounded to x_adv's dtype once.
    A NaN in ``grad`` gives NaN in the result (the element for L∞, the sample for L2), where
    ``torch.sign`` would step by 0. ``x_orig`` is not checked to lie inside ``bounds``.
    Tensor-valued eps/alpha are checked with one device sync (skipped under torch.compile).
    """
    _checks.batch("x_adv", x_adv)
    # 1: some elements share memory (expanded, stride 0); not traceable, so eager only
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(x_adv) == 1:
        raise ValueError(
            f"x_adv is updated in place, so its elements must not share memory; got strides {x_adv.stride()} "
            "(an expanded tensor?): pass x_adv.clone()"
        )
    for name, t in (("grad", grad), ("x_orig", x_orig)):
        _checks.batch(name, t)
        _checks.like(name, t, "x_adv", x_adv)
    eps_b, alpha_b = step_sizes(x_adv, eps, alpha)
    _checks.choice("norm", norm, NORMS)
    lo, hi = _checks.interval("bounds", bounds)
    impl = _ext.resolve_impl(impl, x_adv.device)
    with torch.no_grad():  # a step is not differentiated; x_adv may be a leaf that requires grad
        pgd_step(x_adv, grad, x_orig, eps_b, alpha_b, norm, lo, hi, impl)
    return x_adv


def step_sizes(x: Tensor, eps, alpha) -> tuple[Tensor, Tensor]:
    """eps (≥ 0) and alpha (> 0) as [B] tensors in x's accumulation dtype on its device."""
    eps_b = _checks.per_sample("eps", eps, x)
    alpha_b = _checks.per_sample("alpha", alpha, x, strict=True)
    return eps_b, alpha_b
