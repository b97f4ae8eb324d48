"""The labelled microstructure families with a descriptor (grf, inclusions, lamellae): fast checks."""
import numpy as np
import pytest

from pymks_vae.microstructures import (
    GRF_CLASSES,
    GRF_CLASSES_3D,
    INCLUSION_CLASSES,
    LAMELLA_CLASSES,
    generate_grf_family,
    generate_inclusions,
    generate_lamellae,
    generate_multiphase,
)

FAMILIES = [
    (generate_grf_family, GRF_CLASSES, "sigma_mean"),
    (generate_inclusions, INCLUSION_CLASSES, "radius"),
    (generate_lamellae, LAMELLA_CLASSES, "spacing"),
]
IDS = ["grf", "inclusions", "lamellae"]


@pytest.mark.parametrize("gen, classes, key", FAMILIES, ids=IDS)
def test_shapes_values_and_descriptor_ranges(gen, classes, key):
    x, y, d = gen(4, (24, 32), seed=0)
    n = 4 * len(classes)
    assert x.shape == (n, 24, 32) and x.dtype == np.float64
    assert y.shape == (n,) and y.dtype == np.int64 and d.shape == (n,) and d.dtype == np.float64
    assert set(np.unique(x).tolist()) == {0.0, 1.0}
    assert y.tolist() == np.repeat(np.arange(len(classes)), 4).tolist()
    for label, spec in enumerate(classes):
        lo, hi = spec[key]
        assert (lo <= d[y == label]).all() and (d[y == label] <= hi).all()
    assert len(np.unique(d)) == n  # drawn continuously per sample


@pytest.mark.parametrize("gen", [f[0] for f in FAMILIES], ids=IDS)
def test_deterministic_per_seed(gen):
    a = gen(3, 32, seed=5)
    b = gen(3, 32, seed=5)
    c = gen(3, 32, seed=6)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])


