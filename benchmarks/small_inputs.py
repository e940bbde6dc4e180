"""Per-call cost on small inputs: torch eager against crossent (validate on and off), and
optionally against an older crossent, side by side in one process.

    PYTHONPATH=src python benchmarks/small_inputs.py                       # this tree only
    PYTHONPATH=src python benchmarks/small_inputs.py --before e33f494      # and that commit
    PYTHONPATH=src python benchmarks/small_inputs.py --threads 1 --repeats 25

Forward + backward, fp32, CPU. Every variant of a case runs interleaved (the order rotates
each round) after a warm-up; a sample is the mean of ``--inner`` calls and the table gives
the median of ``--repeats`` samples, in ms per call. ``--before REV`` exports ``src/crossent``
of that git revision (``git archive``) as a package named ``crossent_before`` in a
temporary directory and times it in the same process. Ratios are torch eager time /
crossent time (>1: crossent is faster).

On a 2-core machine shared with other work, prefer ``--threads 1``: with 2 threads every
OpenMP region of torch (and of crossent's kernel above 64k elements) waits for a core,
and eager timings jump by orders of magnitude. ``--clock thread`` (only with
``--threads 1``) measures the CPU time of the calling thread (``time.thread_time``), which
all the work runs on then: time spent descheduled while another process holds the core
is not counted, so the numbers stay comparable on a busy machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as TF

import crossent
from _before_after import export_before, measure


def _cases(libs):
    """(name, {variant: zero-argument call doing forward + backward})."""
    g = torch.Generator().manual_seed(0)
    out = []
    for M, C in [(512, 100), (64, 10)]:
        x = torch.randn(M, C, generator=g).requires_grad_()
        y = torch.randint(0, C, (M,), generator=g)

        def ce(f, x=x, y=y, **kw):
            def call():
                x.grad = None
                f(x, y, **kw).backward()

            return call

        fns = {"torch eager": ce(TF.cross_entropy)}
        for tag, lib in libs.items():
            fns[tag] = ce(lib.cross_entropy)
            fns[tag + ", validate=False"] = ce(lib.cross_entropy, validate=False)
        out.append((f"cross_entropy {M}x{C}, class indices", fns))
    for R, L in [(256, 10), (4096, 16)]:
        x = torch.randn(R, L, generator=g).requires_grad_()
        t = (torch.rand(R, L, generator=g) < 0.3).float()

        def bce(f, x=x, t=t, **kw):
            def call():
                x.grad = None
                f(x, t, **kw).backward()

            return call

        fns = {"torch eager": bce(TF.binary_cross_entropy_with_logits)}
        for tag, lib in libs.items():
            fns[tag] = bce(lib.binary_cross_entropy_with_logits)
            fns[tag + ", validate=False"] = bce(lib.binary_cross_entropy_with_logits, validate=False)
        out.append((f"binary_cross_entropy_with_logits {R}x{L}", fns))
    z = torch.randn(256, 10, generator=g)
    t = (torch.rand(256, 10, generator=g) < 0.3).float()

    def bceloss(module):
        def call():
            x = z.detach().requires_grad_()
            module(torch.sigmoid(x), t).backward()

        return call

    fns = {"torch eager": bceloss(torch.nn.BCELoss())}
    for tag, lib in libs.items():
        fns[tag] = bceloss(lib.nn.BCELoss())
        fns[tag + ", validate=False"] = bceloss(lib.nn.BCELoss(validate=False))
    out.append(("sigmoid + nn.BCELoss 256x10", fns))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="REV", help="also time crossent as of this git revision")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: time.perf_counter; thread: CPU time of this thread (needs --threads 1)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        p.error("--clock thread counts only the calling thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    libs = {}
    if args.before:
        sys.path.insert(0, export_before(args.before))
        import crossent_before  # noqa: E402

        libs[f"crossent {args.before}"] = crossent_before
    libs["crossent"] = crossent
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, forward + backward, fp32; "
        f"median of {args.repeats} x {args.inner} calls, ms per call ({args.clock} clock); "
        "ratio = torch eager / variant\n"
    )
    cases = _cases(libs)
    variants = [k for k in cases[0][1] if k != "torch eager"]
    print("| case | torch eager | " + " | ".join(f"{v} | ratio" for v in variants) + " |")
    print("|---|---|" + "---|---|" * len(variants))
    for name, fns in cases:
        m = measure(fns, args.repeats, args.inner, clock, warmup=max(10, args.inner))
        t = m["torch eager"]
        cells = [f"{t:.3f}"] + [f"{m[v]:.3f} | {t / m[v]:.2f}x" for v in variants]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
