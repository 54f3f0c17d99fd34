// Fused margin logits' row statistics on the CPU (lse, z_target, z_sum: csrc/cpu/margin_ce.h)
// and their backward: the classes are walked in blocks of `chunk`, so nothing of size
// B x C ever exists (DESIGN §3, the class-chunked design).
//
// The classes are split into contiguous parts, four a thread; each thread takes the next
// part left and walks it alone, block after block, with single-threaded GEMMs: one parallel
// region a pass and no barrier inside it (on a busy machine every barrier waits for a
// descheduled thread), and a thread that other work slows down takes fewer parts.
// A block's dots are computed transposed, dotsᵀ = W_block @ xᵀ (n*K, B): class rows, batch
// columns. Everything else about a class row then sits in that row (its norm, its K
// sub-centers, its b_j below, its gradient row), and the element work is one pass over
// slices of class rows, vectorised along the batch, while the block is still in cache:
//
//   forward: the W rows' norms; cos = dot / (||x|| ||w||) (max over the K sub-centers), psi
//   on the target, z = S cos (S nontarget(cos) under flags.nontarget, the row's numbers
//   loaded once a row tile); each slice's row max, then Σ exp(z - max) merged into the
//   part's running log-sum-exp; the parts merge in order at the end.
//   backward: the same logits, dcos (DESIGN §3) written over the dots as G = dcos / r (the
//   column scaling both GEMMs want), b_j = Σ_i dcos_ij cos_ij, and dw's rows started at
//   their radial term -w_j b_j / r_j². Then two GEMMs: the part's dX̂ += Gᵀ-as-operand @
//   W_block, and dW_block += G @ X̂ (beta 1), which finishes dw_j = (dŵ_j - ŵ_j b_j) / r_j
//   since dŵ_j / r_j = Σ_i G_ji x̂_i. The parts' dX̂ are summed in order at the end.
//
// A step is 4 GEMMs (the logits are recomputed in backward) plus that one pass per block.
//
// Deterministic run after run at a fixed thread count: the parts follow the thread count,
// a part's results do not depend on which thread walked it, each part's sums run in a
// fixed order and the parts merge in a fixed order. Across thread
// counts the results agree to rounding, not to the bit. The slice loops are compiled per
// instruction set (FM_CPU_CLONES), so bits may also differ between machines.
#include "cpu/margin_ce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FM_BF16_DOTS 1
#endif

#include "margin.h"

namespace fastmargin {
namespace {

// The slice loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time
// by the CPU (results are bitwise stable on one machine, not across instruction sets).
#if defined(__x86_64__) && defined(__GNUC__)
#define FM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CPU_CLONES
#endif

// exp(x) for the softmax loops, written so that the compiler vectorises the loops that
// call it (std::exp is a library call that blocks vectorisation without -ffast-math,
// which would also break the inf and NaN handling we rely on): exp(x) = 2^n e^r,
// n = round(x / ln 2), |r| <= ln 2 / 2 (ln 2 in two parts, so that n ln2_hi is exact), e^r
// by its Taylor polynomial, 2^n added to the exponent field. n is rounded by the 1.5 * 2^p
// trick (round to nearest even, as nearbyint, with no library call and in every
// instruction set). Arguments are <= 0 here (z - max, z - lse); below the clamp the result
// is the clamp's, whose share of a sum that holds a 1 is nil. NaN is passed through.
// float: degree 6, relative error < 2e-7 (about one ulp), clamped to e^-86 ~ 4e-38.
// double: degree 13, about one ulp, clamped to e^-708 ~ 3e-308.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -86.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
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
inline double vexp(double x) {
  const double xc = std::min(std::max(x, -708.0), 709.0);
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double m = xc * 1.4426950408889634074 + shifter;
  const double n = m - shifter;
  const double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;  // ln 2, hi + lo
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits, n_bits, shifter_bits;  // n = the low bits of m's pattern less the shifter's
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&n_bits, &m, sizeof n_bits);
  std::memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
  bits += (n_bits - shifter_bits) * (int64_t(1) << 52);
  double out;
  std::memcpy(&out, &bits, sizeof out);
  return x != x ? x : out;
}

// Class rows (of n*K) per slice, the unit of a block's element pass: a slice's rows of B
// dots stay in L2 between its passes.
constexpr int64_t kSliceRows = 256;
// Batch rows per tile of a slice: the per-row arrays of a tile stay in L1.
constexpr int64_t kRowTile = 128;

// Items per thread of at::parallel_for for items of `work` elements each: at least
// kParallelWork elements a thread, since waking a thread costs more than a small loop
// (and far more on a loaded machine). Small problems run on the calling thread; a part of
// the walk (Walk) holds at least kParallelWork logits.
constexpr int64_t kParallelWork = 1 << 15;
// Parts of the classes a thread (Walk): on a machine shared with other work, four parts a
// thread let a thread that runs at full speed take the parts of one that does not.
constexpr int64_t kPartsPerThread = 4;
inline int64_t grain(int64_t work) { return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work)); }

// ||v_r|| and 1 / max(||v_r||, kNormEps) for the rows [r0, r1) of v (rows, dim) with strides
// (sr, sd): along a row when sd == 1, else down the columns (a W.t() view), contiguous reads
// either way.
template <typename T>
FM_CPU_CLONES void row_norms(const T* v, int64_t sr, int64_t sd, int64_t dim, int64_t r0, int64_t r1, T* norm,
                             T* inv_norm) {
  if (sd == 1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* p = v + r * sr;
      T a = T(0);
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < dim; ++d) a += p[d] * p[d];
      norm[r] = a;
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) norm[r] = T(0);
    for (int64_t d = 0; d < dim; ++d) {
      const T* p = v + d * sd;
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) norm[r] += p[r * sr] * p[r * sr];
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    norm[r] = std::sqrt(norm[r]);
    inv_norm[r] = T(1) / std::max(norm[r], T(kNormEps));
  }
}

