"""Loss bookkeeping: exact epoch averages (also across processes), history files, plots.
Design notes: ``docs/design.md``, section ``crossent.tracking``.
"""

from .history import History
from .history import HistoryFileError
from .meter import LossMeter
from .plot import plot_history

__all__ = [
    "History",
    "HistoryFileError",
    "LossMeter",
    "plot_history",
]
