"""Tests of pymks_vae.losses against direct float64 computations."""
import math

import numpy as np
import pytest
import torch

from pymks_vae import ops
from pymks_vae.losses import DataSpaceLoss, SpatialStatsLoss, kl_divergence, stats_scale_from_data


def autocorrelation(a, b):
    """Periodic f(r) = (1/S) sum_x a(x) b(x + r) of (batch, H, W) fields, r = 0 at (H//2, W//2)."""
    fa, fb = torch.fft.fft2(a.double()), torch.fft.fft2(b.double())
    f = torch.fft.ifft2(fa.conj() * fb).real / (a.shape[-1] * a.shape[-2])
    return torch.fft.fftshift(f, dim=(-2, -1))


def direct_kl(mu, logvar):
    return (-0.5 * (1 + logvar.double() - mu.double() ** 2 - logvar.double().exp())).sum()


def test_autocorrelation_helper_definition():
    # one brute-force lag, so the test's own reference is checked too
    a, b = torch.rand(1, 5, 7, dtype=torch.float64), torch.rand(1, 5, 7, dtype=torch.float64)
    dy, dx = 2, -3
    brute = sum(a[0, y, x] * b[0, (y + dy) % 5, (x + dx) % 7] for y in range(5) for x in range(7)) / 35
    torch.testing.assert_close(autocorrelation(a, b)[0, 5 // 2 + dy, 7 // 2 + dx], brute)


def test_kl_closed_form():
    mu = torch.tensor([[0.3, -1.2], [2.0, 0.0]], dtype=torch.float64)
    sigma = torch.tensor([[0.5, 1.0], [2.0, 0.1]], dtype=torch.float64)
    logvar = 2 * sigma.log()
    # KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2, per dimension
    per_dim = -sigma.log() + (sigma**2 + mu**2) / 2 - 0.5
    torch.testing.assert_close(kl_divergence(mu, logvar, reduction="none"), per_dim.sum(1))
    torch.testing.assert_close(kl_divergence(mu, logvar), per_dim.sum())
    torch.testing.assert_close(kl_divergence(mu, logvar, reduction="batchmean"), per_dim.sum(1).mean())
    torch.testing.assert_close(kl_divergence(mu, logvar, reduction="mean"), per_dim.mean())
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma),
                                            torch.distributions.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(kl_divergence(mu, logvar), ref)


def test_stats_loss_equals_direct_computation():
    torch.manual_seed(0)
    x = (torch.rand(3, 1, 12, 10) > 0.7).double()
    x_hat = torch.rand(3, 1, 12, 10, dtype=torch.float64)
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    eps, scale, alpha, beta = 0.25, 3.0, 2.0, 0.5
    loss = SpatialStatsLoss(states=(0.0,), eps=eps, scale=scale, alpha=alpha, beta=beta, normalise="none",
                            indicator="gaussian", reduction="sum")
    total, parts = loss(x_hat, x, mu, logvar)

    def ind(t):
        return torch.exp(-(t[:, 0] ** 2) / (2 * eps**2))

    stats = ((scale * (autocorrelation(ind(x_hat), ind(x_hat)) - autocorrelation(ind(x), ind(x)))) ** 2).sum()
    kl = direct_kl(mu, logvar)
    torch.testing.assert_close(parts["stats"], stats)
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(total, alpha * stats + beta * kl)
    assert total.dtype == torch.float64


def test_stats_loss_float32_matches_float64():
    torch.manual_seed(1)
    x = (torch.rand(4, 1, 16, 16) > 0.6).float()
    x_hat = torch.rand(4, 1, 16, 16)
    mu, logvar = torch.zeros(4, 2), torch.zeros(4, 2)
    loss = SpatialStatsLoss(scale=5.0)
    v32 = loss(x_hat, x, mu, logvar)[0]
    v64 = loss(x_hat.double(), x.double(), mu.double(), logvar.double())[0]
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6)