@pytest.mark.parametrize("gen", [f[0] for f in FAMILIES], ids=IDS)
def test_descriptor_and_class_show_in_a_measured_statistic(gen):
    """The lag where the autocorrelation of phase 1 first falls halfway to vf^2 grows with the descriptor."""
    x, y, d = gen(8, 64, seed=1)
    f = np.fft.ifft2(np.abs(np.fft.fft2(x)) ** 2).real / x[0].size  # periodic autocorrelation
    vf = x.mean(axis=(1, 2))
    # radial-ish average of the lags 1..15 along both axes, normalised to 1 at r = 0 and 0 at vf^2
    profile = 0.5 * (f[:, 0, 1:16] + f[:, 1:16, 0])
    profile = (profile - vf[:, None] ** 2) / (vf - vf ** 2)[:, None]
    if gen is generate_lamellae:
        # the period read from the strongest non-zero frequency of the power spectrum
        power = np.abs(np.fft.fft2(x - vf[:, None, None])) ** 2
        k = np.fft.fftfreq(64)
        peak = power.reshape(len(x), -1).argmax(axis=1)
        length = 1.0 / np.hypot(k[peak // 64], k[peak % 64])
        assert np.corrcoef(length, d)[0, 1] > 0.9
    else:
        length = (profile > 0.5).sum(axis=1)
        assert np.corrcoef(length, d)[0, 1] > 0.6
    means = [length[y == c].mean() for c in np.unique(y)]
    if gen is generate_grf_family:
        # fine < medium < coarse (the three isotropic classes); anisotropy: lengths differ per axis
        assert means[0] < means[1] < means[2]
        names = [c["name"] for c in GRF_CLASSES]
        along0, along1 = f[:, 3, 0], f[:, 0, 3]
        assert (along1[y == names.index("x-elongated")] > along0[y == names.index("x-elongated")]).all()
        assert (along0[y == names.index("y-elongated")] > along1[y == names.index("y-elongated")]).all()
    else:
        assert np.all(np.diff(means) > 0)


def test_inclusions_volume_fraction_does_not_classify():
    x, y, r = generate_inclusions(40, 64, seed=2)
    vf = x.mean(axis=(1, 2))
    per_class = np.array([vf[y == c].mean() for c in np.unique(y)])
    assert np.abs(per_class - 0.3).max() < 0.015
    assert vf.std() > 0.02  # the jitter spreads it within classes
    # nearest class mean of the volume fraction, even scored on the samples it was fitted on
    accuracy = (np.abs(vf[:, None] - per_class[None, :]).argmin(axis=1) == y).mean()
    assert accuracy < 0.4  # chance: 0.25


def test_inclusions_without_overlap_keep_disks_apart():
    x, _, r = generate_inclusions(2, 64, classes=({"radius": (3.0, 3.0)},), volume_fraction=0.2,
                                  volume_fraction_jitter=0.0, overlap=False, seed=0)
    from scipy import ndimage

    def blob_sizes(x):
        """Pixel counts of the connected blobs of phase 1, read periodically (centre tile of a 3x3 tiling)."""
        sizes = []
        for img in x:
            labels, _ = ndimage.label(np.tile(img, (3, 3)))
            centre = labels[64:128, 64:128]
            sizes += np.bincount(labels.ravel())[np.unique(centre[centre > 0])].tolist()
        return np.array(sizes)

    # a disk of radius 3 covers 26-30 pixels; separate disks stay single blobs (only touching ones merge)
    apart = blob_sizes(x)
    assert 25 <= np.median(apart) <= 30 and (apart > 31).mean() < 0.2
    merged = blob_sizes(generate_inclusions(2, 64, classes=({"radius": (3.0, 3.0)},), volume_fraction=0.2,
                                            volume_fraction_jitter=0.0, overlap=True, seed=0)[0])
    assert (merged > 31).mean() > 0.3
    with pytest.raises(ValueError, match="non-overlapping"):
        generate_inclusions(1, 16, classes=({"radius": (7.0, 7.0)},), volume_fraction=0.9,
                            volume_fraction_jitter=0.0, overlap=False, seed=0)


def test_lamellae_orientation_follows_angle():
    x, _, _ = generate_lamellae(3, 64, classes=({"spacing": (8.0, 8.0), "angle": 90.0},), angle_jitter=0.0,
                                noise=0.0, waviness=0.0, seed=0)
    # normal along axis 1: columns alternate, rows are constant
    assert x.std(axis=1).mean() < 0.05 and x.std(axis=2).mean() > 0.4


@pytest.mark.parametrize("gen, kwargs, match", [
    (generate_grf_family, dict(n_per_class=0), "n_per_class"),
    (generate_grf_family, dict(n_per_class=True), "n_per_class"),
    (generate_grf_family, dict(shape=(16, 16, 16, 16)), "shape"),
    (generate_grf_family, dict(classes=()), "at least one"),
    (generate_grf_family, dict(classes=({"aspect": 1.0},)), "sigma_mean"),
    (generate_grf_family, dict(classes=({"sigma_mean": (2.0, 1.0)},)), "sigma_mean"),
    (generate_grf_family, dict(classes=({"sigma_mean": (1.0, 2.0), "aspect": 0.0},)), "aspect"),
    (generate_grf_family, dict(volume_fraction=0.0), "volume_fraction"),
    (generate_grf_family, dict(shape=(16, 16, 16), classes=({"sigma_mean": (1.0, 2.0), "aspect": (1.0, 2.0)},)),
     "aspect"),
    (generate_grf_family, dict(shape=(16,)), "2D or 3D"),
    (generate_inclusions, dict(shape=(1, 16)), "shape"),
    (generate_inclusions, dict(classes=({"radius": (1.0, 9.0)},), shape=16), "radius"),
    (generate_inclusions, dict(classes=({"radius": 3.0},)), "pair"),
    (generate_inclusions, dict(volume_fraction=0.3, volume_fraction_jitter=0.4), "jitter"),
    (generate_inclusions, dict(overlap="yes"), "overlap"),
    (generate_lamellae, dict(classes=({"spacing": (1.0, 3.0)},)), "spacing"),
    (generate_lamellae, dict(angle_jitter=120.0), "angle_jitter"),
    (generate_lamellae, dict(waviness=-0.1), "waviness"),
    (generate_lamellae, dict(noise=float("nan")), "noise"),
    (generate_lamellae, dict(classes=({"angle": 0.0},)), "spacing"),
])
def test_rejects_bad_arguments(gen, kwargs, match):
    err = TypeError if match == "overlap" else ValueError
    with pytest.raises(err, match=match):
        gen(**{"n_per_class": 1, "shape": 16, **kwargs})


def _autocorrelation_lag(x, axis, lag):
    """Mean over samples of the periodic autocorrelation of phase 1 at ``lag`` pixels along ``axis``."""
    return float((x * np.roll(x, lag, axis=axis)).mean())


def test_grf_family_3d_sizes_and_shapes():
    x, y, d = generate_grf_family(6, (24, 24, 24), seed=0)
    assert x.shape == (30, 24, 24, 24) and set(np.unique(x).tolist()) == {0.0, 1.0}
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0.5, atol=1e-3)  # one volume fraction for all
    names = [c["name"] for c in GRF_CLASSES_3D]
    for label, spec in enumerate(GRF_CLASSES_3D):
        lo, hi = spec["sigma_mean"]
        assert (lo <= d[y == label]).all() and (d[y == label] <= hi).all()
    # isotropic sizes: the correlation at a lag of 3 grows from fine to coarse
    iso = [np.mean([_autocorrelation_lag(x[y == c], a, 3) for a in (1, 2, 3)]) for c in range(3)]
    assert iso[0] < iso[1] < iso[2]
    # fibres are longer along z than across; plates are thinner along z than across
    fibres, plates = x[y == names.index("z-fibres")], x[y == names.index("xy-plates")]
    assert _autocorrelation_lag(fibres, 3, 3) > 1.2 * _autocorrelation_lag(fibres, 1, 3)
    assert _autocorrelation_lag(plates, 1, 3) > 1.2 * _autocorrelation_lag(plates, 3, 3)


def test_grf_family_2d_default_is_unchanged():
    """classes=None means GRF_CLASSES in 2D: the same samples as passing them."""
    for a, b in zip(generate_grf_family(2, 16, seed=3), generate_grf_family(2, 16, classes=GRF_CLASSES, seed=3)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(40,), (21, 21), (12, 10, 8)])
