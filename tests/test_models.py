"""Tests of pymks_vae.models: shapes, output activations, input checks, ResNet-152 weights."""
import urllib.error

import pytest
import torch

from pymks_vae.models import VAE, ConvDecoder, ConvEncoder, PaperDecoder
from pymks_vae.models.encoders import ResNet152Encoder


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("decoder", ["cnn", "paper"])
def test_cnn_vae_shapes(size, decoder):
    model = VAE(encoder="cnn", latent_dim=9, image_size=size, decoder=decoder)
    x = torch.rand(3, 1, size, size)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == (3, 1, size, size)
    assert mu.shape == logvar.shape == (3, 9)
    assert float(x_hat.detach().min()) >= 0.0 and float(x_hat.detach().max()) <= 1.0  # sigmoid output
    assert model.config == {"encoder": "cnn", "decoder": decoder, "latent_dim": 9, "image_size": [size, size],
                            "channels": 1, "freeze_encoder": False}


@pytest.mark.parametrize("size", [64, 224])
def test_resnet152_vae_shapes(size):
    model = VAE(encoder="resnet152", latent_dim=9, image_size=size, freeze_encoder=False).eval()
    assert model.config["decoder"] == "paper"  # "auto" picks the paper's decoder for the paper's encoder
    with torch.no_grad():
        x_hat, mu, logvar = model(torch.rand(2, 1, size, size))
    assert x_hat.shape == (2, 1, size, size)
    assert mu.shape == logvar.shape == (2, 9)
    assert torch.isfinite(x_hat).all()


@pytest.mark.parametrize("decoder", ["cnn", "paper"])
def test_multichannel_softmax_sums_to_one(decoder):
    model = VAE(latent_dim=4, image_size=(32, 48), channels=3, decoder=decoder)
    x = torch.softmax(torch.randn(5, 3, 32, 48), dim=1)
    x_hat, _, _ = model(x)
    assert x_hat.shape == (5, 3, 32, 48)
    torch.testing.assert_close(x_hat.sum(dim=1), torch.ones(5, 32, 48))
    assert float(x_hat.detach().min()) >= 0.0


def test_eval_mode_uses_the_mean_and_training_samples():
    torch.manual_seed(0)
    model = VAE(latent_dim=3, image_size=32)
    x = torch.rand(4, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        a, mu, _ = model(x)
        b, _, _ = model(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, model.decode(mu), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c, _, _ = model(x)
        d, _, _ = model(x)
    assert not torch.equal(c, d)  # z is drawn afresh


def test_reparameterize_statistics():
    torch.manual_seed(1)
    mu = torch.full((20000, 2), 1.5)
    logvar = torch.full((20000, 2), 2.0 * torch.log(torch.tensor(0.5)))
    z = VAE.reparameterize(mu, logvar)
    assert abs(float(z.mean()) - 1.5) < 0.02
    assert abs(float(z.std()) - 0.5) < 0.02


def test_wrong_image_size_names_both():
    model = VAE(latent_dim=2, image_size=64)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\).*64, 64"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="channels=1"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(1, 64, 64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(2, 1, 64, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"z must be a tensor \(batch, 2\)"):
        model.decode(torch.zeros(3, 5))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="encoder must be one of"):
        VAE(encoder="vgg")
    with pytest.raises(ValueError, match="decoder must be"):
        VAE(decoder="unet")
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(latent_dim=0)
    with pytest.raises(ValueError, match="channels"):
        VAE(channels=0)
    with pytest.raises(ValueError, match="image_size"):
        VAE(image_size=(64, 64, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        VAE(image_size=(64,))
    with pytest.raises(ValueError, match="image_size"):
        VAE(image_size=(32.0, 32))
    with pytest.raises(ValueError, match="no pretrained weights"):
        VAE(encoder="cnn", weights="imagenet")
    with pytest.raises(ValueError, match="randomly initialised"):
        VAE(encoder="cnn", freeze_encoder=True)


def test_random_frozen_resnet_refused():
    with pytest.raises(ValueError, match="freeze_encoder=False"):
        VAE(encoder="resnet152", image_size=64)  # freeze defaults to True (the paper)
    with pytest.raises(ValueError, match="randomly initialised ResNet-152"):
        VAE(encoder="resnet152", image_size=64, freeze_encoder=True)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "resnet152.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/resnet152.pth"):
        VAE(encoder="resnet152", image_size=64, weights=str(path))


def test_unreadable_weights_file_is_named(tmp_path):
    path = tmp_path / "resnet152.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read ResNet-152 weights from .*resnet152.pth"):
        ResNet152Encoder(latent_dim=2, weights=str(path))


