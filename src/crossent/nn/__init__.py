"""``torch.nn``-compatible loss modules.

A complete stand-in for :mod:`torch.nn`: crossent defines the loss classes below, and
every other name (``Module``, ``Linear``, ``Parameter``, ``init``, ``utils``, ...) is
torch's own object, found by the module ``__getattr__``, so ``import crossent.nn as nn``
changes the losses and nothing else. ``nn.functional`` is :mod:`crossent.functional`
(also as ``import crossent.nn.functional``), so ``nn.functional.cross_entropy`` is
crossent's too. ``from crossent.nn import *`` gives crossent's names only (``__all__``).
"""

import sys

import torch.nn as _torch_nn

from .. import functional
from ._focal import AsymmetricLoss
from ._focal import Poly1BCEWithLogitsLoss
from ._focal import Poly1CrossEntropyLoss
from ._focal import SigmoidFocalLoss
from ._focal import SoftmaxFocalLoss
from ._linear import LinearBCEWithLogitsLoss
from ._linear import LinearCrossEntropyLoss
from ._loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss

# `import crossent.nn.functional as F` works like `import torch.nn.functional as F`.
sys.modules[__name__ + ".functional"] = functional

__all__ = [
    "AsymmetricLoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearBCEWithLogitsLoss",
    "LinearCrossEntropyLoss",
    "Poly1BCEWithLogitsLoss",
    "Poly1CrossEntropyLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
]


def __getattr__(name: str):
    """Every name crossent does not define is :mod:`torch.nn`'s (PEP 562)."""
    try:
        return getattr(_torch_nn, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (neither has torch.nn)") from None


def __dir__():
    return sorted(set(globals()) | set(dir(_torch_nn)))
