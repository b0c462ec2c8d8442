"""InfoNCE with two towers (MoCo, CLIP): checks, dispatch, autograd, and gathering across ranks.

With unit rows q_i (queries, M), k_j (keys, M, positive of q_i on j = i; then the K extra
negatives n_j) and s_ij = q_i·k_j/τ,

    ℓ^q_i = LSE_j s_ij − s_ii            (query → key, over keys and negatives)            (1)
    ℓ^k_j = LSE_i s_ij − s_jj            (key → query, CLIP's second direction)            (2)

and the loss is the mean of ℓ^q, or with ``symmetric`` the mean of (ℓ^q_i + ℓ^k_i)/2. Only the
log-sum-exps need all pairs; they are the custom op `fastssl::info_nce_lse`, one pass over the tiles
for both directions, run by the C++ kernel (csrc/cpu/info_nce.cpp) or the Triton kernel
(kernels/info_nce.py), which never hold an M×N matrix. The positive s_ii is O(M·D) and plain
PyTorch, as is the row normalisation.

Temperature gradient. The op takes 1/τ as a float or as a 0-dim tensor (read on the device by the
Triton kernel, never on the host, so that a learned temperature costs no sync). s is
linear in 1/τ, so ∂L/∂(1/τ) = Σ_ij A_ij q_i·k_j = Σ_i q_i·(A K)_i with A the weights of the
q-gradient (kernels' (2)): the kernels take it from their fp32 q-gradient rows before rounding them
to the input dtype (from bf16-rounded ones, the cancellation against the positive term would lose
the gradient of a saturated softmax).

Across ranks (``gather=True``, see fastssl/distributed.py): rank r's queries meet every rank's keys.
Its row LSEs (1) are complete; its column LSEs cover its own queries only, so every rank's partial
column LSEs are gathered and combined, col_j = log Σ_r exp(col_j^(r)), which is exact and whose
gradient exp(col_j^(r) − col_j) turns each partial's softmax into the global one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl import _checks, _ext, distributed
from fastssl._reductions import check_reduction, reduce_rows
from fastssl._rows import unit_rows
from fastssl.reference import info_nce as reference


@torch.library.custom_op("fastssl::info_nce_lse", mutates_args=())
def info_nce_lse_op(
    q: Tensor, k: Tensor, inv_tau: Tensor | None, inv_tau_value: float, with_cols: bool, self_offset: int, impl: str
) -> tuple[Tensor, Tensor]:
    """(row_i = log Σ_j exp(q_i·k_j/τ) [M], col_j = log Σ_i exp(...) [N] or [0] without `with_cols`)
    for unit rows q [M, D], k [N, D]; 1/τ is the 0-dim tensor inv_tau on q's device, or where that
    is None the float inv_tau_value. The pairs (i, i + self_offset) are left out when
    self_offset ≥ 0. fp32 (fp64 for fp64 input)."""
    kernel = _ext.kernel(impl, q.device, cpp="info_nce_lse_fwd_cpu", triton="info_nce.info_nce_lse_fwd")
    return kernel(q, k, _kernel_inv_tau(inv_tau, inv_tau_value, impl), with_cols, self_offset)


def _kernel_inv_tau(inv_tau: Tensor | None, inv_tau_value: float, impl: str) -> float | Tensor:
    """1/τ as the kernels take it: the float; for a tensor, its value for the C++ kernel (a CPU
    tensor: reading it waits on nothing), the tensor itself for Triton (read on the device)."""
    if inv_tau is None:
        return inv_tau_value
    return inv_tau.item() if impl == "cpp" else inv_tau


@info_nce_lse_op.register_fake
def _(q, k, inv_tau, inv_tau_value, with_cols, self_offset, impl):
    dtype = _checks.accumulate_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=dtype), q.new_empty(k.shape[0] if with_cols else 0, dtype=dtype)


@torch.library.custom_op("fastssl::info_nce_lse_backward", mutates_args=())
def info_nce_lse_backward(
    grad_row: Tensor,
    grad_col: Tensor,
    q: Tensor,
    k: Tensor,
    row: Tensor,
    col: Tensor,
    inv_tau: Tensor | None,
    inv_tau_value: float,
    self_offset: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """With A_ij = g_i exp(s_ij − row_i) + h_j exp(s_ij − col_j) (the column terms only when col is
    not empty): dL/dq = A K/τ, dL/dk = Aᵀ Q/τ in the dtypes of q and k, and
    dL/d(1/τ) = Σ_ij A_ij q_i·k_j (0-dim, in inv_tau's dtype; fp32 or fp64 for a float 1/τ)."""
    kernel = _ext.kernel(impl, q.device, cpp="info_nce_lse_bwd_cpu", triton="info_nce.info_nce_lse_bwd")
    dq, dk, d_inv_tau = kernel(
        grad_row, grad_col, q, k, row, col, _kernel_inv_tau(inv_tau, inv_tau_value, impl), self_offset
    )
    if inv_tau is None:
        return dq, dk, d_inv_tau
    return dq, dk, d_inv_tau.to(device=inv_tau.device, dtype=inv_tau.dtype).reshape(inv_tau.shape)


@info_nce_lse_backward.register_fake
def _(grad_row, grad_col, q, k, row, col, inv_tau, inv_tau_value, self_offset, impl):
    d_inv_tau = (
        q.new_empty((), dtype=_checks.accumulate_dtype(q.dtype)) if inv_tau is None else torch.empty_like(inv_tau)
    )
    return torch.empty_like(q), torch.empty_like(k), d_inv_tau


def _setup_context(ctx, inputs, output):
    q, k, inv_tau, inv_tau_value, _with_cols, self_offset, impl = inputs
    ctx.save_for_backward(q, k, inv_tau, *output)
    ctx.inv_tau_value, ctx.self_offset, ctx.impl = inv_tau_value, self_offset, impl


def _backward(ctx, grad_row, grad_col):
    q, k, inv_tau, row, col = ctx.saved_tensors
    dq, dk, d_inv_tau = info_nce_lse_backward(
        grad_row.contiguous(), grad_col.contiguous(), q, k, row, col, inv_tau, ctx.inv_tau_value, ctx.self_offset,
        ctx.impl,
    )  # fmt: skip
    return dq, dk, (None if inv_tau is None else d_inv_tau), None, None, None, None


info_nce_lse_op.register_autograd(_backward, setup_context=_setup_context)


def info_nce_lse(
    q: Tensor, k: Tensor, inv_tau: float | Tensor, with_cols: bool, self_offset: int, impl: str
) -> tuple[Tensor, Tensor]:
    """`fastssl::info_nce_lse` for 1/τ given as a float (which never goes to the device) or as a
    0-dim tensor on q's device (which is never read on the host, and carries ∂L/∂(1/τ))."""
    if isinstance(inv_tau, Tensor):
        return info_nce_lse_op(q, k, inv_tau, 0.0, with_cols, self_offset, impl)
    return info_nce_lse_op(q, k, None, float(inv_tau), with_cols, self_offset, impl)


def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    negatives: Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    gather: bool = False,
    impl: str = "auto",
) -> Tensor:
    """InfoNCE between two towers (MoCo) or its symmetric form (CLIP), without an M×N matrix.

    Args:
        query: [M, D] embeddings of one tower (images, MoCo's queries).
        key: [M, D] embeddings of the other (texts, MoCo's keys): key row i is the positive of
            query row i, every other key row a negative.
        temperature: τ > 0, a float or a one-element tensor; when it requires grad (CLIP's learned
            logit scale) its gradient is exact. A tensor is never read on the host on CUDA (no
            step waits for it; the kernels then take the row shift, exact for every τ) and a
            non-positive or non-finite one gives a NaN loss there; a float puts nothing on the device.
        negatives: [K, D] extra negatives for every query (a MoCo queue); they enter the
            query→key direction only. Under ``gather=True`` every rank passes the same ones.
        symmetric: the CLIP loss, the mean of the query→key and key→query cross-entropies.
        reduction: "mean", "sum", or "none" for the per-row losses [M] (with ``symmetric``,
            row i's two cross-entropies averaged).
        gather: under ``torch.distributed``, meet every rank's keys (and, with ``symmetric``,
            queries): the loss and gradients are those of one process on the concatenated batch, as
            fastssl/distributed.py sets out (the value is the whole batch's on every rank; each rank's
            graph carries its share, so under DDP scale the loss by the world size).
        impl: "auto", "reference", "cpp", "triton" or "cuda" (see README); $FASTSSL_IMPL overrides
            "auto".

    Rows are L2-normalised inside the op (a zero row stays zero). Accumulation is fp32 and the loss
    is fp32 for every input dtype. Non-finite embeddings give a non-finite loss.
    """
    _checks.features("query", query)
    _checks.features("key", key)
    _checks.like("key", key, "query", query)
    if negatives is not None:
        _checks.features("negatives", negatives)
        _checks.like("negatives", negatives, "query", query, dims=[1])
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    inv_tau = _checks.inverse_temperature("temperature", temperature, query.device)
    check_reduction(reduction)
    impl = _ext.resolve_impl(impl, query.device)
    m = query.shape[0]
    counts, first = distributed.rows_layout(m, query.device) if gather else ([m], 0)
    if impl == "reference":
        # the whole batch on every rank, then this rank's rows
        q_all, k_all = (distributed.all_gather(x, counts) for x in (query, key)) if gather else (query, key)
        rows = reference.info_nce_rows(q_all, k_all, negatives, inv_tau, symmetric)[first : first + m]
    else:
        rows = _fused_rows(query, key, negatives, inv_tau, symmetric, impl, counts if gather else None, first)
    return reduce_rows(rows, reduction, sum(counts), gather)


