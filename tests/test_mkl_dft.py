"""The CPU transforms through MKL's DFTI (csrc/cpu/mkl_dft.h) and their ATen fallback: both paths
give the reference's values and gradients (float64, 1D/2D/3D, odd and even sizes, windows,
zero padding, masks, the partition relations), the path is taken where torch has MKL, the
descriptor cache stays bounded, and the spectra the backward passes keep survive a second
backward."""
import os
import subprocess
import sys

import pytest
import torch

from pymks_vae import _extension, ops, reference

C = _extension._C


@pytest.fixture(params=[True, False], ids=["dfti", "aten"])
def dft_path(request):
    if request.param and not C._mkl_dft_available():
        pytest.fail("torch has MKL but DFTI was not found") if torch.backends.mkl.is_available() else pytest.skip(
            "torch without MKL: the ATen path only")
    prev = C._set_mkl_dft(request.param)
    yield request.param
    C._set_mkl_dft(prev)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def test_dfti_is_found_where_torch_has_mkl():
    # torch's x86 builds link MKL; there the fast path must be live, not silently off.
    assert C._mkl_dft_available() == torch.backends.mkl.is_available()


def test_environment_switch_hides_dfti():
    code = "from pymks_vae import _extension; print(_extension._C._mkl_dft_available())"
    env = dict(os.environ, PYMKS_VAE_MKL_DFT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


LOSS_CASES = [  # spatial, periodic, cutoff, weighted
    ((17,), True, 3, False), ((16,), False, None, True),
    ((9, 12), True, 2, False), ((15, 15), False, 3, True), ((8, 7), True, None, True),
    ((8, 10), False, None, True), ((7, 6, 9), True, 2, False), ((6, 6, 5), False, None, False),
]


# Auto pairs alone take the gradient through the even part of the window's gradient (2D, 3D).
@pytest.mark.parametrize("pairs", [[(0, 0), (0, 1), (1, 1)], [(1, 1), (0, 0)], [(1, 1)]])
@pytest.mark.parametrize("spatial,periodic,cutoff,weighted", LOSS_CASES)
def test_general_loss_both_paths_match_reference(dft_path, spatial, periodic, cutoff, weighted, pairs):
    g = torch.Generator().manual_seed(hash((spatial, periodic, cutoff)) % 2**31)
    x = torch.rand((3, 2) + spatial, dtype=torch.float64, generator=g)
    t = torch.rand((3, 2) + spatial, dtype=torch.float64, generator=g)
    window = reference.window_shape(spatial, cutoff)
    w = torch.rand((len(pairs),) + window, dtype=torch.float64, generator=g) if weighted else None
    kw = dict(correlations=pairs, cutoff=cutoff, periodic=periodic, weight=w, reduction="none")
    xa = x.clone().requires_grad_(True)
    va = ops.spatial_stats_loss(xa, t, **kw)
    (ga,) = torch.autograd.grad(va.sum(), xa)
    xb = x.clone().requires_grad_(True)
    vb = reference.spatial_stats_loss_ref(xb, t, **kw)
    (gb,) = torch.autograd.grad(vb.sum(), xb)
    assert rel_err(va, vb) < 1e-10
    assert rel_err(ga, gb) < 1e-10


OP_CASES = [  # spatial, periodic, cutoff, masked, one-hot (the partition relations apply)
    ((17,), True, None, False, True), ((12,), False, 3, True, False),
    ((9, 12), True, 2, False, True), ((11, 10), True, None, False, False), ((10, 9), False, 3, True, False),
    ((7, 6, 9), True, None, False, True), ((6, 7, 5), False, 2, False, False),
]


@pytest.mark.parametrize("spatial,periodic,cutoff,masked,one_hot", OP_CASES)
@pytest.mark.parametrize("pairs", [[(1, 1), (0, 1)], [(0, 0), (0, 2), (2, 1)]])
def test_operator_both_paths_match_reference(dft_path, spatial, periodic, cutoff, masked, one_hot, pairs):
    g = torch.Generator().manual_seed(hash((spatial, periodic, cutoff, masked)) % 2**31)
    if one_hot:
        labels = torch.randint(0, 3, (4,) + spatial, generator=g)
        x = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double()
    else:
        x = torch.rand((4, 3) + spatial, dtype=torch.float64, generator=g)
    mask = (torch.rand((4,) + spatial, generator=g) > 0.2).double() if masked else None
    kw = dict(cutoff=cutoff, periodic=periodic, mask=mask)
    xa = x.clone().requires_grad_(True)
    sa = ops.two_point_stats(xa, pairs, **kw)
    wgt = torch.randn(sa.shape, dtype=torch.float64, generator=g)
    (ga,) = torch.autograd.grad((sa * wgt).sum(), xa)
    xb = x.clone().requires_grad_(True)
    sb = reference.two_point_stats_ref(xb, pairs, **kw)
    (gb,) = torch.autograd.grad((sb * wgt).sum(), xb)
    assert rel_err(sa, sb) < 1e-10
    assert rel_err(ga, gb) < 1e-10


def test_expanded_gradient_of_a_sum(dft_path):
    # .sum() hands the backward an expanded gradient (every stride 0), read in place on the CPU.
    x = torch.rand((3, 2, 10, 9), dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(ops.two_point_stats(x, [(0, 0), (0, 1)], cutoff=3).sum(), x)
    (gb,) = torch.autograd.grad(reference.two_point_stats_ref(x, [(0, 0), (0, 1)], cutoff=3).sum(), x)
    assert rel_err(ga, gb) < 1e-10


@pytest.mark.parametrize("spatial", [(12, 11, 10), (12, 10)], ids=["3d", "2d"])
@pytest.mark.parametrize("fn", ["loss", "parseval_loss", "operator"])
def test_second_backward_sees_the_same_spectra(dft_path, fn, spatial):
    # The spectra kept for the backward pass must not serve as a transform's scratch space.
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, requires_grad=True)
    t = torch.rand_like(x)
    if fn == "parseval_loss":
        out = ops.spatial_stats_loss(x, t.detach(), correlations=[(0, 0), (0, 1)])
    elif fn == "loss":
        out = ops.spatial_stats_loss(x, t.detach(), correlations=[(0, 0), (0, 1)], cutoff=3)
    else:
        out = ops.two_point_stats(x, [(0, 0), (0, 1)], cutoff=3).square().sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    assert torch.equal(g1, g2)


def test_float32_and_two_threads_agree_with_one_thread():
    if not C._mkl_dft_available():
        pytest.skip("torch without MKL")
    x = torch.rand((6, 2, 40, 36))
    t = torch.rand((6, 2, 40, 36))
    prev = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_(True)
            ops.spatial_stats_loss(xr, t, correlations=[(0, 0), (0, 1)], cutoff=5).backward()
            res.append(xr.grad)
    finally:
        torch.set_num_threads(prev)
    assert rel_err(res[0], res[1]) < 1e-5
    xr = x.double().requires_grad_(True)
    ops.spatial_stats_loss(xr, t.double(), correlations=[(0, 0), (0, 1)], cutoff=5).backward()
    assert rel_err(res[0].double(), xr.grad) < 1e-4


def test_descriptor_cache_is_bounded_and_clears():
    if not C._mkl_dft_available():
        pytest.skip("torch without MKL")
    prev = C._set_mkl_dft(True)
    try:
        C._mkl_dft_clear_cache()
        assert C._mkl_dft_cache_size() == 0
        ops.spatial_stats_loss(torch.rand(2, 1, 12, 12, requires_grad=True), torch.rand(2, 1, 12, 12),
                               cutoff=2).backward()
        assert C._mkl_dft_cache_size() > 0
        for n in range(8, 60):  # many shapes: the cache starts over instead of growing
            ops.two_point_stats(torch.rand(1, 1, n), [(0, 0)])
            assert C._mkl_dft_cache_size() <= 64
        C._mkl_dft_clear_cache()
        assert C._mkl_dft_cache_size() == 0
    finally:
        C._set_mkl_dft(prev)


def test_switch_is_a_bool_and_returns_the_previous_setting():
    prev = C._set_mkl_dft(False)
    try:
        assert C._set_mkl_dft(True) is False
        assert C._set_mkl_dft(True) is True
    finally:
        C._set_mkl_dft(prev)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_transforms_with_its_own_cache():
    # DataLoader workers fork: the child must not inherit a lock or descriptors it cannot use.
    # One thread: after OpenMP ran with more, a forked child hangs in any of torch's transforms
    # (ATen's as well), which is torch's and libgomp's matter, not this cache's.
    code = """
import os, torch
torch.set_num_threads(1)
from pymks_vae import ops, reference
x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
want = reference.two_point_stats_ref(x, [(0, 0)])
ops.two_point_stats(x, [(0, 0)])  # the parent caches its descriptors first
pid = os.fork()
if pid == 0:
    got = ops.two_point_stats(x, [(0, 0)])
    os._exit(0 if ((got - want).abs().max() / want.abs().max()).item() < 1e-10 else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
