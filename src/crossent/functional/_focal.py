"""Focal losses (sigmoid and softmax) and Poly-1 losses, exact from logits.

The formulas, their gradients and why they are written that way are in
:mod:`crossent.backends.focal`; this module owns the arguments, checks and reductions,
sharing the canonicalisation of the base losses (:mod:`._binary`, :mod:`._multiclass`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..backends import focal, resolve
from ._binary import _prepare as _prepare_binary
from ._binary import _run as _run_binary
from ._multiclass import _check, _out_dtype, _rows
from ._reduction import autocast_inputs, compute_dtype, legacy_reduction, mean_grad_scale, no_autocast, reduce_loss


def check_gamma(func: str, gamma, name: str = "gamma") -> float:
    """A focusing parameter: finite, >= 0 (gamma = 0 is the base loss)."""
    return V.check_real(
        func,
        name,
        gamma,
        lambda v: v >= 0,
        "a finite number >= 0",
        "gamma = 0 is plain cross-entropy; the papers use 0.5 to 5 (2 by default).",
    )


def check_epsilon(func: str, epsilon) -> float:
    """Poly-1's epsilon: finite, >= -1 (below, the loss is no longer bounded below:
    1 - p_t > -log p_t fails)."""
    return V.check_real(
        func,
        "epsilon",
        epsilon,
        lambda v: v >= -1,
        "a finite number >= -1",
        "Leng et al. use epsilon = 1 (default); epsilon = 0 is the base loss; below -1 the loss is unbounded.",
    )


def check_alpha(func: str, alpha) -> float:
    """torchvision's alpha: in [0, 1], or negative to switch the alpha term off."""
    return V.check_real(
        func,
        "alpha",
        alpha,
        lambda v: v <= 1,
        "a finite number in [0, 1], or < 0 for no alpha weighting",
        "alpha weights positives, 1 - alpha negatives; alpha=0.25 is torchvision's default, -1 switches it off.",
    )


# --------------------------------------------------------------------------- binary family
def _binary_family(func, c, backend, return_parts, *, alpha, gamma, epsilon):
    """The focal / Poly-1 op on a prepared BCE call (:func:`._binary._prepare`) and the
    shared reduction; gamma = epsilon = 0 is the base loss itself."""
    if gamma == 0 and epsilon == 0:
        return _run_binary("binary_cross_entropy_with_logits", c, backend, return_parts)
    x, t, weight, pos_weight, keep = c.x, c.t, c.weight, c.pos_weight, c.keep
    reduction, denominator = c.reduction, c.denominator
    name = resolve("binary_cross_entropy_with_logits", x.device, backend)
    with no_autocast(x.device):
        if (
            reduction != "none"
            and not c.capture
            and name == "chunked"
            and x.numel()
            and not focal._wants_graph(t, weight, pos_weight)
            and focal.cpu_kernel_applies(x, t.expand(x.shape), weight, pos_weight, keep, gamma)
        ):
            # the 0-dim sum, the gradient pre-scaled by what backward() will send
            scale = mean_grad_scale(x.numel(), x.dtype) if reduction == "mean" else 1.0
            loss = focal.binary_focal_sum(x, t, pos_weight, alpha=alpha, gamma=gamma, epsilon=epsilon, scale=scale)
            denominator = x.numel()
        else:
            loss = focal.binary_focal(
                x, t, weight, pos_weight, keep, alpha=alpha, gamma=gamma, epsilon=epsilon, backend=name
            )
    return reduce_loss(
        loss, denominator, reduction, out_dtype=c.out_dtype, return_parts=return_parts, capture=c.capture
    )


