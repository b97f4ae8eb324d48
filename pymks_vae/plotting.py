"""Figures for the lines replication: reconstructions, error distributions, confusion matrices,
loss curves and the overfitting check.

Every function draws on a bare :class:`matplotlib.figure.Figure`, rendered by the Agg backend
when saved - pyplot's global state and interactive backends are never touched, so no window opens, saves a PNG to
``path`` (creating its folder) and returns the path.

Example:
    >>> import numpy as np, tempfile, os
    >>> from pymks_vae.plotting import error_histograms
    >>> path = os.path.join(tempfile.mkdtemp(), "errors.png")
    >>> error_histograms({"a": np.random.rand(50)}, path) == path
    True
"""
import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pymks_vae import evaluation

__all__ = [
    "reconstruction_grid",
    "error_histograms",
    "confusion_matrix_plot",
    "loss_curves",
    "distribution_comparison",
    "latent_scatter",
]


def _save(fig, path):
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    return path


def _values(x, name):
    v = evaluation._to_numpy(x).astype(np.float64, copy=False).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError(f"{name} holds no finite value to plot")
    return v


def reconstruction_grid(originals, reconstructions, path, stats_originals=None, stats_reconstructions=None,
                        n=8, level=0.05, eps=0.25):
    """Rows of: original | reconstruction | thresholded reconstruction | f(original) | f(reconstruction).

    ``f`` is the periodic two-point autocorrelation of the line phase
    (:func:`pymks_vae.evaluation.spatial_stats`); the two ``f`` panels of a row share one colour
    scale so they can be compared by eye.

    Args:
        originals, reconstructions: ``(N, H, W)`` or ``(N, 1, H, W)`` grey images (lines dark).
        path: PNG file to write.
        stats_originals, stats_reconstructions: precomputed ``(N, H, W)`` statistics, or None
            to compute them for the rows shown.
        n: number of rows (the first ``n`` images).
        level: threshold of the third column (0.05, the paper's).
        eps: soft-indicator width when statistics are computed here.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> x = (np.random.default_rng(0).random((4, 16, 16)) > 0.3).astype(np.float32)
        >>> p = reconstruction_grid(x, 0.8 * x + 0.1, os.path.join(tempfile.mkdtemp(), "rec.png"), n=2)
        >>> os.path.getsize(p) > 0
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    orig = evaluation._images(originals, "originals")
    recon = evaluation._images(reconstructions, "reconstructions")
    evaluation._same_shape(orig, recon, "originals", "reconstructions")
    rows = min(n, len(orig))
    orig, recon = orig[:rows].astype(np.float64), recon[:rows].astype(np.float64)
    if stats_originals is None:
        f_orig = evaluation.spatial_stats(orig, eps=eps)
    else:
        f_orig = evaluation._images(stats_originals, "stats_originals")[:rows]
    if stats_reconstructions is None:
        f_recon = evaluation.spatial_stats(recon, eps=eps)
    else:
        f_recon = evaluation._images(stats_reconstructions, "stats_reconstructions")[:rows]
    for name, f in (("stats_originals", f_orig), ("stats_reconstructions", f_recon)):
        if f.shape[0] != rows:
            raise ValueError(f"{name} has {f.shape[0]} images; need at least {rows}")
    binary = evaluation.threshold(recon, level)

    titles = ["original", "reconstruction", f"thresholded (< {level:g})", "f(original)", "f(reconstruction)"]
    fig = Figure(figsize=(5 * 2.1, rows * 2.1))
    axes = fig.subplots(rows, 5, squeeze=False)
    for r in range(rows):
        vmax = max(float(f_orig[r].max()), float(f_recon[r].max()))
        vmin = min(float(f_orig[r].min()), float(f_recon[r].min()))
        panels = [
            (orig[r], "gray", 0.0, 1.0),
            (recon[r], "gray", 0.0, 1.0),
            (binary[r], "gray", 0.0, 1.0),
            (f_orig[r], "viridis", vmin, vmax),
            (f_recon[r], "viridis", vmin, vmax),
        ]
        for c, (img, cmap, lo, hi) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def error_histograms(errors_by_model, path, title="Per-image error", xlabel="MSE", bins=50):
    """Overlaid histograms of per-image errors, one per model, with each median marked.

    The x axis is logarithmic (log-spaced bins) when all values are positive and span more than
    two decades.

    Args:
        errors_by_model: dict model name -> 1D array of errors.
        path: PNG file to write.
        title, xlabel: labels.
        bins: number of bins.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> rng = np.random.default_rng(0)
        >>> p = error_histograms({"ours": rng.random(100) * 0.1, "vanilla": rng.random(100) * 0.3},
        ...                      os.path.join(tempfile.mkdtemp(), "errors.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    if not isinstance(errors_by_model, dict) or not errors_by_model:
        raise ValueError("errors_by_model must be a non-empty dict: model name -> 1D array of errors")
    data = {str(k): _values(v, f"errors_by_model[{k!r}]") for k, v in errors_by_model.items()}
    everything = np.concatenate(list(data.values()))
    lo, hi = float(everything.min()), float(everything.max())
    log_x = lo > 0 and hi / lo > 100.0
    if log_x:
        edges = np.geomspace(lo, hi, bins + 1)
    elif hi > lo:
        edges = np.linspace(lo, hi, bins + 1)
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, bins + 1)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, v) in enumerate(data.items()):
        colour = colours[k % len(colours)]
        median = float(np.median(v))
        ax.hist(v, bins=edges, alpha=0.45, color=colour, label=f"{name} (median {median:.3g})")
        ax.axvline(median, color=colour, linestyle="--", linewidth=1.5)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix_plot(matrix, labels, path, title="Confusion matrix", xlabel="predicted", ylabel="true"):
    """A confusion matrix as an annotated heat map (rows: true, columns: predicted).

    Args:
        matrix: square 2D array of counts, as from :func:`pymks_vae.evaluation.confusion_matrix`.
        labels: tick labels, one per row.
        path: PNG file to write.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> p = confusion_matrix_plot(np.array([[5, 1], [2, 4]]), ["1 line", "2 lines"],
        ...                           os.path.join(tempfile.mkdtemp(), "confusion.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    m = evaluation._to_numpy(matrix)
    labels = [str(x) for x in labels]
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be a square 2D array; got shape {m.shape}")
    if m.shape[0] != len(labels) or m.shape[0] == 0:
        raise ValueError(f"labels must have one entry per row of matrix ({m.shape[0]}); got {len(labels)}")
    fig = Figure(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 1.8))
    ax = fig.subplots()
    top = float(m.max())
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=max(top, 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center",
                    color="white" if top and m[i, j] > 0.5 * top else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    total = float(m.sum())
    summary = f"accuracy {float(np.trace(m)) / total:.1%} of {total:g}" if total else "no items"
    ax.set_title(f"{title}\n{summary}")
    fig.tight_layout()
    return _save(fig, path)


def loss_curves(histories, path, log_y=None):
    """Training (and validation) loss per epoch, one panel per model.

    Args:
        histories: dict model name -> dict with a list ``"train_loss"`` (per epoch) and
            optionally ``"val_loss"``.
        path: PNG file to write.
        log_y: log scale on y; default: when the positive losses span more than two decades.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> history = {"train_loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.4]}
        >>> p = loss_curves({"VAE": history}, os.path.join(tempfile.mkdtemp(), "loss.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict: model name -> {'train_loss': [...], ...}")
    for name, h in histories.items():
        if not isinstance(h, dict) or "train_loss" not in h or len(h["train_loss"]) == 0:
            raise ValueError(f"histories[{name!r}] must be a dict with a non-empty list 'train_loss'")
    fig = Figure(figsize=(5 * len(histories), 3.8))
    axes = fig.subplots(1, len(histories), squeeze=False)
    for ax, (name, h) in zip(axes[0], histories.items()):
        curves = {"train": np.asarray(h["train_loss"], dtype=np.float64)}
        if h.get("val_loss") is not None and len(h["val_loss"]):
            curves["validation"] = np.asarray(h["val_loss"], dtype=np.float64)
        for label, y in curves.items():
            ax.plot(np.arange(1, len(y) + 1), y, marker="o" if len(y) < 30 else None, markersize=3, label=label)
        positive = np.concatenate([y[np.isfinite(y) & (y > 0)] for y in curves.values()])
        use_log = log_y
        if use_log is None:
            use_log = positive.size > 0 and positive.size == sum(np.isfinite(y).sum() for y in curves.values()) \
                and positive.max() / positive.min() > 100.0
        if use_log:
            ax.set_yscale("log")
        ax.set_title(str(name))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def distribution_comparison(train_values, val_values, path, title="Average MSE to own set",
                            xlabel="average MSE", bins=40):
    """Histograms of a per-item quantity on the training and the validation sets (overfitting check).

    Similar distributions mean the model reconstructs unseen images as well as seen ones.

    Args:
        train_values, val_values: 1D arrays.
        path: PNG file to write.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> rng = np.random.default_rng(0)
        >>> p = distribution_comparison(rng.random(200), rng.random(50),
        ...                             os.path.join(tempfile.mkdtemp(), "overfit.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    train = _values(train_values, "train_values")
    val = _values(val_values, "val_values")
    both = np.concatenate([train, val])
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, bins + 1)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for v, label, colour in ((train, "train", "C0"), (val, "validation", "C1")):
        ax.hist(v, bins=edges, alpha=0.5, density=True, color=colour,
                label=f"{label}: n={v.size}, mean {v.mean():.3g}, median {np.median(v):.3g}")
        ax.axvline(np.median(v), color=colour, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def latent_scatter(latents, labels, names, path):
    """The first two latent coordinates of each method side by side, coloured by class.

    Args:
        latents: dict ``title -> (n, k)`` array (one panel each; k = 1 is drawn on a line).
        labels: ``(n,)`` int class of each sample (indices into ``names``).
        names: class names.
        path: PNG file written (folders are created).

    Returns:
        ``path``.

    Example:
        >>> import tempfile, os
        >>> z = np.random.default_rng(0).normal(size=(6, 2))
        >>> p = latent_scatter({"VAE": z}, np.array([0, 0, 0, 1, 1, 1]), ["a", "b"],
        ...                    os.path.join(tempfile.mkdtemp(), "z.png"))
        >>> os.path.getsize(p) > 0
        True
    """
    labels = np.asarray(labels)
    fig = Figure(figsize=(4.2 * len(latents), 3.8))
    axes = fig.subplots(1, len(latents), squeeze=False)
    for ax, (title, z) in zip(axes[0], latents.items()):
        z = np.asarray(z)
        for c, name in enumerate(names):
            pts = z[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1] if z.shape[1] > 1 else np.zeros(len(pts)), s=12, label=name, alpha=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("latent 0"), ax.set_ylabel("latent 1")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
