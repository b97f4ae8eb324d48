"""Images per second of a full training step - encoder, decoder, loss, backward, Adam - for the
spatial-statistics loss, the vanilla (data-space) loss, and the same spatial-statistics loss
computed with torch.fft and autograd (pymks_vae.reference), on the same network.

A step is what :func:`pymks_vae.training.train_vae` runs after its first batch: ``zero_grad``,
``model(x, noise=...)``, the loss, ``backward``, ``optimizer.step``, with the operators' data checks
off (``ops.data_checks(False)``); the loss is not read back. The spatial-statistics loss is
``SpatialStatsLoss()`` at its defaults, calibrated on the batch (``loss.calibrate(images)``: scale
and lag window), on lines images of the case's size. Each loss trains its own copy of the network.

Cases: CPU at the default configuration (64x64, batch 32, ``VAE(encoder="cnn", decoder="cnn")``)
and at 224x224 (batch 32); CUDA at 64x64 and 224x224 with batch 256 when a GPU is present.

The three steps run in interleaved rounds (spatial, vanilla, torch.fft, spatial, ...: a warm-up
step, then ``repeats`` timed steps each); images/s come from the median step time, and each ratio
is computed per round (step time of one over the other) and reported as the median over the
rounds with the smallest and largest round in brackets. "spatial / vanilla" is the cost of the
spatial-statistics loss over the vanilla step (1.00x: the loss is free).

Usage: python benchmarks/bench_training.py [--rounds 7] [--repeats 3] [--threads N] [--json out.json]
           [--quick] [--device all|cpu|cuda]
"""
import argparse
import contextlib
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import alternating_medians, machine, markdown_table, ratio_summary, round_ratios, write_json  # noqa: E402

from pymks_vae import ops  # noqa: E402
from pymks_vae.datasets import generate_lines  # noqa: E402
from pymks_vae.losses import DataSpaceLoss, SpatialStatsLoss  # noqa: E402
from pymks_vae.models import VAE  # noqa: E402

LATENT = 9


@contextlib.contextmanager
def torch_fft_ops():
    """Within the block the operators take their torch.fft/autograd reference path
    (pymks_vae.reference), as they do where the extension is not built."""
    real = ops._use_compiled
    ops._use_compiled = lambda x: False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the one "falling back" warning
        try:
            yield
        finally:
            ops._use_compiled = real


def make_step(model, loss_fn, x, reference=False):
    """One training step of ``model`` on ``x`` (a zero-argument callable)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=x.device).manual_seed(0)
    context = torch_fft_ops if reference else contextlib.nullcontext

    def step():
        noise = torch.randn(x.shape[0], LATENT, device=x.device, generator=gen)
        with context():
            opt.zero_grad(set_to_none=True)
            x_hat, mu, logvar = model(x, noise=noise)
            total, _ = loss_fn(x_hat, x, mu, logvar)
            total.backward()
            opt.step()

    return step


def run_case(device, B, size, rounds, repeats):
    images = torch.from_numpy(generate_lines(range(B), size=size, seed=0)[0])[:, None]
    spatial = SpatialStatsLoss()
    spatial.calibrate(images)
    x = images.to(device)
    torch.manual_seed(0)
    net = VAE(encoder="cnn", decoder="cnn", latent_dim=LATENT, image_size=size).to(device).train()
    steps = {"spatial": make_step(copy.deepcopy(net), spatial, x),
             "vanilla": make_step(copy.deepcopy(net), DataSpaceLoss(), x),
             "torch.fft": make_step(copy.deepcopy(net), spatial, x, reference=True)}
    # The same loss value first, from the fused operators and from torch.fft (a benchmark of a
    # wrong answer is worthless): one forward of the same network on both paths.
    with torch.no_grad():
        x_hat, mu, logvar = net(x, noise=torch.zeros(B, LATENT, device=device))
        ours = float(spatial(x_hat, x, mu, logvar)[0])
        with torch_fft_ops():
            theirs = float(spatial(x_hat, x, mu, logvar)[0])
    assert abs(ours - theirs) <= 1e-3 * abs(theirs) + 1e-6, f"fused loss {ours} != torch.fft loss {theirs}"
    with ops.data_checks(False):
        med, times = alternating_medians(steps, rounds=rounds, repeats=repeats, device=device)
    cost, cost_stats = ratio_summary(round_ratios(times, "spatial", "vanilla", repeats))
    speedup, speedup_stats = ratio_summary(round_ratios(times, "torch.fft", "spatial", repeats))
    row = {"device": device, "case": f"B={B} {size}x{size} cnn/cnn, window {spatial.cutoff_ or 'full'}",
           "spatial img/s": f"{B / med['spatial']:.0f}", "vanilla img/s": f"{B / med['vanilla']:.0f}",
           "torch.fft img/s": f"{B / med['torch.fft']:.0f}", "spatial / vanilla": cost,
           "torch.fft / spatial": speedup}
    return row, {"row": row, "seconds": times, "spatial_over_vanilla": cost_stats,
                 "torch_fft_over_spatial": speedup_stats}


COLUMNS = ["device", "case", "spatial img/s", "vanilla img/s", "torch.fft img/s", "spatial / vanilla",
           "torch.fft / spatial"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one ratio each)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per loss and round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, small batches (a smoke run)")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="which rows to run (all: CPU, and CUDA when a GPU is present)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available")
    rounds, repeats = (3, 2) if args.quick else (args.rounds, args.repeats)
    cpu_b, cuda_b = (8, 32) if args.quick else (32, 256)
    cases = []
    if args.device in ("all", "cpu"):
        cases += [("cpu", cpu_b, 64), ("cpu", cpu_b, 224)]
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        cases += [("cuda", cuda_b, 64), ("cuda", cuda_b, 224)]
    results = [run_case(device, B, size, rounds, repeats) for device, B, size in cases]
    rows = [row for row, _ in results]
    print("Full training step (encoder, decoder, loss, backward, Adam), float32, images per second")
    print(f"Machine: {machine()}")
    print(f"Times: medians of {rounds} interleaved rounds x {repeats} steps; ratios: median of the per-round "
          f"ratios of step times (smallest-largest round)\n")
    print(markdown_table(rows, COLUMNS))
    write_json(args.json, {"machine": machine(), "rounds": rounds, "repeats": repeats, "rows": rows,
                           "cases": [detail for _, detail in results]})


if __name__ == "__main__":
    main()
