"""Latent features for classification and regression: VAETransformer defaults against 2-point stats + PCA.

Issue 11, item 4: with only ``latent_dim`` set, does ``VAETransformer`` match or beat the classic
PyMKS pipeline ``TwoPointCorrelation -> flatten -> PCA`` at the same latent size? For each
microstructure family, seed and latent size ``k``, both methods embed the same training images
(unsupervised) and the same linear heads read the embedding:

* VAE:  ``PrimitiveTransformer(n_state=2, min_=0, max_=1) -> VAETransformer(latent_dim=k,
  random_state=seed)`` (every other argument at its default, unless ``--vae-params`` says otherwise);
* PCA:  ``PrimitiveTransformer -> pymks_vae.TwoPointCorrelation(correlations=[(1, 1)])`` (default
  cutoff) ``-> flatten -> PCA(k)``;
* optionally (``--vanilla``) the vanilla VAE, ``VAETransformer(latent_dim=k, loss="data")``;
* chance: the training set's majority class (accuracy) and its mean descriptor (R^2, about 0).

Heads: ``StandardScaler -> LogisticRegression`` (test accuracy of the class) and ``StandardScaler ->
RidgeCV`` (test R^2 of the family's continuous descriptor). The embeddings are fitted once per
(family, seed, k) on the training images only and shared by both heads, which is what the full
scikit-learn pipelines would do since the embedding steps ignore ``y``.

Families (:mod:`pymks_vae.microstructures`), ``--size`` pixels square:

* ``classes``: ``generate_classes`` (the data of ``examples/pymks_pipeline.py``; 4 classes);
  descriptor: the sample's volume fraction (the classes differ in it; the other families do not);
* ``grf``: ``generate_grf_family`` (5 classes); descriptor: mean correlation length (px);
* ``inclusions``: ``generate_inclusions`` (4 classes); descriptor: disk radius (px);
* ``lamellae``: ``generate_lamellae`` (4 classes); descriptor: lamellar spacing (px).

Seeds: each seed ``s`` of ``--seeds`` gives an effective seed ``s + --tune-seed-offset`` that draws
the family's data (mixed with the family's name), the stratified train/test split, the VAE's
initialisation and shuffling, and PCA's. Report mean and [min, max] over the seeds.

Never tune on the evaluation data: the final numbers are runs with ``--tune-seed-offset 0`` (the
default) and ``--seeds 0 1 2``; every run that helps choose defaults or ``--vae-params`` must use an
offset that keeps its effective seeds disjoint from those (e.g. ``--tune-seed-offset 1000``), so
that it sees other images, other splits and other initialisations.

Outputs in ``--out`` (default ``results/bench_latent/``): ``table.md`` (also printed),
``results.json`` (settings, machine, every run, the aggregated cells) and ``latent_bench.png``
(accuracy and R^2 against latent size per family, mean with min-max bars).

CPU: torch uses ``--threads`` threads (default 1), dask's synchronous scheduler runs the transforms
when ``--threads`` is 1, and BLAS is held to one thread unless OMP_NUM_THREADS / MKL_NUM_THREADS /
OPENBLAS_NUM_THREADS are set.

Usage:
    python benchmarks/bench_latent.py                 # 64x64, 300 + 300 samples, k = 2 4 8, seeds 0 1 2
    python benchmarks/bench_latent.py --quick --out /tmp/bench_latent    # smoke run, under a minute
    python benchmarks/bench_latent.py --families grf lamellae --vae-params '{"beta": 0.01}' \\
        --tune-seed-offset 1000                       # a tuning run, on data disjoint from the evaluation
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
import zlib

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FAMILIES = ("classes", "grf", "inclusions", "lamellae")
DESCRIPTORS = {"classes": "volume fraction", "grf": "correlation length (px)", "inclusions": "radius (px)",
               "lamellae": "spacing (px)"}
METHODS = {"vae": "VAE (defaults)", "pca": "2-point stats + PCA", "vanilla": "VAE (loss='data')",
           "chance": "chance"}
QUICK = dict(size=32, n_train=40, n_test=40, latent_dims=[2, 4], seeds=[0, 1])
QUICK_VAE_PARAMS = {"epochs": 1}


def flatten(x):
    """``(n, ...) -> (n, prod(...))``; numpy or dask (pymks's FlattenTransformer fails on sklearn >= 1.2)."""
    return x.reshape(len(x), -1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", default="results/bench_latent/", help="output folder")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (any size >= 8)")
    p.add_argument("--n-train", type=int, default=300, help="training samples per family and seed")
    p.add_argument("--n-test", type=int, default=300, help="test samples per family and seed")
    p.add_argument("--latent-dims", type=int, nargs="+", default=[2, 4, 8], help="latent sizes k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of data, split and fits")
    p.add_argument("--tune-seed-offset", type=int, default=0,
                   help="added to every seed; use e.g. 1000 for tuning runs so they never see evaluation data")
    p.add_argument("--vae-params", default=None,
                   help="JSON object of extra VAETransformer arguments, e.g. '{\"epochs\": 1}' (for both VAEs)")
    p.add_argument("--vanilla", action="store_true", help="also the vanilla VAE (loss='data')")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                   help="no new fits: merge the results.json of runs on disjoint --families (run in parallel "
                        "with the same other settings) into one table, figure and results.json in --out")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke setting: {QUICK}, vae params {QUICK_VAE_PARAMS} (explicit flags still win)")
    pre, _ = p.parse_known_args(argv)
    if pre.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.size < 8:
        p.error("--size must be >= 8")
    if min(args.latent_dims) < 1 or args.n_train < 2 or args.n_test < 2 or args.threads < 1:
        p.error("--latent-dims, --n-train, --n-test and --threads must be positive (samples >= 2)")
    if args.tune_seed_offset < 0:
        p.error("--tune-seed-offset must be >= 0")
    try:
        extra = json.loads(args.vae_params) if args.vae_params else {}
    except json.JSONDecodeError as e:
        p.error(f"--vae-params is not valid JSON: {e}")
    if not isinstance(extra, dict):
        p.error(f"--vae-params must be a JSON object, got {args.vae_params!r}")
    if args.quick:
        extra = {**QUICK_VAE_PARAMS, **extra}
    from pymks_vae import VAETransformer

    known = set(VAETransformer().get_params())
    bad = sorted(set(extra) - known)
    if bad:
        p.error(f"--vae-params: unknown VAETransformer arguments {bad}; known: {sorted(known)}")
    fixed = sorted(set(extra) & {"latent_dim", "random_state", "loss"})
    if fixed:
        p.error(f"--vae-params must not set {fixed}: the benchmark sets them")
    args.vae_params = extra
    args.families = list(dict.fromkeys(args.families))
    args.latent_dims = sorted(set(args.latent_dims))
    return args


