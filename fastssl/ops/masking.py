"""MAE's random masking, the decoder's unshuffle and the masked MSE loss: checks, dispatch, autograd.

Four custom ops (docs/design.md, "Masking", where the math is written out):

* ``fastssl::masking_rank``: r_i, the rank of patch i's noise in its sample (ties in index order),
  which is MAE's ``ids_restore = argsort(argsort(noise))``; mask_i = [r_i ≥ keep];
* ``fastssl::masking_gather``: visible[P + r_i] = x[P + i] for r_i < keep, each visible row moved once
  (and, on request, the sum of the masked rows);
* ``fastssl::masking_unshuffle``: out[P + i] = visible[P + r_i] if r_i < keep, else the mask token;
  the gather and the unshuffle are each other's adjoint, so each is the other's backward;
* ``fastssl::masked_mse``: Σ_r w_r ℓ_r / Σ_r w_r with ℓ_r a patch's mean squared error, and its
  gradient in the same sweep; backward only scales it.

The mask generators (BEiT, ColorMAE) and patchify/unpatchify are plain tensor code in fastssl/masking.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.reference import masking as reference

# -- custom ops ------------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::masking_rank", mutates_args=())
def masking_rank(noise: Tensor, impl: str) -> Tensor:
    """r_i = rank of noise[b, i] in its row (stable: ties in index order), int64 [B, L]: MAE's ids_restore."""
    return _ext.kernel(impl, noise.device, cpp="masking_rank_cpu", triton="masking.masking_rank")(noise)


@masking_rank.register_fake
def _(noise, impl):
    return noise.new_empty(noise.shape, dtype=torch.int64)


@torch.library.custom_op("fastssl::masking_gather", mutates_args=())
def masking_gather(
    x: Tensor, ids_restore: Tensor, keep: int, num_prefix: int, sum_masked: bool, impl: str
) -> tuple[Tensor, Tensor]:
    """The gather: (visible [B, P + keep, D], Σ of the masked rows [D] in fp32/fp64 if sum_masked, else [0])."""
    visible, partial = _ext.kernel(impl, x.device, cpp="masking_gather_cpu", triton="masking.masking_gather")(
        x, ids_restore, keep, num_prefix, sum_masked
    )
    return visible, partial.sum(0) if sum_masked else partial.new_empty(0)


@masking_gather.register_fake
def _(x, ids_restore, keep, num_prefix, sum_masked, impl):
    b, _, d = x.shape
    acc = _checks.accumulate_dtype(x.dtype)
    return x.new_empty(b, num_prefix + keep, d), x.new_empty(d if sum_masked else 0, dtype=acc)


def _gather_setup(ctx, inputs, output):
    _, ids_restore, _, num_prefix, sum_masked, impl = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_prefix, ctx.sum_masked, ctx.impl = num_prefix, sum_masked, impl


def _gather_backward(ctx, grad_visible, grad_sum):
    (ids_restore,) = ctx.saved_tensors
    d = grad_visible.shape[-1]
    # the gather's adjoint: an unshuffle whose "mask token" is the gradient of the masked rows' sum
    token = grad_sum if ctx.sum_masked else grad_visible.new_zeros(d)
    grad_x = masking_unshuffle(
        grad_visible.contiguous(), ids_restore, token.to(grad_visible.dtype), ctx.num_prefix, ctx.impl
    )
    return grad_x, None, None, None, None, None


masking_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("fastssl::masking_unshuffle", mutates_args=())
def masking_unshuffle(visible: Tensor, ids_restore: Tensor, mask_token: Tensor, num_prefix: int, impl: str) -> Tensor:
    """The unshuffle: [B, P + L, D], visible tokens back in place and mask_token [D] (visible's dtype) elsewhere."""
    return _ext.kernel(
        impl, visible.device, cpp="masking_unshuffle_cpu", triton="masking.masking_unshuffle"
    )(
        visible, ids_restore, mask_token, num_prefix
    )


@masking_unshuffle.register_fake
def _(visible, ids_restore, mask_token, num_prefix, impl):
    return visible.new_empty(visible.shape[0], num_prefix + ids_restore.shape[1], visible.shape[2])


