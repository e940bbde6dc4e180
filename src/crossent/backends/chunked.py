r"""Fused CPU backend: loss and gradient in one pass over the data, chunked over rows.
Design notes: ``docs/design.md``, section ``crossent.backends.chunked``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .._dtypes import mean_grad_scale
from ..errors import fail

# 2**16 float32 elements = 256 KiB per intermediate: a chunk's few temporaries stay in L2/L3
# while per-op overhead (~5-10 us per torch call) stays small against the work per chunk.
CHUNK_ELEMENTS = 1 << 16


def _rows_per_chunk(row_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_elements))


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


_times = reference._times  # coef * value with 0 * inf = 0: the one rule, shared with the reference


_chunked_cpp = None  # imported on first use (ctypes, subprocess), then kept: no import per call


def _cpp():
    """The compiled kernel module, or None (not built / no compiler / disabled)."""
    global _chunked_cpp
    if _chunked_cpp is None:
        from . import chunked_cpp as module

        _chunked_cpp = module
    return _chunked_cpp.get()


def _cpp_ok(*tensors) -> bool:
    """The compiled kernels take contiguous float32 CPU tensors."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------- BCE with logits
def _weight_and_mask(loss, grad, w, keep):
    """Apply per-element weights and the ignore_index mask to a chunk's loss and gradient."""
    if w is not None:
        loss = loss * w
        grad = grad * w
    if keep is not None:
        loss = torch.where(keep, loss, _zero(loss))
        grad = torch.where(keep, grad, _zero(grad))
    return loss, grad


def _bce_with_logits_chunk(x, t, pos, w, keep):
    """Loss and d loss / dx of one chunk (pure torch), reference formulas.

    With :math:`e = e^{-|x|}`: softplus(+-x) = max(+-x, 0) + log1p(e) (non-negative sums),
    sigmoid(|x|) = 1/(1+e), sigmoid(-|x|) = e/(1+e).
    """
    e = torch.exp(-x.abs())
    l1 = torch.log1p(e)
    r = 1.0 / (1.0 + e)
    neg = x < 0
    sp_pos = torch.clamp(x, min=0) + l1  # softplus(x)
    sp_neg = torch.clamp(-x, min=0) + l1  # softplus(-x)
    sig = torch.where(neg, e * r, r)  # sigmoid(x)
    sig_neg = torch.where(neg, r, e * r)  # sigmoid(-x) = 1 - sigmoid(x), exact
    one_m_t = 1 - t
    p = t if pos is None else pos * t
    loss = _times(p, sp_neg) + _times(one_m_t, sp_pos)
    grad = one_m_t * sig - p * sig_neg
    return _weight_and_mask(loss, grad, w, keep)


def _bce_chunk(p, t, pos, w, keep):
    """torch's clamped BCE and its documented gradient (see reference._BinaryCrossEntropy)."""
    log_p = torch.clamp(torch.log(p), min=-100)
    log_1mp = torch.clamp(torch.log1p(-p), min=-100)
    pt = t if pos is None else pos * t
    loss = -(pt * log_p + (1 - t) * log_1mp)
    # reference._BinaryCrossEntropy.backward: (p - t) - (p_w - 1) t (1 - p) over
    # max(p (1 - p), EPS), EPS torch's float32 constant (also for float64).
    num = p - t
    if pos is not None:
        num = num - (pos - 1) * t * (1 - p)
    grad = num / torch.clamp(p * (1 - p), min=reference._TORCH_BCE_EPS)
    return _weight_and_mask(loss, grad, w, keep)


def _chunks(n: int, rows: int):
    for i in range(0, n, rows):
        yield i, min(n, i + rows)


def _elementwise_forward(chunk_fn, x, t, weight, pos_weight, keep, sum_only: bool, scale=None):
    """Run ``chunk_fn`` over chunks of rows: (per-element loss or its 0-dim sum, grad * scale)."""
    if x.dim() == 0:
        loss, grad = chunk_fn(x, t, pos_weight, weight, keep)
        if scale is not None:
            grad = grad * scale
        return (loss if not sum_only else loss.clone()), grad
    shape = x.shape
    loss = None if sum_only else torch.empty_like(x)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    grad = torch.empty_like(x)
    # Broadcast views (no copies) so that slicing along dim 0 lines everything up.
    tv = t.expand(shape)
    pv = None if pos_weight is None else pos_weight.expand(shape)
    wv = None if weight is None else weight.expand(shape)
    kv = None if keep is None else keep.expand(shape)
    row = x[0].numel() if shape[0] else 1
    for i, j in _chunks(shape[0], _rows_per_chunk(row)):
        sl = slice(i, j)
        lo, g = chunk_fn(
            x[sl],
            tv[sl],
            None if pv is None else pv[sl],
            None if wv is None else wv[sl],
            None if kv is None else kv[sl],
        )
        if sum_only:
            total += lo.sum(dtype=torch.float64)
        else:
            loss[sl] = lo
        grad[sl] = g if scale is None else g * scale
    return (total.to(x.dtype) if sum_only else loss), grad


