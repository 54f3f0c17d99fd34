"""The CUDA backend (csrc/cuda/, backend='cuda') against the oracle fastmargin.reference.

Without a GPU (DESIGN §6) what can be checked is checked: the extension holds the kernels
wherever setup.py decides to compile them; their sm_80 and sm_90 SASS runs the tile GEMMs
of the fp16/bf16/tf32 kernels on tensor cores (HMMA or HGMMA: a build that fell back to
FFMA fails here) and the exact fp32 and fp64 kernels do not; and the host launch plan
(csrc/cuda/launch_plan.h, bound in every build) gives sound tiles, grids, splits and
shared memory for every dtype and for shapes past 2^31 elements, or says why not. The
tests of the kernels' results need a GPU: they are marked gpu and skip without one,
saying why. They reuse tests/test_cpu.py's inputs and cases, moved to the device.
"""

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastmargin
from fastmargin import _extension, backend_cuda, backends, reference  # backend_cuda registers cuda_fwd/_bwd
from fastmargin.margins import Margin
from helpers import assert_close, assert_finite, op_options
from test_build import setup_py  # noqa: F401  (the fixture that imports setup.py)
from test_cpu import (
    GRAD_MODES, MARGINS, OPTION_MARGINS, OPTIONS, assert_rel, check_against_reference, geometric_inputs,
    option_inputs, upstream_weights,
)
from test_cpu import run as run_backend

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"OpF16": True, "OpBF16": True, "OpTF32": True, "OpF32": False, "OpF64": False}  # tensor cores?
KERNELS = ("margin_ce_fwd_kernel", "margin_ce_bwd_dx_kernel", "margin_ce_bwd_dw_kernel")

# H100 SXM: sm_90, 132 multiprocessors, 227 KiB of opt-in shared memory a block.
H100 = dict(arch=90, num_sms=132, max_smem=232448)
A100 = dict(arch=80, num_sms=108, max_smem=166912)

GPU_REASON = backends.unavailable_reason("cuda", torch.device("cuda"))
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs the cuda backend on a GPU: {GPU_REASON}")


def extension():
    ext = _extension.module()
    if ext is None:
        pytest.skip(_extension.build_info()["error"])
    return ext


# ---------------------------------------------------------------- the build


def test_built_with_cuda_where_setup_would(setup_py):  # noqa: F811
    """Where setup.py's decision (its toolkit search included) says the CUDA kernels are
    compiled, fastmargin._C has them: a build that quietly dropped them fails here."""
    from torch.utils.cpp_extension import CUDA_HOME

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    home, found_by = setup_py.find_cuda_home(os.environ, CUDA_HOME,
                                             lambda: setup_py.nvcc_toolkit(shutil.which("nvcc")))
    decided, reason = setup_py.cuda_build_decision(os.environ, sources, torch.version.cuda, home)
    if not decided:
        pytest.skip(f"setup.py does not compile the CUDA kernels here: {reason}")
    info = _extension.build_info()
    assert info.get("cuda"), (f"setup.py compiles the CUDA kernels here ({reason}; {found_by}) but fastmargin._C "
                              f"has none: {info}. Reinstall: pip install --no-build-isolation -e .")
    ext = extension()
    assert hasattr(ext, "cuda_forward") and hasattr(ext, "cuda_backward")
    assert backends.unavailable_reason("cuda") in (None, "no CUDA device is visible to torch")