def family_data(name, n_total, size, seed):
    """``(x, y, descriptor, class names)`` of one family, at least ``n_total`` samples, balanced."""
    from pymks_vae import microstructures as ms

    data_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
    shape = (size, size)
    if name == "classes":
        classes = ms.DEFAULT_CLASSES
        x, y = ms.generate_classes(math.ceil(n_total / len(classes)), shape, seed=data_seed)
        d = x.mean(axis=(1, 2))
    else:
        gen, classes = {"grf": (ms.generate_grf_family, ms.GRF_CLASSES),
                        "inclusions": (ms.generate_inclusions, ms.INCLUSION_CLASSES),
                        "lamellae": (ms.generate_lamellae, ms.LAMELLA_CLASSES)}[name]
        x, y, d = gen(math.ceil(n_total / len(classes)), shape, seed=data_seed)
    return x, y, d, [c.get("name", str(k)) for k, c in enumerate(classes)]


def heads(z_train, z_test, y_train, y_test, d_train, d_test):
    """Test accuracy (scaled logistic regression) and test R^2 (scaled ridge, CV'd alpha) on features."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(z_train, y_train)
    reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(z_train, d_train)
    return float(clf.score(z_test, y_test)), float(r2_score(d_test, reg.predict(z_test)))


def onehot():
    import pymks

    return pymks.PrimitiveTransformer(n_state=2, min_=0.0, max_=1.0)


def run_family_seed(name, seed, args, log):
    """Every method and latent size on one family and effective seed; returns the run records."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from pymks_vae import TwoPointCorrelation, VAETransformer

    x, y, d, _ = family_data(name, args.n_train + args.n_test, args.size, seed)
    i_train, i_test = train_test_split(np.arange(len(x)), train_size=args.n_train, test_size=args.n_test,
                                       stratify=y, random_state=seed)
    x_train, x_test = x[i_train], x[i_test]
    y_train, y_test, d_train, d_test = y[i_train], y[i_test], d[i_train], d[i_test]
    tag = f"[{name} seed {seed}]"
    base = {"family": name, "seed": seed}
    runs = []

    majority = np.bincount(y_train).argmax()
    runs.append(dict(base, method="chance", k=None, accuracy=float(np.mean(y_test == majority)),
                     r2=float(r2_score(d_test, np.full(len(d_test), d_train.mean()))), fit_seconds=0.0))
    log(f"{tag} chance: accuracy {runs[-1]['accuracy']:.3f}, R2 {runs[-1]['r2']:.3f}")

    t0 = time.perf_counter()
    stats = Pipeline([("onehot", onehot()), ("stats", TwoPointCorrelation(correlations=[(1, 1)])),
                      ("flatten", FunctionTransformer(flatten))])
    f_train = np.asarray(stats.fit_transform(x_train))
    f_test = np.asarray(stats.transform(x_test))
    t_stats = time.perf_counter() - t0
    for k in args.latent_dims:
        t0 = time.perf_counter()
        pca = PCA(n_components=k, random_state=seed).fit(f_train)
        fit_s = time.perf_counter() - t0 + t_stats
        acc, r2 = heads(pca.transform(f_train), pca.transform(f_test), y_train, y_test, d_train, d_test)
        runs.append(dict(base, method="pca", k=k, accuracy=acc, r2=r2, fit_seconds=fit_s))
        log(f"{tag} PCA k={k}: stats + fit {fit_s:.2f} s, accuracy {acc:.3f}, R2 {r2:.3f}")

    vaes = [("vae", {})] + ([("vanilla", {"loss": "data"})] if args.vanilla else [])
    for method, loss_kw in vaes:
        for k in args.latent_dims:
            pipe = Pipeline([("onehot", onehot()),
                             ("vae", VAETransformer(latent_dim=k, random_state=seed, **loss_kw, **args.vae_params))])
            t0 = time.perf_counter()
            pipe.fit(x_train)
            fit_s = time.perf_counter() - t0
            z_train, z_test = np.asarray(pipe.transform(x_train)), np.asarray(pipe.transform(x_test))
            acc, r2 = heads(z_train, z_test, y_train, y_test, d_train, d_test)
            runs.append(dict(base, method=method, k=k, accuracy=acc, r2=r2, fit_seconds=fit_s))
            log(f"{tag} {METHODS[method]} k={k}: fit {fit_s:.1f} s, accuracy {acc:.3f}, R2 {r2:.3f}")
    return runs


