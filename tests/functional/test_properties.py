"""Hypothesis properties of the three losses (float64, small shapes, modest example counts)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossent.functional as CF
from _helpers import assert_close

# Identities between values: generated cases may ignore every target (mean = nan, as in
# torch) or have C == d1 in (N, C, d1); those warnings are tested in tests/validation/test_input_checks.py.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*targets equal ignore_index:crossent.CrossentWarning"),
    pytest.mark.filterwarnings("ignore:.*class dimension is ambiguous:crossent.CrossentWarning"),
    pytest.mark.usefixtures("backend"),
]  # every CPU backend (tests/conftest.py)

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def binary_case(draw, logits_in=True):
    """(input, target, weight, pos_weight, ignore_index) for BCE losses, shape (N, C[, d])."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 4.0, 30.0]))
    if logits_in:
        x = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        x = torch.rand(shape, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    hard = draw(st.booleans())
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if hard:
        t = (t > 0.5).double()
    weight = torch.rand(shape[-1:], generator=g, dtype=torch.float64) + 0.5 if draw(st.booleans()) else None
    pos_weight = torch.rand(shape[-1:], generator=g, dtype=torch.float64) * 3 if draw(st.booleans()) else None
    return x, t, weight, pos_weight


@st.composite
def ce_case(draw):
    N = draw(st.integers(1, 5))
    C = draw(st.integers(2, 6))
    extra = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 4.0, 30.0]))
    x = scale * torch.randn((N, C) + extra, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,) + extra, generator=g)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if draw(st.booleans()) else None
    return x, y, weight


def _one_hot(y, C, dtype=torch.float64):
    return torch.nn.functional.one_hot(y, C).movedim(-1, 1).to(dtype)


# --------------------------------------------------------------------------- reductions
@SETTINGS
@given(binary_case(), st.sampled_from(["bce", "bce_logits"]))
def test_binary_sum_of_none_is_sum_and_mean_is_parts_ratio(case, loss):
    x, t, w, pw = case
    fn = CF.binary_cross_entropy_with_logits if loss == "bce_logits" else CF.binary_cross_entropy
    if loss == "bce":
        x = torch.sigmoid(x)
    none = fn(x, t, w, reduction="none", pos_weight=pw)
    total = fn(x, t, w, reduction="sum", pos_weight=pw)
    assert_close(none.sum(), total)
    parts = fn(x, t, w, reduction="mean", pos_weight=pw, return_parts=True)
    assert_close(parts.loss, parts.total / parts.denominator)
    assert parts.denominator.item() == x.numel()


@SETTINGS
@given(ce_case(), st.sampled_from([0.0, 0.1]), st.booleans())
def test_ce_sum_of_none_is_sum_and_mean_is_parts_ratio(case, eps, ignore_some):
    x, y, w = case
    if ignore_some:
        y = y.clone()
        y.view(-1)[::2] = -100
    none = CF.cross_entropy(x, y, w, reduction="none", label_smoothing=eps)
    total = CF.cross_entropy(x, y, w, reduction="sum", label_smoothing=eps)
    assert_close(none.sum(), total)
    parts = CF.cross_entropy(x, y, w, label_smoothing=eps, return_parts=True)
    assert_close(parts.loss, parts.total / parts.denominator)
    keep = y != -100
    expected_den = keep.sum().double() if w is None else w[y[keep]].sum()
    assert_close(parts.denominator, expected_den)


# --------------------------------------------------------------------------- target kinds
@SETTINGS
@given(ce_case(), st.sampled_from(["none", "sum"]))
def test_index_targets_equal_one_hot_probability_targets(case, reduction):
    """No smoothing. With weights torch's 'mean' denominators differ between the two
    target kinds (sum of w[y] vs N), so 'none' and 'sum' are compared."""
    x, y, w = case
    C = x.shape[1]
    a = CF.cross_entropy(x, y, w, reduction=reduction)
    b = CF.cross_entropy(x, _one_hot(y, C), w, reduction=reduction)
    assert_close(a, b)
    if w is None:
        assert_close(CF.cross_entropy(x, y), CF.cross_entropy(x, _one_hot(y, C)))
    # gradients too
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    CF.cross_entropy(xa, y, w, reduction="sum").backward()
    CF.cross_entropy(xb, _one_hot(y, C), w, reduction="sum").backward()
    assert_close(xa.grad, xb.grad)