def find_cuobjdump():
    """cuobjdump on PATH, in a CUDA toolkit's bin, or the copy Triton ships (the CUDA 13
    toolkit here has none)."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home, "bin", "cuobjdump")))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@functools.cache
def sass_functions(arch):
    """{mangled kernel name: its SASS} of fastmargin._C for sm_<arch>."""
    result = subprocess.run([find_cuobjdump(), "-sass", "-arch", f"sm_{arch}", extension().__file__],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = re.split(r"\n\s*Function : ", "\n" + result.stdout)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_tile_kernels_use_tensor_cores(arch):
    """Every kernel (forward, dx, dW) of every operand is in the sm_<arch> code; the fp16,
    bf16 and tf32 ones contain tensor-core MMAs (HMMA, or HGMMA), the exact fp32 and fp64
    ones none (they must not round to tf32). Op counts are printed (-s shows them)."""
    if not _extension.build_info().get("cuda"):
        pytest.skip("fastmargin._C was built without the CUDA kernels (test_built_with_cuda_where_setup_would says if "
                    "it should have them)")
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or Triton's backends/nvidia/bin")
    functions = sass_functions(arch)
    if not functions:
        pytest.skip(f"this build has no sm_{arch} code (TORCH_CUDA_ARCH_LIST at install time)")
    for kernel in KERNELS:
        for tag, tensor_cores in TAGS.items():
            names = [n for n in functions if kernel in n and f"{len(tag)}{tag}E" in n]
            assert len(names) == 1, f"sm_{arch}: {kernel}<{tag}> found {len(names)} times in {sorted(functions)}"
            sass = functions[names[0]]
            ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "FFMA", "DFMA")}
            print(f"sm_{arch} {kernel}<{tag}>: {ops}")
            mma = ops["HMMA"] + ops["HGMMA"]
            if tensor_cores:
                assert mma > 0, f"sm_{arch} {kernel}<{tag}> has no HMMA/HGMMA (fell back to FFMA?): {ops}"
            else:
                assert mma == 0, f"sm_{arch} {kernel}<{tag}>, an exact path, runs on tensor cores: {ops}"


# ---------------------------------------------------------------- the host launch plan


def plan(B=37, C=1001, D=67, K=1, x="bfloat16", w=None, tf32=False, chunk=0, device=H100):
    return extension().cuda_launch_plan(B=B, C=C, D=D, K=K, x_dtype=x, w_dtype=w or x, allow_tf32=tf32,
                                        chunk=chunk, **device)


@pytest.mark.parametrize("x, w, tf32, operand", [
    ("float16", "float16", False, "float16"),
    ("bfloat16", "bfloat16", True, "bfloat16"),
    ("float32", "float32", False, "float32"),
    ("float32", "float32", True, "tf32"),
    ("bfloat16", "float32", False, "float32"),   # mixed: the compute dtype, as Triton's DOT_DTYPE
    ("bfloat16", "float16", True, "tf32"),
    ("float64", "float64", True, "float64"),
    ("bfloat16", "float64", False, "float64"),
    ("float32", "float64", True, "float64"),
])
def test_plan_operand(x, w, tf32, operand):
    p = plan(x=x, w=w, tf32=tf32)
    assert p["operand"] == operand
    assert p["tensor_cores"] == (operand in ("float16", "bfloat16", "tf32"))


SHAPES = [
    pytest.param(37, 1001, 67, 1, id="ragged"),
    pytest.param(37, 1001, 67, 3, id="ragged-K3"),
    pytest.param(1, 1, 1, 1, id="one"),
    pytest.param(4096, 100_000, 512, 1, id="bench"),
    pytest.param(65536, 1 << 20, 512, 1, id="B*C>2^31"),
    pytest.param(8, (1 << 20) + 7, 1024, 3, id="C*K*D>2^31"),
    pytest.param(3, 1 << 24, 64, 1, id="C=2^24"),
    pytest.param(100, 500, 4096, 32, id="K=32"),
]
DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]


@pytest.mark.parametrize("device", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("chunk", [0, 1, 300])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("B, C, D, K", SHAPES)
def test_plan_is_sound(B, C, D, K, dtype, chunk, device):
    """Tiles cover the problem, splits are whole tiles that cover the classes with none
    empty and within CUDA's grid limits, the grids are what the kernels index, and the
    shared memory fits the device."""
    if dtype == "float64" and K > 32:
        pytest.skip("fp64 tiles hold 32 weight rows (test_plan_errors)")
    p = plan(B, C, D, K, dtype, chunk=chunk, device=device)
    assert p["block_c"] == p["block_n"] // K >= 1
    assert p["row_blocks"] == -(-B // p["block_b"]) and p["class_tiles"] == -(-C // p["block_c"])
    assert p["d_blocks"] == -(-D // p["block_do"])
    split, splits = p["split_size"], p["splits"]
    assert split % p["block_c"] == 0 and split >= min(max(chunk, 1), C)
    assert (splits - 1) * split < C <= splits * split, (split, splits)
    assert splits <= 65535 and p["d_blocks"] <= 65535 and max(p["row_blocks"], p["class_tiles"]) < 2**31
    assert p["fwd_grid"] == (p["row_blocks"], splits, 1)
    assert p["dx_grid"] == (p["row_blocks"], p["d_blocks"], splits)
    assert p["dw_grid"] == (p["class_tiles"], p["d_blocks"], 1)
    assert 0 < p["fwd_smem"] < p["dx_smem"] <= device["max_smem"] and p["dw_smem"] <= device["max_smem"]
    assert p["threads"] == 256


def test_plan_default_split_fills_the_device():
    """chunk 0: two waves of forward blocks over the device (kernels/launch.py's rule), never
    more splits than class tiles."""
    p = plan(B=37, C=1001)  # one row block, 16 class tiles of 64
    assert (p["block_c"], p["class_tiles"], p["splits"], p["split_size"]) == (64, 16, 16, 64)
    p = plan(B=4096, C=100_000, D=512)  # 64 row blocks: 264 / 64 -> 5 splits
    assert p["splits"] == 5 and p["row_blocks"] * p["splits"] >= 2 * H100["num_sms"]
    assert p["d_blocks"] == 2 and p["dw_grid"] == (1563, 2, 1)


def test_plan_caps_splits_at_the_grid_limit():
    """chunk=1 on 2^24 classes asks for 262144 splits; the plan raises the split to whole
    tiles within 65535 (the result is the same, the grid is legal)."""
    p = plan(B=3, C=1 << 24, D=64, chunk=1)
    assert p["splits"] <= 65535 and p["split_size"] == 5 * 64


def test_plan_tiles_per_dtype():
    """16-bit tiles output 256 columns of D (one dx recompute at D <= 256), fp32 128, fp64
    64 on 32 x 32 tiles; sub-centers share a tile's rows (21 classes of 3 in 64)."""
    assert (plan()["block_b"], plan()["block_n"], plan()["block_do"]) == (64, 64, 256)
    assert plan(x="float32", tf32=True)["block_do"] == plan(x="float32")["block_do"] == 128
    assert (plan(x="float64")["block_b"], plan(x="float64")["block_n"], plan(x="float64")["block_do"]) == (32, 32, 64)
    assert plan(K=3)["block_c"] == 21 and plan(K=64)["block_c"] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(K=65), "sub_centers=65 exceeds the 64 weight rows"),
    (dict(K=33, x="float64"), "sub_centers=33 exceeds the 32 weight rows"),
    (dict(D=0), "must be >= 1"),
    (dict(B=0), "must be >= 1"),
    (dict(C=0), "must be >= 1"),
    (dict(device=dict(H100, arch=75)), "sm_80 and newer"),
    (dict(device=dict(H100, num_sms=0)), "num_sms"),
    (dict(device=dict(H100, max_smem=48 * 1024)), "shared memory"),
    (dict(x="int8"), "dtype must be"),
    (dict(D=65535 * 256 + 1), "grid exceeds"),
])
def test_plan_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


