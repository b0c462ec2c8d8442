"""kNN evaluation and k-means: fastssl (FAISS) against the chunked torch way, scikit-learn and FAISS.

    python benchmarks/bench_neighbors.py [--quick] [--N ...] [--neighbors ...] [--clusters ...] [--providers ...]

kNN (mode "knn", providers ``fastssl``, ``fastssl-faiss``, ``torch-chunked``, ``sklearn``): weighted
kNN class scores of Q = N / 5 queries against N train rows (cosine, k = ``--neighbors``, T = 0.07).
``fastssl`` is fastssl.knn_classify at impl="auto" (on a CPU with bf16 dot products its C++ search:
bf16 candidates, exact fp32 ranking; elsewhere FAISS's flat search; faiss GPU / matmul + topk on
CUDA), ``fastssl-faiss`` the same at impl="faiss" (FAISS's flat search); ``torch-chunked
solo-learn's WeightedKNNClassifier (chunks of 5e6 / N queries, matmul, topk, one-hot voting);
``sklearn`` KNeighborsClassifier, brute force, predict_proba with the same weights (Euclidean distance
on unit rows, which ranks as cosine and takes scikit-learn's fastest brute-force path).

k-means (mode "kmeans", K = ``--clusters``, 20 iterations, Gaussian rows in D = 128, on which Lloyd's
iterations do not converge within 20, so every provider runs all 20): ``fastssl-kmeans``
(fastssl.kmeans, greedy k-means++ then Lloyd on FAISS's search, tol = 0 as the peers'),
``fastssl-random`` (init="random"), ``sklearn-kmeans`` (KMeans, its default greedy k-means++,
n_init=1, max_iter=20, tol=0), ``sklearn-random`` (init="random"), ``faiss-kmeans`` (faiss.Kmeans at
its defaults: random seeding, at most 256 rows per centroid); the seedings alone: ``fastssl-seeding``
and ``sklearn-seeding`` (sklearn.cluster.kmeans_plusplus). Each k-means run appends its objective
Σ‖x − c‖² (of the centroids and assignments it returns; for faiss-kmeans the final centroids'
assignments) to benchmarks/results/neighbors_objective.csv.

Each k-means run's objective is computed after its timed call (outside the time and the peak memory),
from the centroids and assignments it returned, and also goes to the CSV's note.

Targets (CPU): kNN ≤ 1 × torch-chunked and ≤ 0.5 × sklearn at N = 50000, k = 20 and 200; k-means
≤ 0.2 × sklearn-kmeans at N = 100000, K = 1000. ``--scale`` is the scale run (issue 18: time, peak
memory and objective at 200000 × 128, 4096 clusters, against scikit-learn's KMeans and faiss.Kmeans
at their defaults, our seeding apart; tens of minutes on 2 cores), short for
``--N 200000 --clusters 4096 --providers fastssl-kmeans fastssl-seeding sklearn-kmeans faiss-kmeans``
(``--providers`` given with it replaces that list).

OpenMP threads that wait for work spin by default and take the cores from the other library's
threads (torch, FAISS and scikit-learn each have an OpenMP pool): ``OMP_WAIT_POLICY=PASSIVE`` is set
before torch is imported, unless the environment sets it.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import RESULTS, Case, sweep_main, verdict
from fastssl import neighbors
from fastssl.reference import neighbors as reference

OP = "neighbors"
TEMPERATURE = 0.07
NUM_CLASSES = 100
NITER = 20
D = 128
KNN_PROVIDERS = ("fastssl", "fastssl-faiss", "torch-chunked", "sklearn")
KMEANS_PROVIDERS = (
    "fastssl-kmeans", "fastssl-random", "fastssl-seeding", "sklearn-kmeans", "sklearn-random", "sklearn-seeding",
    "faiss-kmeans",
)  # fmt: skip
PROVIDERS = KNN_PROVIDERS + KMEANS_PROVIDERS
KNN_TARGETS = {("torch-chunked", 1.0), ("sklearn", 0.5)}  # (peer, wanted time ratio) at N = 50000, k = 20 and 200
KMEANS_TARGET = ("sklearn-kmeans", 0.2)  # at N = 100000, K = 1000
OBJECTIVES = RESULTS / "neighbors_objective.csv"
SCALE_PROVIDERS = ("fastssl-kmeans", "fastssl-seeding", "sklearn-kmeans", "faiss-kmeans")
SCALE_TIMEOUT_S = 3600.0  # per case: scikit-learn's KMeans takes minutes at the scale size, more under load


def solo_learn_knn(train, train_labels, query, k, temperature, num_classes, max_distance_matrix_size=int(5e6)):
    """solo-learn's WeightedKNNClassifier.compute (cosine), returning the class scores [Q, C]."""
    train, query = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(query, dim=1)
    chunk = max(1, max_distance_matrix_size // train.shape[0])
    out = []
    for i in range(0, query.shape[0], chunk):
        sims, idx = torch.mm(query[i : i + chunk], train.T).topk(k, dim=1)
        one_hot = torch.zeros(idx.numel(), num_classes, device=train.device)
        one_hot.scatter_(1, train_labels[idx].view(-1, 1), 1)
        weights = sims.div(temperature).exp()
        out.append((one_hot.view(*idx.shape, num_classes) * weights[:, :, None]).sum(1))
    return torch.cat(out)


def _knn_fn(provider: str, train, labels, query, k: int):
    if provider in ("fastssl", "fastssl-faiss"):
        impl = "faiss" if provider == "fastssl-faiss" else "auto"
        return lambda: fastssl.knn_classify(train, labels, query, k=k, temperature=TEMPERATURE, impl=impl)
    if provider == "torch-chunked":
        return lambda: solo_learn_knn(train, labels, query, k, TEMPERATURE, NUM_CLASSES)
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier

    unit = lambda x: torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    # on unit rows ‖a − b‖² = 2 − 2s: the weight exp(s/T) from the Euclidean distance d
    weights = lambda d: np.exp((1.0 - d**2 / 2) / TEMPERATURE)
    clf = KNeighborsClassifier(k, weights=weights, algorithm="brute").fit(unit(train), labels.cpu().numpy())
    query_np = unit(query)
    return lambda: clf.predict_proba(query_np)


def _record_objective(provider: str, shape: str, objective: float) -> None:
    """Appends (provider, shape, objective) to OBJECTIVES (from the measuring child process)."""
    new = not OBJECTIVES.exists()
    with OBJECTIVES.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["timestamp", "provider", "shape", "objective"])
        writer.writerow([dt.datetime.now().isoformat(timespec="seconds"), provider, shape, f"{objective:.8g}"])


