"""The route chooser for binary input: counting or the transforms (csrc/cpu/two_point_bits.cpp).

The chooser compares two estimates whose per-unit costs are measured on the CPU at hand (once per
thread count), or fixed by set_binary_route_costs / PYMKS_VAE_ROUTE_COSTS. The decision itself is a
pure function of the shape, window, pairs, dtype, boundary and costs (ops.binary_route), tested here
with injected costs; that the operator follows it is tested by the bits of its output (counting is
exact, the transforms are not). Whether the measured costs pick the faster route on a given CPU is a
matter of speed: benchmarks/bench_route.py, not these tests.
"""
import doctest
import math
import os
import threading

import numpy as np
import pytest
import torch

import pymks_vae
from pymks_vae import ops, reference
from pymks_vae._extension import _C

BEST = pymks_vae.build_info()["cpu_count_kernel"]
NAMES = ("word_ns", "call_ns", "rotate_ns", "pack_f32_ns", "pack_f64_ns", "fft_f32_ns", "fft_f64_ns")
FITTED = {"word_ns": {"avx512": 0.1, "avx2": 0.28, "popcnt": 0.4, "generic": 0.4}[BEST], "call_ns": 50.0,
          "rotate_ns": 0.3, "pack_f32_ns": 0.4, "pack_f64_ns": 0.4, "fft_f32_ns": 0.11, "fft_f64_ns": 0.2}
PAIRS = [(1, 1), (0, 1)]
# (shape, cutoff): 1D, 2D and 3D, small windows.
SHAPES = [((4, 2, 300), 10), ((4, 2, 40, 50), 4), ((2, 2, 12, 14, 16), 2)]


@pytest.fixture
def route(monkeypatch):
    """Auto routing with the measured costs, and any override set by a test dropped afterwards."""
    monkeypatch.setenv("PYMKS_VAE_BINARY_PATH", "auto")
    monkeypatch.delenv("PYMKS_VAE_ROUTE_COSTS", raising=False)
    prev = ops.set_binary_route_costs(None)
    # No route trials: these tests ask what the cost model decides (the trials have their own).
    band = _C._set_binary_route_trial_band(0.0)
    _C._clear_binary_route_trials()
    yield monkeypatch
    _C._set_binary_route_trial_band(band)
    _C._clear_binary_route_trials()
    ops.set_binary_route_costs(prev)


def one_hot(shape, dtype=torch.float64):
    labels = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]))
    return torch.nn.functional.one_hot(labels, shape[1]).movedim(-1, 1).to(dtype).contiguous()


def costs(fft):
    """FITTED with both transform costs set to fft."""
    return dict(FITTED, fft_f32_ns=fft, fft_f64_ns=fft)


# ----------------------------------------------------------------------------- the costs in force
def test_costs_are_measured_once_per_thread_count(route):
    cal = ops.binary_route_calibration()
    assert cal["kernel"] == BEST and cal["threads"] == torch.get_num_threads()
    assert set(cal["costs"]) == set(NAMES)
    assert all(math.isfinite(v) and v > 0 for v in cal["costs"].values()), cal
    if cal["source"] == "unused":  # an x86 CPU without popcnt never counts
        return
    assert cal["source"] == "measured" and cal["seconds"] > 0
    # Each measured cost lies within a factor 16 of the fitted one (the measurement's clamp).
    for name in NAMES:
        assert FITTED[name] / 16 * (1 - 1e-9) <= cal["costs"][name] <= FITTED[name] * 16 * (1 + 1e-9), name
    assert ops.binary_route_calibration() == cal  # kept, not measured again
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        cal_other = ops.binary_route_calibration()
        assert cal_other["threads"] == other and cal_other["source"] == "measured"
        assert ops.binary_route_calibration() == cal_other
    finally:
        torch.set_num_threads(threads)
    assert ops.binary_route_calibration() == cal
    again = ops.binary_route_calibration(remeasure=True)
    assert again["source"] == "measured" and again["threads"] == cal["threads"]
    assert again["seconds"] != cal["seconds"]  # a new measurement
    assert ops.binary_route_calibration() == again
    with pytest.raises(TypeError, match="binary_route_calibration: remeasure must be True or False"):
        ops.binary_route_calibration(remeasure=1)


def test_measuring_leaves_the_random_generator_alone(route):
    """The probes are a fixed pattern: measuring (at any call) must not shift a seeded sequence."""
    torch.manual_seed(123)
    want = torch.rand(5)
    torch.manual_seed(123)
    ops.binary_route_calibration(remeasure=True)
    assert torch.equal(torch.rand(5), want)