def test_stats_loss_two_states_and_hard_target():
    torch.manual_seed(2)
    x = torch.randint(0, 2, (2, 1, 8, 8)).double()
    x_hat = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    loss = SpatialStatsLoss(states=(0.0, 1.0), eps=0.3, correlations=((0, 0), (0, 1)), soft=False, normalise="none",
                            indicator="gaussian", reduction="sum")
    total, parts = loss(x_hat, x, zeros, zeros)
    soft = [torch.exp(-((x_hat[:, 0] - h) ** 2) / (2 * 0.3**2)) for h in (0.0, 1.0)]
    hard = [((x[:, 0] - h).abs() <= 0.3).double() for h in (0.0, 1.0)]
    ref = sum(((autocorrelation(soft[i], soft[j]) - autocorrelation(hard[i], hard[j])) ** 2).sum()
              for i, j in ((0, 0), (0, 1)))
    torch.testing.assert_close(parts["stats"], ref)
    torch.testing.assert_close(total, ref)  # kl of a standard normal posterior is 0


def test_multichannel_uses_channels_as_indicators():
    torch.manual_seed(3)
    x = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 9, 11)), 3).permute(0, 3, 1, 2).double()
    x_hat = torch.softmax(torch.randn(2, 3, 9, 11, dtype=torch.float64), dim=1)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    pairs = ((0, 0), (1, 2))
    loss = SpatialStatsLoss(correlations=pairs, states=(123.0,), normalise="none", reduction="sum")  # states ignored
    _, parts = loss(x_hat, x, zeros, zeros)
    ref = sum(((autocorrelation(x_hat[:, i], x_hat[:, j]) - autocorrelation(x[:, i], x[:, j])) ** 2).sum()
              for i, j in pairs)
    torch.testing.assert_close(parts["stats"], ref)


def test_cutoff_and_non_periodic_statistics():
    from pymks_vae import ops

    torch.manual_seed(7)
    x = (torch.rand(2, 1, 12, 12, dtype=torch.float64) > 0.6).double()
    x_hat = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    ind = SpatialStatsLoss().indicators
    for periodic, cutoff, used in ((True, 3, 3), (False, None, None), (False, 2, 2), (True, 50, 5)):
        loss = SpatialStatsLoss(periodic=periodic, cutoff=cutoff, scale=2.0, normalise="none", reduction="sum")
        fa = ops.two_point_stats(ind(x_hat), [(0, 0)], periodic=periodic, cutoff=used)
        fb = ops.two_point_stats(ind(x), [(0, 0)], periodic=periodic, cutoff=used)
        torch.testing.assert_close(loss(x_hat, x, zeros, zeros)[1]["stats"], ((2.0 * (fa - fb)) ** 2).sum())
    # a window is a subset of the lags: never more error than the full periodic map
    full = SpatialStatsLoss(normalise="none")(x_hat, x, zeros, zeros)[0]
    assert SpatialStatsLoss(cutoff=2, normalise="none")(x_hat, x, zeros, zeros)[0] < full
    with pytest.raises(ValueError, match="cutoff"):
        SpatialStatsLoss(cutoff=-1)
    with pytest.raises(TypeError, match="periodic"):
        SpatialStatsLoss(periodic=1)


def test_stats_loss_gradient_flows_to_reconstruction_only():
    torch.manual_seed(4)
    x = (torch.rand(2, 1, 6, 6, dtype=torch.float64) > 0.5).double().requires_grad_(True)
    mu = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss = SpatialStatsLoss(scale=2.0)

    def f(x_hat, mu, logvar):
        return loss(x_hat, x, mu, logvar)[0]

    x_hat = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x_hat, mu, logvar))
    f(x_hat, mu, logvar).backward()
    assert x.grad is None  # the target's statistics are a constant
    assert x_hat.grad.abs().sum() > 0 and mu.grad.abs().sum() > 0


def test_data_space_loss():
    torch.manual_seed(5)
    x, x_hat = torch.rand(3, 1, 5, 5), torch.rand(3, 1, 5, 5, requires_grad=True)
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    total, parts = DataSpaceLoss(beta=0.25)(x_hat, x, mu, logvar)
    data = ((x_hat.double() - x.double()) ** 2).sum()
    torch.testing.assert_close(parts["data"].double(), data, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total.double(), data + 0.25 * direct_kl(mu, logvar), rtol=1e-6, atol=1e-6)
    total.backward()
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat.detach() - x))


