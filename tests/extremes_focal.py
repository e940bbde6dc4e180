"""Extreme-value accuracy of the focal losses against mpmath (used by test_focal_exact.py).

Run as a script to print the worst errors quoted in README.md's exactness table::

    PYTHONPATH=src:tests .venv/bin/python tests/extremes_focal.py

Same measures as ``extremes.py`` (ulp of the truth, or of the condition-aware scale for
gradients of soft targets: the sum of the magnitudes of the gradient's terms). Logits
run over ``extremes.logit_grid`` (0, +-1e-8 ... +-1e4); the truth is a 60-digit mpmath
evaluation at the exact float inputs.
"""

from __future__ import annotations

import functools

import mpmath
import numpy as np
import torch
import torch.nn.functional as TF

import crossent
from extremes import Measured, logit_grid

mpmath.mp.dps = 60


@functools.lru_cache(maxsize=None)
def sigmoid_focal_truth(x: float, t: float, alpha: float, gamma: float):
    """(loss, gradient, gradient scale) of a_t (1-p_t)^gamma BCE(x, t), exactly."""
    X, T, G = mpmath.mpf(x), mpmath.mpf(t), mpmath.mpf(gamma)
    s, u = 1 / (1 + mpmath.exp(-X)), 1 / (1 + mpmath.exp(X))
    ce = T * mpmath.log1p(mpmath.exp(-X)) + (1 - T) * mpmath.log1p(mpmath.exp(X))
    m = T * u + (1 - T) * s
    a = alpha * T + (1 - alpha) * (1 - T) if alpha >= 0 else mpmath.mpf(1)
    mg = m**G if gamma else mpmath.mpf(1)
    g1, g2 = a * mg * (1 - T) * s, a * mg * T * u
    g3 = a * G * ce * m ** (G - 1) * s * u * (1 - 2 * T) if gamma else mpmath.mpf(0)
    return float(a * ce * mg), float(g1 - g2 + g3), float(abs(g1) + abs(g2) + abs(g3))


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction='none'), restated."""
    p = torch.sigmoid(inputs)
    ce_loss = TF.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _vg(fn, x, t):
    x = x.clone().requires_grad_()
    out = fn(x, t)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach().double().numpy(), g.double().numpy()


def measure_sigmoid_focal(dtype: torch.dtype, t: float, gamma: float, alpha: float = 0.25, backend=None) -> Measured:
    x = logit_grid(dtype)
    tt = torch.full_like(x, t)
    truth = np.array([sigmoid_focal_truth(float(v), float(tt[0]), alpha, gamma) for v in x.double()])
    ours, gours = _vg(lambda x, t: crossent.sigmoid_focal_loss(x, t, alpha, gamma, backend=backend), x, tt)
    theirs, gtheirs = _vg(lambda x, t: torchvision_sigmoid_focal_loss(x, t, alpha, gamma), x, tt)
    hard = t in (0.0, 1.0)
    return Measured(
        f"sigmoid_focal t={t} gamma={gamma}",
        dtype,
        truth[:, 0],
        ours,
        theirs,
        truth[:, 1],
        gours,
        gtheirs,
        None if hard else truth[:, 2],
    )


@functools.lru_cache(maxsize=None)
def softmax_focal_truth(row: tuple, y: int, gamma: float):
    """(loss, gradient row, scale row) of -(1-p_y)^gamma log p_y, exactly."""
    X = [mpmath.mpf(v) for v in row]
    k = max(range(len(X)), key=lambda j: X[j])
    m = X[k]
    e = [mpmath.exp(v - m) for v in X]
    S = mpmath.fsum(e[j] for j in range(len(X)) if j != k)  # Z = 1 + S, never rounded to 1
    p = [v / (1 + S) for v in e]
    n = mpmath.log1p(S) + (m - X[y])
    om = mpmath.fsum(e[j] for j in range(len(X)) if j != y) / (1 + S)  # 1 - p_y
    G = mpmath.mpf(gamma)
    mg = om**G if gamma else mpmath.mpf(1)
    slope = mg + (G * n * p[y] * om ** (G - 1) if gamma else 0)
    grad = [slope * (p[j] if j != y else -om) for j in range(len(X))]
    return float(mg * n), [float(v) for v in grad], [float(abs(v)) for v in grad]


def measure_softmax_focal(dtype: torch.dtype, gamma: float, target_is_max: bool, backend=None) -> Measured:
    """Rows [x, 0, 0] for x over the logit grid, target class 0 (the winner for x > 0) or 1."""
    xs = logit_grid(dtype)
    rows = torch.stack([xs, torch.zeros_like(xs), torch.zeros_like(xs)], 1)
    y = torch.zeros(len(xs), dtype=torch.long) if target_is_max else torch.ones(len(xs), dtype=torch.long)
    truths = [softmax_focal_truth(tuple(float(v) for v in r), int(c), gamma) for r, c in zip(rows.double(), y)]
    truth = np.array([v[0] for v in truths])
    gtruth = np.array([v[1] for v in truths]).reshape(-1)

    def composition(x, y):  # the usual composition: (1 - softmax)^gamma * cross_entropy
        p = torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1)
        return (1 - p) ** gamma * TF.cross_entropy(x, y, reduction="none")

    ours, gours = _vg(lambda x, y: crossent.softmax_focal_loss(x, y, gamma, reduction="none", backend=backend), rows, y)
    theirs, gtheirs = _vg(composition, rows, y)
    return Measured(
        f"softmax_focal y={'max' if target_is_max else 'other'} gamma={gamma}",
        dtype,
        truth,
        ours,
        theirs,
        gtruth,
        gours.reshape(-1),
        gtheirs.reshape(-1),
    )


def summary(dtype: torch.dtype):
    """Worst relative errors (value, gradient) of crossent and of the 1 - sigmoid / 1 - softmax
    formulas over every scenario, per loss: the README's exactness rows."""
    rows = {}
    for name, ms in (
        ("sigmoid", [measure_sigmoid_focal(dtype, t, g) for t in (1.0, 0.0, 0.3) for g in (0.5, 1.0, 2.0, 5.0)]),
        ("softmax", [measure_softmax_focal(dtype, g, k) for g in (0.5, 1.0, 2.0, 5.0) for k in (True, False)]),
    ):
        ws = [m.worst() for m in ms]
        rows[name] = {key: max(w[key] for w in ws) for key in ws[0]}
    return rows


if __name__ == "__main__":
    for dtype in (torch.float32, torch.float64):
        for name, w in summary(dtype).items():
            print(
                f"SUMMARY {str(dtype):14s} {name}: crossent value/grad rel {w['value_rel_ours']:.2g} / "
                f"{w['grad_rel_ours']:.2g}; 1 - sigmoid/softmax formula {w['value_rel_torch']:.2g} / "
                f"{w['grad_rel_torch']:.2g}"
            )
    for dtype in (torch.float32, torch.float64):
        for m in [measure_sigmoid_focal(dtype, t, g) for t in (1.0, 0.0, 0.3) for g in (0.5, 2.0, 5.0)] + [
            measure_softmax_focal(dtype, g, k) for g in (0.5, 2.0) for k in (True, False)
        ]:
            w = m.worst()
            print(
                f"{str(dtype):14s} {m.name:34s} value ulp ours {w['value_ulp_ours']:9.3g} "
                f"theirs {w['value_ulp_torch']:9.3g} rel {w['value_rel_torch']:8.2g} | grad ulp ours "
                f"{w['grad_ulp_ours']:9.3g} theirs {w['grad_ulp_torch']:9.3g} rel {w['grad_rel_torch']:8.2g}"
            )
