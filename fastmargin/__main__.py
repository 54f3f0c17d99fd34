"""`python -m fastmargin`: what is installed and built, which backends run here, and a quick
side-by-side of them on this machine.

    python -m fastmargin [--shape B,C,D] [--no-bench]

The side-by-side runs ArcFace (m = 0.5 rad, s = 64), fp32, on the GPU if one is visible,
else the CPU: every usable backend, and pytorch-metric-learning's ArcFaceLoss if
installed, on the same inputs. It prints the loss, its difference from the reference, the
fwd+bwd time (median of repeats after warm-up) and the peak extra memory of one training
step (see fastmargin.profiling for how each is measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable

import torch

from . import __version__, _extension, backends, profiling
from .functional import margin_cross_entropy

ARCFACE = dict(m2=0.5, scale=64.0)
DEFAULT_SHAPE = {"cpu": (256, 20_000, 256), "cuda": (4096, 100_000, 512)}


def _inputs(b: int, c: int, d: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, d, device=device, generator=generator).requires_grad_()
    w = torch.randn(c, d, device=device, generator=generator).requires_grad_()
    labels = torch.randint(0, c, (b,), device=device, generator=generator)
    return x, w, labels


def _loss_fn(name: str, w: torch.Tensor) -> tuple[Callable, tuple[torch.Tensor, ...]]:
    """(loss(x, labels), the leaves besides x) for 'fastmargin:<backend>' or 'pml:ArcFaceLoss'."""
    if name == "pml:ArcFaceLoss":
        from pytorch_metric_learning.losses import ArcFaceLoss

        pml = ArcFaceLoss(num_classes=w.shape[0], embedding_size=w.shape[1],
                          margin=math.degrees(ARCFACE["m2"]), scale=ARCFACE["scale"]).to(w.device)
        pml.W = torch.nn.Parameter(w.detach().t())  # PML's (D, C) layout, our weights
        return (lambda x, labels: pml(x, labels)), (pml.W,)
    backend = name.split(":", 1)[1]
    return (lambda x, labels: margin_cross_entropy(x, w, labels, backend=backend, **ARCFACE)), (w,)


def _memory_step(name: str, b: int, c: int, d: int, device: str) -> Callable[[], None]:
    """For profiling.rss_peak_extra_bytes: warm-up at a tiny shape, then one step at (b, c, d)
    with the gradients allocated, so the baseline holds inputs and gradients; the step
    drops them and makes fresh ones (profiling.training_step)."""
    dev = torch.device(device)
    x, w, labels = _inputs(min(b, 8), min(c, 64), d, dev)
    fn, _ = _loss_fn(name, w)
    fn(x, labels).backward()
    x, w, labels = _inputs(b, c, d, dev)
    fn, leaves = _loss_fn(name, w)
    leaves = (x, *leaves)
    for leaf in leaves:
        leaf.grad = torch.zeros_like(leaf)
    step = profiling.training_step(lambda: fn(x, labels), leaves=leaves)
    return lambda: step(lambda: None)


def _peak_mib(name: str, shape: tuple[int, int, int], device: torch.device,
              run: Callable[[], None]) -> float | None:
    if device.type == "cuda":
        return profiling.cuda_peak_extra_bytes(run, device) / profiling.MIB
    try:
        result = profiling.rss_peak_extra_bytes("fastmargin.__main__:_memory_step",
                                                {"name": name, "b": shape[0], "c": shape[1], "d": shape[2],
                                                 "device": "cpu"})
    except (RuntimeError, OSError) as error:
        print(f"  ({name}: memory not measured: {error})")
        return None
    return result["extra_bytes"] / profiling.MIB


def _report_environment(device: torch.device) -> list[str]:
    print(f"fastmargin {__version__}")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"torch {torch.__version__}, triton {triton_version}, CUDA build {torch.version.cuda}, GPU: {gpu}")
    print("fastmargin._C build:", ", ".join(f"{k}={v}" for k, v in _extension.build_info().items()))
    print(f"backends on {device.type}:")
    usable = []
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name, device)
        trust = "verified" if name in backends.VERIFIED else "checked against the reference at first use by 'auto'"
        print(f"  {name:10s} {'usable (' + trust + ')' if reason is None else 'unavailable: ' + reason}")
        if reason is None:
            usable.append(name)
    print(f"  auto picks: {backends.select('auto', device)} (fp32, ArcFace)")
    return usable


def _side_by_side(names: list[str], shape: tuple[int, int, int], device: torch.device) -> None:
    """names: 'fastmargin:<backend>' (the reference first: the others are compared to it)
    and 'pml:ArcFaceLoss'."""
    b, c, d = shape
    print(f"\nArcFace m=0.5 s=64, fp32, B={b} C={c} D={d} on {device.type} "
          f"(time: {profiling.timer_name(device)}, median of repeats; memory: "
          f"{profiling.CUDA_METHOD if device.type == 'cuda' else profiling.RSS_METHOD})")
    print(f"{'implementation':24s} {'loss':>12s} {'|loss - ref|':>13s} {'fwd+bwd ms':>11s} "
          f"{'p20-p80 ms':>15s} {'n':>4s} {'peak MiB':>9s}")
    reference = None
    for name in names:
        loss, total, peak = _measure(name, shape, device)
        if name == "fastmargin:reference":
            reference = loss
        diff = f"{abs(loss - reference):.2e}" if reference is not None else "-"
        spread = f"{total.p20:.1f}-{total.p80:.1f}"
        peak_text = f"{peak:.0f}" if peak is not None else "-"
        print(f"{name:24s} {loss:12.6f} {diff:>13s} {total.median:11.1f} {spread:>15s} {total.n:4d} {peak_text:>9s}")


def _measure(name: str, shape: tuple[int, int, int], device: torch.device
             ) -> tuple[float, profiling.Stats, float | None]:
    """(loss, fwd+bwd Stats in ms, peak extra MiB) of one implementation at shape."""
    x, w, labels = _inputs(*shape, device)
    fn, leaves = _loss_fn(name, w)
    with torch.no_grad():
        loss = float(fn(x, labels))
    step = profiling.training_step(lambda: fn(x, labels), leaves=(x, *leaves))
    total = profiling.time_step(step, device, warmup=1, budget_s=1.0, min_repeats=3, max_repeats=20)[-1]
    peak = _peak_mib(name, shape, device, lambda: step(lambda: None))
    return loss, total, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmargin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="B,C,D of the side-by-side (CPU default 256,20000,256)")
    parser.add_argument("--no-bench", action="store_true", help="report the environment only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usable = _report_environment(device)
    if args.no_bench:
        return 0
    try:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else DEFAULT_SHAPE[device.type]
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--shape takes three positive integers B,C,D, got {args.shape!r}")
    names = [f"fastmargin:{b}" for b in sorted(usable, key=lambda b: b != "reference")]
    if importlib.util.find_spec("pytorch_metric_learning") is not None:
        names.append("pml:ArcFaceLoss")
    _side_by_side(names, shape, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
