"""pymks_vae.VAETransformer: numpy/dask/xarray/distributed, pipelines, persistence, bad input.

Tiny models throughout (16x16 fields, 1-2 epochs): these tests check behaviour, not learning.
"""
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from optional import require
from sklearn_checks import run_check, tabular_failures

from pymks_vae.microstructures import generate_classes
from pymks_vae.transformers import TwoPointCorrelation, VAETransformer

dask = require("dask")
da = require("dask.array")


SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waits make them 10-100x slower; restore the setting for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw):
    params = dict(latent_dim=3, epochs=1, batch_size=4, random_state=0)
    params.update(kw)
    return VAETransformer(**params)


@pytest.fixture(scope="module")
def micro():
    x, y = generate_classes(4, (SIZE, SIZE), seed=5)
    return x, y


@pytest.fixture(scope="module")
def one_hot(micro):
    x = micro[0]
    return np.stack([1.0 - x, x], axis=-1)


@pytest.fixture(scope="module")
def fitted_one_hot(one_hot):
    return tiny(epochs=2).fit(one_hot)


def refuse(*args, **kwargs):
    raise AssertionError("something was computed before it was asked for")


# ----------------------------------------------------------------------------- numpy
def test_fit_transform_grey(micro):
    x, _ = micro
    vae = tiny(epochs=2)
    assert vae.fit(x) is vae
    z = vae.transform(x)
    assert isinstance(z, np.ndarray) and z.shape == (len(x), 3) and z.dtype == np.float64
    assert np.isfinite(z).all() and z.std(axis=0).min() > 0
    assert vae.input_shape_ == (SIZE, SIZE) and vae.n_state_ is None
    assert vae.history_["epochs"] == 2 and len(vae.history_["train_loss"]) == 2
    assert next(vae.model_.parameters()).device.type == "cpu" and not vae.model_.training
    assert vae.stats_scale_ > 0
    rec = vae.inverse_transform(z)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1


def test_fit_transform_one_hot(fitted_one_hot, one_hot):
    vae = fitted_one_hot
    assert vae.n_state_ == 2 and vae.input_shape_ == (SIZE, SIZE, 2)
    z = vae.transform(one_hot)
    rec = vae.inverse_transform(z)
    assert rec.shape == one_hot.shape
    np.testing.assert_allclose(rec.sum(axis=-1), 1.0, atol=1e-5)  # phase probabilities
    samples = vae.sample(5, random_state=1)
    assert samples.shape == (5, SIZE, SIZE, 2)
    np.testing.assert_array_equal(samples, vae.sample(5, random_state=1))
    assert vae.get_feature_names_out().tolist() == ["vae0", "vae1", "vae2"]


def test_same_random_state_same_model(micro):
    x, _ = micro
    a = tiny().fit_transform(x)
    b = tiny().fit_transform(x)
    c = tiny(random_state=1).fit_transform(x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_losses_and_boundaries_train(micro):
    x, _ = micro
    for kw in (dict(loss="data"), dict(periodic_boundary=False, cutoff=3),
               dict(stats_scale=3.0, correlations=((1, 1), (0, 1)), cutoff=100)):
        vae = tiny(**kw).fit(x)
        assert np.isfinite(vae.history_["train_loss"]).all() and vae.transform(x).shape == (len(x), 3)


@pytest.mark.parametrize("batch_size, latent_dim, head", [(8, 3, "batch"), (4, 3, "learned"), (5, 3, "batch")])
def test_readout_head_solved_when_the_batch_leaves_a_residual(micro, monkeypatch, batch_size, latent_dim, head):
    """The read-out head is solved on each batch when a batch holds more than latent_dim + 1
    samples, else learned; either way the fit trains and the head maps the latent to statistics."""
    from pymks_vae import losses

    seen = []
    init = losses.LinearReadoutLoss.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.head, self.weight, self.one_point_share))

    monkeypatch.setattr(losses.LinearReadoutLoss, "__init__", spy)
    x, _ = micro
    vae = tiny(batch_size=batch_size, latent_dim=latent_dim, epochs=2).fit(x)
    assert seen == [(head, 8.0, 0.8)]
    z = torch.from_numpy(vae.transform(x)).float()
    out = vae.model_.stats_head(z)
    assert out.shape == (len(x), vae.model_.encoder.norm.num_features) and torch.isfinite(out).all()