def _cycled_pos_weight(x, pos_weight):
    """(weights, L) for the C kernel: one weight per label cycled along the last dim, or full."""
    if pos_weight is None:
        return None, 0
    if x.dim() >= 1 and pos_weight.numel() == x.shape[-1] and pos_weight.shape[-1:] == x.shape[-1:]:
        return pos_weight.reshape(-1).contiguous(), x.shape[-1]
    return pos_weight.expand(x.shape).contiguous(), x.numel()


def _bce_with_logits_forward(x, t, weight, pos_weight, keep, sum_only=False, scale=None, use_cpp=True):
    """(loss or its sum, grad * scale) for the whole tensor: compiled kernel or chunked torch ops."""
    cpp = _cpp() if use_cpp and _cpp_ok(x, t) and weight is None and keep is None else None
    if cpp is not None:
        return cpp.bce_with_logits(x, t, *_cycled_pos_weight(x, pos_weight), not sum_only, scale)
    return _elementwise_forward(_bce_with_logits_chunk, x, t, weight, pos_weight, keep, sum_only, scale)


def _bce_forward(p, t, weight, pos_weight, keep, sum_only=False, scale=None, use_cpp=True):
    cpp = _cpp() if use_cpp and _cpp_ok(p, t) and weight is None and keep is None else None
    if cpp is not None:
        return cpp.bce_probs(p, t, *_cycled_pos_weight(p, pos_weight), not sum_only, scale)
    return _elementwise_forward(_bce_chunk, p, t, weight, pos_weight, keep, sum_only, scale)


def _elementwise_kernel(impl, x, t, weight, keep):
    """The compiled C library when it runs this BCE pass (the CPU table, float32 contiguous
    inputs, no per-element weight or mask), else None."""
    return _cpp() if impl is CPU and _cpp_ok(x, t) and weight is None and keep is None else None


def elementwise_sum(impl, logits: bool, x, t, weight, pos_weight, keep, want_grad: bool, scale=None):
    """``(sum of the per-element BCE losses (0-dim), gradient * scale or None)``: BCE-with-logits
    (``logits``) or BCE on probabilities. The C kernel skips the gradient when it is not
    wanted; the other kernels compute it alongside and it is dropped."""
    cpp = _elementwise_kernel(impl, x, t, weight, keep)
    if cpp is not None:
        return cpp._bce(0 if logits else 1, x, t, *_cycled_pos_weight(x, pos_weight), False, scale, want_grad)
    forward = impl.bce_with_logits_forward if logits else impl.bce_forward
    total, grad = forward(x, t, weight, pos_weight, keep, True, scale if impl.prescale else None)
    if want_grad and scale is not None and not impl.prescale:
        grad = grad * scale
    return total, grad if want_grad else None


def elementwise_grad(impl, logits: bool, x, t, weight, pos_weight, keep, scale) -> torch.Tensor:
    """The gradient (times ``scale``) of :func:`elementwise_sum`, for a backward pass: the C
    kernel evaluates no loss for it."""
    cpp = _elementwise_kernel(impl, x, t, weight, keep)
    if cpp is not None:
        return cpp._bce_grad(0 if logits else 1, x, t, *_cycled_pos_weight(x, pos_weight), scale)
    return elementwise_sum(impl, logits, x, t, weight, pos_weight, keep, True, scale)[1]


class _FusedElementwise(torch.autograd.Function):
    """Shared autograd shell of the fused BCE ops.

    forward(kind, sum_only, x, t, weight, pos_weight, keep) computes the loss (per element,
    or its sum when ``sum_only``) and keeps the gradient on ``ctx``. The first backward
    scales that buffer in place by ``grad_output`` (or returns it as is when it was
    pre-scaled by exactly that value) and hands it on (no new buffer). A second backward
    (``retain_graph=True``) recomputes it with the same kernel: bit-for-bit the same
    result (reentrant). ``create_graph`` and gradients w.r.t. target / weight /
    pos_weight are computed from the saved inputs by the reference formulas.
    """

    @staticmethod
    def forward(ctx, impl, kind, opts, x, t, weight, pos_weight, keep):
        sum_only, scale = opts
        if not impl.prescale:
            scale = None
        forward = impl.bce_with_logits_forward if kind == "logits" else impl.bce_forward
        loss, grad = forward(x, t, weight, pos_weight, keep, sum_only, scale)
        ctx.kind, ctx.sum_only, ctx.grad, ctx.scale, ctx.forward = kind, sum_only, grad, scale, forward
        ctx.save_for_backward(x, t, weight, pos_weight, keep)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, t, weight, pos_weight, keep = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if torch.is_grad_enabled() or any(ctx.needs_input_grad[4:7]):
            ref = reference.binary_cross_entropy_with_logits if ctx.kind == "logits" else reference.binary_cross_entropy

            def fn(x_, t_, w_, pw_):
                loss = ref(x_, t_, w_, pw_, keep)
                return loss.sum() if ctx.sum_only else loss

            sub = _SubCtx(ctx, (3, 4, 5, 6))
            return (None, None, None) + _reference_grads(sub, fn, (x, t, weight, pos_weight), grad_out) + (None,)

        def recompute(scale):
            # The same kernel on the same inputs: bit-for-bit what forward computed, so a
            # second backward (retain_graph=True) returns exactly what the first did.
            return ctx.forward(x, t, weight, pos_weight, keep, True, scale)[1]

        if ctx.scale is not None and grad_out.numel() == 1 and grad_out.item() == _value(ctx.scale):
            # The gradient was scaled in forward by the grad_output a plain loss.backward()
            # sends (1/N for 'mean', exactly as autograd computes it): nothing left to do.
            return None, None, None, grad if grad is not None else recompute(ctx.scale), None, None, None, None
        if grad is None or ctx.scale is not None:
            # Buffer already handed on, or pre-scaled by another value (loss * 2, a
            # GradScaler): recompute unscaled, then scale.
            grad = recompute(None)
        return None, None, None, grad.mul_(grad_out), None, None, None, None


