"""The fused spatial-statistics loss against the torch.fft/autograd reference, its registration,
the soft indicator, and bad input."""
import math

import numpy as np
import pytest
import torch

from pymks_vae import ops, reference
from numpy_reference import np_two_point
from layouts import LAYOUTS, strided_view
from optional import require

REDUCTIONS = ["sum", "batchmean", "mean", "none"]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def value_and_grad(fn, x, t, **kw):
    xr = x.detach().clone().requires_grad_(True)
    out = fn(xr, t, **kw)
    w = torch.randn(out.shape, dtype=out.dtype)
    (g,) = torch.autograd.grad((out * w).sum(), xr)
    return out, g, w


@pytest.mark.parametrize("spatial", [(7,), (8,), (1,), (2,), (6, 9), (8, 8), (5, 2), (4, 5, 6), (3, 4, 4)])
@pytest.mark.parametrize("pairs", [[(0, 0)], [(0, 1)], [(1, 0), (0, 0), (1, 1)]])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fast_path_matches_reference(spatial, pairs, reduction):
    x = torch.rand((3, 2) + spatial, dtype=torch.float64)
    t = torch.rand((3, 2) + spatial, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    out = ops.spatial_stats_loss(xr, t, correlations=pairs, scale=1.7, reduction=reduction)
    ref_x = x.clone().requires_grad_(True)
    ref = reference.spatial_stats_loss_ref(ref_x, t, correlations=pairs, scale=1.7, reduction=reduction)
    assert out.shape == ref.shape == ((3,) if reduction == "none" else ())
    assert rel_err(out, ref) < 1e-10
    w = torch.randn(out.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), xr)
    (gr,) = torch.autograd.grad((ref * w).sum(), ref_x)
    assert rel_err(g, gr) < 1e-10


def test_value_against_numpy_definition():
    x = np.random.rand(2, 1, 9, 10)
    t = np.random.rand(2, 1, 9, 10)
    want = ((np_two_point(x, [(0, 0)]) - np_two_point(t, [(0, 0)])) ** 2).reshape(2, -1).sum(1)
    got = ops.spatial_stats_loss(torch.from_numpy(x), torch.from_numpy(t), reduction="none")
    assert rel_err(got, torch.from_numpy(want)) < 1e-10


@pytest.mark.parametrize("spatial", [(9,), (6, 7), (4, 4, 5)])
@pytest.mark.parametrize("periodic,cutoff,weighted", [
    (True, 1, False), (True, None, True), (False, None, False), (False, 1, True),
])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fallback_path_matches_reference(spatial, periodic, cutoff, weighted, reduction):
    pairs = [(0, 1), (1, 1)]
    x = torch.rand((2, 2) + spatial, dtype=torch.float64)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64)
    window = reference.window_shape(spatial, cutoff)
    weight = torch.rand((len(pairs),) + window, dtype=torch.float64) if weighted else None
    kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, weight=weight, scale=0.5, reduction=reduction)
    xr = x.clone().requires_grad_(True)
    out = ops.spatial_stats_loss(xr, t, **kw)
    ref_x = x.clone().requires_grad_(True)
    ref = reference.spatial_stats_loss_ref(ref_x, t, **kw)
    assert rel_err(out, ref) < 1e-10
    w = torch.randn(out.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), xr)
    (gr,) = torch.autograd.grad((ref * w).sum(), ref_x)
    assert rel_err(g, gr) < 1e-10


def test_weight_broadcasts_over_pairs():
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    t = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    w = torch.rand(8, 8, dtype=torch.float64)
    a = ops.spatial_stats_loss(x, t, correlations=[(0, 0), (1, 1)], weight=w)
    b = ops.spatial_stats_loss(x, t, correlations=[(0, 0), (1, 1)], weight=w.expand(2, 8, 8).clone())
    assert rel_err(a, b) < 1e-12
    assert rel_err(ops.spatial_stats_loss(x, t, weight=torch.ones(8, 8, dtype=torch.float64)),
                   ops.spatial_stats_loss(x, t)) < 1e-10


def test_float32_close_to_float64():
    x = torch.rand(4, 1, 32, 32)
    t = torch.rand(4, 1, 32, 32)
    a = ops.spatial_stats_loss(x, t, reduction="none")
    b = ops.spatial_stats_loss(x.double(), t.double(), reduction="none")
    assert a.dtype == torch.float32
    assert rel_err(a, b) < 1e-4


