"""Backend selection (fastssl/_ext.py): Triton's interpreter on a machine without CUDA (CUDA is
hidden from the subprocesses, so that these run on a GPU machine too)."""

import os
import subprocess
import sys

import pytest
import torch

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


def _kernels():
    from fastssl import _ext

    if _ext._C is None:
        pytest.skip("the C++ extension is not built")
    return _ext._C


def test_bf16_dots_forward_equals_the_fp32_kernel():
    """bf16 rows: the InfoNCE kernel's tile products (bf16 dot products where the CPU has them,
    csrc/tiles.h Bf16Dots) are exact, so its row and column LSEs equal the fp32 kernel's on the same
    numbers up to fp32 summation order."""
    ops = _kernels()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(700, 96, generator=g), dim=1).bfloat16() for _ in range(2))
    low = ops.info_nce_lse_fwd_cpu(q, k, 1 / 0.07, True, -1)
    full = ops.info_nce_lse_fwd_cpu(q.float(), k.float(), 1 / 0.07, True, -1)
    for a, b in zip(low, full, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-5)


def test_bf16_dots_restore_the_matmul_precision():
    """The bf16 dot products switch oneDNN's fp32 matmul precision for the kernel only: the caller's
    setting is back after the forward (and the backward)."""
    _kernels()
    import fastssl

    before = torch.backends.mkldnn.matmul.fp32_precision
    q, k = (torch.randn(64, 32).bfloat16().requires_grad_() for _ in range(2))
    fastssl.info_nce(q, k, symmetric=True, impl="cpp").backward()
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_bf16_dots_off_gives_the_same_numbers():
    """FASTSSL_CPU_BF16_DOTS=0 (fp32 products of the widened rows) gives bf16 InfoNCE's loss and
    gradient to their rounding (only the forward's products take bf16 dot products, and exactly)."""
    code = """
import torch, fastssl
g = torch.Generator().manual_seed(0)
q, k = (torch.randn(300, 64, generator=g).bfloat16().requires_grad_() for _ in range(2))
loss = fastssl.info_nce(q, k, symmetric=True, impl="cpp")
loss.backward()
print(" ".join(repr(v) for v in [loss.item()] + q.grad.float().flatten()[:200].tolist()))
"""
    runs = []
    for mode in ("1", "0"):
        env = dict(os.environ, FASTSSL_CPU_BF16_DOTS=mode)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(torch.tensor([float(v) for v in done.stdout.split()]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[0][1:], runs[1][1:], rtol=8e-3, atol=1e-6)  # bf16 gradients: 1 ulp