// The GEMMs for bfloat16 x and W on CPUs with AVX512-BF16 (VDPBF16PS: 16 fp32 lanes, each
// adding two exact bf16 x bf16 products), where MKL's bf16 GEMM converts to fp32 and runs at
// its sgemm rate (78 GFLOP/s a core on a Zen 4 EPYC, where this ran at 228, one thread,
// (512 x 512) @ (512 x 256)). The products of two bf16 are exact in fp32 and the sums are
// fp32, as in the fp32 GEMM of the same values: the logits differ only in the order of the
// additions. The backward's operand G is rounded to bf16 first, as the GPU backends' tensor
// cores take it (DESIGN §4): one rounding, relative, per element. Denormal bf16 inputs count
// as zero (the instruction's rule).
#ifdef FM_BF16_DOTS
#define FM_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

bool cpu_has_bf16_dots() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

inline uint16_t bf16_bits(uint16_t v) { return v; }
inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // round to nearest even, as torch

// uint16 elements of a matrix of n columns and k sums packed by pack_pairs.
inline int64_t packed_size(int64_t n, int64_t k) { return (n + 31) / 32 * 2 * ((k + 1) / 2) * 32; }

// The packed operand of bf16_gemm: src (n, k) with strides (sn, sk), bf16 bits or fp32 (then
// rounded to bf16), laid out as out[panel][pair][16][2] = src[16 panel + l, 2 pair + h]: 16
// columns a panel, in pairs along k; n padded to 32 columns and k to an even count, with zeros.
template <typename S>
FM_BF16_TARGET void pack_pairs(const S* src, int64_t n, int64_t k, int64_t sn, int64_t sk, uint16_t* out) {
  const int64_t pairs = (k + 1) / 2, panels = (n + 31) / 32 * 2;
  for (int64_t panel = 0; panel < panels; ++panel) {
    for (int64_t pair = 0; pair < pairs; ++pair) {
      uint16_t* o = out + (panel * pairs + pair) * 32;
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t col = panel * 16 + l, k0 = 2 * pair;
        o[2 * l] = col < n ? bf16_bits(src[col * sn + k0 * sk]) : 0;
        o[2 * l + 1] = col < n && k0 + 1 < k ? bf16_bits(src[col * sn + (k0 + 1) * sk]) : 0;
      }
    }
  }
}

// c (m, n) = a @ b, or c + a @ b where `accumulate`: a (m, k) bf16 with strides (sam, sak), b
// packed by pack_pairs from its (n, k) transpose, c fp32 with row stride ldc. 6 rows of a by
// 32 columns of b a step: 12 accumulators, a's pair broadcast (one 32-bit load where sak == 1).
FM_BF16_TARGET void bf16_gemm(const uint16_t* a, int64_t sam, int64_t sak, int64_t m, int64_t k, const uint16_t* bp,
                              int64_t n, float* c, int64_t ldc, bool accumulate) {
  constexpr int kRows = 6;
  const int64_t pairs = (k + 1) / 2, whole = k / 2;
  for (int64_t i0 = 0; i0 < n; i0 += 32) {
    const uint16_t* xa = bp + i0 / 16 * pairs * 32;
    const uint16_t* xb = xa + pairs * 32;
    const int64_t na = std::min<int64_t>(16, n - i0), nb = std::max<int64_t>(0, std::min<int64_t>(16, n - i0 - 16));
    const __mmask16 ma = static_cast<__mmask16>((1u << na) - 1), mb = static_cast<__mmask16>((1u << nb) - 1);
    for (int64_t j0 = 0; j0 < m; j0 += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, m - j0));
      const uint16_t* ar[kRows];
      for (int r = 0; r < kRows; ++r) ar[r] = a + (j0 + std::min(r, nr - 1)) * sam;
      __m512 acc[kRows][2];
      for (int r = 0; r < kRows; ++r) {
        const bool load = accumulate && r < nr;
        acc[r][0] = load ? _mm512_maskz_loadu_ps(ma, c + (j0 + r) * ldc + i0) : _mm512_setzero_ps();
        acc[r][1] = load && nb > 0 ? _mm512_maskz_loadu_ps(mb, c + (j0 + r) * ldc + i0 + 16) : _mm512_setzero_ps();
      }
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(xa + p * 32);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(xb + p * 32);
        const bool last_half = p == whole;  // an odd k's last element, paired with 0
#pragma GCC unroll 6
        for (int r = 0; r < kRows; ++r) {
          uint32_t pair;  // (a[2p], a[2p + 1]) as one 32-bit lane
          if (sak == 1 && !last_half) {
            std::memcpy(&pair, ar[r] + 2 * p, 4);
          } else {
            pair = ar[r][2 * p * sak] | (last_half ? 0u : uint32_t(ar[r][(2 * p + 1) * sak]) << 16);
          }
          const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        }
      }
      for (int r = 0; r < nr; ++r) {
        _mm512_mask_storeu_ps(c + (j0 + r) * ldc + i0, ma, acc[r][0]);
        if (nb > 0) _mm512_mask_storeu_ps(c + (j0 + r) * ldc + i0 + 16, mb, acc[r][1]);
      }
    }
  }
}
#endif

