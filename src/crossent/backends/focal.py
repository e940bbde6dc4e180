r"""Focal and Poly-1 losses: the exact formulas, a fused loss-and-gradient pass, and the
registered ops ``crossent::binary_focal_fused`` and ``crossent::softmax_focal_fused``.

**Binary family** (sigmoid focal, Poly-1 BCE), per element, with :math:`s = \sigma(x)`,
:math:`u = \sigma(-x)`, positive weight :math:`P`, element weight :math:`w` and

.. math::
    \mathrm{ce} = P\,t\,\mathrm{softplus}(-x) + (1-t)\,\mathrm{softplus}(x),\qquad
    m = 1 - p_t = t\,u + (1-t)\,s,

the loss is :math:`\ell = w\,[A(t)\,\mathrm{ce}\,m^\gamma + \epsilon\,m]` (focal:
:math:`\epsilon = 0`, :math:`A = \alpha t + (1-\alpha)(1-t)` or 1; Poly-1: :math:`A = 1`,
:math:`\gamma = 0`). ``m`` is a sum of non-negative terms, never ``1 - sigmoid``; for a
hard target it is exactly :math:`\sigma(-z)` with the signed logit :math:`z = x(2t-1)`.
:math:`m^\gamma` is ``pow(m, gamma)`` where ``m`` is a normal number (its relative error is
gamma times that of ``m``: a few ulp) and :math:`e^{\gamma\log m}` where ``m`` underflows,
with :math:`\log m = \mathrm{logaddexp}(\log t - \mathrm{softplus}(x), \log(1-t) -
\mathrm{softplus}(-x))` taken directly (:math:`-\mathrm{softplus}(z)` for a hard target), so
:math:`m^\gamma` keeps its precision for gamma < 1 where ``m`` itself is 0. The gradient is

.. math::
    \partial_x \ell = w\,\bigl[A\,m^\gamma\,(\mathrm{ce}' + \gamma\,\mathrm{ce}\,r\,(1-2t))
    + \epsilon\,s\,u\,(1-2t)\bigr],\qquad \mathrm{ce}' = (1-t)\,s - P\,t\,u,\quad
    r = \frac{s\,u}{m} = e^{-\mathrm{softplus}(x) - \mathrm{softplus}(-x) - \log m} \le 1,

so :math:`m^{\gamma-1}` (infinite as m -> 0 for gamma < 1) is never formed.
:math:`\gamma = 0` skips the modulating factor entirely: the loss and its gradient are
the base BCE's, bit for bit (``0 ** 0 = 1``, derivative 0).

**Softmax family** (softmax focal, Poly-1 cross-entropy): with the class coefficients
``a`` of :func:`crossent.backends.reference.ce_coefficients` (one-hot or soft targets,
class weights, label smoothing) and :math:`n_c = -\log p_c` evaluated as the base
cross-entropy evaluates it (no cancellation), a row's loss is
:math:`\sum_c a_c\,\varphi(n_c)` with

.. math::
    \varphi_{\text{focal}}(n) = (1 - e^{-n})^\gamma\,n,\qquad
    \varphi_{\text{poly}}(n) = n + \epsilon\,(1 - e^{-n}),

and :math:`\partial \varphi(n_c) / \partial x_j = \varphi'(n_c)\,(p_j - \delta_{cj})` with
:math:`\varphi'_{\text{focal}} = (1-p)^\gamma\,(1 + \gamma\,n / \mathrm{expm1}(n))`,
:math:`\varphi'_{\text{poly}} = 1 + \epsilon\,p`. :math:`1 - p_c = -\mathrm{expm1}(-n_c)`
is exact where ``p_c`` is close to 1 (no ``1 - softmax``); where it underflows,
:math:`\log(1-p_c)` is :math:`\log(-\mathrm{expm1}(-n))` below ``log 2`` and
:math:`\mathrm{log1p}(-e^{-n})` above (Maechler's log1mexp), as for the binary family. The gradient's arg-max entry is formed as
:math:`p_k \sum_{c \ne k} a_c \varphi'_c - a_k \varphi'_k\,(1 - p_k)` with
:math:`1 - p_k = s / (1 + s)` from the softmax sum, again without cancellation.

Two evaluations of the same formulas: ``*_reference`` in differentiable torch ops (any
order of derivative, gradients w.r.t. targets and weights, ``torch.func``), and the fused
``*_forward`` that returns the loss and its gradient w.r.t. the logits in one pass,
chunked so its temporaries stay in cache. The ops wrap the fused pass for capture
(``torch.compile``, ``export``): fake implementations, autograd as ``grad * grad_output``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import chunked, reference
from .reference import _softplus, _times

LOG2 = math.log(2.0)

# Rows of the softmax family per chunk: 2**20 elements (4 MiB per float32 temporary). Its
# chunk runs about twenty torch ops; at the base kernels' 2**16 a 32k-class row would be
# two rows per chunk and the per-op overhead (and each op's thread barrier) would dominate.
SOFTMAX_CHUNK_ELEMENTS = 1 << 20


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _alpha_factor(t: Tensor, alpha: float) -> Optional[Tensor]:
    """torchvision's alpha term ``alpha t + (1 - alpha)(1 - t)``; None when alpha < 0."""
    if alpha < 0:
        return None
    return alpha * t + (1 - alpha) * (1 - t)