def test_zero_for_identical_and_shifted_inputs():
    x = torch.rand(2, 1, 12, 10, dtype=torch.float64)
    assert ops.spatial_stats_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-20)
    shifted = torch.roll(x, shifts=(3, -4), dims=(2, 3))  # periodic statistics ignore translation
    assert ops.spatial_stats_loss(x, shifted).item() < 1e-25
    assert ops.spatial_stats_loss(x, torch.rand_like(x)).item() > 1e-6


def test_no_grad_forward_and_missing_gradient(device):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    t = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    want = reference.spatial_stats_loss_ref(x, t, reduction="none")
    with torch.no_grad():
        a = ops.spatial_stats_loss(x.detach().to(device).requires_grad_(True), t.to(device), reduction="none")
    assert not a.requires_grad and a.device.type == device.type
    assert rel_err(a.cpu(), want) < 1e-10
    # x without requires_grad takes the same route: no gradient spectrum is prepared
    b = ops.spatial_stats_loss(x.to(device), t.to(device), reduction="none")
    assert not b.requires_grad and rel_err(b.cpu(), want) < 1e-10
    values, spectrum = torch.ops.pymks_vae.stats_loss(x.to(device), t.to(device), [0], [0], 1.0, False)
    assert spectrum.numel() == 0 and rel_err(values.cpu(), want) < 1e-10


@pytest.mark.parametrize("spatial,pairs", [((7,), [(0, 0)]), ((4, 5), [(0, 1), (1, 1)]), ((3, 3, 4), [(1, 0)])])
def test_gradcheck(spatial, pairs):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, requires_grad=True)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64)
    for red in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda v: ops.spatial_stats_loss(v, t, correlations=pairs, reduction=red),
                                        (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda v: ops.spatial_stats_loss(v, t, correlations=pairs, cutoff=1,
                                                                     periodic=False), (x,), fast_mode=True)


@pytest.mark.parametrize("spatial,pairs", [((8,), [0, 1]), ((5, 6), [1, 1]), ((3, 4, 5), [0, 0])])
def test_opcheck(spatial, pairs, device):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss.default, (x, t, [pairs[0]], [pairs[1]], 1.5, True))
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss.default, (x.detach(), t, [pairs[0]], [pairs[1]], 1.0, False))
    _, spec = torch.ops.pymks_vae.stats_loss(x.detach(), t, [pairs[0]], [pairs[1]], 1.0, True)
    states = sorted(set(pairs))
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss_backward.default,
                          (torch.rand(2, dtype=torch.float64, device=device), spec, list(spatial), 2, states))


