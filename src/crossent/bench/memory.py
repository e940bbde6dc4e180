"""Peak extra memory of one forward+backward, per variant.
Design notes: ``docs/design.md``, section ``crossent.bench.memory``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Dict, Optional

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _measure_cpu(call) -> Optional[int]:
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        call()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    return max(0, peak - before) * 1024


def measure_case(case, device: torch.device, variants=None) -> Dict[str, Optional[int]]:
    """Peak extra bytes per variant of ``case`` (in this process)."""
    from .harness import _prepare

    inputs = case.make(device)
    out: Dict[str, Optional[int]] = {}
    for name, fn in case.variants.items():
        if variants is not None and name not in variants:
            continue
        for _ in range(2):
            d = _prepare(case, inputs)
            fn(d).backward()
            del d
        d = _prepare(case, inputs)

        def call(fn=fn, d=d):
            fn(d).backward()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            torch.cuda.synchronize(device)
            out[name] = torch.cuda.max_memory_allocated(device) - before
        else:
            out[name] = _measure_cpu(call)
        del d
        inputs[case.grad_input].grad = None
    inputs.pop("_anchor", None)
    return out


def measure_in_child(
    preset: str, index: int, size: str, device: str, variants, timeout: float = 900
) -> Dict[str, Optional[int]]:
    """Run :func:`measure_case` for case ``index`` of ``preset`` in a fresh child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(
        p
        for p in [
            os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            env.get("PYTHONPATH", ""),
        ]
        if p
    )
    cmd = [sys.executable, "-m", "crossent.bench.memory", preset, str(index), size, device, json.dumps(variants)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("index", type=int)
    p.add_argument("size")
    p.add_argument("device")
    p.add_argument("variants")
    a = p.parse_args(argv)
    from . import PRESETS

    device = torch.device(a.device)
    case = PRESETS[a.preset](a.size, device)[a.index]
    print(json.dumps(measure_case(case, device, json.loads(a.variants))))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
