"""Extreme-value accuracy of crossent and torch against mpmath (used by test_exact.py).

Run as a script to print the table of worst errors quoted in docs/exactness.md::

    PYTHONPATH=src python tests/extremes.py

Errors are measured per element against a 50-digit mpmath evaluation at the *exact* input
values (the dtype's numbers, not the decimal literals):

* ``ulp``: ``|y - truth| / ulp(truth)`` where ``ulp`` is the spacing of the dtype at
  ``|truth|`` (at least the smallest subnormal), so a correctly rounded result has <= 0.5.
* ``rel``: ``|y - truth| / |truth|``, over elements whose truth is a normal number of the
  dtype (for subnormal truths only ulp is meaningful); a wrong 0, a NaN or an inf where
  the truth is finite counts as relative error 1 (resp. inf).
* Gradients of soft targets pass through a minimum: ``dl/dx = (1-t) s(x) - p t s(-x)``
  cancels where the two terms meet, and no method computing from rounded inputs can keep
  relative precision there. Their error is measured against the *condition-aware scale*
  ``|(1-t) s(x)| + |p t s(-x)|`` (the sum of the magnitudes of the terms) instead of the
  result itself; likewise ``|A p_j| + |a_j|`` for cross-entropy and
  ``(p + t) / (p (1 - p))`` for BCE on probabilities. For hard targets (0/1) only one term
  is non-zero and the scale is the result itself.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mpmath
import numpy as np
import torch
import torch.nn.functional as TF

import crossent.functional as CF

mpmath.mp.dps = 60

NP = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def ulp_of(truth: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of ``dtype`` at |truth| (inf truth -> inf spacing)."""
    npd = NP[dtype]
    tiny = np.finfo(npd).smallest_subnormal
    a = np.abs(truth).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.spacing(a.astype(npd)).astype(np.float64)
    s = np.where(np.isfinite(a), np.maximum(np.abs(s), tiny), np.inf)
    return s


