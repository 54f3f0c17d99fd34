// fastmargin._C: the one binding file, the only source that includes torch/extension.h
// (docs/design.md §5): it unpacks the ops' arguments and calls the kernels. The ops'
// inputs are checked once, by fastmargin/fused.py, before any backend runs; the compute
// dtype is the lowered margin's (params). CUDA kernels take plain pointers
// (csrc/cuda/margin_ce.h) and return per-split partial results to fastmargin/gpu_host.py,
// which merges them for both GPU backends. The CPU kernel uses ATen for its GEMMs and
// thread pool, and its header declares only ATen types. The CUDA launch plan
// (csrc/cuda/launch_plan.h) is plain C++ and bound in every build, so CPU-only CI tests it.

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
#include <vector>

#include "cpu/margin_ce.h"
#include "cuda/launch_plan.h"
#include "margin.h"

namespace {

// fastmargin.margins.Margin.flags: (kind, sphere_m, nontarget, detached).
fastmargin::MarginFlags margin_flags(const std::vector<int64_t>& flags) {
  TORCH_CHECK(flags.size() == 4, "fastmargin: margin flags are (kind, sphere_m, nontarget, detached), got ",
              flags.size(), " values");
  fastmargin::MarginFlags f;
  f.kind = static_cast<int>(flags[0]);
  f.sphere_m = static_cast<int>(flags[1]);
  f.nontarget = flags[2] != 0;
  f.detached = flags[3] != 0;
  return f;
}

// The ops' arguments after the tensors, in fastmargin/fused.py's OP_ARGS order. allow_tf32
// concerns the GPU backends' fp32 GEMMs: the CPU kernel's are ATen's, always exact.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                           const at::Tensor& labels, const at::Tensor& params,
                                                           const std::vector<int64_t>& flags, int64_t sub_centers,
                                                           int64_t chunk, bool /*allow_tf32*/) {
  return fastmargin::margin_ce_cpu_forward(x, w, labels, params, margin_flags(flags), sub_centers, chunk);
}

std::tuple<at::Tensor, at::Tensor> cpu_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                const at::Tensor& grad_sum, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& labels, const at::Tensor& lse,
                                                const at::Tensor& params, const std::vector<int64_t>& flags,
                                                int64_t sub_centers, int64_t chunk, bool /*allow_tf32*/) {
  return fastmargin::margin_ce_cpu_backward(grad_lse, grad_target, grad_sum, x, w, labels, lse, params,
                                            margin_flags(flags), sub_centers, chunk);
}

// psi, psi', the non-target transform and its derivative of csrc/margin.h (the code the
// CPU and CUDA kernels run) on a CPU tensor of cosines, in params' dtype, with column 0 of
// params: tests/test_margin_math.py holds them to the PyTorch and Triton twins.
std::vector<at::Tensor> margin_math(const at::Tensor& cos, const at::Tensor& params, const std::vector<int64_t>& flags) {
  TORCH_CHECK(cos.device().is_cpu() && params.device().is_cpu() && params.dim() == 2 &&
                  params.size(0) == fastmargin::kNumParams,
              "fastmargin margin_math: CPU tensors, params (", fastmargin::kNumParams, ", R)");
  const fastmargin::MarginFlags f = margin_flags(flags);
  const at::Tensor c = cos.to(params.scalar_type()).contiguous();
  std::vector<at::Tensor> out;
  for (int i = 0; i < 4; ++i) out.push_back(at::empty_like(c));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "margin_math", [&] {
    const at::Tensor p = params.contiguous();
    const auto m = fastmargin::margin_row(p.data_ptr<scalar_t>(), p.stride(0), int64_t(0), int64_t(0));
    const scalar_t* in = c.data_ptr<scalar_t>();
    scalar_t* v[4];
    for (int k = 0; k < 4; ++k) v[k] = out[k].data_ptr<scalar_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      v[0][i] = fastmargin::psi(in[i], m, f);
      v[1][i] = fastmargin::psi_grad(in[i], m, f);
      v[2][i] = fastmargin::nontarget(in[i], m);
      v[3][i] = fastmargin::nontarget_grad(in[i], m);
    }
  });
  return out;
}

