"""An independent float64 numpy implementation of two-point statistics, for the tests.

Written from the definition, the way PyMKS computes it: pad (non-periodic), full complex FFTs,
conjugate product, inverse FFT, fftshift, centred crop, divide by S or by the overlap count (or
by the mask's own correlation).
"""
import numpy as np


def np_window(spatial, cutoff):
    if cutoff is None:
        return tuple(spatial)
    if np.isscalar(cutoff):
        cutoff = (cutoff,) * len(spatial)
    return tuple(2 * c + 1 for c in cutoff)


def _corr(a, b, axes):
    return np.fft.ifftn(np.conj(np.fft.fftn(a, axes=axes)) * np.fft.fftn(b, axes=axes), axes=axes).real


def _crop(c, window, axes):
    c = np.fft.fftshift(c, axes=axes)
    index = [slice(None)] * c.ndim
    for ax, w in zip(axes, window):
        m = c.shape[ax]
        index[ax] = slice(m // 2 - w // 2, m // 2 - w // 2 + w)
    return c[tuple(index)]


def np_two_point(x, pairs, periodic=True, cutoff=None, mask=None):
    """x: (B, n_state, *spatial) -> (B, n_pairs, *window), float64."""
    x = np.asarray(x, dtype=np.float64)
    spatial = x.shape[2:]
    d = len(spatial)
    window = np_window(spatial, cutoff)
    axes = tuple(range(1, 1 + d))
    pad = [(0, 0)] + [(0, 0) if periodic else (w // 2, w // 2) for w in window]
    m = None
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64).reshape((-1,) + spatial)
    out = np.empty((x.shape[0], len(pairs)) + window)
    for q, (i, j) in enumerate(pairs):
        a, b = x[:, i], x[:, j]
        if m is not None:
            a, b = a * m, b * m
        c = _crop(_corr(np.pad(a, pad), np.pad(b, pad), axes), window, axes)
        if m is not None:
            pm = np.pad(m, pad)
            norm = _crop(_corr(pm, pm, axes), window, axes)
            level = 1e-10 * norm.reshape(len(norm), -1).max(axis=1).reshape((-1,) + (1,) * d)
            c = np.where(norm > level, c / np.where(norm > level, norm, 1.0), 0.0)
        elif periodic:
            c = c / np.prod(spatial)
        else:
            ones = np.pad(np.ones((1,) + spatial), pad)
            c = c / _crop(_corr(ones, ones, axes), window, axes)
        out[:, q] = c
    return out
