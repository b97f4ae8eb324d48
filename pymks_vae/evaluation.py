"""Automated evaluation of lines reconstructions (the paper counted lines by hand).

Every function takes numpy arrays (torch tensors, dask arrays and xarray DataArrays are converted)
of grey images ``(n, H, W)`` or ``(n, 1, H, W)`` in the paper's convention: lines dark (near 0),
background near 1. Results are numpy arrays.

* :func:`threshold`, :func:`line_mask`: the paper's binarisation (pixel < 0.05 -> 0, else 1).
* :func:`analyse_lines`: orientation and number of lines per image, by connected components.
* :func:`volume_fraction_difference`: percent change of the black (line) area after thresholding.
* :func:`per_image_mse`, :func:`spatial_stats`, :func:`stats_mse`: errors in data space and in
  the space of periodic two-point autocorrelations of the line phase (the loss's space).
* :func:`nearest_neighbours`, :func:`average_mse_to_set`: the paper's memorisation checks.
* :func:`confusion_matrix`, :func:`summarise`: tables.

Example:
    >>> from pymks_vae.datasets import generate_lines
    >>> from pymks_vae.evaluation import analyse_lines
    >>> images, orientation, n_lines = generate_lines(range(20), size=64)
    >>> o, n = analyse_lines(images)
    >>> bool((o == orientation).all() and (n == n_lines).all())
    True
"""
import numbers

import numpy as np
import scipy.ndimage
import torch

from pymks_vae.datasets.lines import HORIZONTAL, VERTICAL, LinesConfig

__all__ = [
    "threshold",
    "line_mask",
    "analyse_lines",
    "volume_fraction_difference",
    "per_image_mse",
    "spatial_stats",
    "stats_mse",
    "nearest_neighbours",
    "average_mse_to_set",
    "confusion_matrix",
    "summarise",
]

NO_LINE = -1
_METRICS = ("image", "stats")


# ----------------------------------------------------------------------------- input handling
def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _images(x, name, dtype=None):
    """Convert to a numpy stack ``(n, H, W)``; squeeze a channel axis of 1."""
    if x is None:
        raise ValueError(f"{name} must be an array of images (n, H, W), got None")
    arr = _to_numpy(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"{name} must be (n, H, W) or (n, 1, H, W); got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (n, H, W) or (n, 1, H, W); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); need at least one non-empty image")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _stack(x, name):
    """Keep arrays with a shape (numpy, torch, dask, xarray) as they are; convert lists."""
    if x is None:
        raise ValueError(f"{name} must be an array of images (n, H, W), got None")
    return x if hasattr(x, "shape") and hasattr(x, "__getitem__") else np.asarray(x)


def _same_shape(a, b, name_a, name_b):
    sa, sb = (tuple(x) if isinstance(x, tuple) else tuple(x.shape) for x in (a, b))
    if sa != sb:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {sa} and {sb}")


def _check_level(level):
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not np.isfinite(level):
        raise ValueError(f"level must be a finite number, got {level!r}")
    return float(level)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _n_and_shape(x, name):
    """Length and image shape of a possibly lazy stack, without loading it."""
    shape = tuple(_stack(x, name).shape)
    if len(shape) == 4:
        if shape[1] != 1:
            raise ValueError(f"{name} must be (n, H, W) or (n, 1, H, W); got shape {shape}")
        shape = (shape[0],) + shape[2:]
    if len(shape) != 3:
        raise ValueError(f"{name} must be (n, H, W) or (n, 1, H, W); got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}); need at least one non-empty image")
    return shape[0], shape[1:]


def _slice(x, start, stop, name):
    """Rows start:stop of a numpy/torch/dask/xarray stack as a float64 numpy (n, H, W)."""
    return _images(_stack(x, name)[start:stop], name, dtype=np.float64)