// The enums the kernels share with fastmargin/margins.py (kind, params' rows), by name.
pybind11::dict margin_layout() {
  pybind11::dict kinds, params;
  kinds["ADDITIVE"] = int(fastmargin::kAdditive);
  kinds["ARC"] = int(fastmargin::kArc);
  kinds["COMBINED"] = int(fastmargin::kCombined);
  kinds["SPHERE"] = int(fastmargin::kSphere);
  const char* names[] = {"scale", "m1", "m2", "m3", "sphere_lambda", "cos_m2", "sin_m2", "cos_lo", "cos_hi",
                         "clamp_grad", "cos_theta_limit", "beyond_slope", "beyond_shift", "top_limit", "top_value",
                         "nt_lo", "nt_hi", "nt_a0", "nt_a1", "nt_a2"};
  static_assert(sizeof(names) / sizeof(names[0]) == fastmargin::kNumParams, "one name a param");
  namespace fm = fastmargin;
  const int rows[] = {fm::kScale, fm::kM1, fm::kM2, fm::kM3, fm::kSphereLambda, fm::kCosM2, fm::kSinM2,
                      fm::kCosLo, fm::kCosHi, fm::kClampGrad, fm::kCosThetaLimit, fm::kBeyondSlope,
                      fm::kBeyondShift, fm::kTopLimit, fm::kTopValue, fm::kNtLo, fm::kNtHi, fm::kNtA0,
                      fm::kNtA1, fm::kNtA2};
  for (int i = 0; i < fastmargin::kNumParams; ++i) params[names[i]] = rows[i];
  pybind11::dict layout;
  layout["kinds"] = kinds;
  layout["params"] = params;
  return layout;
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
  d["max_splits"] = p.max_splits;
  // The dx kernel's (splits, B, D) partial buffer, bounded by launch_plan.h's budget.
  d["dx_partial_bytes"] = p.splits * p.B * p.D * static_cast<int64_t>(cu::acc_bytes(p.operand));
  d["fwd_grid"] = grid(p.fwd_grid);
  d["dx_grid"] = grid(p.dx_grid);
  d["dw_grid"] = grid(p.dw_grid);
  d["threads"] = cu::kThreads;
  d["fwd_smem"] = p.fwd_smem;
  d["dx_smem"] = p.dx_smem;
  d["dw_smem"] = p.dw_smem;
  d["max_smem"] = p.max_smem;
  return d;
}

// The CUDA kernels' launch plan for a problem (csrc/cuda/launch_plan.h), in every build: the
// host logic that sizes the GPU launches, testable without a GPU. max_smem <= 0 takes the
// opt-in shared memory of a device of that arch from launch_plan.h's table.
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

// One call's plan and the pointers every kernel reads; the norms come from
// fastmargin/gpu_host.py, in the compute dtype (params').
struct CudaCall {
  cu::LaunchPlan plan;
  cu::MarginCeArgs args{};
  at::Tensor labels, params;

  CudaCall(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels_, const at::Tensor& x_norm,
           const at::Tensor& x_inv_norm, const at::Tensor& w_inv_norm, const at::Tensor& params_,
           const std::vector<int64_t>& flags, int64_t sub_centers, int64_t chunk, bool allow_tf32) {
    const int64_t B = x.size(0);
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.device().index());
    plan = cu::make_launch_plan(B, w.size(0) / sub_centers, x.size(1), sub_centers, dtype_of(x), dtype_of(w),
                                allow_tf32, prop->major * 10 + prop->minor, prop->multiProcessorCount, chunk,
                                static_cast<int64_t>(prop->sharedMemPerBlockOptin));
    labels = labels_.contiguous();
    params = params_;
    args.x = matrix(x);
    args.w = matrix(w);
    args.labels = labels.data_ptr<int64_t>();
    args.x_norm = x_norm.data_ptr();
    args.x_inv_norm = x_inv_norm.data_ptr();
    args.w_inv_norm = w_inv_norm.data_ptr();
    args.params = params.data_ptr();
    args.stride_param = params.stride(0);
    args.stride_row = params.size(1) == 1 ? 0 : params.stride(1);
    args.flags = margin_flags(flags);
  }

  at::Tensor buffer(at::IntArrayRef shape) const { return at::empty(shape, params.options()); }
};

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastmargin cuda: launching the ", what, " kernels failed: ",
              cudaGetErrorString(err));
}

