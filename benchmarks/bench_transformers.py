"""PyMKS pipelines: pymks-vae's TwoPointCorrelation against pymks 0.4.1's on the same dask input.

Input: the one-hot (pymks.PrimitiveTransformer, 2 states) of 64 two-phase microstructures of
128x128, persisted in memory in chunks of 16 samples. Both transformers run periodic (or, with
``--non-periodic``, zero padded), cutoff 20, pairs [(1, 1), (0, 1)], timed from ``.transform`` to
computed numbers (dask's default threaded scheduler), warm: medians over rounds of alternating
blocks (untimed warm-up, then timed runs) of each transformer, so that both see the same drifts of
a noisy machine. The outputs are checked equal before anything is timed.

With ``--timeline``, pymks-vae's transform is also split into where its time goes: dask's work
before the first block starts, the span of the blocks on the worker threads (and each block's own
time), and dask's work after the last block, with the number of tasks the scheduler ran.

Usage: python benchmarks/bench_transformers.py [--rounds 3] [--repeats 5] [--timeline] [--non-periodic]
       [--json out.json]
"""
import argparse
import os
import statistics
import sys
import threading
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternating_medians, machine, markdown_table, ratio_summary, round_ratios, write_json  # noqa: E402

import pymks_vae  # noqa: E402
from pymks_vae.microstructures import generate_two_phase  # noqa: E402

PAIRS = [(1, 1), (0, 1)]


def make_input(n_samples=64, size=128, chunk=16, seed=0):
    """The persisted dask one-hot ``(n, size, size, 2)`` chunked ``chunk`` samples at a time."""
    import pymks

    x = generate_two_phase(n_samples, (size, size), sigma=(2.0, 4.0), volume_fraction=0.4, seed=seed)
    one_hot = pymks.PrimitiveTransformer(n_state=2, min_=0.0, max_=1.0).fit(x).transform(x)
    return one_hot.rechunk((chunk, size, size, 2)).persist()


def timeline(run, repeats=30, warmup=5):
    """Where calls of ``run`` spend their time, from timestamps taken inside their blocks.

    Returns medians over ``repeats`` calls: seconds (total, before the first block, the span of the
    blocks, one block, after the last block), the worker threads' busy fraction during the span, and
    the numbers of dask tasks and blocks per call.

    The blocks are timed by wrapping :func:`pymks_vae.correlations._stats_numpy` (what each dask task
    runs) for the duration of this function only; the tasks are counted by a dask callback.
    """
    from dask.callbacks import Callback

    from pymks_vae import correlations

    blocks, tasks = [], []
    inner = correlations._stats_numpy

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            blocks.append((threading.get_ident(), t0, time.perf_counter()))

    class CountTasks(Callback):
        def _pretask(self, key, dsk, state):
            tasks.append(key)

    rows = []
    correlations._stats_numpy = timed
    try:
        for i in range(warmup + repeats):
            blocks.clear()
            tasks.clear()
            with CountTasks():
                t0 = time.perf_counter()
                run()
                t1 = time.perf_counter()
            if i < warmup:
                continue
            first, last = min(b[1] for b in blocks), max(b[2] for b in blocks)
            busy = sum(b[2] - b[1] for b in blocks)
            threads = len({b[0] for b in blocks})
            rows.append({"total": t1 - t0, "before first block": first - t0, "block span": last - first,
                         "mean block": busy / len(blocks), "after last block": t1 - last,
                         "worker use": busy / ((last - first) * threads), "tasks": len(tasks), "blocks": len(blocks)})
    finally:
        correlations._stats_numpy = inner
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks per transformer")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per block (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs at the start of each block")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--cutoff", type=int, default=20)
    parser.add_argument("--non-periodic", action="store_true", help="zero padding instead of periodic boundaries")
    parser.add_argument("--timeline", action="store_true", help="also split pymks-vae's time (see above)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least five runs)")

    import pymks

    data = make_input(args.n_samples, args.size, args.chunk)
    periodic = not args.non_periodic
    ours = pymks_vae.TwoPointCorrelation(correlations=PAIRS, periodic_boundary=periodic, cutoff=args.cutoff).fit(data)
    theirs = pymks.TwoPointCorrelation(correlations=PAIRS, periodic_boundary=periodic, cutoff=args.cutoff)

    def run_ours():
        return ours.transform(data).compute()

    def run_pymks():
        return np.asarray(theirs.transform(data).compute())

    a, b = run_ours(), run_pymks()
    max_diff = float(np.abs(a - b).max())
    assert a.shape == b.shape and np.allclose(a, b, rtol=1e-10, atol=1e-12), f"outputs differ (max {max_diff})"

    medians, all_times = alternating_medians({"pymks": run_pymks, "pymks_vae": run_ours}, rounds=args.rounds,
                                             repeats=args.repeats, warmup=args.warmup)
    t_ours, t_pymks = medians["pymks_vae"], medians["pymks"]
    block_ratios = round_ratios(all_times, "pymks", "pymks_vae", args.repeats)
    speedup_text, speedup = ratio_summary(block_ratios, digits=1)
    info = pymks_vae.build_info()
    rows = [
        {"implementation": "pymks 0.4.1 TwoPointCorrelation", "median ms": f"{1e3 * t_pymks:.1f}", "speed-up": "1.0x"},
        {"implementation": "pymks-vae TwoPointCorrelation" + ("" if info["compiled"] else " (reference ops)"),
         "median ms": f"{1e3 * t_ours:.1f}", "speed-up": speedup_text},
    ]
    desc = machine()
    print(f"\nTwoPointCorrelation on dask: {args.n_samples} x {args.size}x{args.size} one-hot, 2 states, "
          f"chunks of {args.chunk}, {'periodic' if periodic else 'non-periodic'}, cutoff {args.cutoff}, pairs {PAIRS}; "
          f"medians of {args.rounds} x {args.repeats} warm runs each (max |diff| {max_diff:.1e})")
    print("Speed-up per round (the table: their median, then the smallest and largest): "
          + ", ".join(f"{r:.1f}x" for r in block_ratios))
    print(f"Machine: {desc}; extension compiled: {info['compiled']}\n")
    print(markdown_table(rows, ["implementation", "median ms", "speed-up"]))
    split = None
    if args.timeline:
        split = timeline(run_ours)
        print(f"\npymks-vae's transform, medians of 30 calls ({split['tasks']:.0f} dask tasks per call, "
              f"{split['blocks']:.0f} blocks on the worker threads):")
        print(markdown_table([{"part": k, "ms": f"{1e3 * split[k]:.2f}"} for k in
                              ("total", "before first block", "block span", "mean block", "after last block")],
                             ["part", "ms"]))
        print(f"Worker threads busy during the block span: {100 * split['worker use']:.0f}%")
    write_json(args.json, {
        "machine": desc,
        "build_info": {k: v for k, v in info.items() if isinstance(v, (bool, str, list, type(None)))},
        "case": {"n_samples": args.n_samples, "size": args.size, "chunk": args.chunk, "n_state": 2,
                 "cutoff": args.cutoff, "periodic": periodic, "pairs": PAIRS},
        "repeats": args.repeats,
        "seconds": {"pymks": t_pymks, "pymks_vae": t_ours},
        "all_seconds": all_times,
        "speedup_per_round": block_ratios,
        "speedup": speedup["median"],
        "max_abs_diff": max_diff,
        "timeline": split,
    })
    return speedup["median"]


if __name__ == "__main__":
    main()