class _SubCtx:
    """``needs_input_grad`` of selected forward arguments (for :func:`_reference_grads`)."""

    def __init__(self, ctx, positions):
        self.needs_input_grad = tuple(ctx.needs_input_grad[i] for i in positions)


def _reference_grads(ctx, fn, inputs, grad_out):
    """Gradients of ``fn(*inputs)`` (reference formulas) for the inputs that need them.

    Inside a backward, grad mode is on exactly when the caller asked for
    ``create_graph=True``; then the graph is built on the original inputs, so higher
    derivatives flow through the reference formulas.
    """
    create = torch.is_grad_enabled()
    wanted = [i for i, inp in enumerate(inputs) if inp is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        if create:
            leaves = list(inputs)
        else:
            leaves = [inp.detach().requires_grad_() if i in wanted else inp for i, inp in enumerate(inputs)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out, create_graph=create, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


def _elementwise_op(impl, kind, x, t, weight, pos_weight, keep, sum_only, grad_scale=None):
    if not _needs_graph(x, t, weight, pos_weight):
        forward = impl.bce_with_logits_forward if kind == "logits" else impl.bce_forward
        with torch.no_grad():
            return forward(x, t, weight, pos_weight, keep, sum_only)[0]
    return _FusedElementwise.apply(impl, kind, (sum_only, grad_scale), x, t, weight, pos_weight, keep)


# --------------------------------------------------------------------- cross-entropy
def _ce_chunk(x, q, y, c, smooth, want_grad: bool):
    r"""Loss (rows,) and gradient (rows, C) of one chunk of rows: reference._CrossEntropy.

    With m the row max at index k, z = x - m (0 where x == m), e = exp(z) (e_k = 1),
    s = sum_{j != k} e_j: -log p_j = log1p(s) - z_j, p_j = e_j / (1 + s), and the
    gradient A p - a with its arg-max entry evaluated as (A - a_k) - A s / (1 + s) when
    the arg-max dominates (s < 1), else as A p_k - a_k -- the reference's very ops, so
    the two backends agree to the bit on the torch path.
    """
    m, k = x.max(dim=1, keepdim=True)
    z = torch.where(x == m, _zero(x), x - m)
    e = torch.exp(z)
    s = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
    nlp = torch.log1p(s) - z
    if q is not None:  # dense coefficients (probability targets)
        loss = _times(q, nlp).sum(dim=1)
    else:
        yy = y.unsqueeze(1)
        loss = _times(c.unsqueeze(1), nlp.gather(1, yy)).squeeze(1)
        if smooth is not None:
            loss = loss + _times(smooth.expand_as(nlp), nlp).sum(dim=1)
    if not want_grad:
        return loss, None
    a = reference._dense_coef(x, q, y, c, smooth)
    A = a.sum(dim=1, keepdim=True)
    g = A * (e / (1 + s)) - a
    a_rest = a.scatter(1, k, 0.0).sum(dim=1, keepdim=True)  # A - a_k without cancellation
    g_k = torch.where(s < 1, a_rest - A * (s / (1 + s)), g.gather(1, k))
    g.scatter_(1, k, g_k)
    return loss, g


def _ce_forward(
    x, q, y, c, smooth, keep, want_grad: bool, grad_out: Optional[torch.Tensor] = None, scale=None, use_cpp: bool = True
):
    """(loss (M,), grad * scale (M, C) or None). ``grad_out`` may be ``x`` itself (in-place).

    ``x`` may also be (N, C, S) (see :func:`_spatial_ok`): loss (N*S,), grad (N, C, S).
    Ignored rows (``keep`` False) give a zero gradient row whatever their logits hold: the
    compiled kernel skips them (their ``c`` is -0.0), the torch path replaces their logits
    by 0 first (their loss is then 0 too, unless label smoothing adds terms the caller masks).
    """
    spatial = x.dim() == 3  # only when _spatial_ok said so: the compiled lane kernel, no copy
    if spatial:
        M, C = x.shape[0] * x.shape[2], x.shape[1]
        cpp = _cpp()
    else:
        M, C = x.shape
        cpp = _cpp() if use_cpp and q is None and M > 0 and C > 0 and _cpp_ok(x) else None
    if cpp is not None:
        if want_grad and grad_out is None:
            grad_out = torch.empty_like(x)
        y, c = _kernel_targets(x, y, c)
        kernel = cpp.ce_index_ncs if spatial else cpp.ce_index
        loss = kernel(x, y, c, grad_out if want_grad else None, scale, smooth)
        return loss, grad_out
    loss = torch.empty(M, dtype=x.dtype, device=x.device)
    if want_grad and grad_out is None:
        grad_out = torch.empty_like(x)
    for i, j in _chunks(M, _rows_per_chunk(C)):
        sl = slice(i, j)
        xs = x[sl] if keep is None else reference.sanitise_ignored(x[sl], keep[sl])
        lo, g = _ce_chunk(
            xs,
            None if q is None else q[sl],
            None if y is None else y[sl],
            None if c is None else c[sl],
            smooth,
            want_grad,
        )
        loss[sl] = lo
        if want_grad:
            grad_out[sl] = g if scale is None else g * scale
    return loss, grad_out


def _class_bcast(v, grad):
    """Per-position (M,) values broadcast over the class dim of ``grad`` ((M, C) or (N, C, S))."""
    if grad.dim() == 3:
        return v.view(grad.shape[0], 1, grad.shape[2])
    return v.unsqueeze(1)


def _spatial_ok(impl, x, q) -> bool:
    """Can (N, C, S) logits go to the compiled lane kernel as they are (no layout copy)?

    Class-index targets, the CPU kernel table (not chunked-torch, not Triton), float32,
    contiguous, non-empty, kernel built. Everything else is flattened to rows first.
    """
    return impl.spatial and q is None and x.numel() > 0 and _cpp_ok(x) and _cpp() is not None


def _ce_mask(loss, keep, smooth):
    if smooth is not None and keep is not None:
        loss = torch.where(keep, loss, _zero(loss))
    return loss


def fused_ce_forward(impl, x, q, y, c, smooth, keep, scale=None, want_grad=True):
    """Loss (M,) and gradient (shaped like ``x``, times ``scale``; None unless ``want_grad``)
    of per-row cross-entropy with coefficients (q, y, c, smooth) (see
    ``reference.ce_coefficients``), rows with ``keep`` False zeroed when smoothing gives
    them terms. ``x`` (M, C) or (N, C, S) (then (N, C, S) logits the lane kernel cannot
    take are computed as rows and the gradient is returned in the (N, C, S) layout)."""
    if x.dim() == 3 and not _spatial_ok(impl, x, q):
        N, C, S = x.shape
        loss, g = fused_ce_forward(impl, x.movedim(1, -1).reshape(-1, C), q, y, c, smooth, keep, scale, want_grad)
        return loss, None if g is None else g.view(N, S, C).movedim(-1, 1).contiguous()
    loss, grad = impl.ce_forward(x, q, y, c, smooth, keep, want_grad=want_grad, scale=scale)
    if smooth is not None and keep is not None:  # ignored rows still carry smoothing terms
        loss = torch.where(keep, loss, _zero(loss))
        if want_grad:
            grad.masked_fill_(~_class_bcast(keep, grad), 0.0)
    return loss, grad if want_grad else None


def _row_kernel_ok(impl, x, q) -> bool:
    """Does the compiled row kernel (``ce_index``) take these (M, C) rows as they are?"""
    return impl is CPU and x.dim() == 2 and q is None and x.numel() > 0 and _cpp_ok(x) and _cpp() is not None


def fused_ce_forward_stats(impl, x, q, y, c, smooth, keep):
    """:func:`fused_ce_forward` without the gradient, and the per-row statistics (M, 2) that
    :func:`fused_ce_grad` recomputes the gradient from in one pass: each row's (max, s) when
    the compiled row kernel ran, zeros otherwise (then nothing reads them)."""
    if not _row_kernel_ok(impl, x, q):
        loss, _ = fused_ce_forward(impl, x, q, y, c, smooth, keep, want_grad=False)
        return loss, x.new_zeros((loss.shape[0], 2))
    stats = x.new_empty((x.shape[0], 2))
    y, c = _kernel_targets(x, y, c)
    return _cpp().ce_index(x, y, c, None, None, smooth, stats), stats


def fused_ce_grad(impl, x, q, y, c, smooth, keep, stats, scale=None):
    """The gradient (times ``scale``) of the rows that :func:`fused_ce_forward_stats` computed:
    from ``stats`` in one pass over ``x`` on the compiled row kernel (bit for bit what the
    forward would have written), else recomputed with the forward."""
    if not _row_kernel_ok(impl, x, q):
        return fused_ce_forward(impl, x, q, y, c, smooth, keep, scale)[1]
    y, c = _kernel_targets(x, y, c)
    return _cpp().ce_index_grad(x, y, c, stats, scale, smooth)


def _kernel_targets(x, y, c):
    """Targets int64 and coefficients in ``x``'s dtype, contiguous, as the kernels read them."""
    if y.dtype != torch.int64 or not y.is_contiguous():
        y = y.long().contiguous()
    if c is not None and (c.dtype != x.dtype or not c.is_contiguous()):  # None: all 1
        c = c.contiguous().to(x.dtype)
    return y, c


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, scale, x, q, y, c, smooth, keep):
        scale = scale if impl.prescale else None
        loss, grad = fused_ce_forward(impl, x, q, y, c, smooth, keep, scale)
        ctx.grad, ctx.scale, ctx.impl = grad, scale, impl
        ctx.scale_value = None if scale is None else _value(scale)  # read once (CPU: no sync)
        ctx.save_for_backward(x, q, y, c, smooth, keep)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, q, y, c, smooth, keep = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if torch.is_grad_enabled() or any(ctx.needs_input_grad[3:7]):
            if q is None and c is None:  # the all-ones coefficients of _plain_rows
                c = torch.ones(y.shape[0], dtype=x.dtype, device=x.device)  # rows or (N, C, S) positions

            def fn(x_, q_, c_, s_):
                if x_.dim() == 3:  # (N, C, S) logits: the reference takes rows
                    x_ = x_.movedim(1, -1).reshape(-1, x_.shape[1])
                x_ = reference.sanitise_ignored(x_, keep)
                loss = reference._CrossEntropy.apply(x_, q_, y, c_, s_)
                return _ce_mask(loss, keep, s_)

            gx, gq, gc, gs = _reference_grads(_SubCtx(ctx, (2, 3, 5, 6)), fn, (x, q, c, smooth), grad_out)
            return None, None, gx, gq, None, gc, gs, None

        def recompute(scale):
            # Same kernel, same inputs: bit-for-bit what forward computed (reentrant).
            g = ctx.impl.ce_forward(x, q, y, c, smooth, keep, want_grad=True, scale=scale)[1]
            if smooth is not None and keep is not None:
                g.masked_fill_(~_class_bcast(keep, g), 0.0)
            return g

        if ctx.scale is not None and _is_expected(grad_out, ctx.scale_value):  # pre-scaled in forward
            return None, None, grad if grad is not None else recompute(ctx.scale), None, None, None, None, None
        if grad is None or ctx.scale is not None:
            grad = recompute(None)
        return None, None, grad.mul_(_class_bcast(grad_out, grad)), None, None, None, None, None


class _FusedCrossEntropyReduced(torch.autograd.Function):
    """The small-input path (:func:`plain_cross_entropy`) in one autograd node: the per-row
    losses and pre-scaled gradient the compiled kernel already wrote (``loss``, ``grad``),
    their ``sum`` (``rows`` None) or ``mean`` (``sum / rows``) taken here. Values and
    gradients are bit for bit those of the per-row :class:`_FusedCrossEntropy` followed by
    ``sum`` and ``/ rows``: the same reductions run, and backward hands on the pre-scaled
    gradient only when the ``grad_output`` that ``SumBackward`` and ``DivBackward`` would
    pass is exactly the pre-scale (a plain ``backward()`` sends 1: then it is); otherwise
    the per-row Function's backward gets that ``g / rows``, expanded. The inputs keep the
    per-row Function's positions (its backward indexes ``needs_input_grad``)."""

    @staticmethod
    def forward(ctx, impl, scale, x, q, y, c, smooth, keep, rows, loss, grad):
        ctx.grad, ctx.scale, ctx.scale_value, ctx.impl = grad, scale, scale, impl
        ctx.save_for_backward(x, q, y, c, smooth, keep)
        ctx.rows, ctx.M = rows, loss.shape[0]
        total = loss.sum()
        return total if rows is None else total / rows

    @staticmethod
    def backward(ctx, g):
        if ctx.grad is not None and not torch.is_grad_enabled() and g.item() == 1.0:
            grad, ctx.grad = ctx.grad, None  # pre-scaled by 1 / rows (or 1): what g = 1 makes
            return None, None, grad, None, None, None, None, None, None, None, None
        go = (g if ctx.rows is None else g / ctx.rows).expand(ctx.M)
        return _FusedCrossEntropy.backward(ctx, go) + (None, None, None)


def plain_cross_entropy(x: torch.Tensor, y: torch.Tensor, reduction: str, range_rows: int = 0):
    """The reduced loss of the small-input path (the functional layer's ``_plain_call``
    holds: float32 contiguous (M, C) rows, the compiled kernel, int64 (M,) targets, no
    weights, smoothing or class index equal to ``ignore_index``), ``reduction`` 'mean' or
    'sum'. The same values and gradients as the general path.

    Returns None, with nothing computed, when a target is outside [0, C) (an ignored one or
    an error: the general path handles both); else the loss and the (min, max) of the first
    ``range_rows`` rows (None for 0), read by the kernel for the softmax-output check."""
    M = x.shape[0]
    scale = 1.0 if reduction == "sum" else mean_grad_scale(M, x.dtype)
    grad = torch.empty_like(x)
    out = _cpp().ce_index_plain(x, y, grad, scale, range_rows)
    if out is None:
        return None
    loss, sampled_range = out
    rows = None if reduction == "sum" else M
    return _FusedCrossEntropyReduced.apply(CPU, scale, x, None, y, None, None, None, rows, loss, grad), sampled_range


def _value(scale) -> float:
    """A gradient scale as a Python float: fused ops get it as a 0-dim tensor or, when the
    functional layer computed it on the host (``mean_grad_scale``), as a float."""
    return scale if isinstance(scale, float) else scale.item()


def _is_expected(grad_out: torch.Tensor, scale) -> bool:
    """Is every entry of grad_out exactly ``scale`` (what a plain backward() sends)? CPU only.

    ``scale``: a 0-dim tensor or its value as a Python float (read once in forward)."""
    if grad_out.numel() == 0:
        return True
    if grad_out.dim() and grad_out.stride(0) == 0 and grad_out.numel() == grad_out.shape[0]:
        return grad_out[0].item() == _value(scale)  # expanded scalar: one read
    return bool((grad_out == scale).all())


def ce_grad_scale(reduction: str, den: Optional[torch.Tensor], M: int, like: torch.Tensor):
    """The per-row grad_output a plain backward() sends through functional._reduction.

    ``den``: the per-row ``mean`` weights (M,), their 0-dim total, or None (one per row)."""
    if reduction == "mean" and M and den is not None:
        # 1 / total: the same IEEE division autograd's DivBackward does (grad 1 / den)
        return torch.reciprocal(den if den.dim() == 0 else den.sum())
    one = torch.ones((), dtype=like.dtype, device=like.device)
    if reduction == "sum":
        return one
    if reduction == "mean" and M:
        return one / M
    return None


def _plain_rows(impl, x, target, index_target, weight, keep, label_smoothing, reduction) -> bool:
    """The small-input fast path of the compiled kernel: class indices without weights or
    smoothing, none of them ignore_index, float32 rows, gradient wanted with a known
    reduction. Then ``reference.ce_coefficients`` would give every row coefficient 1 and
    ``mean`` denominator 1 (den None), so the kernel is called with ``c`` NULL and the
    'mean' scale is ``1/M`` computed on the host (``mean_grad_scale``): the general path's
    where, cast, sum, reciprocal and scale read are skipped, ``keep.all()`` is added (net
    four torch calls fewer; about a tenth of a 64 x 10 forward + backward, measured).
    Batches with ignored targets pay that ``all()`` and take the general path.
    (N, C, S) logits the lane kernel takes (:func:`_spatial_ok`) qualify too, M = N * S.
    """
    M = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2] if x.dim() == 3 else 0
    return (
        impl is CPU
        and reduction in ("mean", "sum")
        and index_target
        and weight is None
        and not label_smoothing
        and keep is not None
        and 0 < M <= (1 << 24)
        and x.shape[1] > 0
        and _needs_graph(x)
        and _cpp_ok(x)
        and target.dtype == torch.int64
        and target.is_contiguous()
        and _cpp() is not None
        and (x.dim() == 2 or _spatial_ok(impl, x, None))
        and bool(keep.all())
    )


