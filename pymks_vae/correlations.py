"""Two-point statistics in PyMKS's layout, on numpy or dask arrays.

PyMKS keeps microstructures channels-last, ``(n_samples, *spatial, n_state)``; the operators of
:mod:`pymks_vae.ops` are channels-first. This module is the one place where the two layouts meet.

Example:
    >>> import numpy as np
    >>> from pymks_vae.correlations import correlations_multiple
    >>> data = np.random.default_rng(0).random((3, 9, 9, 2))
    >>> correlations_multiple(data, [(0, 0), (0, 1)], cutoff=2).shape
    (3, 5, 5, 2)
"""
import functools
import numbers

import numpy as np
import torch

from pymks_vae import _extension, ops

__all__ = [
    "correlations_multiple",
    "resolve_correlations",
    "resolve_cutoff",
    "to_channels_first",
    "to_channels_last",
]

# Samples sent to the operator at once: bounds the FFT buffers for large numpy inputs.
_BATCH = 64


def to_channels_first(data):
    """``(n, *spatial, n_state)`` -> ``(n, n_state, *spatial)`` (numpy, dask or torch)."""
    if isinstance(data, torch.Tensor):
        return data.movedim(-1, 1)
    return np.moveaxis(data, -1, 1) if isinstance(data, np.ndarray) else data.transpose(
        (0, data.ndim - 1) + tuple(range(1, data.ndim - 1))
    )


def to_channels_last(data):
    """``(n, n_state, *spatial)`` -> ``(n, *spatial, n_state)`` (numpy, dask or torch)."""
    if isinstance(data, torch.Tensor):
        return data.movedim(1, -1)
    return np.moveaxis(data, 1, -1) if isinstance(data, np.ndarray) else data.transpose(
        (0,) + tuple(range(2, data.ndim)) + (1,)
    )


def resolve_correlations(correlations, n_state):
    """PyMKS's default pairs: ``None`` (or empty) means ``[(0, 0), (0, 1), ..., (0, n_state-1)]``.

    Args:
        correlations: None or a sequence of ``(i, j)`` pairs.
        n_state: number of local states.

    Returns:
        list of ``(int, int)`` tuples (validated against ``n_state``).
    """
    if correlations is None or len(correlations) == 0:
        return [(0, k) for k in range(n_state)]
    pairs = []
    for k, pair in enumerate(correlations):
        try:
            i, j = (int(s) for s in pair)
        except (TypeError, ValueError):
            raise TypeError(f"correlations[{k}] must be a pair (i, j) of ints, got {pair!r}") from None
        for s in (i, j):
            if not 0 <= s < n_state:
                raise ValueError(
                    f"correlations[{k}] = {tuple(pair)!r} names state {s}, but the data has "
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
    """
    largest = int((min(spatial_shape) - 1) / 2)
    if cutoff is None:
        return largest
    if isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Integral) or cutoff < 0:
        raise ValueError(f"cutoff must be None or an int >= 0, got {cutoff!r}")
    return min(int(cutoff), largest)


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


def _as_tensor_view(block):
    """A float64 tensor sharing ``block``'s memory where torch can (copying only what it cannot)."""
    block = np.asarray(block, dtype=np.float64)
    if not block.flags.writeable or any(st < 0 or st % block.itemsize for st in block.strides):
        block = np.array(block, dtype=np.float64)  # read-only or oddly strided: torch needs its own copy
    return torch.from_numpy(block)


def _stats_numpy(block, pairs, periodic, cutoff):
    """The operator on one in-memory block, float64, channels-last in and out (C-contiguous).

    The operator reads PyMKS's channels-last data in place (seen channels first), so the block is
    not copied; its output is moved to channels last by torch, which leaves the GIL to the other
    dask threads meanwhile. The arguments were validated by :func:`correlations_multiple`.
    """
    x = to_channels_first(_as_tensor_view(block))
    out = []
    for start in range(0, x.shape[0], _BATCH):
        f = ops.two_point_stats_validated(x[start : start + _BATCH], pairs, periodic, cutoff)
        out.append(to_channels_last(f).contiguous().numpy())
    return np.concatenate(out, axis=0) if len(out) > 1 else out[0]


def _stats_block(block, pairs, periodic, cutoff):
    """One dask block, with one thread per dask worker thread (see one_thread_per_task)."""
    with _extension.one_thread_per_task():
        return _stats_numpy(block, pairs, periodic, cutoff)


def correlations_multiple(data, correlations=None, periodic_boundary=True, cutoff=None):
    """PyMKS-compatible ``correlations_multiple`` computed by the pymks-vae operator.

    Same numbers as ``pymks.correlations_multiple`` (float64), same defaults and cutoff clipping,
    at a fraction of the cost.

    Args:
        data: numpy or dask array ``(n_samples, *spatial, n_state)``, 1-3 spatial dims.
        correlations: ``(i, j)`` state pairs; None means ``[(0, 0), ..., (0, n_state-1)]``.
        periodic_boundary: periodic boundaries (True) or zero padding with overlap normalisation.
        cutoff: largest lag kept on every axis; None (and larger values) mean
            ``int((min(spatial) - 1) / 2)``.

    Returns:
        ``(n_samples, *(2*cutoff+1,)*d, n_corr)`` float64: numpy for numpy input, a lazy dask array
        chunked along samples for dask input.

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
        return _stats_numpy(data, pairs, periodic, c)

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if not isinstance(data, da.Array):
        raise TypeError(f"data must be a numpy or dask array, got {type(data).__name__}")
    # Spatial and state axes must be whole in each block (the FFT needs the full field).
    if any(len(axis_chunks) > 1 for axis_chunks in data.chunks[1:]):
        data = data.rechunk((data.chunks[0],) + tuple(-1 for _ in data.shape[1:]))
    pairs = tuple(pairs)
    # The output is named from the input's name and the parameters: the same key for the same
    # statistics of the same data, without dask hashing the function on every call.
    name = "two_point_stats-" + tokenize(data.name, pairs, periodic, c)
    # One task per block of samples in a plain graph layer rather than map_blocks' Blockwise layer,
    # which dask rewrites and expands on every compute (measured here: 0.3-0.5 ms of a 6-7 ms
    # transform of 4 blocks). Dask's low-level fusion still merges each task with the one that
    # produces its block.
    block = functools.partial(_stats_block, pairs=pairs, periodic=periodic, cutoff=c)
    rest = (0,) * (data.ndim - 1)
    tasks = {(name, i) + rest: (block, (data.name, i) + rest) for i in range(data.numblocks[0])}
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=[data])
    return da.Array(graph, name, chunks=(data.chunks[0],) + tuple((w,) for w in window) + ((len(pairs),),),
                    meta=np.empty((0,) * data.ndim, dtype=np.float64))
