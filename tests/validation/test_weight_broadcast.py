"""Per-element weights must broadcast to the input (or the fused head's logits) without growing it."""

import pytest
import torch

import crossent

X = torch.randn(4, 3)
T = (X > 0).float()
W = torch.randn(3, 5)  # a linear head: 5 features -> 3 labels
H = torch.randn(4, 5)


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
@pytest.mark.parametrize(
    "call, shape_text",
    [
        (lambda **kw: crossent.binary_cross_entropy(X.sigmoid(), T, **kw), r"the input's shape \(4, 3\)"),
        (lambda **kw: crossent.binary_cross_entropy_with_logits(X, T, **kw), r"the input's shape \(4, 3\)"),
        (lambda **kw: crossent.linear_binary_cross_entropy_with_logits(H, W, T, **kw), r"the logits' shape \(4, 3\)"),
    ],
    ids=["bce", "bce_with_logits", "linear_bce"],
)
def test_a_weight_that_does_not_broadcast_names_both_shapes(call, shape_text, name):
    with pytest.raises(
        crossent.CrossentValueError, match=rf"expected `{name}` broadcastable to {shape_text}, but got shape \(2,\)"
    ):
        call(**{name: torch.ones(2)})
    with pytest.raises(crossent.CrossentValueError, match=rf"`{name}` broadcastable"):
        call(**{name: torch.ones(2, 4, 3)})  # broadcasts, but would grow the loss
    assert torch.isfinite(call(**{name: torch.ones(3)}))  # one per label broadcasts
