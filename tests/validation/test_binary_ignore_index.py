"""Every BCE entry point refuses ``ignore_index`` 0 and 1 (the labels) with one rule."""

import pytest
import torch

import crossent
import crossent.functional as F
import crossent.nn as nn

MATCH = "different from the labels 0 and 1"


def _x_t():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    return x, (torch.rand(4, 3, generator=g) > 0.5).float()


def _bce(ii):
    x, t = _x_t()
    return F.binary_cross_entropy(torch.sigmoid(x), t, ignore_index=ii)


def _bce_logits(ii):
    x, t = _x_t()
    return F.binary_cross_entropy_with_logits(x, t, ignore_index=ii)


def _bce_module(ii):
    x, t = _x_t()
    return nn.BCELoss(ignore_index=ii)(torch.sigmoid(x), t)


def _bce_logits_module(ii):
    x, t = _x_t()
    return nn.BCEWithLogitsLoss(ignore_index=ii)(x, t)


def _linear(ii):
    x, t = _x_t()
    return crossent.linear_binary_cross_entropy_with_logits(x, torch.eye(3), t, ignore_index=ii)


def _linear_module(ii):
    x, t = _x_t()
    return nn.LinearBCEWithLogitsLoss(3, 3, ignore_index=ii)(x, t)


ENTRY_POINTS = [_bce, _bce_logits, _bce_module, _bce_logits_module, _linear, _linear_module]


@pytest.mark.parametrize("call", ENTRY_POINTS, ids=lambda f: f.__name__.lstrip("_"))
@pytest.mark.parametrize("label, drops", [(0, "negative"), (1, "positive")])
def test_bce_entry_points_refuse_the_labels_as_ignore_index(call, label, drops):
    with pytest.raises(crossent.CrossentValueError, match=rf"{MATCH}.*drop every {drops} label"):
        call(label)
    with pytest.raises(crossent.CrossentValueError, match=MATCH):
        call(torch.tensor(label))  # an integer 0-dim tensor is the same label


def test_linear_bce_drops_marked_elements_like_the_unfused_loss():
    x, t = _x_t()
    t[1, 2] = -1.0
    fused = crossent.linear_binary_cross_entropy_with_logits(x, torch.eye(3), t, ignore_index=-1)
    keep = t != -1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x[keep], t[keep])
    torch.testing.assert_close(fused, expected)


def test_cross_entropy_keeps_accepting_class_zero_as_ignore_index():
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    ours = F.cross_entropy(x, y, ignore_index=0)
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(x, y, ignore_index=0))
