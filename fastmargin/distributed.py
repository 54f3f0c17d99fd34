"""Class-parallel margin loss on torch.distributed (docs/design.md §6): insightface's PartialFC.

Each rank holds the weight rows of its own range of classes. A step all-gathers the
embeddings and labels of every rank, computes the logits' row statistics of its shard with
any fastmargin backend (lse_r, z_target_r, z_sum_r: fastmargin.fused), and all-reduces
them: lse = log Σ_r exp lse_r (a max and a sum), z_target and z_sum are sums, since a
row's target column lives on one shard and every shard adds its logits. The loss built from
those three B-vectors (fastmargin.loss) is the single-process loss over all the classes,
the same value on every rank. Backward needs no statistics exchange: each rank's share of
d loss / d lse_r is exp(lse_r - lse) times the (replicated) upstream gradient. The
embedding gradient is summed over ranks and each rank keeps the rows of its own batch.

Transport is torch.distributed (NCCL on GPUs, gloo on CPUs): nothing of our own.

Communication per step, with B_r rows on rank r, B = Σ_r B_r, P ranks, D the embedding
size: forward all-gathers the batch sizes (P integers), the embeddings (B·D floats, each
rank's part padded to the largest B_r) and the labels (B int64), and all-reduces the row
max (B floats) and the stacked sum of exp, target logit and logit sum (3·B floats);
backward reduce-scatters the embedding gradient (B·D floats), each rank receiving the sum
for its own rows. insightface's PartialFC moves the same embeddings forward and the same
gradients back and all-reduces three B-vectors (max, sum of exp, target logit): the B·D
terms dominate both, and neither moves anything of size B x C. bench/README.md has the
figures against B, C, D and P.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import backends, checks
from .loss import loss_from_statistics
from .margins import Margin
from .reference import target_cosines


class _Local:
    """The type of LOCAL."""

    def __repr__(self) -> str:
        return "fastmargin.distributed.LOCAL"


# group=LOCAL: this process alone, without torch.distributed (no process group needed): a
# world of one, whose collectives are identities and are skipped. Single-GPU training runs
# PartialFC so, with the code it would run on many.
LOCAL = _Local()


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes rank `rank` holds: as even as possible, the first
    num_classes % world_size ranks one class more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _sizes(n: int, device: torch.device, group) -> list[int]:
    size = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def _all_gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor; ranks may hold different n_r."""
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather with a backward that sums every rank's gradient of the gathered rows and
    hands each rank the rows of its own embeddings."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Rank r needs only its own rows of the gradient summed over ranks: a reduce-scatter,
        # half an all-reduce's traffic (docs/design.md §6). Parts are padded to the largest batch.
        rows = max(ctx.sizes)
        parts = [grad.new_zeros(rows, *grad.shape[1:]) for _ in ctx.sizes]
        for part, piece in zip(parts, grad.split(ctx.sizes)):
            part[: len(piece)] = piece
        mine = grad.new_empty(rows, *grad.shape[1:])
        dist.reduce_scatter(mine, parts, group=ctx.group)
        return mine[: ctx.sizes[dist.get_rank(ctx.group)]], None, None


class _CombineStatistics(torch.autograd.Function):
    """(lse_r, z_target_r, z_sum_r) of this shard -> the statistics over all shards."""

    @staticmethod
    def forward(ctx, lse, z_target, z_sum, group):
        row_max = lse.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # A row with -inf everywhere (no classes on any shard) cannot occur: C >= 1.
        sum_exp = torch.exp(lse - row_max)
        sums = torch.stack([sum_exp, z_target, z_sum])
        dist.all_reduce(sums, group=group)
        total_lse = row_max + torch.log(sums[0])
        ctx.save_for_backward(lse, total_lse)
        return total_lse, sums[1], sums[2]

    @staticmethod
    def backward(ctx, g_lse, g_target, g_sum):
        # Every rank holds the same loss and so the same upstream gradients: the local
        # share is a local computation.
        lse, total_lse = ctx.saved_tensors
        return g_lse * torch.exp(lse - total_lse), g_target, g_sum, None


