"""Masking for masked image modelling: MAE's random masking, BEiT's block masks, ColorMAE's noise masks,
the decoder's unshuffle and the masked MSE loss: checks, dispatch, autograd.

MAE (He et al. 2022). For L patch tokens and ratio r, keep = ⌊L(1 − r)⌋ tokens with the smallest
per-sample uniform noise stay visible. With r_i the rank of token i's noise (ties in index order),

    ids_restore[i] = r_i,   mask[i] = [r_i ≥ keep],   visible[r_i] = x[i] for r_i < keep.      (1)

MAE finds r by argsort(argsort(noise)) and gathers with an index expanded to [B, keep, D]; here
`fastssl::masking_rank` computes r in one pass and `fastssl::masking_gather` moves each visible row
once. The decoder's input puts the visible rows back and the mask token elsewhere:

    out[i] = visible[r_i] if r_i < keep else mask_token                                      (2)

(`fastssl::masking_unshuffle`). (1) and (2) are adjoint: the gather's backward is an unshuffle with
a zero token, the unshuffle's backward a gather plus, for the token, the sum of the masked rows.

The loss averages the per-patch MSE over the masked patches only, with weights w = mask,

    loss = Σ_r w_r (1/P) Σ_k (p_rk − t̂_rk)² / Σ_r w_r,   ∂loss/∂p_rk = 2 w_r (p_rk − t̂_rk) / (P Σ_r w_r),   (3)

t̂ the target, or with norm_pix each patch's target normalised by its mean and unbiased variance
(+1e-6), as MAE's norm_pix_loss. `fastssl::masked_mse` returns the loss and, in the same pass, the
gradient; backward only scales it by the upstream gradient. The target is not differentiated (it is
the image, as in MAE).

BEiT's block masks (Bao et al. 2022) and ColorMAE's noise masks (Hinojosa et al. 2024) are plain
tensor code here, generated for the whole batch on the device.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastssl import _checks, _ext
from fastssl.reference import masking as reference

COLORS = ("red", "blue", "green", "purple")
# ColorMAE filters, as cut-off frequencies in cycles per patch (Nyquist = 0.5): G_f is the Gaussian
# low-pass exp(−ρ²/(2f²)) of radial frequency ρ; red = G_lo, blue = 1 − G_hi, green = G_hi − G_lo
# (band-pass), purple = 1 − green (band-stop).
NOISE_LOW, NOISE_HIGH = 0.1, 0.25
# BEiT's block placement: rounds per ⌈num_masked / min_block⌉, plus a constant (see block_masking).
BLOCK_ROUNDS_PER_BLOCK, BLOCK_ROUNDS_EXTRA = 4, 8


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
    """(1): (visible [B, P + keep, D], Σ of the masked rows [D] in fp32/fp64 if sum_masked, else [0])."""
    visible, partial = _ext.kernel(impl, x.device, cpp="masking_gather_cpu", triton="masking.masking_gather")(
        x, ids_restore, keep, num_prefix, sum_masked
    )
    return visible, partial.sum(0) if sum_masked else partial.new_empty(0)


@masking_gather.register_fake
def _(x, ids_restore, keep, num_prefix, sum_masked, impl):
    b, _, d = x.shape
    return x.new_empty(b, num_prefix + keep, d), x.new_empty(d if sum_masked else 0, dtype=_acc(x.dtype))


def _gather_setup(ctx, inputs, output):
    _, ids_restore, _, num_prefix, sum_masked, impl = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_prefix, ctx.sum_masked, ctx.impl = num_prefix, sum_masked, impl


def _gather_backward(ctx, grad_visible, grad_sum):
    (ids_restore,) = ctx.saved_tensors
    d = grad_visible.shape[-1]
    # the adjoint of (1): an unshuffle whose "mask token" is the gradient of the masked rows' sum
    token = grad_sum if ctx.sum_masked else grad_visible.new_zeros(d)
    grad_x = masking_unshuffle(
        grad_visible.contiguous(), ids_restore, token.to(grad_visible.dtype), ctx.num_prefix, ctx.impl
    )
    return grad_x, None, None, None, None, None


masking_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("fastssl::masking_unshuffle", mutates_args=())
def masking_unshuffle(visible: Tensor, ids_restore: Tensor, mask_token: Tensor, num_prefix: int, impl: str) -> Tensor:
    """(2): [B, P + L, D], visible tokens back in place and mask_token [D] (visible's dtype) elsewhere."""
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
    """(3): (loss, ∂loss/∂pred in pred's dtype if need_grad else [0]); weight [B, L] in fp32/fp64."""
    weight_sum = weight.sum()
    row_loss, grad = _ext.kernel(impl, pred.device, cpp="masked_mse_fwd_cpu", triton="masking.masked_mse_fwd")(
        pred, target, weight, weight_sum, norm_pix, need_grad
    )
    return row_loss.sum() / weight_sum, grad


@masked_mse.register_fake
def _(pred, target, weight, norm_pix, need_grad, impl):
    loss = pred.new_empty((), dtype=_acc(pred.dtype, target.dtype))
    return loss, torch.empty_like(pred) if need_grad else pred.new_empty(0)


def _mse_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.need_grad = inputs[4]


def _mse_backward(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.need_grad:  # pred did not require grad (the target and the weights are not differentiated)
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient has no graph back to pred
        raise RuntimeError("masked_mse_loss: double backward is not supported by the kernels; use impl='reference'")
    # loss.backward() passes 1: the gradient is already complete. Checked on real CPU tensors only,
    # where reading the value costs no device sync (not while tracing: FakeTensor, FunctionalTensor);
    # autograd clones it before it accumulates into .grad.
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
            not differentiated.
        mask: [B, L], 1 (True) on the patches to average over, 0 elsewhere: random_masking's mask.
            Non-negative float weights give the weighted mean Σ w·mse / Σ w.
        norm_pix: normalise each target patch by its mean and unbiased variance (eps 1e-6) first,
            as MAE's norm_pix_loss (needs P > 1).
        impl: as for :func:`random_masking`.

    Returns the loss in fp32 (fp64 for fp64 inputs); with ``impl="reference"`` MAE's own formula in
    the inputs' dtype. The kernels form the gradient in the forward sweep over the rows, in fp32,
    stored in pred's dtype (the upstream gradient then scales it: exactly when it is 1 or a power of
    two, else with one more rounding in bf16/fp16). They skip the rows whose weight is 0: those are
    never read, so a non-finite value there does not reach the loss (one in a masked patch makes the
    loss non-finite). A mask without a positive sum raises ValueError (under torch.compile the loss is
    NaN instead). The kernels
    give first derivatives only: a double backward (create_graph=True) raises RuntimeError.
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
    weight = mask.to(_acc(pred.dtype, target.dtype))
    if not torch.compiler.is_compiling():
        total, negative = torch.stack([weight.sum(), (weight < 0).any().to(weight.dtype)]).tolist()
        if negative or not total > 0:
            raise ValueError(f"mask must be non-negative with a positive sum (no masked patch?), got sum {total}")
    if impl == "reference":
        return reference.masked_mse_loss(pred, target, mask, norm_pix)
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    loss, _ = masked_mse(_dense_rows(pred), _dense_rows(target), weight, norm_pix, need_grad, impl)
    return loss


def block_masking(
    batch_size: int, grid: tuple[int, int] = (14, 14), num_masked: int = 75, *, min_block: int = 16,
    aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None, device=None,
) -> Tensor:  # fmt: skip
    """BEiT's block-wise masks for a whole batch, generated on the device: bool [B, H, W].

    As BEiT's MaskingGenerator, rectangles are placed one after another: area uniform in
    [min_block, max(min_block, budget left)], aspect ratio log-uniform in ``aspect_ratio``, height
    round(√(area·a)) and width round(√(area/a)), a uniform position in the grid; a rectangle is kept
    when it has at least ``min_block`` patches and adds between 1 and the budget left of new ones.
    Every sample makes one such try per round, all in the same tensor ops, for a fixed number of
    rounds (4·⌈num_masked/min_block⌉ + 8). Differences from BEiT: a rectangle may span the whole
    height or width, and a rounded rectangle below ``min_block`` patches is refused.

    Top-up (the count is exact): a mask still short of ``num_masked`` after the rounds (BEiT leaves
    those short) gets its missing patches from the unmasked ones with the most masked 4-neighbours,
    ties at random, so blocks grow at their edges. A block is never trimmed: tries that would
    overshoot are refused.

    Args:
        batch_size: B >= 1.
        grid: (H, W) patches.
        num_masked: patches masked in every sample, 0 <= num_masked <= H·W.
        min_block: the fewest patches a rectangle may have (BEiT: 16).
        aspect_ratio: (lo, hi) with 0 < lo <= hi.
        generator: torch.Generator for every random number (on ``device``); same seed, same masks.
        device: where the masks are made; default the generator's device, else the CPU.
    """
    b = _checks.integer("batch_size", batch_size, minimum=1)
    h, w = _grid(grid)
    n = _checks.integer("num_masked", num_masked)
    if n > h * w:
        raise ValueError(f"num_masked={n} is more than the {h}x{w} grid's {h * w} patches")
    min_block = _checks.integer("min_block", min_block, minimum=1)
    lo, hi = _aspect_ratio(aspect_ratio)
    device = _device(device, generator)
    mask, _ = _place_blocks(b, h, w, n, min_block, lo, hi, generator, device)
    return _top_up(mask, n, generator)


def noise_masking(
    batch_size: int, grid: tuple[int, int] = (14, 14), mask_ratio: float = 0.75, *, color: str = "green",
    generator: torch.Generator | None = None, device=None,
) -> Tensor:  # fmt: skip
    """ColorMAE's data-independent masks from filtered noise, made on the fly: bool [B, H, W].

    For every sample, white Gaussian noise on a (2H, 2W) canvas is filtered in the Fourier domain
    (torch.fft) by the colour's filter, a random H×W window of it is cropped, and its
    int(H·W·mask_ratio) highest values are masked (exactly that many, by top-k). Filters, with
    G_f(ρ) = exp(−ρ²/2f²) of the radial frequency ρ in cycles per patch and f_lo = 0.1, f_hi = 0.25:
    red = G_lo (low-pass: large blobs), blue = 1 − G_hi (high-pass: patches spread evenly), green =
    G_hi − G_lo (band-pass: blobs of a few patches, ColorMAE's best), purple = 1 − green (band-stop).

    Args:
        batch_size: B >= 1.
        grid: (H, W) patches.
        mask_ratio: in [0, 1).
        color: "red", "blue", "green" or "purple".
        generator, device: as for :func:`block_masking`.
    """
    b = _checks.integer("batch_size", batch_size, minimum=1)
    h, w = _grid(grid)
    ratio = _checks.fraction("mask_ratio", mask_ratio)
    _checks.choice("color", color, COLORS)
    device = _device(device, generator)
    n = int(h * w * ratio)
    field = colored_noise(b, (h, w), color, generator=generator, device=device)
    idx = field.reshape(b, h * w).topk(n, dim=1).indices
    return torch.zeros(b, h * w, dtype=torch.bool, device=device).scatter_(1, idx, True).view(b, h, w)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] images to [B, (H/p)·(W/p), p·p·C] patches, row-major, each patch's values in
    (row, column, channel) order as MAE's patchify (the target of :func:`masked_mse_loss`)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images).__name__)}")
    p = _checks.integer("patch_size", patch_size, minimum=1)
    b, c, height, width = images.shape
    if height % p or width % p:
        raise ValueError(f"patch_size={p} does not divide the images' height and width ({height}, {width})")
    h, w = height // p, width // p
    return images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> Tensor:
    """The inverse of :func:`patchify`: [B, h·w, p·p·C] to [B, C, h·p, w·p]; ``grid`` = (h, w),
    by default square (h = w = √L). C is P/(p·p)."""
    if not isinstance(patches, Tensor) or patches.dim() != 3:
        raise ValueError(f"patches must be a [B, L, P] tensor, got {getattr(patches, 'shape', type(patches).__name__)}")
    p = _checks.integer("patch_size", patch_size, minimum=1)
    b, n, dim = patches.shape
    if dim % (p * p):
        raise ValueError(f"patch_size={p}: patches of {dim} values are not p·p·C")
    if grid is None:
        h = w = math.isqrt(n)
        if h * w != n:
            raise ValueError(f"grid: {n} patches are not a square grid; pass grid=(h, w)")
    else:
        h, w = _grid(grid)
        if h * w != n:
            raise ValueError(f"grid={grid} has {h * w} patches but patches holds {n}")
    c = dim // (p * p)
    return patches.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


