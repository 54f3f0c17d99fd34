// What the forward and backward kernels share (the CUDA twin of kernels/tiles.py): operand
// tags, staging a tile of an any-strided tensor into shared memory in the operand's dtype,
// the tile GEMM (tensor cores or SIMT), the cos tile and the per-row epilogue math.
//
// Why WMMA and not CUTLASS/CuTe: the GEMMs here are small per-tile products whose result
// must land where an element-wise epilogue (cosine, sub-center max, psi, online
// log-sum-exp, dcos) reads it, and whose operands come from tensors of any strides and
// mixed dtypes converted while staging. nvcuda::wmma gives HMMA on sm_80 and sm_90 with a
// few lines and no dependency (nvidia-cutlass is not installed here and its templates
// multiply compile time, which CI pays on 2 cores); CuTe's sm_90 HGMMA pipelines would
// be faster but cannot be tested without a GPU. The operand is a template argument (5
// tags); margin kind, K and layouts are runtime values, so each kernel has 5 instances.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch_plan.h"
#include "cuda/margin_ce.h"
#include "margin.h"

namespace fastmargin {
namespace cuda {

// Operand tags, the kernels' template argument: tags rather than the Operand enum so that a
// kernel's mangled name says its operand (tests/test_cuda.py finds the tensor-core kernels
// in the SASS by it). T: the operand in shared memory; Acc: accumulators and epilogue math.
struct OpF16 {
  using T = __half;
  using Acc = float;
  static constexpr Operand kOperand = Operand::kFloat16;
  static constexpr bool kTensorCores = true;
};
struct OpBF16 {
  using T = __nv_bfloat16;
  using Acc = float;
  static constexpr Operand kOperand = Operand::kBFloat16;
  static constexpr bool kTensorCores = true;
};
struct OpTF32 {
  using T = float;
  using Acc = float;
  static constexpr Operand kOperand = Operand::kTF32;
  static constexpr bool kTensorCores = true;
};
struct OpF32 {
  using T = float;
  using Acc = float;
  static constexpr Operand kOperand = Operand::kFloat32;
  static constexpr bool kTensorCores = false;
};
struct OpF64 {
  using T = double;
  using Acc = double;
  static constexpr Operand kOperand = Operand::kFloat64;
  static constexpr bool kTensorCores = false;
};

// f(tag) with the tag of the plan's operand.
template <class F>
cudaError_t with_operand(Operand op, F&& f) {
  switch (op) {
    case Operand::kFloat16: return f(OpF16{});
    case Operand::kBFloat16: return f(OpBF16{});
    case Operand::kTF32: return f(OpTF32{});
    case Operand::kFloat32: return f(OpF32{});
    default: return f(OpF64{});
  }
}

// v converted to To. torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends, so the
// 16-bit types go through their intrinsics. fp16 <-> bf16 exists for the compiler only:
// choose_operand never stages one into the other. double to 16-bit does run: the fp64 dW
// kernel stores into a 16-bit dw (x fp64, W fp16/bf16), via fp32 as the Triton backend does.
template <class To, class From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, __half>) {
    return convert<To>(__half2float(v));
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return convert<To>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// Element i of a tensor of dtype `dtype`, as To. The switch is uniform across a block.
template <class To>
__device__ __forceinline__ To load_as(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return convert<To>(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return convert<To>(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat32: return convert<To>(static_cast<const float*>(p)[i]);
    default: return convert<To>(static_cast<const double*>(p)[i]);
  }
}

template <class From>
__device__ __forceinline__ void store_as(void* p, DType dtype, int64_t i, From v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = convert<__half>(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = convert<__nv_bfloat16>(v); break;
    case DType::kFloat32: static_cast<float*>(p)[i] = convert<float>(v); break;
    default: static_cast<double*>(p)[i] = convert<double>(v); break;
  }
}

// Whether consecutive threads should walk a tensor's rows' elements (stride1 == 1: x, W) or
// down its columns (stride0 == 1: PML's W.t()), so that their loads coalesce either way.
__device__ __forceinline__ bool along_rows(int64_t stride0, int64_t stride1) {
  return stride1 == 1 || stride0 != 1;
}

// dst[r * ld + c] = src(row0 + r, col0 + c), converted to T, for r < R, c < CC; zero where
// r >= rows_left or c >= cols_left (ragged edges: zeros add nothing to the dots).
// Offsets are int64: C*K*D and d * C*K (a W.t() view) pass 2^31 at real sizes.
template <class T, int R, int CC>
__device__ void stage(T* dst, int ld, const Matrix& src, int64_t row0, int64_t rows_left, int64_t col0,
                      int64_t cols_left) {
  const bool by_rows = along_rows(src.stride0, src.stride1);
  for (int idx = threadIdx.x; idx < R * CC; idx += kThreads) {
    const int r = by_rows ? idx / CC : idx % R;
    const int c = by_rows ? idx % CC : idx / R;
    T v = convert<T>(0.0f);
    if (r < rows_left && c < cols_left) {
      v = load_as<T>(src.data, src.dtype, (row0 + r) * src.stride0 + (col0 + c) * src.stride1);
    }
    dst[r * ld + c] = v;
  }
}

enum class Layout { kRow, kCol };

// An M x N accumulator tile spread over the block, += A (M x depth) @ B (depth x N) from
// shared memory. A row-major: a[m * lda + k], column-major: a[k * lda + m]; B row-major:
// b[k * ldb + n], column-major: b[n * ldb + k]. store() writes it row-major.
template <class Op, int M, int N, bool kTensorCores = Op::kTensorCores>
struct TileMma;

// Tensor cores: 8 warps as 2 x 4, each owning (M/2) x (N/4) in 16 x 16 WMMA fragments
// (m16n16k16 for fp16/bf16, m16n16k8 for tf32), fp32 accumulators in registers.
template <class Op, int M, int N>
struct TileMma<Op, M, N, true> {
  static constexpr int kWarpsM = 2, kWarpsN = kThreads / 32 / kWarpsM;
  static constexpr int kWarpM = M / kWarpsM, kWarpN = N / kWarpsN;
  static constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
  static constexpr bool kTF32 = std::is_same_v<Op, OpTF32>;
  static constexpr int kStepK = kTF32 ? 8 : 16;
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "a warp's share must be whole fragments");
  using T = typename Op::T;
  using Precision = std::conditional_t<kTF32, nvcuda::wmma::precision::tf32, T>;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kStepK, float> acc[kFragM][kFragN];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <Layout LA, Layout LB>
  __device__ void mma(const T* a, int lda, const T* b, int ldb, int depth) {
    namespace wmma = nvcuda::wmma;
    using LayoutA = std::conditional_t<LA == Layout::kRow, wmma::row_major, wmma::col_major>;
    using LayoutB = std::conditional_t<LB == Layout::kRow, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / kWarpsN) * kWarpM, n0 = (warp % kWarpsN) * kWarpN;
    for (int k = 0; k < depth; k += kStepK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStepK, Precision, LayoutA> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, kStepK, Precision, LayoutB> fb[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        const int m = m0 + 16 * i;
        wmma::load_matrix_sync(fa[i], a + (LA == Layout::kRow ? m * lda + k : k * lda + m), lda);
        if constexpr (kTF32) {
          for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
        }
      }
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        const int n = n0 + 16 * j;
        wmma::load_matrix_sync(fb[j], b + (LB == Layout::kRow ? k * ldb + n : n * ldb + k), ldb);
        if constexpr (kTF32) {
          for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Row m of the tile *= factor[m] (M floats in shared memory), exactly: powers of two.
  // A WMMA accumulator fragment's element-to-(row, column) mapping is undocumented, so a
  // warp stores each fragment to its 16 x 16 floats of scratch (256 a warp, 32-byte
  // aligned), scales the rows there and loads it back, both documented exact copies; a
  // fragment whose 16 rows all keep factor 1 is skipped (the usual case once the running
  // exponents have settled). Ends with each warp's scratch free again.
  __device__ void scale_rows(const float* factor, float* scratch) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int m0 = (warp / kWarpsN) * kWarpM;
    float* mine = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < kFragM; ++i) {
      const int rows = m0 + 16 * i;
      if (__all_sync(0xffffffffu, factor[rows + lane % 16] == 1.0f)) continue;
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        wmma::store_matrix_sync(mine, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int t = lane; t < 256; t += 32) mine[t] *= factor[rows + t / 16];
        __syncwarp();
        wmma::load_matrix_sync(acc[i][j], mine, 16, wmma::mem_row_major);
        __syncwarp();
      }
    }
  }

  __device__ void store(float* out, int ldo) const {
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / kWarpsN) * kWarpM, n0 = (warp % kWarpsN) * kWarpN;
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        nvcuda::wmma::store_matrix_sync(out + (m0 + 16 * i) * ldo + n0 + 16 * j, acc[i][j], ldo,
                                        nvcuda::wmma::mem_row_major);
      }
  }
};