class _KMeansRun:
    """The timed call: one k-means run. Its ``note`` (read by the harness after the timed calls and
    the peak memory) computes the objective of the last run's result and records it once."""

    def __init__(self, provider: str, x, run, shape: str):
        self.provider, self.x, self.run, self.shape, self.result, self.recorded = provider, x, run, shape, None, None

    def __call__(self):
        self.result = self.run()

    @property
    def note(self) -> str:
        if self.recorded is None:
            self.recorded = reference.kmeans_objective(self.x, *self.result)
            _record_objective(self.provider, self.shape, self.recorded)
        return f"objective={self.recorded:.8g}"


def _kmeans_fn(provider: str, x, num_clusters: int, shape: str):
    """One k-means (or seeding) run, returning (centroids, assignments) as tensors."""
    x_np = x.cpu().numpy()
    if provider == "fastssl-seeding":
        scaled, _ = neighbors._scaled_rows(x)
        shards = neighbors._Shards(scaled, False)
        gen = torch.Generator()
        return lambda: neighbors._seed_kmeans_plusplus(
            shards, (scaled * scaled).sum(1), num_clusters, gen.manual_seed(0)
        )
    if provider == "sklearn-seeding":
        from sklearn.cluster import kmeans_plusplus

        return lambda: kmeans_plusplus(x_np, num_clusters, random_state=0)
    if provider.startswith("fastssl"):
        init = "random" if provider == "fastssl-random" else "k-means++"
        run = lambda: fastssl.kmeans(x, num_clusters, niter=NITER, tol=0.0, init=init)
    elif provider.startswith("sklearn"):
        from sklearn.cluster import KMeans

        init = "random" if provider == "sklearn-random" else "k-means++"
        km = KMeans(num_clusters, init=init, n_init=1, max_iter=NITER, tol=0.0, random_state=0)

        def run():
            km.fit(x_np)
            return torch.from_numpy(km.cluster_centers_), torch.from_numpy(km.labels_).long()

    else:
        import faiss

        def run():
            km = faiss.Kmeans(x_np.shape[1], num_clusters, niter=NITER, seed=0)
            km.train(x_np)
            _, assign = km.index.search(x_np, 1)  # the final centroids' assignments (km.obj is one step older)
            return torch.from_numpy(km.centroids), torch.from_numpy(assign[:, 0])

    return _KMeansRun(provider, x, run, shape)


