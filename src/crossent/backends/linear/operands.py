r"""The operands of a fused linear pass, its gradient accumulators and the shared backward.

:class:`Operands` holds the inputs in the compute dtype (weights cast block by block for
fp16/bf16, ignored rows holding NaN or +-inf read as zeros); :class:`GradAcc` accumulates
the gradients of ``x``, ``W`` and ``b`` block by block; :func:`linear_backward` is the
backward both autograd Functions share: the gradients computed in forward, rescaled, or
recomputed when the incoming gradient is not uniform.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _capture


def _zero_nonfinite_rows(t: torch.Tensor, rows: Optional[torch.Tensor], owned: bool) -> torch.Tensor:
    """``t`` with the rows marked in ``rows`` (dim 0) set to 0 when any of them holds NaN
    or +-inf; ``t`` itself when none does (the usual case: one small read, no copy).
    ``owned``: ``t`` is a private copy that may be changed in place."""
    if rows is None:
        return t
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0 or bool(torch.isfinite(t.index_select(0, idx)).all()):
        return t
    t = t if owned else t.clone()
    t.index_fill_(0, idx, 0.0)
    return t


class Operands:
    """Inputs in the compute dtype, weights cast block by block (fp16/bf16 -> float32).

    ``ignored``: (rows, labels) from :func:`ce_ignored` / :func:`bce_ignored`: hidden rows
    and weight rows (with their bias) whose targets are all ignored are read as zeros
    when they hold NaN or +-inf (a copy of that tensor, made only then)."""

    def __init__(self, x, W, b, cdt, ignored=(None, None)):
        self.cdt = cdt
        self.low = x.dtype != cdt
        self.x = x.to(cdt) if self.low else x  # (N, H): input-sized copy for fp16/bf16
        rows, labels = ignored
        self.x = _zero_nonfinite_rows(self.x, rows, owned=self.low)
        if labels is not None:  # BCE: one position, W (1, L, H), b (1, L)
            W = _zero_nonfinite_rows(W[0], labels, owned=False).unsqueeze(0)
            if b is not None:
                b = _zero_nonfinite_rows(b[0], labels, owned=False).unsqueeze(0)
        self.W, self.b = W, b

    def wblock(self, p, c0, c1):
        Wb = self.W[p, c0:c1]
        return Wb.to(self.cdt) if self.low else Wb

    def bblock(self, p, c0, c1):
        return None if self.b is None else self.b[p, c0:c1].to(self.cdt)


class GradAcc:
    """Gradient accumulators: grad_x (N, H), grad_W (D, C, H), grad_b (D, C).

    float32/float64 inputs accumulate straight into the result tensors; fp16/bf16 inputs
    accumulate grad_x in a float32 (N, H) buffer and each class block of grad_W in a
    float32 (Cc, H) buffer that is rounded into the result once, when its rows are done.
    """

    def __init__(self, ops, needs):
        x, W, b = ops.x, ops.W, ops.b
        self.ops, self.needs = ops, needs
        self.gx = torch.zeros(x.shape, dtype=ops.cdt, device=x.device) if needs[0] else None
        self.gW = torch.empty(W.shape, dtype=W.dtype, device=W.device) if needs[1] else None
        self.gb = torch.zeros(b.shape, dtype=ops.cdt, device=W.device) if (needs[2] and b is not None) else None
        self._acc = None
        self._started = False

    def add(self, p, g, r0, r1, c0, c1, Wb):
        x = self.ops.x
        if self.gx is not None:
            self.gx[r0:r1].addmm_(g, Wb)
        if self.gW is not None:
            if not self._started:
                target = self.gW[p, c0:c1] if not self.ops.low else None
                if target is not None and target.is_contiguous():
                    torch.mm(g.t(), x[r0:r1], out=target)
                    self._acc = target
                else:
                    self._acc = torch.mm(g.t(), x[r0:r1])
                self._started = True
            else:
                self._acc.addmm_(g.t(), x[r0:r1])
        if self.gb is not None:
            self.gb[p, c0:c1] += g.sum(0)

    def finish_class_block(self, p, c0, c1):
        if self.gW is not None and self._acc is not None:
            dst = self.gW[p, c0:c1]
            if self._acc.data_ptr() != dst.data_ptr():
                dst.copy_(self._acc)
        self._acc = None
        self._started = False

    def results(self, x_dtype, b_dtype):
        gx = None if self.gx is None else self.gx.to(x_dtype)
        gb = None if self.gb is None else self.gb.to(b_dtype)
        return gx, self.gW, gb


def linear_backward(ctx, func, g_loss, recompute, n_other_inputs):
    """Backward of both fused linear Functions: the gradients computed in forward, rescaled
    by the ratio of the incoming gradient to ``ctx.scale`` (exactly 1 for ``sum`` /
    ``mean``) when it is uniform; otherwise ``recompute(ops, grads)`` accumulates them
    chunk by chunk. Returns (grad_x, grad_W, grad_b) and None for the other inputs."""
    _no_double_backward(func)
    with torch.no_grad():
        x, W, b = ctx.saved_tensors
        pre, ctx.pre = ctx.pre, None
        if pre is not None and _uniform(g_loss):
            out = _rescale(pre, g_loss.reshape(-1)[:1].to(ctx.cdt) / ctx.scale)
        else:
            ops = Operands(x, W, b, ctx.cdt, ctx.ignored)
            needs = ctx.needs_input_grad[:3]
            grads = GradAcc(ops, (needs[0], needs[1], needs[2] and b is not None))
            recompute(ops, grads)
            out = grads.results(x.dtype, None if b is None else b.dtype)
    return (out[0], out[1], out[2]) + (None,) * n_other_inputs


def _no_double_backward(func):
    """Second derivatives would silently be zero: refuse ``create_graph=True`` loudly."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{func}: expected a first-order backward, but got create_graph=True (double "
            "backward). The fused op computes its gradients chunk by chunk without a graph; for "
            "second derivatives use the unfused loss on `F.linear(...)` logits."
        )


def usable_scale(grad_scale, cdt):
    """The factor the forward gradients are computed for: ``grad_scale`` if finite and
    positive (1/denominator for ``mean``), else 1."""
    if grad_scale is None:
        return torch.ones((), dtype=cdt)
    s = grad_scale.to(cdt)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))  # no device sync


def _rescale(pre, ratio):
    """Scale the precomputed gradients in place by ``ratio`` (skipped on CPU when it is 1)."""
    if ratio.device.type == "cpu" and float(ratio) == 1.0:
        return list(pre)
    return [None if t is None else t.mul_(ratio.to(t.dtype)) for t in pre]


def _uniform(g: torch.Tensor) -> bool:
    """The incoming gradient is one number broadcast (the backward of sum / mean)."""
    return g.numel() > 0 and all(st == 0 or n == 1 for st, n in zip(g.stride(), g.shape))


def where_rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The unfused paths' :func:`_zero_nonfinite_rows`, differentiable (``torch.where``:
    exactly zero gradient for the rows replaced)."""
    if rows is None:
        return t
    if not _capture.capturing(t) and (not bool(rows.any()) or bool(torch.isfinite(t[rows]).all())):
        return t  # eager shortcut (host reads); captured graphs always take the select
    return torch.where(rows.view((-1,) + (1,) * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)
