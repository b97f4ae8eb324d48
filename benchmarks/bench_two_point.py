"""Two-point statistics: the pymks-vae operator vs the plain torch.fft reference vs PyMKS.

Measured side by side in interleaved rounds (operator, reference[, pymks], operator, ...): times are
medians of every timed call; each ratio is computed per round and reported as its median over the
rounds with the smallest and largest round in brackets. Cases (from the foundation issue):
* 2D: B=32 two-state one-hot microstructures of 224x224, pairs [(1,1), (0,1)], float32.
* 3D: B=8 two-state one-hot of 64^3, same pairs.
Forward and forward+backward (full window, and a window of cutoff 20), CPU, and CUDA when a GPU is
present. With x requiring grad the operator keeps the spectra of x from its forward pass for the
backward (two_point_stats_spectra). PyMKS's TwoPointCorrelation
(numpy in, dask computed) runs forward only, at its default cutoff int((N-1)/2), against the
operator at the same cutoff. ``--cases small`` runs instead PyMKS's own example sizes (B=32 2D
one-hot fields of 21x21, 51x51 and 101x101, the same pairs), forward + backward over the whole field
and with a cutoff (8, 20, 20), CPU only.

Usage: python benchmarks/bench_two_point.py [--rounds 5] [--repeats 3] [--json out.json] [--quick]
       [--cases all|small]
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (add_cpu_fft_option, alternating_medians, apply_cpu_fft_option, dfti_active,  # noqa: E402
                    machine, markdown_table, on_aten_path, ratio_summary, round_ratios, write_json)

from pymks_vae import build_info, ops, reference  # noqa: E402

PAIRS = [(1, 1), (0, 1)]


def one_hot(B, spatial, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand((B,) + spatial, generator=g) > 0.5).long()
    return torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).to(device=device, dtype=dtype).contiguous()


def time_case(x, cutoff, rounds, repeats, device, backward, others=None):
    """Times the operator and the torch.fft reference (and ``others``) in interleaved rounds.

    Args:
        x: the input batch.
        cutoff: as in ops.two_point_stats.
        rounds, repeats: interleaved rounds, and timed calls per function in each.
        device: where x lives ("cuda" synchronises after each call).
        backward: time forward + backward instead of forward only.
        others: optional dict name -> callable timed in the same rounds (e.g. pymks).

    Returns:
        (dict name -> median seconds, dict name -> all timed seconds) as from alternating_medians.
    """
    def ours():
        if backward:
            xr = x.detach().requires_grad_(True)
            ops.two_point_stats(xr, PAIRS, cutoff=cutoff).sum().backward()
        else:
            ops.two_point_stats(x, PAIRS, cutoff=cutoff)

    def ref():
        if backward:
            xr = x.detach().requires_grad_(True)
            reference.two_point_stats_ref(xr, PAIRS, cutoff=cutoff).sum().backward()
        else:
            reference.two_point_stats_ref(x, PAIRS, cutoff=cutoff)

    # Same numbers first: a benchmark of a wrong answer is worthless.
    with torch.no_grad():
        a, b = ops.two_point_stats(x, PAIRS, cutoff=cutoff), reference.two_point_stats_ref(x, PAIRS, cutoff=cutoff)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), "operator and reference disagree"
    fns = {"pymks-vae": ours, "torch.fft": ref}
    if dfti_active(device):  # the same operator with its transforms through ATen, in the same rounds
        fns["ATen FFT"] = on_aten_path(ours)
    fns.update(others or {})
    return alternating_medians(fns, rounds=rounds, repeats=repeats, device=device)


def pymks_transform(x, cutoff):
    """PyMKS's TwoPointCorrelation on x (checked equal to the operator first) as a callable, or None
    when pymks is not installed (it is optional for the benchmark)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pymks import TwoPointCorrelation
    except Exception as exc:
        print(f"pymks unavailable ({exc}); skipping its rows", file=sys.stderr)
        return None
    data = x.movedim(1, -1).cpu().numpy()
    est = TwoPointCorrelation(correlations=PAIRS, periodic_boundary=True, cutoff=cutoff)
    theirs = np.asarray(est.fit_transform(data))
    ours = ops.two_point_stats(x.cpu(), PAIRS, cutoff=cutoff).movedim(1, -1).numpy()
    assert np.allclose(theirs, ours, rtol=1e-4, atol=1e-6), "operator and pymks disagree"
    return lambda: np.asarray(est.transform(data))


def make_row(device, case, pass_, window, timing, repeats, details):
    """A table row from interleaved timings: medians, and ratios per round (median, min-max)."""
    med, times = timing
    speedup, stats = ratio_summary(round_ratios(times, "torch.fft", "pymks-vae", repeats))
    row = {"device": device, "case": case, "pass": pass_, "window": window,
           "pymks-vae ms": f"{med['pymks-vae'] * 1e3:.2f}", "torch.fft ms": f"{med['torch.fft'] * 1e3:.2f}",
           "vs torch.fft": speedup, "pymks ms": "", "vs pymks": "", "DFTI vs ATen FFT": ""}
    detail = {"row": row, "seconds": times, "speedup_vs_torch_fft": stats}
    if "ATen FFT" in med:
        row["DFTI vs ATen FFT"], detail["dfti_over_aten"] = ratio_summary(
            round_ratios(times, "ATen FFT", "pymks-vae", repeats))
    if "pymks" in med:
        row["pymks ms"] = f"{med['pymks'] * 1e3:.1f}"
        row["vs pymks"], detail["speedup_vs_pymks"] = ratio_summary(round_ratios(times, "pymks", "pymks-vae", repeats),
                                                                    digits=1)
    details.append(detail)
    return row


