"""fastmargin.insightface against insightface arcface_torch's formulas and the single process.

insightface's math (recognition/arcface_torch: losses.py, partial_fc_v2.py), written out here
in plain PyTorch (`insightface_logits`, `insightface_loss`):

    cos = F.linear(F.normalize(x), F.normalize(W)).clamp(-1, 1)                      (B, C)
    the target column of rows whose label is not -1: cos(m1 * acos(c) + m2) - m3, which is
        ArcFace's cos(acos(c) + m2) (m1 = 1, m3 = 0) and CosFace's c - m3 (m1 = 1, m2 = 0),
        the two branches insightface's CombinedMarginLoss computes; 'detached' (insightface's
        gradient): the value only, the gradient that of c
    logits = s * that;  loss = F.cross_entropy(logits, labels, ignore_index=-1), the mean over
        the rows whose label is not -1
    the embeddings' gradient PartialFC_V2 hands back: world_size * d loss / d x (insightface's
        AllGather backward; DistributedDataParallel averages it back over the ranks)

gloo worlds of 1 (in this process), 2 and 3 (spawned, one spawn per world; World and
assert_rel are tests/test_distributed.py's) run every CASE for two steps whose batch sizes
differ per rank and per step, 0 rows included, and save their state_dicts as insightface
does; the parent compares each rank with the formulas and with PartialFC_V2 in a single
process without torch.distributed. The rest runs in this process: the margin losses called
on logits, constructors, errors, fp16, and the example under torchrun.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastmargin.distributed import LOCAL, sample_classes
from fastmargin.insightface import ArcFace, CombinedMarginLoss, CosFace, PartialFC_V2, fused_margin
from test_distributed import TOL, World, assert_rel, run_rank

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

REPO = Path(__file__).resolve().parents[1]
BACKEND = "auto"  # what a user gets: the fused cpu kernel where it is built
C, D = 13, 8
# Rows per rank (a world of P takes the first P) in each of two steps, and the global rows
# of each step whose label is -1.
STEPS = [dict(sizes=(5, 2, 4), ignored=(1, 6)), dict(sizes=(3, 6, 0), ignored=(0,))]


# ---- insightface's math, from the formulas ------------------------------------------------


def insightface_logits(cos: torch.Tensor, labels: torch.Tensor, s: float, m1: float, m2: float, m3: float,
                       grad_mode: str = "detached") -> torch.Tensor:
    """cos (B, C), labels (B,) with -1 for no target -> s * cos, target column s * psi."""
    rows = torch.arange(len(labels))[labels != -1]
    c = cos[rows, labels[rows]]
    psi = torch.cos(m1 * torch.acos(c) + m2) - m3 if (m1, m2) != (1.0, 0.0) else c - m3
    if grad_mode == "detached":
        psi = c + (psi - c).detach()
    out = cos.clone()
    out[rows, labels[rows]] = psi
    return s * out


def insightface_loss(x, w, labels, margin_loss, grad_mode="detached"):
    """The mean loss over rows whose label is not -1; x (B, D), w (C, D), float64 math.
    With interclass_filtering_threshold t > 0, non-target cosines above t become 0 (no
    gradient) before the margin, as insightface's CombinedMarginLoss filters."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    threshold = getattr(margin_loss, "interclass_filtering_threshold", 0)
    if threshold > 0:
        target = torch.zeros_like(cos, dtype=torch.bool)
        rows = torch.arange(len(labels))[labels != -1]
        target[rows, labels[rows]] = True
        cos = cos.masked_fill((cos > threshold).detach() & ~target, 0.0)
    s, m1, m2, m3 = margin_numbers(margin_loss)
    return F.cross_entropy(insightface_logits(cos, labels, s, m1, m2, m3, grad_mode), labels, ignore_index=-1)


def margin_numbers(margin_loss) -> tuple[float, float, float, float]:
    if isinstance(margin_loss, ArcFace):
        return margin_loss.s, 1.0, margin_loss.margin, 0.0
    if isinstance(margin_loss, CosFace):
        return margin_loss.s, 1.0, 0.0, margin_loss.m
    return margin_loss.s, margin_loss.m1, margin_loss.m2, margin_loss.m3


