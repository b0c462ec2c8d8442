"""examples/simclr_digits.py (`fastssl demo`): a tiny run checks that the pieces fit together."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import simclr_digits as demo
from fastssl import cli


def _tiny(**kw) -> demo.Config:
    return demo.Config(
        epochs=1, batch_size=32, max_steps=3, train_size=96, pgd_steps=2, eps=(0.0, 0.05), queue_size=128, **kw
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("mochi", [False, True])
def test_tiny_run_matches_reference(tmp_path, dtype, tol, mochi):
    """fastssl's run and the reference run give the same loss at every step; every metric, the
    table, the JSON and the plot come out."""
    result = demo.run(_tiny(dtype=dtype, mochi=mochi), tmp_path, progress=False)
    fast, ref = result["fastssl"], result["reference"]
    assert len(fast["loss"]) == len(ref["loss"]) == 3
    assert all(torch.isfinite(torch.tensor(fast["loss"])))
    assert result["max_loss_diff"] <= tol * max(fast["loss"])
    assert fast["loss"] == pytest.approx(ref["loss"], rel=tol)
    assert len(fast["knn_top1"]) == 2  # at initialisation and after the epoch
    keys = {"knn_top1", "kmeans_nmi", "kmeans_ari", "kmeans_acc", "probe_eps0", "probe_eps0.05"}
    for metrics in (result["init"], fast["metrics"], ref["metrics"]):
        assert set(metrics) == keys and all(0.0 <= v <= 1.0 or k == "kmeans_ari" for k, v in metrics.items())
    # PGD cannot raise the probe's accuracy
    assert fast["metrics"]["probe_eps0.05"] <= fast["metrics"]["probe_eps0"]
    assert json.loads((tmp_path / "simclr_digits.json").read_text())["max_loss_diff"] == result["max_loss_diff"]
    assert (tmp_path / "simclr_digits.png").read_bytes()[:4] == b"\x89PNG"
    table = demo.table(result).splitlines()
    assert len(table) == 1 + len(keys) + 2 and table[0].split() == ["metric", "init", "fastssl", "reference"]


def test_augment_is_a_view_of_the_image():
    """Views stay in [0, 1], are drawn from the generator alone, and differ from the image."""
    x = demo.load_digits()[0][:16]
    a, b = (demo.augment(x, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, x, atol=0.05)


def test_digits_split_is_stratified():
    x_train, y_train, x_test, y_test = demo.load_digits()
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert float(x_train.max()) == 1.0 and float(x_train.min()) == 0.0
    share = torch.bincount(y_test, minlength=10) / torch.bincount(y_train, minlength=10)
    assert torch.allclose(share, torch.full((10,), 0.3 / 0.7), atol=0.03)


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--epochs", "0"])
    assert exc.value.code == 2 and "--epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The default run (`make demo`): identical losses, and kNN accuracy clearly above initialisation."""
    result = demo.run(demo.Config(), tmp_path, progress=False)
    assert result["max_loss_diff"] < 1e-10
    assert result["fastssl"]["metrics"]["knn_top1"] >= result["init"]["knn_top1"] + 0.02
    assert result["fastssl"]["metrics"]["kmeans_nmi"] >= result["init"]["kmeans_nmi"] + 0.1


def test_dino_demo_tiny_run(tmp_path):
    """examples/dino_digits.py (`fastssl demo --method dino`): the fused loss and the reference give
    the same loss at every step (fp64), the fused loss needs less memory, the files come out."""
    from examples import dino_digits

    cfg = dino_digits.Config(epochs=1, steps_per_epoch=3, batch_size=16, local_crops=2, prototypes=65536)
    result = dino_digits.run(cfg, tmp_path)
    fast, ref = result["fastssl"], result["reference"]
    assert len(fast["loss"]) == len(ref["loss"]) == 3 and len(fast["knn_top1"]) == 2
    assert result["max_loss_diff"] <= 1e-10 * max(fast["loss"])
    assert fast["loss_peak_mb"] < ref["loss_peak_mb"]
    assert (tmp_path / "dino_digits.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "dino_digits.json").read_text())["max_loss_diff"] == result["max_loss_diff"]
