"""One test per extension over torch, each checked against the math or against the
equivalent torch call; docs/exactness.md lists the same extensions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import crossent
import crossent.functional as CF
import crossent.nn as CN
from _helpers import assert_close, gen, logits, probabilities, soft_targets

pytestmark = pytest.mark.usefixtures("backend")  # every CPU backend (tests/conftest.py)


def test_bce_targets_may_be_bool_or_integer():
    """pytorch#842: 0/1 labels as bool or any integer dtype are cast (torch raises)."""
    g = gen(70)
    p, x = probabilities((4, 3), g), logits((4, 3), g)
    hard = torch.rand(4, 3, generator=g) > 0.5
    for dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        t = hard.to(dt)
        for fn, inp in ((CF.binary_cross_entropy, p), (CF.binary_cross_entropy_with_logits, x)):
            got = fn(inp, t, reduction="none")
            assert got.dtype == inp.dtype
            assert_close(got, fn(inp, hard.double(), reduction="none"))
        assert_close(CN.BCEWithLogitsLoss()(x, t), TF.binary_cross_entropy_with_logits(x, hard.double()))


def test_ce_class_indices_may_have_any_integer_dtype():
    """pytorch#45540: int32 (and int8/int16/uint8) class indices; torch wants int64."""
    g = gen(71)
    x = logits((5, 4, 2), g)
    y = torch.randint(0, 4, (5, 2), generator=g)
    expected = TF.cross_entropy(x, y, label_smoothing=0.1)
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert_close(CF.cross_entropy(x, y.to(dt), label_smoothing=0.1), expected)
        assert_close(CN.CrossEntropyLoss()(x, y.to(dt)), TF.cross_entropy(x, y))
    # ignore_index with a narrow dtype
    yi = y.clone()
    yi[0] = -1
    assert_close(CF.cross_entropy(x, yi.to(torch.int8), ignore_index=-1), TF.cross_entropy(x, yi, ignore_index=-1))


@pytest.mark.parametrize("form", ["float", "list", "tuple"])
def test_weight_and_pos_weight_accept_numbers_and_sequences(form):
    g = gen(72)
    x, t = logits((4, 3), g).float(), soft_targets((4, 3), g).float()
    w = [0.5, 1.0, 2.0]
    pw = [3.0, 1.0, 0.25]
    conv = {"float": lambda v: v[0], "list": list, "tuple": tuple}[form]
    as_t = lambda v: torch.tensor(conv(v), dtype=torch.float32)  # noqa: E731
    assert_close(
        CF.binary_cross_entropy_with_logits(x, t, weight=conv(w), pos_weight=conv(pw)),
        TF.binary_cross_entropy_with_logits(x, t, weight=as_t(w), pos_weight=as_t(pw)),
    )
    p = torch.sigmoid(x)
    assert_close(CF.binary_cross_entropy(p, t, weight=conv(w)), TF.binary_cross_entropy(p, t, weight=as_t(w).expand(3)))
    m = CN.BCEWithLogitsLoss(weight=conv(w), pos_weight=conv(pw))
    assert isinstance(m.weight, torch.Tensor) and isinstance(m.pos_weight, torch.Tensor)
    assert_close(m(x, t), TF.binary_cross_entropy_with_logits(x, t, weight=as_t(w), pos_weight=as_t(pw)))
    if form != "float":
        y = torch.tensor([0, 2, 1, 1])
        assert_close(CF.cross_entropy(x, y, weight=conv(w)), TF.cross_entropy(x, y, weight=as_t(w)))
        assert_close(CN.CrossEntropyLoss(weight=conv(w))(x, y), TF.cross_entropy(x, y, weight=as_t(w)))
    # integer weight tensors are taken as numbers too (torch: "expected scalar type Float")
    wi = torch.tensor([1, 2, 3])
    y = torch.tensor([0, 2, 1, 1])
    assert_close(CF.cross_entropy(x, y, weight=wi), TF.cross_entropy(x, y, weight=wi.float()))
    assert_close(
        CF.binary_cross_entropy_with_logits(x, t, weight=wi),
        TF.binary_cross_entropy_with_logits(x, t, weight=wi.float()),
    )


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 1.0])
def test_label_smoothing_for_both_bce_losses_is_keras(eps):
    """Targets become t (1 - e) + e / 2 (Keras; pytorch#91545), checked against the math."""
    g = gen(73)
    x, t = logits((5, 3), g), soft_targets((5, 3), g)
    ts = t * (1 - eps) + eps / 2
    p = torch.sigmoid(x)
    expected_logits = ts * torch.log1p(torch.exp(-x)) + (1 - ts) * torch.log1p(torch.exp(x))
    expected_probs = -(ts * torch.log(p) + (1 - ts) * torch.log1p(-p))
    assert_close(CF.binary_cross_entropy_with_logits(x, t, reduction="none", label_smoothing=eps), expected_logits)
    assert_close(CF.binary_cross_entropy(p, t, reduction="none", label_smoothing=eps), expected_probs)
    assert_close(CN.BCEWithLogitsLoss(label_smoothing=eps)(x, t), expected_logits.mean())
    assert_close(CN.BCELoss(label_smoothing=eps, reduction="sum")(p, t), expected_probs.sum())


