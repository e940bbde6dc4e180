"""Per-epoch records of a run, saved as CSV and JSON that a crash cannot leave half-written.

A :class:`History` is a list of flat records (``dict`` of str -> number/str), usually one
per epoch and model::

    history = crossent.tracking.History()
    for epoch in range(1, epochs + 1):
        ...
        history.log(epoch=epoch, train_loss=train_meter.compute(), val_loss=val_meter.compute())
        history.save("runs/exp1")          # runs/exp1/history.csv and history.json, atomically

Atomic means *write, then rename*: the text goes to a temporary file in the target's
directory (``.history.csv.<random>.tmp``), is flushed and ``fsync``-ed, and then
``os.replace`` swaps it in. ``os.replace`` is atomic on POSIX and Windows, so a reader (or
a run killed mid-save) sees either the old complete file or the new complete file, never a
prefix. A process killed between the write and the rename can leave its hidden ``.tmp``
file behind (nothing can delete it); the target file is untouched.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import stat
from numbers import Number
from typing import Any, Dict, Iterable, List, Optional, Union

from .. import _validation as V

__all__ = ["History", "atomic_write_bytes", "atomic_write_text"]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same directory, fsync, rename).

    The directory must exist. On any error the temporary file is removed and ``path`` keeps
    its previous content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        try:  # keep the mode of the file we replace
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _create_temp(directory: str, name: str):
    """A new hidden temp file next to the target, created with mode 0o666 minus the umask.

    (``tempfile.mkstemp`` would create it 0o600, and ``os.replace`` would hand that mode
    to the target: a history file that only its owner can read.)
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"atomic_write: could not create a temporary file in {directory}")


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain(func: str, key: str, value):
    """Records hold JSON scalars: tensors and numpy numbers become Python numbers."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Number) and not isinstance(value, complex):
        return int(value) if isinstance(value, int) else float(value)
    V.fail(func, f"`{key}` to be a number, a string, a bool or None", type(value).__name__,
           "Log scalars only (e.g. meter.compute(), accuracy as a float).", V.CrossentTypeError)


class History:
    """Per-epoch records of a run (a list of flat dicts), with atomic CSV/JSON output.

    Args:
        records: optional initial records (e.g. from :meth:`load_json` when resuming).

    Columns are the union of the records' keys, in order of first appearance; a record
    without a key leaves that CSV cell empty (``null`` in JSON). Floats are written with
    ``repr`` (shortest exact round trip), so a saved loss reads back bit-identical;
    NaN/inf are written as ``nan``/``inf`` in CSV and ``NaN``/``Infinity`` in JSON (as
    Python's json module and JavaScript read them).
    """

    def __init__(self, records: Optional[Iterable[Dict[str, Any]]] = None) -> None:
        self.records: List[Dict[str, Any]] = []
        for r in records or ():
            self.log(**r)

    def log(self, **values) -> Dict[str, Any]:
        """Append one record, e.g. ``log(epoch=3, train_loss=0.41, val_loss=0.47)``; returns it."""
        record = {k: _plain("History.log", k, v) for k, v in values.items()}
        self.records.append(record)
        return record

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def columns(self) -> List[str]:
        cols: Dict[str, None] = {}
        for r in self.records:
            for k in r:
                cols.setdefault(k, None)
        return list(cols)

    def column(self, key: str, **where) -> List[Any]:
        """Values of ``key`` (None where missing), for records matching ``where`` (e.g. model='mlp')."""
        return [r.get(key) for r in self.records if all(r.get(k) == v for k, v in where.items())]

    # ------------------------------------------------------------------ text
    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = self.columns
        writer.writerow(cols)
        for r in self.records:
            writer.writerow(["" if r.get(c) is None else _csv_cell(r[c]) for c in cols])
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"columns": self.columns, "records": self.records}, indent=1) + "\n"

    # ------------------------------------------------------------------ files
    def save_csv(self, path: PathLike) -> str:
        """Write the CSV atomically to ``path``; returns the path."""
        atomic_write_text(path, self.to_csv())
        return os.fspath(path)

    def save_json(self, path: PathLike) -> str:
        """Write the JSON atomically to ``path``; returns the path."""
        atomic_write_text(path, self.to_json())
        return os.fspath(path)

    def save(self, directory: PathLike, stem: str = "history") -> List[str]:
        """Write ``{stem}.csv`` and ``{stem}.json`` into ``directory`` (created if needed)."""
        os.makedirs(directory, exist_ok=True)
        return [self.save_csv(os.path.join(directory, stem + ".csv")),
                self.save_json(os.path.join(directory, stem + ".json"))]

    @classmethod
    def load_json(cls, path: PathLike) -> "History":
        """Read what :meth:`save_json` wrote (to resume a run)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            V.fail("History.load_json", "a JSON object with a 'records' list (written by History.save_json)",
                   f"{type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""),
                   "Pass a file written by History.save_json.")
        return cls(data["records"])

    def __repr__(self) -> str:
        return f"History({len(self.records)} records, columns={self.columns})"


def _csv_cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)
