"""Training loop for :class:`pymks_vae.models.VAE`, with atomic checkpoints and exact resume.

:func:`train_vae` runs Adam on any loss of :mod:`pymks_vae.losses`, halves the learning rate for
the last 10% of the epochs (the paper's schedule), shows a tqdm progress bar, and after every
epoch writes a checkpoint atomically (temporary file in the same folder, flush + fsync,
``os.replace``). A checkpoint holds the model and optimizer states, the epoch, the history, every
random-number-generator state and the model config, all in types that
``torch.load(path, weights_only=True)`` accepts; ``resume=True`` continues exactly where the run
stopped (bit-identical to an uninterrupted run on the same device).

One code path serves 1..N processes (``torchrun``, see docs/scaling.md and
:mod:`pymks_vae.distributed`): ``batch_size`` is the global batch, which every rank forms alike and
shares out, the model is wrapped in DistributedDataParallel, BatchNorm uses the global batch's
statistics, each rank's latent noise is its share of one global draw, and rank 0 alone writes
checkpoints and shows progress; N processes thereby follow the single-process trajectory.

The step never waits on the host: the loss is accumulated on the device and read once per
epoch (where a non-finite value stops the run before its checkpoint is written), and the
operators' data checks, which read values back, run on the first batch only
(:func:`pymks_vae.ops.data_checks`; ``TrainConfig.data_checks="always"`` keeps them on).

Example:
    >>> import torch
    >>> from pymks_vae.models import VAE
    >>> from pymks_vae.losses import DataSpaceLoss
    >>> from pymks_vae.training import TrainConfig, train_vae
    >>> _ = torch.manual_seed(0)
    >>> model = VAE(latent_dim=2, image_size=32)
    >>> data = torch.rand(16, 1, 32, 32)
    >>> history = train_vae(model, DataSpaceLoss(), data, TrainConfig(epochs=2, batch_size=8, progress=False))
    >>> history["epochs"], len(history["train_loss"])
    (2, 2)
"""
import contextlib
import dataclasses
import math
import numbers
import os
import pickle
import random
import tempfile
import time
import zipfile

import numpy as np
import torch

from pymks_vae import distributed, ops
from pymks_vae.models import VAE
from pymks_vae.models.stats_vae import StatsVAE

__all__ = [
    "TrainConfig",
    "train_vae",
    "evaluate_loss",
    "reconstruct",
    "load_model",
    "load_checkpoint",
    "save_checkpoint",
    "resolve_device",
    "lr_at_epoch",
    "CheckpointError",
]

