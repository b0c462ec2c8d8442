"""InfoNCE / CLIP (symmetric): fastssl against the eager reference (CLIP's logits matrix) and, on a
GPU, Inf-CL's `cal_inf_loss` (both directions), forward and forward+backward, time and peak memory.

    python benchmarks/bench_info_nce.py [--quick] [--M 4096 8192] [--D 128] [--providers fastssl reference]

TFLOP/s counts the GEMM work of the fused kernels: 2·M²·D per pass over the tiles, one pass
forward and three backward (scores again, A·K and Aᵀ·Q).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, check_size_targets, sweep_main

OP = "info_nce"
TEMPERATURE = 0.07
PROVIDERS = ("fastssl", "reference", "inf-cl")
# (M, target: fastssl time / reference time, target: fastssl memory / reference memory), CPU fp32 D=128
TARGETS = {8192: (0.4, None), 32768: (None, 1 / 20)}


def _loss_fn(provider: str, d: int):
    if provider in ("fastssl", "reference"):
        impl = "auto" if provider == "fastssl" else "reference"
        return lambda q, k: fastssl.info_nce(q, k, temperature=TEMPERATURE, symmetric=True, impl=impl)
    if provider == "inf-cl":
        from inf_cl import cal_inf_loss

        head_dim = min(d, 256)  # Inf-CL splits D into heads of 16..256 and sums their dot products
        scale = torch.tensor(1 / TEMPERATURE, device="cuda")

        def clip_loss(q, k):
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            return 0.5 * (
                cal_inf_loss(q, k, scale=scale, head_dim=head_dim) + cal_inf_loss(k, q, scale=scale, head_dim=head_dim)
            )

        return clip_loss
    raise ValueError(f"unknown provider {provider!r}")


def make_case(provider: str, mode: str, m: int, d: int, dtype: torch.dtype, device: str, min_reps: int = 3) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(m, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        k = torch.randn(m, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        loss_fn = _loss_fn(provider, d)
        if mode == "forward":
            return lambda: loss_fn(q.detach(), k.detach())
        return lambda: torch.autograd.grad(loss_fn(q, k), (q, k))

    passes = 1 if mode == "forward" else 4
    flops = 2.0 * passes * m * m * d
    return Case(provider, mode, dtype, {"M": m, "D": d}, build, flops=flops, gemm=(m, d, m), min_reps=min_reps)


def cases(quick: bool, device: str, sizes=None, dims=None, providers=PROVIDERS, modes=None, dtype=None) -> list[Case]:
    if device == "cuda":
        dtype = dtype or torch.bfloat16
        sizes = sizes or ([4096, 16384, 65536] if quick else [4096, 16384, 65536, 131072, 262144])
        dims = dims or ([128] if quick else [128, 512])
    else:
        dtype = dtype or torch.float32
        providers = [p for p in providers if p != "inf-cl"]  # Inf-CL's kernels need CUDA
        sizes = sizes or ([1024, 4096] if quick else [1024, 4096, 8192, 16384, 32768])
        dims = dims or ([128] if quick else [128, 512])
    modes = modes or (["forward+backward"] if quick else ["forward", "forward+backward"])
    out = []
    for d in dims:
        for mode in modes:
            for provider in providers:
                for m in sizes:
                    out.append(make_case(provider, mode, m, d, dtype, device, min_reps=1 if m >= 32768 else 3))
    return out


def check_targets(rows: list[dict]) -> None:
    """Prints the CPU targets (fp32, D = 128, forward+backward against the eager reference: at
    M = 8192 at most 0.4 × its time, at M = 32768 at most 1/20 of its peak memory) against the rows
    just measured."""
    check_size_targets(rows, TARGETS, "M")


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(
        OP,
        __doc__,
        {"M": "batch sizes (rows per tower)", "D": "embedding dims"},
        PROVIDERS,
        cases,
        check_targets,
        argv,
        dtypes=True,
    )


if __name__ == "__main__":
    main()
