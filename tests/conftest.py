"""Shared fixtures: fresh seeds, devices, and the CUDA auto-skip.

Tests that need a GPU take the ``cuda`` marker (or the ``device`` fixture's "cuda" value); they
skip only when no GPU is present, and fail where a GPU is present but the CUDA kernels are not.
Otherwise only tests that need a package missing on the lent GPU machine (dask, distributed,
pymks) skip, saying so.
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (skipped when none is present)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="CUDA test: no GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def stable_seed(nodeid):
    """A seed from a test's id that is the same in every run.

    Python's ``hash()`` of a string changes from one interpreter to the next (PYTHONHASHSEED), so a
    failure seen once - on a GPU machine lent for minutes - would not come back on a rerun.

    Args:
        nodeid: the pytest node id, e.g. ``tests/test_loss.py::test_gradcheck[...]``.

    Returns:
        an int in [0, 2**31).
    """
    return zlib.crc32(nodeid.encode("utf-8")) % (2**31)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (from its id) so inputs are fresh but reproducible."""
    seed = stable_seed(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed % (2**32 - 1))
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _cuda_kernels_only(request, monkeypatch):
    """On a GPU, a CUDA test runs the compiled CUDA kernels or fails - it never skips, and never
    passes on the pure-torch reference, which would hide a failed CUDA build."""
    if request.node.get_closest_marker("cuda") is None:
        yield
        return
    import pymks_vae
    from pymks_vae import _extension

    if not _extension.has_cuda_kernels():
        pytest.fail(f"a GPU is present but the CUDA kernels are not built: build_info() = {pymks_vae.build_info()}")

    def no_fallback():
        raise AssertionError("a CUDA test fell back to the pure-torch reference instead of the CUDA kernels")

    monkeypatch.setattr(_extension, "warn_fallback", no_fallback)
    yield


@pytest.fixture
def rng(request):
    return np.random.default_rng(stable_seed(request.node.nodeid))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)