def _fused_rows(query, key, negatives, inv_tau, symmetric, impl, counts, first) -> Tensor:
    """Per-row losses of this rank's rows through `fastssl::info_nce_lse`; counts: None, or the
    ranks' row counts under gather."""
    acc = _checks.accumulate_dtype(query.dtype)
    # normalise in fp32; the kernel reads the rows in the input dtype, and the positive term uses
    # those same rounded rows, so that LSE_i ≥ s_ii holds exactly and every row's loss is ≥ 0.
    qn, kn = (unit_rows(x.to(acc)).to(query.dtype) for x in (query, key))
    columns = kn if counts is None else distributed.all_gather(kn, counts)
    n_keys = columns.shape[0]
    if negatives is not None:
        columns = torch.cat([columns, unit_rows(negatives.to(acc)).to(query.dtype)])
    row, col = info_nce_lse(qn, columns, inv_tau, symmetric, -1, impl)
    pos = inv_tau * (qn.to(acc) * kn.to(acc)).sum(1)
    if not symmetric:
        return row - pos
    m = qn.shape[0]
    if counts is None:
        col = col[:m]
    else:  # (2) over every rank's queries: combine the ranks' partial column LSEs of this rank's keys
        col = distributed.all_gather(col[:n_keys].unsqueeze(0), [1] * len(counts))[:, first : first + m].logsumexp(0)
    return 0.5 * (row + col) - pos
