// Forward: the margin logits' row statistics (lse, z_target, z_sum) in one pass over the
// classes, never holding more than a tile of logits (docs/design.md §2, §4); the CUDA
// twin of kernels/margin_ce_fwd.py. GEMMs on tensor cores through WMMA (why not CUTLASS:
// tiles.cuh).
//
// Block (row block, split) walks its split's class tiles: the cos tile's dots by one tile
// GEMM into shared memory, then each row's kRowThreads threads turn their classes into
// logits (sub-center max, psi on the target, the non-target transform elsewhere under
// flags.nontarget, x S_i) and fold them into a running max and sum of exp(z - max), a
// streaming log-sum-exp. The row's threads merge by shuffles in a fixed pattern and write
// (splits, B) buffers, which the binding merges across splits in a fixed order: no
// atomics, the same bits on every run.
#include "cuda/tiles.cuh"

namespace fastmargin {
namespace cuda {

template <class Op>
__global__ void __launch_bounds__(kThreads) margin_ce_fwd_kernel(const MarginCeArgs a, const LaunchPlan p) {
  using T = typename Op::T;
  using Acc = typename Op::Acc;
  using Tl = Tile<Op>;
  constexpr SmemLayout L = smem_layout(Op::kOperand, Kernel::kForward);
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  T* ws = reinterpret_cast<T*>(smem + L.ws);
  Acc* s = reinterpret_cast<Acc*>(smem + L.s);
  Acc* w_inv = reinterpret_cast<Acc*>(smem + L.w_inv);

  const int K = static_cast<int>(p.K);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Tl::BM;
  const int tile_row = threadIdx.x / Tl::kRowThreads, lane = threadIdx.x % Tl::kRowThreads;
  const Row<Acc> r = load_row<Acc>(a, p.B, row0 + tile_row, false);
  const Acc* dots = s + tile_row * Tl::kLdS;

  Acc run_max = -INFINITY, run_sum = Acc(0), z_sum = Acc(0), z_target = Acc(0);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * p.split_size;
  const int64_t c_end = c_begin + p.split_size < p.C ? c_begin + p.split_size : p.C;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += p.block_c) {
    const int nc = static_cast<int>(p.C - c0 < p.block_c ? p.C - c0 : p.block_c);
    dot_tile<Op>(a, p, row0, c0 * K, static_cast<int64_t>(nc) * K, xs, ws, s, w_inv);
    const int64_t target = r.label - c0;  // in [0, nc) only when this tile holds the row's label
    for (int j = lane; j < nc; j += Tl::kRowThreads) {
      int best;
      const Acc c = class_cosine(dots, w_inv, j, K, &best) * r.x_inv;
      const bool is_target = j == target;
      // flags.nontarget: a branch uniform across the block, with the row's numbers in r.
      const Acc zc = a.flags.nontarget ? r.nontarget_value(c) : c;
      const Acc z = logit(r.scale, is_target ? psi(c, row_margin(a, r), a.flags) : zc);
      z_target += is_target ? z : Acc(0);
      z_sum += z;
      // One exp an element; a new maximum rescales the sum instead. A NaN z fails the
      // comparison and poisons the sum, so it reaches the lse.
      if (z > run_max) {
        run_sum = run_sum * fast_exp(run_max - z) + Acc(1);
        run_max = z;
      } else {
        run_sum += fast_exp(z - run_max);
      }
    }
    __syncthreads();  // s is rewritten by the next tile
  }

  for (int offset = 1; offset < Tl::kRowThreads; offset <<= 1) {
    const Acc other_max = shuffle_xor(run_max, offset), other_sum = shuffle_xor(run_sum, offset);
    const Acc top = run_max > other_max ? run_max : other_max;
    // An empty sum (a thread that had no class) has max -inf: skip it rather than exp(-inf + inf).
    run_sum = (run_sum == Acc(0) ? Acc(0) : run_sum * fast_exp(run_max - top)) +
              (other_sum == Acc(0) ? Acc(0) : other_sum * fast_exp(other_max - top));
    run_max = top;
    z_sum += shuffle_xor(z_sum, offset);
    z_target += shuffle_xor(z_target, offset);
  }
  if (lane == 0 && r.valid) {
    const int64_t out = static_cast<int64_t>(blockIdx.y) * p.B + r.index;
    static_cast<Acc*>(a.row_max)[out] = run_max;
    static_cast<Acc*>(a.row_sum_exp)[out] = run_sum;
    static_cast<Acc*>(a.z_sum)[out] = z_sum;
    static_cast<Acc*>(a.z_target)[out] = z_target;
  }
}

cudaError_t margin_ce_forward(const LaunchPlan& p, const MarginCeArgs& a, cudaStream_t stream) {
  return with_operand(p.operand, [&](auto tag) {
    using Op = decltype(tag);
    auto* kernel = margin_ce_fwd_kernel<Op>;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.fwd_smem));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(p.fwd_grid[0]), static_cast<unsigned>(p.fwd_grid[1]),
                    static_cast<unsigned>(p.fwd_grid[2]));
    kernel<<<grid, kThreads, p.fwd_smem, stream>>>(a, p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastmargin
