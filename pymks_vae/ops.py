"""Typed entry points to the compiled operators, with input validation and autograd.

Each public function validates its arguments once (shape, dtype, indices, cutoff, mask) and then
calls the registered operator ``torch.ops.pymks_vae.*`` - whose C++/CUDA kernels trust that
validation - or, when the extension is not built, the pure-torch reference of
:mod:`pymks_vae.reference`. Checks that need the data itself (NaN/Inf, a mask outside [0, 1]) run
inside the kernels, so they also hold under ``torch.compile``.

Layout: channels first, ``(batch, n_state, *spatial)`` with 1, 2 or 3 spatial dims.

Data checks and the hot path: the checks that read the data (NaN/Inf, a mask outside [0, 1], and
on a GPU whether the states partition every pixel) each bring one value back to the host - on a
GPU a wait for all queued work, and an operation a CUDA graph cannot capture. They are on by
default; :func:`data_checks` turns them off for a block (per thread), which is what
:func:`pymks_vae.training.train_vae` does after its first batch has passed them. Argument checks
(types, shapes, dtypes, devices, indices) read no data and always run. With the checks off, NaN
or Inf input gives NaN statistics instead of an error (the training loop checks its accumulated
loss once per epoch), and on a GPU ``partition=None`` does not use the partition relations.
"""
import contextlib
import math
import numbers
import threading

import torch

from pymks_vae import _extension, reference

__all__ = ["two_point_stats", "spatial_stats_loss", "soft_indicator", "data_checks", "data_checks_enabled",
           "binary_route", "binary_route_calibration", "set_binary_route_costs"]

_CHECKS = threading.local()


def data_checks_enabled():
    """Whether the operators check the data itself on this thread (see the module docstring).

    Returns:
        bool; True unless switched off by :func:`data_checks` in a block around the call.

    Example:
        >>> data_checks_enabled()
        True
        >>> with data_checks(False):
        ...     data_checks_enabled()
        False
    """
    return getattr(_CHECKS, "enabled", True)


def _set_data_checks(enabled):
    prev = data_checks_enabled()
    _CHECKS.enabled = enabled
    # A module built before the switch existed keeps its kernel checks on: slower, still correct.
    setter = getattr(_extension._C, "_set_data_checks", None) if _extension.has_extension() else None
    if setter is not None:
        setter(enabled)
    return prev


