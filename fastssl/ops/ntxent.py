"""NT-Xent (SimCLR) and its multi-positive form (SupCon): checks, dispatch, autograd.

With unit rows z_i (both views stacked, N rows), s_ij = z_i·z_j/τ and P(i) the positives of i,

    ℓ_i = LSE_{j≠i} s_ij − (1/|P(i)|) Σ_{p∈P(i)} s_ip.                          (1)

Only the log-sum-exp needs all N² pairs; it is the custom op `fastssl::ntxent_lse`, run by the
C++ kernel (csrc/cpu/ntxent.cpp) or the Triton kernel (kernels/ntxent.py), which never hold an
N×N matrix. The positive term is O(N·D): with C_c the sum of the rows of class c,

    Σ_{p∈P(i)} z_i·z_p = z_i·(C_{c(i)} − z_i),   |P(i)| = n_{c(i)} − 1,           (2)

so it is plain PyTorch here and autograd differentiates it, and the row normalisation, exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl import _checks, _ext, distributed
from fastssl._reductions import check_reduction, reduce_rows
from fastssl._rows import scaled_rows
from fastssl.ops.info_nce import info_nce_lse
from fastssl.reference import ntxent as reference


@torch.library.custom_op("fastssl::ntxent_lse", mutates_args=())
def ntxent_lse(x: Tensor, r: Tensor, inv_tau: float, impl: str) -> Tensor:
    """lse_i = log Σ_{j≠i} exp(inv_tau·z_i·z_j) for the unit rows z_i = r_i·x_i given as rows x [N, D]
    and their inverse norms r [N] (fastssl/_rows.py, scaled_rows): the kernels multiply x's own
    numbers and scale the products by r_i·r_j. [N] in fp32 (fp64 for fp64 x)."""
    return _ext.kernel(impl, x.device, cpp="ntxent_lse_fwd_cpu", triton="ntxent.ntxent_lse_fwd")(x, r, inv_tau)


@ntxent_lse.register_fake
def _(x, r, inv_tau, impl):
    return x.new_empty(x.shape[0], dtype=_checks.accumulate_dtype(x.dtype))


@torch.library.custom_op("fastssl::ntxent_lse_backward", mutates_args=())
def ntxent_lse_backward(grad_lse: Tensor, x: Tensor, r: Tensor, lse: Tensor, inv_tau: float, impl: str) -> Tensor:
    """dL/dx_i = inv_tau Σ_j r_i r_j (g_i P_ij + g_j P_ji) x_j with P_ij = exp(s_ij − lse_i): r_i times
    dL/dz_i; dtype of x."""
    kernel = _ext.kernel(impl, x.device, cpp="ntxent_lse_bwd_cpu", triton="ntxent.ntxent_lse_bwd")
    return kernel(grad_lse, x, r, lse, inv_tau)


@ntxent_lse_backward.register_fake
def _(grad_lse, x, r, lse, inv_tau, impl):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, r, inv_tau, impl = inputs
    ctx.save_for_backward(x, r, output)
    ctx.inv_tau, ctx.impl = inv_tau, impl


def _backward(ctx, grad_lse):
    x, r, lse = ctx.saved_tensors
    grad_x = ntxent_lse_backward(grad_lse.contiguous(), x, r, lse, ctx.inv_tau, ctx.impl)
    grad_r = None
    if ctx.needs_input_grad[1]:
        # dL/dr_i = dL/dz_i · x_i = (grad_x_i · x_i)/r_i (0 where r_i = 0: z_i = 0 does not move)
        grad_r = torch.where(r != 0, (grad_x * x).sum(1) / r, 0.0).to(r.dtype)
    return grad_x, grad_r, None, None


ntxent_lse.register_autograd(_backward, setup_context=_setup_context)


def nt_xent(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    labels: Tensor | None = None,
    temperature: float = 0.5,
    reduction: str = "mean",
    gather: bool = False,
    impl: str = "auto",
) -> Tensor:
    """NT-Xent / SupCon loss over the rows of both views, without an N×N matrix.

    Args:
        z1: [B, D] embeddings of the first view, or, without ``z2``, all N rows (``labels``
            then required).
        z2: [B, D] embeddings of the second view: row i of ``z1`` and row i of ``z2`` are
            positives of each other (SimCLR).
        labels: integer class of each sample, [B] shared by both views (with ``z2``) or [N]
            (without): every other row with the same label is a positive, and the loss averages
            the positives' log-probabilities (SupCon's L_out).
        temperature: τ > 0, a float or a one-element tensor; when it requires grad its gradient is
            exact (a tensor τ runs the two-tower InfoNCE kernel, which carries ∂L/∂(1/τ), and is
            never read on the host on CUDA: there a non-positive or non-finite one gives NaN).
        reduction: "mean" (over rows that have a positive), "sum", or "none" for the per-row
            losses [N] (0 for a row without a positive).
        gather: under ``torch.distributed``, every rank's rows meet every rank's rows (labels too):
            the loss and gradients are those of one process on the concatenated batch (each view
            concatenated over ranks), as fastssl/distributed.py sets out: the value is the whole
            batch's on every rank, each rank's graph carries its share, so under DDP scale the loss
            by the world size. With "none", this rank's rows.
        impl: "auto", "reference", "cpp", "triton" or "cuda" (see README); $FASTSSL_IMPL
            overrides "auto".

    Rows are L2-normalised inside the op at any scale (a zero row stays zero). Accumulation is
    fp32 and the loss is fp32 for every input dtype. A row without a positive (a label seen once,
    without ``z2``) is left out of the mean; a batch in which no row has one raises ValueError on
    CPU tensors (on CUDA tensors and under ``torch.compile``, where checking would wait on the
    device, its mean is NaN and its sum 0). Non-finite embeddings give a non-finite loss.
    """
    z, y = _rows_and_labels(z1, z2, labels)
    inv_tau = _checks.inverse_temperature("temperature", temperature, z.device)
    check_reduction(reduction)
    impl = _ext.resolve_impl(impl, z.device)
    n = z.shape[0]
    if gather:  # every rank's rows; without labels a sample's id is its index in the whole batch
        counts, first = distributed.rows_layout(n, z.device)
        if labels is None:
            y = y + first // 2
        y_all = distributed.all_gather(y, counts)
    else:
        counts, first, y_all = [n], 0, y
    classes_all = _classes(y_all)
    n_pos_all = _positive_counts(classes_all)
    classes, n_pos = classes_all[first : first + n], n_pos_all[first : first + n]
    if impl == "reference":
        z_all = distributed.all_gather(z, counts) if gather else z
        rows = reference.nt_xent_rows(z_all, classes_all, inv_tau)[first : first + n]
    else:
        # fp32 rows for every input dtype: the two terms of the gradient (softmax and positives)
        # nearly cancel, so they must meet in fp32 and be rounded to the input dtype once, after.
        # The LSE kernels get the input's own numbers x̃ and r = 1/‖x̃‖ rather than the unit rows,
        # which are no longer bf16 numbers: a bf16 input is multiplied on bf16 dot products exactly
        # (docs/design.md, "bf16 dot products on the CPU").
        x, r = scaled_rows(z, _checks.accumulate_dtype(z.dtype))
        zn = zn_all = None  # the unit rows r_i x̃_i, formed only where needed
        if gather or isinstance(inv_tau, Tensor):
            # this rank's rows against all, leaving out each row's own copy at first + i; the
            # two-tower op also carries ∂L/∂(1/τ) for a tensor temperature (without gather, the
            # symmetric kernel's halved work is traded for that gradient)
            zn = x * r[:, None]
            zn_all = distributed.all_gather(zn, counts) if gather else zn
            lse = info_nce_lse(zn, zn_all, inv_tau, False, first, impl)[0]
        else:
            lse = ntxent_lse(x, r, inv_tau, impl)
        if labels is None:  # SimCLR: each row's one positive is its other view, B rows away
            b = z1.shape[0]
            pos = (x * x.roll(b, 0)).sum(1) * (r * r.roll(b, 0))  # z_i·z_i' = r_i r_i' x̃_i·x̃_i'
        else:
            if zn is None:
                zn = zn_all = x * r[:, None]
            pos = _positive_mean(zn, classes, n_pos, zn_all, classes_all)
        rows = lse - inv_tau * pos
    if labels is not None and z.device.type == "cpu" and not torch.compiler.is_compiling():
        # reading the counts waits for them: done on CPU tensors only (on CUDA, and under
        # torch.compile, such a batch gives a NaN mean instead, 0/0)
        if not bool((n_pos_all > 0).any()):
            raise ValueError("labels: no row has a positive (every label occurs once)")
    rows = torch.where(n_pos > 0, rows, 0.0)
    return reduce_rows(rows, reduction, (n_pos_all > 0).sum(), gather)


def _rows_and_labels(z1, z2, labels) -> tuple[Tensor, Tensor]:
    """All rows [N, D] and each row's label (the sample's index in the batch without labels)."""
    _checks.features("z1", z1)
    if z2 is None:
        if labels is None:
            raise ValueError("labels is required when z2 is None: without a second view only labels give positives")
        return z1, _checks.labels("labels", labels, z1.shape[0], z1.device)
    _checks.features("z2", z2)
    _checks.like("z2", z2, "z1", z1)
    b = z1.shape[0]
    y = torch.arange(b, device=z1.device) if labels is None else _checks.labels("labels", labels, b, z1.device)
    return torch.cat([z1, z2]), y.repeat(2)


def _classes(y: Tensor) -> Tensor:
    """Each row's class as an index into [N]: the index of its label's first occurrence in sorted
    order. Static shape [N], so the op traces under torch.compile without data-dependent sizes
    (torch.unique would not)."""
    return torch.searchsorted(torch.sort(y).values, y)


def _positive_counts(classes: Tensor) -> Tensor:
    """|P(i)| = n_{c(i)} − 1, as float."""
    ones = torch.ones(classes.shape[0], device=classes.device)
    return torch.zeros_like(ones).index_add_(0, classes, ones)[classes] - 1


def _positive_mean(zn: Tensor, classes: Tensor, n_pos: Tensor, zn_all: Tensor, classes_all: Tensor) -> Tensor:
    """(1/|P(i)|) Σ_{p∈P(i)} z_i·z_p by (2) for the rows zn, with the class sums taken over all rows
    zn_all (every rank's under gather); 0 where |P(i)| = 0."""
    class_sums = torch.zeros_like(zn_all).index_add_(0, classes_all, zn_all)
    # index_select, whose backward is an index_add (advanced indexing's is an accumulating index_put, 5 × slower)
    return (zn * (class_sums.index_select(0, classes) - zn)).sum(1) / n_pos.clamp(min=1)
