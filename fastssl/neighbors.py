"""kNN evaluation, kNN pseudo-labels and k-means cluster pseudo-labels, on FAISS.

**Weighted kNN voting** (InstDisc, Wu et al. 2018; DINO, Caron et al. 2021). Rows are
L2-normalised, so s_qj = q·x_j is a cosine similarity. With N_k(q) the k train rows of highest
s_qj and T the temperature,

    score_c(q) = Σ_{j∈N_k(q), y_j=c} w_qj / Σ_{j∈N_k(q)} w_qj,     w_qj = exp(s_qj / T).     (1)

The denominator only rescales each query's row (the ranking of classes, hence top-1/top-5, is that
of the plain sums of DINO); it turns the scores into class probabilities, which is the confidence
of a pseudo-label, and it lets the weights be computed as exp((s_qj − max_j s_qj)/T) ≤ 1, which
cannot overflow at any T (exp(s/T) itself overflows fp32 for T < 1/88).

**Search** is exact (brute force), in fp32, over chunks of queries, so that memory beyond the
inputs and the result stays bounded (a chunk × N similarity block for the matmul; FAISS tiles
the similarities itself):

* CPU tensors, on a CPU that multiplies bf16 in hardware (AVX512-BF16 or AMX): fastssl's C++
  search (``impl="cpp"``, csrc/cpu/knn.cpp): the similarity tiles in bf16, which with a proven
  error bound leave a short list of candidates per query, whose similarities are then computed
  exactly in fp32 (docs/design.md, "kNN and k-means"): the same neighbours as the fp32 search.
* Other CPUs, or ``impl="faiss"``: FAISS's flat inner-product search (``faiss.knn``, the search of
  ``IndexFlatIP`` without copying the train rows into an index): BLAS tiles plus a heap per query.
* CUDA tensors with a faiss GPU build: ``faiss.knn_gpu`` (bfKnn) on the torch tensors themselves
  through ``faiss.contrib.torch_utils``, on torch's current stream: nothing goes to the host.
* CUDA tensors without a faiss GPU build, k above FAISS's GPU limit (2048), or no faiss
  installed: a matmul + topk on the tensors' device (``impl="torch"``).

**k-means** is scikit-learn's algorithm with FAISS's flat search for the assignments (docs/design.md,
"kNN and k-means"): rows rescaled by a power of two (k-means does not depend on scale; FAISS aborts
the process on |x| ≳ 1.8e19), greedy k-means++ seeding (2 + ⌊ln K⌋ candidates per seed, the best
kept), Lloyd's iterations with scikit-learn's relocation of empty clusters and its ``tol`` stop;
with ``gather=True`` the rows are sharded over ranks and only sums, counts and a few rows cross
them. **Cluster pseudo-labels** follow DeepCluster (Caron et al. 2018): k-means labels, an empty
cluster re-seeded by splitting the largest one in two, and sample weights inverse to the cluster
size, w_i = N / (K · n_{c(i)}), so that every cluster weighs N/K in total and the weights average 1.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks, _ext, _rows
from fastssl.distributed import all_gather, require_process_group, row_counts

__all__ = [
    "KNNClassifier",
    "cluster_metrics",
    "cluster_pseudo_labels",
    "kmeans",
    "knn_classify",
    "knn_pseudo_labels",
    "knn_search",
]

SEARCH_IMPLS = ("auto", "cpp", "faiss", "torch")
INITS = ("k-means++", "random")
MAX_CLASSES = 1 << 24  # classes of the dense [Q, C] kNN score table (a larger label raises ValueError)
FAISS_GPU_MAX_K = 2048  # faiss's GPU_MAX_SELECTION_K: bfKnn selects at most this many neighbours
TORCH_CHUNK_ELEMENTS = 1 << 25  # default torch chunk: chunk · N ≤ 2^25 similarities (128 MiB in fp32)
# Default FAISS chunk. FAISS tiles the similarities itself (FAISS_BLAS_BLOCKS at a time), so a chunk
# only bounds the outputs; below ~128000 / D queries per call (faiss ≥ 1.13) it skips BLAS, ~10× slower.
FAISS_CHUNK = 16384
FAISS_BLAS_BLOCKS = (1024, 8192)  # (queries, train rows) per BLAS block in FAISS's CPU search


# -- FAISS ---------------------------------------------------------------------------------------------------


def _import_faiss(required: bool = True):
    """The faiss module, or None when it is missing and not required."""
    try:
        import faiss
    except ImportError as exc:
        if not required:
            return None
        raise ImportError(
            "fastssl's kNN (impl='faiss') and k-means need faiss: pip install faiss-cpu, or install a faiss GPU "
            f"build (conda's faiss-gpu, or faiss-gpu-cu12) for CUDA tensors ({exc})"
        ) from exc
    return faiss


def _faiss_gpu(faiss) -> bool:
    """Whether this faiss build can run on the GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources():
    # One StandardGpuResources serves every device; it holds FAISS's temporary GPU memory (a stack of
    # up to ~1.5 GiB per device, allocated on first use outside torch's caching allocator) and cuBLAS
    # handles, so it is made once per process.
    return _import_faiss().StandardGpuResources()


