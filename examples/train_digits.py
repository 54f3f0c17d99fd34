"""Train a small embedding network on scikit-learn's bundled digits with every margin loss.

    python examples/train_digits.py [--backend auto] [--device cpu] [--steps 300] [--seed 0]

Classes 0-6 train the network; classes 7-9 are never seen in training and only verified:
pairs of their images are "same" or "different" by the cosine of the two embeddings, the
threshold picked on a validation half of the pairs, the accuracy reported on the test half.
Each margin loss trains once through the chosen fused backend and once through
fastmargin.reference from the same seed, and their per-step losses are compared over the
first COMPARE_STEPS steps. Plain softmax cross-entropy (a Linear classifier on the
embedding) is the baseline. The digits ship inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastmargin
from fastmargin import backends, reference

TRAIN_CLASSES = 7  # classes 0-6 train; 7-9 are held out for verification
EMBEDDING_SIZE = 32
BATCH_SIZE = 128
LEARNING_RATE = 1e-3

# The fused backend and the reference compute the same float32 loss in a different order
# (class blocks and a streamed log-sum-exp against one materialised logits matrix), so
# each step's loss differs by rounding, about 1e-7 relative. Training feeds that rounding
# back through the gradients and the two runs drift apart, as two runs of one backend
# with another summation order would. Measured here (seed 0): at most 2e-7 at step 1,
# 9e-7 over the first 50 steps, 2e-5 over 200, and 4e-3 for SphereFace over 300, when its
# annealing sharpens the loss. So the curves are compared over the first COMPARE_STEPS
# steps at CURVE_RTOL, 100x the drift there. Errors show far above it: ArcFace with the
# margin 0.1 degree off differs by 2e-3 at step 1, with the straight-through gradient
# (grad_mode='detached') instead of the exact one by 2e-2 at step 2.
COMPARE_STEPS = 50
CURVE_RTOL = 1e-4

# The margin scale for 7 classes: the defaults (s = 64) are sized for thousands of
# identities. CosFace's bound s >= (C-1)/C * log((C-1) * P / (1-P)) asks for s >= 5.5 to
# reach a target probability P = 0.99 with C = 7; 16 leaves room for the margin.
SCALE = 16.0


class SoftmaxLoss(torch.nn.Module):
    """The baseline: a Linear classifier on the embedding and F.cross_entropy."""

    def __init__(self, num_classes: int, embedding_size: int, bias: bool = True) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(embedding_size, num_classes, bias=bias)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(embeddings), labels)


def sphereface_gamma(steps: int) -> float:
    """The lambda-annealing gamma that brings SphereFace's lambda from its base (1000) to
    its floor (5) halfway through `steps`. The original gamma = 0.12 gets there after
    1658 iterations of a 28k-iteration run, longer than this whole example."""
    return (1000.0 / 5.0 - 1.0) / max(steps / 2, 1)


# name -> (num_classes, embedding_size, backend, steps) -> the loss module.
LOSSES: dict[str, Callable[[int, int, str, int], torch.nn.Module]] = {
    "softmax": lambda c, d, backend, steps: SoftmaxLoss(c, d),
    "arcface": lambda c, d, backend, steps: fastmargin.ArcFaceLoss(
        c, d, margin=28.6, scale=SCALE, backend=backend),
    "cosface": lambda c, d, backend, steps: fastmargin.CosFaceLoss(
        c, d, margin=0.35, scale=SCALE, backend=backend),
    "sphereface": lambda c, d, backend, steps: fastmargin.SphereFaceLoss(
        c, d, margin=4, annealing=True, lambda_gamma=sphereface_gamma(steps), backend=backend),
    "subcenter-arcface": lambda c, d, backend, steps: fastmargin.SubCenterArcFaceLoss(
        c, d, margin=28.6, scale=SCALE, sub_centers=3, backend=backend),
    # insightface's combined-margin example values, m1 = 1, m2 = 0.3, m3 = 0.2.
    "combined": lambda c, d, backend, steps: fastmargin.CombinedMarginLoss(
        SCALE, 1.0, 0.3, 0.2, num_classes=c, embedding_size=d, backend=backend),
}


@dataclass
class DigitsSplit:
    """The data, float32 images (N, 64) in [0, 1] and int64 labels (N,), plus pairs (P, 2)
    of indices into the unseen images with `same` (P,) bool."""

    train_x: torch.Tensor      # classes 0-6, 80%
    train_y: torch.Tensor
    closed_x: torch.Tensor     # classes 0-6, the other 20%: closed-set accuracy
    closed_y: torch.Tensor
    unseen_x: torch.Tensor     # classes 7-9
    val_pairs: torch.Tensor    # pairs among one half of the unseen images: the threshold
    val_same: torch.Tensor
    test_pairs: torch.Tensor   # pairs among the other half: the reported accuracy
    test_same: torch.Tensor

    def to(self, device: torch.device) -> DigitsSplit:
        return DigitsSplit(**{k: v.to(device) for k, v in vars(self).items()})


def balanced_pairs(labels: torch.Tensor, indices: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every same-class pair among `indices` and as many different-class pairs drawn at
    random, so that chance is 50%. Returns pairs (P, 2) and same (P,)."""
    i, j = torch.triu_indices(len(indices), len(indices), offset=1)
    pairs = torch.stack([indices[i], indices[j]], dim=1)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    positive, negative = pairs[same], pairs[~same]
    negative = negative[torch.randperm(len(negative), generator=generator)[: len(positive)]]
    return (torch.cat([positive, negative]),
            torch.cat([torch.ones(len(positive), dtype=torch.bool),
                       torch.zeros(len(positive), dtype=torch.bool)]))