def test_stats_scale_from_data():
    torch.manual_seed(6)
    images = (np.random.default_rng(0).random((7, 10, 10)) > 0.8).astype(np.float32)
    ind = torch.exp(-torch.from_numpy(images).double() ** 2 / (2 * 0.25**2))
    f = autocorrelation(ind, ind)
    expected = 1.0 / float(f.max() - f.min())
    assert math.isclose(stats_scale_from_data(images, batch_size=3), expected, rel_tol=1e-10)
    assert math.isclose(stats_scale_from_data(torch.from_numpy(images)[:, None]), expected, rel_tol=1e-10)
    with pytest.raises(ValueError, match="constant"):
        stats_scale_from_data(np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        stats_scale_from_data(np.ones((4, 4)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        SpatialStatsLoss(eps=0.0)
    with pytest.raises(ValueError, match="scale"):
        SpatialStatsLoss(scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        SpatialStatsLoss(scale=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        SpatialStatsLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="beta"):
        DataSpaceLoss(beta=float("inf"))
    with pytest.raises(ValueError, match="states"):
        SpatialStatsLoss(states=())
    with pytest.raises(TypeError, match="correlations"):
        SpatialStatsLoss(correlations="00")
    with pytest.raises(TypeError, match="soft"):
        SpatialStatsLoss(soft="yes")
    with pytest.raises(ValueError, match="normalise"):
        SpatialStatsLoss(normalise="l2")
    with pytest.raises(ValueError, match="indicator"):
        SpatialStatsLoss(indicator="box")
    with pytest.raises(ValueError, match="reduction"):
        SpatialStatsLoss(reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        DataSpaceLoss(reduction="none")
    with pytest.raises(ValueError, match="distinct"):
        SpatialStatsLoss(states=(0.0, 0.0))
    with pytest.raises(TypeError, match="correlations"):
        SpatialStatsLoss(correlations=((0.7, 1.9),))
    z1 = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="2 or more"):  # lazy calibration needs a variance
        SpatialStatsLoss()(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), z1, z1)
    loss = SpatialStatsLoss(scale=1.0)
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="x_hat shape"):
        loss(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9), z, z)
    with pytest.raises(ValueError, match="mu and logvar"):
        loss(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="correlations"):  # state 1 does not exist with one state
        SpatialStatsLoss(correlations=((0, 1),))(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), z, z)
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(z, z, reduction="max")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        DataSpaceLoss()(torch.rand(2, 1, 4, 4), np.ones((2, 1, 4, 4)), z, z)


@pytest.mark.parametrize("shape", [(9, 12), (16, 16), (7, 6, 5)], ids=["9x12", "16x16", "7x6x5"])
@pytest.mark.parametrize("cutoff", [None, 2])
def test_variance_convention_is_dimensionless(shape, cutoff):
    """Calibrated on a set, the error between two of its members averages to exactly 2 (= 2 var / var),
    whatever the size, dimension, window or number of pairs: the balance with KL cannot drift with them."""
    x = (torch.rand((6, 1) + shape, dtype=torch.float64) > 0.6).double()
    for states, pairs in (((0.0,), ((0, 0),)), ((0.0, 1.0), ((0, 0), (0, 1), (1, 1)))):
        loss = SpatialStatsLoss(states=states, correlations=pairs, cutoff=cutoff).calibrate(x)
        n = len(x)
        a = x.repeat_interleave(n, 0)
        b = x.repeat(n, *([1] * (x.ndim - 1)))
        per_pair = loss.stats_error(a, b, reduction="none")
        torch.testing.assert_close(per_pair.sum() / (n * (n - 1)), torch.tensor(2.0, dtype=torch.float64))
        f = loss.target_statistics(x)
        torch.testing.assert_close(loss.scale_, float(f.var(0).mean()) ** -0.5)


