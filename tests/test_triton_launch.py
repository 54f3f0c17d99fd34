"""The Triton launchers' host logic that a GPU would exercise and the CPU can check: the class
splits' bounds, the device every launch runs on, and TF32 read from torch's settings once per
forward and carried to the backward. (The kernels' results: tests/test_backends.py.)"""

import contextlib

import pytest
import torch

triton = pytest.importorskip("triton")

from fastmargin import fused  # noqa: E402
from fastmargin.kernels import launch  # noqa: E402
from fastmargin.margins import Margin, lower  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("B, C, D, chunk", [
    (3, 1, 512, 0), (3, 1001, 512, 0), (3, 1001, 512, 1), (3, 1001, 512, 300), (3, 10**7, 512, 5000),
    (3, 1001, 512, 10**6),
    (8192, 2_000_000, 512, 16384),  # the shapes: (splits, B, D) fp32 partials of 2 TB before
    (8192, 2_000_000, 512, 64),
    (2, 10**9, 16, 1),              # more splits than a grid dimension holds
])
@pytest.mark.parametrize("acc_bytes", [4, 8])
def test_split_size(B, C, D, chunk, acc_bytes):
    """Splits are whole tiles and cover the classes (cdiv(C, split) programs, none empty), at
    least `chunk` classes each, at most MAX_GRID_YZ of them, and their dx̂ partials within
    PARTIAL_BUDGET_BYTES unless one split alone is larger."""
    cfg = launch.config(D, 1, torch.float32, backward=True)
    split = launch.split_size(C, chunk, B, D, acc_bytes, cfg, CPU)
    splits = triton.cdiv(C, split)
    assert split % cfg.BLOCK_C == 0 and split >= min(max(chunk, 1), C)
    assert (splits - 1) * split < C <= splits * split
    assert splits <= launch.MAX_GRID_YZ
    assert splits == 1 or splits * B * D * acc_bytes <= launch.PARTIAL_BUDGET_BYTES


def test_every_launch_runs_on_the_tensors_device(monkeypatch):
    """Each launcher enters launch.on_device(x.device) around its launches, and on_device makes
    the tensors' GPU current (torch.cuda.device) so that Triton takes its stream."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with launch.on_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.on_device(CPU):  # interpreted: nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]

    from fastmargin.kernels import margin_ce_bwd, margin_ce_fwd

    calls = []
    real = launch.on_device
    monkeypatch.setattr(launch, "on_device", lambda device: calls.append(device) or real(device))
    if not launch.INTERPRET:
        pytest.skip("the launchers run on CPU tensors only under TRITON_INTERPRET=1")
    from fastmargin import backend_triton

    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    lse, _, _ = backend_triton.row_statistics(x, w, torch.arange(5), Margin(m2=0.5), 8.0)
    lse.sum().backward()
    assert calls == [x.device, x.device], calls  # the forward launch and the backward's two
    assert margin_ce_fwd.launch is launch and margin_ce_bwd.launch is launch


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_the_second_gpu():
    from helpers import assert_rel

    import fastmargin

    x = torch.randn(64, 128, device="cuda:1", requires_grad=True)
    w = torch.randn(5000, 128, device="cuda:1", requires_grad=True)
    y = torch.randint(0, 5000, (64,), device="cuda:1")
    with torch.cuda.device(0):
        loss = fastmargin.margin_cross_entropy(x, w, y, m2=0.5, backend="triton")
        loss.backward()
    want = fastmargin.margin_cross_entropy(x.detach().cpu().double(), w.detach().cpu().double(), y.cpu(), m2=0.5,
                                           backend="reference")
    assert_rel(loss.detach().cpu(), want, 1e-4, "loss on cuda:1 with cuda:0 current")


def test_tf32_setting_read_through_both_apis(monkeypatch):
    """fused.tf32_allowed reads torch's new API (fp32_precision, 'none' deferring to the
    global setting), where reading the legacy allow_tf32 raises once the new one was set."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fused.tf32_allowed()
        matmul.fp32_precision = "ieee"
        assert not fused.tf32_allowed()
    finally:
        matmul.fp32_precision = before