def test_concurrent_first_use_gives_one_calibration(route):
    results = []

    def work():
        x = one_hot((2, 2, 32, 32))
        ops.two_point_stats(x, PAIRS, cutoff=3)
        results.append(ops.binary_route_calibration())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    # Worker threads run torch with their own thread count: one calibration per count, shared.
    by_threads = {}
    for r in results:
        assert by_threads.setdefault(r["threads"], r) == r


def test_fitted_and_listed_costs_from_the_environment(route):
    route.setenv("PYMKS_VAE_ROUTE_COSTS", "fitted")
    cal = ops.binary_route_calibration()
    assert cal["source"] in ("fitted", "unused")
    assert cal["costs"] == pytest.approx(FITTED, rel=1e-12)
    if cal["source"] == "unused":
        return
    route.setenv("PYMKS_VAE_ROUTE_COSTS", "fft_f32_ns=0.05,word_ns=2e-1")
    cal = ops.binary_route_calibration()
    assert cal["source"] == "env"
    assert cal["costs"] == pytest.approx(dict(FITTED, fft_f32_ns=0.05, word_ns=0.2), rel=1e-12)
    route.setenv("PYMKS_VAE_ROUTE_COSTS", "measure")
    assert ops.binary_route_calibration()["source"] == "measured"


@pytest.mark.parametrize("value,match", [
    ("fast", "PYMKS_VAE_ROUTE_COSTS must be unset, 'measure', 'fitted' or a list of name=value"),
    ("fft_ns=0.1", "PYMKS_VAE_ROUTE_COSTS: unknown cost 'fft_ns'"),
    ("word_ns=abc", "PYMKS_VAE_ROUTE_COSTS: word_ns must be a number, got 'abc'"),
    ("word_ns=", "PYMKS_VAE_ROUTE_COSTS: word_ns must be a number"),
    ("call_ns=-1", "PYMKS_VAE_ROUTE_COSTS: call_ns must be a finite number > 0"),
    ("fft_f64_ns=nan", "PYMKS_VAE_ROUTE_COSTS: fft_f64_ns must be a finite number > 0"),
])
def test_malformed_environment_is_a_clear_error(route, value, match):
    if BEST == "generic" and ops.binary_route_calibration()["source"] == "unused":
        pytest.skip("this CPU never counts: the costs are not read")
    route.setenv("PYMKS_VAE_ROUTE_COSTS", value)
    with pytest.raises(ValueError, match=match):
        ops.binary_route_calibration()
    with pytest.raises(ValueError, match=match):  # the operator reads it on binary input
        ops.two_point_stats(one_hot((1, 2, 8, 8)), PAIRS, cutoff=2)


def test_set_costs_overrides_and_restores(route):
    route.setenv("PYMKS_VAE_ROUTE_COSTS", "fitted")  # what the override is dropped back to
    assert ops.set_binary_route_costs({"fft_f32_ns": 0.5}) is None
    cal = ops.binary_route_calibration()
    assert cal["source"] == "set"
    assert cal["costs"] == pytest.approx(dict(FITTED, fft_f32_ns=0.5), rel=1e-12)
    prev = ops.set_binary_route_costs(costs(1.0))
    assert prev == pytest.approx(dict(FITTED, fft_f32_ns=0.5), rel=1e-12)
    assert ops.binary_route_calibration()["costs"] == pytest.approx(costs(1.0), rel=1e-12)
    assert ops.set_binary_route_costs(None) == pytest.approx(costs(1.0), rel=1e-12)
    assert ops.binary_route_calibration()["source"] in ("fitted", "unused")
    assert ops.set_binary_route_costs(None) is None


@pytest.mark.parametrize("bad,err,match", [
    ({"fft_ns": 1.0}, ValueError, "set_binary_route_costs: unknown cost 'fft_ns'"),
    ({"word_ns": 0.0}, ValueError, "set_binary_route_costs: word_ns must be a finite number > 0, got 0.0"),
    ({"word_ns": float("inf")}, ValueError, "word_ns must be a finite number > 0"),
    ({"call_ns": True}, TypeError, "set_binary_route_costs: call_ns must be a number, got True"),
    ({"call_ns": "1"}, TypeError, "call_ns must be a number"),
    ([("word_ns", 1.0)], TypeError, "set_binary_route_costs: costs must be a dict name -> nanoseconds or None"),
])
def test_set_costs_rejects_bad_values(route, bad, err, match):
    with pytest.raises(err, match=match):
        ops.set_binary_route_costs(bad)
    assert ops.binary_route_calibration()["source"] != "set"