def test_multiphase_fractions_and_bands(shape):
    x = generate_multiphase(3, shape, sigma=1.5, volume_fractions=(0.5, 0.3, 0.2), seed=0)
    assert x.shape == (3,) + shape and x.dtype == np.int64
    for k, vf in enumerate((0.5, 0.3, 0.2)):
        np.testing.assert_allclose((x == k).mean(axis=tuple(range(1, x.ndim))), vf, atol=0.02)
    # phases are bands of one smooth field: 0 and 2 touch far less often than 0 and 1
    touch = lambda a, b: sum(((x == a) & (np.roll(x, 1, axis=ax) == b)).sum() for ax in range(1, x.ndim))  # noqa: E731
    assert touch(0, 2) < 0.2 * touch(0, 1)
    np.testing.assert_array_equal(x, generate_multiphase(3, shape, sigma=1.5, volume_fractions=(0.5, 0.3, 0.2),
                                                         seed=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(volume_fractions=(1.0,)), "volume_fractions"), (dict(volume_fractions=(0.5, 0.6)), "summing to 1"),
    (dict(volume_fractions=(1.2, -0.2)), "volume_fractions"), (dict(sigma=-1.0), "sigma"),
    (dict(n_samples=0), "n_samples"), (dict(shape=(2, 2, 2, 2)), "shape"),
])
def test_multiphase_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_multiphase(**{"n_samples": 1, "shape": 8, **kwargs})
