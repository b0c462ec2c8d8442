"""Hard-negative mixing (MoCHi) and the memory queue it draws negatives from."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from fastssl import _checks, distributed
from fastssl.ops import mochi as ops

__all__ = ["MemoryQueue", "mochi_logits", "mochi_loss"]


def _reads_queue(fn):
    """The op `fn` with a queue given as a tensor or as a MemoryQueue (its filled rows, passed down)."""

    @functools.wraps(fn)
    def call(q: Tensor, k: Tensor, queue, **options) -> Tensor:
        return fn(q, k, queue.get() if isinstance(queue, MemoryQueue) else queue, **options)

    return call


mochi_logits = _reads_queue(ops.mochi_logits)
mochi_loss = _reads_queue(ops.mochi_loss)


class MemoryQueue(nn.Module):
    """First-in first-out queue of embeddings (MoCo's negatives), a ring buffer of `size` rows.

    The rows (and labels, with ``store_labels``) are registered buffers: ``state_dict`` saves
    them with the write position and fill count, ``.to()`` moves them. Pass the module itself as
    the ``queue`` of :func:`fastssl.mochi_loss`, which reads its filled rows.

    The loss keeps the queue's rows for its backward: enqueue after ``backward()`` (or pass
    ``queue.get().clone()``); enqueueing in between makes the backward raise autograd's
    "modified by an inplace operation" error rather than use the new rows.

    Example::

        queue = fastssl.MemoryQueue(65536, 128, device="cuda")
        loss = fastssl.mochi_loss(q, k, queue) if len(queue) else ...
        queue.enqueue(k, gather=True)  # under torch.distributed: every rank's keys, in rank order
    """

    def __init__(self, size: int, dim: int, *, dtype=torch.float32, device=None, store_labels: bool = False):
        super().__init__()
        size = _checks.integer("size", size, minimum=1)
        dim = _checks.integer("dim", dim, minimum=1)
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype {_checks.FLOAT_DTYPES}, got {dtype}")
        self.register_buffer("rows", torch.zeros(size, dim, dtype=dtype, device=device))
        labels = torch.full((size,), -1, dtype=torch.long, device=device) if store_labels else None
        self.register_buffer("row_labels", labels)
        self._next = 0  # where the next row goes
        self._filled = 0

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self._filled

    def get(self) -> Tensor:
        """The filled rows [len(self), dim], oldest first: a view of the buffer (later enqueues write
        into it) until the buffer wraps around, then a reordered copy."""
        return self._in_order(self.rows)

    @property
    def tensor(self) -> Tensor:
        """Same as :meth:`get`."""
        return self.get()

    @property
    def labels(self) -> Tensor | None:
        """The labels of the filled rows, oldest first; None for a queue built without ``store_labels``."""
        return None if self.row_labels is None else self._in_order(self.row_labels)

    def _in_order(self, buf: Tensor) -> Tensor:
        if self._filled < self.size:
            return buf[: self._filled]
        return buf if self._next == 0 else torch.cat([buf[self._next :], buf[: self._next]])

    @torch.no_grad()
    def enqueue(self, x: Tensor, labels: Tensor | None = None, gather: bool = False) -> None:
        """Appends the rows of x [n, dim] (detached), overwriting the oldest ones once the queue is full.

        labels: [n] integers, required by a queue with ``store_labels`` and refused by one without.
        gather: all-gather x (and labels) from every rank of the default torch.distributed process
            group first, in rank order, so that every rank's queue holds the same rows (ranks may
            pass different n). Needs an initialised process group. A rank whose input is refused
            makes every rank raise, rather than leaving the others waiting in the gather.
        A batch larger than the queue (after the gather) is refused rather than half written.
        """
        error = None
        try:
            self._check(x, labels)
        except (TypeError, ValueError) as exc:
            if not gather:
                raise
            error = exc
        if gather:
            n = -1 if error else x.shape[0]
            counts = distributed.row_counts(n, self.rows.device, what="MemoryQueue.enqueue(gather=True)")
            if error:
                raise error
            if min(counts) < 0:
                raise ValueError(f"rank {counts.index(-1)} refused its batch, so no rank enqueues")
            n = sum(counts)
        else:
            n = x.shape[0]
        if n > self.size:
            what = "the gathered batch has" if gather else "x has"
            raise ValueError(f"{what} {n} rows, more than the queue's size {self.size}")
        if gather:
            x = distributed.all_gather(x.detach(), counts)
            labels = None if labels is None else distributed.all_gather(labels, counts)
        start = self._next
        # a batch that runs past the end wraps around to the front
        head = min(n, self.size - start)
        for buf, new in ((self.rows, x), (self.row_labels, labels)):
            if buf is not None:
                buf[start : start + head] = new[:head]
                buf[: n - head] = new[head:]
        self._next = (start + n) % self.size
        self._filled = min(self.size, self._filled + n)

    def _check(self, x, labels) -> None:
        _checks.features("x", x)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} features (the queue's dim), got shape {tuple(x.shape)}")
        if x.dtype != self.rows.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the queue holds {self.rows.dtype}")
        if x.device != self.rows.device:
            raise ValueError(f"x is on {x.device} but the queue is on {self.rows.device}")
        if self.row_labels is None and labels is not None:
            raise ValueError("labels given to a queue that stores none (build it with store_labels=True)")
        if self.row_labels is not None:
            if labels is None:
                raise ValueError("this queue stores labels (store_labels=True): pass labels with x")
            _checks.labels("labels", labels, x.shape[0], x.device)

    def get_extra_state(self) -> dict:
        return {"next": self._next, "filled": self._filled}

    def set_extra_state(self, state: dict) -> None:
        nxt, filled = int(state["next"]), int(state["filled"])
        if not (0 <= filled <= self.size and 0 <= nxt < self.size and (filled == self.size or nxt == filled)):
            raise ValueError(f"inconsistent MemoryQueue state {state} for a queue of size {self.size}")
        self._next, self._filled = nxt, filled

    def extra_repr(self) -> str:
        labels = ", store_labels=True" if self.row_labels is not None else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.rows.dtype}, filled={self._filled}{labels}"
