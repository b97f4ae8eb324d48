"""Replicate the paper's lines experiment: a spatial-statistics VAE against a vanilla VAE.

With no arguments (``make train``) it runs a CPU-sized configuration in a few minutes: 64x64
lines images, latent size 32; the spatial-statistics model is a :class:`~pymks_vae.models.stats_vae.StatsVAE`
(it encodes and decodes the images' autocovariance, and its reconstructions are drawn from the
decoded statistics by :func:`~pymks_vae.reconstruction.draw_strokes`), the vanilla VAE the small
CNN encoder/decoder (docs/replication.md says why). ``--config paper`` selects the
paper's setup (224x224, 100,000 images, frozen ImageNet ResNet-152 given by ``--weights PATH``,
latent 9, 1500 epochs (400 for the vanilla VAE), batch 32, lr 1e-3, beta 1) for a GPU.

Both models are trained on the same 70% of the images and evaluated on held-out images. Outputs
in ``--out`` (default ``results/lines/``): ``metrics.json``, ``report.md`` (our numbers beside
the paper's), PNG figures and one checkpoint per model under ``checkpoints/`` (``--resume``
continues an interrupted run).

Usage:
    python examples/train_lines.py                      # CPU default, ~4-5 minutes on 2 cores
    python examples/train_lines.py --epochs 40 --n-images 6000 --out results/lines_long
    python examples/train_lines.py --config paper --weights /data/resnet152-f82ba261.pth --device cuda
    torchrun --nproc_per_node=4 examples/train_lines.py --config paper --weights /data/resnet152-f82ba261.pth

Under ``torchrun`` each model is trained by all processes with DistributedDataParallel (gloo on
CPUs, NCCL on GPUs); ``--batch-size`` stays the global batch (docs/scaling.md). Rank 0 alone
evaluates and writes the outputs, which are those of a single-process run, and ``metrics.json``
records ``world_size`` and ``global_batch_size``.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import time

import numpy as np
import torch

from pymks_vae import distributed, evaluation, plotting
from pymks_vae.datasets import LinesDataset, generate_lines, train_val_split
from pymks_vae.losses import DataSpaceLoss, DecodedStatsLoss, SpatialStatsLoss
from pymks_vae.models import VAE
from pymks_vae.models.stats_vae import StatsVAE
from pymks_vae.reconstruction import draw_strokes
from pymks_vae.training import TrainConfig, reconstruct, train_vae

MODELS = ("spatial_stats", "vanilla")
IN_MEMORY_BYTES = 2 * 1024**3  # larger image sets are read from a bit-packed disk cache instead
STATS_MEMORY_BYTES = 4 * 1024**3  # the most training statistics a StatsVAE holds in memory

# The paper's validation errors (per-image MSE, median / mean), from its table.
PAPER_TABLE = {
    "vanilla": {"data_mse_median": 2.44e-2, "data_mse_mean": 2.98e-2,
                "stats_mse_median": 2.74e-5, "stats_mse_mean": 5.87e-5},
    "spatial_stats": {"data_mse_median": 1.08e-1, "data_mse_mean": 1.08e-1,
                      "stats_mse_median": 1.74e-5, "stats_mse_mean": 2.91e-5},
}
PAPER_LINES = {"orientation_accuracy": 0.98, "line_count_accuracy": 0.63, "vf_diff_mean_percent": 17.0,
               "n_evaluated": 100}


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run (stored in metrics.json)."""

    name: str = "cpu"
    image_size: int = 64
    n_images: int = 3000
    encoder: str = "cnn"
    decoder: str = "statistics"
    stroke_layout: str = "free"
    binary_strokes: bool = True
    vanilla_decoder: str = "cnn"
    n_basis: int = 128  # principal axes of the statistics a StatsVAE reads and writes (decoder "statistics")
    draw_restarts: int = 4  # random starts of the drawing search per reconstruction (decoder "statistics")
    draw_steps: int = 400  # Adam steps of each drawing search (decoder "statistics")
    weights: str = None
    latent_dim: int = 32  # the paper: 9 (--config paper); 32 holds the line count (docs/replication.md)
    epochs: int = 60
    vanilla_epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    beta: float = None  # None: the loss's default (losses.DEFAULT_BETA for the variance convention)
    vanilla_beta: float = 1.0
    alpha: float = 1.0
    eps: float = 0.25
    normalise: str = "variance"
    indicator: str = "straight_through"
    cutoff: str = "auto"
    seed: int = 127
    data_seed: int = 0
    val_fraction: float = 0.3
    eval_images: int = 300
    overfit_images: int = 500
    nn_pool: int = 2100
    val_loss_images: int = 256
    level: float = 0.05
    count_level: float = 0.5
    device: str = "auto"
    num_workers: int = 0


