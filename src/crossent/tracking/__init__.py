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
from .history import atomic_write_bytes
from .history import atomic_write_text
from .meter import LossMeter
from .plot import new_figure
from .plot import plot_history
from .plot import save_figure

__all__ = [
    "History",
    "HistoryFileError",
    "LossMeter",
    "atomic_write_bytes",
    "atomic_write_text",
    "new_figure",
    "plot_history",
    "save_figure",
]
