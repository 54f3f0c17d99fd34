"""The Triton backend (kernels/, backend='triton') against the oracle fastmargin.reference.

Without a GPU the kernels run under Triton's interpreter, on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1): the kernel code is the one a GPU compiles, numpy does the
arithmetic. tests/test_cpu.py's tests run here on 'triton' through its `backend` fixture:
the ones whose cost suits the interpreter as they are, the long parametrisations thinned
(every case of them with -m slow). Then what is Triton's own: the jit margin math against
fastmargin.margins, the split walk, determinism, a compile for sm_80 and sm_90 with
Triton's real compiler (no GPU needed) that checks for tensor-core instructions, and
GPU tests of the compiled kernels that skip without a GPU.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import test_cpu  # noqa: E402
from fastmargin import backends, reference  # noqa: E402
from fastmargin.kernels import launch  # noqa: E402
from fastmargin.kernels import margin as margin_jit  # noqa: E402
from fastmargin.margins import Margin  # noqa: E402
from helpers import assert_close  # noqa: E402
from test_cpu import (  # noqa: E402, F401  (test functions are collected here again, on 'triton')
    DTYPES, GRAD_MODES, MARGINS, OPTIONS, TOL, assert_rel, check_against_reference, geometric_inputs,
    option_inputs, run, upstream_weights,
    test_all_ignored_and_empty, test_cos_plus_minus_one, test_double_backward_is_refused, test_gradcheck,
    test_kernel_labels_outside_the_classes_have_no_target,
    test_lse_of_ignored_rows_labelled_with_a_class, test_mixed_fp32_fp64, test_nan_propagates, test_op_checks,
    test_fp16_small_gradients_per_row,
    test_opcheck_backward, test_opcheck_forward, test_ragged_shapes, test_strided_inputs,
    test_subcenter_exact_tie_goes_to_the_first, test_subcenter_gradient_goes_to_the_argmax_only,
    test_torch_compile_fullgraph_matches_eager, test_transposed_weight, test_zero_rows,
)

from fastmargin import backend_triton  # noqa: E402, F401  (registers torch.ops.fastmargin.triton_fwd / _bwd)

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = launch.INTERPRET
GPU = torch.cuda.is_available() and not INTERPRETED
NO_GPU = "needs a CUDA device (the Triton kernels run compiled there; here they are interpreted)"


# test_cpu's tests that reach the backend only through test_cpu.run, which moves the inputs
# to the backend's device: on a GPU they run on the compiled kernels too.
ON_ANY_DEVICE = {
    "test_margins_match_reference", "test_options_match_reference", "test_splits", "test_deterministic",
    "test_half_inputs", "test_ragged_shapes", "test_strided_inputs", "test_mixed_fp32_fp64",
    "test_all_ignored_and_empty", "test_cos_plus_minus_one", "test_zero_rows",
    "test_subcenter_gradient_goes_to_the_argmax_only", "test_subcenter_exact_tie_goes_to_the_first",
}


@pytest.fixture
def backend(request):
    """'triton' for test_cpu's tests: all of them under the interpreter, on a GPU those that
    move their inputs to it (ON_ANY_DEVICE); the others call the ops on CPU tensors."""
    if not INTERPRETED and (not GPU or request.function.__name__ not in ON_ANY_DEVICE):
        pytest.skip("a test on CPU tensors: it runs where TRITON_INTERPRET=1 (tests/conftest.py without a GPU)")
    return "triton"


# ---------------------------------------------------------------- test_cpu's long tests, thinned

# Every margin in fp64 with both gradient modes, fp32 for the exact gradient.
MARGIN_CASES = [
    pytest.param(name, mode, dtype, marks=[pytest.mark.slow] if (dtype == torch.float32 and mode == "detached") else [])
    for name in MARGINS for mode in GRAD_MODES for dtype in (torch.float64, torch.float32)
]


@pytest.mark.parametrize("name, grad_mode, dtype", MARGIN_CASES)
def test_margins_match_reference(name, grad_mode, dtype, backend):
    test_cpu.test_margins_match_reference(name, grad_mode, dtype, backend)


# Each option row once, with the margin cycling; the full product with -m slow.
OPTION_CASES = [
    pytest.param(name, *option.values, dtype, mode, id=f"{name}-{option.id}-{mode}-{dtype}".replace("torch.", ""),
                 marks=[] if (i % 3 == j and dtype == torch.float64 and mode == "exact") or (i, j) == (7, 0)
                 else [pytest.mark.slow])
    for i, option in enumerate(OPTIONS)
    for j, name in enumerate(test_cpu.OPTION_MARGINS)
    for mode in GRAD_MODES for dtype in (torch.float64, torch.float32)
]


@pytest.mark.parametrize("name, K, smoothing, ignore_index, ignored, reduction, dtype, grad_mode", OPTION_CASES)
def test_options_match_reference(name, K, smoothing, ignore_index, ignored, reduction, dtype, grad_mode, backend):
    test_cpu.test_options_match_reference(name, K, smoothing, ignore_index, ignored, reduction, grad_mode, dtype,
                                          backend)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("chunk", [1, 300, 4096])
def test_splits(chunk, K, backend):
    """chunk_size is the classes a program walks, in whole tiles: 1 gives a split per tile
    (8 at C = 1001 and K = 1), 300 a ragged last split, 4096 one split. Each equals the
    reference: the fixed-order merge of the splits is right."""
    test_cpu.test_chunk_sizes(chunk, K, backend)


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [
    pytest.param(torch.float16, torch.float16, 2**-9, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, 2**-6, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, 2**-7, id="bf16-x-fp32-W"),
])
@pytest.mark.parametrize("name", ["arcface", "sphere-m3-lambda"])
def test_half_inputs(name, x_dtype, w_dtype, tol, backend):
    """test_cpu's, with twice the dtype's eps where both inputs are half: the backward's
    dots take dcos rounded to the inputs' dtype (tensor cores multiply two halves), one
    rounding more than the CPU kernel's fp32 GEMMs."""
    test_cpu.test_half_inputs(name, x_dtype, w_dtype, tol, backend)


