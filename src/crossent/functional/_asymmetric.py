"""Asymmetric loss (ASL) for multi-label classification, computed stably from logits."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..backends.reference import _softplus, _times, sanitise_ignored
from ._binary import _prepare as _prepare_binary
from ._focal import check_gamma
from ._reduction import legacy_reduction, no_autocast, reduce_loss


def check_clip(func: str, clip) -> float:
    """ASL's probability margin: in [0, 1); None means 0."""
    if clip is None:
        return 0.0
    return V.check_real(
        func,
        "clip",
        clip,
        lambda v: 0 <= v < 1,
        "a number in [0, 1) or None",
        "clip shifts the probability of negatives down by that margin; Ridnik et al. use clip=0.05 "
        "(default); 0 or None switches it off.",
    )


def asymmetric_terms(x: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float):
    """(positive term, negative term) of ASL per element, differentiable torch ops.

    Positive: :math:`(1-p)^{\\gamma_+}(-\\log p) = e^{-\\gamma_+ \\mathrm{softplus}(x)}\\,\\mathrm{softplus}(-x)`.
    Negative with ``clip = 0``: :math:`p^{\\gamma_-}(-\\log(1-p)) = e^{-\\gamma_- \\mathrm{softplus}(-x)}\\,
    \\mathrm{softplus}(x)`; with a margin, :math:`p_m = \\max(p - m, 0)` and
    :math:`p_m^{\\gamma_-}(-\\mathrm{log1p}(-p_m))`, where :math:`-\\log(1 - p_m) \\le -\\log m` is
    bounded. ``p_m = 0`` is selected with ``torch.where`` on safe values, so no ``0 * inf``
    reaches the gradient.
    """
    sp_pos, sp_neg = _softplus(x), _softplus(-x)
    pos = sp_neg if gamma_pos == 0 else torch.exp(-gamma_pos * sp_pos) * sp_neg
    if clip == 0:
        neg = sp_pos if gamma_neg == 0 else torch.exp(-gamma_neg * sp_neg) * sp_pos
        return pos, neg
    p_m = torch.clamp(torch.sigmoid(x) - clip, min=0.0)
    live = p_m > 0
    safe = torch.where(live, p_m, 0.5)
    neg = -torch.log1p(-safe)
    if gamma_neg != 0:
        neg = torch.exp(gamma_neg * torch.log(safe)) * neg
    return pos, torch.where(live, neg, torch.zeros((), dtype=x.dtype, device=x.device))


def asymmetric_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: Optional[float] = 0.05,
    reduction: str = "mean",
    *,
    weight: Optional[torch.Tensor] = None,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
):
    r"""Asymmetric loss (Ridnik et al. 2021) for multi-label logits, stable for every logit.

    With :math:`p = \sigma(x)` and the shifted probability :math:`p_m = \max(p - m, 0)`
    (``clip`` :math:`= m`):

    .. math::
        \ell_i = w_i\,\bigl[t_i\,(1-p_i)^{\gamma_+}\,(-\log p_i)
        + (1-t_i)\,p_{m,i}^{\gamma_-}\,(-\log(1 - p_{m,i}))\bigr]

    The reference implementation takes ``log(sigmoid(x).clamp(min=1e-8))``: its loss stops
    at 18.4 for logits below -18.4 and its gradient there is 0, so the worst mistakes stop
    being corrected. Here :math:`-\log p = \mathrm{softplus}(-x)` and
    :math:`(1-p)^{\gamma_+} = e^{-\gamma_+ \mathrm{softplus}(x)}`: exact and finite for every
    finite logit. For hard targets the values equal the reference's ``-loss`` element by
    element where it is accurate (``reduction='sum'`` is its return value); soft targets
    weight each term separately (the reference mixes both focusing exponents). ``mean``
    divides by the number of (non-ignored) elements. ``gamma_neg = gamma_pos = 0``,
    ``clip = 0`` is exactly :func:`binary_cross_entropy_with_logits`.

    Keyword-only: ``weight`` (per element, broadcast), ``ignore_index``, ``validate``,
    ``return_parts``. Shapes: input and target :math:`(N, L)` or any :math:`(*)`, the same.

    >>> import torch, crossent
    >>> x = torch.tensor([[3.0, -2.0, 0.5], [-40.0, 1.0, -3.0]])
    >>> t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    >>> round(crossent.asymmetric_loss(x, t, reduction="none")[1, 0].item(), 3)   # reference: 18.421
    40.0
    """
    func = "asymmetric_loss"
    gamma_neg = check_gamma(func, gamma_neg, "gamma_neg")
    gamma_pos = check_gamma(func, gamma_pos, "gamma_pos")
    clip = check_clip(func, clip)
    reduction = legacy_reduction(func, None, None, reduction)
    c = _prepare_binary(func, input, target, weight, None, ignore_index, 0.0, reduction, False, validate)
    x, t, weight, keep = c.x, c.t, c.weight, c.keep
    with no_autocast(x.device):
        x = sanitise_ignored(x, keep)
        pos, neg = asymmetric_terms(x, gamma_neg, gamma_pos, clip)
        loss = _times(t, pos) + _times(1 - t, neg)
        if weight is not None:
            loss = loss * weight
        if keep is not None:
            loss = torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return reduce_loss(
        loss, c.denominator, c.reduction, out_dtype=c.out_dtype, return_parts=return_parts, capture=c.capture
    )
