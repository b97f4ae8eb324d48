"""Two-point statistics in PyMKS's layout, on numpy or dask arrays.

PyMKS keeps microstructures channels-last, ``(n_samples, *spatial, n_state)``; the operators of
:mod:`pymks_vae.ops` are channels-first. This module is the one place where the two layouts meet.
Its two entry points are drop-ins for PyMKS 0.4.1's: :func:`correlations_multiple` (whole
microstructures) and :func:`two_point_stats` (one pair of fields, with an optional mask).

Example:
    >>> import numpy as np
    >>> from pymks_vae.correlations import correlations_multiple
    >>> data = np.random.default_rng(0).random((3, 9, 9, 2))
    >>> correlations_multiple(data, [(0, 0), (0, 1)], cutoff=2).shape
    (3, 5, 5, 2)
"""
import functools
import numbers
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from pymks_vae import _extension, ops, reference

__all__ = [
    "MaskOverlapWarning",
    "MaskRangeError",
    "correlations_multiple",
    "resolve_correlations",
    "resolve_cutoff",
    "to_channels_first",
    "to_channels_last",
    "two_point_stats",
]

# Samples sent to the operator at once: bounds the FFT buffers for large numpy inputs.
_BATCH = 64


class MaskOverlapWarning(RuntimeWarning):
    """Some lags have no overlap of the mask, so their statistics are undefined (returned as NaN)."""


class MaskRangeError(ValueError, RuntimeError):
    """A mask value outside [0, 1]. Also a ``RuntimeError``, the type PyMKS raises for it."""


def to_channels_first(data):
    """``(n, *spatial, n_state)`` -> ``(n, n_state, *spatial)`` (numpy, dask or torch).

    Args:
        data: PyMKS's layout, the states last.

    Returns:
        the same type, a view where the type allows one (numpy, torch) or a lazy transpose (dask).

    Example:
        >>> import numpy as np
        >>> to_channels_first(np.zeros((4, 21, 21, 3))).shape
        (4, 3, 21, 21)
    """
    if isinstance(data, torch.Tensor):
        return data.movedim(-1, 1)
    return np.moveaxis(data, -1, 1) if isinstance(data, np.ndarray) else data.transpose(
        (0, data.ndim - 1) + tuple(range(1, data.ndim - 1))
    )


def to_channels_last(data):
    """``(n, n_state, *spatial)`` -> ``(n, *spatial, n_state)`` (numpy, dask or torch).

    Args:
        data: the operators' layout, the states second.

    Returns:
        the same type, in PyMKS's layout (the inverse of :func:`to_channels_first`).

    Example:
        >>> import torch
        >>> to_channels_last(torch.zeros(4, 3, 15, 15, 15)).shape
        torch.Size([4, 15, 15, 15, 3])
    """
    if isinstance(data, torch.Tensor):
        return data.movedim(1, -1)
    return np.moveaxis(data, 1, -1) if isinstance(data, np.ndarray) else data.transpose(
        (0,) + tuple(range(2, data.ndim)) + (1,)
    )


def _is_state_index(s):
    # bool is an int subclass, but True/False as a state index is a mistake, not a state.
    return isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))