// What every part of the walk shares, read-only once built.
template <typename T>
struct Walk {
  int64_t B, D, C, K, chunk, slice_classes, parts, threads;
  const int64_t* labels;
  const T* params;  // (kNumParams, R): row i's margin is column i, or column 0 for all
  int64_t stride_param, stride_row;
  MarginFlags flags;
  std::vector<T> x_norm, x_inv_norm, scale;  // (B,): ||x_i||, 1 / max(||x_i||, eps), S_i
  // Where x and W are bf16 (W's rows contiguous) and the CPU has AVX512-BF16, the GEMMs run
  // on bf16_gemm: x packed for the logits' GEMM (its columns are the batch rows).
  bool bf16_gemms = false;
  std::vector<uint16_t> x_pairs;

  // x in the compute dtype (contiguous); x_in as the caller gave it.
  Walk(const at::Tensor& x, const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& labels_,
       const at::Tensor& params_, const MarginFlags& f, int64_t sub_centers, int64_t chunk_)
      : B(x.size(0)), D(x.size(1)), K(sub_centers), labels(labels_.data_ptr<int64_t>()),
        params(params_.data_ptr<T>()), stride_param(params_.stride(0)),
        stride_row(params_.size(1) == 1 ? 0 : params_.stride(1)), flags(f), x_norm(B), x_inv_norm(B), scale(B) {
    C = w.size(0) / K;
    // kPartsPerThread parts a thread, taken in turn by whichever thread is free, so that a
    // thread slowed by other work on the machine takes fewer; fewer parts when there is too
    // little work (at least kParallelWork logits a part) or too few classes.
    threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t work = std::max<int64_t>(1, B * C * K / kParallelWork);
    parts = std::max<int64_t>(1, std::min<int64_t>({threads * (threads > 1 ? kPartsPerThread : 1), work, C}));
    chunk = std::max<int64_t>(1, std::min(chunk_, (C + parts - 1) / parts));
    slice_classes = std::max<int64_t>(1, kSliceRows / K);
    at::parallel_for(0, B, std::max<int64_t>(64, grain(D)), [&](int64_t i0, int64_t i1) {
      row_norms<T>(x.data_ptr<T>(), x.stride(0), x.stride(1), D, i0, i1, x_norm.data(), x_inv_norm.data());
    });
    for (int64_t i = 0; i < B; ++i) {  // S_i: s, or s * ||x_i|| for SphereFace
      scale[i] = params[kScale * stride_param + i * stride_row] * (sphereface() ? x_norm[i] : T(1));
    }
#ifdef FM_BF16_DOTS
    if (std::is_same_v<T, float> && x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
        w.stride(1) == 1 && cpu_has_bf16_dots()) {
      bf16_gemms = true;
      x_pairs.resize(packed_size(B, D));
      pack_pairs(reinterpret_cast<const uint16_t*>(x_in.data_ptr()), B, D, x_in.stride(0), x_in.stride(1),
                 x_pairs.data());
    }
#endif
  }

  bool sphereface() const { return flags.kind == kSphere; }

  MarginParams<T> margin(int64_t i) const { return margin_row(params, stride_param, stride_row, i); }
  T param(int k, int64_t i) const { return params[k * stride_param + i * stride_row]; }

  // Part p's classes: [part_begin(p), part_begin(p + 1)).
  int64_t part_begin(int64_t p) const { return C * p / parts; }

  // Runs body(state, p) for every part, in parallel: each thread makes one state with
  // make_state() and takes the next part not yet taken until none is left. A part's
  // results must depend on p alone (not on the thread, nor on the state's earlier use).
  template <typename MakeState, typename F>
  void for_each_part(const MakeState& make_state, const F& body) const {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, parts), 1, [&](int64_t, int64_t) {
      auto state = make_state();
      for (int64_t p = next++; p < parts; p = next++) body(state, p);
    });
  }
};

// A thread's buffers for the blocks of its parts: the block's dotsᵀ (then its G), its W
// rows' norms, and, where W's dtype is not the compute dtype, the block's W rows and (dw_cols
// > 0) its dw in the compute dtype: made once a thread, not once a block, since a fresh
// buffer a block costs an allocation and its page faults every block.
// The backward on bf16_gemm adds G's two bf16 operands (bf16_backward_gemms).
template <typename T>
struct Block {
  at::Tensor dots;  // (chunk * K * B,)
  std::vector<T> w_norm, w_inv_norm;  // (chunk * K,)
  at::Tensor w_buffer, dw_buffer;     // (chunk * K, D) and (chunk * K, dw_cols), or undefined
  std::vector<uint16_t> g_pairs, g_scaled;

  Block(const Walk<T>& walk, const at::Tensor& w, const at::TensorOptions& options, int64_t dw_cols = 0)
      : dots(at::empty({walk.chunk * walk.K * walk.B}, options)), w_norm(walk.chunk * walk.K),
        w_inv_norm(walk.chunk * walk.K) {
    if (w.scalar_type() != c10::typeMetaToScalarType(options.dtype())) {
      w_buffer = at::empty({walk.chunk * walk.K, walk.D}, options);
    }
    if (dw_cols > 0) dw_buffer = at::empty({walk.chunk * walk.K, dw_cols}, options);
    if (dw_cols > 0 && walk.bf16_gemms) {
      g_pairs.resize(packed_size(walk.B, walk.chunk * walk.K));
      g_scaled.resize(walk.chunk * walk.K * walk.B);
    }
  }

  // W's rows [r0, r0 + rows) in the compute dtype: a view of w, or their copy in w_buffer.
  at::Tensor w_rows(const at::Tensor& w, int64_t r0, int64_t rows) {
    const at::Tensor src = w.narrow(0, r0, rows);
    return w_buffer.defined() ? w_buffer.narrow(0, 0, rows).copy_(src) : src;
  }

