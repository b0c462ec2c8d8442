"""DINO's loss with its last layer: fastssl (fused, logits tile by tile over K) against the eager
reference (last layer + main_dino.py's loss on the materialised logits), lightly's DINOLoss on the
same logits, and the reference under torch.compile; forward+backward (gradients of the student
features and of the last layer's weight), time and peak memory.

    python benchmarks/bench_dino.py [--quick] [--K 65536 262144] [--B 64 256] [--crops 8 12] [--D 256]

`crops` counts 2 global crops and crops − 2 local ones. TFLOP/s counts the fused kernels' GEMM
work: 2·(V·B)·K·D per pass over the student tiles (one forward, three backward) and 2·(2B)·K·D per
teacher pass (two forward, one backward).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, sweep_main, verdict
from fastssl.reference import dino as reference

OP = "dino"
PROVIDERS = ("fastssl", "reference", "lightly", "compile")
# ((K, B, crops), target fastssl time / reference time, target fastssl memory / reference memory), CPU fp32 D=256
TARGETS = {(65536, 64, 8): (0.8, 0.2), (65536, 256, 12): (None, 0.1), (262144, 64, 8): (None, None)}


def _loss_fn(provider: str, crops: int):
    if provider == "fastssl":
        return lambda s, t, w, tw, c: fastssl.dino_loss(s, t, w, tw, c)
    if provider == "reference":
        return reference.dino_loss
    if provider == "compile":
        return torch.compile(reference.dino_loss)
    if provider == "lightly":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import _peers

        peer = _peers.lightly_loss().DINOLoss(teacher_temp=0.04, student_temp=0.1)

        def lightly(s, t, w, tw, c):
            peer.center = c.view(1, 1, -1)
            return peer(list((t @ tw.t()).chunk(2)), list((s @ w.t()).chunk(crops)))

        return lightly
    raise ValueError(f"unknown provider {provider!r}")


def make_case(provider: str, k: int, b: int, crops: int, d: int, dtype: torch.dtype, device: str) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, grad=False):
            x = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
            return torch.nn.functional.normalize(x, dim=1).requires_grad_(grad)

        student, teacher = rand(crops * b, d, grad=True), rand(2 * b, d)
        weight, teacher_weight = rand(k, d, grad=True), rand(k, d)
        center = 0.01 * torch.randn(k, device=device, dtype=dtype, generator=gen)
        loss_fn = _loss_fn(provider, crops)
        return lambda: torch.autograd.grad(loss_fn(student, teacher, weight, teacher_weight, center), (student, weight))

    flops = 2.0 * k * d * (4 * crops * b + 3 * 2 * b)
    shape = {"K": k, "B": b, "crops": crops, "D": d}
    return Case(provider, "forward+backward", dtype, shape, build, flops=flops, min_reps=1 if k > 65536 else 3)


def cases(quick: bool, device: str, ks=None, bs=None, crops=None, dims=None, providers=PROVIDERS, modes=None):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dims = dims or [256]
    if ks or bs or crops:
        grid = [(k, b, c) for k in ks or [65536] for b in bs or [64] for c in crops or [8]]
    else:
        grid = [(65536, 64, 8)] if quick else list(TARGETS)
    out = []
    for d in dims:
        for k, b, c in grid:
            for provider in providers:
                if provider != "fastssl" and k > 65536:
                    continue  # the target at K = 262144 is that fastssl completes
                out.append(make_case(provider, k, b, c, d, dtype, device))
    return out


def check_targets(rows: list[dict]) -> None:
    """Prints the issue's CPU targets against the rows just measured."""
    ok = {(r["provider"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    for (k, b, crops), (t_target, m_target) in TARGETS.items():
        key = f"K={k},B={b},crops={crops},D=256"
        fs, ref = ok.get(("fastssl", key)), ok.get(("reference", key))
        if not fs:
            print(f"target {key}: fastssl did not complete")
            continue
        parts = [f"fastssl completed, {fs['median_ms']:.0f} ms, {fs['peak_mem_mb']:.0f} MB peak"]
        if ref and t_target:
            parts.append(verdict("time", fs["median_ms"] / ref["median_ms"], t_target))
        if ref and m_target:
            parts.append(verdict("peak memory", fs["peak_mem_mb"] / ref["peak_mem_mb"], m_target))
        print(f"target {key}: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> list[dict]:
    sweeps = {"K": "prototypes", "B": "batch sizes", "crops": "crops per sample (2 global)", "D": "feature dims"}
    return sweep_main(OP, __doc__, sweeps, PROVIDERS, cases, check_targets, argv)


if __name__ == "__main__":
    main()
