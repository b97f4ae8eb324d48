"""correlations_multiple and two_point_stats in PyMKS's layout against the real pymks 0.4.1, on numpy and dask."""
import warnings

import numpy as np
import pytest

from optional import require

dask = require("dask")
da = require("dask.array")

from pymks_vae.correlations import (MaskOverlapWarning, MaskRangeError, correlations_multiple,
                                    resolve_correlations, resolve_cutoff, to_channels_first, to_channels_last,
                                    two_point_stats)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pymks = require("pymks")
    from pymks.fmks.correlations import correlations_multiple as pymks_correlations_multiple


def pymks_hat(data, n_state):
    """The one-hot/hat basis exactly as pymks's PrimitiveTransformer makes it (numpy out)."""
    return np.asarray(pymks.PrimitiveTransformer(n_state=n_state, min_=0.0, max_=1.0).transform(data))


@pytest.mark.parametrize("spatial", [(9, 9), (10, 7), (8, 11), (6, 5, 7), (4, 4, 4)])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("cutoff", [None, 0, 2, 100])
def test_matches_pymks(spatial, periodic, cutoff, rng):
    n_state = 3
    data = pymks_hat(rng.random((3,) + spatial), n_state)
    for correlations in [None, [(0, 0), (1, 2), (2, 1)], [(2, 2)]]:
        ours = correlations_multiple(data, correlations, periodic_boundary=periodic, cutoff=cutoff)
        theirs = np.asarray(pymks_correlations_multiple(data, correlations, periodic_boundary=periodic, cutoff=cutoff))
        assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_random_non_partition_data_matches_pymks(rng):
    data = rng.random((2, 12, 13, 2))
    ours = correlations_multiple(data, [(0, 1), (1, 1)], cutoff=4)
    theirs = np.asarray(pymks_correlations_multiple(data, [(0, 1), (1, 1)], cutoff=4))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_dask_is_lazy_chunked_and_equal(rng):
    data = pymks_hat(rng.random((10, 16, 16)), 2)
    x = da.from_array(data, chunks=(3, 8, 16, 1))  # spatial/state chunks get merged
    calls = []

    def count(block):
        if block.size:  # dask may probe with an empty block to infer metadata
            calls.append(len(block))
        return block

    x = x.map_blocks(count, dtype=x.dtype, meta=np.empty((0, 0, 0, 0)))
    out = correlations_multiple(x, [(1, 1), (0, 1)], cutoff=5)
    assert isinstance(out, da.Array)
    assert calls == []  # nothing computed yet
    assert out.shape == (10, 11, 11, 2) and out.dtype == np.float64
    assert out.chunks[0] == (3, 3, 3, 1)
    assert out.chunks[1:] == ((11,), (11,), (2,))
    with dask.config.set(scheduler="synchronous"):
        got = out.compute()
    assert calls  # blocks were read when asked
    np.testing.assert_allclose(got, correlations_multiple(data, [(1, 1), (0, 1)], cutoff=5), rtol=1e-12)
    theirs = np.asarray(pymks_correlations_multiple(data, [(1, 1), (0, 1)], cutoff=5))
    np.testing.assert_allclose(got, theirs, rtol=1e-9, atol=1e-12)


def test_dask_slice_computes_only_its_blocks(rng):
    """The output's graph culls: asking for some samples reads and transforms only their blocks."""
    data = pymks_hat(rng.random((10, 12, 12)), 2)
    read = []

    def load(block, block_info=None):
        if block.size:
            read.append(block_info[0]["chunk-location"][0])
        return block

    x = da.from_array(data, chunks=(3, 12, 12, 2)).map_blocks(load, dtype=data.dtype, meta=np.empty((0,) * 4))
    out = correlations_multiple(x, [(1, 1), (0, 1)], cutoff=3)
    with dask.config.set(scheduler="synchronous"):
        got = out[4:6].compute()
    assert read == [1]  # samples 4 and 5 live in the second block of three
    np.testing.assert_allclose(got, correlations_multiple(data[4:6], [(1, 1), (0, 1)], cutoff=3), rtol=1e-12)


def test_dask_output_is_named_by_input_and_parameters(rng):
    data = pymks_hat(rng.random((8, 12, 12)), 2)
    x = da.from_array(data, chunks=(4, 12, 12, 2))
    a = correlations_multiple(x, [(1, 1), (0, 1)], cutoff=3)
    assert a.name == correlations_multiple(x, [(1, 1), (0, 1)], cutoff=3).name  # same work, same keys
    others = [correlations_multiple(x, [(1, 1)], cutoff=3), correlations_multiple(x, [(1, 1), (0, 1)], cutoff=2),
              correlations_multiple(x, [(1, 1), (0, 1)], cutoff=3, periodic_boundary=False),
              correlations_multiple(x + 0.0, [(1, 1), (0, 1)], cutoff=3)]
    assert len({a.name} | {o.name for o in others}) == 5
    # blocks come back C-contiguous, computed with dask's threaded scheduler (worker threads)
    blocks = [b.compute(scheduler="threads") for b in a.blocks]
    assert all(b.flags.c_contiguous for b in blocks)
    np.testing.assert_allclose(np.concatenate(blocks), correlations_multiple(data, [(1, 1), (0, 1)], cutoff=3),
                               rtol=1e-12)


