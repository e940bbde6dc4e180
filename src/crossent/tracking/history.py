"""Per-epoch records of a run, saved as CSV and JSON that a crash cannot leave half-written.
Design notes: ``docs/design.md``, section ``crossent.tracking.history``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from numbers import Number
from typing import Any, Dict, Iterable, List, Optional, Union

from .. import _validation as V
from .._files import atomic_write_text
from ..errors import HistoryFileError

__all__ = ["History", "HistoryFileError"]

PathLike = Union[str, "os.PathLike[str]"]

# JSON spelling of the non-finite floats (JSON itself has none).
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _plain(func: str, key: str, value):
    """Records hold JSON scalars: tensors and numpy numbers become Python numbers."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, str) and value in _NONFINITE:
        V.fail(
            func,
            f"`{key}` to be a number or a string other than 'NaN', 'Infinity', '-Infinity'",
            repr(value),
            "Those strings stand for non-finite floats in history.json; log "
            "float('nan') / float('inf') for a non-finite number, or another string.",
        )
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Number) and not isinstance(value, complex):
        return int(value) if isinstance(value, int) else float(value)  # type: ignore[arg-type]
    V.fail(
        func,
        f"`{key}` to be a number, a string, a bool or None",
        type(value).__name__,
        "Log scalars only (e.g. meter.compute(), accuracy as a float).",
        V.CrossentTypeError,
    )


class History:
    """Per-epoch records of a run (a list of flat dicts), with atomic CSV/JSON output.

    Args:
        records: optional initial records (e.g. from :meth:`load_json` when resuming).

    Columns are the union of the records' keys, in order of first appearance; a record
    without a key leaves that CSV cell empty (``null`` in JSON). Floats are written with
    ``repr`` (shortest exact round trip), so a saved loss reads back bit-identical;
    NaN/inf are written as ``nan``/``inf``/``-inf`` in CSV and as the strings ``"NaN"``,
    ``"Infinity"``/``"-Infinity"`` in JSON (valid JSON; :meth:`load_json` restores floats).
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
        records = [{k: _json_value(v) for k, v in r.items()} for r in self.records]
        return json.dumps({"columns": self.columns, "records": records}, indent=1, allow_nan=False) + "\n"

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
        """Write ``{stem}.json`` and then ``{stem}.csv`` into ``directory`` (created if needed).

        The JSON is the source of truth and is written first; the CSV is derived from the
        same records. Returns ``[csv_path, json_path]``.
        """
        os.makedirs(directory, exist_ok=True)
        json_path = self.save_json(os.path.join(directory, stem + ".json"))
        return [self.save_csv(os.path.join(directory, stem + ".csv")), json_path]

    @classmethod
    def load(cls, directory: PathLike, stem: str = "history") -> "History":
        """Read what :meth:`save` wrote, from the JSON, and bring the CSV in line with it.

        A run killed between the two renames of a save leaves ``{stem}.csv`` one save
        behind; it is rewritten (atomically) from the JSON, with a one-time
        :class:`~crossent.CrossentWarning`. Errors name the file (:class:`HistoryFileError`).
        """
        json_path = os.path.join(os.fspath(directory), stem + ".json")
        csv_path = os.path.join(os.fspath(directory), stem + ".csv")
        history = cls.load_json(json_path)
        text = history.to_csv()
        try:
            with open(csv_path, encoding="utf-8", newline="") as f:
                same = f.read() == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            try:
                atomic_write_text(csv_path, text)
                what = f"rewrote {csv_path} from it"
            except OSError as exc:
                what = f"could not rewrite {csv_path} ({exc.strerror or exc}); read the JSON"
            V.warn_once(
                "history-reconciled",
                f"History.load: {csv_path} did not match {json_path} (a save was "
                f"interrupted, or the CSV was edited); the JSON is the source of truth: {what}.",
            )
        return history

    @classmethod
    def load_json(cls, path: PathLike) -> "History":
        """Read what :meth:`save_json` wrote (to resume a run).

        Raises:
            HistoryFileError: (a ``ValueError``) naming the file and what is wrong with it:
                not JSON (e.g. truncated), not a history, or a value that is not a scalar.
        """
        path = os.fspath(path)
        func = "History.load_json"

        def bad(what: str, found: str, fix: str = "") -> HistoryFileError:
            msg = f"{func}: expected {what} in {path}, but got {found}."
            return HistoryFileError(msg + (f" {fix}" if fix else ""), path)

        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise bad(
                "UTF-8 JSON text", f"undecodable bytes at offset {exc.start}", "Is this the right file?"
            ) from None
        except json.JSONDecodeError as exc:
            end = "" if raw.rstrip().endswith(b"}") else " (the file does not end with '}': truncated?)"
            raise bad(
                "valid JSON",
                f"{exc.msg} at line {exc.lineno} column {exc.colno}{end}",
                "Restore the file from a backup (the CSV next to it holds the same records, up to one save behind).",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise bad(
                "a JSON object with a 'records' list (written by History.save_json)",
                f"{type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""),
                "Pass a file written by History.save_json.",
            )
        records = []
        for i, r in enumerate(data["records"]):
            if not isinstance(r, dict):
                raise bad("every record to be a JSON object", f"record {i} = {r!r:.80}")
            for k, v in r.items():
                if v is not None and not isinstance(v, (bool, int, float, str)):
                    raise bad(
                        "scalar values (number, string, bool or null)", f"record {i}, key {k!r} = {json.dumps(v)[:80]}"
                    )
            records.append({k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in r.items()})
        return cls(records)

    def __repr__(self) -> str:
        return f"History({len(self.records)} records, columns={self.columns})"


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _csv_cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)
