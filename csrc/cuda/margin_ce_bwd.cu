// Backward: dx and dW of the row statistics, recomputing each cos tile from the saved lse
// (docs/design.md §3; deterministic: §4) without atomics; the CUDA twin of kernels/margin_ce_bwd.py,
// whose header derives the algebra. With dcos from tiles.cuh:
//
//   dx̂_i = Σ_j (dcos_ij / r_j) w_j          dŵ_j = Σ_i (dcos_ij / n_i) x_i
//   b_j  = Σ_i dcos_ij cos_ij                dw_j = (dŵ_j - w_j b_j / r_j) / r_j
//
// and the binding finishes dx_i = (dx̂_i - x̂_i <x̂_i, dx̂_i>) / n_i (plus SphereFace's term).
// Two kernels, each owning what it writes: dx blocks (row block, slice of D, class split)
// walk their split and write a partial dx̂ that the binding sums over the splits in a fixed
// order; dW blocks (class tile, slice of D) walk every row block and write their dW rows
// once. Each recomputes its cos tiles (one GEMM) and does one more into registers.
#include "cuda/tiles.cuh"

namespace fastmargin {
namespace cuda {

template <class Op>
__global__ void __launch_bounds__(kThreads) margin_ce_bwd_dx_kernel(const MarginCeArgs a, const LaunchPlan p) {
  using T = typename Op::T;
  using Acc = typename Op::Acc;
  using Tl = Tile<Op>;
  constexpr SmemLayout L = smem_layout(Op::kOperand, Kernel::kDx);
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* ws = reinterpret_cast<T*>(smem + L.ws);
  Acc* s = reinterpret_cast<Acc*>(smem + L.s);
  Acc* w_inv = reinterpret_cast<Acc*>(smem + L.w_inv);
  T* g = reinterpret_cast<T*>(smem + L.g);
  T* w_slice = reinterpret_cast<T*>(smem + L.op2);
  // fp16 operands (tiles.cuh, "fp16 GEMM operands"): each row's scale, per warp scratch.
  constexpr bool kScaled = std::is_same_v<Op, OpF16>;
  float* row_factor = reinterpret_cast<float*>(smem + L.scale);
  float* scratch = reinterpret_cast<float*>(smem + L.xs);
  static_assert(!kScaled || L.s - L.xs >= kThreads / 32 * 256 * sizeof(float), "scratch fits over xs and ws");

  const int K = static_cast<int>(p.K);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tl::BM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tl::BDO;
  const int64_t split = blockIdx.z;
  const int tile_row = threadIdx.x / Tl::kRowThreads, lane = threadIdx.x % Tl::kRowThreads;
  const Row<Acc> r = load_row<Acc>(a, p.B, row0 + tile_row, true);
  Acc* dots = s + tile_row * Tl::kLdS;
  T* g_row = g + tile_row * Tl::kLdG;

  TileMma<Op, Tl::BM, Tl::BDO> dx_hat;
  dx_hat.zero();
  Acc norm_grad = Acc(0);
  [[maybe_unused]] int e_run = kExpFloor;  // fp16: this row's running exponent (same in its kRowThreads)
  const int64_t c_begin = split * p.split_size;
  const int64_t c_end = c_begin + p.split_size < p.C ? c_begin + p.split_size : p.C;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += p.block_c) {
    const int nc = static_cast<int>(p.C - c0 < p.block_c ? p.C - c0 : p.block_c);
    const int64_t n0 = c0 * K;
    const int rows_n = nc * K;
    dot_tile<Op>(a, p, row0, n0, rows_n, xs, ws, s, w_inv);
    const int64_t target = r.label - c0;
    // g = dcos / r_j at each class's arg-max sub-center, 0 at the others and past the tile's
    // classes (where W's staged rows are 0 but stale shared memory could hold a NaN).
    [[maybe_unused]] float top = 0.0f;  // fp16: the max|g| of this thread's entries
    for (int j = lane; j < nc; j += Tl::kRowThreads) {
      int best;
      const Acc c = class_cosine(dots, w_inv, j, K, &best) * r.x_inv;
      const Dcos<Acc> d = dcos_of(c, j == target, r, a);
      norm_grad += d.dz_zc;
      for (int k = 0; k < K; ++k) {
        const int n = j * K + k;
        if constexpr (kScaled) {  // in fp32 for now, over the dots class_cosine has read; 0 for a zero W row
          dots[n] = k == best && !(w_inv[n] > kZeroRowInvNorm) ? d.dcos * w_inv[n] : 0.0f;  // a NaN stays
          top = fmaxf(top, fabsf(dots[n]));
        } else {
          g_row[n] = convert<T>(k == best ? d.dcos * w_inv[n] : Acc(0));
        }
      }
    }
    for (int n = rows_n + lane; n < Tl::BN; n += Tl::kRowThreads) g_row[n] = convert<T>(0.0f);
    stage<T, Tl::BN, Tl::BDO>(w_slice, Tl::kLdOp2, a.w, n0, rows_n, d0, p.D - d0);
    if constexpr (kScaled) {
      // The row's max|g| over its kRowThreads lanes, its new exponent, and each thread's
      // entries of g scaled into fp16; the accumulator rows whose exponent grew rescaled.
      for (int offset = 1; offset < Tl::kRowThreads; offset <<= 1) top = fmaxf(top, shuffle_xor(top, offset));
      const OperandScale scale = operand_scale(e_run, top);
      e_run = scale.exponent;
      for (int j = lane; j < nc; j += Tl::kRowThreads) {
        for (int k = 0; k < K; ++k) g_row[j * K + k] = convert<T>(dots[j * K + k] * scale.sigma);
      }
      if (lane == 0) row_factor[tile_row] = scale.rescale;
      if (__syncthreads_or(scale.rescale != 1.0f)) dx_hat.scale_rows(row_factor, scratch);
    } else {
      __syncthreads();
    }
    dx_hat.template mma<Layout::kRow, Layout::kRow>(g, Tl::kLdG, w_slice, Tl::kLdOp2, Tl::BN);
    __syncthreads();
  }

