"""3D microstructures: a VAE latent space against two-point statistics + PCA, at equal latent size.

Five classes of two-phase 3D microstructures, 32^3 voxels by default
(:func:`pymks_vae.microstructures.generate_grf_family` with :data:`~pymks_vae.microstructures.GRF_CLASSES_3D`:
thresholded Gaussian random fields of volume fraction 0.5 - fine, medium and coarse isotropic
grains, fibres along z and plates normal to z), each volume with a continuous descriptor, the
geometric mean of its correlation lengths. On a held-out test set, two embeddings of the same size
``k`` are compared:

* ``VAETransformer(latent_dim=k)`` at its defaults (spatial-statistics loss, automatic lag window,
  ``beta``, ``epochs``), trained on the one-hot volumes ``(n, 32, 32, 32, 2)`` - what
  ``pymks.PrimitiveTransformer(n_state=2)`` makes of 0/1 data;
* the classic ``TwoPointCorrelation -> flatten -> PCA(k)``, with the autocorrelation of phase 1 in
  the VAE's lag window (``cutoff_``), so that both see the same lags.

Each embedding is scored by classification (logistic regression and 5 nearest neighbours:
accuracy) and by regression of the descriptor (ridge regression and 5 nearest neighbours: R^2),
and by how well its latent codes give back the test volumes' two-point statistics (the VAE by
decoding and measuring the statistics of its reconstructions, PCA by ``inverse_transform``):
the fraction of their variance left unexplained (FVU; 1 = predicting the training mean), as they
are and with each sample's long-range level (about the squared volume fraction) removed.

Outputs in ``--out`` (default ``results/microstructures_3d/``): ``results.json``, ``table.md``; and
in ``--figures`` (default: ``--out``): ``3d_reconstructions.png`` (orthogonal mid-slices of test
volumes next to the VAE's reconstructions), ``3d_statistics.png`` (their two-point statistics next
to the VAE's and PCA's), ``3d_latent.png`` (first two latent coordinates per method).

Usage:
    python examples/microstructures_3d.py                         # about 3-4 minutes on one CPU core
    python examples/microstructures_3d.py --quick --out /tmp/m3d  # a smoke run in seconds
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/microstructures_3d/", help="output folder (tables, json)")
    p.add_argument("--figures", help="folder of the figures (default: --out)")
    p.add_argument("--n-per-class", type=int, default=40, help="volumes per class")
    p.add_argument("--size", type=int, default=32, help="side of the volumes in voxels (any size)")
    p.add_argument("--latent-dim", type=int, default=4, help="latent size of both embeddings")
    p.add_argument("--test-size", type=float, default=0.4, help="held-out fraction")
    p.add_argument("--epochs", type=int, help="VAE training epochs (default: VAETransformer's 'auto')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: small convolutions gain little from more, and lose on a busy machine)")
    p.add_argument("--quick", action="store_true", help="tiny smoke setting (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_per_class, args.size, args.latent_dim, args.epochs = 6, 12, 2, 1
    if args.n_per_class < 3:
        p.error("--n-per-class must be at least 3 (the split is stratified)")
    if args.figures is None:
        args.figures = args.out
    return args


def machine():
    """The CPU's name (lscpu's model name), the core count and the platform, for the record."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def autocorrelation(x_onehot, cutoff):
    """Autocorrelation of phase 1, ``(n, w, w, w)``, of ``(n, X, Y, Z, 2)`` one-hot or probabilities."""
    from pymks_vae import TwoPointCorrelation

    return np.asarray(TwoPointCorrelation(correlations=[(1, 1)], cutoff=cutoff).transform(x_onehot))[..., 0]


def fvu(f_rec, f_true, f_train_mean):
    """Fraction of the statistics' variance left unexplained: 0 perfect, 1 as good as the training mean."""
    return float(np.sum((f_rec - f_true) ** 2) / np.sum((f_true - f_train_mean) ** 2))


def far_level(f):
    """Each sample's autocorrelation level at long range, ``(n, 1, 1, 1)``: the mean over its window's
    outermost shell, close to the squared volume fraction (PyMKS's periodic statistics tend to it)."""
    shell = np.ones(f.shape[1:], dtype=bool)
    shell[(slice(1, -1),) * 3] = False
    return f[:, shell].mean(axis=1)[:, None, None, None]