def test_loss_boundary_and_window(micro):
    from pymks_vae import losses, ops
    from pymks_vae.transformers import _stats_loss

    x = torch.from_numpy(micro[0][:2, None]).float()
    x_hat = torch.rand_like(x)
    kwargs = dict(states=(0.0, 1.0), correlations=((1, 1),), normalise="none", indicator="gaussian", scale=1.0)
    periodic = losses.SpatialStatsLoss(**kwargs).stats_error(x_hat, x, reduction="sum")
    assert torch.equal(_stats_loss(losses.SpatialStatsLoss, kwargs).stats_error(x_hat, x, reduction="sum"), periodic)
    non_periodic = _stats_loss(losses.SpatialStatsLoss, kwargs, periodic=False).stats_error(x_hat, x, reduction="sum")
    assert torch.isfinite(non_periodic) and not torch.isclose(periodic, non_periodic)
    # a cutoff compares the central (2c+1)^2 lags only
    windowed = _stats_loss(losses.SpatialStatsLoss, kwargs, cutoff=2).stats_error(x_hat, x, reduction="sum")
    ind = lambda t: ops.soft_indicator(t, (0.0, 1.0))  # noqa: E731
    f_hat, f = (ops.two_point_stats(ind(t), [(1, 1)])[..., 8 - 2:8 + 3, 8 - 2:8 + 3] for t in (x_hat, x))
    torch.testing.assert_close(windowed, ((f_hat - f) ** 2).sum(), rtol=1e-4, atol=1e-6)


def test_verbose_shows_progress_bar(micro, capsys):
    tiny(verbose=True).fit(micro[0])
    assert "epoch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- dask
def _watched(x, chunks):
    calls = []

    def load(block):
        calls.append(len(block))
        return block

    src = da.from_array(x, chunks=chunks)
    return src.map_blocks(load, dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype)), calls


def test_dask_transform_is_lazy_and_matches_numpy(fitted_one_hot, one_hot):
    watched, calls = _watched(one_hot, (5, SIZE, SIZE, 1))
    with dask.config.set(scheduler=refuse):
        z = fitted_one_hot.transform(watched)
        rec = fitted_one_hot.inverse_transform(z)
    assert calls == []
    assert isinstance(z, da.Array) and z.chunks == ((5, 5, 5, 1), (3,))
    assert isinstance(rec, da.Array) and rec.shape == one_hot.shape
    np.testing.assert_allclose(z.compute(), fitted_one_hot.transform(one_hot), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rec.compute(), fitted_one_hot.inverse_transform(fitted_one_hot.transform(one_hot)),
                               rtol=1e-5, atol=1e-6)


def test_dask_fit_streams_chunks(one_hot):
    watched, calls = _watched(one_hot, (6, SIZE, SIZE, 2))
    epochs = 2
    with dask.config.set(scheduler="sync"):
        vae = tiny(epochs=epochs).fit(watched)
    # One chunk of at most 6 samples is in memory at a time: every epoch loads each of the 3 chunks
    # once, plus one load of the first chunk for the automatic statistics scale.
    assert max(calls) <= 6
    assert len(calls) == epochs * 3 + 1
    assert vae.transform(one_hot).shape == (len(one_hot), 3)


