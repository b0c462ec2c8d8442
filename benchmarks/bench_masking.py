"""Masking: fastssl against MAE's code (the reference, eager and under torch.compile), time and peak memory.

    python benchmarks/bench_masking.py [--quick] [--B 256] [--providers fastssl reference] [--modes forward]

Parts, each in fp32 and bf16 (fp32 only with --quick on the CPU); the mode column reads
"<part> <forward|forward+backward>", and --modes picks the second word:
  random_masking  noise, ranks, mask and the gather of the visible tokens (MAE: argsort, argsort,
                  gather with an index expanded to [B, keep, D]); backward = the scatter into x
  unshuffle       the decoder's input from the visible tokens and the mask token, and its backward
  loss            masked MSE with norm_pix (MAE's forward_loss) and its gradient
Shapes are MAE ViT-B/16 at 224 px: L = 196 patches, D = 768, P = 16·16·3 = 768, mask ratio 0.75.

Every row's bound is a copy of the bytes its part must move (``moved_bytes``; docs/design.md,
"Masking"), timed in the same run; the target is ≥ 70 % of the copy's bandwidth (x bound ≤ 1/0.7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, sweep_main, verdict
from fastssl.reference import masking as reference

OP = "masking"
PROVIDERS = ("fastssl", "reference", "reference-compile")
PARTS = ("random_masking", "unshuffle", "loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
L, D, P, RATIO = 196, 768, 768, 0.75
# CPU targets at B = 256 (fastssl time / reference time), fp32 and bf16
TARGETS = {"random_masking forward": 0.5, "loss forward+backward": 0.5}
COPY_FRACTION = 0.7  # fastssl's bandwidth at the bytes it must move, a fraction of the copy's


def moved_bytes(part: str, backward: bool, b: int, itemsize: int, masked_rows: int) -> int:
    """The bytes a part must read and write (its bound is a copy of as many), for B = b samples.

    random_masking: read the visible rows of x, write them, write the mask and ids_restore (int64);
    its backward reads the gradient of the visible rows and writes x's gradient (zeros included).
    unshuffle: read the visible rows and ids_restore, write [B, L, D]; its backward reads the
    upstream gradient and writes the visible rows' (and the token's, negligible).
    loss: read pred and target on the ``masked_rows`` rows with weight (the others are not read) and
    the mask, write pred's gradient [B, L, P] (one sweep: the backward only scales it)."""
    keep = int(L * (1 - RATIO))
    visible, full = b * keep * D * itemsize, b * L * D * itemsize
    if part == "random_masking":
        return 2 * visible + b * L * (8 + itemsize) + (visible + full if backward else 0)
    if part == "unshuffle":
        return visible + b * L * 8 + full + (full + visible if backward else 0)
    return 2 * masked_rows * P * itemsize + b * L * itemsize + b * L * P * itemsize


def _reference_fns(compiled: bool):
    """MAE's functions, eager or compiled; random_masking draws its noise inside as MAE does."""
    keep = int(L * (1 - RATIO))

    def masking(x):
        return reference.random_masking(x, torch.rand(x.shape[0], L, device=x.device), keep)

    fns = {"random_masking": masking, "unshuffle": reference.unshuffle, "loss": reference.masked_mse_loss}
    return {k: torch.compile(f) for k, f in fns.items()} if compiled else fns


def _fns(provider: str):
    if provider == "fastssl":
        return {
            "random_masking": lambda x: fastssl.random_masking(x, RATIO),
            "unshuffle": lambda v, ids, token: fastssl.unshuffle(v, ids, token),
            "loss": lambda pred, target, mask, norm_pix: fastssl.masked_mse_loss(pred, target, mask, norm_pix=norm_pix),
        }
    if provider in ("reference", "reference-compile"):
        return _reference_fns(provider == "reference-compile")
    raise ValueError(f"unknown provider {provider!r}")


