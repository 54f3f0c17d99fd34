"""Class-parallel training (fastmargin.distributed, DESIGN §5) against the single-process loss.

gloo on the CPU, world sizes 1, 2 and 3 (4 under -m slow) spawned with torch.multiprocessing
on this machine. Spawning costs seconds (process start, torch import), so each world is
spawned once (a module-scoped fixture): every rank runs every case of CASES and the
checkpoint round trips, writes what it got to a file, and the parent process compares each
case with fastmargin.margin_cross_entropy on the concatenated batch and the full W, same
dtype and backend. Errors are relative per tensor, max|got - want| / max|want|; a failure
names the case, the world size and the worst index.

In-process (no spawn): class_range, sample_classes, the constructor's checks on a process
group of one, and PartialFC without a process group. Spawned apart: a rank that fails
surfaces as an error in bounded time, and examples/train_distributed.py under torchrun.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmargin
import fastmargin.adaptive
from fastmargin import backends, reference
from fastmargin.functional import margin_loss
from fastmargin.distributed import PartialFC, class_range, sample_classes

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

REPO = Path(__file__).resolve().parents[1]

# Relative error bound against the single-process loss of the same dtype and backend (#8).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# A collective that waits longer than this raises on its rank instead of hanging the run.
COLLECTIVE_TIMEOUT = timedelta(seconds=30)

CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "cpu") if backends.unavailable_reason(b, CPU) is None]


@dataclass(frozen=True)
class Case:
    """One loss evaluation. The global batch is `sizes[:world]` rows per rank, in rank order;
    rows listed in `ignored` (global indices) get ignore_index. labels='other_shard' puts
    every row's target on the next rank's shard. sample_rate < 1 samples negative classes
    (sampling_seed(rank) seeds each rank's draw); eval_mode turns sampling off."""

    name: str
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float64
    backend: str = "reference"
    sizes: tuple[int, ...] = (5, 3, 4, 2)
    labels: str = "random"
    ignored: tuple[int, ...] = ()
    C: int = 11
    D: int = 7
    sample_rate: float = 1.0
    eval_mode: bool = False
    seed: int = 0
    schedule: tuple[str, dict] | None = None  # a fastmargin.adaptive schedule: (class name, kwargs)
    unit_norms: bool = False  # the rows handed over as x / ||x||, with their norms (AdaFace's convention)

    def sampling_seed(self, rank: int) -> int:
        return 1000 * self.seed + rank


# Keyword arguments shared by PartialFC and fastmargin.margin_cross_entropy (m2 is always
# given: their defaults differ), and what else each case changes.
ARC = dict(scale=16.0, m2=0.5)
OPTION_SETS = {
    "arcface": dict(options=ARC),
    "cosface": dict(options=dict(scale=16.0, m2=0.0, m3=0.35)),
    "combined": dict(options=dict(scale=16.0, m1=0.9, m2=0.4, m3=0.15)),
    "sphereface-lambda": dict(options=dict(scale=1.0, m2=0.0, sphere_m=4, sphere_lambda=5.0)),
    "arcface-detached-clamp": dict(options=dict(ARC, grad_mode="detached", theta_policy="clamp")),
    "subcenters": dict(options=dict(ARC, sub_centers=3)),
    "smoothing-ignored": dict(options=dict(ARC, label_smoothing=0.1), ignored=(0, 4)),
    "ignore-index-minus-1": dict(options=dict(ARC, ignore_index=-1), ignored=(1,)),
    "other-shard": dict(options=ARC, labels="other_shard"),
    "empty-rank": dict(options=ARC, sizes=(6, 0, 2, 3)),
    "sum": dict(options=dict(ARC, reduction="sum")),
    "none": dict(options=dict(ARC, reduction="none", label_smoothing=0.2), ignored=(2,)),
    "everything": dict(options=dict(scale=16.0, m1=0.9, m2=0.4, m3=0.15, sub_centers=3, label_smoothing=0.1),
                       labels="other_shard", sizes=(2, 7, 0, 4), ignored=(1,)),
    "ragged": dict(options=ARC, sizes=(13, 11, 13, 9), C=1001, D=67),
    # Sampling: ceil(0.999 * C_local) is every class, through the sampling code; 0.5 drops
    # some negatives; 0.05 keeps the positives only.
    "sample-all": dict(options=dict(ARC, sub_centers=2), sample_rate=0.999),
    "sample-half": dict(options=ARC, C=40, sample_rate=0.5, seed=1),
    "sample-positives": dict(options=dict(ARC, sub_centers=2, label_smoothing=0.1), C=40, sample_rate=0.05,
                             ignored=(3,), seed=2),
    "sample-eval": dict(options=ARC, C=40, sample_rate=0.5, eval_mode=True),
}
# Margins made every step from the global batch (fastmargin.adaptive), over SCHEDULE_STEPS
# steps: the statistics they keep and the margins they draw must be the global batch's.
SCHEDULES = {
    "adaface": dict(schedule=("AdaFace", dict(t_alpha=0.5, s=16.0)), ignored=(2,)),
    "adaface-norms": dict(schedule=("AdaFace", dict(t_alpha=0.5, s=16.0)), unit_norms=True),
    "elastic-arc-plus": dict(schedule=("ElasticArc", dict(s=16.0, std=0.05, plus=True)), labels="other_shard"),
    "elastic-cos": dict(schedule=("ElasticCos", dict(s=16.0, std=0.05)), options=dict(sub_centers=2)),
    "magface": dict(schedule=("MagFace", dict(scale=16.0, l_a=1.0, u_a=5.0, easy_margin=False))),
    "curricular": dict(schedule=("Curricular", dict(s=16.0)), ignored=(1,), sizes=(6, 0, 5, 3)),
}
SCHEDULE_STEPS = 2
CASES = [Case(f"{name}-{'fp64' if dtype == torch.float64 else 'fp32'}-{backend}", dtype=dtype, backend=backend,
              **spec)
         for name, spec in OPTION_SETS.items() for dtype in (torch.float64, torch.float32) for backend in BACKENDS]
CASES += [Case(f"{name}-fp64-{backend}", backend=backend, **spec) for name, spec in SCHEDULES.items()
          for backend in BACKENDS]

WORLD_SIZES = [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)]


