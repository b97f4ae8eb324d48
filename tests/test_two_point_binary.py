"""The exact counting route of the two-point operator for binary fields (csrc/cpu/two_point_bits.cpp).

Statistics of 0/1 fields are counts over S (periodic) or over the number of pixel pairs at each lag
(non-periodic), so the route's output must equal the exact count divided by that, bit for bit. The
exact counts come from the float64 numpy reference, rounded to integers (its error is far below
0.5 count at these sizes). PYMKS_VAE_BINARY_PATH forces a
kernel ("generic", "popcnt", "avx2", "avx512") or the transforms ("off"); "auto" lets the cost model pick
(its costs and decisions: test_binary_route.py).
"""
import os

import numpy as np
import pytest
import torch

import pymks_vae
from pymks_vae import ops
from numpy_reference import np_two_point, np_window

BEST = pymks_vae.build_info()["cpu_count_kernel"]
# The kernels this CPU runs (each one is forced below); the dispatch itself is checked against
# the CPU's flags in test_dispatch_matches_the_cpu.
RANKED = ["generic", "popcnt", "avx2", "avx512"]
KERNELS = RANKED[: RANKED.index(BEST) + 1]


@pytest.fixture
def path(monkeypatch):
    def use(mode):
        monkeypatch.setenv("PYMKS_VAE_BINARY_PATH", mode)
    return use


def one_hot(B, n_state, spatial, dtype=torch.float64):
    labels = torch.randint(0, n_state, (B,) + tuple(spatial))
    return torch.nn.functional.one_hot(labels, n_state).movedim(-1, 1).to(dtype)