def resolve_correlations(correlations, n_state):
    """PyMKS's default pairs: ``None`` (or empty) means ``[(0, 0), (0, 1), ..., (0, n_state-1)]``.

    Only integer state indices are accepted: ``(0.7, 1.9)``, ``("0", "1")`` or ``(True, False)``
    would otherwise be truncated to some other pair without a word.

    Args:
        correlations: None or a sequence of ``(i, j)`` pairs of int state indices.
        n_state: number of local states.

    Returns:
        list of ``(int, int)`` tuples (validated against ``n_state``).

    Raises:
        TypeError: ``correlations`` is not a sequence of pairs of ints.
        ValueError: a state index is outside ``0..n_state-1``.

    Example:
        >>> from pymks_vae.correlations import resolve_correlations
        >>> resolve_correlations(None, 3), resolve_correlations([[1, 1]], 3)
        ([(0, 0), (0, 1), (0, 2)], [(1, 1)])
    """
    if correlations is None:
        return [(0, k) for k in range(n_state)]
    if isinstance(correlations, (str, bytes, dict)) or not isinstance(correlations, Iterable):
        raise TypeError(
            f"correlations must be None or a sequence of (i, j) pairs of state indices, got {correlations!r}"
        )
    correlations = list(correlations)
    if not correlations:
        return [(0, k) for k in range(n_state)]
    pairs = []
    for k, pair in enumerate(correlations):
        try:
            if isinstance(pair, (str, bytes)):
                raise TypeError
            items = tuple(pair)
        except TypeError:
            raise TypeError(f"correlations[{k}] must be a pair (i, j) of int state indices, got {pair!r}") from None
        if len(items) != 2 or not all(_is_state_index(s) for s in items):
            raise TypeError(
                f"correlations[{k}] must be a pair (i, j) of int state indices, got {pair!r} "
                f"(types {tuple(type(s).__name__ for s in items)}); floats, strings and bools are refused "
                "rather than truncated to an int"
            )
        i, j = (int(s) for s in items)
        for s in (i, j):
            if not 0 <= s < n_state:
                raise ValueError(
                    f"correlations[{k}] = {items!r} names state {s}, but the data has "
                    f"n_state={n_state} on its last axis"
                )
        pairs.append((i, j))
    return pairs


def resolve_cutoff(cutoff, spatial_shape):
    """PyMKS's cutoff rule: ``int((min(spatial) - 1) / 2)`` when None; larger values are clipped.

    Args:
        cutoff: None or a non-negative int.
        spatial_shape: the spatial shape of one sample.

    Returns:
        int, the cutoff applied on every axis.

    Example:
        >>> from pymks_vae.correlations import resolve_cutoff
        >>> resolve_cutoff(None, (9, 12)), resolve_cutoff(100, (9, 12)), resolve_cutoff(2, (9, 12))
        (4, 4, 2)
    """
    largest = int((min(spatial_shape) - 1) / 2)
    if cutoff is None:
        return largest
    if isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Integral) or cutoff < 0:
        raise ValueError(f"cutoff must be None or an int >= 0, got {cutoff!r}")
    return min(int(cutoff), largest)


def _is_dask(x):
    return type(x).__module__.startswith("dask") and hasattr(x, "chunks") and hasattr(x, "compute")


def _check_layout(data):
    if data.ndim < 3 or data.ndim > 5:
        raise ValueError(
            "data must have PyMKS's layout (n_samples, *spatial, n_state) with 1-3 spatial dims; "
            f"got shape {tuple(data.shape)}"
        )
    if data.shape[0] == 0:
        raise ValueError("data has no samples (shape[0] == 0)")
    if not (np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.bool_)):
        raise TypeError(f"data must be numeric, got dtype {data.dtype}")


def _prepare_mask(mask, data, spatial):
    """Check a PyMKS mask and bring it to ``(1 or n, *spatial)`` float64, chunked like ``data``.

    PyMKS checks the range when it is called, computing a dask mask; so does this (a mask is one
    field per sample, cheap next to the statistics), so a bad mask fails at the call, not later
    inside a dask worker.
    """
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not _is_dask(mask):
        try:
            mask = np.asarray(mask)
        except Exception as err:
            raise TypeError(f"mask must be a numpy or dask array, got {type(mask).__name__}: {err}") from None
    if mask.dtype == object:
        try:
            mask = mask.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError("mask must hold numbers, got an object array that does not convert to float") from None
    if not (np.issubdtype(mask.dtype, np.bool_) or np.issubdtype(mask.dtype, np.integer)
            or np.issubdtype(mask.dtype, np.floating)):
        raise TypeError(f"mask must hold real numbers or bools in [0, 1], got dtype {mask.dtype}")
    n = int(data.shape[0])
    shape = tuple(int(s) for s in mask.shape)
    if shape == spatial:
        mask = mask[None]
    elif not (len(shape) == len(spatial) + 1 and shape[1:] == spatial and shape[0] in (1, n)):
        raise ValueError(
            f"mask must have shape {spatial} (one mask for every sample) or {(n,) + spatial} (one per "
            f"sample), matching the data's (n_samples, *spatial); got {shape}"
        )
    if _is_dask(mask):
        import dask

        low, high = dask.compute(mask.min(), mask.max())
    else:
        low, high = mask.min(), mask.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("mask contains NaN or infinity")
    if low < 0 or high > 1:
        raise MaskRangeError(f"mask values must lie in [0, 1] (a confidence per pixel, as in PyMKS); "
                             f"got values from {low} to {high}")
    if mask.shape[0] == 1 or not _is_dask(data):
        # A shared mask goes to every block as a constant; numpy data needs a numpy mask.
        mask = mask.compute() if _is_dask(mask) else mask
        return np.ascontiguousarray(mask, dtype=np.float64)
    import dask.array as da

    if not _is_dask(mask):
        mask = da.from_array(np.asarray(mask, dtype=np.float64), chunks=(data.chunks[0],) + spatial)
    return mask.astype(np.float64).rechunk((data.chunks[0],) + tuple(-1 for _ in spatial))