# ---- inputs and the single-process answer -------------------------------------------------


def inputs(case: Case, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(X (B, D), W (C*K, D), labels (B,), rows per rank), the same in every process."""
    gen = torch.Generator().manual_seed(case.seed)
    sizes = list(case.sizes[:world])
    k = case.options.get("sub_centers", 1)
    x = torch.randn(sum(sizes), case.D, generator=gen, dtype=torch.float64)
    w = torch.randn(case.C * k, case.D, generator=gen, dtype=torch.float64)
    if case.labels == "other_shard":
        ranges = [class_range(case.C, (r + 1) % world, world) for r in range(world)]
        y = torch.cat([torch.randint(*ranges[r], (n,), generator=gen) for r, n in enumerate(sizes)])
    else:
        y = torch.randint(0, case.C, (sum(sizes),), generator=gen)
    y[list(case.ignored)] = case.options.get("ignore_index", -100)
    return x.to(case.dtype), w.to(case.dtype), y, sizes


def upstream(case: Case, batch: int) -> torch.Tensor | None:
    """reduction='none' backpropagates a different weight per row; the others a scalar 1."""
    if case.options.get("reduction") != "none":
        return None
    return torch.linspace(0.5, 1.5, batch, dtype=case.dtype)


def kept_classes(case: Case, labels: torch.Tensor, world: int) -> torch.Tensor:
    """The classes every rank's sampling keeps, as global indices: sample_classes on each
    shard's labels with the generator state each rank's global RNG had (sampling_seed)."""
    valid = labels != case.options.get("ignore_index", -100)
    kept = []
    for rank in range(world):
        start, end = class_range(case.C, rank, world)
        local = torch.where(valid & (labels >= start) & (labels < end), labels - start, -1)
        gen = torch.Generator().manual_seed(case.sampling_seed(rank))
        kept.append(start + sample_classes(local, end - start, case.sample_rate, generator=gen)[0])
    return torch.cat(kept)


def make_schedule(case: Case, rank: int) -> torch.nn.Module:
    """The case's schedule; ElasticFace's draws seeded differently on every rank (the module
    must hand out rank 0's)."""
    name, kwargs = case.schedule
    if name.startswith("Elastic"):
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(500 + rank))
    return getattr(fastmargin.adaptive, name)(**kwargs)


def step_inputs(case: Case, world: int, step: int):
    """inputs() of a schedule case's step (a fresh batch each step), and the norms handed
    over with unit rows (None otherwise)."""
    x, w, y, sizes = inputs(dataclasses.replace(case, seed=case.seed + 10 * step), world)
    if not case.unit_norms:
        return x, w, y, sizes, None
    norms = x.norm(dim=1) * 4.0  # AdaFace's norms: any positive numbers beside the unit rows
    return x / x.norm(dim=1, keepdim=True), w, y, sizes, norms


def scheduled_single_process(case: Case, world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step, (loss, dX, dW) of the schedule's margin on the whole batch and W, through
    fastmargin.functional.margin_loss, with its extra term; one schedule over the steps."""
    schedule = make_schedule(case, rank=0).to(case.dtype)  # its buffers, as PartialFC's .to(dtype) casts them
    ignore_index = case.options.get("ignore_index", -100)
    _, w0, _, _, _ = step_inputs(case, world, 0)  # W stays step 0's: no optimizer steps between
    results = []
    for step in range(SCHEDULE_STEPS):
        x, _, y, _, norms = step_inputs(case, world, step)
        x.requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        k = case.options.get("sub_centers", 1)
        rows = torch.where(y != ignore_index, y, -1)
        target_cos = reference.target_cosines(x, w, rows, k) if schedule.needs_target_cos else None
        margin, extra = schedule.step(x, rows, target_cos, norms)
        loss, _ = margin_loss(x, w, y, margin, schedule.scale, sub_centers=k, backend=case.backend,
                              target_cos=target_cos)
        loss = loss if extra is None else loss + extra
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    return results


def single_process(case: Case, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dX, dW) of fastmargin.margin_cross_entropy on the whole batch and W; with
    sampling, on the rows of W of the kept classes, labels renumbered into them."""
    x, w, y, _ = inputs(case, world)
    x.requires_grad_(True)
    w.requires_grad_(True)
    weight, labels = w, y
    if case.sample_rate < 1.0 and not case.eval_mode:
        kept = kept_classes(case, y, world)
        k = case.options.get("sub_centers", 1)
        weight = w.view(case.C, k, case.D)[kept].reshape(-1, case.D)
        valid = y != case.options.get("ignore_index", -100)
        assert torch.isin(y[valid], kept).all(), f"{case.name}: a positive class was not kept"
        labels = torch.where(valid, torch.searchsorted(kept, y), y)
    loss = fastmargin.margin_cross_entropy(x, weight, labels, backend=case.backend, **case.options)
    loss.backward(upstream(case, len(y)))
    return loss.detach(), x.grad, w.grad


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max|got - want| <= tol * max|want|; on failure the worst index and both values."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    if not want.numel():
        return
    scale = want.abs().max().item()
    err = torch.nan_to_num((got - want).abs(), nan=math.inf)
    worst = int(err.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), want.shape))
    rel = err.flatten()[worst].item() / scale if scale else err.flatten()[worst].item()
    assert rel <= tol, (f"{what}: relative error {rel:.3g} > {tol:g} (to max|want| = {scale:.3g}) at index "
                        f"{index}: got {got.flatten()[worst].item()!r}, expected {want.flatten()[worst].item()!r}")


