"""Sub-center ArcFace data cleaning: fastmargin.subcenter (dominant sub-centers, outliers,
purification) and its command line, fastmargin.purify.

Planted noise is found with a known weight; SubCenterArcFaceLoss.get_outliers is the same
computation (tests/test_modules.py holds it against PML); a tiny case is checked by hand;
batching changes nothing; the command line writes what the library computes and rejects
bad inputs with a message; and the TPAMI recipe runs end to end: train sub-center ArcFace
on noisy labels, purify, retrain ArcFace on the clean set and beat the noisy-trained one.
"""

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmargin import ArcFaceLoss, CombinedMarginLoss, SubCenterArcFaceLoss
from fastmargin.purify import main
from fastmargin.subcenter import purify, sub_center_stats


def precision_recall(dropped: torch.Tensor, planted: torch.Tensor) -> tuple[float, float]:
    """Of the dropped rows, the fraction planted; of the planted rows, the fraction dropped."""
    hits = int((dropped & planted).sum())
    return hits / max(int(dropped.sum()), 1), hits / int(planted.sum())


def dropped_mask(num_rows: int, kept_indices: torch.Tensor) -> torch.Tensor:
    dropped = torch.ones(num_rows, dtype=torch.bool)
    dropped[kept_indices] = False
    return dropped


# -------------------------------------------------------------------------------------------
# 1. Planted noise, known weight.