def _cross_entropy(impl, x, target, index_target, weight, keep, label_smoothing, reduction=None):
    if _plain_rows(impl, x, target, index_target, weight, keep, label_smoothing, reduction):
        scale = 1.0 if reduction == "sum" else mean_grad_scale(target.shape[0], x.dtype)
        return _FusedCrossEntropy.apply(impl, scale, x, None, target, None, None, None), None
    q, y, c, smooth, den = reference.ce_coefficients(x, target, index_target, weight, keep, label_smoothing)
    if x.dim() == 3 and not _spatial_ok(impl, x, q):
        # (N, C, S) logits the lane kernel cannot take: rows of C classes (a copy, unless
        # the input is channels-last), the layout every other backend receives.
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    if not _needs_graph(x, q, c, smooth):
        with torch.no_grad():
            loss, _ = impl.ce_forward(x, q, y, c, smooth, keep, want_grad=False)
            return _ce_mask(loss, keep, smooth), den
    scale = None
    if impl.prescale and reduction:
        if den is not None and reduction == "mean":
            den = den.sum()  # summed once: the scale and the functional layer's denominator
        M = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2]  # rows, or (N, C, S) positions
        scale = ce_grad_scale(reduction, den, M, x)
    return _FusedCrossEntropy.apply(impl, scale, x, q, y, c, smooth, keep), den