def test_variance_convention_reductions_and_kl_balance():
    x = (torch.rand(4, 1, 10, 10, dtype=torch.float64) > 0.5).double()
    x_hat = torch.rand(4, 1, 10, 10, dtype=torch.float64)
    mu, logvar = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = SpatialStatsLoss(beta=0.01).calibrate(x)
    per = loss.stats_error(x_hat, x, reduction="none")
    f_hat = loss.target_statistics(1.0 - loss.indicators(x_hat))  # hat indicator of state 0: 1 - x
    ref = ((f_hat - loss.target_statistics(x)) ** 2).flatten(1).mean(1) * loss.scale_**2
    torch.testing.assert_close(per, ref)
    total, parts = loss(x_hat, x, mu, logvar)
    torch.testing.assert_close(total, (per + 0.01 * kl_divergence(mu, logvar, reduction="none")).mean())
    torch.testing.assert_close(parts["stats"], per.mean())
    summed = SpatialStatsLoss(beta=0.01, reduction="sum", scale=loss.scale_)(x_hat, x, mu, logvar)[0]
    torch.testing.assert_close(summed, total * 4)


def test_hat_indicator_is_pymks_hat_basis():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    torch.testing.assert_close(SpatialStatsLoss().indicators(x), 1.0 - x)
    two = SpatialStatsLoss(states=(0.0, 1.0)).indicators(x)
    torch.testing.assert_close(two, torch.cat([1.0 - x, x], 1))
    three = SpatialStatsLoss(states=(0.0, 0.5, 1.0)).indicators(x)
    torch.testing.assert_close(three.sum(1), torch.ones(1, 2, 2, dtype=torch.float64))  # partition of unity
    torch.testing.assert_close(three[0, :, 0, 1], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    hard = SpatialStatsLoss(states=(0.0, 0.5, 1.0), soft=False).indicators(x, target=True)
    assert hard.sum(1).eq(1).all() and hard[0, 2, 1, 1] == 1


def test_paper_preset():
    loss = SpatialStatsLoss.paper(scale=4.0)
    assert (loss.normalise, loss.indicator, loss.reduction, loss.beta, loss.scale_) == \
        ("minmax", "gaussian", "sum", 1.0, 4.0)
    x = (torch.rand(2, 1, 8, 8, dtype=torch.float64) > 0.5).double()
    x_hat = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    ind = lambda t: torch.exp(-(t[:, 0] ** 2) / (2 * 0.25**2))  # noqa: E731
    ref = ((4.0 * (autocorrelation(ind(x_hat), ind(x_hat)) - autocorrelation(ind(x), ind(x)))) ** 2).sum()
    z = torch.zeros(2, 2, dtype=torch.float64)
    torch.testing.assert_close(loss(x_hat, x, z, z)[0], ref)
    assert math.isclose(stats_scale_from_data(x, loss=loss), stats_scale_from_data(x), rel_tol=1e-12)


@pytest.mark.parametrize("shape", [(9, 12), (8, 8, 5)], ids=["2d", "3d"])
def test_centred_statistics_fused_path_matches_explicit(shape):
    """The periodic full-window centred loss (fused kernel minus S dc^2) equals the explicit autocovariance SSE."""
    x = (torch.rand((3, 1) + shape, dtype=torch.float64) > 0.6).double()
    x_hat = torch.rand((3, 1) + shape, dtype=torch.float64, requires_grad=True)
    loss = SpatialStatsLoss(states=(0.0, 1.0), correlations=((0, 0), (0, 1)), cutoff=None).calibrate(x)
    got = loss.stats_error(x_hat, x, reduction="none")
    m_hat, m = loss.indicators(x_hat), loss.indicators(x, target=True)
    cov = lambda t: ops.two_point_stats(t, loss.correlations) - torch.stack(  # noqa: E731
        [t[:, i].mean((1, 2) if len(shape) == 2 else (1, 2, 3)) * t[:, j].mean((1, 2) if len(shape) == 2 else (1, 2, 3))
         for i, j in loss.correlations], 1).reshape((3, 2) + (1,) * len(shape))
    ref = (loss.scale_ * (cov(m_hat) - cov(m))).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, ref)
    g_got, = torch.autograd.grad(got.sum(), x_hat)
    g_ref, = torch.autograd.grad(ref.sum(), x_hat)
    torch.testing.assert_close(g_got, g_ref)
    assert loss.centre and not SpatialStatsLoss(normalise="minmax").centre  # the defaults of each convention