def _as_tensor_view(block):
    """A float64 tensor sharing ``block``'s memory where torch can (copying only what it cannot)."""
    block = np.asarray(block, dtype=np.float64)
    if not block.flags.writeable or any(st < 0 or st % block.itemsize for st in block.strides):
        block = np.array(block, dtype=np.float64)  # read-only or oddly strided: torch needs its own copy
    return torch.from_numpy(block)


def _undefined_lags(mask, periodic, cutoff):
    """Where the mask does not overlap itself: ``(b, *window)`` bool for a ``(b, *spatial)`` mask.

    The statistics there are 0/0. The mask's own statistics times the number of pixel pairs of each
    lag give its overlap; the level below which it counts as none is the operator's own.
    """
    spatial = tuple(mask.shape[1:])
    f = ops.two_point_stats_validated(mask.unsqueeze(1), [(0, 0)], periodic, cutoff)[:, 0].numpy()
    if periodic:
        pairs = float(np.prod(spatial))
    else:
        lags = np.arange(-cutoff, cutoff + 1)
        pairs = functools.reduce(np.multiply.outer, [n - np.abs(lags) for n in spatial])
    overlap = f * pairs
    peak = overlap.reshape(len(overlap), -1).max(axis=1).reshape((-1,) + (1,) * len(spatial))
    return overlap <= reference.mask_threshold(torch.float64) * np.maximum(peak, 0.0)


def _stats_numpy(block, pairs, periodic, cutoff, mask=None):
    """The operator on one in-memory block, float64, channels-last in and out (C-contiguous).

    The operator reads PyMKS's channels-last data in place (seen channels first), so the block is
    not copied; its output is moved to channels last by torch, which leaves the GIL to the other
    dask threads meanwhile. The arguments were validated by :func:`correlations_multiple`; ``mask``
    is None or a float64 ``(1 or len(block), *spatial)`` array in [0, 1].
    """
    x = to_channels_first(_as_tensor_view(block))
    shared = mask is not None and mask.shape[0] == 1
    if shared:
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float64))
        undefined = _undefined_lags(m, periodic, cutoff)
    out, n_undefined, samples_hit = [], 0, 0
    for start in range(0, x.shape[0], _BATCH):
        xb = x[start : start + _BATCH]
        if mask is None:
            f = ops.two_point_stats_validated(xb, pairs, periodic, cutoff)
        else:
            if not shared:
                m = torch.from_numpy(np.ascontiguousarray(mask[start : start + _BATCH], dtype=np.float64))
                undefined = _undefined_lags(m, periodic, cutoff)
            f = ops.two_point_stats(xb, pairs, periodic=periodic, cutoff=cutoff, mask=m)
        f = to_channels_last(f).contiguous().numpy()
        if mask is not None and undefined.any():
            # The operator returns 0 where the mask has no overlap (a finite value that keeps a loss
            # differentiable); here, as in PyMKS, an undefined statistic is NaN.
            hit = np.broadcast_to(undefined, f.shape[:-1])
            f[hit] = np.nan
            n_undefined += int(hit.sum())
            samples_hit += int(hit.reshape(len(f), -1).any(axis=1).sum())
        out.append(f)
    if n_undefined:
        warnings.warn(
            f"mask: {n_undefined} (sample, lag) combinations in {samples_hit} of {x.shape[0]} samples have no "
            "overlap of the mask with itself (e.g. an all-zero mask), so their two-point statistics are "
            "undefined; they are NaN",
            MaskOverlapWarning, stacklevel=3,
        )
    return np.concatenate(out, axis=0) if len(out) > 1 else out[0]


