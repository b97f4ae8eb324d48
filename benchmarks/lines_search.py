"""Do the statistics hold the line count? Per-image search against the amortised VAE.

The lines VAE counts lines at about chance (docs/replication.md). This script asks whether the
information is missing from the periodic autocovariance the model is trained on, or whether the
model fails to use it. For each held-out image it searches the parameters of a stroke drawing (the
``StrokeDecoder``'s bars, no network) by gradient descent on the same statistics loss as the lines
model (``SpatialStatsLoss``, straight-through indicator, variance convention), from ``--restarts``
random starts, and reads the drawing (black where it is darker than one half: the line phase
those statistics see) as ``train_lines.py`` reads reconstructions
(:func:`pymks_vae.evaluation.analyse_lines` at mid-grey), each drawing first rolled periodically so
that an empty row and column sit at its edges (the periodic statistics do not see a bar wrapped
across the edge, which would read as two). Reported: the count and orientation of one start, and
of the start with the lowest loss (best of R). The search never sees the image, only its
statistics, as the model.

With ``--checkpoint`` (a ``spatial_stats.pt`` written by ``train_lines.py``) it also reads the
model on the same images: its reconstruction from the posterior mean, and the reconstruction after
searching the latent vector (from the posterior mean, by the same gradient descent), which shows
how much of the gap lies in the encoder and how much in the decoder's range.

Usage: python benchmarks/lines_search.py [--images 40] [--restarts 8] [--steps 400] [--size 64]
       [--same-start] [--checkpoint results/lines/checkpoints/spatial_stats.pt] [--json out.json]
       [--figures DIR]
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import machine  # noqa: E402

from pymks_vae import evaluation, plotting  # noqa: E402
from pymks_vae.datasets import generate_lines  # noqa: E402
from pymks_vae.losses import SpatialStatsLoss  # noqa: E402
from pymks_vae.models.decoder import StrokeDecoder  # noqa: E402
from pymks_vae.reconstruction import roll_to_gaps  # noqa: E402,F401  (also read by the tests)
from pymks_vae.training import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=40, help="held-out images searched (default 40)")
    p.add_argument("--restarts", type=int, default=8, help="random starts per image (default 8)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps per start (default 400)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--size", type=int, default=64, help="image size (default 64, train_lines' CPU default)")
    p.add_argument("--n-strokes", type=int, default=6, help="bars per drawing (default 6, the decoder's)")
    p.add_argument("--data-seed", type=int, default=555, help="seed of the images (default 555)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    p.add_argument("--same-start", action="store_true",
                   help="start every image from the same random drawing (as an untrained network does) instead of its own")
    p.add_argument("--checkpoint", help="a spatial_stats.pt of train_lines.py: read the model too")
    p.add_argument("--pca", type=int, nargs="+", default=[],
                   help="also search against each image's statistics reconstructed from K principal components "
                        "(fitted on --pca-train other images): how many numbers of the statistics the count needs")
    p.add_argument("--pca-train", type=int, default=2100,
                   help="training images of the principal components (default 2100, train_lines' training set size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--figures", help="folder for search.png (and model.png): originals beside the drawings, "
                                     "and their autocorrelations")
    a = p.parse_args(argv)
    if any(k < 1 for k in a.pca) or a.pca_train < 2:
        p.error("--pca values must be >= 1 and --pca-train >= 2")
    if a.pca and max(a.pca) > min(a.pca_train, a.size * a.size):
        p.error("--pca K must not exceed --pca-train nor the number of statistics (size^2)")
    for name in ("images", "restarts", "steps", "size", "n_strokes", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.size < 16:
        p.error("--size must be >= 16")
    if not a.lr > 0:
        p.error("--lr must be > 0")
    return a


def read(images, orientation, n_lines):
    found, count = evaluation.analyse_lines(roll_to_gaps(images), level=0.5)
    return {"orientation": float(np.mean(found == orientation)), "line_count": float(np.mean(count == n_lines)),
            "count_histogram": np.bincount(count, minlength=7).tolist()}


def search(draw, params, loss_fn, target, steps, lr):
    """Adam on ``params`` (leaf tensor) to lower ``loss_fn(draw(params), target)``; per-sample losses at the end."""
    params.requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn.stats_error(draw(params), target, reduction="none").sum().backward()
        opt.step()
    with torch.no_grad():
        drawn = draw(params)
        return drawn, loss_fn.stats_error(drawn, target, reduction="none")


def search_statistics(draw, params, loss_fn, target, norm, steps, lr):
    """:func:`search` against given statistics ``target`` (``loss_fn.statistics``' shape): the summed
    squared difference over ``norm`` (any positive number: it scales every loss alike)."""
    def error(drawn):
        return (loss_fn.statistics(loss_fn.indicators(drawn)) - target).pow(2).flatten(1).sum(1) / norm

    params.requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        error(draw(params)).sum().backward()
        opt.step()
    with torch.no_grad():
        drawn = draw(params)
        return drawn, error(drawn)


def pca_statistics(loss_fn, train, held_out, k):
    """The held-out images' statistics reconstructed from the ``k`` principal components of the
    training images' statistics (scikit-learn's PCA), and the fraction of their variance (about the
    training mean) left unexplained, per image.

    Returns:
        (reconstructed statistics shaped like ``loss_fn.statistics``, unexplained fractions, the
        training statistics' total variance per image).
    """
    from sklearn.decomposition import PCA

    f_train = loss_fn.target_statistics(train).flatten(1).double().numpy()
    f_held = loss_fn.target_statistics(held_out)
    flat = f_held.flatten(1).double().numpy()
    pca = PCA(n_components=k, svd_solver="full").fit(f_train)
    rec = pca.inverse_transform(pca.transform(flat))
    total = float(((f_train - f_train.mean(0)) ** 2).sum(1).mean())
    fvu = ((rec - flat) ** 2).sum(1) / total
    return torch.from_numpy(rec).to(f_held.dtype).view_as(f_held), fvu, total


def best_of(drawn, losses, restarts):
    n = drawn.shape[0] // restarts
    best = losses.view(n, restarts).argmin(1)
    return drawn.view(n, restarts, *drawn.shape[1:])[torch.arange(n), best]


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    images, orientation, n_lines = generate_lines(range(a.images), size=a.size, seed=a.data_seed)
    x = torch.from_numpy(images)[:, None]
    loss_fn = SpatialStatsLoss(states=(0.0,), indicator="straight_through").calibrate(x)
    model = None
    if a.checkpoint:  # before the search, so that a wrong checkpoint fails at once
        model = load_model(a.checkpoint)
        if tuple(model.image_size) != (a.size, a.size):
            raise SystemExit(f"--checkpoint was trained on {model.image_size} images, --size is {a.size}")
    results, t0 = {}, time.time()

    k, r = a.n_strokes, a.restarts
    dec = StrokeDecoder(latent_dim=k * StrokeDecoder.N_PARAMS, image_size=a.size, n_strokes=k)
    dec.fc, dec.head = torch.nn.Identity(), torch.nn.Identity()  # the bars' raw parameters are searched directly
    gen = torch.Generator().manual_seed(a.seed)
    start = torch.randn(a.images * r, k * StrokeDecoder.N_PARAMS, generator=gen)
    if a.same_start:  # restart j of every image from the same drawing
        start = start[:r].repeat(a.images, 1)
    fresh_start = start.clone()  # the search moves start itself; the PCA searches begin where it began
    drawn, losses = search(dec, start, loss_fn, x.repeat_interleave(r, 0), a.steps, a.lr)
    # the line phase the straight-through statistics see (as the model's binary strokes draw it);
    # the grey drawing also holds faint bars above one half that the statistics ignore
    drawn = (drawn >= 0.5).to(drawn.dtype)
    one = drawn.view(a.images, r, *drawn.shape[1:])[:, 0]
    how = "the same start for every image" if a.same_start else "each image its own start"
    results["search, one start"] = read(one[:, 0].numpy(), orientation, n_lines)
    best = roll_to_gaps(best_of(drawn, losses, r)[:, 0].numpy())
    results[f"search, best of {r} starts"] = read(best, orientation, n_lines)
    if a.figures:
        os.makedirs(a.figures, exist_ok=True)
        plotting.reconstruction_grid(images, best, os.path.join(a.figures, "search.png"), n=6)
    print(f"[lines_search] stroke search {time.time() - t0:.0f} s", flush=True)

    if a.pca:
        train, _, _ = generate_lines(range(a.pca_train), size=a.size, seed=a.data_seed + 1)
        train = torch.from_numpy(train)[:, None]
        for k_pc in a.pca:
            target, fvu, total = pca_statistics(loss_fn, train, x, k_pc)
            drawn, losses = search_statistics(dec, fresh_start.clone(), loss_fn, target.repeat_interleave(r, 0), total,
                                              a.steps, a.lr)
            drawn = (drawn >= 0.5).to(drawn.dtype)
            name = f"search from {k_pc} principal components of the statistics, best of {r} starts"
            results[name] = read(best_of(drawn, losses, r)[:, 0].numpy(), orientation, n_lines)
            results[name]["unexplained_variance_median"] = float(np.median(fvu))
            print(f"[lines_search] PCA {k_pc}: unexplained variance median {np.median(fvu):.3f}, "
                  f"{time.time() - t0:.0f} s", flush=True)

    if model is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            mu, _ = model.encode(x)
            decoded = model.decode(mu)[:, 0].numpy()
            results["model, posterior mean"] = read(decoded, orientation, n_lines)
        if a.figures:
            plotting.reconstruction_grid(images, decoded, os.path.join(a.figures, "model.png"), n=6)
        # the search needs the grey drawing's gradient: binary strokes off while searching
        binary = getattr(model.decoder, "binary", False)
        model.decoder.binary = False
        drawn, _ = search(model.decode, mu.clone(), loss_fn, x, a.steps, a.lr)
        model.decoder.binary = binary
        if binary:
            drawn = (drawn >= 0.5).to(drawn.dtype)
        results["model, latent searched from the posterior mean"] = read(drawn[:, 0].numpy(), orientation, n_lines)
        print(f"[lines_search] model readings {time.time() - t0:.0f} s", flush=True)

    truth = np.bincount(n_lines, minlength=7).tolist()
    chance = float(np.max(np.bincount(n_lines)) / len(n_lines))
    print(f"\nmachine: {machine()}; {how}; {a.images} images of {a.size}x{a.size}; counts held {truth[1:5]} "
          f"of 1-4 lines; always answering the commonest count scores {chance:.2f}\n")
    print("| reading | orientation | line count | counts drawn (0, 1, 2, ...) |")
    print("|---|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {res['orientation']:.2f} | {res['line_count']:.2f} | {res['count_histogram']} |")
    if a.json:
        out = {"args": vars(a), "starts": how, "machine": machine(), "python": platform.python_version(), "torch": torch.__version__,
               "true_counts": truth, "chance": chance, "results": results, "seconds": time.time() - t0}
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(tmp, a.json)
    return results


if __name__ == "__main__":
    main()
