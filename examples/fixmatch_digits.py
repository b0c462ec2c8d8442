"""FixMatch on scikit-learn's digits with 10 labels per class, against the labels alone.

    python examples/fixmatch_digits.py [--epochs 40] [--out examples/results/fixmatch]
    python -m fastssl demo --method fixmatch [...]       # the same

Of the 1257 training images, 10 per class keep their label and the rest are unlabeled. The same
small convolutional network (examples/simclr_digits.py's encoder and a linear classifier, the same
initial weights) is trained twice for the same number of steps:

* "supervised": cross-entropy on batches of the 100 labeled images (weakly augmented) alone;
* "fixmatch": the same, plus :func:`fastssl.fixmatch_loss` on batches of unlabeled images: the
  pseudo-label of a weak view (a shift of up to 1 pixel), where the network is confident (≥ 0.95),
  is the target of a strong view (random affine warp, contrast, noise and erasing).

Both use SGD with Nesterov momentum and FixMatch's cosine learning-rate decay.

After every epoch both are scored on the 540 test images; the FixMatch run also records its
pseudo-label mask rate (the share of unlabeled rows above the threshold) per epoch. Results: a
table on stdout, ``fixmatch_digits.json`` and ``fixmatch_digits.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: the repository root on the path for `examples`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastssl
from examples.simclr_digits import Encoder, augment, load_digits

RUNS = ("supervised", "fixmatch")


@dataclass
class Config:
    epochs: int = 40
    labels_per_class: int = 10
    batch_size: int = 64  # labeled rows per step
    mu: int = 4  # unlabeled rows per labeled row (FixMatch's μ)
    steps_per_epoch: int = 10
    lr: float = 0.03
    threshold: float = 0.95
    lambda_u: float = 1.0
    seed: int = 0


def split_labels(y: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of `per_class` training images of each class (the labeled set), drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    picks = [(y == c).nonzero().squeeze(1) for c in range(int(y.max()) + 1)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks])


def weak(x: Tensor, g: torch.Generator) -> Tensor:
    """A shift of each image by up to one pixel in each direction (zero padding)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, b), generator=g)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.encoder = Encoder()
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.encoder(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def train(data, labeled: Tensor, unlabeled: Tensor, cfg: Config, fixmatch: bool) -> dict:
    """One run; returns the test accuracy per epoch (index 0: at initialisation), the mask rate per
    epoch (FixMatch) and the seconds spent."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(cfg.seed)
    model = Classifier()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # FixMatch's schedule: lr · cos(7πk / 16K) over the K steps (without it the last epochs' test
    # accuracy swung by ±1 % from epoch to epoch)
    total = cfg.epochs * cfg.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: math.cos(7 * math.pi * k / (16 * total)))
    g = torch.Generator().manual_seed(cfg.seed + 1)  # batches and augmentations
    history = {"test_accuracy": [accuracy(model, x_test, y_test)], "mask_rate": [], "seconds": 0.0}
    start = time.perf_counter()
    for _epoch in range(cfg.epochs):
        model.train()
        masked = []
        for _step in range(cfg.steps_per_epoch):
            lb = labeled[torch.randint(len(labeled), (cfg.batch_size,), generator=g)]
            x_lb = weak(x_train[lb], g)
            if not fixmatch:
                loss = F.cross_entropy(model(x_lb), y_train[lb])
            else:
                ub = unlabeled[torch.randint(len(unlabeled), (cfg.mu * cfg.batch_size,), generator=g)]
                x_ub = x_train[ub]
                # one forward pass over the three batches, so that batch norm sees them together
                logits = model(torch.cat([x_lb, weak(x_ub, g), augment(x_ub, g)]))
                logits_lb, logits_w, logits_s = logits.split([len(lb), len(ub), len(ub)])
                unsup, mask = fastssl.fixmatch_loss(logits_w, logits_s, threshold=cfg.threshold)
                loss = F.cross_entropy(logits_lb, y_train[lb]) + cfg.lambda_u * unsup
                masked.append(float(mask.mean()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        history["test_accuracy"].append(accuracy(model, x_test, y_test))
        if fixmatch:
            history["mask_rate"].append(sum(masked) / len(masked))
    history["seconds"] = time.perf_counter() - start
    return history


def run(cfg: Config, out: Path | None = None) -> dict:
    """Both runs; writes the JSON and the plot to `out` when given."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_digits(cfg.seed)
    labeled = split_labels(data[1], cfg.labels_per_class, cfg.seed)
    unlabeled = torch.ones(len(data[1]), dtype=torch.bool)
    unlabeled[labeled] = False
    unlabeled = unlabeled.nonzero().squeeze(1)
    result = {"config": asdict(cfg), "labeled": len(labeled), "unlabeled": len(unlabeled)}
    for name in RUNS:
        result[name] = train(data, labeled, unlabeled, cfg, fixmatch=name == "fixmatch")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fixmatch_digits.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "fixmatch_digits.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_mask) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, style in zip(RUNS, ("--", "-"), strict=True):
        acc = result[name]["test_accuracy"]
        ax_acc.plot(range(len(acc)), acc, style, label=f"{name} (final {acc[-1]:.3f})")
    rate = result["fixmatch"]["mask_rate"]
    ax_mask.plot(range(1, len(rate) + 1), rate, "-o", ms=3)
    n = result["config"]["labels_per_class"]
    ax_acc.set(xlabel="epoch (0 = initialisation)", ylabel="test accuracy", title=f"digits, {n} labels per class")
    ax_mask.set(xlabel="epoch", ylabel="share of unlabeled rows", ylim=(0, 1),
                title=f"FixMatch pseudo-label mask rate (≥ {result['config']['threshold']})")  # fmt: skip
    ax_acc.legend()
    for ax in (ax_acc, ax_mask):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--labels-per-class", type=int, default=defaults.labels_per_class)
    parser.add_argument("--threshold", type=float, default=defaults.threshold)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=Path("examples/results/fixmatch"), help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.labels_per_class < 1:
        parser.error("--epochs and --labels-per-class must be >= 1")
    cfg = Config(epochs=args.epochs, labels_per_class=args.labels_per_class, threshold=args.threshold, seed=args.seed)
    result = run(cfg, args.out)
    print(f"{result['labeled']} labeled and {result['unlabeled']} unlabeled training images, {cfg.epochs} epochs")
    print(f"{'run':<12s}{'test accuracy':>15s}{'seconds':>10s}")
    for name in RUNS:
        print(f"{name:<12s}{result[name]['test_accuracy'][-1]:>15.3f}{result[name]['seconds']:>10.1f}")
    rates = " ".join(f"{r:.2f}" for r in result["fixmatch"]["mask_rate"])
    print(f"FixMatch mask rate per epoch: {rates}")
    print(f"wrote {args.out / 'fixmatch_digits.json'} and {args.out / 'fixmatch_digits.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