# ---------------------------------------------------------------- the kernels, on a GPU

# Relative error bounds against the float64 reference on the same input values. fp32 runs
# the exact SIMT path (torch's default: no tf32), with __expf; fp64 is exact arithmetic.
TOL = {torch.float64: 1e-10, torch.float32: 5e-5}
NAMES = ("loss", "lse", "d loss / d x", "d loss / d W")


check = functools.partial(check_against_reference, backend="cuda")


FLOAT_DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", list(MARGINS))
def test_gpu_margins_match_reference(name, grad_mode, dtype):
    """Every margin and gradient mode on the ragged shape (B=37, C=1001, D=67), targets in
    every branch of psi (test_cpu.geometric_inputs), 16 splits of one tile."""
    x, w, y = geometric_inputs(dtype=dtype)
    check(x, w, y, TOL[dtype], what=f"{name} {grad_mode}", grad_mode=grad_mode, **MARGINS[name])


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("K, smoothing, ignore_index, ignored, reduction", OPTIONS)
@pytest.mark.parametrize("name", OPTION_MARGINS)
def test_gpu_options_match_reference(name, K, smoothing, ignore_index, ignored, reduction, dtype):
    """K = 1..4, label smoothing, ignored rows (gradient exactly 0), every reduction, and
    chunk_size 64 (several splits of a few tiles)."""
    x, w, y = option_inputs(K, ignore_index, ignored, dtype)
    got, _ = check(x, w, y, TOL[dtype], what=f"{name} K={K} eps={smoothing} {reduction}", sub_centers=K,
                   label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction, chunk_size=64,
                   **MARGINS[name])
    if ignored:
        assert_close(got[2][ignored], 0.0, atol=0.0, what="d loss / d x at ignored rows")


