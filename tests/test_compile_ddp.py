"""Training steps through torch.compile(fullgraph=True) with each drop-in module, and through
DistributedDataParallel wrapping a model plus a drop-in loss on gloo.

Compile: a backbone and a loss module, the forward compiled with fullgraph=True (no graph
break), backward and an SGD step eager; loss, every gradient and the parameters after two
steps equal the eager run's (float64, 1e-12 relative). The default run uses backend='auto'
(the fused 'cpu' kernel here), -m slow adds every other usable backend.
SphereFaceLoss(annealing=True) is left out: it reads its iteration counter on the host
(docs/errors.md), which fullgraph=True refuses.

DDP: two gloo processes, each with half of the batch, a model holding the backbone and an
ArcFaceLoss (its W among the model's parameters, so DDP averages its gradient). After two
SGD steps every rank's parameters equal a single process's on the whole batch (the mean of
the ranks' mean losses is the whole batch's mean: equal halves), float64, 1e-12.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmargin
from helpers import assert_close, assert_rel, usable_backends

CPU_BACKENDS = [name for name, device in usable_backends() if device.type == "cpu"]

MODULES = {
    "arcface": lambda b: fastmargin.ArcFaceLoss(11, 16, backend=b),
    "cosface": lambda b: fastmargin.CosFaceLoss(11, 16, backend=b),
    "sphereface": lambda b: fastmargin.SphereFaceLoss(11, 16, scale=2.0, backend=b),
    "subcenter": lambda b: fastmargin.SubCenterArcFaceLoss(11, 16, backend=b, label_smoothing=0.1),
    "combined": lambda b: fastmargin.CombinedMarginLoss(32.0, 1.1, 0.3, 0.1, num_classes=11, embedding_size=16,
                                                         backend=b),
}


class Model(torch.nn.Module):
    """A backbone and a drop-in loss, one module: what DDP wraps."""

    def __init__(self, loss):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        self.loss = loss

    def forward(self, x, y):
        return self.loss(self.backbone(x), y)


def batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (n,), generator=g)
    return x, y


def train(model, step, steps=2):
    """Losses, gradients after each step, and the parameters after `steps` SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    record = []
    for _ in range(steps):
        opt.zero_grad()
        loss = step(x, y)
        loss.backward()
        record.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record, [p.detach().clone() for p in model.parameters()]


def compile_case(name, backend):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = Model(MODULES[name](backend)).double()
        step = torch.compile(model, fullgraph=True) if compiled else model
        results.append(train(model, step))
    (eager, eager_params), (comp, comp_params) = results
    for i, ((le, ge), (lc, gc)) in enumerate(zip(eager, comp)):
        assert_rel(lc, le, 1e-12, f"{name} {backend} step {i}: compiled loss")
        for j, (a, b) in enumerate(zip(gc, ge)):
            assert_rel(a, b, 1e-12, f"{name} {backend} step {i}: compiled gradient of parameter {j}")
    for j, (a, b) in enumerate(zip(comp_params, eager_params)):
        assert_rel(a, b, 1e-12, f"{name} {backend}: parameter {j} after the compiled steps")


@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_training_step(name):
    compile_case(name, "auto")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "cpu"])
@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_training_step_every_backend(name, backend):
    compile_case(name, backend)


# ---------------------------------------------------------------- DDP on gloo

WORLD = 2


def ddp_worker(rank, out, backends):
    out = Path(out)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    try:
        for backend in backends:
            torch.manual_seed(0)
            model = Model(fastmargin.ArcFaceLoss(11, 16, backend=backend)).double()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            x, y = batch()
            half = len(y) // WORLD
            mine = slice(rank * half, (rank + 1) * half)
            record, params = train(ddp, lambda x_, y_: ddp(x[mine], y[mine]))
            results[backend] = params
    except Exception:  # noqa: BLE001 - reported by the parent
        results["error"] = traceback.format_exc()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_ddp_with_a_drop_in_loss(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path), CPU_BACKENDS), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, result in enumerate(ranks):
        assert "error" not in result, f"rank {r}: {result['error']}"
    for backend in CPU_BACKENDS:
        torch.manual_seed(0)
        model = Model(fastmargin.ArcFaceLoss(11, 16, backend=backend)).double()
        _, want = train(model, model)
        for r, result in enumerate(ranks):
            for j, (a, b) in enumerate(zip(result[backend], want)):
                assert_close(a, b, atol=1e-12 * b.abs().max().item(), what=f"{backend}, rank {r}: parameter {j}")
