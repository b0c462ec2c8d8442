"""torch.distributed helpers for losses whose local rows meet every rank's rows (``gather=True``).

With ``gather=True``, :func:`fastssl.info_nce` and :func:`fastssl.nt_xent` compute on each rank the
loss terms of its own rows against every rank's keys, gathered by :func:`all_gather` with
gradient. The convention, chosen so that nothing is counted twice:

* The value returned on every rank is the single-process loss on the concatenated batch (rank
  order), the same number on all ranks.
* Rank r's autograd graph holds its share of that loss: the sum of its rows' terms divided by the
  global row count (for ``reduction="mean"``). The shares add up to the loss, so gradients add up
  over ranks:

  - the gradients of the rank's own inputs (its queries, keys, embeddings) equal the single-process
    gradients of those rows exactly: the other ranks' shares reach them through the gather;
  - the gradient of a tensor that every rank holds a copy of (a learnable temperature, a MoCo
    queue passed as ``negatives``, and so the model's parameters) is this rank's share; the sum
    over ranks is the single-process gradient.

  ``DistributedDataParallel`` *averages* gradients over ranks, so scale the loss by the world size
  before ``backward()`` to train exactly as one process would on the whole batch.

The collectives use the tensors' device (CPU tensors with gloo, CUDA tensors with NCCL). Ranks may
hold different numbers of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def require_process_group(what: str = "gather=True") -> None:
    """Raises RuntimeError unless a torch.distributed process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun does not do it for you), or pass gather=False"
        )


def row_counts(n: int, device: torch.device, group=None, *, what: str = "gather=True") -> list[int]:
    """The number of rows of every rank, in rank order (one small all_gather); `what` names the
    caller in the error raised without a process group."""
    require_process_group(what)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return [int(c) for c in counts]


def rows_layout(n: int, device: torch.device, group=None) -> tuple[list[int], int]:
    """Every rank's row count, and where this rank's rows start in the concatenation."""
    counts = row_counts(n, device, group)
    return counts, sum(counts[: dist.get_rank(group)])


def all_gather(x: Tensor, counts: list[int] | None = None, group=None) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, with gradient.

    ``counts`` are the ranks' row counts (from :func:`row_counts`; found here when None), so ranks
    may hold different numbers of rows. Backward: every rank used every rank's rows, so the gradient
    of this rank's rows is the sum over ranks of the gradients of its slice of the result.
    """
    require_process_group()
    if counts is None:
        counts = row_counts(x.shape[0], x.device, group)
    return _AllGather.apply(x, counts, group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        # all_gather moves equal shapes: pad every rank's rows to the largest count
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad):
        # sum over ranks (all_reduce: reduce_scatter is missing from gloo), then this rank's slice
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None, None


def sum_over_ranks(x: Tensor, group=None) -> Tensor:
    """A tensor whose value is the sum of ``x`` over ranks and whose gradient is that of this rank's ``x``.

    The loss value every rank reports (the whole batch's) while its graph keeps its own share.
    """
    require_process_group()
    return _SumValue.apply(x, group)


class _SumValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def in_process_group() -> bool:
    """Whether a torch.distributed process group is initialised (the state updates that follow
    every rank's batch, fastssl.semisup, reduce over ranks only then)."""
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def mean_over_ranks(x: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """The mean over dim 0 of every rank's ``x`` concatenated, and that concatenation's row count
    (a 0-dim tensor of x's dtype), without gradient: batch statistics for a state that every rank
    keeps the same (EMAs of confidence, of class frequencies). One all_reduce of the row sums and
    the count, so ranks may hold different numbers of rows; without an initialised process group,
    x's own mean (computed the same way, as the sum over the count)."""
    packed = torch.cat([x.sum(0).flatten(), x.new_full((1,), x.shape[0])])
    if in_process_group():
        dist.all_reduce(packed, group=group)
    return (packed[:-1] / packed[-1]).view(x.shape[1:]), packed[-1]
