"""insightface arcface_torch's train_v2.py loop on fastmargin: one import line changed.

    torchrun --standalone --nproc_per_node=2 examples/arcface_torch_swap.py --steps 20
    python examples/arcface_torch_swap.py --steps 20     # one process, no process group

What is train_v2's here: the process group from torchrun's environment; the backbone under
DistributedDataParallel; CombinedMarginLoss(64, *margin_list, interclass_filtering_threshold)
handed to PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, False); one SGD
over the backbone's and the partial FC's parameter groups; clip_grad_norm_(backbone, 5); each
rank's checkpoint_gpu_{rank}.pt with the partial FC's state_dict, and model.pt on rank 0.

What is not: the data and the network (synthetic identities, each a fixed point in a 64-D
input space plus noise, and a small MLP, so that nothing is downloaded), the learning-rate
schedule, fp16 with GradScaler, DALI, verification and logging callbacks.

What fastmargin adds: the last batch of an epoch may be short (drop_last=False; insightface
asserts a constant batch size), and run without torchrun the script needs no process group
(insightface initialises one even for a single GPU).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

# insightface:  from losses import CombinedMarginLoss
#               from partial_fc_v2 import PartialFC_V2
from fastmargin.insightface import CombinedMarginLoss, PartialFC_V2

INPUT_SIZE = 64


def get_config(args: argparse.Namespace) -> SimpleNamespace:
    """The fields of insightface's configs/base.py that the loop reads (small numbers)."""
    return SimpleNamespace(
        margin_list=(1.0, 0.5, 0.0),            # ArcFace; CosFace is (1.0, 0.0, 0.4)
        interclass_filtering_threshold=0,       # > 0 is not in fastmargin's kernels yet
        embedding_size=32, num_classes=args.num_classes, sample_rate=args.sample_rate,
        batch_size=args.batch_size, num_image=args.num_image, lr=0.1, weight_decay=5e-4,
        num_epoch=10**9, seed=2048, output=args.output,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--num-image", type=int, default=2000, help="synthetic samples in the data set")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--output", type=Path, help="folder for checkpoint_gpu_{rank}.pt and model.pt")
    return parser.parse_args()


def synthetic_dataset(cfg: SimpleNamespace) -> TensorDataset:
    """num_image samples of num_classes identities, the same on every rank."""
    gen = torch.Generator().manual_seed(cfg.seed)
    centres = torch.randn(cfg.num_classes, INPUT_SIZE, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (cfg.num_image,), generator=gen)
    return TensorDataset(centres[labels] + torch.randn(cfg.num_image, INPUT_SIZE, generator=gen), labels)


def main(args: argparse.Namespace) -> None:
    # train_v2 initialises a process group of one when RANK is not set; fastmargin's
    # PartialFC_V2 needs none, and neither does a backbone without DDP.
    distributed = "RANK" in os.environ
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks on this machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))

    cfg = get_config(args)
    torch.manual_seed(cfg.seed)  # insightface's setup_seed: the same seed on every rank
    dataset = synthetic_dataset(cfg)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=False)

    backbone = torch.nn.Sequential(torch.nn.Linear(INPUT_SIZE, 128), torch.nn.BatchNorm1d(128), torch.nn.PReLU(),
                                   torch.nn.Linear(128, cfg.embedding_size), torch.nn.BatchNorm1d(cfg.embedding_size))
    backbone = backbone.to(device)
    if distributed:
        backbone = torch.nn.parallel.DistributedDataParallel(
            module=backbone, device_ids=[device.index] if device.type == "cuda" else None)
    backbone.train()

    margin_loss = CombinedMarginLoss(64, cfg.margin_list[0], cfg.margin_list[1], cfg.margin_list[2],
                                     cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    module_partial_fc.train().to(device)
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
                          lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    global_step, start = 0, time.perf_counter()
    for epoch in range(cfg.num_epoch):
        train_loader.sampler.set_epoch(epoch)
        for img, local_labels in train_loader:
            global_step += 1
            local_embeddings = backbone(img.to(device))
            loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
            opt.step()
            opt.zero_grad()
            if rank == 0:
                ms = (time.perf_counter() - start) / global_step * 1e3
                print(f"step {global_step}/{args.steps}  epoch {epoch}  batch {len(img)} per rank  "
                      f"loss {loss.item():.4f}  {ms:.0f} ms/step", flush=True)
            if global_step == args.steps:
                break
        else:
            continue
        break

    if cfg.output:
        cfg.output.mkdir(parents=True, exist_ok=True)
        net = backbone.module if distributed else backbone
        checkpoint = {"epoch": epoch + 1, "global_step": global_step, "state_dict_backbone": net.state_dict(),
                      "state_dict_softmax_fc": module_partial_fc.state_dict(), "state_optimizer": opt.state_dict()}
        torch.save(checkpoint, cfg.output / f"checkpoint_gpu_{rank}.pt")
        if rank == 0:
            torch.save(net.state_dict(), cfg.output / "model.pt")
            print(f"saved {world_size} checkpoint(s) and model.pt to {cfg.output}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