@SETTINGS
@given(ce_case(), st.floats(0.0, 1.0), st.sampled_from(["none", "sum"]))
def test_label_smoothing_equals_smoothed_probability_target(case, eps, reduction):
    """(index y, smoothing e) == (probability target (1-e) onehot(y) + e/C, no smoothing)."""
    x, y, _ = case
    C = x.shape[1]
    q = (1 - eps) * _one_hot(y, C) + eps / C
    a = CF.cross_entropy(x, y, reduction=reduction, label_smoothing=eps)
    b = CF.cross_entropy(x, q, reduction=reduction)
    assert_close(a, b)
    # and with probability targets: smoothing q equals feeding (1-e) q + e/C
    c = CF.cross_entropy(x, _one_hot(y, C), reduction=reduction, label_smoothing=eps)
    assert_close(c, b)


@SETTINGS
@given(binary_case(), st.floats(0.0, 1.0), st.sampled_from(["none", "sum", "mean"]))
def test_binary_label_smoothing_equals_smoothed_target(case, eps, reduction):
    x, t, w, pw = case
    a = CF.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw, label_smoothing=eps)
    b = CF.binary_cross_entropy_with_logits(x, t * (1 - eps) + eps / 2, w, reduction=reduction, pos_weight=pw)
    assert_close(a, b)


# --------------------------------------------------------------------------- BCE vs BCE-with-logits
@SETTINGS
@given(binary_case(), st.sampled_from(["none", "sum", "mean"]))
def test_bce_of_sigmoid_equals_bce_with_logits(case, reduction):
    """Where sigmoid does not saturate (|x| < 30 in float64: 1 - sigmoid(x) keeps ~4
    digits at most there), BCE(sigmoid(x)) = BCE-with-logits(x), values and gradients."""
    x, t, w, pw = case
    x = x.clamp(-15, 15)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    a = CF.binary_cross_entropy(torch.sigmoid(xa), t, w, reduction=reduction, pos_weight=pw)
    b = CF.binary_cross_entropy_with_logits(xb, t, w, reduction=reduction, pos_weight=pw)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # sigmoid(x) rounds 1 - p to ~1e-16 absolute: relative error up to e^15 * 1e-16 ~ 3e-10
    assert_close(a, b, rtol=1e-8, atol=1e-12)
    up = torch.ones_like(a)
    (ga,) = torch.autograd.grad(a, xa, up)
    (gb,) = torch.autograd.grad(b, xb, up)
    assert_close(ga, gb, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(binary_case(logits_in=False), st.integers(-3, -1))
def test_binary_ignore_index_drops_elements(case, ignore_index):
    """Ignored elements contribute nothing; mean divides by the kept count."""
    x, t, w, pw = case
    t = t.clone()
    drop = torch.zeros_like(t, dtype=torch.bool)
    drop.view(-1)[::3] = True
    t[drop] = ignore_index
    keep = ~drop
    for fn, inp in ((CF.binary_cross_entropy, x), (CF.binary_cross_entropy_with_logits, torch.logit(x))):
        xg = inp.clone().requires_grad_()
        none = fn(xg, t, w, reduction="none", pos_weight=pw, ignore_index=ignore_index)
        (grad,) = torch.autograd.grad(none.sum(), xg)
        assert (grad[drop] == 0).all()
        none = none.detach()
        assert (none[drop] == 0).all()
        mean = fn(inp, t, w, pos_weight=pw, ignore_index=ignore_index)
        assert_close(mean, none.sum() / keep.sum())