# ----------------------------------------------------------------------------- thresholding
def threshold(images, level=0.05):
    """The paper's binarisation: pixel < ``level`` -> 0.0 (line), else 1.0 (background).

    Args:
        images: ``(n, H, W)`` or ``(n, 1, H, W)``.
        level: threshold (default 0.05).

    Returns:
        float32 ``(n, H, W)`` of zeros and ones.

    Example:
        >>> threshold(np.array([[[0.01, 0.5]]])).tolist()
        [[[0.0, 1.0]]]
    """
    return np.where(line_mask(images, level), np.float32(0.0), np.float32(1.0))


def line_mask(images, level=0.05):
    """Boolean ``(n, H, W)``: True where the thresholded value is 0 (a line pixel, value < level).

    Example:
        >>> line_mask(np.array([[[0.01, 0.5]]])).tolist()
        [[[True, False]]]
    """
    return _line_mask(images, level, "images")


def _line_mask(images, level, name):
    level = _check_level(level)
    return _images(images, name) < level


# ----------------------------------------------------------------------------- lines analysis
def default_min_area(shape, config=None):
    """Smallest component counted as a line for images of ``shape`` (H, W).

    A quarter of the smallest line (min width x min length) of the geometry scaled to
    ``min(H, W)``, at least 1 px: big enough to drop blur specks, small enough to keep a line that
    a reconstruction drew thinner or shorter.
    """
    size = int(min(shape))
    cfg = config if config is not None else LinesConfig()
    try:
        cfg = cfg.scaled(size)
        area = cfg.min_width * cfg.min_length
    except ValueError:  # images too small for the geometry: scale by hand
        factor = size / cfg.size
        area = max(1.0, cfg.min_width * factor) * max(1.0, cfg.min_length * factor)
    return max(1, int(0.25 * area))


