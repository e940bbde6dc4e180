"""Shared by the before/after benchmark scripts in this folder: an older revision of the
package importable side by side, and interleaved medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time


def export_before(rev: str) -> str:
    """``src/crossent`` at ``rev`` as package ``crossent_before`` in a temporary directory
    (put it on ``sys.path``)."""
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="crossent_before_")
    archive = subprocess.run(["git", "-C", root, "archive", rev, "src/crossent"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    os.rename(os.path.join(tmp, "src", "crossent"), os.path.join(tmp, "crossent_before"))
    return tmp


def measure(fns, repeats: int, inner: int, clock=time.perf_counter, warmup: int = 3):
    """Median ms per call of each zero-argument call in ``fns``: ``repeats`` samples of
    ``inner`` calls, the variants interleaved in a rotating order."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    keys = list(fns)
    samples = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = clock()
            for _ in range(inner):
                fns[k]()
            samples[k].append((clock() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}
