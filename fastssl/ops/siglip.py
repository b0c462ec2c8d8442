"""SigLIP (sigmoid image-text loss): checks, dispatch, autograd, and gathering across ranks.

With unit rows x_i (images, M), y_j (texts), logits l_ij = scale·x_i·y_j + bias and labels
z_ij = +1 on the positive j = i, −1 elsewhere (Zhai et al. 2023),

    ℓ_i = −Σ_j log σ(z_ij l_ij),   loss = (1/M) Σ_i ℓ_i                                      (1)

The row sums ℓ_i are the custom op `fastssl::siglip_rows`, one pass over the tiles run by the C++
kernel (csrc/cpu/siglip.cpp) or the Triton kernel (kernels/siglip.py), never an M×N matrix; its
backward `fastssl::siglip_rows_backward` is one more pass and returns the gradients of the rows,
of scale and of bias (docs/design.md, "SigLIP"). scale and bias enter as 0-dim tensors in the
accumulation dtype: the Triton kernels read them from device memory, so nothing waits for the
GPU, and their gradients are summed in the kernels from the fp32 tiles.

Across ranks (``gather=True``, fastssl/distributed.py): rank r's images meet every rank's texts,
gathered with gradient; the positive of its image i is text first_r + i, the other ranks' texts
are negatives only. Each row is complete on its rank, so the loss and gradients equal one process
on the concatenated batch.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext, distributed
from fastssl._reductions import check_reduction, reduce_rows
from fastssl.reference import siglip as reference


@torch.library.custom_op("fastssl::siglip_rows", mutates_args=())
def siglip_rows(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int, impl: str) -> Tensor:
    """ℓ_i = −Σ_j log σ(z_ij (scale·x_i·y_j + bias)) [M] for unit rows x [M, D], y [N, D], positives
    at j = i + offset; scale and bias 0-dim tensors in the accumulation dtype. fp32 (fp64 for fp64)."""
    kernel = _ext.kernel(impl, x.device, cpp="siglip_fwd_cpu", triton="siglip.siglip_fwd")
    return kernel(x, y, scale, bias, offset)


@siglip_rows.register_fake
def _(x, y, scale, bias, offset, impl):
    return x.new_empty(x.shape[0], dtype=_checks.accumulate_dtype(x.dtype))


@torch.library.custom_op("fastssl::siglip_rows_backward", mutates_args=())
def siglip_rows_backward(
    grad_row: Tensor, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """With A_ij = −g_i z_ij σ(−z_ij l_ij): (scale·A Y, scale·Aᵀ X) in the dtypes of x and y, and
    (Σ_ij A_ij x_i·y_j, Σ_ij A_ij) in the dtypes of scale and bias."""
    kernel = _ext.kernel(impl, x.device, cpp="siglip_bwd_cpu", triton="siglip.siglip_bwd")
    dx, dy, d_scale, d_bias = kernel(grad_row, x, y, scale, bias, offset)
    return dx, dy, d_scale.to(scale.dtype).reshape(scale.shape), d_bias.to(bias.dtype).reshape(bias.shape)


@siglip_rows_backward.register_fake
def _(grad_row, x, y, scale, bias, offset, impl):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, y, scale, bias, offset, impl = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.offset, ctx.impl = offset, impl


def _backward(ctx, grad_row):
    x, y, scale, bias = ctx.saved_tensors
    dx, dy, d_scale, d_bias = siglip_rows_backward(grad_row.contiguous(), x, y, scale, bias, ctx.offset, ctx.impl)
    return dx, dy, d_scale, d_bias, None, None


siglip_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastssl::siglip_fused", mutates_args=())
def siglip_fused(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, offset: int, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`siglip_rows` and, from the same pass over the tiles, `siglip_rows_backward` at grad_row = 1:
    (ℓ [M], dx, dy, dscale, dbias). The C++ kernel only; fp32 or fp64 rows."""
    return _ext.kernel(impl, x.device, cpp="siglip_fused_cpu")(x, y, scale, bias, offset)


@siglip_fused.register_fake
def _(x, y, scale, bias, offset, impl):
    grads = torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)
    return (x.new_empty(x.shape[0]), *grads)