def make_case(provider: str, part: str, mode: str, b: int, dtype: torch.dtype, device: str) -> Case:
    backward = mode == "forward+backward"
    keep = int(L * (1 - RATIO))

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        fn = _fns(provider)[part]
        if part == "random_masking":
            x = torch.randn(b, L, D, device=device, generator=gen).to(dtype).requires_grad_(backward)
            grad_out = torch.randn(b, keep, D, device=device, generator=gen).to(dtype)
            if not backward:
                return lambda: fn(x)
            return lambda: torch.autograd.grad(fn(x)[0], x, grad_out)
        if part == "unshuffle":
            visible = torch.randn(b, keep, D, device=device, generator=gen).to(dtype).requires_grad_(backward)
            token = torch.zeros(D, device=device, dtype=dtype, requires_grad=backward)
            ids = torch.rand(b, L, device=device, generator=gen).argsort(1).argsort(1)
            grad_out = torch.randn(b, L, D, device=device, generator=gen).to(dtype)
            if not backward:
                return lambda: fn(visible, ids, token)
            return lambda: torch.autograd.grad(fn(visible, ids, token), (visible, token), grad_out)
        pred = torch.randn(b, L, P, device=device, generator=gen).to(dtype).requires_grad_(backward)
        target = torch.randn(b, L, P, device=device, generator=gen).to(dtype)
        mask = torch.from_numpy(_loss_mask(b)).to(device, dtype)
        if not backward:
            return lambda: fn(pred, target, mask, True)
        return lambda: torch.autograd.grad(fn(pred, target, mask, True), pred)

    masked = int(_loss_mask(b).sum()) if part == "loss" else 0
    moved = moved_bytes(part, backward, b, dtype.itemsize, masked)
    return Case(provider, f"{part} {mode}", dtype, {"B": b, "L": L, "D": D}, build, bytes_moved=moved)


def _loss_mask(b: int) -> np.ndarray:
    """The loss part's mask (1 = masked), the same draw for every provider and dtype. Drawn with
    NumPy: the cases are made in the parent process, and a torch op there could start OpenMP's
    threads, which a forked measurement process then waits on forever."""
    return (np.random.default_rng(1).random((b, L)) < RATIO).astype(np.float32)


def cases(quick: bool, device: str, batch=None, providers=PROVIDERS, modes=None) -> list[Case]:
    batch = batch or ([256] if quick else [64, 256, 1024])
    dtypes = ["float32"] if quick and device == "cpu" else list(DTYPES)
    if quick:
        providers = [p for p in providers if p != "reference-compile"]  # compile time dominates a quick run
    out = []
    for part in PARTS:
        part_modes = ["forward+backward"] if part == "loss" else ["forward", "forward+backward"]
        for mode in (m for m in part_modes if not modes or m in modes):
            for dtype in dtypes:
                for provider in providers:
                    out.extend(make_case(provider, part, mode, b, DTYPES[dtype], device) for b in batch)
    return out


def check_targets(rows: list[dict]) -> None:
    """Prints fastssl's fraction of the copy bandwidth on every row, then the CPU time targets
    (B = 256) against the rows just measured."""
    for r in rows:
        if r.get("status") == "ok" and r["provider"] == "fastssl" and r.get("x_bound") not in (None, ""):
            fraction = 1.0 / float(r["x_bound"])
            verdict_ = "PASS" if fraction >= COPY_FRACTION else "MISS"
            print(f"bandwidth {r['mode']} {r['dtype']} {r['shape']}: {100 * fraction:.0f} % of the copy's "
                  f"(want >= {100 * COPY_FRACTION:.0f} %) {verdict_}")
    ok = {(r["provider"], r["mode"], r["dtype"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    shape = f"B=256,L={L},D={D}"
    for mode, target in TARGETS.items():
        for dtype in DTYPES:
            fs, ref = ok.get(("fastssl", mode, dtype, shape)), ok.get(("reference", mode, dtype, shape))
            if fs and ref:
                print(f"target {mode} {dtype} B=256: " + verdict("time", fs["median_ms"] / ref["median_ms"], target))


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(OP, __doc__, {"B": "batch sizes"}, PROVIDERS, cases, check_targets, argv)


if __name__ == "__main__":
    main()
