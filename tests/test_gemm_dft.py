"""The CPU's direct transforms of small 2D grids (csrc/cpu/direct_dft.cpp, chosen in
csrc/cpu/gemm_dft.cpp), and the pruned one-dimensional matrix products of the windowed loss: alone
against torch.fft on any grid (odd and even sides, sides of 1 and 2, both layouts, partial groups
of fields, both instruction sets of the loops), and inside the operator and the losses the same
numbers as MKL's transforms and the float64 reference on the grids the rule takes, and no change
on grids none of whose sides it takes.

The route is switched per thread with ``_C._set_gemm_dft``; the two routes round differently, so
on a grid the rule takes their float32 results differ in the last bits, and elsewhere they are
the same bits. By default the first call of a kind on a candidate grid times both routes and the
faster one runs from then on (``_C._set_gemm_dft_trials(False)``, ``PYMKS_VAE_GEMM_DFT=rule`` or
torch's deterministic algorithms keep the fixed rule instead); most tests here fix the rule, the
trial tests make a trial's outcome certain with a bias on the measured times.
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
# The rule: every side 9-40 but the multiples of 4, every side m <= 127 with a prime factor
# p >= 17 and m / p odd or at most 3, and the primes up to 223. LEFT has none of them (a grid with
# one such side keeps MKL for its 2D transforms, but its pruned one-dimensional transforms along a
# side with a large prime factor are products: see the window tests below).
TAKEN = [(17, 17), (21, 21), (13, 14), (15, 38), (51, 51), (17, 34), (47, 53), (34, 19), (101, 101), (69, 23),
         (113, 113), (85, 19), (223, 17)]
LEFT = [(8, 12), (16, 16), (64, 64), (21, 64), (68, 68), (102, 68), (262, 64)]


@contextlib.contextmanager
def gemm_dft(enabled, trials=False):
    """The route on or off for this thread; by default its fixed rule decides (no timing trials)."""
    prev, prev_trials = C._set_gemm_dft(enabled), C._set_gemm_dft_trials(trials)
    try:
        yield
    finally:
        C._set_gemm_dft(prev)
        C._set_gemm_dft_trials(prev_trials)


@contextlib.contextmanager
def trials_won_by(products):
    """Timing trials whose outcome is certain: the products' measured time scaled far down or up."""
    prev_bias = C._set_gemm_dft_trial_bias(1e-9 if products else 1e9)
    C._clear_gemm_dft_trials()
    try:
        with gemm_dft(True, trials=True):
            yield
    finally:
        C._set_gemm_dft_trial_bias(prev_bias)
        C._clear_gemm_dft_trials()


def field(shape, dtype=torch.float64, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 2) + shape, generator=g, dtype=dtype)


def both_routes(fn):
    with gemm_dft(True):
        on = fn()
    with gemm_dft(False):
        off = fn()
    return on, off


# The transforms alone, with the loops built for AVX2 (where the CPU has it) and for the baseline
# x86-64: odd and even sides, sides of 1 and 2 (no odd part along that axis), long thin grids, and
# batches whose last group of fields (8 float32 or 4 float64 lanes) is partial.
GRIDS = [(1, 1), (2, 3), (3, 2), (5, 8), (8, 5), (21, 21), (24, 26), (25, 25), (26, 25), (25, 26), (30, 31), (32, 33),
         (51, 64), (64, 51), (101, 17), (2, 400), (400, 2), (1, 700), (700, 1)]


