"""crossent.class_weights: the formulas (against float64 compositions from the papers),
counting over tensors and DataLoaders with ignore_index, and every guardrail."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import crossent
from crossent import CrossentTypeError, CrossentValueError
from crossent.class_weights import (
    LabelCounts,
    count_labels,
    effective_number,
    inverse_frequency,
    pos_weight_from_counts,
)

from _helpers import assert_close


def test_inverse_frequency_balances_the_total_weight_of_each_class():
    counts = torch.tensor([500, 30, 7, 1000])
    w = inverse_frequency(counts, dtype=torch.float64)
    totals = w * counts
    assert_close(totals, torch.full((4,), counts.sum() / 4.0, dtype=torch.float64))
    assert_close((w * counts).sum(), counts.sum().double())  # the loss keeps its scale
    assert_close(inverse_frequency([5, 5, 5]), torch.ones(3))  # balanced data: all ones


@pytest.mark.parametrize("beta", (0.0, 0.9, 0.99, 0.999, 0.9999))
def test_effective_number_matches_cui_et_al(beta):
    counts = [5000, 2000, 50, 3]
    w = effective_number(counts, beta, dtype=torch.float64)
    eff = [(1 - beta**n) / (1 - beta) if beta else 1.0 for n in counts]  # paper, eq. (3)
    raw = [1 / e for e in eff]
    want = torch.tensor([r * len(counts) / sum(raw) for r in raw], dtype=torch.float64)
    assert_close(w, want)
    assert w.sum().item() == pytest.approx(len(counts))


def test_effective_number_limits():
    counts = [400, 100, 20]
    assert_close(effective_number(counts, 0.0), torch.ones(3))
    inv = inverse_frequency(counts, dtype=torch.float64)
    near_one = effective_number(counts, 1 - 1e-12, dtype=torch.float64)
    # beta -> 1: inverse frequency; 1 - beta**n at beta = 1 - 1e-12 keeps about 6 digits in float64
    assert_close(near_one, inv * 3 / inv.sum(), rtol=1e-6)


def test_pos_weight_from_counts_is_negatives_over_positives():
    assert pos_weight_from_counts([100], [300]).tolist() == [3.0]
    assert_close(pos_weight_from_counts([10, 40], [90, 60], smoothing=1), torch.tensor([91 / 11, 61 / 41]))


def test_count_labels_tensor_with_ignore_index():
    y = torch.tensor([[0, 2, -100], [2, 2, 1]])
    assert count_labels(y, ignore_index=-100).tolist() == [1, 1, 3]
    assert count_labels(y, 5, ignore_index=-100).tolist() == [1, 1, 3, 0, 0]


def test_count_labels_over_a_dataloader_equals_the_whole_tensor():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (103,), generator=g)
    y[::10] = -1
    x = torch.randn(103, 3, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    assert torch.equal(count_labels(loader, 4, ignore_index=-1), count_labels(y, 4, ignore_index=-1))
    dict_loader = [{"input": x[i : i + 20], "labels": y[i : i + 20]} for i in range(0, 103, 20)]
    assert torch.equal(count_labels(dict_loader, 4, ignore_index=-1), count_labels(y, 4, ignore_index=-1))
    # a batch where the last class is absent still counts into the full length
    assert count_labels([torch.tensor([0, 1]), torch.tensor([3])]).tolist() == [1, 1, 0, 1]
    assert count_labels([(x, y)], target=lambda b: b[1][1:6], num_classes=4).sum() == 5


def test_count_labels_multilabel_feeds_pos_weight():
    t = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    counts = count_labels(t, multilabel=True, ignore_index=-1)
    assert isinstance(counts, LabelCounts)
    assert counts.positives.tolist() == [2, 1, 1] and counts.negatives.tolist() == [2, 3, 2]
    pw = pos_weight_from_counts(*counts)
    assert_close(pw, torch.tensor([1.0, 3.0, 2.0]))
    loader = DataLoader(TensorDataset(torch.randn(4, 2), t), batch_size=3)
    c2 = count_labels(loader, multilabel=True, ignore_index=-1)
    assert torch.equal(c2.positives, counts.positives) and torch.equal(c2.negatives, counts.negatives)


def test_weights_plug_into_the_losses():
    y = torch.tensor([0, 0, 0, 1])
    w = inverse_frequency(count_labels(y, 2))
    logits = torch.zeros(4, 2)
    # equal logits: every row has loss log 2, the weighted mean is still log 2
    assert crossent.cross_entropy(logits, y, w).item() == pytest.approx(math.log(2))
    t = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    pw = pos_weight_from_counts(*count_labels(t, multilabel=True))
    assert pw.tolist() == [3.0]
    crossent.nn.BCEWithLogitsLoss(pos_weight=pw)(torch.zeros(4, 1), t)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: inverse_frequency([3, 0, 2]), CrossentValueError, r"zero counts at \[1\].*smoothing=1"),
        (lambda: inverse_frequency([3, -1]), CrossentValueError, "finite and >= 0"),
        (lambda: inverse_frequency(torch.ones(2, 2)), CrossentValueError, "1-D tensor"),
        (lambda: inverse_frequency("abc"), CrossentTypeError, "counts"),
        (lambda: inverse_frequency([1, 2], smoothing=-1), CrossentValueError, "smoothing"),
        (lambda: effective_number([1, 2], beta=1.0), CrossentValueError, r"`beta` in \[0, 1\)"),
        (lambda: effective_number([0, 2]), CrossentValueError, "zero counts"),
        (lambda: pos_weight_from_counts([0, 1], [3, 3]), CrossentValueError, "positives"),
        (lambda: pos_weight_from_counts([1, 1], [3]), CrossentValueError, "same shape"),
        (lambda: count_labels(torch.tensor([0.5, 1.0])), CrossentTypeError, "multilabel=True"),
        (lambda: count_labels(torch.tensor([0, -1])), CrossentValueError, "ignore_index=-1"),
        (lambda: count_labels(torch.tensor([0, 7]), 3), CrossentValueError, "num_classes=3"),
        (lambda: count_labels(torch.tensor([[0.0, 2.0]]), multilabel=True), CrossentValueError, "0 and 1"),
        (lambda: count_labels([]), CrossentValueError, "empty"),
        (lambda: count_labels([object()]), CrossentTypeError, "target=lambda"),
        (lambda: count_labels(torch.tensor([0]), 0), CrossentValueError, "num_classes"),
    ],
)
def test_guardrails(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_imbalanced_example_runs_and_pos_weight_raises_recall(capsys):
    """examples/imbalanced.py (the docs' table) on one split: every loss trains, the table prints."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "imbalanced.py"
    spec = importlib.util.spec_from_file_location("imbalanced_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--seeds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| BCE") or line.startswith("| sigmoid")]
    assert len(rows) == 3
    xt, yt, xv, yv = module.split(0, 0.1)
    assert 0 < yt.mean() < 0.1 and 0 < yv.mean() < 0.1  # the minority really is subsampled
    assert module.average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