def test_backward_uses_the_forwards_tf32_choice(monkeypatch):
    """allow_tf32 is an argument of the forward op, saved with it: switching torch's setting
    between forward and backward does not change the cosines the backward recomputes."""
    seen = []

    def forward(x, w, labels, params, flags, sub_centers, chunk, allow_tf32):
        seen.append(("fwd", allow_tf32))
        return tuple(torch.zeros(x.shape[0], dtype=params.dtype) for _ in range(3))

    def backward(g_lse, g_target, g_sum, x, w, labels, lse, params, flags, sub_centers, chunk, allow_tf32):
        seen.append(("bwd", allow_tf32))
        return torch.zeros_like(x), torch.zeros_like(w)

    row_statistics = fused.register("tf32probe", forward, backward, "cpu", lambda b, k: 1)
    monkeypatch.setattr(fused, "tf32_allowed", lambda: True)
    x = torch.randn(3, 4, requires_grad=True)
    lse, _, _ = row_statistics(x, torch.randn(5, 4), torch.arange(3), Margin(m2=0.5), 8.0)
    monkeypatch.setattr(fused, "tf32_allowed", lambda: False)
    lse.sum().backward()
    assert seen == [("fwd", True), ("bwd", True)], seen


def test_interpreted_dots_ignore_tf32():
    """Under the interpreter numpy computes the dots: PRECISION stays ieee whatever allow_tf32
    says, so interpreted fp32 results are exact fp32 (on a GPU: tf32 where allowed)."""
    x = torch.zeros(2, 2)
    meta = launch.dtypes(x, x, torch.float32, allow_tf32=True)
    assert meta["PRECISION"] == ("ieee" if launch.INTERPRET else "tf32")
    assert lower(Margin(m2=0.5), 1.0, torch.float32, CPU).params.dtype == torch.float32


# Opt-in shared memory a block, bytes, by architecture (CUDA's programming guide).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}


@pytest.mark.parametrize("dtype, K", [
    (torch.float32, 1),
    (torch.bfloat16, 3),
    pytest.param(torch.float32, 128, marks=pytest.mark.slow),
    pytest.param(torch.float64, 1, marks=pytest.mark.slow),
    pytest.param(torch.float16, 64, marks=pytest.mark.slow),
])
def test_shared_memory_per_architecture(dtype, K):
    """Each kernel's shared memory, from Triton's compiler for sm_90 (no GPU needed), fits
    every architecture 'auto' offers the backend on (sm_80 and newer: backends.unavailable_reason
    refuses older GPUs), except where printed: on the 99 KB parts (sm_86/89/120) an fp32
    config with K > 64 needs more, and there auto's first-use check, which runs the call's
    tiles, falls back to the next backend with Triton's reason."""
    from test_triton import compile_for

    report = compile_for(90, dtype, K)
    for name, info in report.items():
        over = [arch for arch, limit in SHARED_MEMORY_LIMIT.items() if info["shared"] > limit]
        print(f"{name} {dtype} K={K}: {info['shared']} bytes; over the limit of sm_{over}")
        assert info["shared"] <= SHARED_MEMORY_LIMIT[90], f"{name} needs {info['shared']} bytes on sm_90"
        if K <= 64:
            assert info["shared"] <= SHARED_MEMORY_LIMIT[80], f"{name} needs {info['shared']} bytes, sm_80 has less"


@pytest.mark.gpu
@pytest.mark.skipif(launch.INTERPRET or not torch.cuda.is_available(), reason="needs the compiled kernels on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_cosines_equal_with_the_backwards_tiles(dtype, monkeypatch):
    """The backward recomputes the cosines in tiles of 64 classes where the forward uses 128
    (kernels/launch.py config), so their tensor-core instructions differ in shape. At
    SphereFace's scale S = s ||x|| ~ 1e8 one ulp of a cosine moves a logit by ~10, and the
    backward's exp(z - lse) must see the forward's z: the forward run with the backward's
    tiles must give the same target logits, bit for bit (lse and z_sum sum in another order
    there). If this fails, make the tiles equal."""
    from fastmargin import backend_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(300, 512, device="cuda", generator=g) * 1e8 / 512**0.5).to(dtype)
    w = torch.randn(5000, 512, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, 5000, (300,), device="cuda", generator=g)
    margin = Margin(sphere_m=4)
    forward_tiles = backend_triton.row_statistics(x, w, y, margin, 1.0)
    config = launch.config
    monkeypatch.setattr(launch, "config", lambda D, K, dtype, backward: config(D, K, dtype, True))
    backward_tiles = backend_triton.row_statistics(x, w, y, margin, 1.0)
    a, b = forward_tiles[1], backward_tiles[1]
    assert torch.equal(a, b), f"z_target: the forward with the backward's tiles differs by {(a - b).abs().max()}"