// SIMT (exact fp32, fp64): threads as 16 x 16, thread (tr, tc) owning rows tr + 16 i and
// columns tc + 16 j, so that a warp's B reads are consecutive. FMA in Acc.
template <class Op, int M, int N>
struct TileMma<Op, M, N, false> {
  static constexpr int kTM = M / 16, kTN = N / 16;
  static_assert(kThreads == 256 && M % 16 == 0 && N % 16 == 0, "16 x 16 threads over the tile");
  using T = typename Op::T;
  using Acc = typename Op::Acc;

  Acc acc[kTM][kTN];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = Acc(0);
  }

  template <Layout LA, Layout LB>
  __device__ void mma(const T* a, int lda, const T* b, int ldb, int depth) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < depth; ++k) {
      Acc av[kTM], bv[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int m = tr + 16 * i;
        av[i] = a[LA == Layout::kRow ? m * lda + k : k * lda + m];
      }
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int n = tc + 16 * j;
        bv[j] = b[LB == Layout::kRow ? k * ldb + n : n * ldb + k];
      }
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ void store(Acc* out, int ldo) const {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) out[(tr + 16 * i) * ldo + tc + 16 * j] = acc[i][j];
  }
};

// The tile constants of an operand (launch_plan.h tile_shape) and its shared-memory rows.
template <class Op>
struct Tile {
  static constexpr TileShape kShape = tile_shape(Op::kOperand);
  static constexpr int BM = kShape.block_b, BN = kShape.block_n, BK = kShape.block_k, BDO = kShape.block_do;
  static constexpr int kLdIn = BK + kShape.pad;          // xs, ws
  static constexpr int kLdS = BN + kShape.pad_acc;       // s
  static constexpr int kLdG = BN + kShape.pad;           // g
  static constexpr int kLdOp2 = BDO + kShape.pad;        // op2
  static constexpr int kLdOut = BDO + kShape.pad_acc;    // the staged output tile
  // The epilogues give each row of the tile kRowThreads consecutive threads (one warp's
  // lanes, so their partial sums merge by shuffles); thread t has row t / kRowThreads and
  // the tile's classes lane, lane + kRowThreads, ...
  static constexpr int kRowThreads = kThreads / BM;
  static_assert(kRowThreads >= 1 && kRowThreads <= 32 && (kRowThreads & (kRowThreads - 1)) == 0,
                "a row's threads must be a power of two within a warp");
};

