"""NT-Xent: fastssl against the eager reference, the reference under torch.compile, and
pytorch-metric-learning's NTXentLoss, forward and forward+backward, time and peak memory.

    python benchmarks/bench_ntxent.py [--quick] [--B 4096 16384] [--D 128] [--providers fastssl reference]

The bound (and TFLOP/s) counts N²·D per forward and 4·N²·D per forward+backward (N = 2B; docs/design.md, "Bounds").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, check_size_targets, sweep_main
from fastssl.reference.ntxent import nt_xent_rows

OP = "ntxent"
TEMPERATURE = 0.1
PROVIDERS = ("fastssl", "reference", "reference-compile", "pml")
# (B, target: fastssl time / reference time, target: fastssl memory / reference memory), CPU fp32 D=128
TARGETS = {4096: (0.3, None), 16384: (0.25, 1 / 20)}


def _loss_fn(provider: str):
    if provider == "fastssl":
        return lambda z1, z2: fastssl.nt_xent(z1, z2, temperature=TEMPERATURE)
    if provider == "reference":
        return lambda z1, z2: fastssl.nt_xent(z1, z2, temperature=TEMPERATURE, impl="reference")
    if provider == "reference-compile":
        ref = torch.compile(lambda z, y: nt_xent_rows(z, y, 1 / TEMPERATURE).mean())
        return lambda z1, z2: ref(torch.cat([z1, z2]), torch.arange(z1.shape[0], device=z1.device).repeat(2))
    if provider == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        pml = NTXentLoss(temperature=TEMPERATURE)
        return lambda z1, z2: pml(torch.cat([z1, z2]), torch.arange(z1.shape[0], device=z1.device).repeat(2))
    raise ValueError(f"unknown provider {provider!r}")


def make_case(provider: str, mode: str, b: int, d: int, dtype: torch.dtype, device: str, min_reps: int = 3) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        z1 = torch.randn(b, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        z2 = torch.randn(b, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        loss_fn = _loss_fn(provider)
        if mode == "forward":
            return lambda: loss_fn(z1.detach(), z2.detach())
        return lambda: torch.autograd.grad(loss_fn(z1, z2), (z1, z2))

    # the work the algorithm cannot avoid (docs/design.md, "Bounds"): N²D forward (the upper triangle
    # of ZZᵀ), 4N²D with backward (the triangle again, then A·Z_J and Aᵀ·Z_I), in N × D × N products
    n = 2 * b
    flops = (1.0 if mode == "forward" else 4.0) * n * n * d
    return Case(provider, mode, dtype, {"B": b, "D": d}, build, flops=flops, gemm=(n, d, n), min_reps=min_reps)


def cases(quick: bool, device: str, batch=None, dims=None, providers=PROVIDERS, modes=None, dtype=None) -> list[Case]:
    if device == "cuda":
        dtype = dtype or torch.bfloat16
        batch = batch or ([1024, 4096, 16384] if quick else [1024, 4096, 16384, 32768, 65536, 131072, 262144])
        dims = dims or ([128] if quick else [128, 1024])
    else:
        dtype = dtype or torch.float32
        batch = batch or ([256, 1024, 4096] if quick else [256, 1024, 4096, 16384, 65536])
        dims = dims or [128]
    modes = modes or (["forward+backward"] if quick else ["forward", "forward+backward"])
    if quick:
        providers = [p for p in providers if p != "reference-compile"]  # compile time dominates a quick run
    out = []
    for d in dims:
        for mode in modes:
            for provider in providers:
                for b in batch:
                    out.append(make_case(provider, mode, b, d, dtype, device, min_reps=1 if b >= 32768 else 3))
    return out


def check_targets(rows: list[dict]) -> None:
    """Prints the CPU targets (fp32, D = 128, forward+backward against the eager reference: at
    B = 4096 at most 0.3 × its time, at B = 16384 at most 0.25 × its time and 1/20 of its peak
    memory) against the rows just measured."""
    check_size_targets(rows, TARGETS, "B")


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(
        OP,
        __doc__,
        {"B": "batch sizes (per view)", "D": "embedding dims"},
        PROVIDERS,
        cases,
        check_targets,
        argv,
        dtypes=True,
    )


if __name__ == "__main__":
    main()