def test_straight_through_indicator_forward_hard_backward_gaussian():
    x = torch.tensor([0.0, 0.3, 0.49, 0.51, 0.9], dtype=torch.float64).reshape(1, 1, 1, 5).requires_grad_(True)
    st = SpatialStatsLoss(indicator="straight_through").indicators(x)
    torch.testing.assert_close(st.detach(), torch.tensor([[[[1.0, 1.0, 1.0, 0.0, 0.0]]]], dtype=torch.float64))
    st.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ops.soft_indicator(x, (0.0,), 0.25).sum().backward()
    torch.testing.assert_close(g, x.grad)


def test_auto_cutoff_follows_the_structure():
    from pymks_vae.losses import auto_cutoff
    from pymks_vae.microstructures import generate_two_phase

    fine = generate_two_phase(48, (48, 48), sigma=1.0, seed=0)
    c_fine = auto_cutoff(fine)
    assert c_fine is not None and 1 <= c_fine <= 6  # grains of ~2 px: the structure is within a few px
    stripes = np.zeros((4, 32, 32)); stripes[:, :, 10:13] = 1.0  # structure at every lag along the stripes
    assert auto_cutoff(stripes) is None
    loss = SpatialStatsLoss().calibrate(fine[:, None])
    assert loss.cutoff_ == c_fine
    assert SpatialStatsLoss(cutoff=3).calibrate(fine[:, None]).cutoff_ == 3
    with pytest.raises(ValueError, match="cutoff"):
        SpatialStatsLoss(cutoff="wide")


def test_calibrate_keeps_a_given_scale():
    x = (torch.rand(6, 1, 16, 16, dtype=torch.float64) > 0.5).double()
    loss = SpatialStatsLoss(scale=2.0)
    assert loss.needs_calibration  # the auto window is still open
    loss.calibrate(x)
    assert loss.scale_ == 2.0 and not loss.needs_calibration


def test_auto_cutoff_is_the_same_on_small_fields():
    # A sample's autocovariance sums to zero over a periodic field, so on a small field the far lags
    # sit below zero; measured from zero they looked like structure and the whole 32x32 field was kept.
    from pymks_vae.losses import auto_cutoff
    from pymks_vae.microstructures import generate_grf_family

    cuts = {}
    for size in (32, 64):
        x, _, _ = generate_grf_family(30, (size, size), seed=int(np.random.SeedSequence(size).generate_state(1)[0]))
        cuts[size] = auto_cutoff(np.stack([1 - x, x], 1), loss=SpatialStatsLoss(states=(0.0, 1.0)))
    assert cuts[32] is not None and cuts[64] is not None
    assert abs(cuts[32] - cuts[64]) <= 1, cuts


def test_one_point_term_scores_the_volume_fraction():
    torch.manual_seed(0)
    x = (torch.rand(40, 1, 16, 16) < torch.linspace(0.2, 0.8, 40).view(-1, 1, 1, 1)).double()
    plain = SpatialStatsLoss(indicator="hat", cutoff=None).calibrate(x)
    with_vf = SpatialStatsLoss(indicator="hat", cutoff=None, one_point=True).calibrate(x)
    mu = x.flatten(1).mean(1)
    assert with_vf.one_point_var_ == pytest.approx(float(mu.var()), rel=1e-9)
    assert with_vf.scale_ == pytest.approx(plain.scale_, rel=1e-12)
    # exactly the fraction of the volume fractions' variance left unexplained, added per sample
    x_hat = x.flip(0)
    extra = with_vf.stats_error(x_hat, x, reduction="none") - plain.stats_error(x_hat, x, reduction="none")
    want = (x_hat.flatten(1).mean(1) - mu).pow(2) / float(mu.var())
    assert torch.allclose(extra, want, rtol=1e-9, atol=1e-12)
    # a gradient reaches the reconstruction through it
    g = (0.25 + 0.5 * x_hat).requires_grad_(True)  # grey: the hat indicator's gradient is 0 at 0 and 1
    with_vf.stats_error(g, x).backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0
    # the same composition everywhere: nothing to explain, the term is off
    same = torch.zeros(6, 1, 16, 16, dtype=torch.float64)
    for k in range(6):
        same[k, 0].view(-1)[torch.randperm(256, generator=torch.Generator().manual_seed(k))[:100]] = 1.0
    off = SpatialStatsLoss(indicator="hat", cutoff=None, one_point=True).calibrate(same)
    assert off.one_point_var_ == 0.0
    assert "one_point=True" in repr(off)