// fp16 GEMM operands of the backward (docs/design.md §4: never drop small softmax entries), the
// twin of kernels/tiles.py scale_fp16_operand. The operand g = dcos / r_j (dx) or dcos / n_i
// (dW) is about s p / (B ||x||) for a class that is no row's target, p ~ 1/C: 1e-8 and
// below, under half fp16's smallest subnormal, so a plain cast flushes most of the
// negative-class gradient. Each accumulator row (dx: a row of x, whose g row it sums; dW: a
// weight row, whose g column it sums) therefore has a running exponent E, the maximum over
// the tiles so far of floor(log2 max|g|) along it, and its g entries are scaled by
// 2^(14 - E) before the cast: the largest lands in [2^14, 2^15), under fp16's 65504, and
// entries down to 2^-28 of the row's running maximum keep fp16's full precision (below
// that, subnormal: an absolute 2^-38 of it). When E grows the accumulator row is rescaled by
// 2^(E_old - E) (TileMma::scale_rows), as an online softmax rescales its sum, and at the end
// multiplied by 2^(E - 14): powers of two, exact in fp32, so the result differs from an
// unscaled one only by the operand's fp16 rounding, now relative to the row instead of
// absolute. Per row, as in Triton, rather than one running scale per tile (fragment.x[t] *=
// r, legal without the fragment mapping): a tile's rows differ by the norms of x and the
// softmax of their classes (a class that is no row's target sits 1/C and more below one
// that is: 2^21 at C = 2^21, which a per-tile scale would leave 7 bits of headroom), and the
// shared-memory round trip that per-row rescaling costs runs only on tiles where some
// row's exponent grows. bf16 has fp32's exponent range and needs none of this; tf32, fp32
// and fp64 neither.
constexpr int kExpFloor = -100, kExpCeil = 100, kOperandExp = 14;