# ---- what each rank runs ------------------------------------------------------------------


def run_scheduled_case(case: Case, rank: int, world: int) -> dict:
    """SCHEDULE_STEPS steps of PartialFC with the case's schedule; per step the loss, this
    rank's dX and its shard's dW."""
    _, w, _, _, _ = step_inputs(case, world, 0)
    module = PartialFC(case.C, case.D, backend=case.backend, margin_schedule=make_schedule(case, rank),
                       **case.options)
    module.to(case.dtype).load_full_weight(w)
    steps = []
    for step in range(SCHEDULE_STEPS):
        x_all, _, y_all, sizes, norms = step_inputs(case, world, step)
        start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
        x = x_all[start:end].clone().requires_grad_(True)
        module.weight.grad = None
        loss = module(x, y_all[start:end], None if norms is None else norms[start:end])
        loss.backward()
        steps.append({"loss": loss.detach(), "dx": x.grad, "dw": module.weight.grad.clone()})
    return {"steps": steps, "range": (module.class_start, module.class_end)}


def run_case(case: Case, rank: int, world: int) -> dict:
    if case.schedule is not None:
        return run_scheduled_case(case, rank, world)
    x_all, w, y_all, sizes = inputs(case, world)
    start = sum(sizes[:rank])
    x = x_all[start : start + sizes[rank]].clone().requires_grad_(True)
    module = PartialFC(case.C, case.D, sample_rate=case.sample_rate, backend=case.backend, **case.options)
    module.to(case.dtype).load_full_weight(w)
    module.train(not case.eval_mode)
    torch.manual_seed(case.sampling_seed(rank))
    loss = module(x, y_all[start : start + sizes[rank]])
    loss.backward(upstream(case, len(y_all)))
    return {"loss": loss.detach(), "dx": x.grad, "dw": module.weight.grad,
            "range": (module.class_start, module.class_end)}


