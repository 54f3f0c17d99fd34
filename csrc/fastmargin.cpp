// fastmargin._C: the one binding file, the only source that includes torch/extension.h
// (STYLE "What we take"). CUDA kernels take plain pointers; the CPU kernel uses ATen for
// its GEMMs and thread pool, and its header declares only ATen types.

#include <torch/extension.h>
#include <torch/version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef FASTMARGIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <string>
#include <tuple>

#include "cpu/margin_ce.h"

namespace {

// The flat option list of fastmargin/fused.py's OPTIONS_SCHEMA, in its order.
fastmargin::LossOptions loss_options(double scale, double m1, double m2, double m3, int64_t sphere_m,
                                     double sphere_lambda, bool clamp_theta, bool detached, int64_t sub_centers,
                                     int64_t chunk) {
  return {scale, m1, m2, m3, sphere_m, sphere_lambda, clamp_theta, detached, sub_centers, chunk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                           const at::Tensor& labels, double scale, double m1,
                                                           double m2, double m3, int64_t sphere_m,
                                                           double sphere_lambda, bool clamp_theta, bool detached,
                                                           int64_t sub_centers, int64_t chunk) {
  return fastmargin::margin_ce_cpu_forward(
      x, w, labels, loss_options(scale, m1, m2, m3, sphere_m, sphere_lambda, clamp_theta, detached, sub_centers, chunk));
}

std::tuple<at::Tensor, at::Tensor> cpu_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                const at::Tensor& grad_sum, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& labels, const at::Tensor& lse, double scale,
                                                double m1, double m2, double m3, int64_t sphere_m,
                                                double sphere_lambda, bool clamp_theta, bool detached,
                                                int64_t sub_centers, int64_t chunk) {
  return fastmargin::margin_ce_cpu_backward(
      grad_lse, grad_target, grad_sum, x, w, labels, lse,
      loss_options(scale, m1, m2, m3, sphere_m, sphere_lambda, clamp_theta, detached, sub_centers, chunk));
}

// How this binary was compiled, read by fastmargin/_extension.py so that dispatch
// and `python -m fastmargin` can say why a backend is missing.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTMARGIN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_reason"] = FASTMARGIN_NO_CUDA_REASON;  // setup.py's decision, in words
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  // Read at call time: torch.set_num_threads changes it when both share one runtime.
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  // GCC's __VERSION__ is the bare number; Clang's names itself.
#if defined(__GNUC__) && !defined(__clang__)
  info["compiler"] = "GCC " __VERSION__;
#else
  info["compiler"] = __VERSION__;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_forward", &cpu_forward,
        "Fused margin logits' row statistics on the CPU: (lse, z_target, z_sum), each (B,) (csrc/cpu/margin_ce.h).");
  m.def("cpu_backward", &cpu_backward,
        "Their backward: (dx, dw) from the statistics' gradients (csrc/cpu/margin_ce.h).");
  m.def("build_info", &build_info,
        "How fastmargin._C was compiled: CUDA and its version, OpenMP, compiler, torch.");
}
