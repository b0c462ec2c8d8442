"""kNN evaluation and k-means: fastssl (FAISS) against the chunked torch way and scikit-learn.

    python benchmarks/bench_neighbors.py [--quick] [--only knn kmeans] [--providers fastssl sklearn ...]

kNN (mode "knn"): weighted kNN class scores of Q queries against N train rows (cosine, k, T = 0.07).
Providers: ``fastssl`` (fastssl.knn_classify: FAISS flat search, or faiss GPU / matmul + topk on
CUDA), ``torch-chunked`` (solo-learn's WeightedKNNClassifier: chunks of 5e6 / N queries, matmul,
topk, one-hot voting) and ``sklearn`` (KNeighborsClassifier, brute force, predict_proba with the
same weights; Euclidean distance on unit rows, which ranks as cosine and takes scikit-learn's
fastest brute-force path). Times are ratios to ``torch-chunked``.

k-means (mode "kmeans"): 20 Lloyd iterations of N rows into K clusters. Providers: ``fastssl``
(fastssl.kmeans, FAISS, random seeding), ``fastssl-kmeans++`` (init="k-means++"), ``sklearn``
(KMeans with its default greedy k-means++ seeding, n_init=1, max_iter=20, tol=0) and
``sklearn-random`` (init="random"). Times are ratios to ``sklearn``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from benchmarks.harness import Case, run

OP = "neighbors"
TEMPERATURE = 0.07
NUM_CLASSES = 100
NITER = 20
KNN_PROVIDERS = ("fastssl", "torch-chunked", "sklearn")
KMEANS_PROVIDERS = ("fastssl", "fastssl-kmeans++", "sklearn", "sklearn-random")
PROVIDERS = tuple(dict.fromkeys(KNN_PROVIDERS + KMEANS_PROVIDERS))
# the CPU targets: kNN time <= 1 x torch-chunked and <= 0.5 x sklearn; k-means <= 0.2 x sklearn
KNN_TARGET_SHAPES = [{"N": 50_000, "Q": 10_000, "D": 128, "k": k} for k in (20, 200)]
KMEANS_TARGET_SHAPE = {"N": 100_000, "D": 128, "K": 1000, "iters": NITER}


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
    if provider == "fastssl":
        return lambda: fastssl.knn_classify(train, labels, query, k=k, temperature=TEMPERATURE)
    if provider == "torch-chunked":
        return lambda: solo_learn_knn(train, labels, query, k, TEMPERATURE, NUM_CLASSES)
    if provider == "sklearn":
        import numpy as np
        from sklearn.neighbors import KNeighborsClassifier

        unit = lambda x: torch.nn.functional.normalize(x, dim=1).cpu().numpy()
        # on unit rows ‖a − b‖² = 2 − 2s: the weight exp(s/T) from the Euclidean distance d
        weights = lambda d: np.exp((1.0 - d**2 / 2) / TEMPERATURE)
        clf = KNeighborsClassifier(k, weights=weights, algorithm="brute").fit(unit(train), labels.cpu().numpy())
        query_np = unit(query)
        return lambda: clf.predict_proba(query_np)
    raise ValueError(f"unknown kNN provider {provider!r}")


def _kmeans_fn(provider: str, x, num_clusters: int):
    if provider.startswith("fastssl"):
        init = "k-means++" if provider.endswith("++") else "random"
        return lambda: fastssl.kmeans(x, num_clusters, niter=NITER, init=init)
    if provider.startswith("sklearn"):
        from sklearn.cluster import KMeans

        init = "random" if provider.endswith("random") else "k-means++"
        x_np = x.cpu().numpy()
        km = KMeans(num_clusters, init=init, n_init=1, max_iter=NITER, tol=0.0, random_state=0)
        return lambda: km.fit(x_np)
    raise ValueError(f"unknown k-means provider {provider!r}")


def knn_case(provider: str, n: int, q: int, d: int, k: int, device: str, min_reps: int = 3) -> Case:
    def build():
        gen = torch.Generator(device=device).manual_seed(0)
        # class-structured features: a random centre per class plus noise
        centres = torch.randn(NUM_CLASSES, d, device=device, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (n + q,), device=device, generator=gen)
        feats = centres[labels] + 2 * torch.randn(n + q, d, device=device, generator=gen)
        return _knn_fn(provider, feats[:n], labels[:n], feats[n:], k)

    return Case(provider, "knn", torch.float32, {"N": n, "Q": q, "D": d, "k": k}, build, min_reps=min_reps)


def kmeans_case(provider: str, n: int, d: int, num_clusters: int, device: str) -> Case:
    def build():
        # Gaussian noise: Lloyd's iterations do not converge within 20 on it, so scikit-learn (which
        # stops once no label changes) runs the same 20 iterations as FAISS
        gen = torch.Generator(device=device).manual_seed(0)
        return _kmeans_fn(provider, torch.randn(n, d, device=device, generator=gen), num_clusters)

    shape = {"N": n, "D": d, "K": num_clusters, "iters": NITER}
    return Case(provider, "kmeans", torch.float32, shape, build, min_reps=1)  # seconds to minutes per run


def knn_cases(quick: bool, device: str, providers=KNN_PROVIDERS) -> list[Case]:
    shapes = [(10_000, 2_000, 128, k) for k in (20, 200)] if quick else [tuple(s.values()) for s in KNN_TARGET_SHAPES]
    if device == "cuda" and not quick:
        shapes += [(1_000_000, 50_000, 256, 20)]
    return [knn_case(p, *s, device) for s in shapes for p in providers if p in KNN_PROVIDERS]


def kmeans_cases(quick: bool, device: str, providers=KMEANS_PROVIDERS) -> list[Case]:
    shape = (10_000, 128, 100) if quick else tuple(KMEANS_TARGET_SHAPE.values())[:3]
    return [kmeans_case(p, *shape, device) for p in providers if p in KMEANS_PROVIDERS]


def _shape(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in d.items())


def check_targets(rows: list[dict]) -> None:
    """Prints the issue's CPU targets against the rows just measured (at other sizes: indicative only)."""
    ok = {(r["provider"], r["mode"], r["shape"]): float(r["median_ms"]) for r in rows if r.get("status") == "ok"}
    targets = {_shape(s) for s in [*KNN_TARGET_SHAPES, KMEANS_TARGET_SHAPE]}
    # (mode, peer, wanted time ratio or None for information: the same seeding and iterations as FAISS)
    checks = [("knn", "torch-chunked", 1.0), ("knn", "sklearn", 0.5), ("kmeans", "sklearn", 0.2)]
    checks += [("kmeans", "sklearn-random", None)]
    for mode, peer, want in checks:
        for shape in sorted({s for p, m, s in ok if m == mode}):
            ours, theirs = ok.get(("fastssl", mode, shape)), ok.get((peer, mode, shape))
            if ours is None or theirs is None:
                continue
            ratio = ours / theirs
            if want is None:
                print(f"info   {mode} {shape}: {ratio:.3f} x {peer} time")
                continue
            verdict = ("PASS" if ratio <= want else "MISS") if shape in targets else "(not the target size)"
            print(f"target {mode} {shape}: {ratio:.3f} x {peer} time (want <= {want}) {verdict}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=["knn", "kmeans"], default=["knn", "kmeans"])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if "knn" in args.only:
        cases = knn_cases(args.quick, device, args.providers)
        rows += run(OP, cases, reference="torch-chunked", plot="kmeans" not in args.only)
    if "kmeans" in args.only:
        rows += run(OP, kmeans_cases(args.quick, device, args.providers), reference="sklearn")
    if device == "cpu":
        check_targets(rows)
    return rows


if __name__ == "__main__":
    main()