def test_imagenet_download_failure_is_explained(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="offline.*pass its path"):
        ResNet152Encoder(latent_dim=2, weights="imagenet")


def test_resnet_weights_from_file_frozen(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet152(weights=None)
    path = tmp_path / "resnet152.pth"
    torch.save(reference.state_dict(), path)  # the layout of torchvision's download, fc included
    model = VAE(encoder="resnet152", image_size=64, latent_dim=3, weights=str(path))
    enc = model.encoder
    assert model.config["freeze_encoder"] is True
    torch.testing.assert_close(enc.backbone.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(enc.backbone.layer4[2].bn3.running_var, reference.layer4[2].bn3.running_var,
                               rtol=0, atol=0)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    model.train()
    assert not enc.backbone.training and enc.head.training  # frozen BatchNorm keeps ImageNet statistics
    x_hat, mu, logvar = model(torch.rand(2, 1, 64, 64))
    (x_hat.sum() + mu.sum()).backward()
    assert enc.to_rgb.weight.grad is not None and enc.to_rgb.weight.grad.abs().sum() > 0
    assert enc.backbone.conv1.weight.grad is None
    rebuilt = VAE.from_config(model.config)
    assert rebuilt.config == model.config
    assert not any(p.requires_grad for p in rebuilt.encoder.backbone.parameters())


def test_from_config_roundtrip_and_sample():
    model = VAE(latent_dim=5, image_size=(32, 64), channels=2, decoder="paper")
    rebuilt = VAE.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.softmax(torch.randn(2, 2, 32, 64), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], rebuilt(x)[0], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    a = model.sample(3, generator=gen)
    b = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 2, 32, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    model.sample(2)
    assert model.training  # restored
    with pytest.raises(ValueError, match="lacks"):
        VAE.from_config({"encoder": "cnn"})


def test_building_blocks_directly():
    enc = ConvEncoder(latent_dim=4, image_size=32, channels=2, widths=(8, 8))
    mu, logvar = enc(torch.rand(3, 2, 32, 32))
    assert mu.shape == (3, 4)
    assert PaperDecoder(4, (20, 30), 2)(torch.zeros(3, 4)).shape == (3, 2, 20, 30)
    assert ConvDecoder(4, 32, 1, widths=(8, 4))(torch.zeros(3, 4)).shape == (3, 1, 32, 32)
    # 30 is no multiple of 2**2: drawn at 32 and cropped
    assert ConvDecoder(4, 30, 1, widths=(8, 4))(torch.zeros(3, 4)).shape == (3, 1, 30, 30)


def test_stroke_decoder_draws_bars_and_passes_gradients():
    from pymks_vae.models.decoder import StrokeDecoder

    torch.manual_seed(0)
    model = VAE(latent_dim=5, image_size=(48, 32), decoder="strokes")
    x = torch.rand(4, 1, 48, 32)
    x_hat, _, _ = model(x)
    assert x_hat.shape == (4, 1, 48, 32) and float(x_hat.detach().min()) >= 0.0 and float(x_hat.detach().max()) <= 1.0
    ((1.0 - x_hat) ** 2).sum().backward()
    for name, p in model.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every stroke parameter learns
    dec = StrokeDecoder(latent_dim=2, image_size=16, n_strokes=3, straight_through=("presence", "orientation")).eval()
    s = dec.strokes(torch.randn(6, 2))
    for name in ("presence", "orientation"):  # 0 or 1 (up to the rounding of p - p)
        torch.testing.assert_close(s[name], s[name].round(), atol=1e-6, rtol=0)
    assert float(s["row"].detach().min()) >= 0 and float(s["row"].detach().max()) <= 15
    with pytest.raises(ValueError, match="channels"):
        StrokeDecoder(latent_dim=2, image_size=16, channels=2)
    with pytest.raises(ValueError, match="straight_through"):
        StrokeDecoder(latent_dim=2, image_size=16, straight_through=("width",))
    with pytest.raises(ValueError, match="softness"):
        StrokeDecoder(latent_dim=2, image_size=16, softness=0)


def test_one_present_stroke_is_a_dark_bar():
    from pymks_vae.models.decoder import StrokeDecoder

    dec = StrokeDecoder(latent_dim=1, image_size=20, n_strokes=1, layout="free").eval()
    with torch.no_grad():  # presence 1, centre (10, 5), half-length 6, half-width 1.25, vertical
        dec.head.weight.zero_()
        dec.head.bias.copy_(torch.tensor([20.0, 0.0, 0.0, 0.0, 0.0, 20.0]))
        dec.head.bias[1] = torch.logit(torch.tensor(10.0 / 19))
        dec.head.bias[2] = torch.logit(torch.tensor(5.0 / 19))
        dec.head.bias[3] = torch.logit(torch.tensor(5.0 / 10))   # 1 + 0.5 * 20 / 2 = 6
        dec.head.bias[4] = torch.logit(torch.tensor(1.0 / 1.25))  # 0.25 + 0.8 * 20 / 16 = 1.25
        img = dec(torch.zeros(2, 1))[0, 0]
    assert img[10, 5] < 0.1 and img[6, 5] < 0.1 and img[10, 15] > 0.99 and img[1, 5] > 0.99  # vertical bar
    assert img[10, 4] < 0.5 and img[10, 8] > 0.9


def test_slot_strokes_stay_in_their_slots():
    from pymks_vae.models.decoder import StrokeDecoder

    dec = StrokeDecoder(latent_dim=1, image_size=32, n_strokes=4, layout="slots").eval()
    with torch.no_grad():  # only stroke 2 present, horizontal, pushed as far down as it can go
        dec.head.weight.zero_()
        bias = torch.zeros(4, 6)
        bias[:, 0] = torch.tensor([-20.0, -20.0, 20.0, -20.0])
        bias[:, 1] = 50.0
        bias[:, 3] = 20.0   # full length
        bias[:, 4] = -1.0
        bias[:, 5] = -20.0  # horizontal
        dec.head.bias.copy_(bias.reshape(-1))
        s = dec.strokes(torch.zeros(2, 1))
        img = dec(torch.zeros(2, 1))[0, 0]
    # slot k is centred on row (k + 0.5) * 32 / 4 - 0.5 and moves at most a quarter of the 8-px gap
    want = (torch.arange(4) + 0.5) * 8 - 0.5 + 2.0
    assert torch.allclose(s["row"][0], want, atol=1e-4)
    dark_rows = torch.nonzero(img.mean(1) < 0.5).flatten().tolist()
    assert dark_rows and all(20 <= r <= 23 for r in dark_rows), dark_rows
    assert img[:18].min() > 0.9 and img[26:].min() > 0.9
    with pytest.raises(ValueError, match="layout"):
        StrokeDecoder(latent_dim=1, image_size=32, layout="grid")


def test_stroke_layout_survives_the_config():
    from pymks_vae.models import VAE

    m = VAE(latent_dim=2, image_size=32, decoder="strokes", stroke_layout="slots")
    assert VAE.from_config(m.config).decoder.layout == "slots"
    old = dict(m.config)
    del old["stroke_layout"]  # saved before layouts existed: those drew free strokes
    assert VAE.from_config(old).decoder.layout == "free"
    assert VAE(latent_dim=2, image_size=32, decoder="strokes").decoder.layout == "free"
    with pytest.raises(ValueError, match="stroke_layout"):
        VAE(latent_dim=2, image_size=32, decoder="cnn", stroke_layout="slots")


def test_binary_strokes_draw_the_phase_the_loss_trains():
    from pymks_vae.losses import SpatialStatsLoss
    from pymks_vae.models import VAE

    torch.manual_seed(3)
    m = VAE(latent_dim=3, image_size=(24, 30), decoder="strokes", stroke_binary=True)
    grey = VAE(latent_dim=3, image_size=(24, 30), decoder="strokes")
    grey.load_state_dict(m.state_dict())
    m.eval(), grey.eval()
    z = 2.0 * torch.randn(8, 3)
    with torch.no_grad():
        hard, soft = m.decode(z), grey.decode(z)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and (hard == 0).any() and (hard == 1).any()
    assert torch.equal(hard, (soft >= 0.5).to(hard.dtype))
    # the straight-through statistics of the grey drawing are those of the binary one
    loss = SpatialStatsLoss(states=(0.0,), indicator="straight_through", normalise="none", cutoff=None)
    stats = [loss.statistics(loss.indicators(x.double())) for x in (hard, soft)]
    assert torch.allclose(*stats, atol=1e-12)
    # training mode draws grey, so that the loss has a gradient
    m.train()
    x = m.decode(z)
    assert ((x > 0.01) & (x < 0.99)).any()
    x.sum().backward()
    assert m.decoder.head.weight.grad.abs().sum() > 0


def test_stroke_binary_survives_the_config():
    from pymks_vae.models import VAE
    from pymks_vae.models.decoder import StrokeDecoder

    m = VAE(latent_dim=2, image_size=32, decoder="strokes", stroke_binary=True)
    assert VAE.from_config(m.config).decoder.binary is True
    old = dict(m.config)
    del old["stroke_binary"]  # saved before binary strokes existed: those drew grey
    assert VAE.from_config(old).decoder.binary is False
    assert VAE(latent_dim=2, image_size=32, decoder="strokes").decoder.binary is False
    with pytest.raises(ValueError, match="stroke_binary"):
        VAE(latent_dim=2, image_size=32, decoder="cnn", stroke_binary=True)
    with pytest.raises(TypeError, match="binary"):
        StrokeDecoder(latent_dim=2, image_size=32, binary=1)


# ---------------------------------------------------------------------------- the statistics encoder
def test_stats_encoder_reads_the_two_point_statistics_only():
    """It sees the field through its statistics: a periodic shift changes nothing, a different
    microstructure does; its first layer receives exactly the operator's output."""
    from pymks_vae import ops
    from pymks_vae.models.encoders import StatsEncoder

    torch.manual_seed(0)
    enc = StatsEncoder(latent_dim=3, image_size=(17, 24), channels=2, cutoff=5).eval()
    x1 = (torch.rand(4, 1, 17, 24) < 0.4).float()
    x = torch.cat([1 - x1, x1], 1)
    shifted = torch.roll(x, shifts=(5, -7), dims=(2, 3))
    mu, logvar = enc(x)
    mu_s, logvar_s = enc(shifted)
    assert mu.shape == logvar.shape == (4, 3)
    torch.testing.assert_close(mu_s, mu, rtol=1e-5, atol=1e-5)
    other = torch.cat([x[:, 1:], x[:, :1]], 1)  # phases swapped: other statistics of state 0
    assert (enc(other)[0] - mu).abs().max() > 1e-3
    want = ops.two_point_stats(x, [(0, 0)], cutoff=5).flatten(1)
    torch.testing.assert_close(enc.statistics(x), want)
    assert enc.correlations == [(0, 0)] and enc.cutoff == 5 and enc.norm.num_features == 11 * 11


@pytest.mark.parametrize("shape, channels, pairs", [((15, 15, 15), 3, [(0, 0), (0, 1), (1, 1)]),
                                                   ((21, 8), 1, [(0, 0)]), ((9, 31), 4, None)])
def test_stats_encoder_any_dimension_states_and_size(shape, channels, pairs):
    from pymks_vae.models.encoders import StatsEncoder

    enc = StatsEncoder(latent_dim=2, image_size=shape, channels=channels, correlations=pairs)
    largest = (min(shape) - 1) // 2
    assert enc.cutoff == largest  # None: the largest window
    n_pairs = len(enc.correlations)
    assert n_pairs == (1 if channels <= 2 else (channels - 1) * channels // 2)
    x = torch.softmax(torch.randn(3, channels, *shape), 1) if channels > 1 else torch.rand(3, 1, *shape)
    mu, logvar = enc(x)
    assert mu.shape == (3, 2) and torch.isfinite(mu).all()
    assert enc.norm.num_features == n_pairs * (2 * largest + 1) ** len(shape)


@pytest.mark.parametrize("shape, channels", [((17, 24), 2), ((9, 10, 11), 3), ((15, 15), 1)])
def test_stats_encoder_reads_the_independent_phase_fractions_after_the_two_point_statistics(shape, channels):
    from pymks_vae import ops
    from pymks_vae.models.encoders import StatsEncoder

    enc = StatsEncoder(latent_dim=2, image_size=shape, channels=channels, cutoff=3, one_point=True).eval()
    x = (torch.nn.functional.one_hot(torch.randint(0, channels, (4, *shape)), channels).movedim(-1, 1).float()
         if channels > 1 else torch.rand(4, 1, *shape))
    n1 = max(1, channels - 1)  # one-hot phases sum to one: the last fraction is not independent
    two = ops.two_point_stats(x, enc.correlations, cutoff=3).flatten(1)
    want = torch.cat([two, x[:, :n1].flatten(2).mean(2)], 1)
    torch.testing.assert_close(enc.statistics(x), want)
    assert enc.n_one_point == n1 and enc.norm.num_features == two.shape[1] + n1
    assert enc(x)[0].shape == (4, 2)
    shifted = torch.roll(x, shifts=(2,) * len(shape), dims=tuple(range(2, 2 + len(shape))))
    torch.testing.assert_close(enc(shifted)[0], enc(x)[0], rtol=1e-5, atol=1e-5)
    assert StatsEncoder(latent_dim=2, image_size=shape, channels=channels, cutoff=3).n_one_point == 0


def test_stats_encoder_window_shrinks_to_its_feature_budget_and_hidden_zero_is_linear():
    from pymks_vae.models.encoders import StatsEncoder

    enc = StatsEncoder(latent_dim=2, image_size=(40, 40, 40), channels=2, cutoff=19, max_features=5000)
    assert enc.cutoff == 8  # 17^3 = 4913 <= 5000 < 19^3
    lin = StatsEncoder(latent_dim=2, image_size=16, cutoff=3, hidden=0).eval()
    assert isinstance(lin.head, torch.nn.Identity) and lin.gaussian.mu.in_features == 49
    a, b = torch.rand(2, 1, 1, 16, 16)
    # linear in the standardised statistics: mu(a) + mu(b) - mu(0-stats) is mu of the sum of statistics
    fa, fb = lin.statistics(a), lin.statistics(b)
    h = lambda f: lin.gaussian.mu(lin.norm(f))  # noqa: E731
    torch.testing.assert_close(h(fa) + h(fb) - h(torch.zeros_like(fa)), h(fa + fb))


def test_stats_encoder_skip_adds_a_linear_map_of_the_standardised_statistics_to_mu():
    from pymks_vae.models.encoders import StatsEncoder

    torch.manual_seed(3)
    enc = StatsEncoder(latent_dim=3, image_size=16, channels=2, cutoff=3, one_point=True, skip=True)
    x = torch.nn.functional.one_hot(torch.randint(0, 2, (5, 16, 16)), 2).movedim(-1, 1).float()
    enc.train()(x)
    enc.eval()
    h = enc.norm(enc.statistics(x))
    mu, logvar = enc(x)
    torch.testing.assert_close(mu, enc.gaussian.mu(enc.head(h)) + enc.skip(h))
    torch.testing.assert_close(logvar, enc.gaussian.logvar(enc.head(h)))  # the variance has no skip
    assert enc.skip.in_features == 49 + 1 and enc.skip.bias is None
    # the gradient of mu reaches the statistics' standardisation through both paths
    enc.train()(x)[0].sum().backward()
    assert enc.skip.weight.grad.abs().sum() > 0 and enc.gaussian.mu.weight.grad.abs().sum() > 0
    assert StatsEncoder(latent_dim=3, image_size=16, cutoff=3, hidden=0, skip=True).skip is None  # already linear
    assert StatsEncoder(latent_dim=3, image_size=16, cutoff=3).skip is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(cutoff=-1), "cutoff"), (dict(cutoff=2.5), "cutoff"), (dict(hidden=-3), "hidden"),
    (dict(correlations=[(0, 2)]), "correlations"), (dict(correlations=[(0.5, 1)]), "correlations"),
    (dict(correlations=[]), "correlations"), (dict(periodic="yes"), "periodic"), (dict(max_features=0), "max_features"),
    (dict(one_point=1), "one_point"), (dict(skip="yes"), "skip"),
])
def test_stats_encoder_refuses_bad_arguments(kwargs, match):
    from pymks_vae.models.encoders import StatsEncoder

    with pytest.raises((ValueError, TypeError), match=match):
        StatsEncoder(latent_dim=2, image_size=16, channels=2, **kwargs)


