"""Sweep of the spatial-statistics loss balance: beta x scale x cutoff, at two image sizes.

What each knob of :class:`pymks_vae.losses.SpatialStatsLoss` does to a VAE's reconstructions and
latent space, measured on held-out microstructures (``generate_grf_family``: thresholded Gaussian
random fields of five classes of correlation length and anisotropy, at one volume fraction):

* reconstruction quality: the held-out unexplained fraction of the statistics' variance ``E``
  (the loss's own statistics term, on the test images; 1 = no better than the data's mean);
* latent quality: test accuracy of ``StandardScaler -> LogisticRegression`` on the latent means
  (classes) and test R^2 of ``RidgeCV`` (the correlation length), fitted on the training latents;
* the KL term (nats per sample) actually spent.

Grid (each cell one ``VAETransformer(latent_dim=4)`` fit with otherwise default settings):
``beta`` in ``--betas``, ``cutoff`` in ``--cutoffs`` (``auto``, ``none`` or an int), the image side
in ``--sizes``, and, at the first size with ``cutoff=auto``, the scale multiplied by ``--scale-factors``
(multiplying the scale by s is the same as dividing beta by s^2). Data seeds start at ``--seed``
(default 2000), disjoint from the evaluation seeds of ``bench_latent.py`` (0-2): a sweep that
chooses defaults never sees the evaluation data.

Outputs in ``--out`` (default ``results/sweep_loss_balance/``): ``sweep.json`` and ``sweep.png``.

Usage:
    python benchmarks/sweep_loss_balance.py                   # about 15 minutes on one core
    python benchmarks/sweep_loss_balance.py --quick --out /tmp/sweep
"""
import argparse
import json
import os
import platform
import time

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--betas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2])
    p.add_argument("--cutoffs", nargs="+", default=["auto", "none", "3"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    p.add_argument("--scale-factors", type=float, nargs="+", default=[0.3, 3.0])
    p.add_argument("--n-per-class", type=int, default=120, help="samples per class (half train, half test)")
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--epochs", type=int, help="VAETransformer epochs (default: its default)")
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join("results", "sweep_loss_balance"))
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.betas, args.cutoffs, args.sizes, args.scale_factors = [1e-4, 1e-2], ["auto", "none"], [16], [3.0]
        args.n_per_class, args.epochs = 8, 2
    return args


def _cutoff(text):
    return {"auto": "auto", "none": None}[text] if text in ("auto", "none") else int(text)


def run_cell(x, y, d, tr, te, args, beta, cutoff, scale_factor):
    import torch
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pymks_vae import VAETransformer

    from pymks_vae.losses import SpatialStatsLoss

    onehot = np.stack([1.0 - x, x], axis=-1)
    # The auto-window, calibrated-scale loss of the training fields: the scale VAETransformer calibrates
    # (the scale-factor cells multiply it) and the yardstick of the held-out unexplained fraction.
    ref = SpatialStatsLoss(states=(0.0, 1.0), correlations=((0, 0),)).calibrate(
        torch.from_numpy(onehot[tr]).permute(0, 3, 1, 2))
    kw = {"latent_dim": args.latent_dim, "beta": beta, "cutoff": cutoff, "random_state": args.seed}
    if args.epochs:
        kw["epochs"] = args.epochs
    if scale_factor != 1.0:
        kw["stats_scale"] = ref.scale_ * scale_factor
    t0 = time.perf_counter()
    vae = VAETransformer(**kw).fit(onehot[tr])
    seconds = time.perf_counter() - t0
    z = vae.transform(onehot)
    acc = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(z[tr], y[tr]).score(z[te], y[te])
    r2 = make_pipeline(StandardScaler(), RidgeCV()).fit(z[tr], d[tr]).score(z[te], d[te])
    rec = torch.from_numpy(np.asarray(vae.inverse_transform(z[te]))).permute(0, 3, 1, 2)
    e = float(ref.stats_error(rec, torch.from_numpy(onehot[te]).permute(0, 3, 1, 2).to(rec.dtype)))
    return {"accuracy": float(acc), "r2": float(r2), "unexplained": e, "kl": float(vae.history_["train_parts"]["kl"][-1]),
            "cutoff_": vae.cutoff_, "seconds": seconds}


def plot(rows, args, path):
    import matplotlib.pyplot as plt

    metrics = (("accuracy", "test accuracy (5 classes)"), ("r2", "test R$^2$ (correlation length)"),
               ("unexplained", "held-out unexplained variance E"), ("kl", "KL (nats / sample)"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (key, label) in zip(axes, metrics):
        for size in args.sizes:
            for cut in args.cutoffs:
                pts = [(r["beta"], r[key]) for r in rows if r["size"] == size and r["cutoff"] == cut
                       and r["scale_factor"] == 1.0]
                if pts:
                    b, v = zip(*sorted(pts))
                    ax.plot(b, v, marker="o", ls="-" if size == args.sizes[0] else "--",
                            label=f"{size}x{size}, cutoff={cut}")
            for sf in args.scale_factors:
                pts = [(r["beta"], r[key]) for r in rows if r["size"] == size and r["scale_factor"] == sf]
                if pts:
                    b, v = zip(*sorted(pts))
                    ax.plot(b, v, marker="x", ls=":", label=f"{size}x{size}, auto, scale x{sf:g}")
        ax.set_xscale("log"), ax.set_xlabel("beta"), ax.set_title(label, fontsize=9)
        if key == "kl":
            ax.set_yscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=6)
    fig.suptitle("SpatialStatsLoss balance on thresholded Gaussian random fields (VAETransformer, latent 4)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from pymks_vae.microstructures import generate_grf_family

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    t_start = time.perf_counter()
    for size in args.sizes:
        x, y, d = generate_grf_family(args.n_per_class, (size, size), seed=args.seed)
        order = np.random.default_rng(args.seed).permutation(len(x))
        tr, te = order[: len(x) // 2], order[len(x) // 2:]
        cells = [(b, c, 1.0) for c in args.cutoffs for b in args.betas]
        if size == args.sizes[0]:
            cells += [(b, "auto", sf) for sf in args.scale_factors for b in args.betas]
        for beta, cut, sf in cells:
            r = run_cell(x, y, d, tr, te, args, beta, _cutoff(cut), sf)
            r.update(size=size, beta=beta, cutoff=cut, scale_factor=sf)
            rows.append(r)
            print(f"{size}x{size} beta={beta:g} cutoff={cut} scale x{sf:g}: acc {r['accuracy']:.3f} "
                  f"R2 {r['r2']:.3f} E {r['unexplained']:.3f} KL {r['kl']:.1f} ({r['seconds']:.0f} s)", flush=True)
    payload = {"settings": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                   "platform": platform.platform(), "torch": torch.__version__,
                                                   "threads": torch.get_num_threads()},
               "rows": rows, "seconds": time.perf_counter() - t_start}
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    plot(rows, args, os.path.join(args.out, "sweep.png"))
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