def test_deterministic(backend):
    """Bitwise-equal results run after run, with one split and with several."""
    x, w, y = geometric_inputs(C=300, K=2, dtype=torch.float32)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, reduction="none", m2=0.5)
    upstream = upstream_weights(len(y))
    for chunk in (None, 64):
        first = run(backend, x, w, y, upstream, chunk_size=chunk, **kwargs)
        again = run(backend, x, w, y, upstream, chunk_size=chunk, **kwargs)
        for label, a, b in zip(("loss", "lse", "d loss / d x", "d loss / d W"), first, again):
            assert_close(b, a, atol=0.0, what=f"chunk_size={chunk}, repeated run: {label}")


# ---------------------------------------------------------------- launch logic (host side)


@pytest.mark.parametrize("K", [1, 3, 5, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_config_tiles(dtype, K):
    """Tiles are powers of two, tl.dot's dimensions at least 16, and BLOCK_C * K_PAD the
    weight rows of a tile for every K (K_PAD = next power of two)."""
    for backward in (False, True):
        cfg = launch.config(67, K, dtype, backward)
        assert cfg.K_PAD == triton.next_power_of_2(K) >= K
        for name in ("BLOCK_B", "BLOCK_C", "K_PAD", "BLOCK_D", "BLOCK_DO"):
            value = getattr(cfg, name)
            assert value & (value - 1) == 0, f"{name} = {value} is not a power of two"
        assert min(cfg.BLOCK_B, cfg.BLOCK_C * cfg.K_PAD, cfg.BLOCK_D, cfg.BLOCK_DO) >= 16


# ---------------------------------------------------------------- the real compiler, no GPU needed

COMPILE_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmargin.kernels import launch
from fastmargin.kernels.margin_ce_bwd import margin_ce_bwd_dw_kernel, margin_ce_bwd_dx_kernel
from fastmargin.kernels.margin_ce_fwd import margin_ce_fwd_kernel

arch, dtype_name, K, kind = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dtype = getattr(torch, dtype_name)
tool_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pointer = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]
acc = "*fp64" if dtype == torch.float64 else "*fp32"
x = torch.empty(2, 2, dtype=dtype)
report = {}
kernels = ((margin_ce_fwd_kernel, False), (margin_ce_bwd_dx_kernel, True), (margin_ce_bwd_dw_kernel, True))
for kernel, backward in kernels:
    cfg = launch.config(512, K, dtype, backward)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    meta = dict(KIND=kind, SPHERE_M=3, CLAMP_THETA=False, **launch.dtypes(x, x, compute, allow_tf32=True),
                **cfg.meta(with_output_block=backward))
    if backward:
        meta["DETACHED"] = False
    signature = {}
    for name in kernel.arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name in ("x_ptr", "w_ptr", "dw_ptr"):
            signature[name] = pointer
        elif name == "labels_ptr":
            signature[name] = "*i64"
        elif name.startswith("stride_p"):
            signature[name] = "i64"
        elif name.endswith("_ptr"):
            signature[name] = acc
        else:
            signature[name] = "i32"
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
    source = ASTSource(fn=kernel, signature=signature, constexprs={k: v for k, v in meta.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        open(cubin, "wb").write(compiled.asm["cubin"])
        open(ptx, "w").write(compiled.asm["ptx"])
        sass = subprocess.run([os.path.join(tool_dir, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True).stdout
        ptxas = subprocess.run([os.path.join(tool_dir, "ptxas"), f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v",
                                ptx, "-o", os.devnull], capture_output=True, text=True).stderr
    ops = {op: sass.count(op) for op in ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA")}
    info = [line.split("info    : ")[-1] for line in ptxas.splitlines() if "registers" in line or "spill" in line]
    report[kernel.fn.__name__] = {"ops": ops, "ptxas": info, "shared": compiled.metadata.shared}
print(json.dumps(report))
"""


def compile_for(arch, dtype, K=1, kind=1):
    """Compiles the three kernels for sm_<arch> with Triton's compiler in a child process
    (this one may run the interpreter); returns their SASS op counts and ptxas -v lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch), str(dtype).split(".")[1], str(K),
                             str(kind)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


COMPILE_CASES = [
    pytest.param(90, torch.bfloat16, 1, margin_jit.ARC, "HGMMA", id="sm90-bf16-arcface"),
    pytest.param(80, torch.bfloat16, 3, margin_jit.SPHERE, "HMMA", id="sm80-bf16-sphereface-K3"),
    pytest.param(90, torch.float16, 3, margin_jit.COMBINED, "HGMMA", id="sm90-fp16-combined-K3",
                 marks=pytest.mark.slow),
    pytest.param(90, torch.float32, 1, margin_jit.ADDITIVE, "HGMMA", id="sm90-tf32-cosface", marks=pytest.mark.slow),
    pytest.param(90, torch.float64, 2, margin_jit.ARC, "DMMA", id="sm90-fp64-K2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, dtype, K, kind, tensor_op", COMPILE_CASES)
def test_compiles_with_tensor_cores(arch, dtype, K, kind, tensor_op):
    """Every kernel compiles for the GPU with Triton's real compiler (the interpreter accepts
    code that it rejects), and its tile dots run on tensor cores: wgmma (HGMMA) on sm_90,
    mma (HMMA) on sm_80, DMMA for fp64. Register use and spills are printed (-s shows them)."""
    report = compile_for(arch, dtype, K, int(kind))
    for name, info in report.items():
        print(f"sm_{arch} {dtype} K={K} {name}: {info['ops']} {info['ptxas']}")
        assert info["ops"][tensor_op] > 0, f"{name}: no {tensor_op} in its sm_{arch} SASS: {info['ops']}"


# ---------------------------------------------------------------- compiled, on a GPU


def gpu_inputs(B, C, D, K=1, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, D, device="cuda", generator=g).to(dtype)
    w = torch.randn(C * K, D, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    return x, w, y


GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3, torch.float64: 1e-10}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name, K", [("arcface", 1), ("combined", 3), ("sphere-m4-lambda", 1), ("cosface", 2)])
def test_gpu_matches_reference(name, K, dtype):
    """Compiled kernels at B = 1000, C = 30011, D = 512 against the reference in fp64 on the
    same (rounded) inputs; tolerance from the dot's operand rounding (tf32 for fp32)."""
    x, w, y = gpu_inputs(1000, 30011, 512, K, dtype)
    y[:7] = -100
    kwargs = dict(MARGINS[name], sub_centers=K, label_smoothing=0.1, reduction="mean")
    got = run("triton", x, w, y, **kwargs)
    want = run("reference", x.double(), w.double(), y, **kwargs)
    for label, a, b in zip(("loss", "lse", "d loss / d x", "d loss / d W"), got, want):
        assert_rel(a.float(), b, GPU_TOL[dtype], f"{name} K={K} {dtype}: {label}")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU)
def test_gpu_deterministic_and_transposed():
    """Bitwise-equal reruns, and PML's (D, C) weight passed as W.t() equal to its copy."""
    x, w, y = gpu_inputs(777, 20000, 256, 2, torch.bfloat16)
    kwargs = dict(m2=0.5, sub_centers=2, label_smoothing=0.1)
    first, again = run("triton", x, w, y, **kwargs), run("triton", x, w, y, **kwargs)
    for label, a, b in zip(("loss", "lse", "dx", "dW"), first, again):
        assert torch.equal(a, b), f"rerun differs: {label}"
    transposed = run("triton", x, w.t().contiguous().t(), y, **kwargs)
    for label, a, b in zip(("loss", "lse", "dx", "dW"), transposed, first):
        assert_rel(a.float(), b.float(), 1e-2, f"W.t(): {label}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not GPU, reason=NO_GPU)
def test_gpu_indices_past_2_31():
    """B*C and C*D past 2^31 elements (int64 offsets, kernels/tiles.py): B = 4100 rows
    against C = 2^19 + 3 classes of D = 4096 (W: 2.1e9 bf16 elements); the statistics of
    rows against the reference on the last classes, where 32-bit offsets would wrap."""
    B, C, D = 4100, (1 << 19) + 3, 4096
    x, w, y = gpu_inputs(B, C, D, 1, torch.bfloat16)
    assert B * C > 2**31 and C * D > 2**31
    y[:] = torch.arange(B, device="cuda") + C - B  # targets among the last classes
    lse, z_target, z_sum = backend_triton.row_statistics(x, w, y, Margin(m2=0.5), 64.0)
    rows = torch.arange(0, B, 997, device="cuda")
    want = reference.row_statistics(x[rows].double(), w.double(), y[rows], Margin(m2=0.5), 64.0)
    for label, a, b in zip(("lse", "z_target", "z_sum"), (lse[rows], z_target[rows], z_sum[rows]), want):
        assert_rel(a, b, 1e-3, f"past 2^31: {label}")
