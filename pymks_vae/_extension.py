"""Loads the compiled extension ``pymks_vae._C`` once, and says what it holds.

If the module is missing (not built yet, or built for another torch), the package still
imports: every op falls back to the pure-torch reference in :mod:`pymks_vae.reference`, and
one warning says so.
"""
import contextlib
import threading
import warnings

import torch

_C = None
_LOAD_ERROR = None
_WARNED = False

try:
    from pymks_vae import _C  # noqa: F401  (registers the torch.ops.pymks_vae.* kernels)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = exc


def has_extension():
    """True when the compiled kernels are loaded."""
    return _C is not None


# Read once: torch.compile cannot trace a call into the pybind module, and ops._use_compiled asks
# this on every call.
_HAS_CUDA_KERNELS = _C is not None and bool(_C.build_info()["cuda"])


def has_cuda_kernels():
    """True when the compiled module holds CUDA kernels (whether or not a GPU is present)."""
    return _HAS_CUDA_KERNELS


def warn_fallback():
    """Warn once that the pure-torch reference is used instead of the compiled kernels."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "pymks_vae._C is not available "
            f"({_LOAD_ERROR}); falling back to the pure-torch reference ops, which are slower. "
            "Build it with `make build` (or `python setup.py build_ext --inplace`).",
            RuntimeWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def one_thread_per_task():
    """Run torch's CPU work of the calling thread on that thread alone, when it is a worker thread.

    Dask's threaded scheduler (and a dask.distributed worker) already runs one task per core;
    if each task also fanned out over torch's intra-op threads (OpenMP loops, MKL FFTs), the
    cores would be oversubscribed and every task slower. Inside this context the calling
    thread's OpenMP and MKL limits are 1, and they are put back on exit. Only this thread is
    affected - ``torch.get_num_threads()`` elsewhere is unchanged - and on the main thread (dask's
    synchronous scheduler, plain numpy calls) nothing changes, so a lone task keeps every core.

    Example:
        >>> from pymks_vae._extension import one_thread_per_task
        >>> with one_thread_per_task():
        ...     pass
    """
    if _C is None or threading.current_thread() is threading.main_thread():
        yield
        return
    prev_omp, prev_mkl = _C._set_thread_limits(1, 1)
    try:
        yield
    finally:
        _C._set_thread_limits(prev_omp, prev_mkl)


def build_info():
    """Describe what this installation of pymks-vae was built with.

    Returns:
        dict with keys ``compiled`` (bool: is ``pymks_vae._C`` loaded), ``cpu`` and ``cuda``
        (bool: which kernel backends were compiled), ``cuda_archs`` (list of str, e.g.
        ``["8.0", "9.0"]``), ``torch_version`` (the torch the extension was built against),
        ``cuda_version`` (the CUDA it was built with, or None), ``torch_runtime`` (the torch now
        imported), ``cuda_available`` (is a GPU usable right now) and ``cpu_count_kernel`` (the
        kernel that counts binary fields exactly on this CPU: ``"avx512"``, ``"avx2"``,
        ``"popcnt"`` or ``"generic"``; None without the extension; see docs/two_point_stats.md).

    Example:
        >>> import pymks_vae
        >>> info = pymks_vae.build_info()
        >>> info["compiled"], sorted(info)[:4]
        (True, ['compiled', 'cpu', 'cpu_count_kernel', 'cuda'])
    """
    info = {
        "compiled": _C is not None,
        "cpu": False,
        "cuda": False,
        "cuda_archs": [],
        "torch_version": None,
        "cuda_version": None,
        "cpu_count_kernel": None,
    }
    if _C is not None:
        raw = _C.build_info()
        info.update(
            cpu=bool(raw["cpu"]),
            cuda=bool(raw["cuda"]),
            cuda_archs=[a for a in str(raw["cuda_archs"]).replace(",", ";").split(";") if a],
            torch_version=str(raw["torch_version"]),
            cuda_version=raw["cuda_version"] or None,
            cpu_count_kernel=str(raw["cpu_count_kernel"]),
        )
    else:
        info["error"] = str(_LOAD_ERROR)
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
