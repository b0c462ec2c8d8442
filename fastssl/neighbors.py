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

* CPU tensors: FAISS's flat inner-product search (``faiss.knn``, the search of ``IndexFlatIP``
  without copying the train rows into an index): BLAS tiles plus a heap per query.
* CUDA tensors with a faiss GPU build: ``faiss.knn_gpu`` (bfKnn) on the torch tensors themselves
  through ``faiss.contrib.torch_utils``, on torch's current stream: nothing goes to the host.
* CUDA tensors without a faiss GPU build, k above FAISS's GPU limit (2048), or no faiss
  installed: a matmul + topk on the tensors' device (``impl="torch"``).

**k-means** is FAISS's Lloyd (``faiss.Clustering``, what ``faiss.Kmeans`` wraps) on all the rows
(FAISS's default subsampling to 256 rows per centroid is off), assigning with a flat L2 index, or
an inner-product one for spherical k-means, on the GPU with a faiss GPU build. **Cluster
pseudo-labels** follow DeepCluster (Caron et al. 2018): k-means labels, an empty cluster re-seeded
by splitting the largest one in two, and sample weights inverse to the cluster size,
w_i = N / (K · n_{c(i)}), so that every cluster weighs N/K in total and the weights average 1.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl import _checks

__all__ = [
    "KNNClassifier",
    "cluster_metrics",
    "cluster_pseudo_labels",
    "kmeans",
    "knn_classify",
    "knn_pseudo_labels",
    "knn_search",
]

IMPLS = ("auto", "faiss", "torch")
INITS = ("random", "k-means++")
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


def _resolve_impl(impl: str, device: torch.device, k: int) -> str:
    """The search a call runs, "faiss" or "torch", for k neighbours on `device` (see the module docstring)."""
    _checks.choice("impl", impl, IMPLS)
    if impl == "torch":
        return impl
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


def _searcher(train: Tensor, k: int, impl: str):
    """A function query [q, D] -> (similarities, indices) [q, k], best first, for unit rows in fp32."""
    if impl == "torch":
        return lambda query: (query @ train.T).topk(k, dim=1)
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


def _unit_rows(name: str, x) -> Tensor:
    """Checked, detached, L2-normalised fp32 rows (a zero row stays zero)."""
    _checks.features(name, x)
    _checks.finite(name, x)
    return F.normalize(x.detach().float(), dim=1).contiguous()


def _neighbor_chunks(train_feats, query_feats, k, chunk_size, leave_one_out, impl):
    """Checks the inputs, then returns an iterator of (start, similarities, indices) over query chunks."""
    train = _unit_rows("train_feats", train_feats)
    query = _unit_rows("query_feats", query_feats)
    _checks.like("query_feats", query, "train_feats", train, dims=[1])
    k = _checks.integer("k", k, minimum=1)
    n = train.shape[0]
    if leave_one_out and query.shape[0] != n:
        raise ValueError(
            "leave_one_out=True needs the train set as query (row i of query_feats is sample i of train_feats): "
            f"query_feats has {query.shape[0]} rows, train_feats {n}"
        )
    if k > n - leave_one_out:
        raise ValueError(
            f"k={k} is more than the {n - leave_one_out} train samples available"
            + (" (leave_one_out excludes each sample itself)" if leave_one_out else "")
        )
    if chunk_size is not None:
        _checks.integer("chunk_size", chunk_size, minimum=1)
    k_search = k + leave_one_out
    impl = _resolve_impl(impl, train.device, k_search)
    chunk = chunk_size or (FAISS_CHUNK if impl == "faiss" else max(1, TORCH_CHUNK_ELEMENTS // n))
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
    """Checks labels in [0, num_classes) and returns num_classes (max label + 1 when None)."""
    _checks.labels(name, y, n, device)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got a label {lo}")
    if num_classes is None:
        return hi + 1
    num_classes = _checks.integer("num_classes", num_classes, minimum=1)
    if hi >= num_classes:
        raise ValueError(f"{name} has a label {hi}, which is not below num_classes={num_classes}")
    return num_classes


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
        chunk_size: queries per search call. None picks 16384 for FAISS (which tiles the
            similarities itself; fewer than ~128000 / D queries per call make it skip BLAS) and
            2^25 / N for the matmul + topk (a 128 MiB similarity block).
        leave_one_out: the queries are the train rows (row i of ``query_feats`` is sample i of
            ``train_feats``) and each sample is left out of its own neighbours.
        impl: "auto" (FAISS on CPU tensors and on CUDA tensors with a faiss GPU build, else a
            matmul + topk on the device), "faiss" (FAISS always; on CUDA tensors without a faiss GPU
            build the search copies to the host and back, and k above FAISS's GPU limit of 2048
            raises ValueError), or "torch" (matmul + topk on the device).

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
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
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
        self.impl = _checks.choice("impl", impl, IMPLS)
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
        if int(test_labels.min()) < 0:
            raise ValueError(f"test_labels must be >= 0, got a label {int(test_labels.min())}")
        num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
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


def _kmeans(x: Tensor, num_clusters: int, niter: int, spherical: bool, seed: int, init: str):
    """FAISS k-means of checked fp32 rows x (unit rows when spherical): (centroids, assignments)."""
    faiss = _import_faiss()
    n, d = x.shape
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.seed = seed
    params.spherical = spherical
    params.max_points_per_centroid = min(math.ceil(n / num_clusters), 2**31 - 1)  # no subsampling
    params.min_points_per_centroid = 1  # no warning about few points per centroid
    if init == "k-means++":
        if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            raise RuntimeError(f"init='k-means++' needs a newer faiss (this is {faiss.__version__}); use init='random'")
        params.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    if x.is_cuda and _faiss_gpu(faiss):
        config = faiss.GpuIndexFlatConfig()
        config.device = _device_index(x.device)
        index_type = faiss.GpuIndexFlatIP if spherical else faiss.GpuIndexFlatL2
        index = index_type(_gpu_resources(), d, config)
    else:
        index = (faiss.IndexFlatIP if spherical else faiss.IndexFlatL2)(d)
    x_np = x.cpu().numpy()  # faiss.Clustering reads host memory; a GPU index copies it over in tiles
    clustering = faiss.Clustering(d, num_clusters, params)
    clustering.train(x_np, index)
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(num_clusters, d)
    # the index still holds the centroids before the last update: assign to the final ones
    index.reset()
    index.add(centroids)
    _, assign = index.search(x_np, 1)
    return torch.from_numpy(centroids).to(x.device), torch.from_numpy(assign[:, 0]).to(x.device)


def _kmeans_inputs(feats, num_clusters, niter, spherical, seed, init) -> tuple[Tensor, int, int, int]:
    x = _unit_rows("feats", feats) if spherical else _checks.finite("feats", _checks.features("feats", feats))
    x = x.detach().float().contiguous()
    num_clusters = _checks.integer("num_clusters", num_clusters, minimum=1)
    if num_clusters > x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} is more than the {x.shape[0]} samples")
    niter = _checks.integer("niter", niter, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2^31), got {seed}")
    _checks.choice("init", init, INITS)
    return x, num_clusters, niter, int(seed)


def kmeans(
    feats: Tensor,
    num_clusters: int,
    *,
    niter: int = 20,
    spherical: bool = False,
    seed: int = 0,
    init: str = "random",
) -> tuple[Tensor, Tensor]:
    """k-means through FAISS: (centroids [K, D] fp32, assignments [N] int64), on the features' device.

    Args:
        feats: [N, D] features, any float dtype (clustered in fp32); non-finite values raise ValueError.
        num_clusters: K, 1 ≤ K ≤ N.
        niter: Lloyd iterations (no early stop).
        spherical: cosine k-means: rows and centroids L2-normalised, assignment by inner product;
            the centroids returned are unit vectors.
        seed: seeds the initialisation; equal inputs and seed give equal results.
        init: "random" (K distinct rows, FAISS's default and DeepCluster's) or "k-means++"
            (D²-weighted seeding, costs a few iterations more; needs a recent faiss,
            with ``faiss.ClusteringInitMethod``).

    All N rows are used (FAISS's subsampling to 256 rows per centroid is turned off). On CUDA
    tensors with a faiss GPU build the assignment steps run on that GPU (the rows are copied to
    the host once, where ``faiss.Clustering`` reads them); otherwise on the CPU. FAISS re-seeds a
    cluster that empties during the iterations; the final assignment can still leave one empty
    when rows repeat (see :func:`cluster_pseudo_labels`).
    """
    x, num_clusters, niter, seed = _kmeans_inputs(feats, num_clusters, niter, spherical, seed, init)
    return _kmeans(x, num_clusters, niter, bool(spherical), seed, init)


def _reseed_empty(x: Tensor, labels: Tensor, num_clusters: int, seed: int) -> Tensor:
    """Gives each empty cluster half of the then-largest one, split at the median of a random projection.

    DeepCluster re-seeds an empty cluster next to a non-empty one and splits that one's points
    between the two; splitting by rank, as here, stays exact when rows repeat (their centroids
    would tie). N ≥ K guarantees the largest cluster has two or more rows whenever one is empty.
    """
    counts = torch.bincount(labels, minlength=num_clusters)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    gen = torch.Generator().manual_seed(seed)
    for e in empty:
        c = int(counts.argmax())
        members = (labels == c).nonzero().flatten()
        direction = torch.randn(x.shape[1], generator=gen).to(x.device)
        moved = members[(x[members] @ direction).argsort()[members.numel() // 2 :]]
        labels[moved] = e
        counts[c] -= moved.numel()
        counts[e] = moved.numel()
    return labels


def cluster_pseudo_labels(
    feats: Tensor,
    num_clusters: int,
    *,
    niter: int = 20,
    spherical: bool = False,
    seed: int = 0,
    init: str = "random",
) -> tuple[Tensor, Tensor]:
    """DeepCluster pseudo-labels: (labels [N] int64, sample_weights [N] fp32) on the features' device.

    The labels are :func:`kmeans` assignments (same arguments) with every cluster non-empty: an
    empty one is re-seeded with half of the largest cluster. The weights are inverse to the
    cluster size, w_i = N / (K · n_{c(i)}): each cluster weighs N/K in total (DeepCluster's
    balancing, as its uniform sampling over clusters) and the weights average 1, so a loss
    ``(w * per_sample_loss).mean()`` keeps its scale.
    """
    x, num_clusters, niter, seed = _kmeans_inputs(feats, num_clusters, niter, spherical, seed, init)
    _, labels = _kmeans(x, num_clusters, niter, bool(spherical), seed, init)
    labels = _reseed_empty(x, labels, num_clusters, seed)
    counts = torch.bincount(labels, minlength=num_clusters).float()
    return labels, x.shape[0] / (num_clusters * counts[labels])


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
