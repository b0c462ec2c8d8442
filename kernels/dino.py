"""Prototype losses fused with the last layer (DINO, iBOT, SwAV): the Triton twin of csrc/cpu/dino.cpp.

The logits s = S·Wᵀ [N, K] (student) and t = T·W_tᵀ [R, K] (teacher) exist only as register tiles
(docs/design.md, "DINO, iBOT and SwAV prototype losses"). Teacher rows r = g·B + b, student rows
i = v·B + b, and q_rk = exp(t_rk/τ_t + a_gk + β_r). Entry points, with the C++ kernels' numbers:

    dino_teacher_lse:   LSE_k(t_rk/τ + shift_k) and its max per teacher row                     (2)
    dino_sinkhorn_sums: E_rk = exp(t_rk/τ − m)·u_k·v_r summed over rows [K] and prototypes [R]   (3)
    dino_loss_fwd:      lse_i = LSE_k(s_ik/τ_s), dot_{g,i} = Σ_k q_{(g,b(i)),k} s_ik/τ_s           (4)
    dino_loss_bwd:      G = (dL/dlse·p + Σ_g dL/ddot_g·q_g)/τ_s, dL/dS = G·W, dL/dW = Gᵀ·S        (5)

Row-side results stay in registers over the K loop; the Sinkhorn row sums [R] go through atomics.
The backward recomputes G twice: once per student row block (for dL/dS) and once per prototype
block (for dL/dW), so that every output is written by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastssl.kernels._launch import acc_dtype, block_size, launcher
from fastssl.kernels._tiles import block_rows, check_matrix, dot_dtypes, hi_lo, load_rows, scalar, tile_dots
from torch import Tensor

BLOCK_ROWS = 32
BLOCK_K = 64
# 32 features per chunk; warps and pipeline stages per dtype. `make compile-check`
# (scripts/compile_check.py, Triton 3.6 and 3.9, sm_80 and sm_90) found spills with 64-wide chunks
# (up to 1.6 KB in fp64 and fp32, whose tf32x3 dots hold three operand splits; the backward also
# rebuilds q for each teacher crop), with 8 warps for 16-bit tiles under Triton 3.6 (20-36 B), with
# 4 warps for fp32/fp64 tiles, and with 3 stages for fp32 (36 B on sm_80, Triton 3.6).
BLOCK_D = 32
_WARPS_STAGES = {torch.bfloat16: (4, 3), torch.float16: (4, 3), torch.float32: (8, 1), torch.float64: (8, 3)}
FWD_STAGES = 1  # the forward's two dots per K tile: with 3 stages its 16-bit variants spilled 16 B on sm_90


@triton.jit
def _online_lse(m, s, x):
    """Adds the tile x [BLOCK, BLOCK_K] (−inf outside) to the running (max, sum) of its rows."""
    grown = tl.maximum(m, tl.max(x, 1))
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - grown))
    return grown, s * scale + tl.sum(tl.exp(x - grown[:, None]), 1)


@triton.jit
def _teacher_lse_kernel(
    T_ptr, W_ptr, Shift_ptr, Lse_ptr, Max_ptr, R, K, D,
    T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_hi, inv_lo,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    inv = scalar(inv_hi, inv_lo, ACC)
    t_i = block_rows(T_ptr, rows, ok, D, T_stride_n, T_stride_d, Z_DOT, BLOCK_R, BLOCK_D, ONE_D_BLOCK)
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cok = cols < K
        dots, _ = tile_dots(
            T_ptr, W_ptr, t_i, rows, ok, cols, cok, D, T_stride_n, T_stride_d, W_stride_n, W_stride_d,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_D, ONE_D_BLOCK,
        )  # fmt: skip
        x = dots * inv + tl.load(Shift_ptr + cols, mask=cok, other=0.0).to(ACC)[None, :]
        m, s = _online_lse(m, s, tl.where(cok[None, :], x, float("-inf")))  # (2)
    tl.store(Lse_ptr + rows, m + tl.log(s), mask=ok)
    tl.store(Max_ptr + rows, m, mask=ok)


@triton.jit
def _sinkhorn_sums_kernel(
    T_ptr, W_ptr, U_ptr, V_ptr, Rows_ptr, Cols_ptr, R, K, D,
    T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_hi, inv_lo, shift_hi, shift_lo,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cok = cols < K
    inv, shift = scalar(inv_hi, inv_lo, ACC), scalar(shift_hi, shift_lo, ACC)
    u = tl.load(U_ptr + cols, mask=cok, other=0.0).to(ACC)
    total = tl.zeros([BLOCK_K], ACC)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = rows < R
        t_i = block_rows(T_ptr, rows, ok, D, T_stride_n, T_stride_d, Z_DOT, BLOCK_R, BLOCK_D, ONE_D_BLOCK)
        dots, _ = tile_dots(
            T_ptr, W_ptr, t_i, rows, ok, cols, cok, D, T_stride_n, T_stride_d, W_stride_n, W_stride_d,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_D, ONE_D_BLOCK,
        )  # fmt: skip
        v = tl.load(V_ptr + rows, mask=ok, other=0.0).to(ACC)
        e = tl.exp(dots * inv - shift) * u[None, :] * v[:, None]  # (3)
        e = tl.where(ok[:, None] & cok[None, :], e, 0.0)
        total += tl.sum(e, 0)
        tl.atomic_add(Cols_ptr + rows, tl.sum(e, 1), mask=ok)
    tl.store(Rows_ptr + cols, total, mask=cok)


@triton.jit
def _q_tile(
    T_ptr, Wt_ptr, A_ptr, Beta_ptr, g, b, ok, cols, cok, B, K, D,
    T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_t,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """q of teacher rows g·B + b on the columns `cols`, 0 outside: [BLOCK_N, BLOCK_K] (1)."""
    trows = g * B + b
    dots, _ = tile_dots(
        T_ptr, Wt_ptr, 0.0, trows, ok, cols, cok, D, T_stride_n, T_stride_d, W_stride_n, W_stride_d,
        ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, False,
    )  # fmt: skip
    a = tl.load(A_ptr + g * K + cols, mask=cok, other=0.0).to(ACC)
    beta = tl.load(Beta_ptr + trows, mask=ok, other=0.0).to(ACC)
    q = tl.exp(dots * inv_t + a[None, :] + beta[:, None])
    return tl.where(ok[:, None] & cok[None, :], q, 0.0)


@triton.jit
def _grad_tile(
    S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Glse_ptr, Gdot_ptr, rows, ok, cols, cok, N, B, G, K, D,
    S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s, inv_t,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """G of (5) on student rows `rows` and prototypes `cols`, 0 outside: [BLOCK_N, BLOCK_K]."""
    dots, _ = tile_dots(
        S_ptr, W_ptr, 0.0, rows, ok, cols, cok, D, S_stride_n, S_stride_d, W_stride_n, W_stride_d,
        ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, False,
    )  # fmt: skip
    lse = tl.load(Lse_ptr + rows, mask=ok, other=0.0).to(ACC)
    glse = tl.load(Glse_ptr + rows, mask=ok, other=0.0).to(ACC)
    grad = tl.exp(dots * inv_s - lse[:, None]) * glse[:, None]
    b = rows % B
    for g in range(0, G):
        gdot = tl.load(Gdot_ptr + g * N + rows, mask=ok, other=0.0).to(ACC)
        q = _q_tile(
            T_ptr, Wt_ptr, A_ptr, Beta_ptr, g, b, ok, cols, cok, B, K, D, T_stride_n, T_stride_d, W_stride_n,
            W_stride_d, inv_t, ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        grad += gdot[:, None] * q
    return tl.where(ok[:, None] & cok[None, :], grad * inv_s, 0.0)


@triton.jit
def _loss_fwd_kernel(
    S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Dots_ptr, N, B, K, D,
    S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s_hi, inv_s_lo, inv_t_hi, inv_t_lo,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (row block, g): dot_{g,i} for its rows, and for g = 0 also lse_i (4)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    ok = rows < N
    inv_s, inv_t = scalar(inv_s_hi, inv_s_lo, ACC), scalar(inv_t_hi, inv_t_lo, ACC)
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    dot = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cok = cols < K
        logits, _ = tile_dots(
            S_ptr, W_ptr, 0.0, rows, ok, cols, cok, D, S_stride_n, S_stride_d, W_stride_n, W_stride_d,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, False,
        )  # fmt: skip
        x = tl.where(cok[None, :], logits * inv_s, float("-inf"))
        m, s = _online_lse(m, s, x)
        q = _q_tile(
            T_ptr, Wt_ptr, A_ptr, Beta_ptr, g, rows % B, ok, cols, cok, B, K, D, T_stride_n, T_stride_d,
            W_stride_n, W_stride_d, inv_t, ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        dot += tl.sum(q * tl.where(cok[None, :], x, 0.0), 1)
    tl.store(Dots_ptr + g * N + rows, dot, mask=ok)
    if g == 0:
        tl.store(Lse_ptr + rows, m + tl.log(s), mask=ok)


@triton.jit
def _grad_student_kernel(
    S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Glse_ptr, Gdot_ptr, Out_ptr, N, B, G, K, D,
    S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s_hi, inv_s_lo, inv_t_hi, inv_t_lo,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (row block, D chunk): dL/dS = G·W on its rows and feature columns (5)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    ok = rows < N
    inv_s, inv_t = scalar(inv_s_hi, inv_s_lo, ACC), scalar(inv_t_hi, inv_t_lo, ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cok = cols < K
        grad = _grad_tile(
            S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Glse_ptr, Gdot_ptr, rows, ok, cols, cok, N, B, G,
            K, D, S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s, inv_t,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        w = load_rows(W_ptr, cols, cok, d0, D, W_stride_n, W_stride_d, BLOCK_D, Z_DOT)
        acc = tl.dot(grad.to(Z_DOT), w, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    dcols = d0 + tl.arange(0, BLOCK_D)
    ptrs = Out_ptr + rows[:, None] * D + dcols[None, :]
    tl.store(ptrs, acc, mask=ok[:, None] & (dcols < D)[None, :])


@triton.jit
def _grad_weight_kernel(
    S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Glse_ptr, Gdot_ptr, Out_ptr, N, B, G, K, D,
    S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s_hi, inv_s_lo, inv_t_hi, inv_t_lo,
    ACC: tl.constexpr, Z_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (prototype block, D chunk): dL/dW = Gᵀ·S on its prototypes and feature columns (5)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    cok = cols < K
    inv_s, inv_t = scalar(inv_s_hi, inv_s_lo, ACC), scalar(inv_t_hi, inv_t_lo, ACC)
    acc = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        ok = rows < N
        grad = _grad_tile(
            S_ptr, W_ptr, T_ptr, Wt_ptr, A_ptr, Beta_ptr, Lse_ptr, Glse_ptr, Gdot_ptr, rows, ok, cols, cok, N, B, G,
            K, D, S_stride_n, S_stride_d, T_stride_n, T_stride_d, W_stride_n, W_stride_d, inv_s, inv_t,
            ACC, Z_DOT, DOT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        x = load_rows(S_ptr, rows, ok, d0, D, S_stride_n, S_stride_d, BLOCK_D, Z_DOT)
        acc = tl.dot(tl.trans(grad.to(Z_DOT)), x, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    dcols = d0 + tl.arange(0, BLOCK_D)
    ptrs = Out_ptr + cols[:, None] * D + dcols[None, :]
    tl.store(ptrs, acc, mask=cok[:, None] & (dcols < D)[None, :])


def _meta(x: Tensor, d: int) -> dict:
    _, meta = dot_dtypes(x)
    keys = ("ACC", "Z_DOT", "DOT_PRECISION")
    num_warps, num_stages = _WARPS_STAGES[x.dtype]
    launch = {"BLOCK_D": block_size(d, BLOCK_D), "num_warps": num_warps, "num_stages": num_stages}
    return {**{key: meta[key] for key in keys}, **launch}


@launcher
def dino_teacher_lse(teacher: Tensor, teacher_weight: Tensor, shift: Tensor, inv_tau: float):
    check_matrix("dino_teacher_lse", teacher, "teacher")
    r, d = teacher.shape
    k = teacher_weight.shape[0]
    acc, _ = acc_dtype(teacher)
    lse, row_max = (torch.empty(r, dtype=acc, device=teacher.device) for _ in range(2))
    meta = _meta(teacher, d)
    _teacher_lse_kernel[(triton.cdiv(r, BLOCK_ROWS),)](
        teacher, teacher_weight, shift.to(acc).contiguous(), lse, row_max, r, k, d, *teacher.stride(),
        *teacher_weight.stride(), *hi_lo(inv_tau), BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_K,
        ONE_D_BLOCK=d <= meta["BLOCK_D"], **meta,
    )  # fmt: skip
    return lse, row_max


@launcher
def dino_sinkhorn_sums(teacher: Tensor, teacher_weight: Tensor, inv_tau: float, shift: float, u: Tensor, v: Tensor):
    check_matrix("dino_sinkhorn_sums", teacher, "teacher")
    r, d = teacher.shape
    k = teacher_weight.shape[0]
    acc, _ = acc_dtype(teacher)
    rows, cols = torch.empty(k, dtype=acc, device=teacher.device), torch.zeros(r, dtype=acc, device=teacher.device)
    meta = _meta(teacher, d)
    _sinkhorn_sums_kernel[(triton.cdiv(k, BLOCK_K),)](
        teacher, teacher_weight, u.to(acc).contiguous(), v.to(acc).contiguous(), rows, cols, r, k, d,
        *teacher.stride(), *teacher_weight.stride(), *hi_lo(inv_tau), *hi_lo(shift), BLOCK_R=BLOCK_ROWS,
        BLOCK_K=BLOCK_K, ONE_D_BLOCK=d <= meta["BLOCK_D"], **meta,
    )  # fmt: skip
    return rows, cols


def _loss_args(student, weight, teacher, teacher_weight, a, beta):
    check_matrix("dino_loss", student, "student")
    acc, _ = acc_dtype(student)
    n, d = student.shape
    g, k = a.shape
    b = teacher.shape[0] // g
    tensors = (student, weight, teacher, teacher_weight, a.to(acc).contiguous(), beta.to(acc).contiguous())
    sizes = (n, b, k, d, *student.stride(), *teacher.stride(), *weight.stride())
    if weight.stride() != teacher_weight.stride():
        raise ValueError("dino_loss: weight and teacher_weight must have the same strides")
    return acc, n, d, g, k, tensors, sizes


@launcher
def dino_loss_fwd(student, weight, teacher, teacher_weight, a, beta, inv_tau_s: float, inv_tau_t: float):
    acc, n, d, g, _, tensors, sizes = _loss_args(student, weight, teacher, teacher_weight, a, beta)
    lse, dots = torch.empty(n, dtype=acc, device=student.device), torch.empty(g, n, dtype=acc, device=student.device)
    _loss_fwd_kernel[(triton.cdiv(n, BLOCK_ROWS), g)](
        *tensors, lse, dots, *sizes, *hi_lo(inv_tau_s), *hi_lo(inv_tau_t), BLOCK_N=BLOCK_ROWS, BLOCK_K=BLOCK_K,
        **{**_meta(student, d), "num_stages": FWD_STAGES},
    )  # fmt: skip
    return lse, dots


@launcher
def dino_loss_bwd(grad_lse, grad_dots, student, weight, teacher, teacher_weight, a, beta, lse, inv_tau_s, inv_tau_t):
    acc, n, d, g, k, tensors, sizes = _loss_args(student, weight, teacher, teacher_weight, a, beta)
    _, b, _, _, *strides = sizes
    grads = (lse.to(acc).contiguous(), grad_lse.to(acc).contiguous(), grad_dots.to(acc).contiguous())
    meta = _meta(student, d)
    grad_student = torch.empty(n, d, dtype=acc, device=student.device)
    grad_weight = torch.empty(k, d, dtype=acc, device=student.device)
    scalars = (*hi_lo(inv_tau_s), *hi_lo(inv_tau_t))
    d_blocks = triton.cdiv(d, meta["BLOCK_D"])
    _grad_student_kernel[(triton.cdiv(n, BLOCK_ROWS), d_blocks)](
        *tensors, *grads, grad_student, n, b, g, k, d, *strides, *scalars, BLOCK_N=BLOCK_ROWS, BLOCK_K=BLOCK_K, **meta
    )
    _grad_weight_kernel[(triton.cdiv(k, BLOCK_K), d_blocks)](
        *tensors, *grads, grad_weight, n, b, g, k, d, *strides, *scalars, BLOCK_N=BLOCK_ROWS, BLOCK_K=BLOCK_K, **meta
    )
    return grad_student.to(student.dtype), grad_weight.to(weight.dtype)
