"""pymks_vae.TwoPointCorrelation: PyMKS's numbers, numpy/dask/xarray, pipelines, sklearn rules."""
import pickle
import warnings

import numpy as np
import pytest
import xarray as xr
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_checks import run_check, tabular_failures

from optional import require
from pymks_vae.transformers import TwoPointCorrelation

dask = require("dask")
da = require("dask.array")
pymks = require("pymks")  # installed by `make setup`; the comparison needs the real thing



def _pymks_stats(x, correlations, periodic, cutoff):
    return np.asarray(pymks.TwoPointCorrelation(correlations=correlations, periodic_boundary=periodic,
                                                cutoff=cutoff).fit_transform(x))


def _flatten():
    return pymks.GenericTransformer(lambda x: x.reshape(len(x), -1))


# ----------------------------------------------------------------------------- same numbers as PyMKS
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("cutoff", [None, 2, 100])
@pytest.mark.parametrize("correlations", [None, [(1, 2), (0, 0), (2, 2)]])
@pytest.mark.parametrize("shape", [(3, 11, 12, 3), (2, 7, 8, 9, 3)], ids=["2d", "3d"])
def test_matches_pymks_numpy(rng, periodic, cutoff, correlations, shape):
    x = rng.random(shape)
    ours = TwoPointCorrelation(correlations, periodic, cutoff).fit_transform(x)
    theirs = _pymks_stats(x, correlations, periodic, cutoff)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_matches_pymks_on_primitive_one_hot_dask(rng):
    micro = (rng.random((6, 15, 15)) > 0.6).astype(float)
    one_hot = pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1).fit(micro).transform(micro)
    one_hot = one_hot.rechunk((2, 15, 15, 2))
    ours = TwoPointCorrelation(correlations=[(1, 1), (0, 1)], cutoff=4).fit(one_hot).transform(one_hot)
    assert isinstance(ours, da.Array)
    assert ours.chunks == ((2, 2, 2), (9,), (9,), (2,))
    np.testing.assert_allclose(ours.compute(), _pymks_stats(one_hot, [(1, 1), (0, 1)], True, 4), rtol=1e-10, atol=1e-12)


def test_default_pairs_and_cutoff_are_pymks_rules(rng):
    x = rng.random((2, 9, 14, 3))
    tpc = TwoPointCorrelation().fit(x)
    assert tpc.correlations_ == [(0, 0), (0, 1), (0, 2)]
    assert tpc.cutoff_ == 4 and tpc.n_state_ == 3 and tpc.spatial_shape_ == (9, 14)
    assert TwoPointCorrelation(cutoff=50).fit(x).cutoff_ == 4
    assert TwoPointCorrelation(cutoff=1).fit(x).transform(x).shape == (2, 3, 3, 3)


# ----------------------------------------------------------------------------- dask: lazy, chunked by samples
def _watched(x, chunks):
    """A dask array whose blocks count how often they are computed."""
    counter = {"n": 0}

    def load(block):
        counter["n"] += 1
        return block

    src = da.from_array(x, chunks=chunks)
    return src.map_blocks(load, dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype)), counter


def test_dask_stays_lazy_until_computed(rng):
    x = rng.random((8, 12, 12, 2))
    watched, counter = _watched(x, (3, 12, 12, 1))  # states split: the transformer must merge them

    def refuse(*args, **kwargs):
        raise AssertionError("something was computed before it was asked for")

    with dask.config.set(scheduler=refuse):
        tpc = TwoPointCorrelation(cutoff=3).fit(watched)
        out = tpc.transform(watched)
    assert counter["n"] == 0
    assert isinstance(out, da.Array) and out.chunks[0] == (3, 3, 2)
    assert out.shape == (8, 7, 7, 2)
    np.testing.assert_allclose(out.compute(), _pymks_stats(x, None, True, 3), rtol=1e-10, atol=1e-12)
    assert counter["n"] > 0


