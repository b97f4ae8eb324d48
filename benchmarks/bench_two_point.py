"""Two-point statistics: the pymks-vae operator vs the plain torch.fft reference vs PyMKS.

Measured side by side in one run, medians of repeats. Cases (from the foundation issue):
* 2D: B=32 two-state one-hot microstructures of 224x224, pairs [(1,1), (0,1)], float32.
* 3D: B=8 two-state one-hot of 64^3, same pairs.
Forward and forward+backward, CPU, and CUDA when a GPU is present. PyMKS's TwoPointCorrelation
(numpy in, dask computed) runs forward only, at its default cutoff int((N-1)/2), against the
operator at the same cutoff.

Usage: python benchmarks/bench_two_point.py [--repeats 15] [--json out.json] [--quick]
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, markdown_table, median_seconds, write_json  # noqa: E402

from pymks_vae import build_info, ops, reference  # noqa: E402

PAIRS = [(1, 1), (0, 1)]


def one_hot(B, spatial, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand((B,) + spatial, generator=g) > 0.5).long()
    return torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).to(device=device, dtype=dtype).contiguous()


def time_case(x, cutoff, repeats, device, backward):
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
    t_ours = median_seconds(ours, repeats, device=device)
    t_ref = median_seconds(ref, repeats, device=device)
    return t_ours, t_ref


def time_pymks(x, cutoff, repeats):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pymks import TwoPointCorrelation
    except Exception as exc:  # pymks is optional for the benchmark
        print(f"pymks unavailable ({exc}); skipping its rows", file=sys.stderr)
        return None
    data = x.movedim(1, -1).cpu().numpy()
    est = TwoPointCorrelation(correlations=PAIRS, periodic_boundary=True, cutoff=cutoff)
    theirs = np.asarray(est.fit_transform(data))
    ours = ops.two_point_stats(x.cpu(), PAIRS, cutoff=cutoff).movedim(1, -1).numpy()
    assert np.allclose(theirs, ours, rtol=1e-4, atol=1e-6), "operator and pymks disagree"
    return median_seconds(lambda: np.asarray(est.transform(data)), max(3, repeats // 3), warmup=1)


def counting_rows(x, name, shape, cutoff, repeats):
    """A small cutoff (PyMKS's usual setting) on the CPU: the operator's exact counting route for
    binary fields (its default there, where the cost model picks it) against its transforms
    (PYMKS_VAE_BINARY_PATH=off), each beside the torch.fft reference."""
    rows = []
    before = os.environ.get("PYMKS_VAE_BINARY_PATH")
    try:
        for mode, label in [("auto", "default route"), ("off", "transforms forced")]:
            os.environ["PYMKS_VAE_BINARY_PATH"] = mode
            t_ours, t_ref = time_case(x, cutoff, repeats, "cpu", False)
            rows.append({"device": "cpu", "case": f"{name} {shape}", "pass": "fwd",
                         "window": f"cutoff {cutoff}, {label}", "pymks-vae ms": f"{t_ours * 1e3:.2f}",
                         "torch.fft ms": f"{t_ref * 1e3:.2f}", "vs torch.fft": f"{t_ref / t_ours:.2f}x",
                         "pymks ms": "", "vs pymks": ""})
    finally:
        if before is None:
            os.environ.pop("PYMKS_VAE_BINARY_PATH", None)
        else:
            os.environ["PYMKS_VAE_BINARY_PATH"] = before
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = [("2D", 32, (224, 224)), ("3D", 8, (64, 64, 64))]
    if args.quick:
        cases = [("2D", 4, (32, 32)), ("3D", 2, (12, 12, 12))]
    rows = []
    for device in devices:
        for name, B, spatial in cases:
            x = one_hot(B, spatial, device)
            shape = f"{B}x" + "x".join(map(str, spatial))
            for backward in (False, True):
                t_ours, t_ref = time_case(x, None, args.repeats, device, backward)
                rows.append({"device": device, "case": f"{name} {shape}", "pass": "fwd+bwd" if backward else "fwd",
                             "window": "full", "pymks-vae ms": f"{t_ours * 1e3:.2f}",
                             "torch.fft ms": f"{t_ref * 1e3:.2f}", "vs torch.fft": f"{t_ref / t_ours:.2f}x",
                             "pymks ms": "", "vs pymks": ""})
            if device == "cpu":
                cutoff = int((min(spatial) - 1) / 2)
                t_pymks = time_pymks(x, cutoff, args.repeats)
                if t_pymks is not None:
                    t_ours, t_ref = time_case(x, cutoff, args.repeats, device, False)
                    rows.append({"device": device, "case": f"{name} {shape}", "pass": "fwd",
                                 "window": f"cutoff {cutoff}", "pymks-vae ms": f"{t_ours * 1e3:.2f}",
                                 "torch.fft ms": f"{t_ref * 1e3:.2f}", "vs torch.fft": f"{t_ref / t_ours:.2f}x",
                                 "pymks ms": f"{t_pymks * 1e3:.1f}", "vs pymks": f"{t_pymks / t_ours:.1f}x"})
            if device == "cpu":
                rows += counting_rows(x, name, shape, min(20, (min(spatial) - 1) // 2), args.repeats)
    cols = ["device", "case", "pass", "window", "pymks-vae ms", "torch.fft ms", "vs torch.fft", "pymks ms", "vs pymks"]
    print(f"Two-point statistics, pairs {PAIRS}, float32, periodic, one-hot (partition) input")
    print(f"Machine: {machine()}; build: cuda={build_info()['cuda']}")
    print(f"Medians of {args.repeats} repeats (pymks: {max(3, args.repeats // 3)})\n")
    print(markdown_table(rows, cols))
    write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
