"""Hazards of the CUDA backend found by review, and their fixes (csrc/cuda/).

On the host, through fastmargin._C.cuda_launch_plan (bound in every build): the class splits'
memory budget (launch_plan.h max_splits_for_memory: a small chunk no longer makes the
(splits, B, D) partial dx buffer enormous) and the shared memory of every operand's kernels
against each architecture's opt-in limit (launch_plan.h smem_optin_limit); and the build
reporting its architectures. On a GPU (marked gpu, skipping with the reason without one):
fp16 gradients too small for an unscaled fp16 GEMM operand, fp16 zero rows that turned a whole
gradient into NaN, and the split budget on the device, against fastmargin.reference.
"""

import re
import subprocess

import pytest
import torch

from fastmargin import _extension, backends
from helpers import assert_close

try:  # the shared inputs, in tests/helpers.py once the suite's restructuring lands there
    from helpers import CHUNK, geometric_inputs, run
except ImportError:
    from test_cpu import CHUNK, geometric_inputs, run

GPU_REASON = backends.unavailable_reason("cuda", torch.device("cuda"))
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs the cuda backend on a GPU: {GPU_REASON}")

H100 = dict(arch=90, num_sms=132)
DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]
MiB = 1 << 20


REBUILD = "rebuild it: pip install --no-build-isolation -e ."


def extension():
    ext = _extension.module()
    if ext is None:
        pytest.skip(_extension.build_info()["error"])
    return ext


def plan_of(**kwargs):
    """cuda_launch_plan(**kwargs), from an extension built with the split budget and the
    shared-memory table (an older build gets max_smem=0 wrong: say so instead)."""
    ext = extension()
    probe = ext.cuda_launch_plan(B=1, C=1, D=1, K=1, x_dtype="float32", w_dtype="float32", allow_tf32=False,
                                 arch=90, num_sms=1, chunk=0, max_smem=232448)
    assert "max_splits" in probe, f"fastmargin._C was built from sources older than the split budget: {REBUILD}"
    return ext.cuda_launch_plan(**kwargs)


def plan(B=37, C=1001, D=67, K=1, x="float16", w=None, tf32=False, chunk=0, arch=90, num_sms=132, max_smem=0):
    return plan_of(B=B, C=C, D=D, K=K, x_dtype=x, w_dtype=w or x, allow_tf32=tf32, arch=arch, num_sms=num_sms,
                   chunk=chunk, max_smem=max_smem)


# ---------------------------------------------------------------- the class splits' memory budget


def acc_bytes(dtype):
    return 8 if dtype == "float64" else 4


