"""Timing helpers shared by the benchmarks: interleaved rounds, per-round ratios, machine description,
tables."""
import json
import os
import platform
import statistics
import time

import torch


def machine():
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    try:  # the CPU kernel that counts binary fields, and a forced route if one is set
        from pymks_vae import build_info

        kernel = build_info().get("cpu_count_kernel")
        if kernel:
            desc += f", count kernel {kernel}"
        route = os.environ.get("PYMKS_VAE_BINARY_PATH")
        if route:
            desc += f" (PYMKS_VAE_BINARY_PATH={route})"
        if build_info().get("compiled"):
            desc += ", CPU transforms " + ("MKL DFTI direct" if dfti_active("cpu") else "ATen")
    except ImportError:
        pass
    if torch.cuda.is_available():
        desc += f"; GPU {torch.cuda.get_device_name()}"
    return desc


def median_seconds(fn, repeats=15, warmup=3, device="cpu"):
    """Median wall time of fn() over `repeats` runs after `warmup` runs (GPU synchronised)."""
    medians, _ = alternating_medians({"fn": fn}, rounds=1, repeats=repeats, warmup=warmup, device=device)
    return medians["fn"]


def alternating_medians(fns, rounds=3, repeats=5, warmup=1, device="cpu"):
    """Median wall time of several functions, timed warm in alternating blocks.

    Each round runs every function in turn: ``warmup`` untimed calls (a shared VM parks idle
    cores and threads, and the first call after another workload pays to wake them), then
    ``repeats`` timed calls. Alternating the blocks over several rounds lets each function see
    the same slow drifts of a noisy machine, so their ratio is fair.

    Args:
        fns: dict name -> zero-argument callable.
        rounds: blocks per function.
        repeats: timed calls per block.
        warmup: untimed calls at the start of every block.
        device: "cuda..." synchronises the GPU after each call.

    Returns:
        (dict name -> median seconds, dict name -> list of all timed seconds).
    """
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, times


def round_ratios(times, numerator, denominator, repeats):
    """Per-round speed ratios from the timings of :func:`alternating_medians`.

    Each round's ratio compares the two functions' blocks of that round, which ran back to back and
    so saw the same state of a noisy machine; a ratio of two overall medians would not.

    Args:
        times: dict name -> list of timed seconds, as returned by :func:`alternating_medians`.
        numerator, denominator: names in ``times``; the ratio is numerator time / denominator time
            (e.g. reference / ours for a speed-up).
        repeats: timed calls per block (``repeats`` of :func:`alternating_medians`).

    Returns:
        list of floats, one per round, in round order.
    """
    a, b = times[numerator], times[denominator]
    rounds = len(a) // repeats
    if rounds < 1 or len(a) != rounds * repeats or len(b) != len(a):
        raise ValueError(f"round_ratios: {len(a)} and {len(b)} timings do not make rounds of {repeats}")
    return [statistics.median(a[k * repeats:(k + 1) * repeats]) / statistics.median(b[k * repeats:(k + 1) * repeats])
            for k in range(rounds)]


def ratio_summary(ratios, digits=2):
    """The median and spread of per-round ratios, as a table cell and as numbers.

    Args:
        ratios: per-round ratios (:func:`round_ratios`).
        digits: decimals shown.

    Returns:
        (text such as ``"1.52x (1.31-1.70)"`` - the median, then the smallest and largest round -
        and a dict with ``median``, ``min``, ``max`` and ``rounds`` for JSON output).
    """
    med, lo, hi = statistics.median(ratios), min(ratios), max(ratios)
    text = f"{med:.{digits}f}x ({lo:.{digits}f}-{hi:.{digits}f})"
    return text, {"median": med, "min": lo, "max": hi, "rounds": list(ratios)}


def markdown_table(rows, columns):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)


def add_cpu_fft_option(parser):
    """--cpu-fft dfti|aten: the extension's CPU transforms through MKL's DFTI directly (default,
    where torch has MKL) or through ATen (what torch builds without MKL run)."""
    parser.add_argument("--cpu-fft", choices=["dfti", "aten"], default="dfti",
                        help="the extension's CPU transforms: MKL DFTI called directly (default) or ATen's")


def apply_cpu_fft_option(args):
    from pymks_vae import _extension

    if _extension.has_extension():
        _extension._C._set_mkl_dft(args.cpu_fft == "dfti")


def dfti_active(device):
    """Whether the extension's CPU transforms call MKL's DFTI directly now (so that its ATen path
    can be timed beside it)."""
    from pymks_vae import _extension

    if device != "cpu" or not _extension.has_extension():
        return False
    enabled = getattr(_extension._C, "_mkl_dft_enabled", None)
    return bool(enabled is not None and enabled())


def on_aten_path(fn):
    """fn run with the extension's CPU transforms through ATen instead of DFTI (restored after)."""
    from pymks_vae import _extension

    def wrapped():
        prev = _extension._C._set_mkl_dft(False)
        try:
            return fn()
        finally:
            _extension._C._set_mkl_dft(prev)

    return wrapped
