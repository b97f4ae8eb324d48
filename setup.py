"""Build pymks-vae and its one extension module, ``pymks_vae._C``.

CPU kernels are always built. CUDA kernels are built whenever nvcc (CUDA_HOME) and a CUDA
build of torch are present - a GPU is not needed to compile them. Environment switches:

* ``USE_CUDA=0``   never build the CUDA kernels.
* ``FORCE_CUDA=1`` build them, and fail loudly if that is impossible.
* ``TORCH_CUDA_ARCH_LIST`` the GPU architectures (default ``8.0;9.0`` when no GPU is visible).
* ``MAX_JOBS``     parallel compile jobs for ninja.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# torch finds CUDA from CUDA_HOME, else from the nvcc on PATH - which can be a wrapper outside the
# toolkit (no lib64/libcudart next to it). Prefer the standard toolkit location when unset.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_wanted():
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False, "USE_CUDA=0"
    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if _flag("FORCE_CUDA"):
        if not (have_nvcc and have_cuda_torch):
            sys.exit(
                "setup.py: FORCE_CUDA=1 but CUDA cannot be built "
                f"(CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r})"
            )
        return True, "FORCE_CUDA=1"
    if not have_nvcc:
        return False, "no nvcc found (set CUDA_HOME)"
    if not have_cuda_torch:
        return False, "torch is a CPU-only build"
    return True, f"nvcc at {cpp_extension.CUDA_HOME} and torch built with CUDA {torch.version.cuda}"


def _extra_cuda_includes():
    # torch's CUDA headers include cuBLAS/cuSPARSE/cuFFT headers that ship in the nvidia wheels,
    # not always in CUDA_HOME; add every nvidia/*/include found next to torch.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def _extension():
    with_cuda, why = _cuda_wanted()
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/two_point_driver.cpp", "csrc/stats_loss_driver.cpp",
               "csrc/transforms.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    archs = ""
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native GPU")
        define_macros.append(("PYMKS_VAE_WITH_CUDA", "1"))
        define_macros.append(("PYMKS_VAE_CUDA_VERSION", '"' + str(torch.version.cuda) + '"'))
        include_dirs += _extra_cuda_includes()
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    define_macros.append(("PYMKS_VAE_CUDA_ARCHS", '"' + archs.replace(" ", "") + '"'))
    print(f"pymks-vae setup: building pymks_vae._C with CPU kernels"
          + (f" and CUDA kernels for archs [{archs}] ({why})" if with_cuda else f"; CUDA skipped ({why})"))
    for src in sources:
        print(f"pymks-vae setup:   {src}")
    return ext_cls(
        name="pymks_vae._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
    )


# Runtime dependencies, unpinned: an install goes into the user's environment, whose torch (and
# its CUDA) must be kept - requirements.txt pins the project's own development stack instead.
INSTALL_REQUIRES = [
    "torch",
    "numpy",
    "scipy",
    "dask[array]",
    "xarray",
    "scikit-learn",
    "tqdm",
    "matplotlib",
]
EXTRAS_REQUIRE = {
    # pymks 0.4.1 (the released version) imports pkg_resources (setuptools<80) and dask.dataframe
    # (pandas, pyarrow), and needs toolz and Deprecated, none of which its sdist declares.
    "pymks": ["pymks==0.4.1", "setuptools<80", "pandas", "pyarrow", "toolz", "Deprecated"],
    # VAETransformer.transform on a dask.distributed cluster.
    "distributed": ["distributed"],
}


def _long_description():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="pymks-vae",
    version="0.1.0",
    description="Latent representations of microstructures learned in spatial-statistics space",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["pymks_vae", "pymks_vae.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
