"""Backend selection (fastssl/_ext.py): Triton's interpreter on a machine without CUDA (CUDA is
hidden from the subprocesses, so that these run on a GPU machine too)."""

import os
import subprocess
import sys

import pytest

_SNIPPET = """
import torch{first}
import fastssl
z = torch.randn(20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
try:
    print(float(fastssl.nt_xent(z[:10], z[10:], impl="triton")), float(fastssl.nt_xent(z[:10], z[10:], impl="cpp")))
except RuntimeError as exc:
    print("error:", exc)
"""


def _run(first: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", _SNIPPET.format(first=first)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_triton_on_cpu_needs_no_environment():
    """impl='triton' on CPU tensors works without TRITON_INTERPRET in the environment (fastssl sets it
    before torch imports triton) and gives the C++ kernel's loss."""
    triton_loss, cpp_loss = (float(v) for v in _run().split())
    assert triton_loss == pytest.approx(cpp_loss, rel=1e-12)


def test_triton_imported_first_names_the_fix():
    """triton imported before fastssl cannot be switched to its interpreter: a clear error, no crash."""
    out = _run(", triton")
    assert out.startswith("error:") and "TRITON_INTERPRET=1" in out