def analyse_lines(images, level=0.05, min_area=None, return_components=False):
    """Orientation and number of lines of each image, from connected components of its line mask.

    Each image is thresholded at ``level`` (lines < level); the line pixels are grouped in
    4-connected components (:func:`scipy.ndimage.label`); components smaller than ``min_area``
    pixels (specks of a blurry reconstruction) are ignored. Each kept component is one line. A
    component is horizontal when its bounding box is wider than tall, vertical when taller than
    wide (a square one does not vote), and the image's orientation is the one holding most line
    pixels (ties go to HORIZONTAL).

    The paper's level 0.05 is strict for blurry reconstructions: a thin line whose darkest pixels
    stay above it vanishes (orientation -1, count 0). ``level=0.5`` (mid-grey) is the robust
    choice for reading a reconstruction's geometry; report which one was used.

    Limits: two parallel lines drawn closer than the dataset's spacing, or joined by blur, touch
    after thresholding and count as ONE line; a line broken by a light gap counts as two. On
    images of :func:`pymks_vae.datasets.generate_lines` (lines at least ``spacing`` px apart) the
    labels are recovered exactly.

    Args:
        images: ``(n, H, W)`` or ``(n, 1, H, W)`` grey images.
        level: threshold (default 0.05, the paper's).
        min_area: smallest component (pixels) counted as a line; default
            :func:`default_min_area` of the image size (a quarter of the smallest line's area).
        return_components: also return, per image, a list of ``(area, height, width)``.

    Returns:
        ``(orientation, n_lines)`` int64 ``(n,)``: HORIZONTAL (0) / VERTICAL (1), or -1 where no
        line was found (then n_lines is 0); plus the component list when asked.

    Example:
        >>> img = np.ones((1, 32, 32)); img[0, 10:13, 2:30] = 0.0
        >>> analyse_lines(img)
        (array([0]), array([1]))
    """
    mask = line_mask(images, level)
    if min_area is None:
        min_area = default_min_area(mask.shape[1:])
    elif isinstance(min_area, bool) or not isinstance(min_area, numbers.Real) or min_area < 0:
        raise ValueError(f"min_area must be a number >= 0 or None, got {min_area!r}")
    n = mask.shape[0]
    orientation = np.full(n, NO_LINE, dtype=np.int64)
    n_lines = np.zeros(n, dtype=np.int64)
    components = []
    for k in range(n):
        labels, count = scipy.ndimage.label(mask[k])
        found = []
        if count:
            areas = np.bincount(labels.ravel(), minlength=count + 1)
            for j, sl in enumerate(scipy.ndimage.find_objects(labels), start=1):
                if sl is None or areas[j] < min_area:
                    continue
                found.append((int(areas[j]), sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
        components.append(found)
        if found:
            n_lines[k] = len(found)
            horizontal = sum(a for a, h, w in found if w > h)
            vertical = sum(a for a, h, w in found if h > w)
            orientation[k] = VERTICAL if vertical > horizontal else HORIZONTAL
    if return_components:
        return orientation, n_lines, components
    return orientation, n_lines


def volume_fraction_difference(originals, reconstructions, level=0.05):
    """Per-image percent change of the line (black) area: ``|b_orig - b_recon| / b_orig * 100``.

    Both stacks are thresholded at ``level`` (which leaves binary originals unchanged) and the
    black pixels counted. Values are not rounded (the paper rounds to 4 decimals for display).

    Args:
        originals, reconstructions: same-shape ``(n, H, W)`` or ``(n, 1, H, W)`` stacks.
        level: threshold (default 0.05).

    Returns:
        float64 ``(n,)`` percentages.

    Raises:
        ValueError: shapes differ, or an original has no line pixel (the ratio is undefined).

    Example:
        >>> o = np.ones((1, 4, 4)); o[0, 0] = 0          # 4 black pixels
        >>> r = np.ones((1, 4, 4)); r[0, 0, :3] = 0.01    # 3 black pixels
        >>> volume_fraction_difference(o, r).tolist()
        [25.0]
    """
    a = _line_mask(originals, level, "originals")
    b = _line_mask(reconstructions, level, "reconstructions")
    _same_shape(a, b, "originals", "reconstructions")
    black_a = a.sum(axis=(1, 2)).astype(np.float64)
    black_b = b.sum(axis=(1, 2)).astype(np.float64)
    empty = np.flatnonzero(black_a == 0)
    if empty.size:
        raise ValueError(
            f"originals: image(s) {empty[:10].tolist()} have no line pixel below level={level}; "
            "the volume-fraction difference is undefined for them"
        )
    return np.abs(black_a - black_b) / black_a * 100.0


# ----------------------------------------------------------------------------- errors
def per_image_mse(a, b):
    """Per-image mean over pixels of ``(a - b)**2``, float64 ``(n,)``.

    Example:
        >>> per_image_mse(np.zeros((2, 2, 2)), np.ones((2, 2, 2))).tolist()
        [1.0, 1.0]
    """
    x = _images(a, "a", dtype=np.float64)
    y = _images(b, "b", dtype=np.float64)
    _same_shape(x, y, "a", "b")
    return ((x - y) ** 2).mean(axis=(1, 2))


def spatial_stats(images, eps=0.25, batch_size=256, progress=False):
    """Periodic two-point autocorrelation of the LINE phase of each image, in float64.

    The line indicator is the paper's soft one, ``exp(-x**2 / (2 eps**2))``
    (:func:`pymks_vae.ops.soft_indicator` with state 0.0), and
    ``f(r) = (1/S) sum_x m(x) m(x + r)`` with r = 0 at index ``(H//2, W//2)``
    (:func:`pymks_vae.ops.two_point_stats`).

    Args:
        images: ``(n, H, W)`` or ``(n, 1, H, W)`` (numpy, torch, dask or xarray).
        eps: width of the soft indicator (0.25, the paper's).
        batch_size: images per batch.
        progress: show a tqdm progress bar.

    Returns:
        float64 numpy ``(n, H, W)``.

    Example:
        >>> f = spatial_stats(np.zeros((1, 8, 8)))
        >>> round(float(f[0, 4, 4]), 12)  # all line: volume fraction 1
        1.0
    """
    from pymks_vae import ops

    batch_size = _check_batch_size(batch_size)
    n, (h, w) = _n_and_shape(images, "images")
    out = np.empty((n, h, w), dtype=np.float64)
    starts = _batch_starts(n, batch_size, progress, "spatial stats")
    for s in starts:
        out[s : s + batch_size] = _stats_batch(ops, _slice(images, s, s + batch_size, "images"), eps)
    return out


def _stats_batch(ops, batch, eps):
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float64))[:, None]
    with torch.no_grad():
        f = ops.two_point_stats(ops.soft_indicator(x, (0.0,), eps), [(0, 0)])
    return f[:, 0].numpy()


