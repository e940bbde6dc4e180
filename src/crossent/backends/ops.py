r"""crossent's fused kernels as registered PyTorch ops (namespace ``crossent``).

Used whenever a loss call is captured (:mod:`crossent._capture`): ``torch.compile``,
``torch.export``, ``torch.jit.trace``, fake tensors, CUDA-graph capture. The ops run the
kernels of :mod:`crossent.backends.chunked` (the compiled C kernel on CPU) or of the
Triton backend (CUDA); each has a fake implementation (shapes only), so tracers never run
a kernel on fake data, and an autograd formula (``register_autograd``).

``crossent::bce_fused(x, t, weight, pos_weight, keep, logits, backend) -> (loss, grad)``
    Per-element BCE-with-logits (``logits=True``) or BCE on probabilities and its
    gradient, in one elementwise pass; ``weight`` and ``pos_weight`` broadcast to ``x``;
    ``keep`` (bool, shape of ``x``) False drops an element. Backward: the saved gradient
    times ``grad_output``. Batching rule (``register_vmap``): the batch dim is folded in.
``crossent::bce_fused_sum(x, t, weight, pos_weight, keep, logits, backend) -> total``
    The 0-dim sum of the same losses, for ``mean`` and ``sum``: no per-element loss and no
    gradient are written; its backward ``crossent::bce_fused_sum_backward(grad_total, ...)``
    recomputes the gradient with ``grad_total`` applied in the C kernel.
``crossent::cross_entropy_rows(x, q, y, c, smooth, keep, backend) -> (loss, stats)``
    Per-row cross-entropy of ``x`` (M, C) or (N, C, S) with the coefficients of
    ``reference.ce_coefficients``: dense ``q`` (M, C), or class indices ``y`` (M,) with row
    coefficients ``c`` (M,) and class smoothing terms ``smooth`` (C,). The forward writes
    no gradient; ``stats`` (M, 2) holds each row's max and ``s = sum_{j != k} e_j`` on the
    compiled row kernel (zeros elsewhere). Its backward is
``crossent::cross_entropy_rows_backward(grad_loss, x, q, y, c, smooth, keep, stats, backend) -> grad``
    The gradient from the saved logits, times ``grad_loss`` (per row): on the C row kernel
    one pass over the logits using ``stats`` (elsewhere recomputed with the forward), with
    a uniform ``grad_loss`` (what ``mean`` and ``sum`` send) applied inside the kernel, so
    a captured step holds no (M, C) gradient between forward and backward (the layout
    Inductor gives torch's own cross-entropy).

``crossent::binary_focal_fused`` and ``crossent::softmax_focal_fused`` (focal and Poly-1
losses) are registered the same way in :mod:`crossent.backends.focal`.

``crossent::lm_head_forward(x, W, b, y, keep, sigma, temperature, softcap, rows, backend) -> (nll, sm, lse, ent, correct, m, lp1, BA)``
    Per-row LM-head statistics of softcapped, tempered logits (:mod:`.lm_head`), ``x``
    logits (N, C) or hidden states (N, H) of ``W`` (C, H); its backward is the op
    ``crossent::lm_head_backward`` (recomputes each row block's logits).
``crossent::lm_head_loss_fused(...) -> (total, lse, correct, grad_x, grad_W, grad_b)``
    A summed LM-head loss with its gradients from the same pass (below).

Under ``torch.compile`` on CPU, Inductor compiles ``cross_entropy_rows`` and its backward
from the same formulas in aten ops (:mod:`.inductor`, registered as decompositions), which
it fuses into vectorised loops; every other capture keeps the ops.

``backend`` names the kernels (``chunked``: the C kernel where it applies, ``chunked-torch``:
the same formulas in torch ops on any device, ``triton``: CUDA); the choice is made before
the op (:func:`crossent.backends.resolve`), a constant of the captured graph.

Gradients w.r.t. targets, weights or smoothing coefficients, and higher derivatives, are
not what these ops are for: the Python entry points below send such calls (and every call
under ``torch.func`` transforms, and ``backend='reference'``) to the plain-torch reference
formulas, which the tracer captures op by op.

An op whose outputs change meaning or shape gets a new name, never a new body under the
old one: Inductor's on-disk cache keys a compiled graph by the op names and schemas in it,
not by the fake implementations, so a warm cache from an older crossent would hand the old
output shapes to the new op (``assert_size_stride`` fails in the cached code).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _capture
from . import chunked, inductor, linear, reference
from . import lm_head as _lm_head  # ``lm_head`` names this module's entry point below


def _kernels(backend: str, device: torch.device):
    """The forward-kernel table (``chunked.Kernels``) computing an op for ``backend``."""
    if backend == "triton" and device.type == "cuda":
        from .triton import KERNELS

        return KERNELS
    if backend == "chunked" and device.type == "cpu":
        return chunked.CPU
    return chunked.CPU_TORCH  # the same formulas in torch ops: any device


def _rows_of(x: Tensor) -> int:
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2]


# ------------------------------------------------------------------------- BCE
@torch.library.custom_op("crossent::bce_fused", mutates_args=())
def bce_fused(
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    logits: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    impl = _kernels(backend, x.device)
    forward = impl.bce_with_logits_forward if logits else impl.bce_forward
    loss, grad = forward(x, t, weight, pos_weight, keep, False, None)
    return loss.contiguous(), grad.contiguous()


@bce_fused.register_fake
def _(x, t, weight, pos_weight, keep, logits, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _save_grad(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _bce_backward(ctx, g_loss, g_grad):
    (grad,) = ctx.saved_tensors
    return grad * g_loss, None, None, None, None, None, None


bce_fused.register_autograd(_bce_backward, setup_context=_save_grad)


@bce_fused.register_vmap
def _(info, in_dims, x, t, weight, pos_weight, keep, logits, backend):
    # Elementwise: move every batched operand's batch dim to the front, broadcast the rest.
    B = info.batch_size

    def front(v, d):
        if v is None:
            return None
        return v.movedim(d, 0) if d is not None else v.expand(B, *v.shape)

    xs = front(x, in_dims[0])
    args = [front(v, d) for v, d in zip((t, weight, pos_weight, keep), in_dims[1:5])]
    args = [None if v is None else v.expand(xs.shape) for v in args]
    return bce_fused(xs.contiguous(), *[None if v is None else v.contiguous() for v in args], logits, backend), (0, 0)


@torch.library.custom_op("crossent::bce_fused_sum", mutates_args=())
def bce_fused_sum(
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    logits: bool,
    backend: str,
) -> Tensor:
    impl = _kernels(backend, x.device)
    total, _ = chunked.elementwise_sum(impl, logits, x, t, weight, pos_weight, keep, want_grad=False)
    return total.reshape(()).clone()


@bce_fused_sum.register_fake
def _(x, t, weight, pos_weight, keep, logits, backend):
    return x.new_empty(())


@torch.library.custom_op("crossent::bce_fused_sum_backward", mutates_args=())
def bce_fused_sum_backward(
    grad_total: Tensor,
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    logits: bool,
    backend: str,
) -> Tensor:
    impl = _kernels(backend, x.device)
    g = grad_total.to(x.dtype)
    if impl.prescale and g.device.type == "cpu":  # host memory: reading it is no device sync
        return chunked.elementwise_grad(impl, logits, x, t, weight, pos_weight, keep, float(g))
    return chunked.elementwise_grad(impl, logits, x, t, weight, pos_weight, keep, None).mul_(g)


@bce_fused_sum_backward.register_fake
def _(grad_total, x, t, weight, pos_weight, keep, logits, backend):
    return x.new_empty(x.shape)


def _bce_sum_setup(ctx, inputs, output):
    ctx.logits, ctx.backend = inputs[5], inputs[6]
    ctx.save_for_backward(*inputs[:5])


def _bce_sum_backward(ctx, g_total):
    x, t, weight, pos_weight, keep = ctx.saved_tensors
    grad = bce_fused_sum_backward(g_total, x, t, weight, pos_weight, keep, ctx.logits, ctx.backend)
    return grad, None, None, None, None, None, None


bce_fused_sum.register_autograd(_bce_sum_backward, setup_context=_bce_sum_setup)


# ------------------------------------------------------------------ cross-entropy
@torch.library.custom_op("crossent::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(
    x: Tensor,
    q: Optional[Tensor],
    y: Optional[Tensor],
    c: Optional[Tensor],
    smooth: Optional[Tensor],
    keep: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    impl = _kernels(backend, x.device)
    loss, stats = chunked.fused_ce_forward_stats(impl, x, q, y, c, smooth, keep)
    return loss.contiguous(), stats


@cross_entropy_rows.register_fake
def _(x, q, y, c, smooth, keep, backend):
    inductor.ensure_registered()  # Dynamo's first trace of the op, before Inductor compiles it
    return x.new_empty((_rows_of(x),)), x.new_empty((_rows_of(x), 2))


@torch.library.custom_op("crossent::cross_entropy_rows_backward", mutates_args=())
def cross_entropy_rows_backward(
    grad_loss: Tensor,
    x: Tensor,
    q: Optional[Tensor],
    y: Optional[Tensor],
    c: Optional[Tensor],
    smooth: Optional[Tensor],
    keep: Optional[Tensor],
    stats: Tensor,
    backend: str,
) -> Tensor:
    impl = _kernels(backend, x.device)
    g = grad_loss.to(x.dtype)
    scale = None
    if impl.prescale and g.device.type == "cpu" and g.numel():
        first = g.reshape(-1)[0]
        if bool((g == first).all()):  # host memory: reading it is no device sync
            scale = float(first)
    grad = chunked.fused_ce_grad(impl, x, q, y, c, smooth, keep, stats, scale)
    if scale is None:
        grad.mul_(chunked._class_bcast(g.reshape(-1), grad))
    return grad.contiguous()


@cross_entropy_rows_backward.register_fake
def _(grad_loss, x, q, y, c, smooth, keep, stats, backend):
    return x.new_empty(x.shape)


def _ce_setup(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:-1], output[1])


def _ce_backward(ctx, g_loss, _g_stats):
    x, q, y, c, smooth, keep, stats = ctx.saved_tensors
    grad = cross_entropy_rows_backward(g_loss.contiguous(), x, q, y, c, smooth, keep, stats, ctx.backend)
    return grad, None, None, None, None, None, None


cross_entropy_rows.register_autograd(_ce_backward, setup_context=_ce_setup)


# --------------------------------------------------------------- entry points
def _wants_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def binary_cross_entropy(x, t, weight, pos_weight, keep, *, logits: bool, backend: str, total: bool = False) -> Tensor:
    """Per-element BCE (``logits``) or BCE on probabilities of a captured call (canonical
    arguments as in :mod:`.reference`), or with ``total`` (a ``mean`` / ``sum``) their 0-dim
    sum: then the op writes no per-element loss and no gradient, and its backward
    recomputes the gradient with the incoming scale applied in the kernel."""
    if backend == "reference" or _capture.transforming() or _wants_graph(t, weight, pos_weight):
        ref = reference.binary_cross_entropy_with_logits if logits else reference.binary_cross_entropy
        loss = ref(x, t, weight, pos_weight, keep)
        return loss.sum() if total else loss
    x, t = x.contiguous(), t.expand(x.shape).contiguous()
    keep = None if keep is None else keep.expand(x.shape).contiguous()
    if total:
        return bce_fused_sum(x, t, weight, pos_weight, keep, logits, backend)
    return bce_fused(x, t, weight, pos_weight, keep, logits, backend)[0]


def cross_entropy(
    x, target, index_target: bool, weight, keep, label_smoothing: float, *, backend: str
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row cross-entropy of a captured call: ``(loss, per-row mean weights or None)``.

    ``x``: rows (M, C), or (N, C, S) for class-index targets (then ``target`` is (N*S,))."""
    if (
        backend == "reference"
        or _capture.transforming()
        or _wants_graph(weight)
        or (not index_target and _wants_graph(target))
    ):
        if x.dim() == 3:
            x = x.movedim(1, -1).reshape(-1, x.shape[1])
        return reference.cross_entropy(x, target, index_target, weight, keep, label_smoothing)
    q, y, c, smooth, den = reference.ce_coefficients(x, target, index_target, weight, keep, label_smoothing)
    if y is not None:
        y = y.contiguous()
    # keep is passed also without smoothing: c = 0 alone would leave NaN logits of an
    # ignored row to the torch and Triton paths (the C kernel skips rows with c = -0.0)
    return cross_entropy_rows(x.contiguous(), q, y, c, smooth, keep, backend)[0], den