def _log_m(t: Tensor, sp_pos: Tensor, sp_neg: Tensor) -> Tensor:
    """log(1 - p_t) = logaddexp(log t - softplus(x), log(1 - t) - softplus(-x)), exact for hard
    and soft targets. A hard target selects its one term (-softplus(+-x)) with
    ``torch.where`` on finite values, so no -inf enters logaddexp and its derivatives (the
    second derivative of logaddexp at -inf is NaN)."""
    one, zero = torch.ones((), dtype=t.dtype, device=t.device), torch.zeros((), dtype=t.dtype, device=t.device)
    a = torch.log(torch.where(t > 0, t, one)) - sp_pos
    b = torch.log1p(-torch.where(t < 1, t, zero)) - sp_neg
    return torch.where(t <= 0, b, torch.where(t >= 1, a, torch.logaddexp(a, b)))


class _Sigmoid(torch.autograd.Function):
    """sigmoid with the derivative sigmoid(x) sigmoid(-x) (torch's s (1 - s) cancels where s is
    close to 1), itself differentiable, forward-mode and vmap included."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (_sigmoid(x) * _sigmoid(-x))

    @staticmethod
    def jvp(ctx, x_t):
        (x,) = ctx.saved_tensors
        return x_t * (_sigmoid(x) * _sigmoid(-x))


def _sigmoid(x: Tensor) -> Tensor:
    return _Sigmoid.apply(x)


# ---------------------------------------------------------------------------- binary family
def binary_focal_reference(
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    alpha: float,
    gamma: float,
    epsilon: float,
) -> Tensor:
    """Per-element binary focal / Poly-1 loss in differentiable torch ops (see the module)."""
    x = reference.sanitise_ignored(x, keep)
    sp_pos, sp_neg = _softplus(x), _softplus(-x)
    p = t if pos_weight is None else pos_weight * t
    loss = _times(p, sp_neg) + _times(1 - t, sp_pos)
    if gamma != 0 or epsilon != 0:
        m = t * _sigmoid(-x) + (1 - t) * _sigmoid(x)
    if gamma != 0:
        # pow where m is normal, exp(gamma log m) below; each branch sees safe values only,
        # so neither derivative meets 0 ** (gamma - 1) = inf
        small = m < torch.finfo(m.dtype).tiny
        direct = torch.pow(torch.where(small, torch.ones_like(m), m), gamma)
        tiny = torch.exp(gamma * _log_m(t, sp_pos, sp_neg))
        loss = _times(torch.where(small, tiny, direct), loss)
    a = _alpha_factor(t, alpha)
    if a is not None:
        loss = a * loss
    if epsilon != 0:
        loss = loss + epsilon * m
    if weight is not None:
        loss = loss * weight
    if keep is not None:
        loss = torch.where(keep, loss, _zero(loss))
    return loss


def _power(m: Tensor, gamma: float, log_m) -> Tensor:
    """m ** gamma: ``pow`` where m is a normal number (relative error gamma x that of m, a few
    ulp), ``exp(gamma * log m)`` where m is subnormal or 0 (``log_m()`` computes log m
    directly; m^gamma may still be representable for gamma < 1)."""
    tiny = torch.finfo(m.dtype).tiny
    direct = torch.pow(m, gamma)
    small = m < tiny
    return torch.where(small, torch.exp(gamma * log_m()), direct)


def _binary_chunk(alpha: float, gamma: float, epsilon: float):
    """The chunk function of :func:`chunked._elementwise_forward` for these options."""

    def chunk(x, t, pos, w, keep):
        if keep is not None:
            x = torch.where(keep, x, _zero(x))
        sp_pos, sp_neg = _softplus(x), _softplus(-x)
        s, u = torch.sigmoid(x), torch.sigmoid(-x)  # both to an ulp, never 1 - sigmoid
        p = t if pos is None else pos * t
        one_m_t = 1 - t
        ce = _times(p, sp_neg) + _times(one_m_t, sp_pos)
        grad = one_m_t * s - p * u
        if gamma != 0 or epsilon != 0:
            m = t * u + one_m_t * s  # 1 - p_t: non-negative terms
            sign = 1 - 2 * t
        if gamma != 0:
            mg = _power(m, gamma, lambda: _log_m(t, sp_pos, sp_neg))
            # r = s u / m <= 1: s for t = 1 (m = u), u for t = 0; m >= min(t, 1-t) / 2 otherwise
            soft = (s * u) / torch.clamp(m, min=torch.finfo(m.dtype).tiny)
            r = torch.where(t >= 1, s, torch.where(t <= 0, u, soft))
            grad = mg * (grad + gamma * _times(ce, r) * sign)
            loss = _times(mg, ce)
        else:
            loss = ce
        a = _alpha_factor(t, alpha)
        if a is not None:
            loss, grad = a * loss, a * grad
        if epsilon != 0:
            loss = loss + epsilon * m
            grad = grad + epsilon * (s * u) * sign
        return chunked._weight_and_mask(loss, grad, w, keep)

    return chunk


def binary_focal_forward(
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    alpha: float,
    gamma: float,
    epsilon: float,
    backend: str = "chunked",
) -> Tuple[Tensor, Tensor]:
    """(per-element loss, d loss / dx) in one pass: the Triton kernel (``backend='triton'``,
    float32/fp16/bf16), the compiled CPU kernel (``'chunked'``, float32 contiguous, no
    ``weight`` / ``keep``, gamma a multiple of 1/2 up to 10), else chunked torch ops."""
    if backend == "triton" and x.dtype != torch.float64:  # the registry checked CUDA and triton
        from .triton import focal as triton_focal

        return triton_focal.binary_focal_forward(x, t, weight, pos_weight, keep, alpha, gamma, epsilon)
    if backend == "chunked" and cpu_kernel_applies(x, t, weight, pos_weight, keep, gamma):
        return chunked._cpp().focal(x, t, *chunked._cycled_pos_weight(x, pos_weight), alpha, int(2 * gamma), epsilon)
    return chunked._elementwise_forward(
        _binary_chunk(alpha, gamma, epsilon), x, t, weight, pos_weight, keep, sum_only=False
    )


def cpu_kernel_applies(x, t, weight, pos_weight, keep, gamma: float) -> bool:
    """The compiled CPU kernel computes this call (see :func:`binary_focal_forward`)."""
    return (
        weight is None
        and keep is None
        and float(2 * gamma).is_integer()
        and gamma <= 10
        and chunked._cpp_ok(x, t)
        and (pos_weight is None or chunked._cpp_ok(pos_weight))
        and chunked._cpp() is not None
    )


class _FocalSum(torch.autograd.Function):
    """Eager 'mean' / 'sum' on the compiled CPU kernel: the forward returns the 0-dim sum (no
    per-element loss buffer) and a gradient already multiplied by the grad_output a plain
    ``backward()`` sends (``scale``); backward hands that buffer on when it receives exactly
    ``scale`` (one CPU scalar read), else recomputes and scales. ``create_graph`` re-derives
    through the reference composition (as the fused BCE ops do)."""

    @staticmethod
    def forward(ctx, x, t, pos_weight, alpha, gamma, epsilon, scale):
        pw, L = chunked._cycled_pos_weight(x, pos_weight)
        total, grad = chunked._cpp().focal(x, t, pw, L, alpha, int(2 * gamma), epsilon, True, scale)
        ctx.grad, ctx.opts, ctx.scale = grad, (alpha, gamma, epsilon), scale
        ctx.save_for_backward(x, t, pos_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        x, t, pos_weight = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        alpha, gamma, epsilon = ctx.opts
        if torch.is_grad_enabled():
            with torch.enable_grad():
                loss = binary_focal_reference(x, t, None, pos_weight, None, alpha, gamma, epsilon).sum()
                (g,) = torch.autograd.grad(loss, x, grad_out, create_graph=True)
            return g, None, None, None, None, None, None
        if grad is not None and grad_out.numel() == 1 and grad_out.item() == ctx.scale:
            return grad, None, None, None, None, None, None
        pw, L = chunked._cycled_pos_weight(x, pos_weight)
        _, grad = chunked._cpp().focal(x, t, pw, L, alpha, int(2 * gamma), epsilon, True, None)
        return grad.mul_(grad_out), None, None, None, None, None, None


def binary_focal_sum(x, t, pos_weight, *, alpha: float, gamma: float, epsilon: float, scale: float) -> Tensor:
    """The 0-dim sum of the per-element losses on the compiled CPU kernel (eager only; see
    :class:`_FocalSum`). The caller checked :func:`cpu_kernel_applies`."""
    t = t.expand(x.shape).contiguous()
    return _FocalSum.apply(x.contiguous(), t, pos_weight, float(alpha), float(gamma), float(epsilon), float(scale))


@torch.library.custom_op("crossent::binary_focal_fused", mutates_args=())
def binary_focal_fused(
    x: Tensor,
    t: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    keep: Optional[Tensor],
    alpha: float,
    gamma: float,
    epsilon: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    loss, grad = binary_focal_forward(x, t, weight, pos_weight, keep, alpha, gamma, epsilon, backend)
    return loss.contiguous(), grad.contiguous()


@binary_focal_fused.register_fake
def _(x, t, weight, pos_weight, keep, alpha, gamma, epsilon, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _saver(n_tensors: int):
    """setup_context keeping the fused gradient and references to the ``n_tensors`` tensor
    inputs (no copies): a backward with ``create_graph=True`` (grad mode on inside backward
    exactly then) re-derives through the reference composition, so higher derivatives are
    right."""

    def save(ctx, inputs, output):
        ctx.params = inputs[n_tensors:]
        ctx.save_for_backward(output[1], *inputs[:n_tensors])

    return save


def _higher_order(ctx, reference_fn, g_loss):
    _, x, *rest = ctx.saved_tensors
    with torch.enable_grad():
        loss = reference_fn(x, *rest, *ctx.params[:-1])
        (g,) = torch.autograd.grad(loss, x, g_loss, create_graph=True)
    return g


def _binary_backward(ctx, g_loss, g_grad):
    if torch.is_grad_enabled():
        return (_higher_order(ctx, binary_focal_reference, g_loss),) + (None,) * 8
    grad = ctx.saved_tensors[0]
    return (grad * g_loss,) + (None,) * 8


binary_focal_fused.register_autograd(_binary_backward, setup_context=_saver(5))


def _wants_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)


def binary_focal(x, t, weight, pos_weight, keep, *, alpha: float, gamma: float, epsilon: float, backend: str) -> Tensor:
    """Per-element binary focal / Poly-1 loss: the registered fused op, or the reference
    composition for ``backend='reference'``, ``torch.func`` transforms and gradients w.r.t.
    targets or weights."""
    from .._capture import transforming

    if backend == "reference" or transforming() or _wants_graph(t, weight, pos_weight):
        return binary_focal_reference(x, t, weight, pos_weight, keep, alpha, gamma, epsilon)
    t = t.expand(x.shape).contiguous()
    keep = None if keep is None else keep.expand(x.shape).contiguous()
    loss, _ = binary_focal_fused(
        x.contiguous(), t, weight, pos_weight, keep, float(alpha), float(gamma), float(epsilon), backend
    )
    return loss


# --------------------------------------------------------------------------- softmax family
def _log1mexp(n: Tensor) -> Tensor:
    """log(1 - e^{-n}) for n >= 0 without cancellation (Maechler 2012); -inf at n = 0."""
    return torch.where(n < LOG2, torch.log(-torch.expm1(-n)), torch.log1p(-torch.exp(-n)))


def _slope(n: Tensor, kind: str, param: float) -> Tensor:
    """phi'(n) in differentiable torch ops whose branches see safe values only (so the
    second derivative is finite wherever the first is)."""
    if kind == "poly":
        return 1 + param * torch.exp(-n)
    om = -torch.expm1(-n)
    small = om < torch.finfo(n.dtype).tiny
    one = torch.ones_like(n)
    direct = torch.pow(torch.where(small, one, om), param)
    below = torch.exp(param * _log1mexp(torch.where(small & (n > 0), n, one)))
    mg = torch.where(n == 0, torch.zeros_like(n) if param > 0 else one, torch.where(small, below, direct))
    nz = torch.where(n == 0, one, n)
    ratio = torch.where(n == 0, one, nz / torch.expm1(nz))
    return mg * (1 + param * ratio)


class _Phi(torch.autograd.Function):
    """phi(n) with the exact first derivative phi'(n) (:func:`_phi_and_slope`); its backward
    is differentiable (:func:`_slope`), so higher derivatives flow; forward-mode and vmap too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n, kind, param):
        return _phi_and_slope(n, kind, param)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        n, ctx.kind, ctx.param = inputs
        ctx.save_for_backward(n)
        ctx.save_for_forward(n)
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, g):
        (n,) = ctx.saved_tensors
        return g * _slope(n, ctx.kind, ctx.param), None, None

    @staticmethod
    def jvp(ctx, n_t, kind_t, param_t):
        (n,) = ctx.saved_tensors
        return n_t * _slope(n, ctx.kind, ctx.param)


