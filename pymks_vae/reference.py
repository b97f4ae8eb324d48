"""The operators written the obvious way with ``torch.fft`` and autograd.

These are the definitions the compiled kernels are tested against, the baseline the benchmarks
measure against, and the fallback used when ``pymks_vae._C`` is not built. They favour clarity:
one forward transform per state, one product per pair, the inverse transforms, ``fftshift``,
then a crop.

Conventions (shared with :mod:`pymks_vae.ops`): ``x`` is ``(batch, n_state, *spatial)``; the
result is ``(batch, n_corr, *window)`` with lag ``r = 0`` at index ``window[d] // 2`` of each axis.

Example:
    >>> import torch
    >>> from pymks_vae.reference import two_point_stats_ref
    >>> x = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    >>> f = two_point_stats_ref(x, [(0, 0)])
    >>> bool(torch.isclose(f[0, 0, 4, 4], (x[0, 0] ** 2).mean()))
    True
"""
import torch

__all__ = ["two_point_stats_ref", "spatial_stats_loss_ref", "stats_distance", "reduce_per_sample",
           "window_shape", "mask_threshold"]


def window_shape(spatial, cutoff):
    """Window of lags kept on each axis: the full axis when ``cutoff`` is None, else ``2c+1``.

    Args:
        spatial: the spatial shape ``(N_1, ..., N_d)``.
        cutoff: None, an int, or one int per axis.

    Returns:
        tuple of ints, the window shape.

    Example:
        >>> window_shape((64, 64), 7), window_shape((21, 30), None), window_shape((32, 32, 32), (3, 3, 5))
        ((15, 15), (21, 30), (7, 7, 11))
    """
    if cutoff is None:
        return tuple(int(n) for n in spatial)
    if isinstance(cutoff, int):
        cutoff = (cutoff,) * len(spatial)
    return tuple(2 * int(c) + 1 for c in cutoff)


def mask_threshold(dtype):
    """Relative level under which a mask's own correlation counts as 'no overlap at this lag'.

    Args:
        dtype: the statistics' dtype.

    Returns:
        float: a lag whose mask correlation is below this fraction of its largest value has no
        overlap (float32 transforms leave about 1e-7 of it where the true count is 0).

    Example:
        >>> mask_threshold(torch.float32), mask_threshold(torch.float64)
        (1e-05, 1e-10)
    """
    return 1e-5 if dtype == torch.float32 else 1e-10


def _correlate(a, b, grid, dims):
    """Circular cross-correlation sum_x a(x) b(x + r) on ``grid`` (zero-padded at the end)."""
    fa = torch.fft.rfftn(a, s=grid, dim=dims)
    fb = torch.fft.rfftn(b, s=grid, dim=dims)
    return torch.fft.irfftn(torch.conj(fa) * fb, s=grid, dim=dims)


