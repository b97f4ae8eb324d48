"""The index map of the pruned even layout (csrc/spectral.h), which the CUDA output pass uses
element by element; the CPU pass reads the same layout row by row (checked by test_two_point)."""
import itertools

import numpy as np
import pytest

from pymks_vae import _extension


def _even_function(rng, m):
    """A random even function on the grid m: the periodic autocorrelation of a random field."""
    f = rng.random(m)
    return np.real(np.fft.ifftn(np.abs(np.fft.fftn(f)) ** 2))


def _pruned_layout(c, w):
    """The layout as documented: whole grid in 1D; else rows a_0 < w_0//2 + 1 of the first axis,
    holding C(a_0, -a_1, ..., -a_{nd-1})."""
    if c.ndim == 1:
        return c
    rows = w[0] // 2 + 1
    flipped = c
    for axis in range(1, c.ndim):
        flipped = np.roll(np.flip(flipped, axis), 1, axis)  # index a -> value at -a (mod m)
    return flipped[:rows]


@pytest.mark.parametrize("m,w", [
    ((7,), (7,)), ((8,), (5,)),
    ((6, 9), (5, 9)), ((8, 8), (8, 8)), ((10, 7), (3, 5)),
    ((4, 5, 6), (3, 5, 6)), ((6, 6, 6), (6, 5, 3)),
])
def test_even_index_reads_the_documented_layout(m, w):
    assert _extension.has_extension(), "the compiled extension is expected in the test environment"
    rng = np.random.default_rng(sum(m) * 31 + len(w))
    c = _even_function(rng, m)
    flat = _pruned_layout(c, w).ravel()
    lags = [range(-(wd // 2), wd - wd // 2) for wd in w]  # the window's lags, r = 0 at w // 2
    for lag in itertools.product(*lags):
        idx = _extension._C._even_index(list(lag), list(m))
        assert 0 <= idx < flat.size
        grid = tuple(r % md for r, md in zip(lag, m))
        assert flat[idx] == pytest.approx(c[grid], rel=1e-12, abs=1e-12), lag


def test_even_index_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="same 1-3 entries"):
        _extension._C._even_index([1, 2], [4])
