"""PGD: the fused step against the eager reference step and a torchattacks-style step, and whole
attacks on a small CNN against the eager reference loop and torchattacks; time and peak memory.

    python benchmarks/bench_pgd.py [--quick] [--B 64] [--providers fastssl reference]

Modes: step-linf, step-l2 (one step on B×3×224×224) and attack-linf, attack-l2 (10 steps of PGD on a
small CNN, B×3×32×32). A step must read x, x0 and g and write x: 4 tensors' worth of bytes, its
bound a copy of as many bytes in the same run (the L2 step's second pass finds the sample in cache;
docs/design.md, "PGD"). The achieved bandwidth of each step row and its fraction of the copy's are
printed after the table; the target is ≥ 70 % of the copy's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Case, sweep_main, verdict

OP = "pgd"
STEP_PROVIDERS = ("fastssl", "fastssl-cuda", "reference", "torchattacks-style")
ATTACK_PROVIDERS = ("fastssl", "reference", "torchattacks")
PROVIDERS = tuple(dict.fromkeys(STEP_PROVIDERS + ATTACK_PROVIDERS))
MODES = ("step-linf", "step-l2", "attack-linf", "attack-l2")
# CPU targets at B=64: fastssl step time / eager reference step time (README, "PGD")
TARGETS = {"step-linf": 0.35, "step-l2": 0.5}
COPY_FRACTION = 0.7  # the step rows' target bandwidth, a fraction of the copy's (every device)
EPS = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)}  # (ε, α)
PASSES = 4  # tensors' worth of bytes a step must move: read x, x0, g; write x
STEPS = 10


def _torchattacks_step(x_adv, grad, x_orig, eps, alpha, norm):
    """One step as torchattacks' PGD / PGDL2 write it: a chain of eager tensor ops."""
    if norm == "linf":
        adv = x_adv + alpha * grad.sign()
        delta = torch.clamp(adv - x_orig, min=-eps, max=eps)
        return torch.clamp(x_orig + delta, min=0, max=1)
    b = x_adv.shape[0]
    grad = grad / (torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10).view(b, 1, 1, 1)
    delta = x_adv + alpha * grad - x_orig
    factor = torch.min(eps / torch.norm(delta.view(b, -1), p=2, dim=1), torch.ones(b, device=x_adv.device))
    return torch.clamp(x_orig + delta * factor.view(-1, 1, 1, 1), min=0, max=1)


def _step_fn(provider: str, norm: str, x_adv, grad, x_orig):
    import fastssl
    from fastssl.reference.pgd import pgd_step

    eps, alpha = EPS[norm]
    b = x_adv.shape[0]
    if provider in ("fastssl", "fastssl-cuda"):
        impl = "cuda" if provider == "fastssl-cuda" else "auto"
        return lambda: fastssl.pgd_step_(x_adv, grad, x_orig, eps=eps, alpha=alpha, norm=norm, impl=impl)
    if provider == "reference":
        eps_b = torch.full((b,), eps, device=x_adv.device)
        alpha_b = torch.full((b,), alpha, device=x_adv.device)
        return lambda: pgd_step(x_adv, grad, x_orig, eps_b, alpha_b, norm, 0.0, 1.0)
    if provider == "torchattacks-style":
        return lambda: _torchattacks_step(x_adv, grad, x_orig, eps, alpha, norm)
    raise ValueError(f"unknown step provider {provider!r}")


def _cnn(device: str, dtype: torch.dtype) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        .to(device, dtype)
        .eval()
    )