def _unshuffle_setup(ctx, inputs, output):
    visible, ids_restore, _, num_prefix, impl = inputs
    ctx.save_for_backward(ids_restore)
    ctx.keep, ctx.num_prefix, ctx.impl = visible.shape[1] - num_prefix, num_prefix, impl


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    want_token = ctx.needs_input_grad[2]
    grad_visible, grad_token = masking_gather(
        grad_out.contiguous(), ids_restore, ctx.keep, ctx.num_prefix, want_token, ctx.impl
    )
    return grad_visible, None, grad_token.to(grad_out.dtype) if want_token else None, None, None


masking_unshuffle.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


@torch.library.custom_op("fastssl::masked_mse", mutates_args=())
def masked_mse(
    pred: Tensor, target: Tensor, weight: Tensor, norm_pix: bool, need_grad: bool, impl: str
) -> tuple[Tensor, Tensor]:
    """The masked MSE: (loss, ∂loss/∂pred in pred's dtype if need_grad else [0]); weight [B, L] in fp32/fp64."""
    weight_sum = weight.sum()
    row_loss, grad = _ext.kernel(impl, pred.device, cpp="masked_mse_fwd_cpu", triton="masking.masked_mse_fwd")(
        pred, target, weight, weight_sum, norm_pix, need_grad
    )
    return row_loss.sum() / weight_sum, grad


@masked_mse.register_fake
def _(pred, target, weight, norm_pix, need_grad, impl):
    loss = pred.new_empty((), dtype=_checks.accumulate_dtype(torch.promote_types(pred.dtype, target.dtype)))
    return loss, torch.empty_like(pred) if need_grad else pred.new_empty(0)


def _mse_setup(ctx, inputs, output):
    pred, target, weight, norm_pix, need_grad, impl = inputs
    ctx.need_grad, ctx.norm_pix, ctx.impl = need_grad, norm_pix, impl
    # The forward's gradient is handed to autograd once (not saved: a saved buffer given out as
    # .grad would alias one the graph still holds); a second backward computes it again from these.
    ctx.grad = output[1]
    ctx.save_for_backward(pred, target, weight)
    # the second output (the gradient itself) gets no gradient: left None rather than materialised as
    # a zero tensor of pred's size on every backward (a 154 MB fill at MAE's size)
    ctx.set_materialize_grads(False)


def _mse_backward(ctx, grad_loss, grad_grad):
    if not ctx.need_grad or grad_loss is None:  # pred needs no grad, or the loss was not used
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph back to pred
        raise RuntimeError("masked_mse_loss: double backward is not supported by the kernels; use impl='reference'")
    grad, ctx.grad = ctx.grad, None
    if grad is None:  # backward again (retain_graph=True)
        _, grad = masked_mse(*ctx.saved_tensors, ctx.norm_pix, True, ctx.impl)
    # loss.backward() passes 1: the gradient is already complete. Checked on real CPU tensors only,
    # where reading the value costs no device sync (not while tracing: FakeTensor, FunctionalTensor).
    if grad.device.type == "cpu" and type(grad_loss) is torch.Tensor and grad_loss.item() == 1.0:
        return grad, None, None, None, None, None
    return grad * grad_loss, None, None, None, None, None


masked_mse.register_autograd(_mse_backward, setup_context=_mse_setup)


# -- public functions ------------------------------------------------------------------------------------