def _phi(n: Tensor, kind: str, param: float) -> Tensor:
    """phi(n) of the module docstring, differentiable to any order."""
    if kind == "focal" and param == 0:
        return n
    return _Phi.apply(n, kind, param)


def _phi_and_slope(n: Tensor, kind: str, param: float) -> Tuple[Tensor, Tensor]:
    """phi(n) and phi'(n) (as a factor of p_j - delta_cj), no autograd."""
    if kind == "poly":
        p = torch.exp(-n)
        return n + param * -torch.expm1(-n), 1 + param * p
    if param == 0:
        return n, torch.ones_like(n)
    mg = _power(-torch.expm1(-n), param, lambda: _log1mexp(n))  # (1 - p)^gamma
    ratio = torch.where(n == 0, torch.ones_like(n), n / torch.expm1(n))  # n / expm1(n) -> 1 at n = 0
    return _times(mg, n), mg * (1 + param * ratio)


def _neg_log_softmax(x: Tensor):
    """(-log p, e = exp(x - m), s = sum_{j != k} e_j, k): the base cross-entropy's exact form."""
    m, k = x.max(dim=1, keepdim=True)
    z = torch.where(x == m, _zero(x), x - m)
    e = torch.exp(z)
    s = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
    return torch.log1p(s) - z, e, s, k


