"""Focal (sigmoid, softmax), Poly-1 and asymmetric losses: parity with torchvision's formula
and with float64 compositions written here from the papers, every backend and dtype,
gradcheck, gamma = 0 / epsilon = 0 as the base losses, guardrails, modules, return_parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import crossent
from crossent import CrossentTypeError, CrossentValueError

from _helpers import assert_close

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
BACKENDS = ("reference", "chunked", "chunked-torch")


# ------------------------------------------------------------------- independent references
def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, restated (torchvision does not import beside this torch)."""
    p = torch.sigmoid(inputs)
    ce_loss = TF.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def binary_composition(x, t, *, alpha=-1.0, gamma=0.0, epsilon=0.0, weight=None, pos_weight=None, keep=None):
    """float64 per-element loss from the papers' formulas (no shared code with crossent)."""
    x, t = x.double(), t.double()
    p = torch.sigmoid(x)
    pw = 1.0 if pos_weight is None else pos_weight.double()
    ce = -(pw * t * torch.log(p) + (1 - t) * torch.log(1 - p))
    one_m_pt = 1 - (p * t + (1 - p) * (1 - t))
    loss = ce * one_m_pt**gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    loss = loss + epsilon * one_m_pt
    if weight is not None:
        loss = loss * weight.double()
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    return loss


def softmax_composition(x, target, *, gamma=0.0, epsilon=0.0, weight=None, ignore_index=-100, smoothing=0.0):
    """float64 per-row loss: sum_c a_c [(1-p_c)^gamma (-log p_c) + epsilon (1 - p_c)] and the
    mean denominator, from the papers' formulas (rows (N, C))."""
    x = x.double()
    C = x.shape[1]
    p = torch.softmax(x, 1)
    f = (1 - p) ** gamma * -torch.log(p) + epsilon * (1 - p)
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    if target.is_floating_point():
        q = target.double() * (1 - smoothing) + smoothing / C
        return (q * w * f).sum(1), torch.tensor(float(x.shape[0]), dtype=torch.float64)
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    a = torch.nn.functional.one_hot(y, C).double() * (1 - smoothing) + smoothing / C
    loss = (a * w * f).sum(1)
    den = torch.where(keep, w[y], 0.0)
    return torch.where(keep, loss, 0.0), den.sum()


