"""``torch.nn``-compatible loss modules: thin shells over :mod:`crossent.functional`.

Each class *is* its torch counterpart (a subclass), so ``isinstance`` checks, buffers,
``state_dict`` keys and ``repr`` are torch's; only ``forward`` is crossent's. Options are
checked when the module is built, and buffers (``weight``, ``pos_weight``) move with
``.to(device)`` as in torch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from .. import functional as F
from ..functional._reduction import legacy_reduction

_SHARED_KWARGS = """
    Keyword Args:
        validate (bool, optional): run the value checks (targets in range, inputs that look
            like the wrong kind of scores). Default: on, unless ``CROSSENT_VALIDATE=0``.
        backend (str, optional): force an implementation (see ``crossent.backends``);
            default chooses per call.

    ``forward(input, target, *, return_parts=False)``: with ``return_parts=True`` returns a
    :class:`crossent.functional.LossParts` ``(loss, total, denominator)`` for exact epoch
    averages (``crossent.tracking.LossMeter``).
"""


def _not_scriptable(self):
    """``torch.jit.script`` calls this first: refuse with the alternatives instead of
    TorchScript's parse error on the keyword-only arguments."""
    name = type(self).__name__
    raise V.CrossentTypeError(
        f"torch.jit.script: crossent.nn.{name} cannot be compiled to TorchScript (its checks and "
        f"backend choice are Python). Use torch.compile, torch.export or torch.jit.trace, which "
        f"record crossent's registered ops (torch.ops.crossent.*), or torch.nn.{name} where "
        "TorchScript itself is required."
    )


def _set_bce_options(module, name: str, label_smoothing, ignore_index, validate, backend) -> None:
    """The options both BCE modules add to torch's, checked once, in one place."""
    V.check_weight_values_nonnegative(name, "pos_weight", module.pos_weight)
    module.label_smoothing = V.check_label_smoothing(name, label_smoothing)
    module.ignore_index = V.check_binary_ignore_index(name, ignore_index)
    module.validate = validate
    module.backend = backend


def _bce_forward(module, loss, input, target, return_parts, **options):
    """``forward`` of the BCE-shaped modules: the functional ``loss`` with the module's
    options (``options``: the loss's own, e.g. Poly-1's ``epsilon``)."""
    return loss(
        input,
        target,
        module.weight,
        **options,
        reduction=module.reduction,
        pos_weight=module.pos_weight,
        label_smoothing=module.label_smoothing,
        ignore_index=module.ignore_index,
        validate=module.validate,
        return_parts=return_parts,
        backend=module.backend,
    )


class BCELoss(torch.nn.BCELoss):
    r"""Binary cross-entropy between target and input probabilities.

    .. math::
        \ell_n = -w_n\,\bigl[p_w\,y_n \max(\log x_n, -100) + (1 - y_n) \max(\log(1 - x_n), -100)\bigr]

    Same arguments, defaults, buffers and results as :class:`torch.nn.BCELoss`; see
    :func:`crossent.functional.binary_cross_entropy` for the numerics.

    Args:
        weight (Tensor, number or sequence, optional): rescaling weight broadcast to the
            input's shape (numbers and sequences are a crossent extension).
        size_average, reduce: deprecated, as in torch (DeprecationWarning).
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default ``'mean'``.

    Keyword-only extensions: ``pos_weight`` (weight of positive targets, broadcast along
    the last dimension; a buffer like in ``BCEWithLogitsLoss``), ``label_smoothing``
    (targets become :math:`y(1-\epsilon)+\epsilon/2`), ``ignore_index`` (elements whose
    target equals it are left out of the sum and of the ``mean`` denominator).
    {shared}
    Shape:
        - Input: :math:`(*)`, probabilities in [0, 1].
        - Target: :math:`(*)`, same shape as the input; float, or 0/1 int/bool (cast).
        - Output: scalar; with ``reduction='none'``, :math:`(*)`.
    """

    def __init__(
        self,
        weight=None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        *,
        pos_weight=None,
        label_smoothing: float = 0.0,
        ignore_index: Optional[int] = None,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        name = type(self).__name__
        reduction = legacy_reduction(name, size_average, reduce, reduction)
        super().__init__(weight=V.as_weight_tensor(name, "weight", weight), reduction=reduction)
        self.register_buffer("pos_weight", V.as_weight_tensor(name, "pos_weight", pos_weight))
        _set_bce_options(self, name, label_smoothing, ignore_index, validate, backend)

    __prepare_scriptable__ = _not_scriptable

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return _bce_forward(self, F.binary_cross_entropy, input, target, return_parts)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    r"""Sigmoid and binary cross-entropy in one exact step.

    .. math::
        \ell_{n,c} = w_{n,c}\,\bigl[p_c\,y_{n,c}\,\mathrm{softplus}(-x_{n,c})
                     + (1 - y_{n,c})\,\mathrm{softplus}(x_{n,c})\bigr]

    where :math:`c` is the class (label) and :math:`p_c` its positive weight. Same
    arguments, defaults, buffers and results as :class:`torch.nn.BCEWithLogitsLoss`, but
    exact for small losses and finite at :math:`x = \pm\infty`
    (see :func:`crossent.functional.binary_cross_entropy_with_logits`).

    ``pos_weight`` trades recall for precision: a dataset with 100 positive and 300
    negative examples of a label gets ``pos_weight = 300 / 100 = 3`` for it, so the loss
    acts as if it held 300 positives.

    >>> import torch, crossent
    >>> criterion = crossent.nn.BCEWithLogitsLoss(pos_weight=[3.0])
    >>> round(criterion(torch.tensor([0.5]), torch.tensor([1.0])).item(), 4)
    1.4222

    Args:
        weight (Tensor, number or sequence, optional): rescaling weight broadcast to the input.
        size_average, reduce: deprecated, as in torch (DeprecationWarning).
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default ``'mean'``.
        pos_weight (Tensor, number or sequence, optional): weight of positive examples,
            broadcast along the last (label) dimension.

    Keyword-only extensions: ``label_smoothing`` and ``ignore_index`` as in :class:`BCELoss`.
    {shared}
    Shape:
        - Input: :math:`(*)`, raw logits.
        - Target: :math:`(*)`, same shape as the input.
        - Output: scalar; with ``reduction='none'``, :math:`(*)`.
    """

    def __init__(
        self,
        weight=None,
        size_average=None,
        reduce=None,
        reduction: str = "mean",
        pos_weight=None,
        *,
        label_smoothing: float = 0.0,
        ignore_index: Optional[int] = None,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
    ) -> None:
        name = type(self).__name__
        reduction = legacy_reduction(name, size_average, reduce, reduction)
        super().__init__(
            weight=V.as_weight_tensor(name, "weight", weight),
            reduction=reduction,
            pos_weight=V.as_weight_tensor(name, "pos_weight", pos_weight),
        )
        _set_bce_options(self, name, label_smoothing, ignore_index, validate, backend)

    __prepare_scriptable__ = _not_scriptable

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return _bce_forward(self, F.binary_cross_entropy_with_logits, input, target, return_parts)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""Cross-entropy between logits and class indices or class probabilities.

    .. math::
        \ell_n = (1-\epsilon)\,w_{y_n}\,(-\log p_{n,y_n}) + \frac{\epsilon}{C}\sum_c w_c\,(-\log p_{n,c}),
        \qquad p_{n,c} = \frac{e^{x_{n,c}}}{\sum_j e^{x_{n,j}}}

    ``mean`` divides by :math:`\sum_n w_{y_n}` over targets that are not ``ignore_index``.
    For class-probability targets :math:`q`,
    :math:`\ell_n = -\sum_c w_c\,q'_{n,c} \log p_{n,c}` with
    :math:`q' = (1-\epsilon) q + \epsilon / C`, and ``mean`` divides by the number of
    samples. Same arguments, defaults, buffers and results as
    :class:`torch.nn.CrossEntropyLoss`, exact when the right class wins by a wide margin
    (see :func:`crossent.functional.cross_entropy`).

    Args:
        weight (Tensor or sequence, optional): one weight per class, shape (C,).
        size_average, reduce: deprecated, as in torch (DeprecationWarning).
        ignore_index (int): class-index target value that is left out of the loss and of the
            ``mean`` denominator. Default -100.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default ``'mean'``.
        label_smoothing (float): in [0, 1]. Default 0.
        z_loss, softcap, temperature (keyword-only): LM-head options of
            :func:`crossent.functional.cross_entropy` (``docs/lm-head.md``); ``forward`` also
            takes ``token_weight=``, ``return_lse=``, ``return_accuracy=``.
    {shared}
    Shape:
        - Input: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`: raw logits,
          classes along dim 1 (for sequences (B, T, V) use ``input.transpose(1, 2)``).
        - Target: class indices of shape :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`
          in :math:`[0, C)` (any integer dtype), or class probabilities of the input's shape.
        - Output: scalar; with ``reduction='none'``, :math:`()`, :math:`(N)` or
          :math:`(N, d_1, ..., d_K)`.
    """

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
        inplace_backward: bool = False,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        temperature: float = 1.0,
    ) -> None:
        name = type(self).__name__
        V.check_lm_head_options(name, z_loss=z_loss, temperature=temperature, softcap=softcap)
        reduction = legacy_reduction(name, size_average, reduce, reduction)
        weight = V.as_weight_tensor(name, "weight", weight)
        if weight is not None and weight.dim() != 1:
            V.fail(
                name,
                "`weight` of shape (C,), one number per class",
                f"shape {V.shape_str(weight.shape)}",
                "Pass a 1-D tensor with one weight per class.",
            )
        super().__init__(
            weight=weight,
            ignore_index=V.check_ignore_index(name, ignore_index),
            reduction=reduction,
            label_smoothing=V.check_label_smoothing(name, label_smoothing),
        )
        V.check_weight_values_nonnegative(name, "weight", self.weight)
        self.validate = validate
        self.backend = backend
        self.inplace_backward = bool(inplace_backward)  # see crossent.functional.cross_entropy
        # LM-head options (docs/lm-head.md); per call: token_weight, return_lse, return_accuracy
        self.z_loss, self.softcap, self.temperature = z_loss, softcap, temperature

    __prepare_scriptable__ = _not_scriptable

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        return_parts: bool = False,
        token_weight: Optional[torch.Tensor] = None,
        return_lse: bool = False,
        return_accuracy: bool = False,
    ):
        lm = {}
        if (
            self.z_loss
            or self.softcap is not None
            or self.temperature != 1.0
            or token_weight is not None
            or return_lse
            or return_accuracy
        ):
            lm = dict(
                z_loss=self.z_loss,
                softcap=self.softcap,
                temperature=self.temperature,
                token_weight=token_weight,
                return_lse=return_lse,
                return_accuracy=return_accuracy,
            )
        return F.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            validate=self.validate,
            return_parts=return_parts,
            backend=self.backend,
            inplace_backward=self.inplace_backward,
            **lm,
        )


for _cls in (BCELoss, BCEWithLogitsLoss, CrossEntropyLoss):
    _cls.__doc__ = _cls.__doc__.replace("{shared}", "\n    " + _SHARED_KWARGS.strip() + "\n")