CHECKPOINT = dict(C=11, D=5, K=3)


def checkpoints(rank: int, world: int, out: Path) -> dict:
    """Each rank: a shard of its own random init saved and loaded into a fresh module
    (strict), the full W gathered on rank 0, reloaded into shards, and the errors."""
    c, d, k = CHECKPOINT["C"], CHECKPOINT["D"], CHECKPOINT["K"]
    torch.manual_seed(100 + rank)  # every shard a different init, so a mix-up shows
    module = PartialFC(c, d, sub_centers=k)
    torch.save(module.state_dict(), out / f"shard{rank}.pt")
    fresh = PartialFC(c, d, sub_centers=k)
    fresh.load_state_dict(torch.load(out / f"shard{rank}.pt"), strict=True)
    full = module.full_weight()
    if rank == 0:
        torch.save(full, out / "full.pt")
    dist.barrier()
    restored = PartialFC(c, d, sub_centers=k)
    restored.load_full_weight(torch.load(out / "full.pt"))
    facts = {"shard": module.weight.detach(), "fresh": fresh.weight.detach(), "full": full,
             "restored": restored.weight.detach(), "keys": sorted(module.state_dict())}
    try:
        restored.load_full_weight(torch.zeros(c * k + 1, d))
    except ValueError as error:
        facts["bad_shape"] = str(error)
    if world > 1:
        try:
            PartialFC(world - 1, d)
        except ValueError as error:
            facts["too_few_classes"] = str(error)
    return facts


def run_rank(rank: int, world: int, out: Path, cases, run_case, checkpoints) -> None:
    """One rank of a gloo world: run_case(case, rank, world) for each case, then
    checkpoints(rank, world, out), their results (or the first traceback) saved for the parent."""
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)  # up to 4 ranks share the machine's cores
    results = {}
    for case in cases:
        try:
            results[case.name] = run_case(case, rank, world)
        except Exception:  # noqa: BLE001 - recorded for the parent; later collectives would be out of step
            results[case.name] = traceback.format_exc()
            break
    else:
        results["checkpoints"] = checkpoints(rank, world, out)
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def worker(rank: int, world: int, out: str, cases: list[Case]) -> None:
    run_rank(rank, world, Path(out), cases, run_case, checkpoints)


@dataclass
class World:
    size: int
    ranks: list[dict]  # per rank: case name -> its results (or the traceback of its failure)

    def results(self, name: str) -> list[dict]:
        for rank, result in enumerate(self.ranks):
            value = result.get(name, "not run: an earlier case failed on this rank")
            if not isinstance(value, dict):
                pytest.fail(f"world {self.size}, rank {rank}, {name}: {value}")
        return [result[name] for result in self.ranks]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda p: f"world{p}")
def world(request, tmp_path_factory) -> World:
    size = request.param
    out = tmp_path_factory.mktemp(f"world{size}")
    mp.spawn(worker, args=(size, str(out), CASES), nprocs=size, join=True)
    return World(size, [torch.load(out / f"rank{r}.pt") for r in range(size)])


# ---- the spawned worlds against the single process -----------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(world, case):
    results = world.results(case.name)
    if case.schedule is None:
        steps, wants = [results], [single_process(case, world.size)]
    else:
        steps = [[r["steps"][step] | {"range": r["range"]} for r in results] for step in range(SCHEDULE_STEPS)]
        wants = scheduled_single_process(case, world.size)
    k = case.options.get("sub_centers", 1)
    for step, (got, (loss, dx, dw)) in enumerate(zip(steps, wants)):
        tol, what = TOL[case.dtype], f"world {world.size}, {case.name}, step {step}"
        for rank, r in enumerate(got):
            assert r["range"] == class_range(case.C, rank, world.size), f"{what}: rank {rank} holds {r['range']}"
            assert_rel(r["loss"], loss, tol, f"{what}: loss on rank {rank}")
            assert_rel(r["dw"], dw[r["range"][0] * k : r["range"][1] * k], tol, f"{what}: dW of rank {rank}'s shard")
        assert_rel(torch.cat([r["dx"] for r in got]), dx, tol, f"{what}: dX, every rank's rows")


