"""The two-point operator against an independent float64 numpy reference, its gradient, its
registration (opcheck, torch.compile), its partition-of-unity shortcut, and its errors."""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import pymks_vae
from pymks_vae import _extension, ops, reference
from numpy_reference import np_two_point, np_window
from optional import require

SHAPES = [(9,), (8,), (6, 9), (8, 8), (5, 4), (4, 5, 6), (3, 3, 3)]


def one_hot(B, n_state, spatial, dtype=torch.float64):
    labels = torch.randint(0, n_state, (B,) + tuple(spatial))
    return torch.nn.functional.one_hot(labels, n_state).movedim(-1, 1).to(dtype)


def hat_basis(B, n_state, spatial, dtype=torch.float64):
    """PyMKS's PrimitiveTransformer basis: triangles on [0, 1] that sum to 1 at every pixel."""
    v = torch.rand((B,) + tuple(spatial), dtype=torch.float64)
    centres = torch.linspace(0, 1, n_state, dtype=torch.float64)
    width = 1.0 / (n_state - 1)
    h = torch.clamp(1 - (v.unsqueeze(1) - centres.view(1, -1, *([1] * len(spatial)))).abs() / width, min=0)
    return h.to(dtype)


def all_pairs(n):
    return [(i, j) for i in range(n) for j in range(n)]