def sample_classes(labels: torch.Tensor, num_local: int, sample_rate: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PartialFC's negative-class sampling on one shard.

    labels (B,) local class indices, -1 where the target is not on this shard. Keeps every
    class that is some row's target, then random others up to ceil(sample_rate * num_local)
    classes. Returns (kept classes (S,), ascending; labels remapped into [0, S), -1 kept).
    An approximation of the full loss: the softmax sums over the kept classes only.
    """
    positive = torch.zeros(num_local, dtype=torch.bool, device=labels.device)
    positive[labels[labels >= 0]] = True
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, whose ceil is 8.
    num_sample = max(int(positive.sum()), min(num_local, math.ceil(round(sample_rate * num_local, 9))))
    score = torch.rand(num_local, device=labels.device, generator=generator)
    score[positive] = 2.0  # above every random score: positives always survive
    kept = torch.topk(score, num_sample).indices.sort().values
    remapped = torch.searchsorted(kept, labels.clamp(min=0))
    return kept, torch.where(labels >= 0, remapped, -1)


class PartialFC(torch.nn.Module):
    """The margin loss with this rank's shard of the classifier (docs/design.md §5).

    Rank r holds classes [class_start, class_end) (fastmargin.distributed.class_range): its
    `weight` is ((class_end - class_start) * sub_centers, embedding_size), the F.linear
    layout, class-major sub-centers, initialised N(0, 0.01) as insightface's PartialFC.
    forward(embeddings (B_r, D), labels (B_r,)) takes this rank's own batch (batch sizes may
    differ between ranks) and returns the loss over the global batch, the same on every
    rank; backward gives each rank the gradient of its own embeddings and of its shard.

    The margin arguments are fastmargin.margin_cross_entropy's (radians). sample_rate < 1
    turns on PartialFC's negative-class sampling (sample_classes): each step keeps every
    class that is a target in the global batch and a random share of the others; 1.0 is the
    exact loss. With sampling, label smoothing averages over the kept classes.
    filter_threshold: insightface's interclass filtering (fastmargin.margins.Margin).

    margin_schedule: a fastmargin.adaptive schedule (AdaFace, ElasticArc, ElasticCos,
    MagFace, Curricular) that makes each step's margin from the global batch; it replaces
    the margin arguments and the scale. Its statistics are those of the global batch: it
    sees the all-gathered rows (and norms, forward's third argument, where the embeddings
    come normalised), CurricularFace's target cosines are combined across the shards (each
    row's target lives on one), and ElasticFace's draws are rank 0's on every rank. Its
    extra loss term (MagFace's regulariser) is added to the loss.

    group: the process group (None: the default one, which must be initialised), or LOCAL
    for a single process without torch.distributed. operand_dtype: None reads the gathered
    embeddings and the shard in their own dtypes; torch.float16 (or bfloat16) casts both
    for the fused call, whose GEMM then reads half precision and accumulates in fp32 (docs/design.md
    §1): insightface's fp16 autocast. The loss stays fp32; autograd casts the gradients back
    to the dtypes of the embeddings and the weight.
    """

    def __init__(self, num_classes: int, embedding_size: int, *, scale: float = 64.0,
                 m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, sphere_m: int | None = None,
                 sphere_lambda: float = 0.0, sub_centers: int = 1, grad_mode: str = "exact",
                 theta_policy: str = "fallback", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", sample_rate: float = 1.0,
                 backend: str = "auto", chunk_size: int | None = None, group=None,
                 operand_dtype: torch.dtype | None = None, filter_threshold: float | None = None,
                 margin_schedule: torch.nn.Module | None = None) -> None:
        super().__init__()
        if group is not LOCAL and (not dist.is_available() or not dist.is_initialized()):
            raise RuntimeError("PartialFC needs torch.distributed initialised: call "
                               "torch.distributed.init_process_group first (torchrun sets it up), "
                               "or pass group=fastmargin.distributed.LOCAL for a single process")
        if operand_dtype not in (None, *checks.FLOAT_DTYPES):
            raise ValueError(f"operand_dtype={operand_dtype!r}: use None or one of {checks.FLOAT_DTYPES}")
        self.num_classes = checks.check_positive_int("num_classes", num_classes)
        self.embedding_size = checks.check_positive_int("embedding_size", embedding_size)
        self.sub_centers = checks.check_positive_int("sub_centers", sub_centers)
        self.margin = Margin(m1=m1, m2=m2, m3=m3, sphere_m=sphere_m, sphere_lambda=sphere_lambda,
                             theta_policy=theta_policy, grad_mode=grad_mode, filter_threshold=filter_threshold)
        self.scale = checks.check_scale(scale)
        self.margin_schedule = margin_schedule
        checks.check_options(label_smoothing, reduction, ignore_index)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
        self.label_smoothing, self.ignore_index, self.reduction = label_smoothing, ignore_index, reduction
        self.sample_rate, self.backend, self.chunk_size, self.group = sample_rate, backend, chunk_size, group
        self.operand_dtype = operand_dtype
        self.world_size = 1 if group is LOCAL else dist.get_world_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} < world size {self.world_size}: every rank needs a class")
        self.rank = 0 if group is LOCAL else dist.get_rank(group)
        self.class_start, self.class_end = class_range(num_classes, self.rank, self.world_size)
        rows = (self.class_end - self.class_start) * self.sub_centers
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (rows, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        """embeddings (B_r, D), labels (B_r,) of this rank -> the loss over every rank's rows.
        norms (B_r,): the embeddings' norms for a margin_schedule that takes them (AdaFace's,
        where the backbone hands over unit embeddings)."""
        checks.check_types(embeddings, labels)
        checks.check_embedding_size(type(self).__name__, self.embedding_size, embeddings)
        checks.check_inputs(embeddings, self.weight, labels, self.sub_centers, self.ignore_index,
                            num_classes=self.num_classes)
        if self.group is LOCAL:
            x, labels = embeddings, labels.long()
        else:
            sizes = _sizes(len(labels), embeddings.device, self.group)
            x = _GatherEmbeddings.apply(embeddings, sizes, self.group)
            labels = _all_gather_rows(labels.long(), sizes, self.group)
            if norms is not None:
                norms = _all_gather_rows(norms.detach(), sizes, self.group)
        valid = labels != self.ignore_index
        local = labels - self.class_start
        local = torch.where(valid & (local >= 0) & (local < self.class_end - self.class_start), local, -1)
        margin, scale, extra, target_cos = self.margin, self.scale, None, None
        if self.margin_schedule is not None:
            margin, scale, extra, target_cos = self._scheduled(x, labels, local, norms)
            margin.check_rows(x.shape[0], x.device)
        weight, num_classes = self.weight, self.num_classes
        if self.sample_rate < 1.0 and self.training:
            weight, local, num_classes = self._sampled(local)
        if self.operand_dtype is not None:
            # After sampling: only the kept rows are cast. Autograd casts the gradients back.
            x, weight = x.to(self.operand_dtype), weight.to(self.operand_dtype)
        # 'auto' picks for the dtype the fused call reads (half with operand_dtype) and this margin.
        row_statistics = backends.implementation(
            backends.select(self.backend, x.device, x.dtype, margin.kind, self.sub_centers, x.shape[1]))
        stats = row_statistics(x, weight, local, margin, scale, self.sub_centers, self.chunk_size, target_cos)
        lse, z_target, z_sum = stats if self.group is LOCAL else _CombineStatistics.apply(*stats, self.group)
        loss = loss_from_statistics(lse, z_target, z_sum, valid, num_classes, float(self.label_smoothing),
                                    self.reduction)
        return loss if extra is None else loss + extra

    def _scheduled(self, x: torch.Tensor, labels: torch.Tensor, local: torch.Tensor, norms: torch.Tensor | None):
        """(margin, scale, extra loss, target cosines) of margin_schedule for the global batch."""
        schedule = self.margin_schedule
        target_cos = None
        if schedule.needs_target_cos:
            # Each row's target is on one shard: the others add 0.
            target_cos = target_cosines(x, self.weight, local, self.sub_centers)
            if self.group is not LOCAL:
                dist.all_reduce(target_cos, group=self.group)
        margin, extra = schedule.step(x, labels, target_cos, norms)
        if self.group is not LOCAL:
            if schedule.draws:  # rank 0's draws on every rank
                for value in margin.row_margins.values():
                    dist.broadcast(value, dist.get_global_rank(self._group(), 0), group=self.group)
            if extra is not None:
                # Every rank adds the same term over all the rows, and the embeddings'
                # gradients are summed over the ranks: each rank passes 1/P of it.
                share = extra / self.world_size
                extra = share + (extra - share).detach()
        return margin, schedule.scale, extra, target_cos

    def _sampled(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        # Positives must be those of the whole global batch: `local` already is global.
        kept, remapped = sample_classes(local, self.class_end - self.class_start, self.sample_rate)
        k = self.sub_centers
        rows = (kept.unsqueeze(1) * k + torch.arange(k, device=kept.device)).flatten()
        if self.group is LOCAL:
            return self.weight.index_select(0, rows), remapped, len(kept)
        count = torch.tensor([len(kept)], device=kept.device)
        dist.all_reduce(count, group=self.group)
        return self.weight.index_select(0, rows), remapped, int(count)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor | None:
        """Every shard's rows, (num_classes * K, D), in rank 0's CPU memory (None elsewhere):
        for export. A collective: every rank must call it."""
        # Shard by shard to rank 0's CPU memory: no rank ever holds more than its own shard
        # and one other on the device (an all-gather would put all of W on every device).
        if self.group is LOCAL:
            return self.weight.detach().cpu().clone()
        sizes = _sizes(self.weight.shape[0], self.weight.device, self.group)
        if self.rank != 0:
            dist.send(self.weight.detach().contiguous(), dist.get_global_rank(self._group(), 0), group=self.group)
            return None
        full = torch.empty(sum(sizes), self.embedding_size, dtype=self.weight.dtype)
        full[: sizes[0]] = self.weight.detach().cpu()
        start = sizes[0]
        for rank, rows in enumerate(sizes[1:], start=1):
            shard = self.weight.new_empty(rows, self.embedding_size)
            dist.recv(shard, dist.get_global_rank(self._group(), rank), group=self.group)
            full[start : start + rows] = shard.cpu()
            start += rows
        return full

    def _group(self):
        return self.group if self.group is not None else dist.group.WORLD

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copies this rank's rows out of a full (num_classes * K, D) weight."""
        want = (self.num_classes * self.sub_centers, self.embedding_size)
        if tuple(full.shape) != want:
            raise ValueError(f"full weight has shape {tuple(full.shape)}, expected {want}")
        k = self.sub_centers
        self.weight.copy_(full[self.class_start * k : self.class_end * k])