def test_sampling_drops_negatives(world):
    # The sampled cases compare with a smaller softmax than the full one: some classes are
    # dropped, and without smoothing the loss is below the full loss.
    for case in CASES:
        if case.sample_rate > 0.5 or case.eval_mode:
            continue
        x, w, y, _ = inputs(case, world.size)
        assert len(kept_classes(case, y, world.size)) < case.C, case.name
        if not case.options.get("label_smoothing"):
            full = fastmargin.margin_cross_entropy(x, w, y, backend=case.backend, **case.options)
            assert world.results(case.name)[0]["loss"] < full, case.name


def test_state_dict_round_trip(world):
    facts = world.results("checkpoints")
    c, k = CHECKPOINT["C"], CHECKPOINT["K"]
    for rank, f in enumerate(facts):
        start, end = class_range(c, rank, world.size)
        assert f["keys"] == ["weight"]
        assert f["shard"].shape == ((end - start) * k, CHECKPOINT["D"])
        assert torch.equal(f["fresh"], f["shard"]), f"rank {rank}: the loaded shard differs from the saved one"


def test_full_weight_on_rank_zero(world):
    facts = world.results("checkpoints")
    assert all(f["full"] is None for f in facts[1:])
    assert torch.equal(facts[0]["full"], torch.cat([f["shard"] for f in facts]))


def test_load_full_weight_round_trip(world):
    for rank, f in enumerate(world.results("checkpoints")):
        assert torch.equal(f["restored"], f["shard"]), f"rank {rank}"


def test_load_full_weight_bad_shape_raises(world):
    c, d, k = CHECKPOINT["C"], CHECKPOINT["D"], CHECKPOINT["K"]
    for f in world.results("checkpoints"):
        assert f["bad_shape"] == f"full weight has shape ({c * k + 1}, {d}), expected ({c * k}, {d})"


def test_fewer_classes_than_ranks_raises(world):
    if world.size == 1:
        pytest.skip("a world of one has enough ranks for any class count")
    for f in world.results("checkpoints"):
        assert "every rank needs a class" in f["too_few_classes"]


# ---- a failing rank -----------------------------------------------------------------------


def failing_worker(rank: int, world: int, out: str, failure: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=5))
    module = PartialFC(8, 4)
    if rank == 1 and failure == "raises":
        raise RuntimeError("rank 1 fails on purpose")
    if rank == 1:
        time.sleep(120)  # stalls: rank 0's collective times out first
    module(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))  # rank 0 waits here for rank 1


@pytest.mark.parametrize("failure, message", [
    ("raises", "rank 1 fails on purpose"),
    pytest.param("stalls", "(?i)timed out|timeout", marks=pytest.mark.slow),
])
def test_failing_rank_surfaces_in_bounded_time(tmp_path, failure, message):
    # mp.spawn ends the other ranks once one fails; a stalled rank makes its peers' collective
    # time out (the process group's timeout), which fails them.
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=message):
        mp.spawn(failing_worker, args=(2, str(tmp_path), failure), nprocs=2, join=True)
    assert time.monotonic() - start < 60


# ---- in-process: no spawn -----------------------------------------------------------------


@pytest.mark.parametrize("num_classes, world_size, ranges", [
    (10, 3, [(0, 4), (4, 7), (7, 10)]),
    (11, 3, [(0, 4), (4, 8), (8, 11)]),
    (12, 3, [(0, 4), (4, 8), (8, 12)]),
    (5, 1, [(0, 5)]),
    (2, 2, [(0, 1), (1, 2)]),
    (2_000_003, 8, [(0, 250_001), (250_001, 500_002), (500_002, 750_003)] + [
        (750_003 + 250_000 * i, 1_000_003 + 250_000 * i) for i in range(5)]),
])
def test_class_range_by_hand(num_classes, world_size, ranges):
    assert [class_range(num_classes, r, world_size) for r in range(world_size)] == ranges


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8, 64])
def test_class_range_covers_every_class_once(world_size):
    for num_classes in [world_size, world_size + 1, 2 * world_size - 1, 1000, 93_431]:
        ranges = [class_range(num_classes, r, world_size) for r in range(world_size)]
        assert [s for s, _ in ranges[1:]] == [e for _, e in ranges[:-1]], "ranges must abut"
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        counts = [e - s for s, e in ranges]
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_sample_classes_by_hand():
    labels = torch.tensor([3, -1, 3, 0])
    kept, remapped = sample_classes(labels, 5, 1.0)
    assert kept.tolist() == [0, 1, 2, 3, 4] and remapped.tolist() == [3, -1, 3, 0]
    # ceil(0.2 * 5) = 1 class wanted, 2 positives: exactly the positives survive.
    kept, remapped = sample_classes(labels, 5, 0.2)
    assert kept.tolist() == [0, 3] and remapped.tolist() == [1, -1, 1, 0]


