"""scripts/compile_check.py (`make compile-check`) compiles the Triton launches that the cases of
fastssl/selftest.py make: here, that those cases reach every kernel of every fastssl.kernels module
(a new kernel without a case would go unchecked), and, slow, that the check itself runs."""

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import fastssl.kernels
import pytest
import torch
from triton.runtime.jit import KernelInterface

from fastssl import selftest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_check.py"


def _compile_check():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in the kernel modules."""
    names = set()
    for info in pkgutil.iter_modules(fastssl.kernels.__path__):
        module = importlib.import_module(f"fastssl.kernels.{info.name}")
        names |= {f"{info.name}.{n}" for n, v in vars(module).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    return names


def test_selftest_cases_launch_every_kernel(monkeypatch):
    """At the compile check's shapes (launches intercepted: nothing runs), in fp64."""
    launched = set()

    def launch(kernel, grid):
        launched.add(f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__}")
        return lambda *args, **kwargs: None

    monkeypatch.setattr(KernelInterface, "__getitem__", launch)
    for case in selftest.CASES:
        if "triton" in case.impls:
            for size in _compile_check().sizes():
                case.build(torch.device("cpu"), torch.float64, size)("triton")
    missing = _kernels() - launched
    assert not missing, f"no case of fastssl/selftest.py launches {sorted(missing)}: add one to CASES"


@pytest.mark.slow
def test_compile_check_passes_for_pgd():
    """The whole pipeline on the smallest kernel set: record, compile for sm_90, read ptxas's report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--triton", "installed", "--arch", "90", "--only", "pgd", "--jobs", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("_pgd_step_kernel")]
    assert rows and all(" ok " in line for line in rows), done.stdout[-3000:]
