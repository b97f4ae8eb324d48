"""Microstructures of any size, 2D and 3D, two or more phases: the models and VAETransformer.

Tiny data and one epoch throughout: these tests check shapes, layouts, periodic padding and the
loss's pairs, not learning (tests/test_learning.py does that).
"""
import numpy as np
import pytest
import torch

from pymks_vae.microstructures import generate_multiphase, generate_two_phase
from pymks_vae.models import VAE, ConvDecoder, ConvEncoder
from pymks_vae.models.shapes import crop, padded_shape, spatial_shape, wrap_pad


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Small convolutions gain nothing from threads on a shared 2-core machine; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- shapes and padding
def test_spatial_shape_and_padding_helpers():
    assert spatial_shape(21) == (21, 21)  # an int stays a 2D square, as before
    assert spatial_shape((15, 16, 17)) == (15, 16, 17)
    assert padded_shape((21, 50, 64), 16) == (32, 64, 64)
    x = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 2)
    wrapped = wrap_pad(x, (16, 3))  # pads longer than the field itself wrap again and again
    assert wrapped.shape == (1, 1, 16, 3)
    assert wrapped[0, 0, :, 0].tolist() == [float(k % 5) for k in range(16)]
    torch.testing.assert_close(crop(wrapped, (5, 2)), x, rtol=0, atol=0)


@pytest.mark.parametrize("size", [64, (32, 48), 224, (32, 32, 32), (16, 64, 32)])
def test_multiples_of_the_stride_are_not_padded(size):
    model = VAE(latent_dim=3, image_size=size)
    assert model.encoder.padded_size == model.image_size == model.decoder.padded_size


def test_encoder_sees_the_periodic_extension():
    """A 21x21 field is encoded as its periodic tiling to 32x32 would be."""
    torch.manual_seed(0)
    odd = ConvEncoder(latent_dim=3, image_size=21).eval()
    even = ConvEncoder(latent_dim=3, image_size=32).eval()
    even.load_state_dict(odd.state_dict())  # same parameters: the padded field is 32x32
    x = torch.rand(2, 1, 21, 21)
    tiled = torch.cat([x, x[:, :, :11]], dim=2)
    tiled = torch.cat([tiled, tiled[:, :, :, :11]], dim=3)
    with torch.no_grad():
        torch.testing.assert_close(odd(x)[0], even(tiled)[0], rtol=0, atol=0)


def test_decoder_crops_the_drawn_field():
    torch.manual_seed(0)
    odd = ConvDecoder(latent_dim=3, image_size=(13, 20, 7), channels=2).eval()
    even = ConvDecoder(latent_dim=3, image_size=(16, 32, 16), channels=2).eval()
    even.load_state_dict(odd.state_dict())
    z = torch.randn(2, 3)
    with torch.no_grad():
        # (the softmax over a cropped, strided tensor may round its last bit differently)
        torch.testing.assert_close(odd(z), even(z)[:, :, :13, :20, :7], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the models
SIZES = [21, (17, 50), 51, 101, (7, 5), (15, 15, 15), (13, 20, 7), (40, 40, 40)]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("channels", [1, 3])
def test_vae_any_size_2d_and_3d(size, channels):
    torch.manual_seed(0)
    model = VAE(latent_dim=4, image_size=size, channels=channels)
    shape = spatial_shape(size)
    assert model.spatial_ndim == len(shape) and model.image_size == shape
    x = torch.rand(3, channels, *shape)
    if channels > 1:
        x = x / x.sum(1, keepdim=True)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (3, 4)
    if channels == 1:
        assert 0.0 <= float(x_hat.detach().min()) and float(x_hat.detach().max()) <= 1.0
    else:  # phase probabilities
        torch.testing.assert_close(x_hat.sum(1), torch.ones(3, *shape))
    (x_hat.square().mean() + mu.sum()).backward()
    first = model.encoder.features[0].weight
    assert first.ndim == 2 + len(shape) and first.grad.abs().sum() > 0


def test_3d_decoder_draws_the_channels_in_its_last_stage():
    dec = ConvDecoder(latent_dim=2, image_size=(32, 32, 32), channels=3)
    convs = [m for m in dec.deconv if isinstance(m, (torch.nn.ConvTranspose3d, torch.nn.Conv3d))]
    assert len(convs) == 4 and all(isinstance(m, torch.nn.ConvTranspose3d) for m in convs)
    assert convs[-1].out_channels == 3


def test_3d_config_round_trip_and_input_checks():
    model = VAE(latent_dim=3, image_size=(15, 16, 17), channels=2)
    assert model.config["image_size"] == [15, 16, 17]
    rebuilt = VAE.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.softmax(torch.randn(2, 2, 15, 16, 17), 1)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], rebuilt(x)[0], rtol=0, atol=0)
    assert model.sample(2).shape == (2, 2, 15, 16, 17)
    with pytest.raises(ValueError, match=r"\(batch, channels, X, Y, Z\) = \(batch, 2, 15, 16, 17\)"):
        model(torch.rand(2, 2, 15, 16))
    with pytest.raises(ValueError, match=r"\(batch, channels, H, W\)"):
        VAE(latent_dim=3, image_size=21)(torch.rand(2, 1, 21, 21, 21))


