"""benchmarks/lines_search.py: the per-image search in statistics space, and the script's outputs."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import lines_search  # noqa: E402

from pymks_vae import evaluation  # noqa: E402
from pymks_vae.losses import SpatialStatsLoss  # noqa: E402
from pymks_vae.models.decoder import StrokeDecoder  # noqa: E402


def test_search_finds_the_bars_from_their_statistics_alone():
    torch.manual_seed(0)
    target = torch.ones(2, 1, 32, 32)
    target[0, 0, 6:8, 3:27] = 0.0                          # one horizontal bar
    target[1, 0, 2:30, 5:7] = 0.0                          # two vertical bars
    target[1, 0, 4:26, 17:19] = 0.0
    loss_fn = SpatialStatsLoss(states=(0.0,), indicator="straight_through", cutoff=None).calibrate(target)
    dec = StrokeDecoder(latent_dim=4 * 6, image_size=32, n_strokes=4)
    dec.fc, dec.head = torch.nn.Identity(), torch.nn.Identity()
    starts = 3
    start = torch.randn(2 * starts, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = loss_fn.stats_error(dec(start), target.repeat_interleave(starts, 0), reduction="none")
    drawn, losses = lines_search.search(dec, start, loss_fn, target.repeat_interleave(starts, 0), steps=300, lr=0.05)
    assert float(losses.min()) < 0.2 * float(before.min())
    best = lines_search.roll_to_gaps(lines_search.best_of(drawn, losses, starts)[:, 0].numpy())
    orientation, count = evaluation.analyse_lines(best, level=0.5)
    assert orientation.tolist() == [evaluation.HORIZONTAL, evaluation.VERTICAL]
    assert count.tolist() == [1, 2]


def test_tiny_run_reports_every_reading(tmp_path):
    out = tmp_path / "search.json"
    results = lines_search.main(["--images", "3", "--restarts", "2", "--steps", "2", "--size", "32",
                                 "--same-start", "--json", str(out), "--figures", str(tmp_path / "fig")])
    assert set(results) == {"search, one start", "search, best of 2 starts"}
    for res in results.values():
        assert 0.0 <= res["orientation"] <= 1.0 and 0.0 <= res["line_count"] <= 1.0
        assert sum(res["count_histogram"]) == 3
    saved = json.loads(out.read_text())
    assert saved["starts"] == "the same start for every image" and sum(saved["true_counts"]) == 3
    assert not os.path.exists(str(out) + ".tmp")
    assert (tmp_path / "fig" / "search.png").stat().st_size > 1000


def test_checkpoint_readings_and_size_mismatch(tmp_path):
    from pymks_vae.datasets import generate_lines
    from pymks_vae.models import VAE
    from pymks_vae.training import TrainConfig, train_vae

    images, _, _ = generate_lines(range(16), size=32, seed=1)
    torch.manual_seed(0)
    model = VAE(latent_dim=2, image_size=32, decoder="strokes", stroke_binary=True)
    loss = SpatialStatsLoss(states=(0.0,), indicator="straight_through").calibrate(torch.from_numpy(images)[:, None])
    ckpt = tmp_path / "spatial_stats.pt"
    train_vae(model, loss, torch.from_numpy(images)[:, None],
              TrainConfig(epochs=1, batch_size=8, progress=False, device="cpu", checkpoint_path=str(ckpt)))
    results = lines_search.main(["--images", "3", "--restarts", "1", "--steps", "2", "--size", "32",
                                 "--checkpoint", str(ckpt), "--figures", str(tmp_path / "fig")])
    assert {"model, posterior mean", "model, latent searched from the posterior mean"} <= set(results)
    assert (tmp_path / "fig" / "model.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="trained on"):
        lines_search.main(["--images", "2", "--restarts", "1", "--steps", "1", "--size", "48", "--checkpoint", str(ckpt)])


@pytest.mark.parametrize("bad", [["--images", "0"], ["--restarts", "0"], ["--size", "8"], ["--lr", "0"]])
def test_bad_flags_are_refused(bad):
    with pytest.raises(SystemExit):
        lines_search.parse_args(bad)


def test_a_bar_wrapped_across_the_edge_reads_as_one():
    img = np.ones((1, 16, 16))
    img[0, 3:5, :4] = img[0, 3:5, 10:] = 0.0  # one bar of 10 px, wrapped across the right edge
    assert evaluation.analyse_lines(img, level=0.5, min_area=1)[1].tolist() == [2]
    rolled = lines_search.roll_to_gaps(img)
    assert evaluation.analyse_lines(rolled, level=0.5, min_area=1)[1].tolist() == [1]
    assert np.array_equal(np.sort(rolled.ravel()), np.sort(img.ravel()))


def test_pca_statistics_reconstruct_exactly_with_every_component_and_lose_variance_with_few():
    imgs, _, _ = lines_search.generate_lines(range(30), size=16, seed=3)
    held, _, _ = lines_search.generate_lines(range(5), size=16, seed=4)
    train, held = torch.from_numpy(imgs)[:, None], torch.from_numpy(held)[:, None]
    loss_fn = SpatialStatsLoss(states=(0.0,), indicator="straight_through").calibrate(train)
    true = loss_fn.target_statistics(held)
    # 29 components span the 30 centred training statistics; held-out ones need not lie in that span,
    # but the training images themselves must come back exactly
    rec, fvu, total = lines_search.pca_statistics(loss_fn, train, train[:5], 29)
    torch.testing.assert_close(rec, loss_fn.target_statistics(train[:5]), rtol=0, atol=1e-6)
    assert total > 0 and np.all(fvu < 1e-9)
    rec1, fvu1, _ = lines_search.pca_statistics(loss_fn, train, held, 1)
    rec5, fvu5, _ = lines_search.pca_statistics(loss_fn, train, held, 5)
    assert rec1.shape == true.shape
    assert np.median(fvu5) < np.median(fvu1)  # more components, less left unexplained


def test_tiny_run_with_pca_reports_its_readings():
    results = lines_search.main(["--images", "3", "--restarts", "2", "--steps", "2", "--size", "16",
                                 "--pca", "2", "4", "--pca-train", "20"])
    for k in (2, 4):
        res = results[f"search from {k} principal components of the statistics, best of 2 starts"]
        assert sum(res["count_histogram"]) == 3 and 0.0 <= res["unexplained_variance_median"]


@pytest.mark.parametrize("args", [["--pca", "0"], ["--pca-train", "1"], ["--pca", "30", "--pca-train", "20"]])
def test_bad_pca_arguments_are_refused(args):
    with pytest.raises(SystemExit):
        lines_search.parse_args(args)
