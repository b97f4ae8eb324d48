"""The general fused loss (a lag window, per-lag weights, non-periodic statistics): values and
gradients against the torch.fft/autograd reference, gradcheck, opcheck, bad arguments of the raw
operators, and CUDA against CPU."""
import pytest
import torch

from pymks_vae import ops, reference
from layouts import LAYOUTS, strided_view

REDUCTIONS = ["sum", "batchmean", "mean", "none"]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def loss_and_grad(fn, x, t, w=None, **kw):
    xr = x.detach().clone().requires_grad_(True)
    out = fn(xr, t, **kw)
    if w is None:
        w = torch.randn(out.shape, dtype=out.dtype)
    (g,) = torch.autograd.grad((out * w.to(out.device)).sum(), xr)
    return out, g, w


CASES = [  # spatial, periodic, cutoff, weighted
    ((9,), True, 2, False), ((8,), False, None, True), ((10,), False, 3, False),
    ((6, 7), True, 2, True), ((8, 8), True, (3, 1), False), ((7, 6), False, None, False),
    ((8, 9), False, 2, True), ((5, 5), True, None, True),
    ((4, 5, 6), True, 1, False), ((4, 5, 4), False, (1, 2, 1), True), ((3, 4, 4), False, None, False),
]


@pytest.mark.parametrize("spatial,periodic,cutoff,weighted", CASES)
@pytest.mark.parametrize("pairs", [[(0, 0)], [(0, 1)], [(1, 0), (0, 0), (1, 1), (0, 1)]])
def test_general_loss_matches_reference(spatial, periodic, cutoff, weighted, pairs):
    x = torch.rand((3, 2) + spatial, dtype=torch.float64)
    t = torch.rand((3, 2) + spatial, dtype=torch.float64)
    window = reference.window_shape(spatial, cutoff)
    weight = torch.rand((len(pairs),) + window, dtype=torch.float64) if weighted else None
    kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, weight=weight, scale=1.3)
    for red in REDUCTIONS:
        out, g, w = loss_and_grad(ops.spatial_stats_loss, x, t, reduction=red, **kw)
        ref, gr, _ = loss_and_grad(reference.spatial_stats_loss_ref, x, t, w=w, reduction=red, **kw)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-10 and rel_err(g, gr) < 1e-10


def test_general_loss_takes_the_fused_kernel(monkeypatch):
    """A window, weights or zero padding run the general fused operator, not two_point_stats."""
    def no_operator(*args, **kwargs):
        raise AssertionError("the loss fell back to two_point_stats")

    monkeypatch.setattr(ops, "two_point_stats", no_operator)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for kw in (dict(cutoff=2), dict(periodic=False), dict(weight=torch.rand(8, 8, dtype=torch.float64))):
        ops.spatial_stats_loss(x, t, **kw).backward()