def softmax_focal_reference(x: Tensor, q, y, c, smooth, keep, kind: str, param: float) -> Tensor:
    """Per-row loss sum_c a_c phi(-log p_c) in differentiable torch ops (rows (M, C))."""
    x = reference.sanitise_ignored(x, keep)
    k = x.detach().argmax(dim=1, keepdim=True)
    m = x.gather(1, k)  # differentiable: x_k reaches -log p only through s
    at_k = torch.zeros_like(x, dtype=torch.bool).scatter_(1, k, True)
    # z_k = 0 as a constant (not x_k - x_k): its two gradient paths would cancel in autograd
    # and lose the arg-max's tiny gradient -s/(1+s) (float32 rows like [31, 0, 0])
    z = torch.where(at_k, torch.zeros((), dtype=x.dtype, device=x.device), x - m)
    e = torch.exp(z)
    s = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
    n = torch.log1p(s) - z
    phi = _phi(n, kind, param)
    if q is not None:
        return _times(q, phi).sum(dim=1)
    loss = _times(c, phi.gather(1, y.unsqueeze(1)).squeeze(1))
    if smooth is not None:
        loss = loss + _times(smooth.expand_as(phi), phi).sum(dim=1)
    return loss


def _softmax_chunk(x, q, y, c, smooth, kind, param):
    if q is None and smooth is None:
        return _softmax_chunk_index(x, y, c, kind, param)
    n, e, s, k = _neg_log_softmax(x)
    phi, slope = _phi_and_slope(n, kind, param)
    a = reference._dense_coef(x, q, y, c, smooth)
    loss = _times(a, phi).sum(dim=1)
    ab = _times(a, slope)  # a_c phi'(n_c)
    total = ab.sum(dim=1, keepdim=True)
    p = e / (1 + s)
    g = total * p - ab
    rest = ab.scatter(1, k, 0.0).sum(dim=1, keepdim=True)  # sum_{c != k} a_c phi'_c
    g_k = rest * p.gather(1, k) - ab.gather(1, k) * (s / (1 + s))
    g.scatter_(1, k, g_k)
    return loss, g