# ----------------------------------------------------------------------------- xarray
@pytest.mark.parametrize("backed", ["numpy", "dask"])
def test_xarray_dims_and_coords(rng, backed):
    x = rng.random((4, 10, 11, 2))
    data = x if backed == "numpy" else da.from_array(x, chunks=(2, 10, 11, 2))
    arr = xr.DataArray(data, dims=("specimen", "row", "col", "phase"),
                       coords={"specimen": [11, 12, 13, 14], "batch": ("specimen", list("abab")),
                               "row": np.arange(10) * 0.5})
    out = TwoPointCorrelation(correlations=[(0, 1), (1, 1)], cutoff=3, sample_dim="specimen",
                              state_dim="phase").fit(arr).transform(arr)
    assert isinstance(out, xr.DataArray)
    assert out.dims == ("specimen", "r_row", "r_col", "correlation")
    assert out["specimen"].values.tolist() == [11, 12, 13, 14]
    assert out["batch"].values.tolist() == list("abab")
    assert out["r_row"].values.tolist() == list(range(-3, 4)) == out["r_col"].values.tolist()
    assert out["correlation"].values.tolist() == ["0-1", "1-1"]
    assert isinstance(out.data, da.Array) == (backed == "dask")
    np.testing.assert_allclose(out.values, _pymks_stats(x, [(0, 1), (1, 1)], True, 3), rtol=1e-10, atol=1e-12)
    # the zero-lag autocorrelation of phase 1 is its volume fraction
    np.testing.assert_allclose(out.sel(r_row=0, r_col=0, correlation="1-1").values, (x[..., 1] ** 2).mean(axis=(1, 2)))


