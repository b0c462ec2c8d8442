"""Without a GPU: the NT-Xent and InfoNCE Triton kernels lower to a cubin for sm_90 (the H100), in
every variant of their switches, for fp32 and bf16 rows. The interpreter tests check what they
compute; this checks that the compiler accepts them."""

import os
import subprocess
import sys

import pytest

_COMPILE_FOR_H100 = """
import itertools
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.kernels import info_nce as I, ntxent as N

assert isinstance(N._ntxent_lse_fwd_kernel, triton.runtime.JITFunction)  # not the interpreter's stand-in


def build(kernel, consts, rows):
    kinds = {}
    for name in kernel.arg_names:
        if name in consts:
            kinds[name] = "constexpr"
        elif name in ("Z_ptr", "Q_ptr", "K_ptr"):
            kinds[name] = "*" + rows
        elif name.endswith("_ptr"):
            kinds[name] = "*fp32"
        else:
            kinds[name] = "fp32" if name.endswith(("_hi", "_lo")) else "i32"
    triton.compile(ASTSource(fn=kernel, signature=kinds, constexprs=consts), target=GPUTarget("cuda", 90, 32))


count = 0
for rows, (one_d, block_d), shift, cols in itertools.product(
    ("fp32", "bf16"), ((True, 128), (False, 64)), (False, True), (False, True)
):
    dot = tl.float32 if rows == "fp32" else tl.bfloat16
    precision = "tf32x3" if rows == "fp32" else "tf32"
    base = dict(ACC=tl.float32, Z_DOT=dot, DOT_PRECISION=precision, BLOCK_D=block_d, ONE_D_BLOCK=one_d, ROW_SHIFT=shift)
    grad = dict(A_DTYPE=dot, A_DOT=dot, A_PRECISION=precision)
    two_tower = dict(BLOCK_M=64, BLOCK_N=64, WITH_COLS=cols, HAS_SELF=cols, TAU_PTR=shift)
    build(I._info_nce_lse_fwd_kernel, dict(base, **two_tower, WRITE_MAX=False), rows)
    build(I._info_nce_lse_bwd_kernel, dict(base, **two_tower, **grad), rows)
    count += 2
    if not cols:
        build(N._ntxent_lse_fwd_kernel, dict(base, BLOCK_N=64, WRITE_MAX=False), rows)
        build(N._ntxent_lse_bwd_kernel, dict(base, BLOCK_N=64, **grad), rows)
        count += 2
print("compiled", count)
"""


@pytest.mark.slow
def test_contrastive_kernels_compile_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-c", _COMPILE_FOR_H100]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "compiled 48" in done.stdout, done.stderr[-3000:]
