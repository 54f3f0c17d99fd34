"""Every implementation the benchmark compares, behind one interface.

A provider builds a Workload for a Case: the inputs (allocated once, gradients
included after the first step), a forward returning the loss and a backward. Margin
providers compute ArcFace (m = 0.5 rad, s = 64; sub-center ArcFace when K > 1), CosFace
(m = 0.35) for pytorch-metric-learning's CosFaceLoss; the fused cross-entropies without a
margin (torch, cut-cross-entropy, Liger) are yardsticks. fastmargin backends are read from
fastmargin.backends, so a kernel that lands joins the suite by itself.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastmargin
from fastmargin import backends

ARCFACE_M = 0.5
COSFACE_M = 0.35
SCALE = 64.0

# The fastmargin.margin_cross_entropy keyword arguments of each loss a provider computes;
# None: no margin (plain cross-entropy of x @ W^T), the fused-CE yardsticks.
SPHERE_M = 4
LOSS_KWARGS = {
    "arcface": dict(m2=ARCFACE_M, scale=SCALE),
    "subcenter_arcface": dict(m2=ARCFACE_M, scale=SCALE),
    "cosface": dict(m3=COSFACE_M, scale=SCALE),
    # SphereFace's scale is the feature norm (S_i = s * ||x_i||, s = 1), as in opensphere.
    "sphereface": dict(sphere_m=SPHERE_M, scale=1.0),
    # ArcFace with its margin as a (B,) tensor, every row 0.5 (per-row margins: AdaFace,
    # ElasticFace, MagFace): the same numbers as 'arcface', the cost of a column a row.
    "arcface_rows": dict(m2=ARCFACE_M, scale=SCALE),
    "ce": None,
}

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One shape: B rows, C classes, D features, K sub-centers per class, a dtype name."""

    B: int
    C: int
    D: int
    K: int = 1
    dtype: str = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def id(self) -> str:
        return f"B{self.B}-C{self.C}-D{self.D}-K{self.K}-{self.dtype}"


