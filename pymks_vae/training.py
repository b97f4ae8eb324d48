"""Training loop for :class:`pymks_vae.models.VAE`, with atomic checkpoints and exact resume.

:func:`train_vae` runs Adam on any loss of :mod:`pymks_vae.losses`, halves the learning rate for
the last 10% of the epochs (the paper's schedule), shows a tqdm progress bar, and after every
epoch writes a checkpoint atomically (temporary file in the same folder, flush + fsync,
``os.replace``). A checkpoint holds the model and optimizer states, the epoch, the history, every
random-number-generator state and the model config, all in types that
``torch.load(path, weights_only=True)`` accepts; ``resume=True`` continues exactly where the run
stopped (bit-identical to an uninterrupted run on the same device).

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

from pymks_vae.models import VAE

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


def _batches(data, batch_size, shuffle, generator, num_workers):
    """Iterate over batches of ``data`` (see :func:`train_vae`); shuffles with ``generator``."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield data[order[s : s + batch_size]]
    elif isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                             num_workers=num_workers)
        for item in loader:
            yield _as_tensor(_first(item), "the dataset")
    else:
        for item in data():
            yield _as_tensor(_first(item), "the train_data callable")


# ----------------------------------------------------------------------------- RNG states
def _rng_state(loader_gen):
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
    return state


def _set_rng_state(state, loader_gen):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """The trained :class:`~pymks_vae.models.VAE` saved in a checkpoint, in eval mode.

    Args:
        path: a checkpoint written by :func:`train_vae`.
        device: where to put the model.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_checkpoint`, or when the weights do
            not fit the stored config.
    """
    ckpt = load_checkpoint(path)
    try:
        model = VAE.from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not rebuild a VAE: {exc}") from exc
    return model.to(resolve_device(device)).eval()


# ----------------------------------------------------------------------------- loop
def _run_loss(model, loss_fn, batch, device):
    batch = batch.to(device=device, dtype=torch.float32, non_blocking=True)
    model.check_input(batch, name="a training batch")
    x_hat, mu, logvar = model(batch)
    return loss_fn(x_hat, batch, mu, logvar), batch.shape[0]


def _batch_sum(value, loss_fn, n):
    """The batch's sum of a loss value reduced by ``loss_fn.reduction`` ("sum" or "batchmean")."""
    return float(value) * (n if getattr(loss_fn, "reduction", "sum") == "batchmean" else 1)


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
    """
    data = _check_data(data, "data")
    device = next(model.parameters()).device if device is None else resolve_device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in _batches(data, batch_size, False, None, 0):
            (loss, _), n = _run_loss(model, loss_fn, batch, device)
            total += _batch_sum(loss.detach(), loss_fn, n)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data yielded no images")
    return total / count


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
            "images_per_second": 0.0, "images_seen": 0}


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
    """Train ``model`` with Adam on ``loss_fn``.

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

    Returns:
        history dict: ``train_loss`` and ``val_loss`` (per epoch, per-sample means; ``val_loss``
        empty without ``val_data``), ``train_parts`` (name -> per-epoch per-sample means of each
        loss part), ``lr`` per epoch, ``epochs`` completed, ``seconds`` of training,
        ``images_per_second``, ``images_seen``.

    Raises:
        TypeError/ValueError: bad arguments; CheckpointError: the checkpoint to resume from is
            corrupt or belongs to a different model configuration.
    """
    if not isinstance(model, VAE):
        raise TypeError(f"model must be a pymks_vae.models.VAE, got {type(model).__name__}")
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
    device = resolve_device(config.device)
    with _caller_rng_restored(device):
        return _train(model, loss_fn, train_data, config, val_data, resume, callback, device)


def _train(model, loss_fn, train_data, config, val_data, resume, callback, device):
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
        start = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"], loader_gen)
    else:
        _seed_everything(config.seed)
        loader_gen.manual_seed(config.seed)

    stop = config.epochs
    if config.max_epochs_this_call is not None:
        stop = min(stop, start + config.max_epochs_this_call)

    bar = None
    if config.progress and stop > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop - start, desc=f"training {type(loss_fn).__name__}", unit="epoch")
    try:
        for epoch in range(start, stop):
            lr = lr_at_epoch(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            t0 = time.perf_counter()
            total, count, parts_sum = 0.0, 0, {}
            for batch in _batches(train_data, config.batch_size, config.shuffle, loader_gen, config.num_workers):
                if batch.shape[0] < 2:
                    continue
                (loss, parts), n = _run_loss(model, loss_fn, batch, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {float(loss)} at epoch {epoch + 1}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                total += _batch_sum(loss.detach(), loss_fn, n)
                count += n
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + _batch_sum(v, loss_fn, n)
                if bar is not None:
                    bar.set_postfix(loss=f"{total / count:.4g}", refresh=False)
            if count == 0:
                raise ValueError("train_data yielded no batch of 2 or more images")
            seconds = time.perf_counter() - t0
            history["train_loss"].append(total / count)
            for k, v in parts_sum.items():
                history["train_parts"].setdefault(k, []).append(v / count)
            history["lr"].append(lr)
            if val_data is not None:
                history["val_loss"].append(evaluate_loss(model, loss_fn, val_data, config.batch_size, device))
            history["epochs"] = epoch + 1
            history["seconds"] = float(history["seconds"]) + seconds
            history["images_seen"] = int(history["images_seen"]) + count
            history["images_per_second"] = history["images_seen"] / max(history["seconds"], 1e-12)
            if config.checkpoint_path is not None:
                save_checkpoint(config.checkpoint_path, {
                    "format": CHECKPOINT_FORMAT,
                    "model_config": dict(model.config),
                    "model_state": model.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "rng": _rng_state(loader_gen),
                    "train_config": config.to_dict(),
                })
            if bar is not None:
                post = {"loss": f"{history['train_loss'][-1]:.4g}"}
                if history["val_loss"]:
                    post["val"] = f"{history['val_loss'][-1]:.4g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if callback is not None and callback(epoch + 1, history) is True:
                break
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history


def _normalise(config):
    out = dict(config)
    if "image_size" in out:
        out["image_size"] = [int(v) for v in out["image_size"]]
    return out