def test_torch_compile_fullgraph(device):
    t = torch.rand(3, 1, 10, 12, dtype=torch.float64, device=device)

    def step(x):
        ind = ops.soft_indicator(x, (0.0,))
        return ops.spatial_stats_loss(ind, ops.soft_indicator(t, (0.0,)), reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.rand(3, 1, 10, 12, dtype=torch.float64, device=device, requires_grad=True)
    v1, v2 = step(x), compiled(x)
    g1 = torch.autograd.grad(v1, x)[0]
    g2 = torch.autograd.grad(v2, x)[0]
    assert torch.allclose(v1, v2, rtol=1e-12) and torch.allclose(g1, g2, rtol=1e-12)


@pytest.mark.parametrize("n_state,pairs", [(3, [(2, 2)]), (3, [(0, 2)]), (4, [(1, 3), (3, 1)]), (4, [(1, 2), (2, 2)])])
def test_partial_state_sets(n_state, pairs, device):
    """Pairs that name some of the states: the forward transforms only those (a view of a run of
    states, or index_select), the backward puts their gradients back by index_copy, others 0."""
    x = torch.rand((2, n_state, 6, 9), dtype=torch.float64)
    t = torch.rand((2, n_state, 6, 9), dtype=torch.float64)
    xd = x.detach().to(device).requires_grad_(True)
    out = ops.spatial_stats_loss(xd, t.to(device), correlations=pairs, reduction="none")
    xr = x.clone().requires_grad_(True)
    ref = reference.spatial_stats_loss_ref(xr, t, correlations=pairs, reduction="none")
    assert rel_err(out.cpu(), ref) < 1e-10
    w = torch.randn(2, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w.to(device)).sum(), xd)
    (gr,) = torch.autograd.grad((ref * w).sum(), xr)
    assert rel_err(g.cpu(), gr) < 1e-10
    used = sorted({s for p in pairs for s in p})
    assert torch.all(g[:, [s for s in range(n_state) if s not in used]] == 0)
    assert torch.all(g[:, used].abs().amax(dim=(0, 2, 3)) > 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_input(layout, device):
    x = torch.rand(3, 2, 8, 10, dtype=torch.float64)
    t = torch.rand(3, 2, 8, 10, dtype=torch.float64)
    view = strided_view(x, layout, device)
    assert not view.is_contiguous()
    pairs = [(0, 1), (1, 1)]
    xd = view.requires_grad_(True)
    out = ops.spatial_stats_loss(xd, t.to(device), correlations=pairs, reduction="none")
    xr = x.clone().requires_grad_(True)
    ref = reference.spatial_stats_loss_ref(xr, t, correlations=pairs, reduction="none")
    assert rel_err(out.cpu(), ref) < 1e-10
    (g,) = torch.autograd.grad(out.sum(), xd)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    assert rel_err(g.cpu(), gr) < 1e-10


# ----------------------------------------------------------------------------- the raw operators
# Registered operators are public (torch.compile calls them directly): each refuses bad arguments
# itself, before any kernel reads memory of the wrong type or on the wrong device.
def _xt(device, dtype=torch.float64):
    return (torch.rand(2, 2, 6, 7, dtype=dtype, device=device), torch.rand(2, 2, 6, 7, dtype=dtype, device=device))


def _loss(x, t, need_grad=True):
    return torch.ops.pymks_vae.stats_loss(x, t, [0], [1], 1.0, need_grad)


def _spectrum(device, dtype=torch.float64):
    return _loss(*_xt(device, dtype))[1]


def _loss_backward(grad, spectrum, spatial=(6, 7), n_state=2, states=(0, 1)):
    return torch.ops.pymks_vae.stats_loss_backward(grad, spectrum, list(spatial), n_state, list(states))


@pytest.mark.parametrize("call,exc,match", [
    (lambda d: _loss(_xt(d)[0], _xt(d)[1].float()), RuntimeError, "target has dtype Float but x has dtype Double"),
    (lambda d: _loss(_xt(d)[0].float(), _xt(d)[1]), RuntimeError, "target has dtype Double but x has dtype Float"),
    (lambda d: _loss(*_xt(d, torch.float16)), RuntimeError, "x must be float32 or float64, got Half"),
    (lambda d: _loss_backward(torch.ones(2, device=d), _spectrum(d)), RuntimeError,
     "grad has dtype Float but spectrum has dtype ComplexDouble"),
    (lambda d: _loss_backward(torch.ones(2, dtype=torch.float64, device=d), _spectrum(d, torch.float32)),
     RuntimeError, "grad has dtype Double but spectrum has dtype ComplexFloat"),
    (lambda d: _loss_backward(torch.ones(2, device=d), torch.rand(2, 2, 6, 4, device=d)), RuntimeError,
     "spectrum must be complex64 or complex128, got Float"),
    (lambda d: _loss_backward(torch.ones(2, dtype=torch.float64, device=d), _spectrum(d), spatial=(6, 8)),
     ValueError, "does not match spatial"),
    (lambda d: _loss_backward(torch.ones(2, dtype=torch.float64, device=d), _spectrum(d), states=(0, 2)),
     ValueError, "states must be increasing"),
    (lambda d: _loss_backward(torch.ones(2, dtype=torch.float64, device=d), _spectrum(d), states=(1, 0)),
     ValueError, "states must be increasing"),
])
def test_raw_ops_reject_bad_arguments(call, exc, match, device):
    with pytest.raises(exc, match=match):
        call(device)


@pytest.mark.cuda
@pytest.mark.parametrize("call,match", [
    (lambda: _loss(_xt("cuda")[0], _xt("cpu")[1]), "target is on cpu but x is on cuda:0"),
    (lambda: _loss(_xt("cpu")[0], _xt("cuda")[1]), "target is on cuda:0 but x is on cpu"),
    (lambda: _loss_backward(torch.ones(2, dtype=torch.float64), _spectrum("cuda")), "grad is on cpu but spectrum is on cuda"),
    (lambda: _loss_backward(torch.ones(2, dtype=torch.float64, device="cuda"), _spectrum("cpu")),
     "grad is on cuda:0 but spectrum is on cpu"),
])
def test_cuda_raw_ops_reject_mixed_devices(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- soft indicator
def test_soft_indicator_values_and_gradient():
    x = torch.rand(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    ind = ops.soft_indicator(x, (0.0, 1.0), eps=0.25)
    assert ind.shape == (2, 2, 5, 6)
    want = np.exp(-((x.detach().numpy() - np.array([0.0, 1.0]).reshape(1, 2, 1, 1)) ** 2) / (2 * 0.25**2))
    assert np.allclose(ind.detach().numpy(), want, rtol=1e-14)
    assert torch.autograd.gradcheck(lambda v: ops.soft_indicator(v, (0.3,), eps=0.1), (x,))
    assert ops.soft_indicator(torch.zeros(1, 1, 3), (0.0,)).eq(1).all()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.soft_indicator(torch.rand(2, 2, 4), (0.0,)), ValueError, "one channel"),
    (lambda: ops.soft_indicator(torch.rand(2, 1, 4), ()), ValueError, "non-empty"),
    (lambda: ops.soft_indicator(torch.rand(2, 1, 4), ("a",)), TypeError, "states"),
    (lambda: ops.soft_indicator(torch.rand(2, 1, 4), (0.0,), eps=0), ValueError, "eps"),
    (lambda: ops.soft_indicator(torch.ones(2, 1, 4, dtype=torch.int32), (0.0,)), TypeError, "float32 or float64"),
])
def test_soft_indicator_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------- bad input
def _r(*shape, dtype=torch.float64):
    return torch.rand(shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 9)), ValueError, "target shape"),
    (lambda: ops.spatial_stats_loss(_r(2, 8), _r(2, 8)), ValueError, "x must have shape"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8, dtype=torch.float32)), TypeError, "target dtype"),
    (lambda: ops.spatial_stats_loss(torch.ones(2, 1, 8, dtype=torch.int64), _r(2, 1, 8)), TypeError, "float32 or float64"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), reduction="avg"), ValueError, "reduction"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8).requires_grad_()), ValueError, "target requires grad"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), scale=float("nan")), TypeError, "scale"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), correlations=[(0, 1)]), ValueError, "names state 1"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), cutoff=4), ValueError, "cutoff 4 too large"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), weight=_r(3, 8)), ValueError, "weight shape"),
    (lambda: ops.spatial_stats_loss(_r(2, 1, 8), _r(2, 1, 8), weight=_r(8) * float("nan")), ValueError, "weight contains NaN"),
    (lambda: ops.spatial_stats_loss(_r(0, 1, 8), _r(0, 1, 8)), ValueError, "empty batch"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("where", ["x", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cutoff", [None, 2])
def test_nan_inf_rejected(where, bad, cutoff):
    x, t = _r(2, 1, 8, 8), _r(2, 1, 8, 8)
    (x if where == "x" else t)[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ops.spatial_stats_loss(x, t, cutoff=cutoff)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(9,), (8, 8), (6, 7), (4, 5, 6)])
@pytest.mark.parametrize("pairs", [[(0, 0)], [(0, 1), (1, 1)]])
def test_cuda_matches_cpu(spatial, pairs):
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        x = torch.rand((3, 2) + spatial, dtype=dtype)
        t = torch.rand((3, 2) + spatial, dtype=dtype)
        for red in REDUCTIONS:
            c_out, c_g, w = value_and_grad(lambda a, b: ops.spatial_stats_loss(a, b, correlations=pairs, reduction=red), x, t)
            xg = x.cuda().requires_grad_(True)
            g_out = ops.spatial_stats_loss(xg, t.cuda(), correlations=pairs, reduction=red)
            (g_g,) = torch.autograd.grad((g_out * w.cuda()).sum(), xg)
            assert rel_err(g_out.cpu(), c_out) < tol and rel_err(g_g.cpu(), c_g) < tol


@pytest.mark.cuda
def test_cuda_opcheck_and_errors():
    x = torch.rand(2, 2, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.rand(2, 2, 6, 7, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss.default, (x, t, [0], [1], 1.0, True))
    assert torch.autograd.gradcheck(lambda v: ops.spatial_stats_loss(v, t, correlations=[(0, 1)]), (x,))
    bad = t.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        ops.spatial_stats_loss(x, bad)


@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(1030, 1030), (104, 104, 104)])
def test_cuda_grids_past_2_20_elements(spatial):
    """More than 2^20 spectral bins per batch: the loss kernel's threads (4096 blocks of 256 at most)
    walk several bins each; values and gradients against the CPU kernels."""
    x = torch.rand((2, 2) + spatial, dtype=torch.float64)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64)
    assert math.prod(spatial) > 2**20
    pairs = [(0, 1), (1, 1)]
    c_out, c_g, w = value_and_grad(lambda a, b: ops.spatial_stats_loss(a, b, correlations=pairs, reduction="none"), x, t)
    xg = x.cuda().requires_grad_(True)
    g_out = ops.spatial_stats_loss(xg, t.cuda(), correlations=pairs, reduction="none")
    (g_g,) = torch.autograd.grad((g_out * w.cuda()).sum(), xg)
    assert rel_err(g_out.cpu(), c_out) < 1e-10 and rel_err(g_g.cpu(), c_g) < 1e-10