@dataclass
class Workload:
    """What one provider runs at one case.

    x (B, D), weight (C*K, D) a view of the trained weight in the F.linear layout, labels
    (B,); forward() -> the loss (a tensor), backward(out). `leaves` are the tensors whose
    gradients a step produces.
    """

    x: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    forward: Callable[[], torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    backward: Callable[[torch.Tensor], None] = field(default=lambda out: out.backward())


@dataclass(frozen=True)
class Provider:
    """name; build(case, device) -> Workload; which modes it times; its fastmargin backend.

    loss: what it computes ('arcface', 'cosface', 'sphereface', 'ce', 'matmul'; fastmargin
    backends 'arcface' or 'subcenter_arcface' by K). sub_centers: 'one' (K = 1 only), 'many'
    (K > 1 only) or 'any'. bc_tensors: how many (B, C*K) fp32-sized tensors it holds at
    its peak besides W's gradient, for the CPU memory guard (from the CPU sweep's peak_mem
    rows, rounded up: 8.2 for the reference, PML and insightface_eager, 4.3 compiled, 1.2
    torch_lce).
    compiles: its first call at a shape compiles (torch.compile), so warm-up is at the shape.
    unavailable: None or why it cannot run on a device type.
    """

    name: str
    build: Callable[[Case, torch.device], Workload]
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
    backend: str = ""
    loss: str = "arcface"
    sub_centers: str = "one"
    bc_tensors: float = 6.0
    op: str = "margin_ce"
    compiles: bool = False
    unavailable: Callable[[torch.device], str | None] = field(default=lambda device: None)

    def loss_for(self, case: Case) -> str:
        if self.loss == "arcface" and case.K > 1:
            return "subcenter_arcface"
        return self.loss

    def supports(self, case: Case) -> bool:
        return {"one": case.K == 1, "many": case.K > 1, "any": True}[self.sub_centers]

    def estimate_bytes(self, case: Case) -> int:
        """Peak extra bytes, roughly: bc_tensors (B, C*K) fp32-sized tensors plus W's gradient,
        twice that in fp64."""
        scale = 2 if case.torch_dtype == torch.float64 else 1
        return int(scale * (self.bc_tensors * case.B * case.C * case.K * 4 + 4 * case.C * case.K * case.D))


# ---- inputs -----------------------------------------------------------------------------


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """x (B, D), W (C*K, D) as leaves requiring grad, labels (B,) int64; deterministic."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype
    x = torch.randn(case.B, case.D, device=device, dtype=dtype, generator=generator).requires_grad_()
    w = torch.randn(case.C * case.K, case.D, device=device, dtype=dtype, generator=generator)
    labels = torch.randint(0, case.C, (case.B,), device=device, generator=generator)
    return x, w.requires_grad_(), labels


# ---- fastmargin -------------------------------------------------------------------------


def _fastmargin(backend: str, loss: str = "arcface") -> Callable[[Case, torch.device], Workload]:
    def build(case: Case, device: torch.device) -> Workload:
        x, w, labels = make_inputs(case, device)
        kwargs = LOSS_KWARGS[loss]
        if loss == "arcface_rows":
            compute = torch.float64 if case.torch_dtype == torch.float64 else torch.float32
            kwargs = dict(kwargs, m2=torch.full((case.B,), ARCFACE_M, device=device, dtype=compute))

        def forward() -> torch.Tensor:
            return fastmargin.margin_cross_entropy(x, w, labels, sub_centers=case.K, backend=backend, **kwargs)

        return Workload(x, w, labels, forward, (x, w))

    return build


# ---- pytorch-metric-learning ------------------------------------------------------------


def _pml_missing(device: torch.device) -> str | None:
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch-metric-learning is not installed (pip install pytorch-metric-learning)"
    return None


def _pml(class_name: str, margin: float) -> Callable[[Case, torch.device], Workload]:
    """PML's loss with its own W (D, C*K) holding our weights: W = weight.t(), no copy."""

    def build(case: Case, device: torch.device) -> Workload:
        from pytorch_metric_learning import losses

        x, w, labels = make_inputs(case, device)
        extra = {"sub_centers": case.K} if class_name == "SubCenterArcFaceLoss" else {}
        loss_fn = getattr(losses, class_name)(num_classes=case.C, embedding_size=case.D, margin=margin, scale=SCALE,
                                                **extra).to(device)
        loss_fn.W = torch.nn.Parameter(w.detach().t())  # (D, C*K), shares w's storage
        w_view = loss_fn.W.t()

        def forward() -> torch.Tensor:
            return loss_fn(x, labels)

        return Workload(x, w_view, labels, forward, (x, loss_fn.W))

    return build


# ---- insightface-style eager, from the math (DESIGN §1), and torch.compile of it --------


def insightface_arcface(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                        s: float = SCALE, m: float = ARCFACE_M) -> torch.Tensor:
    """normalize, linear, ArcFace on the target column, scale, cross-entropy.

    cos(theta + m) = cos*cos(m) - sin*sin(m), with the fallback cos - m*sin(m) where
    theta > pi - m; the exact gradient (insightface's arcface_torch detaches it instead).
    """
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1.0, 1.0)
    rows = torch.arange(x.shape[0], device=x.device)
    target = logits[rows, labels]
    sin = torch.sqrt((1.0 - target * target).clamp_min(1e-12))
    shifted = target * math.cos(m) - sin * math.sin(m)
    target_m = torch.where(target > math.cos(math.pi - m), shifted, target - m * math.sin(m))
    logits[rows, labels] = target_m  # in place, as insightface: clamp's backward keeps its input only
    return F.cross_entropy(logits * s, labels)


@functools.cache
def _compiled_insightface() -> Callable[..., torch.Tensor]:
    return torch.compile(insightface_arcface)


def _insightface(compiled: bool) -> Callable[[Case, torch.device], Workload]:
    def build(case: Case, device: torch.device) -> Workload:
        x, w, labels = make_inputs(case, device)
        fn = _compiled_insightface() if compiled else insightface_arcface
        return Workload(x, w, labels, lambda: fn(x, w, labels), (x, w))

    return build


# ---- fused cross-entropy without a margin: the yardsticks ----------------------------------