CHECKPOINT_FORMAT = "pymks_vae.checkpoint.v1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, foreign or of another model."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of :func:`train_vae` (defaults: the paper's optimiser settings).

    Args:
        epochs: total number of epochs of the run (int >= 1).
        batch_size: images per optimisation step (the paper: 32).
        lr: Adam learning rate (the paper: 1e-3).
        seed: seeds torch, numpy, python ``random`` and the data-shuffling generator (the paper: 127).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        lr_halving: halve the learning rate for the last ``lr_halving_fraction`` of the epochs.
        lr_halving_fraction: fraction of the epochs (rounded up) run at half the learning rate.
        num_workers: DataLoader workers when ``train_data`` is a Dataset.
        progress: show a tqdm progress bar with the running loss.
        checkpoint_path: file written (atomically) after every epoch; None for no checkpoint.
        max_epochs_this_call: stop after this many epochs in this call (resume later); None: run
            to ``epochs``.
        shuffle: reshuffle the training data every epoch.
        grad_clip: clip the gradient norm to this value (None: no clipping; the paper did not clip).
        data_checks: ``"first"`` (default): the operators' data checks (NaN/Inf, which read a
            value back to the host) run on the first batch of each call only, later batches are
            covered by the once-per-epoch check of the accumulated loss; ``"always"``: on every
            batch (slower on a GPU; names the bad batch's epoch at once).

    Example:
        >>> TrainConfig(epochs=3).lr
        0.001
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 127
    device: str = "auto"
    lr_halving: bool = True
    lr_halving_fraction: float = 0.1
    num_workers: int = 0
    progress: bool = True
    checkpoint_path: str = None
    max_epochs_this_call: int = None
    shuffle: bool = True
    grad_clip: float = None
    data_checks: str = "first"

    def __post_init__(self):
        def positive_int(name, allow_none=False, minimum=1):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
                raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {v!r}")

        positive_int("epochs")
        positive_int("batch_size")
        positive_int("seed", minimum=0)
        positive_int("num_workers", minimum=0)
        positive_int("max_epochs_this_call", allow_none=True)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        f = self.lr_halving_fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 <= f <= 1:
            raise ValueError(f"TrainConfig.lr_halving_fraction must be a number in [0, 1], got {f!r}")
        for name in ("lr_halving", "progress", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        g = self.grad_clip
        if g is not None and (isinstance(g, bool) or not isinstance(g, numbers.Real) or not g > 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a number > 0, got {g!r}")
        if self.data_checks not in ("first", "always"):
            raise ValueError(f"TrainConfig.data_checks must be 'first' or 'always', got {self.data_checks!r}")
        if self.checkpoint_path is not None:
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        resolve_device(self.device)

    def to_dict(self):
        """The settings as a dict of plain python values."""
        return dataclasses.asdict(self)


def resolve_device(device):
    """``torch.device`` for ``"auto"`` (CUDA if available, else CPU) or any device string.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch device string, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA, but no GPU is available here (use 'auto' or 'cpu')")
    return dev


def lr_at_epoch(config, epoch):
    """Learning rate of (0-based) ``epoch``: ``lr``, halved in the last ``lr_halving_fraction`` of epochs.

    Example:
        >>> cfg = TrainConfig(epochs=20, lr=1e-3)
        >>> lr_at_epoch(cfg, 17), lr_at_epoch(cfg, 18)
        (0.001, 0.0005)
    """
    n_half = math.ceil(config.lr_halving_fraction * config.epochs - 1e-9) if config.lr_halving else 0
    return config.lr * (0.5 if epoch >= config.epochs - n_half else 1.0)


# ----------------------------------------------------------------------------- data
def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _as_tensor(batch, name):
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{name} yielded a {type(batch).__name__}; expected tensors (batch, C, *spatial)")
    return batch


def _check_data(data, name):
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        if data.ndim not in (4, 5) or data.shape[0] == 0:
            raise ValueError(f"{name} as a tensor must have shape (n, C, H, W) or (n, C, X, Y, Z) with n >= 1, "
                             f"got {tuple(data.shape)}")
        return data
    if isinstance(data, torch.utils.data.Dataset):
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{name} is an empty dataset")
        return data
    if callable(data):
        return data
    raise TypeError(
        f"{name} must be a torch Dataset, a tensor (n, C, *spatial) or a zero-argument callable returning an "
        f"iterator of batches; got {type(data).__name__}"
    )


class _ShardSampler(torch.utils.data.Sampler):
    """Batches of dataset indices: this rank's share of each global batch (see :func:`_shards`).

    Every rank draws the same permutation from the same generator, so the global batches agree
    across ranks without communication (what ``DistributedSampler`` + ``set_epoch`` achieve by
    seeding with the epoch); ``sizes`` lists the global size and offset of each batch yielded.
    """

    def __init__(self, n, batch_size, shuffle, generator, ctx, min_global):
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator
        self.ctx, self.min_global = ctx, min_global
        self.sizes = []

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for s in range(0, self.n, self.batch_size):
            g = min(self.batch_size, self.n - s)
            a, b = distributed.shard_bounds(g, self.ctx.rank, self.ctx.world_size)
            if g < self.min_global or b == a:
                continue
            self.sizes.append((g, a))
            yield order[s + a : s + b].tolist()

    def __len__(self):
        return -(-self.n // self.batch_size)


def _shards(data, batch_size, shuffle, generator, num_workers, ctx=None, min_global=1, pin_memory=False):
    """This rank's shares of the global batches of ``data``: ``(images, global_size, offset)``.

    The global batches are those a single process forms (``batch_size`` images, shuffled with
    ``generator``); a rank takes the contiguous share :func:`pymks_vae.distributed.shard_bounds`
    gives it, starting at ``offset`` within the global batch. Global batches smaller than
    ``min_global`` are skipped, as are empty shares. A callable must yield the same batches on
    every rank (seed it); each rank keeps its share of each.
    """
    ctx = distributed.DistContext() if ctx is None else ctx
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            g = min(batch_size, n - s)
            a, b = distributed.shard_bounds(g, ctx.rank, ctx.world_size)
            if g >= min_global and b > a:
                yield data[order[s + a : s + b]], g, a
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        sampler = _ShardSampler(len(data), batch_size, shuffle, generator, ctx, min_global)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, generator=generator,
                                             num_workers=num_workers, pin_memory=pin_memory)
        for k, item in enumerate(loader):
            g, a = sampler.sizes[k]
            yield _as_tensor(_first(item), "the dataset"), g, a
    else:
        if isinstance(data, torch.utils.data.Dataset):  # iterable dataset: batched as it comes
            source = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
            what = "the dataset"
        else:
            source, what = data(), "the train_data callable"
        for item in source:
            batch = _as_tensor(_first(item), what)
            g = batch.shape[0]
            a, b = distributed.shard_bounds(g, ctx.rank, ctx.world_size)
            if g >= min_global and b > a:
                yield batch[a:b], g, a


# ----------------------------------------------------------------------------- RNG states
def _rng_state(loader_gen, device=None):
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": [int(v) for v in py_state[1]],
                   "gauss": py_state[2] if py_state[2] is None else float(py_state[2])},
        "loader": loader_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
        if device is not None and device.type == "cuda":
            # The generator that drew this run's noise. Every rank draws the same numbers on its
            # own GPU, so rank 0's generator state is every rank's (see _set_rng_state).
            state["cuda_train"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, loader_gen, device=None):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        for index, st in enumerate(states):
            torch.cuda.set_rng_state(st, index)
    if "cuda_train" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_train"], device)


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, payload):
    """Write ``payload`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed and fsynced, then ``os.replace`` onto ``path``. A failure leaves ``path`` untouched.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "c.pt"); save_checkpoint(p, {"a": 1})
        >>> torch.load(p, weights_only=True)
        {'a': 1}
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # persist the rename itself (best effort: not every filesystem allows a dir fsync)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


_CHECKPOINT_KEYS = ("format", "model_config", "model_state", "optimizer_state", "epoch", "history", "rng",
                    "train_config")


def load_checkpoint(path):
    """Read a checkpoint written by :func:`train_vae` (``weights_only=True``, onto the CPU).

    Returns:
        the checkpoint dict (keys ``format, model_config, model_state, optimizer_state, epoch,
        history, rng, train_config``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, truncated or not a pymks_vae checkpoint.

    Example:
        >>> import os, tempfile, torch
        >>> from pymks_vae.models import VAE
        >>> from pymks_vae.losses import DataSpaceLoss
        >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
        >>> config = TrainConfig(epochs=1, batch_size=8, progress=False, checkpoint_path=path)
        >>> _ = train_vae(VAE(latent_dim=2, image_size=16), DataSpaceLoss(), torch.rand(16, 1, 16, 16), config)
        >>> ckpt = load_checkpoint(path)
        >>> ckpt["epoch"], sorted(ckpt["history"])[:2]
        (1, ['epochs', 'global_batch_size'])
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError, IndexError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated (or not a torch file) and cannot be loaded: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not a pymks_vae training checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}")
    return ckpt


def load_model(path, device="cpu"):
    """The trained :class:`~pymks_vae.models.VAE` (or :class:`~pymks_vae.models.stats_vae.StatsVAE`) saved in a
    checkpoint, in eval mode.

    Args:
        path: a checkpoint written by :func:`train_vae`.
        device: where to put the model.

    Returns:
        the model, rebuilt from the checkpoint's config, with its trained weights.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_checkpoint`, or when the weights do
            not fit the stored config.

    Example:
        >>> import os, tempfile, torch
        >>> from pymks_vae.models import VAE
        >>> from pymks_vae.losses import DataSpaceLoss
        >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
        >>> model = VAE(latent_dim=2, image_size=16)
        >>> config = TrainConfig(epochs=1, batch_size=8, progress=False, checkpoint_path=path)
        >>> _ = train_vae(model, DataSpaceLoss(), torch.rand(16, 1, 16, 16), config)
        >>> again = load_model(path)
        >>> again.training, all(torch.equal(a, b.cpu()) for a, b in zip(again.state_dict().values(),
        ...                                                              model.state_dict().values()))
        (False, True)
    """
    ckpt = load_checkpoint(path)
    try:
        config = ckpt["model_config"]
        kind = StatsVAE if isinstance(config, dict) and config.get("kind") == "statistics" else VAE
        model = kind.from_config(config)
        model.load_state_dict(ckpt["model_state"])
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not rebuild a VAE: {exc}") from exc
    return model.to(resolve_device(device)).eval()


# ----------------------------------------------------------------------------- loop
def _run_loss(model, loss_fn, batch, device, noise=None):
    batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)
    if noise is None:
        x_hat, mu, logvar = model(batch)
    else:
        x_hat, mu, logvar = model(batch, noise=noise)
    return loss_fn(x_hat, batch, mu, logvar), batch.shape[0]


def _batch_sum(value, loss_fn, n):
    """The batch's sum of a loss value reduced by ``loss_fn.reduction`` ("sum" or "batchmean"),
    as a detached tensor on the value's device (nothing is read back to the host)."""
    value = value.detach()
    return value * n if getattr(loss_fn, "reduction", "sum") == "batchmean" else value


def _rank_weight(loss_fn, ctx, n_local, n_global):
    """Factor on this rank's loss so that DDP's gradient average is the global batch's gradient.

    DDP averages the ranks' gradients. With "batchmean" the global loss is the sum over ranks of
    (n_local / n_global) x the rank's own mean, with "sum" the sum of the ranks' sums; times the
    world size to undo the average. 1 for a single process.
    """
    if not ctx.distributed:
        return 1.0
    if getattr(loss_fn, "reduction", "sum") == "batchmean":
        return ctx.world_size * n_local / n_global
    return float(ctx.world_size)


def _loss_sums(model, loss_fn, data, batch_size, device, ctx):
    """This rank's share of the per-sample loss sum over ``data`` (eval mode): (tensor, count)."""
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch, _, _ in _shards(data, batch_size, False, None, 0, ctx):
        model.check_input(batch, name="an evaluation batch")
        (loss, _), n = _run_loss(model, loss_fn, batch, device)
        total += _batch_sum(loss, loss_fn, n)
        count += n
    return total, count


@torch.no_grad()
def evaluate_loss(model, loss_fn, data, batch_size=64, device=None):
    """Per-sample mean of ``loss_fn`` over ``data`` with the model in eval mode (``z = mu``).

    Args:
        model: a :class:`~pymks_vae.models.VAE`.
        loss_fn: a loss of :mod:`pymks_vae.losses`.
        data: as ``train_data`` of :func:`train_vae`.
        batch_size: images per batch.
        device: None: the model's device.

    Returns:
        a python float.

    Example:
        >>> import torch
        >>> from pymks_vae.models import VAE
        >>> from pymks_vae.losses import DataSpaceLoss
        >>> loss = evaluate_loss(VAE(latent_dim=2, image_size=16), DataSpaceLoss(), torch.rand(10, 1, 16, 16))
        >>> isinstance(loss, float) and loss > 0
        True
    """
    data = _check_data(data, "data")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    try:
        total, count = _loss_sums(model, loss_fn, data, batch_size, device, distributed.DistContext())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data yielded no images")
    return float(total) / count


@torch.no_grad()
def reconstruct(model, images, batch_size=64, device=None):
    """Reconstructions (``z = mu``) of ``images`` ``(n, C, *spatial)`` (tensor or numpy, 2D or 3D), as a CPU tensor.

    Example:
        >>> m = VAE(latent_dim=2, image_size=32)
        >>> reconstruct(m, torch.rand(3, 1, 32, 32)).shape
        torch.Size([3, 1, 32, 32])
    """
    x = _check_data(images, "images")
    if not isinstance(x, torch.Tensor):
        raise TypeError("images must be a tensor or numpy array (n, C, *spatial)")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    try:
        out = [model(x[s : s + batch_size].to(device=device, dtype=torch.float32))[0].cpu()
               for s in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def _new_history():
    return {"train_loss": [], "val_loss": [], "train_parts": {}, "lr": [], "epochs": 0, "seconds": 0.0,
            "images_per_second": 0.0, "images_seen": 0, "world_size": 1, "global_batch_size": None}


@contextlib.contextmanager
def _caller_rng_restored(device):
    """Training seeds the global generators (exact resume needs their states); the caller's
    torch, numpy and python states are put back afterwards, so fitting never reseeds user code."""
    np_state, py_state = np.random.get_state(), random.getstate()
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def train_vae(model, loss_fn, train_data, config, *, val_data=None, resume=False, callback=None):
    """Train ``model`` with Adam on ``loss_fn``, in this process or in all ranks of a process group.

    Args:
        model: a :class:`~pymks_vae.models.VAE` (moved to the configured device).
        loss_fn: ``loss_fn(x_hat, x, mu, logvar) -> (total, parts)``, e.g.
            :class:`~pymks_vae.losses.SpatialStatsLoss` or :class:`~pymks_vae.losses.DataSpaceLoss`;
            ``total`` summed over the batch, or averaged when ``loss_fn.reduction == "batchmean"``
            (the history holds per-sample means either way).
        train_data: a torch Dataset whose items are ``(image, ...)`` or images ``(C, *spatial)``;
            a tensor / numpy array ``(n, C, H, W)`` or ``(n, C, X, Y, Z)``; or a zero-argument
            callable returning an iterator of batches (tensors ``(b, C, *spatial)`` or tuples
            whose first item is one);
            a callable shuffles (or not) by itself. One-image batches are skipped in training
            (BatchNorm cannot normalise a single sample).
        config: a :class:`TrainConfig`.
        val_data: optional, same kinds; its per-sample loss (eval mode, ``z = mu``) is recorded
            after each epoch.
        resume: continue from ``config.checkpoint_path`` when that file exists (exactly: model,
            optimizer, RNG states and history are restored); a missing file starts afresh.
        callback: optional ``callback(epoch, history)`` called after each epoch (1-based count of
            completed epochs), after the checkpoint is written; return True to stop early.

    Distributed (a process group of N > 1 ranks is active, e.g. under ``torchrun`` after
    :func:`pymks_vae.distributed.init_distributed`): every rank calls this with the same
    arguments. ``config.batch_size`` is the global batch; each rank trains on its share of it
    (global batches smaller than N are skipped), the learning-rate schedule is the
    single-process one, and the weights follow the single-process run to float tolerance.
    ``device="auto"`` or ``"cuda"`` means this rank's GPU (``LOCAL_RANK``). Rank 0 writes the
    checkpoint and shows the progress bar; all ranks resume from the same checkpoint file (on a
    filesystem they share). The history (losses summed over the ranks) and the callback's
    arguments are the same on every rank; rank 0's callback decides whether to stop. A failing
    rank stops the others (:func:`pymks_vae.distributed.stop_together`). A data callable
    must yield the same batches on every rank, and a loss that calibrates itself must be
    calibrated before (``loss.calibrate(images)``), or ranks would calibrate on different shares.

    Returns:
        history dict: ``train_loss`` and ``val_loss`` (per epoch, per-sample means; ``val_loss``
        empty without ``val_data``), ``train_parts`` (name -> per-epoch per-sample means of each
        loss part), ``lr`` per epoch, ``epochs`` completed, ``seconds`` of training,
        ``images_per_second`` (all ranks together), ``images_seen``, ``world_size`` and
        ``global_batch_size`` (of the latest call).

    Raises:
        TypeError/ValueError: bad arguments; CheckpointError: the checkpoint to resume from is
            corrupt or belongs to a different model configuration; FloatingPointError: the loss
            of an epoch was not finite (that epoch's checkpoint is not written);
            :class:`~pymks_vae.distributed.DistributedRunError`: another rank failed.

    Example:
        >>> import os, tempfile, torch
        >>> from pymks_vae.models import VAE
        >>> from pymks_vae.losses import SpatialStatsLoss
        >>> _ = torch.manual_seed(0)
        >>> images = (torch.rand(32, 1, 16, 16) > 0.5).float()
        >>> loss = SpatialStatsLoss().calibrate(images)
        >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
        >>> config = TrainConfig(epochs=3, batch_size=8, progress=False, checkpoint_path=path)
        >>> stopped = lambda epoch, history: epoch == 1  # as if the job were stopped after epoch 1
        >>> history = train_vae(VAE(latent_dim=2, image_size=16), loss, images[:24], config,
        ...                     val_data=images[24:], callback=stopped)
        >>> history["epochs"], len(history["val_loss"])
        (1, 1)
        >>> history = train_vae(VAE(latent_dim=2, image_size=16), loss, images[:24], config,
        ...                     val_data=images[24:], resume=True)  # on from the checkpoint
        >>> history["epochs"], len(history["val_loss"])
        (3, 3)
    """
    if not isinstance(model, (VAE, StatsVAE)):
        raise TypeError(f"model must be a pymks_vae.models.VAE or StatsVAE, got {type(model).__name__}")
    if isinstance(model, StatsVAE) and not model.basis_fitted:
        raise ValueError("a StatsVAE needs fit_basis(training_statistics) before training")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (x_hat, x, mu, logvar) -> (total, parts), got {loss_fn!r}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    if resume and config.checkpoint_path is None:
        raise ValueError("resume=True needs config.checkpoint_path")
    train_data = _check_data(train_data, "train_data")
    if val_data is not None:
        val_data = _check_data(val_data, "val_data")
    ctx = distributed.context()
    if ctx.distributed and getattr(loss_fn, "needs_calibration", False):
        raise ValueError(
            f"loss_fn {type(loss_fn).__name__} is not calibrated: in a distributed run each rank would calibrate "
            "it on its own share of the first batch; call loss_fn.calibrate(images) with the same images on every "
            "rank first"
        )
    device = _rank_device(config.device, ctx)
    with _caller_rng_restored(device), distributed.stop_together(ctx):
        return _train(model, loss_fn, train_data, config, val_data, resume, callback, device, ctx)


def _rank_device(device, ctx):
    """The configured device; in a process group, "auto"/"cuda" mean this rank's GPU (LOCAL_RANK)."""
    dev = resolve_device(device)
    if ctx.distributed and dev.type == "cuda" and (device == "auto" or dev.index is None):
        dev = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return dev


def _train(model, loss_fn, train_data, config, val_data, resume, callback, device, ctx):
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter")
    optimizer = torch.optim.Adam(params, lr=config.lr)
    loader_gen = torch.Generator()

    history = _new_history()
    start = 0
    if resume and os.path.isfile(config.checkpoint_path):
        ckpt = load_checkpoint(config.checkpoint_path)
        if _normalise(ckpt["model_config"]) != _normalise(model.config):
            raise CheckpointError(
                f"checkpoint {config.checkpoint_path!r} was written for model config {ckpt['model_config']}, "
                f"but this model has config {model.config}; use another checkpoint_path or resume=False"
            )
        try:
            model.load_state_dict(ckpt["model_state"])
            optimizer.load_state_dict(ckpt["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {config.checkpoint_path!r} does not fit this model: {exc}") from exc
        history = ckpt["history"]
        for key, value in _new_history().items():  # checkpoints written before a key existed
            history.setdefault(key, value)
        start = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"], loader_gen, device)
    else:
        _seed_everything(config.seed)
        loader_gen.manual_seed(config.seed)
    history["world_size"] = ctx.world_size
    history["global_batch_size"] = config.batch_size

    stop = config.epochs
    if config.max_epochs_this_call is not None:
        stop = min(stop, start + config.max_epochs_this_call)

    # Each rank needs one image or more of every global batch it trains on; BatchNorm needs two.
    min_global = max(2, ctx.world_size)
    net = model
    if ctx.distributed:
        # The wrapper averages gradients during backward (and broadcasts rank 0's weights now).
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    bar = None
    if config.progress and stop > start and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc=f"training {type(loss_fn).__name__}", unit="epoch")
    checks_every_batch = config.data_checks == "always"
    first = True
    try:
        with distributed.global_batchnorm(model) if ctx.distributed else contextlib.nullcontext():
            for epoch in range(start, stop):
                lr = lr_at_epoch(config, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                t0 = time.perf_counter()
                # Sums stay on the device; they are read once, at the end of the epoch.
                total = torch.zeros((), dtype=torch.float64, device=device)
                count, parts_sum = 0, {}
                for batch, n_global, offset in _shards(train_data, config.batch_size, config.shuffle, loader_gen,
                                                       config.num_workers, ctx, min_global,
                                                       pin_memory=device.type == "cuda"):
                    model.check_input(batch, name="a training batch")
                    n = batch.shape[0]
                    # Every rank draws the whole global batch's noise and keeps its share, so the
                    # samples - and every rank's generator state - are the single process's.
                    noise = torch.randn(n_global, model.latent_dim, device=device)[offset : offset + n]
                    with ops.data_checks(first or checks_every_batch):
                        (loss, parts), _ = _run_loss(net, loss_fn, batch, device, noise)
                        if checks_every_batch and not torch.isfinite(loss):
                            raise FloatingPointError(f"the loss became {float(loss.detach())} at epoch {epoch + 1}; lower lr")
                        weight = _rank_weight(loss_fn, ctx, n, n_global)
                        optimizer.zero_grad(set_to_none=True)
                        (loss * weight if weight != 1.0 else loss).backward()
                    first = False
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    total += _batch_sum(loss, loss_fn, n)
                    count += n
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + _batch_sum(v, loss_fn, n)
                train_total, train_count, parts_mean = _epoch_sums(total, count, parts_sum, device, ctx)
                if train_count == 0:
                    raise ValueError(f"train_data yielded no batch of {min_global} or more images")
                if not math.isfinite(train_total):
                    raise FloatingPointError(
                        f"the loss became {train_total / train_count} during epoch {epoch + 1} (checkpoint left at "
                        f"epoch {epoch}); lower lr, or set TrainConfig(data_checks='always') to find the batch"
                    )
                seconds = time.perf_counter() - t0
                history["train_loss"].append(train_total / train_count)
                for k, v in parts_mean.items():
                    history["train_parts"].setdefault(k, []).append(v / train_count)
                history["lr"].append(lr)
                if val_data is not None:
                    history["val_loss"].append(_validation_loss(model, loss_fn, val_data, config.batch_size,
                                                                device, ctx))
                history["epochs"] = epoch + 1
                history["seconds"] = float(history["seconds"]) + seconds
                history["images_seen"] = int(history["images_seen"]) + train_count
                history["images_per_second"] = history["images_seen"] / max(history["seconds"], 1e-12)
                if config.checkpoint_path is not None and ctx.is_main:
                    # Every rank holds the same weights, optimizer and generator states: rank 0's serve all.
                    save_checkpoint(config.checkpoint_path, {
                        "format": CHECKPOINT_FORMAT,
                        "model_config": dict(model.config),
                        "model_state": model.state_dict(),
                        "optimizer_state": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                        "rng": _rng_state(loader_gen, device),
                        "train_config": config.to_dict(),
                        "world_size": ctx.world_size,
                    })
                if bar is not None:
                    post = {"loss": f"{history['train_loss'][-1]:.4g}"}
                    if history["val_loss"]:
                        post["val"] = f"{history['val_loss'][-1]:.4g}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if callback is not None:
                    wants_stop = callback(epoch + 1, history) is True
                    if distributed.broadcast_flag(wants_stop, ctx, device):
                        break
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history


def _epoch_sums(total, count, parts_sum, device, ctx):
    """The epoch's loss sum, image count and part sums over every rank, read back in one go."""
    keys = sorted(parts_sum)
    packed = torch.stack([total.to(torch.float64), torch.tensor(float(count), dtype=torch.float64, device=device)]
                         + [parts_sum[k].to(torch.float64) for k in keys])
    values = distributed.all_reduce_sum(packed, ctx).tolist()
    return values[0], int(round(values[1])), dict(zip(keys, values[2:]))


def _validation_loss(model, loss_fn, data, batch_size, device, ctx):
    """Per-sample mean loss over ``data`` in eval mode, each rank evaluating its share."""
    model.eval()
    try:
        with ops.data_checks(True):  # not the hot path: user data gets every check
            total, count = _loss_sums(model, loss_fn, data, batch_size, device, ctx)
    finally:
        model.train()
    packed = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
    total, count = distributed.all_reduce_sum(packed, ctx).tolist()
    if count == 0:
        raise ValueError("val_data yielded no images")
    return total / count


def _normalise(config):
    out = dict(config)
    for key in ("image_size", "stats_shape"):
        if key in out:
            out[key] = [int(v) for v in out[key]]
    if out.get("decoder") == "strokes":  # keys added later, at the values older stroke models had
        out.setdefault("stroke_layout", "free")
        out.setdefault("stroke_binary", False)
    return out
