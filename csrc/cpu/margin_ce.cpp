// Fused margin logits' row statistics on the CPU (lse, z_target, z_sum: csrc/cpu/margin_ce.h)
// and their backward: the classes are walked in blocks of `chunk`, so nothing of size
// B x C ever exists (DESIGN §3, the class-chunked design).
//
// Forward, per block: dots = x @ w_blockᵀ (ATen GEMM), then one pass per row turns the
// dots into logits (cos = dot / (||x|| ||w||), max over the K sub-centers, psi on the
// target, x S) and merges the block into the row's online log-sum-exp (max, sum of exp).
// Backward recomputes each block's logits from the saved lse, writes dcos / r (DESIGN §2)
// over the dots and feeds two GEMMs: dX̂ += G @ W_block and A_block = Gᵀ @ X̂ with
// G = dcos / r. The normalisation terms need a_i = Σ_j dcos_ij cos_ij and
// b_j = Σ_i dcos_ij cos_ij; since cos_ij = <x̂_i, ŵ_j>, a_i = <x̂_i, dX̂_i> and
// b_j = <ŵ_j, dŴ_j>: O((B + C) D) dots after the GEMMs instead of sums over the block.
//
// Deterministic run after run at a fixed thread count: rows are independent and each row's
// sums run in a fixed order. Across thread counts the results agree to rounding, not to the
// bit: the GEMMs are ATen's (MKL here), whose blocking follows the thread count. The row
// loops are compiled per instruction set (FM_CPU_CLONES), so bits may also differ between
// machines.
#include "cpu/margin_ce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "margin.h"

namespace fastmargin {
namespace {

// The per-row loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load
// time by the CPU (results are bitwise stable on one machine, not across instruction sets).
#if defined(__x86_64__) && defined(__GNUC__)
#define FM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CPU_CLONES
#endif

// exp(x) for the softmax loops, written so that the compiler vectorises the loops that
// call it (std::exp is a library call that blocks vectorisation without -ffast-math,
// which would also break the inf and NaN handling we rely on). float: exp(x) = 2^n e^r,
// n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7, about one float ulp). Arguments are <= 0 here (z - max); below -86 the
// result is clamped to e^-86 ~ 4e-38, whose share of a sum that holds a 1 is nil.
// NaN is passed through. double keeps std::exp: fp64 users want its last bits.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -86.0f), 88.0f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12e-4
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;  // p * 2^n: add n to p's exponent field
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return x != x ? x : out;
}
inline double vexp(double x) { return std::exp(x); }

// Items per thread of at::parallel_for for items of `work` elements each: at least
// kParallelWork elements a thread, since waking a thread costs more than a small loop
// (and far more on a loaded machine). Small problems run on the calling thread.
constexpr int64_t kParallelWork = 1 << 15;
inline int64_t grain(int64_t work) { return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work)); }

// ||v_r|| and 1 / max(||v_r||, kNormEps) for the rows of v (R, D), any strides.
template <typename T>
void row_norms(const at::Tensor& v, T* norm, T* inv_norm) {
  const int64_t rows = v.size(0), dim = v.size(1), sr = v.stride(0), sd = v.stride(1);
  const T* p = v.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(64, grain(dim)), [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(r1 - r0, T(0));
    if (sd == 1) {
      for (int64_t r = r0; r < r1; ++r) {
        T a = T(0);
#pragma omp simd reduction(+ : a)
        for (int64_t d = 0; d < dim; ++d) a += p[r * sr + d] * p[r * sr + d];
        acc[r - r0] = a;
      }
    } else {  // column-major rows (a W.t() view): walk d outside so reads are contiguous
      for (int64_t d = 0; d < dim; ++d)
        for (int64_t r = r0; r < r1; ++r) acc[r - r0] += p[r * sr + d * sd] * p[r * sr + d * sd];
    }
    for (int64_t r = r0; r < r1; ++r) {
      norm[r] = std::sqrt(acc[r - r0]);
      inv_norm[r] = T(1) / std::max(norm[r], T(kNormEps));
    }
  });
}

