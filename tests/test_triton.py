"""What only the Triton backend (kernels/, backend='triton') has: its launch configuration
(tiles) and a compile of its kernels for sm_80 and sm_90 with Triton's real compiler (no GPU
needed: the interpreter accepts code that the compiler rejects) that checks the tile dots
run on tensor cores. The launchers' host logic (class splits, devices, TF32):
tests/test_triton_launch.py; the jit margin math against fastmargin.margins:
tests/test_margin_math.py.

The kernels' results, interpreted on CPU tensors without a GPU (tests/conftest.py sets
TRITON_INTERPRET=1) and compiled on a GPU: tests/test_backends.py, which runs on every
backend; indices past 2^31 on a GPU: tests/test_large_index.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from fastmargin.kernels import launch  # noqa: E402
from fastmargin.kernels import margin as margin_jit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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

arch, dtype_name, K, kind, nontarget = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                         bool(int(sys.argv[5])))
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
    meta = dict(KIND=kind, SPHERE_M=3, NONTARGET=nontarget, **launch.dtypes(x, x, compute, allow_tf32=True),
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


def compile_for(arch, dtype, K=1, kind=1, nontarget=False):
    """Compiles the three kernels for sm_<arch> with Triton's compiler in a child process
    (this one may run the interpreter), the non-target transform compiled in or out; returns
    their SASS op counts and ptxas -v lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch), str(dtype).split(".")[1], str(K),
                             str(kind), str(int(nontarget))], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


COMPILE_CASES = [
    pytest.param(90, torch.bfloat16, 1, margin_jit.ARC, False, "HGMMA", id="sm90-bf16-arcface"),
    pytest.param(80, torch.bfloat16, 3, margin_jit.SPHERE, False, "HMMA", id="sm80-bf16-sphereface-K3"),
    pytest.param(90, torch.bfloat16, 3, margin_jit.ARC, True, "HGMMA", id="sm90-bf16-arcface-nontarget-K3"),
    pytest.param(90, torch.float16, 3, margin_jit.COMBINED, False, "HGMMA", id="sm90-fp16-combined-K3",
                 marks=pytest.mark.slow),
    pytest.param(90, torch.float32, 1, margin_jit.ADDITIVE, False, "HGMMA", id="sm90-tf32-cosface",
                 marks=pytest.mark.slow),
    pytest.param(90, torch.float64, 2, margin_jit.ARC, True, "DMMA", id="sm90-fp64-K2-nontarget",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, dtype, K, kind, nontarget, tensor_op", COMPILE_CASES)
def test_compiles_with_tensor_cores(arch, dtype, K, kind, nontarget, tensor_op):
    """Every kernel compiles for the GPU with Triton's real compiler (the interpreter accepts
    code that it rejects), and its tile dots run on tensor cores: wgmma (HGMMA) on sm_90,
    mma (HMMA) on sm_80, DMMA for fp64. Register use and spills are printed (-s shows them)."""
    report = compile_for(arch, dtype, K, int(kind), nontarget)
    for name, info in report.items():
        print(f"sm_{arch} {dtype} K={K} nontarget={nontarget} {name}: {info['ops']} {info['ptxas']}")
        assert info["ops"][tensor_op] > 0, f"{name}: no {tensor_op} in its sm_{arch} SASS: {info['ops']}"
