"""Exactness: float64 references written from the math, gradcheck/gradgradcheck, and
mpmath at the extremes (ulp bounds from the one table in _helpers.ULP; the measuring
code and the definition of the condition-aware gradient scale are in tests/extremes.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

import crossent.functional as CF
import extremes as X
from _helpers import (
    TOL,
    ULP,
    assert_close,
    class_indices,
    class_probabilities,
    gen,
    logits,
    probabilities,
    soft_targets,
)

pytestmark = pytest.mark.usefixtures("backend")  # every CPU backend (tests/conftest.py)


# --------------------------------------------------------------------------- math references
def ref_bce(p, t, w=None, pw=None):
    """-w [pw t max(log p, -100) + (1 - t) max(log(1 - p), -100)], element by element."""
    out = torch.empty_like(p)
    for i in range(p.numel()):
        pi, ti = float(p.view(-1)[i]), float(t.view(-1)[i])
        lp = max(math.log(pi), -100.0) if pi > 0 else -100.0
        l1p = max(math.log(1 - pi), -100.0) if pi < 1 else -100.0
        pwi = 1.0 if pw is None else float(pw.expand_as(p).reshape(-1)[i])
        wi = 1.0 if w is None else float(w.expand_as(p).reshape(-1)[i])
        out.view(-1)[i] = -wi * (pwi * ti * lp + (1 - ti) * l1p)
    return out


def ref_bce_logits(x, t, w=None, pw=None):
    """w [pw t log(1 + e^-x) + (1 - t) log(1 + e^x)], element by element."""
    out = torch.empty_like(x)
    for i in range(x.numel()):
        xi, ti = float(x.view(-1)[i]), float(t.view(-1)[i])
        pwi = 1.0 if pw is None else float(pw.expand_as(x).reshape(-1)[i])
        wi = 1.0 if w is None else float(w.expand_as(x).reshape(-1)[i])
        out.view(-1)[i] = wi * (pwi * ti * math.log1p(math.exp(-xi)) + (1 - ti) * math.log1p(math.exp(xi)))
    return out


def ref_cross_entropy(x, y, w=None, ignore_index=-100, eps=0.0, reduction="mean"):
    """Loops over samples; classes along dim 1; index or probability targets."""
    C = x.shape[1]
    xs = x.movedim(1, -1).reshape(-1, C)
    prob = y.is_floating_point()
    ys = y.movedim(1, -1).reshape(-1, C) if prob else y.reshape(-1)
    wv = [1.0] * C if w is None else [float(v) for v in w]
    losses, dens = [], []
    for r in range(xs.shape[0]):
        row = [float(v) for v in xs[r]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        nlp = [lse - v for v in row]
        if prob:
            q = [(1 - eps) * float(v) + eps / C for v in ys[r]]
            losses.append(sum(wv[c] * q[c] * nlp[c] for c in range(C)))
            dens.append(1.0)
        else:
            k = int(ys[r])
            if k == ignore_index:
                losses.append(0.0)
                dens.append(0.0)
                continue
            losses.append((1 - eps) * wv[k] * nlp[k] + eps / C * sum(wv[c] * nlp[c] for c in range(C)))
            dens.append(wv[k])
    out_shape = (x.shape[0],) + tuple(x.shape[2:])
    L = torch.tensor(losses, dtype=torch.float64).reshape(out_shape)
    if reduction == "none":
        return L
    if reduction == "sum":
        return L.sum()
    return L.sum() / sum(dens)


def _reduce(v, reduction, den=None):
    if reduction == "none":
        return v
    if reduction == "sum":
        return v.sum()
    return v.sum() / (v.numel() if den is None else den)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_matches_math(reduction, weighted):
    g = gen(30)
    p = probabilities((4, 3), g)
    p[0, 0], p[0, 1], p[1, 0] = 0.0, 1.0, 1e-60  # the clamp at -100
    t = soft_targets((4, 3), g)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    pw = torch.rand(3, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    got = CF.binary_cross_entropy(p, t, w, reduction=reduction, pos_weight=pw)
    assert_close(got, _reduce(ref_bce(p, t, w, pw), reduction))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits_matches_math(reduction, weighted):
    g = gen(31)
    x = logits((4, 3, 2), g, scale=8.0)
    t = soft_targets((4, 3, 2), g)
    w = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    pw = torch.rand(2, generator=g, dtype=torch.float64) * 3 if weighted else None
    got = CF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)
    assert_close(got, _reduce(ref_bce_logits(x, t, w, pw), reduction))


CE_MATH = [
    (tk, w, eps, red)
    for tk in ("index", "ignore", "prob")
    for w in (False, True)
    for eps in (0.0, 0.15)
    for red in ("none", "mean", "sum")
]


@pytest.mark.parametrize("target_kind,weighted,eps,reduction", CE_MATH)
def test_cross_entropy_matches_math(target_kind, weighted, eps, reduction):
    g = gen(32)
    x = logits((5, 4, 3), g, scale=5.0)
    if target_kind == "prob":
        y = class_probabilities((5, 4, 3), 1, g)
    else:
        y = class_indices((5, 3), 4, g, ignore_index=-100 if target_kind == "ignore" else None)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    got = CF.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps)
    assert_close(got, ref_cross_entropy(x, y, w, eps=eps, reduction=reduction))


# --------------------------------------------------------------------------- gradcheck
def _gc(fn, inputs):
    assert gradcheck(fn, inputs, **TOL["gradcheck"])
    assert gradgradcheck(fn, inputs, **TOL["gradgradcheck"])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_bce(reduction):
    g = gen(40)
    p = probabilities((3, 4), g, lo=0.1, hi=0.9).requires_grad_()
    t = probabilities((3, 4), g, lo=0.0, hi=1.0).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    pw = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    _gc(lambda p, t, w: CF.binary_cross_entropy(p, t, w, reduction=reduction, pos_weight=pw), (p, t, w))
    _gc(lambda p, t: CF.binary_cross_entropy(p, t, reduction=reduction, label_smoothing=0.1), (p, t))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_bce_with_logits(reduction):
    g = gen(41)
    x = logits((3, 4), g).requires_grad_()
    t = probabilities((3, 4), g, lo=0.0, hi=1.0).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    pw = (torch.rand(4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    _gc(
        lambda x, t, w, pw: CF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw),
        (x, t, w, pw),
    )
    # hard targets (exactly 0 and 1) keep their target gradient
    th = (torch.rand(3, 4, generator=g, dtype=torch.float64) > 0.5).double().requires_grad_()
    # (validate=False: the numerical Jacobian steps the target to -1e-6 and 1 + 1e-6)
    _gc(lambda x, t: CF.binary_cross_entropy_with_logits(x, t, reduction=reduction, validate=False), (x, th))
    # ignore_index: elements equal to it are left out, the others keep their gradient
    ti = th.detach().clone()
    ti[0, :2] = -1
    _gc(lambda x: CF.binary_cross_entropy_with_logits(x, ti, reduction=reduction, ignore_index=-1), (x,))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradcheck_cross_entropy(reduction, eps):
    g = gen(42)
    x = logits((4, 3, 2), g).requires_grad_()
    y = class_indices((4, 2), 3, g, ignore_index=-100)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    _gc(lambda x: CF.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps), (x,))
    q = torch.softmax(torch.randn(4, 3, 2, generator=g, dtype=torch.float64), 1).requires_grad_()
    wq = w.clone().requires_grad_()
    _gc(lambda x, q, w: CF.cross_entropy(x, q, w, reduction=reduction, label_smoothing=eps), (x, q, wq))
    # a confident row (margin 30) and a row whose argmax does not dominate
    xc = torch.tensor([[30.0, 0.0, -2.0], [0.1, 0.0, 0.05]], dtype=torch.float64, requires_grad=True)
    _gc(lambda x: CF.cross_entropy(x, torch.tensor([0, 2]), reduction=reduction, label_smoothing=eps), (xc,))


def test_gradcheck_cross_entropy_weight_gradient():
    """crossent also differentiates w.r.t. class weights of index targets (torch cannot)."""
    g = gen(43)
    x = logits((5, 3), g).requires_grad_()
    y = class_indices((5,), 3, g)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    for red in ("none", "mean", "sum"):
        assert gradcheck(lambda x, w: CF.cross_entropy(x, y, w, reduction=red, label_smoothing=0.1), (x, w))


# --------------------------------------------------------------------------- mpmath extremes
def _assert_within(m: X.Measured, bound: float, what: str):
    """ulp bound in the normal range; below it (subnormal results) the exponentials are
    themselves subnormal and the error is bounded absolutely by (terms summed) ulps."""
    nv, ng = m.normal(m.truth), m.normal(m.gtruth if m.gscale is None else m.gscale)
    ev = X.ulp_error(m.ours, m.truth, m.dtype)
    eg = X.ulp_error(m.gours, m.gtruth, m.dtype, m.gscale)
    assert ev[nv].max(initial=0) <= bound, f"{what} {m.name} {m.dtype}: value {ev[nv].max()} ulp"
    assert eg[ng].max(initial=0) <= bound, f"{what} {m.name} {m.dtype}: gradient {eg[ng].max()} ulp"
    return ev, eg, nv, ng


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.0, 1.0, 0.3, 0.999])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_bce_with_logits_extremes_mpmath(dtype, t, pos_weight):
    """Logits in [-1e4, 1e4]: value and gradient within a few ulp (gradient of soft targets
    against the condition-aware scale, see tests/extremes.py), subnormals included."""
    m = X.measure_bce_with_logits(dtype, t, pos_weight)
    ev, eg, _, _ = _assert_within(m, ULP["bce_with_logits"], "bce_with_logits")
    assert ev.max() <= ULP["bce_with_logits"] and eg.max() <= ULP["bce_with_logits"]


def test_bce_with_logits_small_losses_torch_rounds_away():
    """Small losses torch's formula loses (x = -10, -20 with t = 0), exact to 4 ulp."""
    f32 = torch.float32
    v = CF.binary_cross_entropy_with_logits(torch.tensor([-10.0, -20.0]), torch.zeros(2), reduction="none")
    assert abs(v[0].item() / 4.5398899216870535e-05 - 1) < 4 * 2**-24
    assert abs(v[1].item() / 2.0611536181902037e-09 - 1) < 4 * 2**-24
    v = CF.binary_cross_entropy_with_logits(
        torch.tensor([-40.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    )
    assert abs(v.item() / 4.248354255291589e-18 - 1) < 4 * 2**-53
    x = torch.tensor([37.0], dtype=torch.float64, requires_grad=True)
    CF.binary_cross_entropy_with_logits(x, torch.ones(1, dtype=torch.float64)).backward()
    assert abs(x.grad.item() / -8.533047625744066e-17 - 1) < 4 * 2**-53
    assert f32 is torch.float32


CE_EXTREMES = [
    (dt, C, y, eps)
    for dt in (torch.float32, torch.float64)
    for C, y in ((3, 0), (3, 1), (1000, 0), (1000, 1))
    for eps in (0.0, 0.1)
]


@pytest.mark.parametrize("dtype,C,y,eps", CE_EXTREMES)
def test_cross_entropy_margins_mpmath(dtype, C, y, eps):
    m = X.measure_ce_margins(dtype, C, y, eps)
    ev, _, nv, _ = _assert_within(m, ULP["ce"], "ce")
    assert (ev[~nv] <= C + 4).all()  # subnormal losses: at most one ulp per summed exponential


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_50k_classes_mpmath(dtype):
    for eps in (0.0, 0.1):
        m = X.measure_ce_margins(dtype, 50_000, 0, eps, margins=[5.0, 20.0, 40.0, 100.0])
        ev, _, nv, _ = _assert_within(m, ULP["ce_large_c"], "ce 50k")
        assert (ev[~nv] <= 50_000 + 4).all()
        _assert_within(X.measure_ce_random_row(dtype, 50_000, eps), ULP["ce_large_c"], "ce 50k random")


def test_cross_entropy_confident_row_keeps_its_tiny_loss():
    """logits [20, 0, 0], class 0, float32: 4.12e-9 (torch returns -0)."""
    v = CF.cross_entropy(torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0]))
    truth = math.log1p(2 * math.exp(-20.0))
    assert abs(v.item() / truth - 1) < 4 * 2**-24


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
def test_bce_probabilities_mpmath(dtype, t):
    """Inside (0, 1), down to the smallest probabilities: as exact as the dtype; the -100
    clamp as torch. Gradient: torch's documented (p - t) / max(p (1 - p), 1e-12)."""
    m = X.measure_bce(dtype, t)
    _assert_within(m, ULP["bce"], "bce")