def _fused_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.grads = output[1:]
    # the gradient outputs get no gradient: left None, not materialised as zeros of x's and y's size
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_row, *unused):
    """A mean or a sum passes the same g to every row: the gradients are g times those at g = 1,
    held since the forward. Any other grad_row (or create_graph) takes the backward pass, and so does
    a traced one (FakeTensor, FunctionalTensor), whose values cannot be compared."""
    if grad_row is None:  # the loss rows were not used
        return None, None, None, None, None, None
    g = grad_row.reshape(-1)[:1]
    if type(grad_row) is torch.Tensor and not torch.is_grad_enabled() and bool((grad_row == g).all()):
        dx, dy, d_scale, d_bias = (t * g.to(t.dtype).reshape(()) for t in ctx.grads)
        return dx, dy, d_scale.reshape(ctx.grads[2].shape), d_bias.reshape(ctx.grads[3].shape), None, None
    return _backward(ctx, grad_row)


siglip_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def siglip_loss(
    image: Tensor,
    text: Tensor,
    *,
    scale: float | Tensor = 10.0,
    bias: float | Tensor = -10.0,
    gather: bool = False,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """The SigLIP loss (1), equal to open_clip's ``SigLipLoss`` and big_vision's, without an M×N matrix.

    Args:
        image: [M, D] image embeddings.
        text: [M, D] text embeddings; text row i is the positive of image row i, every other row a
            negative.
        scale: the logit multiplier (open_clip's ``logit_scale``, already exponentiated), a float or
            a one-element tensor; when it requires grad its gradient is exact.
        bias: the logit bias, likewise.
        gather: under ``torch.distributed``, meet every rank's texts (other ranks' texts are
            negatives only): the loss and gradients are those of one process on the concatenated
            batch, as fastssl/distributed.py sets out.
        reduction: "mean" (the sum over rows divided by M, as SigLIP writes it), "sum", or "none"
            for the per-row losses ℓ_i [M].
        impl: "auto", "reference", "cpp" or "triton" (see README); $FASTSSL_IMPL overrides "auto".

    Rows are L2-normalised inside the op (a zero row stays zero). Neither scale nor bias is read on
    the host: a non-finite one gives a non-finite loss, as non-finite embeddings do. Accumulation is
    fp32 (fp64 for fp64 input) and the loss is fp32 for fp16/bf16/fp32 input.
    """
    _checks.features("image", image)
    _checks.features("text", text)
    _checks.like("text", text, "image", image)
    acc = _checks.accumulate_dtype(image.dtype)
    scale_t = _scalar_tensor("scale", scale, image.device, acc)
    bias_t = _scalar_tensor("bias", bias, image.device, acc)
    check_reduction(reduction)
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    impl = _ext.resolve_impl(impl, image.device)
    m = image.shape[0]
    counts, first = distributed.rows_layout(m, image.device) if gather else ([m], 0)
    if impl == "reference":
        texts = distributed.all_gather(text, counts) if gather else text
        rows = reference.siglip_rows(image, texts, scale_t, bias_t, first)
    else:
        # normalise in fp32; the kernel reads the rows in the input dtype
        xn, yn = (F.normalize(t.to(acc), dim=1).to(image.dtype) for t in (image, text))
        texts = distributed.all_gather(yn, counts) if gather else yn
        if _fuse_gradients(impl, reduction, xn, texts, scale_t, bias_t):
            rows = siglip_fused(xn, texts, scale_t, bias_t, first, impl)[0]
        else:
            rows = siglip_rows(xn, texts, scale_t, bias_t, first, impl)
    return reduce_rows(rows, reduction, sum(counts), gather)


def _fuse_gradients(impl: str, reduction: str, x: Tensor, *others: Tensor) -> bool:
    """Whether the forward also takes the gradients (`siglip_fused`, docs/design.md "SigLIP"): on the
    C++ kernel, for a mean or sum (one upstream number), when a gradient is wanted, on fp32/fp64 rows
    (bf16 gradients would be rounded before the upstream factor, then again), and not while
    torch.compile traces (the traced backward cannot compare the upstream values)."""
    return (
        impl == "cpp"
        and not torch.compiler.is_compiling()
        and reduction in ("mean", "sum")
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, *others))
        and x.dtype in (torch.float32, torch.float64)
    )


def _scalar_tensor(name: str, value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-dim tensor of `dtype` on `device`, carrying value's gradient when it is a tensor; a
    tensor's value is not read (no device sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.reshape(()).to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(float(value), dtype=dtype, device=device)