def budget_splits(B, D, dtype):
    """launch_plan.h's rule, kernels/launch.py split_size's too: splits * B * D * acc_bytes
    within 256 MiB unless one split alone is larger, and at most 65535 (a grid dimension)."""
    return min(65535, max(1, 256 * MiB // (B * D * acc_bytes(dtype))))


def assert_sound(p, C, chunk):
    """Whole tiles, every class in exactly one split, none empty, within the grid and the budget."""
    split, splits = p["split_size"], p["splits"]
    assert split % p["block_c"] == 0 and split >= min(max(chunk, 1), C), p
    assert (splits - 1) * split < C <= splits * split, (split, splits, C)
    assert 1 <= splits <= p["max_splits"] <= 65535, p
    assert p["fwd_grid"][1] == p["dx_grid"][2] == splits
    assert max(p["fwd_grid"][1:] + p["dx_grid"][1:] + p["dw_grid"][1:]) <= 65535
    assert max(p["fwd_grid"][0], p["dx_grid"][0], p["dw_grid"][0]) < 2**31


# The issue's shapes: B = 8192, C = 2M classes, D = 512. Unbounded, chunk 64 asked for 31250
# splits of a (splits, 8192, 512) fp32 buffer at C = 2,000,000: 524 GB (550 GB at 2^21).
ISSUE = dict(B=8192, D=512)


@pytest.mark.parametrize("C", [2_000_000, 1 << 21])
@pytest.mark.parametrize("chunk", [64, 16384, 0])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_split_budget_at_the_issue_shape(C, chunk, dtype):
    p = plan(C=C, chunk=chunk, x=dtype, **ISSUE)
    B, D = ISSUE["B"], ISSUE["D"]
    assert_sound(p, C, chunk)
    assert p["max_splits"] == budget_splits(B, D, dtype) == (16 if dtype != "float64" else 8)
    assert p["dx_partial_bytes"] == p["splits"] * B * D * acc_bytes(dtype)
    assert p["dx_partial_bytes"] <= 256 * MiB, p
    if chunk:  # a chunk whose splits pass the budget is raised to fit it
        assert C / chunk > p["max_splits"] and p["splits"] == p["max_splits"], p


@pytest.mark.parametrize("B, C, D, chunk, splits", [
    pytest.param(37, 1001, 67, 0, 16, id="small-default"),       # 16 tiles, 16 splits: untouched
    pytest.param(37, 1001, 67, 64, 16, id="small-chunk"),
    pytest.param(4096, 100_000, 512, 0, 5, id="bench-default"),  # 2 waves: 264 / 64 row blocks
    pytest.param(4096, 100_000, 512, 64, 32, id="bench-chunk64"),  # 8 MiB a split: 32 fit
    pytest.param(65536, 1 << 20, 4096, 0, 1, id="1GiB-a-split-default"),  # 1024 row blocks fill the device
    pytest.param(65536, 1 << 20, 4096, 64, 1, id="1GiB-a-split-chunk64"),  # one split, whatever its size
    pytest.param(16384, 1 << 20, 2048, 64, 2, id="128MiB-a-split-chunk64"),
    pytest.param(64, 1 << 22, 8192, 0, 128, id="default-capped"),  # default asks 264, budget 128
    pytest.param(3, 1 << 24, 64, 1, 65535, id="grid-bound"),     # the grid binds before memory
])
def test_split_budget_bounds_chunk_and_default(B, C, D, chunk, splits):
    """chunk is a lower bound on the classes per split, raised to fit the budget; the default
    rule (two waves of forward blocks) is capped by it too, and untouched where it fits."""
    p = plan(B=B, C=C, D=D, chunk=chunk, x="float32")
    assert_sound(p, C, chunk)
    assert p["splits"] <= budget_splits(B, D, "float32")
    assert p["dx_partial_bytes"] <= max(256 * MiB, B * D * 4)
    if splits == 65535:
        assert p["splits"] <= splits and p["max_splits"] == 65535
    else:
        assert p["splits"] == splits, p


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("chunk", [0, 1, 64, 1000, 16384])
@pytest.mark.parametrize("B, C, D", [(1, 7, 1), (37, 1001, 67), (8192, 30011, 512), (100_000, 100_000, 2048)])
def test_split_budget_plans_are_sound(B, C, D, K, chunk, dtype):
    p = plan(B=B, C=C, D=D, K=K, chunk=chunk, x=dtype)
    assert_sound(p, C, chunk)
    assert p["max_splits"] == budget_splits(B, D, dtype)
    assert p["dx_partial_bytes"] <= max(256 * MiB, B * D * acc_bytes(dtype))


# ---------------------------------------------------------------- shared memory per architecture

# (operand, x dtype, allow_tf32) and each kernel's dynamic shared memory, bytes (smem_layout:
# fp16's backward adds 512 bytes of operand scales).
OPERANDS = {
    "float16": ("float16", False, (27904, 71424, 71680)),
    "bfloat16": ("bfloat16", False, (27904, 70912, 71168)),
    "tf32": ("float32", True, (36096, 87296, 87552)),
    "float32": ("float32", False, (25600, 75264, 75520)),
    "float64": ("float64", False, (17408, 42496, 42752)),
}
# The opt-in shared memory a block may use, per compute capability (CUDA C++ Programming Guide).
LIMITS = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@pytest.mark.parametrize("arch, limit", LIMITS.items())
def test_smem_table(arch, limit):
    if arch < 80:
        with pytest.raises(ValueError, match="sm_80 and newer"):
            plan(arch=arch)
        return
    assert plan(arch=arch)["max_smem"] == limit
    assert plan(arch=arch, max_smem=limit - 1)["max_smem"] == limit - 1  # the device's own value wins


def test_smem_table_unknown_arch_needs_the_device_value():
    with pytest.raises(ValueError, match="not in smem_optin_limit's table"):
        plan(arch=95)
    assert plan(arch=95, max_smem=232448)["max_smem"] == 232448


@pytest.mark.parametrize("operand", OPERANDS)
def test_smem_per_operand_and_arch(operand):
    """Every operand's three kernels fit sm_80 (163 KB) and sm_90 (227 KB), and sm_86, sm_89
    and sm_120 (99 KB) too: the largest, tf32's dW, takes 87552 bytes (one block an SM on
    those parts, 8 warps). sm_75's 64 KB would not hold the 16-bit or fp32 backward (the
    kernels need sm_80 anyway). -s prints the table."""
    x, tf32, sizes = OPERANDS[operand]
    p = plan(x=x, tf32=tf32)
    assert p["operand"] == operand
    got = (p["fwd_smem"], p["dx_smem"], p["dw_smem"])
    assert got == sizes, f"{operand}: (fwd, dx, dW) shared memory {got}, the table says {sizes}"
    fits = {arch: max(got) <= limit for arch, limit in LIMITS.items()}
    print(f"{operand}: fwd {got[0]}, dx {got[1]}, dW {got[2]} bytes; fits " +
          ", ".join(f"sm_{a}" for a, ok in fits.items() if ok))
    assert all(fits[arch] for arch in (80, 86, 87, 89, 90, 100, 120)), fits
    for arch in (80, 86, 89, 90, 120):
        assert plan(x=x, tf32=tf32, arch=arch)["dx_smem"] == got[1]
    assert fits[75] == (operand == "float64")


# ---------------------------------------------------------------- the build's architectures


def test_build_reports_its_architectures():
    """build_info()['cuda_archs'] names setup.py's targets (sm_* machine code, compute_* PTX),
    and fastmargin._C carries machine code for exactly the sm_* ones (cuobjdump, where found)."""
    info = _extension.build_info()
    if not info.get("cuda"):
        pytest.skip("fastmargin._C was built without the CUDA kernels")
    archs = info.get("cuda_archs")
    assert isinstance(archs, str) and archs, f"build_info()['cuda_archs'] = {archs!r}: {REBUILD}"
    targets = archs.split(",")
    assert all(re.fullmatch(r"(sm|compute)_\d+[af]?", t) for t in targets), targets
    sm = {t for t in targets if t.startswith("sm_")}
    assert sm and min(int(re.sub(r"\D", "", t)) for t in sm) >= 80, targets
    from test_cuda import find_cuobjdump  # noqa: PLC0415  (test_cuda queries nothing at import)

    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump to list the machine code")
    listed = subprocess.run([cuobjdump, "-lelf", extension().__file__], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    elf = set(re.findall(r"\.(sm_\d+[af]?)\.cubin", listed.stdout))
    assert elf == sm, f"machine code for {sorted(elf)}, build_info says {sorted(sm)}"


# ---------------------------------------------------------------- on a GPU

FP16_EPS = torch.finfo(torch.float16).eps


def assert_rows_close(got, want, rows, tol, what):
    """Each selected row's max|got - want| (less fp16's subnormal spacing 2^-24, the most a
    result that small keeps when stored in fp16) within tol of that row's own max|want|: a
    whole-tensor bound cannot see a row of small gradients flushed to zero."""
    rows = rows & torch.isfinite(want.half()).all(dim=1)
    a, b = got[rows].double(), want[rows].double()
    scale = b.abs().max(dim=1).values
    assert (scale > 0).all(), f"{what}: a selected row of the reference is all zero"
    rel = ((a - b).abs() - 2.0**-24).clamp(min=0).max(dim=1).values / scale
    worst = int(rel.argmax())
    index = int(rows.nonzero()[worst])
    assert rel.max() <= tol, (f"{what}: row error up to {rel.max():.3g} of the row (median {rel.median():.3g}), "
                              f"bound {tol:.3g}; worst row {index}: max|want| {scale[worst]:.3g}")


def assert_nonfinite_where_reference(got, want, what):
    """Non-finite entries exactly where the reference's, stored in fp16, are (a zero row's own
    gradient, ~1e12, docs/errors.md): nowhere else, no NaN spread over the tensor."""
    expected = ~torch.isfinite(want.half())
    bad = ~torch.isfinite(got)
    assert torch.equal(bad, expected), (f"{what}: not finite at {bad.nonzero()[:4].tolist()} ({int(bad.sum())} "
                                        f"entries), the reference's at {expected.nonzero()[:4].tolist()}")


@gpu
@needs_gpu
@pytest.mark.parametrize("norm", [1.0, 1e5])
def test_gpu_fp16_small_gradients_per_row_ragged(norm):
    """tests/test_cpu.py::test_fp16_small_gradients_per_row on the cuda backend (B = 37,
    C = 1001, D = 67, 16 splits): dW rows of classes that are no row's target and dx rows
    within 8 fp16 eps of each row (the bound's derivation is there), with a zero embedding and
    a zero target weight row in the batch. At norm 1e5 the GEMM operand g ~ 1e-10: without the
    operand scaling (tiles.cuh) those rows came back 0."""
    x, w, y = geometric_inputs(dtype=torch.float64)
    x = x * (norm / x.norm(dim=1, keepdim=True))
    x, w = x.half(), w.half()
    x[0] = 0
    w[y[1]] = 0
    kwargs = dict(m2=0.5, label_smoothing=0.1, reduction="mean", chunk_size=CHUNK)
    got = run("cuda", x, w, y, **kwargs)
    want = run("reference", x.double(), w.double(), y, **kwargs)
    for label, a, b in (("d loss / d x", got[2], want[2]), ("d loss / d W", got[3], want[3])):
        assert_nonfinite_where_reference(a, b, f"{label} at norm {norm}")
    B, C = x.shape[0], w.shape[0]
    targets = torch.zeros(C, dtype=torch.bool)
    targets[y] = True
    assert_rows_close(got[3], want[3], ~targets, 8 * FP16_EPS, f"d loss / d W, classes without a target, norm {norm}")
    assert_rows_close(got[2], want[2], torch.arange(B) > 0, 8 * FP16_EPS, f"d loss / d x, norm {norm}")


@gpu
@needs_gpu
@pytest.mark.parametrize("norm", [None, 1e5])
def test_gpu_fp16_small_gradients_per_row_large(norm):
    """B = 1000, C = 30011, D = 512 (16 row blocks, two slices of D, default splits): a class
    that is no row's target has p ~ 1/C, g ~ 64 / (1000 * 30011) ~ 2e-6 (2e-11 at norm 1e5,
    below fp16's subnormals); each such dW row and each dx row within 8 fp16 eps of itself."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", generator=g, dtype=torch.float64)
    w = torch.randn(30011, 512, device="cuda", generator=g, dtype=torch.float64)
    y = torch.randint(0, 30011, (1000,), device="cuda", generator=g)
    if norm is not None:
        x = x * (norm / x.norm(dim=1, keepdim=True))
    x, w = x.half(), w.half()
    kwargs = dict(m2=0.5, label_smoothing=0.1, reduction="mean")
    got = run("cuda", x, w, y, **kwargs)
    want = run("reference", x.double(), w.double(), y, **kwargs)
    for label, a, b in (("d loss / d x", got[2], want[2]), ("d loss / d W", got[3], want[3])):
        assert_nonfinite_where_reference(a, b, label)
    targets = torch.zeros(30011, dtype=torch.bool)
    targets[y.cpu()] = True
    assert_rows_close(got[3], want[3], ~targets, 8 * FP16_EPS, f"d loss / d W, classes without a target, norm {norm}")
    assert_rows_close(got[2], want[2], torch.ones(1000, dtype=torch.bool), 8 * FP16_EPS, f"d loss / d x, norm {norm}")


@gpu
@needs_gpu
@pytest.mark.parametrize("zero", ["x", "w-target", "w-other", "both"])
def test_gpu_fp16_zero_rows_do_not_poison(zero):
    """fp16: a zero embedding's g (x 1e12) was inf in the dW GEMM, and inf * 0 = NaN filled all
    of dW; a zero weight row did the same to all of dx. Now the zero row's own gradient is the
    reference's (inf in fp16, or finite), everything else finite and within fp16 rounding of
    the reference, row by row."""
    x, w, y = geometric_inputs(dtype=torch.float64)
    x, w = x.half(), w.half()
    zero_x = zero in ("x", "both")
    zero_w = {"x": [], "w-target": [int(y[1])], "w-other": [], "both": [int(y[1])]}[zero]
    if zero in ("w-other", "both"):
        others = torch.ones(w.shape[0], dtype=torch.bool)
        others[y] = False
        zero_w.append(int(others.nonzero()[0]))
    if zero_x:
        x[0] = 0
    w[zero_w] = 0
    kwargs = dict(m2=0.5, label_smoothing=0.1, reduction="mean", chunk_size=CHUNK)
    got = run("cuda", x, w, y, **kwargs)
    want = run("reference", x.double(), w.double(), y, **kwargs)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all(), f"zero {zero}: loss or lse not finite"
    assert_close(got[0], want[0], atol=1e-5 * float(want[0].abs().max()), what=f"zero {zero}: loss")
    for label, a, b in (("d loss / d x", got[2], want[2]), ("d loss / d W", got[3], want[3])):
        assert_nonfinite_where_reference(a, b, f"zero {zero}: {label}")
    x_rows = torch.ones(x.shape[0], dtype=torch.bool)
    x_rows[0] = not zero_x
    w_rows = torch.ones(w.shape[0], dtype=torch.bool)
    w_rows[zero_w] = False
    assert_rows_close(got[2], want[2], x_rows, 8 * FP16_EPS, f"zero {zero}: d loss / d x, other rows")
    assert_rows_close(got[3], want[3], w_rows, 8 * FP16_EPS, f"zero {zero}: d loss / d W, other rows")


@gpu
@needs_gpu
def test_gpu_split_budget_on_the_device():
    """B = 8192, D = 512, C = 4096, chunk_size 64: unbounded that was 64 splits, a 1 GiB
    partial dx buffer; the device's plan keeps it within 256 MiB (16 splits), the backward's
    peak memory grows by at most that over the default splits', and both match the float64
    reference (fp32 runs the exact SIMT path) and each other to fp32 rounding (only the order
    of the per-split sums differs)."""
    B, C, D = 8192, 4096, 512
    props = torch.cuda.get_device_properties(0)
    p = plan(B=B, C=C, D=D, x="float32", chunk=64, arch=props.major * 10 + props.minor,
             num_sms=props.multi_processor_count, max_smem=props.shared_memory_per_block_optin)
    assert C // 64 > p["max_splits"] == p["splits"] == 16 and p["dx_partial_bytes"] == 256 * MiB, p
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g)
    w = torch.randn(C, D, device="cuda", generator=g)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    kwargs = dict(m2=0.5, label_smoothing=0.1, reduction="mean")
    results, peaks = {}, {}
    for chunk in (None, 64):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[chunk] = run("cuda", x, w, y, chunk_size=chunk, **kwargs)
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base
    assert peaks[64] - peaks[None] <= 256 * MiB, f"peak {peaks[64] / MiB:.0f} MiB vs {peaks[None] / MiB:.0f} MiB"
    want = run("reference", x.double(), w.double(), y, **kwargs)
    names = ("loss", "lse", "d loss / d x", "d loss / d W")
    for label, a, b, c in zip(names, results[64], results[None], want):
        assert_close(a, c, atol=5e-5 * float(c.abs().max()), what=f"chunk 64 vs the reference: {label}")
        assert_close(a, b, atol=1e-5 * float(b.abs().max()), what=f"chunk 64 vs default splits: {label}")