// 1 / max(||v||, kNormEps) above this marks an all-zero row: a nonzero fp16 vector has a
// norm of at least 2^-24. With fp16 operands the g of such a row (dW: an embedding) or class
// (dx: a weight row) is set to 0: its other GEMM operand is that zero row, and its g, x 1e12,
// would be inf in fp16 (inf * 0 = NaN on the tensor cores, in all of dW or dx), or with the
// scaling set the row's exponent so high that the other entries flush.
constexpr float kZeroRowInvNorm = static_cast<float>(0.5 / kNormEps);

// 2^e as float for e in [-126, 127], exactly (the exponent field).
__device__ __forceinline__ float pow2(int e) { return __int_as_float((e + 127) << 23); }

// floor(log2 m) for m >= 0 finite and normal; -127 for 0 and subnormals, 128 for inf.
__device__ __forceinline__ int exponent_of(float m) { return ((__float_as_int(m) >> 23) & 255) - 127; }

// A row's step: its new running exponent from the old one and this tile's max|g| (`top`),
// the factor that rescales its accumulator row, and the scale of its g entries.
struct OperandScale {
  int exponent;
  float rescale, sigma;
};

__device__ __forceinline__ OperandScale operand_scale(int e_run, float top) {
  const int e = min(max(e_run, exponent_of(top)), kExpCeil);
  return {e, pow2(max(e_run - e, -126)), pow2(kOperandExp - e)};
}

__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }  // ex2.approx, as Triton's tl.exp
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }

// z = S zc rounded on its own, never fused into an FMA with what follows: the forward's lse
// and the backward's exp(z - lse) must see the same rounded z, or p is off by a factor
// exp(ulp(z)), which at SphereFace's S = s ||x|| ~ 1e8 is e^8.
__device__ __forceinline__ float logit(float s, float zc) { return __fmul_rn(s, zc); }
__device__ __forceinline__ double logit(double s, double zc) { return __dmul_rn(s, zc); }

