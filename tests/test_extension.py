"""The compiled module: what build_info reports, and the pure-torch fallback when it is missing."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import pymks_vae
from pymks_vae import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_reports_the_compiled_backends():
    info = pymks_vae.build_info()
    assert info["compiled"] is True, info
    assert info["cpu"] is True
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["torch_runtime"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    for name in ["two_point_stats", "two_point_stats_backward", "two_point_stats_spectra",
                 "two_point_stats_backward_spectra", "stats_loss", "stats_loss_backward", "stats_loss_window",
                 "stats_loss_window_backward"]:
        assert isinstance(getattr(torch.ops.pymks_vae, name), torch._ops.OpOverloadPacket)
    if info["cuda"]:
        assert info["cuda_archs"], "CUDA kernels were built, so the archs must be recorded"
        assert info["cuda_version"] == torch.version.cuda
    # nvcc and a CUDA build of torch are here (CI included): setup.py must have built CUDA kernels
    if os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")) \
            and torch.version.cuda and os.environ.get("USE_CUDA") != "0":
        assert info["cuda"] is True
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            assert info["cuda_archs"] == ["8.0", "9.0"]


def test_import_without_compiled_module_falls_back_with_one_warning():
    # A fresh interpreter in which importing pymks_vae._C fails, as for an unbuilt checkout.
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["pymks_vae._C"] = None
        warnings.simplefilter("always")
        import torch, pymks_vae
        from pymks_vae import ops, reference
        info = pymks_vae.build_info()
        assert info["compiled"] is False and info["cpu"] is False and "error" in info, info
        x = torch.rand(2, 2, 9, 8, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            f = ops.two_point_stats(x, [(0, 1)], cutoff=3)
            l = ops.spatial_stats_loss(x, x.flip(-1), reduction="none")
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1 and "falling back" in msgs[0], msgs
        assert torch.allclose(f, reference.two_point_stats_ref(x, [(0, 1)], cutoff=3))
        assert torch.allclose(l, reference.spatial_stats_loss_ref(x, x.flip(-1), reduction="none"))
        print("FALLBACK-OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FALLBACK-OK" in res.stdout


def test_one_thread_per_task_limits_only_the_calling_worker_thread():
    import threading

    if not _extension.has_extension():
        pytest.fail("the compiled extension is expected in the test environment")
    main_before = torch.get_num_threads()
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        seen["before"] = torch.get_num_threads()
        with _extension.one_thread_per_task():
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main_meanwhile"] = torch.get_num_threads()
    release.set()
    t.join(10)
    assert seen["inside"] == 1
    assert seen["after"] == seen["before"]
    assert seen["main_meanwhile"] == main_before
    # On the main thread (numpy calls, dask's synchronous scheduler) nothing changes.
    with _extension.one_thread_per_task():
        assert torch.get_num_threads() == main_before


@pytest.mark.cuda
def test_cuda_kernels_built_for_this_gpu():
    """Where a GPU is present the CUDA kernels must be there, for its architecture, and registered:
    a CUDA build that failed or was skipped fails here instead of passing on the reference."""
    info = pymks_vae.build_info()
    assert info["compiled"] and info["cuda"], info
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        # Code for sm_X.y runs on any X.z with z >= y (and PTX is compiled on the fly).
        built = [tuple(map(int, re.match(r"(\d+)\.(\d+)", a).groups())) for a in info["cuda_archs"]]
        assert any(b[0] == major and b[1] <= minor for b in built), (f"GPU {i} is sm_{major}{minor}", info)
    for name in ["two_point_stats", "two_point_stats_backward", "two_point_stats_spectra",
                 "two_point_stats_backward_spectra", "stats_loss", "stats_loss_backward", "stats_loss_window",
                 "stats_loss_window_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pymks_vae::{name}", "CUDA"), name