@contextlib.contextmanager
def data_checks(enabled=True):
    """Turn this thread's data checks (NaN/Inf, mask range, GPU partition check) on or off in a block.

    Args:
        enabled: True (the default outside any block) or False.

    Yields:
        None; the previous setting comes back on exit.

    Example:
        >>> import torch
        >>> x = torch.full((1, 1, 8, 8), float("nan"))
        >>> with data_checks(False):   # no error, no host synchronisation: NaN out
        ...     bool(torch.isnan(two_point_stats(x, [(0, 0)])).all())
        True
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"data_checks: enabled must be True or False, got {enabled!r}")
    prev = _set_data_checks(enabled)
    try:
        yield
    finally:
        _set_data_checks(prev)

_REDUCTIONS = ("sum", "batchmean", "mean", "none")
_PARTITION_MODE = {False: 0, True: 1, None: 2}


# ----------------------------------------------------------------------------- validation
def _is_int(v):
    # A plain int first: the ABC check costs a microsecond per call on the loss's hot path.
    return type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Integral))


def _check_field(name, t, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.ndim < 3 or t.ndim > 5:
        raise ValueError(
            f"{op}: {name} must have shape (batch, n_state, *spatial) with 1, 2 or 3 spatial dims; "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{op}: {name} is an empty batch (shape {tuple(t.shape)}); need batch >= 1")
    if 0 in t.shape[1:]:
        raise ValueError(f"{op}: {name} has a zero-sized state or spatial axis: {tuple(t.shape)}")


def _pairs(correlations, n_state, op):
    if isinstance(correlations, (str, bytes)) or not hasattr(correlations, "__iter__"):
        raise TypeError(f"{op}: correlations must be a sequence of (i, j) state pairs, got {correlations!r}")
    pairs = []
    for k, pair in enumerate(correlations):
        try:
            i, j = pair
        except (TypeError, ValueError):
            raise TypeError(f"{op}: correlations[{k}] must be a pair (i, j) of ints, got {pair!r}") from None
        for s in (i, j):
            if not _is_int(s):
                raise TypeError(f"{op}: correlations[{k}] = {pair!r} must hold ints (state indices)")
            if not 0 <= int(s) < n_state:
                raise ValueError(
                    f"{op}: correlations[{k}] = {tuple(pair)!r} names state {int(s)}, "
                    f"but x has n_state={n_state} (valid: 0..{n_state - 1})"
                )
        pairs.append((int(i), int(j)))
    if not pairs:
        raise ValueError(f"{op}: correlations is empty; give at least one (i, j) pair")
    return pairs


def _window(cutoff, spatial, op):
    d = len(spatial)
    if cutoff is None:
        return tuple(spatial)
    if isinstance(cutoff, bool):
        raise TypeError(f"{op}: cutoff must be None, an int or a tuple of {d} ints, got {cutoff!r}")
    if _is_int(cutoff):
        cutoff = (int(cutoff),) * d
    try:
        cutoff = tuple(cutoff)
    except TypeError:
        raise TypeError(f"{op}: cutoff must be None, an int or a tuple of {d} ints, got {cutoff!r}") from None
    if len(cutoff) != d:
        raise ValueError(f"{op}: cutoff {cutoff!r} has {len(cutoff)} entries; x has {d} spatial dims")
    for axis, (c, n) in enumerate(zip(cutoff, spatial)):
        if not _is_int(c):
            raise TypeError(f"{op}: cutoff entries must be ints, got {c!r}")
        if c < 0:
            raise ValueError(f"{op}: cutoff must be >= 0, got {c} on spatial axis {axis}")
        if 2 * c + 1 > n:
            raise ValueError(
                f"{op}: cutoff {c} too large for spatial axis {axis} of size {n} "
                f"(at most {(n - 1) // 2}, so that the 2*cutoff+1 window fits)"
            )
    return tuple(2 * int(c) + 1 for c in cutoff)


def _mask(mask, x, op):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.requires_grad:
        raise ValueError(f"{op}: mask requires grad, but the operator treats it as a constant; pass mask.detach()")
    spatial = tuple(x.shape[2:])
    if mask.dtype == torch.bool or not mask.is_floating_point():
        mask = mask.to(x.dtype)
    elif mask.dtype != x.dtype:
        raise TypeError(f"{op}: mask dtype {mask.dtype} differs from x dtype {x.dtype}")
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but x is on {x.device}")
    shape = tuple(mask.shape)
    if shape == spatial:
        mask = mask.unsqueeze(0)
    elif not (len(shape) == len(spatial) + 1 and shape[1:] == spatial and shape[0] in (1, x.shape[0])):
        raise ValueError(
            f"{op}: mask must have shape {spatial} (shared) or ({x.shape[0]}, *{spatial}) "
            f"(per sample); got {shape}"
        )
    return mask.contiguous()


def _use_compiled(x):
    if not _extension.has_extension():
        _extension.warn_fallback()
        return False
    if x.device.type == "cuda" and not _extension.has_cuda_kernels():
        _extension.warn_fallback()
        return False
    return x.device.type in ("cpu", "cuda")


# ----------------------------------------------------------------------------- two-point statistics
def two_point_stats(x, correlations, *, periodic=True, cutoff=None, mask=None, partition=None):
    """Batched two-point statistics ``f_ij(r)`` of microstructure fields.

    Periodic: ``f_ij(r) = (1/S) sum_x x_i(x) x_j(x + r)``, S the number of pixels. Non-periodic:
    the fields are zero padded and each lag is divided by its number of overlapping pixels
    (PyMKS's definition). Lag ``r = 0`` sits at index ``window[d] // 2`` of every axis.

    Args:
        x: float32/float64 tensor ``(batch, n_state, *spatial)``, 1-3 spatial dims, any sizes.
        correlations: sequence of state pairs ``(i, j)``; ``(j, i)`` is the mirror of ``(i, j)``.
        periodic: periodic boundaries (default) or zero padding with overlap normalisation.
        cutoff: None for the full spatial window, else the largest lag kept (an int, or one per
            axis); the window is then ``2*cutoff+1`` per axis. At most ``(N-1)//2`` per axis.
        mask: optional ``(*spatial)`` or ``(batch, *spatial)`` weights in [0, 1] (bool allowed);
            PyMKS semantics: fields multiplied by it, result divided by the mask's own correlation.
            Treated as a constant (no gradient). Lags with no overlap give 0.
        partition: whether the states sum to 1 at every pixel (one-hot or PyMKS's hat basis).
            None checks it (one cheap pass); True trusts it; False never uses it. When it holds
            (periodic, no mask), one state's transform and every correlation with it follow from
            the others by linear relations, so fewer FFTs run. Gradients are always those of the
            definition above.

    Returns:
        tensor ``(batch, len(correlations), *window)`` of the dtype of ``x``. On the CPU, input of
        only 0s and 1s (segmented microstructures) without a mask is counted rather than
        transformed where that is estimated cheaper (small windows; costs measured on this CPU, see
        :func:`binary_route`): the result is then exact, the correctly rounded count over the number
        of pixel pairs (docs/two_point_stats.md, item 8).

    Raises:
        TypeError/ValueError naming the argument for bad input; ValueError from the kernel when
        ``x`` holds NaN/Inf or ``mask`` leaves [0, 1].

    Example:
        >>> import torch
        >>> from pymks_vae.ops import two_point_stats
        >>> x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
        >>> x[0, 1, :, :3] = 1; x[0, 0] = 1 - x[0, 1]
        >>> f = two_point_stats(x, [(1, 1), (0, 1)], cutoff=2)
        >>> f.shape, round(float(f[0, 0, 2, 2]), 12)   # f_11(0) is the volume fraction of state 1
        (torch.Size([1, 2, 5, 5]), 0.5)
    """
    op = "two_point_stats"
    _check_field("x", x, op)
    pairs = _pairs(correlations, x.shape[1], op)
    window = _window(cutoff, tuple(x.shape[2:]), op)
    mask = _mask(mask, x, op)
    if partition not in _PARTITION_MODE:
        raise TypeError(f"{op}: partition must be None, True or False, got {partition!r}")
    if not isinstance(periodic, bool):
        raise TypeError(f"{op}: periodic must be a bool, got {periodic!r}")
    return _run_two_point_stats(x, pairs, periodic, cutoff, window, mask, partition)


def two_point_stats_validated(x, pairs, periodic, cutoff):
    """:func:`two_point_stats` without the argument checks, for callers that made them once for
    many calls (the dask blocks of :mod:`pymks_vae.correlations`).

    Args:
        x: float tensor ``(batch, n_state, *spatial)``, batch >= 1.
        pairs: list of ``(i, j)`` int pairs, each state < n_state.
        periodic: bool.
        cutoff: int with ``2*cutoff+1 <= min(spatial)``.

    Returns:
        like :func:`two_point_stats` (NaN/Inf in ``x`` still raise, from the kernel).
    """
    window = (2 * int(cutoff) + 1,) * (x.ndim - 2)
    return _run_two_point_stats(x, pairs, periodic, cutoff, window, None, None)


def _run_two_point_stats(x, pairs, periodic, cutoff, window, mask, partition):
    """The compiled operator, or the reference where it is not built, on checked arguments."""
    if not _use_compiled(x):
        _check_finite_eager("two_point_stats", x=x, mask=mask)
        return reference.two_point_stats_ref(x, pairs, periodic=periodic, cutoff=cutoff, mask=mask)
    args = (x, [p[0] for p in pairs], [p[1] for p in pairs], periodic, list(window), mask, _PARTITION_MODE[partition])
    if x.requires_grad and torch.is_grad_enabled():
        # The variant that also returns the spectra of x, so that the backward transforms no field.
        return torch.ops.pymks_vae.two_point_stats_spectra(*args)[0]
    return torch.ops.pymks_vae.two_point_stats(*args)


def _check_finite_eager(op, **tensors):
    """Data checks for the reference path (the kernels do these themselves)."""
    if not data_checks_enabled():
        return
    for name, t in tensors.items():
        if t is None:
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains NaN or Inf")
        if name == "mask" and (bool((t < 0).any()) or bool((t > 1).any())):
            raise ValueError(f"{op}: mask values must lie in [0, 1]")


# ----------------------------------------------------------------------------- binary route
# On the CPU, input of only 0s and 1s is counted exactly or transformed, whichever a cost model
# estimates faster (docs/two_point_stats.md, item 8). The model's per-unit costs are measured on
# the CPU at hand, once per thread count, at the first call that needs them; these functions show,
# set and apply them.
_COST_NAMES = ("word_ns", "call_ns", "rotate_ns", "pack_f32_ns", "pack_f64_ns", "fft_f32_ns", "fft_f64_ns")


def _route_module(op):
    if not _extension.has_extension():
        raise RuntimeError(f"{op}: the compiled extension is not built, so there is no counting route")
    return _extension._C


def _cost_values(costs, op):
    """``costs`` (dict name -> nanoseconds) checked: known names, finite numbers > 0, as floats."""
    if not isinstance(costs, dict):
        raise TypeError(f"{op}: costs must be a dict name -> nanoseconds or None, got {type(costs).__name__}")
    out = {}
    for name, value in costs.items():
        if name not in _COST_NAMES:
            raise ValueError(f"{op}: unknown cost {name!r} (names: {', '.join(_COST_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{op}: {name} must be a finite number > 0, got {value!r}")
        out[name] = float(value)
    return out


def binary_route_calibration(remeasure=False):
    """The counting route's cost model as it stands for calls from this thread.

    Measures it first if it has not been yet for this thread's thread count (once; 15-40 ms with
    one or two threads on an idle 2-core VM, more on a loaded machine): the counting and the
    transforms routes are timed on small probes (8 two-state fields of 128^2) and the fitted
    constants scaled to match. The measurement reflects
    the machine as it was then: a process that measured on a loaded machine can measure again.

    Args:
        remeasure: measure this thread count's costs again now (when they are measured ones: set
            or environment costs stay as they are), and forget the route trials (where the model
            was unsure, the first call of each kind timed both routes: docs/two_point_stats.md).

    Returns:
        dict with ``costs`` (dict of nanoseconds: ``word_ns`` per word counted, ``call_ns`` per
        kernel call, ``rotate_ns`` per word rotated, ``pack_f32_ns`` / ``pack_f64_ns`` per pixel
        packed, ``fft_f32_ns`` / ``fft_f64_ns`` per S log2 S of one transform), ``kernel`` (the
        counting kernel they are for), ``source`` ("measured", "set" by
        :func:`set_binary_route_costs`, "env" or "fitted" from ``PYMKS_VAE_ROUTE_COSTS``,
        "deterministic" (the fitted costs, under ``torch.use_deterministic_algorithms(True)``), "unused"
        on a CPU that never counts), ``threads`` (the thread count they hold for) and ``seconds``
        (what measuring took; 0 if not measured).

    Raises:
        RuntimeError when the extension is not built; ValueError when ``PYMKS_VAE_ROUTE_COSTS`` is
        malformed.

    Example:
        >>> cal = binary_route_calibration()
        >>> cal["source"] in ("measured", "set", "env", "fitted", "deterministic", "unused"), sorted(cal["costs"])[:2]
        (True, ['call_ns', 'fft_f32_ns'])
    """
    if not isinstance(remeasure, bool):
        raise TypeError(f"binary_route_calibration: remeasure must be True or False, got {remeasure!r}")
    cal = dict(_route_module("binary_route_calibration")._binary_route_calibration(remeasure))
    cal["costs"] = dict(cal["costs"])
    return cal


def set_binary_route_costs(costs):
    """Fix the route chooser's costs for every thread (tests, reproducible runs), or measure again.

    A fixed set makes the route of every call - and so its exact bits - independent of how fast the
    machine was when the costs would have been measured. ``PYMKS_VAE_ROUTE_COSTS=fitted`` (or a
    ``name=value,...`` list) does the same from the environment.

    Args:
        costs: dict name -> nanoseconds (names as in :func:`binary_route_calibration`; names left
            out keep the value in force now), or None to drop the override.

    Returns:
        the previous override (a full dict), or None if there was none - pass it back to restore.

    Raises:
        TypeError/ValueError naming the cost for an unknown name or a value that is not a finite
        number > 0.

    Example:
        >>> prev = set_binary_route_costs({"fft_f64_ns": 1e-6})   # transforms all but free
        >>> binary_route((4, 2, 64, 64), [(1, 1)])["route"]
        'transforms'
        >>> _ = set_binary_route_costs(prev)                      # back as it was
    """
    op = "set_binary_route_costs"
    module = _route_module(op)
    if costs is None:
        prev = module._set_binary_route_costs(None)
        return None if prev is None else dict(prev)
    values = _cost_values(costs, op)
    full = binary_route_calibration()["costs"] if set(values) != set(_COST_NAMES) else {}
    full.update(values)
    prev = module._set_binary_route_costs(full)
    return None if prev is None else dict(prev)


def binary_route(shape, correlations, *, periodic=True, cutoff=None, dtype=torch.float64, partition=None,
                 costs=None, requires_grad=False):
    """Which route :func:`two_point_stats` takes on the CPU for binary input, and the estimates.

    A pure function of its arguments and the costs: the same decision the operator makes before it
    reads the data (with ``partition=None`` it assumes the states partition every pixel, as one-hot
    input does; if they do not, the operator estimates again with the direct plan). Masked
    statistics, ``partition=True``, non-binary input, a GPU, and ``PYMKS_VAE_BINARY_PATH`` other than
    ``auto`` are not modelled: those always take the transforms (or the forced route).

    Args:
        shape: the input's shape ``(batch, n_state, *spatial)``, 1-3 spatial dims.
        correlations, periodic, cutoff, partition: as in :func:`two_point_stats`.
        dtype: torch.float32 or torch.float64.
        costs: dict of costs as in :func:`binary_route_calibration` (names left out: the value in
            force), or None for the costs in force for this thread.
        requires_grad: whether the input requires grad. The backward pass then needs the input's
            spectra, which the transforms route computes on its way and the counting route
            computes besides its counts: ``transform_ms`` is then the transforms route's inverse
            transforms alone, the part that competes with counting.

    Returns:
        dict with ``route`` ("counting" or "transforms") and the estimated ``count_ms`` and
        ``transform_ms`` of the call.

    Raises:
        TypeError/ValueError naming the argument.

    Example:
        >>> fitted = {"word_ns": 0.1, "call_ns": 50, "rotate_ns": 0.3, "pack_f32_ns": 0.4,
        ...           "pack_f64_ns": 0.4, "fft_f32_ns": 0.11, "fft_f64_ns": 0.2}
        >>> binary_route((16, 2, 128, 128), [(1, 1), (0, 1)], cutoff=20, costs=fitted)["route"]
        'counting'
        >>> binary_route((16, 2, 128, 128), [(1, 1), (0, 1)], costs=fitted)["route"]  # full window
        'transforms'
    """
    op = "binary_route"
    module = _route_module(op)
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: shape must be a sequence of ints (batch, n_state, *spatial), got {shape!r}") from None
    if len(shape) < 3 or len(shape) > 5 or min(shape) < 1:
        raise ValueError(f"{op}: shape must be (batch, n_state, *spatial) with 1-3 spatial dims, all >= 1; "
                         f"got {shape}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if partition not in _PARTITION_MODE:
        raise TypeError(f"{op}: partition must be None, True or False, got {partition!r}")
    if not isinstance(periodic, bool):
        raise TypeError(f"{op}: periodic must be a bool, got {periodic!r}")
    if not isinstance(requires_grad, bool):
        raise TypeError(f"{op}: requires_grad must be a bool, got {requires_grad!r}")
    pairs = _pairs(correlations, shape[1], op)
    window = _window(cutoff, shape[2:], op)
    cal = binary_route_calibration()
    full = cal["costs"]
    if costs is not None:
        full.update(_cost_values(costs, op))
    count_ns, transform_ns, counting = module._binary_route_estimate(
        list(shape[2:]), list(window), shape[0], [p[0] for p in pairs], [p[1] for p in pairs], shape[1], periodic,
        dtype == torch.float32, partition is None, full, requires_grad)
    # "unused": an x86 CPU without popcnt, whose portable loop never beats the transforms.
    route = "counting" if counting and partition is not True and cal["source"] != "unused" else "transforms"
    return {"route": route, "count_ms": count_ns * 1e-6, "transform_ms": transform_ns * 1e-6}


# ----------------------------------------------------------------------------- the loss
def spatial_stats_loss(x, target, *, correlations=((0, 0),), periodic=True, cutoff=None,
                       weight=None, scale=1.0, reduction="sum", offset=None):
    """Squared distance between the two-point statistics of ``x`` and of ``target``.

    ``sum over pairs and lags of weight * (scale * (f(x) - f(target)))**2`` per sample, where f
    is :func:`two_point_stats`. In the periodic case without cutoff or weight a fused kernel
    computes value and gradient from two forward FFTs and one inverse FFT (Parseval). Otherwise
    (a window, weights, non-periodic statistics) another fused kernel computes the difference of
    the statistics on the window only, from the spectra of ``x`` and ``target`` in one pass, and
    keeps the spectra of ``x`` for its backward pass (one pruned forward and one inverse FFT).

    Args:
        x: float tensor ``(batch, n_state, *spatial)`` (the reconstruction; differentiable).
        target: tensor of the same shape, dtype and device; treated as a constant, so it must
            not require grad (pass ``target.detach()``).
        correlations: state pairs, default ``((0, 0),)`` (the autocorrelation of state 0).
        periodic, cutoff: as in :func:`two_point_stats`.
        weight: None or a tensor broadcastable to ``(n_corr, *window)`` multiplying the squared
            differences of each lag.
        scale: multiplies the statistics (the paper's min/max normalisation is the affine map
            ``(f - min) / (max - min)``, whose offset cancels: pass ``1 / (max - min)``).
        reduction: how the per-sample sums over pairs and lags are reduced: "sum" over the
            batch (the paper's code); "batchmean", their mean over the batch (PyTorch's
            ``kl_div`` precedent); "mean", the mean over every element (batch x pairs x lags,
            as ``torch.nn.MSELoss`` and the paper's ``nn.MSELoss`` runs); "none", the per-sample
            sums, a ``(batch,)`` tensor.
        offset: None or a ``(batch, n_corr)`` tensor (differentiable) subtracted from every lag
            of ``f(x) - f(target)`` of each sample and pair before scaling: the difference of
            the centring terms when autocovariances are compared (see
            :class:`pymks_vae.losses.SpatialStatsLoss`).

    Returns:
        a scalar tensor, or ``(batch,)`` for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from pymks_vae.ops import spatial_stats_loss
        >>> x = torch.rand(4, 1, 16, 16, requires_grad=True)
        >>> loss = spatial_stats_loss(x, torch.rand(4, 1, 16, 16))
        >>> loss.backward(); x.grad.shape
        torch.Size([4, 1, 16, 16])
    """
    op = "spatial_stats_loss"
    _check_field("x", x, op)
    _check_field("target", target, op)
    if target.shape != x.shape:
        raise ValueError(f"{op}: target shape {tuple(target.shape)} differs from x shape {tuple(x.shape)}")
    if target.dtype != x.dtype:
        raise TypeError(f"{op}: target dtype {target.dtype} differs from x dtype {x.dtype}")
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but x is on {x.device}")
    if target.requires_grad:
        raise ValueError(
            f"{op}: target requires grad, but the loss treats the target as a constant; "
            "pass target.detach()"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # Under torch.compile a float attribute may arrive as a symbolic float, which math.isfinite
    # cannot read without breaking the graph; the loss classes check their scale when it is set.
    if isinstance(scale, bool) or not (type(scale) is float or isinstance(scale, numbers.Real)) or (
            not torch.compiler.is_compiling() and not math.isfinite(scale)):
        raise TypeError(f"{op}: scale must be a finite real number, got {scale!r}")
    if not isinstance(periodic, bool):
        raise TypeError(f"{op}: periodic must be a bool, got {periodic!r}")
    pairs = _pairs(correlations, x.shape[1], op)
    window = _window(cutoff, tuple(x.shape[2:]), op)
    if weight is not None:
        weight = _loss_weight(weight, x, len(pairs), window, op)
    if offset is not None:
        offset = _loss_offset(offset, x, len(pairs), op)

    if periodic and cutoff is None and weight is None and offset is None and _use_compiled(x):
        pi = [p[0] for p in pairs]
        pj = [p[1] for p in pairs]
        need_grad = x.requires_grad and torch.is_grad_enabled()
        per_sample = torch.ops.pymks_vae.stats_loss(x, target, pi, pj, float(scale), need_grad)[0]
        return reference.reduce_per_sample(per_sample, reduction, len(pairs) * math.prod(window))
    if _use_compiled(x):
        # A window, weights or zero padding: the general fused kernel (statistics of x and target
        # in one pass, the gradient prepared for its own backward).
        pi = [p[0] for p in pairs]
        pj = [p[1] for p in pairs]
        need_grad = (x.requires_grad or (offset is not None and offset.requires_grad)) and torch.is_grad_enabled()
        if weight is not None:
            weight = weight.expand((len(pairs),) + tuple(window)).contiguous()
        per_sample = torch.ops.pymks_vae.stats_loss_window(
            x, target, pi, pj, periodic, list(window), weight, offset, float(scale), need_grad)[0]
        return reference.reduce_per_sample(per_sample, reduction, len(pairs) * math.prod(window))
    fx = _stats_of("x", x, pairs, periodic, cutoff, op)
    ft = _stats_of("target", target, pairs, periodic, cutoff, op)
    return reference.stats_distance(fx, ft, float(scale), weight, reduction, offset)


def _loss_offset(offset, x, n_corr, op):
    if not isinstance(offset, torch.Tensor):
        raise TypeError(f"{op}: offset must be a torch.Tensor or None, got {type(offset).__name__}")
    if offset.dtype != x.dtype:
        raise TypeError(f"{op}: offset dtype {offset.dtype} differs from x dtype {x.dtype}")
    if offset.device != x.device:
        raise ValueError(f"{op}: offset is on {offset.device} but x is on {x.device}")
    if tuple(offset.shape) != (x.shape[0], n_corr):
        raise ValueError(f"{op}: offset must have shape (batch, n_corr) = {(x.shape[0], n_corr)}, "
                         f"got {tuple(offset.shape)}")
    return offset


def _stats_of(name, t, pairs, periodic, cutoff, op):
    try:
        return two_point_stats(t, pairs, periodic=periodic, cutoff=cutoff)
    except ValueError as exc:
        if "NaN or Inf" in str(exc):  # name the loss's own argument, not the operator's
            raise ValueError(f"{op}: {name} contains NaN or Inf") from None
        raise


def _loss_weight(weight, x, n_corr, window, op):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.requires_grad:
        raise ValueError(f"{op}: weight requires grad; pass weight.detach()")
    want = (n_corr,) + tuple(window)
    try:
        if torch.broadcast_shapes(tuple(weight.shape), want) != want:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{op}: weight shape {tuple(weight.shape)} does not broadcast to (n_corr, *window) = {want}"
        ) from None
    if not torch.compiler.is_compiling() and data_checks_enabled() and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{op}: weight contains NaN or Inf")
    return weight.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- soft indicator
def soft_indicator(x, states, eps=0.25):
    """The paper's differentiable phase indicator ``exp(-(x - h)^2 / (2 eps^2))`` per state h.

    Args:
        x: float tensor ``(batch, 1, *spatial)``: one grey field per sample.
        states: sequence of state values h (e.g. ``(0.0,)`` for the lines of the lines dataset).
        eps: width of the indicator, > 0 (the paper uses 0.25).

    Returns:
        tensor ``(batch, len(states), *spatial)``.

    Example:
        >>> import torch
        >>> from pymks_vae.ops import soft_indicator
        >>> soft_indicator(torch.zeros(1, 1, 2, 2), (0.0, 1.0)).shape
        torch.Size([1, 2, 2, 2])
    """
    op = "soft_indicator"
    _check_field("x", x, op)
    if x.shape[1] != 1:
        raise ValueError(f"{op}: x must have one channel, shape (batch, 1, *spatial); got {tuple(x.shape)}")
    try:
        values = [float(h) for h in states]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: states must be a sequence of numbers, got {states!r}") from None
    if not values or not all(math.isfinite(h) for h in values):
        raise ValueError(f"{op}: states must be a non-empty sequence of finite numbers, got {states!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")
    # One state at a time with python floats: a tensor of the states built here would be copied
    # from the host on every call (a GPU waits for it, and a CUDA graph cannot capture it).
    width = 2.0 * float(eps) ** 2
    parts = [torch.exp(-((x - h) ** 2) / width) for h in values]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------- registration
def _register():
    """Attach fake (meta) kernels and autograd formulas to the compiled operators."""

    @torch.library.register_fake("pymks_vae::two_point_stats")
    def _two_point_stats_fake(x, pair_i, pair_j, periodic, window, mask, partition):
        return x.new_empty((x.shape[0], len(pair_i)) + tuple(window))

    @torch.library.register_fake("pymks_vae::two_point_stats_backward")
    def _two_point_stats_backward_fake(grad, x, pair_i, pair_j, periodic, window, mask):
        # The kernel returns a contiguous gradient whatever the strides of x (empty_like would
        # copy a channels-last layout and disagree with it).
        return x.new_empty(x.shape)

    def _two_point_setup(ctx, inputs, output):
        x, pair_i, pair_j, periodic, window, mask, _ = inputs
        ctx.save_for_backward(x, mask)
        ctx.args = (pair_i, pair_j, periodic, window)

    def _two_point_backward(ctx, grad):
        x, mask = ctx.saved_tensors
        pair_i, pair_j, periodic, window = ctx.args
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.pymks_vae.two_point_stats_backward(
                grad.contiguous(), x, pair_i, pair_j, periodic, window, mask
            )
        return grad_x, None, None, None, None, None, None

    torch.library.register_autograd(
        "pymks_vae::two_point_stats", _two_point_backward, setup_context=_two_point_setup
    )

    @torch.library.register_fake("pymks_vae::two_point_stats_spectra")
    def _two_point_stats_spectra_fake(x, pair_i, pair_j, periodic, window, mask, partition):
        states = sorted(set(pair_i) | set(pair_j))
        grid = _grid(tuple(x.shape[2:]), window, periodic)
        ctype = torch.complex64 if x.dtype == torch.float32 else torch.complex128
        half = (x.shape[0], len(states)) + grid[:-1] + (grid[-1] // 2 + 1,)
        return x.new_empty((x.shape[0], len(pair_i)) + tuple(window)), x.new_empty(half, dtype=ctype)

    @torch.library.register_fake("pymks_vae::two_point_stats_backward_spectra")
    def _two_point_stats_backward_spectra_fake(grad, x_hat, pair_i, pair_j, n_state, spatial, periodic, mask):
        return grad.new_empty((grad.shape[0], n_state) + tuple(spatial))

    # two_point_stats_spectra takes its autograd from C++ (csrc/autograd.cpp), as the losses do:
    # the Python formula's own cost was a quarter of a forward + backward call at 32 x 21^2.

    @torch.library.register_fake("pymks_vae::stats_loss")
    def _stats_loss_fake(x, target, pair_i, pair_j, scale, need_grad):
        states = sorted(set(pair_i) | set(pair_j))
        spatial = tuple(x.shape[2:])
        half = spatial[:-1] + (spatial[-1] // 2 + 1,)
        ctype = torch.complex64 if x.dtype == torch.float32 else torch.complex128
        shape = (x.shape[0], len(states)) + half if need_grad else (0,)
        return x.new_empty((x.shape[0],)), x.new_empty(shape, dtype=ctype)

    @torch.library.register_fake("pymks_vae::stats_loss_backward")
    def _stats_loss_backward_fake(grad, spectrum, spatial, n_state, states):
        dtype = torch.float32 if spectrum.dtype == torch.complex64 else torch.float64
        return grad.new_empty((grad.shape[0], n_state) + tuple(spatial), dtype=dtype)

    # stats_loss and stats_loss_window take their autograd from C++ (csrc/autograd.cpp): at
    # training's batch sizes this wrapper's own cost was a fifth of the loss's.

    @torch.library.register_fake("pymks_vae::stats_loss_window")
    def _stats_loss_window_fake(x, target, pair_i, pair_j, periodic, window, weight, offset, scale, need_grad):
        states = sorted(set(pair_i) | set(pair_j))
        spatial = tuple(x.shape[2:])
        grid = _grid(spatial, window, periodic)
        half = grid[:-1] + (grid[-1] // 2 + 1,)
        # The driver's layout: natural for auto pairs only (at most one per state) in 2D and 3D,
        # else moved (first axis last).
        autos_only = all(i == j for i, j in zip(pair_i, pair_j)) and len(set(pair_i)) == len(pair_i)
        if len(half) > 1 and not autos_only:
            half = half[1:] + half[:1]
        ctype = torch.complex64 if x.dtype == torch.float32 else torch.complex128
        if need_grad:
            grad_window = x.new_empty((x.shape[0], len(pair_i)) + tuple(window))
            x_hat = x.new_empty((x.shape[0], len(states)) + half, dtype=ctype)
        else:
            grad_window, x_hat = x.new_empty((0,)), x.new_empty((0,), dtype=ctype)
        grad_offset = x.new_empty((x.shape[0], len(pair_i)) if need_grad and offset is not None else (0,))
        return x.new_empty((x.shape[0],)), grad_window, x_hat, grad_offset

    @torch.library.register_fake("pymks_vae::stats_loss_window_backward")
    def _stats_loss_window_backward_fake(grad, grad_window, x_hat, pair_i, pair_j, n_state, spatial, periodic):
        return grad_window.new_empty((grad_window.shape[0], n_state) + tuple(spatial))


def _grid(spatial, window, periodic):
    """The transform grid of the drivers: the field itself, or padded by the largest lag kept to the
    size :func:`_fast_fft_len` picks."""
    if periodic:
        return tuple(spatial)
    return tuple(_fast_fft_len(n + w // 2, prefer_pow2=len(spatial) == 2) for n, w in zip(spatial, window))


def _fast_fft_len(n, prefer_pow2=False):
    """The driver's fast_fft_len (for fake kernels and cost estimates): smallest even m >= n with no
    prime factor above 7 and at most one factor 7; with ``prefer_pow2`` (2D grids) a power of two
    within 6% of n first."""
    if prefer_pow2:
        p2 = 2
        while p2 < n:
            p2 *= 2
        if p2 * 100 <= int(n) * 106:
            return p2
    m = max(2, int(n) + (int(n) & 1))
    while True:
        r, sevens = m, 0
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        while r % 7 == 0:
            r //= 7
            sevens += 1
        if r == 1 and sevens <= 1:
            return m
        m += 2


if _extension.has_extension():
    _register()
