"""The training examples under examples/: they run, the fused and reference curves agree,
and training learns. The fast tests run a few steps so the examples cannot rot; the slow
one runs train_digits --quick and checks what it reports."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the examples train on scikit-learn's bundled digits")
pytest.importorskip("matplotlib", reason="toy_angles draws with matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import toy_angles  # noqa: E402
import train_digits  # noqa: E402

import fastmargin  # noqa: E402

# What --quick must reach: chance is 0.5 for the balanced verification pairs and 1/7 for
# the closed set. At seed 0 it reaches 0.61-0.72 and 0.95-0.99 across the losses; the
# margins below leave room for another BLAS's rounding.
VERIFICATION_MARGIN = 0.05
CLOSED_SET_MARGIN = 0.7


@pytest.fixture(autouse=True)
def restore_threads():
    # The examples set torch's thread count for the whole process; other tests keep theirs.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_digits_few_steps(capsys):
    results = train_digits.main(["--steps", "5"])
    assert [r.loss_name for r in results] == list(train_digits.LOSSES)
    for r in results:
        assert r.curves_match is not False, f"{r.loss_name}: max rel diff {r.max_rel_diff:.2e}"
        assert 0.0 <= r.verification <= 1.0 and 0.0 <= r.closed <= 1.0
    table = capsys.readouterr().out
    assert "fused == reference, first 5 steps" in table
    assert all(f"\n{name} " in table for name in train_digits.LOSSES)


def test_curve_comparison_catches_a_wrong_margin(monkeypatch):
    # ArcFace 0.1 degree off the reference's margin must fail the comparison at once.
    monkeypatch.setitem(train_digits.LOSSES, "arcface-28.7", lambda c, d, backend, steps:
                        fastmargin.ArcFaceLoss(c, d, margin=28.7, scale=train_digits.SCALE, backend=backend))
    torch.set_num_threads(1)
    data = train_digits.load_digits_split(0)
    wrong = train_digits.train("arcface-28.7", "auto", data, steps=2, seed=0).losses
    oracle = train_digits.train("arcface", "reference", data, steps=2, seed=0).losses
    assert train_digits.max_relative_difference(wrong, oracle) > 10 * train_digits.CURVE_RTOL


def test_best_threshold_by_hand():
    # Calling "same" above 0.85 is right on 0.9, 0.8 and 0.1, wrong on 0.3; above 0.2 is
    # right on 0.9, 0.3, 0.1. No threshold gets all 4; the higher of the best is kept.
    scores = torch.tensor([0.3, 0.9, 0.1, 0.8])
    same = torch.tensor([True, True, False, False])
    assert train_digits.best_threshold(scores, same) == pytest.approx(0.85)


def test_bad_device_or_backend_says_why():
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is visible"):
            train_digits.main(["--device", "cuda"])
    with pytest.raises(SystemExit, match="backend 'cuda' is unavailable"):
        train_digits.main(["--backend", "cuda", "--device", "cpu"])


def test_angular_gaps_by_hand():
    # 8 classes centred at k*45 degrees, each spread over +-5 degrees: 35-degree gaps,
    # including the one across the angle pi.
    centres = torch.arange(8, dtype=torch.float64).repeat_interleave(101) * math.pi / 4
    spread = torch.linspace(-5, 5, 101, dtype=torch.float64).repeat(8)
    angles = toy_angles.wrap(centres + torch.deg2rad(spread))
    labels = torch.arange(8).repeat_interleave(101)
    arcs = toy_angles.class_arcs(angles, labels)
    gaps = torch.rad2deg(toy_angles.angular_gaps(arcs))
    # the arcs span the 1%-99% quantiles, +-4.9 degrees, so the gaps are 35.2
    torch.testing.assert_close(gaps, torch.full((8,), 35.2, dtype=torch.float64), rtol=0, atol=1e-9)


def test_toy_angles_few_steps_writes_to_the_current_directory(tmp_path, monkeypatch):
    """By default the picture goes to the current directory, never over the committed
    docs/toy_angles.png."""
    committed = Path(toy_angles.__file__).resolve().parents[1] / "docs" / "toy_angles.png"
    before = committed.read_bytes()
    monkeypatch.chdir(tmp_path)
    toy_angles.main(["--steps", "3"])
    assert (tmp_path / "toy_angles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert committed.read_bytes() == before


@pytest.mark.parametrize("example, default", [(toy_angles, "(default: 1500)"), (train_digits, "(default: 300)")],
                         ids=["toy_angles", "train_digits"])
def test_help_shows_the_defaults(example, default, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert default in shown and "(default: auto)" in shown and "(default: 0)" in shown


@pytest.mark.slow
def test_train_digits_quick():
    results = train_digits.main(["--quick"])
    for r in results:
        assert r.curves_match is not False, (
            f"{r.loss_name}: fused and reference losses differ by {r.max_rel_diff:.2e} relative "
            f"over the first {train_digits.COMPARE_STEPS} steps, tolerance {train_digits.CURVE_RTOL:.0e}")
        assert r.verification > 0.5 + VERIFICATION_MARGIN, f"{r.loss_name}: verification {r.verification:.3f}"
        assert r.closed > 1 / train_digits.TRAIN_CLASSES + CLOSED_SET_MARGIN, f"{r.loss_name}: closed {r.closed:.3f}"
    assert sum(r.max_rel_diff is not None for r in results) == len(train_digits.LOSSES) - 1