def test_raw_loss_operator_outputs():
    x = torch.rand(2, 3, 7, 8, dtype=torch.float64)
    t = torch.rand(2, 3, 7, 8, dtype=torch.float64)
    pairs = [(2, 2), (0, 2)]
    for periodic in (True, False):
        values, gw, xh, go = torch.ops.pymks_vae.stats_loss_window(x, t, [0, 2], [2, 2], periodic, [5, 3], None, None,
                                                                   2.0, True)
        want = reference.spatial_stats_loss_ref(x, t, correlations=[(0, 2), (2, 2)], periodic=periodic,
                                                cutoff=(2, 1), scale=2.0, reduction="none")
        assert rel_err(values, want) < 1e-10
        assert gw.shape == (2, 2, 5, 3)
        grid = ops._grid((7, 8), (5, 3), periodic)
        assert xh.shape == (2, 2, grid[1] // 2 + 1, grid[0]) and xh.dtype == torch.complex128  # first axis last
        assert go.numel() == 0  # no offset
        values2, gw2, xh2, _ = torch.ops.pymks_vae.stats_loss_window(x, t, [0, 2], [2, 2], periodic, [5, 3], None, None,
                                                                     2.0, False)
        assert gw2.numel() == 0 and xh2.numel() == 0 and torch.equal(values, values2)
        # Auto pairs alone (at most one per state) keep the spectra in the natural layout, the
        # spectra of x itself; the gradient through them is the reference's.
        xr = x.clone().requires_grad_(True)
        values, gw, xh, _ = torch.ops.pymks_vae.stats_loss_window(xr, t, [2, 0], [2, 0], periodic, [5, 3], None, None,
                                                                  2.0, True)
        assert xh.shape == (2, 2, grid[0], grid[1] // 2 + 1)
        want_hat = torch.fft.rfftn(x[:, [0, 2]], s=grid, dim=(2, 3))
        assert rel_err(torch.view_as_real(xh), torch.view_as_real(want_hat)) < 1e-12
        (g,) = torch.autograd.grad(values.sum(), xr)
        xr2 = x.clone().requires_grad_(True)
        want = reference.spatial_stats_loss_ref(xr2, t, correlations=[(2, 2), (0, 0)], periodic=periodic,
                                                cutoff=(2, 1), scale=2.0, reduction="none")
        (g_want,) = torch.autograd.grad(want.sum(), xr2)
        assert rel_err(values, want) < 1e-10 and rel_err(g, g_want) < 1e-10
    del pairs


@pytest.mark.parametrize("n_state,pairs", [(3, [(2, 2)]), (3, [(0, 2)]), (4, [(1, 3), (3, 1)]), (4, [(1, 2), (2, 2)])])
def test_partial_state_sets(n_state, pairs, device):
    x = torch.rand((2, n_state, 6, 9), dtype=torch.float64)
    t = torch.rand((2, n_state, 6, 9), dtype=torch.float64)
    kw = dict(correlations=pairs, cutoff=2, periodic=False, reduction="none")
    out, g, w = loss_and_grad(ops.spatial_stats_loss, x.to(device), t.to(device), **kw)
    ref, gr, _ = loss_and_grad(reference.spatial_stats_loss_ref, x, t, w=w, **kw)
    assert rel_err(out, ref) < 1e-10 and rel_err(g, gr) < 1e-10
    used = sorted({s for p in pairs for s in p})
    assert torch.all(g[:, [s for s in range(n_state) if s not in used]] == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_input(layout, device):
    x = torch.rand(3, 2, 8, 10, dtype=torch.float64)
    t = torch.rand(3, 2, 8, 10, dtype=torch.float64)
    view = strided_view(x, layout, device)
    kw = dict(correlations=[(0, 1), (1, 1)], cutoff=3, reduction="none")
    xd = view.requires_grad_(True)
    out = ops.spatial_stats_loss(xd, t.to(device), **kw)
    (g,) = torch.autograd.grad(out.sum(), xd)
    ref, gr, _ = loss_and_grad(reference.spatial_stats_loss_ref, x, t, w=torch.ones(3, dtype=torch.float64), **kw)
    assert rel_err(out, ref) < 1e-10 and rel_err(g, gr) < 1e-10


@pytest.mark.parametrize("spatial,pairs", [((7,), [(0, 0)]), ((4, 5), [(0, 1), (1, 1)]), ((3, 3, 4), [(1, 0)])])
@pytest.mark.parametrize("periodic,cutoff,weighted", [(True, 1, False), (False, None, True), (False, 1, False),
                                                      (True, None, True)])
def test_gradcheck(spatial, pairs, periodic, cutoff, weighted):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, requires_grad=True)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64)
    window = reference.window_shape(spatial, cutoff)
    weight = torch.rand((len(pairs),) + window, dtype=torch.float64) if weighted else None
    for red in ("sum", "none"):
        assert torch.autograd.gradcheck(
            lambda v: ops.spatial_stats_loss(v, t, correlations=pairs, periodic=periodic, cutoff=cutoff, weight=weight,
                                             scale=0.7, reduction=red), (x,))


@pytest.mark.parametrize("spatial,pair,periodic,window", [((8,), (0, 1), True, [5]), ((5, 6), (1, 1), False, [3, 6]),
                                                          ((3, 4, 5), (0, 0), False, [3, 3, 3]),
                                                          ((6, 5), (1, 0), True, [6, 5])])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(spatial, pair, periodic, window, weighted, device):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand((2, 2) + spatial, dtype=torch.float64, device=device)
    weight = torch.rand([1] + window, dtype=torch.float64, device=device) if weighted else None
    op = torch.ops.pymks_vae.stats_loss_window
    torch.library.opcheck(op.default, (x, t, [pair[0]], [pair[1]], periodic, window, weight, None, 1.5, True))
    torch.library.opcheck(op.default, (x.detach(), t, [pair[0]], [pair[1]], periodic, window, weight, None, 1.0,
                                       False))
    off = torch.rand(2, 1, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(op.default, (x, t, [pair[0]], [pair[1]], periodic, window, weight, off, 1.5, True))
    _, gw, xh, _ = op(x.detach(), t, [pair[0]], [pair[1]], periodic, window, weight, None, 1.0, True)
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss_window_backward.default,
                          (torch.rand(2, dtype=torch.float64, device=device), gw, xh, [pair[0]], [pair[1]], 2,
                           list(spatial), periodic))


def test_torch_compile_fullgraph(device):
    t = torch.rand(3, 1, 10, 12, dtype=torch.float64, device=device)
    weight = torch.rand(5, 5, dtype=torch.float64, device=device)

    def step(x):
        ind = ops.soft_indicator(x, (0.0,))
        return ops.spatial_stats_loss(ind, ops.soft_indicator(t, (0.0,)), cutoff=2, weight=weight, periodic=False,
                                      reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.rand(3, 1, 10, 12, dtype=torch.float64, device=device, requires_grad=True)
    v1, v2 = step(x), compiled(x)
    g1 = torch.autograd.grad(v1, x)[0]
    g2 = torch.autograd.grad(v2, x)[0]
    assert torch.allclose(v1, v2, rtol=1e-12) and torch.allclose(g1, g2, rtol=1e-12)


def test_batches_larger_than_a_cache_chunk():
    """Large batches of small fields run in cache-sized chunks on the CPU: every chunk must match."""
    x = torch.rand(30, 1, 128, 128, dtype=torch.float64)
    t = torch.rand(30, 1, 128, 128, dtype=torch.float64)
    for kw in (dict(cutoff=7), dict(periodic=False, cutoff=20)):
        out, g, w = loss_and_grad(ops.spatial_stats_loss, x, t, reduction="none", **kw)
        ref, gr, _ = loss_and_grad(reference.spatial_stats_loss_ref, x, t, w=w, reduction="none", **kw)
        assert rel_err(out, ref) < 1e-10 and rel_err(g, gr) < 1e-10


def test_float32_close_to_float64():
    x = torch.rand(4, 2, 32, 32)
    t = torch.rand(4, 2, 32, 32)
    kw = dict(correlations=[(0, 0), (0, 1)], cutoff=7, periodic=False, reduction="none")
    a, ga, w = loss_and_grad(ops.spatial_stats_loss, x, t, **kw)
    b, gb, _ = loss_and_grad(ops.spatial_stats_loss, x.double(), t.double(), w=w.double(), **kw)
    assert a.dtype == ga.dtype == torch.float32
    assert rel_err(a, b) < 1e-4 and rel_err(ga, gb) < 1e-4


def test_no_grad_forward_and_missing_gradient():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = ops.spatial_stats_loss(x, t, cutoff=2, reduction="none")
    assert not a.requires_grad
    assert rel_err(a, reference.spatial_stats_loss_ref(x.detach(), t, cutoff=2, reduction="none")) < 1e-10


@pytest.mark.parametrize("where", ["x", "target"])
@pytest.mark.parametrize("kw", [dict(cutoff=2), dict(periodic=False)])
def test_nan_rejected(where, kw):
    x, t = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    (x if where == "x" else t)[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        ops.spatial_stats_loss(x, t, **kw)


# ----------------------------------------------------------------------------- raw operators, bad arguments
def _xt(device, dtype=torch.float64):
    return torch.rand(2, 2, 6, 7, dtype=dtype, device=device), torch.rand(2, 2, 6, 7, dtype=dtype, device=device)


def _fwd(x, t, window=(3, 3), weight=None, pi=(0,), pj=(1,), periodic=True):
    return torch.ops.pymks_vae.stats_loss_window(x, t, list(pi), list(pj), periodic, list(window), weight, None, 1.0,
                                                 True)


def _saved(device, dtype=torch.float64, periodic=True):
    _, gw, xh, _ = _fwd(*_xt(device, dtype), periodic=periodic)
    return gw, xh


def _bwd(grad, gw, xh, spatial=(6, 7), periodic=True, n_state=2, pi=(0,), pj=(1,)):
    return torch.ops.pymks_vae.stats_loss_window_backward(grad, gw, xh, list(pi), list(pj), n_state, list(spatial),
                                                          periodic)


def _ones(device, dtype=torch.float64, n=2):
    return torch.ones(n, dtype=dtype, device=device)


@pytest.mark.parametrize("call,exc,match", [
    (lambda d: _fwd(_xt(d)[0], _xt(d)[1].float()), RuntimeError, "target has dtype Float but x has dtype Double"),
    (lambda d: _fwd(*_xt(d, torch.float16)), RuntimeError, "x must be float32 or float64, got Half"),
    (lambda d: _fwd(_xt(d)[0], _xt(d)[1][:, :1]), ValueError, "target shape"),
    (lambda d: _fwd(*_xt(d), window=(3,)), ValueError, "window has 1 entries for 2 spatial dims"),
    (lambda d: _fwd(*_xt(d), window=(7, 3)), ValueError, "does not fit spatial size"),
    (lambda d: _fwd(*_xt(d), pi=(0,), pj=(2,)), ValueError, "out of range"),
    (lambda d: _fwd(*_xt(d), weight=torch.ones(1, 3, 2, dtype=torch.float64, device=d)), ValueError,
     "weight has shape"),
    (lambda d: _fwd(*_xt(d), weight=torch.ones(1, 3, 3, device=d)), RuntimeError,
     "weight has dtype Float but x has dtype Double"),
    (lambda d: _bwd(_ones(d, torch.float32), *_saved(d)), RuntimeError, "grad has dtype Float but x_hat"),
    (lambda d: _bwd(_ones(d), _saved(d)[0].float(), _saved(d)[1]), RuntimeError, "grad_window has dtype Float"),
    (lambda d: _bwd(_ones(d), _saved(d)[0], _saved(d)[0]), RuntimeError, "x_hat must be complex64 or complex128"),
    (lambda d: _bwd(_ones(d), *_saved(d), spatial=(6, 8)), ValueError, "x_hat has shape"),
    (lambda d: _bwd(_ones(d), *_saved(d), periodic=False), ValueError, "x_hat has shape"),
    (lambda d: _bwd(_ones(d, n=3), *_saved(d)), ValueError, r"grad must have shape \(2,\)"),
    (lambda d: _bwd(_ones(d), *_saved(d), pi=(0, 1), pj=(1, 1)), ValueError, "grad_window has shape"),
    (lambda d: _bwd(_ones(d), *_saved(d), n_state=1), ValueError, "out of range"),
    (lambda d: _bwd(_ones(d), *_saved(d), spatial=(6, 7, 5)), ValueError, "grad_window has shape"),
])
def test_raw_ops_reject_bad_arguments(call, exc, match, device):
    with pytest.raises(exc, match=match):
        call(device)


def test_loss_grid_sizes():
    """Padded grids are even, 7-smooth, with at most one factor 7 (fast for MKL, cuFFT and pocketfft);
    2D grids take a power of two within 6% instead."""
    assert [ops._fast_fft_len(n) for n in (1, 9, 67, 244, 336, 1031)] == [2, 10, 70, 250, 336, 1050]
    pow2 = [ops._fast_fft_len(n, prefer_pow2=True) for n in (1, 9, 67, 121, 125, 244, 500, 543)]
    assert pow2 == [2, 10, 70, 128, 128, 256, 512, 560]
    assert ops._grid((224, 224), (41, 41), False) == (256, 256)
    assert ops._grid((224,), (41,), False) == (250,) and ops._grid((224, 10, 10), (41, 3, 3), False)[0] == 250
    # The drivers pad to the same grid (the kept spectra's shape).
    x = torch.rand(1, 1, 224, 30, dtype=torch.float64)
    xh = torch.ops.pymks_vae.stats_loss_window(x, x, [0], [0], False, [41, 5], None, None, 1.0, True)[2]
    assert ops._grid((224, 30), (41, 5), False) == (256, 32) and xh.shape == (1, 1, 256, 32 // 2 + 1)


def test_public_errors_name_the_argument():
    x, t = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight shape"):
        ops.spatial_stats_loss(x, t, cutoff=2, weight=torch.rand(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cutoff 4 too large"):
        ops.spatial_stats_loss(x, t, cutoff=4, periodic=False)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("spatial,periodic,cutoff,weighted", CASES)
@pytest.mark.parametrize("pairs", [[(0, 0), (0, 1), (1, 1)], [(1, 1), (0, 0)]])  # moved and natural layouts
def test_cuda_matches_cpu(spatial, periodic, cutoff, weighted, pairs):
    window = reference.window_shape(spatial, cutoff)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        x = torch.rand((3, 2) + spatial, dtype=dtype)
        t = torch.rand((3, 2) + spatial, dtype=dtype)
        weight = torch.rand((len(pairs),) + window, dtype=dtype) if weighted else None
        kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, reduction="none")
        c_out, c_g, w = loss_and_grad(ops.spatial_stats_loss, x, t, weight=weight, **kw)
        g_out, g_g, _ = loss_and_grad(ops.spatial_stats_loss, x.cuda(), t.cuda(), w=w,
                                      weight=None if weight is None else weight.cuda(), **kw)
        assert g_out.is_cuda and g_g.is_cuda
        assert rel_err(g_out, c_out) < tol and rel_err(g_g, c_g) < tol


@pytest.mark.cuda
def test_cuda_large_grid_and_gradcheck():
    """More lags than one launch's threads (4096 blocks of 256), and gradcheck on the GPU."""
    x = torch.rand(2, 2, 1100, 1030, dtype=torch.float64)
    t = torch.rand(2, 2, 1100, 1030, dtype=torch.float64)
    kw = dict(correlations=[(0, 1), (1, 1)], periodic=False, reduction="none")
    c_out, c_g, w = loss_and_grad(ops.spatial_stats_loss, x, t, **kw)
    g_out, g_g, _ = loss_and_grad(ops.spatial_stats_loss, x.cuda(), t.cuda(), w=w, **kw)
    assert rel_err(g_out, c_out) < 1e-10 and rel_err(g_g, c_g) < 1e-10
    xs = torch.rand(2, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    ts = torch.rand(2, 2, 5, 6, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda v: ops.spatial_stats_loss(v, ts, correlations=[(0, 1)], cutoff=2,
                                                                     periodic=False), (xs,))


@pytest.mark.cuda
@pytest.mark.parametrize("call,match", [
    (lambda: _fwd(_xt("cuda")[0], _xt("cpu")[1]), "target is on cpu but x is on cuda:0"),
    (lambda: _fwd(*_xt("cuda"), weight=torch.ones(1, 3, 3, dtype=torch.float64)), "weight is on cpu but x is on cuda"),
    (lambda: _bwd(_ones("cpu"), *_saved("cuda")), "grad is on cpu but x_hat is on cuda"),
    (lambda: _bwd(_ones("cuda"), _saved("cpu")[0], _saved("cuda")[1]), "grad_window is on cpu but x_hat is on cuda"),
])
def test_cuda_raw_ops_reject_mixed_devices(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- the operator's backward
# With x requiring grad, ops.two_point_stats runs two_point_stats_spectra, whose forward pass keeps the
# spectra of x, and its backward two_point_stats_backward_spectra transforms no field again.
def _fields(kind, shape):
    if kind == "rand":
        return torch.rand(shape, dtype=torch.float64)
    labels = (torch.rand((shape[0],) + shape[2:]) * shape[1]).long()  # one-hot: a partition, binary
    return torch.nn.functional.one_hot(labels, shape[1]).movedim(-1, 1).to(torch.float64).contiguous()


OP_CASES = [  # spatial, periodic, cutoff
    ((9,), True, None), ((8,), False, 2), ((6, 7), True, 2), ((8, 8), False, None), ((7, 6), True, (3, 1)),
    ((4, 5, 6), True, 1), ((4, 5, 4), False, None), ((3, 4, 4), True, None),
]


@pytest.mark.parametrize("spatial,periodic,cutoff", OP_CASES)
@pytest.mark.parametrize("kind", ["rand", "onehot"])
@pytest.mark.parametrize("masked", [None, "shared", "per_sample"])
def test_operator_gradient_matches_reference(spatial, periodic, cutoff, kind, masked, device):
    pairs = [(1, 1), (0, 1), (2, 0), (0, 0)]
    x = _fields(kind, (3, 3) + spatial)
    mask = None
    if masked:
        mask = (torch.rand(((3,) if masked == "per_sample" else ()) + spatial, dtype=torch.float64) > 0.3).double()
    kw = dict(periodic=periodic, cutoff=cutoff)
    xd = x.to(device).requires_grad_(True)
    f = ops.two_point_stats(xd, pairs, mask=None if mask is None else mask.to(device), **kw)
    w = torch.randn(f.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((f * w.to(device)).sum(), xd)
    xr = x.clone().requires_grad_(True)
    ref = reference.two_point_stats_ref(xr, pairs, mask=mask, **kw)
    (gr,) = torch.autograd.grad((ref * w).sum(), xr)
    assert rel_err(f, ref) < 1e-10 and rel_err(g, gr) < 1e-10


# In 2D with a window of at most a quarter of the grid, the backward takes an auto pair alone on
# its state through the even part of its window (no mask), the other pairs through the embedded
# gradient: every mix of the two, a state with two auto pairs (neither even), states no pair
# reaches; and the cases that take the embedded gradient for every pair (larger windows, 3D).
@pytest.mark.parametrize("pairs", [[(1, 1), (0, 0)], [(2, 2)], [(0, 0), (0, 0), (1, 1)], [(0, 1), (1, 1), (2, 2)]])
@pytest.mark.parametrize("spatial,periodic,cutoff", [((12, 11), True, 2), ((13, 12), False, 2), ((10, 9), False, 1),
                                                     ((6, 7), True, 2), ((8, 7), False, None),
                                                     ((4, 5, 6), False, 1), ((4, 4, 5), True, None)])
def test_operator_gradient_even_and_embedded_pairs(spatial, periodic, cutoff, pairs, device):
    x = torch.rand((2, 3) + spatial, dtype=torch.float64)
    kw = dict(periodic=periodic, cutoff=cutoff)
    xd = x.to(device).requires_grad_(True)
    f = ops.two_point_stats(xd, pairs, **kw)
    w = torch.randn(f.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((f * w.to(device)).sum(), xd)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((reference.two_point_stats_ref(xr, pairs, **kw) * w).sum(), xr)
    assert rel_err(g, gr) < 1e-10
    used = {s for p in pairs for s in p}
    assert all(torch.all(g[:, s] == 0) for s in range(3) if s not in used)
    # the gradient of .sum(), which reaches the backward expanded (every stride 0)
    xs = x.to(device).requires_grad_(True)
    ops.two_point_stats(xs, pairs, **kw).sum().backward()
    xr2 = x.clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(reference.two_point_stats_ref(xr2, pairs, **kw).sum(), xr2)
    assert rel_err(xs.grad, gs) < 1e-10


# Windows of even size (the raw operators take any window; the public functions 2*cutoff+1), on the
# natural-layout loss and on the operator's even split: gradcheck of the raw operators.
@pytest.mark.parametrize("periodic", [True, False])
def test_even_size_windows_gradcheck(periodic):
    x = torch.rand(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 2, 6, 8, dtype=torch.float64)
    for window in ([4, 6], [2, 3], [6, 8]):
        assert torch.autograd.gradcheck(
            lambda v: torch.ops.pymks_vae.stats_loss_window(v, t, [1, 0], [1, 0], periodic, window, None, None, 1.1,
                                                            True)[0], (x,))
    x = torch.rand(2, 2, 4, 16, dtype=torch.float64, requires_grad=True)  # window a quarter of the grid or less
    for window in ([4, 3], [2, 4]):
        assert torch.autograd.gradcheck(
            lambda v: torch.ops.pymks_vae.two_point_stats_spectra(v, [1, 0], [1, 1], periodic, window, None, 0)[0],
            (x,))


def test_loss_values_without_gradient_on_several_threads():
    # The CPU window pass writes the gradient it does not keep into per-thread scratch rows.
    x = torch.rand(64, 1, 24, 24, dtype=torch.float64)
    t = torch.rand(64, 1, 24, 24, dtype=torch.float64)
    op = torch.ops.pymks_vae.stats_loss_window
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for periodic in (True, False):
            with_grad = op(x, t, [0], [0], periodic, [7, 7], None, None, 1.0, True)[0]
            without = op(x, t, [0], [0], periodic, [7, 7], None, None, 1.0, False)[0]
            assert torch.equal(with_grad, without)
    finally:
        torch.set_num_threads(threads)


def test_operator_takes_the_spectra_variant():
    # The backward pass runs from the kept spectra (its autograd is C++, so the dispatcher's
    # record of the ops run is what shows it).
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    with torch.profiler.profile() as prof:
        ops.two_point_stats(x, [(0, 1)], cutoff=2).sum().backward()
    names = {e.name for e in prof.events()}
    assert "pymks_vae::two_point_stats_spectra" in names
    assert "pymks_vae::two_point_stats_backward_spectra" in names
    assert "pymks_vae::two_point_stats_backward" not in names


@pytest.mark.parametrize("spatial,pairs", [((7,), [(0, 0)]), ((4, 5), [(0, 1), (1, 1)]), ((3, 3, 4), [(1, 0)])])
@pytest.mark.parametrize("periodic,cutoff,masked", [(True, None, False), (False, 1, True), (True, 1, True)])
def test_operator_gradcheck(spatial, pairs, periodic, cutoff, masked):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(spatial, dtype=torch.float64) > 0.2).double() if masked else None
    assert torch.autograd.gradcheck(
        lambda v: ops.two_point_stats(v, pairs, periodic=periodic, cutoff=cutoff, mask=mask), (x,))


@pytest.mark.parametrize("spatial,periodic,window,masked,partition", [
    ((8,), True, [5], False, 0), ((5, 6), False, [3, 6], True, 0), ((3, 4, 5), True, [3, 3, 5], False, 1),
    ((6, 5), True, [6, 5], False, 2),
])
def test_operator_opcheck(spatial, periodic, window, masked, partition, device):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, device=device)
    if partition:
        x[:, 1] = 1 - x[:, 0]
    x.requires_grad_(True)
    mask = torch.rand((1,) + spatial, dtype=torch.float64, device=device) if masked else None
    args = (x, [0, 1], [1, 1], periodic, window, mask, partition)
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats_spectra.default, args)
    f, xh = torch.ops.pymks_vae.two_point_stats_spectra(*args)
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats_backward_spectra.default,
                          (torch.rand_like(f), xh, [0, 1], [1, 1], 2, list(spatial), periodic, mask))


def test_operator_spectra_are_those_of_the_masked_fields():
    x = torch.rand(2, 3, 7, 6, dtype=torch.float64)
    mask = torch.rand(1, 7, 6, dtype=torch.float64)
    f, xh = torch.ops.pymks_vae.two_point_stats_spectra(x, [2, 0], [2, 2], False, [5, 3], mask, 0)
    want = torch.fft.rfftn((x * mask.unsqueeze(1))[:, [0, 2]], s=ops._grid((7, 6), (5, 3), False), dim=(2, 3))
    assert torch.allclose(xh, want, rtol=0, atol=1e-12)
    assert torch.equal(f, torch.ops.pymks_vae.two_point_stats(x, [2, 0], [2, 2], False, [5, 3], mask, 0))


def _op_saved(device, dtype=torch.float64):
    x = torch.rand(2, 2, 6, 7, dtype=dtype, device=device)
    return torch.ops.pymks_vae.two_point_stats_spectra(x, [0], [1], True, [3, 3], None, 0)


def _op_bwd(grad, xh, spatial=(6, 7), periodic=True, n_state=2, mask=None, pi=(0,), pj=(1,)):
    return torch.ops.pymks_vae.two_point_stats_backward_spectra(grad, xh, list(pi), list(pj), n_state, list(spatial),
                                                                periodic, mask)


@pytest.mark.parametrize("call,exc,match", [
    (lambda d: _op_bwd(_op_saved(d)[0].float(), _op_saved(d)[1]), RuntimeError, "grad has dtype Float but x_hat"),
    (lambda d: _op_bwd(_op_saved(d)[0], _op_saved(d)[0]), RuntimeError, "x_hat must be complex64 or complex128"),
    (lambda d: _op_bwd(*_op_saved(d), spatial=(6, 8)), ValueError, "x_hat has shape"),
    (lambda d: _op_bwd(*_op_saved(d), periodic=False), ValueError, "x_hat has shape"),
    (lambda d: _op_bwd(*_op_saved(d), n_state=1), ValueError, "out of range"),
    (lambda d: _op_bwd(*_op_saved(d), pi=(0, 1), pj=(1, 1)), ValueError, "grad has shape"),
    (lambda d: _op_bwd(*_op_saved(d), mask=torch.ones(1, 6, 6, dtype=torch.float64, device=d)), ValueError,
     "mask has shape"),
    (lambda d: _op_bwd(*_op_saved(d), mask=torch.ones(1, 6, 7, device=d)), RuntimeError, "mask has dtype Float"),
    (lambda d: torch.ops.pymks_vae.two_point_stats_spectra(torch.rand(2, 2, 6, dtype=torch.float64, device=d), [0],
                                                           [1], True, [7], None, 0), ValueError, "does not fit"),
])
def test_operator_raw_ops_reject_bad_arguments(call, exc, match, device):
    with pytest.raises(exc, match=match):
        call(device)


@pytest.mark.cuda
@pytest.mark.parametrize("spatial,periodic,cutoff", OP_CASES + [((16, 16), True, 2), ((15, 16), False, 2)])
def test_cuda_operator_backward_matches_cpu(spatial, periodic, cutoff):
    pairs = [(1, 1), (0, 1)]
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        for kind in ("rand", "onehot"):
            x = _fields(kind, (3, 2) + spatial).to(dtype)
            mask = (torch.rand(spatial) > 0.3).to(dtype)
            for m in (None, mask):
                kw = dict(periodic=periodic, cutoff=cutoff)
                xc = x.clone().requires_grad_(True)
                fc = ops.two_point_stats(xc, pairs, mask=m, **kw)
                w = torch.randn(fc.shape, dtype=dtype)
                (gc,) = torch.autograd.grad((fc * w).sum(), xc)
                xg = x.cuda().requires_grad_(True)
                fg = ops.two_point_stats(xg, pairs, mask=None if m is None else m.cuda(), **kw)
                (gg,) = torch.autograd.grad((fg * w.cuda()).sum(), xg)
                assert gg.is_cuda and rel_err(fg, fc) < tol and rel_err(gg, gc) < tol


@pytest.mark.cuda
def test_cuda_operator_raw_ops_reject_mixed_devices():
    f, xh = _op_saved("cuda")
    with pytest.raises(RuntimeError, match="grad is on cpu but x_hat is on cuda"):
        _op_bwd(f.cpu(), xh)
    with pytest.raises(RuntimeError, match="mask is on cpu but x_hat is on cuda"):
        _op_bwd(f, xh, mask=torch.ones(1, 6, 7, dtype=torch.float64))


# ----------------------------------------------------------------------------- offsets (centred statistics)
@pytest.mark.parametrize("spatial,periodic,cutoff,weighted", CASES[::2])
def test_offset_matches_reference(spatial, periodic, cutoff, weighted, device):
    pairs = [(0, 0), (0, 1)]
    x = torch.rand((3, 2) + spatial, dtype=torch.float64)
    t = torch.rand((3, 2) + spatial, dtype=torch.float64)
    off = torch.randn(3, 2, dtype=torch.float64) * 0.1
    window = reference.window_shape(spatial, cutoff)
    weight = torch.rand((len(pairs),) + window, dtype=torch.float64) if weighted else None
    kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, scale=1.7, reduction="none")
    grads = []
    for fn, dev in ((ops.spatial_stats_loss, device), (reference.spatial_stats_loss_ref, torch.device("cpu"))):
        xr = x.to(dev).requires_grad_(True)
        o = off.to(dev).requires_grad_(True)
        out = fn(xr, t.to(dev), weight=None if weight is None else weight.to(dev), offset=o, **kw)
        w = torch.linspace(-1, 2, 3, dtype=torch.float64, device=dev)
        grads.append((out, *torch.autograd.grad((out * w).sum(), (xr, o))))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10


def test_offset_gradcheck_and_opcheck():
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 2, 5, 6, dtype=torch.float64)
    off = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, o: ops.spatial_stats_loss(v, t, correlations=[(0, 1), (1, 1)], cutoff=2, periodic=False, offset=o,
                                            reduction="none"), (x, off))
    torch.library.opcheck(torch.ops.pymks_vae.stats_loss_window.default,
                          (x, t, [0, 1], [1, 1], True, [5, 5], None, off, 1.3, True))
    # only the offset requires grad: values and dL/doffset, no gradient for x
    o = off.detach().requires_grad_(True)
    out = ops.spatial_stats_loss(x.detach(), t, correlations=[(0, 1), (1, 1)], cutoff=2, offset=o)
    (g,) = torch.autograd.grad(out, o)
    assert g.shape == (2, 2)
    # With weights too (a third tensor input before the offset): gradcheck of both, then each alone
    # against the gradients of both together.
    wt = torch.rand(2, 5, 5, dtype=torch.float64)

    def loss(v, o):
        return ops.spatial_stats_loss(v, t, correlations=[(0, 1), (1, 1)], cutoff=2, weight=wt, offset=o,
                                      reduction="none")
    assert torch.autograd.gradcheck(loss, (x, off))
    w = torch.tensor([0.3, -1.2], dtype=torch.float64)
    gx_both, go_both = torch.autograd.grad((loss(x, off) * w).sum(), (x, off))
    (go,) = torch.autograd.grad((loss(x.detach(), off) * w).sum(), off)
    (gx,) = torch.autograd.grad((loss(x, off.detach()) * w).sum(), x)
    assert torch.equal(go, go_both) and torch.equal(gx, gx_both)


def test_offset_bad_arguments():
    x, t = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"offset must have shape \(batch, n_corr\)"):
        ops.spatial_stats_loss(x, t, cutoff=2, offset=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="offset dtype"):
        ops.spatial_stats_loss(x, t, cutoff=2, offset=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="offset has shape"):
        torch.ops.pymks_vae.stats_loss_window(x, t, [0], [0], True, [5, 5], None, torch.zeros(3, 1, dtype=torch.float64),
                                              1.0, True)


def test_centred_windowed_loss_takes_the_fused_kernel(monkeypatch):
    """SpatialStatsLoss with centring and a window (the VAE's default at 64x64) runs the fused operator,
    with the same value and gradient as the statistics computed by two_point_stats."""
    from pymks_vae.losses import SpatialStatsLoss

    loss = SpatialStatsLoss(states=(0.0, 1.0), normalise="none", cutoff=3, centre=True, correlations=((0, 0), (0, 1)))
    x_hat = torch.rand(3, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    got = loss.stats_error(x_hat, x, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), x_hat)
    want = (loss.statistics(loss.indicators(x_hat)) - loss.target_statistics(x)).pow(2).flatten(1).sum(1)
    (gw,) = torch.autograd.grad(want.sum(), x_hat)
    assert rel_err(got, want) < 1e-10 and rel_err(g, gw) < 1e-10

    def no_operator(*args, **kwargs):
        raise AssertionError("the loss fell back to two_point_stats")

    monkeypatch.setattr(ops, "two_point_stats", no_operator)
    loss.stats_error(x_hat, x, reduction="none").sum().backward()


# ----------------------------------------------------------------------------- small 2D windows as matrix products
# Auto pairs alone (one per state) with a 2D window of a few rows per axis take cpu/even_gemm.cpp:
# the window's statistics and the gradient spectrum as cosine/sine products. The pruned transforms
# (the CUDA path's CPU twin) stay reachable with _set_even_gemm(False); the two must agree.
@pytest.fixture
def gemm_route():
    from pymks_vae import _extension
    C = _extension._C

    def run(enabled, fn):
        prev = C._set_even_gemm(enabled)
        try:
            return fn()
        finally:
            C._set_even_gemm(prev)
    return run


GEMM_CASES = [  # spatial, periodic, cutoff, weighted, pairs, n_state
    ((16, 16), True, 3, False, [(0, 0)], 1), ((17, 15), True, (4, 2), True, [(1, 1), (0, 0)], 2),
    ((20, 21), False, 3, True, [(2, 2)], 3), ((13, 18), False, None, False, [(0, 0), (1, 1)], 2),
    ((12, 14), True, None, True, [(1, 1)], 2), ((64, 64), True, 7, False, [(0, 0)], 1),
    ((30, 31), False, 5, True, [(0, 0), (2, 2), (1, 1)], 3),
]


@pytest.mark.parametrize("spatial,periodic,cutoff,weighted,pairs,n_state", GEMM_CASES)
def test_gemm_route_matches_pruned_transforms_and_reference(spatial, periodic, cutoff, weighted, pairs, n_state,
                                                             gemm_route):
    x = torch.rand((3, n_state) + spatial, dtype=torch.float64)
    t = torch.rand((3, n_state) + spatial, dtype=torch.float64)
    off = torch.randn(3, len(pairs), dtype=torch.float64) * 0.1
    window = reference.window_shape(spatial, cutoff)
    weight = torch.rand((len(pairs),) + window, dtype=torch.float64) if weighted else None
    kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, weight=weight, scale=1.3, reduction="none")
    w = torch.randn(3, dtype=torch.float64)
    results = {}
    for name, fn, enabled in (("gemm", ops.spatial_stats_loss, True), ("pruned", ops.spatial_stats_loss, False),
                              ("reference", reference.spatial_stats_loss_ref, True)):
        for o in (None, off):
            def run():
                xr = x.clone().requires_grad_(True)
                out = fn(xr, t, offset=o, **kw)
                return (out, *torch.autograd.grad((out * w).sum(), xr))
            results[name, o is None] = gemm_route(enabled, run)
    for key in (True, False):
        for a, b, c in zip(results["gemm", key], results["pruned", key], results["reference", key]):
            assert rel_err(a, b) < 1e-12 and rel_err(a, c) < 1e-10


