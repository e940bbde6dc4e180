"""``torch.nn``-compatible loss modules."""

from ._loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss"]