def load_digits_split(seed: int) -> DigitsSplit:
    """Splits scikit-learn's 1797 digits: classes 0-6 into train and closed-set test, the
    images of classes 7-9 into a validation and a test half, each made into pairs."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    seen = (y < TRAIN_CLASSES).nonzero().flatten()
    seen = seen[torch.randperm(len(seen), generator=generator)]
    n_train = int(0.8 * len(seen))
    unseen = (y >= TRAIN_CLASSES).nonzero().flatten()
    unseen_y = y[unseen]
    halves = torch.randperm(len(unseen), generator=generator).chunk(2)
    val_pairs, val_same = balanced_pairs(unseen_y, halves[0], generator)
    test_pairs, test_same = balanced_pairs(unseen_y, halves[1], generator)
    return DigitsSplit(
        train_x=x[seen[:n_train]], train_y=y[seen[:n_train]],
        closed_x=x[seen[n_train:]], closed_y=y[seen[n_train:]],
        unseen_x=x[unseen], val_pairs=val_pairs, val_same=val_same,
        test_pairs=test_pairs, test_same=test_same,
    )


def embedding_net(in_features: int, embedding_size: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, embedding_size),
    )


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of indices into n samples, a fresh permutation each epoch; the
    same seed gives the same batches, on any device."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    epochs = [torch.randperm(n, generator=generator)[: per_epoch * batch_size].view(per_epoch, batch_size)
              for _ in range(math.ceil(steps / per_epoch))]
    return list(torch.cat(epochs)[:steps])


def fit(net: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
        steps: int, seed: int, label: str = "", log_every: int = 0) -> torch.Tensor:
    """Trains net and the loss module `head` (which owns the class weights) on images x
    (N, F) and labels y (N,) with Adam for `steps` batches drawn with `seed`. Returns the
    loss of each step, (steps,) float64 on the host."""
    optimizer = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=LEARNING_RATE)
    losses = []
    for step, index in enumerate(batch_indices(len(y), BATCH_SIZE, steps, seed)):
        index = index.to(x.device)
        loss = head(net(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {label} step {step + 1:>5}/{steps}  loss {loss.item():.4f}", flush=True)
    return torch.stack(losses).double().cpu()


@dataclass
class Trained:
    net: torch.nn.Module
    head: torch.nn.Module       # the loss module, which owns the class weights
    losses: torch.Tensor        # (steps,) float64 on the host, the loss of each step


def train(loss_name: str, backend: str, data: DigitsSplit, *, steps: int, seed: int,
          schedule_steps: int | None = None, log_every: int = 0,
          embedding_size: int = EMBEDDING_SIZE) -> Trained:
    """Trains the embedding net with loss `loss_name` through `backend` on the digits 0-6.

    Everything random (the initial weights, the batches) follows `seed`, so two calls that
    differ only in `backend` see the same numbers up to the backend's rounding.
    schedule_steps is the length of the full run, which sets SphereFace's annealing, so a
    run cut short for comparison anneals as the full one does (default: steps).
    """
    device = data.train_x.device
    torch.manual_seed(seed)
    net = embedding_net(data.train_x.shape[1], embedding_size).to(device)
    head = LOSSES[loss_name](TRAIN_CLASSES, embedding_size, backend, schedule_steps or steps).to(device)
    losses = fit(net, head, data.train_x, data.train_y, steps=steps, seed=seed,
                 label=f"{loss_name:<18} {backend:<9}", log_every=log_every)
    return Trained(net, head, losses)


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / |b| over two loss curves of the same length."""
    return ((a - b).abs() / b.abs().clamp_min(torch.finfo(torch.float32).tiny)).max().item()


