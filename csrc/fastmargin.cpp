// fastmargin._C: the one binding file, the only source that includes torch/extension.h
// (STYLE "What we take"). CUDA kernels take plain pointers (csrc/cuda/margin_ce.h): this
// file checks, allocates, computes the norms, plans and launches them, and merges their
// partial results in a fixed order. The CPU kernel uses ATen for its GEMMs and thread pool,
// and its header declares only ATen types. The CUDA launch plan (csrc/cuda/launch_plan.h)
// is plain C++ and bound in every build, so CPU-only CI tests it.

#include <torch/extension.h>
#include <torch/version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef FASTMARGIN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "cuda/margin_ce.h"
#endif

#include <string>
#include <tuple>

#include "cpu/margin_ce.h"
#include "cuda/launch_plan.h"
#include "margin.h"

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

namespace cu = fastmargin::cuda;

cu::DType dtype_from_name(const std::string& name) {
  if (name == "float16") return cu::DType::kFloat16;
  if (name == "bfloat16") return cu::DType::kBFloat16;
  if (name == "float32") return cu::DType::kFloat32;
  if (name == "float64") return cu::DType::kFloat64;
  throw std::invalid_argument("fastmargin cuda: dtype must be float16, bfloat16, float32 or float64, got " + name);
}

pybind11::dict plan_dict(const cu::LaunchPlan& p) {
  auto grid = [](const int64_t* g) { return pybind11::make_tuple(g[0], g[1], g[2]); };
  pybind11::dict d;
  d["operand"] = cu::operand_name(p.operand);
  d["tensor_cores"] = p.operand != cu::Operand::kFloat32 && p.operand != cu::Operand::kFloat64;
  d["block_b"] = p.tile.block_b;
  d["block_n"] = p.tile.block_n;
  d["block_k"] = p.tile.block_k;
  d["block_do"] = p.tile.block_do;
  d["block_c"] = p.block_c;
  d["row_blocks"] = p.row_blocks;
  d["class_tiles"] = p.class_tiles;
  d["d_blocks"] = p.d_blocks;
  d["split_size"] = p.split_size;
  d["splits"] = p.splits;
  d["fwd_grid"] = grid(p.fwd_grid);
  d["dx_grid"] = grid(p.dx_grid);
  d["dw_grid"] = grid(p.dw_grid);
  d["threads"] = cu::kThreads;
  d["fwd_smem"] = p.fwd_smem;
  d["dx_smem"] = p.dx_smem;
  d["dw_smem"] = p.dw_smem;
  return d;
}

// The CUDA kernels' launch plan for a problem (csrc/cuda/launch_plan.h), in every build: the
// host logic that sizes the GPU launches, testable without a GPU.
pybind11::dict cuda_launch_plan(int64_t B, int64_t C, int64_t D, int64_t K, const std::string& x_dtype,
                                const std::string& w_dtype, bool allow_tf32, int64_t arch, int64_t num_sms,
                                int64_t chunk, int64_t max_smem) {
  return plan_dict(cu::make_launch_plan(B, C, D, K, dtype_from_name(x_dtype), dtype_from_name(w_dtype), allow_tf32,
                                        static_cast<int>(arch), num_sms, chunk, max_smem));
}

#ifdef FASTMARGIN_WITH_CUDA

cu::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cu::DType::kFloat16;
    case at::kBFloat16: return cu::DType::kBFloat16;
    case at::kFloat: return cu::DType::kFloat32;
    case at::kDouble: return cu::DType::kFloat64;
    default: TORCH_CHECK(false, "fastmargin cuda: x and w must be float16, bfloat16, float32 or float64, got ",
                         t.scalar_type());
  }
}

cu::Matrix matrix(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), dtype_of(t)}; }

// One call's checks, plan, norms and the pointers every kernel reads (the tensors they
// point into are kept here).
struct CudaCall {
  at::ScalarType type;  // the compute dtype: float64 if x or w is, else float32
  cu::LaunchPlan plan;
  cu::MarginCeArgs args{};
  at::Tensor labels, x_norm, x_inv_norm, w_norm, w_inv_norm;