@pytest.mark.parametrize("num_local", [1, 7, 100])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_sample_classes_keeps_every_positive(num_local, rate):
    gen = torch.Generator().manual_seed(num_local)
    for batch in [0, 1, 3, 20, 64]:
        labels = torch.randint(-1, num_local, (batch,), generator=gen)
        kept, remapped = sample_classes(labels, num_local, rate, generator=gen)
        has_target = labels >= 0
        positives = labels[has_target].unique()
        assert torch.isin(positives, kept).all()
        assert len(kept) == max(len(positives), math.ceil(rate * num_local))
        assert (kept.diff() > 0).all() and 0 <= kept.min() and kept.max() < num_local
        assert torch.equal(kept[remapped[has_target]], labels[has_target]), "remapped labels point elsewhere"
        assert (remapped[~has_target] == -1).all()


def test_sample_classes_draws_negatives_uniformly():
    # 10 classes, positive 0, rate 0.5: 4 of the 9 negatives a draw, each kept with p = 4/9.
    gen = torch.Generator().manual_seed(0)
    draws = 900
    counts = torch.zeros(10)
    for _ in range(draws):
        counts[sample_classes(torch.tensor([0]), 10, 0.5, generator=gen)[0]] += 1
    assert counts[0] == draws
    sd = math.sqrt(draws * 4 / 9 * 5 / 9)
    assert ((counts[1:] - draws * 4 / 9).abs() < 5 * sd).all(), counts.tolist()


def test_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        PartialFC(10, 4)


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sample_rate=0.0), ValueError, r"sample_rate=0\.0 must be in \(0, 1\]"),
    (dict(sample_rate=1.5), ValueError, r"sample_rate=1\.5 must be in \(0, 1\]"),
    (dict(num_classes=0), ValueError, "num_classes must be an integer >= 1"),
    (dict(sub_centers=0), ValueError, "sub_centers must be an integer >= 1"),
    (dict(m2=0.5, sphere_m=4), ValueError, "SphereFace"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
])
def test_constructor_checks(group_of_one, kwargs, error, match):
    kwargs = {"num_classes": 10, "embedding_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        PartialFC(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_global_batch(group_of_one, backend):
    # No rows anywhere: 'mean' is 0 with zero gradients, as in the single-process loss.
    module = PartialFC(10, 4, backend=backend)
    x = torch.randn(0, 4, requires_grad=True)
    loss = module(x, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 4)
    assert torch.equal(module.weight.grad, torch.zeros(10, 4))


def test_forward_checks_global_label_range(group_of_one):
    # Labels are checked against every class, not the shard's: 9 is fine, 10 is not.
    module = PartialFC(10, 4)
    module(torch.randn(2, 4), torch.tensor([9, 0]))
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
        module(torch.randn(2, 4), torch.tensor([9, 10]))


# ---- the example under torchrun ----------------------------------------------------------


def train_distributed(nproc: int | None, *args: str) -> str:
    """Runs examples/train_distributed.py, under torchrun with nproc ranks (directly: None);
    returns what it printed."""
    script = [str(REPO / "examples" / "train_distributed.py"), *args]
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launcher, *script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_train_distributed_example_under_torchrun(tmp_path):
    out = train_distributed(2, "--steps", "4", "--log-every", "2", "--out", str(tmp_path))
    assert "step 4/4" in out
    shards = [torch.load(tmp_path / f"partial_fc_rank{r}.pt") for r in range(2)]
    assert [s["class_range"] for s in shards] == [(0, 50), (50, 100)]
    full = torch.load(tmp_path / "partial_fc_full.pt")
    assert torch.equal(full["weight"], torch.cat([s["state_dict"]["weight"] for s in shards]))


@pytest.mark.slow
def test_train_distributed_example_resumes_at_another_world_size(tmp_path):
    train_distributed(2, "--steps", "2", "--sub-centers", "2", "--sample-rate", "0.5", "--out", str(tmp_path / "a"))
    out = train_distributed(None, "--steps", "2", "--sub-centers", "2", "--resume", str(tmp_path / "a"),
                            "--out", str(tmp_path / "b"))
    assert "the full W, split for this world size" in out
    out = train_distributed(None, "--steps", "1", "--sub-centers", "2", "--resume", str(tmp_path / "b"))
    assert "resumed from" in out and "the shards" in out