def test_gemm_route_taken_and_gradcheck(gemm_route, monkeypatch):
    """The route is taken where it applies (the pruned path's kernels are not called), and its
    gradients pass gradcheck and opcheck, even and odd windows."""
    x = torch.rand(2, 2, 9, 12, dtype=torch.float64, requires_grad=True)
    t = torch.rand(2, 2, 9, 12, dtype=torch.float64)
    for periodic in (True, False):
        for window in ([5, 3], [4, 6], [9, 12]):
            def loss(v):
                return torch.ops.pymks_vae.stats_loss_window(v, t, [1, 0], [1, 0], periodic, window, None, None, 1.1,
                                                             True)[0]
            assert gemm_route(True, lambda: torch.autograd.gradcheck(loss, (x,)))
            if window == [4, 6]:
                gemm_route(True, lambda: torch.library.opcheck(
                    torch.ops.pymks_vae.stats_loss_window.default,
                    (x, t, [1, 0], [1, 0], periodic, window, None, None, 1.1, True)))
    # Taken: the pruned path's even transforms run through ATen's rfft of the power spectra; with
    # the route on, the forward pass makes no ATen transform (the fields' own go through DFTI).
    from pymks_vae import _extension
    if not _extension._C._mkl_dft_enabled():
        pytest.skip("needs the DFTI transforms to tell the routes apart")
    with torch.autograd.profiler.profile() as prof:
        gemm_route(True, lambda: torch.ops.pymks_vae.stats_loss_window(x, t, [1, 0], [1, 0], True, [5, 3], None, None,
                                                                       1.0, True))
    calls = [e.name for e in prof.function_events if e.name in ("aten::_fft_r2c", "aten::_fft_c2r")]
    assert calls == []
    with torch.autograd.profiler.profile() as prof:
        gemm_route(False, lambda: torch.ops.pymks_vae.stats_loss_window(x, t, [1, 0], [1, 0], True, [5, 3], None,
                                                                        None, 1.0, True))
    assert [e.name for e in prof.function_events if e.name in ("aten::_fft_r2c", "aten::_fft_c2r")]
    # The backward pass takes the products too where the window covers more than half the grid
    # (the whole window here), rather than the window placed on the grid and transformed whole.
    for enabled in (True, False):
        def backward_events():
            xr = x.detach().requires_grad_(True)
            out = torch.ops.pymks_vae.stats_loss_window(xr, t, [1, 0], [1, 0], True, [9, 12], None, None, 1.0, True)
            with torch.autograd.profiler.profile() as p:
                out[0].sum().backward()
            return [e.name for e in p.function_events]
        names = gemm_route(enabled, backward_events)
        assert ("aten::bmm" in names) == enabled, names
    # The operator's forward too (auto pairs only: no cross pair's inverse transform either).
    for enabled, want_calls in ((True, False), (False, True)):
        # (the first call of a kind may time the routes for binary input first: not profiled)
        gemm_route(enabled, lambda: ops.two_point_stats(x.detach(), [(0, 0), (1, 1)], cutoff=2))
        with torch.autograd.profiler.profile() as prof:
            gemm_route(enabled, lambda: ops.two_point_stats(x.detach(), [(0, 0), (1, 1)], cutoff=2))
        calls = [e.name for e in prof.function_events if e.name in ("aten::_fft_r2c", "aten::_fft_c2r")]
        assert bool(calls) == want_calls


