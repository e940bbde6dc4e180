"""Each ``@overload`` of a loss names the type its flags really return."""

import sys
import typing

import pytest
import torch

import crossent
from crossent.functional import LossParts

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads needs Python 3.11")

g = torch.Generator().manual_seed(0)
X, W = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
CALLS = {
    "cross_entropy": lambda **kw: crossent.cross_entropy(X, torch.tensor([0, 1, 2, 0]), **kw),
    "binary_cross_entropy": lambda **kw: crossent.binary_cross_entropy(X.sigmoid(), (X > 0).float(), **kw),
    "binary_cross_entropy_with_logits": lambda **kw: crossent.binary_cross_entropy_with_logits(
        X, (X > 0).float(), **kw
    ),
    "linear_cross_entropy": lambda **kw: crossent.linear_cross_entropy(X, W, torch.tensor([0, 4, 2, 1]), **kw),
    "linear_binary_cross_entropy_with_logits": lambda **kw: crossent.linear_binary_cross_entropy_with_logits(
        X, W, (torch.randn(4, 5, generator=g) > 0).float(), **kw
    ),
}


def _matches(value, hint) -> bool:
    if hint is LossParts:
        return isinstance(value, LossParts)
    if hint is torch.Tensor:
        return isinstance(value, torch.Tensor) and not isinstance(value, tuple)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        return (
            isinstance(value, tuple)
            and not isinstance(value, LossParts)
            and len(value) == len(args)
            and all(_matches(v, h) for v, h in zip(value, args))
        )
    raise AssertionError(f"unexpected return annotation {hint!r}")


@pytest.mark.parametrize("name", list(CALLS))
def test_every_overload_returns_its_annotated_type(name):
    checked = 0
    for ov in typing.get_overloads(getattr(crossent, name)):
        hints = typing.get_type_hints(ov, globalns=vars(sys.modules[ov.__module__]))
        flags = {
            k: typing.get_args(v)[0]
            for k, v in hints.items()
            if k.startswith("return_") and typing.get_origin(v) is typing.Literal
        }
        if len(flags) < sum(k.startswith("return_") for k in hints if k != "return"):
            continue  # the catch-all overload for a plain ``bool`` flag
        assert _matches(CALLS[name](**flags), hints["return"]), (name, flags, hints["return"])
        checked += 1
    assert checked >= 2