def test_bce_probabilities_clamp():
    for dt in (torch.float32, torch.float64):
        p = torch.tensor([0.0, 1.0, 1e-30 if dt == torch.float32 else 1e-60], dtype=dt)
        t = torch.tensor([1.0, 0.0, 1.0], dtype=dt)
        v = CF.binary_cross_entropy(p, t, reduction="none")
        assert v.tolist()[:2] == [100.0, 100.0]
        assert v[2].item() == pytest.approx(min(100.0, -math.log(float(p[2]))), rel=TOL[dt]["rtol"])


# --------------------------------------------------------------------------- inf / nan
def _vg(fn, x, *args, **kw):
    x = x.clone().requires_grad_()
    out = fn(x, *args, reduction="none", **kw)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bce_with_logits_infinite_logits_give_limits(dtype):
    inf = float("inf")
    x = torch.tensor([inf, -inf, inf, -inf, inf], dtype=dtype)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3], dtype=dtype)
    v, g = _vg(CF.binary_cross_entropy_with_logits, x, t)
    assert v.tolist() == [0.0, 0.0, inf, inf, inf]
    assert g.float().tolist() == pytest.approx([0.0, 0.0, 1.0, -1.0, float(1 - t[4].float())], rel=TOL[dtype]["rtol"])
    v, g = _vg(CF.binary_cross_entropy_with_logits, x, t, pos_weight=torch.tensor([2.0], dtype=dtype))
    assert v.tolist() == [0.0, 0.0, inf, inf, inf]
    assert g.float().tolist()[:4] == [0.0, 0.0, 1.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cross_entropy_infinite_logits_give_limits(dtype):
    inf = float("inf")
    x = torch.tensor([[inf, 0.0, 0.0], [inf, 0.0, 0.0], [-inf, 0.0, 0.0], [-inf, 0.0, 0.0]], dtype=dtype)
    y = torch.tensor([0, 1, 1, 0])
    v, g = _vg(CF.cross_entropy, x, y)
    assert v.double().tolist() == [0.0, inf, pytest.approx(math.log(2), rel=TOL[dtype]["rtol"]), inf]
    assert g[0].float().tolist() == [0.0, 0.0, 0.0]
    assert g[2].float().tolist() == pytest.approx([0.0, -0.5, 0.5])
    assert torch.isfinite(g[0]).all() and torch.isfinite(g[2]).all()


def test_nan_in_gives_nan_out():
    nan = float("nan")
    x = torch.tensor([[nan, 0.0, 1.0], [1.0, 2.0, 3.0]])
    v = CF.cross_entropy(x, torch.tensor([1, 2]), reduction="none")
    assert math.isnan(v[0]) and math.isfinite(v[1])
    v = CF.binary_cross_entropy_with_logits(torch.tensor([nan, 1.0]), torch.tensor([1.0, 0.0]), reduction="none")
    assert math.isnan(v[0]) and math.isfinite(v[1])
    v = CF.binary_cross_entropy(torch.tensor([nan, 0.5]), torch.tensor([1.0, 0.0]), reduction="none", validate=False)
    assert math.isnan(v[0]) and math.isfinite(v[1])


# --------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["bce", "bce_logits", "ce"])
def test_low_precision_is_float32_inside(dtype, loss):
    """Result and gradient = the float32 computation on the same values, rounded once."""
    g = gen(50)
    if loss == "bce":
        fn, x, t = CF.binary_cross_entropy, probabilities((6, 5), g), soft_targets((6, 5), g)
    elif loss == "bce_logits":
        fn, x, t = CF.binary_cross_entropy_with_logits, logits((6, 5), g, scale=12), soft_targets((6, 5), g)
    else:
        fn, x, t = CF.cross_entropy, logits((6, 5), g, scale=12), class_indices((6,), 5, g)
    x = x.to(dtype)
    t = t.to(dtype) if t.is_floating_point() else t
    v, gr = _vg(fn, x, t)
    t32 = t.float() if t.is_floating_point() else t
    v32, g32 = _vg(fn, x.float(), t32)
    assert v.dtype == dtype and gr.dtype == dtype
    assert torch.equal(v, v32.to(dtype))
    assert torch.equal(gr, g32.to(dtype))


def test_low_precision_small_losses_keep_precision():
    """float16 x = -10, t = 0: 4.54e-5 to the half-precision rounding of the truth."""
    v = CF.binary_cross_entropy_with_logits(
        torch.tensor([-10.0], dtype=torch.float16), torch.zeros(1, dtype=torch.float16)
    )
    truth = math.log1p(math.exp(-10.0))
    assert v.item() == np.float16(truth).item()
    v = CF.cross_entropy(torch.tensor([[12.0, 0.0, 0.0]], dtype=torch.bfloat16), torch.tensor([0]))
    truth = math.log1p(2 * math.exp(-12.0))
    assert abs(v.float().item() / truth - 1) <= 2**-8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["bce_logits", "ce", "bce"])
def test_low_precision_no_worse_than_torch(dtype, loss):
    """Against a float64 truth on the same rounded inputs, crossent's fp16/bf16 result is
    never further off than torch's same-precision result plus one rounding step."""
    g = gen(51)
    if loss == "bce":
        tf, cf, x, t = (
            TF.binary_cross_entropy,
            CF.binary_cross_entropy,
            probabilities((64, 8), g),
            soft_targets((64, 8), g),
        )
    elif loss == "bce_logits":
        tf, cf = TF.binary_cross_entropy_with_logits, CF.binary_cross_entropy_with_logits
        x, t = logits((64, 8), g, scale=10), soft_targets((64, 8), g)
    else:
        tf, cf, x, t = TF.cross_entropy, CF.cross_entropy, logits((64, 8), g, scale=10), class_indices((64,), 8, g)
    x = x.to(dtype)
    t = t.to(dtype) if t.is_floating_point() else t
    truth = tf(x.double(), t.double() if t.is_floating_point() else t, reduction="none")
    ours = cf(x, t, reduction="none").double()
    theirs = tf(x, t, reduction="none").double()
    step = torch.finfo(dtype).eps * truth.abs()
    assert ((ours - truth).abs() <= (theirs - truth).abs() + step).all()
