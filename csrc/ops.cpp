// The schemas of every pymks-vae operator, declared once, and the module's build information.
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and
// autograd formulas are attached in Python (pymks_vae/ops.py).
#include <torch/extension.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#ifndef PYMKS_VAE_CUDA_ARCHS
#define PYMKS_VAE_CUDA_ARCHS ""
#endif
#ifndef PYMKS_VAE_CUDA_VERSION
#define PYMKS_VAE_CUDA_VERSION ""
#endif

TORCH_LIBRARY(pymks_vae, m) {
  // Two-point statistics of x (B, n_state, *spatial) for pairs (pair_i[k], pair_j[k]) on a window
  // of lags (one size per spatial axis). partition: 0 off, 1 trust, 2 check.
  m.def(
      "two_point_stats(Tensor x, int[] pair_i, int[] pair_j, bool periodic, int[] window, "
      "Tensor? mask, int partition) -> Tensor");
  m.def(
      "two_point_stats_backward(Tensor grad, Tensor x, int[] pair_i, int[] pair_j, bool periodic, "
      "int[] window, Tensor? mask) -> Tensor");
  // Per-sample squared distance between periodic statistics, and the gradient spectrum the
  // backward pass turns into d/dx with one inverse FFT.
  m.def(
      "stats_loss(Tensor x, Tensor target, int[] pair_i, int[] pair_j, float scale, bool need_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "stats_loss_backward(Tensor grad, Tensor spectrum, int[] spatial, int n_state, int[] states) "
      "-> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef PYMKS_VAE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::string(PYMKS_VAE_CUDA_VERSION);
#else
  d["cuda"] = false;
  d["cuda_version"] = pybind11::none();
#endif
  d["cuda_archs"] = std::string(PYMKS_VAE_CUDA_ARCHS);
  d["torch_version"] = std::string(TORCH_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymks-vae compiled kernels (operators live under torch.ops.pymks_vae)";
  m.def("build_info", &build_info, "What this extension was compiled with");
}