def test_private_binding_checks_every_name_and_value():
    from pymks_vae import _extension
    with pytest.raises(ValueError, match="set_binary_route_costs: costs lacks 'fft_f64_ns'"):
        _extension._C._set_binary_route_costs({k: v for k, v in FITTED.items() if k != "fft_f64_ns"})
    with pytest.raises(ValueError, match="set_binary_route_costs: costs has unknown names"):
        _extension._C._set_binary_route_costs(dict(FITTED, extra=1.0))
    with pytest.raises(ValueError, match="set_binary_route_costs: rotate_ns must be a finite number > 0"):
        _extension._C._set_binary_route_costs(dict(FITTED, rotate_ns=-0.5))


# ----------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("shape,cutoff", SHAPES)
def test_decision_follows_the_costs(shape, cutoff, periodic):
    """Counting when the transforms are costed high, the transforms when costed low; the estimates
    are linear in the batch and in the costs, and the decision flips where they cross."""
    kw = dict(periodic=periodic, cutoff=cutoff)
    assert ops.binary_route(shape, PAIRS, costs=costs(1e3), **kw)["route"] == "counting"
    assert ops.binary_route(shape, PAIRS, costs=costs(1e-6), **kw)["route"] == "transforms"
    base = ops.binary_route(shape, PAIRS, costs=FITTED, **kw)
    doubled = ops.binary_route((2 * shape[0],) + shape[1:], PAIRS, costs=FITTED, **kw)
    assert doubled["route"] == base["route"]
    assert doubled["count_ms"] == pytest.approx(2 * base["count_ms"], rel=1e-12)
    assert doubled["transform_ms"] == pytest.approx(2 * base["transform_ms"], rel=1e-12)
    # The break-even transform cost: just above it counting wins, just below the transforms.
    even = FITTED["fft_f64_ns"] * base["count_ms"] / base["transform_ms"]
    above = ops.binary_route(shape, PAIRS, costs=costs(even * (1 + 1e-9)), **kw)
    below = ops.binary_route(shape, PAIRS, costs=costs(even * (1 - 1e-9)), **kw)
    assert (above["route"], below["route"]) == ("counting", "transforms")
    assert above["count_ms"] == pytest.approx(base["count_ms"], rel=1e-12)
    # Counting's estimate grows with every counting cost, and not with the transforms'.
    for name in ("word_ns", "call_ns", "rotate_ns", "pack_f64_ns"):
        dearer = ops.binary_route(shape, PAIRS, costs=dict(FITTED, **{name: 2 * FITTED[name]}), **kw)
        assert dearer["count_ms"] > base["count_ms"], name
        assert dearer["transform_ms"] == base["transform_ms"], name


@pytest.mark.parametrize("shape,cutoff", SHAPES)
def test_gradient_calls_weigh_counting_against_the_inverse_transforms(shape, cutoff):
    """With requires_grad the backward pass needs the spectra, which both routes then compute:
    counting competes with the transforms route's inverse transforms alone - for these pairs under
    the partition relations one forward and one inverse transform, so half of the estimate."""
    base = ops.binary_route(shape, PAIRS, cutoff=cutoff, costs=FITTED)
    grad = ops.binary_route(shape, PAIRS, cutoff=cutoff, costs=FITTED, requires_grad=True)
    assert grad["count_ms"] == base["count_ms"]
    assert grad["transform_ms"] == pytest.approx(0.5 * base["transform_ms"], rel=1e-12)
    # Three states, one auto pair, no relations: one forward transform (state 2), one inverse.
    three = ((2, 3) + shape[2:], [(2, 2)])
    full = ops.binary_route(*three, cutoff=cutoff, costs=FITTED, partition=False)
    inv = ops.binary_route(*three, cutoff=cutoff, costs=FITTED, partition=False, requires_grad=True)
    assert inv["transform_ms"] == pytest.approx(full["transform_ms"] / 2, rel=1e-12)
    # Between the two break-even points: counted without a gradient, transformed with one.
    even = FITTED["fft_f64_ns"] * base["count_ms"] / base["transform_ms"]
    mid = costs(1.5 * even)
    assert ops.binary_route(shape, PAIRS, cutoff=cutoff, costs=mid)["route"] == "counting"
    assert ops.binary_route(shape, PAIRS, cutoff=cutoff, costs=mid, requires_grad=True)["route"] == "transforms"
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        ops.binary_route(shape, PAIRS, cutoff=cutoff, requires_grad=1)


