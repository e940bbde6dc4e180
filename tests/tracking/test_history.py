"""History: records, CSV/JSON round trips, and atomic writes that survive a crash."""

import csv
import io
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import crossent
from crossent._files import atomic_write_text
from crossent.tracking import History
from crossent.tracking import history as history_module

SRC = os.path.dirname(os.path.dirname(os.path.abspath(crossent.__file__)))


def _history():
    h = History()
    h.log(epoch=1, train_loss=0.1 + 0.2, val_loss=torch.tensor(0.5, dtype=torch.float64), model="mlp")
    h.log(epoch=2, train_loss=1 / 3, val_loss=np.float64(0.25), model="mlp", note="lr, halved")
    h.log(epoch=3, train_loss=float("nan"), val_loss=float("inf"), model="mlp")
    return h


def test_columns_are_the_union_in_order_of_appearance():
    h = _history()
    assert h.columns == ["epoch", "train_loss", "val_loss", "model", "note"]
    assert h.column("train_loss", model="mlp")[:2] == [0.1 + 0.2, 1 / 3]
    assert isinstance(h[0]["val_loss"], float) and isinstance(h[1]["val_loss"], float)


def test_csv_round_trips_floats_exactly(tmp_path):
    h = _history()
    path = h.save_csv(tmp_path / "h.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in rows[:2]] == [0.1 + 0.2, 1 / 3]  # repr: bit-exact
    assert rows[1]["note"] == "lr, halved" and rows[0]["note"] == ""
    assert math.isnan(float(rows[2]["train_loss"])) and float(rows[2]["val_loss"]) == math.inf


def test_json_round_trip(tmp_path):
    h = _history()
    path = h.save_json(tmp_path / "h.json")
    back = History.load_json(path)
    assert back.columns == h.columns
    assert back[1] == h[1]
    assert math.isnan(back[2]["train_loss"]) and back[2]["val_loss"] == math.inf


def test_save_creates_the_directory_and_both_files(tmp_path):
    paths = _history().save(tmp_path / "run" / "a")
    assert [os.path.basename(p) for p in paths] == ["history.csv", "history.json"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert sorted(os.listdir(tmp_path / "run" / "a")) == ["history.csv", "history.json"]


def test_non_scalar_values_are_refused():
    with pytest.raises(TypeError, match=r"History.log: expected `loss` to be a number"):
        History().log(epoch=1, loss=torch.ones(3))


def test_load_json_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"History.load_json: expected a JSON object with a 'records' list"):
        History.load_json(tmp_path / "x.json")


def test_error_during_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    old = _history()
    old.save_json(path)
    before = path.read_bytes()
    new = History(old.records)
    new.log(epoch=4, train_loss=0.01)

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(history_module.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        new.save_json(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["history.json"]


CRASHER = textwrap.dedent(f"""
    import os, sys
    sys.path.insert(0, {SRC!r})
    from crossent.tracking import History
    import crossent.tracking.history as H

    real_fdopen = os.fdopen

    class HalfThenDie:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os._exit(9)  # killed mid-write: no cleanup, no rename
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    H.os.fdopen = lambda fd, mode: HalfThenDie(real_fdopen(fd, mode))
    h = History.load_json(sys.argv[1])
    for e in range(100):
        h.log(epoch=100 + e, train_loss=0.5, val_loss=0.6)
    h.save_json(sys.argv[1])
""")


def test_process_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "history.json"
    _history().save_json(path)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert path.read_bytes() == before  # the old file, complete
    assert len(History.load_json(path)) == 3
    # what the dead process left is only its hidden temp file, and that one is partial
    leftovers = [n for n in os.listdir(tmp_path) if n != "history.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".history.json.") and leftovers[0].endswith(".tmp")
    with pytest.raises(json.JSONDecodeError):
        json.loads((tmp_path / leftovers[0]).read_text())


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n" and os.listdir(tmp_path) == ["a.txt"]


def test_csv_is_readable_by_a_plain_reader():
    text = _history().to_csv()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["epoch", "train_loss", "val_loss", "model", "note"] and len(rows) == 4


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "h.csv"
    _history().save_csv(path)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(path, 0o640)
    _history().save_csv(path)
    assert os.stat(path).st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- non-finite values
def _strict_json(text):
    """What JavaScript's JSON.parse and jq accept: no bare NaN / Infinity."""

    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_inf_are_valid_json_strings_and_load_back_as_floats(tmp_path):
    h = _history()
    h.log(epoch=4, train_loss=-math.inf, val_loss=0.5)
    data = _strict_json(h.to_json())
    assert data["records"][2]["train_loss"] == "NaN" and data["records"][2]["val_loss"] == "Infinity"
    assert data["records"][3]["train_loss"] == "-Infinity"
    back = History.load_json(h.save_json(tmp_path / "h.json"))
    assert math.isnan(back[2]["train_loss"]) and back[2]["val_loss"] == math.inf
    assert back[3]["train_loss"] == -math.inf and back[1] == h[1]


def test_older_files_with_bare_nan_still_load(tmp_path):
    (tmp_path / "h.json").write_text('{"columns": ["loss"], "records": [{"loss": NaN}, {"loss": -Infinity}]}')
    back = History.load_json(tmp_path / "h.json")
    assert math.isnan(back[0]["loss"]) and back[1]["loss"] == -math.inf


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_the_strings_that_stand_for_nonfinite_floats_are_refused_as_values(word):
    with pytest.raises(
        ValueError,
        match=rf"History.log: expected `model` to be a number or a string "
        rf"other than .* but got '{word}'",
    ):
        History().log(model=word)


# --------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "content, match",
    [
        ('{"columns": ["epoch"], "records": [{"epoch": 1}, {"ep', r"valid JSON.*truncated\?"),
        ('{"records": [{"epoch": 1}, [1, 2]]}', r"every record to be a JSON object.*record 1 = \[1, 2\]"),
        ('{"records": [{"epoch": 1, "loss": [0.5]}]}', r"scalar values.*record 0, key 'loss' = \[0.5\]"),
        ('{"records": [{"epoch": {"a": 1}}]}', r"scalar values.*record 0, key 'epoch'"),
        ('{"records": {"epoch": 1}}', r"a JSON object with a 'records' list"),
        ("", r"valid JSON.*truncated\?"),
    ],
)
def test_bad_files_name_the_file_and_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "history.json"
    path.write_text(content)
    with pytest.raises(history_module.HistoryFileError, match=match) as info:
        History.load_json(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)
    assert info.value.__suppress_context__ or info.value.__context__ is None  # no JSONDecodeError chain


def test_a_binary_file_names_the_file(tmp_path):
    path = tmp_path / "history.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=rf"UTF-8 JSON text in {path}"):
        History.load_json(path)


def test_writing_into_a_missing_folder_names_the_users_path(tmp_path):
    target = tmp_path / "no" / "such" / "h.csv"
    with pytest.raises(FileNotFoundError) as info:
        _history().save_csv(target)
    assert info.value.filename == str(target) and "does not exist" in str(info.value)
    assert ".tmp" not in str(info.value)


# --------------------------------------------------------------------------- one source of truth
def test_load_rewrites_a_csv_that_lags_the_json(tmp_path):
    h = _history()
    h.save(tmp_path)
    h.log(epoch=4, train_loss=0.2, val_loss=0.3)
    h.save_json(tmp_path / "history.json")  # a save killed after the JSON rename
    crossent._validation.reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match=r"history.csv did not match .*history.json.*rewrote"):
        back = History.load(tmp_path)
    assert len(back) == 4
    assert (tmp_path / "history.csv").read_text() == h.to_csv()


def test_load_of_agreeing_files_is_silent(tmp_path, recwarn):
    _history().save(tmp_path)
    assert len(History.load(tmp_path)) == 3
    assert not [w for w in recwarn if issubclass(w.category, crossent.CrossentWarning)]


def _csv_records(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_repeated_saves_never_leaves_disagreeing_files(tmp_path):
    """25 children save a growing history in a loop and are SIGKILLed at random times.

    After each kill: the JSON is whole; the CSV on disk is the same save or exactly one save
    behind (never a mix); History.load makes them agree. The children are forked from this
    process (torch is already imported), so each run costs milliseconds, not an interpreter.
    """
    import random
    import signal
    import time

    rng = random.Random(0)
    behind = 0
    for run in range(25):
        d = tmp_path / f"r{run}"
        History([{"epoch": 0, "loss": 1.0}]).save(d)
        pid = os.fork()
        if pid == 0:  # child: save forever
            try:
                h = History.load_json(d / "history.json")
                for e in range(1, 10**6):
                    h.log(epoch=e, loss=1.0 / e if e % 7 else math.nan)
                    h.save(d)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        saved = _strict_json((d / "history.json").read_text())["records"]
        rows = _csv_records(d / "history.csv")
        assert len(rows) in (len(saved), len(saved) - 1), run
        assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in saved[: len(rows)]]
        behind += len(rows) != len(saved)
        with pytest.warns() if len(rows) != len(saved) else _no_warning():
            back = History.load(d)
        assert [r["epoch"] for r in back] == [r["epoch"] for r in saved]
        assert [int(r["epoch"]) for r in _csv_records(d / "history.csv")] == [r["epoch"] for r in saved]
        crossent._validation.reset_warnings()
    print(f"{behind} of 25 kills left the CSV one save behind")


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", crossent.CrossentWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
