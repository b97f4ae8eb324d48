"""Spatial-statistics loss, forward + backward: the fused operator vs the torch.fft/autograd
reference vs the bare three-transform floor, measured side by side in one run.

As in a training step, every call computes the target's statistics too. The floor is what the
fused path cannot avoid: one rfftn of x, one rfftn of the target and one irfftn.
Cases: CPU B=32 224x224 float32 pair (0,0) (the paper's loss), plus a two-pair case; CUDA
B=256 224x224 when a GPU is present.

Usage: python benchmarks/bench_loss.py [--repeats 15] [--json out.json] [--quick]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine, markdown_table, median_seconds, write_json  # noqa: E402

from pymks_vae import ops, reference  # noqa: E402


def run_case(device, B, size, pairs, repeats):
    g = torch.Generator().manual_seed(0)
    n_state = 1 + max(max(p) for p in pairs)
    x = torch.rand((B, n_state, size, size), generator=g).to(device)
    t = torch.rand((B, n_state, size, size), generator=g).to(device)
    dims = (2, 3)

    def fused():
        xr = x.detach().requires_grad_(True)
        ops.spatial_stats_loss(xr, t, correlations=pairs).backward()
        return xr.grad

    def ref():
        xr = x.detach().requires_grad_(True)
        reference.spatial_stats_loss_ref(xr, t, correlations=pairs).backward()
        return xr.grad

    def floor():
        xh = torch.fft.rfftn(x, dim=dims)
        torch.fft.rfftn(t, dim=dims)
        return torch.fft.irfftn(xh, s=(size, size), dim=dims)

    # Same gradient first: a benchmark of a wrong answer is worthless.
    assert torch.allclose(fused(), ref(), rtol=1e-3, atol=1e-9 * float(ref().abs().max())), "fused != reference"
    t_fused = median_seconds(fused, repeats, device=device)
    t_ref = median_seconds(ref, repeats, device=device)
    t_floor = median_seconds(floor, repeats, device=device)
    return {"device": device, "case": f"B={B} {size}x{size} pairs {pairs}", "fused ms": f"{t_fused * 1e3:.2f}",
            "torch.fft ms": f"{t_ref * 1e3:.2f}", "floor ms": f"{t_floor * 1e3:.2f}",
            "speed-up vs torch.fft": f"{t_ref / t_fused:.2f}x", "fused / floor": f"{t_fused / t_floor:.2f}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args(argv)
    size = 32 if args.quick else 224
    rows = [run_case("cpu", 4 if args.quick else 32, size, [(0, 0)], args.repeats),
            run_case("cpu", 4 if args.quick else 32, size, [(0, 0), (0, 1)], args.repeats)]
    if torch.cuda.is_available():
        rows.append(run_case("cuda", 256, size, [(0, 0)], args.repeats))
        rows.append(run_case("cuda", 256, size, [(0, 0), (0, 1)], args.repeats))
    print("Spatial-statistics loss, forward + backward, float32, periodic, full window")
    print(f"Machine: {machine()}")
    print(f"Medians of {args.repeats} repeats\n")
    cols = ["device", "case", "fused ms", "torch.fft ms", "floor ms", "speed-up vs torch.fft", "fused / floor"]
    print(markdown_table(rows, cols))
    write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