// Per split s, (splits, B) each: the running max and sum of exp(z - max), Σ_j z_ij and z_iy
// over the split's classes; fastmargin/gpu_host.py merges them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& x_norm,
    const at::Tensor& x_inv_norm, const at::Tensor& w_inv_norm, const at::Tensor& params,
    const std::vector<int64_t>& flags, int64_t sub_centers, int64_t chunk, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaCall call(x, w, labels, x_norm, x_inv_norm, w_inv_norm, params, flags, sub_centers, chunk, allow_tf32);
  const int64_t B = x.size(0), splits = call.plan.splits;
  at::Tensor row_max = call.buffer({splits, B}), row_sum_exp = call.buffer({splits, B});
  at::Tensor z_sum = call.buffer({splits, B}), z_target = call.buffer({splits, B});
  call.args.row_max = row_max.data_ptr();
  call.args.row_sum_exp = row_sum_exp.data_ptr();
  call.args.z_sum = z_sum.data_ptr();
  call.args.z_target = z_target.data_ptr();
  check_launch(cu::margin_ce_forward(call.plan, call.args, at::cuda::getCurrentCUDAStream()), "forward");
  return {row_max, row_sum_exp, z_sum, z_target};
}

// (dx̂ per split (splits, B, D), Σ_j dz_ij zc_ij per split (splits, B), dw like w): the
// kernels' half of the backward; fastmargin/gpu_host.py sums the splits and finishes dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& g_lse, const at::Tensor& g_target, const at::Tensor& g_sum, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& x_norm,
    const at::Tensor& x_inv_norm, const at::Tensor& w_norm, const at::Tensor& w_inv_norm, const at::Tensor& params,
    const std::vector<int64_t>& flags, int64_t sub_centers, int64_t chunk, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaCall call(x, w, labels, x_norm, x_inv_norm, w_inv_norm, params, flags, sub_centers, chunk, allow_tf32);
  // Gradients laid out like their inputs (empty_like keeps a dense tensor's strides: PML's
  // W.t() gets a gradient whose .t() is contiguous); the dW kernel writes along dw's strides.
  at::Tensor dw = at::empty_like(w);
  const int64_t B = x.size(0), D = x.size(1), splits = call.plan.splits;
  at::Tensor dx_hat = call.buffer({splits, B, D}), norm_grad = call.buffer({splits, B});
  cu::MarginCeArgs& a = call.args;
  a.w_norm = w_norm.data_ptr();
  a.lse = lse.data_ptr();
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
  return {dx_hat, norm_grad, dw};
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
#ifdef FASTMARGIN_CUDA_ARCHS
  // setup.py's targets, comma-separated: "sm_80,sm_90,compute_90" (machine code for sm_*,
  // PTX for compute_*); tests/test_build.py reads the PTX ones.
  info["cuda_archs"] = FASTMARGIN_CUDA_ARCHS;
#endif
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
  info["cpu_bf16_gemms"] = fastmargin::margin_ce_cpu_bf16_gemms();  // this CPU, at call time
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
  m.def("margin_math", &margin_math, "psi, psi', the non-target transform and its derivative of csrc/margin.h on a CPU "
        "tensor of cosines: [psi, psi', nontarget, nontarget'].");
  m.def("margin_layout", &margin_layout, "csrc/margin.h's Kind and Param values by name.");
  m.def("cuda_launch_plan", &cuda_launch_plan,
        "The CUDA kernels' launch plan (csrc/cuda/launch_plan.h) as a dict: operand, tiles, grids, splits, "
        "shared memory. Raises ValueError when the kernels cannot run the problem.",
        pybind11::arg("B"), pybind11::arg("C"), pybind11::arg("D"), pybind11::arg("K"), pybind11::arg("x_dtype"),
        pybind11::arg("w_dtype"), pybind11::arg("allow_tf32"), pybind11::arg("arch"), pybind11::arg("num_sms"),
        pybind11::arg("chunk"), pybind11::arg("max_smem") = 0);
#ifdef FASTMARGIN_WITH_CUDA
  m.def("cuda_forward", &cuda_forward,
        "The fused forward's per-split partials on a CUDA device: (row_max, row_sum_exp, z_sum, z_target), each "
        "(splits, B) (csrc/cuda/margin_ce.h).");
  m.def("cuda_backward", &cuda_backward,
        "The fused backward's partials: (dx_hat (splits, B, D), norm_grad (splits, B), dw) (csrc/cuda/margin_ce_bwd.cu).");
#endif
  m.def("build_info", &build_info,
        "How fastmargin._C was compiled: CUDA and its version, OpenMP, compiler, torch; and whether this CPU "
        "runs bf16 inputs' GEMMs on AVX512-BF16.");
}