def test_dask_fit_validates_chunks_when_loaded(one_hot):
    bad = one_hot.copy()
    bad[-1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny().fit(da.from_array(bad, chunks=(4, SIZE, SIZE, 2)))


def test_distributed_cluster_transform(fitted_one_hot, one_hot):
    """Both transformers' lazy outputs run on a cluster of two worker processes (one cluster for both:
    starting one costs seconds)."""
    distributed = require("distributed")
    x = da.from_array(one_hot, chunks=(4, SIZE, SIZE, 2))
    z = fitted_one_hot.transform(x)
    local = z.compute(scheduler="sync")
    stats = TwoPointCorrelation(correlations=[(1, 1), (0, 1)], cutoff=5).fit(x).transform(x)
    stats_local = stats.compute(scheduler="sync")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        remote = client.compute(z).result()
        stats_remote = client.compute(stats).result()
        workers = client.run(lambda: os.getpid())
        # the fitted estimator itself also travels (pickled) to a worker process
        shipped = client.submit(lambda est, block: (est.transform(block), os.getpid()), fitted_one_hot,
                                one_hot[:5]).result()
    assert len(set(workers.values())) == 2 and os.getpid() not in workers.values()
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-6)
    assert shipped[1] in workers.values()
    np.testing.assert_allclose(shipped[0], local[:5], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats_remote, stats_local, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- xarray
def test_xarray_in_and_out(fitted_one_hot, one_hot):
    ids = np.arange(100, 100 + len(one_hot))
    arr = xr.DataArray(da.from_array(one_hot, chunks=(8, SIZE, SIZE, 2)), dims=("sample", "x", "y", "state"),
                       coords={"sample": ids, "grade": ("sample", np.arange(len(one_hot)) % 3)})
    z = fitted_one_hot.transform(arr)
    assert isinstance(z, xr.DataArray) and z.dims == ("sample", "latent")
    assert isinstance(z.data, da.Array)
    assert z["sample"].values.tolist() == ids.tolist()
    assert z["grade"].values.tolist() == (np.arange(len(one_hot)) % 3).tolist()
    assert z["latent"].values.tolist() == ["vae0", "vae1", "vae2"]
    np.testing.assert_allclose(z.values, fitted_one_hot.transform(one_hot), rtol=1e-6, atol=1e-6)
    rec = fitted_one_hot.inverse_transform(z)
    assert rec.dims == ("sample", "x", "y", "state") and rec["sample"].values.tolist() == ids.tolist()
    # dims are read by name: any order of the same dims gives the same latents
    for order in (("state", "sample", "x", "y"), ("x", "y", "sample", "state")):
        z_perm = fitted_one_hot.transform(arr.transpose(*order))
        np.testing.assert_allclose(np.asarray(z_perm), z.values, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        fitted_one_hot.transform(arr.rename({"sample": "specimen"}))


# ----------------------------------------------------------------------------- scikit-learn composition
def test_pipeline_after_pymks_primitive_and_grid_search(micro):
    pymks = require("pymks")
    x, y = micro
    pipe = Pipeline([
        ("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0.0, max_=1.0)),
        ("vae", tiny()),
        ("clf", LogisticRegression()),
    ])
    pipe.fit(x, y)
    assert pipe.predict(x).shape == y.shape
    assert pipe["vae"].n_state_ == 2
    search = GridSearchCV(pipe, {"vae__latent_dim": [2, 3]}, cv=2).fit(x, y)
    assert search.best_params_["vae__latent_dim"] in (2, 3)
    best = search.best_params_["vae__latent_dim"]
    assert search.best_estimator_["vae"].transform(np.stack([1 - x, x], -1)).shape[1] == best
    assert len(search.cv_results_["mean_test_score"]) == 2


def test_clone_gives_unfitted_copy(fitted_one_hot):
    fresh = clone(fitted_one_hot)
    assert fresh.get_params() == fitted_one_hot.get_params()
    assert not hasattr(fresh, "model_")
    with pytest.raises(NotFittedError):
        fresh.transform(np.zeros((1, SIZE, SIZE, 2)))


def test_pickle_round_trip_keeps_weights(fitted_one_hot, one_hot):
    blob = pickle.dumps(fitted_one_hot)
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.transform(one_hot), fitted_one_hot.transform(one_hot))
    assert back.history_ == fitted_one_hot.history_ and back.get_params() == fitted_one_hot.get_params()
    assert "model_" not in fitted_one_hot.__getstate__()  # weights travel as a plain state_dict


def test_save_load_round_trip(fitted_one_hot, one_hot, tmp_path):
    path = tmp_path / "sub" / "vae.pt"
    fitted_one_hot.save(path)
    assert os.listdir(path.parent) == ["vae.pt"]  # written atomically: no temporary left behind
    torch.load(path, weights_only=True)  # plain tensors and strings only
    back = VAETransformer.load(path)
    np.testing.assert_array_equal(back.transform(one_hot), fitted_one_hot.transform(one_hot))
    assert back.get_params() == fitted_one_hot.get_params()
    assert back.input_shape_ == fitted_one_hot.input_shape_ and back.n_state_ == 2
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pymks_vae.VAETransformer"):
        VAETransformer.load(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- bad input
def test_transform_before_fit():
    with pytest.raises(NotFittedError):
        VAETransformer().transform(np.zeros((2, SIZE, SIZE)))
    with pytest.raises(NotFittedError):
        VAETransformer().inverse_transform(np.zeros((2, 9)))


def test_wrong_rank_and_ambiguous_layouts(micro):
    with pytest.raises(ValueError, match="2D microstructures"):
        tiny().fit(np.zeros((4, SIZE)))
    with pytest.raises(ValueError, match=r"3D ones.*\(2, 4, 4, 4, 4, 2\)"):
        tiny().fit(np.zeros((2, 4, 4, 4, 4, 2)))
    # a 4-axis array that is not a one-hot is most likely a 3D grey field: say how to pass one
    with pytest.raises(ValueError, match="spatial_ndim=3"):
        tiny().fit(np.random.default_rng(0).random((3, SIZE, SIZE, SIZE)))
    with pytest.raises(ValueError, match="with spatial_ndim=2"):
        tiny(spatial_ndim=2).fit(np.zeros((2, 4, 4, 4, 2)))
    with pytest.raises(ValueError, match="with spatial_ndim=3"):
        tiny(spatial_ndim=3).fit(micro[0])


def test_wrong_n_state_and_shape(fitted_one_hot, micro):
    x = micro[0]
    three = np.zeros((2, SIZE, SIZE, 3))
    three[..., 0] = 1
    with pytest.raises(ValueError, match="n_state=3.*n_state=2"):
        fitted_one_hot.transform(three)
    with pytest.raises(ValueError, match="fitted on one-hot"):
        fitted_one_hot.transform(x)
    with pytest.raises(ValueError, match="per-sample shape"):
        fitted_one_hot.transform(np.stack([np.ones((2, 32, 32)), np.zeros((2, 32, 32))], -1))


def test_nan_and_range(micro, fitted_one_hot, one_hot):
    x = micro[0].copy()
    x[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny().fit(x)
    bad = one_hot.copy()
    bad[1, 2, 2, :] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fitted_one_hot.transform(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny().fit(micro[0] * 3.0)


def test_inverse_transform_width(fitted_one_hot):
    with pytest.raises(ValueError, match="latent_dim=3"):
        fitted_one_hot.inverse_transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="latent_dim=3"):
        fitted_one_hot.inverse_transform(np.zeros(3))


@pytest.mark.parametrize("params, match", [
    (dict(latent_dim=0), "latent_dim"), (dict(epochs=0), "epochs"), (dict(batch_size=1), "batch_size"),
    (dict(loss="mse"), "loss"), (dict(beta=-1.0), "beta"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(stats_scale="big"), "stats_scale"), (dict(device="tpu"), "device"),
    (dict(encoder="transformer"), "encoder"), (dict(cutoff=-1), "cutoff"),
    (dict(spatial_ndim=4), "spatial_ndim"), (dict(spatial_ndim=True), "spatial_ndim"),
    (dict(correlations="all"), "correlations"), (dict(one_point="yes"), "one_point"),
    (dict(linear_readout=-1.0), "linear_readout"), (dict(linear_readout="yes"), "linear_readout"),
    (dict(linear_readout=float("nan")), "linear_readout"), (dict(encoder=None), "encoder"),
])
def test_bad_parameters(micro, params, match):
    with pytest.raises(ValueError, match=match):
        tiny(**params).fit(micro[0])


def test_one_sample_refused(micro):
    with pytest.raises(ValueError, match="at least 2 samples"):
        tiny().fit(micro[0][:1])




def expected_tabular_failures(estimator):
    return tabular_failures(estimator, "2D or 3D microstructures (n, *spatial) or (n, *spatial, n_state)")


@parametrize_with_checks([VAETransformer(latent_dim=2, epochs=1, batch_size=4)],
                         expected_failed_checks=expected_tabular_failures)
def test_sklearn_estimator_checks(estimator, check):
    run_check(estimator, check)