  CudaCall(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels_, double scale, double m1, double m2,
           double m3, int64_t sphere_m, double sphere_lambda, bool clamp_theta, bool detached, int64_t sub_centers,
           int64_t chunk) {
    TORCH_CHECK(x.is_cuda() && w.is_cuda() && labels_.is_cuda(), "fastmargin cuda: every tensor must be on a CUDA "
                "device, got x on ", x.device(), ", w on ", w.device(), ", labels on ", labels_.device());
    TORCH_CHECK(x.device() == w.device() && w.device() == labels_.device(),
                "fastmargin cuda: x, w and labels must be on one device, got ", x.device(), ", ", w.device(), ", ",
                labels_.device());
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1),
                "fastmargin cuda: x must be (B, D) and w (C*K, D), got ", x.sizes(), " and ", w.sizes());
    TORCH_CHECK(sub_centers >= 1 && w.size(0) % sub_centers == 0 && w.size(0) >= sub_centers, "fastmargin cuda: w has ",
                w.size(0), " rows, not a positive multiple of sub_centers=", sub_centers);
    TORCH_CHECK(labels_.scalar_type() == at::kLong && labels_.dim() == 1 && labels_.size(0) == x.size(0),
                "fastmargin cuda: labels must be int64 of shape (", x.size(0), ",)");
    type = (x.scalar_type() == at::kDouble || w.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
    const int64_t B = x.size(0), D = x.size(1);
    if (B == 0) return;
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.device().index());
    plan = cu::make_launch_plan(B, w.size(0) / sub_centers, D, sub_centers, dtype_of(x), dtype_of(w),
                                at::globalContext().allowTF32CuBLAS(), prop->major * 10 + prop->minor,
                                prop->multiProcessorCount, chunk, static_cast<int64_t>(prop->sharedMemPerBlockOptin));
    labels = labels_.contiguous();
    x_norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, type);
    x_inv_norm = x_norm.clamp_min(fastmargin::kNormEps).reciprocal();
    w_norm = at::linalg_vector_norm(w, 2, at::IntArrayRef{1}, false, type);
    w_inv_norm = w_norm.clamp_min(fastmargin::kNormEps).reciprocal();
    args.x = matrix(x);
    args.w = matrix(w);
    args.labels = labels.data_ptr<int64_t>();
    args.x_norm = x_norm.data_ptr();
    args.x_inv_norm = x_inv_norm.data_ptr();
    args.w_norm = w_norm.data_ptr();
    args.w_inv_norm = w_inv_norm.data_ptr();
    args.scale = scale;
    args.margin = fastmargin::make_margin_params(m1, m2, m3, static_cast<int>(sphere_m), sphere_lambda, clamp_theta,
                                                 detached);
  }

  at::Tensor buffer(at::IntArrayRef shape) const { return at::empty(shape, x_norm.options()); }
};

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastmargin cuda: launching the ", what, " kernels failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_forward(const at::Tensor& x, const at::Tensor& w,
                                                            const at::Tensor& labels, double scale, double m1,
                                                            double m2, double m3, int64_t sphere_m,
                                                            double sphere_lambda, bool clamp_theta, bool detached,
                                                            int64_t sub_centers, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaCall call(x, w, labels, scale, m1, m2, m3, sphere_m, sphere_lambda, clamp_theta, detached, sub_centers, chunk);
  if (x.size(0) == 0) {
    const auto empty = at::empty({0}, x.options().dtype(call.type));
    return {empty, empty.clone(), empty.clone()};
  }
  const int64_t B = x.size(0), splits = call.plan.splits;
  at::Tensor row_max = call.buffer({splits, B}), row_sum_exp = call.buffer({splits, B});
  at::Tensor z_sum = call.buffer({splits, B}), z_target = call.buffer({splits, B});
  call.args.row_max = row_max.data_ptr();
  call.args.row_sum_exp = row_sum_exp.data_ptr();
  call.args.z_sum = z_sum.data_ptr();
  call.args.z_target = z_target.data_ptr();
  check_launch(cu::margin_ce_forward(call.plan, call.args, at::cuda::getCurrentCUDAStream()), "forward");
  // The fixed-order merge of the splits: lse = M + log Σ_s l_s exp(m_s - M).
  const at::Tensor top = row_max.amax(0);
  const at::Tensor lse = top + (row_sum_exp * (row_max - top).exp()).sum(0).log();
  const at::Tensor z_sum_all = z_sum.sum(0);
  // A NaN logit can vanish from the running max; z_sum keeps it.
  return {at::where(z_sum_all.isnan(), z_sum_all, lse), z_target.sum(0), z_sum_all};
}

