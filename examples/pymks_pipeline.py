"""A PyMKS classification workflow: a VAE latent space against two-point statistics + PCA.

Two-phase microstructures of four classes (:mod:`pymks_vae.microstructures`: periodic Gaussian
random fields thresholded, with class-dependent correlation lengths along x and y and volume
fractions) are classified by two scikit-learn pipelines that share PyMKS's first step:

* ``PrimitiveTransformer -> VAETransformer -> LogisticRegression`` (latent means of a VAE
  trained in spatial-statistics space), with ``GridSearchCV`` over ``latent_dim``;
* the classic ``PrimitiveTransformer -> TwoPointCorrelation -> flatten -> PCA ->
  LogisticRegression``, with ``GridSearchCV`` over the PCA size on the same grid.

Both are scored on a held-out test set (accuracy), and both are asked to reconstruct the
two-point statistics of the test set from their latent codes (the VAE by decoding and measuring
the statistics of its reconstructions, PCA by ``inverse_transform``): the mean squared error of
the statistics is the second column of the table.

Outputs in ``--out`` (default ``results/pymks_pipeline/``): ``results.json``, ``table.md``,
``microstructures.png`` (examples per class), ``latent_scatter.png`` (first two latent
coordinates of the test set, per method), ``accuracy.png`` (accuracy per latent size).

Usage:
    python examples/pymks_pipeline.py                    # about 1-2 minutes on 2 CPU cores
    python examples/pymks_pipeline.py --quick --out /tmp/p   # a smoke run in seconds
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")


def flatten(x):
    """``(n, ...) -> (n, prod(...))``; numpy or dask (pymks's FlattenTransformer fails on sklearn >= 1.2)."""
    return x.reshape(len(x), -1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/pymks_pipeline/", help="output folder")
    p.add_argument("--n-per-class", type=int, default=100, help="microstructures per class")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (any size)")
    p.add_argument("--latent-dims", type=int, nargs="+", default=[2, 4], help="latent sizes searched")
    p.add_argument("--epochs", type=int, help="VAE training epochs (default: VAETransformer's)")
    p.add_argument("--batch-size", type=int, help="VAE batch size (default: VAETransformer's)")
    p.add_argument("--beta", type=float, help="KL weight of the VAE loss (default: VAETransformer's)")
    p.add_argument("--stats-scale", type=float, help="factor on the statistics in the VAE loss (default: auto)")
    p.add_argument("--cutoff", type=int, default=5,
                   help="largest lag of the classic features and of the statistics error (the VAE's own window "
                        "stays its default, cutoff='auto', unless --vae-cutoff is given)")
    p.add_argument("--vae-cutoff", type=int, help="lag window of the VAE loss (default: auto)")
    p.add_argument("--cv", type=int, default=3, help="cross-validation folds of the grid searches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: small convolutions gain nothing from more, and lose on busy machines)")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_per_class, args.size, args.latent_dims, args.epochs, args.cv, args.cutoff = 6, 16, [2, 3], 1, 2, 3
        args.batch_size = 4
    if args.n_per_class < 2 * args.cv:
        p.error("--n-per-class must be at least twice --cv")
    return args


def vae_overrides(args):
    """The VAETransformer arguments given on the command line (the rest stay at their defaults)."""
    names = {"epochs": "epochs", "batch_size": "batch_size", "beta": "beta", "stats_scale": "stats_scale",
             "vae_cutoff": "cutoff"}
    return {param: getattr(args, flag) for flag, param in names.items() if getattr(args, flag) is not None}


def build_pipelines(args):
    import pymks
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from pymks_vae import TwoPointCorrelation, VAETransformer

    vae = Pipeline([
        ("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0.0, max_=1.0)),
        ("vae", VAETransformer(latent_dim=args.latent_dims[0], random_state=args.seed, **vae_overrides(args))),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(max_iter=2000)),
    ])
    classic = Pipeline([
        ("onehot", pymks.PrimitiveTransformer(n_state=2, min_=0.0, max_=1.0)),
        ("stats", TwoPointCorrelation(correlations=[(1, 1)], cutoff=args.cutoff)),
        ("flatten", FunctionTransformer(flatten)),
        ("pca", PCA(n_components=args.latent_dims[0], random_state=args.seed)),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(max_iter=2000)),
    ])
    return vae, classic


def stats_of(x_onehot, cutoff):
    """Phase-1 autocorrelation, flattened, ``(n, (2c+1)^2)``, of one-hot ``(n, H, W, 2)``."""
    from pymks_vae import TwoPointCorrelation

    return flatten(np.asarray(TwoPointCorrelation(correlations=[(1, 1)], cutoff=cutoff).fit_transform(x_onehot)))


def plot_microstructures(x, y, names, path, per_class=4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), per_class, figsize=(1.6 * per_class, 1.6 * len(names)), squeeze=False)
    for c, name in enumerate(names):
        for k, idx in enumerate(np.flatnonzero(y == c)[:per_class]):
            ax = axes[c, k]
            ax.imshow(x[idx], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Example microstructures per class (phase 1 white)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(per_size, path):
    import matplotlib.pyplot as plt

    sizes = sorted({int(k) for m in per_size.values() for k in m})
    width = 0.8 / len(per_size)
    fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(sizes), 3.4))
    for k, (method, scores) in enumerate(per_size.items()):
        xs = np.arange(len(sizes)) + (k - (len(per_size) - 1) / 2) * width
        ax.bar(xs, [scores.get(str(s), np.nan) for s in sizes], width, label=method)
    ax.set_xticks(np.arange(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("latent size"), ax.set_ylabel("cross-validated accuracy"), ax.set_ylim(0, 1.15)
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from pymks_vae.plotting import latent_scatter

    args = parse_args(argv)
    # scikit-learn steps after a lazy dask step compute it through numpy; dask warns on the way
    # (np.may_share_memory has no dask version). The numbers are right; the warning is noise here.
    warnings.filterwarnings("ignore", message=".*may_share_memory.*", category=FutureWarning)
    import torch
    from sklearn.model_selection import GridSearchCV, train_test_split

    from pymks_vae.microstructures import DEFAULT_CLASSES, generate_classes

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    names = [c["name"] for c in DEFAULT_CLASSES]
    x, y = generate_classes(args.n_per_class, (args.size, args.size), seed=args.seed)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=args.seed)
    print(f"{len(x)} microstructures {args.size}x{args.size}, {len(names)} classes; "
          f"train {len(x_train)}, test {len(x_test)}", flush=True)

    vae_pipe, classic_pipe = build_pipelines(args)
    grid = [int(d) for d in args.latent_dims]
    searches = {}
    timings = {}
    for method, pipe, param in (("VAE (spatial stats)", vae_pipe, "vae__latent_dim"),
                                ("2-point stats + PCA", classic_pipe, "pca__n_components")):
        t0 = time.perf_counter()
        searches[method] = GridSearchCV(pipe, {param: grid}, cv=args.cv).fit(x_train, y_train)
        timings[method] = time.perf_counter() - t0
        print(f"  {method}: best {param}={searches[method].best_params_[param]} "
              f"(cv accuracy {searches[method].best_score_:.3f}, {timings[method]:.1f} s)", flush=True)

    # Statistics reconstruction error on the test set, from each method's latent codes.
    onehot_test = np.stack([1.0 - x_test, x_test], axis=-1)
    f_test = stats_of(onehot_test, args.cutoff)
    vae_best = searches["VAE (spatial stats)"].best_estimator_
    z_vae = np.asarray(vae_best[:2].transform(x_test))
    rec = np.asarray(vae_best["vae"].inverse_transform(z_vae))
    f_vae = stats_of(rec, args.cutoff)
    classic_best = searches["2-point stats + PCA"].best_estimator_
    z_pca = np.asarray(classic_best[:4].transform(x_test))
    f_pca = classic_best["pca"].inverse_transform(z_pca)

    rows = []
    for method, f_rec, z in (("VAE (spatial stats)", f_vae, z_vae), ("2-point stats + PCA", f_pca, z_pca)):
        s = searches[method]
        rows.append({
            "method": method,
            "latent size": int(z.shape[1]),
            "cv accuracy": float(s.best_score_),
            "test accuracy": float(s.score(x_test, y_test)),
            "stats MSE": float(np.mean((f_rec - f_test) ** 2)),
            "search seconds": float(timings[method]),
        })
    per_size = {
        method: {str(int(p)): float(score) for p, score in zip(
            s.cv_results_["param_" + ("vae__latent_dim" if "VAE" in method else "pca__n_components")],
            s.cv_results_["mean_test_score"])}
        for method, s in searches.items()
    }

    cols = ["method", "latent size", "cv accuracy", "test accuracy", "stats MSE", "search seconds"]
    fmt = {"cv accuracy": "{:.3f}", "test accuracy": "{:.3f}", "stats MSE": "{:.3e}", "search seconds": "{:.1f}"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print("\n" + table)

    plot_microstructures(x, y, names, os.path.join(args.out, "microstructures.png"))
    latent_scatter({f"VAE latent (size {z_vae.shape[1]})": z_vae,
                    f"PCA of 2-point stats (size {z_pca.shape[1]})": z_pca},
                   y_test, names, os.path.join(args.out, "latent_scatter.png"))
    plot_accuracy(per_size, os.path.join(args.out, "accuracy.png"))
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    payload = {
        "settings": {k: v for k, v in vars(args).items()},
        "classes": [dict(c, sigma=list(c["sigma"])) for c in DEFAULT_CLASSES],
        "results": rows,
        "cv_accuracy_per_latent_size": per_size,
        "seconds_total": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"\nwrote {args.out} ({payload['seconds_total']:.0f} s)")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
