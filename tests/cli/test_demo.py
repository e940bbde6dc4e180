"""`crossent demo` end to end with tiny settings, and the bundled data it trains on."""

import csv
import gzip
import hashlib
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch

import crossent
from crossent.cli import main
from crossent.data import load_breast_cancer, load_digits
from crossent.tracking import History

MODELS = ["sigmoid+BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss(2)", "digits CrossEntropyLoss(10)"]
SRC = os.path.dirname(os.path.dirname(os.path.abspath(crossent.__file__)))


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--epochs", "2", "--seed", "3", "--out", str(tmp_path / "demo-out"), "--no-progress"]) == 0
    out = tmp_path / "demo-out" / "run-001"
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["curves.png", "history.csv", "history.json", "summary.txt"]
    assert str(out) in printed and "final accuracy" in printed and "epoch |" in printed
    # the table: one row per epoch with 8 numbers (train/val for 4 models)
    rows = [ln for ln in printed.splitlines() if ln.strip().split("|")[0].strip() in ("1", "2")]
    assert len(rows) == 2
    with open(out / "history.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [(r["model"], r["epoch"]) for r in records] == [(m, str(e)) for e in (1, 2) for m in MODELS]
    hist = History.load_json(out / "history.json")
    for r in hist:
        assert 0 < r["train_loss"] < 5 and 0 < r["val_loss"] < 5 and 0 <= r["val_accuracy"] <= 1
    # the printed table shows the history's numbers
    for r in hist.records[-4:]:
        assert f"{r['val_loss']:9.5f}" in rows[-1]
    # it learned something in 2 epochs: better than chance on both tasks
    digits = hist.column("val_accuracy", model=MODELS[3])
    assert digits[-1] > 0.5  # chance is 0.1
    assert hist.column("val_accuracy", model=MODELS[1])[-1] > 0.75  # majority class is 0.63
    # the sigmoid+BCELoss and BCEWithLogitsLoss heads are the same model from the same init
    a, b = hist.column("val_loss", model=MODELS[0]), hist.column("val_loss", model=MODELS[1])
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.txt").read_text()
    assert "final accuracy" in summary and "doi:10.24432/C5DW2B" in summary


def test_demo_is_deterministic_for_a_seed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    for name, bar in (("a", "--progress"), ("b", "--no-progress")):
        assert main(["demo", "--epochs", "1", "--out", str(tmp_path / name), "--batch-size", "128", bar]) == 0
    assert "epochs" in capsys.readouterr().err  # the forced tqdm bar went to stderr
    ra = History.load_json(tmp_path / "a" / "run-001" / "history.json").records
    rb = History.load_json(tmp_path / "b" / "run-001" / "history.json").records
    assert ra == rb


def test_python_dash_m_crossent_demo_exits_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "crossent", "demo", "--epochs", "1", "--out", str(tmp_path), "--batch-size", "128"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and os.path.exists(tmp_path / "run-001" / "history.csv")


def test_bad_options_are_refused(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "expected --epochs >= 1" in capsys.readouterr().err
    assert main(["demo", "--device", "gpu0", "--out", str(tmp_path)]) == 2
    assert "expected --device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "Use --device cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------- bundled data
def test_breast_cancer_matches_its_documentation():
    d = load_breast_cancer()
    assert d.features.shape == (569, 30) and d.features.dtype == torch.float32
    assert d.target.dtype == torch.int64 and int(d.target.sum()) == 212  # 212 malignant, 357 benign
    assert d.feature_names[0] == "mean radius" and d.feature_names[-1] == "worst fractal dimension"
    # first row of the UCI file (a malignant tumour): radius 17.99, texture 10.38
    assert d.features[0, :2].tolist() == pytest.approx([17.99, 10.38]) and d.target[0] == 1


def test_digits_matches_its_documentation():
    d = load_digits()
    assert d.features.shape == (1797, 64)
    assert d.features.min() == 0 and d.features.max() == 16
    assert torch.bincount(d.target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize(
    "name, sha256",
    [
        ("breast_cancer.csv.gz", "fed3eb72d0575ef6192293f5093c6e801b1476b577d0386bf4455504522172ed"),
        ("digits.csv.gz", "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"),
    ],
)
def test_bundled_files_are_the_documented_copies(name, sha256):
    raw = gzip.decompress(resources.files("crossent.data").joinpath(name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == sha256
    readme = resources.files("crossent.data").joinpath("README.md").read_text()
    assert sha256 in readme and "CC BY 4.0" in readme