// What every block of the walk shares.
template <typename T>
struct Walk {
  int64_t B, D, C, K, chunk;
  const int64_t* labels;
  const T* params;  // (kNumParams, R): row i's margin is column i, or column 0 for all
  int64_t stride_param, stride_row;
  MarginFlags flags;
  std::vector<T> x_norm, x_inv_norm;  // (B,)
  std::vector<T> w_norm, w_inv_norm;  // (chunk * K,), the current block's rows
  at::Tensor dots;                    // (B * chunk * K,), the block's dots, then its dcos

  Walk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels_, const at::Tensor& params_,
       const MarginFlags& f, int64_t sub_centers, int64_t chunk_)
      : B(x.size(0)), D(x.size(1)), K(sub_centers), labels(labels_.data_ptr<int64_t>()),
        params(params_.data_ptr<T>()), stride_param(params_.stride(0)),
        stride_row(params_.size(1) == 1 ? 0 : params_.stride(1)), flags(f), x_norm(B), x_inv_norm(B) {
    C = w.size(0) / K;
    chunk = std::max<int64_t>(1, std::min(chunk_, C));
    w_norm.resize(chunk * K);
    w_inv_norm.resize(chunk * K);
    dots = at::empty({B * chunk * K}, x.options());
    row_norms<T>(x, x_norm.data(), x_inv_norm.data());
  }

  bool sphereface() const { return flags.kind == kSphere; }

  MarginParams<T> margin(int64_t i) const { return margin_row(params, stride_param, stride_row, i); }

  // S_i: s, or s * ||x_i|| for SphereFace.
  T row_scale(int64_t i) const {
    return params[kScale * stride_param + i * stride_row] * (sphereface() ? x_norm[i] : T(1));
  }

  // The target's column in block [c0, c0 + n), or -1 (labels outside [0, C) have none).
  int64_t target_in_block(int64_t i, int64_t c0, int64_t n) const {
    const int64_t y = labels[i];
    return (y >= c0 && y < c0 + n) ? y - c0 : -1;
  }

  // Computes the block's dots (B, n*K) = x @ w_blockᵀ and the block rows' norms.
  T* load_block(const at::Tensor& x, const at::Tensor& w_block, int64_t n) {
    row_norms<T>(w_block, w_norm.data(), w_inv_norm.data());
    at::Tensor out = dots.narrow(0, 0, B * n * K).view({B, n * K});
    at::mm_out(out, x, w_block.t());
    return out.data_ptr<T>();
  }

  // cos_ij of row i for the n classes of the block, from the row's dots (n*K,): the max over
  // the K sub-centers of dot / (||x|| ||w||); best[j] gets the arg-max (the first of equals).
  void row_cosines(const T* dot, int64_t i, int64_t n, T* cos, int32_t* best) const {
    const T inv_x = x_inv_norm[i];
    const T* inv_w = w_inv_norm.data();
    if (K == 1) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) cos[j] = dot[j] * inv_w[j] * inv_x;
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      int32_t kb = 0;
      T c = dot[j * K] * inv_w[j * K];
      for (int64_t k = 1; k < K; ++k) {
        const T ck = dot[j * K + k] * inv_w[j * K + k];
        if (ck > c || ck != ck) { c = ck; kb = static_cast<int32_t>(k); }  // NaN wins, as in torch's max
      }
      best[j] = kb;
      cos[j] = c * inv_x;
    }
  }
};

// Per-thread scratch for one row of a block: its cosines (then logits or dcos) and arg-maxes.
template <typename T>
struct RowScratch {
  std::vector<T> cos;
  std::vector<int32_t> best;
  explicit RowScratch(int64_t n) : cos(n), best(n) {}
};

// The forward's per-row statistics, merged block after block.
template <typename T>
struct RowStats {
  std::vector<T> run_max, run_sum;  // online log-sum-exp: running max and sum of exp(z - max)
  std::vector<T> z_sum, z_target;   // Σ_j z_ij (label smoothing) and z_iy
  explicit RowStats(int64_t B)
      : run_max(B, -std::numeric_limits<T>::infinity()), run_sum(B, T(0)), z_sum(B, T(0)), z_target(B, T(0)) {}
};

