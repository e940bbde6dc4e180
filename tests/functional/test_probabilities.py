"""Probabilities helpers and the exact bridge between 2-logit softmax and 1-logit sigmoid heads."""

import math

import pytest
import torch
import torch.nn.functional as TF

import crossent
import crossent.functional as CF
from crossent import probabilities as P

from _helpers import TOL


def _z(n=64, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64) * scale
    z[:4] = torch.tensor([[30.0, -30.0], [-45.0, 40.0], [0.0, 0.0], [700.0, 699.0]], dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    return z, y


def test_reexported():
    assert crossent.probabilities is P


def test_sigmoid_of_difference_is_softmax_class_one():
    z, _ = _z()
    d = P.two_logits_to_one(z)
    soft = P.multiclass_probabilities(z)[:, 1]
    # independent reference in float64: e^{z1} / (e^{z0} + e^{z1}) with the max subtracted
    m = z.max(1).values
    ref = torch.exp(z[:, 1] - m) / (torch.exp(z[:, 0] - m) + torch.exp(z[:, 1] - m))
    torch.testing.assert_close(torch.sigmoid(d), ref, **TOL["f64_same_math"])
    torch.testing.assert_close(soft, ref, **TOL["f64_same_math"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_on_two_logits_equals_bce_on_the_difference(reduction, smoothing):
    z, y = _z()
    za = z.clone().requires_grad_(True)
    zb = z.clone().requires_grad_(True)
    ce = CF.cross_entropy(za, y, reduction=reduction, label_smoothing=smoothing)
    bce = CF.binary_cross_entropy_with_logits(
        P.two_logits_to_one(zb), y.double(), reduction=reduction, label_smoothing=smoothing
    )
    torch.testing.assert_close(ce, bce, **TOL["f64_same_math"])
    g = torch.randn_like(ce)
    (ga,) = torch.autograd.grad(ce, za, g)
    (gb,) = torch.autograd.grad(bce, zb, g)
    torch.testing.assert_close(ga, gb, **TOL["f64_same_math"])
    # the same identity holds for torch's own losses (an independent check of the math);
    # torch's BCE-with-logits formula cancels for tiny losses: an absolute floor, not relative
    ref = TF.binary_cross_entropy_with_logits(
        z[:, 1] - z[:, 0], y.double() * (1 - smoothing) + smoothing / 2, reduction=reduction
    )
    torch.testing.assert_close(
        TF.cross_entropy(z, y, reduction=reduction, label_smoothing=smoothing), ref, rtol=1e-12, atol=1e-14
    )


def test_class_weights_map_to_per_sample_weights_for_sums():
    z, y = _z()
    w = torch.tensor([0.4, 2.5], dtype=torch.float64)
    ce = CF.cross_entropy(z, y, weight=w, reduction="sum")
    bce = CF.binary_cross_entropy_with_logits(P.two_logits_to_one(z), y.double(), weight=w[y], reduction="sum")
    torch.testing.assert_close(ce, bce, **TOL["f64_same_math"])


def test_binary_class_probabilities_keep_the_small_one():
    z = torch.tensor([-30.0, -1.0, 0.0, 2.0, 20.0, 40.0], dtype=torch.float32)
    p = P.binary_class_probabilities(z)
    ref0 = torch.tensor([1 / (1 + math.exp(-v)) for v in (-z).double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(p[:, 0].double(), ref0, **TOL["f32_vs_f64"])  # relative, even at 4e-18
    assert (1 - torch.sigmoid(z))[-1].item() == 0.0 and p[-1, 0].item() > 0
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    torch.testing.assert_close(p, P.multiclass_probabilities(P.one_logit_to_two(z)), **TOL["f32_vs_f64"])


def test_logit_conversions_round_trip_exactly():
    z = torch.randn(10, dtype=torch.float64) * 50
    two = P.one_logit_to_two(z)
    assert two.shape == (10, 2) and torch.equal(P.two_logits_to_one(two), z)
    assert torch.equal(P.one_logit_to_two(z.unsqueeze(1)), two)  # (N, 1) -> (N, 2)
    assert P.one_logit_to_two(torch.tensor([1.5])).shape == (1, 2)  # a batch of one stays a batch


def test_head_conversions():
    torch.manual_seed(0)
    h = torch.randn(32, 7, dtype=torch.float64)
    one = torch.nn.Linear(7, 1, dtype=torch.float64)
    two = P.one_logit_head_to_two(one)
    assert two.weight.shape == (2, 7) and two.weight.data_ptr() != one.weight.data_ptr()
    torch.testing.assert_close(P.two_logits_to_one(two(h)), one(h).squeeze(1), **TOL["f64_same_math"])
    torch.testing.assert_close(
        P.multiclass_probabilities(two(h))[:, 1], torch.sigmoid(one(h)).squeeze(1), **TOL["f64_same_math"]
    )
    two_rand = torch.nn.Linear(7, 2, dtype=torch.float64)
    back = P.two_logit_head_to_one(two_rand)
    torch.testing.assert_close(back(h).squeeze(1), P.two_logits_to_one(two_rand(h)), **TOL["f64_same_math"])
    with pytest.raises(ValueError, match=r"one_logit_head_to_two: expected a Linear head with out_features=1"):
        P.one_logit_head_to_two(two_rand)
    with pytest.raises(TypeError, match=r"expected a torch.nn.Linear head"):
        P.two_logit_head_to_one(torch.nn.ReLU())


def test_binary_predictions_and_thresholds():
    z = torch.tensor([-3.0, -0.1, 0.0, 0.1, 2.0, 2.2])
    assert P.binary_predictions(z).tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(P.binary_predictions(z), (torch.sigmoid(z) > 0.5).long())
    # threshold 0.9 <=> logit > log(9) = 2.197...
    assert P.binary_predictions(z, threshold=0.9).tolist() == [0, 0, 0, 0, 0, 1]
    assert P.binary_predictions(z.unsqueeze(1)).shape == (6, 1)
    assert P.multilabel_predictions(torch.tensor([[1.0, -1.0], [-2.0, 3.0]])).tolist() == [[1, 0], [0, 1]]
    torch.testing.assert_close(P.multilabel_probabilities(torch.zeros(2, 3)), torch.full((2, 3), 0.5))


def test_multiclass_helpers_follow_cross_entropy_layout():
    x = torch.randn(4, 5, 3, 2)  # (N, C, d1, d2)
    p = P.multiclass_probabilities(x)
    torch.testing.assert_close(p.sum(1), torch.ones(4, 3, 2))
    assert P.multiclass_predictions(x).shape == (4, 3, 2)
    assert torch.equal(P.multiclass_predictions(x), x.argmax(1))
    assert P.multiclass_predictions(torch.tensor([0.1, 3.0, 0.2])).item() == 1  # (C,)
    half = P.multiclass_probabilities(torch.randn(3, 4).half())
    assert half.dtype == torch.float16
    assert P.multiclass_probabilities(x, dim=-1).shape == x.shape


def test_sigmoid_on_two_logits_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"binary_probabilities: expected one logit per sample.*2-logit softmax head"):
        P.binary_probabilities(torch.tensor([[-2.34, 3.45]]))
    with pytest.raises(ValueError, match=r"multilabel_predictions"):
        P.binary_predictions(torch.randn(4, 3))


def test_softmax_over_one_logit_is_refused():
    with pytest.raises(ValueError, match=r"softmax over one logit is always 1.*binary_probabilities"):
        P.multiclass_probabilities(torch.randn(8, 1))


@pytest.mark.parametrize("t", [0.0, 1.0, 1.5, -0.2])
def test_threshold_must_be_a_probability(t):
    with pytest.raises(ValueError, match=r"`threshold` in \(0, 1\)"):
        P.binary_predictions(torch.randn(3), threshold=t)


def test_other_misuse():
    with pytest.raises(TypeError, match=r"floating-point"):
        P.binary_probabilities(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"two_logits_to_one: expected exactly 2 logits"):
        P.two_logits_to_one(torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"`threshold` to be a float"):
        P.binary_predictions(torch.randn(3), threshold="0.5")