# ------------------------------------------------------------ fused linear + CE
@torch.library.custom_op("crossent::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    x: Tensor,
    W: Tensor,
    b: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    keep: Optional[Tensor],
    index: bool,
    eps: float,
    rows: Optional[int],
    classes: Optional[int],
    budget: Optional[int],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(total, lse, grad_x, grad_W, grad_b)`` of ``sum(loss)`` for the fused linear + CE:
    ``x`` (N, H), ``W`` (D, C, H), ``b`` (D, C) or None, ``target`` (N, D) class indices or
    (N, C, D) probabilities (see ``linear.ce_targets``); ``grad_b`` is empty without a bias."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    D, C, H = W.shape
    tgts, _ = linear.ce_targets(target, index, weight, keep, eps, C, cdt)
    plan = linear.plan_chunks(
        x.shape[0],
        C,
        H,
        x.dtype,
        budget=budget,
        rows=rows,
        classes=classes,
        buffers=linear.BUFFERS_INDEX if index else linear.BUFFERS_DENSE,
    )
    if backend == "chunked" and x.device.type == "cpu":
        plan = linear.dataclasses.replace(plan, blocks=linear.CPU_KERNEL_BLOCKS)
    needs = (True, True, b is not None)
    loss, lse, _, (gx, gW, gb) = linear.ce_forward_with_grads(
        x, W, b, tgts, plan, needs, torch.ones((), dtype=cdt, device=x.device)
    )
    total = loss.sum()
    return (
        total,
        lse.contiguous(),
        gx.contiguous(),
        gW.contiguous(),
        gb.contiguous() if gb is not None else x.new_empty((0,)),
    )


@linear_cross_entropy_fused.register_fake
def _(x, W, b, target, weight, keep, index, eps, rows, classes, budget, backend):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, D = x.shape[0], W.shape[0]
    return (
        x.new_empty((), dtype=cdt),
        x.new_empty((N, D), dtype=cdt),
        x.new_empty(x.shape),
        W.new_empty(W.shape),
        b.new_empty(b.shape) if b is not None else x.new_empty((0,)),
    )


def _scaled(grads, g: Tensor):
    """Gradients a fused op computed in its forward, times the incoming scalar ``g``, in place
    (they are the op's own buffers, handed out once): a weight-sized gradient is never
    copied, which would undo the memory the fused linear ops save. Left as they are when
    ``g`` is exactly 1 (a plain ``backward()`` of a ``sum``; read on the host only on an
    eager CPU call); out of place while traced."""
    if _capture.capturing(g):  # traced: out of place (the compiler plans the buffers)
        return tuple(t * g.to(t.dtype) for t in grads)
    if g.device.type == "cpu" and g.item() == 1.0:
        return grads
    return tuple(t.mul_(g.to(t.dtype)) for t in grads)


def _linear_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.set_materialize_grads(False)  # no zeros of the weight's size for the unused gradient outputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*output[2:])


def _linear_backward(ctx, g_total, g_lse, g_gx, g_gW, g_gb):
    if g_total is None:  # no gradient reached the total (grads are not materialised)
        return (None,) * 12
    gx, gW, gb = ctx.saved_tensors
    g = g_total.to(gx.dtype)
    return (
        gx * g,
        gW * g.to(gW.dtype),
        gb * g.to(gb.dtype) if ctx.has_bias else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


linear_cross_entropy_fused.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_cross_entropy(x, W, b, t, index, weight, keep, eps, block_args, *, backend):
    """A captured fused linear + CE whose reduction is 'mean' or 'sum': ``(total, lse)``;
    the caller divides ``total`` by the ``mean`` denominator. ``block_args``: (rows,
    classes, budget) for ``linear.plan_chunks``, each None for the default."""
    total, lse, _, _, _ = linear_cross_entropy_fused(
        x.contiguous(), W, b, t, weight, keep, index, float(eps), *block_args, backend
    )
    return total, lse


# --------------------------------------------------------------- LM-head statistics
@torch.library.custom_op("crossent::lm_head_forward", mutates_args=())
def lm_head_forward(
    x: Tensor,
    W: Optional[Tensor],
    b: Optional[Tensor],
    y: Tensor,
    keep: Tensor,
    sigma: Optional[Tensor],
    temperature: float,
    softcap: float,
    rows: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(nll, sm, lse, ent, correct)`` of :mod:`.lm_head` plus the saved
    ``(m, log1p(S'), B/(1+S'))``: ``x`` logits (N, C) (``W`` None) or hidden states (N, H)
    of ``W`` (C, H); row blocks of ``rows`` rows; ``softcap`` 0 means none; ``backend``
    ``chunked`` runs the blocks in the compiled C kernel where it applies."""
    (nll, sm, lse, ent, correct), (m, lp1, _, BA) = _lm_head.forward_rows(
        x, W, b, y, keep, sigma, temperature, softcap, rows, backend
    )
    return nll, sm, lse, ent, correct, m, lp1, BA


@lm_head_forward.register_fake
def _(x, W, b, y, keep, sigma, temperature, softcap, rows, backend):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[0]
    f = [x.new_empty((N,), dtype=cdt) for _ in range(7)]
    return f[0], f[1], f[2], f[3], x.new_empty((N,), dtype=torch.bool), f[4], f[5], f[6]


@torch.library.custom_op("crossent::lm_head_backward", mutates_args=())
def lm_head_backward(
    x: Tensor,
    W: Optional[Tensor],
    b: Optional[Tensor],
    y: Tensor,
    keep: Tensor,
    sigma: Optional[Tensor],
    temperature: float,
    softcap: float,
    rows: int,
    backend: str,
    m: Tensor,
    lp1: Tensor,
    nll: Tensor,
    BA: Tensor,
    g_nll: Optional[Tensor],
    g_sm: Optional[Tensor],
    g_lse: Optional[Tensor],
    g_ent: Optional[Tensor],
    need_x: bool,
    need_W: bool,
    need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_W, grad_b)`` of ``crossent::lm_head_forward`` (empty where not needed)."""
    saved, grads = (m, lp1, nll, BA), (g_nll, g_sm, g_lse, g_ent)
    return _lm_head.backward_rows(
        x, W, b, y, keep, sigma, temperature, softcap, rows, backend, saved, grads, (need_x, need_W, need_b)
    )


@lm_head_backward.register_fake
def _(x, W, b, *rest):
    need_x, need_W, need_b = rest[-3:]
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        W.new_empty(W.shape) if (need_W and W is not None) else x.new_empty((0,)),
        b.new_empty(b.shape) if (need_b and b is not None) else x.new_empty((0,)),
    )


def _lm_head_setup(ctx, inputs, output):
    x, W, b, y, keep, sigma, temperature, softcap, rows, backend = inputs
    ctx.mark_non_differentiable(*output[4:])
    ctx.args = (temperature, softcap, rows, backend)
    ctx.needs = (x.requires_grad, W is not None and W.requires_grad, b is not None and b.requires_grad)
    ctx.has = (W is not None, b is not None, sigma is not None)
    ctx.save_for_backward(x, W, b, y, keep, sigma, output[5], output[6], output[0], output[7])


def _lm_head_backward(ctx, g_nll, g_sm, g_lse, g_ent, *_):
    x, W, b, y, keep, sigma, m, lp1, nll, BA = ctx.saved_tensors
    need_x, need_W, need_b = ctx.needs
    gx, gW, gb = lm_head_backward(
        x, W, b, y, keep, sigma, *ctx.args, m, lp1, nll, BA, g_nll, g_sm, g_lse, g_ent, need_x, need_W, need_b
    )
    return (gx if need_x else None, gW if need_W else None, gb if need_b else None) + (None,) * 7


lm_head_forward.register_autograd(_lm_head_backward, setup_context=_lm_head_setup)


def lm_head(x, W, b, y, keep, sigma, temperature: float, softcap: float, rows: int, backend: str):
    """``(nll, sm, lse, ent, correct)`` per row through ``crossent::lm_head_forward``."""
    out = lm_head_forward(
        x.contiguous(), W, b, y.contiguous(), keep.contiguous(), sigma, temperature, softcap, rows, backend
    )
    return out[:5]


@torch.library.custom_op("crossent::lm_head_loss_fused", mutates_args=())
def lm_head_loss_fused(
    x: Tensor,
    W: Optional[Tensor],
    b: Optional[Tensor],
    y: Tensor,
    keep: Tensor,
    sigma: Optional[Tensor],
    c_nll: Tensor,
    c_sm: Tensor,
    c_z: Tensor,
    temperature: float,
    softcap: float,
    rows: int,
    need_x: bool,
    need_W: bool,
    need_b: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(total, lse, correct, grad_x, grad_W, grad_b)`` of the summed LM-head loss
    ``sum_i c_nll_i nll_i + c_sm_i sm_i + c_z_i lse_i^2`` (:func:`.lm_head.loss_rows`): the
    gradients are computed in the forward pass and scaled by the incoming gradient."""
    return _lm_head.loss_rows(
        x,
        W,
        b,
        y,
        keep,
        sigma,
        c_nll,
        c_sm,
        c_z,
        temperature,
        softcap,
        rows,
        need_x,
        need_W,
        need_b,
        backend,
    )


@lm_head_loss_fused.register_fake
def _(x, W, b, y, keep, sigma, c_nll, c_sm, c_z, temperature, softcap, rows, need_x, need_W, need_b, backend):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    N = x.shape[0]
    return (
        x.new_empty((), dtype=cdt),
        x.new_empty((N,), dtype=cdt),
        x.new_empty((N,), dtype=torch.bool),
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        W.new_empty(W.shape) if (need_W and W is not None) else x.new_empty((0,)),
        b.new_empty(b.shape) if (need_b and b is not None) else x.new_empty((0,)),
    )


def _lm_loss_setup(ctx, inputs, output):
    # The gradients of the forward are kept on ctx (not saved tensors: the first backward
    # scales them in place and hands them out); a second backward through the same graph
    # (retain_graph=True, gradcheck, jacobians) recomputes them from the saved inputs.
    ctx.set_materialize_grads(False)  # no zeros of the weight's size for the unused gradient outputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.grads = output[3:]
    ctx.save_for_backward(*(t for t in inputs[:9]))
    ctx.options = inputs[9:]


def _lm_loss_backward(ctx, g_total, *_):
    if g_total is None:  # no gradient reached the total (only its non-differentiable outputs were used)
        return (None,) * 16
    if ctx.grads is not None:
        grads, ctx.grads = ctx.grads, None
    else:
        grads = _lm_head.loss_rows(*ctx.saved_tensors, *ctx.options)[3:]
    gx, gW, gb = _scaled(grads, g_total)
    need_x, need_W, need_b = ctx.options[3:6]
    return (gx if need_x else None, gW if need_W else None, gb if need_b else None) + (None,) * 13


lm_head_loss_fused.register_autograd(_lm_loss_backward, setup_context=_lm_loss_setup)


def lm_head_loss(
    x, W, b, y, keep, sigma, c_nll, c_sm, c_z, temperature: float, softcap: float, rows: int, backend: str
):
    """``(total, lse, correct)`` through ``crossent::lm_head_loss_fused``; gradients are
    computed (in the same pass) for the inputs that require them."""

    def need(t):
        return t is not None and t.requires_grad and torch.is_grad_enabled()

    total, lse, correct, _, _, _ = lm_head_loss_fused(
        x.contiguous(),
        W,
        b,
        y.contiguous(),
        keep.contiguous(),
        sigma,
        c_nll,
        c_sm,
        c_z,
        temperature,
        softcap,
        rows,
        need(x),
        need(W),
        need(b),
        backend,
    )
    return total, lse, correct