# -- mask generation helpers -----------------------------------------------------------------------------


def colored_noise(
    batch_size: int, grid: tuple[int, int], color: str, *, generator=None, device=None, crop: bool = True
) -> Tensor:
    """The noise noise_masking ranks: [B, H, W] fp32 windows of filtered white noise (the whole
    (2H, 2W) canvas, periodic, when ``crop`` is False)."""
    h, w = grid
    ch, cw = 2 * h, 2 * w
    white = torch.randn(batch_size, ch, cw, generator=generator, device=device)
    rho = torch.sqrt(torch.fft.fftfreq(ch, device=device)[:, None] ** 2 + torch.fft.rfftfreq(cw, device=device) ** 2)
    low, high = (torch.exp(-(rho**2) / (2 * f**2)) for f in (NOISE_LOW, NOISE_HIGH))
    filt = {"red": low, "blue": 1 - high, "green": high - low, "purple": 1 - (high - low)}[color]
    field = torch.fft.irfft2(torch.fft.rfft2(white) * filt, s=(ch, cw))
    if not crop:
        return field
    top = torch.randint(0, ch - h + 1, (batch_size, 1, 1), generator=generator, device=device)
    left = torch.randint(0, cw - w + 1, (batch_size, 1, 1), generator=generator, device=device)
    rows = top + torch.arange(h, device=device)[:, None]
    cols = left + torch.arange(w, device=device)
    return field[torch.arange(batch_size, device=device)[:, None, None], rows, cols]


