"""Train an embedding network with the classifier split by class across ranks (PartialFC).

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --steps 20 --out /tmp/pfc
    python examples/train_distributed.py --steps 20        # a world of one, no torchrun needed

Synthetic identities stand in for faces: identity c is a fixed random point in a 64-D input
space and its samples are that point plus noise. Each rank draws its own batches, so a row's
target may live on any rank's shard of W. The backbone (a small MLP) is replicated under
DistributedDataParallel; fastmargin.distributed.PartialFC holds this rank's classes of W
(docs/design.md §6). One SGD optimizer updates both: the backbone's replicated parameters and the
shard, which no other rank has.

At the end every rank saves its shard (DIR/partial_fc_rank<r>.pt); rank 0 saves the
backbone (DIR/backbone.pt) and the full W gathered from the shards (DIR/partial_fc_full.pt),
and scores that exported model: closed-set accuracy on fresh samples, the nearest class by
cosine. --resume DIR continues from such a folder: from the shards at the same world size,
else from the full W, split anew for this world size (the optimizer restarts).

gloo on the CPU; NCCL with one GPU per rank (LOCAL_RANK) when CUDA is visible.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fastmargin.distributed import PartialFC

INPUT_SIZE = 64
NOISE = 1.0  # the identities' points have norm about 8: classes overlap little but not nothing
EVAL_SAMPLES = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=100, help="identities, split across the ranks")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--sub-centers", type=int, default=1)
    parser.add_argument("--scale", type=float, default=32.0)
    parser.add_argument("--margin", type=float, default=0.3, help="ArcFace's additive angle m2, radians")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="PartialFC's negative sampling; 1: exact")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--backend", default="auto", help="fastmargin backend on each shard")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for the checkpoints and the exported W")
    parser.add_argument("--resume", type=Path, help="a folder written by --out")
    return parser.parse_args(argv)


def init_distributed(device_kind: str) -> torch.device:
    """The process group (NCCL on CUDA, gloo on the CPU) and this rank's device. Under
    torchrun the environment says where to meet; run directly, a group of one needs only a
    store of its own."""
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        store = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    # The ranks on this machine share its cores.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return torch.device("cpu")


def identities(num_classes: int, seed: int) -> torch.Tensor:
    """(C, INPUT_SIZE): the same points on every rank."""
    return torch.randn(num_classes, INPUT_SIZE, generator=torch.Generator().manual_seed(seed))


def draw(points: torch.Tensor, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(points), (batch,), generator=gen)
    return points[labels] + NOISE * torch.randn(batch, points.shape[1], generator=gen), labels


def backbone(embedding_size: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(INPUT_SIZE, 128), torch.nn.ReLU(), torch.nn.Linear(128, embedding_size))


def resume(folder: Path, net: torch.nn.Module, partial_fc: PartialFC, rank: int, world: int) -> str:
    net.load_state_dict(torch.load(folder / "backbone.pt"))
    path = folder / f"partial_fc_rank{rank}.pt"
    shard = torch.load(path) if path.exists() else None
    if shard is not None and shard["world_size"] == world:
        partial_fc.load_state_dict(shard["state_dict"])
        return "the shards"
    # Memory-mapped: each rank reads only its own rows of the file.
    partial_fc.load_full_weight(torch.load(folder / "partial_fc_full.pt", mmap=True)["weight"])
    return "the full W, split for this world size"


def save(folder: Path, net: torch.nn.Module, partial_fc: PartialFC, rank: int, world: int) -> torch.Tensor | None:
    """Every rank's shard, then (rank 0) the backbone and the full W. Returns the full W on
    rank 0. full_weight() is a collective: every rank calls it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": partial_fc.state_dict(), "rank": rank, "world_size": world,
                "class_range": (partial_fc.class_start, partial_fc.class_end),
                "num_classes": partial_fc.num_classes, "sub_centers": partial_fc.sub_centers},
               folder / f"partial_fc_rank{rank}.pt")
    full = partial_fc.full_weight()
    if rank == 0:
        torch.save(net.state_dict(), folder / "backbone.pt")
        torch.save({"weight": full.cpu(), "num_classes": partial_fc.num_classes,
                    "sub_centers": partial_fc.sub_centers}, folder / "partial_fc_full.pt")
    return full


@torch.no_grad()
def closed_set_accuracy(net: torch.nn.Module, full_weight: torch.Tensor, points: torch.Tensor,
                        sub_centers: int, seed: int) -> float:
    """The nearest class by cosine (the best of its sub-centers) on fresh samples."""
    x, labels = draw(points, EVAL_SAMPLES, torch.Generator().manual_seed(seed))
    device = full_weight.device
    cos = F.normalize(net(x.to(device)), dim=1) @ F.normalize(full_weight, dim=1).t()
    predicted = cos.view(len(x), -1, sub_centers).amax(dim=2).argmax(dim=1)
    return (predicted.cpu() == labels).double().mean().item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()

    points = identities(args.classes, args.seed)
    torch.manual_seed(args.seed)  # the same backbone on every rank (DDP also broadcasts rank 0's)
    net = backbone(args.embedding_size).to(device)
    torch.manual_seed(args.seed + 1 + rank)  # a different init for every shard
    partial_fc = PartialFC(args.classes, args.embedding_size, scale=args.scale, m2=args.margin,
                           sub_centers=args.sub_centers, sample_rate=args.sample_rate,
                           backend=args.backend).to(device)
    if args.resume:
        source = resume(args.resume, net, partial_fc, rank, world)
        if rank == 0:
            print(f"resumed from {args.resume}: {source}")
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # The shard is this rank's alone: it stays out of DDP, whose all-reduce would average
    # different classes' rows.
    optimizer = torch.optim.SGD([*model.parameters(), *partial_fc.parameters()], lr=args.lr,
                                momentum=0.9, weight_decay=5e-4)
    if rank == 0:
        print(f"world {world} ({dist.get_backend()}, {device.type}), {args.classes} classes, "
              f"rank 0 holds [{partial_fc.class_start}, {partial_fc.class_end}), "
              f"{args.batch_size} rows per rank and step, sample rate {args.sample_rate}")

    gen = torch.Generator().manual_seed(1000 * args.seed + rank)  # each rank its own batches
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, labels = draw(points, args.batch_size, gen)
        loss = partial_fc(model(x.to(device)), labels.to(device))  # the global batch's loss, on every rank
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % args.log_every == 0 or step in (1, args.steps)):
            ms = (time.perf_counter() - start) / step * 1e3
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {ms:.0f} ms/step", flush=True)

    if args.out:
        full = save(args.out, net, partial_fc, rank, world)
        if rank == 0:
            accuracy = closed_set_accuracy(net, full, points, args.sub_centers, seed=args.seed + 12345)
            print(f"saved {world} shard(s), the backbone and the full W {tuple(full.shape)} to {args.out}; "
                  f"closed-set accuracy of the exported model on {EVAL_SAMPLES} fresh samples: {accuracy:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