def _alpha_weight(func, input, target, weight, label_smoothing, alpha):
    """gamma = 0: ``weight * alpha_t``, the weight of :func:`binary_cross_entropy_with_logits`
    that gives the focal loss (``weight`` unchanged when alpha < 0 or the target is not a
    tensor: the base loss's checks then report it)."""
    if alpha < 0 or not isinstance(target, torch.Tensor):
        return weight
    t = target if target.is_floating_point() else target.to(input.dtype if input.is_floating_point() else torch.float32)
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / 2
    a = alpha * t + (1 - alpha) * (1 - t)
    return a if weight is None else V.as_weight_tensor(func, "weight", weight, like=input) * a


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
):
    r"""Sigmoid focal loss (Lin et al. 2017) on logits: torchvision's signature, defaults and values.

    With :math:`\mathrm{ce} = p_w\,t\,\mathrm{softplus}(-x) + (1-t)\,\mathrm{softplus}(x)` and
    :math:`1 - p_t = t\,\sigma(-x) + (1 - t)\,\sigma(x)`:

    .. math::
        \ell_i = w_i\,\alpha_t\,(1 - p_t)^\gamma\,\mathrm{ce},\qquad
        \alpha_t = \alpha\,t + (1 - \alpha)(1 - t)\ (\text{1 when } \alpha < 0)

    Drop-in for :func:`torchvision.ops.sigmoid_focal_loss` (default ``reduction='none'``,
    as there). torchvision forms ``1 - p_t`` as ``1 - sigmoid``, which is exactly 0 in
    float32 for a confident correct prediction (:math:`|x| \gtrsim 17`) and loses the
    focal term long before; here it is a sum of non-negative terms and
    :math:`(1-p_t)^\gamma = e^{\gamma \log(1-p_t)}` is taken in log space (for hard targets
    :math:`\gamma \log\sigma(-z)`, :math:`z = x(2t-1)`), exact for logits up to +-1e4 and
    beyond. ``gamma = 0`` gives exactly :func:`binary_cross_entropy_with_logits` (times
    :math:`\alpha_t`), values and gradients. Details: :mod:`crossent.backends.focal`.

    Keyword-only extensions: ``weight`` (per element, broadcast), ``pos_weight`` (weights
    the positive term of ``ce``, one per label along the last dimension),
    ``ignore_index`` (left out of the sum and of the ``mean`` denominator),
    ``label_smoothing`` (targets become :math:`t(1-\epsilon) + \epsilon/2`, then the formula
    above applies to the soft target, :math:`\alpha_t` included), ``validate``,
    ``return_parts``, ``backend``. Shapes: input and target :math:`(*)`, the same shape.

    >>> import torch, crossent
    >>> x = torch.tensor([2.0, -1.0, 0.5, 20.0])
    >>> t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    >>> crossent.sigmoid_focal_loss(x, t, reduction="sum").item() > 0
    True
    >>> f"{crossent.sigmoid_focal_loss(x, t)[3].item():.4g}"      # torchvision: 0
    '2.189e-27'
    """
    func = "sigmoid_focal_loss"
    reduction = legacy_reduction(func, None, None, reduction)
    alpha = check_alpha(func, alpha)
    gamma = check_gamma(func, gamma)
    if gamma == 0:  # the base loss by construction (0 ** 0 = 1, derivative 0): alpha_t is one more weight
        weight = _alpha_weight(func, input, target, weight, label_smoothing, alpha)
    c = _prepare_binary(
        func, input, target, weight, pos_weight, ignore_index, label_smoothing, reduction, False, validate
    )
    return _binary_family(func, c, backend, return_parts, alpha=alpha, gamma=gamma, epsilon=0.0)


def poly1_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    epsilon: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
):
    r"""Poly-1 binary cross-entropy on logits (Leng et al. 2022): BCE plus :math:`\epsilon(1 - p_t)`.

    .. math::
        \ell_i = w_i\,\bigl[p_w\,t_i\,\mathrm{softplus}(-x_i) + (1 - t_i)\,\mathrm{softplus}(x_i)
        + \epsilon\,(1 - p_{t,i})\bigr],\qquad 1 - p_t = t\,\sigma(-x) + (1-t)\,\sigma(x)

    Every argument of :func:`binary_cross_entropy_with_logits` (positional order and
    defaults too), plus keyword-only ``epsilon`` (default 1; 0 gives the base loss
    exactly). ``pos_weight`` weights the cross-entropy's positive term only (the paper's
    Poly-1 term is unweighted), ``weight`` the whole element. ``1 - p_t`` is exact
    (never ``1 - sigmoid``).

    >>> import torch, crossent
    >>> x, t = torch.tensor([0.2, -1.5, 3.0]), torch.tensor([1.0, 0.0, 1.0])
    >>> bce = crossent.binary_cross_entropy_with_logits(x, t)
    >>> poly = crossent.poly1_binary_cross_entropy_with_logits(x, t)
    >>> round((poly - bce).item(), 4)       # mean of 1 - p_t
    0.2267
    """
    func = "poly1_binary_cross_entropy_with_logits"
    reduction = legacy_reduction(func, size_average, reduce, reduction)
    epsilon = check_epsilon(func, epsilon)
    c = _prepare_binary(
        func, input, target, weight, pos_weight, ignore_index, label_smoothing, reduction, False, validate
    )
    return _binary_family(func, c, backend, return_parts, alpha=-1.0, gamma=0.0, epsilon=epsilon)


