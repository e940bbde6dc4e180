"""``torch.nn``-compatible loss modules."""

from ._linear import LinearBCEWithLogitsLoss
from ._linear import LinearCrossEntropyLoss
from ._loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearBCEWithLogitsLoss",
    "LinearCrossEntropyLoss",
]