def stats_mse(a, b, eps=0.25, batch_size=256):
    """Per-image MSE (mean over lags) between the spatial statistics of ``a`` and ``b``.

    Example:
        >>> stats_mse(np.ones((1, 8, 8)), np.ones((1, 8, 8))).tolist()
        [0.0]
    """
    na, sa = _n_and_shape(a, "a")
    nb, sb = _n_and_shape(b, "b")
    _same_shape((na,) + sa, (nb,) + sb, "a", "b")
    fa = spatial_stats(a, eps=eps, batch_size=batch_size)
    fb = spatial_stats(b, eps=eps, batch_size=batch_size)
    return ((fa - fb) ** 2).mean(axis=(1, 2))


# ----------------------------------------------------------------------------- neighbours
def _batch_starts(n, batch_size, progress, desc):
    """Start indices of the batches over ``n`` items, behind a tqdm bar when ``progress``."""
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    return starts


def _check_metric(metric):
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _features(x, metric, eps):
    """Flattened float64 torch features of a numpy batch (n, H, W)."""
    if metric == "stats":
        from pymks_vae import ops

        x = _stats_batch(ops, x, eps)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(len(x), -1))


def _pool_and_queries(queries, pool):
    nq, sq = _n_and_shape(queries, "queries")
    npool, sp = _n_and_shape(pool, "pool")
    if sq != sp:
        raise ValueError(f"queries and pool must hold images of the same shape; got {sq} and {sp}")
    return nq, npool


def nearest_neighbours(queries, pool, metric="image", batch_size=256, eps=0.25, return_distances=False,
                       progress=False):
    """Index of the pool image closest to each query, by per-pixel MSE.

    Distances use ``|q - p|^2 = |q|^2 + |p|^2 - 2 q.p`` with float64 matrix products, the pool
    read (and, for ``metric="stats"``, transformed) one batch at a time, so a pool larger than
    memory (a dask/xarray stack) works.

    Args:
        queries: ``(nq, H, W)`` or ``(nq, 1, H, W)``.
        pool: ``(np, H, W)`` or ``(np, 1, H, W)``.
        metric: ``"image"`` (MSE of pixels) or ``"stats"`` (MSE of :func:`spatial_stats`).
        batch_size: pool images per batch.
        eps: soft-indicator width for ``metric="stats"``.
        return_distances: also return the MSE to the nearest item.
        progress: show a tqdm progress bar over pool batches.

    Returns:
        int64 ``(nq,)`` indices into ``pool`` (the first on ties); with ``return_distances``
        also float64 ``(nq,)`` MSEs.

    Example:
        >>> pool = np.stack([np.zeros((4, 4)), np.ones((4, 4))])
        >>> nearest_neighbours(np.full((1, 4, 4), 0.9), pool).tolist()
        [1]
    """
    _check_metric(metric)
    batch_size = _check_batch_size(batch_size)
    nq, npool = _pool_and_queries(queries, pool)
    q = _features(_images(queries, "queries", dtype=np.float64), metric, eps)
    d = q.shape[1]
    q2 = (q * q).sum(dim=1)
    best = torch.full((nq,), float("inf"), dtype=torch.float64)
    best_idx = torch.zeros(nq, dtype=torch.int64)
    starts = _batch_starts(npool, batch_size, progress, "nearest neighbours")
    for s in starts:
        p = _features(_slice(pool, s, s + batch_size, "pool"), metric, eps)
        dist = q2[:, None] + (p * p).sum(dim=1)[None, :] - 2.0 * (q @ p.T)
        value, idx = dist.min(dim=1)
        better = value < best  # strict: the earliest batch wins ties
        best = torch.where(better, value, best)
        best_idx = torch.where(better, idx + s, best_idx)
    out = best_idx.numpy().astype(np.int64)
    if return_distances:
        # rounding can make a tiny distance slightly negative
        return out, np.maximum(best.numpy(), 0.0) / d
    return out