# insightface's interclass filtering threshold of its wf12m configs (0 elsewhere).
FILTER_THRESHOLD = 0.4


def make_margin(name: str, grad_mode: str = "detached"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'combined' warns that insightface would ignore m1, m2
        return {
            "arcface": lambda: ArcFace(64.0, 0.5, grad_mode=grad_mode),
            "cosface": lambda: CosFace(64.0, 0.35, grad_mode=grad_mode),
            "train_v2": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0, grad_mode=grad_mode),
            "combined": lambda: CombinedMarginLoss(32.0, 0.9, 0.4, 0.15, grad_mode=grad_mode),
            "filter": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, FILTER_THRESHOLD, grad_mode=grad_mode),
        }[name]()


# ---- the spawned worlds --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    margin: str
    grad_mode: str = "detached"
    dtype: torch.dtype = torch.float64
    fp16: bool = False

    @property
    def name(self) -> str:
        kind = "fp16" if self.fp16 else {torch.float64: "fp64", torch.float32: "fp32"}[self.dtype]
        return f"{self.margin}-{self.grad_mode}-{kind}"


CASES = [Case(m, g) for m in ("arcface", "cosface", "combined", "filter") for g in ("detached", "exact")] + [
    Case("train_v2", dtype=torch.float32), Case("train_v2", dtype=torch.float32, fp16=True)]


