"""SimCLR on scikit-learn's digits, end to end: fastssl against the plain-PyTorch way.

    python examples/simclr_digits.py [--epochs 30] [--mochi] [--out examples/results]
    python -m fastssl demo [...]       # the same (`make demo`)

A small convolutional encoder is pre-trained without labels on the 8×8 digits that scikit-learn
ships (1797 images, no download): two augmented views per image (random affine warp, contrast,
noise and erasing, written with torch ops), NT-Xent on the projections (:class:`fastssl.NTXentLoss`),
and with ``--mochi`` a MoCo-style term: keys from a momentum encoder, a :class:`fastssl.MemoryQueue`
of its past keys, and MoCHi hard negatives mixed from that queue (:func:`fastssl.mochi_loss`).
After every epoch the encoder's features are scored with a weighted kNN classifier
(:class:`fastssl.KNNClassifier`); at the end, k-means on the test features is compared with the
classes (:func:`fastssl.kmeans`, :func:`fastssl.cluster_metrics`), and a linear probe on the
frozen features is attacked with PGD (:func:`fastssl.robust_accuracy`).

The same run is made twice from the same seed: with fastssl's kernels (``impl="auto"``) and with
the plain-PyTorch references (``impl="reference"`` for the losses and the attack, ``impl="torch"``
for kNN). Both see the same images, augmentations and initial weights, so their losses agree at
every step up to rounding; the script prints the largest difference, the time each run took, and
the part of it spent in the loss. Results: a table on stdout, ``simclr_digits.json`` and
``simclr_digits.png`` (loss and kNN accuracy per epoch) in ``--out``.

The model trains in float64 by default, so that the two runs can be compared step by step: in
float32 the kernel and the reference round differently (~1e-7), training amplifies that like any
perturbation of the weights, and the two loss curves part after a few dozen steps (both still
learn as well). ``--dtype float32`` shows that.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastssl

RUNS = {"fastssl": "auto", "reference": "reference"}  # run name -> impl of the losses and the attack


@dataclass
class Config:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.05
    temperature: float = 0.2
    feature_dim: int = 128  # encoder output, the features that kNN, k-means and the probe see
    projection_dim: int = 64  # the projection head's output, where the loss is taken
    mochi: bool = False
    queue_size: int = 1024
    mochi_mix: tuple[int, int, int] = (256, 256, 64)  # MoCHi's n_hard, n_mix, n_mix_query
    momentum: float = 0.99  # of the key encoder (with --mochi)
    knn_k: int = 20
    eps: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1)  # L∞ radii on images in [0, 1]
    pgd_steps: int = 10
    seed: int = 0
    dtype: torch.dtype = torch.float64  # of the model and the images (see the module's docstring)
    max_steps: int | None = None  # stop each epoch after this many steps (tests)
    train_size: int | None = None  # use only the first rows of the training split (tests)


# -- data and augmentations ------------------------------------------------------------------------


def load_digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): images [N, 1, 8, 8] in [0, 1]
    and int64 labels; a stratified 70/30 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train, test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, random_state=seed, stratify=y.numpy())
    return x[train], y[train], x[test], y[test]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """A random view of each image of x [B, 1, H, W] in [0, 1], drawn from g.

    Affine warp (rotation ±15°, scale 0.85-1.15, shift ±1 pixel, bilinear), contrast and
    brightness jitter, Gaussian noise, and with probability 1/2 a zeroed 3×3 patch (random erasing).
    """
    b, _, h, w = x.shape
    angle = _uniform(b, -math.pi / 12, math.pi / 12, g)
    scale = _uniform(b, 0.85, 1.15, g)
    shift = _uniform(2 * b, -2 / h, 2 / h, g).view(b, 2)  # ±1 pixel in grid units (the image spans 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    v = v * _uniform(b, 0.7, 1.3, g).view(b, 1, 1, 1) + _uniform(b, -0.1, 0.1, g).view(b, 1, 1, 1)
    v = v + 0.05 * torch.randn(v.shape, generator=g)
    # random erasing: a 3x3 patch at a random corner position, for half of the images
    top = torch.randint(0, h - 2, (b,), generator=g)
    left = torch.randint(0, w - 2, (b,), generator=g)
    rows, cols = torch.arange(h), torch.arange(w)
    patch = ((rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + 3))[:, :, None] & (
        (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + 3)
    )[:, None, :]
    erase = patch & (torch.rand(b, generator=g) < 0.5)[:, None, None]
    return v.masked_fill(erase[:, None], 0.0).clamp(0.0, 1.0)


# -- model -----------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Three 3×3 convolutions (8×8 → 2×2) and a linear layer: features [B, feature_dim]; ``project``
    adds SimCLR's two-layer projection head."""

    def __init__(self, feature_dim: int = 128, projection_dim: int = 64):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.backbone = nn.Sequential(
            *block(1, 32, 1), *block(32, 64, 2), *block(64, 128, 2), nn.Flatten(), nn.Linear(512, feature_dim)
        )
        width = feature_dim
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def project(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def features(model: Encoder, x: Tensor) -> Tensor:
    model.eval()
    return model(x)


# -- evaluation ------------------------------------------------------------------------------------


def knn_accuracy(model: Encoder, data, cfg: Config, impl: str) -> float:
    """Top-1 accuracy of a weighted kNN classifier (k = cfg.knn_k) on the encoder's test features."""
    x_train, y_train, x_test, y_test = data
    knn = fastssl.KNNClassifier(k=cfg.knn_k, temperature=0.07, impl="torch" if impl == "reference" else "auto")
    knn.update(train_feats=features(model, x_train), train_labels=y_train)
    knn.update(test_feats=features(model, x_test), test_labels=y_test)
    return knn.compute()[0]


def linear_probe(model: Encoder, x: Tensor, y: Tensor, steps: int = 300) -> nn.Module:
    """A logistic-regression layer trained (full batch, Adam) on the frozen, standardised features."""
    feats = features(model, x)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    torch.manual_seed(0)
    probe = nn.Linear(feats.shape[1], int(y.max()) + 1).to(feats.dtype)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    z = (feats - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(z), y).backward()
        opt.step()
    return nn.Sequential(model.backbone, _Standardize(mean, std), probe).eval()


class _Standardize(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def evaluate(model: Encoder, data, cfg: Config, impl: str) -> dict[str, float]:
    """kNN accuracy, k-means agreement with the classes, and a linear probe's accuracy under PGD."""
    x_train, y_train, x_test, y_test = data
    out = {"knn_top1": knn_accuracy(model, data, cfg, impl)}
    _, assign = fastssl.kmeans(features(model, x_test), int(y_test.max()) + 1, spherical=True, seed=cfg.seed)
    out.update({f"kmeans_{k}": v for k, v in fastssl.cluster_metrics(assign, y_test).items()})
    probe = linear_probe(model, x_train, y_train)
    for p in probe.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    robust = fastssl.robust_accuracy(probe, x_test, y_test, eps=cfg.eps, steps=cfg.pgd_steps, generator=g, impl=impl)
    out.update({f"probe_eps{e:g}": acc for e, acc in robust.items()})
    return out


# -- training --------------------------------------------------------------------------------------


def train(data, cfg: Config, impl: str, progress: bool = True) -> dict:
    """SimCLR pre-training with the losses' ``impl``; returns the per-step losses, the kNN accuracy
    per epoch (index 0: at initialisation), the final metrics and the seconds spent training."""
    from tqdm import tqdm

    x_train = data[0] if cfg.train_size is None else data[0][: cfg.train_size]
    torch.manual_seed(cfg.seed)
    model = Encoder(cfg.feature_dim, cfg.projection_dim).to(cfg.dtype)
    # SGD rather than Adam: its step is proportional to the gradient, so the rounding differences
    # between fastssl and the reference stay small; Adam's first steps are ±lr whatever the gradient.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = fastssl.NTXentLoss(temperature=cfg.temperature, impl=impl)
    queue = fastssl.MemoryQueue(cfg.queue_size, cfg.projection_dim, dtype=cfg.dtype) if cfg.mochi else None
    # MoCo's momentum encoder: the keys (and so the queue) come from a slowly moving average of the
    # model, which keeps the queue's rows consistent with each other. Keys from the model itself go
    # stale within a few steps, and the queue then made the kNN accuracy fall below its value at
    # initialisation.
    key_model = copy.deepcopy(model).requires_grad_(False) if cfg.mochi else None
    g = torch.Generator().manual_seed(cfg.seed)  # shuffling, augmentations and MoCHi's draws
    n = x_train.shape[0]
    steps = min(math.ceil(n / cfg.batch_size), cfg.max_steps or n)
    history = {"loss": [], "knn_top1": [knn_accuracy(model, data, cfg, impl)], "train_seconds": 0.0}
    history["loss_seconds"] = 0.0
    # disable=None: the bar shows on a terminal only, not in logs
    bar = tqdm(total=cfg.epochs * steps, desc=f"{impl:>9s}", unit="step", disable=None if progress else True)
    for _epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        start = time.perf_counter()
        for step in range(steps):
            xb = x_train[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            views = torch.cat([augment(xb, g), augment(xb, g)])
            z = model.project(views)
            if key_model is not None:
                with torch.no_grad():
                    keys = key_model.train().project(views[: len(xb)])  # the first view's keys
            # the loss's forward and backward, timed on their own: from a detached copy of the
            # projections, whose gradient then flows on through the encoder (the same gradients)
            zd = z.detach().requires_grad_()
            tick = time.perf_counter()
            z1, z2 = zd.chunk(2)
            loss = loss_fn(z1, z2)
            if queue is not None and len(queue) >= 2:
                # MoCHi: the second view's queries against the momentum encoder's keys of the first
                # view and the queue's past keys, with hard negatives mixed from that queue
                n_hard, n_mix, n_mix_query = cfg.mochi_mix
                loss = loss + fastssl.mochi_loss(
                    z2, keys, queue, n_hard=n_hard, n_mix=n_mix, n_mix_query=n_mix_query,
                    temperature=cfg.temperature, generator=g, impl=impl,
                )  # fmt: skip
            loss.backward()
            history["loss_seconds"] += time.perf_counter() - tick
            opt.zero_grad()
            z.backward(zd.grad)
            opt.step()
            if queue is not None:
                queue.enqueue(keys)
                with torch.no_grad():  # key ← m·key + (1 − m)·model, batch-norm statistics too
                    for key, new in zip(key_model.state_dict().values(), model.state_dict().values(), strict=True):
                        if key.is_floating_point():
                            key.lerp_(new, 1.0 - cfg.momentum)
                        else:  # batch norm's step counter
                            key.copy_(new)
            history["loss"].append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", knn=f"{history['knn_top1'][-1]:.3f}")
        history["train_seconds"] += time.perf_counter() - start
        history["knn_top1"].append(knn_accuracy(model, data, cfg, impl))
    bar.close()
    history["metrics"] = evaluate(model, data, cfg, impl)
    return history


def run(cfg: Config, out: Path | None = None, progress: bool = True) -> dict:
    """Both runs (fastssl and reference) and the encoder at initialisation; writes the JSON and the
    plot to `out` when given. Returns {"config", "init", "fastssl", "reference", "max_loss_diff"}."""
    data = [t.to(cfg.dtype) if t.is_floating_point() else t for t in load_digits(cfg.seed)]
    torch.manual_seed(cfg.seed)
    init = Encoder(cfg.feature_dim, cfg.projection_dim).to(cfg.dtype)
    result = {"config": {**asdict(cfg), "dtype": str(cfg.dtype)}, "init": evaluate(init, data, cfg, "auto")}
    for name, impl in RUNS.items():
        result[name] = train(data, cfg, impl, progress)
    a, b = (torch.tensor(result[name]["loss"], dtype=torch.float64) for name in RUNS)
    result["max_loss_diff"] = float((a - b).abs().max()) if len(a) else 0.0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "simclr_digits.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "simclr_digits.png")
    return result


# -- report ----------------------------------------------------------------------------------------


def table(result: dict) -> str:
    """The accuracies of the encoder at initialisation and after each run, one metric per row."""
    names = ["init", *RUNS]
    metrics = {name: result[name] if name == "init" else result[name]["metrics"] for name in names}
    lines = [f"{'metric':<18s}" + "".join(f"{name:>11s}" for name in names)]
    for key in metrics["init"]:
        lines.append(f"{key:<18s}" + "".join(f"{metrics[name][key]:>11.3f}" for name in names))
    for key in ("train_seconds", "loss_seconds"):
        lines.append(f"{key:<18s}{'':>11s}" + "".join(f"{result[n][key]:>11.2f}" for n in RUNS))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in zip(RUNS, ("-", "--"), strict=True):
        losses = result[name]["loss"]
        steps_per_epoch = max(1, len(losses) // max(1, result["config"]["epochs"]))
        epochs = [(i + 1) / steps_per_epoch for i in range(len(losses))]
        ax_loss.plot(epochs, losses, style, label=f"{name} ({result[name]['train_seconds']:.0f} s)")
        ax_knn.plot(range(len(result[name]["knn_top1"])), result[name]["knn_top1"], style + "o", ms=3, label=name)
    loss_name = "SimCLR + MoCHi" if result["config"]["mochi"] else "SimCLR"
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{loss_name} loss on digits (per step)")
    ax_knn.set(xlabel="epoch (0 = initialisation)", ylabel="kNN top-1 accuracy", title="kNN accuracy of the encoder")
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--mochi", action="store_true", help="add MoCHi hard negatives from a MemoryQueue")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="of the model and images")
    parser.add_argument("--out", type=Path, default=Path("examples/results"), help="where the JSON and PNG go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2")
    cfg = Config(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
        mochi=args.mochi, seed=args.seed, dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    result = run(cfg, args.out, progress=not args.no_progress)
    print(table(result))
    fast, ref = result["fastssl"], result["reference"]
    print(
        f"time: training {fast['train_seconds']:.1f} s with fastssl, {ref['train_seconds']:.1f} s with the reference; "
        f"of which the loss (forward + backward) {fast['loss_seconds']:.2f} s and {ref['loss_seconds']:.2f} s "
        f"({ref['loss_seconds'] / fast['loss_seconds']:.2f}x)"
    )
    steps = len(fast["loss"])
    print(f"largest difference between the two runs' losses over {steps} steps: {result['max_loss_diff']:.2e}")
    print(f"wrote {args.out / 'simclr_digits.json'} and {args.out / 'simclr_digits.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