def assert_close(a, b, rel=1e-10):
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else a
    scale = max(np.abs(b).max(), 1e-30)
    err = np.abs(a - b).max() / scale
    assert err < rel, f"relative error {err:.3e} >= {rel:.0e}"


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("kind", ["random", "one_hot", "hat"])
def test_matches_numpy_reference(spatial, periodic, kind):
    n_state = 3
    x = {"random": lambda: torch.rand((2, n_state) + spatial, dtype=torch.float64),
         "one_hot": lambda: one_hot(2, n_state, spatial),
         "hat": lambda: hat_basis(2, n_state, spatial)}[kind]()
    pairs = all_pairs(n_state)  # auto and cross pairs, j < i included
    max_c = min((n - 1) // 2 for n in spatial)
    for cutoff in [None, max_c, tuple((n - 1) // 2 for n in spatial)]:
        f = ops.two_point_stats(x, pairs, periodic=periodic, cutoff=cutoff)
        assert f.shape == (2, len(pairs)) + np_window(spatial, cutoff)
        assert f.dtype == torch.float64
        assert_close(f, np_two_point(x.numpy(), pairs, periodic, cutoff))


@pytest.mark.parametrize("spatial", [(9,), (6, 9), (8, 8), (4, 5, 6)])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mask_matches_numpy_reference(spatial, periodic, per_sample, device):
    x = torch.rand((3, 2) + spatial, dtype=torch.float64)
    mshape = ((3,) if per_sample else ()) + spatial
    mask = torch.rand(mshape, dtype=torch.float64)
    mask[mask < 0.2] = 0.0
    pairs = [(0, 0), (1, 0), (0, 1)]
    for cutoff in [None, 1]:
        f = ops.two_point_stats(x.to(device), pairs, periodic=periodic, cutoff=cutoff, mask=mask.to(device))
        assert f.device.type == device.type
        assert_close(f, np_two_point(x.numpy(), pairs, periodic, cutoff, mask.numpy()))
        # the gradient with the mask, against the reference's autograd on the CPU
        g = torch.randn(f.shape, dtype=torch.float64)
        xd = x.detach().to(device).requires_grad_(True)
        ours = torch.autograd.grad((ops.two_point_stats(xd, pairs, periodic=periodic, cutoff=cutoff,
                                                        mask=mask.to(device)) * g.to(device)).sum(), xd)[0]
        xr = x.clone().requires_grad_(True)
        ref = torch.autograd.grad((reference.two_point_stats_ref(xr, pairs, periodic=periodic, cutoff=cutoff,
                                                                 mask=mask) * g).sum(), xr)[0]
        assert_close(ours, ref.numpy())


def test_bool_mask_and_no_overlap_lags_give_zero():
    x = torch.rand(1, 1, 9, dtype=torch.float64)
    mask = torch.zeros(9, dtype=torch.bool)
    mask[:2] = True  # only lags -1..1 have overlapping valid pixels
    f = ops.two_point_stats(x, [(0, 0)], periodic=False, mask=mask)
    ref = np_two_point(x.numpy(), [(0, 0)], False, None, mask.numpy())
    assert_close(f, ref)
    lags = np.arange(9) - 4
    assert np.all(f[0, 0].numpy()[np.abs(lags) > 1] == 0.0)
    assert np.all(f[0, 0].numpy()[np.abs(lags) <= 1] != 0.0)


# PyMKS divides by the mask's own correlation over the whole grid before cropping to the cutoff,
# so a random mask with no overlap at some far lag warns there (outside the compared window).
@pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning")
def test_matches_pymks_two_point_stats_with_mask():
    pymks_corr = require("pymks.fmks.correlations")
    x = np.random.rand(2, 7, 8)
    mask = (np.random.rand(2, 7, 8) > 0.3).astype(float)
    for periodic in [True, False]:
        ours = ops.two_point_stats(torch.from_numpy(np.stack([x, 1 - x], 1)), [(0, 1)], periodic=periodic,
                                   cutoff=3, mask=torch.from_numpy(mask))[:, 0]
        theirs = np.asarray(pymks_corr.two_point_stats(x, 1 - x, periodic_boundary=periodic, cutoff=3, mask=mask))
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_close_to_float64_reference(dtype):
    x = torch.rand(4, 2, 31, 20, dtype=dtype)
    f = ops.two_point_stats(x, [(1, 1), (0, 1)], cutoff=5)
    assert f.dtype == dtype
    assert_close(f, np_two_point(x.double().numpy(), [(1, 1), (0, 1)], True, 5),
                 rel=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("spatial", [(10,), (7, 6), (4, 5, 3)])
@pytest.mark.parametrize("basis", [one_hot, hat_basis])
def test_partition_shortcut_matches_direct(spatial, basis, device):
    for n_state in [2, 3, 4]:
        x = basis(3, n_state, spatial)
        pairs = all_pairs(n_state)
        ref = np_two_point(x.numpy(), pairs, True, None)
        for mode in [None, True, False]:
            assert_close(ops.two_point_stats(x.to(device), pairs, partition=mode), ref)
        # PyMKS's default pairs and the benchmark pairs
        for pairs in [[(0, k) for k in range(n_state)], [(n_state - 1, n_state - 1), (0, n_state - 1)]]:
            assert_close(ops.two_point_stats(x.to(device), pairs), np_two_point(x.numpy(), pairs, True, None))


def test_partition_check_rejects_non_partitions(device):
    """With partition=True the relations are trusted (documented), so on input that is *not* a
    partition they give a different answer - proof that the shortcut path runs - while the
    default check notices and computes directly."""
    x = torch.rand(2, 2, 12, 12, dtype=torch.float64)
    pairs = [(1, 1), (0, 1)]
    ref = np_two_point(x.numpy(), pairs, True, None)
    assert_close(ops.two_point_stats(x.to(device), pairs), ref)
    assert_close(ops.two_point_stats(x.to(device), pairs, partition=False), ref)
    trusted = ops.two_point_stats(x.to(device), pairs, partition=True).cpu().numpy()
    assert np.abs(trusted - ref).max() > 1e-3
    # a near-partition off by more than rounding is not one
    y = one_hot(2, 2, (12, 12))
    y[0, 0, 3, 3] += 1e-6
    assert_close(ops.two_point_stats(y.to(device), pairs), np_two_point(y.numpy(), pairs, True, None))


def _views(x):
    """Strided views of the same data: channels last seen channels first (PyMKS's layout, read in
    place), and a view whose spatial dims do not flatten (every other pixel of a wider field)."""
    last = x.movedim(1, -1).contiguous().movedim(-1, 1)
    wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return {"channels_last": last, "every_other": wide[..., ::2]}


@pytest.mark.parametrize("spatial", [(9,), (8,), (6, 9), (8, 8), (4, 5, 6)])
@pytest.mark.parametrize("n_state", [2, 3])
@pytest.mark.parametrize("kind", ["one_hot", "random"])
def test_strided_input_matches_reference(spatial, n_state, kind, device):
    x = one_hot(2, n_state, spatial) if kind == "one_hot" else torch.rand((2, n_state) + spatial, dtype=torch.float64)
    pairs = all_pairs(n_state)
    for name, view in _views(x.to(device)).items():
        assert not view.is_contiguous() and view.device.type == device.type, name
        for periodic, cutoff in [(True, None), (True, 1), (False, 1)]:
            ref = np_two_point(x.numpy(), pairs, periodic, cutoff)
            assert_close(ops.two_point_stats(view, pairs, periodic=periodic, cutoff=cutoff), ref)


def test_strided_input_gradcheck(device):
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, device=device).movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_(True)
    assert not x.is_contiguous()
    fn = lambda t: ops.two_point_stats(t, [(1, 1), (0, 1)], cutoff=2)
    assert torch.autograd.gradcheck(fn, (x,))
    g = torch.autograd.grad(fn(x).square().sum(), x)[0]
    xc = x.detach().contiguous().requires_grad_(True)
    torch.testing.assert_close(g, torch.autograd.grad(fn(xc).square().sum(), xc)[0], rtol=1e-12, atol=1e-12)


def test_strided_partition_check_rejects_non_partitions(device):
    """The partition check reads channels-last data in place: one pixel off must still be seen."""
    x = one_hot(2, 2, (12, 12))
    x[1, 0, 5, 7] += 1e-6
    pairs = [(1, 1), (0, 1)]
    ref = np_two_point(x.numpy(), pairs, True, None)
    for view in _views(x.to(device)).values():
        assert_close(ops.two_point_stats(view, pairs), ref)


@pytest.mark.parametrize("spatial", [(7,), (8,), (6, 9), (4, 5, 6)])
@pytest.mark.parametrize("periodic", [True, False])
def test_gradient_matches_reference(spatial, periodic, device):
    x = torch.rand((2, 3) + spatial, dtype=torch.float64, requires_grad=True)
    xd = x.detach().to(device).requires_grad_(True)
    pairs = [(0, 1), (1, 0), (2, 2), (0, 0)]
    for cutoff in [None, 1]:
        for mask in [None, torch.rand(spatial, dtype=torch.float64)]:
            g = torch.randn((2, len(pairs)) + reference.window_shape(spatial, cutoff), dtype=torch.float64)
            md = None if mask is None else mask.to(device)
            ours = torch.autograd.grad((ops.two_point_stats(xd, pairs, periodic=periodic, cutoff=cutoff,
                                                            mask=md) * g.to(device)).sum(), xd)[0]
            ref = torch.autograd.grad((reference.two_point_stats_ref(x, pairs, periodic=periodic, cutoff=cutoff,
                                                                     mask=mask) * g).sum(), x)[0]
            assert_close(ours, ref.numpy())


def test_gradient_of_partition_input_is_that_of_the_definition(device):
    x = one_hot(2, 3, (6, 7)).requires_grad_(True)
    xd = x.detach().to(device).requires_grad_(True)
    pairs = [(2, 2), (0, 2), (1, 0)]
    g = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    ours = torch.autograd.grad((ops.two_point_stats(xd, pairs) * g.to(device)).sum(), xd)[0]
    ref = torch.autograd.grad((reference.two_point_stats_ref(x, pairs) * g).sum(), x)[0]
    assert_close(ours, ref.numpy())
    assert ours[:, 2].abs().max() > 0  # the eliminated state still gets its gradient


def _stats_and_grad(x, pairs, g, derive):
    """Statistics and the gradient of sum(f * g) with the derivation of the eliminated state's
    kept spectrum on or off (this thread)."""
    prev = pymks_vae._C._set_derive_eliminated(derive)
    try:
        xr = x.detach().clone().requires_grad_(True)
        f = ops.two_point_stats(xr, pairs)
        return f.detach(), torch.autograd.grad((f * g).sum(), xr)[0]
    finally:
        pymks_vae._C._set_derive_eliminated(prev)


@pytest.mark.parametrize("spatial", [(45,), (48, 50), (41, 43), (12, 10, 9), (5, 6)])
@pytest.mark.parametrize("n_state,pairs", [
    (2, [(1, 1), (0, 1)]), (2, [(0, 0), (1, 0)]), (3, [(2, 2), (0, 2), (1, 0)]), (3, [(0, 0), (1, 2), (2, 1)]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dft", ["auto", "aten"])
def test_eliminated_state_spectrum_derived(spatial, n_state, pairs, dtype, dft, monkeypatch):
    """One-hot data partitions every pixel exactly, and when the backward pass keeps every state's
    spectrum, the state the plan eliminates gets S delta minus the others' spectra instead of a
    transform (through strided DFTI writes, or a copy on ATen's path and the small grids' matrix
    products). The statistics and the gradient stay those of the direct definition."""
    monkeypatch.setenv("PYMKS_VAE_BINARY_PATH", "off")  # the transforms, not the exact counts
    if dft == "aten":
        prev_dft = pymks_vae._C._set_mkl_dft(False)
    try:
        x = one_hot(3, n_state, spatial, dtype)
        g = torch.randn((3, len(pairs)) + spatial, dtype=torch.float64).to(dtype)
        f_on, g_on = _stats_and_grad(x, pairs, g, True)
        f_off, g_off = _stats_and_grad(x, pairs, g, False)
    finally:
        if dft == "aten":
            pymks_vae._C._set_mkl_dft(prev_dft)
    xr = x.detach().double().clone().requires_grad_(True)
    ref = torch.autograd.grad((reference.two_point_stats_ref(xr, pairs) * g.double()).sum(), xr)[0]
    rel = 1e-5 if dtype == torch.float32 else 1e-11
    for f in (f_on, f_off):
        assert_close(f, np_two_point(x.double().numpy(), pairs, True, None), rel)
    for grad in (g_on, g_off):
        assert_close(grad, ref.numpy(), rel)
    if dtype == torch.float64 and spatial == (48, 50) and n_state == 2 and dft == "auto":
        # The derived spectra round differently from transformed ones: proof that the derivation ran.
        assert not torch.equal(g_on, g_off)


def test_eliminated_state_derived_only_for_exact_partitions(monkeypatch):
    """A near-partition (each pixel's sum 1e-5 off, within float32's tolerance) still takes the
    partition relations, but its eliminated state's spectrum must be transformed: derived from
    the others it would drop the offset, an error of 2e-5 of the gradient."""
    monkeypatch.setenv("PYMKS_VAE_BINARY_PATH", "off")
    x1 = (torch.rand(4, 48, 50) > 0.5).float()
    x = torch.stack([1 - x1 + 1e-5, x1], 1)
    assert 0 < (x.sum(1) - 1).abs().max() < 1.4e-5
    pairs = [(1, 1), (0, 1)]
    g = torch.ones((4, 2, 48, 50))
    _, grad = _stats_and_grad(x, pairs, g, True)
    xr = x.detach().double().clone().requires_grad_(True)
    ref = torch.autograd.grad((reference.two_point_stats_ref(xr, pairs) * g.double()).sum(), xr)[0]
    assert_close(grad, ref.numpy(), 5e-6)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 3)])
def test_gradcheck_one_hot(spatial, monkeypatch):
    """At one-hot input the analytical gradient comes from the derived spectrum; the finite
    differences step off the partition, where every state is transformed."""
    monkeypatch.setenv("PYMKS_VAE_BINARY_PATH", "off")
    x = one_hot(2, 2, spatial).requires_grad_(True)
    fn = lambda t: ops.two_point_stats(t, [(1, 1), (0, 1)])
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("spatial,periodic,cutoff,masked", [
    ((7,), True, None, False), ((6,), False, 2, False), ((5, 4), True, 1, True),
    ((4, 5), False, None, True), ((3, 4, 3), True, None, False), ((3, 3, 4), False, 1, False),
])
def test_gradcheck(spatial, periodic, cutoff, masked):
    x = torch.rand((2, 2) + spatial, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(spatial, dtype=torch.float64) if masked else None
    fn = lambda t: ops.two_point_stats(t, [(0, 1), (1, 1), (1, 0)], periodic=periodic, cutoff=cutoff, mask=mask)
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("args", [
    dict(spatial=(8,), periodic=True, window=[8], mask=False, partition=2),
    dict(spatial=(5, 6), periodic=False, window=[3, 5], mask=True, partition=0),
    dict(spatial=(4, 3, 5), periodic=True, window=[3, 3, 3], mask=False, partition=1),
    dict(spatial=(6, 7), periodic=True, window=[5, 3], mask=False, partition=2, channels_last=True),
])
def test_opcheck(args, device):
    x = torch.rand((2, 2) + args["spatial"], dtype=torch.float64, device=device)
    if args.get("channels_last"):  # PyMKS's layout seen channels first: read in place by the kernel
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_(True)
    mask = torch.rand(args["spatial"], dtype=torch.float64, device=device).unsqueeze(0) if args["mask"] else None
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats.default,
                          (x, [0, 1], [1, 1], args["periodic"], args["window"], mask, args["partition"]))
    grad = torch.rand((2, 2) + tuple(args["window"]), dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats_backward.default,
                          (grad, x.detach(), [0, 1], [1, 1], args["periodic"], args["window"], mask))


def test_torch_compile_fullgraph(device):
    def stats(x):
        return ops.two_point_stats(x, [(0, 0), (0, 1)], cutoff=3).square().sum()

    compiled = torch.compile(stats, fullgraph=True, backend="aot_eager")
    x = torch.rand(2, 2, 10, 9, dtype=torch.float64, device=device, requires_grad=True)
    eager_val = stats(x)
    eager_grad = torch.autograd.grad(eager_val, x)[0]
    val = compiled(x)
    grad = torch.autograd.grad(val, x)[0]
    assert torch.allclose(val, eager_val, rtol=1e-12)
    assert torch.allclose(grad, eager_grad, rtol=1e-12)


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(_extension, "has_extension", lambda: False)
    monkeypatch.setattr(_extension, "_WARNED", False)
    x = torch.rand(2, 2, 7, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back"):
        f = ops.two_point_stats(x, [(0, 1)], cutoff=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.two_point_stats(x, [(0, 1)], cutoff=2)  # no second warning
    assert_close(f, np_two_point(x.numpy(), [(0, 1)], True, 2))
    with pytest.raises(ValueError, match="NaN"):
        ops.two_point_stats(torch.full((1, 1, 4), float("nan"), dtype=torch.float64), [(0, 0)])


# ----------------------------------------------------------------------------- bad input
def _x(*shape, dtype=torch.float64):
    return torch.rand(shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.two_point_stats(_x(4, 4), [(0, 0)]), ValueError, "x must have shape"),
    (lambda: ops.two_point_stats(_x(1, 1, 2, 2, 2, 2), [(0, 0)]), ValueError, "1, 2 or 3 spatial"),
    (lambda: ops.two_point_stats(torch.ones(1, 1, 4, dtype=torch.int64), [(0, 0)]), TypeError, "float32 or float64"),
    (lambda: ops.two_point_stats(_x(1, 1, 4).half(), [(0, 0)]), TypeError, "float32 or float64"),
    (lambda: ops.two_point_stats(_x(1, 2, 4).numpy(), [(0, 0)]), TypeError, "torch.Tensor"),
    (lambda: ops.two_point_stats(_x(0, 2, 4), [(0, 0)]), ValueError, "empty batch"),
    (lambda: ops.two_point_stats(_x(1, 2, 4), [(0, 2)]), ValueError, r"names state 2.*n_state=2"),
    (lambda: ops.two_point_stats(_x(1, 2, 4), [(-1, 0)]), ValueError, "names state -1"),
    (lambda: ops.two_point_stats(_x(1, 2, 4), []), ValueError, "correlations is empty"),
    (lambda: ops.two_point_stats(_x(1, 2, 4), [(0, 1, 1)]), TypeError, r"correlations\[0\]"),
    (lambda: ops.two_point_stats(_x(1, 2, 4), [(0.0, 1)]), TypeError, "ints"),
    (lambda: ops.two_point_stats(_x(1, 2, 9, 9), [(0, 0)], cutoff=5), ValueError, "cutoff 5 too large"),
    (lambda: ops.two_point_stats(_x(1, 2, 9, 9), [(0, 0)], cutoff=(1, 4, 1)), ValueError, "3 entries"),
    (lambda: ops.two_point_stats(_x(1, 2, 9, 9), [(0, 0)], cutoff=-1), ValueError, ">= 0"),
    (lambda: ops.two_point_stats(_x(1, 2, 9, 9), [(0, 0)], cutoff=1.5), TypeError, "cutoff"),
    (lambda: ops.two_point_stats(_x(2, 2, 9, 9), [(0, 0)], mask=_x(9, 8)), ValueError, "mask must have shape"),
    (lambda: ops.two_point_stats(_x(2, 2, 9, 9), [(0, 0)], mask=_x(3, 9, 9)), ValueError, "mask must have shape"),
    (lambda: ops.two_point_stats(_x(2, 2, 9, 9), [(0, 0)], mask=_x(9, 9) + 1.5), ValueError, r"mask values must lie in \[0, 1\]"),
    (lambda: ops.two_point_stats(_x(2, 2, 9, 9), [(0, 0)], mask=_x(9, 9, dtype=torch.float32)), TypeError, "mask dtype"),
    (lambda: ops.two_point_stats(_x(2, 2, 9, 9), [(0, 0)], mask=_x(9, 9).requires_grad_()), ValueError, "mask requires grad"),
    (lambda: ops.two_point_stats(_x(2, 2, 9), [(0, 0)], partition="yes"), TypeError, "partition"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("partition", [None, True, False])
def test_nan_inf_rejected(bad, partition):
    x = one_hot(2, 2, (8, 8))
    x[1, 1, 3, 4] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.two_point_stats(x, [(0, 0), (0, 1)], partition=partition)
    x32 = torch.rand(1, 1, 5, 5)
    x32[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.two_point_stats(x32, [(0, 0)], periodic=False, cutoff=1)


def test_mask_with_nan_rejected():
    mask = torch.rand(6, 6, dtype=torch.float64)
    mask[2, 2] = float("nan")
    with pytest.raises(ValueError, match="mask"):
        ops.two_point_stats(_x(1, 1, 6, 6), [(0, 0)], mask=mask)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(9,), (6, 9), (16, 16), (4, 5, 6)])
@pytest.mark.parametrize("periodic", [True, False])
def test_cuda_matches_cpu(spatial, periodic):
    for dtype, rel in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        for x in [one_hot(3, 3, spatial, dtype), torch.rand((3, 3) + spatial, dtype=dtype)]:
            pairs = all_pairs(3)
            for cutoff, mask in [(None, None), (1, torch.rand(spatial, dtype=dtype))]:
                cpu = ops.two_point_stats(x, pairs, periodic=periodic, cutoff=cutoff, mask=mask)
                gpu = ops.two_point_stats(x.cuda(), pairs, periodic=periodic, cutoff=cutoff,
                                          mask=None if mask is None else mask.cuda())
                assert gpu.is_cuda
                assert_close(gpu, cpu.double().numpy(), rel=rel)
                xc = x.clone().requires_grad_(True)
                xg = x.cuda().requires_grad_(True)
                g = torch.randn_like(cpu)
                gc = torch.autograd.grad((ops.two_point_stats(xc, pairs, periodic=periodic, cutoff=cutoff, mask=mask) * g).sum(), xc)[0]
                gg = torch.autograd.grad((ops.two_point_stats(xg, pairs, periodic=periodic, cutoff=cutoff,
                                                              mask=None if mask is None else mask.cuda()) * g.cuda()).sum(), xg)[0]
                assert_close(gg, gc.double().numpy(), rel=rel * 10)


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    x = torch.rand(2, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.two_point_stats(t, [(0, 1), (1, 1)], periodic=False, cutoff=2), (x,))
    torch.library.opcheck(torch.ops.pymks_vae.two_point_stats.default, (x, [0, 1], [1, 1], True, [5, 6], None, 2))
    bad = x.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.two_point_stats(bad, [(0, 0)])


@pytest.mark.parametrize("pairs", [[(1, 3)], [(2, 0), (0, 0)], [(3, 3), (1, 1)], [(1, 2), (2, 1), (2, 2)]])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("kind", ["one_hot", "random"])
def test_partial_state_sets(pairs, periodic, kind, device):
    """Pairs that name some of the states: the forward reads them as a view (a run of states) or by
    index_select, the backward writes their gradients back by index_copy and leaves the others 0."""
    x = one_hot(2, 4, (7, 8)) if kind == "one_hot" else torch.rand(2, 4, 7, 8, dtype=torch.float64)
    xd = x.detach().to(device).requires_grad_(True)
    for cutoff in [None, 2]:
        f = ops.two_point_stats(xd, pairs, periodic=periodic, cutoff=cutoff)
        assert_close(f, np_two_point(x.numpy(), pairs, periodic, cutoff))
        g = torch.randn(f.shape, dtype=torch.float64)
        ours = torch.autograd.grad((f * g.to(device)).sum(), xd)[0]
        xr = x.clone().requires_grad_(True)
        ref = torch.autograd.grad((reference.two_point_stats_ref(xr, pairs, periodic=periodic, cutoff=cutoff)
                                   * g).sum(), xr)[0]
        assert_close(ours, ref.numpy())
        used = sorted({s for p in pairs for s in p})
        unused = [s for s in range(4) if s not in used]
        assert torch.all(ours[:, unused] == 0)
        assert torch.all(ours[:, used].abs().amax(dim=(0, 2, 3)) > 0)


# ----------------------------------------------------------------------------- the raw operators
# The registered operators are public (torch.compile calls them directly), so each refuses bad
# arguments by itself rather than trusting ops.py: float32 memory read as float64 returns garbage.
def _raw(device, dtype=torch.float64, spatial=(6, 7)):
    x = torch.rand((2, 2) + spatial, dtype=dtype, device=device)
    grad = torch.rand((2, 2) + spatial, dtype=dtype, device=device)
    mask = torch.rand((1,) + spatial, dtype=dtype, device=device)
    return x, grad, mask


def _forward(x, mask):
    return torch.ops.pymks_vae.two_point_stats(x, [0, 1], [1, 1], True, list(x.shape[2:]), mask, 0)


def _backward(grad, x, mask):
    return torch.ops.pymks_vae.two_point_stats_backward(grad, x, [0, 1], [1, 1], True, list(x.shape[2:]), mask)


@pytest.mark.parametrize("call,match", [
    (lambda d: _backward(_raw(d)[1].float(), _raw(d)[0], None), "grad has dtype Float but x has dtype Double"),
    (lambda d: _backward(_raw(d)[1], _raw(d)[0].float(), None), "grad has dtype Double but x has dtype Float"),
    (lambda d: _backward(_raw(d)[1], _raw(d)[0], _raw(d)[2].float()), "mask has dtype Float but x"),
    (lambda d: _forward(_raw(d)[0], _raw(d)[2].float()), "mask has dtype Float but x"),
    (lambda d: _forward(_raw(d)[0], _raw(d)[2] > 0.5), "mask has dtype Bool but x"),
    (lambda d: _forward(_raw(d)[0].half(), None), "x must be float32 or float64, got Half"),
    (lambda d: _forward(_raw(d)[0].to(torch.complex128), None), "x must be float32 or float64"),
    (lambda d: _backward(_raw(d)[1].half(), _raw(d)[0].half(), None), "x must be float32 or float64"),
])
def test_raw_ops_reject_mismatched_dtypes(call, match, device):
    with pytest.raises(RuntimeError, match=match):
        call(device)


@pytest.mark.parametrize("call,match", [
    (lambda d: _forward(_raw(d)[0], _raw(d)[2][:, :5]), r"mask has shape \[1, 5, 7\]"),
    (lambda d: _forward(_raw(d)[0], torch.rand(3, 6, 7, dtype=torch.float64, device=d)), "mask has shape"),
    (lambda d: _backward(_raw(d)[1], _raw(d)[0], _raw(d)[2][0]), r"mask has shape \[6, 7\]"),
])
def test_raw_ops_reject_bad_mask_shapes(call, match, device):
    with pytest.raises(ValueError, match=match):
        call(device)


@pytest.mark.cuda
@pytest.mark.parametrize("call,match", [
    (lambda: _forward(_raw("cuda")[0], _raw("cpu")[2]), "mask is on cpu but x is on cuda"),
    (lambda: _forward(_raw("cpu")[0], _raw("cuda")[2]), "mask is on cuda:0 but x is on cpu"),
    (lambda: _backward(_raw("cpu")[1], _raw("cuda")[0], None), "grad is on cpu but x is on cuda"),
    (lambda: _backward(_raw("cuda")[1], _raw("cpu")[0], None), "grad is on cuda:0 but x is on cpu"),
    (lambda: _backward(_raw("cuda")[1], _raw("cuda")[0], _raw("cpu")[2]), "mask is on cpu but x is on cuda"),
])
def test_cuda_raw_ops_reject_mixed_devices(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
def test_cuda_kernels_ran():
    """The CUDA kernels themselves ran (seen by the profiler), not a fallback or a CPU copy."""
    from torch.profiler import ProfilerActivity, profile

    x = one_hot(2, 3, (16, 16)).cuda().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        f = ops.two_point_stats(x, [(0, 0), (0, 1)], cutoff=3, partition=False)
        f.square().sum().backward()
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert "pymks_vae::two_point_stats" in names and "pymks_vae::two_point_stats_backward" in names
    for kernel in ["power_half_kernel", "pair_products_kernel", "gather_kernel", "embed_grad_kernel",
                   "combine_grad_kernel"]:
        assert kernel in names, f"{kernel} did not run on the GPU"


@pytest.mark.cuda
@pytest.mark.parametrize("spatial,periodic,cutoff", [
    ((1030, 1030), True, None), ((1030, 1030), True, 4), ((1030, 1030), False, 4), ((104, 104, 104), True, 3),
])
def test_cuda_backward_of_grids_past_2_20_elements(spatial, periodic, cutoff):
    """Grids of more than 2^20 elements: launches are capped at 4096 blocks of 256 threads, so each
    thread of the backward's kernels (and the forward's) walks several elements."""
    x = torch.rand((2, 2) + spatial, dtype=torch.float64)
    assert math.prod(spatial) > 2**20
    pairs = [(0, 1), (1, 1)]
    xc = x.clone().requires_grad_(True)
    xg = x.cuda().requires_grad_(True)
    fc = ops.two_point_stats(xc, pairs, periodic=periodic, cutoff=cutoff)
    fg = ops.two_point_stats(xg, pairs, periodic=periodic, cutoff=cutoff)
    assert_close(fg, fc.detach().numpy(), rel=1e-9)
    g = torch.randn(fc.shape, dtype=torch.float64)
    gc = torch.autograd.grad((fc * g).sum(), xc)[0]
    gg = torch.autograd.grad((fg * g.cuda()).sum(), xg)[0]
    assert_close(gg, gc.numpy(), rel=1e-9)


@pytest.mark.cuda
def test_cuda_second_device():
    """Tensors on cuda:1 run there while cuda:0 is current (the kernels' device guard), and a mix of
    the two GPUs is refused, naming the argument."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs; this machine has {torch.cuda.device_count()}")
    dev = torch.device("cuda:1")
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64)
    mask = torch.rand(9, 8, dtype=torch.float64)
    pairs = [(0, 1), (2, 2)]
    g = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.cuda.device(0):
        xd = x.to(dev).requires_grad_(True)
        f = ops.two_point_stats(xd, pairs, cutoff=2, mask=mask.to(dev))
        grad = torch.autograd.grad((f * g.to(dev)).sum(), xd)[0]
        assert f.device == dev and grad.device == dev
        assert torch.cuda.current_device() == 0
    xc = x.clone().requires_grad_(True)
    fc = ops.two_point_stats(xc, pairs, cutoff=2, mask=mask)
    assert_close(f, fc.detach().numpy())
    assert_close(grad, torch.autograd.grad((fc * g).sum(), xc)[0].numpy())
    with pytest.raises(RuntimeError, match="mask is on cuda:0 but x is on cuda:1"):
        _forward(x.to(dev), mask.unsqueeze(0).to("cuda:0"))
    with pytest.raises(RuntimeError, match="grad is on cuda:0 but x is on cuda:1"):
        _backward(torch.rand(2, 2, 9, 8, dtype=torch.float64, device="cuda:0"), x[:, :2].to(dev), None)


@pytest.mark.cuda
def test_cuda_torch_compile_inductor():
    """The whole step compiled by inductor (Triton on the GPU) around the operator, in float32."""
    require("triton")

    def stats(x):
        ind = ops.soft_indicator(x, (0.0, 1.0))
        return ops.two_point_stats(ind, [(0, 0), (0, 1)], cutoff=4).square().mean()

    compiled = torch.compile(stats, fullgraph=True, backend="inductor")
    x = torch.rand(4, 1, 32, 24, device="cuda", requires_grad=True)
    eager_val = stats(x)
    eager_grad = torch.autograd.grad(eager_val, x)[0]
    val = compiled(x)
    grad = torch.autograd.grad(val, x)[0]
    torch.testing.assert_close(val, eager_val, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-7 * float(eager_grad.abs().max()))


@pytest.mark.parametrize("masked", [None, "shared", "per_sample"])
def test_batches_larger_than_a_cache_chunk(masked):
    """The CPU kernels run large batches of small fields in cache-sized chunks (13 samples of this
    size): every chunk, the short last one included, must match the definition."""
    B, spatial = 30, (128, 128)
    x = one_hot(B, 2, spatial)
    x[5:9] = torch.rand((4, 2) + spatial, dtype=torch.float64)  # one chunk is not a partition
    mask = None
    if masked == "shared":
        mask = torch.rand(spatial, dtype=torch.float64)
    elif masked == "per_sample":
        mask = torch.rand((B,) + spatial, dtype=torch.float64)
    pairs = [(1, 1), (0, 1), (1, 0)]
    f = ops.two_point_stats(x, pairs, mask=mask)
    want = np_two_point(x.numpy(), pairs, True, None, None if mask is None else mask.numpy())
    assert_close(f, want)