# ----------------------------------------------------------------------------- pipelines
def test_pipeline_ending_in_it_can_transform(rng):
    """pymks's own TwoPointCorrelation raises NotFittedError here on scikit-learn >= 1.8."""
    micro = (rng.random((5, 13, 13)) > 0.5).astype(float)
    pipe = Pipeline([("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1)),
                     ("stats", TwoPointCorrelation(cutoff=3))]).fit(micro)
    out = pipe.transform(micro)
    np.testing.assert_allclose(np.asarray(out), pipe.fit_transform(micro).compute(), rtol=1e-12)
    assert out.shape == (5, 7, 7, 2)


def test_mixed_pymks_pipeline_classifies(rng):
    from pymks_vae.microstructures import generate_classes

    micro, y = generate_classes(6, (16, 16), classes=(
        {"sigma": (0.7, 3.0), "volume_fraction": 0.5}, {"sigma": (3.0, 0.7), "volume_fraction": 0.5}), seed=1)
    pipe = Pipeline([
        ("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1)),
        ("stats", TwoPointCorrelation(correlations=[(1, 1)], cutoff=4)),
        ("flatten", _flatten()),
        ("pca", PCA(n_components=3)),
        ("clf", LogisticRegression()),
    ])
    pipe.fit(micro, y)
    assert pipe.score(micro, y) == 1.0  # vertical vs horizontal grains: trivially separable statistics
    assert pipe.predict(micro[:3]).shape == (3,)
    # same features as the all-pymks pipeline (whose fitted slices cannot .transform: fit_transform it)
    ref = Pipeline([("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1)),
                    ("stats", pymks.TwoPointCorrelation(correlations=[(1, 1)], cutoff=4))])
    np.testing.assert_allclose(np.asarray(pipe[:2].transform(micro)), np.asarray(ref.fit_transform(micro)), rtol=1e-10)


def test_fit_accepts_y_keyword(rng):
    x = rng.random((3, 9, 9, 2))
    tpc = TwoPointCorrelation()
    assert tpc.fit(x, y=np.arange(3)) is tpc
    assert tpc.fit_transform(x, y=np.arange(3)).shape == (3, 9, 9, 2)


# ----------------------------------------------------------------------------- feature names, copies
def test_feature_names_follow_flattened_order(rng):
    x = rng.random((2, 9, 9, 2))
    tpc = TwoPointCorrelation(correlations=[(0, 0), (0, 1)], cutoff=2).fit(x)
    out = tpc.transform(x)
    names = list(tpc.get_feature_names_out())
    assert len(names) == len(set(names)) == out[0].size
    k = names.index("corr_0-1_r_1_-2")
    np.testing.assert_array_equal(out.reshape(2, -1)[:, k], out[:, 2 + 1, 2 - 2, 1])


def test_clone_and_pickle(rng):
    x = rng.random((3, 9, 9, 2))
    tpc = TwoPointCorrelation(correlations=[(1, 1)], periodic_boundary=False, cutoff=2).fit(x)
    fresh = clone(tpc)
    assert fresh.get_params() == tpc.get_params() and not hasattr(fresh, "cutoff_")
    back = pickle.loads(pickle.dumps(tpc))
    np.testing.assert_array_equal(back.transform(x), tpc.transform(x))


# ----------------------------------------------------------------------------- stateless, as PyMKS's
def test_transform_without_fit_is_pymks_transform(rng):
    """PyMKS code calls transform without fit: the pairs and window follow each input."""
    for shape in [(2, 9, 9, 2), (3, 15, 12, 3)]:
        x = rng.random(shape)
        tpc = TwoPointCorrelation(periodic_boundary=False)
        ours = tpc.transform(x)
        assert not any(k.endswith("_") for k in vars(tpc))  # transform leaves no state behind
        theirs = pymks.TwoPointCorrelation(periodic_boundary=False).transform(x)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-10, atol=1e-12)


def test_fit_none_as_pymks_code_calls_it(rng):
    x, big = rng.random((2, 9, 9, 2)), rng.random((2, 15, 15, 2))
    tpc = TwoPointCorrelation()
    assert tpc.fit() is tpc and tpc.fit(None) is tpc and tpc.fit(None, None) is tpc
    assert tpc.transform(x).shape == (2, 9, 9, 2) and tpc.transform(big).shape == (2, 15, 15, 2)
    # fit(X) pins the window; fit(None) afterwards makes it stateless again
    tpc.fit(x)
    assert tpc.cutoff_ == 4 and tpc.transform(big).shape == (2, 9, 9, 2)
    tpc.fit(None)
    assert not hasattr(tpc, "cutoff_") and tpc.transform(big).shape == (2, 15, 15, 2)
    with pytest.raises(NotFittedError, match="fit\\(X\\) on data"):
        tpc.get_feature_names_out()


def test_stateless_in_a_pipeline_and_sklearn_tags(rng):
    from sklearn.utils import get_tags
    from sklearn.utils.validation import check_is_fitted

    tpc = TwoPointCorrelation(cutoff=2)
    assert get_tags(tpc).requires_fit is False
    check_is_fitted(tpc)  # no NotFittedError: a stateless transformer is always usable
    micro = (rng.random((4, 9, 9)) > 0.5).astype(float)
    pipe = Pipeline([("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1)), ("stats", tpc)])
    np.testing.assert_allclose(np.asarray(pipe.transform(micro)),
                               np.asarray(pymks.TwoPointCorrelation(cutoff=2).transform(
                                   pymks.PrimitiveTransformer(n_state=2, min_=0, max_=1).transform(micro))),
                               rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("correlations", [[(0.7, 1.9)], [("0", "1")], [(True, False)], "01", True], ids=repr)
def test_non_integer_correlations_are_refused(rng, correlations):
    x = rng.random((2, 9, 9, 2))
    with pytest.raises(TypeError, match="correlations"):
        TwoPointCorrelation(correlations=correlations).fit(x)
    with pytest.raises(TypeError, match="correlations"):
        TwoPointCorrelation(correlations=correlations).transform(x)


@pytest.mark.parametrize("shape", [(5,), (4, 9), (1, 2, 3, 4, 5, 6)])
def test_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match="PyMKS's layout"):
        TwoPointCorrelation().fit(np.zeros(shape))


def test_transform_checks_against_fit(rng):
    tpc = TwoPointCorrelation(cutoff=4).fit(rng.random((2, 11, 11, 2)))
    with pytest.raises(ValueError, match="n_state=2"):
        tpc.transform(rng.random((2, 11, 11, 3)))
    with pytest.raises(ValueError, match="spatial dims"):
        tpc.transform(rng.random((2, 11, 11, 11, 2)))
    with pytest.raises(ValueError, match="too small for the fitted cutoff_=4"):
        tpc.transform(rng.random((2, 7, 7, 2)))
    assert tpc.transform(rng.random((1, 21, 21, 2))).shape == (1, 9, 9, 2)  # larger fields: same features


def test_nan_and_bad_parameters_raise(rng):
    x = rng.random((2, 9, 9, 2))
    x[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TwoPointCorrelation().fit(x)
    good = rng.random((2, 9, 9, 2))
    with pytest.raises(ValueError, match="NaN"):
        TwoPointCorrelation().fit(good).transform(x)
    with pytest.raises(ValueError, match="names state 2"):
        TwoPointCorrelation(correlations=[(0, 2)]).fit(good)
    with pytest.raises(ValueError, match="cutoff"):
        TwoPointCorrelation(cutoff=-1).fit(good)
    with pytest.raises(TypeError, match="periodic_boundary"):
        TwoPointCorrelation(periodic_boundary="yes").fit(good)
    with pytest.raises(TypeError, match="numbers"):
        TwoPointCorrelation().fit(np.full((2, 9, 9, 2), "a"))




def expected_tabular_failures(estimator):
    return tabular_failures(estimator, "microstructures (n_samples, *spatial, n_state)")


@parametrize_with_checks([TwoPointCorrelation(cutoff=1)], expected_failed_checks=expected_tabular_failures)
def test_sklearn_estimator_checks(estimator, check):
    run_check(estimator, check)


# ----------------------------------------------------------------------------- xarray: dims by name
def _canonical(rng, shape=(3, 10, 16, 2)):
    return xr.DataArray(rng.random(shape), dims=("sample", "x", "y", "state"),
                        coords={"sample": [7, 8, 9][: shape[0]], "y": np.arange(shape[2])})


@pytest.mark.parametrize("order", [("sample", "state", "x", "y"), ("x", "y", "sample", "state"),
                                   ("state", "x", "sample", "y")])
def test_xarray_is_aligned_by_dim_names(rng, order):
    canonical = _canonical(rng)
    expected = TwoPointCorrelation(cutoff=3).transform(canonical)
    assert expected.dims == ("sample", "r_x", "r_y", "correlation") and expected.shape == (3, 7, 7, 2)
    permuted = canonical.transpose(*order)
    for tpc in (TwoPointCorrelation(cutoff=3), TwoPointCorrelation(cutoff=3).fit(permuted)):
        out = tpc.transform(permuted)
        assert out.dims == expected.dims and out["sample"].values.tolist() == [7, 8, 9]
        np.testing.assert_allclose(out.values, expected.values, rtol=1e-12)
    np.testing.assert_allclose(expected.values, _pymks_stats(canonical.values, None, True, 3), rtol=1e-10, atol=1e-12)


def test_xarray_fit_and_transform_agree_on_spatial_order(rng):
    """Fitted on (x, y), a (y, x) DataArray is read as (x, y): not transposed statistics."""
    canonical = _canonical(rng, (3, 12, 12, 2))  # square, so a misreading would not change any shape
    tpc = TwoPointCorrelation(correlations=[(0, 1)], cutoff=4).fit(canonical)
    assert tpc.spatial_dims_ == ("x", "y")
    swapped = canonical.transpose("sample", "y", "x", "state")
    out = tpc.transform(swapped)
    assert out.dims == ("sample", "r_x", "r_y", "correlation")
    np.testing.assert_allclose(out.values, tpc.transform(canonical).values, rtol=1e-12)
    assert not np.allclose(out.values, tpc.transform(swapped.values))  # read by position: the other statistics
    with pytest.raises(ValueError, match=r"spatial dims \('row', 'col'\).*fitted on \('x', 'y'\)"):
        tpc.transform(canonical.rename(x="row", y="col"))


def test_xarray_that_cannot_be_aligned_is_refused(rng):
    canonical = _canonical(rng)
    with pytest.raises(ValueError, match=r"none of them named 'sample'.*rename"):
        TwoPointCorrelation().fit(canonical.rename(sample="specimen"))
    with pytest.raises(ValueError, match=r"none of them named 'state'"):
        TwoPointCorrelation().transform(canonical.rename(state="phase"))
    with pytest.raises(ValueError, match=r"sample_dim and state_dim must differ"):
        TwoPointCorrelation(sample_dim="x", state_dim="x").transform(canonical)
    # configured names align the same data
    renamed = canonical.rename(sample="specimen", state="phase").transpose("phase", "y", "specimen", "x")
    out = TwoPointCorrelation(sample_dim="specimen", state_dim="phase", cutoff=2).transform(renamed)
    assert out.dims == ("specimen", "r_y", "r_x", "correlation")
    np.testing.assert_allclose(out.values, TwoPointCorrelation(cutoff=2).transform(
        canonical.transpose("sample", "y", "x", "state")).values, rtol=1e-12)


def test_xarray_with_default_dim_names_is_read_by_position(rng):
    x = rng.random((2, 9, 9, 2))
    out = TwoPointCorrelation(cutoff=2).transform(xr.DataArray(x))
    assert out.dims == ("dim_0", "r_dim_1", "r_dim_2", "correlation")
    np.testing.assert_allclose(out.values, TwoPointCorrelation(cutoff=2).transform(x), rtol=1e-12)


# ----------------------------------------------------------------------------- mask
def test_mask_matches_pymks_two_point_stats(rng):
    x = rng.random((3, 10, 11, 2))
    mask = np.clip(1.5 * rng.random((3, 10, 11)), 0, 1)
    mask[:, :5, :5] = 1
    pairs = [(0, 0), (0, 1), (1, 1)]
    for periodic in (True, False):
        tpc = TwoPointCorrelation(correlations=pairs, periodic_boundary=periodic, cutoff=4, mask=mask)
        ours = tpc.transform(x)
        for k, (i, j) in enumerate(pairs):
            theirs = pymks.two_point_stats(da.from_array(x[..., i]), da.from_array(x[..., j]),
                                           periodic_boundary=periodic, cutoff=4, mask=da.from_array(mask))
            np.testing.assert_allclose(ours[..., k], np.asarray(theirs), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(tpc.fit(x).transform(x), ours, rtol=1e-12)


def test_mask_shapes_and_alignment(rng):
    canonical = _canonical(rng, (3, 10, 12, 2))
    shared = xr.DataArray(np.clip(1.4 * rng.random((12, 10)), 0, 1), dims=("y", "x"))
    out = TwoPointCorrelation(cutoff=3, mask=shared).transform(canonical.transpose("y", "state", "sample", "x"))
    assert out.dims == ("sample", "r_y", "r_x", "correlation")  # spatial dims in X's own order
    expected = TwoPointCorrelation(cutoff=3, mask=shared.values.T).transform(canonical.values)
    np.testing.assert_allclose(out.transpose("sample", "r_x", "r_y", "correlation").values, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="needs the spatial dims of X"):
        TwoPointCorrelation(mask=shared.rename(y="z")).transform(canonical)
    per_sample = TwoPointCorrelation(cutoff=3, mask=np.ones((3, 10, 12))).fit(canonical.values)
    with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 10, 12\)"):
        per_sample.transform(canonical.values[:2])
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        TwoPointCorrelation(mask=np.full((10, 12), 2.0)).fit(canonical.values)


def test_all_zero_mask_is_nan_with_a_warning(rng):
    from pymks_vae.correlations import MaskOverlapWarning

    x = rng.random((2, 9, 9, 2))
    with pytest.warns(MaskOverlapWarning, match="no overlap"):
        out = TwoPointCorrelation(cutoff=2, mask=np.zeros((9, 9))).transform(x)
    assert np.isnan(out).all()


# ----------------------------------------------------------------------------- the shared adapter
def test_adapter_modes_for_grey_fields_and_latents(rng):
    """The modes VAETransformer needs: grey fields have no state dim, latents are (sample, feature)."""
    from pymks_vae.transformers import _as_pymks_array, _spatial_dims

    grey = xr.DataArray(rng.random((9, 8, 3)), dims=("x", "y", "sample"), coords={"sample": [4, 5, 6]})
    array, aligned = _as_pymks_array(grey, state="optional")
    assert aligned.dims == ("sample", "x", "y") and aligned["sample"].values.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(array, grey.values.transpose(2, 0, 1))
    assert _spatial_dims(aligned) == ("x", "y")
    # the order fixed at fit wins over the input's own
    array, aligned = _as_pymks_array(grey.transpose("y", "sample", "x"), state="optional", spatial_dims=("x", "y"))
    np.testing.assert_array_equal(array, grey.values.transpose(2, 0, 1))
    one_hot = xr.DataArray(rng.random((2, 3, 9, 8)), dims=("state", "sample", "x", "y"))
    assert _as_pymks_array(one_hot, state="optional")[1].dims == ("sample", "x", "y", "state")
    latents = xr.DataArray(rng.random((4, 3)), dims=("latent", "sample"))
    array, aligned = _as_pymks_array(latents, "Z", state="none")
    assert aligned.dims == ("sample", "latent") and array.shape == (3, 4)
    with pytest.raises(ValueError, match=r"Z is an xarray DataArray .* none of them named 'sample'"):
        _as_pymks_array(latents.rename(sample="specimen"), "Z", state="none")
    with pytest.raises(ValueError, match="none of them named 'state'"):
        _as_pymks_array(grey, state="required")
    with pytest.raises(ValueError, match="fitted on"):
        _as_pymks_array(grey, state="optional", spatial_dims=("x", "z"))
    with pytest.raises(ValueError, match="state must be one of"):
        _as_pymks_array(grey, state="maybe")
    # numpy and dask pass through untouched
    plain = rng.random((3, 9, 8))
    assert _as_pymks_array(plain, state="optional")[0] is plain and _as_pymks_array(plain)[1] is None
    assert _spatial_dims(None) is None
