"""K-dimensional cross-entropy (N, C, d1, ..., dK), class-index targets: torch eager
against crossent, and optionally against an older crossent, side by side in one process.

    PYTHONPATH=src python benchmarks/kdim_ce.py                  # this tree only
    PYTHONPATH=src python benchmarks/kdim_ce.py --before main    # and that git revision

Forward + backward, fp32, CPU, 2 threads by default (the ``segmentation`` preset of
``crossent bench`` is the first case). Every variant runs interleaved (the order rotates
each round) after a warm-up; the table gives the median of ``--repeats`` samples, each the
mean of ``--inner`` calls, in ms per call. ``--before REV`` exports ``src/crossent`` of
that revision (``git archive``) as package ``crossent_before`` in a temporary directory.
Ratio = torch eager time / variant time (> 1: faster than eager).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as TF

import crossent
from _before_after import export_before, measure

SHAPES = [(8, 21, 128, 128), (32, 3, 64, 64), (4, 150, 64, 64)]


def _rows_only(fn):
    """``fn`` with the (N, C, S) lane kernel switched off: the row path of before."""
    from crossent.backends import chunked

    def run():
        saved, chunked._spatial_ok = chunked._spatial_ok, lambda *a: False
        try:
            fn()
        finally:
            chunked._spatial_ok = saved

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="REV", help="also time crossent as of this git revision")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument(
        "--rows",
        action="store_true",
        help="also time this tree with the lane kernel off (classes moved last, row kernel)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    libs = {}
    if args.before:
        sys.path.insert(0, export_before(args.before))
        import crossent_before  # noqa: E402

        libs[f"crossent {args.before}"] = crossent_before
    libs["crossent"] = crossent
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, forward + backward, fp32, "
        f"mean reduction; median of {args.repeats} x {args.inner} calls, ms per call; "
        f"ratio = torch eager / variant\n"
    )
    variants = list(libs) + (["crossent rows"] if args.rows else [])
    print("| input (N, C, H, W) | torch eager | " + " | ".join(f"{v} | ratio" for v in variants) + " |")
    print("|---|---|" + "---|---|" * len(variants))
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(*shape, generator=g).requires_grad_()
        y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)

        def call(f):
            def run():
                x.grad = None
                f(x, y).backward()

            return run

        fns = {"torch eager": call(TF.cross_entropy)}
        fns.update({tag: call(lib.cross_entropy) for tag, lib in libs.items()})
        if args.rows:
            fns["crossent rows"] = _rows_only(call(crossent.cross_entropy))
        m = measure(fns, args.repeats, args.inner)
        t = m["torch eager"]
        cells = [f"{t:.2f}"] + [f"{m[v]:.2f} | {t / m[v]:.2f}x" for v in variants]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