def _softmax_chunk_index(x, y, c, kind, param):
    """Class indices without smoothing: only the target's term, a_y = c, so phi and phi' are
    needed at one class per row; gradient c phi'_y (p - e_y), its target entry
    -c phi'_y s / (1 + s) when the target is the arg-max (no cancellation), else
    c phi'_y (p_y - 1) with p_y <= 1/2."""
    m, k = x.max(dim=1, keepdim=True)
    z = torch.where(x == m, _zero(x), x - m)
    e = torch.exp(z)
    s = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
    yy = y.unsqueeze(1)
    n_y = torch.log1p(s) - z.gather(1, yy)
    phi, slope = _phi_and_slope(n_y, kind, param)
    cc = c.unsqueeze(1).to(x.dtype)
    loss = _times(cc, phi).squeeze(1)
    ab = _times(cc, slope)
    inv = 1 / (1 + s)
    g = e * (ab * inv)
    g_y = torch.where(yy == k, -ab * (s * inv), ab * (e.gather(1, yy) * inv - 1))
    g.scatter_(1, yy, g_y)
    return loss, g


def _softmax_index_cpp(cpp, x, y, c, kind, param, scale=None):
    """Class indices without smoothing on the compiled cross-entropy kernel, twice: a row's
    loss is c phi(n_y) and its gradient c phi'(n_y) (p - e_y), the cross-entropy gradient
    with the row weight c phi'(n_y). Pass 1 reads the exact n_y = -log p_y (row weight 1, no
    gradient), pass 2 writes the gradient with the new row weights. Ignored rows keep their
    -0.0 weight (reference.ce_coefficients) in both passes: loss 0, gradient 0, logits unread."""
    y = y.long().contiguous()
    c = c.contiguous().to(x.dtype)
    ones = torch.where(torch.signbit(c), -0.0, 1.0).to(x.dtype)
    n_y = cpp.ce_index(x, y, ones, None)
    phi, slope = _phi_and_slope(n_y, kind, param)
    grad = torch.empty_like(x)
    cpp.ce_index(x, y, (c * slope).contiguous(), grad, scale)
    return _times(c, phi), grad