def counting_rows(x, name, shape, cutoff, rounds, repeats, details):
    """A small cutoff (PyMKS's usual setting) on the CPU: the operator's exact counting route for
    binary fields (its default there, where the cost model picks it) against its transforms
    (PYMKS_VAE_BINARY_PATH=off), each beside the torch.fft reference."""
    rows = []
    before = os.environ.get("PYMKS_VAE_BINARY_PATH")
    try:
        for mode, label in [("auto", "default route"), ("off", "transforms forced")]:
            os.environ["PYMKS_VAE_BINARY_PATH"] = mode
            timing = time_case(x, cutoff, rounds, repeats, "cpu", False)
            rows.append(make_row("cpu", f"{name} {shape}", "fwd", f"cutoff {cutoff}, {label}", timing, repeats,
                                 details))
    finally:
        if before is None:
            os.environ.pop("PYMKS_VAE_BINARY_PATH", None)
        else:
            os.environ["PYMKS_VAE_BINARY_PATH"] = before
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one ratio each)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per function and round")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    add_cpu_fft_option(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier ratios on a loaded machine")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="which rows to run (all: CPU, and CUDA when a GPU is present)")
    p.add_argument("--cases", choices=["all", "small"], default="all",
                   help="small: PyMKS's example sizes 21^2, 51^2, 101^2, forward + backward, CPU (not part of all)")
    args = p.parse_args(argv)
    apply_cpu_fft_option(args)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    R, n = args.rounds, args.repeats
    if args.cases == "small":
        return small_fields(args, R, n)

    devices = [d for d in ("cpu", "cuda") if args.device in ("all", d)]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            p.error("--device cuda: no GPU is available")
        devices.remove("cuda")
    cases = [("2D", 32, (224, 224)), ("3D", 8, (64, 64, 64))]
    if args.quick:
        cases = [("2D", 4, (32, 32)), ("3D", 2, (12, 12, 12))]
    rows, details = [], []
    for device in devices:
        for name, B, spatial in cases:
            x = one_hot(B, spatial, device)
            shape = f"{B}x" + "x".join(map(str, spatial))
            for backward in (False, True):
                timing = time_case(x, None, R, n, device, backward)
                rows.append(make_row(device, f"{name} {shape}", "fwd+bwd" if backward else "fwd", "full", timing, n,
                                     details))
            if device == "cpu":
                cutoff = int((min(spatial) - 1) / 2)
                theirs = pymks_transform(x, cutoff)
                if theirs is not None:
                    timing = time_case(x, cutoff, R, n, device, False, others={"pymks": theirs})
                    rows.append(make_row(device, f"{name} {shape}", "fwd", f"cutoff {cutoff}", timing, n, details))
                rows += counting_rows(x, name, shape, min(20, (min(spatial) - 1) // 2), R, n, details)
            # forward + backward with a small window: the gradient comes from the saved spectra
            small = min(20, (min(spatial) - 1) // 2)
            timing = time_case(x, small, R, n, device, True)
            rows.append(make_row(device, f"{name} {shape}", "fwd+bwd", f"cutoff {small}", timing, n, details))
    cols = ["device", "case", "pass", "window", "pymks-vae ms", "torch.fft ms", "vs torch.fft", "pymks ms", "vs pymks",
            "DFTI vs ATen FFT"]
    report(args, R, n, rows, details, cols, f"Two-point statistics, pairs {PAIRS}, float32, periodic, one-hot "
           f"(partition) input\nMachine: {machine()}; build: cuda={build_info()['cuda']}")


def report(args, R, n, rows, details, cols, title):
    """Print the table under its title and timing note, and write the JSON (``--json``)."""
    print(title)
    print(f"Times: medians of {R} interleaved rounds x {n} calls; ratios: median of the per-round ratios "
          f"(smallest-largest round)\n")
    print(markdown_table(rows, cols))
    write_json(args.json, {"machine": machine(), "rounds": R, "repeats": n, "rows": rows, "cases": details})


def small_fields(args, R, n):
    """PyMKS's example sizes on the CPU, forward + backward: the whole field and a cutoff."""
    rows, details = [], []
    for size, cutoff in [(21, 8), (51, 20), (101, 20)]:
        x = one_hot(32, (size, size), "cpu")
        for window in (None, cutoff):
            timing = time_case(x, window, R, n, "cpu", True)
            rows.append(make_row("cpu", f"2D 32x{size}x{size}", "fwd+bwd", "full" if window is None else
                                 f"cutoff {window}", timing, n, details))
    cols = ["device", "case", "pass", "window", "pymks-vae ms", "torch.fft ms", "vs torch.fft", "DFTI vs ATen FFT"]
    report(args, R, n, rows, details, cols, f"Two-point statistics at PyMKS's sizes, pairs {PAIRS}, float32, "
           f"periodic, one-hot input, forward + backward\nMachine: {machine()}")


if __name__ == "__main__":
    main()