def full_weight(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def step_inputs(step: int, world: int, dtype: torch.dtype = torch.float64):
    """(x (B, D), labels (B,), rows per rank) of a step's global batch, the same everywhere.
    Rows sit near their class's weight, so that every target angle stays below pi - m2,
    where insightface's unguarded cos(theta + m2) and fastmargin's (monotonic) psi agree."""
    gen = torch.Generator().manual_seed(1 + step)
    sizes = list(STEPS[step]["sizes"][:world])
    labels = torch.randint(0, C, (sum(sizes),), generator=gen)
    x = 2 * F.normalize(full_weight()[labels]) + 0.6 * torch.randn(len(labels), D, generator=gen, dtype=torch.float64)
    labels[[i for i in STEPS[step]["ignored"] if i < len(labels)]] = -1
    return x.to(dtype), labels, sizes


def run_case(case: Case, rank: int, world: int) -> list[dict]:
    module = PartialFC_V2(make_margin(case.margin, case.grad_mode), D, C, fp16=case.fp16, backend=BACKEND)
    module.to(case.dtype).load_full_weight(full_weight(case.dtype))
    results = []
    for step in range(len(STEPS)):
        x_all, labels, sizes = step_inputs(step, world, case.dtype)
        start = sum(sizes[:rank])
        x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
        mine = labels[start : start + sizes[rank]]
        loss = module(x, mine.view(-1, 1) if step else mine)  # insightface's loader gives (B, 1) or (B,)
        loss.backward()
        results.append({"loss": loss.detach(), "dx": x.grad, "dw": module.weight.grad,
                        "range": (module.class_start, module.class_start + module.num_local)})
        module.weight.grad = None
    return results


CHECKPOINT = dict(C=11, D=5)


def checkpoints(rank: int, world: int, out: Path) -> dict:
    """Each rank saves its state_dict as insightface's train.py did (softmax_fc_gpu_{rank}.pt),
    loads it into a fresh module, exports the full W to rank 0, and splits one common full W."""
    c, d = CHECKPOINT["C"], CHECKPOINT["D"]
    torch.manual_seed(100 + rank)
    module = PartialFC_V2(ArcFace(), d, c)
    torch.manual_seed(100 + rank)
    insightface_init = torch.normal(0, 0.01, (module.num_local, d))  # insightface's draw, same RNG state
    state = module.state_dict()
    shard = state["weight"].clone()  # state_dict() holds the parameter itself, changed below
    torch.save(state, out / f"softmax_fc_gpu_{rank}.pt")
    fresh = PartialFC_V2(CosFace(), d, c)
    fresh.load_state_dict(torch.load(out / f"softmax_fc_gpu_{rank}.pt"), strict=True)
    full = module.full_weight()
    module.load_full_weight(torch.randn(c, d, generator=torch.Generator().manual_seed(7)))
    torch.save(module.state_dict(), out / f"common_gpu_{rank}.pt")
    return {"keys": list(state), "version": state._metadata[""]["version"], "shard": shard,
            "insightface_init": insightface_init, "fresh": fresh.weight.detach(), "full": full,
            "class_start": module.class_start, "num_local": module.num_local}


def worker(rank: int, world: int, out: str) -> None:
    run_rank(rank, world, Path(out), CASES, lambda case, r, w: {"steps": run_case(case, r, w)}, checkpoints)


@pytest.fixture(scope="module", params=[pytest.param(p, marks=needs_gloo) for p in (1, 2, 3)],
                ids=lambda p: f"world{p}")
def world(request, tmp_path_factory) -> tuple[World, Path]:
    size = request.param
    out = tmp_path_factory.mktemp(f"insightface_world{size}")
    if size == 1:  # a world of one runs here, saving a process start (seconds on 2 cores)
        threads = torch.get_num_threads()
        try:
            worker(0, 1, str(out))
        finally:
            torch.set_num_threads(threads)
    else:
        mp.spawn(worker, args=(size, str(out)), nprocs=size, join=True)
    return World(size, [torch.load(out / f"rank{r}.pt") for r in range(size)]), out


def reference_inputs(case: Case, step: int, world: int):
    """x, W in float64 as the module computes with them (fp16: rounded to half first)."""
    x, labels, sizes = step_inputs(step, world, case.dtype)
    w = full_weight(case.dtype)
    if case.fp16:
        x, w = x.half(), w.half()
    return x.double(), w.double(), labels, sizes


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_insightface_formulas(world, case):
    world, _ = world
    tol = 1e-10 if case.dtype == torch.float64 else 1e-5
    grad_tol = 2e-3 if case.fp16 else tol  # fp16: the fused op hands gradients back in half
    margin_loss = make_margin(case.margin, case.grad_mode)
    for step, per_rank in enumerate(zip(*(r["steps"] for r in world.results(case.name)))):
        x, w, labels, sizes = reference_inputs(case, step, world.size)
        valid = labels != -1
        assert (F.cosine_similarity(x[valid], w[labels[valid]]) > -math.cos(0.5) + 0.1).all(), "inputs leave theta*"
        if case.margin == "filter":
            cos = F.linear(F.normalize(x), F.normalize(w))
            others = torch.arange(C) != labels.unsqueeze(1)
            filtered = int(((cos > FILTER_THRESHOLD) & others).sum())
            assert filtered >= 3, f"the filter changes {filtered} cosines"
            assert ((cos - FILTER_THRESHOLD).abs() > 1e-6).all(), "a cosine on the threshold"
        x.requires_grad_(True)
        w.requires_grad_(True)
        loss = insightface_loss(x, w, labels, margin_loss, case.grad_mode)
        loss.backward()
        what = f"world {world.size}, {case.name}, step {step}"
        for rank, r in enumerate(per_rank):
            assert r["loss"].dtype == (torch.float64 if case.dtype == torch.float64 else torch.float32)
            assert_rel(r["loss"], loss, tol, f"{what}: loss on rank {rank}")
            assert_rel(r["dw"], w.grad[slice(*r["range"])], grad_tol, f"{what}: dW of rank {rank}")
        dx = torch.cat([r["dx"] for r in per_rank])
        assert_rel(dx, world.size * x.grad, grad_tol, f"{what}: dX = world size x d loss / d x")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(world, case):
    # The same module in one process without torch.distributed, on the global batch.
    world, _ = world
    tol = TOL[case.dtype]
    grad_tol = 2e-3 if case.fp16 else tol  # fp16: each rank's gradients are rounded to half
    single = PartialFC_V2(make_margin(case.margin, case.grad_mode), D, C, fp16=case.fp16, backend=BACKEND)
    single.to(case.dtype).load_state_dict({"weight": full_weight(case.dtype)})
    for step, per_rank in enumerate(zip(*(r["steps"] for r in world.results(case.name)))):
        x, labels, sizes = step_inputs(step, world.size, case.dtype)
        x.requires_grad_(True)
        loss = single(x, labels)
        loss.backward()
        what = f"world {world.size}, {case.name}, step {step}"
        for rank, r in enumerate(per_rank):
            assert_rel(r["loss"], loss, tol, f"{what}: loss on rank {rank}")
            assert_rel(r["dw"], single.weight.grad[slice(*r["range"])], grad_tol, f"{what}: dW of rank {rank}")
        assert_rel(torch.cat([r["dx"] for r in per_rank]), world.size * x.grad, grad_tol, f"{what}: dX")
        single.weight.grad = None


def test_state_dict_as_insightface_saves_it(world):
    # insightface's PartialFC_V2.state_dict(): {'weight': (num_local, D) float32}, version 2
    # metadata; rank r holds C // P classes, one more while r < C % P, from
    # class_start = C // P * r + min(r, C % P); initialised torch.normal(0, 0.01, ...).
    world, out = world
    c, d, p = CHECKPOINT["C"], CHECKPOINT["D"], world.size
    facts = world.results("checkpoints")
    for rank, f in enumerate(facts):
        num_local = c // p + int(rank < c % p)
        assert f["keys"] == ["weight"] and f["version"] == 2
        assert f["shard"].shape == (num_local, d) and f["shard"].dtype == torch.float32
        assert (f["class_start"], f["num_local"]) == (c // p * rank + min(rank, c % p), num_local)
        assert torch.equal(f["shard"], f["insightface_init"]), f"rank {rank}: not insightface's initial weight"
        assert torch.equal(f["fresh"], f["shard"]), f"rank {rank}: the loaded state_dict differs from the saved one"
        assert torch.equal(torch.load(out / f"softmax_fc_gpu_{rank}.pt")["weight"], f["shard"])
    assert all(f["full"] is None for f in facts[1:])
    assert torch.equal(facts[0]["full"], torch.cat([f["shard"] for f in facts]))


def test_one_full_weight_across_world_sizes(world):
    # Rank order is class order: a world's saved shards, concatenated, are the full W that
    # any other world size splits again, and that a single process loads as its state_dict.
    world, out = world
    c, d = CHECKPOINT["C"], CHECKPOINT["D"]
    common = torch.randn(c, d, generator=torch.Generator().manual_seed(7))
    full = torch.cat([torch.load(out / f"common_gpu_{r}.pt")["weight"] for r in range(world.size)])
    assert torch.equal(full, common)
    single = PartialFC_V2(ArcFace(), d, c)
    single.load_state_dict({"weight": full}, strict=True)
    assert torch.equal(single.full_weight(), common)


# ---- the margin losses called on logits, as insightface's code calls them ------------------


def direct_inputs(grad_mode: str):
    """Cosines with +-1 exactly and a target angle past pi - m2 (detached: insightface's
    value there is cos(theta + m2), unguarded); for the exact gradient, away from +-1."""
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(7, 9, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([2, -1, 0, 8, 5, -1, 1])
    if grad_mode == "detached":
        cos[0, 2], cos[2, 0], cos[3, 8], cos[4, 4] = 1.0, -1.0, -0.95, 1.0
    else:
        cos = cos.clamp(-0.99, 0.99)
    return cos, labels


@pytest.mark.parametrize("grad_mode", ["detached", "exact"])
@pytest.mark.parametrize("name", ["arcface", "cosface", "train_v2", "combined"])
def test_direct_call_matches_insightface(name, grad_mode):
    margin_loss = make_margin(name, grad_mode)
    cos, labels = direct_inputs(grad_mode)
    for shape in [(-1,), (-1, 1)]:  # ArcFace's callers pass (B,), PartialFC_V2 passes (B, 1)
        given = cos.clone().requires_grad_(True)
        want_in = cos.clone().requires_grad_(True)
        got = margin_loss(given, labels.view(shape))
        want = insightface_logits(want_in, labels, *margin_numbers(margin_loss), grad_mode)
        assert torch.equal(given.detach(), cos), "the logits passed in were modified"
        upstream = torch.linspace(-1, 1, cos.numel(), dtype=cos.dtype).view_as(cos)
        got.backward(upstream)
        want.backward(upstream)
        assert_rel(got, want, 1e-14, f"{name} {grad_mode}: logits")
        assert_rel(given.grad, want_in.grad, 1e-12, f"{name} {grad_mode}: d logits")
        if grad_mode == "detached":  # straight-through: s everywhere
            assert torch.equal(given.grad, margin_numbers(margin_loss)[0] * upstream)


def test_direct_call_past_theta_limit_is_insightfaces_unguarded_cosine():
    # Target angle past pi - m2: insightface's cos(theta + m2) rises again; so does the direct call.
    cos = torch.tensor([[-0.95, 0.1]], dtype=torch.float64)
    got = ArcFace(64.0, 0.5)(cos, torch.tensor([0]))
    assert got[0, 0].item() == pytest.approx(64 * math.cos(math.acos(-0.95) + 0.5), rel=1e-14)
    assert got[0, 0].item() > 64 * -1.0


def test_direct_call_interclass_filtering():
    # insightface: non-target cosines above the threshold become 0 before the margin, with no
    # gradient; the target and rows without one (all of their columns) are filtered alike.
    threshold = 0.2
    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0, threshold)
    cos, labels = direct_inputs("detached")
    cos[0, 2] = 0.9  # a target above the threshold stays
    given = cos.clone().requires_grad_(True)
    got = margin_loss(given, labels)
    rows = torch.arange(len(labels))[labels != -1]
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[rows, labels[rows]] = True
    dirty = (cos > threshold) & ~target
    assert dirty.any() and (target & (cos > threshold)).any(), "inputs must reach both branches"
    want = insightface_logits(cos.masked_fill(dirty, 0.0), labels, 64, 1.0, 0.5, 0.0)
    assert_rel(got, want, 1e-14, "filtered logits")
    got.sum().backward()
    assert torch.equal(given.grad, torch.where(dirty, 0.0, 64.0).double())


# ---- constructors and errors -----------------------------------------------------------------


# insightface's constructors (losses.py, partial_fc_v2.py), parameter by parameter.
INSIGHTFACE_SIGNATURES = {
    CombinedMarginLoss: [("s", None), ("m1", None), ("m2", None), ("m3", None), ("interclass_filtering_threshold", 0)],
    ArcFace: [("s", 64.0), ("margin", 0.5)],
    CosFace: [("s", 64.0), ("m", 0.40)],
    PartialFC_V2: [("margin_loss", None), ("embedding_size", None), ("num_classes", None), ("sample_rate", 1.0),
                   ("fp16", False)],
}


@pytest.mark.parametrize("cls", INSIGHTFACE_SIGNATURES, ids=lambda c: c.__name__)
def test_constructor_arguments_and_defaults(cls):
    positional = [(p.name, None if p.default is p.empty else p.default)
                  for p in inspect.signature(cls).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == INSIGHTFACE_SIGNATURES[cls]


def test_attributes_and_default_gradient():
    arc, cosface = ArcFace(), CosFace()
    combined = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    assert (arc.s, arc.margin, cosface.s, cosface.m) == (64.0, 0.5, 64.0, 0.40)
    assert (combined.s, combined.m1, combined.m2, combined.m3, combined.interclass_filtering_threshold) == \
        (64, 1.0, 0.5, 0.0, 0)
    for margin_loss in (arc, cosface, combined):  # insightface's straight-through gradient
        assert fused_margin(margin_loss)[0].grad_mode == "detached"
    assert fused_margin(ArcFace(grad_mode="exact"))[0].grad_mode == "exact"
    with pytest.raises(TypeError):
        CombinedMarginLoss(64, 1.0, 0.5)  # m3 has no default in insightface either


@pytest.mark.parametrize("margin_loss, margin", [
    (ArcFace(30.0, 0.3), dict(m1=1.0, m2=0.3, m3=0.0)),
    (CosFace(30.0, 0.35), dict(m1=1.0, m2=0.0, m3=0.35)),
    (CombinedMarginLoss(30.0, 1.0, 0.5, 0.0), dict(m1=1.0, m2=0.5, m3=0.0)),
    (CombinedMarginLoss(30.0, 1.0, 0.0, 0.4), dict(m1=1.0, m2=0.0, m3=0.4)),
    (CombinedMarginLoss(30.0, 0.9, 0.4, 0.0), dict(m1=0.9, m2=0.4, m3=0.0)),  # insightface raises here
], ids=["arcface", "cosface", "combined-arc", "combined-cos", "combined-m1"])
def test_lowered_margin(margin_loss, margin):
    spec, scale = fused_margin(margin_loss)
    assert scale == 30.0 and (spec.m1, spec.m2, spec.m3) == tuple(margin.values())


def test_combined_margin_warns_where_insightface_ignores_m1_m2():
    with pytest.warns(UserWarning, match="insightface applies only m3"):
        CombinedMarginLoss(64, 1.0, 0.5, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CombinedMarginLoss(64, 1.0, 0.5, 0.0)
        CombinedMarginLoss(64, 1.0, 0.0, 0.4)


def test_insightface_own_margin_objects_are_read():
    # A script that swaps only its PartialFC_V2 import keeps insightface's losses.py objects:
    # they are read by the attributes insightface's constructors set.
    combined = type("CombinedMarginLoss", (), dict(s=64, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0))()
    cosface = type("CosFace", (), dict(s=64.0, m=0.4))()
    arcface = type("ArcFace", (), dict(s=32.0, margin=0.3))()
    assert fused_margin(combined) == fused_margin(CombinedMarginLoss(64, 1.0, 0.5, 0.0))
    assert fused_margin(cosface) == fused_margin(CosFace(64.0, 0.4))
    assert fused_margin(arcface) == fused_margin(ArcFace(32.0, 0.3))
    filtered = type("CombinedMarginLoss", (), dict(s=64, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.4))()
    assert fused_margin(filtered) == fused_margin(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.4))


@pytest.mark.parametrize("threshold, fused", [(0.4, 0.4), (0, None), (-0.3, None), (1.0, None), (2.0, None)])
def test_interclass_filtering_threshold_is_fused(threshold, fused):
    # insightface filters where the threshold is > 0; cosines never pass 1.
    margin, _ = fused_margin(CombinedMarginLoss(64, 1.0, 0.5, 0.0, threshold))
    assert margin.filter_threshold == fused


@pytest.mark.parametrize("margin_loss", [lambda logits, labels: logits, torch.nn.Identity()],
                         ids=["function", "module"])
def test_other_callables_raise(margin_loss):
    with pytest.raises(TypeError, match="cannot call a function on the logits"):
        PartialFC_V2(margin_loss, 4, 10)


@pytest.mark.parametrize("make, match", [
    (lambda: ArcFace(margin=3.2), "m2"),
    (lambda: CosFace(m=2.5), "m3"),
    (lambda: ArcFace(s=0), "scale"),
    (lambda: ArcFace(grad_mode="straight"), "grad_mode"),
])
def test_bad_margins_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- one process, no torch.distributed --------------------------------------------------------


def test_single_process_without_torch_distributed():
    # insightface asserts an initialised process group (insightface#1959, #2423) and a constant
    # batch size (#2015): neither here.
    assert not dist.is_initialized()
    torch.manual_seed(5)
    module = PartialFC_V2(ArcFace(), D, C, backend=BACKEND)
    torch.manual_seed(5)
    assert torch.equal(module.weight.detach(), torch.normal(0, 0.01, (C, D))), "not insightface's initialisation"
    assert (module.group, module.world_size, module.rank, module.class_start, module.num_local) == (LOCAL, 1, 0, 0, C)
    module.load_state_dict({"weight": full_weight(torch.float32)})
    x_all, labels_all, _ = step_inputs(0, 3, torch.float32)  # 11 rows, 2 of them -1
    for rows in (5, 2, 0, 11):  # a different batch size every step
        x, labels = x_all[:rows].clone().requires_grad_(True), labels_all[:rows]
        loss = module(x, labels)
        loss.backward()
        xr, wr = x.detach().double().requires_grad_(True), full_weight().requires_grad_(True)
        want = insightface_loss(xr, wr, labels, ArcFace()) if rows else (xr.sum() + wr.sum()) * 0
        want.backward()
        assert_rel(loss, want, 1e-5, f"{rows} rows: loss")
        assert_rel(x.grad, xr.grad, 1e-5, f"{rows} rows: dX")
        assert_rel(module.weight.grad, wr.grad, 1e-5, f"{rows} rows: dW")
        module.weight.grad = None
    assert torch.equal(module.full_weight(), module.weight.detach())


def test_fp16_is_the_half_gemm():
    # fp16=True: the fused call reads x and W rounded to half and computes in fp32, as
    # insightface's autocast linear; close to fp32 within half's rounding of the cosines.
    x, labels, _ = step_inputs(0, 1, torch.float32)
    w = full_weight(torch.float32)
    results = {}
    for fp16 in (False, True):
        module = PartialFC_V2(ArcFace(), D, C, fp16=fp16, backend=BACKEND)
        module.load_state_dict({"weight": w})
        given = x.clone().requires_grad_(True)
        loss = module(given, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and given.grad.dtype == module.weight.grad.dtype == torch.float32
        results[fp16] = loss.detach(), given.grad, module.weight.grad
    xr, wr = x.half().double().requires_grad_(True), w.half().double().requires_grad_(True)
    want = insightface_loss(xr, wr, labels, ArcFace())
    want.backward()
    assert_rel(results[True][0], want, 1e-5, "fp16 loss vs the math on half-rounded x and W")
    assert_rel(results[True][1], xr.grad, 2e-3, "fp16 dX (rounded to half) vs the math on half-rounded x and W")
    assert_rel(results[True][2], wr.grad, 2e-3, "fp16 dW (rounded to half) vs the math on half-rounded x and W")
    # Rounding x and W to half moves each cosine by at most about 2 * 2^-11 (a relative
    # 2^-11 on each vector), a logit by s times that, and the loss by at most twice that.
    assert abs(results[True][0] - results[False][0]) <= 2 * 64.0 * 2 * 2.0**-11


def test_sampling_single_process():
    # sample_rate < 1 in one process: the loss over the kept classes (every positive kept).
    x, labels, _ = step_inputs(0, 1, torch.float64)
    module = PartialFC_V2(CosFace(), D, C, sample_rate=0.5, backend=BACKEND).double()
    module.load_state_dict({"weight": full_weight()})
    torch.manual_seed(11)
    loss = module(x, labels)
    torch.manual_seed(11)
    kept, remapped = sample_classes(labels, C, 0.5)
    assert len(kept) < C
    assert_rel(loss, insightface_loss(x, full_weight()[kept], remapped, CosFace()), 1e-10, "sampled loss")


# ---- the example: train_v2's loop under torchrun ---------------------------------------------


@needs_gloo
def test_arcface_torch_swap_example_under_torchrun(tmp_path):
    # 2 ranks, 100 rows each of 200 images, batches of 64: the second step's batch is 36 rows.
    script = REPO / "examples" / "arcface_torch_swap.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "--steps", "3", "--num-image", "200", "--output", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 2/3  epoch 0  batch 36 per rank" in done.stdout and "step 3/3  epoch 1  batch 64" in done.stdout
    for rank in range(2):
        state = torch.load(tmp_path / f"checkpoint_gpu_{rank}.pt")["state_dict_softmax_fc"]
        assert list(state) == ["weight"] and state["weight"].shape == (50, 32)
    assert (tmp_path / "model.pt").exists()