def random_masking(
    x: Tensor, mask_ratio: float = 0.75, *, generator: torch.Generator | None = None, num_prefix_tokens: int = 0,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """MAE's per-sample random masking of a token sequence, with the gather of the visible tokens.

    Args:
        x: [B, N, D] tokens: ``num_prefix_tokens`` leading ones (a class token) and L = N − P patches.
        mask_ratio: r in [0, 1); keep = int(L·(1 − r)) patch tokens stay visible, as in MAE.
        generator: the torch.Generator (on x's device) the per-sample uniform noise is drawn from,
            ``torch.rand(B, L)`` as in MAE: the same seed gives the same masks.
        num_prefix_tokens: P leading tokens that are always kept and never counted in L.
        impl: "auto", "reference", "cpp", "triton" or "cuda" ($FASTSSL_IMPL overrides "auto").

    Returns:
        ``(x_visible, mask, ids_restore)``: x_visible [B, P + keep, D], the prefix tokens then the
        kept patches in order of increasing noise; mask [B, L] in x's dtype, 1 where a patch was
        removed; ids_restore [B, L] int64, the inverse permutation (patch i is visible when
        ids_restore[:, i] < keep), for :func:`unshuffle`. Ties in the noise are broken by index.

    x_visible is differentiable with respect to x (the backward is a scatter into zeros).
    """
    _checks.features("x", x, ndim=3)
    ratio = _checks.fraction("mask_ratio", mask_ratio)
    p = _checks.integer("num_prefix_tokens", num_prefix_tokens)
    if p >= x.shape[1]:
        raise ValueError(f"num_prefix_tokens={p} leaves no patch tokens to mask in x of shape {tuple(x.shape)}")
    _checks.generator("generator", generator, x.device)
    impl = _ext.resolve_impl(impl, x.device)
    n_patches = x.shape[1] - p
    keep = int(n_patches * (1 - ratio))
    noise = torch.rand(x.shape[0], n_patches, generator=generator, device=x.device)
    if impl == "reference":
        return reference.random_masking(x, noise, keep, p)
    ids_restore = masking_rank(noise, impl)
    visible, _ = masking_gather(_dense_rows(x), ids_restore, keep, p, False, impl)
    return visible, (ids_restore >= keep).to(x.dtype), ids_restore


def unshuffle(
    x_visible: Tensor, ids_restore: Tensor, mask_token: Tensor, *, num_prefix_tokens: int = 0, impl: str = "auto"
) -> Tensor:
    """The decoder's input: visible tokens back in their places, ``mask_token`` in the removed ones.

    Args:
        x_visible: [B, P + keep, D], the encoder's output for :func:`random_masking`'s x_visible.
        ids_restore: [B, L] integer, from :func:`random_masking`.
        mask_token: D values (shape [D], [1, D] or [1, 1, D] as MAE's parameter), any floating dtype:
            it is cast to x_visible's dtype (and its gradient back).
        num_prefix_tokens: P leading tokens of x_visible, put back in front unchanged.
        impl: as for :func:`random_masking`.

    Returns [B, P + L, D] in x_visible's dtype, differentiable with respect to x_visible and
    mask_token. ids_restore must be a permutation as random_masking returns it; it is not checked
    (that would cost a device sync): values outside [0, keep) give the mask token, never an
    out-of-bounds access.
    """
    _checks.features("x_visible", x_visible, ndim=3)
    b, n, d = x_visible.shape
    p = _checks.integer("num_prefix_tokens", num_prefix_tokens)
    ids_restore = _index("ids_restore", ids_restore, b, x_visible.device)
    n_patches = ids_restore.shape[1]
    if not 0 <= n - p <= n_patches:
        raise ValueError(
            f"x_visible has {n} tokens, which is num_prefix_tokens={p} plus {n - p} visible ones; "
            f"expected between 0 and L={n_patches} (ids_restore's length) visible ones"
        )
    if not isinstance(mask_token, Tensor):
        raise TypeError(f"mask_token must be a torch.Tensor, got {type(mask_token).__name__}")
    if not mask_token.dtype.is_floating_point:
        raise TypeError(f"mask_token must be a floating tensor, got {mask_token.dtype}")
    if mask_token.numel() != d or mask_token.shape[-1] != d:
        raise ValueError(f"mask_token must hold D={d} values (shape [D] or [1, 1, D]), got {tuple(mask_token.shape)}")
    if mask_token.device != x_visible.device:
        raise ValueError(f"mask_token is on {mask_token.device} but x_visible is on {x_visible.device}")
    impl = _ext.resolve_impl(impl, x_visible.device)
    if impl == "reference":
        return reference.unshuffle(x_visible, ids_restore, mask_token, p)
    token = mask_token.reshape(d).to(x_visible.dtype)
    return masking_unshuffle(_dense_rows(x_visible), ids_restore, token, p, impl)


def masked_mse_loss(
    pred: Tensor, target: Tensor, mask: Tensor, *, norm_pix: bool = False, impl: str = "auto"
) -> Tensor:
    """MAE's reconstruction loss: the per-patch mean squared error, averaged over the masked patches.

    Args:
        pred: [B, L, P] predicted patches (the decoder's output).
        target: [B, L, P] target patches (:func:`patchify` of the images), any floating dtype; it is
            not differentiated. With norm_pix, values beyond about 1e19 overflow the fp32 variance
            (as in MAE's code): use fp64 there.
        mask: [B, L], 1 (True) on the patches to average over, 0 elsewhere: random_masking's mask.
            Non-negative float weights give the weighted mean Σ w·mse / Σ w; the mask is not
            differentiated.
        norm_pix: normalise each target patch by its mean and unbiased variance (eps 1e-6) first,
            as MAE's norm_pix_loss (needs P > 1).
        impl: as for :func:`random_masking`.

    Returns the loss in fp32 (fp64 for fp64 inputs); with ``impl="reference"`` MAE's own formula in
    the inputs' dtype. The kernels form the gradient in the forward sweep over the rows, in fp32,
    stored in pred's dtype (the upstream gradient then scales it: exactly when it is 1 or a power of
    two, else with one more rounding in bf16/fp16). They skip the rows whose weight is 0: those are
    never read, so a non-finite value there does not reach the loss (one in a masked patch makes the
    loss non-finite). A mask with a negative, NaN or infinite weight, or whose sum is not positive and
    finite (no masked patch; fp32 weights near 3e38), raises ValueError naming ``mask`` (under
    torch.compile these are not checked: the loss is NaN instead). The kernels give first
    derivatives only: a double backward (create_graph=True) raises RuntimeError.
    """
    _checks.features("pred", pred, ndim=3)
    _checks.features("target", target, ndim=3)
    if target.shape != pred.shape or target.device != pred.device:
        raise ValueError(f"target has shape {tuple(target.shape)} on {target.device}; pred has {tuple(pred.shape)} "
                         f"on {pred.device}")  # fmt: skip
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if mask.shape != pred.shape[:2] or mask.device != pred.device:
        raise ValueError(f"mask must have shape {tuple(pred.shape[:2])} on {pred.device} (pred's [B, L]), "
                         f"got {tuple(mask.shape)} on {mask.device}")  # fmt: skip
    if not isinstance(norm_pix, bool):
        raise TypeError(f"norm_pix must be a bool, got {type(norm_pix).__name__}")
    if norm_pix and pred.shape[2] < 2:
        raise ValueError(
            f"norm_pix normalises each patch by its variance, which needs P >= 2 values; P = {pred.shape[2]}"
        )
    impl = _ext.resolve_impl(impl, pred.device)
    weight = mask.to(_checks.accumulate_dtype(torch.promote_types(pred.dtype, target.dtype)))
    if not torch.compiler.is_compiling():  # one sync: the sum and whether any weight is negative or not finite
        bad = ((weight < 0) | ~torch.isfinite(weight)).any().to(weight.dtype)
        total, bad = torch.stack([weight.sum(), bad]).tolist()
        if bad or not 0 < total < math.inf:
            raise ValueError(
                f"mask must be finite and non-negative with a positive, finite sum (no masked patch?), got sum {total}"
            )
    if impl == "reference":
        return reference.masked_mse_loss(pred, target, mask, norm_pix)
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    loss, _ = masked_mse(_dense_rows(pred), _dense_rows(target), weight, norm_pix, need_grad, impl)
    return loss


# -- input helpers ---------------------------------------------------------------------------------------


def _dense_rows(x: Tensor) -> Tensor:
    """x with a dense last dim (the kernels read rows in place through the other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _index(name: str, ids: Tensor, b: int, device: torch.device) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != b:
        raise ValueError(f"{name} must have shape ({b}, L), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but x_visible is on {device}")
    return ids.to(torch.int64).contiguous()