CONFIGS = {
    "cpu": RunConfig(),
    "paper": RunConfig(name="paper", image_size=224, n_images=100_000, encoder="resnet152", decoder="paper",
                       vanilla_decoder="paper", latent_dim=9,
                       lr=1e-3, epochs=1500, vanilla_epochs=400, eval_images=100, overfit_images=1000,
                       nn_pool=10_000, val_loss_images=2048, num_workers=4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="preset (default: cpu)")
    p.add_argument("--epochs", type=int, help="epochs of BOTH models (default: the preset's)")
    p.add_argument("--n-images", type=int, help="images generated (70%% train / 30%% validation)")
    p.add_argument("--image-size", type=int, help="image side in px")
    p.add_argument("--latent-dim", type=int, help="latent size")
    p.add_argument("--batch-size", type=int, help="batch size")
    p.add_argument("--eval-images", type=int, help="held-out images evaluated (the paper: 100)")
    p.add_argument("--weights", help="ResNet-152 ImageNet weights file (--config paper)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--seed", type=int, help="training seed (default 127, the paper's)")
    p.add_argument("--data-seed", type=int, help="seed of the images (default 0; tune on other seeds than the reported runs')")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--out", default=os.path.join("results", "lines"), help="output folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default, one per core)")
    p.add_argument("--beta", type=float, help="KL weight of the spatial-statistics VAE (default: the loss's, 1e-4)")
    p.add_argument("--vanilla-beta", type=float, help="KL weight of the vanilla VAE (default 1, the paper's)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's)")
    p.add_argument("--decoder", choices=("statistics", "strokes", "cnn", "paper", "auto"),
                   help="decoder of the spatial-statistics VAE (default statistics: a StatsVAE decoding statistics, "
                        "reconstructions drawn from them by a search; paper: the paper's image decoder)")
    p.add_argument("--stroke-layout", choices=("slots", "free"),
                   help="layout of the strokes decoder's bars (default free: anywhere; slots: one per evenly spaced row/column)")
    p.add_argument("--binary-strokes", action=argparse.BooleanOptionalAction, default=None,
                   help="the strokes decoder draws black and white pixels in its reconstructions (default on; "
                        "--no-binary-strokes: grey)")
    p.add_argument("--n-basis", type=int, help="principal axes of the statistics a statistics decoder reads and writes "
                                                "(default 128)")
    p.add_argument("--draw-restarts", type=int, help="random starts of each drawing searched from decoded statistics (default 4)")
    p.add_argument("--draw-steps", type=int, help="Adam steps of each drawing search (default 400)")
    p.add_argument("--vanilla-decoder", choices=("strokes", "cnn", "paper", "auto"),
                   help="decoder of the vanilla VAE (default cnn; paper: the paper's)")
    p.add_argument("--indicator", choices=("straight_through", "gaussian", "hat"),
                   help="phase indicator of the reconstruction in the statistics (default straight_through)")
    p.add_argument("--normalise", choices=("variance", "minmax"),
                   help="statistics convention: variance (default) or minmax (the paper's SSE, beta 1)")
    p.add_argument("--cutoff", help="lag window of the loss: auto (default), none or an int")
    p.add_argument("--eps", type=float, help="width of the Gaussian indicator (default 0.25, the paper's)")
    p.add_argument("--vanilla-epochs", type=int, help="epochs of the vanilla VAE (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(CONFIGS[args.config])
    for flag, field in (("epochs", "epochs"), ("n_images", "n_images"), ("image_size", "image_size"),
                        ("latent_dim", "latent_dim"), ("batch_size", "batch_size"), ("eval_images", "eval_images"),
                        ("weights", "weights"), ("device", "device"), ("seed", "seed"), ("data_seed", "data_seed"), ("beta", "beta"),
                        ("vanilla_beta", "vanilla_beta"), ("lr", "lr"), ("decoder", "decoder"),
                        ("vanilla_decoder", "vanilla_decoder"), ("stroke_layout", "stroke_layout"),
                        ("binary_strokes", "binary_strokes"), ("n_basis", "n_basis"),
                        ("draw_restarts", "draw_restarts"), ("draw_steps", "draw_steps"),
                        ("indicator", "indicator"), ("normalise", "normalise"), ("cutoff", "cutoff"),
                        ("eps", "eps")):
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, field, value)
    if args.epochs is not None:
        cfg.vanilla_epochs = args.epochs
    if args.vanilla_epochs is not None:
        cfg.vanilla_epochs = args.vanilla_epochs
    if isinstance(cfg.cutoff, str) and cfg.cutoff not in ("auto", "none"):
        try:
            cfg.cutoff = int(cfg.cutoff)
        except ValueError:
            p.error(f"--cutoff must be auto, none or an int >= 0, got {cfg.cutoff!r}")
        if cfg.cutoff < 0:
            p.error(f"--cutoff must be auto, none or an int >= 0, got {cfg.cutoff}")
    for name in ("lr", "eps"):
        if not getattr(cfg, name) > 0:
            p.error(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("beta", "vanilla_beta"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) >= 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("epochs", "n_images", "image_size", "latent_dim", "batch_size", "eval_images", "n_basis",
                 "draw_restarts", "draw_steps"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if cfg.n_images < 10:
        p.error(f"--n-images must be >= 10, got {cfg.n_images}")
    if cfg.encoder == "resnet152" and cfg.weights is None:
        p.error("--config paper needs --weights PATH (torchvision's resnet152 ImageNet weights file)")
    return cfg, args


# ----------------------------------------------------------------------------- data
class _Subset(torch.utils.data.Dataset):
    """Images only, from a LinesDataset restricted to some indices (for large configurations)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[int(self.indices[i])][0]


def _images(ds_or_none, indices, cfg):
    if ds_or_none is not None:
        return ds_or_none.images(indices)
    return generate_lines(indices, size=cfg.image_size, seed=cfg.data_seed)[0]


def build_data(cfg, out):
    """Train/validation data: in-memory tensors when they fit in 2 GB, else a cached LinesDataset."""
    train_idx, val_idx = train_val_split(cfg.n_images, cfg.val_fraction, seed=cfg.seed)
    in_memory = cfg.n_images * cfg.image_size ** 2 * 4 <= IN_MEMORY_BYTES
    ds = None
    if in_memory:
        images, orientation, n_lines = generate_lines(range(cfg.n_images), size=cfg.image_size, seed=cfg.data_seed)
        all_images = torch.from_numpy(images)[:, None]
        train_data, val_data = all_images[train_idx], all_images[val_idx]
    else:
        ds = LinesDataset(cfg.n_images, size=cfg.image_size, seed=cfg.data_seed,
                          cache_dir=os.path.join(out, "cache"))
        orientation, n_lines = ds.labels(progress=distributed.is_main_process())
        train_data, val_data = _Subset(ds, train_idx), _Subset(ds, val_idx)
    return {"train_idx": train_idx, "val_idx": val_idx, "train": train_data, "val": val_data,
            "orientation": orientation, "n_lines": n_lines, "dataset": ds}


def _take(data, cfg, indices_within):
    """Images ``(n, 1, H, W)`` float32 tensor of ``data`` at positions ``indices_within``."""
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(indices_within)]
    return torch.from_numpy(_images(data.ds, data.indices[indices_within], cfg))[:, None]


# ----------------------------------------------------------------------------- models
def make_stats_loss(cfg, sample):
    """The spatial-statistics loss of ``cfg``, calibrated (window and scale) on training images ``sample``."""
    cutoff = None if cfg.cutoff == "none" else cfg.cutoff
    if cfg.normalise == "minmax":  # the paper's convention: SSE of min/max-scaled statistics, beta 1
        loss = SpatialStatsLoss(states=(0.0,), eps=cfg.eps, normalise="minmax", indicator=cfg.indicator,
                                alpha=cfg.alpha, beta=1.0 if cfg.beta is None else cfg.beta, cutoff=cutoff,
                                reduction="sum")
    else:
        loss = SpatialStatsLoss(states=(0.0,), eps=cfg.eps, indicator=cfg.indicator, alpha=cfg.alpha,
                                beta=cfg.beta, cutoff=cutoff)
    return loss.calibrate(sample)


def statistics_of(stats_loss, images, batch_size=256):
    """The loss's statistics ``(n, 1, *window)`` of images ``(n, 1, H, W)`` (the StatsVAE's data)."""
    return torch.cat([stats_loss.target_statistics(images[s : s + batch_size])
                      for s in range(0, images.shape[0], batch_size)])


def make_model_and_loss(name, cfg, stats_loss, train_stats=None):
    decoder = cfg.decoder if name == "spatial_stats" else cfg.vanilla_decoder
    if decoder == "statistics":
        model = StatsVAE(stats_shape=train_stats.shape[1:], latent_dim=cfg.latent_dim, n_basis=cfg.n_basis)
        return model.fit_basis(train_stats), DecodedStatsLoss.from_loss(stats_loss)
    model = VAE(encoder=cfg.encoder, latent_dim=cfg.latent_dim, image_size=cfg.image_size, channels=1,
                weights=cfg.weights, decoder=decoder,
                stroke_layout=cfg.stroke_layout if decoder == "strokes" else "free",
                stroke_binary=cfg.binary_strokes if decoder == "strokes" else False)
    loss = stats_loss if name == "spatial_stats" else DataSpaceLoss(beta=cfg.vanilla_beta)
    return model, loss


def train_models(cfg, data, out, resume, progress):
    sample = _take(data["train"], cfg, np.arange(min(1000, len(data["train_idx"]))))
    stats_loss = make_stats_loss(cfg, sample)
    n_val_loss = min(cfg.val_loss_images, len(data["val_idx"]))
    val_subset = _take(data["val"], cfg, np.arange(n_val_loss))
    models, histories = {}, {}
    for name in MODELS:
        torch.manual_seed(cfg.seed)  # same seed for both models (same encoder weights)
        train_data, val_data, train_stats = data["train"], val_subset, None
        if (cfg.decoder if name == "spatial_stats" else cfg.vanilla_decoder) == "statistics":
            # the model's data are the images' statistics, computed once and held in memory
            n_train = len(data["train_idx"])
            n_stats = math.prod(stats_loss.target_statistics(sample[:1]).shape)
            if n_train * n_stats * 4 > STATS_MEMORY_BYTES:
                raise SystemExit(f"--decoder statistics holds the training images' statistics in memory: "
                                 f"{n_train} x {n_stats} floats exceed {STATS_MEMORY_BYTES / 2**30:.0f} GiB "
                                 f"(use fewer or smaller images, or another --decoder)")
            train_data = train_stats = torch.cat([
                statistics_of(stats_loss, _take(data["train"], cfg, np.arange(s, min(s + 1024, n_train))))
                for s in range(0, n_train, 1024)])
            val_data = statistics_of(stats_loss, val_subset)
        model, loss = make_model_and_loss(name, cfg, stats_loss, train_stats)
        tc = TrainConfig(epochs=cfg.epochs if name == "spatial_stats" else cfg.vanilla_epochs,
                         batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                         num_workers=cfg.num_workers, progress=progress,
                         checkpoint_path=os.path.join(out, "checkpoints", f"{name}.pt"))
        if distributed.is_main_process():
            print(f"[train_lines] training {name}: {loss!r}, {tc.epochs} epochs on {len(data['train_idx'])} images")
        histories[name] = train_vae(model, loss, train_data, tc, val_data=val_data, resume=resume)
        models[name] = model
    return models, histories, stats_loss


def reconstruct_images(model, images, cfg, stats_loss, device, progress=False):
    """Reconstructions ``(n, 1, H, W)`` of ``images``: the decoder's output, or for a StatsVAE the
    drawings searched from its decoded statistics (``pymks_vae.reconstruction.draw_strokes``)."""
    if not isinstance(model, StatsVAE):
        return reconstruct(model, images, batch_size=64, device=device)
    decoded = decode_statistics(model, statistics_of(stats_loss, images), device)
    drawn, _ = draw_strokes(decoded, stats_loss, image_size=cfg.image_size, restarts=cfg.draw_restarts,
                            steps=cfg.draw_steps, seed=cfg.seed, progress=progress)
    return drawn


@torch.no_grad()
def decode_statistics(model, stats, device):
    """A StatsVAE's decoded statistics (posterior mean) of ``stats``, on the CPU."""
    model.eval()
    return torch.cat([model(stats[s : s + 256].to(device))[0].cpu() for s in range(0, stats.shape[0], 256)])


# ----------------------------------------------------------------------------- evaluation
def _summary(values):
    s = evaluation.summarise(values)
    return {k: float(v) for k, v in s.items()}


def evaluate_model(model, data, cfg, eval_images, eval_labels, pool, pool_labels, overfit, device, stats_loss,
                   progress=False):
    """All metrics of one trained model (see the module docstring of this example)."""
    recon = reconstruct_images(model, eval_images, cfg, stats_loss, device, progress)
    x = eval_images[:, 0].numpy()
    r = recon[:, 0].numpy()
    true_o, true_n = eval_labels
    stats_err = evaluation.stats_mse(x, r, eps=cfg.eps)
    data_err = evaluation.per_image_mse(x, r)
    # Orientation and line count are read at mid-grey (the paper judged them by eye, which sees a
    # grey line as a line); the paper's 0.05 threshold is applied too and to the volume fraction.
    o_eye, n_eye = evaluation.analyse_lines(r, level=cfg.count_level)
    o_paper, n_paper = evaluation.analyse_lines(r, level=cfg.level)
    vf = evaluation.volume_fraction_difference(x, r, level=cfg.level)
    nn_image = evaluation.nearest_neighbours(r, pool, metric="image")
    nn_stats = evaluation.nearest_neighbours(r, pool, metric="stats", eps=cfg.eps)
    m = {
        "n_evaluated": int(len(x)),
        "stats_mse_median": float(np.median(stats_err)), "stats_mse_mean": float(np.mean(stats_err)),
        "data_mse_median": float(np.median(data_err)), "data_mse_mean": float(np.mean(data_err)),
        "orientation_accuracy": float(np.mean(o_eye == true_o)),
        "line_count_accuracy": float(np.mean(n_eye == true_n)),
        "orientation_accuracy_paper_threshold": float(np.mean(o_paper == true_o)),
        "line_count_accuracy_paper_threshold": float(np.mean(n_paper == true_n)),
        "no_line_found_fraction_paper_threshold": float(np.mean(o_paper == evaluation.NO_LINE)),
        "vf_diff_mean_percent": float(np.mean(vf)), "vf_diff_median_percent": float(np.median(vf)),
        "nn_image_line_count_accuracy": float(np.mean(pool_labels[1][nn_image] == true_n)),
        "nn_stats_line_count_accuracy": float(np.mean(pool_labels[1][nn_stats] == true_n)),
        "nn_image_orientation_accuracy": float(np.mean(pool_labels[0][nn_image] == true_o)),
        "nn_stats_orientation_accuracy": float(np.mean(pool_labels[0][nn_stats] == true_o)),
        "thresholds": {"orientation_and_count": cfg.count_level, "paper_threshold_and_vf": cfg.level},
    }
    # The paper's overfitting check: reconstructions of train and of validation images, each
    # compared by MSE with every image of its own set; similar distributions = no memorisation.
    # A StatsVAE reconstructs statistics: its check compares decoded statistics with its set's statistics.
    tr_images, va_images = overfit
    avg, space = {}, "statistics" if isinstance(model, StatsVAE) else "image"
    for split, images in (("train", tr_images), ("val", va_images)):
        if space == "statistics":
            f = statistics_of(stats_loss, images)
            rec, ref = decode_statistics(model, f, device)[:, 0].numpy(), f[:, 0].numpy()
        else:
            rec, ref = reconstruct(model, images, batch_size=64, device=device)[:, 0].numpy(), images[:, 0].numpy()
        avg[split] = evaluation.average_mse_to_set(rec, ref, metric="image")
    m["overfitting"] = {
        "space": space,
        "n_per_set": int(len(tr_images)),
        "train_avg_mse": _summary(avg["train"]), "val_avg_mse": _summary(avg["val"]),
        "median_ratio_val_over_train": float(np.median(avg["val"]) / max(np.median(avg["train"]), 1e-300)),
    }
    details = {"recon": r, "stats_err": stats_err, "data_err": data_err, "pred_n": n_eye, "pred_o": o_eye,
               "avg": avg, "overfit_space": space}
    return m, details


def make_figures(out, eval_images, eval_labels, details, histories):
    figs = os.path.join(out, "figures")
    x = eval_images[:, 0].numpy()
    paths = {}
    for name in MODELS:
        paths[f"reconstructions_{name}"] = plotting.reconstruction_grid(
            x, details[name]["recon"], os.path.join(figs, f"reconstructions_{name}.png"), n=6)
        labels = list(range(1, int(eval_labels[1].max()) + 1))
        cm = evaluation.confusion_matrix(eval_labels[1], details[name]["pred_n"], labels)
        paths[f"line_counts_{name}"] = plotting.confusion_matrix_plot(
            cm, labels, os.path.join(figs, f"line_counts_{name}.png"), title=f"Number of lines, {name}")
        paths[f"overfitting_{name}"] = plotting.distribution_comparison(
            details[name]["avg"]["train"], details[name]["avg"]["val"], os.path.join(figs, f"overfitting_{name}.png"),
            title=f"Average {details[name]['overfit_space']} MSE of a reconstruction to its own set, {name}")
    paths["stats_mse_histogram"] = plotting.error_histograms(
        {n: details[n]["stats_err"] for n in MODELS}, os.path.join(figs, "stats_mse_histogram.png"),
        title="Held-out spatial-statistics MSE per image", xlabel="MSE of f")
    paths["data_mse_histogram"] = plotting.error_histograms(
        {n: details[n]["data_err"] for n in MODELS}, os.path.join(figs, "data_mse_histogram.png"),
        title="Held-out data-space MSE per image", xlabel="MSE of pixels")
    paths["loss_curves"] = plotting.loss_curves(histories, os.path.join(figs, "loss_curves.png"))
    return {k: os.path.relpath(v, out) for k, v in paths.items()}


# ----------------------------------------------------------------------------- report
def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def write_report(path, metrics):
    cfg = metrics["config"]
    lines = [
        "# Lines replication: spatial-statistics VAE vs vanilla VAE",
        "",
        f"Configuration `{cfg['name']}`: {cfg['n_images']} images of {cfg['image_size']}x{cfg['image_size']} "
        f"({metrics['n_train']} train / {metrics['n_val']} validation), spatial_stats decoder `{cfg['decoder']}`"
        + (f" (a StatsVAE on the statistics, {cfg['n_basis']} principal axes; reconstructions drawn from its decoded "
           f"statistics, best of {cfg['draw_restarts']} searches of {cfg['draw_steps']} steps)"
           if cfg["decoder"] == "statistics" else "")
        + f", image encoder `{cfg['encoder']}`, "
        f"latent {cfg['latent_dim']}, {cfg['epochs']} epochs (vanilla {cfg['vanilla_epochs']}), batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, beta {metrics['stats_beta']:g} (vanilla {cfg['vanilla_beta']:g}), stats scale {metrics['stats_scale']:.4g}, "
        f"seed {cfg['seed']}; device {metrics['device']}; {metrics['total_seconds']:.0f} s in all.",
        "",
        f"Evaluated on {metrics['spatial_stats']['n_evaluated']} held-out images (the paper: 100). "
        "Per-image MSE, median / mean. The paper's numbers are for 224x224 images after 1500/400 "
        "epochs, so only the ordering between the two models is comparable, not the magnitudes.",
        "",
        "| model | data-space MSE (ours) | data-space MSE (paper) | stats MSE (ours) | stats MSE (paper) |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        m, p = metrics[name], PAPER_TABLE[name]
        lines.append(
            f"| {name} | {_fmt(m['data_mse_median'])} / {_fmt(m['data_mse_mean'])} | "
            f"{_fmt(p['data_mse_median'])} / {_fmt(p['data_mse_mean'])} | "
            f"{_fmt(m['stats_mse_median'])} / {_fmt(m['stats_mse_mean'])} | "
            f"{_fmt(p['stats_mse_median'])} / {_fmt(p['stats_mse_mean'])} |")
    lines += [
        "",
        f"Geometry of the reconstructions, read automatically by connected components (the paper judged "
        f"orientation and counted lines by eye on 100 images): thresholded at mid-grey {cfg['count_level']}, "
        f"which reads a grey line as a line as an eye does, and at the paper's {cfg['level']} (the level of "
        f"its volume-fraction difference, also used here for the vf column).",
        "",
        f"| model | orientation | line count | orientation (< {cfg['level']}) | line count (< {cfg['level']}) | "
        "mean vf difference | NN line count (image MSE) | NN line count (stats MSE) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        m = metrics[name]
        lines.append(
            f"| {name} | {m['orientation_accuracy']:.1%} | {m['line_count_accuracy']:.1%} | "
            f"{m['orientation_accuracy_paper_threshold']:.1%} | {m['line_count_accuracy_paper_threshold']:.1%} | "
            f"{m['vf_diff_mean_percent']:.1f}% | {m['nn_image_line_count_accuracy']:.1%} | "
            f"{m['nn_stats_line_count_accuracy']:.1%} |")
    lines.append(f"| paper, spatial_stats (by eye; vf at 0.05) | {PAPER_LINES['orientation_accuracy']:.0%} | "
                 f"{PAPER_LINES['line_count_accuracy']:.0%} | - | - | "
                 f"{PAPER_LINES['vf_diff_mean_percent']:.0f}% | - | - |")
    lines += [
        "",
        "Overfitting check (average MSE of each reconstruction to every sample of its own set, median; a model "
        "decoding statistics is checked on its decoded statistics against the set's statistics):",
        "",
        "| model | compared | train | validation | ratio val/train |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        o = metrics[name]["overfitting"]
        lines.append(f"| {name} | {o['space']} | {_fmt(o['train_avg_mse']['median'])} | {_fmt(o['val_avg_mse']['median'])} | "
                     f"{o['median_ratio_val_over_train']:.3f} |")
    lines += ["", "Training:", "", "| model | epochs | final train loss | final val loss | seconds | images/s |",
              "|---|---|---|---|---|---|"]
    for name in MODELS:
        t = metrics[name]["training"]
        lines.append(f"| {name} | {t['epochs']} | {_fmt(t['final_train_loss'])} | {_fmt(t['final_val_loss'])} | "
                     f"{t['seconds']:.1f} | {t['images_per_second']:.0f} |")
    lines += ["", "## Figures", ""]
    for key, rel in metrics["figures"].items():
        lines.append(f"![{key}]({rel})")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def print_summary(metrics):
    rows = [("metric", "spatial_stats", "vanilla")]
    for key in ("stats_mse_median", "data_mse_median", "orientation_accuracy", "line_count_accuracy",
                "orientation_accuracy_paper_threshold", "vf_diff_mean_percent", "nn_stats_line_count_accuracy"):
        rows.append((key, _fmt(metrics["spatial_stats"][key]), _fmt(metrics["vanilla"][key])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------- main
@contextlib.contextmanager
def pinned_binary_route():
    """Within it, the operator's route chooser uses its shipped costs, unless ``PYMKS_VAE_ROUTE_COSTS`` is set,
    and the transforms of small 2D grids follow their fixed rule, unless ``PYMKS_VAE_GEMM_DFT`` is set.

    Binary images (the lines, thresholded drawings) are counted or transformed, whichever the
    chooser estimates faster; with measured costs the estimate (and a first-call trial of both
    routes) depends on how busy the machine is, and the two routes differ in the last bits of
    float32 statistics, which changes a training run. Fixed costs make the route, and so a run, a
    function of the seed and the thread count only (measured: the same seed at 2 threads gave line
    counts of 63.0% and 62.3% before this; docs/replication.md). Grids such as ``51^2`` likewise
    choose between matrix products and MKL's transforms by timing both at first use
    (docs/two_point_stats.md) unless the rule is fixed. The environment is put back on exit, so a
    caller's process (a test, a notebook) keeps its own setting after :func:`main`.
    """
    pinned = {name: value for name, value in (("PYMKS_VAE_ROUTE_COSTS", "fitted"), ("PYMKS_VAE_GEMM_DFT", "rule"))
              if name not in os.environ}
    os.environ.update(pinned)
    try:
        yield
    finally:
        for name in pinned:
            os.environ.pop(name, None)


def main(argv=None):
    """Run the experiment; returns the metrics dict (also written to ``--out/metrics.json``); None
    on the ranks other than 0 of a distributed run."""
    cfg, args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with pinned_binary_route():
        ctx = distributed.init_distributed()  # under torchrun: join the process group; else nothing
        try:
            return _run(cfg, args, ctx)
        finally:
            distributed.shutdown()


def _run(cfg, args, ctx):
    t0 = time.perf_counter()
    out = args.out
    os.makedirs(out, exist_ok=True)
    from pymks_vae.training import resolve_device

    device = resolve_device(cfg.device)
    data = build_data(cfg, out)
    models, histories, stats_loss = train_models(cfg, data, out, args.resume, not args.no_progress)
    if not ctx.is_main:  # evaluation, figures and the report are rank 0's
        return None

    n_val, n_train = len(data["val_idx"]), len(data["train_idx"])
    n_eval = min(cfg.eval_images, n_val)
    eval_images = _take(data["val"], cfg, np.arange(n_eval))
    eval_global = data["val_idx"][:n_eval]
    eval_labels = (data["orientation"][eval_global], data["n_lines"][eval_global])
    n_pool = min(cfg.nn_pool, n_train)
    pool = _take(data["train"], cfg, np.arange(n_pool))[:, 0].numpy()
    pool_global = data["train_idx"][:n_pool]
    pool_labels = (data["orientation"][pool_global], data["n_lines"][pool_global])
    n_over = min(cfg.overfit_images, n_train, n_val)
    overfit = (_take(data["train"], cfg, np.arange(n_over)), _take(data["val"], cfg, np.arange(n_over)))

    metrics = {"config": dataclasses.asdict(cfg), "n_train": n_train, "n_val": n_val, "stats_scale": stats_loss.scale_,
               "stats_cutoff": stats_loss.cutoff_, "stats_beta": stats_loss.beta, "stats_loss": repr(stats_loss),
               "world_size": ctx.world_size, "global_batch_size": cfg.batch_size,
               "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "platform": platform.platform(), "cpu_count": os.cpu_count()}
    details = {}
    for name in MODELS:
        m, details[name] = evaluate_model(models[name], data, cfg, eval_images, eval_labels, pool, pool_labels,
                                          overfit, device, stats_loss, progress=not args.no_progress)
        h = histories[name]
        m["training"] = {"epochs": h["epochs"], "final_train_loss": h["train_loss"][-1],
                         "final_val_loss": h["val_loss"][-1] if h["val_loss"] else None,
                         "seconds": h["seconds"], "images_per_second": h["images_per_second"],
                         "train_loss": h["train_loss"], "val_loss": h["val_loss"]}
        metrics[name] = m
    metrics["figures"] = make_figures(out, eval_images, eval_labels, details, histories)
    metrics["total_seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    write_report(os.path.join(out, "report.md"), metrics)
    print_summary(metrics)
    print(f"[train_lines] {metrics['total_seconds']:.0f} s; wrote {os.path.join(out, 'metrics.json')}, "
          f"report.md and figures/")
    return metrics


if __name__ == "__main__":
    main()
