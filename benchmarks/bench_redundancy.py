"""Barlow Twins and VICReg: fastssl (Frobenius terms through N×N Gram matrices when N < D) against
the eager reference (the D×D cross-correlation and covariance, docs/design.md, "Redundancy
reduction") and lightly's BarlowTwinsLoss and VICRegLoss, forward+backward, time and peak memory.

    python benchmarks/bench_redundancy.py [--quick] [--N 1024] [--D 8192] [--providers fastssl lightly]

TFLOP/s counts the fused path's GEMM work, 8·N²·D (two Gram matrices forward, two N×N by N×D
products backward) for N < D.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, sweep_main, verdict
from fastssl.reference import redundancy as reference

ROOT = Path(__file__).resolve().parent.parent
OP = "redundancy"
PROVIDERS = ("fastssl", "reference", "lightly")
LOSSES = ("barlow", "vicreg")
# CPU fp32 at N = 1024, D = 8192: fastssl no slower than lightly (time ratio ≤ 1)
TARGET = "N=1024,D=8192"


def _lightly(loss: str):
    sys.path.insert(0, str(ROOT / "tests"))
    from _peers import peer  # lightly's loss modules without its package's imports

    if loss == "barlow":
        return peer("lightly.loss.barlow_twins_loss").BarlowTwinsLoss()
    return peer("lightly.loss.vicreg_loss").VICRegLoss()


def _loss_fn(provider: str, loss: str):
    if provider == "fastssl":
        return fastssl.barlow_twins_loss if loss == "barlow" else fastssl.vicreg_loss
    if provider == "reference":
        return reference.barlow_twins if loss == "barlow" else reference.vicreg
    return _lightly(loss)


def make_case(provider: str, loss: str, n: int, d: int, dtype: torch.dtype, device: str) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        z1 = torch.randn(n, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        z2 = torch.randn(n, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        fn = _loss_fn(provider, loss)
        return lambda: torch.autograd.grad(fn(z1, z2), (z1, z2))

    shape = {"N": n, "D": d, "loss": loss}
    return Case(provider, "forward+backward", dtype, shape, build, flops=8.0 * n * n * d, gemm=(n, d, n))


def cases(quick: bool, device: str, sizes=None, dims=None, providers=PROVIDERS, modes=None) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = sizes or ([256] if quick else [1024])
    dims = dims or ([2048] if quick else [8192])
    return [
        make_case(provider, loss, n, d, dtype, device)
        for loss in LOSSES
        for d in dims
        for provider in providers
        for n in sizes
    ]


def check_targets(rows: list[dict]) -> None:
    ok = {(r["provider"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    for loss in LOSSES:
        key = f"{TARGET},loss={loss}"
        fs, peer_row = ok.get(("fastssl", key)), ok.get(("lightly", key))
        if fs and peer_row:
            t, m = fs["median_ms"] / peer_row["median_ms"], fs["peak_mem_mb"] / max(peer_row["peak_mem_mb"], 1e-9)
            print(f"target {key}: vs lightly " + verdict("time", t, 1.0) + f"; peak memory {m:.3g} x lightly's")


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(OP, __doc__, {"N": "batch sizes", "D": "embedding dims"}, PROVIDERS, cases, check_targets, argv)


if __name__ == "__main__":
    main()