def test_one_point_needs_the_variance_convention():
    with pytest.raises(ValueError, match="one_point"):
        SpatialStatsLoss(normalise="minmax", one_point=True)
    with pytest.raises(TypeError, match="one_point"):
        SpatialStatsLoss(one_point="yes")
    assert SpatialStatsLoss(one_point=True).needs_calibration


# ---------------------------------------------------------------------------- linear read-out term
def _readout_setup(seed=0):
    from pymks_vae.models import VAE

    torch.manual_seed(seed)
    model = VAE(encoder="stats", latent_dim=3, image_size=(12, 14), channels=2, stats_head=True,
                encoder_options={"cutoff": 3})
    x1 = (torch.rand(6, 1, 12, 14) < 0.4).float()
    return model, torch.cat([1 - x1, x1], 1)


def test_linear_readout_loss_adds_the_lag_standardised_linear_error():
    from pymks_vae.losses import LinearReadoutLoss

    model, x = _readout_setup()
    base = SpatialStatsLoss(states=(0.0, 1.0), scale=1.0, cutoff=None)
    loss = LinearReadoutLoss(base, model, weight=0.7, scaling="lag", head="learned")
    x_hat, mu, logvar = model(x)
    total, parts = loss(x_hat, x, mu, logvar)
    base_total, _ = base(x_hat, x, mu, logvar)
    enc = model.encoder
    f = ops.two_point_stats(x, [(0, 0)], cutoff=3).flatten(1)  # what the encoder reads
    s = (f - enc.norm.running_mean) / torch.sqrt(enc.norm.running_var + enc.norm.eps)
    want = (model.stats_head(mu) - s).pow(2).mean(1).mean()
    torch.testing.assert_close(parts["readout"], want.detach())
    torch.testing.assert_close(total, base_total + 0.7 * want)
    # the gradient reaches the head and the encoder (through mu), not the statistics target
    assert model.stats_head.weight.requires_grad
    total.backward()
    assert model.stats_head.weight.grad.abs().sum() > 0
    assert model.encoder.gaussian.mu.weight.grad.abs().sum() > 0
    # the base loss's calibration and attributes pass through
    assert loss.scale_ == base.scale_ and loss.correlations == base.correlations and not loss.needs_calibration


