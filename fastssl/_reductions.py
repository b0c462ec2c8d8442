"""Reductions of per-row losses to the loss, shared by every op with a ``reduction=`` argument."""

from __future__ import annotations

from torch import Tensor

from fastssl import _checks, distributed

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction) -> str:
    """`reduction` is one of REDUCTIONS (ValueError naming it otherwise)."""
    return _checks.choice("reduction", reduction, REDUCTIONS)


def reduce_rows(rows: Tensor, reduction: str, count=None, gather: bool = False) -> Tensor:
    """Per-row losses reduced to the loss.

    "mean" divides the sum by `count`, the rows that count in the whole batch (all rows of `rows`
    when None); "none" returns `rows`. Under `gather` the value is summed over ranks
    (fastssl.distributed.sum_over_ranks) while each rank's graph keeps its own share.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if gather:
        total = distributed.sum_over_ranks(total)
    if reduction == "sum":
        return total
    return total / (rows.shape[0] if count is None else count)
