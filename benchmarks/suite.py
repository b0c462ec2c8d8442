"""Runs every benchmarks/bench_<op>.py (or the ones named): `python -m fastssl bench [--quick] [ops]`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))


def run_suite(ops: list[str] | None = None, *, quick: bool = False) -> int:
    names = ops or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmarks {unknown}; available: {available()}", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== {name} ({'quick' if quick else 'full'}) ===")
        importlib.import_module(f"benchmarks.bench_{name}").main(["--quick"] if quick else [])
    return 0