@pytest.mark.parametrize("scaling, share", [("pareto", 0.5), ("global", 0.2), ("pareto", 1.0), ("lag", 0.5)])
def test_linear_readout_loss_scalings_and_one_point_share(scaling, share):
    """Each statistic centred by the encoder's running mean and divided by its scaling's scale;
    the one-point statistics' share of R apart from the two-point statistics'."""
    from pymks_vae.losses import LinearReadoutLoss
    from pymks_vae.models import VAE

    torch.manual_seed(1)
    model = VAE(encoder="stats", latent_dim=2, image_size=(13, 12), channels=3, stats_head=True,
                encoder_options={"cutoff": 2, "one_point": True})
    x = torch.nn.functional.one_hot(torch.randint(0, 3, (7, 13, 12)), 3).movedim(-1, 1).double()
    model = model.double()
    model.train()(x)  # running statistics away from their initial values
    model.train()(x.flip(0)[:5])
    base = SpatialStatsLoss(states=(0.0, 1.0, 2.0), scale=1.0, cutoff=None)
    loss = LinearReadoutLoss(base, model, weight=2.0, scaling=scaling, one_point_share=share, head="learned")
    default = LinearReadoutLoss(base, model)
    assert (default.scaling, default.one_point_share, default.weight, default.head) == ("pareto", 0.8, 8.0, "batch")
    x_hat, mu, logvar = model(x)
    total, parts = loss(x_hat, x, mu, logvar)
    enc = model.encoder
    two = ops.two_point_stats(x, enc.correlations, cutoff=2).flatten(1)
    one = x[:, :2].mean((2, 3))  # two independent phase fractions of three phases
    f = torch.cat([two, one], 1)
    assert enc.n_one_point == 2 and f.shape[1] == enc.norm.num_features == 3 * 25 + 2
    var, eps = enc.norm.running_var, enc.norm.eps
    sd = {"lag": torch.sqrt(var + eps), "global": torch.sqrt(var.mean() + eps),
          "pareto": torch.sqrt(torch.sqrt(var + eps) * torch.sqrt(var.mean()) + eps)}[scaling]
    s = (f - enc.norm.running_mean) / sd
    e = (model.stats_head(mu) - s).pow(2)
    want = ((1 - share) * e[:, :-2].mean(1) + share * e[:, -2:].mean(1)).mean()
    torch.testing.assert_close(parts["readout"], want.detach())
    torch.testing.assert_close(total, base(x_hat, x, mu, logvar)[0] + 2.0 * want)
    # without one-point statistics the share plays no part: the plain mean over the statistics
    plain, xp = _readout_setup()
    lp = LinearReadoutLoss(base, plain, scaling=scaling, one_point_share=share, head="learned")
    _, mu_p, _ = plain(xp)
    v = plain.encoder.norm.running_var
    sd_p = {"lag": torch.sqrt(v + eps), "global": torch.sqrt(v.mean() + eps),
            "pareto": torch.sqrt(torch.sqrt(v + eps) * torch.sqrt(v.mean()) + eps)}[scaling]
    sp = (plain.encoder.statistics(xp) - plain.encoder.norm.running_mean) / sd_p
    torch.testing.assert_close(lp.readout_error(xp, mu_p), (plain.stats_head(mu_p) - sp).pow(2).mean(1).mean())


@pytest.mark.parametrize("n, latent, one_point", [(9, 2, True), (8, 3, False), (13, 4, True)])
def test_linear_readout_loss_solves_the_head_on_the_batch(n, latent, one_point, device):
    """head="batch": R is the weighted residual of the batch's own least-squares map from the
    latent means (with an intercept) to the scaled statistics; the gradient reaches the encoder
    through the solution, the head keeps the solution and is not the optimiser's."""
    from pymks_vae.losses import LinearReadoutLoss
    from pymks_vae.models import VAE

    torch.manual_seed(n + latent)
    model = VAE(encoder="stats", latent_dim=latent, image_size=(11, 10), channels=2, stats_head=True,
                encoder_options={"cutoff": 2, "one_point": one_point}).double().to(device)
    x1 = (torch.rand(n, 1, 11, 10) < torch.rand(n, 1, 1, 1)).double()
    x = torch.cat([1 - x1, x1], 1).to(device)
    model.train()(x)  # running statistics away from their initial values
    base = SpatialStatsLoss(states=(0.0, 1.0), scale=1.0, cutoff=None)
    loss = LinearReadoutLoss(base, model, weight=3.0, one_point_share=0.75)
    assert loss.head == "batch"
    x_hat, mu, logvar = model(x)
    total, parts = loss(x_hat, x, mu, logvar)
    enc = model.encoder
    var, eps = enc.norm.running_var, enc.norm.eps
    s = (enc.statistics(x) - enc.norm.running_mean) / torch.sqrt(torch.sqrt(var + eps) * torch.sqrt(var.mean()) + eps)
    a = torch.cat([mu.detach(), torch.ones(n, 1, dtype=mu.dtype, device=mu.device)], 1)
    coef = torch.linalg.lstsq(a, s.detach()).solution  # the reference: an independent solver, uncentred
    e = (a @ coef - s).pow(2)
    n1 = enc.n_one_point
    want = (0.25 * e[:, :-n1].mean(1) + 0.75 * e[:, -n1:].mean(1)) if n1 else e.mean(1)
    torch.testing.assert_close(parts["readout"], want.mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(total.detach(), base(x_hat, x, mu, logvar)[0].detach() + 3.0 * want.mean(),
                               rtol=1e-6, atol=1e-9)
    # the head holds the solution (to the ridge's 1e-6 of the latent's variance); evaluation mode
    # reads it as a fixed map
    # (compared by its predictions: an untrained latent leaves the coefficients ill-conditioned)
    torch.testing.assert_close(model.stats_head(mu).detach(), a @ coef, rtol=1e-3, atol=1e-5)
    total.backward()
    assert model.stats_head.weight.grad is None and model.encoder.gaussian.mu.weight.grad.abs().sum() > 0
    assert not model.stats_head.weight.requires_grad  # not the optimiser's (DistributedDataParallel)
    # the gradient in mu is that of the residual at the solved map (finite differences, float64)
    mu0 = mu.detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda m: loss.readout_error(x, m), (mu0,))
    model.eval()
    r_eval = loss.readout_error(x, mu.detach())
    torch.testing.assert_close(r_eval, want.mean(), rtol=1e-4, atol=1e-8)
    # a batch with no residual left (latent_dim + 1 samples) uses the stored map, fixed
    model.train()
    small = loss.readout_error(x[: latent + 1], mu.detach()[: latent + 1].requires_grad_(True))
    want_small = (e[: latent + 1, :-n1].mean(1) * 0.25 + e[: latent + 1, -n1:].mean(1) * 0.75) if n1 else e[: latent + 1].mean(1)
    torch.testing.assert_close(small, want_small.mean(), rtol=1e-4, atol=1e-8)