def _torch_lce_missing(device: torch.device) -> str | None:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def _torch_lce(chunking: str | int | None) -> Callable[[Case, torch.device], Workload]:
    """F.linear_cross_entropy. chunking None: options=None, linear + cross_entropy;
    'auto': LinearCrossEntropyOptions(), torch's default chunking (B / ceil(C/D) rows a
    chunk, rounded up to a power of two); an int n: n chunks of ceil(B/n) rows. The chunked
    path computes the gradients inside forward, so only fwd_bwd is timed."""

    def build(case: Case, device: torch.device) -> Workload:
        x, w, labels = make_inputs(case, device)
        if chunking is None:
            options = None
        elif chunking == "auto":
            options = torch.nn.LinearCrossEntropyOptions()
        else:
            options = torch.nn.LinearCrossEntropyOptions(
                chunking_method=None, batch_chunk_size=-(-case.B // chunking))
        return Workload(x, w, labels, lambda: F.linear_cross_entropy(x, w, labels, options=options), (x, w))

    return build


def _gpu_package_missing(package: str, pip_name: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"{pip_name} runs on CUDA tensors only (Triton kernels)"
        if importlib.util.find_spec(package) is None:
            return f"{pip_name} is not installed (pip install {pip_name})"
        return None

    return reason


def _cce(case: Case, device: torch.device) -> Workload:
    from cut_cross_entropy import linear_cross_entropy

    x, w, labels = make_inputs(case, device)
    return Workload(x, w, labels, lambda: linear_cross_entropy(x, w, labels), (x, w))


def _liger(case: Case, device: torch.device) -> Workload:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x, w, labels = make_inputs(case, device)
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def forward() -> torch.Tensor:
        out = loss_fn(w, x, labels)
        return out[0] if isinstance(out, tuple) else out

    return Workload(x, w, labels, forward, (x, w))


# ---- the GEMM floor and the matmul rate ----------------------------------------------------


def _gemm_floor(case: Case, device: torch.device) -> Workload:
    """The three matmuls of one training step (DESIGN §3) on preallocated tensors:
    logits = x @ W^T into a (B, C*K) buffer; dx = dlogits @ W; dW = dlogits^T @ x, the
    buffer standing in for dlogits. Its extra memory is that buffer."""
    x, w, labels = make_inputs(case, device)
    x, w = x.detach(), w.detach()
    logits = torch.empty(case.B, case.C * case.K, device=device, dtype=x.dtype)
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def forward() -> torch.Tensor:
        return torch.mm(x, w.t(), out=logits)

    def backward(dlogits: torch.Tensor) -> None:
        torch.mm(dlogits, w, out=dx)
        torch.mm(dlogits.t(), x, out=dw)

    return Workload(x, w, labels, forward, (), backward)


def _matmul_rate(case: Case, device: torch.device) -> Workload:
    """(B, D) @ (D, C*K) into a preallocated output: the device's matmul rate at this case."""
    workload = _gemm_floor(case, device)
    workload.backward = lambda out: None
    return workload


# ---- the registry ----------------------------------------------------------------------


def _fastmargin_reason(name: str) -> Callable[[torch.device], str | None]:
    return lambda device: backends.unavailable_reason(name, device)


def all_providers() -> list[Provider]:
    """Every provider, usable here or not (see Provider.unavailable)."""
    providers = [
        Provider(f"fastmargin:{name}", _fastmargin(name), backend=name, sub_centers="any",
                 bc_tensors=9.0 if name == "reference" else 0.5, unavailable=_fastmargin_reason(name))
        for name in backends.BACKENDS
    ]
    # The other margins on the CPU kernel: CosFace (no angle) and SphereFace (per-row scale,
    # Chebyshev target), so the CPU sweep covers each branch of its element pass; and ArcFace
    # with a (B,) margin beside the scalar one on every fused backend.
    providers += [
        Provider(f"fastmargin:cpu:{loss}", _fastmargin("cpu", loss), backend="cpu", loss=loss, bc_tensors=0.5,
                 unavailable=_fastmargin_reason("cpu"))
        for loss in ("cosface", "sphereface")
    ]
    providers += [
        Provider(f"fastmargin:{name}:arcface_rows", _fastmargin(name, "arcface_rows"), backend=name,
                 loss="arcface_rows", bc_tensors=0.5, unavailable=_fastmargin_reason(name))
        for name in backends.BACKENDS if name != "reference"
    ]
    providers += [
        Provider("pml:ArcFaceLoss", _pml("ArcFaceLoss", math.degrees(ARCFACE_M)), bc_tensors=9.0,
                 unavailable=_pml_missing),
        Provider("pml:CosFaceLoss", _pml("CosFaceLoss", COSFACE_M), loss="cosface", bc_tensors=9.0,
                 unavailable=_pml_missing),
        Provider("pml:SubCenterArcFaceLoss", _pml("SubCenterArcFaceLoss", math.degrees(ARCFACE_M)),
                 loss="subcenter_arcface", sub_centers="many", bc_tensors=9.0, unavailable=_pml_missing),
        Provider("insightface_eager", _insightface(compiled=False), bc_tensors=9.0),
        Provider("insightface_compiled", _insightface(compiled=True), bc_tensors=5.0, compiles=True),
        Provider("torch_lce", _torch_lce(None), loss="ce", bc_tensors=2.0, unavailable=_torch_lce_missing),
        Provider("torch_lce_chunked", _torch_lce("auto"), modes=("fwd_bwd",), loss="ce", bc_tensors=0.5,
                 unavailable=_torch_lce_missing),
        Provider("torch_lce_chunked_4", _torch_lce(4), modes=("fwd_bwd",), loss="ce", bc_tensors=0.5,
                 unavailable=_torch_lce_missing),
    Provider("cut_cross_entropy", _cce, modes=("fwd", "bwd", "fwd_bwd"), loss="ce", bc_tensors=0.1,
                 unavailable=_gpu_package_missing("cut_cross_entropy", "cut-cross-entropy")),
        Provider("liger_flce", _liger, modes=("fwd_bwd",), loss="ce", bc_tensors=0.5,
                 unavailable=_gpu_package_missing("liger_kernel", "liger-kernel")),
        Provider("gemm_floor", _gemm_floor, loss="matmul", sub_centers="any", bc_tensors=1.0, op="gemm_floor"),
        Provider("matmul_rate", _matmul_rate, modes=("fwd",), loss="matmul", sub_centers="any",
                 bc_tensors=1.0, op="matmul"),
    ]
    return providers


def by_name(name: str) -> Provider:
    for provider in all_providers():
        if provider.name == name:
            return provider
    raise KeyError(f"no provider {name!r}; known: {[p.name for p in all_providers()]}")


def available(device: torch.device) -> list[Provider]:
    return [p for p in all_providers() if p.unavailable(device) is None]


def unavailable(device: torch.device) -> dict[str, str]:
    """{provider name: why it cannot run on device}."""
    return {p.name: reason for p in all_providers() if (reason := p.unavailable(device)) is not None}


def tiny(case: Case) -> Case:
    """A small case of the same D, K and dtype: warm-up that loads libraries and thread pools."""
    return Case(min(case.B, 8), min(case.C, 64), case.D, case.K, case.dtype)


def _step(workload: Workload) -> None:
    """One training step from zeroed gradients (set to None, as optimizer.zero_grad())."""
    for leaf in workload.leaves:
        leaf.grad = None
    workload.backward(workload.forward())


def memory_step(provider: str, case: dict, device: str = "cpu") -> Callable[[], None]:
    """For fastmargin.profiling.rss_peak_extra_bytes, in a fresh process: warm-up, then the
    workload at `case` with its gradients allocated; returns one training step.

    Warm-up runs a tiny case (libraries, thread pools), or the case itself for a provider
    that compiles (the compiler's memory is not the loss's). Gradients are preallocated so
    the baseline holds inputs and gradients; the step drops them and makes fresh ones, as
    training with optimizer.zero_grad() does, so the growth is what the loss needs beyond.
    """
    spec, shape, dev = by_name(provider), Case(**case), torch.device(device)
    if spec.compiles:
        workload = spec.build(shape, dev)
        _step(workload)
    else:
        _step(spec.build(tiny(shape), dev))
        workload = spec.build(shape, dev)
        for leaf in workload.leaves:
            leaf.grad = torch.zeros_like(leaf)
    return lambda: _step(workload)
