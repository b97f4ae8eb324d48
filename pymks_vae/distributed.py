"""Several processes training one model: the process group, shards, global BatchNorm, failure.

:func:`pymks_vae.training.train_vae` runs the same code for 1..N processes; this module holds what
it needs from ``torch.distributed``. A run started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) calls :func:`init_distributed`
once; without ``torchrun`` that call does nothing and everything here acts for one process.

Conventions (see docs/scaling.md):

* ``TrainConfig.batch_size`` is the *global* batch. Every rank forms the same global batches (the
  same shuffling generator, the same seed) and takes its contiguous share of each one
  (:func:`shard_bounds`: sizes differ by at most one), so N processes follow the single-process
  trajectory - same batches, same learning rate, same number of steps - up to the order of
  floating-point sums.
* BatchNorm normalises with the statistics of the global batch (:func:`global_batchnorm`), as the
  single process does; torch's own ``SyncBatchNorm`` refuses CPU tensors (gloo), this one runs on
  gloo and NCCL alike and keeps the state-dict keys.
* When a rank fails it records why in the process group's store before it exits; the ranks left
  waiting in a collective fail within the group's timeout (gloo at once, when the peer's
  connection closes) and stop with :class:`DistributedRunError` naming the rank that failed.

Example:
    >>> ctx = context()            # no process group here: one process
    >>> (ctx.rank, ctx.world_size, ctx.distributed)
    (0, 1, False)
    >>> shard_bounds(10, rank=1, world_size=3)   # 10 images over 3 ranks: 4, 3, 3
    (4, 7)
"""
import contextlib
import dataclasses
import datetime
import os
import signal
import threading
import warnings

import torch
from torch import nn

__all__ = [
    "DistContext",
    "DistributedRunError",
    "context",
    "init_distributed",
    "shutdown",
    "is_main_process",
    "shard_bounds",
    "all_reduce_sum",
    "broadcast_flag",
    "global_batchnorm",
    "stop_together",
    "DEFAULT_TIMEOUT_S",
]

#: Seconds a collective may wait for the other ranks before it fails (``PYMKS_VAE_DIST_TIMEOUT``
#: overrides it): long enough for rank 0 to write a checkpoint of a large model while the others
#: wait, short enough that a lost rank stops the run within minutes rather than torch's 30.
DEFAULT_TIMEOUT_S = 600

_FAILURE_KEY = "pymks_vae/failed"


