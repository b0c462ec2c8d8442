"""Masked image modelling (MAE, BEiT, ColorMAE): the public layer (docs/design.md, "Masking").

MAE's random masking, the decoder's unshuffle and the masked MSE loss are custom ops with kernels
(fastssl/ops/masking.py: checks, dispatch, autograd). BEiT's block masks, ColorMAE's noise masks and
MAE's patchify/unpatchify are plain tensor code, here: batched, on the device.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastssl import _checks
from fastssl.ops.masking import masked_mse_loss, random_masking, unshuffle

__all__ = [
    "block_masking",
    "masked_mse_loss",
    "noise_masking",
    "patchify",
    "random_masking",
    "unpatchify",
    "unshuffle",
]

COLORS = ("red", "blue", "green", "purple")
# ColorMAE's filters' cut-off frequencies in cycles per patch (Nyquist = 0.5): docs/design.md, "Masking".
NOISE_LOW, NOISE_HIGH = 0.1, 0.25
# BEiT's block placement: rounds per ⌈num_masked / min_block⌉, plus a constant (see block_masking).
BLOCK_ROUNDS_PER_BLOCK, BLOCK_ROUNDS_EXTRA = 4, 8


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
    h, w = _patch_grid(grid)
    n = _checks.integer("num_masked", num_masked)
    if n > h * w:
        raise ValueError(f"num_masked={n} is more than the {h}x{w} grid's {h * w} patches")
    # a block larger than the grid never fits: capping it there changes no mask and keeps the
    # placement's arithmetic inside int64
    min_block = min(_checks.integer("min_block", min_block, minimum=1), h * w + 1)
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
    h, w = _patch_grid(grid)
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
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    p = _checks.integer("patch_size", patch_size, minimum=1)
    b, c, height, width = images.shape
    if height % p or width % p:
        raise ValueError(f"patch_size={p} does not divide the images' height and width ({height}, {width})")
    h, w = height // p, width // p
    return images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> Tensor:
    """The inverse of :func:`patchify`: [B, h·w, p·p·C] to [B, C, h·p, w·p]; ``grid`` = (h, w),
    by default square (h = w = √L). C is P/(p·p)."""
    if not isinstance(patches, Tensor):
        raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
    if patches.dim() != 3:
        raise ValueError(f"patches must be a [B, L, P] tensor, got shape {tuple(patches.shape)}")
    p = _checks.integer("patch_size", patch_size, minimum=1)
    b, n, dim = patches.shape
    if dim % (p * p):
        raise ValueError(f"patch_size={p}: patches of {dim} values are not p·p·C")
    if grid is None:
        h = w = math.isqrt(n)
        if h * w != n:
            raise ValueError(f"grid: {n} patches are not a square grid; pass grid=(h, w)")
    else:
        h, w = _patch_grid(grid)
        if h * w != n:
            raise ValueError(f"grid={grid} has {h * w} patches but patches holds {n}")
    c = dim // (p * p)
    return patches.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


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


def _patch_grid(grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (H, W), got {grid!r}")
    h, w = _checks.integer("grid[0]", grid[0], minimum=1), _checks.integer("grid[1]", grid[1], minimum=1)
    if h * w >= 2**62:
        raise ValueError(f"grid={grid!r} has more patches than a tensor can index")
    return h, w


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
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available")
    _checks.generator("generator", generator, device)
    return device
