"""Every user mistake on the command line: one line on stderr, exit status 2, no traceback,
found before any work; ``--out`` is never silently overwritten."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import crossent
from crossent.cli import main

SRC = os.path.dirname(os.path.dirname(os.path.abspath(crossent.__file__)))
NO_CUDA = not torch.cuda.is_available()


def _refused(argv, capsys, match):
    """main(argv) returns 2, prints one line naming the mistake, and ran nothing."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"crossent {argv[0]}: error: ")
    assert match in lines[0], lines[0]
    assert captured.out == ""  # no table, no benchmark rows: nothing ran
    return lines[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--preset", "nope"], "expected --preset among"),
        (["--repeats", "-1"], "expected --repeats >= 1, but got -1"),
        (["--repeats", "0"], "expected --repeats >= 1, but got 0"),
        (["--threads", "-3"], "expected --threads >= 1, but got -3"),
        (["--device", "meta"], "expected --device to be one of cpu, cuda[:N]"),
        (["--device", "tpu"], "expected --device to be one of cpu, cuda[:N]"),
        pytest.param(["--device", "cuda"], "torch sees none", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
    ],
)
def test_bench_refuses_bad_options_before_running(argv, match, capsys):
    _refused(["bench", "--smoke"] + argv, capsys, match)


def test_bench_refuses_an_existing_file_as_out(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    _refused(["bench", "--smoke", "--out", str(f)], capsys, "is an existing file")
    assert f.read_text() == "keep me"


def test_bench_never_overwrites_results_without_force(tmp_path, capsys):
    (tmp_path / "bench.md").write_text("earlier run")
    _refused(["bench", "--smoke", "--out", str(tmp_path)], capsys, "Pass --force to replace them")
    assert (tmp_path / "bench.md").read_text() == "earlier run"
    # --thp both checks both child folders up front, in the parent
    (tmp_path / "both" / "thp-on").mkdir(parents=True)
    (tmp_path / "both" / "thp-on" / "bench.csv").write_text("earlier")
    _refused(["bench", "--smoke", "--thp", "both", "--out", str(tmp_path / "both")], capsys, "bench.csv")


def test_bench_force_replaces_results(tmp_path, capsys):
    (tmp_path / "bench.md").write_text("earlier run")
    assert main(["bench", "--smoke", "--preset", "small", "--repeats", "1", "--out", str(tmp_path), "--force"]) == 0
    assert "earlier run" not in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--device", "meta"], "expected --device to be one of cpu, cuda[:N], mps[:N]"),
        (["--device", "cuda:x"], "expected --device to be one of"),
        (["--epochs", "-1"], "expected --epochs >= 1, but got -1"),
        (["--batch-size", "0"], "expected --batch-size >= 1, but got 0"),
        pytest.param(["--device", "cuda"], "torch sees none", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
    ],
)
def test_demo_refuses_bad_options_before_training(argv, match, tmp_path, capsys):
    _refused(["demo", "--out", str(tmp_path / "o")] + argv, capsys, match)
    assert not (tmp_path / "o" / "run-001").exists()


def test_demo_refuses_an_existing_file_as_out(tmp_path, capsys):
    f = tmp_path / "curves.png"
    f.write_bytes(b"keep me")
    _refused(["demo", "--out", str(f)], capsys, "is an existing file")
    assert f.read_bytes() == b"keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_demo_refuses_a_read_only_out_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(["demo", "--out", str(ro)], capsys, "this user can write")
    finally:
        ro.chmod(0o755)


def test_demo_refuses_an_unwritable_out_before_training(tmp_path, capsys, monkeypatch):
    """The same probe, with the write refused by the file system (also when running as root)."""
    real_open = open

    def read_only_open(path, *a, **k):
        if os.fspath(path).startswith(str(tmp_path)) and ".crossent-probe-" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only_open)
    _refused(["demo", "--out", str(tmp_path / "ro")], capsys, "Permission denied")


def test_demo_writes_a_new_run_folder_each_time(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["demo", "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    first = (tmp_path / "run-001" / "history.json").read_bytes()
    assert main(argv + ["--seed", "1"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["run-001", "run-002"]
    assert (tmp_path / "run-001" / "history.json").read_bytes() == first  # untouched
    assert str(tmp_path / "run-002") in capsys.readouterr().out


def test_help_documents_the_out_rules(capsys):
    for cmd, text in (("demo", "never overwritten"), ("bench", "--force")):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert text in " ".join(capsys.readouterr().out.split())


def test_no_traceback_from_the_console_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    f = tmp_path / "file"
    f.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "crossent", "demo", "--out", str(f)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