  // The walk is done: stage the (BM x BDO) result over the buffer, then write rows of D
  // (fp16: each row times 2^(E - 14), undoing its operand scale).
  if constexpr (kScaled) {
    if (lane == 0) row_factor[tile_row] = pow2(e_run - kOperandExp);
  }
  Acc* out = reinterpret_cast<Acc*>(smem);
  dx_hat.store(out, Tl::kLdOut);
  __syncthreads();
  Acc* dx_hat_out = static_cast<Acc*>(a.dx_hat) + split * p.B * p.D;
  for (int idx = threadIdx.x; idx < Tl::BM * Tl::BDO; idx += kThreads) {
    const int i = idx / Tl::BDO, d = idx % Tl::BDO;
    if (row0 + i < p.B && d0 + d < p.D) {
      Acc v = out[i * Tl::kLdOut + d];
      if constexpr (kScaled) v *= row_factor[i];
      dx_hat_out[(row0 + i) * p.D + d0 + d] = v;
    }
  }
  for (int offset = 1; offset < Tl::kRowThreads; offset <<= 1) norm_grad += shuffle_xor(norm_grad, offset);
  if (blockIdx.y == 0 && lane == 0 && r.valid) static_cast<Acc*>(a.norm_grad)[split * p.B + r.index] = norm_grad;
}

template <class Op>
__global__ void __launch_bounds__(kThreads) margin_ce_bwd_dw_kernel(const MarginCeArgs a, const LaunchPlan p) {
  using T = typename Op::T;
  using Acc = typename Op::Acc;
  using Tl = Tile<Op>;
  constexpr SmemLayout L = smem_layout(Op::kOperand, Kernel::kDw);
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* ws = reinterpret_cast<T*>(smem + L.ws);
  Acc* s = reinterpret_cast<Acc*>(smem + L.s);
  Acc* w_inv = reinterpret_cast<Acc*>(smem + L.w_inv);
  T* g = reinterpret_cast<T*>(smem + L.g);
  T* x_slice = reinterpret_cast<T*>(smem + L.op2);
  Acc* radial = reinterpret_cast<Acc*>(smem + L.radial);
  // fp16 operands (tiles.cuh, "fp16 GEMM operands"): each weight row's accumulator factor
  // and operand scale, per-warp scratch, and g in fp32 (BM x kLdS) over x's slice, which is
  // staged after g is scaled.
  constexpr bool kScaled = std::is_same_v<Op, OpF16>;
  float* class_factor = reinterpret_cast<float*>(smem + L.scale);
  float* class_sigma = class_factor + Tl::BN;
  float* scratch = reinterpret_cast<float*>(smem + L.xs);
  float* g32 = reinterpret_cast<float*>(smem + L.op2);
  static_assert(!kScaled || L.s - L.xs >= kThreads / 32 * 256 * sizeof(float), "scratch fits over xs and ws");
  static_assert(!kScaled || Tl::BM * Tl::kLdS * sizeof(float) <= Tl::BM * Tl::kLdOp2 * sizeof(T),
                "g in fp32 fits over x's slice");

  const int K = static_cast<int>(p.K);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * p.block_c;
  const int nc = static_cast<int>(p.C - c0 < p.block_c ? p.C - c0 : p.block_c);
  const int64_t n0 = c0 * K;
  const int rows_n = nc * K;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tl::BDO;
  const int tile_row = threadIdx.x / Tl::kRowThreads, lane = threadIdx.x % Tl::kRowThreads;
  Acc* dots = s + tile_row * Tl::kLdS;
  T* g_row = g + tile_row * Tl::kLdG;

  TileMma<Op, Tl::BN, Tl::BDO> dw_hat;  // dŵ_j, rows of the tile by the slice of D
  dw_hat.zero();
  Acc b = Acc(0);  // thread n < BN: b_n = Σ_i dcos_in cos_in, summed over the row blocks in order
  [[maybe_unused]] int e_run = kExpFloor;  // fp16, thread n < BN: weight row n's running exponent
  for (int64_t row0 = 0; row0 < p.B; row0 += Tl::BM) {
    const Row<Acc> r = load_row<Acc>(a, p.B, row0 + tile_row, true);
    dot_tile<Op>(a, p, row0, n0, rows_n, xs, ws, s, w_inv);
    const int64_t target = r.label - c0;
    // g = dcos / n_i and, over the dots (each thread reads its class's K dots first),
    // dcos cos: both at the arg-max sub-center only.
    for (int j = lane; j < nc; j += Tl::kRowThreads) {
      int best;
      const Acc c = class_cosine(dots, w_inv, j, K, &best) * r.x_inv;
      const Dcos<Acc> d = dcos_of(c, j == target, r, a);
      for (int k = 0; k < K; ++k) {
        if constexpr (kScaled) {  // in fp32 for now; 0 for a zero embedding, a NaN stays
          const bool live = k == best && !(r.x_inv > kZeroRowInvNorm);
          g32[tile_row * Tl::kLdS + j * K + k] = live ? d.dcos * r.x_inv : 0.0f;
        } else {
          g_row[j * K + k] = convert<T>(k == best ? d.dcos * r.x_inv : Acc(0));
        }
        dots[j * K + k] = k == best ? d.dcos * c : Acc(0);
      }
    }
    if constexpr (kScaled) {
      // Thread n < BN walks weight row n's column of the tile: b_n, and max|g| for its new
      // exponent; then every thread scales g into fp16 by its column's sigma.
      __syncthreads();
      bool grew = false;
      if (threadIdx.x < Tl::BN) {
        float top = 0.0f;
        if (threadIdx.x < rows_n) {
          for (int i = 0; i < Tl::BM; ++i) {
            b += s[i * Tl::kLdS + threadIdx.x];
            top = fmaxf(top, fabsf(g32[i * Tl::kLdS + threadIdx.x]));
          }
        }
        const OperandScale scale = operand_scale(e_run, top);
        e_run = scale.exponent;
        class_factor[threadIdx.x] = scale.rescale;
        class_sigma[threadIdx.x] = scale.sigma;
        grew = scale.rescale != 1.0f;
      }
      if (__syncthreads_or(grew)) dw_hat.scale_rows(class_factor, scratch);
      for (int idx = threadIdx.x; idx < Tl::BM * Tl::BN; idx += kThreads) {
        const int i = idx / Tl::BN, n = idx % Tl::BN;
        g[i * Tl::kLdG + n] = convert<T>(n < rows_n ? g32[i * Tl::kLdS + n] * class_sigma[n] : 0.0f);
      }
      __syncthreads();  // g32 read: x's slice may go over it
      stage<T, Tl::BM, Tl::BDO>(x_slice, Tl::kLdOp2, a.x, row0, p.B - row0, d0, p.D - d0);
      __syncthreads();
    } else {
      for (int n = rows_n + lane; n < Tl::BN; n += Tl::kRowThreads) g_row[n] = convert<T>(0.0f);
      stage<T, Tl::BM, Tl::BDO>(x_slice, Tl::kLdOp2, a.x, row0, p.B - row0, d0, p.D - d0);
      __syncthreads();
      if (threadIdx.x < rows_n) {
        for (int i = 0; i < Tl::BM; ++i) b += s[i * Tl::kLdS + threadIdx.x];
      }
    }
    dw_hat.template mma<Layout::kCol, Layout::kRow>(g, Tl::kLdG, x_slice, Tl::kLdOp2, Tl::BM);
    __syncthreads();
  }

  if (threadIdx.x < Tl::BN) {
    radial[threadIdx.x] = b;
    if constexpr (kScaled) class_factor[threadIdx.x] = pow2(e_run - kOperandExp);  // undoes the operand scale
  }
  Acc* out = reinterpret_cast<Acc*>(smem);
  dw_hat.store(out, Tl::kLdOut);
  __syncthreads();
  // dw_j = (dŵ_j - w_j b_j / r_j) / r_j, w read at full precision; below kNormEps the norm
  // is a constant and there is no radial term. Written in dw's dtype along its layout.
  const Acc* w_norm = static_cast<const Acc*>(a.w_norm);
  const Acc* w_inv_norm = static_cast<const Acc*>(a.w_inv_norm);
  const bool by_rows = along_rows(a.stride_dwn, a.stride_dwd);
  for (int idx = threadIdx.x; idx < Tl::BN * Tl::BDO; idx += kThreads) {
    const int n = by_rows ? idx / Tl::BDO : idx % Tl::BN;
    const int d = by_rows ? idx % Tl::BDO : idx / Tl::BN;
    if (n >= rows_n || d0 + d >= p.D) continue;
    const int64_t wn = n0 + n;
    const Acc inv = w_inv_norm[wn];
    const Acc rb = w_norm[wn] < Acc(kNormEps) ? Acc(0) : radial[n] * inv;
    const Acc wv = load_as<Acc>(a.w.data, a.w.dtype, wn * a.w.stride0 + (d0 + d) * a.w.stride1);
    Acc dw_hat_nd = out[n * Tl::kLdOut + d];
    if constexpr (kScaled) dw_hat_nd *= class_factor[n];
    store_as(a.dw, a.dw_dtype, wn * a.stride_dwn + (d0 + d) * a.stride_dwd, (dw_hat_nd - wv * rb) * inv);
  }
}

cudaError_t margin_ce_backward(const LaunchPlan& p, const MarginCeArgs& a, cudaStream_t stream) {
  return with_operand(p.operand, [&](auto tag) {
    using Op = decltype(tag);
    auto* dx_kernel = margin_ce_bwd_dx_kernel<Op>;
    auto* dw_kernel = margin_ce_bwd_dw_kernel<Op>;
    cudaError_t err =
        cudaFuncSetAttribute(dx_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.dx_smem));
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(dw_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.dw_smem));
    if (err != cudaSuccess) return err;
    const dim3 dx_grid(static_cast<unsigned>(p.dx_grid[0]), static_cast<unsigned>(p.dx_grid[1]),
                       static_cast<unsigned>(p.dx_grid[2]));
    const dim3 dw_grid(static_cast<unsigned>(p.dw_grid[0]), static_cast<unsigned>(p.dw_grid[1]),
                       static_cast<unsigned>(p.dw_grid[2]));
    dx_kernel<<<dx_grid, kThreads, p.dx_smem, stream>>>(a, p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dw_kernel<<<dw_grid, kThreads, p.dw_smem, stream>>>(a, p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastmargin
