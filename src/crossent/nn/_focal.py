"""Module shells of the focal, Poly-1 and asymmetric losses (see :mod:`crossent.functional`).

Options are checked when the module is built; ``weight`` and ``pos_weight`` are buffers
(they follow ``.to(device)`` and are in the ``state_dict``), as in torch's losses.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import functional as F
from ..functional._asymmetric import check_clip
from ..functional._focal import check_alpha, check_epsilon, check_gamma
from ..functional._reduction import legacy_reduction
from ._loss import _SHARED_KWARGS, _bce_forward, _not_scriptable


def _class_weight(name, weight):
    weight = V.as_weight_tensor(name, "weight", weight)
    if weight is not None and weight.dim() != 1:
        V.fail(
            name,
            "`weight` of shape (C,), one number per class",
            f"shape {V.shape_str(weight.shape)}",
            "Pass a 1-D tensor with one weight per class (e.g. crossent.class_weights.inverse_frequency).",
        )
    V.check_weight_values_nonnegative(name, "weight", weight)
    return weight


class SigmoidFocalLoss(torch.nn.Module):
    r"""Sigmoid focal loss on logits (Lin et al. 2017); torchvision's defaults.

    .. math::
        \ell_n = w_n\,\alpha_t\,(1 - p_t)^\gamma\,\bigl[p_w\,t_n\,\mathrm{softplus}(-x_n)
        + (1 - t_n)\,\mathrm{softplus}(x_n)\bigr]

    See :func:`crossent.functional.sigmoid_focal_loss` (exact ``1 - p_t``; ``gamma = 0``
    is BCE-with-logits).

    >>> import torch, crossent
    >>> criterion = crossent.nn.SigmoidFocalLoss(reduction="mean")
    >>> loss = criterion(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    >>> loss.item() < 0.01
    True

    Args:
        alpha (float): weight of positives in [0, 1] (negatives: 1 - alpha); < 0 disables it.
            Default 0.25.
        gamma (float): focusing exponent >= 0. Default 2.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default ``'none'`` (torchvision's).

    Keyword-only: ``weight`` and ``pos_weight`` (buffers, broadcast as in
    :class:`BCEWithLogitsLoss`), ``ignore_index``, ``label_smoothing``.
    {shared}

    Shape:
        - Input: :math:`(*)`, raw logits.
        - Target: :math:`(*)`, the same shape.
        - Output: scalar; with ``reduction='none'``, :math:`(*)`.
    """

    def __init__(
        self,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "none",
        *,
        weight=None,
        pos_weight=None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.alpha = check_alpha(name, alpha)
        self.gamma = check_gamma(name, gamma)
        self.reduction = legacy_reduction(name, None, None, reduction)
        self.register_buffer("weight", V.as_weight_tensor(name, "weight", weight))
        self.register_buffer("pos_weight", V.as_weight_tensor(name, "pos_weight", pos_weight))
        V.check_weight_values_nonnegative(name, "pos_weight", self.pos_weight)
        self.ignore_index = V.check_ignore_index(name, ignore_index)
        self.label_smoothing = V.check_label_smoothing(name, label_smoothing)
        self.validate = validate
        self.backend = backend

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return F.sigmoid_focal_loss(
            input,
            target,
            self.alpha,
            self.gamma,
            self.reduction,
            weight=self.weight,
            pos_weight=self.pos_weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            validate=self.validate,
            return_parts=return_parts,
            backend=self.backend,
        )


class SoftmaxFocalLoss(torch.nn.Module):
    r"""Softmax (multi-class) focal loss: :class:`CrossEntropyLoss` with each class term
    :math:`-\log p_c` scaled by :math:`(1 - p_c)^\gamma`.

    See :func:`crossent.functional.softmax_focal_loss`; arguments, shapes and the ``mean``
    denominator are :class:`CrossEntropyLoss`'s, plus ``gamma`` (first, default 2).

    >>> import torch, crossent
    >>> criterion = crossent.nn.SoftmaxFocalLoss(gamma=2.0)
    >>> round(criterion(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])).item(), 4)
    0.0111

    {shared}"""

    def __init__(
        self,
        gamma: float = 2.0,
        weight=None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.gamma = check_gamma(name, gamma)
        self.register_buffer("weight", _class_weight(name, weight))
        self.ignore_index = V.check_ignore_index(name, ignore_index)
        self.reduction = legacy_reduction(name, None, None, reduction)
        self.label_smoothing = V.check_label_smoothing(name, label_smoothing)
        self.validate = validate
        self.backend = backend

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return F.softmax_focal_loss(
            input,
            target,
            self.gamma,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            validate=self.validate,
            return_parts=return_parts,
            backend=self.backend,
        )


class Poly1CrossEntropyLoss(torch.nn.Module):
    r"""Poly-1 cross-entropy (Leng et al. 2022): :class:`CrossEntropyLoss` plus
    :math:`\epsilon (1 - p_t)`; every argument of :class:`CrossEntropyLoss` and keyword-only
    ``epsilon`` (default 1). See :func:`crossent.functional.poly1_cross_entropy`.

    >>> import torch, crossent
    >>> criterion = crossent.nn.Poly1CrossEntropyLoss(epsilon=1.0)
    >>> round(criterion(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])).item(), 4)
    0.4557

    {shared}"""

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        epsilon: float = 1.0,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.reduction = legacy_reduction(name, size_average, reduce, reduction)
        self.register_buffer("weight", _class_weight(name, weight))
        self.ignore_index = V.check_ignore_index(name, ignore_index)
        self.label_smoothing = V.check_label_smoothing(name, label_smoothing)
        self.epsilon = check_epsilon(name, epsilon)
        self.validate = validate
        self.backend = backend

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return F.poly1_cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            epsilon=self.epsilon,
            validate=self.validate,
            return_parts=return_parts,
            backend=self.backend,
        )


class Poly1BCEWithLogitsLoss(torch.nn.Module):
    r"""Poly-1 BCE on logits: :class:`BCEWithLogitsLoss` plus :math:`\epsilon (1 - p_t)`;
    every argument of :class:`BCEWithLogitsLoss` and keyword-only ``epsilon`` (default 1).
    See :func:`crossent.functional.poly1_binary_cross_entropy_with_logits`.

    >>> import torch, crossent
    >>> criterion = crossent.nn.Poly1BCEWithLogitsLoss(pos_weight=[3.0])
    >>> round(criterion(torch.tensor([0.5]), torch.tensor([1.0])).item(), 4)
    1.7998

    {shared}"""

    def __init__(
        self,
        weight=None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight=None,
        *,
        epsilon: float = 1.0,
        label_smoothing: float = 0.0,
        ignore_index: Optional[int] = None,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.reduction = legacy_reduction(name, size_average, reduce, reduction)
        self.register_buffer("weight", V.as_weight_tensor(name, "weight", weight))
        self.register_buffer("pos_weight", V.as_weight_tensor(name, "pos_weight", pos_weight))
        V.check_weight_values_nonnegative(name, "pos_weight", self.pos_weight)
        self.epsilon = check_epsilon(name, epsilon)
        self.label_smoothing = V.check_label_smoothing(name, label_smoothing)
        self.ignore_index = V.check_ignore_index(name, ignore_index)
        self.validate = validate
        self.backend = backend

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return _bce_forward(
            self, F.poly1_binary_cross_entropy_with_logits, input, target, return_parts, epsilon=self.epsilon
        )


class AsymmetricLoss(torch.nn.Module):
    r"""Asymmetric loss for multi-label logits (Ridnik et al. 2021), stable for every logit.

    .. math::
        \ell_n = w_n\,\bigl[t_n (1-p_n)^{\gamma_+}(-\log p_n) + (1-t_n)\,p_{m,n}^{\gamma_-}(-\log(1-p_{m,n}))\bigr],
        \qquad p_{m} = \max(p - \mathrm{clip}, 0)

    See :func:`crossent.functional.asymmetric_loss`.

    >>> import torch, crossent
    >>> criterion = crossent.nn.AsymmetricLoss()
    >>> criterion(torch.tensor([[3.0, -2.0]]), torch.tensor([[1.0, 0.0]])).item() < 0.01
    True

    Args:
        gamma_neg (float): focusing exponent of negatives. Default 4.
        gamma_pos (float): focusing exponent of positives. Default 1.
        clip (float or None): probability margin of negatives in [0, 1). Default 0.05.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default ``'mean'``.

    Keyword-only: ``weight`` (buffer, broadcast), ``ignore_index``, ``validate``.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: Optional[float] = 0.05,
        reduction: str = "mean",
        *,
        weight=None,
        ignore_index: Optional[int] = None,
        validate: Optional[bool] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.gamma_neg = check_gamma(name, gamma_neg, "gamma_neg")
        self.gamma_pos = check_gamma(name, gamma_pos, "gamma_pos")
        self.clip = check_clip(name, clip)
        self.reduction = legacy_reduction(name, None, None, reduction)
        self.register_buffer("weight", V.as_weight_tensor(name, "weight", weight))
        self.ignore_index = V.check_ignore_index(name, ignore_index)
        self.validate = validate

    __prepare_scriptable__ = _not_scriptable

    def extra_repr(self) -> str:
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, reduction={self.reduction!r}"

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return F.asymmetric_loss(
            input,
            target,
            self.gamma_neg,
            self.gamma_pos,
            self.clip,
            self.reduction,
            weight=self.weight,
            ignore_index=self.ignore_index,
            validate=self.validate,
            return_parts=return_parts,
        )


for _cls in (SigmoidFocalLoss, SoftmaxFocalLoss, Poly1CrossEntropyLoss, Poly1BCEWithLogitsLoss):
    _cls.__doc__ = _cls.__doc__.replace("{shared}", "\n    " + _SHARED_KWARGS.strip() + "\n")
