"""Figures: each function writes a real PNG and rejects bad input."""
import numpy as np
import pytest
import scipy.ndimage

from pymks_vae import evaluation, plotting
from pymks_vae.datasets import generate_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=2000):
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


@pytest.fixture
def pair(rng):
    images = generate_lines(range(6), size=48, seed=1)[0]
    recon = np.clip(scipy.ndimage.gaussian_filter(images, (0, 1, 1)) + rng.normal(0, 0.03, images.shape), 0, 1)
    return images, recon


def test_reconstruction_grid(tmp_path, pair):
    images, recon = pair
    path = tmp_path / "figs" / "grid.png"  # the folder is created
    assert plotting.reconstruction_grid(images, recon[:, None], path, n=4) == str(path)
    assert_png(path)
    stats = evaluation.spatial_stats(images)
    out = plotting.reconstruction_grid(images, recon, tmp_path / "grid2.png", stats_originals=stats,
                                       stats_reconstructions=evaluation.spatial_stats(recon), n=10)
    assert_png(out)
    with pytest.raises(ValueError, match="same shape"):
        plotting.reconstruction_grid(images, recon[:3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="n must"):
        plotting.reconstruction_grid(images, recon, tmp_path / "bad.png", n=0)
    with pytest.raises(ValueError, match="stats_originals"):
        plotting.reconstruction_grid(images, recon, tmp_path / "bad.png", stats_originals=stats[:2], n=4)


def test_error_histograms(tmp_path, rng):
    errors = {"vanilla": rng.lognormal(-4, 1, 300), "spatial stats": rng.lognormal(-2, 0.5, 300)}
    assert_png(plotting.error_histograms(errors, tmp_path / "log.png", title="MSE"))  # log-x
    assert_png(plotting.error_histograms({"flat": np.full(10, 0.3)}, tmp_path / "flat.png"))
    with pytest.raises(ValueError, match="errors_by_model"):
        plotting.error_histograms({}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="errors_by_model"):
        plotting.error_histograms({"nan": [np.nan]}, tmp_path / "bad.png")


def test_confusion_matrix_plot(tmp_path):
    m = evaluation.confusion_matrix([1, 2, 3, 4, 4], [1, 2, 4, 4, 3], labels=[1, 2, 3, 4])
    assert_png(plotting.confusion_matrix_plot(m, [1, 2, 3, 4], tmp_path / "cm.png", title="lines"))
    with pytest.raises(ValueError, match="square"):
        plotting.confusion_matrix_plot(np.ones((2, 3)), [0, 1], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels"):
        plotting.confusion_matrix_plot(np.ones((2, 2)), [0, 1, 2], tmp_path / "bad.png")


def test_loss_curves(tmp_path):
    epochs = np.arange(40)
    histories = {
        "vanilla": {"train_loss": list(np.exp(-epochs / 4) + 1e-4), "val_loss": list(np.exp(-epochs / 4) + 2e-4)},
        "spatial stats": {"train_loss": [3.0, 2.0, 1.5]},
    }
    assert_png(plotting.loss_curves(histories, tmp_path / "loss.png"))
    with pytest.raises(ValueError, match="train_loss"):
        plotting.loss_curves({"x": {"val_loss": [1.0]}}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="histories"):
        plotting.loss_curves({}, tmp_path / "bad.png")


def test_distribution_comparison(tmp_path, rng):
    out = plotting.distribution_comparison(rng.normal(1, 0.1, 500), rng.normal(1.1, 0.1, 400), tmp_path / "d.png")
    assert_png(out)
    with pytest.raises(ValueError, match="val_values"):
        plotting.distribution_comparison([1.0], [], tmp_path / "bad.png")