def _stats_block(block, mask_block=None, *, pairs, periodic, cutoff):
    """One dask block, with one thread per dask worker thread (see one_thread_per_task)."""
    with _extension.one_thread_per_task():
        return _stats_numpy(block, pairs, periodic, cutoff, mask_block)


def correlations_multiple(data, correlations=None, periodic_boundary=True, cutoff=None, mask=None):
    """PyMKS-compatible ``correlations_multiple`` computed by the pymks-vae operator.

    Same numbers as ``pymks.correlations_multiple`` (float64), same defaults and cutoff clipping,
    at a fraction of the cost. ``mask`` is an addition (PyMKS 0.4.1 has it only in
    ``two_point_stats``), with PyMKS's semantics.

    Args:
        data: numpy or dask array ``(n_samples, *spatial, n_state)``, 1-3 spatial dims.
        correlations: ``(i, j)`` pairs of int state indices; None means ``[(0, 0), ...,
            (0, n_state-1)]``. Non-integer indices are refused, not truncated.
        periodic_boundary: periodic boundaries (True) or zero padding with overlap normalisation.
        cutoff: largest lag kept on every axis; None (and larger values) mean
            ``int((min(spatial) - 1) / 2)``.
        mask: None, or weights in [0, 1] (bool and int allowed) of shape ``spatial`` (one mask for
            every sample) or ``(n_samples, *spatial)``: every state is multiplied by it and each lag
            divided by the mask's own correlation at that lag. Lags where the mask does not overlap
            itself (an all-zero mask: every lag) are undefined: NaN, with a
            :class:`MaskOverlapWarning`.

    Returns:
        ``(n_samples, *(2*cutoff+1,)*d, n_corr)`` float64: numpy for numpy input, a lazy dask array
        chunked along samples for dask input.

    Raises:
        MaskRangeError: a mask value outside [0, 1] (a ``ValueError`` and a ``RuntimeError``).

    Example:
        >>> import dask.array as da
        >>> from pymks_vae.correlations import correlations_multiple
        >>> x = da.random.random((8, 11, 11, 2), chunks=(4, 11, 11, 2))
        >>> out = correlations_multiple(x, cutoff=3)
        >>> out.shape, out.chunks[0]
        ((8, 7, 7, 2), (4, 4))
    """
    if not hasattr(data, "ndim") or not hasattr(data, "shape"):
        data = np.asarray(data)
    _check_layout(data)
    spatial = tuple(int(s) for s in data.shape[1:-1])
    pairs = resolve_correlations(correlations, int(data.shape[-1]))
    c = resolve_cutoff(cutoff, spatial)
    periodic = bool(periodic_boundary)
    window = (2 * c + 1,) * len(spatial)

    if isinstance(data, np.ndarray):
        return _stats_numpy(data, pairs, periodic, c, _prepare_mask(mask, data, spatial))

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if not isinstance(data, da.Array):
        raise TypeError(f"data must be a numpy or dask array, got {type(data).__name__} "
                        "(for an xarray DataArray, use pymks_vae.TwoPointCorrelation, which aligns its dims by name)")
    # Spatial and state axes must be whole in each block (the FFT needs the full field).
    if any(len(axis_chunks) > 1 for axis_chunks in data.chunks[1:]):
        data = data.rechunk((data.chunks[0],) + tuple(-1 for _ in data.shape[1:]))
    mask = _prepare_mask(mask, data, spatial)
    per_sample = mask is not None and _is_dask(mask)
    pairs = tuple(pairs)
    # The output is named from the input's name and the parameters: the same key for the same
    # statistics of the same data, without dask hashing the function on every call.
    mask_token = None if mask is None else (mask.name if per_sample else tokenize(mask))
    name = "two_point_stats-" + tokenize(data.name, pairs, periodic, c, mask_token)
    # One task per block of samples in a plain graph layer rather than map_blocks' Blockwise layer,
    # which dask rewrites and expands on every compute (measured here: 0.3-0.5 ms of a 6-7 ms
    # transform of 4 blocks). Dask's low-level fusion still merges each task with the one that
    # produces its block.
    block = functools.partial(_stats_block, pairs=pairs, periodic=periodic, cutoff=c)
    rest = (0,) * (data.ndim - 1)
    if per_sample:
        tasks = {(name, i) + rest: (block, (data.name, i) + rest, (mask.name, i) + rest[1:])
                 for i in range(data.numblocks[0])}
        dependencies = [data, mask]
    else:
        if mask is not None:
            block = functools.partial(block, mask_block=mask)
        tasks = {(name, i) + rest: (block, (data.name, i) + rest) for i in range(data.numblocks[0])}
        dependencies = [data]
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=dependencies)
    return da.Array(graph, name, chunks=(data.chunks[0],) + tuple((w,) for w in window) + ((len(pairs),),),
                    meta=np.empty((0,) * data.ndim, dtype=np.float64))


