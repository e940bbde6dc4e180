"""The exceptions and warnings crossent raises, importable from here and from ``crossent``.

Each subclasses the builtin a caller would catch without knowing crossent
(``ValueError``, ``TypeError``, ``IndexError``, ``RuntimeError``, ``UserWarning``), and
each message follows one template: what was expected, what was found, and the fix.

>>> import torch, crossent
>>> from crossent.errors import CrossentValueError
>>> try:
...     crossent.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="avg")
... except ValueError as exc:   # CrossentValueError is a ValueError
...     print(type(exc).__name__)
CrossentValueError
"""

from __future__ import annotations

from typing import NoReturn

__all__ = [
    "BackendUnavailableError",
    "CrossentIndexError",
    "CrossentTypeError",
    "CrossentValueError",
    "CrossentWarning",
    "HistoryFileError",
    "KernelCacheWarning",
]


class CrossentWarning(UserWarning):
    """A probable mistake that still has a well-defined answer.

    Filter it like any warning: ``warnings.filterwarnings("ignore", category=CrossentWarning)``.
    """


class KernelCacheWarning(CrossentWarning):
    """A cached compiled kernel, or its directory, was refused (unsafe or damaged) and is
    not loaded; the kernel is rebuilt elsewhere (see :mod:`crossent.backends.chunked_cpp`)."""


class CrossentValueError(ValueError):
    """A value or shape that would give a wrong loss."""


class CrossentTypeError(TypeError):
    """A dtype or argument type that crossent cannot use."""


class CrossentIndexError(CrossentValueError, IndexError):
    """A class index outside ``[0, C)`` that is not ``ignore_index``."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


class HistoryFileError(CrossentValueError):
    """A history file that cannot be read back (truncated, hand-edited, wrong types).

    The message names the file and what is wrong; ``path`` holds the file's path.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def fail(func: str, what: str, found: str, fix: str = "", cls: type = CrossentValueError) -> NoReturn:
    """Raise ``cls`` with the house message template (used by crossent's own modules):
    ``{func}: expected {what}, but got {found}. {fix}``."""
    msg = f"{func}: expected {what}, but got {found}."
    if fix:
        msg += f" {fix}"
    raise cls(msg)