@pytest.mark.cuda
def test_cuda_second_device():
    """On cuda:1 while cuda:0 is current: the loss and its gradient stay there and match the CPU."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs; this machine has {torch.cuda.device_count()}")
    dev = torch.device("cuda:1")
    x = torch.rand(3, 2, 9, 10, dtype=torch.float64)
    t = torch.rand(3, 2, 9, 10, dtype=torch.float64)
    c_out, c_g, w = value_and_grad(lambda a, b: ops.spatial_stats_loss(a, b, correlations=[(0, 1)], reduction="none"), x, t)
    with torch.cuda.device(0):
        xg = x.to(dev).requires_grad_(True)
        out = ops.spatial_stats_loss(xg, t.to(dev), correlations=[(0, 1)], reduction="none")
        (g,) = torch.autograd.grad((out * w.to(dev)).sum(), xg)
        assert out.device == dev and g.device == dev and torch.cuda.current_device() == 0
    assert rel_err(out.cpu(), c_out) < 1e-10 and rel_err(g.cpu(), c_g) < 1e-10
    with pytest.raises(RuntimeError, match="target is on cuda:0 but x is on cuda:1"):
        _loss(x.to(dev), t.to("cuda:0"))


@pytest.mark.cuda
def test_cuda_torch_compile_inductor():
    """A training-like step (indicator, loss, gradient) compiled by inductor on the GPU, float32."""
    require("triton")
    t = torch.rand(4, 1, 32, 32, device="cuda")

    def step(x):
        return ops.spatial_stats_loss(ops.soft_indicator(x, (0.0,)), ops.soft_indicator(t, (0.0,)), reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x = torch.rand(4, 1, 32, 32, device="cuda", requires_grad=True)
    v1, v2 = step(x), compiled(x)
    g1 = torch.autograd.grad(v1, x)[0]
    g2 = torch.autograd.grad(v2, x)[0]
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7 * float(g1.abs().max()))


def test_batches_larger_than_a_cache_chunk():
    """The CPU kernels run large batches of small fields in cache-sized chunks (26 samples of this
    size): values and gradients of every chunk must match the reference."""
    x = torch.rand(30, 1, 128, 128, dtype=torch.float64)
    t = torch.rand(30, 1, 128, 128, dtype=torch.float64)
    for reduction in REDUCTIONS:
        out, g, w = value_and_grad(lambda a, b: ops.spatial_stats_loss(a, b, reduction=reduction), x, t)
        xr = x.clone().requires_grad_(True)
        ref = reference.spatial_stats_loss_ref(xr, t, reduction=reduction)
        (gr,) = torch.autograd.grad((ref * w).sum(), xr)
        assert rel_err(out, ref) < 1e-10 and rel_err(g, gr) < 1e-10


@pytest.mark.parametrize("cutoff", [None, 2], ids=["fused", "windowed"])
def test_reduction_conventions(cutoff):
    """"mean" divides by every element (as torch.nn.MSELoss), "batchmean" by the batch only."""
    x = torch.rand(3, 2, 7, 6, dtype=torch.float64)
    t = torch.rand(3, 2, 7, 6, dtype=torch.float64)
    pairs = ((0, 0), (0, 1))
    fx, ft = (ops.two_point_stats(v, pairs, cutoff=cutoff) for v in (x, t))
    mse = torch.nn.functional.mse_loss(1.5 * fx, 1.5 * ft)
    got = {red: ops.spatial_stats_loss(x, t, correlations=pairs, cutoff=cutoff, scale=1.5, reduction=red)
           for red in REDUCTIONS}
    torch.testing.assert_close(got["mean"], mse)
    torch.testing.assert_close(got["batchmean"], mse * fx[0].numel())
    torch.testing.assert_close(got["sum"], mse * fx.numel())
    torch.testing.assert_close(got["none"].sum(), got["sum"])