@gpu
@needs_gpu
@pytest.mark.parametrize("x_dtype, w_dtype, tol, grad_tol", [
    pytest.param(torch.float16, torch.float16, 1e-5, 2**-9, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, 1e-5, 2**-6, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, 5e-5, 2**-7, id="bf16-x-fp32-W"),
    pytest.param(torch.float32, torch.float64, 1e-10, 1e-7, id="fp32-x-fp64-W"),
])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", ["arcface", "combined-m1=2", "sphere-m3-lambda"])
def test_gpu_half_and_mixed_inputs(name, K, x_dtype, w_dtype, tol, grad_tol):
    """Half inputs run on tensor cores: their products are exact in fp32, so loss and lse
    hold fp32 accuracy; gradients take dcos rounded to the inputs' dtype and come back in
    it (grad_tol: twice its eps). Mixed inputs convert while staging tiles."""
    x, w, y = geometric_inputs(K=K, dtype=torch.float32)
    x, w = x.to(x_dtype), w.to(w_dtype)
    check(x, w, y, tol, what=f"{name} K={K} {x_dtype}/{w_dtype}", grad_tol=grad_tol, sub_centers=K,
          label_smoothing=0.1, reduction="none", **MARGINS[name])


@gpu
@needs_gpu
@pytest.mark.parametrize("K", [1, 2])
def test_gpu_transposed_weight(K):
    """PML's (D, C*K) weight passed as W.t(): loss and gradients equal the reference's, and
    the gradient of the (D, C*K) tensor is contiguous."""
    x, w, y = geometric_inputs(K=K)
    w_t = w.t().contiguous().t()
    got, _ = check(x, w_t, y, TOL[torch.float64], what=f"W.t() K={K}", sub_centers=K, m2=0.5, label_smoothing=0.1)
    assert got[3].stride() == w_t.stride(), f"dW strides {got[3].stride()}, W's {w_t.stride()}"


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gpu_strided_inputs(dtype):
    """x every other column, W every other row (views that no .contiguous() was made of)."""
    x, w, y = geometric_inputs(K=2, dtype=torch.float32)
    x, w = x.to(dtype), w.to(dtype)
    cuda = torch.device("cuda")
    xv = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=dtype, device=cuda)[:, ::2]
    wv = torch.zeros(2 * w.shape[0], w.shape[1], dtype=dtype, device=cuda)[::2]
    xv.copy_(x)
    wv.copy_(w)
    kwargs = dict(sub_centers=2, m2=0.5, label_smoothing=0.1, reduction="none")
    upstream = upstream_weights(len(y)).to(cuda)
    got = run_backend("cuda", xv, wv, y.to(cuda), upstream, **kwargs)
    want = run_backend("cuda", x.to(cuda), w.to(cuda), y.to(cuda), upstream, **kwargs)
    for name, a, b in zip(NAMES, got, want):  # the norms may sum in another order
        assert_rel(a, b, 1e-12 if dtype == torch.float64 else 1e-5, f"strided views vs contiguous copies: {name}")


