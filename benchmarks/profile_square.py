"""Square's look-ahead (docs/design.md, "Square"): time, forwards and rows through the model for the
CIFAR-shaped CNN of bench_autoattack.py on its lone point that survives AutoAttack (index 7 of 8),
on three points, and on all eight; and the digits CNN on 32 points.

    python benchmarks/profile_square.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.bench_autoattack import Counted, _cifar, digits_classifier


def run(name: str, model, x, y, eps: float) -> None:
    counted = Counted(model).eval()
    start = time.perf_counter()
    _, success = fastssl.square_attack(counted, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    print(f"{name:28} {seconds:7.2f} s  forwards {counted.forwards:5}  rows {counted.rows:6}  "
          f"broken {int(success.sum())} of {len(y)}")  # fmt: skip


def main() -> None:
    model, x, y = _cifar(8)
    for idx in ([7], [2, 5, 7], list(range(8))):
        run(f"cifar points {idx}" if len(idx) < 8 else "cifar, all 8 points", model, x[idx], y[idx], 1 / 255)
    model, x, y = digits_classifier(32)
    run("digits, 32 points", model, x, y, 0.1)


if __name__ == "__main__":
    main()
