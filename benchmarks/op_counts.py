"""Torch operations per small loss call (forward + backward), counted with a dispatch mode.

    PYTHONPATH=src python benchmarks/op_counts.py

Small classifiers pay per torch call, not per element, so the number of dispatched ops of
a whole call is a deterministic stand-in for its fixed cost. The table lists crossent's
count on the automatic CPU backend next to torch eager's, and the budget each row should
stay within; the exit status is 1 when a row exceeds its budget, so a change that adds ops
on this path shows up here (a change that needs them raises the budget and says why).
The value-check rows show what the CPU shortcuts skip: the softmax heuristic computes no
row sums for mixed-sign logits, the index check builds no ``ignore_index`` mask when no
target equals it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

import crossent
from crossent import _validation as V
from crossent.backends import chunked


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops(fn):
    with _CountOps() as mode:
        fn()
    return mode.ops


def _rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g).requires_grad_()
    y = torch.randint(0, 10, (64,), generator=g)
    z = torch.randn(256, 10, generator=g).requires_grad_()
    t = (torch.rand(256, 10, generator=g) < 0.3).float()
    rows = []
    for validate, budget in ((False, 14), (True, 22)):
        rows.append(
            (
                f"cross_entropy 64x10, validate={validate}",
                budget,
                lambda v=validate: crossent.cross_entropy(x, y, validate=v).backward(),
                lambda: TF.cross_entropy(x, y).backward(),
            )
        )
    for validate, budget in ((False, 8), (True, 16)):
        rows.append(
            (
                f"binary_cross_entropy_with_logits 256x10, validate={validate}",
                budget,
                lambda v=validate: crossent.binary_cross_entropy_with_logits(z, t, validate=v).backward(),
                lambda: TF.binary_cross_entropy_with_logits(z, t).backward(),
            )
        )
    rows.append(
        (
            "softmax heuristic, mixed-sign logits (no exp, no sum)",
            0,
            lambda: [o for o in ops(lambda: V.check_logits_not_probabilities("f", x, 1)) if o in ("exp", "sum")],
            None,
        )
    )
    rows.append(
        (
            "class-index check, nothing ignored (no where)",
            0,
            lambda: [o for o in ops(lambda: V.check_class_indices("f", y, 10, -100)) if o == "where"],
            None,
        )
    )
    # Routing of K-dimensional logits: float32 contiguous (N, C, S) runs the lane kernel (no
    # layout copy, no row-kernel call); float64 and channels-last logits run the row kernel.
    k = torch.randn(2, 5, 3, 7, requires_grad=True)
    ky = torch.randint(0, 5, (2, 3, 7))
    rows.append(
        (
            "K-dim float32 (2, 5, 3, 7): row-kernel calls",
            0,
            lambda: _kernel_calls("ce_index", lambda: crossent.cross_entropy(k, ky).backward()),
            None,
        )
    )
    rows.append(
        (
            "K-dim float64 (2, 5, 3, 7): lane-kernel calls",
            0,
            lambda: _kernel_calls("ce_index_ncs", lambda: crossent.cross_entropy(k.double(), ky).backward()),
            None,
        )
    )
    return rows


def _kernel_calls(name, fn):
    """The calls ``fn`` makes to the compiled kernel entry ``name`` (empty without the kernel)."""
    kernels = chunked._cpp()
    if kernels is None:
        return []
    real, calls = getattr(kernels, name), []

    def spy(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    setattr(kernels, name, staticmethod(spy))
    try:
        fn()
    finally:
        setattr(kernels, name, staticmethod(real))
    return calls


def main() -> int:
    if chunked._cpp() is None:
        print("the compiled CPU kernel is unavailable here: the counts below are the torch-ops fallback's")
    print("| call | crossent ops | budget | torch eager ops |")
    print("|---|---|---|---|")
    over = 0
    for name, budget, ours, theirs in _rows():
        V.reset_warnings()
        if theirs is None:  # a selector: the listed ops must not run
            found = ours()
            n, eager = len(found), ""
        else:
            n, eager = len(ops(ours)), str(len(ops(theirs)))
        over += n > budget
        print(f"| {name} | {n} | {budget} | {eager} |")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