def test_gemm_route_float32_and_threads(gemm_route):
    """float32 against float64, and the same values on one and four threads (the passes split rows)."""
    x = torch.rand(6, 1, 40, 36, dtype=torch.float64)
    t = torch.rand(6, 1, 40, 36, dtype=torch.float64)
    kw = dict(correlations=[(0, 0)], cutoff=5, periodic=False, reduction="none")

    def grads(v, tt):
        xr = v.clone().requires_grad_(True)
        out = ops.spatial_stats_loss(xr, tt, **kw)
        return (out, *torch.autograd.grad(out.sum(), xr))
    want = gemm_route(True, lambda: grads(x, t))
    single = gemm_route(True, lambda: grads(x.float(), t.float()))
    for a, b in zip(single, want):
        assert rel_err(a, b) < 1e-5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        many = gemm_route(True, lambda: grads(x, t))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, want):
        assert rel_err(a, b) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial,periodic,cutoff,pairs,n_state", [
    ((17, 15), True, (4, 2), [(1, 1), (0, 0)], 2), ((64, 64), True, 7, [(0, 0)], 1),
    ((30, 31), False, 5, [(0, 0), (2, 2), (1, 1)], 3), ((12, 14), True, None, [(1, 1)], 2)])
def test_gemm_route_simd_and_baseline_passes_agree(spatial, periodic, cutoff, pairs, n_state, dtype, gemm_route):
    """The route's elementwise passes are compiled for AVX2 + FMA and for the baseline build; where
    the CPU has AVX2 the first run, and _set_even_simd(False) reaches the second. Both give the
    reference's loss, gradient and operator values."""
    from pymks_vae import _extension
    C = _extension._C
    x = torch.rand((3, n_state) + spatial, dtype=dtype)
    t = torch.rand((3, n_state) + spatial, dtype=dtype)
    w = torch.randn(3, dtype=dtype)
    kw = dict(correlations=pairs, periodic=periodic, cutoff=cutoff, scale=1.3, reduction="none")

    def run(fn):
        xr = x.clone().requires_grad_(True)
        out = fn(xr, t, **kw)
        stats = fn is ops.spatial_stats_loss and ops.two_point_stats(x, pairs, periodic=periodic, cutoff=cutoff)
        return (out, *torch.autograd.grad((out * w).sum(), xr), stats)
    got = {}
    for simd in (True, False):
        prev = C._set_even_simd(simd)
        try:
            assert isinstance(prev, bool)
            got[simd] = gemm_route(True, lambda: run(ops.spatial_stats_loss))
        finally:
            C._set_even_simd(prev)
    want = run(reference.spatial_stats_loss_ref)[:2]
    want = (*want, reference.two_point_stats_ref(x.double(), pairs, periodic=periodic, cutoff=cutoff))
    tol_same, tol_ref = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for a, b, c in zip(got[True], got[False], want):
        assert rel_err(a, b) < tol_same and rel_err(a.double(), c.double()) < tol_ref


