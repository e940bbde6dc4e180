r"""How the fused linear + loss ops cut their work: the scratch budget and the block plan.

:func:`plan_chunks` turns a memory budget (bytes of scratch per call, default
:data:`DEFAULT_BUDGET` or ``$CROSSENT_LINEAR_BUDGET``) into rows ``R`` and classes ``Cc``
per block, so the ``(N, C)`` logits never exist; :class:`ChunkPlan` carries the sizes and
the per-block arithmetic to use (:mod:`.blocks`), :func:`spans` walks one dimension in
blocks. Design notes: ``docs/design.md``, section ``crossent.backends.linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ... import _config
from ..._dtypes import is_low_precision
from .blocks import TORCH_BLOCKS


# Default per-call scratch budget (bytes) for the chunked kernels. 256 MiB gives a
# 4096 x 2048 -> 128256 float32 head row blocks of 418 rows (one pass, about 1/19 of
# eager's 5 GiB of overhead): on CPU the matrix products of a block lose speed quickly
# below ~400 rows (measured: 87-row blocks cost 2.0x, 256 rows 1.5x, 384-512 rows 1.15x
# the time of one whole-batch product; see docs/linear.md). ``CROSSENT_LINEAR_BUDGET``
# (bytes, or with a K/M/G/KiB/MiB/GiB suffix) overrides it: read by :func:`default_budget`
# when a call uses the default, so a bad value fails that call, never ``import crossent``.
DEFAULT_BUDGET = 256 * 2**20


def default_budget() -> int:
    """``$CROSSENT_LINEAR_BUDGET`` parsed by :func:`crossent._config.env_bytes`, else :data:`DEFAULT_BUDGET`."""
    return _config.linear_budget(DEFAULT_BUDGET)


# Fewest rows a block may have before the classes are split too (two passes): 32 rows of
# all classes must fit the budget.
_MIN_ROWS = 32
# Block-sized (R, Cc) buffers alive at once, per kind of target. Class indices: the logits
# block is turned into exp, then into the gradient, in place (1), plus a bool mask where a
# row's max is infinite (1/4 of a float32 buffer). Probability targets and BCE: the logits
# block, the target/weight blocks read from the caller's tensors, and work buffers (3).
BUFFERS_INDEX = 1.25
BUFFERS_DENSE = 3.0


@dataclass(frozen=True)
class ChunkPlan:
    rows: int  # R: rows per block
    classes: int  # Cc: classes per block
    budget: int  # the budget the plan was sized for (bytes)
    blocks: object = None  # per-block arithmetic (None: TorchBlocks; the Triton backend sets its own)

    @property
    def impl(self):
        return TORCH_BLOCKS if self.blocks is None else self.blocks

    def describe(self, N: int, C: int) -> str:
        return (
            f"{math.ceil(N / self.rows)} row blocks of {self.rows} x "
            f"{math.ceil(C / self.classes)} class blocks of {self.classes}"
        )


def plan_chunks(
    N: int,
    C: int,
    H: int,
    dtype: torch.dtype,
    *,
    budget: Optional[int] = None,
    rows: Optional[int] = None,
    classes: Optional[int] = None,
    buffers: float = BUFFERS_DENSE,
) -> ChunkPlan:
    """Block sizes from a memory budget (bytes of scratch per call).

    ``Cc = C`` when ``min(N, 32)`` rows of all classes fit (then cross-entropy needs a
    single pass); otherwise ``Cc`` is what fits with 32 rows. ``R`` then fills the
    budget: ``R * Cc * buffers * 4`` bytes (8 for float64; ``buffers``: how many
    block-sized buffers the op keeps alive, :data:`BUFFERS_INDEX` or
    :data:`BUFFERS_DENSE`). fp16/bf16 inputs give half the
    budget to the float32 weight block and its gradient accumulator (``2 * Cc * H * 4``
    bytes, which sets ``Cc``) and half to the logits blocks.
    """
    budget = default_budget() if budget is None else int(budget)
    esize = 8 if dtype == torch.float64 else 4
    low = is_low_precision(dtype)
    per_logit = buffers * esize
    per_class_extra = 2 * H * 4 if low else 0
    logit_budget = budget
    if low:
        # Half the budget for the float32 weight block + its gradient, half for the logits.
        logit_budget = budget // 2
        if classes is None:
            classes = (budget - logit_budget) // per_class_extra
    if classes is None:
        r0 = max(1, min(N, _MIN_ROWS))
        classes = int(logit_budget // (r0 * per_logit))
    classes = int(max(1, min(C, classes)))
    if rows is None:
        rows = int(logit_budget // (classes * per_logit))
    rows = int(max(1, min(max(N, 1), rows)))
    return ChunkPlan(rows=rows, classes=classes, budget=budget)


def spans(n, size):
    for a in range(0, n, size):
        yield a, min(n, a + size)