class _SoftmaxIndexPrescaled(torch.autograd.Function):
    """Eager 'mean' / 'sum' of :func:`_softmax_index_cpp`: the gradient is written already
    multiplied by the grad_output a plain ``backward()`` sends (``scale``, as the fused
    cross-entropy does), handed on when exactly that arrives, recomputed and scaled for any
    other; ``create_graph`` re-derives through the reference composition."""

    @staticmethod
    def forward(ctx, x, y, c, kind, param, scale):
        loss, grad = _softmax_index_cpp(chunked._cpp(), x, y, c, kind, param, chunked._value(scale))
        ctx.grad, ctx.opts, ctx.scale = grad, (kind, param), scale
        ctx.save_for_backward(x, y, c)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, y, c = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        kind, param = ctx.opts
        if torch.is_grad_enabled():
            with torch.enable_grad():
                loss = softmax_focal_reference(x, None, y, c, None, None, kind, param)
                (g,) = torch.autograd.grad(loss, x, grad_out, create_graph=True)
            return g, None, None, None, None, None
        if grad is not None and chunked._is_expected(grad_out, ctx.scale):
            return grad, None, None, None, None, None
        _, grad = _softmax_index_cpp(chunked._cpp(), x, y, c, kind, param)
        return grad.mul_(grad_out.unsqueeze(1)), None, None, None, None, None