def batch_for(grid, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # 6 fields: one partial group; 14: groups of 8 and 6 (float32), 4, 4, 4 and 2 (float64); 16: full.
    lead = {(101, 101): (14,), (21, 21): (16,)}.get(grid, (3, 2))
    return torch.randn(lead + grid, generator=g, dtype=dtype)


@contextlib.contextmanager
def loops(isa):
    prev = C._set_direct_dft(isa)
    try:
        yield
    finally:
        C._set_direct_dft(prev)


def test_the_loops_run_with_avx2_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    want = "avx2" if {"avx2", "fma"} <= set(flags) else "generic"
    with loops("auto"):
        assert C._direct_dft_isa() == want
    with loops("generic"):
        assert C._direct_dft_isa() == "generic"
    with pytest.raises(RuntimeError, match="mode must be 'auto' or 'generic'"):
        C._set_direct_dft("avx512")


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("moved", [False, True], ids=["natural", "moved"])
@pytest.mark.parametrize("grid", GRIDS + [(101, 101)], ids=str)
def test_products_alone_match_torch_fft(grid, moved, isa):
    with loops(isa):
        check_alone_against_torch_fft(grid, moved)


def check_alone_against_torch_fft(grid, moved):
    x = batch_for(grid, torch.float64, seed=sum(grid))
    want = torch.fft.rfft2(x)
    if moved:
        want = want.transpose(-1, -2)
    got = C._gemm_rfft2(x, moved)
    assert got.shape == want.shape and got.dtype == torch.complex128
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * max(1.0, float(want.abs().max())))
    # The c2r of arbitrary (not Hermitian) spectra, as torch's: the first axis inverted as complex
    # data, then the imaginary parts of the last axis's bins 0 and m1 / 2 ignored.
    g = torch.Generator().manual_seed(11)
    spec = torch.complex(torch.randn(want.shape, generator=g, dtype=torch.float64),
                         torch.randn(want.shape, generator=g, dtype=torch.float64))
    natural = spec.transpose(-1, -2) if moved else spec
    scale = 0.37
    back = C._gemm_irfft2(spec.contiguous(), grid[1], moved, scale)
    ref = torch.fft.irfft2(natural, s=grid) * (grid[0] * grid[1] * scale)
    torch.testing.assert_close(back, ref, rtol=0, atol=1e-11 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("grid", [(21, 21), (24, 26), (25, 25), (51, 64), (101, 17), (2, 400), (101, 101)], ids=str)
def test_products_alone_float32_within_rounding(grid, isa):
    x = batch_for(grid, torch.float32, seed=3)
    want = torch.fft.rfft2(x.double())
    with loops(isa):
        got = C._gemm_rfft2(x)
        back = C._gemm_irfft2(got, grid[1], False, 1.0 / (grid[0] * grid[1]))
    assert got.dtype == torch.complex64
    scale = float(want.abs().max())
    assert float((got.to(torch.complex128) - want).abs().max()) < 2e-6 * scale
    assert float((back.double() - x.double()).abs().max()) < 2e-6 * float(x.abs().max())


def test_products_alone_reject_what_they_cannot_take():
    with pytest.raises(RuntimeError, match="x must be a CPU float32/float64"):
        C._gemm_rfft2(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="spec must be a CPU complex64/complex128"):
        C._gemm_irfft2(torch.zeros(4, 3), 4)
    with pytest.raises(RuntimeError, match="m1 = 5 does not fit the spectrum's 4 bins"):
        C._gemm_irfft2(torch.zeros(4, 4, dtype=torch.complex64), 5)
    with pytest.raises(RuntimeError, match="sides up to 4096"):
        C._gemm_rfft2(torch.zeros(1, 5000))
    with pytest.raises(RuntimeError, match="sides up to 4096"):
        C._gemm_irfft2(torch.zeros(5000, 2, dtype=torch.complex64), 2)


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


# Auto pairs alone keep the windowed loss's spectra in the natural layout; a cross pair moves the
# first axis last, which the products write and read transposed.
@pytest.mark.parametrize("pairs", [[(0, 0), (1, 1)], [(0, 0), (0, 1)]], ids=["natural", "moved"])
@pytest.mark.parametrize("shape", [(17, 34), (51, 51), (34, 19)], ids=str)
@pytest.mark.parametrize("kw", [dict(cutoff=5), dict(cutoff=None), dict(cutoff=None, weighted=True)],
                         ids=["cutoff", "parseval", "weighted"])
def test_losses_match_the_reference(shape, kw, pairs):
    kw = dict(kw)
    x, t = field(shape, n=2, seed=1), field(shape, n=2, seed=2)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand((2,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

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


# The windowed loss's pruned one-dimensional transforms (and the operator's even transform of the
# auto pairs) run as matrix products along the rule's sides, in 1D, 2D and 3D: along the first and
# last axes of (17, 6, 19), not the middle one.
# (51, 64) and (64, 51) keep MKL for their 2D transforms: there only the pruned products differ.
@pytest.mark.parametrize("shape", [(51,), (51, 51), (34, 19), (51, 64), (64, 51), (17, 6, 19)], ids=str)
@pytest.mark.parametrize("pairs", [[(0, 0), (1, 1), (0, 1)], [(0, 1), (1, 2)]], ids=["autos+cross", "cross"])
def test_window_transforms_as_products_match_the_reference(shape, pairs):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.rand((2, 3) + shape, generator=g, dtype=torch.float64)
    t = torch.rand((2, 3) + shape, generator=g, dtype=torch.float64)
    cutoff = (5, 2, 5) if len(shape) == 3 else 8

    def loss_and_grad(fn):
        xr = x.clone().requires_grad_(True)
        value = fn(xr, t, correlations=pairs, cutoff=cutoff)
        value.backward()
        return value.detach(), xr.grad

    with gemm_dft(True):
        value, grad = loss_and_grad(ops.spatial_stats_loss)
        stats = ops.two_point_stats(x, pairs, cutoff=cutoff)
    with gemm_dft(False):
        value_off, grad_off = loss_and_grad(ops.spatial_stats_loss)
        stats_off = ops.two_point_stats(x, pairs, cutoff=cutoff)
    ref_value, ref_grad = loss_and_grad(reference.spatial_stats_loss_ref)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(stats, reference.two_point_stats_ref(x, pairs, cutoff=cutoff), rtol=0, atol=1e-13)
    assert not torch.equal(grad, grad_off), "the matrix products did not run"
    assert stats_off.shape == stats.shape


# Auto pairs alone, with the small-window products of even_gemm.cpp off: the operator's even
# transform (its kept bins, and in 2D the last axis's inverse) and the loss's even window
# transform run as the pruned products.
@pytest.mark.parametrize("shape", [(51, 64), (64, 51), (51, 51)], ids=str)
@pytest.mark.parametrize("cutoff", [8, None], ids=["cutoff", "whole"])
def test_even_transforms_as_products_match_the_reference(shape, cutoff):
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 2) + shape, generator=g, dtype=torch.float64)
    t = torch.rand((2, 2) + shape, generator=g, dtype=torch.float64)
    pairs = [(0, 0), (1, 1)]
    weight = torch.rand((2,) + reference.window_shape(shape, cutoff), generator=g, dtype=torch.float64)

    def run():
        xr = x.clone().requires_grad_(True)
        value = ops.spatial_stats_loss(xr, t, correlations=pairs, cutoff=cutoff, weight=weight)
        value.backward()
        return ops.two_point_stats(x, pairs, cutoff=cutoff), value.detach(), xr.grad

    prev = C._set_even_gemm(False)
    try:
        with gemm_dft(True):
            on = run()
        with gemm_dft(False):
            off = run()
    finally:
        C._set_even_gemm(prev)
    xr = x.clone().requires_grad_(True)
    ref_value = reference.spatial_stats_loss_ref(xr, t, correlations=pairs, cutoff=cutoff, weight=weight)
    ref_value.backward()
    torch.testing.assert_close(on[0], reference.two_point_stats_ref(x, pairs, cutoff=cutoff), rtol=0, atol=1e-13)
    torch.testing.assert_close(on[1], ref_value.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(on[2], xr.grad, rtol=1e-9, atol=1e-11)
    assert not torch.equal(on[0], off[0]), "the operator's even transform did not take the products"
    assert not torch.equal(on[2], off[2]), "the loss's even window transform did not take the products"


def test_window_transforms_gradcheck():
    g = torch.Generator().manual_seed(9)
    x = torch.rand((1, 2, 17, 19), generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand((1, 2, 17, 19), generator=g, dtype=torch.float64)
    with gemm_dft(True):
        assert torch.autograd.gradcheck(
            lambda v: ops.spatial_stats_loss(v, t, correlations=[(0, 1), (1, 1)], cutoff=6), (x,), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradcheck(lambda v: ops.two_point_stats(v, [(0, 0), (0, 1)], cutoff=6), (x,),
                                        eps=1e-6, atol=1e-7)


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


# A candidate the fixed rule leaves to MKL (45 = 3^2 x 5) and one it takes (51 = 3 x 17).
TRIAL_GRIDS = [(45, 45), (51, 51)]


@pytest.mark.parametrize("shape", TRIAL_GRIDS, ids=str)
@pytest.mark.parametrize("products", [True, False], ids=["products_win", "transforms_win"])
def test_a_trial_runs_the_winner_from_its_first_call_on(shape, products):
    x = field(shape, torch.float32, n=4).requires_grad_(True)
    t = field(shape, torch.float32, n=4, seed=7)

    def loss_and_grad():
        x.grad = None
        loss = ops.spatial_stats_loss(x, t, correlations=[(0, 0), (1, 1)], cutoff=6)
        loss.backward()
        return loss.detach(), x.grad.clone()

    with gemm_dft(False):
        want_transforms = loss_and_grad()
    with trials_won_by(True):  # the products' bits, whatever the rule says of this grid
        want_products = loss_and_grad()
    assert not torch.equal(want_products[1], want_transforms[1]), "the two routes should round differently"
    want = want_products if products else want_transforms
    with trials_won_by(products):
        first = loss_and_grad()
        # the forward transforms of x and of the target (one kind), the gradient's inverse (another)
        kinds = C._gemm_dft_trials()
        assert kinds >= 2
        second = loss_and_grad()
        assert C._gemm_dft_trials() == kinds  # remembered, no new kind
    for got in (first, second):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("grid,t_products,t_transforms,confirming,want", [
    # 51^2 is the fixed rule's (the products): MKL must be over 15% faster, in two trials
    ((51, 51), 1.0, 1.1, False, "products"), ((51, 51), 1.0, 0.9, False, "products"),
    ((51, 51), 1.0, 0.8, False, "confirm"), ((51, 51), 1.0, 0.8, True, "transforms"),
    ((51, 51), 1.0, 1.1, True, "products"),
    # 45^2 is not (MKL): the products must be over 15% faster, in two trials
    ((45, 45), 1.0, 1.1, False, "transforms"), ((45, 45), 0.9, 1.0, False, "transforms"),
    ((45, 45), 0.8, 1.0, False, "confirm"), ((45, 45), 0.8, 1.0, True, "products"),
    ((45, 45), 1.0, 0.8, True, "transforms"),
], ids=str)
def test_a_trial_overturns_the_rule_only_by_a_margin_and_twice(grid, t_products, t_transforms, confirming, want):
    assert C._gemm_dft_verdict(list(grid), t_products, t_transforms, confirming) == want


def test_trials_are_kept_per_kind():
    def stats(n, dtype=torch.float32, shape=(51, 51)):
        # every state, auto pairs: contiguous fields in the natural layout, as the products take them
        ops.two_point_stats(field(shape, dtype, n=n), [(0, 0), (1, 1)])

    with trials_won_by(True):
        stats(4)
        n = C._gemm_dft_trials()
        assert n >= 1
        stats(5)  # batches of 4-7 fields share a trial
        assert C._gemm_dft_trials() == n
        stats(4, torch.float64)  # another dtype
        assert C._gemm_dft_trials() > n
        n = C._gemm_dft_trials()
        stats(40)  # a batch ten times larger
        assert C._gemm_dft_trials() > n
        n = C._gemm_dft_trials()
        stats(4, shape=(64, 64))  # a power of two: never timed
        stats(4, shape=(51, 64))
        assert C._gemm_dft_trials() == n

        # Two of three states, as the loss selects them, are a strided input: a kind of its own.
        def loss(n_state):
            x = torch.rand((4, n_state, 51, 51), generator=torch.Generator().manual_seed(n_state))
            ops.spatial_stats_loss(x, x.flip(0), correlations=[(0, 0), (1, 1), (0, 1)], cutoff=20)

        loss(2)
        n = C._gemm_dft_trials()
        loss(2)
        assert C._gemm_dft_trials() == n
        loss(3)
        assert C._gemm_dft_trials() > n


def test_deterministic_algorithms_keep_the_fixed_rule():
    x = field((45, 45), torch.float32)
    with gemm_dft(False):
        want = ops.two_point_stats(x, PAIRS, cutoff=4)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with trials_won_by(True):
            got = ops.two_point_stats(x, PAIRS, cutoff=4)
            assert C._gemm_dft_trials() == 0
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(got, want)  # 45 is not the rule's: the transforms ran
    with trials_won_by(True):  # the control: the same call runs a trial otherwise
        assert not torch.equal(ops.two_point_stats(x, PAIRS, cutoff=4), want)
        assert C._gemm_dft_trials() > 0


def test_rule_setting_of_the_environment_runs_no_trials():
    import subprocess
    import sys
    code = ("import torch; from pymks_vae import ops, _extension as e; "
            "ops.two_point_stats(torch.rand(2, 1, 45, 45), [(0, 0)]); "
            "ops.two_point_stats(torch.rand(2, 1, 51, 51), [(0, 0)]); print(e._C._gemm_dft_trials())")
    counts = {}
    for setting in ("rule", "auto"):
        env = dict(os.environ, PYMKS_VAE_GEMM_DFT=setting)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        counts[setting] = int(out.stdout.strip().splitlines()[-1])
    assert counts["rule"] == 0 and counts["auto"] >= 2, counts


def test_trial_bias_is_checked():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="bias must be a finite number > 0"):
            C._set_gemm_dft_trial_bias(bad)