def score_embedding(z_train, z_test, y_train, y_test, d_train, d_test):
    """Test accuracy and R^2 of a linear and a 5-nearest-neighbour model on the embedding."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fitted(model, target):
        return make_pipeline(StandardScaler(), model).fit(z_train, target)

    return {
        "accuracy (logistic)": fitted(LogisticRegression(max_iter=5000), y_train).score(z_test, y_test),
        "accuracy (5-NN)": fitted(KNeighborsClassifier(5), y_train).score(z_test, y_test),
        "R2 descriptor (ridge)": fitted(RidgeCV(alphas=np.logspace(-3, 3, 13)), d_train).score(z_test, d_test),
        "R2 descriptor (5-NN)": fitted(KNeighborsRegressor(5), d_train).score(z_test, d_test),
    }


def _slices(v):
    """The three orthogonal mid-slices of a volume: xy (z = Z/2), xz (y = Y/2), yz (x = X/2)."""
    cx, cy, cz = (s // 2 for s in v.shape)
    return v[:, :, cz], v[:, cy, :], v[cx, :, :]


def plot_reconstructions(x, rec, picks, names, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picks), 6, figsize=(9.5, 1.65 * len(picks) + 0.5), squeeze=False)
    titles = ["original xy", "original xz", "original yz", "VAE xy", "VAE xz", "VAE yz"]
    for row, (idx, name) in enumerate(zip(picks, names)):
        for col, img in enumerate(_slices(x[idx]) + _slices(rec[idx])):
            ax = axes[row, col]
            ax.imshow(img.T, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Test volumes (phase 1 white) and the VAE's reconstructions (probability of phase 1): "
                 "orthogonal mid-slices", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_statistics(f_true, f_vae, f_pca, picks, names, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picks), 6, figsize=(10, 1.7 * len(picks) + 0.5), squeeze=False,
                             layout="constrained")
    cols = [("original", f_true), ("VAE", f_vae), ("PCA", f_pca)]
    for row, (idx, name) in enumerate(zip(picks, names)):
        lo = min(float(f[idx].min()) for _, f in cols)
        hi = max(float(f[idx].max()) for _, f in cols)
        for k, (label, f) in enumerate(cols):
            xy, xz, _ = _slices(f[idx])
            for j, (plane, img) in enumerate((("r_z = 0", xy), ("r_y = 0", xz))):
                ax = axes[row, 2 * k + j]
                im = ax.imshow(img.T, cmap="viridis", vmin=lo, vmax=hi, origin="lower")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{label}, {plane}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
        # one colour scale per row, shared by the three sources, so that their levels compare
        fig.colorbar(im, ax=list(axes[row]), fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    fig.suptitle("Autocorrelation of phase 1 in the lag window (one colour scale per row): test volumes, "
                 "VAE reconstructions, PCA reconstructions", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    from pymks_vae.plotting import latent_scatter

    args = parse_args(argv)
    import torch
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    from pymks_vae import TwoPointCorrelation, VAETransformer
    from pymks_vae.microstructures import GRF_CLASSES_3D, generate_grf_family

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    t_start = time.perf_counter()
    seconds = {}
    shape = (args.size,) * 3
    names = [c["name"] for c in GRF_CLASSES_3D]

    t0 = time.perf_counter()
    x, y, d = generate_grf_family(args.n_per_class, shape, seed=args.seed)
    onehot = np.stack([1.0 - x, x], axis=-1)
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=args.test_size, stratify=y,
                                           random_state=args.seed)
    seconds["data"] = time.perf_counter() - t0
    print(f"{len(x)} volumes {'x'.join(map(str, shape))}, {len(names)} classes; train {len(idx_train)}, "
          f"test {len(idx_test)}", flush=True)

    # The VAE, at its defaults.
    t0 = time.perf_counter()
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    vae = VAETransformer(latent_dim=args.latent_dim, random_state=args.seed, **overrides).fit(onehot[idx_train])
    z_vae = {"train": vae.transform(onehot[idx_train]), "test": vae.transform(onehot[idx_test])}
    seconds["VAE (spatial stats)"] = time.perf_counter() - t0
    cutoff = vae.cutoff_ if vae.cutoff_ is not None else (args.size - 1) // 2
    print(f"  VAE: {vae.history_['epochs']} epochs, lag window cutoff_={vae.cutoff_}, "
          f"{seconds['VAE (spatial stats)']:.0f} s", flush=True)

    # Two-point statistics in the same window, then PCA to the same size.
    t0 = time.perf_counter()
    tpc = TwoPointCorrelation(correlations=[(1, 1)], cutoff=cutoff).fit(onehot[idx_train])
    feats = {part: np.asarray(tpc.transform(onehot[idx])).reshape(len(idx), -1)
             for part, idx in (("train", idx_train), ("test", idx_test))}
    pca = PCA(n_components=args.latent_dim, random_state=args.seed).fit(feats["train"])
    z_pca = {part: pca.transform(f) for part, f in feats.items()}
    seconds["2-point stats + PCA"] = time.perf_counter() - t0

    # Statistics given back by each embedding, on the test set.
    f_test = feats["test"].reshape((len(idx_test),) + (2 * cutoff + 1,) * 3)
    f_mean = feats["train"].mean(axis=0).reshape(f_test.shape[1:])
    rec = vae.inverse_transform(z_vae["test"])  # phase probabilities (n, X, Y, Z, 2)
    fraction = rec[..., 1].mean(axis=(1, 2, 3))
    print(f"  VAE reconstructions: phase-1 fraction {fraction.mean():.3f} +- {fraction.std():.3f} "
          f"(the volumes: {x.mean():.3f})", flush=True)
    f_vae = autocorrelation(rec, cutoff)
    f_pca = pca.inverse_transform(z_pca["test"]).reshape(f_test.shape)

    rows = []
    for method, z, f_rec in (("VAE (spatial stats)", z_vae, f_vae), ("2-point stats + PCA", z_pca, f_pca)):
        row = {"method": method, "latent size": args.latent_dim}
        row.update(score_embedding(z["train"], z["test"], y[idx_train], y[idx_test], d[idx_train], d[idx_test]))
        row["stats FVU"] = fvu(f_rec, f_test, f_mean)
        # the same with each sample's long-range level removed: the shape of the statistics alone
        centred = [f - far_level(f) for f in (f_rec, f_test)]
        row["stats FVU, far level removed"] = fvu(*centred, f_mean - far_level(f_mean[None])[0])
        row["fit seconds"] = seconds[method]
        rows.append(row)

    cols = list(rows[0])
    fmt = {c: "{:.3f}" for c in cols[2:]}
    fmt["fit seconds"] = "{:.0f}"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)

    y_test = y[idx_test]
    picks = [int(np.flatnonzero(y_test == c)[0]) for c in range(len(names))]
    plot_reconstructions(x[idx_test], rec[..., 1], picks, names, os.path.join(args.figures, "3d_reconstructions.png"))
    plot_statistics(f_test, f_vae, f_pca, picks, names, os.path.join(args.figures, "3d_statistics.png"))
    latent_scatter({f"VAE latent (size {args.latent_dim})": z_vae["test"],
                    f"PCA of 2-point stats (size {args.latent_dim})": z_pca["test"]},
                   y_test, names, os.path.join(args.figures, "3d_latent.png"))

    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    payload = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args),
        "classes": [dict(c, aspect=c["aspect"]) for c in GRF_CLASSES_3D],
        "vae": {"epochs": vae.history_["epochs"], "cutoff_": vae.cutoff_, "correlations_": vae.correlations_,
                "stats_scale_": vae.stats_scale_, "final_train_loss": vae.history_["train_loss"][-1],
                "reconstructed_phase1_fraction": {"mean": float(fraction.mean()), "sd": float(fraction.std()),
                                                  "volumes": float(x.mean())}},
        "results": rows,
        "seconds": seconds,
        "seconds_total": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    print(f"\nwrote {args.out} and figures in {args.figures} ({payload['seconds_total']:.0f} s on {payload['machine']})")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
