"""DINO's loss with its last layer: fastssl (fused, logits tile by tile over K) against the eager
reference (last layer + main_dino.py's loss on the materialised logits), lightly's DINOLoss on the
same logits, and the reference under torch.compile; forward+backward (gradients of the student
features and of the last layer's weight), time and peak memory.

    python benchmarks/bench_dino.py [--quick] [--K 65536 262144] [--B 64 256] [--crops 8 12] [--D 256]
    python benchmarks/bench_dino.py --loss ibot [--M 4096] [--K 65536] [--D 256]
    python benchmarks/bench_dino.py --loss swav [--K 3000] [--B 256] [--crops 8] [--Q 3840] [--D 256]

`--loss ibot`: `ibot_loss` on M masked tokens (rows op "dino_ibot"); `--loss swav`: `swav_loss` with
2 assigned crops and a Q-row queue (op "dino_swav"); each with its eager reference and the reference
under torch.compile, forward+backward with the last layer (prototypes), fp32 on the CPU.

`crops` counts 2 global crops and crops − 2 local ones. TFLOP/s counts the fused kernels' GEMM
work: 2·(V·B)·K·D per pass over the student tiles (one forward, three backward) and 2·(2B)·K·D per
teacher pass (two forward, one backward).
"""

from __future__ import annotations

import argparse
import itertools
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
    reps = 1 if k > 65536 else 3
    return Case(provider, "forward+backward", dtype, shape, build, flops=flops, gemm=(crops * b, d, k), min_reps=reps)


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


# -- iBOT and SwAV --------------------------------------------------------------------------------------

OTHER_PROVIDERS = ("fastssl", "reference", "compile")
# (sizes, target fastssl time / reference time, target fastssl memory / reference memory): the issue
# gives the sizes; the DINO targets are the ones to meet at them
IBOT_TARGETS = {(4096, 65536, 256): (0.8, 0.2)}
SWAV_TARGETS = {(3000, 256, 8, 3840, 256): (0.8, 0.2)}


def _rand_unit(gen, *shape, device, dtype, grad=False):
    x = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    return torch.nn.functional.normalize(x, dim=-1).requires_grad_(grad)


def _provider_fn(provider: str, fused, eager):
    """The fused op, its eager reference, or the reference under torch.compile."""
    if provider == "compile":
        return torch.compile(eager)
    return fused if provider == "fastssl" else eager


def ibot_case(provider: str, m: int, k: int, d: int, dtype: torch.dtype, device: str) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        student, teacher = (
            _rand_unit(gen, m, d, device=device, dtype=dtype, grad=True),
            _rand_unit(gen, m, d, device=device, dtype=dtype),
        )
        weight, teacher_weight = (
            _rand_unit(gen, k, d, device=device, dtype=dtype, grad=True),
            _rand_unit(gen, k, d, device=device, dtype=dtype),
        )
        center = 0.01 * torch.randn(k, device=device, dtype=dtype, generator=gen)
        token_weights = torch.full((m,), 16.0 / m, device=device, dtype=dtype)  # 16 images, equal masks
        loss_fn = _provider_fn(provider, fastssl.ibot_loss, reference.ibot_loss)

        def step():
            loss = loss_fn(student, teacher, weight, teacher_weight, center, token_weights=token_weights, n_images=16)
            return torch.autograd.grad(loss, (student, weight))

        return step

    flops = 2.0 * k * d * (4 * m + 3 * m)  # fused: 4 student passes, 3 teacher passes
    reps = 1 if m * k >= 2**28 else 3  # tens of seconds a step at M = 4096, K = 65536 (no warm-up then)
    shape = {"M": m, "K": k, "D": d}
    return Case(provider, "forward+backward", dtype, shape, build, flops=flops, gemm=(m, d, k), min_reps=reps)


def swav_case(provider: str, k: int, b: int, crops: int, q: int, d: int, dtype: torch.dtype, device: str) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        z = _rand_unit(gen, crops * b, d, device=device, dtype=dtype, grad=True)
        prototypes = _rand_unit(gen, k, d, device=device, dtype=dtype, grad=True)
        queue = _rand_unit(gen, 2, q, d, device=device, dtype=dtype)
        loss_fn = _provider_fn(provider, fastssl.swav_loss, reference.swav_loss)
        return lambda: torch.autograd.grad(loss_fn(z, prototypes, n_crops=crops, queue=queue), (z, prototypes))

    sinkhorn = 2 * (b + q) * (2 * 3 + 2)  # rows × Sinkhorn passes (max, total, 2 per iteration), per assigned crop
    flops = 2.0 * k * d * (4 * crops * b + 2 * b + sinkhorn)
    shape = {"K": k, "B": b, "crops": crops, "Q": q, "D": d}
    return Case(provider, "forward+backward", dtype, shape, build, flops=flops, gemm=(crops * b, d, k), min_reps=3)


def other_cases(loss: str):
    def make(quick, device, *sizes):
        *sizes, providers, _modes = sizes
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        base = next(iter(IBOT_TARGETS if loss == "ibot" else SWAV_TARGETS))
        if quick:  # a tenth of the rows (tokens, samples): seconds on a CPU
            base = (base[0] // 10, *base[1:]) if loss == "ibot" else (base[0], base[1] // 10, *base[2:])
        # every combination of the sizes given, the target's for the rest
        grid = itertools.product(*[given or [default] for given, default in zip(sizes, base, strict=True)])
        make_case = ibot_case if loss == "ibot" else swav_case
        return [make_case(p, *g, dtype, device) for g in grid for p in providers]

    return make


def other_targets(loss: str):
    def check(rows: list[dict]) -> None:
        ok = {(r["provider"], r["shape"]): r for r in rows if r.get("status") == "ok"}
        targets, names = (IBOT_TARGETS, "MKD") if loss == "ibot" else (SWAV_TARGETS, ("K", "B", "crops", "Q", "D"))
        for key, (t_target, m_target) in targets.items():
            shape = ",".join(f"{n}={v}" for n, v in zip(names, key, strict=True))
            fs, ref = ok.get(("fastssl", shape)), ok.get(("reference", shape))
            if not (fs and ref):
                print(f"target {loss} {shape}: fastssl and the reference not both measured")
                continue
            parts = [verdict("time", fs["median_ms"] / ref["median_ms"], t_target)]
            parts.append(verdict("peak memory", fs["peak_mem_mb"] / ref["peak_mem_mb"], m_target))
            print(f"target {loss} {shape}: " + "; ".join(parts))

    return check


def main(argv: list[str] | None = None) -> list[dict]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--loss", choices=["dino", "ibot", "swav"], default="dino")
    known, rest = pre.parse_known_args(argv)
    if known.loss == "ibot":
        sweeps = {"M": "masked tokens", "K": "prototypes", "D": "feature dims"}
    elif known.loss == "swav":
        sweeps = {"K": "prototypes", "B": "batch sizes", "crops": "crops (2 assigned)", "Q": "queue rows", "D": "dims"}
    else:
        sweeps = {"K": "prototypes", "B": "batch sizes", "crops": "crops per sample (2 global)", "D": "feature dims"}
        return sweep_main(OP, __doc__, sweeps, PROVIDERS, cases, check_targets, rest)
    op = f"{OP}_{known.loss}"
    return sweep_main(op, __doc__, sweeps, OTHER_PROVIDERS, other_cases(known.loss), other_targets(known.loss), rest)


if __name__ == "__main__":
    main()
