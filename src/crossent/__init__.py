"""crossent: drop-in, exact and checked cross-entropy losses for PyTorch.

Change one import line::

    import crossent.nn as nn              # was: import torch.nn as nn
    import crossent.functional as F       # was: import torch.nn.functional as F

For code you do not own, ``with crossent.patch(): ...`` routes torch's own loss functions
and classes through crossent (see :func:`crossent.patch`).
"""

__version__ = "0.1.0"

from . import class_weights
from . import errors
from . import functional
from . import nn
from . import probabilities
from . import tracking
from ._patch import patch
from ._patch import unpatch
from .errors import BackendUnavailableError
from .errors import CrossentIndexError
from .errors import CrossentTypeError
from .errors import CrossentValueError
from .errors import CrossentWarning
from .errors import KernelCacheWarning
from .functional import LossParts
from .functional import asymmetric_loss
from .functional import binary_cross_entropy
from .functional import binary_cross_entropy_with_logits
from .functional import cross_entropy
from .functional import linear_binary_cross_entropy_with_logits
from .functional import linear_cross_entropy
from .functional import linear_token_logprobs
from .functional import poly1_binary_cross_entropy_with_logits
from .functional import poly1_cross_entropy
from .functional import sigmoid_focal_loss
from .functional import softmax_focal_loss
from .functional import token_logprobs

__all__ = [
    "BackendUnavailableError",
    "CrossentIndexError",
    "CrossentTypeError",
    "CrossentValueError",
    "CrossentWarning",
    "KernelCacheWarning",
    "LossParts",
    "asymmetric_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "class_weights",
    "cross_entropy",
    "errors",
    "functional",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "nn",
    "patch",
    "poly1_binary_cross_entropy_with_logits",
    "poly1_cross_entropy",
    "probabilities",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "token_logprobs",
    "tracking",
    "unpatch",
]
