"""MoCHi: fastssl against the materialising reference (every synthetic negative built as a
[B, S, D] tensor, then the [B, 1 + K + S] logits and a cross-entropy), time and peak memory.

    python benchmarks/bench_mochi.py [--quick] [--B 256] [--K 65536] [--providers fastssl reference]

The target size is B = 256, K = 65536, D = 128, n_hard = 1024, n_mix = 1024, n_mix_query = 128
(the MoCHi paper's MoCo-v2 setting); it is the only size (the --quick set is the same). TFLOP/s
counts the queue logits' matmuls, 4·B·K·D per forward+backward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, sweep_main, verdict

OP = "mochi"
TEMPERATURE = 0.2
N_HARD, N_MIX, N_MIX_QUERY = 1024, 1024, 128
PROVIDERS = ("fastssl", "reference")
# CPU fp32, B=256 K=65536 D=128: (fastssl time / reference time, fastssl extra peak memory / reference's)
TARGET = (0.5, 1 / 4)


def make_case(provider: str, mode: str, b: int, k: int, d: int, dtype: torch.dtype, device: str) -> Case:
    impl = "auto" if provider == "fastssl" else "reference"

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        key = torch.randn(b, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        queue = torch.randn(k, d, device=device, dtype=dtype, generator=gen)
        draws = torch.Generator(device=device).manual_seed(1)

        def loss(q, key):
            return fastssl.mochi_loss(
                q, key, queue, n_hard=N_HARD, n_mix=N_MIX, n_mix_query=N_MIX_QUERY, temperature=TEMPERATURE,
                generator=draws, impl=impl,
            )  # fmt: skip

        if mode == "forward":
            return lambda: loss(q.detach(), key.detach())
        return lambda: torch.autograd.grad(loss(q, key), (q, key))

    shape = {"B": b, "K": k, "D": d, "n_hard": N_HARD, "n_mix": N_MIX, "n_mix_query": N_MIX_QUERY}
    return Case(provider, mode, dtype, shape, build, flops=4.0 * b * k * d, gemm=(b, d, k))


def cases(quick: bool, device: str, batch=None, queue=None, providers=PROVIDERS, modes=None, dtype=None) -> list[Case]:
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    modes = modes or ["forward+backward"]
    return [
        make_case(provider, mode, b, k, 128, dtype, device)
        for mode in modes
        for provider in providers
        for k in (queue or [65536])
        for b in (batch or [256])
    ]


def check_targets(rows: list[dict]) -> None:
    """Prints the CPU targets (fp32, forward+backward at the target size against the materialising
    reference: at most 0.5 × its time and 1/4 of its peak memory) against the rows just measured."""
    ok = {(r["provider"], r["mode"], r["shape"]): r for r in rows if r.get("status") == "ok"}
    t_target, m_target = TARGET
    for (provider, mode, shape), fs in ok.items():
        ref = ok.get(("reference", mode, shape))
        at_target_size = shape.startswith("B=256,K=65536,D=128,")
        if provider != "fastssl" or mode != "forward+backward" or not at_target_size or not ref:
            continue
        time_ratio, mem_ratio = fs["median_ms"] / ref["median_ms"], fs["peak_mem_mb"] / ref["peak_mem_mb"]
        print(f"target {shape}: {verdict('time', time_ratio, t_target)}; {verdict('peak memory', mem_ratio, m_target)}")


def main(argv: list[str] | None = None) -> list[dict]:
    return sweep_main(
        OP, __doc__, {"B": "batch sizes", "K": "queue lengths"}, PROVIDERS, cases, check_targets, argv, dtypes=True
    )


if __name__ == "__main__":
    main()
