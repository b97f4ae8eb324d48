"""Evaluation: line analysis, volume fraction, errors, spatial statistics, neighbours, tables."""
import numpy as np
import pytest
import scipy.ndimage
import torch

from pymks_vae import evaluation as E
from pymks_vae.datasets import HORIZONTAL, VERTICAL, generate_lines, lines_dataarray


# ----------------------------------------------------------------------------- line analysis
@pytest.mark.parametrize("size,n", [(64, 1000), (224, 500), (100, 300)])
def test_analyse_lines_recovers_generated_labels(size, n):
    images, orientation, n_lines = generate_lines(range(n), size=size, seed=21)
    o, c = E.analyse_lines(images)
    assert o.dtype == np.int64 and c.dtype == np.int64
    np.testing.assert_array_equal(o, orientation)
    np.testing.assert_array_equal(c, n_lines)
    # the channel axis and torch tensors are accepted
    o2, c2 = E.analyse_lines(torch.from_numpy(images[:20, None]))
    np.testing.assert_array_equal(o2, orientation[:20])
    np.testing.assert_array_equal(c2, n_lines[:20])


def blur(images, sigma, noise, rng):
    out = scipy.ndimage.gaussian_filter(images, (0, sigma, sigma)) + rng.normal(0.0, noise, images.shape)
    return np.clip(out, 0.0, 1.0)


def test_analyse_lines_on_blurred_images(rng):
    images, orientation, n_lines = generate_lines(range(200), size=224, seed=4)
    # mild blur: at the paper's level some thin lines vanish, but any line found has the right way
    o, _ = E.analyse_lines(blur(images, 1.0, 0.02, rng))
    found = o >= 0
    assert found.mean() > 0.9
    np.testing.assert_array_equal(o[found], orientation[found])
    # strong blur and noise: at a mid-grey level the orientation is always right, counts nearly
    o, c = E.analyse_lines(blur(images, 2.0, 0.05, rng), level=0.5)
    np.testing.assert_array_equal(o, orientation)
    assert (c == n_lines).mean() > 0.9


def test_analyse_lines_hand_made():
    img = np.ones((5, 40, 40), dtype=np.float32)
    img[0, 5:8, 2:30] = 0.0  # one horizontal line
    img[0, 20:22, 4:36] = 0.02  # another, below the threshold
    img[0, 30:32, 4:36] = 0.06  # grey: above the threshold, not a line
    img[1, 2:35, 10:13] = 0.0  # one vertical line ...
    img[1, 30, 30] = 0.0  # ... and a speck
    img[3, 3:6, 3:6] = 0.0  # only a small blob
    img[4, 2:22, 5:7] = 0.0  # a vertical line and a bigger square blob, which has no orientation
    img[4, 25:33, 20:28] = 0.0
    o, c, comps = E.analyse_lines(img, min_area=20, return_components=True)
    assert o.tolist() == [HORIZONTAL, VERTICAL, -1, -1, VERTICAL]
    assert c.tolist() == [2, 1, 0, 0, 2]
    assert sorted(comps[0]) == sorted([(3 * 28, 3, 28), (2 * 32, 2, 32)])
    assert comps[2] == [] and comps[3] == []
    _, c0 = E.analyse_lines(img, min_area=0)
    assert c0.tolist() == [2, 2, 0, 1, 2]  # the speck and the blob count when nothing is ignored
    # the default minimum area ignores one-pixel specks
    assert E.analyse_lines(img)[1][1] == 1


def test_threshold_and_mask():
    x = np.array([[[0.0, 0.049, 0.05, 0.5, 1.0]]])
    assert E.threshold(x).tolist() == [[[0.0, 0.0, 1.0, 1.0, 1.0]]]
    assert E.threshold(x).dtype == np.float32
    assert E.line_mask(x, level=0.6).tolist() == [[[True, True, True, True, False]]]
    images = generate_lines(range(5), size=32)[0]
    np.testing.assert_array_equal(E.threshold(images), images)


