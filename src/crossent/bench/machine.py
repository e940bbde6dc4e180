"""What this machine can do, measured in the same run, and where the run happened.
Design notes: ``docs/design.md``, section ``crossent.bench.machine``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict

import torch

from .. import _config


def _median_time(fn, device, runs=7) -> float:
    fn()
    out = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure_limits(device: torch.device, elements: int = 1 << 23) -> Dict[str, float]:
    src = torch.rand(elements, device=device) * 4 - 2  # exp of [-2, 2]
    pos = src.abs()  # log1p of [0, 2]
    dst = torch.empty_like(src)
    dst.copy_(src)
    return {
        "copy_bytes_per_s": 2 * src.nbytes / _median_time(lambda: dst.copy_(src), device),
        "exp_per_s": elements / _median_time(lambda: torch.exp(src, out=dst), device),
        "log1p_per_s": elements / _median_time(lambda: torch.log1p(pos, out=dst), device),
    }


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores visible)"


def provenance(device: torch.device) -> Dict[str, str]:
    import crossent
    from crossent.backends import chunked_cpp

    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    thp = _config.thp_setting()
    return {
        "crossent": crossent.__version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": str(torch.get_num_threads()),
        "THP_MEM_ALLOC_ENABLE": "on" if thp == "1" else "off",
        "cpu_kernel": "compiled" if chunked_cpp.get() is not None else f"torch ops ({chunked_cpp.disabled_reason()})",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
