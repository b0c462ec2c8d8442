"""The benchmarks through pytest-benchmark: one test per op and provider, at the quick sizes.

    make bench-pytest                                    # statistics table
    make bench-pytest PYTEST_ARGS="--benchmark-autosave" # and save the run (.benchmarks/)
    make bench-pytest PYTEST_ARGS="--benchmark-json=bench.json --benchmark-compare"

Each test times the first quick case of one provider of one benchmarks/bench_<op>.py (its smallest
size, forward+backward where the op has it), built by the same `Case.build` as the harness. The
harness (`make bench`, `python benchmarks/bench_<op>.py`) stays the source of the CSV rows and the
plots; this file only hands the same iterations to pytest-benchmark for its statistics, its JSON
and `--benchmark-compare` against a saved run. Its name does not match `test_*.py`, so `make test`
does not collect it; `make bench-pytest` names it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.harness import Case
from benchmarks.suite import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quick_cases(module) -> list[Case]:
    """The module's `cases(quick, device)`, or all its `<part>_cases(quick, device)` together."""
    if hasattr(module, "cases"):
        return module.cases(True, DEVICE)
    parts = [f for name, f in vars(module).items() if name.endswith("_cases") and callable(f)]
    return [c for part in parts for c in part(True, DEVICE)]


def _one_per_provider() -> list:
    params = []
    for op in available():
        chosen: dict[str, Case] = {}
        for case in _quick_cases(importlib.import_module(f"benchmarks.bench_{op}")):
            best = chosen.get(case.provider)
            # the first case of each provider, replaced once by its first forward+backward one
            if best is None or ("backward" in case.mode and "backward" not in best.mode):
                chosen[case.provider] = case
        params += [pytest.param(case, id=f"{op}-{provider}") for provider, case in chosen.items()]
    return params


@pytest.mark.parametrize("case", _one_per_provider())
def test_bench(benchmark, case: Case):
    benchmark.extra_info.update(mode=case.mode, dtype=str(case.dtype), shape=case.shape_str, device=DEVICE)
    fn = case.build()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else lambda: None

    def step():
        fn()
        sync()

    benchmark.pedantic(step, warmup_rounds=1, rounds=3, iterations=1)