def pair_counts(spatial, window, periodic):
    """How many pixel pairs each lag of the window has: S, or prod_d (n_d - |r_d|)."""
    if periodic:
        return np.full(window, float(np.prod(spatial)))
    lags = [np.abs(np.arange(w) - w // 2) for w in window]
    return np.prod(np.meshgrid(*[n - r for n, r in zip(spatial, lags)], indexing="ij"), axis=0).astype(float)


def exact(x, pairs, cutoff, periodic=True):
    """count / pairs in float64, the counts exact (rounded from the float64 FFT reference)."""
    x = x.detach().double().numpy()
    spatial = x.shape[2:]
    window = np_window(spatial, cutoff)
    n = pair_counts(spatial, window, periodic)
    counts = np.rint(np_two_point(x, pairs, periodic, cutoff) * n)
    return counts / n


def channels_last(x):
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


SHAPES_CUTOFFS = [
    ((17,), 5), ((64,), None), ((200,), 30), ((64,), 31),
    ((13, 10), 3), ((8, 8), None), ((6, 9), None), ((70, 65), 10), ((3, 130), 1),
    ((7, 9, 11), 2), ((4, 5, 6), None), ((6, 6, 66), 2),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("spatial,cutoff", SHAPES_CUTOFFS)
def test_counts_are_exact(path, kernel, periodic, spatial, cutoff):
    path(kernel)
    for n_state in (2, 3):
        x = one_hot(3, n_state, spatial)
        pairs = [(i, j) for i in range(n_state) for j in range(n_state)]
        want = exact(x, pairs, cutoff, periodic)
        for view in (x, channels_last(x)):
            got = ops.two_point_stats(view, pairs, periodic=periodic, cutoff=cutoff)
            np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_binary_fields_that_are_not_a_partition(path, kernel):
    """Independent 0/1 channels (several states, or none, at a pixel): no partition relations."""
    path(kernel)
    for spatial, cutoff in [((40,), 7), ((12, 15), 4), ((5, 6, 7), 2)]:
        x = (torch.rand((3, 3) + spatial) < 0.4).double()
        pairs = [(0, 0), (1, 0), (0, 2), (2, 2), (2, 1)]
        for periodic in (True, False):
            np.testing.assert_array_equal(ops.two_point_stats(x, pairs, periodic=periodic, cutoff=cutoff).numpy(),
                                          exact(x, pairs, cutoff, periodic))
        # one sample a partition, the other not: the batch takes the direct plan
        y = one_hot(2, 2, spatial)
        y[1, 0].view(-1)[3] = 1 - y[1, 0].view(-1)[3]
        np.testing.assert_array_equal(ops.two_point_stats(y, [(1, 1), (0, 1)], cutoff=cutoff).numpy(),
                                      exact(y, [(1, 1), (0, 1)], cutoff))


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_is_the_exact_value_rounded(path, kernel):
    path(kernel)
    x = one_hot(2, 3, (21, 34), dtype=torch.float32)
    pairs = [(0, 0), (2, 1)]
    got = ops.two_point_stats(channels_last(x), pairs, cutoff=6)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), exact(x, pairs, 6).astype(np.float32))


def test_auto_route_follows_the_cost_model(path, monkeypatch):
    """PyMKS's case (two-state one-hot, channels last, small cutoff) is counted where the CPU has
    a vector kernel (AVX-512 or AVX2); a full window on the same field is transformed. Same route
    => same bits. The shipped (fitted) costs, not this CPU's measured ones: the decision, not the
    speed, is under test here (see test_binary_route.py)."""
    monkeypatch.setenv("PYMKS_VAE_ROUTE_COSTS", "fitted")
    x = channels_last(one_hot(4, 2, (128, 128)))
    pairs = [(1, 1), (0, 1)]
    results = {}
    for mode in ["auto", "off"] + KERNELS:
        path(mode)
        results[mode] = (ops.two_point_stats(x, pairs, cutoff=20), ops.two_point_stats(x, pairs))
    want = exact(x, pairs, 20)
    np.testing.assert_array_equal(results[BEST][0].numpy(), want)
    assert not np.array_equal(results["off"][0].numpy(), want)  # the transforms round differently
    np.testing.assert_allclose(results["off"][0].numpy(), want, rtol=0, atol=1e-14)
    if BEST in ("avx512", "avx2"):
        assert torch.equal(results["auto"][0], results[BEST][0])
    else:  # the scalar kernels lose to the transforms here
        assert torch.equal(results["auto"][0], results["off"][0])
    assert torch.equal(results["auto"][1], results["off"][1])  # 128^2 lags: transforms


@pytest.mark.parametrize("mode", ["auto"] + KERNELS)
def test_non_binary_input_takes_the_transforms(path, mode):
    path(mode)
    x = one_hot(3, 2, (16, 16))
    x[2, :, 5, 5] = 0.5  # still a partition, but not binary
    pairs = [(1, 1), (0, 1)]
    got = ops.two_point_stats(x, pairs, cutoff=4)
    path("off")
    assert torch.equal(got, ops.two_point_stats(x, pairs, cutoff=4))
    np.testing.assert_allclose(got.numpy(), np_two_point(x.numpy(), pairs, True, 4), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["auto"] + KERNELS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_binary_input_still_rejected(path, mode, bad):
    path(mode)
    x = one_hot(2, 2, (12, 12))
    x[1, 0, 3, 4] = bad
    for view in (x, channels_last(x)):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            ops.two_point_stats(view, [(1, 1), (0, 1)], cutoff=3)


def test_masked_or_trusted_partition_statistics_are_not_counted(path):
    """Masked statistics, and a trusted partition, always take the transforms, whatever is forced."""
    x = one_hot(2, 2, (10, 12))
    mask = (torch.rand(10, 12) < 0.8).double()
    for kw in [dict(mask=mask), dict(mask=mask, periodic=False), dict(partition=True)]:
        path(KERNELS[-1])
        got = ops.two_point_stats(x, [(1, 1), (0, 1)], cutoff=3, **kw)
        path("off")
        assert torch.equal(got, ops.two_point_stats(x, [(1, 1), (0, 1)], cutoff=3, **kw)), kw


def test_gradient_is_that_of_the_definition(path):
    """The route changes the forward computation only: gradients at binary input are the same."""
    x = channels_last(one_hot(2, 2, (9, 10))).requires_grad_(True)
    w = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    grads = []
    for mode in [KERNELS[-1], "off"]:
        path(mode)
        grads.append(torch.autograd.grad((ops.two_point_stats(x, [(1, 1), (0, 1)], cutoff=3) * w).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_opcheck_on_binary_input(path):
    path(KERNELS[-1])
    x = channels_last(one_hot(2, 2, (6, 7)))
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats.default, (x, [1, 0], [1, 1], True, [5, 3], None, 2))


def test_unknown_path_setting_is_a_clear_error(path):
    path("fastest")
    with pytest.raises(ValueError, match="PYMKS_VAE_BINARY_PATH must be auto, off, generic, popcnt, avx2 or avx512"):
        ops.two_point_stats(one_hot(1, 2, (8, 8)), [(1, 1)], cutoff=2)


def test_dispatch_matches_the_cpu():
    """build_info names the best kernel this CPU runs (Linux: checked against /proc/cpuinfo)."""
    assert BEST in RANKED
    if not os.path.exists("/proc/cpuinfo") or os.uname().machine != "x86_64":
        assert BEST == "generic"
        return
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    if {"avx512f", "avx512_vpopcntdq"} <= flags:
        assert BEST == "avx512"
    elif {"avx2", "popcnt"} <= flags:
        assert BEST == "avx2"
    elif "popcnt" in flags:
        assert BEST == "popcnt"
    else:
        assert BEST == "generic"


def test_batches_counted_in_chunks(path):
    """Packed fields are processed 16 MiB at a time (64 samples of 64^3 here, two states): each
    chunk plans for itself, so a last chunk that is not a partition is still counted exactly."""
    path(KERNELS[-1])
    x = one_hot(66, 2, (64, 64, 64), dtype=torch.float32)
    x[65, 0, 1, 2, 3] = 1 - x[65, 0, 1, 2, 3]  # binary, but no longer a partition
    view = channels_last(x)
    got = ops.two_point_stats(view, [(1, 1), (0, 1)], cutoff=2)
    keep = [0, 63, 64, 65]
    np.testing.assert_array_equal(got[keep].numpy(), exact(x[keep], [(1, 1), (0, 1)], 2).astype(np.float32))


@pytest.mark.parametrize("mode", ["auto", "off"] + KERNELS)
def test_views_with_singleton_axes_read_the_right_pixels(path, mode):
    """A singleton spatial axis between sliced ones: its stride is free, so the rows of the view
    are not one stride apart and the view must not be read as if they were (both routes, and the
    partition check, which reads the same way)."""
    path(mode)
    for shape in [(1, 2, 6, 1, 128), (2, 2, 5, 1, 16), (2, 2, 5, 1, 1), (2, 2, 1, 7, 40)]:
        full = one_hot(shape[0], 2, shape[2:-1] + (2 * shape[-1],))
        view = full[..., : shape[-1]]
        assert view.shape == shape
        for periodic in (True, False):
            for pairs in ([(0, 0)], [(1, 1), (0, 1)]):
                got = ops.two_point_stats(view, pairs, periodic=periodic, cutoff=0)
                want = np_two_point(view.contiguous().numpy(), pairs, periodic, 0)
                np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-14, err_msg=f"{shape} {periodic}")