def _place_blocks(b, h, w, n, min_block, lo, hi, generator, device) -> tuple[Tensor, Tensor]:
    """BEiT's rectangles, one try per sample per round: (mask [B, H, W], blocks [rounds, B, 4] int64
    holding (top, left, height, width) of each try that was kept, zeros for one refused)."""
    rounds = BLOCK_ROUNDS_PER_BLOCK * -(-n // min_block) + BLOCK_ROUNDS_EXTRA if n else 0
    mask = torch.zeros(b, h, w, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.int64, device=device)
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)
    log_lo, log_hi = math.log(lo), math.log(hi)
    blocks = []
    for _ in range(rounds):
        u = torch.rand(4, b, 1, 1, generator=generator, device=device, dtype=torch.float64)
        budget = n - count[:, None, None]
        area = min_block + u[0] * (budget.clamp(min=min_block) - min_block)
        aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
        bh = torch.round(torch.sqrt(area * aspect)).long()
        bw = torch.round(torch.sqrt(area / aspect)).long()
        top = (u[2] * (h - bh + 1)).long().clamp(min=0)
        left = (u[3] * (w - bw + 1)).long().clamp(min=0)
        rect = ((rows >= top) & (rows < top + bh)) & ((cols >= left) & (cols < left + bw))
        new = bh * bw - (rect & mask).sum((1, 2), keepdim=True)  # rect lies inside the grid when it fits
        ok = (bh <= h) & (bw <= w) & (bh * bw >= min_block) & (new > 0) & (new <= budget)
        mask |= rect & ok
        count += (new * ok).view(b)
        blocks.append(torch.cat([top, left, bh, bw], dim=1).view(b, 4) * ok.view(b, 1))
    blocks = torch.stack(blocks) if blocks else torch.zeros(0, b, 4, dtype=torch.int64, device=device)
    return mask, blocks