def test_window_size_decides_with_fitted_costs():
    """With the shipped constants: a small window of 16 x 128^2 is counted, the full one transformed
    (the docstring's example); larger windows only ever move the choice towards the transforms."""
    shape = (16, 2, 128, 128)
    routes = [ops.binary_route(shape, PAIRS, cutoff=c, costs=FITTED)["route"] for c in (1, 5, 10, 20, 40, 63)]
    assert routes[0] == routes[3] == "counting"
    assert ops.binary_route(shape, PAIRS, costs=FITTED)["route"] == "transforms"
    flips = [k for k in range(1, len(routes)) if routes[k] != routes[k - 1]]
    assert len(flips) <= 1 and (not flips or routes[-1] == "transforms"), routes
    est = [ops.binary_route(shape, PAIRS, cutoff=c, costs=FITTED)["count_ms"] for c in (1, 5, 10, 20, 40, 63)]
    assert est == sorted(est)


def test_dtype_and_boundary_pick_their_own_costs():
    shape, kw = (8, 2, 64, 64), dict(cutoff=5)
    split = dict(FITTED, fft_f32_ns=1e-6, fft_f64_ns=1e3)
    assert ops.binary_route(shape, PAIRS, dtype=torch.float32, costs=split, **kw)["route"] == "transforms"
    assert ops.binary_route(shape, PAIRS, dtype=torch.float64, costs=split, **kw)["route"] == "counting"
    packs = dict(FITTED, pack_f32_ns=10.0)
    assert (ops.binary_route(shape, PAIRS, dtype=torch.float32, costs=packs, **kw)["count_ms"]
            > ops.binary_route(shape, PAIRS, dtype=torch.float64, costs=packs, **kw)["count_ms"])
    # Non-periodic: the transforms run on the padded grid and cost twice as much per unit.
    per = ops.binary_route(shape, PAIRS, costs=FITTED, **kw)["transform_ms"]
    non = ops.binary_route(shape, PAIRS, periodic=False, costs=FITTED, **kw)["transform_ms"]
    # The grid: the smallest even 2,3,5,7-smooth size >= 64 + 5 (at most one factor 7), 70; and no partition relations (they hold
    # for periodic statistics): 4 transforms (two forward, two inverse), not 2.
    grid_ratio = (70 * 70 * math.log2(70 * 70)) / (64 * 64 * math.log2(64 * 64))
    assert non == pytest.approx(per * 2 * grid_ratio * 2, rel=1e-12)


def test_partition_setting_changes_the_plan():
    shape, kw = (8, 2, 64, 64), dict(cutoff=5, costs=FITTED)
    checked = ops.binary_route(shape, PAIRS, partition=None, **kw)
    direct = ops.binary_route(shape, PAIRS, partition=False, **kw)
    # With the relations: one transform and one auto base; without: two and two (a cross).
    assert direct["transform_ms"] == pytest.approx(2 * checked["transform_ms"], rel=1e-12)
    assert direct["count_ms"] > checked["count_ms"]
    assert ops.binary_route(shape, PAIRS, partition=True, costs=costs(1e3), cutoff=5)["route"] == "transforms"