  // Computes the block's dotsᵀ (n*K, B) = w_block @ xᵀ, single-threaded inside a part:
  // w_block in the compute dtype, w_src the same rows as the caller's W holds them.
  T* load(const Walk<T>& walk, const at::Tensor& x, const at::Tensor& w_block, const at::Tensor& w_src) {
    at::Tensor out = dots.narrow(0, 0, w_block.size(0) * x.size(0)).view({w_block.size(0), x.size(0)});
#ifdef FM_BF16_DOTS
    if constexpr (std::is_same_v<T, float>) {
      if (walk.bf16_gemms) {
        bf16_gemm(reinterpret_cast<const uint16_t*>(w_src.data_ptr()), w_src.stride(0), 1, w_src.size(0), walk.D,
                  walk.x_pairs.data(), walk.B, out.data_ptr<float>(), walk.B, false);
        return out.data_ptr<T>();
      }
    }
#endif
    at::mm_out(out, w_block, x.t());
    return out.data_ptr<T>();
  }
};

#ifdef FM_BF16_DOTS
// The backward's two GEMMs of a block on bf16_gemm, G (rows, B) fp32 from the slices: dX̂ᵀ
// (D, B; += after the part's first block) = W_blockᵀ @ bf16(G), and A = bf16(G / ||x||) @ x
// into dw_block (rows, D; fp32), x as given (bf16, exact), x_cols it packed along the batch.
// G's 1 / ||x_i|| is taken before rounding, as the GPU backends take it. A_j = dŵ_j / r_j, and
// dw_j = A_j - w_j <w_j, A_j> / r_j² (DESIGN §3) with the radial part taken from A itself:
// b_j summed from the unrounded G would leave A's bf16 rounding in the radial direction, the
// whole of a gradient whose true value is 0 (D = 1, or rows already tangent). w_block: the
// block's W rows in fp32, row stride D.
FM_BF16_TARGET void bf16_backward_gemms(const Walk<float>& walk, Block<float>& blk, const float* g,
                                       const at::Tensor& w_src, const float* w_block, const uint16_t* x_cols,
                                       float* dx_hat_t, bool first, float* dw_block, int64_t ldw) {
  const int64_t B = walk.B, D = walk.D, rows = w_src.size(0);
  const float* inv_x = walk.x_inv_norm.data();
  pack_pairs(g, B, rows, 1, B, blk.g_pairs.data());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < B; ++i) blk.g_scaled[r * B + i] = bf16_bits(g[r * B + i] * inv_x[i]);
  }
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_src.data_ptr());
  bf16_gemm(w, 1, w_src.stride(0), D, rows, blk.g_pairs.data(), B, dx_hat_t, B, !first);
  bf16_gemm(blk.g_scaled.data(), B, 1, rows, B, x_cols, D, dw_block, ldw, false);
  for (int64_t r = 0; r < rows; ++r) {
    if (blk.w_norm[r] < kNormEps) continue;  // below the floor the norm is a constant: no radial term
    const float* wr = w_block + r * D;
    float* a = dw_block + r * ldw;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += wr[d] * a[d];
    const float f = dot * blk.w_inv_norm[r] * blk.w_inv_norm[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] -= wr[d] * f;
  }
}
#endif

// A row tile's non-target params (nt_lo .. nt_a2, csrc/margin.h nontarget), an array each so
// that the slice loops stay vectorised: loaded once a row tile, before its class loop.
template <typename T>
struct NontargetTile {
  T lo[kRowTile], hi[kRowTile], a0[kRowTile], a1[kRowTile], a2[kRowTile];

  void load(const Walk<T>& walk, int64_t i0, int64_t m) {
    for (int64_t ii = 0; ii < m; ++ii) {
      lo[ii] = walk.param(kNtLo, i0 + ii);
      hi[ii] = walk.param(kNtHi, i0 + ii);
      a0[ii] = walk.param(kNtA0, i0 + ii);
      a1[ii] = walk.param(kNtA1, i0 + ii);
      a2[ii] = walk.param(kNtA2, i0 + ii);
    }
  }
  T value(T c, int64_t ii) const { return nontarget(c, lo[ii], hi[ii], a0[ii], a1[ii], a2[ii]); }
  T grad(T c, int64_t ii) const { return nontarget_grad(c, lo[ii], hi[ii], a1[ii], a2[ii]); }
};

// A class row's cosines with the rows [i0, i0 + m) of the batch, from its K sub-centers'
// dots (K rows of dotsᵀ from `d`, each B long): cos = max_k dot_k / ||w_k|| times 1 / ||x||,
// best = the arg-max k (the first of equals; a NaN wins, as in torch's max).
template <typename T>
inline void class_cosines(const T* d, int64_t B, int64_t K, const T* inv_w, const T* inv_x, int64_t m, T* cos,
                          int32_t* best) {
  if (K == 1) {
    const T r = inv_w[0];
#pragma omp simd
    for (int64_t ii = 0; ii < m; ++ii) cos[ii] = d[ii] * r * inv_x[ii];
    return;
  }
  const T r0 = inv_w[0];
#pragma omp simd
  for (int64_t ii = 0; ii < m; ++ii) {
    cos[ii] = d[ii] * r0;
    best[ii] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T rk = inv_w[k];
    const T* dk = d + k * B;
#pragma omp simd
    for (int64_t ii = 0; ii < m; ++ii) {
      const T ck = dk[ii] * rk;
      const bool take = ck > cos[ii] || ck != ck;
      cos[ii] = take ? ck : cos[ii];
      best[ii] = take ? static_cast<int32_t>(k) : best[ii];
    }
  }
#pragma omp simd
  for (int64_t ii = 0; ii < m; ++ii) cos[ii] = cos[ii] * inv_x[ii];
}

