"""The statistics VAE (StatsVAE), its loss (DecodedStatsLoss) and drawings searched from statistics."""
import numpy as np
import pytest
import torch

from pymks_vae import evaluation
from pymks_vae.datasets import generate_lines
from pymks_vae.losses import DecodedStatsLoss, SpatialStatsLoss
from pymks_vae.models.stats_vae import StatsVAE
from pymks_vae.reconstruction import draw_strokes, roll_to_gaps
from pymks_vae.training import CheckpointError, TrainConfig, load_model, train_vae


def _lines(n, size, seed):
    images, orientation, n_lines = generate_lines(range(n), size=size, seed=seed)
    return torch.from_numpy(images)[:, None], orientation, n_lines


@pytest.fixture(scope="module")
def lines32():
    x, orientation, n_lines = _lines(400, 32, seed=21)
    loss = SpatialStatsLoss(indicator="straight_through").calibrate(x[:300])
    return x, orientation, n_lines, loss, loss.target_statistics(x)


def test_basis_whitens_and_spans_the_training_statistics():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(30, 2, 3, 3, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 18).view(2, 3, 3)
    model = StatsVAE(stats_shape=(2, 3, 3), latent_dim=2, n_basis=40).fit_basis(f)
    assert model.n_basis == 18  # no more axes than statistics
    basis = model.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(18, dtype=torch.float64), atol=1e-5, rtol=0)
    c = model.coordinates(f.float()).double()
    torch.testing.assert_close(c.mean(0), torch.zeros(18, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(c.std(0), torch.ones(18, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.statistics(c.float()).double(), f, atol=1e-4, rtol=1e-4)  # every axis kept


def test_fewer_samples_than_axes_leave_the_last_axes_empty():
    f = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model = StatsVAE(stats_shape=(1, 4, 4), latent_dim=2, n_basis=10).fit_basis(f)
    assert torch.count_nonzero(model.basis.abs().sum(1)) == 4  # 5 centred samples span 4 directions
    torch.testing.assert_close(model.statistics(model.coordinates(f)), f, atol=1e-5, rtol=1e-5)


def test_shapes_modes_and_sampling():
    f = torch.randn(20, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    model = StatsVAE(stats_shape=(1, 5, 5), latent_dim=3, n_basis=8).fit_basis(f)
    model.train()
    torch.manual_seed(0)
    f1, mu, logvar = model(f[:4])
    assert f1.shape == (4, 1, 5, 5) and mu.shape == logvar.shape == (4, 3)
    model.eval()
    a, b = model(f[:4])[0], model(f[:4])[0]
    assert torch.equal(a, b)  # eval mode decodes the posterior mean
    torch.testing.assert_close(a, model.decode(model.encode(f[:4])[0]))
    assert model.sample(6, generator=torch.Generator().manual_seed(0)).shape == (6, 1, 5, 5)


def test_bad_input_is_refused_with_the_argument_named():
    model = StatsVAE(stats_shape=(1, 5, 5), latent_dim=3, n_basis=8)
    with pytest.raises(RuntimeError, match="fit_basis"):
        model.encode(torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="stats_shape"):
        StatsVAE(stats_shape=(0, 3))
    with pytest.raises(ValueError, match="latent_dim"):
        StatsVAE(stats_shape=(3,), latent_dim=0)
    with pytest.raises(ValueError, match="2 or more"):
        model.fit_basis(torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="same for every sample"):
        model.fit_basis(torch.ones(4, 1, 5, 5))
    with pytest.raises(ValueError, match="NaN"):
        model.fit_basis(torch.full((4, 1, 5, 5), float("nan")))
    model.fit_basis(torch.randn(6, 1, 5, 5))
    with pytest.raises(ValueError, match="stats_shape"):
        model.encode(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        model.encode(torch.zeros(2, 1, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="fit_basis"):
        train_vae(StatsVAE(stats_shape=(1, 5, 5)), DecodedStatsLoss(scale=1.0), torch.randn(8, 1, 5, 5),
                  TrainConfig(epochs=1, progress=False))


def test_decoded_loss_is_the_image_loss_on_statistics(lines32):
    """For binary images the decoded-statistics error of their statistics is the image loss's error."""
    x, _, _, loss, f = lines32
    dloss = DecodedStatsLoss.from_loss(loss)
    a, b = x[:6], x[6:12]
    expected = loss.stats_error(a, b, reduction="none")
    got = dloss.stats_error(loss.target_statistics(a), loss.target_statistics(b), reduction="none")
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-4, atol=1e-6)
    total, parts = dloss(f[:6], f[6:12], torch.zeros(6, 2), torch.zeros(6, 2))
    torch.testing.assert_close(total, got.mean())
    assert dloss.beta == loss.beta


def test_decoded_loss_refuses_bad_arguments(lines32):
    with pytest.raises(ValueError, match="scale"):
        DecodedStatsLoss(scale=0.0)
    with pytest.raises(ValueError, match="reduction"):
        DecodedStatsLoss(scale=1.0, reduction="mean")
    with pytest.raises(ValueError, match="same shape"):
        DecodedStatsLoss(scale=1.0).stats_error(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="variance"):
        DecodedStatsLoss.from_loss(SpatialStatsLoss(normalise="minmax", scale=1.0))
    with pytest.raises(ValueError, match="calibrated"):
        DecodedStatsLoss.from_loss(SpatialStatsLoss())
    with pytest.raises(TypeError, match="SpatialStatsLoss"):
        DecodedStatsLoss.from_loss("loss")


def test_a_bar_is_drawn_back_from_its_statistics():
    """One bar per image: the search from the image's own statistics draws one bar, same orientation."""
    x = torch.ones(4, 1, 24, 24)
    x[0, :, 4:6, 2:20] = 0
    x[1, :, 3:21, 10:13] = 0
    x[2, :, 12:13, 1:23] = 0
    x[3, :, 0:24, 5:7] = 0
    loss = SpatialStatsLoss(indicator="straight_through", cutoff=None).calibrate(
        torch.cat([x, x.transpose(2, 3)]))
    drawn, err = draw_strokes(loss.target_statistics(x), loss, image_size=24, restarts=3, steps=150)
    assert drawn.shape == (4, 1, 24, 24) and set(torch.unique(drawn).tolist()) <= {0.0, 1.0}
    found, count = evaluation.analyse_lines(drawn[:, 0].numpy(), level=0.5)
    true_found, _ = evaluation.analyse_lines(x[:, 0].numpy(), level=0.5)
    assert (found == true_found).all() and (count == 1).all(), (found, count)
    assert (err < 0.2).all(), err  # far below the unexplained variance of the mean statistics (about 1)
    again, _ = draw_strokes(loss.target_statistics(x), loss, image_size=24, restarts=3, steps=150)
    assert torch.equal(drawn, again)  # the same seed draws the same bars


def test_draw_strokes_refuses_bad_arguments(lines32):
    _, _, _, loss, f = lines32
    with pytest.raises(ValueError, match="statistics has shape"):
        draw_strokes(f[:2, :, :8], loss, image_size=32)
    with pytest.raises(ValueError, match="calibrated"):
        draw_strokes(f[:2], SpatialStatsLoss(), image_size=32)
    with pytest.raises(ValueError, match="one phase"):
        draw_strokes(f[:2], SpatialStatsLoss(states=(0.0, 1.0), scale=1.0, cutoff=None), image_size=32)
    for name, value in (("restarts", 0), ("steps", -1), ("n_strokes", 0), ("lr", 0.0), ("batch_size", 0)):
        with pytest.raises(ValueError, match=name):
            draw_strokes(f[:2], loss, image_size=32, **{name: value})
    with pytest.raises(TypeError, match="statistics"):
        draw_strokes(f[:2].numpy(), loss, image_size=32)
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        roll_to_gaps(np.ones((2, 3)))


def test_trained_model_decodes_held_out_statistics_and_survives_a_checkpoint(lines32, tmp_path):
    """A learning regression: a short fit must explain most of held-out statistics' variance, and its
    drawings must hold dark lines of the right orientation."""
    torch.set_num_threads(1)
    x, orientation, n_lines, loss, f = lines32
    torch.manual_seed(0)
    model = StatsVAE(stats_shape=f.shape[1:], latent_dim=8, n_basis=64).fit_basis(f[:300])
    dloss = DecodedStatsLoss.from_loss(loss)
    path = tmp_path / "stats.pt"
    train_vae(model, dloss, f[:300], TrainConfig(epochs=40, batch_size=32, lr=3e-3, seed=0, progress=False,
                                                 device="cpu", checkpoint_path=str(path)))
    model.eval()
    with torch.no_grad():
        decoded = model(f[300:])[0]
    fvu = float(dloss.stats_error(decoded, f[300:]))
    assert fvu < 0.35, f"held-out unexplained variance {fvu:.2f} (the mean statistics: about 1)"
    drawn, _ = draw_strokes(decoded[:24], loss, image_size=32, restarts=2, steps=200)
    found, count = evaluation.analyse_lines(drawn[:, 0].numpy(), level=0.5)
    assert (found == orientation[300:324]).mean() >= 0.9
    chance = np.bincount(n_lines[300:324]).max() / 24  # always answering the commonest count
    assert (count == n_lines[300:324]).mean() > chance, np.bincount(count)

    loaded = load_model(str(path))
    assert isinstance(loaded, StatsVAE) and loaded.basis_fitted
    torch.testing.assert_close(loaded(f[300:])[0], decoded)
    bad = torch.load(path, weights_only=True)
    bad["model_config"]["stats_shape"] = [1, 8, 8]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError):
        load_model(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("module", ["pymks_vae.models.stats_vae", "pymks_vae.reconstruction", "pymks_vae.losses"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_same_seed_same_statistics_model(lines32):
    """Two fits with one seed give identical weights, and so identical drawings (metrics.json reproduces)."""
    _, _, _, loss, f = lines32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        states = []
        for _ in range(2):
            torch.manual_seed(4)
            model = StatsVAE(stats_shape=f.shape[1:], latent_dim=4, n_basis=32).fit_basis(f[:100])
            train_vae(model, DecodedStatsLoss.from_loss(loss), f[:100],
                      TrainConfig(epochs=2, batch_size=16, seed=4, progress=False, device="cpu"))
            states.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)  # the rest of the suite keeps its thread count
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
