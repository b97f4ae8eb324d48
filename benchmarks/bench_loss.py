"""Spatial-statistics loss, forward + backward: the fused operators vs the torch.fft/autograd
reference vs the bare three-transform floor, measured side by side in one run.

As in a training step, every call computes the target's statistics too. The floor is what the
Parseval kernel (periodic, full window) cannot avoid: one rfftn of x, one rfftn of the target and
one irfftn, all of the field's size; the other cases run the general kernel (window, weights,
zero padding), whose floor is higher (it adds a pruned inverse and a pruned forward transform).
Cases: CPU B=32 224x224 float32 pair (0,0) (the paper's loss) and a two-pair case, periodic full
window; a lag window (224x224 cutoff 20, and 64x64 cutoff 7 as the VAE uses); per-lag weights on
the full window; non-periodic statistics (full window and cutoff 20). CUDA B=256 224x224 when a GPU
is present. ``--cases small`` (not part of ``all``): CPU B=32 fields of PyMKS's sizes with windows over
half the field (21x21 cutoff 8, 32x32 cutoff 12, 51x51 cutoff 20, 21x21 weighted whole window), where
the window's statistics and gradient are matrix products, the Parseval loss (periodic, full
window) at 51x51 and 101x101, whose transforms are matrix products too, and pairs (0,0), (1,1), (0,1)
at 51x51 and 101x101 cutoff 20, whose cross pair takes the general kernel's pruned window transforms
(matrix products on these sides).

The three run in interleaved rounds (fused, torch.fft, floor, fused, ...: a warm-up call, then
`repeats` timed calls each); times are medians of every timed call, and each ratio is computed per
round and reported as its median over the rounds with the smallest and largest round in brackets,
so that a noisy machine shows as spread rather than as a wrong ratio.

Usage: python benchmarks/bench_loss.py [--rounds 5] [--repeats 3] [--json out.json] [--quick]
       [--cases all|parseval|general|small]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (add_cpu_fft_option, alternating_medians, apply_cpu_fft_option, dfti_active,  # noqa: E402
                    machine, markdown_table, on_aten_path, ratio_summary, round_ratios, write_json)

from pymks_vae import ops, reference  # noqa: E402


def run_case(device, B, size, pairs, rounds, repeats, cutoff=None, periodic=True, weighted=False):
    g = torch.Generator().manual_seed(0)
    n_state = 1 + max(max(p) for p in pairs)
    x = torch.rand((B, n_state, size, size), generator=g).to(device)
    t = torch.rand((B, n_state, size, size), generator=g).to(device)
    dims = (2, 3)
    window = reference.window_shape((size, size), cutoff)
    weight = torch.rand((len(pairs),) + window, generator=g).to(device) if weighted else None
    kw = dict(correlations=pairs, cutoff=cutoff, periodic=periodic, weight=weight)

    def fused():
        xr = x.detach().requires_grad_(True)
        ops.spatial_stats_loss(xr, t, **kw).backward()
        return xr.grad

    def ref():
        xr = x.detach().requires_grad_(True)
        reference.spatial_stats_loss_ref(xr, t, **kw).backward()
        return xr.grad

    def floor():
        xh = torch.fft.rfftn(x, dim=dims)
        torch.fft.rfftn(t, dim=dims)
        return torch.fft.irfftn(xh, s=(size, size), dim=dims)

    # Same gradient first: a benchmark of a wrong answer is worthless. Both are float32 FFT results
    # with errors near 1e-5 of the largest entry (measured against float64), which entries near 0
    # cannot meet relatively: with 256 samples of 224^2 some always fail an atol of 1e-9 of it.
    want = ref()
    assert torch.allclose(fused(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max())), "fused != reference"
    fns = {"fused": fused, "torch.fft": ref, "floor": floor}
    if dfti_active(device):  # the same kernel with its transforms through ATen, in the same rounds
        fns["ATen FFT"] = on_aten_path(fused)
    med, times = alternating_medians(fns, rounds=rounds, repeats=repeats, device=device)
    speedup, speedup_stats = ratio_summary(round_ratios(times, "torch.fft", "fused", repeats))
    over_floor, over_floor_stats = ratio_summary(round_ratios(times, "fused", "floor", repeats))
    what = ("periodic" if periodic else "non-periodic") + (", full window" if cutoff is None else f", cutoff {cutoff}")
    what += ", weighted" if weighted else ""
    row = {"device": device, "case": f"B={B} {size}x{size} pairs {pairs}, {what}", "fused ms": f"{med['fused'] * 1e3:.2f}",
           "torch.fft ms": f"{med['torch.fft'] * 1e3:.2f}", "floor ms": f"{med['floor'] * 1e3:.2f}",
           "speed-up vs torch.fft": speedup, "fused / floor": over_floor, "DFTI vs ATen FFT": ""}
    detail = {"row": row, "seconds": times, "speedup_vs_torch_fft": speedup_stats, "fused_over_floor": over_floor_stats}
    if "ATen FFT" in med:
        row["DFTI vs ATen FFT"], detail["dfti_over_aten"] = ratio_summary(round_ratios(times, "ATen FFT", "fused", repeats))
    return row, detail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one ratio each)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per function and round")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    add_cpu_fft_option(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier ratios on a loaded machine")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="which rows to run (all: CPU, and CUDA when a GPU is present)")
    p.add_argument("--cases", choices=["all", "parseval", "general", "small"], default="all",
                   help="parseval: periodic full-window cases only; general: window, weights, non-periodic; "
                        "small: small fields with windows over half the field, the Parseval loss at 51^2 and "
                        "101^2, and a cross pair at 51^2 and 101^2 cutoff 20 (CPU; not part of all)")
    args = p.parse_args(argv)
    apply_cpu_fft_option(args)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    size, small = (32, 16) if args.quick else (224, 64)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available")
    B = 4 if args.quick else 32
    cut, cut_small = (5, 3) if args.quick else (20, 7)
    # (device, B, size, pairs, keyword arguments)
    general = [(size, dict(cutoff=cut)), (small, dict(cutoff=cut_small)), (size, dict(weighted=True)),
               (size, dict(periodic=False)), (size, dict(periodic=False, cutoff=cut))]
    cases = []
    if args.device in ("all", "cpu"):
        if args.cases in ("all", "parseval"):
            cases += [("cpu", B, size, [(0, 0)], {}), ("cpu", B, size, [(0, 0), (0, 1)], {})]
        if args.cases in ("all", "general"):
            cases += [("cpu", B, n, [(0, 0)], kw) for n, kw in general]
        if args.cases == "small":
            small_windows = [(21, dict(cutoff=8)), (32, dict(cutoff=12)), (51, dict(cutoff=20)), (21, dict(weighted=True)),
                             (51, {}), (101, {})]
            cases += [("cpu", B, n, [(0, 0)], kw) for n, kw in small_windows]
            # Two auto pairs and a cross pair: the moved layout, with its pruned window transforms.
            cases += [("cpu", B, n, [(0, 0), (1, 1), (0, 1)], dict(cutoff=20)) for n in (51, 101)]
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        if args.cases in ("all", "parseval"):
            cases += [("cuda", 256, size, [(0, 0)], {}), ("cuda", 256, size, [(0, 0), (0, 1)], {})]
        if args.cases in ("all", "general"):
            cases += [("cuda", 256, n, [(0, 0)], kw) for n, kw in general]
    results = [run_case(device, b, n, pairs, args.rounds, args.repeats, **kw) for device, b, n, pairs, kw in cases]
    rows = [row for row, _ in results]
    print("Spatial-statistics loss, forward + backward, float32")
    print(f"Machine: {machine()}")
    print(f"Times: medians of {args.rounds} interleaved rounds x {args.repeats} calls; ratios: median of the "
          f"per-round ratios (smallest-largest round)\n")
    cols = ["device", "case", "fused ms", "torch.fft ms", "floor ms", "speed-up vs torch.fft", "fused / floor",
            "DFTI vs ATen FFT"]
    print(markdown_table(rows, cols))
    write_json(args.json, {"machine": machine(), "rounds": args.rounds, "repeats": args.repeats,
                           "rows": rows, "cases": [detail for _, detail in results]})


if __name__ == "__main__":
    main()