// A part's running log-sum-exp (max, Σ exp(z - max)) and logit sum, per row.
template <typename T>
struct PartStats {
  std::vector<T> run_max, run_sum, z_sum;
  explicit PartStats(int64_t B) : run_max(B, -std::numeric_limits<T>::infinity()), run_sum(B, T(0)), z_sum(B, T(0)) {}
};

// sum * exp(from - to), where to >= from; an empty sum stays 0 (from = to = -inf).
template <typename T>
inline T rescale(T sum, T from, T to) {
  return sum == T(0) ? T(0) : sum * vexp(from - to);
}

// The forward's work on the class rows of one slice, classes [j0, j1) of the block that
// starts at class c0 (w: the block's rows, strides wr, wd): norms, logits (written over
// the dots), merged into the part's stats. kNontarget: the non-target logits are
// S nontarget(cos) (flags.nontarget), else S cos.
template <typename T, bool kNontarget>
FM_CPU_CLONES void forward_slice(const Walk<T>& walk, Block<T>& blk, const T* w, int64_t wr, int64_t wd, T* dots,
                                 int64_t c0, int64_t j0, int64_t j1, PartStats<T>& stats, T* z_target) {
  const int64_t B = walk.B, K = walk.K;
  row_norms<T>(w, wr, wd, walk.D, j0 * K, j1 * K, blk.w_norm.data(), blk.w_inv_norm.data());
  const T* inv_w = blk.w_inv_norm.data();
  T cos[kRowTile], zt[kRowTile], bmax[kRowTile], bsum[kRowTile], bz[kRowTile];
  int32_t best[kRowTile], tl[kRowTile];
  NontargetTile<T> nt;
  for (int64_t i0 = 0; i0 < B; i0 += kRowTile) {
    const int64_t m = std::min(kRowTile, B - i0);
    const T* inv_x = walk.x_inv_norm.data() + i0;
    const T* s = walk.scale.data() + i0;
    if (kNontarget) nt.load(walk, i0, m);
    // The targets in this slice: their logits z = S psi(cos), one row at a time.
    for (int64_t ii = 0; ii < m; ++ii) {
      const int64_t i = i0 + ii, j = walk.labels[i] - c0;
      tl[ii] = (j >= j0 && j < j1) ? static_cast<int32_t>(j) : -1;
      if (tl[ii] >= 0) {
        T c;
        int32_t b;
        class_cosines(dots + j * K * B + i, B, K, inv_w + j * K, inv_x + ii, 1, &c, &b);
        zt[ii] = s[ii] * psi(c, walk.margin(i), walk.flags);
        z_target[i] = zt[ii];
      }
      bmax[ii] = -std::numeric_limits<T>::infinity();
      bz[ii] = T(0);
      bsum[ii] = T(0);
    }
    // Pass 1: the logits, over the first sub-center's dots; the block's row max and Σ z.
    for (int64_t j = j0; j < j1; ++j) {
      T* d = dots + j * K * B + i0;
      const int32_t j32 = static_cast<int32_t>(j);
      class_cosines(d, B, K, inv_w + j * K, inv_x, m, cos, best);
#pragma omp simd
      for (int64_t ii = 0; ii < m; ++ii) {
        const T z = tl[ii] == j32 ? zt[ii] : s[ii] * (kNontarget ? nt.value(cos[ii], ii) : cos[ii]);
        d[ii] = z;
        bmax[ii] = std::max(bmax[ii], z);  // a NaN drops out of the max; z_sum keeps it
        bz[ii] += z;
      }
    }
    // Pass 2: Σ exp(z - max) against the part's new running max.
    T* rm = stats.run_max.data() + i0;
#pragma omp simd
    for (int64_t ii = 0; ii < m; ++ii) bmax[ii] = std::max(rm[ii], bmax[ii]);
    for (int64_t j = j0; j < j1; ++j) {
      const T* d = dots + j * K * B + i0;
#pragma omp simd
      for (int64_t ii = 0; ii < m; ++ii) bsum[ii] += vexp(d[ii] - bmax[ii]);
    }
    T* rs = stats.run_sum.data() + i0;
    T* zs = stats.z_sum.data() + i0;
    for (int64_t ii = 0; ii < m; ++ii) {
      rs[ii] = rescale(rs[ii], rm[ii], bmax[ii]) + bsum[ii];
      rm[ii] = bmax[ii];
      zs[ii] += bz[ii];
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& labels,
                  const at::Tensor& params, const MarginFlags& flags, int64_t sub_centers, int64_t chunk, T* lse,
                  T* z_target, T* z_sum) {
  const Walk<T> walk(x, x_in, w, labels, params, flags, sub_centers, chunk);
  const int64_t B = walk.B, K = walk.K;
  std::vector<PartStats<T>> stats(walk.parts, PartStats<T>(B));
  std::fill(z_target, z_target + B, T(0));
  const auto make_block = [&] { return Block<T>(walk, w, x.options()); };
  walk.for_each_part(make_block, [&](Block<T>& blk, int64_t p) {
    for (int64_t c0 = walk.part_begin(p), end = walk.part_begin(p + 1); c0 < end; c0 += walk.chunk) {
      const int64_t n = std::min(walk.chunk, end - c0);
      const at::Tensor w_src = w.narrow(0, c0 * K, n * K), w_block = blk.w_rows(w, c0 * K, n * K);
      T* dots = blk.load(walk, x, w_block, w_src);
      const T* wp = w_block.data_ptr<T>();
      for (int64_t j0 = 0; j0 < n; j0 += walk.slice_classes) {
        const int64_t j1 = std::min(n, j0 + walk.slice_classes);
        if (walk.flags.nontarget) {
          forward_slice<T, true>(walk, blk, wp, w_block.stride(0), w_block.stride(1), dots, c0, j0, j1, stats[p],
                                 z_target);
        } else {
          forward_slice<T, false>(walk, blk, wp, w_block.stride(0), w_block.stride(1), dots, c0, j0, j1, stats[p],
                                  z_target);
        }
      }
    }
  });
  // Merge the parts in order. A NaN logit can vanish from a max (max(a, NaN) = a); z_sum
  // keeps it.
  for (int64_t i = 0; i < B; ++i) {
    T m = -std::numeric_limits<T>::infinity(), zs = T(0), sum = T(0);
    for (const PartStats<T>& part : stats) {
      m = std::max(m, part.run_max[i]);
      zs += part.z_sum[i];
    }
    for (const PartStats<T>& part : stats) sum += rescale(part.run_sum[i], part.run_max[i], m);
    z_sum[i] = zs;
    lse[i] = std::isnan(zs) ? zs : m + std::log(sum);
  }
}

// What the backward's slices share besides the walk: the rows' upstream gradients and lse.
template <typename T>
struct Upstream {
  const T *g_lse, *g_target, *g_sum, *lse;
};

// The backward's work on the class rows of one slice, classes [j0, j1) of the block that
// starts at class c0. The dots become G = dcos / r (in the arg-max sub-center's row, 0 in
// the others); dw's rows of the slice are set to their radial term, -w_j b_j / r_j² with
// b_j = Σ_i dcos_ij cos_ij = <ŵ_j, dŵ_j> (0 below the norm floor, where r_j is a constant);
// norm_grad gets Σ_j dz_ij z_ij / S_i (SphereFace's gradient through S_i). kNontarget: a
// non-target column's z / S is nontarget(cos) and its dcos = S dz nontarget'(cos); b_j stays
// Σ_i dcos_ij cos_ij, a derivative in cos. dw null: no radial term here (bf16_backward_gemms
// takes it from the GEMM's own result).
template <typename T, bool kSphereGrad, bool kNontarget>
FM_CPU_CLONES void backward_slice(const Walk<T>& walk, Block<T>& blk, const Upstream<T>& up, const T* w, int64_t wr,
                                  int64_t wd, T* dots, T* dw, int64_t ar, int64_t ad, int64_t c0, int64_t j0,
                                  int64_t j1, T* norm_grad) {
  const int64_t B = walk.B, K = walk.K, D = walk.D;
  const int64_t r0 = j0 * K, r1 = j1 * K;
  row_norms<T>(w, wr, wd, D, r0, r1, blk.w_norm.data(), blk.w_inv_norm.data());
  const T* inv_w = blk.w_inv_norm.data();
  T b_acc[kSliceRows];  // b of the slice's class rows
  std::fill(b_acc, b_acc + (r1 - r0), T(0));
  T cos[kRowTile], dcos[kRowTile], bc[kRowTile], dct[kRowTile], et[kRowTile], e[kRowTile], gl[kRowTile],
      gs[kRowTile];
  int32_t best[kRowTile], tl[kRowTile];
  NontargetTile<T> nt;
  for (int64_t i0 = 0; i0 < B; i0 += kRowTile) {
    const int64_t m = std::min(kRowTile, B - i0);
    const T* inv_x = walk.x_inv_norm.data() + i0;
    const T* s = walk.scale.data() + i0;
    const T* lse = up.lse + i0;
    if (kNontarget) nt.load(walk, i0, m);
    // The targets in this slice: dcos = S dz psi'(cos), dz = g_lse p + g_target + g_sum.
    for (int64_t ii = 0; ii < m; ++ii) {
      const int64_t i = i0 + ii, j = walk.labels[i] - c0;
      tl[ii] = (j >= j0 && j < j1) ? static_cast<int32_t>(j) : -1;
      gl[ii] = up.g_lse[i];
      gs[ii] = up.g_sum[i];
      e[ii] = T(0);
      dct[ii] = et[ii] = T(0);
      if (tl[ii] >= 0) {
        T c;
        int32_t b;
        class_cosines(dots + j * K * B + i, B, K, inv_w + j * K, inv_x + ii, 1, &c, &b);
        const MarginParams<T> margin = walk.margin(i);
        const T zc = psi(c, margin, walk.flags);
        const T dz = gl[ii] * vexp(s[ii] * zc - lse[ii]) + up.g_target[i] + gs[ii];
        et[ii] = dz * zc;
        dct[ii] = s[ii] * dz * psi_grad(c, margin, walk.flags);
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      T* d = dots + j * K * B + i0;
      const int32_t j32 = static_cast<int32_t>(j);
      class_cosines(d, B, K, inv_w + j * K, inv_x, m, cos, best);
      if (K == 1) {
        const T r = inv_w[j];
        T b = T(0);
#pragma omp simd reduction(+ : b)
        for (int64_t ii = 0; ii < m; ++ii) {
          const T c = cos[ii];
          const T zc = kNontarget ? nt.value(c, ii) : c;
          const T dz = gl[ii] * vexp(s[ii] * zc - lse[ii]) + gs[ii];
          const bool t = tl[ii] == j32;
          const T dc = t ? dct[ii] : (kNontarget ? s[ii] * dz * nt.grad(c, ii) : s[ii] * dz);
          b += dc * c;
          d[ii] = dc * r;
          if (kSphereGrad) e[ii] += t ? et[ii] : dz * zc;
        }
        b_acc[j - j0] += b;
        continue;
      }
#pragma omp simd
      for (int64_t ii = 0; ii < m; ++ii) {
        const T c = cos[ii];
        const T zc = kNontarget ? nt.value(c, ii) : c;
        const T dz = gl[ii] * vexp(s[ii] * zc - lse[ii]) + gs[ii];
        const bool t = tl[ii] == j32;
        const T dc = t ? dct[ii] : (kNontarget ? s[ii] * dz * nt.grad(c, ii) : s[ii] * dz);
        dcos[ii] = dc;
        bc[ii] = dc * c;
        if (kSphereGrad) e[ii] += t ? et[ii] : dz * zc;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T r = inv_w[j * K + k];
        const int32_t k32 = static_cast<int32_t>(k);
        T* dk = d + k * B;
        T b = T(0);
#pragma omp simd reduction(+ : b)
        for (int64_t ii = 0; ii < m; ++ii) {
          const bool here = best[ii] == k32;
          dk[ii] = here ? dcos[ii] * r : T(0);
          b += here ? bc[ii] : T(0);
        }
        b_acc[j * K + k - r0] += b;
      }
    }
    if (kSphereGrad) {
      for (int64_t ii = 0; ii < m; ++ii) norm_grad[i0 + ii] += e[ii];
    }
  }
  if (dw == nullptr) return;
  // dw's rows of the slice start at their radial term.
  for (int64_t r = r0; r < r1; ++r) {
    b_acc[r - r0] = blk.w_norm[r] < T(kNormEps) ? T(0) : -b_acc[r - r0] * inv_w[r] * inv_w[r];
  }
  if (wd == 1 && ad == 1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T f = b_acc[r - r0];
      const T* wp = w + r * wr;
      T* g = dw + r * ar;
#pragma omp simd
      for (int64_t dd = 0; dd < D; ++dd) g[dd] = wp[dd] * f;
    }
  } else {  // a W.t() layout: down the columns, contiguous in r
    for (int64_t dd = 0; dd < D; ++dd) {
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) dw[r * ar + dd * ad] = w[r * wr + dd * wd] * b_acc[r - r0];
    }
  }
}

// dx_i = (dx̂_i - x̂_i <x̂_i, dx̂_i>) / n_i, plus SphereFace's s * norm_grad_i * x_i / n_i, for
// the rows [i0, i1), in place over dx̂ (B, D contiguous).
template <typename T>
FM_CPU_CLONES void finish_dx(const Walk<T>& walk, const T* x_hat, const T* x, const T* norm_grad, T* g, int64_t i0,
                             int64_t i1) {
  const int64_t D = walk.D;
  for (int64_t i = i0; i < i1; ++i) {
    const T* xh = x_hat + i * D;
    const T* xi = x + i * D;
    T* gi = g + i * D;
    T a = T(0);
#pragma omp simd reduction(+ : a)
    for (int64_t d = 0; d < D; ++d) a += xh[d] * gi[d];
    if (walk.x_norm[i] < T(kNormEps)) a = T(0);  // below the floor the norm is a constant: no radial term
    // d loss / d S_i times d S_i / d x_i = s x_i / ||x_i||, per unit of x_i
    const T sphere_term = walk.sphereface() && walk.x_norm[i] > T(0)
                              ? walk.params[kScale * walk.stride_param + i * walk.stride_row] * norm_grad[i] /
                                    walk.x_norm[i]
                              : T(0);
    const T inv = walk.x_inv_norm[i];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) gi[d] = (gi[d] - xh[d] * a) * inv + sphere_term * xi[d];
  }
}

