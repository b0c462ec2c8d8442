"""Test set-up: Triton's interpreter for impl="triton" on CPU tensors, and the `gpu` marker.

Triton chooses between its interpreter and the compiler once per process, before it is imported
(TRITON_INTERPRET). Without CUDA the interpreter is chosen here, so every CPU test runs. With CUDA
the compiled kernels are kept for the GPU tests, and a CPU test that reaches a Triton kernel
(fastssl/_ext.py raises its interpreter hint) is skipped and its id written to
$FASTSSL_INTERPRETER_TESTS: `make test` then runs exactly those ids again in a second process with
CUDA hidden ($FASTSSL_ONLY_TESTS names that file), where the interpreter is chosen.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastssl import _ext

torch.set_num_threads(min(2, torch.get_num_threads()))

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    only = os.environ.get("FASTSSL_ONLY_TESTS")
    if only:
        wanted = set(open(only).read().split("\n")) if os.path.exists(only) else set()
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in wanted])
        items[:] = [i for i in items if i.nodeid in wanted]
    if not torch.cuda.is_available():
        reason = "needs a CUDA device"
    elif INTERPRETING:
        reason = "TRITON_INTERPRET is set: Triton kernels run on CPU tensors only (unset it for the GPU tests)"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CUDA and no interpreter: a test stopped by the interpreter hint is skipped and recorded."""
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo
    if (
        call.when == "call"
        and exc is not None
        and not INTERPRETING
        and exc.errisinstance(RuntimeError)
        and _ext._INTERPRETER_HINT in str(exc.value)
    ):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: needs Triton's interpreter (CPU tensors)")
        record = os.environ.get("FASTSSL_INTERPRETER_TESTS")
        if record:
            with open(record, "a") as f:
                f.write(item.nodeid + "\n")
