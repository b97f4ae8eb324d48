"""correlations_multiple in PyMKS's layout against the real pymks 0.4.1, on numpy and dask."""
import warnings

import numpy as np
import pytest

from optional import require

dask = require("dask")
da = require("dask.array")

from pymks_vae.correlations import (correlations_multiple, resolve_correlations, resolve_cutoff,
                                    to_channels_first, to_channels_last)

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
