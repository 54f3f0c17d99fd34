"""The training step of PartialFC (fastmargin.distributed) at world 1, 2 and 3: gloo, CPU.

    python -m bench.bench_distributed [--worlds 1,2,3] [--batch 256] [--classes 10000]
                                      [--dim 512] [--steps 7] [--out DIR] [--no-csv]

One process per rank (torch.multiprocessing), gloo over a file store. Every rank holds
--batch rows and C/P classes: the global batch grows with the world (P·B rows), so each
rank's kernel does the same work, (P·B) x (C/P) x D, at every P; only the communication
grows. Each world also runs the step at C = P, one class a rank: the same communication
(it depends on B, D and P, never on C: bench/README.md) with next to no compute, the
step's floor.

ArcFace (m2 = 0.5, s = 64), fp32, backend 'cpu'. A step is a barrier, then forward (the
loss of the global batch) and backward; each phase's time is that of the slowest rank
(all-reduced with MAX), since no rank finishes a step before its collectives do. Median,
p20 and p80 over --steps steps after 2 warm-up steps.

The ranks share this machine's cores: each gets max(1, cores // P) torch threads. On a
2-core machine world 1 computes with 2 threads, world 2 with 1 thread a rank, and world 3
runs 3 one-thread ranks on 2 cores. So here the step time measures the cores, not the
scaling that P devices would show: what it does show is the communication floor.

The rows go to DIR/<device>.csv (the suite's file, bench/measure.py's columns): provider
`partial_fc:cpu:world<P>`, op `partial_fc`, B the rows per rank, C all the classes, modes
fwd, bwd and fwd_bwd, metric time (ms). The C = P floor is printed, not written.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmargin import profiling
from fastmargin.distributed import PartialFC

from . import measure
from .providers import Case
from .sweep import BENCH, csv_path

WARMUP = 2
MODES = ("fwd", "bwd", "fwd_bwd")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_rank(world: int) -> int:
    return max(1, cores() // world)


def time_steps(module: PartialFC, batch: int, dim: int, steps: int) -> dict[str, list[float]]:
    """ms per phase of each timed step, the slowest rank's."""
    x = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, module.num_classes, (batch,))
    samples = {mode: [] for mode in MODES}
    for step in range(WARMUP + steps):
        x.grad, module.weight.grad = None, None
        dist.barrier()
        start = time.perf_counter()
        loss = module(x, labels)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        phases = torch.tensor([middle - start, end - middle, end - start], dtype=torch.float64) * 1e3
        dist.all_reduce(phases, op=dist.ReduceOp.MAX)
        if step >= WARMUP:
            for mode, ms in zip(MODES, phases.tolist()):
                samples[mode].append(ms)
    return samples


def worker(rank: int, world: int, args: argparse.Namespace, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    torch.set_num_threads(threads_per_rank(world))
    torch.manual_seed(rank)
    results = {}
    for classes in (args.classes, world):
        module = PartialFC(classes, args.dim, scale=64.0, m2=0.5, backend="cpu")
        results[classes] = time_steps(module, args.batch, args.dim, args.steps)
    if rank == 0:
        Path(folder, "times.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict[int, dict[str, profiling.Stats]]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, args, folder), nprocs=world, join=True)
        times = json.loads(Path(folder, "times.json").read_text())
    return {int(c): {mode: profiling.Stats.of(ms) for mode, ms in phases.items()} for c, phases in times.items()}


def csv_rows(world: int, stats: dict[str, profiling.Stats], args: argparse.Namespace, env: dict) -> list[dict]:
    provider = SimpleNamespace(op="partial_fc", name=f"partial_fc:cpu:world{world}", backend="cpu",
                               loss_for=lambda case: "arcface")
    rows = measure.Rows(provider, Case(args.batch, args.classes, args.dim), env)
    for mode in MODES:
        s = stats[mode]
        rows.add(mode, "time", "ms", median=s.median, p20=s.p20, p80=s.p80, n=s.n, timer="perf_counter")
    return rows.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,3", help="comma-separated world sizes")
    parser.add_argument("--batch", type=int, default=256, help="rows per rank")
    parser.add_argument("--classes", type=int, default=10_000, help="all the classes, split across the ranks")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=7, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder of <device>.csv")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    cpu = torch.device("cpu")
    env = measure.environment(cpu)
    print(f"{env['device']}; B = {args.batch} rows per rank, C = {args.classes}, D = {args.dim}, fp32, "
          f"ArcFace, backend cpu; median ms (p20-p80) of {args.steps} steps")
    print(f"{'world':>5} {'threads/rank':>12} {'global B':>8} {'classes/rank':>12} "
          f"{'fwd':>8} {'bwd':>8} {'fwd+bwd':>18} {'floor C=P fwd+bwd':>18}")
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        start = time.monotonic()
        stats = run_world(world, args)
        main_stats, floor = stats[args.classes]["fwd_bwd"], stats[world]["fwd_bwd"]
        print(f"{world:>5} {threads_per_rank(world):>12} {world * args.batch:>8} "
              f"{-(-args.classes // world):>12} {stats[args.classes]['fwd'].median:>8.1f} "
              f"{stats[args.classes]['bwd'].median:>8.1f} "
              f"{main_stats.median:>8.1f} ({main_stats.p20:.3g}-{main_stats.p80:.3g}) "
              f"{floor.median:>8.1f} ({floor.p20:.3g}-{floor.p80:.3g})   [{time.monotonic() - start:.0f} s]",
              flush=True)
        rows += csv_rows(world, stats[args.classes], args, env)
    if not args.no_csv:
        path = csv_path(args.out, cpu)
        measure.write_csv(rows, path)
        print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