def warm_up(args):
    """One untimed tiny pass of both embeddings, so that the first timed fit pays no import or start-up cost."""
    from sklearn.pipeline import Pipeline

    from pymks_vae import TwoPointCorrelation, VAETransformer
    from pymks_vae.microstructures import generate_two_phase

    x = generate_two_phase(4, (16, 16), seed=0)
    Pipeline([("onehot", onehot()), ("stats", TwoPointCorrelation(correlations=[(1, 1)]))]).fit_transform(x)
    Pipeline([("onehot", onehot()), ("vae", VAETransformer(latent_dim=2, epochs=1, batch_size=2, random_state=0))]
             ).fit(x).transform(x)


def aggregate(runs, families, latent_dims, methods):
    """Per (family, k, method): mean, min and max over seeds of accuracy, R^2 and fit seconds."""
    cells = []
    for fam in families:
        chance = [r for r in runs if r["family"] == fam and r["method"] == "chance"]
        for k in latent_dims:
            for method in methods:
                rs = chance if method == "chance" else [r for r in runs if r["family"] == fam and r["method"] == method
                                                        and r["k"] == k]
                if not rs:
                    continue
                cell = {"family": fam, "k": k, "method": method, "n_seeds": len(rs)}
                for key in ("accuracy", "r2", "fit_seconds"):
                    v = np.array([r[key] for r in rs])
                    cell[key] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
                cells.append(cell)
    return cells