def _attack_fn(provider: str, norm: str, model, x, y):
    import fastssl

    eps, alpha = EPS[norm]
    if provider == "fastssl":
        return lambda: fastssl.pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=STEPS, norm=norm, random_start=False)
    if provider == "reference":
        import torch.nn.functional as F

        from fastssl.reference.pgd import pgd_attack

        objective = lambda xa: F.cross_entropy(model(xa), y)
        return lambda: pgd_attack(objective, x, x, eps=eps, alpha=alpha, steps=STEPS, norm=norm)
    if provider == "torchattacks":
        import torchattacks

        cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
        attack = cls(model, eps=eps, alpha=alpha, steps=STEPS, random_start=False)
        return lambda: attack(x, y)
    raise ValueError(f"unknown attack provider {provider!r}")


def make_case(provider: str, mode: str, b: int, dtype: torch.dtype, device: str) -> Case:
    kind, norm = mode.split("-")
    size = 224 if kind == "step" else 32

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(b, 3, size, size, device=device, dtype=dtype, generator=gen)
        if kind == "step":
            grad = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
            return _step_fn(provider, norm, x.clone(), grad, x)
        y = torch.randint(0, 10, (b,), device=device, generator=gen)
        return _attack_fn(provider, norm, _cnn(device, dtype), x, y)

    shape = {"B": b, "C": 3, "H": size, "W": size}
    if kind == "step":
        moved = PASSES * b * 3 * size * size * dtype.itemsize
        return Case(provider, mode, dtype, shape, build, note=f"bytes={moved}", bytes_moved=moved)
    return Case(provider, mode, dtype, shape, build, note=f"steps={STEPS}")


def cases(quick: bool, device: str, batch=None, providers=PROVIDERS, modes=None) -> list[Case]:
    """Every mode of MODES (the harness's --modes, forward/backward, does not apply to PGD)."""
    dtype = torch.float32
    out = []
    for mode in MODES:
        if mode.startswith("step"):
            sizes = batch or ([256] if device == "cuda" else [64] if quick else [16, 64])
            names = [p for p in STEP_PROVIDERS if p in providers and (p != "fastssl-cuda" or _has_cuda_kernel(device))]
        else:
            sizes = batch or ([512] if device == "cuda" else [32] if quick else [64, 256])
            names = [p for p in ATTACK_PROVIDERS if p in providers]
        out += [make_case(p, mode, b, dtype, device) for p in names for b in sizes]
    return out


def _has_cuda_kernel(device: str) -> bool:
    from fastssl import _ext

    return device == "cuda" and _ext.CUDA_ERROR is None


def report_bandwidth(rows: list[dict]) -> None:
    """Achieved bandwidth of every step row (the bytes a step must move / time), and for fastssl's the
    target: at least COPY_FRACTION of the copy bandwidth measured in the same run."""
    for r in rows:
        if r.get("status") != "ok" or not r["mode"].startswith("step"):
            continue
        gbps = float(r["note"].removeprefix("bytes=")) / (float(r["median_ms"]) * 1e-3) / 1e9
        line = f"{r['provider']:>18} {r['mode']:<9} {r['shape']}: {gbps:.1f} GB/s at the step's traffic"
        if r.get("x_bound") not in (None, ""):
            fraction = 1.0 / float(r["x_bound"])
            line += f", {100 * fraction:.0f} % of the copy's"
            if r["provider"].startswith("fastssl"):
                line += f" (want >= {100 * COPY_FRACTION:.0f} %) {'PASS' if fraction >= COPY_FRACTION else 'MISS'}"
        print(line)


def check_targets(rows: list[dict]) -> None:
    """The bandwidth of each step row, then the CPU targets (B=64) against the rows just measured."""
    report_bandwidth(rows)
    ok = {(r["provider"], r["mode"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    shape = "B=64,C=3,H=224,W=224"
    for mode, target in TARGETS.items():
        fs, ref = ok.get(("fastssl", mode, shape)), ok.get(("reference", mode, shape))
        if fs and ref:
            print(f"target {mode} {shape}: " + verdict("time", fs["median_ms"] / ref["median_ms"], target))


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(OP, __doc__, {"B": "batch sizes"}, PROVIDERS, cases, check_targets, argv)


if __name__ == "__main__":
    main()