def test_stats_vae_config_round_trip_and_option_checks():
    model = VAE(encoder="stats", latent_dim=3, image_size=(20, 22), channels=3,
                encoder_options={"cutoff": 4, "periodic": False, "hidden": 32, "one_point": True, "skip": True})
    model.train()(torch.softmax(torch.randn(4, 3, 20, 22), 1))  # a training step moves the running statistics
    model.eval()
    assert model.config["encoder_options"] == {"correlations": [[0, 0], [0, 1], [1, 1]], "cutoff": 4,
                                               "periodic": False, "hidden": 32, "one_point": True, "skip": True}
    again = VAE.from_config(model.config).eval()
    again.load_state_dict(model.state_dict())
    x = torch.softmax(torch.randn(2, 3, 20, 22), 1)
    torch.testing.assert_close(again.encode(x)[0], model.encode(x)[0], rtol=0, atol=0)
    # a config written before the encoder could read one-point statistics rebuilds without them
    old = dict(model.config, encoder_options={k: v for k, v in model.config["encoder_options"].items()
                                              if k not in ("one_point", "skip")})
    assert VAE.from_config(old).encoder.n_one_point == 0 and VAE.from_config(old).encoder.skip is None
    assert model.decode(torch.zeros(2, 3)).shape == (2, 3, 20, 22)
    with pytest.raises(ValueError, match="encoder='stats' only"):
        VAE(encoder="cnn", encoder_options={"cutoff": 3})
    with pytest.raises(ValueError, match="unknown options"):
        VAE(encoder="stats", encoder_options={"window": 3})
    with pytest.raises(ValueError, match="no pretrained weights"):
        VAE(encoder="stats", weights="imagenet")
