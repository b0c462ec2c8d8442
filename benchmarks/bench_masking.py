"""Masking: fastssl against MAE's code (the reference, eager and under torch.compile), time and peak memory.

    python benchmarks/bench_masking.py [--quick] [--B 256] [--providers fastssl reference] [--modes forward]

Parts, each in fp32 and bf16 (fp32 only with --quick on the CPU); the mode column reads
"<part> <forward|forward+backward>", and --modes picks the second word:
  random_masking  noise, ranks, mask and the gather of the visible tokens (MAE: argsort, argsort,
                  gather with an index expanded to [B, keep, D]); backward = the scatter into x
  unshuffle       the decoder's input from the visible tokens and the mask token, and its backward
  loss            masked MSE with norm_pix (MAE's forward_loss) and its gradient
Shapes are MAE ViT-B/16 at 224 px: L = 196 patches, D = 768, P = 16·16·3 = 768, mask ratio 0.75.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        fn = _fns(provider)[part]
        keep = int(L * (1 - RATIO))
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
        mask = (torch.rand(b, L, device=device, generator=gen) < RATIO).to(dtype)
        if not backward:
            return lambda: fn(pred, target, mask, True)
        return lambda: torch.autograd.grad(fn(pred, target, mask, True), pred)

    return Case(provider, f"{part} {mode}", dtype, {"B": b, "L": L, "D": D}, build)


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
    """Prints the CPU targets (B = 256) against the rows just measured."""
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