template <class Acc>
__device__ __forceinline__ Acc shuffle_xor(Acc v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// What one epilogue thread knows of its row of the tile.
template <class Acc>
struct Row {
  int64_t index;
  bool valid;      // index < B; other rows contribute nothing
  int64_t label;   // -1 for rows past B
  Acc x_inv;       // 1 / max(||x_i||, kNormEps)
  Acc scale;       // S_i: s, or s ||x_i|| for SphereFace
  Acc lse, g_lse, g_target, g_sum;  // backward only
  Acc nt_lo, nt_hi, nt_a0, nt_a1, nt_a2;  // flags.nontarget only: the row's non-target transform

  // A non-target column's z / S_i and its derivative in cos (margin.h nontarget).
  __device__ __forceinline__ Acc nontarget_value(Acc c) const {
    return fastmargin::nontarget(c, nt_lo, nt_hi, nt_a0, nt_a1, nt_a2);
  }
  __device__ __forceinline__ Acc nontarget_grad(Acc c) const {
    return fastmargin::nontarget_grad(c, nt_lo, nt_hi, nt_a1, nt_a2);
  }
};

template <class Acc>
__device__ Row<Acc> load_row(const MarginCeArgs& a, int64_t B, int64_t index, bool backward) {
  Row<Acc> r{};
  r.index = index;
  r.valid = index < B;
  r.label = r.valid ? a.labels[index] : -1;
  r.x_inv = r.valid ? static_cast<const Acc*>(a.x_inv_norm)[index] : Acc(0);
  if (r.valid) {
    r.scale = static_cast<const Acc*>(a.params)[kScale * a.stride_param + index * a.stride_row];
    if (a.flags.kind == kSphere) r.scale *= static_cast<const Acc*>(a.x_norm)[index];
  }
  if (a.flags.nontarget && r.valid) {  // once a row (a row block in dW), outside the class loops
    const Acc* row = static_cast<const Acc*>(a.params) + index * a.stride_row;
    r.nt_lo = row[kNtLo * a.stride_param];
    r.nt_hi = row[kNtHi * a.stride_param];
    r.nt_a0 = row[kNtA0 * a.stride_param];
    r.nt_a1 = row[kNtA1 * a.stride_param];
    r.nt_a2 = row[kNtA2 * a.stride_param];
  }
  if (backward && r.valid) {
    r.lse = static_cast<const Acc*>(a.lse)[index];
    r.g_lse = static_cast<const Acc*>(a.g_lse)[index];
    r.g_target = static_cast<const Acc*>(a.g_target)[index];
    r.g_sum = static_cast<const Acc*>(a.g_sum)[index];
  }
  return r;
}

// s (BM x BN accumulators) = dots of x's rows row0 .. row0 + BM - 1 with W's rows n0 ..
// n0 + BN - 1 (rows_n of them exist; the rest are 0), and w_inv (BN) their 1 / ||w||.
// Ends with a barrier: s and w_inv are ready for every thread.
template <class Op>
__device__ void dot_tile(const MarginCeArgs& a, const LaunchPlan& p, int64_t row0, int64_t n0, int64_t rows_n,
                         typename Op::T* xs, typename Op::T* ws, typename Op::Acc* s, typename Op::Acc* w_inv) {
  using Tl = Tile<Op>;
  using Acc = typename Op::Acc;
  TileMma<Op, Tl::BM, Tl::BN> mma;
  mma.zero();
  for (int64_t d0 = 0; d0 < p.D; d0 += Tl::BK) {
    stage<typename Op::T, Tl::BM, Tl::BK>(xs, Tl::kLdIn, a.x, row0, p.B - row0, d0, p.D - d0);
    stage<typename Op::T, Tl::BN, Tl::BK>(ws, Tl::kLdIn, a.w, n0, rows_n, d0, p.D - d0);
    __syncthreads();
    mma.template mma<Layout::kRow, Layout::kCol>(xs, Tl::kLdIn, ws, Tl::kLdIn, Tl::BK);
    __syncthreads();
  }
  mma.store(s, Tl::kLdS);
  for (int n = threadIdx.x; n < Tl::BN; n += kThreads) {
    w_inv[n] = n < rows_n ? static_cast<const Acc*>(a.w_inv_norm)[n0 + n] : Acc(0);
  }
  __syncthreads();
}

// cos of class j of the tile from its row of dots: the max over the K sub-centers of
// dot / ||w|| (times 1 / ||x|| by the caller), as csrc/cpu/margin_ce.cpp; *best gets the
// first arg-max, which alone receives the gradient (docs/design.md §1). A NaN wins, as in torch's max.
template <class Acc>
__device__ __forceinline__ Acc class_cosine(const Acc* dots, const Acc* w_inv, int j, int K, int* best) {
  Acc c = dots[j * K] * w_inv[j * K];
  int kb = 0;
  for (int k = 1; k < K; ++k) {
    const Acc ck = dots[j * K + k] * w_inv[j * K + k];
    if (ck > c || ck != ck) {
      c = ck;
      kb = k;
    }
  }
  *best = kb;
  return c;
}

// dcos_ij (docs/design.md §3) with dz_ij = g_lse p_ij + g_target [j = y_i] + g_sum and p_ij =
// exp(S zc - lse); and dz zc, whose row sums are SphereFace's gradient through S_i. Zero
// on rows past B (a where, not a product: their exp may be inf). A non-target column has
// zc = cos, or under flags.nontarget (a branch uniform across the block) zc = nontarget(cos)
// and dcos = S dz nontarget'(cos).
template <class Acc>
struct Dcos {
  Acc dcos, dz_zc;
};

// Row r's margin (its column of the params, or the one column every row shares).
template <class Acc>
__device__ __forceinline__ MarginParams<Acc> row_margin(const MarginCeArgs& a, const Row<Acc>& r) {
  return margin_row(static_cast<const Acc*>(a.params), a.stride_param, a.stride_row, r.index);
}

template <class Acc>
__device__ __forceinline__ Dcos<Acc> dcos_of(Acc c, bool is_target, const Row<Acc>& r, const MarginCeArgs& a) {
  if (!r.valid) return {Acc(0), Acc(0)};
  if (!is_target) {
    if (a.flags.nontarget) {
      const Acc zc = r.nontarget_value(c);
      const Acc dz = r.g_lse * fast_exp(logit(r.scale, zc) - r.lse) + r.g_sum;
      return {r.scale * dz * r.nontarget_grad(c), dz * zc};
    }
    const Acc dz = r.g_lse * fast_exp(logit(r.scale, c) - r.lse) + r.g_sum;
    return {r.scale * dz, dz * c};
  }
  const MarginParams<Acc> m = row_margin(a, r);
  const Acc zc = psi(c, m, a.flags);
  const Acc dz = r.g_lse * fast_exp(logit(r.scale, zc) - r.lse) + r.g_target + r.g_sum;
  return {r.scale * dz * psi_grad(c, m, a.flags), dz * zc};
}

}  // namespace cuda
}  // namespace fastmargin