def _device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _search_impl(impl: str, device: torch.device, k: int) -> str:
    """The search a call runs, "faiss" or "torch", for k neighbours on `device` (see the module docstring)."""
    _checks.choice("impl", impl, SEARCH_IMPLS)
    if impl == "torch":
        return impl
    if impl == "cpp" or (impl == "auto" and device.type == "cpu" and _cpp_search_fast()):
        return _ext.resolve_impl("cpp", device)  # raises on a CUDA tensor or without the extension
    faiss = _import_faiss(required=impl == "faiss")
    if faiss is None:
        return "torch"
    gpu = device.type == "cuda" and _faiss_gpu(faiss)
    if impl == "faiss":
        if gpu and k > FAISS_GPU_MAX_K:
            raise ValueError(
                f"k={k} neighbours (k + 1 with leave_one_out) is above faiss's GPU limit of {FAISS_GPU_MAX_K}; "
                "use impl='auto' or 'torch' (exact matmul + topk on the GPU)"
            )
        return impl
    if device.type == "cpu" or (gpu and k <= FAISS_GPU_MAX_K):
        return "faiss"
    return "torch"


def _cpp_search_fast() -> bool:
    """Whether the C++ search runs here at bf16 speed: the extension loaded, on a CPU with bf16
    dot products in hardware (elsewhere bf16 tiles are emulated and FAISS is faster)."""
    return _ext._C is not None and _ext._C.knn_bf16_dots_supported()


def _searcher(train: Tensor, k: int, impl: str):
    """A function query [q, D] -> (similarities, indices) [q, k], best first, for unit rows in fp32."""
    if impl == "torch":
        return lambda query: (query @ train.T).topk(k, dim=1)
    if impl == "cpp":
        search = _ext.kernel("cpp", train.device, cpp="knn_search_cpu")
        return lambda query: search(query.contiguous(), train, k)
    faiss = _import_faiss()
    device = train.device
    if device.type == "cuda" and _faiss_gpu(faiss):
        import faiss.contrib.torch_utils  # lets faiss.knn_gpu take torch CUDA tensors

        index = _device_index(device)

        def search_gpu(query):
            with torch.cuda.device(index):  # torch_utils syncs with torch's stream on the current device
                return faiss.knn_gpu(_gpu_resources(), query, train, k, metric=faiss.METRIC_INNER_PRODUCT, device=index)

        return search_gpu
    train_np = train.cpu().numpy()  # a view for CPU tensors; one copy for CUDA ones with a CPU-only faiss

    def search_cpu(query):
        # FAISS computes query × train similarities in BLAS blocks (4096 × 1024 by default) and keeps
        # each query's best k; 1024 × 8192 blocks were faster at 50000 × 10000 × 128 on 2 cores
        # (benchmarks/bench_neighbors.py, k = 200: 1814 → 1460 ms). The block sizes are process-wide
        # settings: set for the call, then restored.
        cvar = faiss.cvar
        saved = cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs
        cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = FAISS_BLAS_BLOCKS
        try:
            sims, idx = faiss.knn(query.cpu().numpy(), train_np, k, metric=faiss.METRIC_INNER_PRODUCT)
        finally:
            cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = saved
        return torch.from_numpy(sims).to(device), torch.from_numpy(idx).to(device)

    return search_cpu


# -- kNN -----------------------------------------------------------------------------------------------------


def _unit_features(name: str, x) -> Tensor:
    """Checked, detached, L2-normalised fp32 rows at any scale (a zero row stays zero).

    fp64 rows are normalised in fp64 and then rounded: a row of norm 1e300 or 1e-300 is a unit
    row, not a zero row (docs/design.md, "Numerics and inputs").
    """
    _checks.features(name, x)
    _checks.finite(name, x)
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()
    # Fast path (two passes over x): the plain norms are exact while no row's squared norm comes near
    # fp32's overflow or underflow; otherwise the scale-safe normalisation (four passes).
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if bool(((norms == 0) | ((norms > 1e-15) & (norms < 1e15))).all()):
        return (x / torch.where(norms > 0, norms, 1)).float().contiguous()
    return _rows.unit_rows(x).float().contiguous()


def _same_rows(query: Tensor, train: Tensor) -> bool:
    """Whether the queries are the train rows: the same tensor, a view of the same memory with the
    same layout, or a copy with equal values (one comparison, cheap next to the search)."""
    if query.shape != train.shape or query.dtype != train.dtype or query.device != train.device:
        return False
    same_view = query.data_ptr() == train.data_ptr() and query.stride() == train.stride()
    return query is train or same_view or torch.equal(query, train)