def knn_case(provider: str, n: int, k: int, device: str) -> Case:
    q = n // 5

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        # class-structured features: a random centre per class plus noise
        centres = torch.randn(NUM_CLASSES, D, device=device, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (n + q,), device=device, generator=gen)
        feats = centres[labels] + 2 * torch.randn(n + q, D, device=device, generator=gen)
        return _knn_fn(provider, feats[:n], labels[:n], feats[n:], k)

    # bound: the exact search's similarities, one fp32 Q × D × N GEMM (docs/design.md, "Bounds")
    shape = {"N": n, "Q": q, "D": D, "k": k}
    return Case(provider, "knn", torch.float32, shape, build, flops=2.0 * q * D * n, gemm=(q, D, n))


def kmeans_case(provider: str, n: int, num_clusters: int, device: str) -> Case:
    shape = {"N": n, "D": D, "K": num_clusters, "iters": NITER}
    shape_str = ",".join(f"{k}={v}" for k, v in shape.items())

    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        return _kmeans_fn(provider, torch.randn(n, D, device=device, generator=gen), num_clusters, shape_str)

    return Case(provider, "kmeans", torch.float32, shape, build, min_reps=1)  # seconds to minutes per run


def cases(quick: bool, device: str, sizes, neighbors_k, clusters, providers, modes=None) -> list[Case]:
    """kNN cases for the kNN providers chosen, k-means cases for the k-means ones."""
    knn_p = [p for p in providers if p in KNN_PROVIDERS]
    km_p = [p for p in providers if p in KMEANS_PROVIDERS]
    out = []
    for n in sizes or ([10_000] if quick else [50_000]):
        out += [knn_case(p, n, k, device) for k in neighbors_k or (20, 200) for p in knn_p]
    for n in sizes or ([10_000] if quick else [100_000]):
        out += [kmeans_case(p, n, c, device) for c in clusters or ([100] if quick else [1000]) for p in km_p]
    return out


def check_targets(rows: list[dict]) -> None:
    """The CPU targets against the rows just measured (at other sizes: indicative only)."""
    ok = {(r["provider"], r["shape"]): float(r["median_ms"]) for r in rows if r.get("status") == "ok"}
    for (provider, shape), ours in sorted(ok.items()):
        dims = dict(kv.split("=") for kv in shape.split(","))
        if provider == "fastssl":
            at_target = dims["N"] == "50000" and dims["k"] in ("20", "200")
            targets = sorted(KNN_TARGETS)
        elif provider == "fastssl-kmeans":
            at_target = dims["N"] == "100000" and dims["K"] == "1000"
            targets = [KMEANS_TARGET]
        else:
            continue
        for peer, want in targets:
            if (peer, shape) in ok:
                note = "" if at_target else " (not the target size)"
                print(
                    f"target {provider} {shape}: " + verdict(f"time vs {peer}", ours / ok[(peer, shape)], want) + note
                )
    for provider in ("fastssl-seeding", "sklearn-seeding"):
        for (p, shape), t in sorted(ok.items()):
            if p == provider:
                print(f"info   {provider} {shape}: {t / 1e3:.2f} s for the seeding alone")


def main(argv: list[str] | None = None) -> list[dict]:
    sweeps = {
        "N": "train rows (kNN; Q = N/5 queries) and rows (k-means)",
        "neighbors": "k (kNN)",
        "clusters": "K (k-means)",
    }
    argv = list(sys.argv[1:] if argv is None else argv)
    scale = "--scale" in argv
    if scale:
        argv.remove("--scale")
        argv += ["--N", "200000", "--clusters", "4096"]
        if "--providers" not in argv:
            argv += ["--providers", *SCALE_PROVIDERS]
    timeout_s = SCALE_TIMEOUT_S if scale else 900.0
    return sweep_main(OP, __doc__, sweeps, PROVIDERS, cases, check_targets, argv, timeout_s=timeout_s)


if __name__ == "__main__":
    main()