def _top_up(mask: Tensor, n: int, generator) -> Tensor:
    """Masks exactly n patches per sample: the missing ones among the unmasked patches with the most
    masked 4-neighbours (ties broken by uniform noise)."""
    b, h, w = mask.shape
    m = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    neighbours = m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]
    jitter = torch.rand(b, h, w, generator=generator, device=mask.device)
    score = (neighbours + jitter).masked_fill(mask, -1.0).view(b, h * w)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=mask.device).expand(b, -1))
    missing = n - mask.view(b, -1).sum(1, keepdim=True)
    return mask | (rank < missing).view(b, h, w)


# -- input helpers ---------------------------------------------------------------------------------------


def _acc(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


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


def _grid(grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (H, W), got {grid!r}")
    return _checks.integer("grid[0]", grid[0], minimum=1), _checks.integer("grid[1]", grid[1], minimum=1)


def _aspect_ratio(ratio) -> tuple[float, float]:
    if not isinstance(ratio, (tuple, list)) or len(ratio) != 2:
        raise ValueError(f"aspect_ratio must be a pair (lo, hi), got {ratio!r}")
    lo, hi = (_checks.positive("aspect_ratio", r) for r in ratio)
    if lo > hi:
        raise ValueError(f"aspect_ratio must have lo <= hi, got {ratio!r}")
    return lo, hi


def _device(device, generator) -> torch.device:
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    elif not isinstance(device, (str, torch.device, numbers.Integral)) or isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, a string or None, got {type(device).__name__}")
    device = torch.device(device)
    _checks.generator("generator", generator, device)
    return device
