"""The fp32 precision of the C++ NT-Xent kernels at small temperatures: forward and backward on fp32
rows against the same kernels on the same rows in fp64, the error's max over the fp64 result's.

    python benchmarks/profile_precision.py [--rows 600] [--D 16]

What fp32 leaves is the rounding of the logits s = x_i . x_j / tau and of lse, whose ulp grows with
1/tau (docs/design.md, "Numerics and inputs"); one row per 1/tau.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastssl import _ext
from fastssl._rows import scaled_rows

INV_TAUS = (14.0, 100.0, 333.0, 1000.0, 1e4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--D", type=int, default=16)
    args = parser.parse_args()
    if _ext._C is None:
        raise SystemExit("the C++ extension is not built (make build)")
    kernels = _ext._C
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(args.rows, args.D, generator=gen, dtype=torch.float64)
    x64, r64 = scaled_rows(a, torch.float64)
    x32, r32 = x64.float(), r64.float()
    grad = torch.rand(args.rows, generator=gen, dtype=torch.float64)
    print(f"NT-Xent C++ kernels, {args.rows} x {args.D} rows, fp32 against fp64 (max error / max |fp64|)")
    print(f"{'1/tau':>8} {'lse':>10} {'gradient':>10}")
    for inv_tau in INV_TAUS:
        lse32, lse64 = kernels.ntxent_lse_fwd_cpu(x32, r32, inv_tau), kernels.ntxent_lse_fwd_cpu(x64, r64, inv_tau)
        g32 = kernels.ntxent_lse_bwd_cpu(grad.float(), x32, r32, lse32, inv_tau)
        g64 = kernels.ntxent_lse_bwd_cpu(grad, x64, r64, lse64, inv_tau)
        err_lse = float((lse32.double() - lse64).abs().max() / lse64.abs().max())
        err_grad = float((g32.double() - g64).abs().max() / g64.abs().max())
        print(f"{inv_tau:8g} {err_lse:10.2e} {err_grad:10.2e}")


if __name__ == "__main__":
    main()
