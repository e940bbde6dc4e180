r"""Fused linear + BCE-with-logits: the per-row (or per-element) loss of ``x @ W.T + b``.

One pass, classes outer and rows inner, computes the losses and (for ``sum`` / ``mean``)
the gradients; :class:`LinearBCEWithLogitsFunction` is the autograd wrapper,
:func:`linear_bce_with_logits_chunked` the backend op and
:func:`linear_bce_with_logits_unfused` the reference semantics as plain code.
"""

from __future__ import annotations

import torch

from .. import reference
from .blocks import logits_block
from .operands import GradAcc, Operands, linear_backward, usable_scale, where_rows
from .plan import spans
from .targets import bce_ignored


def _bce_with_logits_pass(ops, tgt, plan, grads, scale, per_element, loss_out):
    """One pass, classes outer and rows inner: loss (rows or elements) and gradients.

    ``scale``: None, 0-dim, (N,) per-row or (N, L) per-element factors of the gradient.
    """
    x = ops.x
    N = x.shape[0]
    L_ = ops.W.shape[1]
    cdt = ops.cdt
    buf = torch.empty(min(plan.rows, N) * min(plan.classes, L_), dtype=cdt, device=x.device)
    for c0, c1 in spans(L_, plan.classes):
        Wb, bb = ops.wblock(0, c0, c1), ops.bblock(0, c0, c1)
        for r0, r1 in spans(N, plan.rows):
            Lg = logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
            loss, g = plan.impl.bce(Lg, tgt, r0, r1, c0, c1, cdt, grads is not None)
            if loss_out is not None:
                if per_element:
                    loss_out[r0:r1, c0:c1] = loss
                else:
                    loss_out[r0:r1] += loss.sum(1)
            if grads is not None:
                if scale is not None:
                    if scale.dim() == 0:
                        g.mul_(scale)
                    elif scale.dim() == 1:
                        g.mul_(scale[r0:r1].unsqueeze(1))
                    else:
                        g.mul_(scale[r0:r1, c0:c1])
                grads.add(0, g, r0, r1, c0, c1, Wb)
        if grads is not None:
            grads.finish_class_block(0, c0, c1)


class LinearBCEWithLogitsFunction(torch.autograd.Function):
    """Autograd wrapper for the fused linear + BCE-with-logits (see ``docs/design.md``)."""

    @staticmethod
    def forward(ctx, x, W, b, tgt, plan, grad_scale, precompute, per_element):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        needs = (x.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        ignored = bce_ignored(tgt)
        ops = Operands(x, W, b, cdt, ignored)
        want = precompute and any(needs)  # (grad mode is off in here: decided by the caller)
        scale = usable_scale(grad_scale, cdt) if want else None
        grads = GradAcc(ops, needs) if want else None
        N, L_ = x.shape[0], W.shape[1]
        if per_element:
            loss = torch.empty(N, L_, dtype=cdt, device=x.device)
        else:
            loss = torch.zeros(N, dtype=cdt, device=x.device)
        _bce_with_logits_pass(ops, tgt, plan, grads, scale, per_element, loss)
        ctx.save_for_backward(x, W, b)
        ctx.tgt, ctx.plan, ctx.cdt, ctx.scale, ctx.ignored = tgt, plan, cdt, scale, ignored
        ctx.pre = grads.results(x.dtype, None if b is None else b.dtype) if want else None
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        def recompute(ops, grads):
            _bce_with_logits_pass(ops, ctx.tgt, ctx.plan, grads, g_loss.to(ctx.cdt), g_loss.dim() == 2, None)

        return linear_backward(ctx, "linear_binary_cross_entropy_with_logits", g_loss, recompute, 5)


def linear_bce_with_logits_chunked(x, W, b, tgt, plan, grad_scale, precompute, per_element):
    """Per-row loss sums (N,) or, with ``per_element``, the (N, L) losses."""
    precompute = precompute and torch.is_grad_enabled()
    return LinearBCEWithLogitsFunction.apply(x, W, b, tgt, plan, grad_scale, precompute, per_element)


def linear_bce_with_logits_unfused(x, W, b, tgt, plan, grad_scale, precompute, per_element):
    """Reference semantics as plain code: full (N, L) logits and targets, then
    ``reference.binary_cross_entropy_with_logits``. For tests and comparisons only."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows, labels = bce_ignored(tgt)
    x, W0 = where_rows(x, rows), where_rows(W[0], labels)
    b0 = None if b is None else where_rows(b[0], labels)
    logits = torch.nn.functional.linear(x, W0, b0).to(cdt)
    N, L_ = logits.shape
    t, keep = tgt.block(0, N, 0, L_, cdt)
    w, pw = tgt.wblock(0, N, 0, L_, cdt)
    loss = reference.binary_cross_entropy_with_logits(logits, t, w, pw, keep)
    return loss if per_element else loss.sum(1)