@pytest.mark.parametrize("kwargs, who", [
    (dict(encoder="resnet152", freeze_encoder=False), "encoder='resnet152'"),
    (dict(decoder="paper"), "decoder='paper'"),
    (dict(decoder="strokes"), "decoder='strokes'"),
])
def test_2d_only_architectures_say_so_for_3d(kwargs, who):
    with pytest.raises(ValueError, match=f"{who}.* is 2D only.*image_size=\\(16, 16, 16\\)"):
        VAE(latent_dim=2, image_size=(16, 16, 16), **kwargs)


def test_train_vae_on_a_3d_tensor():
    from pymks_vae.losses import SpatialStatsLoss
    from pymks_vae.training import TrainConfig, reconstruct, train_vae

    x = torch.from_numpy(generate_two_phase(6, (9, 10, 11), sigma=1.5, seed=0)[:, None]).float()
    model = VAE(latent_dim=2, image_size=(9, 10, 11))
    history = train_vae(model, SpatialStatsLoss(states=(0.0, 1.0)), x, TrainConfig(epochs=1, batch_size=3))
    assert np.isfinite(history["train_loss"]).all()
    assert reconstruct(model, x).shape == x.shape


# ----------------------------------------------------------------------------- VAETransformer
def tiny(**kw):
    from pymks_vae.transformers import VAETransformer

    params = dict(latent_dim=2, epochs=1, batch_size=2, random_state=0)
    params.update(kw)
    return VAETransformer(**params)


def one_hot(shape, n_phase, n=4, seed=0):
    """``n`` microstructures of ``n_phase`` phases, one-hot in PyMKS's layout ``(n, *shape, n_phase)``."""
    fractions = np.full(n_phase, 1.0 / n_phase)
    labels = generate_multiphase(n, shape, sigma=1.5, volume_fractions=fractions, seed=seed)
    return np.eye(n_phase)[labels]


@pytest.mark.parametrize("n_phase", [2, 3])
@pytest.mark.parametrize("shape", [(21, 21), (51, 51), (101, 101), (15, 15, 15), (40, 40, 40)], ids=str)
def test_fit_transform_any_size_and_phases(shape, n_phase):
    x = one_hot(shape, n_phase)
    vae = tiny().fit(x)
    assert vae.spatial_shape_ == shape and vae.input_shape_ == shape + (n_phase,) and vae.n_state_ == n_phase
    assert vae.model_.image_size == shape and vae.model_.channels == n_phase
    assert vae.correlations_ == ([(0, 0)] if n_phase == 2 else [(0, 0), (0, 1), (1, 1)])
    assert np.isfinite(vae.history_["train_loss"]).all() and vae.stats_scale_ > 0
    z = vae.transform(x)
    assert z.shape == (len(x), 2) and np.isfinite(z).all()
    rec = vae.inverse_transform(z)
    assert rec.shape == x.shape
    np.testing.assert_allclose(rec.sum(-1), 1.0, atol=1e-5)  # phase probabilities of every phase