@gpu
@needs_gpu
def test_gpu_tf32():
    """fp32 inputs on tensor cores where torch allows tf32 matmuls: within tf32's rounding
    (10-bit mantissa, cos errors ~1e-3, x s = 64) of the exact answer."""
    x, w, y = geometric_inputs(K=2, dtype=torch.float32)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check(x, w, y, 1e-2, what="tf32", sub_centers=2, m2=0.5, label_smoothing=0.1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_deterministic(dtype):
    """Bitwise-equal reruns with the default splits and with many (no atomics anywhere)."""
    x, w, y = geometric_inputs(C=3000, K=2, dtype=torch.float32)
    x, w = x.to(dtype), w.to(dtype)
    kwargs = dict(sub_centers=2, label_smoothing=0.1, reduction="none", m2=0.5)
    upstream = upstream_weights(len(y))
    for chunk in (None, 64):
        first = run_backend("cuda", x, w, y, upstream, chunk_size=chunk, **kwargs)
        again = run_backend("cuda", x, w, y, upstream, chunk_size=chunk, **kwargs)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"chunk_size={chunk}: rerun differs in {name}"


@gpu
@needs_gpu
@pytest.mark.parametrize("name", ["arcface", "sphere-m4"])
def test_gpu_zero_rows(name):
    """A zero embedding and a zero weight row: norms max(||v||, 1e-12), finite gradients,
    no radial term (csrc/cpu/margin_ce.cpp's semantics); ordinary rows compared apart."""
    x, w, y = geometric_inputs(B=5, C=9, D=6)
    x[0] = 0
    w[2] = 0
    y[1] = 2
    kwargs = dict(reduction="none", **MARGINS[name])
    upstream = upstream_weights(5)
    got = run_backend("cuda", x, w, y, upstream, **kwargs)
    want = run_backend("reference", x, w, y, upstream, **kwargs)
    assert_finite(f"{name} zero rows", *got)
    for i, (label, a, b) in enumerate(zip(NAMES, got, want)):
        rows = {2: [0], 3: [2]}.get(i, [])
        other = [r for r in range(len(a)) if r not in rows]
        if rows:
            assert_rel(a[rows], b[rows], TOL[torch.float64], f"{label}, zero rows")
        assert_rel(a[other], b[other], TOL[torch.float64], f"{label}, other rows")


@gpu
@needs_gpu
def test_gpu_empty_batch_and_labels_outside():
    """B = 0 gives empty statistics and a zero dW; labels outside [0, C) have no target."""
    x, w, _ = geometric_inputs(B=4, C=10, D=5)
    opts = op_options(Margin(m2=0.5), 64.0, 1, 0, x.cuda(), w.cuda())
    y = torch.tensor([0, 10, -1, -100])
    got = torch.ops.fastmargin.cuda_fwd(x.cuda(), w.cuda(), y.cuda(), *opts)
    want = reference.row_statistics(x, w, y, Margin(m2=0.5), 64.0, 1)
    for label, a, b in zip(("lse", "z_target", "z_sum"), got, want):
        assert_rel(a.cpu(), b, TOL[torch.float64], label)
    empty = run_backend("cuda", x[:0], w, y[:0], m2=0.5, reduction="sum")
    assert empty[1].shape == (0,) and not empty[3].any()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gpu_opcheck(dtype):
    x, w, y = geometric_inputs(B=6, C=10, D=5, K=2, dtype=dtype)
    x, w, y = x.cuda(), w.cuda(), y.cuda()
    opts = op_options(Margin(m2=0.5), 64.0, 2, 0, x, w)
    torch.library.opcheck(torch.ops.fastmargin.cuda_fwd.default, (x.requires_grad_(), w.requires_grad_(), y, *opts))
    lse, _, _ = torch.ops.fastmargin.cuda_fwd(x.detach(), w.detach(), y, *opts)
    g = upstream_weights(6).to(lse)
    torch.library.opcheck(torch.ops.fastmargin.cuda_bwd.default,
                          (g, -0.9 * g, -0.01 * g, x.detach(), w.detach(), y, lse, *opts))


@gpu
@needs_gpu
def test_gpu_torch_compile_fullgraph():
    x, w, y = (t.cuda() for t in option_inputs(2, -100, [4], torch.float64))
    kwargs = dict(sub_centers=2, label_smoothing=0.1, m1=1.2, m2=0.3, m3=0.2, backend="cuda")
    compiled = torch.compile(lambda x, w: fastmargin.margin_cross_entropy(x, w, y, **kwargs), fullgraph=True)
    xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    compiled(xc, wc).backward()
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fastmargin.margin_cross_entropy(xe, we, y, **kwargs).backward()
    assert_rel(xc.grad, xe.grad, 1e-14, "compiled vs eager: d loss / d x")
    assert_rel(wc.grad, we.grad, 1e-14, "compiled vs eager: d loss / d W")


GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4, torch.float64: 1e-10}


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name, K", [("arcface", 1), ("combined", 3), ("sphere-m4-lambda", 1), ("cosface", 2)])
def test_gpu_large_matches_reference(name, K, dtype):
    """B = 1000, C = 30011, D = 512 (several row blocks, two or more output slices of D,
    default splits) against the reference in fp64 on the same rounded inputs, as
    tests/test_triton.py's; the cuda backend's fp32 is exact (no tf32 by default)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", generator=g).to(dtype)
    w = torch.randn(30011 * K, 512, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, 30011, (1000,), device="cuda", generator=g)
    y[:7] = -100
    kwargs = dict(MARGINS[name], sub_centers=K, label_smoothing=0.1, reduction="mean")
    got = run_backend("cuda", x, w, y, **kwargs)
    want = run_backend("reference", x.double(), w.double(), y, **kwargs)
    for label, a, b in zip(NAMES, got, want):
        assert_rel(a.float(), b, GPU_TOL[dtype], f"{name} K={K} {dtype}: {label}")


@gpu
@pytest.mark.slow
@needs_gpu
def test_gpu_indices_past_2_31():
    """C*K*D past 2^31 elements (W: 2^31 + bf16 elements): statistics and dW rows at the end
    of W, where 32-bit offsets would wrap, against the reference on those classes."""
    B, C, D = 64, (1 << 21) + 5, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(C, D, device="cuda", generator=g).to(torch.bfloat16)
    assert C * D > 2**31
    y = torch.arange(B, device="cuda") + C - B  # targets among the last classes
    x.requires_grad_(True)
    w.requires_grad_(True)
    lse, z_target, z_sum = backend_cuda.row_statistics(x, w, y, Margin(m2=0.5), 64.0)
    (lse - z_target).sum().backward()
    # The reference in fp32 (W in fp64 would take 17 GB), on the same bf16 values.
    w_head = w.detach()[: C - B].float()
    w_tail = w.detach()[C - B:].float().requires_grad_(True)
    want = reference.row_statistics(x.detach().float(), torch.cat([w_head, w_tail]), y, Margin(m2=0.5), 64.0)
    for label, a, b in zip(("lse", "z_target", "z_sum"), (lse, z_target, z_sum), want):
        assert_rel(a.detach(), b, 1e-3, f"past 2^31: {label}")
    (want[0] - want[1]).sum().backward()  # dW of the last classes, the end of W
    assert_rel(w.grad[C - B:].float(), w_tail.grad, 2e-2, "past 2^31: dW of the last classes")