# ---------------------------------------------------------- in-place cross-entropy
class _WriteGradient(torch.autograd.Function):
    """Step 1 of the in-place cross-entropy: overwrite the logits ``x`` with d loss_i / d x_i.

    ``ctx.mark_dirty(x)`` bumps the version counter of the logits, so anything that saved
    them for its own backward fails with autograd's "modified by an inplace operation"
    error instead of computing with the gradient. Returns ``x`` (now holding the gradient);
    the losses go to ``holder``. Backward passes the incoming gradient through: the
    gradient w.r.t. the logits is what :class:`_LossFromGradient` hands back.
    Two Functions, because autograd allows a Function that modifies a view in place to
    return only that one tensor.
    """

    @staticmethod
    def forward(ctx, impl, buf, y, c, smooth, keep, holder):
        x = buf.view(y.shape[0], -1)  # buf is x or the identical-layout tensor x views
        scale = holder.pop() if impl.prescale else None
        holder.clear()
        loss, _ = impl.ce_forward(x, None, y, c, smooth, keep, want_grad=True, grad_out=x, scale=scale)
        holder.append(scale)
        if smooth is not None and keep is not None:
            loss = torch.where(keep, loss, _zero(loss))
            x.masked_fill_(~keep.unsqueeze(1), 0.0)
        holder.append(loss)
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x):
        return None, grad_x, None, None, None, None, None