def test_numpy_views_torch_cannot_share(rng):
    """Read-only, broadcast and reversed views are copied for the operator, not rejected or misread."""
    data = pymks_hat(rng.random((3, 10, 9)), 2)
    views = {
        "reversed": data[:, ::-1],
        "read_only": np.broadcast_to(data[:1], (3,) + data.shape[1:]),
        "transposed_spatial": np.ascontiguousarray(data.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3),
    }
    for name, view in views.items():
        expected = correlations_multiple(np.ascontiguousarray(view), [(1, 1), (0, 1)], cutoff=3)
        got = correlations_multiple(view, [(1, 1), (0, 1)], cutoff=3)
        assert got.flags.c_contiguous, name
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, err_msg=name)
        theirs = np.asarray(pymks_correlations_multiple(np.ascontiguousarray(view), [(1, 1), (0, 1)], cutoff=3))
        np.testing.assert_allclose(got, theirs, rtol=1e-9, atol=1e-12, err_msg=name)


def test_large_numpy_input_is_batched(rng):
    data = pymks_hat(rng.random((150, 7, 7)), 2)
    out = correlations_multiple(data, [(0, 0)])
    np.testing.assert_allclose(out, np.asarray(pymks_correlations_multiple(data, [(0, 0)])), rtol=1e-9, atol=1e-12)


def test_integer_and_bool_input(rng):
    labels = rng.integers(0, 2, (2, 9, 9))
    data = np.stack([labels == 0, labels == 1], axis=-1)
    out = correlations_multiple(data, [(1, 1)])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[:, 4, 4, 0], (labels == 1).mean(axis=(1, 2)), rtol=1e-12)


def test_layout_helpers_round_trip(rng):
    a = rng.random((2, 3, 4, 5))
    assert to_channels_first(a).shape == (2, 5, 3, 4)
    np.testing.assert_array_equal(to_channels_last(to_channels_first(a)), a)
    d = da.from_array(a, chunks=(1, 3, 4, 5))
    np.testing.assert_array_equal(to_channels_last(to_channels_first(d)).compute(), a)


def test_resolvers():
    assert resolve_correlations(None, 3) == [(0, 0), (0, 1), (0, 2)]
    assert resolve_correlations([], 2) == [(0, 0), (0, 1)]
    assert resolve_correlations([[1, 0]], 2) == [(1, 0)]
    assert resolve_cutoff(None, (9, 12)) == 4
    assert resolve_cutoff(100, (9, 12)) == 4
    assert resolve_cutoff(2, (9, 12)) == 2


