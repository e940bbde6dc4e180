"""What the value checks cost: each loss timed with ``validate=True`` and ``validate=False``.

    PYTHONPATH=src python benchmarks/validation_cost.py            # small + large, CPU
    PYTHONPATH=src python benchmarks/validation_cost.py --sizes small --repeats 50 --threads 1
    PYTHONPATH=src python benchmarks/validation_cost.py --device cuda

Forward pass only (the checks run in the forward). Both variants run interleaved in one
process, after a warm-up, and the table gives medians with p20/p80 of ``--repeats`` runs
(eager timings on a shared machine drift with what ran before).
``checks alone`` times the value tier by itself (the ``crossent._validation`` functions
the loss calls), which is the number to quote: the with/without difference of two
noisy loss timings can be within noise. Output is a Markdown table with provenance.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import crossent
import crossent.functional as F
from crossent import _validation as V

# name -> (small shape, large shape); large sizes keep peak memory below ~2 GiB.
SHAPES = {
    "cross_entropy (index targets)": ((256, 10), (4096, 32000)),
    "cross_entropy (prob. targets)": ((256, 10), (1024, 32000)),
    "binary_cross_entropy": ((256, 10), (4096, 4096)),
    "binary_cross_entropy_with_logits": ((256, 10), (4096, 4096)),
}


def make_case(name, shape, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(device)
    if name.startswith("cross_entropy (index"):
        y = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
        loss = lambda validate: F.cross_entropy(x, y, validate=validate)
        checks = lambda: V.check_multiclass_values("f", x, y, True, shape[1], -100, 1)
    elif name.startswith("cross_entropy (prob"):
        q = torch.randn(*shape, generator=g).softmax(1).to(device)
        loss = lambda validate: F.cross_entropy(x, q, validate=validate)
        checks = lambda: V.check_multiclass_values("f", x, q, False, shape[1], -100, 1)
    elif name == "binary_cross_entropy":
        p = torch.sigmoid(x)
        t = torch.randint(0, 2, shape, generator=g).float().to(device)
        loss = lambda validate: F.binary_cross_entropy(p, t, validate=validate)
        checks = lambda: V.check_binary_values("f", p, t, None, probabilities_in=True)
    else:
        t = torch.randint(0, 2, shape, generator=g).float().to(device)
        loss = lambda validate: F.binary_cross_entropy_with_logits(x, t, validate=validate)
        checks = lambda: V.check_binary_values("f", x, t, None, probabilities_in=False)
    return loss, checks


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    del out
    return time.perf_counter() - t0


def quantiles(xs):
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return statistics.median(xs), pick(0.2), pick(0.8)


def fmt(seconds):
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def provenance(device):
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = "?"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    return (
        f"crossent {crossent.__version__} @ {commit or '?'}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {dev}, THP_MEM_ALLOC_ENABLE={thp}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=["small", "large", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=None, help="default: 30 small, 7 large")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads; use 1 on a shared, loaded CPU (an oversubscribed "
        "OpenMP pool adds ~20 ms to every parallel op)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = {"small": [0], "large": [1], "both": [0, 1]}[args.sizes]
    print(f"Value-check cost, forward only. {provenance(device)}\n")
    print("| loss | shape | validate=False | validate=True | overhead | checks alone |")
    print("|---|---|---|---|---|---|")
    for name, shapes in SHAPES.items():
        for which in sizes:
            shape = shapes[which]
            repeats = args.repeats or (30 if which == 0 else 7)
            loss, checks = make_case(name, shape, device)
            for _ in range(2):  # warm-up: allocator, thread pool, first-touch of pages
                timed(lambda: loss(False), device)
                timed(lambda: loss(True), device)
                timed(checks, device)
            off, on, alone = [], [], []
            for _ in range(repeats):  # interleaved
                off.append(timed(lambda: loss(False), device))
                on.append(timed(lambda: loss(True), device))
                alone.append(timed(checks, device))
            m_off, m_on, m_alone = quantiles(off), quantiles(on), quantiles(alone)
            rng = lambda q: f"{fmt(q[0])} ({fmt(q[1])}-{fmt(q[2])})"
            print(
                f"| {name} | {tuple(shape)} | {rng(m_off)} | {rng(m_on)} | "
                f"{(m_on[0] / m_off[0] - 1) * 100:+.0f}% | {fmt(m_alone[0])} "
                f"({m_alone[0] / m_off[0] * 100:.0f}% of the loss) |"
            )
            sys.stdout.flush()
            loss = checks = None  # free the inputs before the next shape
    return 0


if __name__ == "__main__":
    sys.exit(main())