class _LossFromGradient(torch.autograd.Function):
    """Step 2: the losses, whose backward scales the gradient buffer in place (once)."""

    @staticmethod
    def forward(ctx, g, holder):
        ctx.save_for_backward(g)
        ctx.used = False
        ctx.scale = holder[0]
        return holder[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError(
                "cross_entropy: expected one backward pass through an inplace_backward=True loss, but got a "
                "second one (retain_graph=True). The gradient lives in the logits buffer and was already "
                "consumed; use inplace_backward=False to backpropagate more than once."
            )
        ctx.used = True
        (g,) = ctx.saved_tensors
        if ctx.scale is not None:
            if _is_expected(grad_out, ctx.scale):  # pre-scaled in forward
                return g, None
            # The logits are gone, so no recomputation: rescale (relative error ~2 ulp).
            grad_out = grad_out / ctx.scale
        g.view(grad_out.shape[0], -1).mul_(grad_out.unsqueeze(1))
        return g, None


def _cross_entropy_inplace(impl, x, target, index_target, weight, keep, label_smoothing, reduction=None):
    """Cross-entropy whose gradient is written into the logits buffer ``x``.

    For LM heads whose logits are dead after the loss: no second (M, C) buffer. Only for
    class-index targets and when the logits need a gradient; without autograd (e.g. under
    ``torch.no_grad()``) the logits are left untouched and this is the normal path.
    """
    func = "cross_entropy"
    if not index_target:
        fail(
            func,
            "class-index targets with inplace_backward=True",
            "class-probability targets",
            "Use inplace_backward=False for probability targets.",
        )
    q, y, c, smooth, den = reference.ce_coefficients(x, target, index_target, weight, keep, label_smoothing)
    if not _needs_graph(x):
        return _cross_entropy(impl, x, target, index_target, weight, keep, label_smoothing, reduction)
    root = x if x._base is None else x._base
    if root.is_leaf and root.requires_grad:
        fail(
            func,
            "logits computed by the graph (e.g. the output of a Linear) with inplace_backward=True",
            "a leaf tensor that requires grad",
            "Its buffer cannot hold the gradient; use inplace_backward=False.",
        )
    if _needs_graph(c, smooth):
        fail(
            func,
            "a weight that does not require grad with inplace_backward=True",
            "one that does",
            "Use inplace_backward=False to differentiate w.r.t. the class weights.",
        )
    # Work on the tensor x is a view of when it has x's exact layout (x = logits.reshape(-1, C)
    # of contiguous logits): marking a *view* dirty makes autograd route the gradient through
    # CopySlices, which clones it -- the (N, C) buffer this mode exists to avoid.
    buf = x
    base = x._base
    if (
        base is not None
        and x.is_contiguous()
        and base.is_contiguous()
        and base.numel() == x.numel()
        and base.storage_offset() == x.storage_offset()
        and base.dtype == x.dtype
    ):
        buf = base
    holder: list = [ce_grad_scale(reduction, den, x.shape[0], x) if reduction else None]
    g = _WriteGradient.apply(impl, buf, y, c, smooth, keep, holder)
    return _LossFromGradient.apply(g, holder), den


# ------------------------------------------------------------------ the op table
class Kernels:
    """The three forward kernels a fused backend provides (see :func:`make_ops`).

    ``bce_with_logits_forward(x, t, weight, pos_weight, keep, sum_only) -> (loss or its sum, grad)``,
    ``bce_forward`` likewise, ``ce_forward(x, q, y, c, smooth, keep, want_grad, grad_out=None)
    -> (loss (M,), grad (M, C) or None)`` where ``grad_out`` may be ``x`` (in-place).
    """

    def __init__(self, bce_with_logits_forward, bce_forward, ce_forward, prescale: bool = False, spatial: bool = False):
        self.bce_with_logits_forward = bce_with_logits_forward
        self.bce_forward = bce_forward
        self.ce_forward = ce_forward
        # prescale: the BCE forwards honour ``scale`` (multiply the gradient in the same
        # pass), and reading grad_output with .item() in backward costs no device sync.
        self.prescale = prescale
        # spatial: ce_forward also takes (N, C, S) logits with class-index targets when
        # _spatial_ok (the compiled lane kernel); other impls always get rows.
        self.spatial = spatial


def make_ops(impl: Kernels) -> dict:
    """The backend ops (same contracts as :mod:`~crossent.backends.reference`) for ``impl``."""

    def binary_cross_entropy_with_logits(x, t, weight, pos_weight, keep, *, sum_only: bool = False, grad_scale=None):
        """Per-element BCE-with-logits, fused loss + gradient.

        ``sum_only=True`` returns the 0-dim sum instead (the functional layer asks for it
        when the reduction is not 'none'), so the only full-size buffer written is the
        gradient. ``grad_scale`` (a 0-dim tensor or a float, e.g. ``1/N`` for 'mean') is the
        grad_output that a plain ``backward()`` will send: the gradient is multiplied by it
        in the same pass, and backward has nothing left to do when it arrives (any other
        grad_output is still handled exactly).
        """
        return _elementwise_op(impl, "logits", x, t, weight, pos_weight, keep, sum_only, grad_scale)

    def binary_cross_entropy(p, t, weight, pos_weight, keep, *, sum_only: bool = False, grad_scale=None):
        """Per-element BCE on probabilities, fused loss + gradient (options as above)."""
        return _elementwise_op(impl, "probs", p, t, weight, pos_weight, keep, sum_only, grad_scale)

    def cross_entropy(x, target, index_target, weight, keep, label_smoothing, *, reduction=None):
        """Per-row cross-entropy (contract of ``reference.cross_entropy``), fused.

        ``reduction`` (optional) tells which grad_output a plain ``backward()`` will send
        (see :func:`ce_grad_scale`): the gradient is pre-scaled by it in the same pass.
        """
        return _cross_entropy(impl, x, target, index_target, weight, keep, label_smoothing, reduction)

    def cross_entropy_inplace(x, target, index_target, weight, keep, label_smoothing, *, reduction=None):
        """Cross-entropy whose gradient is written into the logits buffer (see
        ``crossent.functional.cross_entropy(inplace_backward=True)``)."""
        return _cross_entropy_inplace(impl, x, target, index_target, weight, keep, label_smoothing, reduction)

    # What these ops accept beyond the reference contract (reduction=, (N, C, S) logits,
    # sum_only=) is declared with their registration: ``FUSED`` in ``crossent.backends``.
    return {
        "binary_cross_entropy": binary_cross_entropy,
        "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits,
        "cross_entropy": cross_entropy,
        "cross_entropy_inplace": cross_entropy_inplace,
    }


CPU = Kernels(_bce_with_logits_forward, _bce_forward, _ce_forward, prescale=True, spatial=True)
OPS = make_ops(CPU)
binary_cross_entropy = OPS["binary_cross_entropy"]
binary_cross_entropy_with_logits = OPS["binary_cross_entropy_with_logits"]
cross_entropy = OPS["cross_entropy"]
cross_entropy_inplace = OPS["cross_entropy_inplace"]


def _bce_with_logits_forward_torch(x, t, weight, pos_weight, keep, sum_only=False, scale=None):
    return _bce_with_logits_forward(x, t, weight, pos_weight, keep, sum_only, scale, use_cpp=False)


def _bce_forward_torch(p, t, weight, pos_weight, keep, sum_only=False, scale=None):
    return _bce_forward(p, t, weight, pos_weight, keep, sum_only, scale, use_cpp=False)


def _ce_forward_torch(x, q, y, c, smooth, keep, want_grad: bool, grad_out=None, scale=None):
    return _ce_forward(x, q, y, c, smooth, keep, want_grad, grad_out, scale, use_cpp=False)


# Backend "chunked-torch": the same fused autograd with the compiled kernel never used
# (the chunked torch-ops fallback), selectable by name, e.g. CROSSENT_BACKEND=chunked-torch.
CPU_TORCH = Kernels(_bce_with_logits_forward_torch, _bce_forward_torch, _ce_forward_torch, prescale=True)
TORCH_OPS = make_ops(CPU_TORCH)