def test_3d_grey_needs_spatial_ndim_and_then_reads_like_fit():
    x = generate_two_phase(4, (15, 16, 17), sigma=1.5, seed=0)
    with pytest.raises(ValueError, match="spatial_ndim=3"):
        tiny().fit(x)
    vae = tiny(spatial_ndim=3).fit(x)
    assert vae.n_state_ is None and vae.spatial_shape_ == (15, 16, 17) and vae.correlations_ == [(0, 0)]
    assert vae.transform(x).shape == (4, 2)
    rec = vae.inverse_transform(vae.transform(x))
    assert rec.shape == x.shape and 0.0 <= rec.min() and rec.max() <= 1.0
    # transform reads a 4-axis array as fit did, even at spatial_ndim="auto" after set_params
    vae.set_params(spatial_ndim="auto")
    assert vae.transform(x).shape == (4, 2)
    with pytest.raises(ValueError, match="fitted on grey"):
        vae.transform(np.stack([1 - x, x], -1))


def test_xarray_names_say_3d_grey():
    xr = pytest.importorskip("xarray")
    x = generate_two_phase(4, (12, 10, 8), sigma=1.5, seed=1)
    arr = xr.DataArray(x, dims=("sample", "x", "y", "z"), coords={"sample": np.arange(4)})
    vae = tiny().fit(arr)  # no "state" dim: grey, 3 spatial dims, no spatial_ndim needed
    assert vae.spatial_shape_ == (12, 10, 8) and vae.spatial_dims_ == ("x", "y", "z")
    z = vae.transform(arr.transpose("z", "sample", "y", "x"))  # dims by name, in any order
    np.testing.assert_allclose(np.asarray(z), vae.transform(x), rtol=1e-6, atol=1e-6)
    rec = vae.inverse_transform(z)
    assert rec.dims == ("sample", "x", "y", "z") and rec.shape == x.shape
    with pytest.raises(ValueError, match="3 spatial dims, but spatial_ndim=2"):
        tiny(spatial_ndim=2).fit(arr)


def test_dask_3d_fit_and_lazy_transform():
    da = pytest.importorskip("dask.array")
    x = one_hot((15, 15, 15), 3, n=6)
    lazy = da.from_array(x, chunks=(3, 15, 15, 15, 3))
    vae = tiny().fit(lazy)
    z = vae.transform(lazy)
    assert isinstance(z, da.Array)
    np.testing.assert_allclose(z.compute(), vae.transform(x), rtol=1e-5, atol=1e-6)
    rec = vae.inverse_transform(z)
    assert isinstance(rec, da.Array) and rec.shape == x.shape


def test_save_load_3d_multiphase(tmp_path):
    from pymks_vae.transformers import VAETransformer

    x = one_hot((13, 15, 11), 3)
    vae = tiny(correlations=None).fit(x)  # PyMKS's default pairs
    assert vae.correlations_ == [(0, 0), (0, 1), (0, 2)]
    back = VAETransformer.load(vae.save(tmp_path / "vae3d.pt"))
    assert back.get_params() == vae.get_params()
    assert back.spatial_shape_ == (13, 15, 11) and back.correlations_ == vae.correlations_
    np.testing.assert_array_equal(back.transform(x), vae.transform(x))
    np.testing.assert_array_equal(back.inverse_transform(np.zeros((1, 2))), vae.inverse_transform(np.zeros((1, 2))))