// Row i of a forward block [c0, c0 + n) with dots (n*K,): its logits, merged into stats.
template <typename T>
FM_CPU_CLONES void forward_row(const Walk<T>& walk, const T* dots, int64_t i, int64_t c0, int64_t n,
                               RowScratch<T>& scratch, RowStats<T>& stats) {
  T* z = scratch.cos.data();
  walk.row_cosines(dots, i, n, z, scratch.best.data());
  const T s = walk.row_scale(i);
  const int64_t target = walk.target_in_block(i, c0, n);
  const T z_t = target >= 0 ? s * psi(z[target], walk.margin(i), walk.flags) : T(0);
  T block_max = target >= 0 ? z_t : -std::numeric_limits<T>::infinity();
  T block_sum_z = z_t;
#pragma omp simd reduction(max : block_max) reduction(+ : block_sum_z)
  for (int64_t j = 0; j < n; ++j) {
    const T zj = j == target ? z_t : s * z[j];
    z[j] = zj;
    block_max = std::max(block_max, zj);
    block_sum_z += j == target ? T(0) : zj;
  }
  if (target >= 0) stats.z_target[i] = z_t;
  const T new_max = std::max(stats.run_max[i], block_max);
  T block_sum_exp = T(0);
#pragma omp simd reduction(+ : block_sum_exp)
  for (int64_t j = 0; j < n; ++j) block_sum_exp += vexp(z[j] - new_max);
  stats.run_sum[i] = stats.run_sum[i] * std::exp(stats.run_max[i] - new_max) + block_sum_exp;
  stats.run_max[i] = new_max;
  stats.z_sum[i] += block_sum_z;
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& params,
                  const MarginFlags& flags, int64_t sub_centers, int64_t chunk, T* lse, T* z_target, T* z_sum) {
  Walk<T> walk(x, w, labels, params, flags, sub_centers, chunk);
  const int64_t B = walk.B, K = walk.K, C = walk.C;
  RowStats<T> stats(B);
  for (int64_t c0 = 0; c0 < C; c0 += walk.chunk) {
    const int64_t n = std::min(walk.chunk, C - c0);
    const at::Tensor w_block = w.narrow(0, c0 * K, n * K).to(x.scalar_type());
    T* dots = walk.load_block(x, w_block, n);
    at::parallel_for(0, B, grain(n * K), [&](int64_t i0, int64_t i1) {
      RowScratch<T> scratch(n);
      for (int64_t i = i0; i < i1; ++i) forward_row(walk, dots + i * n * K, i, c0, n, scratch, stats);
    });
  }
  for (int64_t i = 0; i < B; ++i) {
    // A NaN logit can vanish from the running max (max(a, NaN) = a); z_sum keeps it.
    z_sum[i] = stats.z_sum[i];
    lse[i] = std::isnan(z_sum[i]) ? z_sum[i] : stats.run_max[i] + std::log(stats.run_sum[i]);
    z_target[i] = stats.z_target[i];
  }
}

// Row i of a backward block [c0, c0 + n): its dots (n*K,) are overwritten with dcos / r
// (DESIGN §2), in the arg-max sub-center's column. (g_lse, g_target, g_sum) are the row's
// gradients of (lse, z_target, z_sum): dz_ij = g_lse p_ij + g_target [j = y] + g_sum.
// Returns the row's Σ_j dz_ij z_ij / S_i, SphereFace's gradient through the scale S_i.
template <typename T>
FM_CPU_CLONES T backward_row(const Walk<T>& walk, T* row, int64_t i, int64_t c0, int64_t n, T g_lse, T g_target,
                             T g_sum, T lse_i, RowScratch<T>& scratch) {
  const int64_t K = walk.K;
  T* c = scratch.cos.data();
  walk.row_cosines(row, i, n, c, scratch.best.data());
  const T s = walk.row_scale(i);
  const int64_t target = walk.target_in_block(i, c0, n);
  // The target column: z = S psi(c), psi' on dcos.
  T e = T(0), dc_t = T(0);
  if (target >= 0) {
    const MarginParams<T> margin = walk.margin(i);
    const T zc = psi(c[target], margin, walk.flags);
    const T dz = g_lse * vexp(s * zc - lse_i) + g_target + g_sum;
    e = dz * zc;
    dc_t = s * dz * psi_grad(c[target], margin, walk.flags);
  }
#pragma omp simd reduction(+ : e)
  for (int64_t j = 0; j < n; ++j) {
    const T dz = g_lse * vexp(s * c[j] - lse_i) + g_sum;
    e += j == target ? T(0) : dz * c[j];
    c[j] = j == target ? dc_t : s * dz;
  }
  // Written as dcos_ij / r_j, the column scaling that both GEMMs want (see backward_impl).
  const T* inv_w = walk.w_inv_norm.data();
  if (K == 1) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = c[j] * inv_w[j];
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < K; ++k) row[j * K + k] = k == scratch.best[j] ? c[j] * inv_w[j * K + k] : T(0);
  }
  return e;
}