def _fmt(stat, digits=3):
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def markdown(cells, families, latent_dims, methods):
    get = {(c["family"], c["k"], c["method"]): c for c in cells}
    learned = [m for m in methods if m != "chance"]
    cols = (["family", "descriptor", "k"] + [f"accuracy {METHODS[m]}" for m in learned] + ["accuracy chance"]
            + [f"R2 {METHODS[m]}" for m in learned] + ["VAE fit s", "VAE >= PCA (acc / R2)"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    wins = {"accuracy": 0, "r2": 0}
    n = 0
    for fam in families:
        for k in latent_dims:
            row = [fam, DESCRIPTORS[fam], str(k)]
            row += [_fmt(get[fam, k, m]["accuracy"]) for m in learned]
            row += [f"{get[fam, k, 'chance']['accuracy']['mean']:.3f}"]
            row += [_fmt(get[fam, k, m]["r2"]) for m in learned]
            row += [f"{get[fam, k, 'vae']['fit_seconds']['mean']:.1f}"]
            verdict = []
            for key in ("accuracy", "r2"):
                ok = get[fam, k, "vae"][key]["mean"] >= get[fam, k, "pca"][key]["mean"]
                wins[key] += ok
                verdict.append("yes" if ok else "no")
            n += 1
            row.append(" / ".join(verdict))
            lines.append("| " + " | ".join(row) + " |")
    summary = (f"{METHODS['vae']} mean >= PCA mean in {wins['accuracy']}/{n} accuracy cells and {wins['r2']}/{n} "
               f"R2 cells. Cells: mean [min, max] over seeds; chance R2 is about 0 (the training mean).")
    return "\n".join(lines), summary


def plot(cells, families, latent_dims, methods, path):
    import matplotlib.pyplot as plt

    get = {(c["family"], c["k"], c["method"]): c for c in cells}
    fig, axes = plt.subplots(2, len(families), figsize=(3.4 * len(families), 5.6), squeeze=False)
    styles = {"vae": ("C0", "o"), "pca": ("C1", "s"), "vanilla": ("C2", "^")}
    for col, fam in enumerate(families):
        for row, (key, label) in enumerate((("accuracy", "test accuracy"), ("r2", "test R$^2$ (clipped at -0.25)"))):
            ax = axes[row, col]
            for j, method in enumerate(m for m in methods if m != "chance"):
                stats = [get[fam, k, method][key] for k in latent_dims]
                mean = np.array([s["mean"] for s in stats])
                err = np.array([[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]])
                xs = np.arange(len(latent_dims)) + (j - 1) * 0.06
                color, marker = styles[method]
                ax.errorbar(xs, mean, yerr=err, color=color, marker=marker, capsize=3, label=METHODS[method])
            base = get[fam, latent_dims[0], "chance"][key]["mean"] if key == "accuracy" else 0.0
            ax.axhline(base, color="0.5", ls="--", lw=0.9, label="chance")
            ax.set_xticks(np.arange(len(latent_dims)), [str(k) for k in latent_dims])
            # R^2 can fall far below 0 (a head extrapolating on useless features): clipped at -0.25
            ax.set_ylim(min(-0.05, max(-0.25, ax.get_ylim()[0])) if key == "r2" else 0.0, 1.02)
            if row == 0:
                ax.set_title(f"{fam} ({DESCRIPTORS[fam]})", fontsize=9)
            else:
                ax.set_xlabel("latent size k")
            if col == 0:
                ax.set_ylabel(label)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("VAETransformer(latent_dim=k) vs TwoPointCorrelation -> PCA(k): mean, min-max over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(args):
    """Merge finished runs on disjoint families into one table, figure and results.json."""
    payloads = []
    for d in args.combine:
        with open(os.path.join(d, "results.json")) as fh:
            payloads.append(json.load(fh))
    keys = ("size", "n_train", "n_test", "latent_dims", "effective_seeds", "vae_params", "vanilla", "threads")
    first = payloads[0]["settings"]
    for d, pl in zip(args.combine, payloads):
        diff = [k for k in keys if pl["settings"].get(k) != first.get(k)]
        if diff:
            raise SystemExit(f"--combine: {d} differs from {args.combine[0]} in {diff}")
    families = [f for pl in payloads for f in pl["settings"]["families"]]
    if len(set(families)) != len(families):
        raise SystemExit(f"--combine: a family appears in more than one run: {families}")
    runs = [r for pl in payloads for r in pl["runs"]]
    methods = ["vae", "pca"] + (["vanilla"] if first.get("vanilla") else []) + ["chance"]
    if first.get("vae_params"):
        METHODS["vae"] = "VAE (defaults + --vae-params)"
    cells = aggregate(runs, families, first["latent_dims"], methods)
    table, summary = markdown(cells, families, first["latent_dims"], methods)
    machines = sorted({pl["machine"] for pl in payloads})
    header = (f"{first['size']}x{first['size']}, train {first['n_train']} / test {first['n_test']} per family and "
              f"seed, seeds {first['effective_seeds']}, VAETransformer extra params "
              f"{first.get('vae_params') or 'none (defaults)'}; {'; '.join(machines)}; merged from "
              f"{len(payloads)} runs")
    text = f"{header}\n\n{table}\n\n{summary}\n"
    print(text, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    plot(cells, families, first["latent_dims"], methods, os.path.join(args.out, "latent_bench.png"))
    payload = dict(payloads[0], runs=runs, cells=cells, summary=summary, combined_from=list(args.combine),
                   settings=dict(first, families=families),
                   seconds_total=sum(pl["seconds_total"] for pl in payloads))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else repr(o))
    return payload


def main(argv=None):
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    # pymks (0.4.1) and dask warn about their own deprecations on today's stack; noise here
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*may_share_memory.*", category=FutureWarning)
    import dask
    import torch

    from timing import machine

    torch.set_num_threads(args.threads)
    if args.threads == 1:
        dask.config.set(scheduler="synchronous")
    os.makedirs(args.out, exist_ok=True)
    if args.vae_params:  # the table must not call a tuned or shortened VAE "defaults"
        METHODS["vae"] = "VAE (defaults + --vae-params)"
    seeds = [s + args.tune_seed_offset for s in args.seeds]
    methods = ["vae", "pca"] + (["vanilla"] if args.vanilla else []) + ["chance"]

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    log(f"{machine()}")
    log(f"families {args.families}, {args.size}x{args.size}, train {args.n_train} + test {args.n_test}, "
        f"k {args.latent_dims}, effective seeds {seeds}, vae params {args.vae_params or 'defaults'}"
        + (f"  [TUNING RUN: seed offset {args.tune_seed_offset}]" if args.tune_seed_offset else ""))
    warm_up(args)
    runs = []
    for name in args.families:
        for seed in seeds:
            runs += run_family_seed(name, seed, args, log)
    cells = aggregate(runs, args.families, args.latent_dims, methods)
    table, summary = markdown(cells, args.families, args.latent_dims, methods)
    header = (f"{args.size}x{args.size}, train {args.n_train} / test {args.n_test} per family and seed, "
              f"seeds {seeds}, VAETransformer extra params {args.vae_params or 'none (defaults)'}; {machine()}")
    text = f"{header}\n\n{table}\n\n{summary}\n"
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    plot(cells, args.families, args.latent_dims, methods, os.path.join(args.out, "latent_bench.png"))

    from pymks_vae import VAETransformer
    from pymks_vae import microstructures as ms

    payload = {
        "settings": dict(vars(args), effective_seeds=seeds, argv=sys.argv[1:] if argv is None else list(argv)),
        "machine": machine(),
        "vae_defaults": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                         for k, v in VAETransformer().get_params().items()},
        "family_classes": {"classes": ms.DEFAULT_CLASSES, "grf": ms.GRF_CLASSES,
                           "inclusions": ms.INCLUSION_CLASSES, "lamellae": ms.LAMELLA_CLASSES},
        "descriptors": DESCRIPTORS,
        "runs": runs,
        "cells": cells,
        "summary": summary,
        "seconds_total": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(payload, fh, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else repr(o))
    log(f"wrote {args.out} ({payload['seconds_total']:.0f} s)")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