def test_hat_basis_input_and_explicit_pairs():
    """PyMKS's hat basis of a grey field over the states 0, 0.5, 1 (PrimitiveTransformer(n_state=3)):
    fractions in [0, 1] summing to 1, not one-hot; the loss compares the pairs asked for."""
    g = np.random.default_rng(0).random((4, 21, 21))
    hats = np.stack([np.clip(1 - np.abs(g - h) / 0.5, 0, None) for h in (0.0, 0.5, 1.0)], axis=-1)
    np.testing.assert_allclose(hats.sum(-1), 1.0)
    vae = tiny(correlations=[(1, 2), (2, 2)]).fit(hats)
    assert vae.correlations_ == [(1, 2), (2, 2)] and vae.transform(hats).shape == (4, 2)
    with pytest.raises(ValueError, match=r"correlations\[0\] = \(0, 3\) names state 3.*n_state=3"):
        tiny(correlations=[(0, 3)]).fit(hats)


def test_independent_pairs_determine_every_pair():
    """The docstring's partition-of-unity claim, lag by lag: the autocovariances of the pairs among
    the first n-1 phases give those of every pair of all n phases."""
    from pymks_vae.losses import SpatialStatsLoss, independent_correlations

    n = 4
    m = torch.from_numpy(np.moveaxis(one_hot((9, 10, 11), n, n=2), -1, 1)).double()
    every = [(i, j) for i in range(n) for j in range(n)]
    loss = SpatialStatsLoss(correlations=every, cutoff=None, scale=1.0)  # centred: autocovariances
    c = dict(zip(every, loss.statistics(m).unbind(1)))
    # f(-r): r = 0 sits at index N // 2, so -r is a flip, shifted by one on even axes
    flip = lambda f: torch.roll(torch.flip(f, dims=(1, 2, 3)), shifts=(0, 1, 0), dims=(1, 2, 3))  # noqa: E731
    known = set(independent_correlations(n))
    assert known == {(i, j) for i in range(n - 1) for j in range(i, n - 1)}
    get = lambda i, j: c[(i, j)] if (i, j) in known else flip(c[(j, i)])  # noqa: E731
    last = n - 1
    for i in range(last):
        torch.testing.assert_close(c[(i, last)], -sum(get(i, k) for k in range(last)))
    torch.testing.assert_close(c[(last, last)], sum(get(j, k) for j in range(last) for k in range(last)))


def test_example_microstructures_3d_quick(tmp_path):
    """A smoke run of examples/microstructures_3d.py: every output is written and every number finite."""
    import importlib.util
    import json
    import os

    pytest.importorskip("matplotlib")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "microstructures_3d.py")
    spec = importlib.util.spec_from_file_location("microstructures_3d", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    payload = example.main(["--quick", "--out", str(tmp_path)])
    assert sorted(os.listdir(tmp_path)) == ["3d_latent.png", "3d_reconstructions.png", "3d_statistics.png",
                                            "results.json", "table.md"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["VAE (spatial stats)", "2-point stats + PCA"]
    assert all(np.isfinite(v) for r in payload["results"] for k, v in r.items() if k != "method")
    assert saved["machine"] and saved["date"]


def test_checkpoints_of_the_2d_release_still_load(tmp_path):
    """A file written before 3D support (no spatial_ndim, spatial_shape_ or correlations_, pairs as
    a list) loads, and reads its input as before."""
    import json

    from pymks_vae.transformers import VAETransformer

    x = generate_two_phase(4, (16, 16), sigma=1.5, seed=0)
    vae = tiny().fit(x)
    payload = torch.load(vae.save(tmp_path / "new.pt"), weights_only=True)
    params, fitted = json.loads(payload["params_json"]), json.loads(payload["fitted_json"])
    del params["spatial_ndim"], fitted["spatial_shape_"], fitted["correlations_"]
    params["correlations"] = [[0, 0]]  # the old default, ((0, 0),), as JSON wrote it
    payload.update(params_json=json.dumps(params), fitted_json=json.dumps(fitted))
    torch.save(payload, tmp_path / "old.pt")
    old = VAETransformer.load(tmp_path / "old.pt")
    assert old.spatial_shape_ == (16, 16) and old.correlations_ is None and old.correlations == ((0, 0),)
    np.testing.assert_array_equal(old.transform(x), vae.transform(x))