def _reduce(loss, reduction, den=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (loss.numel() if den is None else den)


def _data(shape=(6, 5), seed=0, soft=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    return x, (t if soft else (t > 0.6).double())


# --------------------------------------------------------------------------- torchvision parity
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", (0.25, -1.0, 0.8))
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_sigmoid_focal_equals_torchvision(gamma, alpha, reduction):
    x, t = _data()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = crossent.sigmoid_focal_loss(xa, t, alpha, gamma, reduction)
    want = torchvision_sigmoid_focal_loss(xb, t, alpha, gamma, reduction)
    assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert_close(xa.grad, xb.grad)


def test_sigmoid_focal_defaults_are_torchvisions():
    x, t = _data()
    assert_close(crossent.sigmoid_focal_loss(x, t), torchvision_sigmoid_focal_loss(x, t))
    assert crossent.sigmoid_focal_loss(x, t).shape == x.shape  # reduction='none' by default


def test_sigmoid_focal_float32_torchvision_parity_where_it_is_accurate():
    x, t = _data(scale=2.0)
    x32 = x.float()
    assert_close(crossent.sigmoid_focal_loss(x32, t.float()), torchvision_sigmoid_focal_loss(x32, t.float()))


def test_sigmoid_focal_keeps_the_focal_term_where_torchvision_loses_it():
    x = torch.tensor([17.0, 20.0, 30.0, -25.0])
    t = torch.tensor([1.0, 1.0, 1.0, 0.0])
    tv = torchvision_sigmoid_focal_loss(x, t)
    assert (tv == 0).all()  # 1 - sigmoid(x) rounds to 0 in float32
    ours = crossent.sigmoid_focal_loss(x, t)
    truth = binary_composition(x.double(), t.double(), alpha=0.25, gamma=2.0)
    assert (ours > 0).all()
    assert_close(ours.double(), truth, torch.float32)


# ------------------------------------------------------------------ every option, every backend
BINARY_OPTIONS = [
    dict(),
    dict(weight=True),
    dict(pos_weight=True),
    dict(ignore_index=-1),
    dict(label_smoothing=0.2),
    dict(weight=True, pos_weight=True, ignore_index=-1, label_smoothing=0.1),
]


def _binary_case(opts, soft=False):
    x, t = _data(soft=soft)
    kw, comp = {}, {}
    if opts.get("weight"):
        kw["weight"] = comp["weight"] = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    if opts.get("pos_weight"):
        kw["pos_weight"] = comp["pos_weight"] = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    tc = t
    if "ignore_index" in opts:
        t = t.clone()
        t[0, 1] = t[3, 4] = -1
        x[0, 1] = float("nan")  # an ignored element's value is never used
        kw["ignore_index"] = -1
        comp["keep"] = t != -1
        tc = torch.where(comp["keep"], t, 0.0)
    if opts.get("label_smoothing"):
        kw["label_smoothing"] = opts["label_smoothing"]
        tc = tc * (1 - opts["label_smoothing"]) + opts["label_smoothing"] / 2
    xc = torch.where(comp["keep"], x, 0.0) if "keep" in comp else x
    return x, t, xc, tc, kw, comp


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("i", range(len(BINARY_OPTIONS)))
@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
def test_sigmoid_focal_matches_composition(backend, i, gamma):
    x, t, xc, tc, kw, comp = _binary_case(BINARY_OPTIONS[i])
    xa = x.clone().requires_grad_()
    got = crossent.sigmoid_focal_loss(xa, t, 0.25, gamma, "mean", backend=backend, **kw)
    xr = xc.clone().requires_grad_()
    per = binary_composition(xr, tc, alpha=0.25, gamma=gamma, **comp)
    n = comp["keep"].sum() if "keep" in comp else per.numel()
    want = per.sum() / n
    assert_close(got, want)
    got.backward()
    want.backward()
    assert_close(xa.grad, torch.where(torch.isnan(x), 0.0, xr.grad))


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("i", range(len(BINARY_OPTIONS)))
@pytest.mark.parametrize("epsilon", (1.0, -0.5, 2.0))
def test_poly1_bce_matches_composition(backend, i, epsilon):
    x, t, xc, tc, kw, comp = _binary_case(BINARY_OPTIONS[i], soft=True)
    xa = x.clone().requires_grad_()
    got = crossent.poly1_binary_cross_entropy_with_logits(
        xa, t, reduction="sum", epsilon=epsilon, backend=backend, **kw
    )
    xr = xc.clone().requires_grad_()
    want = binary_composition(xr, tc, epsilon=epsilon, **comp).sum()
    assert_close(got, want)
    got.backward()
    want.backward()
    assert_close(xa.grad, torch.where(torch.isnan(x), 0.0, xr.grad))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("fn", ("sigmoid_focal_loss", "poly1_binary_cross_entropy_with_logits"))
def test_binary_family_dtypes(dtype, fn):
    x, t = _data(soft=True)
    xd = x.to(dtype).requires_grad_()
    got = getattr(crossent, fn)(xd, t.to(dtype), reduction="none")
    assert got.dtype == dtype
    if fn == "sigmoid_focal_loss":
        want = binary_composition(xd.detach().double(), t.to(dtype).double(), alpha=0.25, gamma=2.0)
    else:
        want = binary_composition(xd.detach().double(), t.to(dtype).double(), epsilon=1.0)
    assert_close(got.double(), want.to(dtype).double(), dtype)


def _softmax_case(kind, opts, shape=(6, 5)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    C = shape[1]
    if kind == "index":
        t = torch.randint(0, C, (shape[0],), generator=g)
        if opts.get("ignore"):
            t[2] = -100
            x[2] = float("nan")
    else:
        t = torch.rand(shape, generator=g, dtype=torch.float64).softmax(1)
    return x, t


SOFTMAX_OPTIONS = [
    dict(),
    dict(weight=True),
    dict(smoothing=0.1),
    dict(ignore=True),
    dict(weight=True, smoothing=0.2, ignore=True),
]


# ignore_index applies to class indices only
SOFTMAX_CASES = [
    (kind, i)
    for kind in ("index", "probabilities")
    for i, o in enumerate(SOFTMAX_OPTIONS)
    if kind == "index" or not o.get("ignore")
]


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("kind, i", SOFTMAX_CASES)
@pytest.mark.parametrize("loss", ("focal", "poly1"))
@pytest.mark.parametrize("reduction", ("none", "mean", "sum"))
def test_softmax_family_matches_composition(backend, kind, i, loss, reduction):
    opts = SOFTMAX_OPTIONS[i]
    x, t = _softmax_case(kind, opts)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64) if opts.get("weight") else None
    sm = opts.get("smoothing", 0.0)
    xa = x.clone().requires_grad_()
    if loss == "focal":
        got = crossent.softmax_focal_loss(xa, t, 1.5, w, reduction=reduction, label_smoothing=sm, backend=backend)
        ck = dict(gamma=1.5)
    else:
        got = crossent.poly1_cross_entropy(
            xa, t, w, reduction=reduction, label_smoothing=sm, epsilon=2.0, backend=backend
        )
        ck = dict(epsilon=2.0)
    xc = torch.where(torch.isnan(x), 0.0, x).requires_grad_()
    per, den = softmax_composition(xc, t, weight=w, smoothing=sm, **ck)
    want = _reduce(per, reduction, den)
    assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert_close(xa.grad, xc.grad * ~torch.isnan(x))


@pytest.mark.parametrize("shape", ((4, 5, 3), (2, 5, 2, 3), (5,)))
def test_softmax_focal_k_dim_and_unbatched(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    C = shape[1] if len(shape) > 1 else shape[0]
    y = torch.randint(0, C, shape[:1] + shape[2:], generator=g) if len(shape) > 1 else torch.tensor(2)
    got = crossent.softmax_focal_loss(x, y, reduction="none")
    rows = x.movedim(1, -1).reshape(-1, C) if len(shape) > 1 else x.reshape(1, C)
    want, _ = softmax_composition(rows, y.reshape(-1), gamma=2.0)
    assert_close(got, want.reshape(y.shape))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_softmax_focal_dtypes(dtype):
    x, t = _softmax_case("index", {})
    xd = x.to(dtype)
    got = crossent.softmax_focal_loss(xd, t, reduction="none")
    assert got.dtype == dtype
    want, _ = softmax_composition(xd.double(), t, gamma=2.0)
    assert_close(got.double(), want.to(dtype).double(), dtype)


# --------------------------------------------------------------------------- gamma = 0 is the base
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("opts", ({}, {"pos_weight": True, "ignore_index": -1, "label_smoothing": 0.1}))
def test_sigmoid_focal_gamma_zero_is_bce_exactly(dtype, opts):
    x, t, _, _, kw, _ = _binary_case(opts)
    x, t = x.to(dtype), t.to(dtype)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = crossent.sigmoid_focal_loss(xa, t, -1, 0.0, "mean", **kw)
    want = crossent.binary_cross_entropy_with_logits(xb, t, **kw)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    assert torch.equal(xa.grad, xb.grad)
    # with alpha: alpha_t times the base loss
    a = crossent.sigmoid_focal_loss(x, t, 0.25, 0.0, **kw)
    tt = t if not kw.get("label_smoothing") else t * 0.9 + 0.05
    base = crossent.binary_cross_entropy_with_logits(x, t, reduction="none", **kw)
    assert_close(a, base * (0.25 * tt + 0.75 * (1 - tt)))


@pytest.mark.parametrize("kind", ("index", "probabilities"))
def test_softmax_focal_gamma_zero_and_poly_epsilon_zero_are_ce_exactly(kind):
    x, t = _softmax_case(kind, {})
    x = x.float()
    t = t if kind == "index" else t.float()
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])
    want = crossent.cross_entropy(x, t, w, label_smoothing=0.1)
    assert torch.equal(crossent.softmax_focal_loss(x, t, 0.0, w, label_smoothing=0.1), want)
    assert torch.equal(crossent.poly1_cross_entropy(x, t, w, label_smoothing=0.1, epsilon=0.0), want)
    tb = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        crossent.poly1_binary_cross_entropy_with_logits(x, tb, epsilon=0.0),
        crossent.binary_cross_entropy_with_logits(x, tb),
    )