def ulp_error(y: np.ndarray, truth: np.ndarray, dtype: torch.dtype, scale: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-element error in ulps of ``scale`` (default: of the truth). Equal infinities -> 0."""
    y = y.astype(np.float64)
    truth = truth.astype(np.float64)
    same = (y == truth) | (np.isnan(y) & np.isnan(truth))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(y - truth) / ulp_of(truth if scale is None else scale, dtype)
    err = np.where(same, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def rel_error(y: np.ndarray, truth: np.ndarray, dtype: torch.dtype, scale: Optional[np.ndarray] = None) -> np.ndarray:
    """Relative error over elements whose reference magnitude is a normal number (else 0)."""
    y = y.astype(np.float64)
    truth = truth.astype(np.float64)
    ref = np.abs(truth if scale is None else scale)
    normal = (ref >= np.finfo(NP[dtype]).tiny) & np.isfinite(ref)
    same = y == truth
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(y - truth) / np.where(normal, ref, 1.0)
    err = np.where(np.isnan(err), np.inf, err)
    return np.where(normal & ~same, err, 0.0)


@dataclass
class Measured:
    """One scenario: values and gradients of crossent and torch with their truth."""

    name: str
    dtype: torch.dtype
    truth: np.ndarray
    ours: np.ndarray
    theirs: np.ndarray
    gtruth: np.ndarray
    gours: np.ndarray
    gtheirs: np.ndarray
    gscale: Optional[np.ndarray] = None  # condition-aware scale for the gradient

    def normal(self, truth: np.ndarray) -> np.ndarray:
        """Elements whose truth is 0, infinite or a normal number of the dtype."""
        a = np.abs(truth)
        return (a == 0) | (a >= np.finfo(NP[self.dtype]).tiny)

    def worst(self) -> Dict[str, float]:
        """Worst errors; the ulp figures cover the normal range (see ``subnormal_abs``)."""
        d, nv, ng = (
            self.dtype,
            self.normal(self.truth),
            self.normal(self.gtruth if self.gscale is None else self.gscale),
        )
        return {
            "value_ulp_ours": float(ulp_error(self.ours, self.truth, d)[nv].max(initial=0)),
            "value_ulp_torch": float(ulp_error(self.theirs, self.truth, d)[nv].max(initial=0)),
            "grad_ulp_ours": float(ulp_error(self.gours, self.gtruth, d, self.gscale)[ng].max(initial=0)),
            "grad_ulp_torch": float(ulp_error(self.gtheirs, self.gtruth, d, self.gscale)[ng].max(initial=0)),
            "value_rel_ours": float(rel_error(self.ours, self.truth, d).max(initial=0)),
            "value_rel_torch": float(rel_error(self.theirs, self.truth, d).max(initial=0)),
            "grad_rel_ours": float(rel_error(self.gours, self.gtruth, d, self.gscale).max(initial=0)),
            "grad_rel_torch": float(rel_error(self.gtheirs, self.gtruth, d, self.gscale).max(initial=0)),
        }


def _value_and_grad(fn, x: torch.Tensor, *args, **kwargs):
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(x, *args, reduction="none", **kwargs)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach().double().numpy(), g.double().numpy()


# --------------------------------------------------------------------------- BCE with logits
def logit_grid(dtype: torch.dtype) -> torch.Tensor:
    """0, +-10**k for k in [-8, 4] (dense near the interesting -100..100) and +-1e4."""
    mags = np.concatenate(
        [np.logspace(-8, 4, 61), np.arange(1.0, 101.0, 3.0), [36.0, 37.0, 40.0, 45.0, 88.0, 89.0, 700.0, 750.0]]
    )
    vals = np.unique(np.concatenate([[0.0], mags, -mags]))
    return torch.tensor(vals, dtype=torch.float64).to(dtype)


def bce_logits_truth(x: float, t: float, pw: float):
    """Loss, gradient and the gradient's condition-aware scale, exactly."""
    X, T, P = mpmath.mpf(x), mpmath.mpf(t), mpmath.mpf(pw)
    sp = lambda z: mpmath.log1p(mpmath.exp(z))  # noqa: E731
    sig = lambda z: 1 / (1 + mpmath.exp(-z))  # noqa: E731
    loss = P * T * sp(-X) + (1 - T) * sp(X)
    a, b = (1 - T) * sig(X), P * T * sig(-X)
    return float(loss), float(a - b), float(abs(a) + abs(b))


def measure_bce_with_logits(dtype: torch.dtype, t: float, pos_weight: Optional[float]) -> Measured:
    x = logit_grid(dtype)
    tt = torch.full_like(x, t)
    t_exact = float(tt[0])
    kw = {}
    pw_exact = 1.0
    if pos_weight is not None:
        kw["pos_weight"] = torch.tensor([pos_weight], dtype=dtype)
        pw_exact = float(kw["pos_weight"][0])
    ours, gours = _value_and_grad(CF.binary_cross_entropy_with_logits, x, tt, **kw)
    theirs, gtheirs = _value_and_grad(TF.binary_cross_entropy_with_logits, x, tt, **kw)
    rows = [bce_logits_truth(float(v), t_exact, pw_exact) for v in x.tolist()]
    truth, gtruth, gscale = (np.array(c) for c in zip(*rows))
    name = f"BCE-with-logits t={t}" + (f" pos_weight={pos_weight}" if pos_weight is not None else "")
    return Measured(name, dtype, truth, ours, theirs, gtruth, gours, gtheirs, gscale)


# --------------------------------------------------------------------------- cross-entropy
def ce_margin_truth(m: float, C: int, y: int, eps: float):
    """Logits [m, 0, ..., 0] (C classes), target y: loss, gradient (C,), scale (C,)."""
    M = mpmath.mpf(m)
    S = (C - 1) * mpmath.exp(-M)  # sum over the other classes of exp(x_j - m)
    nlp0 = mpmath.log1p(S)  # -log p_0 without cancellation
    lse = M + nlp0
    nlp = [nlp0] + [lse] * min(C - 1, 2)  # -log p_j for the first three classes
    p = [1 / (1 + S)] + [mpmath.exp(-M) / (1 + S)] * min(C - 1, 2)
    E = mpmath.mpf(eps)
    a = [E / C] * len(p)
    a[y] += 1 - E
    loss = a[0] * nlp[0] + (1 - a[0]) * lse  # every class j >= 1 has -log p_j = lse
    grad = [float(p[j] - a[j]) for j in range(len(p))]
    scale = [float(abs(p[j]) + abs(a[j])) for j in range(len(p))]
    return float(loss), np.array(grad), np.array(scale)


MARGINS = [0.5, 1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 88.0, 100.0, 1e3, 1e4]


def measure_ce_margins(dtype: torch.dtype, C: int, y: int, eps: float, margins=MARGINS) -> Measured:
    rows = []
    for m in margins:
        x = torch.zeros(1, C, dtype=dtype)
        x[0, 0] = m
        tgt = torch.tensor([y])
        o, go = _value_and_grad(CF.cross_entropy, x, tgt, label_smoothing=eps)
        th, gth = _value_and_grad(TF.cross_entropy, x, tgt, label_smoothing=eps)
        tr, gtr, gsc = ce_margin_truth(float(x[0, 0]), C, y, eps)
        # gradients: the first three classes carry all distinct values
        k = min(C, 3)
        rows.append((tr, o[0], th[0], gtr[:k], go[0, :k], gth[0, :k], gsc[:k]))
    truth, ours, theirs = (np.array([r[i] for r in rows]) for i in range(3))
    gtruth, gours, gtheirs, gscale = (np.concatenate([r[i] for r in rows]) for i in range(3, 7))
    name = f"CE margin [m,0..0] C={C} class {y}" + (f" ls={eps}" if eps else "")
    return Measured(name, dtype, truth, ours, theirs, gtruth, gours, gtheirs, gscale)


@functools.lru_cache(maxsize=None)
def _random_row_truth(dtype: torch.dtype, C: int, seed: int):
    """The row and its exact logsumexp / mean logit (cached: 50k mpmath exponentials)."""
    g = torch.Generator().manual_seed(seed)
    x = (8 * torch.randn(1, C, generator=g, dtype=torch.float64)).to(dtype)
    xs = [mpmath.mpf(v) for v in x[0].tolist()]
    mx = max(xs)
    with mpmath.workdps(30):  # 30 digits are plenty for a sum of positive terms
        Z = mpmath.fsum(mpmath.exp(v - mx) for v in xs)
    lse = mx + mpmath.log(Z)
    return x, xs, lse, mpmath.fsum(xs) / C, g


def measure_ce_random_row(dtype: torch.dtype, C: int, eps: float, seed: int = 0) -> Measured:
    """One row of C random logits (scale 8), target = the argmax and a random class."""
    x, xs, lse, mean_x, _ = _random_row_truth(dtype, C, seed)
    g = torch.Generator().manual_seed(seed + 1)
    E = mpmath.mpf(eps)
    mean_nlp = lse - mean_x  # (1/C) sum_c -log p_c
    rows = []
    for y in (int(x.argmax()), int(torch.randint(0, C, (1,), generator=g))):
        tgt = torch.tensor([y])
        o, go = _value_and_grad(CF.cross_entropy, x, tgt, label_smoothing=eps)
        th, gth = _value_and_grad(TF.cross_entropy, x, tgt, label_smoothing=eps)
        truth = (1 - E) * (lse - xs[y]) + E * mean_nlp
        idx = sorted({y, int(x.argmax()), 0, C - 1})
        gtr, gsc = [], []
        for j in idx:
            pj = mpmath.exp(xs[j] - lse)
            aj = E / C + ((1 - E) if j == y else 0)
            gtr.append(float(pj - aj))
            gsc.append(float(abs(pj) + abs(aj)))
        rows.append((float(truth), o[0], th[0], np.array(gtr), go[0, idx], gth[0, idx], np.array(gsc)))
    truth, ours, theirs = (np.array([r[i] for r in rows]) for i in range(3))
    gtruth, gours, gtheirs, gscale = (np.concatenate([r[i] for r in rows]) for i in range(3, 7))
    return Measured(
        f"CE random logits C={C}" + (f" ls={eps}" if eps else ""),
        dtype,
        truth,
        ours,
        theirs,
        gtruth,
        gours,
        gtheirs,
        gscale,
    )


# --------------------------------------------------------------------------- BCE on probabilities
TORCH_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


def prob_grid(dtype: torch.dtype) -> torch.Tensor:
    lo = {torch.float64: -300, torch.float32: -37}[dtype]
    small = np.logspace(lo, -0.31, 80)
    near_one = 1 - np.logspace(-1, {torch.float64: -15.5, torch.float32: -7}[dtype], 30)
    return torch.tensor(np.unique(np.concatenate([small, near_one, [0.5]])), dtype=torch.float64).to(dtype)


def bce_truth(p: float, t: float):
    """torch's clamped loss and its documented gradient (p - t) / max(p (1 - p), eps)."""
    P, T = mpmath.mpf(p), mpmath.mpf(t)
    lp = max(mpmath.log(P), -100) if P > 0 else mpmath.mpf(-100)
    l1p = max(mpmath.log1p(-P), -100) if P < 1 else mpmath.mpf(-100)
    loss = -(T * lp + (1 - T) * l1p)
    den = max(P * (1 - P), mpmath.mpf(TORCH_EPS))
    return float(loss), float((P - T) / den), float((abs(P) + abs(T)) / den)


def measure_bce(dtype: torch.dtype, t: float) -> Measured:
    p = prob_grid(dtype)
    tt = torch.full_like(p, t)
    t_exact = float(tt[0])
    ours, gours = _value_and_grad(CF.binary_cross_entropy, p, tt)
    theirs, gtheirs = _value_and_grad(TF.binary_cross_entropy, p, tt)
    rows = [bce_truth(float(v), t_exact) for v in p.tolist()]
    truth, gtruth, gscale = (np.array(c) for c in zip(*rows))
    if t in (0.0, 1.0):
        gscale = None
    return Measured(f"BCE on probabilities t={t}", dtype, truth, ours, theirs, gtruth, gours, gtheirs, gscale)


# --------------------------------------------------------------------------- all scenarios
def scenarios() -> List[Callable[[], Measured]]:
    out = []
    for dt in (torch.float32, torch.float64):
        for t in (0.0, 1.0, 0.3, 0.999):
            for pw in (None, 2.5):
                out.append(lambda dt=dt, t=t, pw=pw: measure_bce_with_logits(dt, t, pw))
        for C, y in ((3, 0), (3, 1), (1000, 0), (1000, 1)):
            for eps in (0.0, 0.1):
                out.append(lambda dt=dt, C=C, y=y, eps=eps: measure_ce_margins(dt, C, y, eps))
        out.append(lambda dt=dt: measure_ce_margins(dt, 50_000, 0, 0.0, margins=[5.0, 20.0, 40.0, 100.0]))
        out.append(lambda dt=dt: measure_ce_margins(dt, 50_000, 0, 0.1, margins=[5.0, 20.0, 40.0, 100.0]))
        out.append(lambda dt=dt: measure_ce_random_row(dt, 50_000, 0.0))
        out.append(lambda dt=dt: measure_ce_random_row(dt, 50_000, 0.1))
        for t in (0.0, 1.0, 0.3):
            out.append(lambda dt=dt, t=t: measure_bce(dt, t))
    return out


def family(name: str) -> str:
    if name.startswith("BCE-with-logits"):
        return "BCE-with-logits, logits in [-1e4, 1e4]"
    if name.startswith("CE"):
        return "cross-entropy, margins 0.5..1e4 and C up to 50k"
    return "BCE on probabilities in (0, 1)"


def table() -> str:
    rows: Dict[tuple, Dict[str, float]] = {}
    for make in scenarios():
        m = make()
        key = (family(m.name), str(m.dtype).replace("torch.", ""))
        w = m.worst()
        acc = rows.setdefault(key, {k: 0.0 for k in w})
        for k, v in w.items():
            acc[k] = max(acc[k], v)
    fmt = lambda v: "nan/inf" if not math.isfinite(v) else f"{v:.2g}"  # noqa: E731
    lines = [
        "| extreme | dtype | value rel. err. crossent | torch | gradient rel. err. crossent | torch "
        "| crossent max ulp (value / grad) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (fam, dt), w in rows.items():
        lines.append(
            f"| {fam} | {dt} | {fmt(w['value_rel_ours'])} | {fmt(w['value_rel_torch'])} | "
            f"{fmt(w['grad_rel_ours'])} | {fmt(w['grad_rel_torch'])} | "
            f"{w['value_ulp_ours']:.1f} / {w['grad_ulp_ours']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