@pytest.mark.parametrize("spatial,periodic,cutoff", [((16, 16), True, 3), ((17, 15), False, (4, 2)), ((21, 21), True, None),
                                                     ((64, 64), True, 7), ((30, 31), False, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_operator_gemm_route_matches_pruned_transforms(spatial, periodic, cutoff, masked, gemm_route):
    """The two-point operator's auto pairs take the same products (forward values and, through the
    saved spectra, the gradient), equal to the pruned transforms and to the reference."""
    x = torch.rand((3, 3) + spatial, dtype=torch.float64)
    mask = (torch.rand((3,) + spatial) > 0.2).to(torch.float64) if masked else None
    pairs = [(0, 0), (2, 2), (0, 1)]
    w = torch.randn((3, 3) + reference.window_shape(spatial, cutoff), dtype=torch.float64)
    got = {}
    for enabled in (True, False):
        def run():
            xr = x.clone().requires_grad_(True)
            out = ops.two_point_stats(xr, pairs, periodic=periodic, cutoff=cutoff, mask=mask)
            return (out, *torch.autograd.grad((out * w).sum(), xr))
        got[enabled] = gemm_route(enabled, run)
    xr = x.clone().requires_grad_(True)
    want = reference.two_point_stats_ref(xr, pairs, periodic=periodic, cutoff=cutoff, mask=mask)
    want = (want, *torch.autograd.grad((want * w).sum(), xr))
    for a, b, c in zip(got[True], got[False], want):
        assert rel_err(a, b) < 1e-12 and rel_err(a, c) < 1e-10