template <typename T>
void backward_impl(const Upstream<T>& up, const at::Tensor& x, const at::Tensor& x_in, const at::Tensor& w,
                   const at::Tensor& labels, const at::Tensor& params, const MarginFlags& flags, int64_t sub_centers,
                   int64_t chunk, at::Tensor& dx, at::Tensor& dw) {
  const Walk<T> walk(x, x_in, w, labels, params, flags, sub_centers, chunk);
  const int64_t B = walk.B, D = walk.D, K = walk.K;
  const at::Tensor x_inv_norm = at::from_blob(const_cast<T*>(walk.x_inv_norm.data()), {B, 1}, x.options());
  const at::Tensor x_hat = x * x_inv_norm;
  // Each part's dX̂ (transposed, (D, B), on bf16_gemm) and Σ_j dz_ij z_ij / S_i (SphereFace),
  // summed over the parts in order.
  at::Tensor dx_parts = walk.bf16_gemms ? at::empty({walk.parts, D, B}, x.options())
                                        : at::empty({walk.parts, B, D}, x.options());
  std::vector<uint16_t> x_cols;  // bf16_gemm: x packed along the batch, dW's operand
#ifdef FM_BF16_DOTS
  if (walk.bf16_gemms) {
    x_cols.resize(packed_size(D, B));
    pack_pairs(reinterpret_cast<const uint16_t*>(x_in.data_ptr()), D, B, x_in.stride(1), x_in.stride(0),
               x_cols.data());
  }
#endif
  std::vector<T> norm_grad_parts(walk.sphereface() ? walk.parts * B : 0, T(0));
  const bool same_dtype = w.scalar_type() == x.scalar_type();

  // With G = dcos / r (DESIGN §3; rows of classes, columns of the batch): dx̂ = Gᵀ @ W and
  // G @ X̂ holds dŵ_j / r_j; dw_j = dŵ_j / r_j - w_j b_j / r_j², its second term written by
  // the slices before the GEMM adds the first (beta 1): no normalised copy of W is made.
  const auto make_block = [&] { return Block<T>(walk, w, x.options(), same_dtype ? 0 : D); };
  walk.for_each_part(make_block, [&](Block<T>& blk, int64_t p) {
    at::Tensor dx_hat = dx_parts[p];
    const at::Tensor& dw_buffer = blk.dw_buffer;
    for (int64_t c0 = walk.part_begin(p), end = walk.part_begin(p + 1); c0 < end; c0 += walk.chunk) {
      const int64_t n = std::min(walk.chunk, end - c0), rows = n * K;
      const at::Tensor w_src = w.narrow(0, c0 * K, rows), w_block = blk.w_rows(w, c0 * K, rows);
      T* g = blk.load(walk, x, w_block, w_src);
      at::Tensor dw_block = same_dtype ? dw.narrow(0, c0 * K, rows) : dw_buffer.narrow(0, 0, rows);
      const T* wp = w_block.data_ptr<T>();
      T* dwp = dw_block.data_ptr<T>();
      const int64_t wr = w_block.stride(0), wd = w_block.stride(1), ar = dw_block.stride(0), ad = dw_block.stride(1);
      T* slice_dw = walk.bf16_gemms ? nullptr : dwp;  // bf16_backward_gemms writes the radial term
      for (int64_t j0 = 0; j0 < n; j0 += walk.slice_classes) {
        const int64_t j1 = std::min(n, j0 + walk.slice_classes);
        T* norm_grad = walk.sphereface() ? norm_grad_parts.data() + p * B : nullptr;
        if (walk.sphereface() && walk.flags.nontarget) {
          backward_slice<T, true, true>(walk, blk, up, wp, wr, wd, g, slice_dw, ar, ad, c0, j0, j1, norm_grad);
        } else if (walk.sphereface()) {
          backward_slice<T, true, false>(walk, blk, up, wp, wr, wd, g, slice_dw, ar, ad, c0, j0, j1, norm_grad);
        } else if (walk.flags.nontarget) {
          backward_slice<T, false, true>(walk, blk, up, wp, wr, wd, g, slice_dw, ar, ad, c0, j0, j1, nullptr);
        } else {
          backward_slice<T, false, false>(walk, blk, up, wp, wr, wd, g, slice_dw, ar, ad, c0, j0, j1, nullptr);
        }
      }
      const bool first = c0 == walk.part_begin(p);
#ifdef FM_BF16_DOTS
      if constexpr (std::is_same_v<T, float>) {
        if (walk.bf16_gemms) {
          bf16_backward_gemms(walk, blk, g, w_src, wp, x_cols.data(), dx_hat.data_ptr<float>(), first, dwp, ar);
          dw.narrow(0, c0 * K, rows).copy_(dw_block);
          continue;
        }
      }
#endif
      const at::Tensor g_block = blk.dots.narrow(0, 0, rows * B).view({rows, B});
      if (first) {
        at::mm_out(dx_hat, g_block.t(), w_block);
      } else {
        dx_hat.addmm_(g_block.t(), w_block);
      }
      dw_block.addmm_(g_block, x_hat);
      if (!same_dtype) dw.narrow(0, c0 * K, rows).copy_(dw_block);
    }
  });
  at::Tensor dx_hat = walk.bf16_gemms ? dx_parts[0].t().contiguous() : dx_parts[0];
  for (int64_t p = 1; p < walk.parts; ++p) dx_hat.add_(walk.bf16_gemms ? dx_parts[p].t() : dx_parts[p]);
  std::vector<T> norm_grad(B, T(0));
  for (int64_t p = 0; p < static_cast<int64_t>(norm_grad_parts.size()) / std::max<int64_t>(1, B); ++p) {
    for (int64_t i = 0; i < B; ++i) norm_grad[i] += norm_grad_parts[p * B + i];
  }
  const T* xh = x_hat.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* gp = dx_hat.data_ptr<T>();
  at::parallel_for(0, B, grain(D), [&](int64_t i0, int64_t i1) { finish_dx(walk, xh, xp, norm_grad.data(), gp, i0, i1); });
  // dx like x (its strides when dense, as the fake implementation promises).
  if (dx.is_contiguous() && dx.scalar_type() == dx_hat.scalar_type() && walk.parts == 1) {
    dx = dx_hat;
  } else {
    dx.copy_(dx_hat);
  }
}

}  // namespace

