"""The two-point statistics transformer: a drop-in for ``pymks.TwoPointCorrelation``.

:class:`TwoPointCorrelation` takes PyMKS's layout, ``(n_samples, *spatial, n_state)``, as numpy,
dask (kept lazy, chunked along samples) or xarray (dims read by name through
:mod:`pymks_vae.adapters`) and computes the statistics with :func:`pymks_vae.correlations.correlations_multiple`.
It is also importable from :mod:`pymks_vae.transformers` and as ``pymks_vae.TwoPointCorrelation``.

Example:
    >>> import numpy as np
    >>> from pymks_vae.two_point_transformer import TwoPointCorrelation
    >>> x = np.random.default_rng(0).random((4, 9, 9, 2))
    >>> TwoPointCorrelation(cutoff=2).fit_transform(x).shape
    (4, 5, 5, 2)
"""
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError

from pymks_vae import correlations as _corr
from pymks_vae.adapters import (SAMPLE_DIM, STATE_DIM, _as_pymks_array, _check_finite_numpy, _is_xarray,
                                _sample_coords, _spatial_dims, _unnamed)

__all__ = ["TwoPointCorrelation"]


class TwoPointCorrelation(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Two-point statistics of PyMKS-layout microstructures, as a scikit-learn transformer.

    A drop-in replacement for ``pymks.TwoPointCorrelation``: same parameters, same float64 numbers
    (``pymks.correlations_multiple``), computed by the pymks-vae operator. Like PyMKS's, it is
    stateless: ``transform`` works without ``fit`` (and after ``fit(None)``), resolving the pairs
    and the window from the data it is given. In addition, ``fit(X)`` fixes them from ``X``, so
    that in a pipeline new data always gives the same number of features; it takes ``y=`` as a
    keyword, a ``mask``, and xarray aligned by dim names.

    Args:
        correlations: ``(i, j)`` pairs of int state indices; None (or empty) means ``[(0, 0),
            (0, 1), ..., (0, n_state-1)]`` as in PyMKS. Floats, strings and bools are refused.
        periodic_boundary: periodic boundaries (True) or zero padding with overlap normalisation.
        cutoff: largest lag kept along every spatial axis (None: as large as the field allows).
        mask: None, or weights in [0, 1] of shape ``spatial`` (one mask for every sample) or
            ``(n_samples, *spatial)`` (then only data of that many samples can be transformed); a
            DataArray mask is aligned by dim names like ``X``. PyMKS's semantics: every state is
            multiplied by it and each lag divided by the mask's own correlation; lags where the
            mask does not overlap itself are NaN, with a ``MaskOverlapWarning``.
        sample_dim: name of the sample dim of xarray input.
        state_dim: name of the state dim of xarray input; every other dim is spatial.

    Attributes (set by ``fit(X)`` only; ``fit(None)`` removes them):
        n_state_: number of local states (last axis) seen in fit.
        spatial_shape_: spatial shape seen in fit.
        spatial_dims_: spatial dim names seen in fit (xarray input), else None.
        correlations_: the resolved list of pairs.
        cutoff_: the resolved cutoff; outputs have ``2 * cutoff_ + 1`` lags per spatial axis.

    Input / output (``n`` samples, ``d`` spatial dims, ``w = 2 * cutoff + 1``):
        numpy ``(n, *spatial, n_state)`` -> numpy ``(n, *(w,)*d, n_corr)`` float64; dask -> lazy
        dask chunked along samples; xarray DataArray with dims ``sample_dim``, ``state_dim`` and
        the spatial dims, in any order -> DataArray with dims ``(sample_dim, "r_<dim>"...,
        "correlation")``, integer lag coordinates ``-cutoff..cutoff``, pair names such as
        ``"0-1"``, and the sample coordinates of the input.

    Example:
        >>> import numpy as np
        >>> from pymks_vae import TwoPointCorrelation
        >>> x = np.random.default_rng(0).random((3, 11, 11, 2))
        >>> TwoPointCorrelation(cutoff=3).transform(x).shape      # stateless, as in PyMKS
        (3, 7, 7, 2)
        >>> tpc = TwoPointCorrelation(correlations=[(0, 0), (0, 1)], cutoff=3).fit(x)
        >>> tpc.transform(x).shape, tpc.cutoff_, tpc.get_feature_names_out()[:2].tolist()
        ((3, 7, 7, 2), 3, ['corr_0-0_r_-3_-3', 'corr_0-1_r_-3_-3'])
    """

    _FITTED = ("n_state_", "spatial_shape_", "spatial_dims_", "correlations_", "cutoff_")

    def __init__(self, correlations=None, periodic_boundary=True, cutoff=None, mask=None, sample_dim=SAMPLE_DIM,
                 state_dim=STATE_DIM):
        self.correlations = correlations
        self.periodic_boundary = periodic_boundary
        self.cutoff = cutoff
        self.mask = mask
        self.sample_dim = sample_dim
        self.state_dim = state_dim

    def _check_params(self):
        if not isinstance(self.periodic_boundary, (bool, np.bool_)):
            raise TypeError(f"periodic_boundary must be a bool, got {self.periodic_boundary!r}")

    def _validate_layout(self, X):
        if X.ndim < 3 or X.ndim > 5:
            raise ValueError(
                "X must have PyMKS's layout (n_samples, *spatial, n_state) with 1-3 spatial dims, "
                f"i.e. 3-5 axes; got shape {tuple(X.shape)}. Use pymks.PrimitiveTransformer to add "
                "the state axis to a plain microstructure."
            )
        if X.shape[0] == 0 or any(int(s) == 0 for s in X.shape[1:]):
            raise ValueError(f"X has an empty axis: shape {tuple(X.shape)}")

    def _input(self, X, spatial_dims=None):
        X, aligned = _as_pymks_array(X, sample_dim=self.sample_dim, state_dim=self.state_dim, state="required",
                                     spatial_dims=spatial_dims)
        self._validate_layout(X)
        return X, aligned

    def _aligned_mask(self, aligned):
        """The mask in the layout of the aligned input: DataArray masks are matched by dim names."""
        mask = self.mask
        if not _is_xarray(mask):
            return mask
        dims = tuple(mask.dims)
        order = [self.sample_dim] if self.sample_dim in dims else []
        if aligned is not None and not _unnamed(aligned):
            spatial = list(_spatial_dims(aligned, self.state_dim))
            if sorted(map(str, set(dims) - {self.sample_dim})) != sorted(map(str, spatial)):
                raise ValueError(f"mask has dims {dims}; it needs the spatial dims of X, {tuple(spatial)}, and "
                                 f"optionally the sample dim {self.sample_dim!r}")
            order += spatial
        else:
            order += [d for d in dims if d != self.sample_dim]
        return mask.transpose(*order).data

    def fit(self, X=None, y=None):
        """Fix the pairs and the window from the shape of ``X``; nothing is computed.

        ``fit()`` or ``fit(None)``, as PyMKS code calls it, leaves the transformer stateless:
        ``transform`` then resolves the pairs and the window from each input.

        Args:
            X: None, or ``(n_samples, *spatial, n_state)`` numpy, dask or xarray array.
            y: ignored (accepted for pipelines).

        Returns:
            self
        """
        self._check_params()
        for attr in self._FITTED:
            self.__dict__.pop(attr, None)
        if X is None:
            return self
        X, aligned = self._input(X)
        _check_finite_numpy(X)
        spatial = tuple(int(s) for s in X.shape[1:-1])
        correlations = _corr.resolve_correlations(self.correlations, int(X.shape[-1]))
        cutoff = _corr.resolve_cutoff(self.cutoff, spatial)
        _corr._prepare_mask(self._aligned_mask(aligned), X, spatial)  # a bad mask fails here, not later
        self.n_state_ = int(X.shape[-1])
        self.spatial_shape_ = spatial
        self.spatial_dims_ = _spatial_dims(aligned, self.state_dim)
        self.correlations_ = correlations
        self.cutoff_ = cutoff
        return self

    def transform(self, X):
        """Two-point statistics of ``X`` (see the class docstring for the layouts).

        Args:
            X: ``(n_samples, *spatial, n_state)`` numpy, dask or xarray array; after ``fit(X)``,
                with the fitted ``n_state_``, number of spatial dims (and spatial dim names) and a
                field large enough for ``cutoff_``.

        Returns:
            the statistics, numpy / lazy dask / DataArray like the input.
        """
        self._check_params()
        fitted = hasattr(self, "cutoff_")
        X, aligned = self._input(X, getattr(self, "spatial_dims_", None))
        spatial = tuple(int(s) for s in X.shape[1:-1])
        if fitted:
            if int(X.shape[-1]) != self.n_state_:
                raise ValueError(f"X has {X.shape[-1]} states on its last axis, but the transformer was fitted "
                                 f"with n_state={self.n_state_}")
            if len(spatial) != len(self.spatial_shape_):
                raise ValueError(f"X has {len(spatial)} spatial dims, but the transformer was fitted on "
                                 f"{len(self.spatial_shape_)} (spatial shape {self.spatial_shape_})")
            if _corr.resolve_cutoff(None, spatial) < self.cutoff_:
                raise ValueError(f"X's spatial shape {spatial} is too small for the fitted cutoff_={self.cutoff_} "
                                 f"(needs min(spatial) >= {2 * self.cutoff_ + 1})")
            correlations, cutoff = self.correlations_, self.cutoff_
        else:  # stateless, as PyMKS: everything follows from this input
            correlations = _corr.resolve_correlations(self.correlations, int(X.shape[-1]))
            cutoff = _corr.resolve_cutoff(self.cutoff, spatial)
        _check_finite_numpy(X)
        out = _corr.correlations_multiple(X, correlations, periodic_boundary=bool(self.periodic_boundary),
                                          cutoff=cutoff, mask=self._aligned_mask(aligned))
        if aligned is None:
            return out
        return self._to_dataarray(out, aligned, correlations, cutoff)

    def _to_dataarray(self, out, original, correlations, cutoff):
        import xarray as xr

        sample_dim, coords = _sample_coords(original)
        lag_dims = [f"r_{d}" for d in original.dims[1:-1]]
        lags = np.arange(-cutoff, cutoff + 1)
        coords.update({d: lags for d in lag_dims})
        coords["correlation"] = [f"{i}-{j}" for i, j in correlations]
        return xr.DataArray(out, dims=(sample_dim, *lag_dims, "correlation"), coords=coords,
                            name="two_point_stats", attrs={"periodic_boundary": int(bool(self.periodic_boundary)),
                                                           "cutoff": cutoff})

    def get_feature_names_out(self, input_features=None):
        """Names of the flattened output features, in the order of ``out.reshape(n, -1)``.

        ``corr_<i>-<j>_r_<lag per axis>``, e.g. ``corr_0-1_r_-2_3``. The names need the window,
        so the transformer must have been fitted on data.

        Args:
            input_features: ignored (the inputs are fields, not named columns).

        Returns:
            numpy array of str.
        """
        if not hasattr(self, "cutoff_"):
            raise NotFittedError("TwoPointCorrelation.get_feature_names_out needs the window: call fit(X) on data "
                                 "first (a stateless transformer's window follows each input)")
        lags = np.arange(-self.cutoff_, self.cutoff_ + 1)
        grids = np.stack(np.meshgrid(*([lags] * len(self.spatial_shape_)), indexing="ij"), axis=-1)
        names = [
            f"corr_{i}-{j}_r_" + "_".join(str(int(v)) for v in lag)
            for lag in grids.reshape(-1, len(self.spatial_shape_))
            for i, j in self.correlations_
        ]
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Stateless like PyMKS's: transform needs no fit (fit(X) only pins the window).
        tags.requires_fit = False
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags
