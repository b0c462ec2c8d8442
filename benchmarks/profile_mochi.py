"""Where MoCHi's time goes: torch.profiler over `fastssl.mochi_loss` forward+backward at the
benchmark's size, and the median of 5 calls against one GEMM of the queue's shape (the bound is two).

    python benchmarks/profile_mochi.py [--dtype float32|bfloat16] [--impl auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import median_ms

B, K, D = 256, 65536, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--impl", default="auto")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=gen, dtype=dtype, requires_grad=True)
    key = torch.randn(B, D, generator=gen, dtype=dtype, requires_grad=True)
    queue = torch.randn(K, D, generator=gen, dtype=dtype)
    draws = torch.Generator().manual_seed(1)

    def step():
        loss = fastssl.mochi_loss(
            q, key, queue, n_hard=1024, n_mix=1024, n_mix_query=128, temperature=0.2, generator=draws, impl=args.impl
        )
        return torch.autograd.grad(loss, (q, key))

    a, out = torch.randn(B, D, dtype=dtype), torch.empty(B, K, dtype=dtype)
    gemm = median_ms(lambda: torch.mm(a, queue.T, out=out))
    total = median_ms(step)
    print(f"mochi_loss forward+backward: {total:.1f} ms; one [B, D] x [D, K] GEMM {gemm:.1f} ms; "
          f"x_bound (two GEMMs) {total / (2 * gemm):.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print("per 3 calls:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
