"""The benchmark suite at a tiny shape, so it cannot rot: every provider usable here runs
through the sweep's own command, its rows carry every column, plots and tables are drawn
from them, and every margin provider computes the loss the reference does."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not installed; it is imported from the checkout
    sys.path.insert(0, str(REPO))

import fastmargin  # noqa: E402
from bench import measure, plot, providers  # noqa: E402
from bench.sweep import SWEEPS  # noqa: E402
from fastmargin import profiling  # noqa: E402
from fastmargin.__main__ import _side_by_side as side_by_side  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """`python -m bench.sweep --sweep smoke` into a temporary folder: (folder, its output)."""
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "bench.sweep", "--sweep", "smoke", "--out", str(out),
                             "--no-readme"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def _rows(out: Path) -> list[dict]:
    (path,) = out.glob("*.csv")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == measure.COLUMNS
        return list(reader)


def test_every_usable_provider_has_rows(smoke_run):
    out, stdout = smoke_run
    rows = _rows(out)
    expected = {p.name for p in providers.available(CPU) if any(p.supports(c) for c in SWEEPS["smoke"].cases)}
    assert {r["provider"] for r in rows} == expected
    errors = [f"{r['provider']} {r['B']}x{r['C']}: {r['unit']}" for r in rows if r["metric"] in plot.FAILURES]
    assert not errors, errors
    for row in rows:
        assert all(row[c] != "" for c in ("op", "provider", "mode", "measure", "metric", "unit", "median",
                                          "device", "torch", "timer", "commit", "date")), row
    times = [r for r in rows if r["metric"] == "time"]
    assert times and all(r["timer"] == "perf_counter" and int(r["n"]) >= 3 for r in times)
    assert {r["provider"] for r in rows if r["metric"] == "frac_matmul"} >= {"fastmargin:reference"}
    memory = [r for r in rows if r["metric"] == "peak_mem" and r["provider"] == "fastmargin:reference"]
    assert memory and all(r["timer"] == profiling.RSS_METHOD for r in memory)
    for name in providers.unavailable(CPU):
        assert f"unavailable: {name}" in stdout


def test_plots_and_tables_from_the_rows(smoke_run, tmp_path):
    out, _ = smoke_run
    (path,) = out.glob("*.csv")
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{path.stem}_fp32.png"] and pngs[0].stat().st_size > 10_000
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{plot.BEGIN}\nold\n{plot.END}\n\ntail\n")
    plot.update_readme(readme, [path])
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert "| fastmargin:reference |" in text and "B=8 C=50 K=3" in text

    # README.md's CPU summary: fastmargin:cpu's time and its ratio to each peer, from the rows
    readme.write_text(f"# x\n\n{plot.SUMMARY_BEGIN}\nold\n{plot.SUMMARY_END}\n\ntail\n")
    plot.update_readme(readme, [path], summary=True)
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    median = {(r["provider"], r["K"]): float(r["median"]) for r in _rows(out)
              if r["metric"] == "time" and r["mode"] == "fwd_bwd"}
    for K, pml in (("1", "pml:ArcFaceLoss"), ("3", "pml:SubCenterArcFaceLoss")):
        (line,) = [t for t in text.splitlines() if t.startswith(f"| B=8 C=50{' K=3' if K == '3' else ''} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        ours, floor, theirs = median[("fastmargin:cpu", K)], median[("gemm_floor", K)], median[(pml, K)]
        assert cells[1] == plot._fmt(ours)
        assert cells[2] == plot._fmt(floor) and cells[5] == f"{ours / floor:.2f}"
        assert cells[4] == plot._fmt(theirs) and cells[7] == f"{ours / theirs:.2f}"


def test_rss_method_reads_a_known_allocation():
    assert 0.95 < profiling.validate_rss_method(128 * profiling.MIB) < 1.10


def _margin_reference(provider, case, workload) -> torch.Tensor:
    kwargs = providers.LOSS_KWARGS[provider.loss_for(case)]
    x, w, labels = workload.x.detach(), workload.weight.detach(), workload.labels
    if kwargs is None:
        return F.cross_entropy(F.linear(x, w), labels)
    return fastmargin.margin_cross_entropy(x, w, labels, sub_centers=case.K, backend="reference", **kwargs)


@pytest.mark.parametrize("case", SWEEPS["smoke"].cases, ids=lambda c: c.id)
def test_providers_compute_the_reference_loss(case):
    for provider in providers.available(CPU):
        if provider.loss == "matmul" or not provider.supports(case):
            continue
        workload = provider.build(case, CPU)
        got = workload.forward()
        want = _margin_reference(provider, case, workload)
        torch.testing.assert_close(got.detach().float(), want.float(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=provider.name: f"{name}: {m}")


def test_python_m_fastmargin_reports(capsys):
    result = subprocess.run([sys.executable, "-m", "fastmargin", "--no-bench"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for backend in fastmargin.BACKENDS:
        assert f"  {backend} " in result.stdout
    side_by_side(["fastmargin:reference"], (16, 100, 8), CPU)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fastmargin:reference")]
    assert len(line.split()) == 7, line  # loss, difference, median, spread, n, peak MiB