def softmax_focal_forward(
    x: Tensor, q, y, c, smooth, keep, kind: str, param: float, backend: str = "chunked"
) -> Tuple[Tensor, Tensor]:
    """(per-row loss (M,), gradient (M, C)) in one pass over chunks of rows."""
    if backend == "triton" and x.dtype != torch.float64:
        from .triton import focal as triton_focal

        return triton_focal.softmax_focal_forward(x, q, y, c, smooth, keep, kind, param)
    M, C = x.shape
    if (
        backend == "chunked"
        and q is None
        and smooth is None
        and M > 0
        and C > 0
        and chunked._cpp_ok(x)
        and x.dim() == 2
        and chunked._cpp() is not None
    ):
        return _softmax_index_cpp(chunked._cpp(), x, y, c, kind, param)
    loss = torch.empty(M, dtype=x.dtype, device=x.device)
    grad = torch.empty_like(x)
    for i, j in chunked._chunks(M, max(1, SOFTMAX_CHUNK_ELEMENTS // max(1, C))):
        sl = slice(i, j)
        xs = x[sl] if keep is None else reference.sanitise_ignored(x[sl], keep[sl])
        lo, g = _softmax_chunk(
            xs,
            None if q is None else q[sl],
            None if y is None else y[sl],
            None if c is None else c[sl],
            smooth,
            kind,
            param,
        )
        if keep is not None:
            kk = keep[sl]
            lo = torch.where(kk, lo, _zero(lo))
            g = torch.where(kk.unsqueeze(1), g, _zero(g))
        loss[sl] = lo
        grad[sl] = g
    return loss, grad


@torch.library.custom_op("crossent::softmax_focal_fused", mutates_args=())
def softmax_focal_fused(
    x: Tensor,
    q: Optional[Tensor],
    y: Optional[Tensor],
    c: Optional[Tensor],
    smooth: Optional[Tensor],
    keep: Optional[Tensor],
    kind: str,
    param: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    loss, grad = softmax_focal_forward(x, q, y, c, smooth, keep, kind, param, backend)
    return loss.contiguous(), grad.contiguous()


@softmax_focal_fused.register_fake
def _(x, q, y, c, smooth, keep, kind, param, backend):
    return x.new_empty((x.shape[0],)), x.new_empty(x.shape)


def _softmax_reference_masked(x, q, y, c, smooth, keep, kind, param):
    loss = softmax_focal_reference(x, q, y, c, smooth, keep, kind, param)
    return loss if keep is None else torch.where(keep, loss, _zero(loss))


def _softmax_backward(ctx, g_loss, g_grad):
    if torch.is_grad_enabled():
        return (_higher_order(ctx, _softmax_reference_masked, g_loss),) + (None,) * 8
    grad = ctx.saved_tensors[0]
    return (grad * g_loss.unsqueeze(1),) + (None,) * 8


softmax_focal_fused.register_autograd(_softmax_backward, setup_context=_saver(6))


def softmax_focal(
    x,
    target,
    index_target: bool,
    weight,
    keep,
    label_smoothing: float,
    *,
    kind: str,
    param: float,
    backend: str,
    prescale_for: Optional[str] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-row softmax focal / Poly-1 loss of rows ``x`` (M, C): ``(loss, per-row mean
    denominator weights or None)``; the registered op, or the reference composition (as
    :func:`binary_focal` chooses). ``prescale_for`` ('mean' / 'sum', eager calls only): the
    reduction that follows, so the CPU kernel path may pre-scale its gradient."""
    from .._capture import transforming

    q, y, c, smooth, den = reference.ce_coefficients(x, target, index_target, weight, keep, label_smoothing)
    if backend == "reference" or transforming() or _wants_graph(weight) or (not index_target and _wants_graph(target)):
        return _softmax_reference_masked(x, q, y, c, smooth, keep, kind, param), den
    if (
        prescale_for in ("mean", "sum")
        and backend == "chunked"
        and q is None
        and smooth is None
        and x.dim() == 2
        and x.shape[0]
        and x.shape[1]
        and chunked._cpp_ok(x)
        and chunked._cpp() is not None
    ):
        scale = chunked.ce_grad_scale(prescale_for, den, x.shape[0], x)
        return _SoftmaxIndexPrescaled.apply(x, y, c, kind, float(param), scale), den
    loss, _ = softmax_focal_fused(
        x.contiguous(), q, None if y is None else y.contiguous(), c, smooth, keep, kind, float(param), backend
    )
    return loss, den