bool margin_ce_cpu_bf16_gemms() {
#ifdef FM_BF16_DOTS
  return cpu_has_bf16_dots();
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cpu_forward(const at::Tensor& x, const at::Tensor& w,
                                                                     const at::Tensor& labels,
                                                                     const at::Tensor& params, const MarginFlags& flags,
                                                                     int64_t sub_centers, int64_t chunk) {
  // Detached: the parts run on threads that do not share this one's dispatch state, where
  // an out= GEMM on a tensor that requires grad would raise.
  const at::Tensor xc = x.detach().to(params.scalar_type()).contiguous();
  at::Tensor lse = at::empty({x.size(0)}, xc.options());
  at::Tensor z_target = at::empty({x.size(0)}, xc.options());
  at::Tensor z_sum = at::empty({x.size(0)}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "margin_ce_cpu_forward", [&] {
    forward_impl<scalar_t>(xc, x.detach(), w.detach(), labels.contiguous(), params, flags, sub_centers, chunk, lse.data_ptr<scalar_t>(),
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
  const at::Tensor xc = x.detach().to(type).contiguous();  // detached: see margin_ce_cpu_forward
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
    const Upstream<scalar_t> up{g_lse.data_ptr<scalar_t>(), g_target.data_ptr<scalar_t>(),
                                g_sum.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>()};
    backward_impl<scalar_t>(up, xc, x.detach(), w.detach(), labels.contiguous(), params, flags, sub_centers, chunk, dx, dw);
  });
  return {dx, dw};
}

}  // namespace fastmargin