def _neighbor_chunks(train_feats, query_feats, k, chunk_size, leave_one_out, impl):
    """Checks the inputs, then returns an iterator of (start, similarities, indices) over query chunks."""
    train = _unit_features("train_feats", train_feats)
    query = _unit_features("query_feats", query_feats)
    _checks.like("query_feats", query, "train_feats", train, dims=[1])
    k = _checks.integer("k", k, minimum=1)
    n = train.shape[0]
    if leave_one_out and not _same_rows(query_feats, train_feats):
        raise ValueError(
            "leave_one_out=True needs the train set as query (row i of query_feats is sample i of train_feats): "
            f"query_feats (shape {tuple(query_feats.shape)}) is not train_feats (shape {tuple(train_feats.shape)})"
        )
    if k > n - leave_one_out:
        raise ValueError(
            f"k={k} is more than the {n - leave_one_out} train samples available"
            + (" (leave_one_out excludes each sample itself)" if leave_one_out else "")
        )
    if chunk_size is not None:
        _checks.integer("chunk_size", chunk_size, minimum=1)
    k_search = k + leave_one_out
    impl = _search_impl(impl, train.device, k_search)
    chunk = chunk_size or (FAISS_CHUNK if impl in ("cpp", "faiss") else max(1, TORCH_CHUNK_ELEMENTS // n))
    search = _searcher(train, k_search, impl)

    def chunks():
        for start in range(0, query.shape[0], chunk):
            sims, idx = search(query[start : start + chunk])
            if leave_one_out:
                sims, idx = _drop_self(sims, idx, start)
            yield start, sims, idx

    return chunks()


def _drop_self(sims: Tensor, idx: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """From k + 1 neighbours of queries start, start+1, ... (the train rows themselves), the k others.

    Each row drops its own index; a row whose own index is not among the k + 1 (exact duplicates
    tie with it) drops its farthest neighbour instead, which leaves the k nearest others all the same.
    """
    rows = torch.arange(start, start + idx.shape[0], device=idx.device)
    drop = idx == rows[:, None]
    drop[:, -1] |= ~drop.any(1)
    keep = ~drop
    k = idx.shape[1] - 1
    return sims[keep].view(-1, k), idx[keep].view(-1, k)


def _class_labels(name: str, y, n: int, device: torch.device, num_classes) -> int:
    """Checks labels in [0, num_classes) and returns num_classes (max label + 1 when None).

    The scores are a dense [Q, C] table: C above MAX_CLASSES raises ValueError (relabel classes to
    0..C−1 with ``torch.unique(labels, return_inverse=True)``)."""
    _checks.labels(name, y, n, device)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got a label {lo}")
    if num_classes is not None:
        num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        if num_classes > MAX_CLASSES:
            raise ValueError(f"num_classes={num_classes} is above {MAX_CLASSES} (the scores are a dense [Q, C] table)")
    if hi >= (num_classes or MAX_CLASSES):
        bound = f"num_classes={num_classes}" if num_classes else f"{MAX_CLASSES} (the scores are a dense [Q, C] table)"
        raise ValueError(
            f"{name} has a label {hi}, which is not below {bound}; relabel with torch.unique(..., return_inverse=True)"
        )
    return num_classes or hi + 1


def _vote(sims: Tensor, idx: Tensor, train_labels: Tensor, num_classes: int, inv_tau: float) -> Tensor:
    """Scores (1) [q, C] from the neighbours' similarities and indices [q, k]."""
    weights = torch.exp((sims - sims.amax(1, keepdim=True)) * inv_tau)  # exp(s/T) up to a factor per row
    scores = sims.new_zeros(sims.shape[0], num_classes).scatter_add_(1, train_labels[idx], weights)
    return scores / weights.sum(1, keepdim=True)


def _score_chunks(train_feats, train_labels, query_feats, k, temperature, num_classes, chunk_size, leave_one_out, impl):
    """Checks the inputs, then returns (iterator of (start, scores [q, C]) over query chunks, C)."""
    inv_tau = 1.0 / _checks.positive("temperature", temperature)
    neighbors = _neighbor_chunks(train_feats, query_feats, k, chunk_size, leave_one_out, impl)  # checks the feats
    num_classes = _class_labels("train_labels", train_labels, train_feats.shape[0], train_feats.device, num_classes)
    labels = train_labels.long()
    chunks = ((start, _vote(sims, idx, labels, num_classes, inv_tau)) for start, sims, idx in neighbors)
    return chunks, num_classes


def knn_search(
    train_feats: Tensor,
    query_feats: Tensor,
    *,
    k: int = 20,
    chunk_size: int | None = None,
    leave_one_out: bool = False,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine neighbours of each query among the train rows.

    Args:
        train_feats: [N, D] train (database) features, any float dtype.
        query_feats: [Q, D] query features, on the same device.
        k: neighbours per query, 1 ≤ k ≤ N (N − 1 with ``leave_one_out``); a larger k raises ValueError.
        chunk_size: queries per search call. None picks 16384 for the C++ search and FAISS (which
            tile the similarities themselves; fewer than ~128000 / D queries per call make FAISS
            skip BLAS) and 2^25 / N for the matmul + topk (a 128 MiB similarity block).
        leave_one_out: the queries are the train rows (row i of ``query_feats`` is sample i of
            ``train_feats``) and each sample is left out of its own neighbours.
        impl: "auto" (on CPU tensors the C++ search where the CPU has bf16 dot products, else
            FAISS; on CUDA tensors FAISS with a faiss GPU build, else a matmul + topk), "cpp" (the
            C++ search, CPU tensors: bf16 candidates, exact fp32 ranking), "faiss" (FAISS always; on
            CUDA tensors without a faiss GPU build the search copies to the host and back, and k
            above FAISS's GPU limit of 2048 raises ValueError), or "torch" (matmul + topk on the
            device).

    Returns:
        (similarities [Q, k] fp32, indices [Q, k] int64) on the queries' device, best first.
        Rows are L2-normalised first (a zero row stays zero and has similarity 0 to everything);
        the search runs in fp32. Non-finite features raise ValueError. Tied similarities come in
        any order.
    """
    chunks = list(_neighbor_chunks(train_feats, query_feats, k, chunk_size, leave_one_out, impl))
    return torch.cat([sims for _, sims, _ in chunks]), torch.cat([idx for _, _, idx in chunks])


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    query_feats: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    leave_one_out: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Weighted kNN class scores of each query (InstDisc / DINO kNN evaluation).

    Each query's k nearest train rows (cosine similarity s) vote for their class with weight
    exp(s/T); the scores are the votes per class divided by the query's total, so a row sums to 1
    (class probabilities) and ``scores.argmax(1)`` is the prediction.

    Args:
        train_feats: [N, D] features of the labelled samples.
        train_labels: [N] integer labels in [0, num_classes).
        query_feats: [Q, D] features to classify.
        k: neighbours per query (20, as in DINO); above N (N − 1 with ``leave_one_out``) raises ValueError.
        temperature: T > 0 (0.07 as in InstDisc / DINO); weights never overflow, at any T.
        num_classes: C; None takes max(train_labels) + 1.
        chunk_size, leave_one_out, impl: see :func:`knn_search`.

    Returns:
        scores [Q, C] fp32 on the queries' device.
    """
    chunks, _ = _score_chunks(
        train_feats, train_labels, query_feats, k, temperature, num_classes, chunk_size, leave_one_out, impl
    )
    return torch.cat([scores for _, scores in chunks])


def knn_pseudo_labels(
    labeled_feats: Tensor,
    labels: Tensor,
    unlabeled_feats: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    threshold: float = 0.0,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Pseudo-labels of unlabelled samples by weighted kNN voting among the labelled ones.

    Returns (pseudo_labels [U] int64, confidence [U] fp32): the class of highest score of
    :func:`knn_classify` and that score (its share of the neighbours' vote, in (0, 1]). A sample
    whose confidence is below ``threshold`` (in [0, 1]) gets the label -1; the default 0 labels
    every sample.
    """
    if isinstance(threshold, Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number in [0, 1], got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    threshold = float(threshold)
    scores = knn_classify(
        labeled_feats,
        labels,
        unlabeled_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        impl=impl,
    )
    confidence, pseudo = scores.max(1)
    return torch.where(confidence >= threshold, pseudo, -1), confidence


class KNNClassifier:
    """Weighted kNN accuracy on frozen features, accumulated over batches.

    Example::

        knn = fastssl.KNNClassifier(k=20, temperature=0.07)
        for x, y in train_loader:
            knn.update(train_feats=model(x), train_labels=y)
        for x, y in val_loader:
            knn.update(test_feats=model(x), test_labels=y)
        top1, top5 = knn.compute()
        knn.reset()

    Features are kept (detached, in their dtype and on their device) until :meth:`reset`;
    :meth:`compute` scores the test rows in chunks (see :func:`knn_classify`) and returns the
    top-1 and top-5 accuracy as fractions in [0, 1] (top-5 is top-C when there are C < 5 classes).
    One process: under DDP, gather the features of every rank before :meth:`compute`.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, *, chunk_size: int | None = None, impl: str = "auto"):
        self.k = _checks.integer("k", k, minimum=1)
        self.temperature = _checks.positive("temperature", temperature)
        self.chunk_size = chunk_size
        self.impl = _checks.choice("impl", impl, SEARCH_IMPLS)
        self.reset()

    def reset(self) -> None:
        """Forgets every feature and label seen."""
        self._store: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "test": []}

    def update(
        self,
        train_feats: Tensor | None = None,
        train_labels: Tensor | None = None,
        test_feats: Tensor | None = None,
        test_labels: Tensor | None = None,
    ) -> None:
        """Adds a batch of train and/or test features [B, D] with their labels [B]."""
        for split, feats, labels in (("train", train_feats, train_labels), ("test", test_feats, test_labels)):
            if feats is None and labels is None:
                continue
            if feats is None or labels is None:
                raise ValueError(f"{split}_feats and {split}_labels must be given together")
            _checks.features(f"{split}_feats", feats)
            _checks.labels(f"{split}_labels", labels, feats.shape[0], feats.device)
            seen = self._store["train"] + self._store["test"]
            if seen:
                _checks.like(f"{split}_feats", feats, "the features seen before", seen[0][0], dims=[1])
            self._store[split].append((feats.detach(), labels.detach()))

    def compute(self) -> tuple[float, float]:
        """(top-1, top-5) accuracy of the test features seen so far against the train features."""
        for split in ("train", "test"):
            if not self._store[split]:
                raise ValueError(f"KNNClassifier has no {split} features: call update({split}_feats=..., ...) first")
        train_feats, train_labels = (torch.cat(t) for t in zip(*self._store["train"], strict=True))
        test_feats, test_labels = (torch.cat(t) for t in zip(*self._store["test"], strict=True))
        _checks.like("test_feats", test_feats, "train_feats", train_feats, dims=[1])
        num_classes = max(
            _class_labels("test_labels", test_labels, test_labels.shape[0], test_feats.device, None),
            _class_labels("train_labels", train_labels, train_labels.shape[0], train_feats.device, None),
        )
        chunks, _ = _score_chunks(
            train_feats, train_labels, test_feats, self.k, self.temperature, num_classes, self.chunk_size,
            False, self.impl,
        )  # fmt: skip
        top1 = top5 = 0
        for start, scores in chunks:
            target = test_labels[start : start + scores.shape[0]].long()
            hits = scores.topk(min(5, num_classes), dim=1).indices == target[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(1).sum())
        n = test_labels.shape[0]
        return top1 / n, top5 / n

    def __repr__(self) -> str:
        return f"KNNClassifier(k={self.k}, temperature={self.temperature}, impl={self.impl!r})"


# -- k-means and clusters ------------------------------------------------------------------------------------


class _Shards:
    """The rows x [n, D] of this process, and with ``gathered`` those of every rank of the default
    process group (the data set is their concatenation in rank order): sums over ranks, rows by
    their index in the whole data set, and the whole data set's row count. Nothing but sums of
    [K, D]-sized tensors and a few rows ever crosses ranks (docs/design.md, "kNN and k-means")."""

    def __init__(self, x: Tensor, gathered: bool):
        self.x, self.gathered = x, gathered
        counts = row_counts(x.shape[0], x.device, what="kmeans(gather=True)") if gathered else [x.shape[0]]
        self.rank = dist.get_rank() if gathered else 0
        self.counts, self.start, self.total = counts, sum(counts[: self.rank]), sum(counts)

    def sum(self, t: Tensor) -> Tensor:
        """t summed over ranks (t itself in one process)."""
        if self.gathered:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def per_rank(self, value: Tensor) -> Tensor:
        """[world] tensor of every rank's one-element ``value``, in rank order."""
        out = value.new_zeros(len(self.counts))
        out[self.rank] = value
        return self.sum(out)

    def rows(self, index: Tensor) -> Tensor:
        """Rows of the whole data set by global index [m] -> [m, D], on every rank."""
        local = index - self.start
        mine = (local >= 0) & (local < self.x.shape[0])
        out = self.x.new_zeros(index.shape[0], self.x.shape[1])
        out[mine] = self.x[local[mine]]
        return self.sum(out)

    def sample(self, weights: Tensor, u: Tensor) -> Tensor:
        """Global indices [m] of the rows drawn with probability ∝ weights (this rank's [n]) by
        the uniform numbers u [m] in [0, Σ weights): the first row whose running sum reaches u, in
        rank order (numpy's searchsorted over the concatenated cumulative sum, as scikit-learn)."""
        cum = weights.cumsum(0, dtype=torch.float64)
        totals = self.per_rank(cum[-1])
        ends = totals.cumsum(0)
        owner = torch.searchsorted(ends, u).clamp_(max=len(self.counts) - 1)
        local = torch.searchsorted(cum, u - (ends[self.rank] - totals[self.rank])).clamp_(max=cum.shape[0] - 1)
        picked = torch.where(owner == self.rank, local + self.start, 0)
        return self.sum(picked)


def _sq_distances(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    """‖x_i − c_j‖² [n, m] = ‖x_i‖² + ‖c_j‖² − 2 x_i·c_j (one GEMM), clamped at 0."""
    return torch.addmm(x_sq[:, None], x, c.T, alpha=-2).add_((c * c).sum(1)).clamp_(min=0)


def _seed_kmeans_plusplus(shards: _Shards, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's ``kmeans_plusplus``): [k, D] seeds.

    The first seed is a uniformly drawn row. Each next one: draw 2 + ⌊ln k⌋ candidate rows with
    probability ∝ D²(x) (the squared distance to the nearest seed so far), keep the candidate that
    leaves the smallest potential Σ_x min(D²(x), ‖x − c‖²). Per step one [L, n] GEMM and one sum over
    ranks of the L potentials; the random numbers come from ``gen``, seeded alike on every rank.

    The step is bound by reading x once (L ≈ 8 dot products per row): on CPU tensors it is one fused
    pass over x (:func:`_trial_potentials`), which writes the L candidate rows of D² into one
    preallocated [L, n] buffer; the kept row is the next D².
    """
    x = shards.x
    trials = 2 + int(math.log(k))
    first = torch.randint(shards.total, (1,), generator=gen).to(x.device)
    seeds = x.new_empty(k, x.shape[1])
    seeds[0] = shards.rows(first)[0]
    d2 = _sq_distances(x, x_sq, seeds[:1])[:, 0]
    potential = shards.sum(d2.sum(dtype=torch.float64))
    d2_trials = x.new_empty(trials, x.shape[0])
    for j in range(1, k):
        u = (torch.rand(trials, generator=gen, dtype=torch.float64) * potential.cpu()).to(x.device)
        candidates = shards.rows(shards.sample(d2, u))
        potentials = shards.sum(_trial_potentials(x, x_sq, d2, candidates, d2_trials))
        best = int(potentials.argmin())
        seeds[j], d2, potential = candidates[best], d2_trials[best].clone(), potentials[best]
    return seeds


def _trial_potentials(x: Tensor, x_sq: Tensor, d2: Tensor, candidates: Tensor, out: Tensor) -> Tensor:
    """One greedy k-means++ step: writes min(D²(x), ‖x − c_l‖²) into out [L, n] (row l for candidate
    l) and returns the potentials, its row sums [L] in fp64.

    On CPU tensors one fused pass over x in C++ (csrc/cpu/kmeans.cpp: the dot products, the minimum
    and the sums while a row is in L1; sums in an order that does not depend on the thread count);
    elsewhere, or without the extension, ‖x − c‖² = ‖c‖² − 2 c·x + ‖x‖² as one GEMM into out, then
    the clamp at 0, the minimum with D² and the sums as contiguous passes over its rows."""
    if x.device.type == "cpu" and _ext.CPP_ERROR is None and _ext.env_impl() in ("auto", "cpp"):
        return _ext.kernel("cpp", x.device, cpp="kmeans_pp_step_cpu")(
            x, x_sq.contiguous(), d2.contiguous(), candidates.contiguous(), out
        )
    torch.addmm((candidates * candidates).sum(1, keepdim=True), candidates, x.T, alpha=-2, out=out)
    out.add_(x_sq).clamp_(min=0)
    torch.minimum(out, d2, out=out)
    return out.sum(1, dtype=torch.float64)


def _nearest(x: Tensor, centroids: Tensor, spherical: bool) -> tuple[Tensor, Tensor]:
    """(squared distance, or similarity when spherical [n] fp32, index [n] int64) of each row's nearest
    centroid: FAISS's flat search on the CPU and on CUDA with a faiss GPU build, else a GEMM + argmin."""
    faiss = _import_faiss(required=False)
    if faiss is not None and not (x.is_cuda and not _faiss_gpu(faiss)):
        metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
        if x.is_cuda:
            import faiss.contrib.torch_utils  # faiss.knn_gpu on torch CUDA tensors

            with torch.cuda.device(_device_index(x.device)):
                dist_, idx = faiss.knn_gpu(_gpu_resources(), x, centroids, 1, metric=metric)
            return dist_[:, 0], idx[:, 0]
        dist_, idx = faiss.knn(x.numpy(), centroids.numpy(), 1, metric=metric)
        return torch.from_numpy(dist_[:, 0]), torch.from_numpy(idx[:, 0])
    out = []
    for chunk in x.split(max(1, TORCH_CHUNK_ELEMENTS // centroids.shape[0])):
        s = chunk @ centroids.T if spherical else _sq_distances(chunk, (chunk * chunk).sum(1), centroids)
        out.append(s.max(1) if spherical else s.min(1))
    return torch.cat([v for v, _ in out]), torch.cat([i for _, i in out])


def _lloyd(shards: _Shards, centroids: Tensor, niter: int, tol: float, spherical: bool) -> tuple[Tensor, Tensor]:
    """Lloyd's iterations as scikit-learn's ``KMeans`` runs them (docs/design.md, "kNN and k-means"):
    each assigns the rows to the nearest centroid and moves every centroid to its cluster's mean
    (its normalised sum when spherical); an empty cluster takes the row farthest from its centroid.
    Stops after ``niter`` iterations, when no label changed, or when Σ‖Δc‖² ≤ tol · mean_d Var(x_d).
    Returns the centroids and the assignments to them."""
    x = shards.x
    k, d = centroids.shape
    moments = shards.sum(torch.stack([x.sum(0, dtype=torch.float64), (x * x).sum(0, dtype=torch.float64)]))
    mean = moments[0] / shards.total
    tol_abs = tol * float((moments[1] / shards.total - mean**2).clamp(min=0).mean())
    labels = None
    for _ in range(niter):
        score, new_labels = _nearest(x, centroids, spherical)
        changed = shards.sum(
            torch.tensor(x.shape[0] if labels is None else int((labels != new_labels).sum()), device=x.device)
        )
        labels = new_labels.to(x.device)
        if int(changed) == 0:  # strict convergence: these labels are those of the centroids too
            return centroids, labels
        sums = shards.sum(torch.zeros(k, d, device=x.device).index_add_(0, labels, x))
        counts = shards.sum(torch.bincount(labels, minlength=k))
        if bool((counts == 0).any()):
            far = (1 - score if spherical else score).to(x.device)  # how far each row is from its centroid
            sums, counts = _relocate_empty(shards, far, labels, sums, counts)
        new = F.normalize(sums, dim=1) if spherical else sums / counts.clamp(min=1)[:, None].to(sums.dtype)
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol_abs:
            break
    return centroids, _nearest(x, centroids, spherical)[1].to(x.device)


def _relocate_empty(shards: _Shards, far: Tensor, labels: Tensor, sums: Tensor, counts: Tensor):
    """scikit-learn's relocation: the e-th empty cluster takes the e-th row farthest from its centroid,
    which leaves its cluster (the rows of the whole data set: each rank offers its farthest)."""
    empty = (counts == 0).nonzero().flatten()
    e = min(empty.numel(), far.shape[0])
    top = far.sort(descending=True, stable=True).indices[:e]  # ties by row order, as the merge below
    cand = [far[top], shards.x[top], labels[top].double(), (top + shards.start).double()]
    if shards.gathered:
        cand = [all_gather(c, [min(e, n) for n in shards.counts]) for c in cand]
    # farthest first, then by global index (ties broken alike on every rank)
    order = sorted(range(cand[0].shape[0]), key=lambda i: (-float(cand[0][i]), float(cand[3][i])))
    sums, counts = sums.clone(), counts.clone()
    for cluster, i in zip(empty.tolist(), order, strict=False):
        old = int(cand[2][i])
        sums[old] -= cand[1][i]
        counts[old] -= 1
        sums[cluster], counts[cluster] = cand[1][i], 1
    return sums, counts


def _times_power_of_two(x: Tensor, e: int) -> Tensor:
    """x · 2^e, exact, in two factors that are each a normal number of x's dtype."""
    half = e // 2
    return x * 2.0**half * 2.0 ** (e - half)


def _scaled_rows(feats: Tensor) -> tuple[Tensor, int]:
    """fp32 rows x · 2^−e with max |x| in [1/2, 1), and e (k-means does not depend on the scale).

    FAISS squares the rows in fp32: at |x| ≳ 1.8e19 the squared norms overflow and FAISS throws
    inside an OpenMP region, which aborts the process; at |x| ≲ 1e-19 they underflow. Scaling by a
    power of two is exact."""
    x = feats if feats.dtype == torch.float64 else feats.float()
    peak = float(x.abs().max())
    e = math.frexp(peak)[1] if peak > 0 else 0
    return _times_power_of_two(x, -e).float().contiguous(), e


def _kmeans_inputs(feats, num_clusters, niter, tol, spherical, seed, init, gather):
    """Checks the inputs (every rank agrees before any raises, so that no rank waits for another in a
    collective) and returns (shards of fp32 rows, e with feats = rows · 2^e, K, niter, tol, seed)."""
    if gather:
        require_process_group("kmeans(gather=True)")
    error = None
    try:
        _checks.finite("feats", _checks.features("feats", feats))
        num_clusters = _checks.integer("num_clusters", num_clusters, minimum=1)
        niter = _checks.integer("niter", niter, minimum=1)
        tol = _checks.nonnegative("tol", tol)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        if not 0 <= seed < 2**31:
            raise ValueError(f"seed must be in [0, 2^31), got {seed}")
        _checks.choice("init", init, INITS)
    except (TypeError, ValueError) as exc:
        error = exc
    if gather:
        device = feats.device if isinstance(feats, Tensor) else torch.device("cpu")
        d = feats.shape[-1] if error is None else 0
        flags = torch.tensor([error is not None, d, -d], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if error is None and flags[0]:
            error = ValueError("gather=True: another rank's feats or arguments were refused (see its error)")
        elif error is None and int(flags[1]) != -int(flags[2]):
            error = ValueError(f"gather=True: feats has {d} features here but not on every rank")
    if error is not None:
        raise error
    if spherical:
        x, exponent = _unit_features("feats", feats), 0
    else:
        x, exponent = _scaled_rows(feats.detach())
    shards = _Shards(x, gather)
    if num_clusters > shards.total:
        raise ValueError(f"num_clusters={num_clusters} is more than the {shards.total} samples")
    return shards, exponent, num_clusters, niter, tol, int(seed)


def _kmeans(shards: _Shards, num_clusters: int, niter: int, tol: float, spherical: bool, seed: int, init: str):
    """(centroids [K, D] fp32, this rank's assignments [n] int64) of the scaled (or unit) rows."""
    gen = torch.Generator().manual_seed(seed)
    if init == "random":  # K distinct rows drawn uniformly (FAISS's and DeepCluster's seeding)
        seeds = shards.rows(torch.randperm(shards.total, generator=gen)[:num_clusters].to(shards.x.device))
    else:
        seeds = _seed_kmeans_plusplus(shards, (shards.x * shards.x).sum(1), num_clusters, gen)
    if spherical:
        seeds = F.normalize(seeds, dim=1)
    return _lloyd(shards, seeds, niter, tol, spherical)


def kmeans(
    feats: Tensor,
    num_clusters: int,
    *,
    niter: int = 20,
    tol: float = 1e-4,
    spherical: bool = False,
    seed: int = 0,
    init: str = "k-means++",
    gather: bool = False,
) -> tuple[Tensor, Tensor]:
    """k-means: (centroids [K, D], assignments [N] int64) on the features' device.

    Args:
        feats: [N, D] features, any float dtype (clustered in fp32, at any scale); non-finite values
            raise ValueError. With ``gather``, this rank's rows of the data set.
        num_clusters: K, 1 ≤ K ≤ N (N of the whole data set with ``gather``).
        niter: at most this many Lloyd iterations (scikit-learn's ``max_iter``).
        tol: relative tolerance, as scikit-learn's: stop once the centroids move by Σ‖Δc‖² ≤
            tol · (mean variance of the features); 0 stops only when no label changes.
        spherical: cosine k-means: rows and centroids L2-normalised, assignment by inner product;
            the centroids returned are unit vectors.
        seed: seeds the initialisation; equal inputs and seed give equal results.
        init: "k-means++" (greedy k-means++, scikit-learn's default seeding: 2 + ⌊ln K⌋ candidates
            per seed, the best kept) or "random" (K distinct rows, DeepCluster's and FAISS's default).
        gather: the data set is the concatenation of every rank's ``feats`` (torch.distributed's
            default group; CPU tensors with gloo, CUDA ones with NCCL): seeding and iterations reduce
            sums and counts over ranks, every rank gets the same centroids and its own rows'
            assignments, equal to one process's on the concatenated features. No rank holds the others' rows.

    The centroids are fp32 (fp64 for fp64 features). Assignments run on FAISS's flat search (on the
    GPU with a faiss GPU build; a GEMM + argmin on CUDA tensors without one). An empty cluster takes
    the row farthest from its centroid; the final assignment can still leave one empty when rows
    repeat (see :func:`cluster_pseudo_labels`).
    """
    shards, exponent, num_clusters, niter, tol, seed = _kmeans_inputs(
        feats, num_clusters, niter, tol, spherical, seed, init, gather
    )
    centroids, labels = _kmeans(shards, num_clusters, niter, tol, bool(spherical), seed, init)
    dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
    return _times_power_of_two(centroids.to(dtype), exponent).to(feats.device), labels.to(feats.device)


def _reseed_empty(shards: _Shards, labels: Tensor, num_clusters: int, seed: int) -> Tensor:
    """Gives each empty cluster half of the then-largest one, split at the median of a random projection.

    DeepCluster re-seeds an empty cluster next to a non-empty one and splits that one's points
    between the two; splitting by rank, as here, stays exact when rows repeat (their centroids
    would tie). N ≥ K guarantees the largest cluster has two or more rows whenever one is empty.
    With ``gather`` the projections of the split cluster's rows (one number per row) are gathered.
    """
    x = shards.x
    counts = shards.sum(torch.bincount(labels, minlength=num_clusters))
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    gen = torch.Generator().manual_seed(seed)
    for e in empty:
        c = int(counts.argmax())
        members = (labels == c).nonzero().flatten()
        direction = torch.randn(x.shape[1], generator=gen).to(x.device)
        proj = x[members].double() @ direction.double()  # fp64: equal rows project equally
        if shards.gathered:
            member_counts = shards.per_rank(torch.tensor(members.numel(), device=x.device)).tolist()
            start = sum(member_counts[: shards.rank])
            proj = all_gather(proj, member_counts)
        else:
            start = 0
        moved = torch.zeros(proj.shape[0], dtype=torch.bool, device=x.device)
        moved[proj.argsort(stable=True)[proj.shape[0] // 2 :]] = True  # the upper half, ties by row order
        labels[members[moved[start : start + members.numel()]]] = e
        counts[c] -= int(moved.sum())
        counts[e] = int(moved.sum())
    return labels


def cluster_pseudo_labels(
    feats: Tensor,
    num_clusters: int,
    *,
    niter: int = 20,
    tol: float = 1e-4,
    spherical: bool = False,
    seed: int = 0,
    init: str = "k-means++",
    gather: bool = False,
) -> tuple[Tensor, Tensor]:
    """DeepCluster pseudo-labels: (labels [N] int64, sample_weights [N] fp32) on the features' device.

    The labels are :func:`kmeans` assignments (same arguments) with every cluster non-empty: an
    empty one is re-seeded with half of the largest cluster. The weights are inverse to the
    cluster size, w_i = N / (K · n_{c(i)}): each cluster weighs N/K in total (DeepCluster's
    balancing, as its uniform sampling over clusters) and the weights average 1, so a loss
    ``(w * per_sample_loss).mean()`` keeps its scale. With ``gather``, N and the cluster sizes are
    those of the whole data set, and each rank gets its own rows' labels and weights.
    """
    shards, _, num_clusters, niter, tol, seed = _kmeans_inputs(
        feats, num_clusters, niter, tol, spherical, seed, init, gather
    )
    _, labels = _kmeans(shards, num_clusters, niter, tol, bool(spherical), seed, init)
    labels = _reseed_empty(shards, labels, num_clusters, seed)
    counts = shards.sum(torch.bincount(labels, minlength=num_clusters)).float()
    return labels.to(feats.device), (shards.total / (num_clusters * counts[labels])).to(feats.device)


def cluster_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Agreement of a clustering with the true classes: {"nmi", "ari", "acc"} as Python floats.

    With n_ij the contingency table (samples in cluster i and class j), a_i, b_j its row and column
    sums and N the number of samples:

    * nmi: normalised mutual information, MI / mean(H(pred), H(target)) (scikit-learn's
      arithmetic normalisation; 1 when both are a single cluster);
    * ari: adjusted Rand index (Hubert & Arabie), computed from the pair counts as scikit-learn does;
    * acc: Hungarian accuracy, max over one-to-one maps of clusters to classes of the fraction of
      samples mapped to their class (``scipy.optimize.linear_sum_assignment``; needs scipy).

    Labels are any integers (relabelling either side changes nothing); pred and target are [N]
    integer tensors on the same device. The table is dense, (#clusters × #classes) int64, on the CPU.
    """
    n = pred.numel() if isinstance(pred, Tensor) else 0
    _checks.labels("pred", pred, n, getattr(pred, "device", None))
    _checks.labels("target", target, n, pred.device)
    if n == 0:
        raise ValueError("pred and target are empty")
    _, p = torch.unique(pred.cpu(), return_inverse=True)
    _, t = torch.unique(target.cpu(), return_inverse=True)
    table = torch.zeros(int(p.max()) + 1, int(t.max()) + 1, dtype=torch.int64)
    table.index_put_((p, t), torch.ones_like(p), accumulate=True)
    return {"nmi": _nmi(table), "ari": _ari(table), "acc": _hungarian_accuracy(table)}


def _nmi(table: Tensor) -> float:
    if table.shape == (1, 1):
        return 1.0
    nij = table.double()
    n = nij.sum()
    a, b = nij.sum(1), nij.sum(0)
    nz = nij > 0
    # MI = Σ_ij (n_ij/N) log(N n_ij / (a_i b_j));  H(a) = −Σ_i (a_i/N) log(a_i/N)
    mi = (nij[nz] / n * torch.log(n * nij[nz] / torch.outer(a, b)[nz])).sum().clamp(min=0)
    h_a, h_b = (-(v / n * torch.log(v / n)).sum() for v in (a, b))
    if mi <= 1e-15:
        return 0.0
    return float(mi / torch.clamp((h_a + h_b) / 2, min=torch.finfo(torch.float64).eps))


def _ari(table: Tensor) -> float:
    # Pairs of samples: tp together in both, fp/fn together in one only, tn apart in both
    # (Python integers: the products exceed int64 for N ≳ 10^5).
    n = int(table.sum())
    sum_sq = int((table**2).sum())
    together_pred = int((table.sum(1) ** 2).sum()) - sum_sq
    together_true = int((table.sum(0) ** 2).sum()) - sum_sq
    tp, fp, fn = sum_sq - n, together_pred, together_true
    tn = n * n - fp - fn - sum_sq
    if fp == 0 and fn == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _hungarian_accuracy(table: Tensor) -> float:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:
        raise ImportError("cluster_metrics needs scipy for the Hungarian accuracy: pip install scipy") from exc
    rows, cols = linear_sum_assignment(table.numpy(), maximize=True)
    return float(table[rows, cols].sum()) / float(table.sum())
