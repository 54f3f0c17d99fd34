"""`python -m fastmargin.purify`: cleans a labelled embedding set with a trained sub-center
ArcFace weight (the TPAMI recipe; the math is fastmargin.subcenter).

    python -m fastmargin.purify --embeddings E.npy --labels L.npy --weights W.pt \\
        --k 3 --threshold 75 --out DIR

E.npy: (N, D) float16/32/64, read memory-mapped, one batch at a time. L.npy: (N,) integer
labels in [0, C). W.pt, saved with torch.save, one of
  - a state_dict holding 'W' (D, C*K): pytorch-metric-learning's or fastmargin's
    SubCenterArcFaceLoss, column c*K + k;
  - a state_dict holding 'weight' (C*K, D): fastmargin's CombinedMarginLoss, the F.linear
    layout, row c*K + k;
  - a bare tensor in either layout, told apart by which side equals D.
Writes to DIR: kept_indices.npy (int64, ascending rows of E kept), new_labels.npy (int64,
the kept rows' labels renumbered 0..C'-1), class_map.npy (int64 (C,), old label -> new,
-1 for a removed class) and report.json, and prints the report. A threshold that drops
more than half of the samples (one given in radians, say) is warned about on stderr and
under "warnings" in report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from .subcenter import DEFAULT_BATCH_SIZE, PAPER_THRESHOLD, Purified, SubCenterStats, purify, sub_center_stats

# A progress bar is drawn (on a terminal, unless --quiet) only past this many batches:
# below it the run takes seconds and a bar is noise.
PROGRESS_MIN_BATCHES = 4

SHARE_QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmargin.purify",
        description="Drop the samples far from their class's dominant sub-center (sub-center "
                    "ArcFace data cleaning), remove the classes left empty and renumber the rest.",
    )
    parser.add_argument("--embeddings", required=True, type=Path, help="(N, D) float .npy")
    parser.add_argument("--labels", required=True, type=Path, help="(N,) integer .npy, classes in [0, C)")
    parser.add_argument("--weights", required=True, type=Path,
                        help="torch.save'd state_dict with 'W' (D, C*K) or 'weight' (C*K, D), "
                             "or a bare tensor")
    parser.add_argument("--k", required=True, type=int, help="sub-centers per class")
    parser.add_argument("--threshold", type=float, default=PAPER_THRESHOLD,
                        help="outlier angle to the dominant sub-center, in degrees, not radians "
                             f"(default {PAPER_THRESHOLD:g}, the paper's); a warning says when it "
                             "drops most of the samples")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created if missing)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows per batch; memory is O(batch * K * D) (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default="cpu",
                        help="where to compute, e.g. cuda (the embeddings are copied there whole)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no printed report")
    return parser


def _require_file(parser: argparse.ArgumentParser, option: str, path: Path) -> None:
    if not path.is_file():
        parser.error(f"{option} {path}: no such file")


def _load_npy(parser: argparse.ArgumentParser, option: str, path: Path, mmap: bool) -> np.ndarray:
    _require_file(parser, option, path)
    try:
        # Copy-on-write mapping: torch.from_numpy wants a writable array; nothing is written back.
        array = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as error:
        parser.error(f"{option} {path}: not a .npy array ({error})")
    if not isinstance(array, np.ndarray):
        parser.error(f"{option} {path}: holds several arrays (.npz); save one array with np.save")
    return array


def load_embeddings(parser: argparse.ArgumentParser, path: Path) -> torch.Tensor:
    array = _load_npy(parser, "--embeddings", path, mmap=True)
    if array.ndim != 2 or array.dtype not in (np.float16, np.float32, np.float64):
        parser.error(f"--embeddings {path}: need a 2-D float array (N, D), got {array.dtype} {array.shape}")
    return torch.from_numpy(array)


def load_labels(parser: argparse.ArgumentParser, path: Path, num_rows: int) -> torch.Tensor:
    array = _load_npy(parser, "--labels", path, mmap=False)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        parser.error(f"--labels {path}: need a 1-D integer array (N,), got {array.dtype} {array.shape}")
    if len(array) != num_rows:
        parser.error(f"--labels {path}: {len(array)} labels but the embeddings have {num_rows} rows")
    return torch.from_numpy(array.astype(np.int64))


def load_weight(parser: argparse.ArgumentParser, path: Path, k: int, dim: int) -> tuple[torch.Tensor, str]:
    """Returns (weight (C*K, D), the layout it was found in)."""
    _require_file(parser, "--weights", path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises anything from pickle, zip and tensor code
        parser.error(f"--weights {path}: torch.load failed ({type(error).__name__}: {error})")
    pml = f"'W' (D, C*K) = ({dim}, C*{k}), column c*K + k"
    linear = f"'weight' (C*K, D) = (C*{k}, {dim}), row c*K + k"
    if isinstance(saved, torch.Tensor):
        is_pml = saved.dim() == 2 and saved.shape[0] == dim
        is_linear = saved.dim() == 2 and saved.shape[1] == dim
        if is_pml and is_linear:
            parser.error(f"--weights {path}: a bare ({dim}, {dim}) tensor could be either layout; "
                         f"save a state_dict with {pml} or {linear}")
        key, tensor, what = ("W" if is_pml else "weight"), saved, "the tensor"
    elif isinstance(saved, dict):
        found = [key for key in ("W", "weight") if key in saved]
        if len(found) != 1:
            parser.error(f"--weights {path}: need exactly one of the keys 'W', 'weight'; "
                         f"found keys {sorted(map(str, saved))[:10]}")
        key, tensor, what = found[0], saved[found[0]], f"'{found[0]}'"
        if not isinstance(tensor, torch.Tensor):
            parser.error(f"--weights {path}: {what} is a {type(tensor).__name__}, not a tensor")
    else:
        parser.error(f"--weights {path}: holds a {type(saved).__name__}; need a tensor or a state_dict")
    if not tensor.is_floating_point() or tensor.dim() != 2:
        parser.error(f"--weights {path}: {what} must be a 2-D float tensor, got {tensor.dtype} "
                     f"{tuple(tensor.shape)}")
    # PML's W is copied to (C*K, D) rows: each sample gathers K whole rows, and reading
    # them as strided columns of W made the pass 2x slower on a CPU (D = 512, C = 100k).
    weight, layout = (tensor.t().contiguous(), pml) if key == "W" else (tensor, linear)
    if weight.shape[1] != dim:
        parser.error(f"--weights {path}: shape {tuple(tensor.shape)} does not fit embeddings of dim {dim}: "
                     f"need {pml} or {linear}")
    if weight.shape[0] % k:
        parser.error(f"--weights {path}: {weight.shape[0]} sub-center vectors is not a multiple of "
                     f"--k {k}; need {layout}")
    return weight, layout


def _progress(num_batches: int, quiet: bool) -> Callable[[Iterable[int]], Iterable[int]] | None:
    if quiet or num_batches <= PROGRESS_MIN_BATCHES:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: tqdm draws only on a terminal.
    return lambda starts: tqdm(starts, total=num_batches, unit="batch", desc="purify", disable=None)


def build_report(stats: SubCenterStats, purified: Purified, threshold: float) -> dict:
    """report.json without its "inputs": counts of samples and identities kept and dropped,
    and the per-identity dominant sub-center share (mean, min, quantiles, max)."""
    samples = len(stats.labels)
    kept = len(purified.kept_indices)
    present = int(stats.present.sum())
    share = stats.dominant_share()[stats.present]
    summary = None
    if present:
        summary = {"mean": share.mean().item(), "min": share.min().item(), "max": share.max().item()}
        summary |= {name: torch.quantile(share, q).item() for name, q in SHARE_QUANTILES.items()}
    return {
        "sub_centers": stats.sub_centers,
        "threshold_degrees": threshold,
        "samples": {"total": samples, "kept": kept, "dropped": samples - kept},
        "identities": {
            "total": stats.num_classes,
            "kept": purified.num_classes,
            "dropped": stats.num_classes - purified.num_classes,
            "emptied": present - purified.num_classes,
            "without_samples": stats.num_classes - present,
        },
        "dominant_share": summary,
    }


def format_report(report: dict) -> str:
    samples, ids, share = report["samples"], report["identities"], report["dominant_share"]
    lines = [
        f"sub-center purification: K = {report['sub_centers']}, "
        f"threshold {report['threshold_degrees']:g} degrees",
        f"samples:    {samples['kept']} kept of {samples['total']}, {samples['dropped']} dropped "
        f"({samples['dropped'] / max(samples['total'], 1):.1%})",
        f"identities: {ids['kept']} kept of {ids['total']}, {ids['dropped']} dropped "
        f"({ids['emptied']} emptied by purification, {ids['without_samples']} without samples)",
    ]
    if share is not None:
        lines.append(
            "dominant sub-center share per identity (fraction of its samples nearest it): "
            f"mean {share['mean']:.3f}, min {share['min']:.3f}, 5% {share['q05']:.3f}, "
            f"25% {share['q25']:.3f}, median {share['median']:.3f}, 75% {share['q75']:.3f}, "
            f"max {share['max']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs the command line (see the module docstring); bad inputs exit with status 2 and
    a message naming the option, the file and what was expected."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k}: need at least 1 sub-center per class")
    if not 0 <= args.threshold <= 180:
        parser.error(f"--threshold {args.threshold:g}: need an angle in [0, 180] degrees")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: need at least 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a directory")
    try:
        device = torch.empty(0, device=args.device).device  # fails here if absent, not mid-run
    except RuntimeError as error:
        parser.error(f"--device {args.device}: unusable ({error})")

    embeddings = load_embeddings(parser, args.embeddings)
    labels = load_labels(parser, args.labels, len(embeddings))
    weight, layout = load_weight(parser, args.weights, args.k, embeddings.shape[1])
    num_classes = weight.shape[0] // args.k
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        parser.error(f"--labels {args.labels}: labels[{i}] = {int(labels[i])} is outside [0, {num_classes}), "
                     f"the classes of --weights ({weight.shape[0]} sub-centers / --k {args.k}); "
                     f"{len(bad)} labels are out of range")

    num_batches = -(-len(labels) // args.batch_size)
    stats = sub_center_stats(
        embeddings.to(device), weight.to(device), labels.to(device), args.k,
        batch_size=args.batch_size, progress=_progress(num_batches, args.quiet),
    )
    # purify's warnings (a threshold that drops most of the data) go to stderr, even with
    # --quiet, and into report.json, where a pipeline that exits 0 will still find them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        purified = purify(stats, args.threshold)
    report = build_report(stats, purified, args.threshold)
    report["warnings"] = [str(warning.message) for warning in caught]
    report["inputs"] = {"embeddings": str(args.embeddings), "labels": str(args.labels),
                        "weights": str(args.weights), "weight_layout": layout}

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "kept_indices.npy", purified.kept_indices.cpu().numpy())
    np.save(args.out / "new_labels.npy", purified.new_labels.cpu().numpy())
    np.save(args.out / "class_map.npy", purified.class_map.cpu().numpy())
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        print(format_report(report))
        print(f"wrote kept_indices.npy, new_labels.npy, class_map.npy, report.json to {args.out}")
    for message in report["warnings"]:  # last, so that they are what a terminal shows
        print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