std::tuple<at::Tensor, at::Tensor> cuda_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                 const at::Tensor& grad_sum, const at::Tensor& x, const at::Tensor& w,
                                                 const at::Tensor& labels, const at::Tensor& lse, double scale,
                                                 double m1, double m2, double m3, int64_t sphere_m,
                                                 double sphere_lambda, bool clamp_theta, bool detached,
                                                 int64_t sub_centers, int64_t chunk) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaCall call(x, w, labels, scale, m1, m2, m3, sphere_m, sphere_lambda, clamp_theta, detached, sub_centers, chunk);
  // Gradients laid out like their inputs (empty_like keeps a dense tensor's strides: PML's
  // W.t() gets a gradient whose .t() is contiguous); the dW kernel writes along dw's strides.
  at::Tensor dw = at::empty_like(w);
  if (x.size(0) == 0) return {at::empty_like(x), dw.zero_()};
  // The gradient of loss.sum() arrives with stride 0: the kernels read contiguous vectors.
  const at::Tensor lse_c = lse.to(call.type).contiguous(), g_lse = grad_lse.to(call.type).contiguous();
  const at::Tensor g_target = grad_target.to(call.type).contiguous(), g_sum = grad_sum.to(call.type).contiguous();
  const int64_t B = x.size(0), D = x.size(1), splits = call.plan.splits;
  at::Tensor dx_hat = call.buffer({splits, B, D}), norm_grad = call.buffer({splits, B});
  cu::MarginCeArgs& a = call.args;
  a.lse = lse_c.data_ptr();
  a.g_lse = g_lse.data_ptr();
  a.g_target = g_target.data_ptr();
  a.g_sum = g_sum.data_ptr();
  a.dx_hat = dx_hat.data_ptr();
  a.norm_grad = norm_grad.data_ptr();
  a.dw = dw.data_ptr();
  a.stride_dwn = dw.stride(0);
  a.stride_dwd = dw.stride(1);
  a.dw_dtype = dtype_of(dw);
  check_launch(cu::margin_ce_backward(call.plan, a, at::cuda::getCurrentCUDAStream()), "backward");
  // dx_i = (dx̂_i - x̂_i a_i) / n_i, a_i = <x̂_i, dx̂_i> (0 below kNormEps, as for dW), plus
  // SphereFace's gradient through S_i = s ||x_i||: s Σ_j dz_ij zc_ij x_i / ||x_i||.
  const at::Tensor dx_hat_all = dx_hat.sum(0);
  const at::Tensor x_c = x.to(call.type);
  const at::Tensor inv = call.x_inv_norm.unsqueeze(1);
  const at::Tensor x_hat = x_c * inv;
  const at::Tensor radial = at::where(call.x_norm < fastmargin::kNormEps, at::zeros_like(call.x_norm),
                                      (x_hat * dx_hat_all).sum(1));
  at::Tensor dx = (dx_hat_all - x_hat * radial.unsqueeze(1)) * inv;
  if (sphere_m) {
    const at::Tensor per_row = at::where(call.x_norm > 0, scale * norm_grad.sum(0) / call.x_norm,
                                         at::zeros_like(call.x_norm));
    dx = dx + x_c * per_row.unsqueeze(1);
  }
  return {at::empty_like(x).copy_(dx), dw};
}

#endif  // FASTMARGIN_WITH_CUDA

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
  m.def("cuda_launch_plan", &cuda_launch_plan,
        "The CUDA kernels' launch plan (csrc/cuda/launch_plan.h) as a dict: operand, tiles, grids, splits, "
        "shared memory. Raises ValueError when the kernels cannot run the problem.",
        pybind11::arg("B"), pybind11::arg("C"), pybind11::arg("D"), pybind11::arg("K"), pybind11::arg("x_dtype"),
        pybind11::arg("w_dtype"), pybind11::arg("allow_tf32"), pybind11::arg("arch"), pybind11::arg("num_sms"),
        pybind11::arg("chunk"), pybind11::arg("max_smem"));
#ifdef FASTMARGIN_WITH_CUDA
  m.def("cuda_forward", &cuda_forward,
        "Fused margin logits' row statistics on a CUDA device: (lse, z_target, z_sum), each (B,) (csrc/cuda/margin_ce.h).");
  m.def("cuda_backward", &cuda_backward,
        "Their backward: (dx, dw) from the statistics' gradients (csrc/cuda/margin_ce_bwd.cu).");
#endif
  m.def("build_info", &build_info,
        "How fastmargin._C was compiled: CUDA and its version, OpenMP, compiler, torch.");
}