def test_linear_readout_loss_solved_head_survives_a_collapsed_latent():
    """mu = 0 on the whole batch (a collapsed latent): a finite R equal to the statistics' whole
    weighted variance, and a finite gradient."""
    from pymks_vae.losses import LinearReadoutLoss

    model, x = _readout_setup()
    model.train()(x)
    loss = LinearReadoutLoss(SpatialStatsLoss(states=(0.0, 1.0), scale=1.0), model)
    mu = torch.zeros(x.shape[0], 3, requires_grad=True)
    r = loss.readout_error(x, mu)
    enc = model.encoder
    with torch.no_grad():
        var, eps = enc.norm.running_var, enc.norm.eps
        s = (enc.statistics(x) - enc.norm.running_mean) / torch.sqrt(torch.sqrt(var + eps) * torch.sqrt(var.mean()) + eps)
    torch.testing.assert_close(r.detach(), (s - s.mean(0)).pow(2).mean(1).mean())
    r.backward()
    assert torch.isfinite(mu.grad).all()


def test_linear_readout_loss_refuses_a_model_without_head_and_bad_weight():
    from pymks_vae.losses import LinearReadoutLoss
    from pymks_vae.models import VAE

    base = SpatialStatsLoss(states=(0.0, 1.0), scale=1.0)
    with pytest.raises(ValueError, match="stats_head"):
        LinearReadoutLoss(base, VAE(encoder="stats", latent_dim=2, image_size=16, channels=2))
    with pytest.raises(ValueError, match="stats_head"):
        LinearReadoutLoss(base, VAE(encoder="cnn", latent_dim=2, image_size=16, channels=2))
    model, _ = _readout_setup()
    with pytest.raises((ValueError, TypeError), match="weight"):
        LinearReadoutLoss(base, model, weight=-1.0)
    with pytest.raises(ValueError, match="scaling"):
        LinearReadoutLoss(base, model, scaling="per-lag")
    for bad in (-0.1, 1.5, True, "half", float("nan")):
        with pytest.raises(ValueError, match="one_point_share"):
            LinearReadoutLoss(base, model, one_point_share=bad)
    for bad in ("solved", None, True):
        with pytest.raises(ValueError, match="head"):
            LinearReadoutLoss(base, model, head=bad)
    with pytest.raises(ValueError, match="encoder='stats' only"):
        VAE(encoder="cnn", latent_dim=2, image_size=16, stats_head=True)