def test_pos_weight_for_bce_on_probabilities():
    """pytorch#20424: -[pw t log p + (1 - t) log(1 - p)], gradient included."""
    g = gen(74)
    p, t = probabilities((6, 3), g), soft_targets((6, 3), g)
    pw = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    pr = p.clone().requires_grad_()
    got = CF.binary_cross_entropy(pr, t, reduction="none", pos_weight=pw)
    expected = -(pw * t * torch.log(p) + (1 - t) * torch.log1p(-p))
    assert_close(got.detach(), expected)
    (grad,) = torch.autograd.grad(got.sum(), pr)
    assert_close(grad, -pw * t / p + (1 - t) / (1 - p))
    # same as BCE-with-logits with pos_weight on the logits
    assert_close(got.detach(), CF.binary_cross_entropy_with_logits(torch.logit(p), t, reduction="none", pos_weight=pw))
    m = CN.BCELoss(pos_weight=pw)
    assert "pos_weight" in m.state_dict()
    assert_close(m(p, t), expected.mean())


@pytest.mark.parametrize("loss", ["bce", "bce_logits"])
def test_ignore_index_for_both_bce_losses(loss):
    """Ignored elements: no loss, zero gradient; mean divides by the number kept."""
    g = gen(75)
    x = probabilities((6, 4), g) if loss == "bce" else logits((6, 4), g)
    t = (torch.rand(6, 4, generator=g) > 0.5).double()
    t[0, :3] = -1
    t[3, 1] = -1
    keep = t != -1
    fn = CF.binary_cross_entropy if loss == "bce" else CF.binary_cross_entropy_with_logits
    xr = x.clone().requires_grad_()
    none = fn(xr, t, reduction="none", ignore_index=-1)
    assert (none[~keep] == 0).all() and (none[keep] > 0).all()
    (grad,) = torch.autograd.grad(none.sum(), xr)
    assert (grad[~keep] == 0).all() and (grad[keep] != 0).all()
    tf = TF.binary_cross_entropy if loss == "bce" else TF.binary_cross_entropy_with_logits
    kept_only = tf(x[keep], t[keep], reduction="sum")
    assert_close(fn(x, t, reduction="sum", ignore_index=-1), kept_only)
    assert_close(fn(x, t, ignore_index=-1), kept_only / keep.sum())
    parts = fn(x, t, ignore_index=-1, return_parts=True)
    assert parts.denominator.item() == keep.sum().item()
    module = CN.BCELoss(ignore_index=-1) if loss == "bce" else CN.BCEWithLogitsLoss(ignore_index=-1)
    assert_close(module(x, t), kept_only / keep.sum())
    # every element ignored: mean is nan (0/0, like torch's cross-entropy), gradient 0
    xr = x.clone().requires_grad_()
    out = fn(xr, torch.full_like(t, -1), ignore_index=-1)
    assert math.isnan(out.item())
    (grad,) = torch.autograd.grad(out, xr)
    assert (grad == 0).all()


def test_bce_under_cpu_autocast_computes_in_float32():
    """BCELoss on probabilities under torch.autocast(cpu, bfloat16): computed in float32,
    equal to the float32 computation on the same bfloat16 probabilities."""
    g = gen(76)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5, generator=g)
    t = soft_targets((8, 3), g).float()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        p = torch.sigmoid(lin(x))
        assert p.dtype == torch.bfloat16
        loss = CN.BCELoss()(p, t)
    assert loss.dtype == torch.float32
    assert_close(loss, CF.binary_cross_entropy(p.detach().float(), t))
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_weight_and_pos_weight_are_differentiable():
    """torch refuses gradients w.r.t. weight / pos_weight (and CE class weights of index
    targets); crossent gives them (checked against the closed forms)."""
    g = gen(77)
    x, t = logits((4, 3), g), soft_targets((4, 3), g)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    pw = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    out = CF.binary_cross_entropy_with_logits(x, t, w, reduction="sum", pos_weight=pw)
    gw, gpw = torch.autograd.grad(out, (w, pw))
    sp = lambda z: torch.log1p(torch.exp(z))  # noqa: E731
    assert_close(gw, (pw * t * sp(-x) + (1 - t) * sp(x)).sum(0).detach())
    assert_close(gpw, (w * t * sp(-x)).sum(0).detach())


def test_mixed_float_dtypes_are_promoted_for_bce():
    """torch's BCE raises 'Found dtype Double but expected Float' for float32 predictions
    with float64 targets (numpy labels); crossent computes in the promoted dtype and
    returns the prediction's dtype. Same for a CE class weight of another float dtype."""
    g = gen(78)
    p, t = probabilities((4, 3), g), soft_targets((4, 3), g)
    got = CF.binary_cross_entropy(p.float(), t)
    assert got.dtype == torch.float32
    assert_close(got, TF.binary_cross_entropy(p.float().double(), t).float())
    x = logits((4, 3), g).float()
    y = torch.tensor([0, 1, 2, 0])
    w = torch.rand(3, generator=g, dtype=torch.float64)
    got = CF.cross_entropy(x, y, weight=w)
    assert got.dtype == torch.float32
    assert_close(got, TF.cross_entropy(x, y, weight=w.float()))


def test_return_parts_gives_exact_numerator_and_denominator():
    g = gen(79)
    x = logits((6, 3), g)
    y = torch.tensor([0, 1, -100, 2, 2, 1])
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    parts = crossent.cross_entropy(x, y, w, return_parts=True)
    assert isinstance(parts, crossent.LossParts)
    assert_close(parts.loss, TF.cross_entropy(x, y, w))
    assert_close(parts.denominator, torch.tensor(2.0 + 1.0 + 0.5 + 0.5 + 2.0, dtype=torch.float64))
    assert_close(parts.total, TF.cross_entropy(x, y, w, reduction="sum"))
