"""Where NT-Xent's time goes against its bound: the C++ kernels alone (the forward's log-sum-exp, the
backward's weighted sums) and the PyTorch around them (row scaling, positives, autograd), each a
median of 7 calls, against the [N, D] x [D, N] GEMM of the same dtype timed in the same run.

    python benchmarks/profile_ntxent.py [--B 4096] [--D 128] [--dtype float32|bfloat16]

The bound (docs/design.md, "Bounds") is half a GEMM for the forward (the upper triangle), 1.5 GEMMs
for the backward (the triangle again, then A·X_J and Aᵀ·X_I), two for both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import median_ms
from fastssl._rows import scaled_rows

REPS = 7  # timed calls per median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype, b, d = getattr(torch, args.dtype), args.B, args.D
    n, inv_tau = 2 * b, 10.0
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(dtype)
    x, r = scaled_rows(z, torch.float32)
    a, w, out = torch.randn(n, d).to(dtype), torch.randn(d, n).to(dtype), torch.empty(n, n, dtype=dtype)
    gemm = median_ms(lambda: torch.mm(a, w, out=out), REPS)
    lse = torch.ops.fastssl.ntxent_lse(x, r, inv_tau, "cpp")
    grad_lse = torch.rand(n, generator=gen)
    forward = median_ms(lambda: torch.ops.fastssl.ntxent_lse(x, r, inv_tau, "cpp"), REPS)
    backward = median_ms(lambda: torch.ops.fastssl.ntxent_lse_backward(grad_lse, x, r, lse, inv_tau, "cpp"), REPS)
    z1, z2 = z[:b].clone().requires_grad_(), z[b:].clone().requires_grad_()
    total = median_ms(lambda: torch.autograd.grad(fastssl.nt_xent(z1, z2, temperature=1 / inv_tau), (z1, z2)), REPS)
    print(f"NT-Xent B={b} D={d} {args.dtype}, {torch.get_num_threads()} threads; GEMM {gemm:.1f} ms")
    print(f"  kernel forward   {forward:7.1f} ms  {forward / (gemm / 2):.2f} x its bound (half a GEMM)")
    print(f"  kernel backward  {backward:7.1f} ms  {backward / (1.5 * gemm):.2f} x its bound (1.5 GEMMs)")
    print(f"  around them      {total - forward - backward:7.1f} ms  (row scaling, positives, autograd)")
    print(f"  nt_xent fwd+bwd  {total:7.1f} ms  {total / (2 * gemm):.2f} x the bound (two GEMMs)")


if __name__ == "__main__":
    main()
