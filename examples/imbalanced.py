"""Imbalanced binary classification: BCE, BCE + pos_weight from class_weights, sigmoid focal.

    PYTHONPATH=src python examples/imbalanced.py

The bundled breast-cancer data (crossent.data, 212 malignant / 357 benign) with the
minority class subsampled: training and validation keep every benign tumour of their half
and only ``--positive-fraction`` of the malignant ones (default 0.1: about 1 positive in
17). A logistic regression on standardised features is trained full-batch (Adam, 300
steps) with each loss, from the same initialisation; the table reports, on the validation
half, the exact mean BCE (``return_parts``: a float64 sum over a count), recall and
precision at threshold 0.5, and PR-AUC (average precision). Repeated over ``--seeds``
splits; means and the range over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import crossent
from crossent.class_weights import count_labels, pos_weight_from_counts
from crossent.data import load_breast_cancer


def split(seed: int, positive_fraction: float):
    """(x_train, y_train, x_val, y_val): a stratified half/half split, positives subsampled."""
    data = load_breast_cancer()
    g = torch.Generator().manual_seed(seed)
    parts = ([], [])
    for label in (0, 1):
        idx = (data.target == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        half = len(idx) // 2
        for i, chunk in enumerate((idx[:half], idx[half:])):
            if label == 1:
                chunk = chunk[:max(2, round(positive_fraction * len(chunk)))]
            parts[i].append(chunk)
    train, val = (torch.cat(p) for p in parts)
    x, y = data.features, data.target.float()
    mean, std = x[train].mean(0), x[train].std(0)
    return (x[train] - mean) / std, y[train], (x[val] - mean) / std, y[val]


def average_precision(scores: torch.Tensor, y: torch.Tensor) -> float:
    """PR-AUC as average precision: mean over positives of the precision at their rank."""
    order = torch.argsort(scores, descending=True)
    hits = y[order]
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def train(loss_fn, x, y, seed: int, steps: int = 300):
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x).squeeze(1), y).backward()
        opt.step()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positive-fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
    results = {}
    for seed in range(args.seeds):
        xt, yt, xv, yv = split(seed, args.positive_fraction)
        counts = count_labels(yt.unsqueeze(1), multilabel=True)
        pos_weight = pos_weight_from_counts(*counts)
        losses = {
            "BCE": lambda z, t: crossent.binary_cross_entropy_with_logits(z, t),
            f"BCE + pos_weight (= {pos_weight.item():.1f})":
                lambda z, t: crossent.binary_cross_entropy_with_logits(z, t, pos_weight=pos_weight),
            "sigmoid focal (alpha=0.25, gamma=2)":
                lambda z, t: crossent.sigmoid_focal_loss(z, t, reduction="mean"),
        }
        for name, fn in losses.items():
            key = name.split(" (=")[0]
            model = train(fn, xt, yt, seed)
            with torch.no_grad():
                z = model(xv).squeeze(1)
                parts = crossent.binary_cross_entropy_with_logits(z, yv, return_parts=True)
                pred = z > 0
                tp = float((pred & (yv == 1)).sum())
                row = dict(bce=float(parts.total / parts.denominator), recall=tp / float(yv.sum()),
                           precision=tp / max(1.0, float(pred.sum())), ap=average_precision(z, yv))
            results.setdefault(key, []).append(row)
    n_pos, n = int(yv.sum()), len(yv)
    print(f"validation: {n} tumours, {n_pos} malignant (positive fraction {args.positive_fraction}); "
          f"{args.seeds} seeds, mean [min, max]")
    print(f"| loss | validation BCE (exact mean) | recall @ 0.5 | precision @ 0.5 | PR-AUC |")
    print("|---|---|---|---|---|")
    for key, rows in results.items():
        cells = []
        for metric in ("bce", "recall", "precision", "ap"):
            vals = [r[metric] for r in rows]
            cells.append(f"{statistics.mean(vals):.4f} [{min(vals):.3f}, {max(vals):.3f}]")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