// a_r -= w_r <w_r, a_r> / ||w_r||² for the rows of a block, turning A_j = dŵ_j / r_j into
// dw_j (backward_impl). w_block and a share a layout: rows contiguous, or columns
// contiguous (PML's W.t(), whose gradient is laid out like it).
template <typename T>
void remove_radial(const Walk<T>& walk, const at::Tensor& w_block, at::Tensor& a) {
  const int64_t rows = a.size(0), D = a.size(1);
  const int64_t wr = w_block.stride(0), wd = w_block.stride(1), ar = a.stride(0), ad = a.stride(1);
  const T* w = w_block.data_ptr<T>();
  T* g = a.data_ptr<T>();
  const bool by_rows = wd == 1 && ad == 1;
  at::parallel_for(0, rows, std::max<int64_t>(by_rows ? 1 : 256, grain(D)), [&](int64_t r0, int64_t r1) {
    std::vector<T> b(r1 - r0, T(0));
    if (by_rows) {
      for (int64_t r = r0; r < r1; ++r) {
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += w[r * wr + d] * g[r * ar + d];
        b[r - r0] = acc;
      }
    } else {  // walk d outside so that reads run along the contiguous columns
      for (int64_t d = 0; d < D; ++d)
        for (int64_t r = r0; r < r1; ++r) b[r - r0] += w[r * wr + d * wd] * g[r * ar + d * ad];
    }
    for (int64_t r = r0; r < r1; ++r) {  // below kNormEps the norm is a constant: no radial term
      b[r - r0] = walk.w_norm[r] < T(kNormEps) ? T(0) : b[r - r0] * walk.w_inv_norm[r] * walk.w_inv_norm[r];
    }
    if (by_rows) {
      for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[r * ar + d] -= w[r * wr + d] * b[r - r0];
      }
    } else {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t r = r0; r < r1; ++r) g[r * ar + d * ad] -= w[r * wr + d * wd] * b[r - r0];
    }
  });
}

