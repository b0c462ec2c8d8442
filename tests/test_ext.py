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


@pytest.mark.parametrize("inv_tau", [1 / 0.07, 1 / 0.01, 1 / 0.003])  # the fixed shift, then the per-row shifts
def test_bf16_rows_match_the_fp64_kernels(inv_tau):
    """Rows that are bf16 numbers: the InfoNCE and NT-Xent kernels multiply their tiles on bf16
    micro-kernels where the CPU has them (csrc/tiles.h, TileProducts): S exactly (fp32 accumulation),
    A·K with A split into two bf16 parts (relative error 2^-17 per weight). Forward and backward
    against the fp64 kernels on the same numbers, over partial tiles (700 × 555 rows, D = 96) and the
    left-out pairs of gather (A rounded to bf16 alone errs by 2e-3 of the scale here, 50× the bound)."""
    ops = _kernels()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(n, 96, generator=g), dim=1).bfloat16() for n in (700, 555))
    grads = [torch.randn(n, generator=g) for n in (700, 555)]
    for self_offset in (-1, 3):
        low = ops.info_nce_lse_fwd_cpu(q, k, inv_tau, True, self_offset)
        full = ops.info_nce_lse_fwd_cpu(q.double(), k.double(), inv_tau, True, self_offset)
        for a, b in zip(low, full, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=2e-6, atol=2e-5)
        low = ops.info_nce_lse_bwd_cpu(*grads, q.float(), k.float(), *low, inv_tau, self_offset)
        wide = (x.double() for x in (*grads, q, k))
        full = ops.info_nce_lse_bwd_cpu(*wide, *full, inv_tau, self_offset)
        for a, b in zip(low, full, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=4e-5 * b.abs().max().item())
    # NT-Xent gets rows that are not unit (bf16 numbers) and their inverse norms r
    x = torch.randn(700, 96, generator=g).bfloat16().float()
    r = 1 / x.norm(dim=1)
    lse = ops.ntxent_lse_fwd_cpu(x, r, inv_tau)
    lse64 = ops.ntxent_lse_fwd_cpu(x.double(), r.double(), inv_tau)
    torch.testing.assert_close(lse.double(), lse64, rtol=2e-6, atol=2e-5)
    dx = ops.ntxent_lse_bwd_cpu(grads[0], x, r, lse, inv_tau)
    dx64 = ops.ntxent_lse_bwd_cpu(grads[0].double(), x.double(), r.double(), lse64, inv_tau)
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=4e-5 * dx64.abs().max().item())


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
    gradient to their rounding (the bf16 products are exact forward and within 2^-17 backward)."""
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


def test_bf16_rows_with_onednn_disabled():
    """torch.backends.mkldnn.enabled = False after the micro-kernels ran: the kernels fall back to
    ATen's products (same numbers to fp32 rounding) instead of failing inside brgemm."""
    import fastssl

    _kernels()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(300, 64, generator=g).bfloat16().requires_grad_() for _ in range(2))
    on = fastssl.info_nce(q, k, symmetric=True, impl="cpp")
    with torch.backends.mkldnn.flags(enabled=False):
        off = fastssl.info_nce(q, k, symmetric=True, impl="cpp")
        off.backward()
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_kernels_leave_the_callers_denormals_alone():
    """The C++ row loops run with flush-to-zero and denormals-are-zero (csrc/cpu/vec_math.h,
    FlushDenormals: denormal products made large logits 30-60 × slower) and restore the thread's
    state after: the calling thread still computes with denormals."""
    import numpy as np
    import torch.nn.functional as F

    import fastssl

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(300, 16, generator=g, requires_grad=True) for _ in range(2))
    fastssl.siglip_loss(x, y, scale=100.0, bias=-100.0).backward()
    fastssl.nt_xent(x, y, temperature=0.01).backward()
    fastssl.mochi_loss(x, y, torch.randn(500, 16, generator=g), n_hard=20, n_mix=8, n_mix_query=4).backward()
    w = F.normalize(torch.randn(64, 16, generator=g), dim=1).requires_grad_()
    fastssl.dino_loss(x[:200] * 20, y[:100].detach() * 20, w, w.detach() * 20).backward()
    tiny = np.array([1e-39], dtype=np.float32)  # a denormal
    assert (tiny * np.float32(2))[0] == np.float32(2e-39)
    assert (torch.tensor([1e-39]) * 2).item() != 0