def planted_noise(seed=0, num_classes=20, k=3, dim=32, per_class=40, noise=0.3):
    """Identities as clusters on the sphere about random directions (about 16 degrees of
    spread; random directions in 32-D are 90 +- 10 degrees apart), with random norms; a
    fraction `noise` of the rows relabelled with a random other identity (closed-set noise).

    The weight is known: class c's sub-center c % k lies on its cluster's direction, its
    other sub-centers point anywhere (where a trained model gathers noisy samples).

    Returns x (N, D), weight (C*K, D), labels (N,) as given, planted (N,) bool, all float64.
    """
    gen = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(num_classes, dim, generator=gen, dtype=torch.float64), dim=1)
    weight = torch.randn(num_classes * k, dim, generator=gen, dtype=torch.float64)
    weight[torch.arange(num_classes) * k + torch.arange(num_classes) % k] = directions
    weight *= torch.empty(num_classes * k, 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    true = torch.arange(num_classes).repeat_interleave(per_class)
    x = directions[true] + 0.05 * torch.randn(len(true), dim, generator=gen, dtype=torch.float64)
    x *= torch.empty(len(true), 1, dtype=torch.float64).uniform_(0.5, 3.0, generator=gen)
    planted = torch.rand(len(true), generator=gen) < noise
    shift = torch.randint(1, num_classes, (len(true),), generator=gen)
    labels = torch.where(planted, (true + shift) % num_classes, true)
    return x, weight, labels, planted


def test_known_weight_finds_the_planted_noise():
    x, weight, labels, planted = planted_noise()
    stats = sub_center_stats(x, weight, labels, 3)
    result = purify(stats, threshold=75)
    precision, recall = precision_recall(dropped_mask(len(x), result.kept_indices), planted)
    print(f"known weight, 30% planted: precision {precision:.3f}, recall {recall:.3f}")
    # Clean rows lie about 16 degrees from their center and planted ones about 90 degrees
    # away, but 5-10% of random 32-D directions are closer than 75 degrees.
    assert precision >= 0.99, f"precision {precision:.3f} < 0.99"
    assert recall >= 0.85, f"recall {recall:.3f} < 0.85"
    assert stats.dominant.tolist() == [c % 3 for c in range(20)], "the dominant sub-center is c % 3"
    share = stats.dominant_share()
    assert share.min() >= 0.5 and share.max() <= 1.0, f"dominant share {share.min():.3f}..{share.max():.3f}"
    assert result.num_classes == 20
    assert torch.equal(result.new_labels, labels[result.kept_indices]), "no class removed: labels unchanged"


def test_get_outliers_is_the_subcenter_module():
    x, weight, labels, _ = planted_noise(seed=1)
    labels[::50] = -100  # ignore_index rows take no part
    loss = SubCenterArcFaceLoss(num_classes=20, embedding_size=32, sub_centers=3).double()
    with torch.no_grad():
        loss.W.copy_(weight.t())
    stats = sub_center_stats(x, weight, labels, 3)
    for threshold in (60, 75):
        outliers, dominant_centers = loss.get_outliers(x, labels, threshold=threshold)
        assert torch.equal(outliers, stats.outliers(threshold))
        assert torch.equal(dominant_centers, weight[stats.dominant_rows()].t())
    assert not set(stats.outliers(75).tolist()) & set(range(0, len(x), 50)), "an ignored row is an outlier"


# -------------------------------------------------------------------------------------------
# 2. A case small enough to check by hand.

def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_hand_checked_purification():
    # 2-D, K = 2; sub-center rows of classes 0..3 (class 1 has no samples).
    weight = torch.tensor([unit(0), unit(180), unit(0), unit(90),
                           unit(90), unit(270), unit(225), unit(45)], dtype=torch.float64)
    angles = [10, 5, 40, 100, 230, -20, 170, 50, 0]
    labels = torch.tensor([0, 2, 3, 0, 3, 0, 2, 3, -100])
    norms = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 0.25, 4.0, 1.0], dtype=torch.float64)
    x = torch.tensor([unit(a) for a in angles], dtype=torch.float64) * norms.unsqueeze(1)
    stats = sub_center_stats(x, weight, labels, 2)

    # Class 0: rows 0, 5 nearest 0 deg, row 3 (100 deg) nearest 180: dominant 0, row 3 is
    # 100 deg from it. Class 2: rows 1 (5 deg) and 6 (170 deg) are both nearest 90 deg,
    # at 85 and 80 deg. Class 3: rows 2, 7 nearest 45 deg (sub-center 1), row 4 nearest 225.
    assert stats.votes.tolist() == [[2, 1], [0, 0], [2, 0], [1, 2]]
    assert stats.dominant.tolist() == [0, 0, 0, 1]
    assert stats.present.tolist() == [True, False, True, True]
    torch.testing.assert_close(stats.dominant_share(), torch.tensor([2 / 3, math.nan, 1.0, 2 / 3],
                                                                    dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(torch.rad2deg(torch.acos(stats.cos_to_dominant())),
                               torch.tensor([10, 85, 5, 100, 175, 20, 80, 5, math.nan], dtype=torch.float64),
                               equal_nan=True)
    assert stats.outliers(75).tolist() == [3, 1, 6, 4], "class 0's, then class 2's, then class 3's"

    at_75 = purify(stats, threshold=75)
    assert at_75.kept_indices.tolist() == [0, 2, 5, 7], "outliers and the ignored row are dropped"
    assert at_75.class_map.tolist() == [0, -1, -1, 1], "class 1 had no samples, class 2 lost all"
    assert at_75.new_labels.tolist() == [0, 1, 0, 1]
    assert at_75.num_classes == 2

    at_90 = purify(stats, threshold=90)  # rows 1 and 6 (85, 80 deg) stay; class 2 survives
    assert at_90.kept_indices.tolist() == [0, 1, 2, 5, 6, 7]
    assert at_90.class_map.tolist() == [0, -1, 1, 2]
    assert at_90.new_labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_batch_size_changes_nothing():
    x, weight, labels, _ = planted_noise(seed=2, per_class=15)
    labels[3] = -100
    whole = sub_center_stats(x, weight, labels, 3, batch_size=len(x))
    expected = purify(whole, 75)
    for batch_size in (1, 7):
        stats = sub_center_stats(x, weight, labels, 3, batch_size=batch_size)
        assert torch.equal(stats.cos.nan_to_num(), whole.cos.nan_to_num()), f"batch_size={batch_size}: cos"
        assert torch.equal(stats.votes, whole.votes)
        result = purify(stats, 75)
        for name in ("kept_indices", "new_labels", "class_map"):
            got, want = getattr(result, name), getattr(expected, name)
            assert torch.equal(got, want), f"batch_size={batch_size}, {name}"


def test_weight_in_pml_layout_is_a_view():
    """PML's W (D, C*K) is passed as W.t(), a strided view: same answer as a copy."""
    x, weight, labels, _ = planted_noise(seed=3, per_class=10)
    pml_w = weight.t().contiguous()
    strided = sub_center_stats(x, pml_w.t(), labels, 3)
    assert torch.equal(strided.cos, sub_center_stats(x, weight, labels, 3).cos)


# -------------------------------------------------------------------------------------------
# 3. The command line.

C, K, D = 20, 3, 32


def save_weight(path, weight, form):
    """Saves the (C*K, D) weight as a fastmargin/PML SubCenterArcFaceLoss state_dict ('W'),
    a CombinedMarginLoss state_dict ('weight'), or a bare tensor in either layout."""
    if form == "state_dict W":
        module = SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=K)
        module.W.data = weight.t().float().contiguous()
        saved = module.state_dict()
    elif form == "state_dict weight":
        module = CombinedMarginLoss(num_classes=C, embedding_size=D, sub_centers=K)
        module.weight.data = weight.float()
        saved = module.state_dict()
    else:
        saved = weight.t().contiguous() if form == "tensor (D, C*K)" else weight
    torch.save(saved, path)


@pytest.fixture
def inputs(tmp_path):
    x, weight, labels, _ = planted_noise(seed=4, num_classes=C, k=K, dim=D, per_class=5)
    np.save(tmp_path / "E.npy", x.float().numpy())
    np.save(tmp_path / "L.npy", labels.numpy())
    save_weight(tmp_path / "W.pt", weight, "state_dict W")
    return tmp_path, x.float(), weight.float(), labels


def cli_args(tmp_path, *extra):
    return ["--embeddings", str(tmp_path / "E.npy"), "--labels", str(tmp_path / "L.npy"),
            "--weights", str(tmp_path / "W.pt"), "--k", str(K), "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("form", ["state_dict W", "state_dict weight", "tensor (D, C*K)", "tensor (C*K, D)"])
def test_cli_writes_what_the_library_computes(inputs, form, capsys):
    tmp_path, x, weight, labels = inputs
    save_weight(tmp_path / "W.pt", weight, form)
    # batch size 7: 15 batches, past the progress bar's minimum (tqdm stays silent off a tty).
    main(cli_args(tmp_path, "--threshold", "75", "--batch-size", "7"))
    expected = purify(sub_center_stats(x, weight, labels, K), 75)
    out = tmp_path / "out"
    for name in ("kept_indices", "new_labels", "class_map"):
        saved = np.load(out / f"{name}.npy")
        assert saved.dtype == np.int64, f"{name}: {saved.dtype}"
        assert saved.tolist() == getattr(expected, name).tolist(), name
    report = json.loads((out / "report.json").read_text())
    kept = len(expected.kept_indices)
    assert 0 < kept < 100, "some rows dropped, some kept"
    assert report["samples"] == {"total": 100, "kept": kept, "dropped": 100 - kept}
    assert report["identities"]["total"] == C
    assert report["identities"]["kept"] == expected.num_classes
    assert report["sub_centers"] == K and report["threshold_degrees"] == 75
    layout = "'W' (D, C*K)" if form in ("state_dict W", "tensor (D, C*K)") else "'weight' (C*K, D)"
    assert report["inputs"]["weight_layout"].startswith(layout)
    share = report["dominant_share"]
    assert 0 < share["min"] <= share["q25"] <= share["median"] <= share["q75"] <= share["max"] <= 1
    printed = capsys.readouterr()
    assert f"samples:    {kept} kept of 100" in printed.out
    assert "dominant sub-center share" in printed.out
    assert report["warnings"] == [] and "warning" not in printed.err


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_warns_when_the_threshold_drops_most_samples(inputs, quiet, capsys):
    """--threshold 1.3 (75 degrees in radians, by mistake) drops nearly every sample: the run
    completes (exit 0), and says so on stderr, even with --quiet, and in report.json."""
    tmp_path = inputs[0]
    main(cli_args(tmp_path, "--threshold", "1.3", *(["--quiet"] if quiet else [])))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    dropped = report["samples"]["dropped"]
    assert dropped > 50
    err = capsys.readouterr().err
    message = (f"threshold 1.3 degrees makes {dropped} of 100 samples ({dropped}%) outliers: the threshold "
               "is an angle in degrees, 75 in the paper (1.3 radians would be 74.5 degrees)")
    assert report["warnings"] == [message]
    assert f"warning: {message}" in err


def test_purify_warns_when_most_samples_are_outliers():
    x, weight, labels, _ = planted_noise()
    stats = sub_center_stats(x, weight, labels, 3)
    with pytest.warns(UserWarning, match=r"of 800 samples \(\d+%\) outliers: the threshold is an angle in degrees"):
        purify(stats, threshold=1.3)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_progress_bar_on_a_terminal_unless_quiet(inputs, quiet, monkeypatch):
    pytest.importorskip("tqdm")
    tmp_path = inputs[0]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(cli_args(tmp_path, "--batch-size", "10", *(["--quiet"] if quiet else [])))
    drawn = "purify: 100%|" in terminal.getvalue()
    assert drawn != quiet, f"quiet={quiet}: stderr {terminal.getvalue()!r}"


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fastmargin.purify", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--embeddings", "--labels", "--weights", "--k", "--threshold", "--out", "--batch-size"):
        assert option in result.stdout
    assert "in degrees, not radians" in " ".join(result.stdout.split())


def break_missing_file(tmp_path):
    (tmp_path / "E.npy").unlink()


def break_label_count(tmp_path):
    np.save(tmp_path / "L.npy", np.zeros(99, dtype=np.int64))


def break_label_range(tmp_path):
    labels = np.load(tmp_path / "L.npy")
    labels[17] = C
    np.save(tmp_path / "L.npy", labels)


def break_k(tmp_path):
    torch.save({"W": torch.randn(D, C * K + 1)}, tmp_path / "W.pt")


def break_dim(tmp_path):
    torch.save({"W": torch.randn(D + 1, C * K)}, tmp_path / "W.pt")


def break_keys(tmp_path):
    torch.save({"centers": torch.randn(D, C * K)}, tmp_path / "W.pt")


def break_square_tensor(tmp_path):
    torch.save(torch.randn(D, D), tmp_path / "W.pt")


def break_float_labels(tmp_path):
    np.save(tmp_path / "L.npy", np.zeros(100, dtype=np.float32))


@pytest.mark.parametrize("breaks, message", [
    (break_missing_file, "E.npy: no such file"),
    (break_label_count, "99 labels but the embeddings have 100 rows"),
    (break_label_range, f"labels[17] = {C} is outside [0, {C})"),
    (break_k, f"{C * K + 1} sub-center vectors is not a multiple of --k {K}"),
    (break_dim, "does not fit embeddings of dim 32"),
    (break_keys, "need exactly one of the keys 'W', 'weight'; found keys ['centers']"),
    (break_square_tensor, f"a bare ({D}, {D}) tensor could be either layout"),
    (break_float_labels, "need a 1-D integer array"),
], ids=lambda v: v.__name__[6:] if callable(v) else None)
def test_cli_bad_input_is_a_clear_error(inputs, breaks, message, capsys):
    tmp_path = inputs[0]
    breaks(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), "nothing written on an error"


# -------------------------------------------------------------------------------------------
# 4. End to end: the TPAMI recipe on synthetic noisy identities.

PAIRS, P, EMBED = 5, 32, 16


def twin_identities(seed=0, per_class=30, flip=0.4):
    """Ten identities in pairs of twins: a twin pair lies 30 degrees apart in a 32-D input
    space (radius 6), each twin spread along the pair's own axis (sd 1.5), so twins overlap
    and that is where accuracy is lost; different pairs are orthogonal. Noise: `flip` of
    the first twin of pair j is labelled as the second twin of pair j+1, a distant identity
    (closed-set, concentrated: 40% of 5 identities, 20% of all labels).

    Returns (x, noisy labels, planted (bool)) for training and (x, true labels) held out.
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(P, P, generator=gen))
    half = math.radians(15)
    axis = basis[PAIRS:2 * PAIRS].repeat_interleave(2, dim=0)  # (C, P): each class's pair axis
    sign = torch.tensor([1.0, -1.0]).repeat(PAIRS).unsqueeze(1)
    means = 6 * (math.cos(half) * basis[:PAIRS].repeat_interleave(2, dim=0) + sign * math.sin(half) * axis)

    def draw(n):
        y = torch.arange(2 * PAIRS).repeat_interleave(n)
        along = 1.5 * torch.randn(len(y), 1, generator=gen) * axis[y]
        return means[y] + along + 0.3 * torch.randn(len(y), P, generator=gen), y

    x, y = draw(per_class)
    x_test, y_test = draw(per_class)
    noisy, planted = y.clone(), torch.zeros(len(y), dtype=torch.bool)
    for j in range(PAIRS):
        rows = (y == 2 * j).nonzero().flatten()
        picked = rows[torch.randperm(len(rows), generator=gen)[: round(flip * len(rows))]]
        noisy[picked] = (2 * j + 3) % (2 * PAIRS)
        planted[picked] = True
    return x, noisy, planted, x_test, y_test


def train(x, labels, loss, seed, steps=150):
    """A linear embedding P -> EMBED trained with `loss` (full batch, Adam); returns it."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(P, EMBED, bias=False)
    optimizer = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(net(x), labels).backward()
        optimizer.step()
    return net


@torch.no_grad()
def accuracy(net, loss, x, y, old_label=None):
    """Nearest class center (the columns of W) of each embedding, mapped to the original
    labels by old_label when the classes were renumbered."""
    predicted = (F.normalize(net(x), dim=1) @ F.normalize(loss.W, dim=0)).argmax(dim=1)
    if old_label is not None:
        predicted = old_label[predicted]
    return (predicted == y).double().mean().item()


def recipe(seed):
    """Sub-center ArcFace (K = 3) on the noisy labels, purify at 75 degrees, ArcFace on the
    purified set and on the noisy set. Returns (precision, recall, accuracy trained on
    noisy, accuracy trained on purified), accuracies on held-out clean data."""
    x, noisy, planted, x_test, y_test = twin_identities(seed)
    num_classes = 2 * PAIRS
    torch.manual_seed(seed)
    sub_center = SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=EMBED, sub_centers=3)
    net = train(x, noisy, sub_center, seed)
    with torch.no_grad():
        stats = sub_center_stats(net(x), sub_center.W.t(), noisy, 3)
    clean = purify(stats, threshold=75)
    assert clean.num_classes == num_classes, "no identity is emptied: 60% of each source stays"
    precision, recall = precision_recall(dropped_mask(len(x), clean.kept_indices), planted)

    torch.manual_seed(seed)
    on_noisy = ArcFaceLoss(num_classes=num_classes, embedding_size=EMBED)
    noisy_accuracy = accuracy(train(x, noisy, on_noisy, seed), on_noisy, x_test, y_test)
    torch.manual_seed(seed)
    on_clean = ArcFaceLoss(num_classes=clean.num_classes, embedding_size=EMBED)
    net_clean = train(x[clean.kept_indices], clean.new_labels, on_clean, seed)
    old_label = (clean.class_map >= 0).nonzero().flatten()
    return precision, recall, noisy_accuracy, accuracy(net_clean, on_clean, x_test, y_test, old_label)


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a loaded machine every
    parallel region waits for a descheduled thread: this test took 30 s on two busy cores
    with two threads, 1 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_purify_then_retrain_beats_training_on_noise(one_thread):
    """Three seeds. A small linear model sometimes pulls a source twin onto its flip target
    (a sub-center and the embedding can absorb the flipped rows at the same cost); that
    pair's noise is then inseparable, so a seed's recall is 0.6, 0.8 or 1 less a few rows.
    Over seeds 0..9 recall ranged 0.6..0.8, precision 0.97..1, the gain +0.02..+0.09."""
    rows = np.array([recipe(seed) for seed in range(3)])
    for seed, (precision, recall, noisy_accuracy, clean_accuracy) in enumerate(rows):
        print(f"seed {seed}: purification precision {precision:.3f}, recall {recall:.3f}; held-out "
              f"accuracy trained on noisy {noisy_accuracy:.3f}, on purified {clean_accuracy:.3f}")
    precision, recall, noisy_accuracy, clean_accuracy = rows.mean(axis=0)
    print(f"mean: precision {precision:.3f}, recall {recall:.3f}, "
          f"accuracy {noisy_accuracy:.3f} -> {clean_accuracy:.3f}")
    assert rows[:, 0].min() >= 0.9, f"precision {rows[:, 0]} not all >= 0.9"
    assert recall >= 0.65, f"mean recall {recall:.3f} < 0.65"
    assert (rows[:, 3] > rows[:, 2]).all(), f"purified {rows[:, 3]} not all above noisy {rows[:, 2]}"
    assert clean_accuracy - noisy_accuracy >= 0.02, f"mean gain {clean_accuracy - noisy_accuracy:+.3f} < 0.02"