def _as_field(arr, name):
    if not _is_dask(arr):
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)) or \
            np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.ndim > 4:
        raise ValueError(f"{name} must have shape (n_samples, *spatial) with 1-3 spatial dims (one state, "
                         f"PyMKS's two_point_stats layout); got shape {tuple(arr.shape)}")
    return arr


def two_point_stats(arr1, arr2, periodic_boundary=True, cutoff=None, mask=None):
    """PyMKS-compatible ``two_point_stats``: the statistics of one pair of fields, optionally masked.

    ``f(r) = sum_x m(x) arr1(x) m(x + r) arr2(x + r) / sum_x m(x) m(x + r)`` for each sample, with
    ``m = 1`` without a mask (periodic: indices modulo the shape; non-periodic: zero padding).
    Same arguments, defaults and numbers as ``pymks.two_point_stats`` 0.4.1 (float64).

    Args:
        arr1: ``(n_samples, *spatial)`` numpy or dask array (1-3 spatial dims), the first field.
        arr2: the second field, same shape (``arr2 is arr1`` computes an autocorrelation once).
        periodic_boundary: periodic boundaries (True) or zero padding with overlap normalisation.
        cutoff: largest lag kept on every axis; None (and larger values) mean
            ``int((min(spatial) - 1) / 2)``.
        mask: None, or weights in [0, 1] (bool and int allowed) of shape ``spatial`` (one mask for
            every sample) or ``(n_samples, *spatial)``: both fields are multiplied by it and each
            lag is divided by the mask's own correlation. Lags with no overlap of the mask are NaN,
            with a :class:`MaskOverlapWarning`.

    Returns:
        ``(n_samples, *(2*cutoff+1,)*d)`` float64: numpy if either field is numpy, else a lazy dask
        array chunked along samples.

    Raises:
        MaskRangeError: a mask value outside [0, 1] (a ``ValueError`` and a ``RuntimeError``).

    Example:
        >>> import numpy as np
        >>> from pymks_vae.correlations import two_point_stats
        >>> x = np.array([[[1, 0, 0], [0, 1, 1], [1, 1, 0]]])
        >>> mask = np.array([[[1, 1, 1], [1, 1, 1], [1, 0, 0]]])
        >>> f = two_point_stats(x, x, periodic_boundary=False, mask=mask)
        >>> f.shape, float(f[0, 1, 1])  # 4 of the 7 unmasked pixels are 1
        ((1, 3, 3), 0.5714285714285714)
    """
    a, b = _as_field(arr1, "arr1"), _as_field(arr2, "arr2")
    if a.shape != b.shape:
        raise ValueError(f"arr1 and arr2 must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    auto = arr1 is arr2
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        # PyMKS returns numpy as soon as either field is numpy.
        a = np.asarray(a.compute() if _is_dask(a) else a)
        b = a if auto else np.asarray(b.compute() if _is_dask(b) else b)
        data = a[..., None] if auto else np.stack([a, b], axis=-1)
    else:
        import dask.array as da

        data = a[..., None] if auto else da.stack([a, b], axis=-1)
    return correlations_multiple(data, [(0, 0)] if auto else [(0, 1)], periodic_boundary=periodic_boundary,
                                 cutoff=cutoff, mask=mask)[..., 0]
