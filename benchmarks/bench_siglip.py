"""SigLIP: fastssl against the eager reference (the whole M×N logits), open_clip's SigLipLoss on the
whole batch, and open_clip chunked (its distributed variant's blocks run in one process: each chunk
of images against its own texts, then against every other chunk's texts as negatives only, every
block kept for backward), forward+backward, time and peak memory.

    python benchmarks/bench_siglip.py [--quick] [--M 4096 16384 65536] [--D 256] [--providers fastssl reference]

TFLOP/s counts the GEMM work of the fused kernels: 2·M²·D per pass over the tiles, one forward and
three with backward (the scores, A·Y and Aᵀ·X, all in the forward for a mean or sum loss).
On the CPU the eager providers stop at M = 16384
(their M×M buffers are 1 GiB each there); fastssl goes on to 65536.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, sweep_main, verdict

ROOT = Path(__file__).resolve().parent.parent

OP = "siglip"
SCALE, BIAS = 10.0, -10.0
CHUNK = 4096  # rows per chunk of the chunked open_clip provider
PROVIDERS = ("fastssl", "reference", "open_clip", "open_clip-chunked")
EAGER_CPU_MAX = 16384
# CPU fp32, D = 256, M = 16384: fastssl's time and peak memory as multiples of the eager reference's
TARGET_M, TARGET_TIME, TARGET_MEMORY = 16384, 0.5, 0.05


def _open_clip_loss():
    sys.path.insert(0, str(ROOT / "tests"))
    from _peers import peer  # open_clip's loss module without its package's torchvision imports

    return peer("open_clip.loss").SigLipLoss()


def _loss_fn(provider: str):
    if provider in ("fastssl", "reference"):
        impl = "auto" if provider == "fastssl" else "reference"
        return lambda x, y, s, b: fastssl.siglip_loss(x, y, scale=s, bias=b, impl=impl)
    loss = _open_clip_loss()
    if provider == "open_clip":
        return lambda x, y, s, b: loss(F.normalize(x, dim=1), F.normalize(y, dim=1), s, b)

    def chunked(x, y, s, b):
        xs, ys = F.normalize(x, dim=1).split(CHUNK), F.normalize(y, dim=1).split(CHUNK)
        total = sum(
            loss._loss(xr, yo, s, b, negative_only=o != r) for r, xr in enumerate(xs) for o, yo in enumerate(ys)
        )
        return total / len(xs)

    return chunked


def make_case(provider: str, mode: str, m: int, d: int, dtype: torch.dtype, device: str) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(m, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        y = torch.randn(m, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        s = torch.tensor(SCALE, device=device, requires_grad=True)
        b = torch.tensor(BIAS, device=device, requires_grad=True)
        loss_fn = _loss_fn(provider)
        if mode == "forward":
            return lambda: loss_fn(x.detach(), y.detach(), s.detach(), b.detach())
        return lambda: torch.autograd.grad(loss_fn(x, y, s, b), (x, y, s, b))

    passes = 1 if mode == "forward" else 3  # scores, A·Y, Aᵀ·X (docs/design.md, "Bounds")
    min_reps = 1 if m >= 16384 else 3  # minutes per iteration on the CPU: no warm-up
    flops = 2.0 * passes * m * m * d
    return Case(provider, mode, dtype, {"M": m, "D": d}, build, flops=flops, gemm=(m, d, m), min_reps=min_reps)


def cases(quick: bool, device: str, sizes=None, dims=None, providers=PROVIDERS, modes=None) -> list[Case]:
    if device == "cuda":
        dtype = torch.bfloat16
        sizes = sizes or ([4096, 16384, 65536] if quick else [4096, 16384, 65536, 131072, 262144])
    else:
        dtype = torch.float32
        sizes = sizes or ([1024, 4096] if quick else [4096, 16384, 65536])
    dims = dims or [256]
    modes = modes or ["forward+backward"]
    out = []
    for d in dims:
        for mode in modes:
            for provider in providers:
                for m in sizes:
                    if device == "cpu" and provider != "fastssl" and m > EAGER_CPU_MAX:
                        continue
                    out.append(make_case(provider, mode, m, d, dtype, device))
    return out


def check_targets(rows: list[dict]) -> None:
    """Prints the issue's CPU targets (fp32, D = 256) against the rows just measured."""
    ok = {(r["provider"], r["shape"]): r for r in rows if r.get("status") == "ok" and r["mode"] == "forward+backward"}
    key = f"M={TARGET_M},D=256"
    fs, ref, chunked = (ok.get((p, key)) for p in ("fastssl", "reference", "open_clip-chunked"))
    if fs and ref:
        print(f"target M={TARGET_M}: " + verdict("time", fs["median_ms"] / ref["median_ms"], TARGET_TIME) + "; "
              + verdict("peak memory", fs["peak_mem_mb"] / ref["peak_mem_mb"], TARGET_MEMORY))  # fmt: skip
    if fs and chunked:
        ratio = fs["median_ms"] / chunked["median_ms"]
        print(
            f"target M={TARGET_M}: time vs open_clip chunked {ratio:.3g} x (want < 1) {'PASS' if ratio < 1 else 'MISS'}"
        )
    for r in rows:
        if r["provider"] == "fastssl" and r["shape"].startswith("M=65536"):
            print(
                f"target M=65536: fastssl {r['status']}"
                + (f", {r['peak_mem_mb']:.0f} MB peak" if r["status"] == "ok" else "")
            )


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(
        OP, __doc__, {"M": "batch sizes (rows per tower)", "D": "embedding dims"}, PROVIDERS, cases, check_targets, argv
    )


if __name__ == "__main__":
    main()