def class_scores(head: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """(B, C) scores whose arg-max is the predicted class: the classifier's logits for
    softmax, the cosine to each class (the best sub-center) for the margin losses."""
    if isinstance(head, SoftmaxLoss):
        return head.classifier(embeddings)
    weight = head.weight if isinstance(head, fastmargin.CombinedMarginLoss) else head.W.t()
    return reference.cosine_logits(embeddings, weight, head.sub_centers)


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    """The cosine threshold (predict "same" above it) that is most accurate on these pairs."""
    scores, order = scores.sort(descending=True)
    same = same[order].double()
    # Predicting "same" for the k highest scores gets the positives among them right and
    # the negatives outside them: true_pos(k) + (negatives - (k - true_pos(k))).
    true_pos = torch.cat([same.new_zeros(1), same.cumsum(0)])
    k = torch.arange(len(same) + 1, device=same.device)
    correct = true_pos + (len(same) - same.sum()) - (k - true_pos)
    best = int(correct.argmax())
    if best == 0:
        return scores[0].item() + 1e-6
    if best == len(scores):
        return scores[-1].item() - 1e-6
    return (scores[best - 1].item() + scores[best].item()) / 2


@torch.no_grad()
def evaluate(trained: Trained, data: DigitsSplit) -> tuple[float, float]:
    """(verification accuracy on the unseen-class test pairs, closed-set accuracy)."""
    trained.net.eval()
    unseen = F.normalize(trained.net(data.unseen_x), dim=1)

    def cosines(pairs: torch.Tensor) -> torch.Tensor:
        return (unseen[pairs[:, 0]] * unseen[pairs[:, 1]]).sum(dim=1)

    threshold = best_threshold(cosines(data.val_pairs), data.val_same)
    verification = ((cosines(data.test_pairs) > threshold) == data.test_same).double().mean().item()
    predicted = class_scores(trained.head, trained.net(data.closed_x)).argmax(dim=1)
    closed = (predicted == data.closed_y).double().mean().item()
    trained.net.train()
    return verification, closed


@dataclass
class Result:
    loss_name: str
    verification: float
    closed: float
    max_rel_diff: float | None  # None for softmax, which has no fused backend
    seconds: float

    @property
    def curves_match(self) -> bool | None:
        return None if self.max_rel_diff is None else self.max_rel_diff <= CURVE_RTOL


def run(loss_name: str, backend: str, data: DigitsSplit, *, steps: int, seed: int,
        compare_steps: int = COMPARE_STEPS, log_every: int = 0) -> Result:
    """Trains `loss_name` through `backend` for `steps` steps and through the reference for
    the first `compare_steps`, compares the two curves, evaluates the full run."""
    start = time.perf_counter()
    trained = train(loss_name, backend, data, steps=steps, seed=seed, log_every=log_every)
    max_rel_diff = None
    if loss_name != "softmax":
        n = min(compare_steps, steps)
        oracle = train(loss_name, "reference", data, steps=n, seed=seed, schedule_steps=steps)
        max_rel_diff = max_relative_difference(trained.losses[:n], oracle.losses)
    verification, closed = evaluate(trained, data)
    return Result(loss_name, verification, closed, max_rel_diff, time.perf_counter() - start)


def format_table(results: list[Result], compare_steps: int) -> str:
    header = ("loss", f"fused == reference, first {compare_steps} steps (max rel diff)",
              "verification acc, unseen 7-9", "closed-set acc, 0-6", "time")
    rows = [header]
    for r in results:
        if r.max_rel_diff is None:
            agreement = "- (plain F.cross_entropy)"
        else:
            agreement = f"{'yes' if r.curves_match else 'NO'} ({r.max_rel_diff:.1e})"
        rows.append((r.loss_name, agreement, f"{r.verification:.3f}", f"{r.closed:.3f}", f"{r.seconds:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# A batch of 128 through a 128-wide MLP is too small to split across threads: on a busy
# 2-core machine two threads made a step 7-30x slower than one (about 1 ms), as each
# parallel region waits for a core.
THREADS_HELP = "CPU threads for torch and the fused CPU kernel (1 suffices: the network is tiny)"


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to torch "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         "use --device cpu")
    return device


def resolve_backend(name: str, device: torch.device) -> str:
    try:
        return backends.select(name, device)
    except (ValueError, fastmargin.BackendUnavailableError) as error:
        raise SystemExit(f"--backend {name}: {error}") from None


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", default="auto",
                        help="fused backend to train through: auto (the fastest here), cpu, triton, cuda")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=300, help="training steps per loss")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data split, the networks' initial weights and the batches")
    parser.add_argument("--quick", action="store_true", help="a short run (100 steps, overriding --steps), for tests")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    steps = 100 if args.quick else args.steps
    if steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    data = load_digits_split(args.seed).to(device)
    compare_steps = min(COMPARE_STEPS, steps)
    print(f"digits: {len(data.train_y)} training images of classes 0-{TRAIN_CLASSES - 1}, "
          f"{len(data.closed_y)} closed-set test images, {len(data.val_same)} validation and "
          f"{len(data.test_same)} test pairs of classes {TRAIN_CLASSES}-9 (half same, half different)")
    print(f"backend {backend!r} (asked: {args.backend!r}) on {device}, {steps} steps per loss, "
          f"seed {args.seed}; the reference retrains the first {compare_steps} steps")
    if backend == "reference":
        print("note: the backend is the reference itself, so the comparison is trivial")
    results = []
    for loss_name in LOSSES:
        result = run(loss_name, backend, data, steps=steps, seed=args.seed,
                     compare_steps=compare_steps, log_every=max(steps // 4, 1))
        results.append(result)
    print()
    print(format_table(results, compare_steps))
    print(f"\nfused == reference: every per-step loss within {CURVE_RTOL:.0e} relative over the first "
          f"{compare_steps} steps (float32; the runs drift apart by rounding, slowly).")
    print("verification: cosine of two embeddings > threshold picked on the validation pairs; "
          "chance is 0.500. closed-set: arg-max over the classes, chance 0.143.")
    return results


if __name__ == "__main__":
    failed = [r.loss_name for r in main() if r.curves_match is False]
    sys.exit(f"fused and reference curves differ for {failed}" if failed else 0)
