"""The CPU's matrix-product transforms for small 2D grids whose sides have a large prime factor
(csrc/cpu/gemm_dft.cpp): the same numbers as MKL's transforms and the float64 reference, on the
grids the rule takes, and no change on the others.

The route is switched per thread with ``_C._set_gemm_dft``; the two routes round differently, so
on a grid the rule takes their float32 results differ in the last bits, and elsewhere they are
the same bits.
"""
import contextlib
import os

import pytest
import torch

from pymks_vae import ops, reference
from pymks_vae import _extension

C = _extension._C
pytestmark = [
    pytest.mark.skipif(C is None, reason="the compiled extension is not built"),
    pytest.mark.skipif(os.environ.get("PYMKS_VAE_GEMM_DFT") == "0",
                       reason="PYMKS_VAE_GEMM_DFT=0 turns the route off for this process"),
]

PAIRS = [(0, 0), (0, 1), (1, 1)]
# Every side m <= 103 with a prime factor p >= 17 and m <= 3p; LEFT has a side that is not.
TAKEN = [(17, 17), (51, 51), (17, 34), (47, 53), (34, 19), (101, 101), (69, 23)]
LEFT = [(21, 21), (64, 64), (51, 21), (51, 64), (68, 68), (102, 51), (113, 113)]


@contextlib.contextmanager
def gemm_dft(enabled):
    prev = C._set_gemm_dft(enabled)
    try:
        yield
    finally:
        C._set_gemm_dft(prev)


def field(shape, dtype=torch.float64, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 2) + shape, generator=g, dtype=dtype)


def both_routes(fn):
    with gemm_dft(True):
        on = fn()
    with gemm_dft(False):
        off = fn()
    return on, off


@pytest.mark.parametrize("shape", TAKEN, ids=str)
@pytest.mark.parametrize("periodic,cutoff", [(True, None), (True, 5), (False, 6)])
def test_operator_matches_the_reference_on_the_grids_taken(shape, periodic, cutoff):
    x = field(shape)
    on, off = both_routes(lambda: ops.two_point_stats(x, PAIRS, periodic=periodic, cutoff=cutoff))
    ref = reference.two_point_stats_ref(x, PAIRS, periodic=periodic, cutoff=cutoff)
    torch.testing.assert_close(on, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-13)
    if periodic:  # zero padding makes the grid another size, which the rule may not take
        assert not torch.equal(on, off), "the matrix products did not run"


@pytest.mark.parametrize("shape", TAKEN[:3], ids=str)
def test_float32_within_rounding_of_float64(shape):
    x = field(shape, torch.float32)
    on, off = both_routes(lambda: ops.two_point_stats(x, PAIRS, cutoff=4))
    ref = reference.two_point_stats_ref(x.double(), PAIRS, cutoff=4)
    scale = float(ref.abs().max())
    assert float((on.double() - ref).abs().max()) < 2e-6 * scale
    assert float((off.double() - ref).abs().max()) < 2e-6 * scale
    assert not torch.equal(on, off)


@pytest.mark.parametrize("shape", LEFT, ids=str)
def test_other_grids_keep_their_transforms(shape):
    x = field(shape, torch.float32, n=2)
    on, off = both_routes(lambda: ops.two_point_stats(x, PAIRS, cutoff=3))
    assert torch.equal(on, off)


@pytest.mark.parametrize("shape", [(17, 34), (51, 17)], ids=str)
def test_operator_gradcheck(shape):
    x = field(shape, n=2).requires_grad_(True)
    with gemm_dft(True):
        assert torch.autograd.gradcheck(lambda v: ops.two_point_stats(v, [(0, 0), (0, 1)], cutoff=4), (x,),
                                        eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(17, 34), (51, 51)], ids=str)
@pytest.mark.parametrize("kw", [dict(cutoff=5), dict(cutoff=None), dict(cutoff=None, weighted=True)],
                         ids=["cutoff", "parseval", "weighted"])
def test_losses_match_the_reference(shape, kw):
    kw = dict(kw)
    x, t = field(shape, n=2, seed=1), field(shape, n=2, seed=2)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand((2,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pairs = [(0, 0), (1, 1)]

    def value_and_grad(fn):
        xr = x.clone().requires_grad_(True)
        loss = fn(xr, t, correlations=pairs, **kw)
        loss.backward()
        return loss.detach(), xr.grad

    with gemm_dft(True):
        value, grad = value_and_grad(ops.spatial_stats_loss)
    with gemm_dft(False):
        value_off, grad_off = value_and_grad(ops.spatial_stats_loss)
    ref_value, ref_grad = value_and_grad(reference.spatial_stats_loss_ref)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    # Every loss's transforms take the products on these grids (the Parseval loss's too).
    assert not torch.equal(grad, grad_off), "the matrix products did not run"


@pytest.mark.parametrize("enabled", [True, False], ids=["products", "mkl"])
def test_parseval_loss_second_backward_sees_the_same_spectrum(enabled):
    # The spectrum the Parseval loss keeps must not serve as the inverse transform's scratch space.
    x = field((17, 34)).requires_grad_(True)
    t = field((17, 34), seed=5)
    with gemm_dft(enabled):
        loss = ops.spatial_stats_loss(x, t, correlations=PAIRS)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)


def test_window_loss_gradcheck_and_opcheck():
    x = field((17, 34), n=2).requires_grad_(True)
    t = field((17, 34), n=2, seed=4)
    with gemm_dft(True):
        assert torch.autograd.gradcheck(lambda v: ops.spatial_stats_loss(v, t, correlations=[(0, 0), (0, 1)], cutoff=5),
                                        (x,), eps=1e-6, atol=1e-7)
        torch.library.opcheck(torch.ops.pymks_vae.stats_loss_window.default,
                              (x.detach(), t, [0, 0], [0, 1], True, [11, 11], None, None, 1.0, True))
        torch.library.opcheck(torch.ops.pymks_vae.two_point_stats.default, (x.detach(), [0, 0], [0, 1], True, [9, 9], None, 0))


def test_the_switch_is_per_thread_and_returns_the_previous_setting():
    import threading
    prev = C._set_gemm_dft(False)
    try:
        seen = []
        worker = threading.Thread(target=lambda: seen.append(C._set_gemm_dft(True)))
        worker.start()
        worker.join()
        assert seen == [True]           # another thread still had the default (on)
        assert C._set_gemm_dft(False) is False
    finally:
        C._set_gemm_dft(prev)
