"""``torch.nn.functional``-compatible losses: same names, argument order and defaults."""

from ._binary import binary_cross_entropy, binary_cross_entropy_with_logits
from ._linear import linear_binary_cross_entropy_with_logits
from ._linear import linear_cross_entropy
from ._multiclass import cross_entropy
from ._reduction import LossParts

__all__ = [
    "LossParts",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
]
