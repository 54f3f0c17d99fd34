"""What only the CUDA backend (csrc/cuda/, backend='cuda') has, checked without a GPU (DESIGN
§7): the extension holds the kernels wherever setup.py decides to compile them; their sm_80
and sm_90 SASS runs the tile GEMMs of the fp16/bf16/tf32 kernels on tensor cores (HMMA or
HGMMA: a build that fell back to FFMA fails here) and the exact fp32 and fp64 kernels do
not; and the host launch plan (csrc/cuda/launch_plan.h, bound in every build) gives sound
tiles, grids, splits and shared memory for every dtype and for shapes past 2^31 elements,
or says why not.

The kernels' results on a GPU: tests/test_backends.py (every backend; its cases run on the
compiled kernels where 'cuda' is usable, and its GPU-sized cases skip elsewhere, saying
why); indices past 2^31: tests/test_large_index.py.
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

from fastmargin import _extension, backends
from test_build import setup_py  # noqa: F401  (the fixture that imports setup.py)

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"OpF16": True, "OpBF16": True, "OpTF32": True, "OpF32": False, "OpF64": False}  # tensor cores?
KERNELS = ("margin_ce_fwd_kernel", "margin_ce_bwd_dx_kernel", "margin_ce_bwd_dw_kernel")

# H100 SXM: sm_90, 132 multiprocessors, 227 KiB of opt-in shared memory a block.
H100 = dict(arch=90, num_sms=132, max_smem=232448)
A100 = dict(arch=80, num_sms=108, max_smem=166912)


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
