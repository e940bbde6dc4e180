r"""Fused linear + cross-entropy: per-row loss and log-sum-exp of ``x @ W.T + b``.

One blocked pass computes the row statistics and (for ``sum`` / ``mean``) the gradients
(:func:`ce_forward_with_grads`); with several class blocks a second pass recomputes the
logits for the gradients. :class:`LinearCrossEntropyFunction` is the autograd wrapper,
:func:`linear_cross_entropy_chunked` the backend op and
:func:`linear_cross_entropy_unfused` the reference semantics as plain code.
"""

from __future__ import annotations

import torch

from .. import reference
from .blocks import RowStats, logits_block
from .operands import GradAcc, Operands, linear_backward, usable_scale, where_rows
from .plan import spans
from .targets import ce_ignored


def _ce_forward_pass(ops, tgts, plan, grads, scale):
    """Per-row loss and lse (N, D); gradients (times ``scale``) into ``grads`` if given."""
    x = ops.x
    N = x.shape[0]
    D, C = ops.W.shape[0], ops.W.shape[1]
    cdt = ops.cdt
    loss = torch.empty(N, D, dtype=cdt, device=x.device)
    lse = torch.empty(N, D, dtype=cdt, device=x.device)
    buf = torch.empty(min(plan.rows, N) * min(plan.classes, C), dtype=cdt, device=x.device)
    all_stats = []
    for p in range(D):
        tgt = tgts[p]
        stats = RowStats(N, cdt, x.device)
        if plan.classes >= C and grads is not None:
            # One class block: statistics and gradients from the same logits.
            A = tgt.total(cdt, rows=plan.rows, classes=plan.classes)
            Wb, bb = ops.wblock(p, 0, C), ops.bblock(p, 0, C)
            for r0, r1 in spans(N, plan.rows):
                L = logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * C].view(r1 - r0, C))
                e = plan.impl.ce_stats(L, r0, r1, 0, C, tgt, stats, cdt)
                Arest = tgt.rest(stats.k, cdt, r0, r1, rows=plan.rows, classes=plan.classes)
                g = plan.impl.ce_grad(e, True, r0, r1, 0, C, tgt, stats, A[r0:r1], Arest, scale, cdt)
                grads.add(p, g, r0, r1, 0, C, Wb)
            grads.finish_class_block(p, 0, C)
        else:
            for c0, c1 in spans(C, plan.classes):
                Wb, bb = ops.wblock(p, c0, c1), ops.bblock(p, c0, c1)
                for r0, r1 in spans(N, plan.rows):
                    L = logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
                    plan.impl.ce_stats(L, r0, r1, c0, c1, tgt, stats, cdt)
            if grads is not None:
                _ce_grad_pass(ops, p, tgt, stats, plan, grads, buf, scale)
        loss[:, p] = stats.loss(tgt)
        lse[:, p] = stats.lse()
        all_stats.append(stats)
    return loss, lse, all_stats


def _ce_grad_pass(ops, p, tgt, stats, plan, grads, buf, scale):
    """Pass 2: recompute logits block by block (classes outer) and accumulate gradients.

    ``scale``: None, a 0-dim tensor, or an (N,) tensor of per-row factors.
    """
    x = ops.x
    N = x.shape[0]
    C = ops.W.shape[1]
    cdt = ops.cdt
    A = tgt.total(cdt, rows=plan.rows, classes=plan.classes)
    Arest = tgt.rest(stats.k, cdt, rows=plan.rows, classes=plan.classes)
    for c0, c1 in spans(C, plan.classes):
        Wb, bb = ops.wblock(p, c0, c1), ops.bblock(p, c0, c1)
        for r0, r1 in spans(N, plan.rows):
            L = logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
            sc = scale if (scale is None or scale.dim() == 0) else scale[r0:r1]
            g = plan.impl.ce_grad(L, False, r0, r1, c0, c1, tgt, stats, A[r0:r1], Arest[r0:r1], sc, cdt)
            grads.add(p, g, r0, r1, c0, c1, Wb)
        grads.finish_class_block(p, c0, c1)


def ce_forward_with_grads(x, W, b, tgts, plan, needs, scale, ignored=None):
    """One blocked pass: per-row loss and lse (N, D), the row statistics, and -- when
    ``needs`` (grad of x, W, b wanted) is given -- the gradients of ``scale * sum(loss)``
    w.r.t. (x, W, b) (None where not wanted). ``ignored``: what :class:`Operands` reads as
    zeros (default: the hidden rows whose targets are all ignored, :func:`ce_ignored`)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    ops = Operands(x, W, b, cdt, (ce_ignored(tgts), None) if ignored is None else ignored)
    grads = GradAcc(ops, needs) if needs is not None else None
    loss, lse, stats = _ce_forward_pass(ops, tgts, plan, grads, scale)
    pre = grads.results(x.dtype, None if b is None else b.dtype) if grads is not None else None
    return loss, lse, stats, pre


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients from the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, x, W, b, tgts, plan, grad_scale, precompute):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        needs = (x.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        ignored = (ce_ignored(tgts), None)
        want = precompute and any(needs)  # (grad mode is off in here: decided by the caller)
        scale = usable_scale(grad_scale, cdt) if want else None
        loss, lse, stats, pre = ce_forward_with_grads(x, W, b, tgts, plan, needs if want else None, scale, ignored)
        ctx.save_for_backward(x, W, b)
        ctx.tgts, ctx.plan, ctx.stats, ctx.cdt, ctx.ignored = tgts, plan, stats, cdt, ignored
        ctx.pre = pre
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        if g_loss is None:
            return (None,) * 7

        def recompute(ops, grads):
            x, W = ops.x, ops.W
            N, C = x.shape[0], W.shape[1]
            buf = torch.empty(min(ctx.plan.rows, N) * min(ctx.plan.classes, C), dtype=ctx.cdt, device=x.device)
            for p in range(W.shape[0]):
                _ce_grad_pass(ops, p, ctx.tgts[p], ctx.stats[p], ctx.plan, grads, buf, g_loss[:, p].to(ctx.cdt))

        return linear_backward(ctx, "linear_cross_entropy", g_loss, recompute, 4)


def linear_cross_entropy_chunked(x, W, b, tgts, plan, grad_scale, precompute):
    """Per-row losses and log-sum-exp (N, D); see ``docs/design.md``."""
    precompute = precompute and torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(x, W, b, tgts, plan, grad_scale, precompute)


def linear_cross_entropy_unfused(x, W, b, tgts, plan, grad_scale, precompute):
    """Reference semantics as plain code: the full logits, then ``reference.cross_entropy``.

    Allocates the (N, C) logits of every position: for tests and comparisons only.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = where_rows(x, ce_ignored(tgts))
    losses, lses = [], []
    for p, tgt in enumerate(tgts):
        logits = torch.nn.functional.linear(x, W[p], None if b is None else b[p]).to(cdt)
        target = tgt.raw_target if tgt.index else tgt.q.to(cdt)
        loss, _ = reference.cross_entropy(logits, target, tgt.index, tgt.weight, tgt.keep, tgt.eps)
        losses.append(loss)
        lses.append(torch.logsumexp(logits.detach(), dim=1))
    return torch.stack(losses, 1), torch.stack(lses, 1)
