"""``torch.nn.functional``-compatible losses: same names, argument order and defaults.

A complete stand-in for :mod:`torch.nn.functional`: crossent defines the losses below,
and every other name (``layer_norm``, ``gelu``, ``scaled_dot_product_attention``,
``nll_loss``, ...) is torch's own object, found by the module ``__getattr__``, so
``import crossent.functional as F`` changes the losses and nothing else.
``from crossent.functional import *`` gives crossent's names only (``__all__``).
"""

import torch.nn.functional as _torch_functional

from ._asymmetric import asymmetric_loss
from ._binary import binary_cross_entropy, binary_cross_entropy_with_logits
from ._focal import poly1_binary_cross_entropy_with_logits
from ._focal import poly1_cross_entropy
from ._focal import sigmoid_focal_loss
from ._focal import softmax_focal_loss
from ._linear import linear_binary_cross_entropy_with_logits
from ._linear import linear_cross_entropy
from ._lm_head import linear_token_logprobs
from ._lm_head import token_logprobs
from ._multiclass import cross_entropy
from ._reduction import LossParts

__all__ = [
    "LossParts",
    "asymmetric_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "poly1_binary_cross_entropy_with_logits",
    "poly1_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "token_logprobs",
]


def __getattr__(name: str):
    """Every name crossent does not define is :mod:`torch.nn.functional`'s (PEP 562)."""
    try:
        return getattr(_torch_functional, name)
    except AttributeError:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r} (neither has torch.nn.functional)"
        ) from None


def __dir__():
    return sorted(set(globals()) | set(dir(_torch_functional)))
