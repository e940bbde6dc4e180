"""crossent: drop-in, exact and checked cross-entropy losses for PyTorch.

Change one import line::

    import crossent.nn as nn              # was: import torch.nn as nn
    import crossent.functional as F       # was: import torch.nn.functional as F

For code you do not own, ``with crossent.patch(): ...`` routes torch's own loss functions
and classes through crossent (see :func:`crossent.patch`).
"""

__version__ = "0.1.0"

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
from .functional import binary_cross_entropy
from .functional import binary_cross_entropy_with_logits
from .functional import cross_entropy
from .functional import linear_binary_cross_entropy_with_logits
from .functional import linear_cross_entropy

__all__ = [
    "BackendUnavailableError",
    "CrossentIndexError",
    "CrossentTypeError",
    "CrossentValueError",
    "CrossentWarning",
    "KernelCacheWarning",
    "LossParts",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "errors",
    "functional",
    "linear_binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "nn",
    "patch",
    "probabilities",
    "tracking",
    "unpatch",
]