def test_small_gamma_approaches_the_base_loss_smoothly():
    x, t = _data()
    base = crossent.binary_cross_entropy_with_logits(x, t, reduction="none")
    for g in (1e-3, 1e-6, 1e-9):
        # (1 - p_t)^g = 1 + g log(1 - p_t) + ...: the bound on the difference scales with g
        assert_close(crossent.sigmoid_focal_loss(x, t, -1, g), base, rtol=50 * g, atol=0)


# ------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("gamma", (0.5, 2.0))
def test_gradcheck_sigmoid_focal(gamma):
    x, t = _data((3, 4), soft=True)
    pw = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    x.requires_grad_()
    f = lambda x: crossent.sigmoid_focal_loss(x, t, 0.25, gamma, "mean", pos_weight=pw, label_smoothing=0.1)  # noqa
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    # gradients w.r.t. the target and the weights (reference formulas)
    tt = t.clone().requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, t, w: crossent.sigmoid_focal_loss(x, t, 0.25, gamma, weight=w), (x, tt, w)
    )


@pytest.mark.parametrize("kind", ("index", "probabilities"))
@pytest.mark.parametrize("fn", ("softmax_focal_loss", "poly1_cross_entropy"))
def test_gradcheck_softmax_family(kind, fn):
    x, t = _softmax_case(kind, {}, shape=(3, 4))
    x.requires_grad_()
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    if fn == "softmax_focal_loss":
        f = lambda x: crossent.softmax_focal_loss(x, t, 0.5, w, label_smoothing=0.1)  # noqa: E731
    else:
        f = lambda x: crossent.poly1_cross_entropy(x, t, w, label_smoothing=0.1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_gradcheck_asymmetric():
    x, t = _data((3, 4))
    x.requires_grad_()
    for clip in (0.05, 0.0):
        assert torch.autograd.gradcheck(lambda x: crossent.asymmetric_loss(x, t, clip=clip), (x,))
        assert torch.autograd.gradgradcheck(lambda x: crossent.asymmetric_loss(x, t, clip=clip), (x,))


# ------------------------------------------------------------------------------ asymmetric
def asl_reference(x, y, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8):
    """Ridnik et al.'s AsymmetricLoss.forward (per element, not yet negated and summed)."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    pt = xs_pos * y + xs_neg * (1 - y)
    gamma = gamma_pos * y + gamma_neg * (1 - y)
    return -(loss * torch.pow(1 - pt, gamma))


@pytest.mark.parametrize("clip", (0.05, 0.0, 0.2))
@pytest.mark.parametrize("gammas", ((4.0, 1.0), (0.0, 0.0), (2.0, 0.5)))
def test_asymmetric_equals_the_reference_where_it_is_accurate(clip, gammas):
    x, t = _data()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = crossent.asymmetric_loss(xa, t, *gammas, clip, reduction="sum")
    want = asl_reference(xb, t, *gammas, clip).sum()
    assert_close(got, want)
    got.backward()
    want.backward()
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_asymmetric_dtypes(dtype):
    x, t = _data()
    xd = x.to(dtype)
    got = crossent.asymmetric_loss(xd, t.to(dtype), reduction="none")
    assert got.dtype == dtype
    want = asl_reference(xd.double(), t.double())  # accurate for these moderate logits
    assert_close(got.double(), want.to(dtype).double(), dtype)


def test_asymmetric_zero_gammas_no_clip_is_bce():
    x, t = _data(soft=True)
    assert_close(crossent.asymmetric_loss(x, t, 0.0, 0.0, None), crossent.binary_cross_entropy_with_logits(x, t))


def test_asymmetric_is_finite_and_exact_for_huge_logits():
    x = torch.tensor([-40.0, -1e4, 1e4, 60.0])
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    xa = x.clone().requires_grad_()
    loss = crossent.asymmetric_loss(xa, t, reduction="none", clip=0.0)
    truth = torch.tensor([40.0, 1e4, 1e4, 60.0])  # softplus(|x|) (the focusing factors are 1)
    assert_close(loss, truth, torch.float32)
    loss.sum().backward()
    assert torch.isfinite(xa.grad).all() and (xa.grad.abs() > 0.99).all()
    # the reference saturates at -log(1e-8) = 18.42 with a zero gradient
    assert asl_reference(x[:1], t[:1], clip=0.0).item() == pytest.approx(18.42, abs=0.01)


# ------------------------------------------------------------------------- properties
def test_focal_is_below_bce_and_decreasing_in_gamma():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.floats(-60, 60), st.floats(0, 1), st.floats(0, 5), st.floats(0, 5))
    def prop(x, t, g1, g2):
        lo, hi = min(g1, g2), max(g1, g2)
        xt, tt = torch.tensor([x], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)
        bce = crossent.binary_cross_entropy_with_logits(xt, tt, reduction="none")
        f_lo = crossent.sigmoid_focal_loss(xt, tt, -1, lo)
        f_hi = crossent.sigmoid_focal_loss(xt, tt, -1, hi)
        assert (f_hi <= f_lo * (1 + 1e-12)).all() and (f_lo <= bce * (1 + 1e-12)).all()
        assert (f_hi >= 0).all()

    prop()


# ------------------------------------------------------------------------------ guardrails
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda x, t: crossent.sigmoid_focal_loss(x, t, alpha=1.5),
            CrossentValueError,
            r"`alpha` to be a finite number in \[0, 1\], or < 0 for no alpha weighting, but got 1.5",
        ),
        (
            lambda x, t: crossent.sigmoid_focal_loss(x, t, alpha="a"),
            CrossentTypeError,
            r"`alpha` to be a finite number in \[0, 1\], or < 0 for no alpha weighting, but got str",
        ),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t, gamma=-1.0), CrossentValueError, "`gamma` to be a finite"),
        (
            lambda x, t: crossent.sigmoid_focal_loss(x, t, gamma=float("nan")),
            CrossentValueError,
            "`gamma` to be a finite number >= 0, but got nan",
        ),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t * 2), CrossentValueError, r"values in \[0, 1\]"),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t[:, :2]), CrossentValueError, "same shape"),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t, reduction="avg"), CrossentValueError, "reduction"),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t, label_smoothing=1.5), CrossentValueError, "label_smoothing"),
        (lambda x, t: crossent.sigmoid_focal_loss(x, t, pos_weight=torch.ones(3)), CrossentValueError, "pos_weight"),
        (
            lambda x, t: crossent.poly1_binary_cross_entropy_with_logits(x, t, epsilon=-2.0),
            CrossentValueError,
            "`epsilon` to be a finite number >= -1",
        ),
        (
            lambda x, t: crossent.poly1_cross_entropy(x, t.argmax(1), epsilon=float("inf")),
            CrossentValueError,
            "epsilon",
        ),
        (
            lambda x, t: crossent.softmax_focal_loss(x, t.argmax(1), gamma=-0.5),
            CrossentValueError,
            "`gamma` to be a finite number >= 0, but got -0.5",
        ),
        (lambda x, t: crossent.softmax_focal_loss(x, t.argmax(1) + 5), crossent.CrossentIndexError, "class"),
        (lambda x, t: crossent.softmax_focal_loss(x, t.argmax(1), weight=torch.ones(3)), CrossentValueError, "weight"),
        (
            lambda x, t: crossent.asymmetric_loss(x, t, clip=1.0),
            CrossentValueError,
            r"`clip` to be a number in \[0, 1\) or None, but got 1.0",
        ),
        (
            lambda x, t: crossent.asymmetric_loss(x, t, gamma_neg=-1),
            CrossentValueError,
            "`gamma_neg` to be a finite number >= 0, but got -1",
        ),
        (lambda x, t: crossent.asymmetric_loss(x, t - 1), CrossentValueError, r"values in \[0, 1\]"),
    ],
)
def test_guardrails(call, exc, match):
    x, t = _data((4, 5))
    with pytest.raises(exc, match=match):
        call(x.float(), t.float())


def test_logits_that_look_like_probabilities_warn():
    x = torch.rand(64, 8)
    t = (torch.rand(64, 8) > 0.5).float()
    crossent._validation.reset_warnings()
    with pytest.warns(UserWarning, match="looks like probabilities"):
        crossent.sigmoid_focal_loss(x, t)


def test_validate_false_skips_value_checks():
    x, t = _data((4, 5))
    crossent.sigmoid_focal_loss(x, t * 2, validate=False)  # no error: the caller took the responsibility


# ------------------------------------------------------------------ modules and return_parts
def test_modules_match_functional_and_carry_buffers():
    x, t = _data()
    pw = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0], dtype=torch.float64)
    m = crossent.nn.SigmoidFocalLoss(0.5, 1.0, "mean", pos_weight=pw, ignore_index=-1)
    assert set(m.state_dict()) == {"pos_weight"}
    assert_close(m(x, t), crossent.sigmoid_focal_loss(x, t, 0.5, 1.0, "mean", pos_weight=pw, ignore_index=-1))
    y = t.argmax(1)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    sm = crossent.nn.SoftmaxFocalLoss(1.0, w, label_smoothing=0.1)
    assert "weight" in sm.state_dict()
    assert_close(sm(x, y), crossent.softmax_focal_loss(x, y, 1.0, w, label_smoothing=0.1))
    p1 = crossent.nn.Poly1CrossEntropyLoss(w, epsilon=0.5)
    assert_close(p1(x, y), crossent.poly1_cross_entropy(x, y, w, epsilon=0.5))
    pb = crossent.nn.Poly1BCEWithLogitsLoss(pos_weight=pw, epsilon=2.0)
    assert_close(pb(x, t), crossent.poly1_binary_cross_entropy_with_logits(x, t, pos_weight=pw, epsilon=2.0))
    asl = crossent.nn.AsymmetricLoss(3.0, 0.0, 0.1, "sum")
    assert_close(asl(x, t), crossent.asymmetric_loss(x, t, 3.0, 0.0, 0.1, "sum"))
    assert "gamma=2.0" in repr(crossent.nn.SoftmaxFocalLoss())


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (crossent.nn.SigmoidFocalLoss, dict(alpha=2.0), "alpha"),
        (crossent.nn.SoftmaxFocalLoss, dict(gamma=-1.0), "gamma"),
        (crossent.nn.SoftmaxFocalLoss, dict(weight=torch.ones(2, 2)), "one number per class"),
        (crossent.nn.Poly1CrossEntropyLoss, dict(epsilon=-3.0), "epsilon"),
        (crossent.nn.AsymmetricLoss, dict(clip=-0.1), "clip"),
    ],
)
def test_module_constructors_check_options(cls, kw, match):
    with pytest.raises(CrossentValueError, match=match):
        cls(**kw)


def test_negative_pos_weight_warns_like_the_base_loss():
    crossent._validation.reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match="negative or NaN weight"):
        crossent.nn.SigmoidFocalLoss(pos_weight=[-1.0])


@pytest.mark.parametrize(
    "fn, target",
    [
        ("sigmoid_focal_loss", "binary"),
        ("poly1_binary_cross_entropy_with_logits", "binary"),
        ("asymmetric_loss", "binary"),
        ("softmax_focal_loss", "index"),
        ("poly1_cross_entropy", "index"),
    ],
)
def test_return_parts(fn, target):
    x, t = _data()
    if target == "index":
        t = t.argmax(1)
        t[1] = -100
        parts = getattr(crossent, fn)(x, t, return_parts=True)
        assert parts.denominator.item() == 5
    else:
        t = t.clone()
        t[0, 0] = -1
        parts = getattr(crossent, fn)(x, t, reduction="mean", ignore_index=-1, return_parts=True)
        assert parts.denominator.item() == x.numel() - 1
    assert_close(parts.loss, (parts.total / parts.denominator).to(parts.loss.dtype))


# ------------------------------------------------------------------ the compiled CPU kernel
@pytest.mark.parametrize("gamma", (0.5, 1.0, 1.5, 2.0, 5.0, 0.7))
@pytest.mark.parametrize("opts", (dict(alpha=0.25, epsilon=0.0), dict(alpha=-1.0, epsilon=1.0)))
@pytest.mark.parametrize("pos_weight", (False, True))
def test_cpu_kernel_float32_matches_float64_composition(gamma, opts, pos_weight):
    """float32 'chunked' (the C kernel for gamma a multiple of 1/2, chunked torch ops
    otherwise) against the float64 composition; odd sizes exercise the vector tails."""
    from crossent.backends import focal

    g = torch.Generator().manual_seed(5)
    x = torch.randn(67, 13, generator=g) * 4
    t = torch.rand(67, 13, generator=g)
    t[:30] = t[:30].round()
    pw = torch.rand(13, generator=g) + 0.5 if pos_weight else None
    loss, grad = focal.binary_focal_forward(x, t, None, pw, None, opts["alpha"], gamma, opts["epsilon"], "chunked")
    xr = x.double().requires_grad_()
    want = binary_composition(xr, t.double(), gamma=gamma, pos_weight=None if pw is None else pw.double(), **opts)
    want.sum().backward()
    assert_close(loss, want.float())
    assert_close(grad, xr.grad.float())


@pytest.mark.parametrize("loss", ("focal", "poly1"))
@pytest.mark.parametrize("weight", (False, True))
def test_softmax_cpu_kernel_path_float32_with_ignored_rows(loss, weight):
    """float32 class indices without smoothing run the compiled cross-entropy kernel twice
    (n_y, then the gradient with row weights c phi'(n_y)); ignored NaN rows stay absent."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 7, generator=g) * 4
    x[5, 2] = 40.0
    y = torch.randint(0, 7, (40,), generator=g)
    y[5] = 2
    y[[3, 11]] = -100
    x[3] = float("nan")
    w = torch.rand(7, generator=g) + 0.5 if weight else None
    xa = x.clone().requires_grad_()
    if loss == "focal":
        got = crossent.softmax_focal_loss(xa, y, 2.0, w, backend="chunked")
        ck = dict(gamma=2.0)
    else:
        got = crossent.poly1_cross_entropy(xa, y, w, epsilon=1.0, backend="chunked")
        ck = dict(epsilon=1.0)
    xc = torch.where(torch.isnan(x), 0.0, x).double().requires_grad_()
    per, den = softmax_composition(xc, y, weight=None if w is None else w.double(), **ck)
    want = per.sum() / den
    assert_close(got, want.float())
    got.backward()
    want.backward()
    assert_close(xa.grad, (xc.grad * ~torch.isnan(x)).float())
    assert (xa.grad[3] == 0).all()


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("pos_weight", (False, True))
def test_cpu_kernel_sum_only_path_any_grad_output(reduction, pos_weight):
    """float32 'mean' / 'sum' on the CPU kernel: sum only, gradient pre-scaled; any other
    grad_output (loss * 3), a second backward (retain_graph) and double backward still right."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(33, 9, generator=g) * 5
    t = (torch.rand(33, 9, generator=g) > 0.7).float()
    pw = torch.rand(9, generator=g) + 0.5 if pos_weight else None
    xr = x.double().requires_grad_()
    per = binary_composition(xr, t.double(), alpha=0.25, gamma=2.0, pos_weight=None if pw is None else pw.double())
    want = per.mean() if reduction == "mean" else per.sum()
    (gw,) = torch.autograd.grad(want, xr, create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), xr)
    xa = x.clone().requires_grad_()
    got = crossent.sigmoid_focal_loss(xa, t, reduction=reduction, pos_weight=pw)
    assert_close(got, want.float())
    (g1,) = torch.autograd.grad(got, xa, retain_graph=True)
    assert_close(g1, gw.detach().float())
    (g2,) = torch.autograd.grad(got, xa, retain_graph=True)
    assert torch.equal(g1, g2)
    (g3,) = torch.autograd.grad(got * 3, xa, retain_graph=True)
    assert_close(g3, 3 * gw.detach().float())
    (gc,) = torch.autograd.grad(got, xa, create_graph=True)
    (h,) = torch.autograd.grad(gc.sum(), xa)
    assert_close(h, hw.float())


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_softmax_prescaled_path_any_grad_output(reduction):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(21, 6, generator=g) * 3
    y = torch.randint(0, 6, (21,), generator=g)
    y[4] = -100
    w = torch.rand(6, generator=g) + 0.5
    xr = x.double().requires_grad_()
    per, den = softmax_composition(xr, y, gamma=2.0, weight=w.double())
    want = per.sum() / den if reduction == "mean" else per.sum()
    (gw,) = torch.autograd.grad(want, xr, create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), xr)
    xa = x.clone().requires_grad_()
    got = crossent.softmax_focal_loss(xa, y, 2.0, w, reduction=reduction)
    assert_close(got, want.float())
    (g1,) = torch.autograd.grad(got, xa, retain_graph=True)
    assert_close(g1, gw.detach().float())
    (g2,) = torch.autograd.grad(got, xa, retain_graph=True)
    assert torch.equal(g1, g2)
    (g3,) = torch.autograd.grad(got * 3, xa, retain_graph=True)
    assert_close(g3, 3 * gw.detach().float())
    (gc,) = torch.autograd.grad(got, xa, create_graph=True)
    (h,) = torch.autograd.grad(gc.sum(), xa)
    assert_close(h, hw.float())
