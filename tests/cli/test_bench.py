"""`crossent bench`: the smoke run works end to end; the harness measures what it says."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent
from crossent.bench import harness, presets, report
from crossent.cli import main


def test_smoke_run_writes_markdown_and_csv_with_provenance(tmp_path, capsys):
    rc = main(["bench", "--smoke", "--repeats", "2", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "bench.md").read_text()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "bench.csv").read_text())))
    for key in ("torch", "commit", "device", "threads", "THP_MEM_ALLOC_ENABLE", "cpu_kernel"):
        assert f"{key}: " in md
        assert rows[0][key]
    # every registered preset ran, with crossent and the eager baseline side by side
    assert {r["preset"] for r in rows} >= {"small", "segmentation", "multilabel", "lm-head", "validation"}
    for case in {r["case"] for r in rows}:
        variants = {r["variant"] for r in rows if r["case"] == case}
        assert "torch eager" in variants
        assert any(v.startswith("crossent") for v in variants)
    eager = [r for r in rows if r["variant"] == "torch eager"]
    assert all(r["vs_eager"] == "1.00" for r in eager)
    assert all(float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) for r in rows)
    assert "crossent inplace" in {r["variant"] for r in rows}
    assert "Machine limits" in capsys.readouterr().out


def test_list_and_unknown_preset(capsys):
    assert main(["bench", "--list"]) == 0
    assert "lm-head" in capsys.readouterr().out
    assert main(["bench", "--smoke", "--preset", "nope"]) == 2
    assert "expected --preset among" in capsys.readouterr().err


def test_presets_are_pluggable(monkeypatch):
    calls = []

    @presets.register_preset("unit-test-preset", "a preset added from outside")
    def _preset(size, device):
        calls.append(size)
        x = lambda d: {"x": torch.randn(4, 3, requires_grad=True)}  # noqa: E731
        return [
            presets.Case(
                "tiny",
                x,
                {"torch eager": lambda d: d["x"].square().sum(), "crossent": lambda d: d["x"].abs().sum()},
                elements=12,
            )
        ]

    try:
        from crossent.bench import run

        results, prov, limits = run(
            ["unit-test-preset"],
            size="smoke",
            repeats=2,
            compile=False,
            memory=False,
            min_sample_s=0.0,
            log=lambda s: None,
        )
        assert calls == ["smoke"]
        assert {r.variant for r in results} == {"torch eager", "crossent"}
        assert limits["copy_bytes_per_s"] > 0 and limits["exp_per_s"] > 0
    finally:
        presets.PRESETS.pop("unit-test-preset")
        presets.DESCRIPTIONS.pop("unit-test-preset")


def test_ratios_and_quantiles():
    t = harness.Timing(10.0, 9.0, 11.0, 3, 1)
    rs = [
        harness.Result("p", "c", "full", "torch eager", t),
        harness.Result("p", "c", "full", "torch.compile", harness.Timing(5.0, 5, 5, 3, 1)),
        harness.Result("p", "c", "full", "crossent", harness.Timing(2.0, 2, 2, 3, 1)),
    ]
    harness.add_ratios(rs)
    assert rs[2].extra == {"vs_eager": 5.0, "vs_compile": 2.5}
    assert harness._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    md = report.to_markdown(rs, {"torch": "x"}, {})
    assert "| p | c | full | crossent | 2 |" in md


def test_timed_call_modes_time_what_they_say():
    case = presets.Case("c", lambda d: {"x": torch.randn(3, requires_grad=True)}, {})
    inputs = case.make(torch.device("cpu"))
    seen = []

    def fn(d):
        seen.append(torch.is_grad_enabled())
        return d["x"].sum()

    for mode in harness.MODES:
        assert harness.timed_call(fn, case, inputs, mode, torch.device("cpu")) >= 0
    assert seen == [True, True, True]
    assert inputs["x"].grad is not None  # backward ran


_MEMORY_CHILD = """
import json, torch
from crossent.bench import memory, presets
case = presets.Case("mem", lambda d: {"x": torch.randn(1 << 22, requires_grad=True)},
                    {"sum": lambda d: d["x"].sum(), "exp": lambda d: torch.exp(d["x"]).sum()})
print(json.dumps(memory.measure_case(case, torch.device("cpu"))))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_sees_gradient_and_temporaries():
    """In the child set-up of crossent.bench.memory: a 16 MiB gradient shows as 16 MiB; a
    variant that also keeps a 16 MiB temporary alive until backward (exp saves its result) shows 32."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(crossent.__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD], env=env, capture_output=True, text=True, check=True
    ).stdout
    mib = {k: v / 2**20 for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    assert 15 <= mib["sum"] < 20  # resolution: well under 1 MiB (see crossent.bench.memory)
    assert 31 <= mib["exp"] < 38
