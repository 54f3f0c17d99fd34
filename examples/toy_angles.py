"""The papers' toy picture: 8 identities trained into 2-D embeddings, drawn on the circle.

    python examples/toy_angles.py [--backend auto] [--device cpu] [--steps 1500] [--out toy_angles.png]

writes toy_angles.png in the current directory (--out elsewhere). The picture in the
README, docs/toy_angles.png, is redrawn with the defaults (seed 0, 1500 steps) by

    python examples/toy_angles.py --out docs/toy_angles.png

The digits 0-7 of scikit-learn's bundled images are the 8 identities. The same network
(train_digits.embedding_net with a 2-D output) is trained with plain softmax (a Linear
classifier without bias, so each class is a direction) and with SphereFace, CosFace and
ArcFace through fastmargin. Each panel shows the normalised embeddings on the unit
circle, each class's weight direction, and, on an outer ring, the arc that holds each
class's central 98% of points: the empty arcs between them are the angular gaps that
the margins open. The smallest and the mean gap are printed and put in the titles.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, never a window
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from train_digits import (SCALE, THREADS_HELP, SoftmaxLoss, embedding_net, fit, resolve_backend,
                          resolve_device, sphereface_gamma)

import fastmargin

IDENTITIES = 8
# The arc of a class spans these quantiles of its points' angles, so that a few
# misclassified points do not hide the gap.
ARC_QUANTILES = (0.01, 0.99)


# With 8 classes 45 degrees apart a margin must leave room for the class itself: CosFace
# needs cos(0) - m > cos(45 deg), so m < 0.29 (its default 0.35 cannot be met) and 0.2
# here; ArcFace's 0.5 rad needs theta + m < 45 deg - theta, classes narrower than 8 deg.
def toy_losses(backend: str, steps: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Panel title -> a function making the loss module, with 2-D class weights."""
    return {
        "softmax": lambda: SoftmaxLoss(IDENTITIES, 2, bias=False),
        "SphereFace (m = 4, annealed)": lambda: fastmargin.SphereFaceLoss(
            IDENTITIES, 2, margin=4, annealing=True, lambda_gamma=sphereface_gamma(steps), backend=backend),
        "CosFace (m = 0.2)": lambda: fastmargin.CosFaceLoss(
            IDENTITIES, 2, margin=0.2, scale=SCALE, backend=backend),
        "ArcFace (m = 0.5 rad)": lambda: fastmargin.ArcFaceLoss(
            IDENTITIES, 2, margin=math.degrees(0.5), scale=SCALE, backend=backend),
    }


def class_directions(head: torch.nn.Module) -> torch.Tensor:
    """(IDENTITIES, 2): each class's weight vector."""
    return head.classifier.weight if isinstance(head, SoftmaxLoss) else head.W.t()


def wrap(angle: torch.Tensor) -> torch.Tensor:
    """Angles into (-pi, pi]."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def class_arcs(angles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(IDENTITIES, 2) start and end angle of each class's arc, going counter-clockwise;
    angles (N,) in radians. Taken around the class's mean direction, so an arc may cross
    the angle pi."""
    arcs = []
    for c in range(IDENTITIES):
        own = angles[labels == c]
        centre = torch.atan2(own.sin().mean(), own.cos().mean())
        low, high = torch.quantile(wrap(own - centre), torch.tensor(ARC_QUANTILES, dtype=own.dtype))
        arcs.append(torch.stack([centre + low, centre + high]))
    return torch.stack(arcs)


def angular_gaps(arcs: torch.Tensor) -> torch.Tensor:
    """(IDENTITIES,) the empty arc, radians, from each class's arc to the next one
    counter-clockwise; negative where neighbouring arcs overlap."""
    order = torch.argsort(wrap(arcs.mean(dim=1)))
    arcs = arcs[order]
    return wrap(arcs.roll(-1, dims=0)[:, 0] - arcs[:, 1])


def draw(ax: plt.Axes, title: str, points: torch.Tensor, labels: torch.Tensor,
         directions: torch.Tensor, arcs: torch.Tensor, gaps: torch.Tensor) -> None:
    """One panel: unit circle, points (N, 2) on it, class directions, arcs outside it."""
    colours = plt.get_cmap("tab10")(range(IDENTITIES))
    circle = torch.linspace(0, 2 * math.pi, 361)
    ax.plot(circle.cos(), circle.sin(), color="0.8", lw=0.8)
    for c in range(IDENTITIES):
        own = points[labels == c]
        ax.scatter(own[:, 0], own[:, 1], s=10, color=colours[c], alpha=0.5, lw=0)
        d = F.normalize(directions[c], dim=0)
        ax.plot([0, d[0]], [0, d[1]], color=colours[c], lw=1.5)
        arc = torch.linspace(arcs[c, 0].item(), arcs[c, 1].item(), 60)
        ax.plot(1.12 * arc.cos(), 1.12 * arc.sin(), color=colours[c], lw=5, solid_capstyle="butt")
        label_angle = arcs[c].mean()
        ax.text(1.3 * label_angle.cos(), 1.3 * label_angle.sin(), str(c), color=colours[c],
                ha="center", va="center", fontsize=9, fontweight="bold")
    degrees = torch.rad2deg(gaps)
    ax.set_title(f"{title}\nsmallest gap {degrees.min():.1f}°, mean {degrees.mean():.1f}°", fontsize=11)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", default="auto",
                        help="fused backend for the margin losses: auto (the fastest here), cpu, triton, cuda")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per loss")
    parser.add_argument("--seed", type=int, default=0, help="seeds the networks' initial weights and the batches")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    # Not docs/toy_angles.png: a run of the example must not overwrite the committed picture.
    parser.add_argument("--out", type=Path, default=Path("toy_angles.png"),
                        help="where to write the PNG (docs/toy_angles.png redraws the README's picture)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    digits = load_digits()
    keep = torch.tensor(digits.target) < IDENTITIES
    x = (torch.tensor(digits.data, dtype=torch.float32)[keep] / 16.0).to(device)
    y = torch.tensor(digits.target, dtype=torch.long)[keep].to(device)
    print(f"{len(y)} images of the digits 0-{IDENTITIES - 1}, 2-D embeddings, {args.steps} steps per loss, "
          f"backend {backend!r} on {device}")
    figure, axes = plt.subplots(2, 2, figsize=(10, 10.6))
    for ax, (title, make_loss) in zip(axes.flat, toy_losses(backend, args.steps).items()):
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        net = embedding_net(x.shape[1], 2).to(device)
        head = make_loss().to(device)
        fit(net, head, x, y, steps=args.steps, seed=args.seed, label=f"{title:<28}",
            log_every=max(args.steps // 3, 1))
        with torch.no_grad():
            net.eval()
            points = F.normalize(net(x), dim=1).cpu()
        angles = torch.atan2(points[:, 1], points[:, 0])
        arcs = class_arcs(angles, y.cpu())
        gaps = angular_gaps(arcs)
        print(f"  {title:<28} gaps between neighbouring classes (degrees): "
              f"{' '.join(f'{g:.1f}' for g in torch.rad2deg(gaps).tolist())}  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        draw(ax, title, points, y.cpu(), class_directions(head).detach().cpu(), arcs, gaps)
    figure.suptitle("8 digit identities trained into 2-D embeddings, normalised onto the circle\n"
                    "lines: class weight directions; outer ring: the arc of each class's central 98%;\n"
                    "the empty arcs between them are the angular gaps", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
