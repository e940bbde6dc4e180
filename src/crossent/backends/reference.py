"""The plain-torch reference backend: exact formulas, any device, any autograd order.
Design notes: ``docs/design.md``, section ``crossent.backends.reference``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._capture import transforming


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)) with full relative precision for every z.

    torch's softplus switches to the identity above ``threshold`` (default 20); that is
    exact to float32 rounding but drops exp(-20) ~ 2e-9 relative in float64, so float64
    uses 40. Below the threshold it evaluates log1p(exp(z)), exact for very negative z,
    and its backward is exp(z) / (1 + exp(z)), exact in both tails.
    """
    return F.softplus(z, beta=1.0, threshold=40.0 if z.dtype == torch.float64 else 20.0)


def sanitise_ignored(x: torch.Tensor, keep: Optional[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """``x`` with the ignored elements (``keep`` False) replaced by ``fill``.

    ``keep`` has ``x``'s shape (elementwise losses) or one entry per row of ``x`` (M, C)
    (cross-entropy with class indices). Through ``torch.where`` the ignored elements get a
    gradient of exactly 0 whatever their value, and the formulas never see NaN or +-inf
    there, so nothing downstream (class-weight or target gradients) meets ``0 * nan``.
    """
    if keep is None:
        return x
    if keep.dim() < x.dim():
        keep = keep.unsqueeze(1)
    return torch.where(keep, x, fill)


def _times(coef: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """coef * value with 0 * inf = 0: a term with zero weight is absent, not NaN.

    Where ``coef == 0`` the product uses ``value`` with +-inf replaced by the largest finite
    number, so the value is 0, the gradient w.r.t. ``coef`` is still ``value`` (a target of
    exactly 0 or 1 keeps its target gradient) and no ``0 * inf`` reaches the backward.
    """
    finite = torch.nan_to_num(value, nan=float("nan"))
    return coef * torch.where(coef == 0, finite, value)


def binary_cross_entropy_with_logits(
    x: torch.Tensor,
    t: torch.Tensor,
    weight: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
) -> torch.Tensor:
    r"""Per-element :math:`w\,[p\,t\,\mathrm{softplus}(-x) + (1-t)\,\mathrm{softplus}(x)]`.

    Algebraically equal to torch's ``(1-t) x + (1 + (p-1) t) softplus(-x)``, but a sum of
    two non-negative terms (for t in [0, 1], p >= 0): no cancellation, so a loss of 2e-9
    keeps all its digits, and x = +-inf gives the finite limit instead of NaN. Ignored
    elements give 0 loss and 0 gradient whatever ``x`` holds there.
    """
    x = sanitise_ignored(x, keep)
    pos = t if pos_weight is None else pos_weight * t
    loss = _times(pos, _softplus(-x)) + _times(1 - t, _softplus(x))
    if weight is not None:
        loss = loss * weight
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss


# torch's BCE backward clamps p (1 - p) at its C++ ``float EPSILON = 1e-12``: the float32
# value, also for float64 inputs (9.99999996e-13, not 1e-12). Same constant here, for
# bit-for-bit parity of the clamped gradient at p = 0 and p = 1.
_TORCH_BCE_EPS = float(torch.tensor(1e-12, dtype=torch.float32))


class _BinaryCrossEntropy(torch.autograd.Function):
    r"""BCE on probabilities with torch's documented clamp and torch's gradient.

    Forward: :math:`-w\,[p_w\,t \max(\log p, -100) + (1-t)\max(\log(1-p), -100)]`, with
    ``log1p(-p)`` so that p close to 0 keeps full precision.
    Backward (as torch, plus ``pos_weight``):
    :math:`w\,[(p - t) - (p_w - 1)\,t\,(1-p)] / \max(p(1-p), 10^{-12})` (equal to
    :math:`w\,[(1-t)\,p - p_w\,t\,(1-p)] / \ldots`; ``p - t`` is exact when p is close
    to t), which is accurate inside (0, 1) and finite at the ends. The backward is written in differentiable ops, so
    double backward works.
    """

    generate_vmap_rule = True  # with setup_context: works under torch.func

    @staticmethod
    def forward(p, t, pos_weight):
        return _bce_value(p, t, pos_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def _partials(p, t, pos_weight):
        """(d loss / d p, d loss / d t, d loss / d pos_weight or None) per element."""
        # (1-t) p - p_w t (1-p), written as (p - t) - (p_w - 1) t (1-p): ``p - t`` is
        # torch's numerator and is exact when p is close to t (no cancellation).
        num = p - t
        if pos_weight is not None:
            num = num - (pos_weight - 1) * t * (1 - p)
        d_p = num / torch.clamp(p * (1 - p), min=_TORCH_BCE_EPS)
        # torch's target gradient: the unclamped log(1-p) - log(p) (+-inf at p = 0, 1),
        # consistent with its unclamped input gradient; log1p keeps p near 0 exact.
        pw = 1 if pos_weight is None else pos_weight
        d_t = torch.log1p(-p) - pw * torch.log(p)
        d_pw = None if pos_weight is None else -t * torch.clamp(torch.log(p), min=-100)
        return d_p, d_t, d_pw

    @staticmethod
    def backward(ctx, grad):
        p, t, pos_weight = ctx.saved_tensors
        d_p, d_t, _ = _BinaryCrossEntropy._partials(p, t, pos_weight)
        grad_p = grad * d_p if ctx.needs_input_grad[0] else None
        grad_t = grad * d_t if ctx.needs_input_grad[1] else None
        return grad_p, grad_t, None


class _BinaryCrossEntropyForward(_BinaryCrossEntropy):
    """:class:`_BinaryCrossEntropy` with a forward-mode rule, for ``torch.func`` transforms
    (Dynamo cannot trace an autograd Function that defines ``jvp``, so it is a subclass)."""

    @staticmethod
    def jvp(ctx, p_t, t_t, pw_t):
        p, t, pos_weight = ctx.saved_tensors
        d_p, d_t, d_pw = _BinaryCrossEntropy._partials(p, t, pos_weight)
        out = torch.zeros_like(p)
        for d, tangent in ((d_p, p_t), (d_t, t_t), (d_pw, pw_t)):
            if d is not None and tangent is not None:
                out = out + d * tangent
        return out


def _bce_value(p, t, pos_weight):
    log_p = torch.clamp(torch.log(p), min=-100)
    log_1mp = torch.clamp(torch.log1p(-p), min=-100)
    pt = t if pos_weight is None else pos_weight * t
    return -(pt * log_p + (1 - t) * log_1mp)


def binary_cross_entropy(
    p: torch.Tensor,
    t: torch.Tensor,
    weight: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-element BCE on probabilities (see :class:`_BinaryCrossEntropy`); ignored
    elements give 0 loss and 0 gradient whatever ``p`` holds there."""
    p = sanitise_ignored(p, keep, 0.5)
    if pos_weight is not None:
        pos_weight = pos_weight.expand_as(p)
    loss = (_BinaryCrossEntropyForward if transforming() else _BinaryCrossEntropy).apply(p, t, pos_weight)
    if weight is not None:
        loss = loss * weight
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss


# --------------------------------------------------------------------------- multiclass
def _neg_log_softmax(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``-log softmax(x)`` over dim 1, cancellation-free.

    With :math:`m = \max_j x_j` at index k and :math:`S' = \sum_{j \ne k} e^{x_j - m}`,

    .. math:: -\log p_j = (m - x_j) + \log(1 + S'),

    a sum of two non-negative terms. The textbook ``logsumexp(x) - x_j`` rounds
    ``log(1 + 4e-9)`` to 0 in float32 when the winning class has a wide margin; this form
    returns 4.12e-9. A +inf logit is its own max (``x - m`` is set to 0 where ``x == m``),
    which gives the finite limit instead of NaN. Returns ``(nlp, s, k, e)`` with
    ``e = exp(x - m)`` (``e_k = 1``), so that :math:`p_j = e_j / (1 + S')` to a couple of
    ulp (``exp(-nlp)`` would carry an error of ``|nlp|`` ulp).
    """
    m, k = x.max(dim=1, keepdim=True)
    z = torch.where(x == m, torch.zeros((), dtype=x.dtype, device=x.device), x - m)
    e = torch.exp(z)
    s = e.scatter(1, k, 0.0).sum(dim=1, keepdim=True)
    nlp = torch.log1p(s) - z
    return nlp, s, k, e


class _CrossEntropy(torch.autograd.Function):
    r"""Cross-entropy against per-class coefficients :math:`a_{ij} \ge 0`:

    .. math:: \ell_i = \sum_j a_{ij}\,(-\log p_{ij}), \qquad
              \frac{\partial \ell_i}{\partial x_{ij}} = A_i\,p_{ij} - a_{ij},\quad A_i = \sum_j a_{ij}.

    With :math:`p_{ij} = e^{x_{ij} - m_i} / (1 + S'_i)` (a few ulp, whatever the margin).
    At the arg-max k, when it dominates (:math:`S' < 1`, i.e. :math:`p_{ik} > 1/2`), the
    gradient is evaluated as :math:`(A_i - a_{ik}) - A_i\,S'/(1+S')` (since
    :math:`1 - p_{ik} = S'/(1+S')`), so a confident correct prediction keeps the relative
    precision of its tiny gradient instead of rounding ``p - 1`` to 0; otherwise as
    :math:`A_i p_{ik} - a_{ik}`, which is the better-conditioned form there.

    ``coef`` is either a dense (M, C) tensor (probability targets) or, for class-index
    targets, the tuple (y, c, smooth) meaning :math:`a_{ij} = c_i [j = y_i] + smooth_j`
    with ``smooth`` of shape (C,) or None. The backward recomputes from saved inputs with
    differentiable ops, so double backward works.
    """

    generate_vmap_rule = True  # with setup_context: works under torch.func

    @staticmethod
    def forward(x, q, y, c, smooth):
        nlp = _neg_log_softmax(x)[0]
        return _ce_value(nlp, q, y, c, smooth)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def _grad_x(x, q, y, c, smooth, s, k, e):
        """d loss_i / d x_ij = A_i p_ij - a_ij, the arg-max entry without cancellation."""
        a = _dense_coef(x, q, y, c, smooth)
        A = a.sum(dim=1, keepdim=True)
        p = e / (1 + s)
        g = A * p - a
        a_rest = a.scatter(1, k, 0.0).sum(dim=1, keepdim=True)  # A - a_k without cancellation
        g_k = torch.where(s < 1, a_rest - A * (s / (1 + s)), g.gather(1, k))
        return g.scatter(1, k, g_k)

    @staticmethod
    def backward(ctx, grad):
        x, q, y, c, smooth = ctx.saved_tensors
        grad_x = grad_q = grad_c = grad_smooth = None
        nlp, s, k, e = _neg_log_softmax(x)
        if ctx.needs_input_grad[0]:
            grad_x = grad.unsqueeze(1) * _CrossEntropy._grad_x(x, q, y, c, smooth, s, k, e)
        if ctx.needs_input_grad[1]:
            grad_q = grad.unsqueeze(1) * nlp
        if ctx.needs_input_grad[3]:
            grad_c = grad * nlp.gather(1, y.unsqueeze(1)).squeeze(1)
        if ctx.needs_input_grad[4]:
            grad_smooth = (grad.unsqueeze(1) * nlp).sum(0)
        return grad_x, grad_q, None, grad_c, grad_smooth


class _CrossEntropyForward(_CrossEntropy):
    """:class:`_CrossEntropy` with a forward-mode rule, for ``torch.func`` transforms."""

    @staticmethod
    def jvp(ctx, x_t, q_t, y_t, c_t, smooth_t):
        x, q, y, c, smooth = ctx.saved_tensors
        nlp, s, k, e = _neg_log_softmax(x)
        out = torch.zeros_like(nlp[:, 0])
        if x_t is not None:
            out = out + (_CrossEntropy._grad_x(x, q, y, c, smooth, s, k, e) * x_t).sum(dim=1)
        if q_t is not None:
            out = out + (q_t * nlp).sum(dim=1)
        if c_t is not None:
            out = out + c_t * nlp.gather(1, y.unsqueeze(1)).squeeze(1)
        if smooth_t is not None:
            out = out + (smooth_t * nlp).sum(dim=1)
        return out


def _dense_coef(x, q, y, c, smooth):
    if q is not None:
        return q
    a = torch.zeros_like(x) if smooth is None else smooth.expand_as(x).clone()
    return a.scatter_add(1, y.unsqueeze(1), c.unsqueeze(1).to(x.dtype))


def _ce_value(nlp, q, y, c, smooth):
    if q is not None:
        return _times(q, nlp).sum(dim=1)
    loss = _times(c, nlp.gather(1, y.unsqueeze(1)).squeeze(1))  # weight 0 with -log p = inf: 0
    if smooth is not None:
        loss = loss + _times(smooth.expand_as(nlp), nlp).sum(dim=1)
    return loss


def ce_coefficients(x, target, index_target, weight, keep, label_smoothing):
    """Cross-entropy options as the coefficients of :class:`_CrossEntropy`: ``(q, y, c, smooth, den)``.

    Probability targets: ``q = w * ((1 - eps) target + eps / C)`` and the rest None.
    Class indices: ``y`` (ignored rows pointed at class 0), ``c = (1 - eps) w_y`` (0 when
    ignored), ``smooth = eps w / C`` (or None) and ``den`` the per-row ``mean`` denominator
    weight. Shared by every backend so that they agree on what the options mean.

    An ignored row's ``den`` and ``c`` are ``-0.0`` and a kept row's never are (a class
    weight of -0.0 is read as +0.0): the compiled CPU kernels (``kernels.c``) take no
    ``keep`` mask and recognise ignored rows by that sign, to give them 0 loss and 0
    gradient whatever their logits hold. Everywhere else -0.0 is simply 0.
    """
    C = x.shape[1]
    eps = label_smoothing
    if not index_target:
        q = target if eps == 0 else target * (1 - eps) + eps / C
        if weight is not None:
            q = q * weight
        return q, None, None, None, None
    return (None, *index_coefficients(target, weight, keep, eps, C, x.dtype))


def index_coefficients(target, weight, keep, eps, C, dtype):
    """``(y, c, smooth, den)`` of class-index targets (any shape), in ``dtype``: the one
    definition of what class weights, ``ignore_index`` and label smoothing mean for
    cross-entropy (see :func:`ce_coefficients`; the fused linear ops use it per position)."""
    # Few torch calls: small inputs pay per call (docs/performance.md, small inputs).
    y = target if keep is None else torch.where(keep, target, 0)
    if weight is None:
        if keep is None:
            den = torch.ones_like(y, dtype=dtype)
        else:
            den = torch.where(keep, 1.0, -0.0)
            if den.dtype != dtype:
                den = den.to(dtype)
    else:
        den = weight.gather(0, y) + 0.0  # + 0.0: a kept row's weight is never -0.0
        if keep is not None:
            den = torch.where(keep, den, -0.0)
    c = den * (1 - eps) if eps else den
    smooth = None
    if eps:
        smooth = torch.full((C,), eps / C, dtype=dtype, device=y.device) if weight is None else weight * (eps / C)
    return y, c, smooth, den


def cross_entropy(
    x: torch.Tensor,
    target: torch.Tensor,
    index_target: bool,
    weight: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    label_smoothing: float,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row cross-entropy of logits ``x`` (M, C).

    Args:
        target: int64 (M,) class indices (``keep`` marks rows not equal to ignore_index)
            or (M, C) class probabilities.
        weight: (C,) class weights or None.
    Returns:
        ``(loss, denominator)``: per-row losses (M,) and the per-row denominator weights
        (M,) for ``mean``, or None meaning one per row. (A fused backend that needed their
        total may return that 0-dim total instead; the functional layer sums either way.)

    Ignored rows give 0 loss and 0 gradient whatever their logits hold (NaN, +-inf).
    """
    if index_target:
        x = sanitise_ignored(x, keep)
    q, y, c, smooth, den = ce_coefficients(x, target, index_target, weight, keep, label_smoothing)
    fn = _CrossEntropyForward if transforming() else _CrossEntropy
    if q is not None:
        return fn.apply(x, q, None, None, None), None
    loss = fn.apply(x, None, y, c, smooth)
    if label_smoothing and keep is not None:
        loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss, den
