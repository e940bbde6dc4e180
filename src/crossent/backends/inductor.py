r"""The cross-entropy row ops as formulas Inductor compiles: ``torch.compile`` on CPU.

Called from a compiled graph, :func:`crossent.backends.ops.cross_entropy_rows` and its
backward would run as opaque calls through the dispatcher into Python and the C kernel:
on a small model that costs more than the loss itself (measured in
``benchmarks/compiled_step.py``), and Inductor cannot fuse across them. Registered as
Inductor decompositions, the two ops become the aten formulas below, which Inductor turns
into fused, vectorised loops like those it generates for torch's own loss. Eager calls,
``torch.export`` (its own decomposition table), ``torch.jit.trace`` and the CUDA path
keep the ops; so do dense (probability) targets and backends other than ``chunked``, for
which the functions return ``NotImplemented``.

The formulas are those of the C row kernel (``kernels.c``, ``crossent_ce_index``), with
the same special cases: for a row of logits :math:`x` with maximum :math:`m` (ties: every
:math:`x_j = m` counts 1, the first one is k) and
:math:`s = \sum_{j \ne k} e^{x_j - m}`,

.. math::
    \ell = c\,(\log(1 + s) - z_y) + S \log(1 + s) + \sum_j \sigma_j\,(m - x_j),\qquad
    z_y = x_y - m,\ S = \sum_j \sigma_j,

    \frac{\partial \ell}{\partial x_j} = A\,\frac{e_j}{1 + s} - a_j,\qquad
    A = c + S,\ a_j = c\,[j = y] + \sigma_j,

and at the arg-max, when it dominates (:math:`s < 1`),
:math:`(A - a_k) - A\,s / (1 + s)` without cancellation. Terms with a zero coefficient are
0 even where their factor is infinite; an ignored row (coefficient ``-0.0``) gives loss 0
and a zero gradient whatever its logits hold. A target outside [0, C) fails an assertion
in the compiled code (even with ``validate=False``, as the C kernel refuses it), never a
read out of bounds.

Inductor's on-disk cache does not key a compiled graph by these functions: a graph compiled
before they were registered (an older crossent) keeps calling the ops (same values) until
the cache is cleared, and a change to the formulas must rename the ops (as any change of
their meaning, see :mod:`.ops`).

Registration happens while Dynamo first traces a cross-entropy op (from its fake
implementation, :func:`ensure_registered`): importing Inductor's decomposition table costs
about 2 s, which ``import crossent`` does not pay, and Inductor imports it for the same
compilation a moment later anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_registered = False


def _rows(x: Tensor) -> Tensor:
    """(N, C, S) logits as rows (N * S, C), in the order of the op's per-row outputs."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def _ignored(c: Optional[Tensor]) -> Optional[Tensor]:
    """Rows whose coefficient is -0.0 (``reference.ce_coefficients``' mark for ignore_index)."""
    return None if c is None else (c == 0) & torch.signbit(c)


def _declines(q: Optional[Tensor], x: Tensor, backend: str) -> bool:
    return q is not None or backend != "chunked" or x.device.type != "cpu"


def cross_entropy_rows(x, q, y, c, smooth, keep, backend):
    """``crossent::cross_entropy_rows`` for class indices on CPU: (loss, stats (m, s))."""
    if _declines(q, x, backend):
        return NotImplemented
    r = _rows(x)
    C = r.shape[1]
    torch._assert_async(
        ((y >= 0) & (y < C)).all(),
        f"cross_entropy: expected class indices in [0, {C}), but got a target outside it "
        "(the compiled loss's own check; validate=False skipped the friendlier one).",
    )
    m = r.amax(1, keepdim=True)
    tie = r == m
    s = torch.where(tie, 0.0, torch.exp(r - m)).sum(1) + (tie.sum(1) - 1).to(r.dtype)
    m1 = m.squeeze(1)
    x_y = r.gather(1, y.clamp(0, C - 1).unsqueeze(1)).squeeze(1)  # in range: the assertion speaks
    z_y = torch.where(x_y == m1, 0.0, x_y - m1)
    lse = torch.log1p(s)
    loss = lse - z_y if c is None else torch.where(c == 0, 0.0, c * (lse - z_y))
    if smooth is not None:
        S = smooth.sum()
        T = torch.where(tie | (smooth == 0), 0.0, smooth * (m - r)).sum(1)
        loss = loss + torch.where(S == 0, 0.0, S * lse) + T
    ignored = _ignored(c)
    if ignored is not None:
        loss = torch.where(ignored, 0.0, loss)
    return loss, torch.stack([m1, s], 1)


def cross_entropy_rows_backward(grad_loss, x, q, y, c, smooth, keep, stats, backend):
    """``crossent::cross_entropy_rows_backward`` for class indices on CPU: the gradient
    times ``grad_loss`` (per row), in the layout of ``x``."""
    if _declines(q, x, backend):
        return NotImplemented
    r = _rows(x)
    C = r.shape[1]
    m, s = stats[:, :1], stats[:, 1:]
    e = torch.where(r == m, 1.0, torch.exp(r - m))
    k = r.argmax(1, keepdim=True)  # the first maximum, as the kernel's k
    j = torch.arange(C, device=r.device)
    y1 = y.unsqueeze(1)
    c1 = torch.ones_like(s) if c is None else c.unsqueeze(1)
    S = smooth.sum() if smooth is not None else 0.0
    A = c1 + S
    a = torch.where(j == y1, c1, 0.0)
    if smooth is not None:
        a = a + smooth
    g = A * (e / (1 + s)) - a
    a_rest = torch.where(k == y1, 0.0, c1) + (S - smooth[k] if smooth is not None else 0.0)
    g = torch.where((j == k) & (s < 1), a_rest - A * (s / (1 + s)), g)
    g = grad_loss.to(r.dtype).unsqueeze(1) * g
    ignored = _ignored(c)
    if ignored is not None:
        g = torch.where(ignored.unsqueeze(1), 0.0, g)
    if x.dim() == 3:
        g = g.reshape(x.shape[0], x.shape[2], C).movedim(-1, 1)
    return g


def ensure_registered() -> None:
    """Register the two functions in Inductor's decomposition table, once per process;
    only while compiling (not exporting), and quietly not at all where this torch's
    Inductor has no such table."""
    global _registered
    if _registered or not torch.compiler.is_compiling():
        return
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    if is_exporting():
        return
    _registered = True
    try:
        with torch.utils._python_dispatch._disable_current_modes():  # called under fake mode
            from torch._inductor import decomposition as table
        # Inductor keeps a copy of its table from its first compilation in the process
        # (select_decomp_table caches it): the entries go into that copy too.
        tables = [table.decompositions, table.select_decomp_table()]
    except Exception:  # pragma: no cover - a torch without Inductor's table: the ops run
        return
    for op, fn in [
        (torch.ops.crossent.cross_entropy_rows.default, cross_entropy_rows),
        (torch.ops.crossent.cross_entropy_rows_backward.default, cross_entropy_rows_backward),
    ]:
        for t in tables:
            t.setdefault(op, fn)