def test_volume_fraction_difference_hand_computed():
    orig = np.ones((2, 10, 10))
    orig[:, 0:2, 0:10] = 0.0  # 20 black pixels in both
    recon = np.full((2, 10, 10), 0.9)
    recon[0, 0:3, 0:5] = 0.01  # 15 black -> |20 - 15| / 20 = 25 %
    recon[0, 5, :] = 0.05  # exactly the level: white
    recon[1, 0:3, 0:9] = 0.0  # 27 black -> 35 %
    got = E.volume_fraction_difference(orig, recon)
    np.testing.assert_allclose(got, [25.0, 35.0])
    np.testing.assert_allclose(E.volume_fraction_difference(orig, orig), [0.0, 0.0])
    with pytest.raises(ValueError, match="originals"):
        E.volume_fraction_difference(np.ones((1, 4, 4)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        E.volume_fraction_difference(orig, recon[:1])


# ----------------------------------------------------------------------------- errors and statistics
def np_stats(images, eps=0.25):
    """Periodic autocorrelation of the soft line indicator, straight from the definition."""
    m = np.exp(-images.astype(np.float64) ** 2 / (2 * eps**2))
    f = np.fft.fftn(m, axes=(1, 2))
    c = np.fft.ifftn(np.conj(f) * f, axes=(1, 2)).real
    return np.fft.fftshift(c, axes=(1, 2)) / (images.shape[1] * images.shape[2])


def test_spatial_stats_matches_numpy_fft(rng):
    x = rng.random((7, 12, 9)).astype(np.float32)
    got = E.spatial_stats(x, batch_size=3)
    assert got.dtype == np.float64 and got.shape == (7, 12, 9)
    np.testing.assert_allclose(got, np_stats(x), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(E.spatial_stats(torch.from_numpy(x[:, None]), eps=0.4), np_stats(x, 0.4),
                               rtol=1e-10, atol=1e-13)
    # on a binary lines image f(0) is the line fraction (up to the soft background exp(-8))
    images = generate_lines(range(3), size=32)[0]
    f = E.spatial_stats(images)
    frac = (images == 0).mean(axis=(1, 2))
    np.testing.assert_allclose(f[:, 16, 16], frac, atol=2e-3)


def test_per_image_and_stats_mse(rng):
    a = rng.random((5, 8, 8))
    b = rng.random((5, 1, 8, 8))
    expected = np.array([np.mean((a[i] - b[i, 0]) ** 2) for i in range(5)])
    np.testing.assert_allclose(E.per_image_mse(a, b), expected)
    np.testing.assert_allclose(E.per_image_mse(torch.from_numpy(a), b), expected)
    fa, fb = np_stats(a), np_stats(b[:, 0])
    np.testing.assert_allclose(E.stats_mse(a, b, batch_size=2), ((fa - fb) ** 2).mean(axis=(1, 2)), rtol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        E.per_image_mse(a, b[:4])
    with pytest.raises(ValueError, match="same shape"):
        E.stats_mse(a, b[:, :, :4])


# ----------------------------------------------------------------------------- neighbours
def brute_force(queries, pool, features):
    fq = features(queries).reshape(len(queries), -1)
    fp = features(pool).reshape(len(pool), -1)
    d = np.array([[np.mean((q - p) ** 2) for p in fp] for q in fq])
    return d


@pytest.mark.parametrize("metric", ["image", "stats"])
def test_neighbours_and_average_against_brute_force(rng, metric):
    queries = rng.random((6, 10, 10))
    pool = rng.random((23, 10, 10))
    pool[5] = queries[2] + 0.01  # a close pool item
    features = (lambda x: x) if metric == "image" else np_stats
    d = brute_force(queries, pool, features)
    idx, dist = E.nearest_neighbours(queries, pool, metric=metric, batch_size=4, return_distances=True)
    np.testing.assert_array_equal(idx, d.argmin(axis=1))
    np.testing.assert_allclose(dist, d.min(axis=1), rtol=1e-8, atol=1e-15)
    assert idx[2] == 5
    np.testing.assert_array_equal(E.nearest_neighbours(queries, pool, metric=metric), idx)
    avg = E.average_mse_to_set(queries, pool, metric=metric, batch_size=5)
    np.testing.assert_allclose(avg, d.mean(axis=1), rtol=1e-8)


def test_nearest_neighbour_ties_and_lazy_pool():
    pool = np.stack([np.zeros((4, 4)), np.ones((4, 4)), np.ones((4, 4))])
    assert E.nearest_neighbours(np.ones((1, 4, 4)), pool, batch_size=1).tolist() == [1]
    # a lazy xarray pool is read batch by batch and finds each image itself
    arr = lines_dataarray(30, size=32, seed=3, chunks=7)
    queries = generate_lines([3, 17, 29], size=32, seed=3)[0]
    assert E.nearest_neighbours(queries, arr, batch_size=8).tolist() == [3, 17, 29]
    # statistics ignore translations: the nearest may be a shifted twin, but at distance zero
    idx, dist = E.nearest_neighbours(queries[:, None], arr.data[:, None], metric="stats", return_distances=True)
    np.testing.assert_allclose(dist, 0.0, atol=1e-15)
    assert all(i <= j for i, j in zip(idx, [3, 17, 29]))  # the first of the ties


# ----------------------------------------------------------------------------- tables
def test_confusion_matrix_and_summary():
    true = np.array([1, 2, 2, 3, 4, 4, 4])
    pred = np.array([1, 2, 3, 3, 4, 2, -1])
    m = E.confusion_matrix(true, pred, labels=[1, 2, 3, 4])
    expected = np.zeros((4, 4), dtype=int)
    for t, p in zip(true, pred):
        if p in (1, 2, 3, 4):
            expected[t - 1, p - 1] += 1
    np.testing.assert_array_equal(m, expected)
    assert E.confusion_matrix(torch.tensor(true), pred, labels=[-1, 1, 2, 3, 4]).sum() == len(true)
    s = E.summarise([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["mean"] == 4.0 and s["n"] == 4
    with pytest.raises(ValueError, match="errors"):
        E.summarise([])
    with pytest.raises(ValueError, match="same length"):
        E.confusion_matrix([1, 2], [1], labels=[1, 2])
    with pytest.raises(ValueError, match="labels"):
        E.confusion_matrix([1, 2], [1, 2], labels=[])


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    good = np.ones((2, 8, 8))
    with pytest.raises(ValueError, match="images"):
        E.analyse_lines(np.ones((8, 8)))
    with pytest.raises(ValueError, match="images"):
        E.analyse_lines(np.ones((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="empty"):
        E.analyse_lines(np.ones((0, 8, 8)))
    with pytest.raises(ValueError, match="min_area"):
        E.analyse_lines(good, min_area=-1)
    with pytest.raises(ValueError, match="level"):
        E.threshold(good, level=float("nan"))
    with pytest.raises(TypeError, match="images"):
        E.threshold(np.array([[["a"]]]))
    with pytest.raises(ValueError, match="images"):
        E.spatial_stats(np.ones(8))
    with pytest.raises(ValueError, match="batch_size"):
        E.spatial_stats(good, batch_size=0)
    with pytest.raises(ValueError, match="metric"):
        E.nearest_neighbours(good, good, metric="l1")
    with pytest.raises(ValueError, match="same shape"):
        E.nearest_neighbours(good, np.ones((3, 8, 9)))
    with pytest.raises(ValueError, match="pool"):
        E.average_mse_to_set(good, np.ones((0, 8, 8)))
    with pytest.raises(ValueError, match="queries"):
        E.average_mse_to_set(np.ones((8, 8)), good)
    with pytest.raises(ValueError, match="a "):
        E.per_image_mse(np.ones((2, 8)), good)
    bad = good.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="reconstructions contains NaN"):
        E.volume_fraction_difference(np.zeros((2, 8, 8)), bad)
    with pytest.raises(ValueError, match="pool contains NaN"):
        E.nearest_neighbours(good, bad)
    with pytest.raises(ValueError, match="images"):
        E.spatial_stats(None)


def test_lists_are_accepted():
    images = [[[0.0, 1.0], [1.0, 1.0]]]
    np.testing.assert_allclose(E.spatial_stats(images), np_stats(np.array(images)))
    assert E.nearest_neighbours(images, [images[0], images[0]]).tolist() == [0]
