"""Elementwise BCE at 16M elements, eager and compiled, crossent against torch.

    PYTHONPATH=src python benchmarks/compiled_bce.py               # 4096 x 4096, 9 repeats
    PYTHONPATH=src python benchmarks/compiled_bce.py --rows 2048 --repeats 15

One forward + backward per sample, all variants interleaved (the order alternates) after a
warm-up that compiles; the table gives the median and the min-max of ``--repeats`` samples
in ms. Variants: sigmoid then BCE on probabilities (the tutorials' first example) and
BCE-with-logits, each as torch eager, ``torch.compile`` of torch's composition, crossent
eager, crossent compiled as it runs by default (probabilities: traced as formulas, which
Inductor fuses with the sigmoid; logits: the registered op) and crossent compiled with the
other choice forced (``backend='chunked'`` for probabilities, ``backend='reference'`` for
logits), to show why the defaults are what they are.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import crossent


def _variants():
    bce, bce_logits = crossent.binary_cross_entropy, crossent.binary_cross_entropy_with_logits
    return {
        "sigmoid+BCE torch eager": lambda x, t: F.binary_cross_entropy(torch.sigmoid(x), t),
        "sigmoid+BCE torch.compile": torch.compile(lambda x, t: F.binary_cross_entropy(torch.sigmoid(x), t)),
        "sigmoid+BCE crossent eager": lambda x, t: bce(torch.sigmoid(x), t, validate=False),
        "sigmoid+BCE crossent compiled": torch.compile(lambda x, t: bce(torch.sigmoid(x), t, validate=False)),
        "sigmoid+BCE crossent compiled, op": torch.compile(
            lambda x, t: bce(torch.sigmoid(x), t, validate=False, backend="chunked")
        ),
        "logits torch eager": lambda x, t: F.binary_cross_entropy_with_logits(x, t),
        "logits torch.compile": torch.compile(lambda x, t: F.binary_cross_entropy_with_logits(x, t)),
        "logits crossent eager": lambda x, t: bce_logits(x, t, validate=False),
        "logits crossent compiled": torch.compile(lambda x, t: bce_logits(x, t, validate=False)),
        "logits crossent compiled, formulas": torch.compile(
            lambda x, t: bce_logits(x, t, validate=False, backend="reference")
        ),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="rows of 4096 labels (default 4096: 16M elements)")
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(a.rows, 4096, generator=g) * 2).requires_grad_()
    t = (torch.rand(a.rows, 4096, generator=g) < 0.1).float()

    def step(f):
        def run():
            x.grad = None
            f(x, t).backward()

        return run

    steps = {k: step(f) for k, f in _variants().items()}
    for s in steps.values():  # compile and warm up
        for _ in range(3):
            s()
    samples = {k: [] for k in steps}
    order = list(steps)
    for r in range(a.repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            steps[k]()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rows} x 4096 fp32, forward + backward; "
        f"ms: median [min-max] of {a.repeats}"
    )
    print("| variant | ms |")
    print("|---|---|")
    for k, v in samples.items():
        print(f"| {k} | {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
