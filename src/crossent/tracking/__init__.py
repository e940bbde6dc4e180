"""Loss bookkeeping: exact epoch averages (also across processes), history files, plots.

* :class:`LossMeter` adds up the exact numerator and denominator of every batch's loss
  (``return_parts=True``) in float64 and divides once; all-reduces both under
  ``torch.distributed``.
* :class:`History` keeps per-epoch records and writes them as CSV / JSON atomically.
* :func:`plot_history` draws train and validation curves on one axes and saves a PNG
  (needs the optional ``plot`` extra: ``pip install "crossent[plot]"``).

Importing this package imports neither matplotlib nor tqdm.
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