@pytest.mark.parametrize("data,kwargs,exc,match", [
    (np.zeros((3, 4)), {}, ValueError, "PyMKS's layout"),
    (np.zeros((2, 3, 3, 3, 3, 2)), {}, ValueError, "1-3 spatial dims"),
    (np.zeros((0, 5, 5, 2)), {}, ValueError, "no samples"),
    (np.zeros((2, 5, 5, 2)), {"correlations": [(0, 2)]}, ValueError, "n_state=2"),
    (np.zeros((2, 5, 5, 2)), {"correlations": [(0,)]}, TypeError, "pair"),
    (np.zeros((2, 5, 5, 2)), {"cutoff": -1}, ValueError, "cutoff"),
    (np.array([[["a"]]]), {}, TypeError, "numeric"),
])
def test_bad_input(data, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        correlations_multiple(data, **kwargs)


def test_nan_rejected():
    data = np.random.rand(2, 6, 6, 2)
    data[1, 2, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        correlations_multiple(data)


# ----------------------------------------------------------------------------- correlations: ints only
@pytest.mark.parametrize("correlations", [
    [(0.7, 1.9)], [(0, 1.0)], [("0", "1")], ["01"], [(True, False)], [(np.bool_(True), 0)], [(0, 1, 1)], [0, 1],
    "01", True, 3, {(0, 1): 1},
], ids=repr)
def test_non_integer_correlations_are_refused_not_truncated(correlations):
    data = np.random.rand(2, 6, 6, 2)
    with pytest.raises(TypeError, match=r"correlations"):
        correlations_multiple(data, correlations)
    with pytest.raises(TypeError, match=r"correlations"):
        resolve_correlations(correlations, 2)


def test_integer_like_correlations_are_accepted():
    assert resolve_correlations(np.array([[1, 0]]), 2) == [(1, 0)]
    assert resolve_correlations([(np.int64(1), np.uint8(1))], 2) == [(1, 1)]
    assert resolve_correlations((p for p in [(0, 1)]), 2) == [(0, 1)]


# ----------------------------------------------------------------------------- two_point_stats with a mask
def pymks_two_point(a, b, mask=None, **kwargs):
    return np.asarray(pymks.two_point_stats(da.from_array(a), da.from_array(b), mask=None if mask is None else
                                            da.from_array(mask), **kwargs))


@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("spatial,cutoff", [((13,), 4), ((9, 10), None), ((9, 10), 2), ((6, 7, 5), 1)])
@pytest.mark.parametrize("kind", ["none", "float", "bool", "int"])
def test_two_point_stats_matches_pymks(rng, periodic, spatial, cutoff, kind):
    a, b = rng.random((3,) + spatial), rng.random((3,) + spatial)
    mask = {"none": None, "float": np.clip(1.6 * rng.random((3,) + spatial), 0, 1),
            "bool": rng.random((3,) + spatial) > 0.2, "int": (rng.random((3,) + spatial) > 0.2).astype(int)}[kind]
    if mask is not None:
        # a block of ones as wide as the window: every lag has some overlap (PyMKS's NaN is tested apart)
        mask[(slice(None),) + (slice(0, 5),) * len(spatial)] = 1
    theirs = pymks_two_point(a, b, mask, periodic_boundary=periodic, cutoff=cutoff)
    ours = two_point_stats(a, b, periodic_boundary=periodic, cutoff=cutoff, mask=mask)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64 and ours.shape == theirs.shape
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    # the autocorrelation of one array, given once
    np.testing.assert_allclose(two_point_stats(a, a, periodic_boundary=periodic, cutoff=cutoff, mask=mask),
                               pymks_two_point(a, a, mask, periodic_boundary=periodic, cutoff=cutoff),
                               rtol=1e-9, atol=1e-12)


def test_two_point_stats_shared_mask_is_one_mask_for_every_sample(rng):
    """PyMKS accepts a (*spatial) mask but normalises it along one axis only; ours is the real thing."""
    a = rng.random((4, 8, 9))
    mask = np.clip(1.5 * rng.random((8, 9)), 0, 1)
    ours = two_point_stats(a, 1 - a, periodic_boundary=False, cutoff=3, mask=mask)
    np.testing.assert_allclose(ours, two_point_stats(a, 1 - a, periodic_boundary=False, cutoff=3,
                                                     mask=np.broadcast_to(mask, a.shape)), rtol=1e-12)
    np.testing.assert_allclose(ours, pymks_two_point(a, 1 - a, np.ascontiguousarray(np.broadcast_to(mask, a.shape)),
                                                     periodic_boundary=False, cutoff=3), rtol=1e-9, atol=1e-12)


def test_two_point_stats_dask_stays_lazy_with_a_per_sample_mask(rng):
    a, b = rng.random((7, 10, 10)), rng.random((7, 10, 10))
    mask = np.clip(1.5 * rng.random((7, 10, 10)), 0, 1)
    ours = two_point_stats(da.from_array(a, chunks=(3, 10, 10)), da.from_array(b, chunks=(3, 5, 10)), cutoff=3,
                           mask=da.from_array(mask, chunks=(2, 10, 10)))
    assert isinstance(ours, da.Array) and ours.chunks == ((3, 3, 1), (7,), (7,))
    np.testing.assert_allclose(ours.compute(), pymks_two_point(a, b, mask, cutoff=3), rtol=1e-9, atol=1e-12)
    # numpy data and a dask mask (or the other way round): numpy out, as PyMKS does when either is numpy
    mixed = two_point_stats(a, da.from_array(b, chunks=(3, 10, 10)), cutoff=3, mask=da.from_array(mask))
    assert isinstance(mixed, np.ndarray)
    np.testing.assert_allclose(mixed, ours.compute(), rtol=1e-12)


def test_correlations_multiple_mask_applies_to_every_state(rng):
    data = pymks_hat(rng.random((3, 9, 8)), 3)
    mask = rng.random((3, 9, 8)) > 0.15
    mask[:, :3, :3] = True
    for periodic in (True, False):
        ours = correlations_multiple(data, [(0, 0), (1, 2), (2, 1)], periodic_boundary=periodic, cutoff=3, mask=mask)
        for k, (i, j) in enumerate([(0, 0), (1, 2), (2, 1)]):
            theirs = pymks_two_point(data[..., i], data[..., j], mask.astype(float), periodic_boundary=periodic,
                                     cutoff=3)
            np.testing.assert_allclose(ours[..., k], theirs, rtol=1e-9, atol=1e-12)


def _overlap_count(mask, periodic, cutoff):
    """sum_x m(x) m(x + r) for each lag of the window, by brute force over shifts (2D)."""
    n, h, w = mask.shape
    out = np.zeros((n, 2 * cutoff + 1, 2 * cutoff + 1))
    for p, dy in enumerate(range(-cutoff, cutoff + 1)):
        for q, dx in enumerate(range(-cutoff, cutoff + 1)):
            if periodic:
                shifted = np.roll(mask, (-dy, -dx), axis=(1, 2))
            else:
                shifted = np.zeros_like(mask)
                shifted[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                    mask[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
            out[:, p, q] = (mask * shifted).sum(axis=(1, 2))
    return out


@pytest.mark.parametrize("periodic", [True, False])
def test_lags_without_mask_overlap_are_nan_with_a_warning(rng, periodic):
    a = rng.random((3, 8, 8))
    mask = np.zeros((3, 8, 8))
    mask[0] = 1                     # full overlap
    mask[1, 1:3, 2:4] = 1           # a 2x2 patch: no overlap beyond one pixel of shift
    # mask[2] stays all zero: every lag undefined
    with pytest.warns(MaskOverlapWarning, match=r"in 2 of 3 samples"):
        ours = two_point_stats(a, a, periodic_boundary=periodic, cutoff=3, mask=mask)
    undefined = _overlap_count(mask, periodic, 3) == 0
    assert undefined[1].sum() == 49 - 9 and undefined[2].all() and not undefined[0].any()
    np.testing.assert_array_equal(np.isnan(ours), undefined)
    # PyMKS divides 0 by 0 at the all-zero mask: NaN there as well; the defined lags agree
    with np.errstate(all="ignore"):
        theirs = pymks_two_point(a, a, mask, periodic_boundary=periodic, cutoff=3)
    assert np.isnan(theirs[2]).all()
    np.testing.assert_allclose(ours[~undefined], theirs[~undefined], rtol=1e-9, atol=1e-12)
    # the same through the dask path: the warning comes when the block is computed
    lazy = two_point_stats(da.from_array(a, chunks=(2, 8, 8)), da.from_array(a, chunks=(2, 8, 8)),
                           periodic_boundary=periodic, cutoff=3, mask=da.from_array(mask, chunks=(2, 8, 8)))
    with pytest.warns(MaskOverlapWarning):
        np.testing.assert_array_equal(np.isnan(lazy.compute(scheduler="synchronous")), undefined)


def test_a_full_overlap_mask_gives_no_warning(rng):
    a = rng.random((2, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = two_point_stats(a, a, cutoff=3, mask=np.ones((8, 8)))
    np.testing.assert_allclose(out, two_point_stats(a, a, cutoff=3), rtol=1e-12)


@pytest.mark.parametrize("mask,exc,match", [
    (np.full((2, 6, 6), 1.5), MaskRangeError, r"mask values must lie in \[0, 1\]"),
    (-np.ones((6, 6)), MaskRangeError, r"mask values must lie in \[0, 1\]"),
    (np.full((6, 6), np.nan), ValueError, "mask contains NaN"),
    (np.ones((3, 6, 6)), ValueError, r"mask must have shape \(6, 6\)"),
    (np.ones((6, 5)), ValueError, r"mask must have shape \(6, 6\)"),
    (np.ones((6, 6), dtype=complex), TypeError, "mask must hold real numbers"),
    (np.full((6, 6), "a"), TypeError, "mask must hold"),
])
def test_bad_masks(mask, exc, match):
    a = np.random.rand(2, 6, 6)
    with pytest.raises(exc, match=match):
        two_point_stats(a, a, mask=mask)
    with pytest.raises(exc, match=match):
        correlations_multiple(a[..., None], mask=mask)


def test_mask_range_error_is_the_runtime_error_pymks_raised():
    a = da.from_array(np.ones((1, 4, 4)))
    with pytest.raises(RuntimeError):  # PyMKS users catch RuntimeError
        two_point_stats(a, a, mask=da.from_array(np.full((1, 4, 4), 2.0)))
    assert issubclass(MaskRangeError, ValueError)


@pytest.mark.parametrize("arr1,arr2,exc,match", [
    (np.ones((2, 5)), np.ones((2, 6)), ValueError, "same shape"),
    (np.ones(5), np.ones(5), ValueError, "arr1 must have shape"),
    (np.ones((1, 2, 3, 4, 5)), np.ones((1, 2, 3, 4, 5)), ValueError, "1-3 spatial dims"),
    (np.ones((2, 5), dtype=complex), np.ones((2, 5)), TypeError, "arr1 must hold real numbers"),
])
def test_two_point_stats_bad_fields(arr1, arr2, exc, match):
    with pytest.raises(exc, match=match):
        two_point_stats(arr1, arr2)
