r"""Fused linear + loss in plain PyTorch, chunked: the ``(N, C)`` logits never exist.

The package is cut by concern: :mod:`.plan` (scratch budget and block sizes),
:mod:`.targets` (cross-entropy coefficients and BCE-with-logits targets, block by block),
:mod:`.blocks` (the arithmetic on one block of logits, which the Triton backend
specialises), :mod:`.operands` (inputs, gradient accumulators, the shared backward),
:mod:`.cross_entropy` and :mod:`.binary` (the two ops and their autograd Functions).
The op tables below are what :mod:`crossent.backends` registers. Design notes:
``docs/design.md``, section ``crossent.backends.linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from .binary import (
    LinearBCEWithLogitsFunction,
    linear_bce_with_logits_chunked,
    linear_bce_with_logits_unfused,
)
from .blocks import CPU_KERNEL_BLOCKS, TORCH_BLOCKS, CpuKernelBlocks, RowStats, TorchBlocks
from .cross_entropy import (
    LinearCrossEntropyFunction,
    ce_forward_with_grads,
    linear_cross_entropy_chunked,
    linear_cross_entropy_unfused,
)
from .plan import BUFFERS_DENSE, BUFFERS_INDEX, DEFAULT_BUDGET, ChunkPlan, default_budget, plan_chunks
from .targets import BCETarget, CETarget, ce_targets

# The fused linear ops of each kind of backend, registered by :mod:`crossent.backends`.
OPS_CHUNKED: Dict[str, Callable] = {
    "linear_cross_entropy": linear_cross_entropy_chunked,
    "linear_binary_cross_entropy_with_logits": linear_bce_with_logits_chunked,
}
OPS_REFERENCE: Dict[str, Callable] = {
    "linear_cross_entropy": linear_cross_entropy_unfused,
    "linear_binary_cross_entropy_with_logits": linear_bce_with_logits_unfused,
}


def _with_blocks(fn, blocks):
    def call(x, W, b, tgts, plan, *rest):
        if plan.blocks is None:
            plan = dataclasses.replace(plan, blocks=blocks)
        return fn(x, W, b, tgts, plan, *rest)

    call.__name__ = fn.__name__
    return call


# The CPU backend's: the chunked ops with the compiled BCE-with-logits block.
OPS_CPU: Dict[str, Callable] = {op: _with_blocks(fn, CPU_KERNEL_BLOCKS) for op, fn in OPS_CHUNKED.items()}

__all__ = [
    "BCETarget",
    "BUFFERS_DENSE",
    "BUFFERS_INDEX",
    "CETarget",
    "CPU_KERNEL_BLOCKS",
    "ChunkPlan",
    "CpuKernelBlocks",
    "DEFAULT_BUDGET",
    "LinearBCEWithLogitsFunction",
    "LinearCrossEntropyFunction",
    "OPS_CHUNKED",
    "OPS_CPU",
    "OPS_REFERENCE",
    "RowStats",
    "TORCH_BLOCKS",
    "TorchBlocks",
    "ce_forward_with_grads",
    "ce_targets",
    "default_budget",
    "linear_bce_with_logits_chunked",
    "linear_bce_with_logits_unfused",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_unfused",
    "plan_chunks",
]