# -------------------------------------------------------------------------- softmax family
def _softmax_family(
    func, input, target, weight, ignore_index, reduction, label_smoothing, validate, return_parts, backend, param
):
    """The canonicalisation of :func:`crossent.cross_entropy` (rows of classes), then the
    focal (``softmax_focal_loss``: ``param`` is gamma) or Poly-1 (``param`` is epsilon) op
    and the shared reduction (``mean``: cross-entropy's denominator)."""
    if param == 0:  # gamma = 0 / epsilon = 0: cross-entropy itself
        from ._multiclass import cross_entropy

        return cross_entropy(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            backend=backend,
        )
    input, target, weight = autocast_inputs(input, target, weight)
    m = _check(func, input, target, weight, ignore_index, label_smoothing, reduction, validate)
    target, index_target, class_dim, C, weight, label_smoothing, ignore_index, capture = m
    out_dtype = _out_dtype(input, target, weight, index_target)
    cdt = compute_dtype(out_dtype)
    out_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    x = _rows(input, cdt, class_dim, C)
    keep = None
    if index_target:
        t = target.reshape(-1) if target.dim() != 1 else target
        keep = t != ignore_index
    else:
        t = _rows(target, cdt, class_dim, C)
    w = weight if weight is None or weight.dtype == cdt else weight.to(cdt)
    name = resolve("cross_entropy", x.device, backend)
    with no_autocast(x.device):
        loss, den = focal.softmax_focal(
            x,
            t,
            index_target,
            w,
            keep,
            label_smoothing,
            kind="focal" if func == "softmax_focal_loss" else "poly",
            param=param,
            backend=name,
            prescale_for=None if capture else reduction,
        )
    if loss.shape != out_shape:
        loss = loss.reshape(out_shape)
    denominator = None if den is None else den.sum()
    return reduce_loss(loss, denominator, reduction, out_dtype=out_dtype, return_parts=return_parts, capture=capture)


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
):
    r"""Softmax (multi-class) focal loss: cross-entropy with each class term scaled by :math:`(1-p_c)^\gamma`.

    With :math:`f(p) = -(1 - p)^\gamma \log p`, smoothing :math:`\epsilon` and class weights :math:`w`:

    .. math::
        \ell_i = (1-\epsilon)\,w_{y_i}\,f(p_{y_i}) + \frac{\epsilon}{C}\sum_c w_c\,f(p_c)
        \quad\text{(class indices)},\qquad
        \ell_i = \sum_c w_c\,q'_{ic}\,f(p_{ic})\quad\text{(probabilities, as Keras'
        CategoricalFocalCrossentropy)}

    Arguments, shapes ((N, C), (C,), (N, C, d1, ..., dK)), class-index and probability
    targets and the ``mean`` denominator are :func:`crossent.cross_entropy`'s; ``gamma = 0``
    gives it exactly. :math:`-\log p_c` is the base loss's exact form and
    :math:`1 - p_c = -\mathrm{expm1}(\log p_c)` (never ``1 - softmax``), so confident
    predictions keep their tiny loss and gradient.

    >>> import torch, crossent
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> y = torch.tensor([0, 1])
    >>> ce = crossent.cross_entropy(logits, y)
    >>> bool(crossent.softmax_focal_loss(logits, y) < ce)
    True
    >>> bool(crossent.softmax_focal_loss(logits, y, gamma=0.0) == ce)
    True
    """
    func = "softmax_focal_loss"
    gamma = check_gamma(func, gamma)
    reduction = legacy_reduction(func, None, None, reduction)
    return _softmax_family(
        func, input, target, weight, ignore_index, reduction, label_smoothing, validate, return_parts, backend, gamma
    )


def poly1_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    epsilon: float = 1.0,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
):
    r"""Poly-1 cross-entropy (Leng et al. 2022): cross-entropy plus :math:`\epsilon (1 - p_t)`.

    Each class term :math:`-\log p_c` of :func:`crossent.cross_entropy` becomes
    :math:`-\log p_c + \epsilon (1 - p_c)`, with the same coefficients:

    .. math::
        \ell_i = (1-\epsilon_s) w_{y_i} \bigl[-\log p_{y_i} + \epsilon(1-p_{y_i})\bigr]
        + \frac{\epsilon_s}{C}\sum_c w_c \bigl[-\log p_c + \epsilon (1 - p_c)\bigr]

    so with label smoothing :math:`\epsilon_s` (and no weights) the Poly-1 term is the
    paper's :math:`\epsilon(1 - \langle q', p\rangle)`. Every argument of
    :func:`crossent.cross_entropy` in torch's order, plus keyword-only ``epsilon``
    (default 1; 0 gives cross-entropy exactly).

    >>> import torch, crossent
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> y = torch.tensor([0, 1])
    >>> extra = crossent.poly1_cross_entropy(logits, y) - crossent.cross_entropy(logits, y)
    >>> round(extra.item(), 4)          # mean of 1 - p_y
    0.3198
    """
    func = "poly1_cross_entropy"
    reduction = legacy_reduction(func, size_average, reduce, reduction)
    epsilon = check_epsilon(func, epsilon)
    return _softmax_family(
        func, input, target, weight, ignore_index, reduction, label_smoothing, validate, return_parts, backend, epsilon
    )