class DistributedRunError(RuntimeError):
    """This rank stops because another rank failed (or the connection to it was lost)."""


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in a run.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes (1 for a single process).
        local_rank: rank on this node (selects the GPU).
        distributed: whether a process group with more than one process is active.

    Example:
        >>> ctx = DistContext(rank=1, world_size=4, local_rank=1, distributed=True)
        >>> ctx.is_main, shard_bounds(32, ctx.rank, ctx.world_size)
        (False, (8, 16))
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self):
        """Rank 0: the process that writes checkpoints, shows progress and reports."""
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def context():
    """The :class:`DistContext` of this process (from the active process group, else one process).

    Returns:
        a :class:`DistContext`.

    Example:
        >>> context()  # no process group: a single process
        DistContext(rank=0, world_size=1, local_rank=0, distributed=False)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return DistContext(rank=torch.distributed.get_rank(), world_size=world,
                           local_rank=_env_int("LOCAL_RANK", 0), distributed=world > 1)
    return DistContext()


def is_main_process():
    """True on rank 0 and in a single process: where to print, plot and write files.

    Returns:
        bool.

    Example:
        >>> if is_main_process():
        ...     print("only rank 0 prints this")
        only rank 0 prints this
    """
    return context().is_main


def init_distributed(backend="auto", timeout_s=None):
    """Join the process group described by ``torchrun``'s environment; a no-op without it.

    Args:
        backend: ``"auto"`` (NCCL for CUDA tensors and gloo for CPU tensors when a GPU is
            present, else gloo), or any backend string of ``torch.distributed.init_process_group``.
        timeout_s: seconds a collective waits for the other ranks before failing (None:
            ``PYMKS_VAE_DIST_TIMEOUT`` from the environment, else :data:`DEFAULT_TIMEOUT_S`).

    Returns:
        the :class:`DistContext` of this process. With ``WORLD_SIZE`` unset or 1 no process group
        is created and the context is that of a single process.

    Raises:
        RuntimeError: ``torch.distributed`` is not available in this torch build.
        ValueError: a bad ``timeout_s`` or environment variable.

    Example:
        >>> ctx = init_distributed()  # outside torchrun: nothing to join
        >>> ctx.world_size, ctx.is_main
        (1, True)
        >>> shutdown()  # pairs with init_distributed at the end of a script; a no-op here
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return context()
    if not torch.distributed.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for {world} processes, but this torch has no torch.distributed")
    if timeout_s is None:
        timeout_s = float(os.environ.get("PYMKS_VAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "auto":
        # One backend per device type, so a CPU run (device="cpu") on a GPU node still works.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return context()


def shutdown():
    """Leave the process group (when there is one); safe to call more than once.

    Example:
        >>> shutdown(); shutdown()  # without a process group: nothing to leave
        >>> torch.distributed.is_initialized()
        False
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Free what still holds the group (a DDP wrapper left in a reference cycle) while the group
        # exists, rather than at some later collection or at interpreter exit.
        import gc

        gc.collect()
        torch.distributed.destroy_process_group()


def shard_bounds(n, rank, world_size):
    """This rank's contiguous share ``[start, stop)`` of ``n`` items (shares differ by at most one).

    Args:
        n: number of items (a global batch).
        rank, world_size: as in :class:`DistContext`.

    Returns:
        ``(start, stop)``.

    Example:
        >>> [shard_bounds(10, rank, 3) for rank in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    q, r = divmod(int(n), int(world_size))
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def all_reduce_sum(tensor, ctx):
    """Sum ``tensor`` over the ranks in place (nothing to do for one process); returns it.

    Args:
        tensor: this rank's value.
        ctx: the :class:`DistContext`.

    Returns:
        ``tensor``, now holding the sum over the ranks.

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]), context())
        tensor([1., 2.])
    """
    if ctx.distributed:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag, ctx, device):
    """Rank 0's boolean ``flag`` on every rank (``flag`` itself for one process).

    Args:
        flag: this rank's value (only rank 0's counts).
        ctx: the :class:`DistContext`.
        device: where the collective's tensor lives (the backend's device).

    Returns:
        bool.

    Example:
        >>> broadcast_flag(True, context(), "cpu")
        True
    """
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


# ----------------------------------------------------------------------------- BatchNorm
class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient: the sum over ranks of the output's gradients (every
    rank's loss depends on every rank's input through the total)."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad


def _global_batch_norm(bn, x):
    """BatchNorm of ``x`` with the mean and variance of the global batch (every rank's share).

    One differentiable all-reduce of ``[sum d, sum d^2, count]`` per channel, ``d = x - K`` with
    ``K`` the running mean (the same on every rank): shifting by a value near the mean keeps
    ``E[d^2] - E[d]^2`` free of cancellation. Its backward sums the gradients of those totals over
    the ranks, so each rank's inputs get the gradient of the global batch's normalisation.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.ndim))
    shape = (1, c) + (1,) * (x.ndim - 2)
    dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 under autocast too
    xf = x.to(dtype)
    shift = bn.running_mean.detach().to(dtype) if bn.running_mean is not None else xf.new_zeros(c)
    d = xf - shift.reshape(shape)
    count = xf.new_full((1,), float(x.numel() // c))
    totals = _SumOverRanks.apply(torch.cat([d.sum(dims), (d * d).sum(dims), count]))
    n = totals[2 * c]
    mean_d = totals[:c] / n
    var = (totals[c : 2 * c] / n - mean_d * mean_d).clamp_min(0.0)
    mean = shift + mean_d
    y = (xf - mean.reshape(shape)) * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.affine:
        y = y * bn.weight.to(dtype).reshape(shape) + bn.bias.to(dtype).reshape(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            # momentum None means a cumulative average, as in torch's BatchNorm
            f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype), alpha=f)
            bn.running_var.mul_(1 - f).add_(unbiased.to(bn.running_var.dtype), alpha=f)
    return y.to(x.dtype)


class _GlobalStatistics:
    """Mixin: in training mode inside a process group of several ranks, normalise with the
    global batch's statistics; otherwise exactly the parent BatchNorm."""

    def forward(self, x):
        use_batch_stats = self.training or self.running_mean is None
        if not (use_batch_stats and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        return _global_batch_norm(self, x)


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising with the statistics of the global batch (see module docs)."""


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising with the statistics of the global batch (see module docs)."""


class GlobalBatchNorm3d(_GlobalStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` normalising with the statistics of the global batch (see module docs)."""


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


@contextlib.contextmanager
def global_batchnorm(model):
    """Within the block, the BatchNorm layers of ``model`` normalise over the global batch.

    The layers change class in place (to :class:`GlobalBatchNorm2d` etc.), keeping their
    parameters, buffers and state-dict keys, and change back on exit, so checkpoints and the
    model handed back are those of plain BatchNorm. Layers of other BatchNorm subclasses are left
    as they are, with a warning (their statistics stay per rank). Outside a process group of
    several ranks the layers compute exactly what plain BatchNorm does.

    Args:
        model: an ``nn.Module``.

    Yields:
        the number of layers converted.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> with global_batchnorm(model) as n:
        ...     n, type(model[1]).__name__
        (1, 'GlobalBatchNorm2d')
        >>> type(model[1]).__name__
        'BatchNorm2d'
    """
    swapped = []
    for name, m in model.named_modules():
        cls = type(m)
        if cls in _GLOBAL:
            m.__class__ = _GLOBAL[cls]
            swapped.append((m, cls))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and cls not in _GLOBAL.values():
            warnings.warn(f"global_batchnorm: {name} is a {cls.__name__}, left with per-rank batch statistics",
                          stacklevel=3)
    try:
        yield len(swapped)
    finally:
        for m, cls in swapped:
            m.__class__ = cls


# ----------------------------------------------------------------------------- failures
def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # no store reachable (e.g. the rank hosting it is gone): no message then
        return None


def _failure_elsewhere(ctx):
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_FAILURE_KEY]):
            message = store.get(_FAILURE_KEY).decode("utf-8", "replace")
            if not message.startswith(f"rank {ctx.rank}:"):
                return message
    except Exception:
        return None
    return None


def _publish_failure(ctx, exc):
    store = _store()
    if store is None:
        return
    text = f"rank {ctx.rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        # the first failure is the cause; later ones (the others stopping) must not overwrite it
        store.compare_set(_FAILURE_KEY, "", text)
    except Exception:
        pass


class _StoppedByLauncher(BaseException):
    """SIGTERM arrived: torchrun stops the remaining workers this way once one has failed."""


def _raise_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report below must not be cut short
    raise _StoppedByLauncher("stopped by SIGTERM from the launcher")


@contextlib.contextmanager
def _sigterm_raises():
    # torchrun SIGTERMs the healthy ranks at its first check after one fails; without this a rank
    # still busy in a step (or between its failed collective and its report) dies silently. Only
    # the default handler is replaced, and only where Python allows it (the main thread).
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if install:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    yield install
    # Restored only on success: a failing rank keeps ignoring SIGTERM until it has printed its
    # traceback and exited (torchrun SIGKILLs a worker that outlives its grace period).
    if install:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def stop_together(ctx):
    """Make a failure of one rank stop every rank, each saying why.

    A rank whose own code raises records ``"rank R: Type: message"`` in the process group's store
    and re-raises (its non-zero exit lets ``torchrun`` stop the others). A rank whose collective
    fails meanwhile (the peer's connection closed, or the group's timeout passed), or which the
    launcher stops with SIGTERM, raises :class:`DistributedRunError` naming the failed rank. From
    that point the process ignores SIGTERM, so that its traceback is printed before it exits
    (unless a SIGTERM handler of the caller's was in place: it is left alone throughout).

    Args:
        ctx: this process's :class:`DistContext`; for one process the block runs unchanged.

    Yields:
        None.

    Example:
        >>> ctx = init_distributed()
        >>> with stop_together(ctx):  # under torchrun a failure here stops every rank
        ...     loss = all_reduce_sum(torch.ones(1), ctx)
        >>> loss
        tensor([1.])
    """
    if not ctx.distributed:
        yield
        return
    with _sigterm_raises() as installed:
        try:
            yield
        except BaseException as exc:
            if installed:  # a SIGTERM from here on must not cut the report short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            other = _failure_elsewhere(ctx)
            if other is not None:
                raise DistributedRunError(
                    f"rank {ctx.rank} of {ctx.world_size} stops: another rank failed first ({other})"
                ) from exc
            if isinstance(exc, _StoppedByLauncher):
                raise DistributedRunError(
                    f"rank {ctx.rank} of {ctx.world_size} stops: the launcher sent SIGTERM and no rank "
                    "recorded a failure") from exc
            if isinstance(exc, getattr(torch.distributed, "DistError", ())) or "gloo" in str(exc).lower():
                _publish_failure(ctx, exc)
                raise DistributedRunError(
                    f"rank {ctx.rank} of {ctx.world_size} stops: a collective failed - another rank stopped "
                    f"or its connection was lost ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
            _publish_failure(ctx, exc)
            raise