def average_mse_to_set(queries, pool, metric="image", batch_size=256, eps=0.25, progress=False):
    """Mean MSE of each query against every pool image (the paper's overfitting check).

    Uses ``mean_j |q - p_j|^2 = |q|^2 - 2 q.mean(p) + mean_j |p_j|^2``, so the pool is read once,
    batch by batch, and the cost is linear in its size.

    Args:
        queries, pool, metric, batch_size, eps, progress: as in :func:`nearest_neighbours`.

    Returns:
        float64 ``(nq,)``.

    Example:
        >>> pool = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
        >>> average_mse_to_set(np.zeros((1, 2, 2)), pool).tolist()
        [0.5]
    """
    _check_metric(metric)
    batch_size = _check_batch_size(batch_size)
    _, npool = _pool_and_queries(queries, pool)
    q = _features(_images(queries, "queries", dtype=np.float64), metric, eps)
    d = q.shape[1]
    total = torch.zeros(d, dtype=torch.float64)
    total_sq = 0.0
    starts = _batch_starts(npool, batch_size, progress, "average MSE")
    for s in starts:
        p = _features(_slice(pool, s, s + batch_size, "pool"), metric, eps)
        total += p.sum(dim=0)
        total_sq += float((p * p).sum())
    mean_p = total / npool
    value = (q * q).sum(dim=1) - 2.0 * (q @ mean_p) + total_sq / npool
    return np.maximum(value.numpy(), 0.0) / d


# ----------------------------------------------------------------------------- tables
def confusion_matrix(true, pred, labels):
    """Confusion matrix ``C[i, j]`` = number of items of ``labels[i]`` predicted as ``labels[j]``.

    Args:
        true, pred: 1D label arrays of the same length.
        labels: the label values, in row/column order (e.g. ``[0, 1]`` or ``[1, 2, 3, 4]``);
            predictions outside it (e.g. -1, "no line") are not counted.

    Returns:
        int64 ``(len(labels), len(labels))``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 1, 0], labels=[0, 1]).tolist()
        [[1, 0], [1, 1]]
    """
    from sklearn.metrics import confusion_matrix as _cm

    t = _to_numpy(true)
    p = _to_numpy(pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(f"true and pred must be 1D arrays of labels; got shapes {t.shape} and {p.shape}")
    if t.size == 0:
        raise ValueError("true is empty; need at least one label")
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same length; got {t.size} and {p.size}")
    labels = [] if labels is None else list(_to_numpy(labels).ravel())
    if not labels:
        raise ValueError("labels must be a non-empty sequence of label values")
    return _cm(t, p, labels=labels).astype(np.int64)


def summarise(errors):
    """``{"median": ..., "mean": ..., "std": ..., "n": ...}`` of a 1D error array (floats).

    Example:
        >>> summarise([1.0, 2.0, 6.0])["median"]
        2.0
    """
    e = _to_numpy(errors).astype(np.float64, copy=False).ravel()
    if e.size == 0:
        raise ValueError("errors is empty; need at least one value")
    if not np.isfinite(e).all():
        raise ValueError("errors contains NaN or Inf")
    return {"median": float(np.median(e)), "mean": float(np.mean(e)), "std": float(np.std(e)), "n": int(e.size)}
