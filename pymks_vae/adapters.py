"""Input adapters shared by the transformers: numpy, dask and xarray into PyMKS's layout.

Both :class:`~pymks_vae.two_point_transformer.TwoPointCorrelation` and
:class:`~pymks_vae.vae_transformer.VAETransformer` read their inputs through these functions, and
nothing here imports the rest of the package: data goes one way, from these adapters to the
functional core (:mod:`pymks_vae.correlations`, :mod:`pymks_vae.ops`, :mod:`pymks_vae.losses`,
:mod:`pymks_vae.training`) and on to the transformers.

PyMKS's layout is ``(n_samples, *spatial, n_state)``. :func:`_as_array` unwraps a DataArray and
checks that the input is a real numeric numpy or dask array (dask stays lazy; other array-likes
become numpy). :func:`_as_pymks_array` reads xarray dims by name: the dim ``"sample"``
(:data:`SAMPLE_DIM`) holds the samples, the dim ``"state"`` (:data:`STATE_DIM`) the local states,
every other dim is spatial, in any order.

Example:
    >>> import numpy as np, xarray as xr
    >>> from pymks_vae.adapters import _as_pymks_array, _spatial_dims
    >>> arr = xr.DataArray(np.zeros((5, 4, 3, 2)), dims=("y", "x", "sample", "state"))
    >>> array, aligned = _as_pymks_array(arr)
    >>> array.shape, _spatial_dims(aligned)
    ((3, 5, 4, 2), ('y', 'x'))
"""
import re

import numpy as np
import torch


def _is_dask(x):
    return type(x).__module__.startswith("dask") and hasattr(x, "chunks") and hasattr(x, "compute")


def _is_xarray(x):
    return type(x).__module__.startswith("xarray") and hasattr(x, "dims") and hasattr(x, "coords")


def _as_array(X, name="X"):
    """Unwrap an xarray DataArray and check that ``X`` is a numeric numpy or dask array.

    Returns ``(array, dataarray_or_None)``; lists and other array-likes become numpy.
    """
    original = X if _is_xarray(X) else None
    if original is not None:
        X = original.data
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name}: sparse input is not supported; microstructures are dense fields")
    if not (isinstance(X, np.ndarray) or _is_dask(X)):
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        try:
            X = np.asarray(X)
        except Exception as err:  # ragged lists and the like
            raise TypeError(f"{name} must be a numpy, dask or xarray array, got {type(X).__name__}: {err}") from None
    if np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"Complex data not supported: {name} has dtype {X.dtype}; give real values")
    if X.dtype == object and isinstance(X, np.ndarray):
        # Object arrays of numbers (as pandas sometimes hands over) are read as float64.
        try:
            X = X.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must hold numbers, got an object array that does not convert to float") from None
    if not (np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.bool_)):
        raise TypeError(f"{name} must hold numbers, got dtype {X.dtype}")
    return X, original


def _check_finite_numpy(X, name="X"):
    # Dask inputs are checked block by block when they are computed (by the operator or the
    # training stream), so validation never forces a computation.
    if isinstance(X, np.ndarray) and np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinity; the transformers need finite values")


def _sample_coords(original):
    """The coordinates of a DataArray that live on its first (sample) dim only."""
    dim = original.dims[0]
    return dim, {k: v for k, v in original.coords.items() if v.dims == (dim,)}


# The xarray convention: dims are found by name, never by position.
SAMPLE_DIM = "sample"
STATE_DIM = "state"
_STATE_MODES = ("required", "optional", "none")


def _unnamed(dataarray):
    """True when every dim has xarray's default name (dim_0, dim_1, ...): names that say nothing."""
    return all(re.fullmatch(r"dim_\d+", str(d)) for d in dataarray.dims)


def _as_pymks_array(X, name="X", *, sample_dim=SAMPLE_DIM, state_dim=STATE_DIM, state="required",
                    spatial_dims=None):
    """:func:`_as_array`, with an xarray DataArray aligned by dim names into PyMKS's layout.

    The convention: the dim named ``sample_dim`` holds the samples, the dim named ``state_dim`` the
    local states (last in PyMKS's layout), every other dim is spatial, in ``X``'s own order or in
    ``spatial_dims`` (the order seen at fit). A DataArray whose dims all have xarray's default
    names (``dim_0``, ...) carries no names to align by and is read by position, as numpy is.

    Args:
        X: numpy, dask or xarray input (other array-likes become numpy).
        name: the argument's name, for error messages.
        sample_dim: name of the sample dim.
        state_dim: name of the state dim.
        state: "required" (the state dim must be there), "optional" (grey fields have none) or
            "none" (no state dim: every dim but the sample dim is kept in order, e.g. latents).
        spatial_dims: None, or the spatial dim names seen at fit: ``X`` must have exactly these
            and is transposed to their order.

    Returns:
        ``(array, aligned)``: the numpy/dask array in ``(sample, *spatial[, state])`` order and
        the DataArray transposed to that order (None for non-xarray input).

    Raises:
        ValueError: a named dim is missing, or the spatial dims differ from ``spatial_dims``.

    Example:
        >>> import numpy as np, xarray as xr
        >>> from pymks_vae.adapters import _as_pymks_array
        >>> arr = xr.DataArray(np.zeros((9, 8, 3, 2)), dims=("x", "y", "sample", "state"))
        >>> _as_pymks_array(arr)[1].dims
        ('sample', 'x', 'y', 'state')
    """
    if state not in _STATE_MODES:
        raise ValueError(f"state must be one of {_STATE_MODES}, got {state!r}")
    if sample_dim == state_dim:
        raise ValueError(f"sample_dim and state_dim must differ, both are {sample_dim!r}")
    if not _is_xarray(X) or _unnamed(X):
        return _as_array(X, name)
    dims = tuple(X.dims)
    if sample_dim not in dims:
        raise ValueError(
            f"{name} is an xarray DataArray with dims {dims}, none of them named {sample_dim!r}. DataArray dims "
            f"are read by name, not position: the samples are the dim {sample_dim!r}, the local states the dim "
            f"{state_dim!r}, every other dim is spatial. Rename the sample dim (e.g. "
            f"{name}.rename({{{dims[0]!r}: {sample_dim!r}}})) or give its name to the transformer (sample_dim=...)"
        )
    has_state = state != "none" and state_dim in dims
    if state == "required" and not has_state:
        raise ValueError(
            f"{name} is an xarray DataArray with dims {dims}, none of them named {state_dim!r}, the dim of the local "
            f"states (PyMKS's n_state axis, e.g. from pymks.PrimitiveTransformer). Rename it (e.g. "
            f"{name}.rename({{{dims[-1]!r}: {state_dim!r}}})) or give its name to the transformer (state_dim=...)"
        )
    spatial = [d for d in dims if d != sample_dim and not (has_state and d == state_dim)]
    if spatial_dims is not None:
        if sorted(map(str, spatial)) != sorted(map(str, spatial_dims)) or len(spatial) != len(spatial_dims):
            raise ValueError(f"{name} has spatial dims {tuple(spatial)}, but the transformer was fitted on "
                             f"{tuple(spatial_dims)}; spatial dims are matched by name")
        spatial = list(spatial_dims)
    aligned = X.transpose(sample_dim, *spatial, *((state_dim,) if has_state else ()))
    array, _ = _as_array(aligned, name)
    return array, aligned


def _spatial_dims(aligned, state_dim=STATE_DIM):
    """The spatial dim names of an aligned DataArray (None for other input or unnamed dims)."""
    if aligned is None or _unnamed(aligned):
        return None
    return tuple(d for d in aligned.dims[1:] if d != state_dim)

