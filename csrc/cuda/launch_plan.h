// The host side of the CUDA kernels: which GEMM operand (tensor cores or not), the tile
// shapes, the grids, the class splits and the shared memory, from the shapes, dtypes and
// device. Plain C++ (no CUDA, no torch): the binding file compiles it into every build, so
// CPU-only CI tests exactly the logic that sizes the GPU launches (tests/test_cuda.py), and
// the kernels (margin_ce_fwd.cu, margin_ce_bwd.cu) take their tile and shared-memory
// layout from the same constexpr functions, so host and device cannot disagree.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastmargin {
namespace cuda {

// The dtype of an input or output tensor.
enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// What the tile GEMMs multiply. kFloat16, kBFloat16 and kTF32 run on tensor cores (WMMA,
// fp32 accumulate); kFloat32 is the exact fp32 path (torch disallows tf32), kFloat64 fp64.
enum class Operand : int { kFloat16, kBFloat16, kTF32, kFloat32, kFloat64 };

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// One tile: block_b rows of x by block_n weight rows (block_n / K classes), the cos GEMM
// stepping through D by block_k; a backward program's output is block_do columns of D.
// Rows of operand tiles in shared memory are padded by `pad` elements (WMMA needs rows
// that are multiples of 16 bytes; the padding also spreads rows over the banks), rows of
// accumulator tiles by pad_acc.
struct TileShape {
  int block_b, block_n, block_k, block_do, pad, pad_acc;
};

// 16-bit: 64 x 64 tiles, outputs of 256 columns of D, so that a backward at D <= 256
// recomputes each cos tile once per kernel (Triton's choice, kernels/launch.py); 64 x 256
// fp32 accumulators are 64 registers a thread at 8 warps. fp32 operands take twice the
// shared memory, so 128 columns; fp64 (SIMT) a quarter of the tile.
constexpr TileShape tile_shape(Operand op) {
  switch (op) {
    case Operand::kFloat16:
    case Operand::kBFloat16: return {64, 64, 32, 256, 8, 4};
    case Operand::kTF32: return {64, 64, 32, 128, 4, 4};
    case Operand::kFloat32: return {64, 64, 16, 128, 1, 1};
    default: return {32, 32, 16, 64, 1, 1};
  }
}

constexpr size_t operand_bytes(Operand op) {
  return op == Operand::kFloat64 ? 8 : (op == Operand::kFloat16 || op == Operand::kBFloat16) ? 2 : 4;
}
constexpr size_t acc_bytes(Operand op) { return op == Operand::kFloat64 ? 8 : 4; }

enum class Kernel : int { kForward, kDx, kDw };

// Byte offsets of a kernel's shared-memory regions (each 128-byte aligned, as WMMA wants 32):
// xs (block_b x block_k) and ws (block_n x block_k), the cos GEMM's operands; s (block_b x
// block_n accumulators), its dots; w_inv (block_n), the tile's 1/||w||. Backward adds g
// (block_b x block_n operands), the dcos tile, and op2, the second GEMM's other operand
// (dx: W's block_n x block_do slice; dW: x's block_b x block_do slice). When the walk is
// done a backward kernel stages its output tile over the whole buffer from offset 0;
// dW's radial sums (block_n accumulators) sit past it, and so do, for fp16 operands, the
// backward's operand scales (tiles.cuh, "fp16 GEMM operands"): 2 x 64 floats, one factor
// per accumulator row (dx: rows of x, dW: weight rows) and dW's per-class operand scale.
// The fp16 backward also borrows regions that are dead at that point of a tile (asserted
// in the kernels): xs/ws hold the per-warp scratch that rescales accumulator rows (the cos
// GEMM is done), and dW's op2 holds its fp32 operand before it is scaled (x's slice is
// staged after).
struct SmemLayout {
  size_t xs, ws, s, w_inv, g, op2, radial, scale, total;
};

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

constexpr SmemLayout smem_layout(Operand op, Kernel kernel) {
  const TileShape t = tile_shape(op);
  const size_t e = operand_bytes(op), a = acc_bytes(op);
  SmemLayout l{};
  size_t at = 0;
  l.xs = at;
  at = align128(at + size_t(t.block_b) * (t.block_k + t.pad) * e);
  l.ws = at;
  at = align128(at + size_t(t.block_n) * (t.block_k + t.pad) * e);
  l.s = at;
  at = align128(at + size_t(t.block_b) * (t.block_n + t.pad_acc) * a);
  l.w_inv = at;
  at = align128(at + size_t(t.block_n) * a);
  if (kernel != Kernel::kForward) {
    l.g = at;
    at = align128(at + size_t(t.block_b) * (t.block_n + t.pad) * e);
    l.op2 = at;
    const size_t op2_rows = kernel == Kernel::kDx ? t.block_n : t.block_b;
    at = align128(at + op2_rows * (t.block_do + t.pad) * e);
    const size_t out_rows = kernel == Kernel::kDx ? t.block_b : t.block_n;
    const size_t out = align128(out_rows * (t.block_do + t.pad_acc) * a);
    at = at > out ? at : out;
    if (kernel == Kernel::kDw) {
      l.radial = at;
      at = align128(at + size_t(t.block_n) * a);
    }
    if (op == Operand::kFloat16) {
      l.scale = at;
      const size_t rows = t.block_b > t.block_n ? t.block_b : t.block_n;
      at = align128(at + 2 * rows * sizeof(float));
    }
  }
  l.total = at;
  return l;
}

inline const char* operand_name(Operand op) {
  switch (op) {
    case Operand::kFloat16: return "float16";
    case Operand::kBFloat16: return "bfloat16";
    case Operand::kTF32: return "tf32";
    case Operand::kFloat32: return "float32";
    default: return "float64";
  }
}

// The opt-in shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin) on a
// compute capability (10 * major + minor), from the CUDA C++ Programming Guide's table of
// technical specifications; 0 for one the table does not name. The binding passes the
// device's own value; this is the host tests' view of the GPUs the build targets (sm_80 and
// sm_90 machine code, sm_90 PTX for newer: setup.py) and of the consumer parts that run them.
inline int64_t smem_optin_limit(int arch) {
  switch (arch) {
    case 75: return 65536;                          // Turing: 64 KB (the kernels need sm_80)
    case 80: case 87: return 166912;                // A100, Orin: 163 KB
    case 86: case 89: case 120: case 121: return 101376;  // GA10x, Ada, GB20x consumer: 99 KB
    case 90: case 100: case 103: return 232448;     // H100/H200, B200/B300: 227 KB
    default: return 0;
  }
}

// The GEMM operand for inputs of dtypes x and w, as the Triton backend picks it
// (kernels/launch.py dtypes): the inputs' dtype when they share one, else the compute
// dtype (fp64 if either is, else fp32); fp32 on tensor cores (tf32) only where torch
// allows tf32 matmuls.
inline Operand choose_operand(DType x, DType w, bool allow_tf32) {
  if (x == DType::kFloat64 || w == DType::kFloat64) return Operand::kFloat64;
  if (x == w && x == DType::kFloat16) return Operand::kFloat16;
  if (x == w && x == DType::kBFloat16) return Operand::kBFloat16;
  return allow_tf32 ? Operand::kTF32 : Operand::kFloat32;
}

struct LaunchPlan {
  Operand operand;
  TileShape tile;
  int64_t B, C, D, K;
  int64_t block_c;      // classes per tile: block_n / K
  int64_t row_blocks;   // tiles of rows: ceil(B / block_b)
  int64_t class_tiles;  // tiles of classes: ceil(C / block_c), the dW grid
  int64_t d_blocks;     // output slices of D: ceil(D / block_do)
  int64_t split_size;   // classes per forward / dx program, a multiple of block_c
  int64_t splits;       // ceil(C / split_size): the forward's and dx's partial results
  int64_t max_splits;   // the most splits the memory budget allows (max_splits_for_memory)
  int64_t fwd_grid[3], dx_grid[3], dw_grid[3];
  int64_t fwd_smem, dx_smem, dw_smem;  // dynamic shared memory, bytes
  int64_t max_smem;                    // the limit they were checked against
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The memory budget of the class splits. The dx kernel writes one partial dx̂ per split, a
// (splits, B, D) buffer of accumulators (acc_bytes each) that fastmargin/gpu_host.py sums
// and frees; the forward's (splits, B) buffers are D times smaller. Unbounded, a small chunk
// makes it huge (chunk 64 at B = 8192, C = 2^21, D = 512: 32768 splits, 550 GB). Bounded, as
// kernels/launch.py split_size bounds the Triton kernels' (PARTIAL_BUDGET_BYTES), by
//
//     splits <= max(1, kSplitBudgetBytes / (B * D * acc_bytes))
//
// so the buffer stays within 256 MiB unless one split alone is larger (then it is (B, D),
// the size of dx itself). 256 MiB is under 2% of a 16 GB device, and binds only where splits
// no longer matter for speed: the default rule asks for ceil(2 num_sms / row_blocks) splits,
// about 2 num_sms block_b D acc_bytes bytes in all (35 MB on an H100 at D = 512); the budget
// can cut it only at D in the thousands (past D ~ 2000 in the worst rounding), where the dx
// grid's row blocks times D slices fill the device by themselves.
constexpr int64_t kSplitBudgetBytes = int64_t(256) << 20;

inline int64_t max_splits_for_memory(int64_t B, int64_t D, int64_t acc_bytes) {
  return std::max<int64_t>(1, kSplitBudgetBytes / (B * D * acc_bytes));
}

// The launches for x (B, D), w (C*K, D). arch: the device's compute capability as 10 *
// major + minor; num_sms its multiprocessors; max_smem its opt-in shared memory per block
// (<= 0: smem_optin_limit(arch)). chunk: a lower bound on the classes per split (forward
// and dx block), or <= 0 for enough class splits that the forward fills the device twice
// (kernels/launch.py split_size); either way raised to whole tiles, and raised further
// where more splits would pass CUDA's grid limit (65535) or the memory budget of the
// partial buffers (max_splits_for_memory): the result is the same, only the order of the
// per-split sums changes. Throws std::invalid_argument (ValueError in Python) with the
// reason when the kernels cannot run the problem.
inline LaunchPlan make_launch_plan(int64_t B, int64_t C, int64_t D, int64_t K, DType x, DType w, bool allow_tf32,
                                   int arch, int64_t num_sms, int64_t chunk, int64_t max_smem) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("fastmargin cuda: " + why); };
  if (B < 1 || C < 1 || D < 1 || K < 1) {
    fail("B, C, D and sub_centers must be >= 1, got B=" + std::to_string(B) + " C=" + std::to_string(C) +
         " D=" + std::to_string(D) + " K=" + std::to_string(K));
  }
  if (arch < 80) {
    fail("the kernels are built for sm_80 and newer (tensor-core WMMA for bf16), this device is sm_" +
         std::to_string(arch) + "; use backend='triton'");
  }
  if (num_sms < 1) fail("num_sms must be >= 1, got " + std::to_string(num_sms));
  LaunchPlan p{};
  p.operand = choose_operand(x, w, allow_tf32);
  p.tile = tile_shape(p.operand);
  p.B = B; p.C = C; p.D = D; p.K = K;
  if (K > p.tile.block_n) {
    fail("sub_centers=" + std::to_string(K) + " exceeds the " + std::to_string(p.tile.block_n) +
         " weight rows of a " + operand_name(p.operand) + " tile (a class's sub-centers share one tile); "
         "use backend='triton'");
  }
  p.block_c = p.tile.block_n / K;
  p.row_blocks = cdiv(B, p.tile.block_b);
  p.class_tiles = cdiv(C, p.block_c);
  p.d_blocks = cdiv(D, p.tile.block_do);
  if (p.row_blocks > kMaxGridX || p.class_tiles > kMaxGridX || p.d_blocks > kMaxGridYZ) {
    fail("the grid exceeds CUDA's limits (B=" + std::to_string(B) + ", C=" + std::to_string(C) +
         ", D=" + std::to_string(D) + ")");
  }
  int64_t split = chunk;
  if (split <= 0) {
    const int64_t splits = std::max<int64_t>(1, std::min(p.class_tiles, cdiv(2 * num_sms, p.row_blocks)));
    split = cdiv(C, splits);
  }
  // Whole tiles, at most 65535 splits (a grid dimension) and at most max_splits (memory): a
  // tiny chunk on a huge C is raised rather than refused. With t tiles a split, the splits
  // are ceil(class_tiles / t), within both bounds when t >= ceil(class_tiles / bound).
  p.max_splits = std::min(kMaxGridYZ, max_splits_for_memory(B, D, static_cast<int64_t>(acc_bytes(p.operand))));
  split = std::max(cdiv(split, p.block_c), cdiv(p.class_tiles, p.max_splits)) * p.block_c;
  p.split_size = split;
  p.splits = cdiv(C, split);
  const int64_t fwd[3] = {p.row_blocks, p.splits, 1};
  const int64_t dx[3] = {p.row_blocks, p.d_blocks, p.splits};
  const int64_t dw[3] = {p.class_tiles, p.d_blocks, 1};
  std::copy(fwd, fwd + 3, p.fwd_grid);
  std::copy(dx, dx + 3, p.dx_grid);
  std::copy(dw, dw + 3, p.dw_grid);
  p.fwd_smem = static_cast<int64_t>(smem_layout(p.operand, Kernel::kForward).total);
  p.dx_smem = static_cast<int64_t>(smem_layout(p.operand, Kernel::kDx).total);
  p.dw_smem = static_cast<int64_t>(smem_layout(p.operand, Kernel::kDw).total);
  p.max_smem = max_smem = max_smem > 0 ? max_smem : smem_optin_limit(arch);
  if (max_smem <= 0) {
    fail("no shared-memory limit given and sm_" + std::to_string(arch) + " is not in smem_optin_limit's table");
  }
  const int64_t most = std::max({p.fwd_smem, p.dx_smem, p.dw_smem});
  if (most > max_smem) {
    fail(std::string(operand_name(p.operand)) + " tiles need " + std::to_string(most) +
         " bytes of shared memory a block, the device (sm_" + std::to_string(arch) + ") allows " +
         std::to_string(max_smem));
  }
  return p;
}

}  // namespace cuda
}  // namespace fastmargin
