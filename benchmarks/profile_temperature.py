"""NT-Xent and InfoNCE forward+backward at τ = 0.1 (the fixed shift), 0.02 and 0.003 (the row shift,
docs/design.md "Tile kernels"), fp32 and bf16, on the CPU: the median of `reps` calls.

    python benchmarks/profile_temperature.py [--B 4096] [--D 128] [--reps 5]
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

TEMPERATURES = (0.1, 0.02, 0.003)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4096)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(args.B, args.D, generator=gen), torch.randn(args.B, args.D, generator=gen)
    print(f"B={args.B} D={args.D}, forward+backward, ms at tau = " + " / ".join(f"{t:g}" for t in TEMPERATURES))
    for dtype in (torch.float32, torch.bfloat16):
        qq, kk = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
        for fn in (fastssl.nt_xent, fastssl.info_nce):
            times = [
                median_ms(lambda fn=fn, t=t, a=qq, b=kk: fn(a, b, temperature=t).backward(), args.reps)
                for t in TEMPERATURES
            ]
            row = " ".join(f"{x:8.1f}" for x in times)
            print(f"{fn.__name__:9} {dtype!s:15} {row}  ratio {times[-1] / times[0]:.2f}")


if __name__ == "__main__":
    main()