def _centre_crop(c, grid, window, dims):
    """fftshift so that r = 0 sits at grid//2, then keep the window centred on it."""
    c = torch.fft.fftshift(c, dim=dims)
    for dim, m, w in zip(dims, grid, window):
        c = c.narrow(dim, m // 2 - w // 2, w)
    return c


def two_point_stats_ref(x, correlations, *, periodic=True, cutoff=None, mask=None):
    """Two-point statistics with plain ``torch.fft`` (differentiable by autograd).

    Args:
        x: float tensor ``(batch, n_state, *spatial)``, 1-3 spatial dims.
        correlations: sequence of state pairs ``(i, j)``.
        periodic: periodic boundaries (normalise by the number of pixels) or zero padding with
            division by the number of overlapping pixels of each lag (PyMKS's definition).
        cutoff: None (full spatial window) or the largest lag kept per axis (int or tuple).
        mask: optional ``(*spatial)`` or ``(batch, *spatial)`` weights in [0, 1]: both fields are
            multiplied by it and the result divided by the mask's own correlation. Lags where the
            mask has no overlap give 0.

    Returns:
        tensor ``(batch, len(correlations), *window)``.

    Example:
        >>> x = torch.rand(2, 2, 9, 9, dtype=torch.float64)
        >>> two_point_stats_ref(x, [(0, 0), (0, 1)], periodic=False, cutoff=3).shape
        torch.Size([2, 2, 7, 7])
    """
    spatial = tuple(x.shape[2:])
    d = len(spatial)
    dims = tuple(range(2, 2 + d))
    window = window_shape(spatial, cutoff)
    if periodic:
        grid = spatial
    else:  # pad every axis by the largest lag on both sides, as PyMKS does
        grid = tuple(n + 2 * (w // 2) for n, w in zip(spatial, window))
    if mask is not None:
        m = mask.to(x.dtype)
        m = m.reshape((-1, 1) + spatial)
        x = x * m
    spectra = torch.fft.rfftn(x, s=grid, dim=dims)  # one transform per state
    products = torch.stack([torch.conj(spectra[:, i]) * spectra[:, j] for i, j in correlations], dim=1)
    f = _centre_crop(torch.fft.irfftn(products, s=grid, dim=dims), grid, window, dims)
    if mask is not None:
        norm = _centre_crop(_correlate(m, m, grid, dims), grid, window, dims)
        level = mask_threshold(x.dtype) * norm.amax(dim=dims, keepdim=True)
        ok = norm > level
        return torch.where(ok, f / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(f))
    if periodic:
        return f / float(torch.Size(spatial).numel())
    ones = torch.ones((1, 1) + spatial, dtype=x.dtype, device=x.device)
    return f / _centre_crop(_correlate(ones, ones, grid, dims), grid, window, dims)


def spatial_stats_loss_ref(x, target, *, correlations=((0, 0),), periodic=True, cutoff=None,
                           weight=None, scale=1.0, reduction="sum", offset=None):
    """Sum over pairs and lags of ``weight * (scale * (f(x) - f(target)))**2``, per sample, reduced.

    Args:
        x, target: float tensors ``(batch, n_state, *spatial)``.
        correlations, periodic, cutoff: as in :func:`two_point_stats_ref`.
        weight: None or a tensor broadcastable to ``(n_corr, *window)``.
        scale: multiplies the statistics.
        reduction: as :func:`pymks_vae.ops.spatial_stats_loss`: "sum", "batchmean", "mean" or "none".
        offset: None or ``(batch, n_corr)``, subtracted from ``f(x) - f(target)`` at every lag.

    Returns:
        a scalar, or ``(batch,)`` for ``reduction="none"``.

    Example:
        >>> x = torch.rand(3, 1, 16, 16, requires_grad=True)
        >>> loss = spatial_stats_loss_ref(x, torch.rand(3, 1, 16, 16), cutoff=4)
        >>> loss.backward(); loss.ndim, x.grad.shape
        (0, torch.Size([3, 1, 16, 16]))
    """
    fx = two_point_stats_ref(x, correlations, periodic=periodic, cutoff=cutoff)
    ft = two_point_stats_ref(target.detach(), correlations, periodic=periodic, cutoff=cutoff)
    return stats_distance(fx, ft, scale, weight, reduction, offset)


def stats_distance(fx, ft, scale=1.0, weight=None, reduction="sum", offset=None):
    """``weight * (scale * (fx - ft - offset))**2`` summed per sample, then reduced as the loss does.

    Args:
        fx, ft: statistics ``(batch, n_corr, *window)``.
        scale, weight, reduction, offset: as in :func:`spatial_stats_loss_ref`.

    Returns:
        a scalar, or ``(batch,)`` for ``reduction="none"``.

    Example:
        >>> fx, ft = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
        >>> stats_distance(fx, ft, scale=2.0, reduction="none")
        tensor([36., 36.])
    """
    diff = fx - ft
    if offset is not None:
        diff = diff - offset.reshape(offset.shape + (1,) * (fx.ndim - 2))
    sq = (scale * diff) ** 2
    if weight is not None:
        sq = sq * weight
    return reduce_per_sample(sq.flatten(1).sum(1), reduction, fx[0].numel())


def reduce_per_sample(per_sample, reduction, n_elements):
    """Reduce per-sample sums ``(batch,)`` over the batch.

    Args:
        per_sample: per-sample sums over ``n_elements`` squared differences (pairs x lags).
        reduction: "sum" (over the batch), "batchmean" (mean over the batch of the per-sample
            sums), "mean" (mean over every element, batch x pairs x lags, as PyTorch's losses)
            or "none" (the per-sample sums).
        n_elements: number of squared differences in one sample's sum.

    Returns:
        a scalar tensor, or ``per_sample`` itself for "none".

    Example:
        >>> per_sample = torch.tensor([2.0, 4.0])
        >>> [float(reduce_per_sample(per_sample, r, 4)) for r in ("sum", "batchmean", "mean")]
        [6.0, 3.0, 0.75]
    """
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / n_elements
    return per_sample