template <typename T>
void backward_impl(const T* g_lse, const T* g_target, const T* g_sum, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& labels, const T* lse, const at::Tensor& params, const MarginFlags& flags,
                   int64_t sub_centers, int64_t chunk, at::Tensor& dx, at::Tensor& dw) {
  Walk<T> walk(x, w, labels, params, flags, sub_centers, chunk);
  const int64_t B = walk.B, D = walk.D, K = walk.K, C = walk.C;
  const at::Tensor x_inv_norm = at::from_blob(walk.x_inv_norm.data(), {B, 1}, x.options());
  const at::Tensor x_hat = x * x_inv_norm;
  at::Tensor dx_hat = at::zeros({B, D}, x.options());
  std::vector<T> norm_grad(B, T(0));  // Σ_j dz_ij z_ij / S_i: SphereFace's d loss / d S_i / s
  const bool same_dtype = w.scalar_type() == x.scalar_type();
  at::Tensor dw_buffer = same_dtype ? at::Tensor() : at::empty({walk.chunk * K, D}, x.options());

  // With G = dcos / r (columns scaled by 1 / r_j): dx̂ = Σ_j dcos_ij ŵ_j = G @ W, and
  // A = Gᵀ @ X̂ holds A_j = dŵ_j / r_j. Then dw_j = (dŵ_j - ŵ_j <ŵ_j, dŵ_j>) / r_j
  // = A_j - w_j <w_j, A_j> / r_j²: no normalised copy of W is ever made.
  for (int64_t c0 = 0; c0 < C; c0 += walk.chunk) {
    const int64_t n = std::min(walk.chunk, C - c0), rows = n * K;
    const at::Tensor w_block = w.narrow(0, c0 * K, rows).to(x.scalar_type());
    T* dcos = walk.load_block(x, w_block, n);
    at::parallel_for(0, B, grain(n * K), [&](int64_t i0, int64_t i1) {
      RowScratch<T> scratch(n);
      for (int64_t i = i0; i < i1; ++i) {
        norm_grad[i] += backward_row(walk, dcos + i * rows, i, c0, n, g_lse[i], g_target[i], g_sum[i], lse[i],
                                     scratch);
      }
    });
    const at::Tensor g_block = walk.dots.narrow(0, 0, B * rows).view({B, rows});
    dx_hat.addmm_(g_block, w_block);
    at::Tensor dw_block = same_dtype ? dw.narrow(0, c0 * K, rows) : dw_buffer.narrow(0, 0, rows);
    at::mm_out(dw_block, g_block.t(), x_hat);
    remove_radial(walk, w_block, dw_block);
    if (!same_dtype) dw.narrow(0, c0 * K, rows).copy_(dw_block);
  }
  // dx_i = (dx̂_i - x̂_i <x̂_i, dx̂_i>) / n_i, plus SphereFace's s * norm_grad_i * x_i / n_i.
  const T* xh = x_hat.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* g = dx_hat.data_ptr<T>();
  at::parallel_for(0, B, grain(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T a = T(0);
      for (int64_t d = 0; d < D; ++d) a += xh[i * D + d] * g[i * D + d];
      if (walk.x_norm[i] < T(kNormEps)) a = T(0);
      // d loss / d S_i times d S_i / d x_i = s x_i / ||x_i||, per unit of x_i
      const T sphere_term = walk.sphereface() && walk.x_norm[i] > T(0)
                                ? walk.params[kScale * walk.stride_param + i * walk.stride_row] * norm_grad[i] /
                                      walk.x_norm[i]
                                : T(0);
      const T inv = walk.x_inv_norm[i];
      for (int64_t d = 0; d < D; ++d)
        g[i * D + d] = (g[i * D + d] - xh[i * D + d] * a) * inv + sphere_term * xp[i * D + d];
    }
  });
  // dx like x (its strides when dense, as the fake implementation promises).
  if (dx.is_contiguous() && dx.scalar_type() == dx_hat.scalar_type()) {
    dx = dx_hat;
  } else {
    dx.copy_(dx_hat);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                                     const at::Tensor& labels,
                                                                     const at::Tensor& params, const MarginFlags& flags,
                                                                     int64_t sub_centers, int64_t chunk) {
  const at::Tensor xc = x.to(params.scalar_type()).contiguous();
  at::Tensor lse = at::empty({x.size(0)}, xc.options());
  at::Tensor z_target = at::empty({x.size(0)}, xc.options());
  at::Tensor z_sum = at::empty({x.size(0)}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "margin_ce_cpu_forward", [&] {
    forward_impl<scalar_t>(xc, w, labels.contiguous(), params, flags, sub_centers, chunk, lse.data_ptr<scalar_t>(),
                           z_target.data_ptr<scalar_t>(), z_sum.data_ptr<scalar_t>());
  });
  return {lse, z_target, z_sum};
}

std::tuple<at::Tensor, at::Tensor> margin_ce_cpu_backward(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                                          const at::Tensor& grad_sum, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& labels,
                                                          const at::Tensor& lse, const at::Tensor& params,
                                                          const MarginFlags& flags, int64_t sub_centers,
                                                          int64_t chunk) {
  const at::ScalarType type = params.scalar_type();
  const at::Tensor xc = x.to(type).contiguous();
  // The upstream gradient of loss.sum() arrives expanded with stride 0: copy it.
  const at::Tensor g_lse = grad_lse.to(type).contiguous();
  const at::Tensor g_target = grad_target.to(type).contiguous();
  const at::Tensor g_sum = grad_sum.to(type).contiguous();
  const at::Tensor lse_c = lse.to(type).contiguous();
  // Gradients laid out like their inputs (empty_like keeps a dense tensor's strides): for
  // PML's W.t() the gradient of W itself is then contiguous and autograd takes it as is.
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(type, "margin_ce_cpu_backward", [&] {
    backward_impl<scalar_t>(g_lse.data_ptr<scalar_t>(), g_target.data_ptr<scalar_t>(), g_sum.data_ptr<scalar_t>(),
                            xc, w, labels.contiguous(), lse_c.data_ptr<scalar_t>(), params, flags, sub_centers, chunk,
                            dx, dw);
  });
  return {dx, dw};
}

}  // namespace fastmargin