@pytest.mark.parametrize("args,kw,err,match", [
    ((("4", 2), PAIRS), {}, ValueError, "binary_route: shape must be"),
    (((4, 2, 8, 8), PAIRS), dict(dtype=torch.float16), TypeError, "binary_route: dtype must be torch.float32"),
    (((4, 2, 8, 8), PAIRS), dict(cutoff=4), ValueError, "binary_route: cutoff 4 too large"),
    (((4, 2, 8, 8), [(0, 2)]), {}, ValueError, "binary_route: correlations\\[0\\]"),
    (((4, 2, 8, 8), PAIRS), dict(partition="yes"), TypeError, "binary_route: partition must be None"),
    (((4, 2, 8, 8), PAIRS), dict(costs={"nope": 1}), ValueError, "binary_route: unknown cost 'nope'"),
    (((4, 2, 8, 8), PAIRS), dict(costs={"word_ns": -1}), ValueError, "word_ns must be a finite number > 0"),
    (((4, 2, 8, 8), PAIRS), dict(costs={"word_ns": True}), TypeError, "binary_route: word_ns must be a number, got True"),
    (((4, 2, 8, 8), PAIRS), dict(costs=[("word_ns", 1)]), TypeError, "binary_route: costs must be a dict"),
    (((0, 2, 8, 8), PAIRS), {}, ValueError, "binary_route: shape must be"),
    ((None, PAIRS), {}, TypeError, "binary_route: shape must be a sequence of ints"),
])
def test_binary_route_argument_errors(args, kw, err, match):
    with pytest.raises(err, match=match):
        ops.binary_route(*args, **kw)


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(ops.binary_route, "binary_route", globs={"binary_route": ops.binary_route}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 2


# ----------------------------------------------------------------------------- the operator follows it
@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("shape,cutoff", SHAPES)
def test_operator_takes_the_route_the_costs_pick(route, shape, cutoff, periodic):
    x = one_hot(shape)
    kw = dict(periodic=periodic, cutoff=cutoff)
    route.setenv("PYMKS_VAE_BINARY_PATH", BEST)
    counted = ops.two_point_stats(x, PAIRS, **kw)
    route.setenv("PYMKS_VAE_BINARY_PATH", "off")
    transformed = ops.two_point_stats(x, PAIRS, **kw)
    assert not torch.equal(counted, transformed)  # the transforms are a few ulps off
    route.setenv("PYMKS_VAE_BINARY_PATH", "auto")
    for fft, want in [(1e3, counted), (1e-6, transformed)]:
        ops.set_binary_route_costs(costs(fft))
        assert ops.binary_route(shape, PAIRS, **kw)["route"] == ("counting" if fft > 1 else "transforms")
        assert torch.equal(ops.two_point_stats(x, PAIRS, **kw), want), fft


@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
@pytest.mark.parametrize("shape,cutoff", SHAPES)
def test_operator_with_gradient_takes_the_route_for_kept_spectra(route, shape, cutoff):
    """Costs between the two break-even points: the forward pass alone counts, the same call on an
    input that requires grad transforms (its spectra are kept for the backward pass), and its
    gradient is the reference's."""
    x = one_hot(shape)
    counted, transformed = _routes(x, cutoff)
    base = ops.binary_route(shape, PAIRS, cutoff=cutoff, costs=FITTED)
    ops.set_binary_route_costs(costs(1.5 * FITTED["fft_f64_ns"] * base["count_ms"] / base["transform_ms"]))
    assert torch.equal(ops.two_point_stats(x, PAIRS, cutoff=cutoff), counted)
    xr = x.clone().requires_grad_(True)
    out = ops.two_point_stats(xr, PAIRS, cutoff=cutoff)
    assert torch.equal(out.detach(), transformed)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    xs = x.clone().requires_grad_(True)
    (reference.two_point_stats_ref(xs, PAIRS, cutoff=cutoff) * w).sum().backward()
    np.testing.assert_allclose(xr.grad.numpy(), xs.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
def test_measured_costs_route_the_operator_as_estimated(route):
    """Whatever was measured, the operator takes the route binary_route reports under it."""
    for shape, cutoff in SHAPES + [((8, 2, 128, 128), 20), ((8, 2, 128, 128), None)]:
        x = one_hot(shape)
        auto = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
        route.setenv("PYMKS_VAE_BINARY_PATH", BEST)
        counted = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
        route.setenv("PYMKS_VAE_BINARY_PATH", "off")
        transformed = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
        route.setenv("PYMKS_VAE_BINARY_PATH", "auto")
        if torch.equal(counted, transformed):
            continue  # the bits cannot tell the routes apart
        counting = ops.binary_route(shape, PAIRS, cutoff=cutoff)["route"] == "counting"
        assert torch.equal(auto, counted if counting else transformed), (shape, cutoff)
        np.testing.assert_allclose(auto.numpy(), counted.numpy(), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- route trials
def _routes(x, cutoff):
    """The counted and the transformed statistics of x (each route forced)."""
    env = os.environ.get("PYMKS_VAE_BINARY_PATH")
    try:
        os.environ["PYMKS_VAE_BINARY_PATH"] = BEST
        counted = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
        os.environ["PYMKS_VAE_BINARY_PATH"] = "off"
        transformed = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
    finally:
        os.environ["PYMKS_VAE_BINARY_PATH"] = env
    assert not torch.equal(counted, transformed)
    return counted, transformed


@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
@pytest.mark.parametrize("shape,cutoff,faster", [
    ((16, 2, 48, 48, 48), 1, "counting"),   # about 6x faster than the transforms on the development VM
    ((2, 2, 32, 32, 32), None, "transforms"),  # about 6x faster than counting there
])
def test_route_trial_times_both_routes_once_and_keeps_the_faster(route, shape, cutoff, faster):
    # Band 1e9: every call is a trial candidate, whatever the measured costs say.
    _C._set_binary_route_trial_band(1e9)
    x = one_hot(shape, torch.float32)
    counted, transformed = _routes(x, cutoff)
    assert _C._binary_route_trials() == 0
    first = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
    assert _C._binary_route_trials() == 1
    # The trial's own call and the calls of that kind that follow give the result of the route the
    # trial timed faster (the later ones untimed). Which one that is depends on the machine's load
    # at that moment (``faster`` is what an idle development VM measures, by about 6x), so the test
    # checks that the trial's verdict is one of the two routes and that every call, the first
    # included, gives its bits, not which route won: timings are for benchmarks/bench_route.py.
    assert torch.equal(first, counted) or torch.equal(first, transformed)
    # Two rounds at least (one noisy round cannot decide), a third only while the routes are
    # within 30% of each other; the verdict is the faster of the two times kept.
    rounds, t_count, t_transform = _C._last_binary_route_trial()
    assert rounds in (2, 3) and t_count > 0 and t_transform > 0
    assert rounds == 3 or max(t_count, t_transform) > 1.3 * min(t_count, t_transform)
    assert torch.equal(first, counted if t_count <= t_transform else transformed)
    kept = ops.two_point_stats(x, PAIRS, cutoff=cutoff)
    assert torch.equal(kept, first)
    assert torch.equal(ops.two_point_stats(x, PAIRS, cutoff=cutoff), kept)
    assert _C._binary_route_trials() == 1
    # another kind of call (another batch size) is timed on its own
    ops.two_point_stats(x[:1], PAIRS, cutoff=cutoff)
    assert _C._binary_route_trials() == 2
    # measuring the costs again forgets the trials
    ops.binary_route_calibration(remeasure=True)
    assert _C._binary_route_trials() == 0


@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
def test_no_route_trial_outside_the_band_under_set_costs_or_for_non_binary_input(route):
    x = one_hot((16, 2, 48, 48, 48), torch.float32)
    _C._set_binary_route_trial_band(1e9)
    ops.set_binary_route_costs(FITTED)  # set costs fix the route: never overridden
    ops.two_point_stats(x, PAIRS, cutoff=1)
    ops.set_binary_route_costs(None)
    route.setenv("PYMKS_VAE_ROUTE_COSTS", "fitted")
    ops.two_point_stats(x, PAIRS, cutoff=1)
    route.delenv("PYMKS_VAE_ROUTE_COSTS")
    ops.two_point_stats(x * 0.5, PAIRS, cutoff=1)  # not binary: the transforms, nothing to time
    _C._set_binary_route_trial_band(1.0)  # an empty band
    ops.two_point_stats(x, PAIRS, cutoff=1)
    assert _C._binary_route_trials() == 0
    _C._set_binary_route_trial_band(1e9)
    ops.two_point_stats(x, PAIRS, cutoff=1)
    assert _C._binary_route_trials() == 1


@pytest.mark.skipif(BEST == "generic", reason="no counting kernel the cost model uses on this CPU")
def test_deterministic_algorithms_take_the_fitted_costs_and_no_trials(route):
    x = one_hot((16, 2, 48, 48, 48), torch.float32)
    _C._set_binary_route_trial_band(1e9)  # every call a trial candidate, outside deterministic mode
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cal = ops.binary_route_calibration()
        assert cal["source"] == "deterministic" and cal["costs"] == FITTED
        ops.two_point_stats(x, PAIRS, cutoff=1)
        assert _C._binary_route_trials() == 0
    finally:
        torch.use_deterministic_algorithms(prev)
    assert ops.binary_route_calibration()["source"] == "measured"  # the control
    ops.two_point_stats(x, PAIRS, cutoff=1)
    assert _C._binary_route_trials() == 1


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_route_trial_band_rejects_bad_values(bad):
    with pytest.raises(RuntimeError, match="band must be a finite number >= 0"):
        _C._set_binary_route_trial_band(bad)
