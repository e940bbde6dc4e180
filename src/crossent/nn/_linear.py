"""Fused classifier head + loss modules: they *own* the ``nn.Linear`` (as torch 2.13 does).

Decision: :class:`LinearCrossEntropyLoss` wraps a Linear, exactly like
``torch.nn.LinearCrossEntropyLoss`` (same constructor, the weight in ``self.linear``, same
``state_dict`` keys), and is a subclass of it where torch has it, so swapping the import
is enough. To call the fused loss with a weight you hold elsewhere (a tied embedding, an
``lm_head``), use :func:`crossent.linear_cross_entropy` directly.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _validation as V
from .. import functional as F
from ._loss import _not_scriptable

_TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class _LCEBase(torch.nn.Module):
    """Stand-in for torch < 2.13, which has no ``torch.nn.LinearCrossEntropyLoss``."""

    def __init__(
        self,
        in_features,
        num_classes,
        *,
        out_features=(),
        bias=False,
        device=None,
        dtype=None,
        reduction="mean",
        weight=None,
        ignore_index=None,
        label_smoothing=0.0,
        options=None,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(
            in_features, math.prod(out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )
        self.options = options


_Base = _TorchLCE if _TorchLCE is not None else _LCEBase


class LinearCrossEntropyLoss(_Base):
    r"""A classifier head and its cross-entropy in one step, never storing the logits.

    .. math:: \ell_n = \mathrm{CE}(W h_n + b,\; y_n)

    with every option of :class:`crossent.nn.CrossEntropyLoss`; computed by
    :func:`crossent.linear_cross_entropy` in blocks (memory: a few ``R x Cc`` blocks
    instead of ``N x C`` logits and their gradient). The arguments are
    ``torch.nn.LinearCrossEntropyLoss``'s.

    Args:
        in_features (int): size of each input sample (the hidden size H).
        num_classes (int): C.
        out_features (tuple, keyword): ``(d_1, ..., d_K)`` for a K-dimensional loss.
        bias (bool, keyword): learnable bias. Default False.
        device, dtype: of the Linear's parameters.
        reduction, weight, label_smoothing: as in :class:`crossent.nn.CrossEntropyLoss`.
        ignore_index: as there; None means -100.
        options: ``torch.nn.LinearCrossEntropyOptions`` or None; only ``batch_chunk_size``
            is used.

    Keyword-only crossent options: ``validate``, ``backend``, ``chunk_size``,
    ``class_chunk_size``, ``memory_budget`` (see :func:`crossent.linear_cross_entropy`).

    LM-head options (``docs/lm-head.md``): ``z_loss``, ``softcap``, ``temperature`` here;
    ``token_weight`` and ``return_accuracy`` per call.

    ``forward(input, target, *, return_parts=False, return_lse=False, token_weight=None,
    return_accuracy=False)``.

    Shape:
        - Input: :math:`(H)`, :math:`(N, H)`, or :math:`(*, H)` (crossent extension).
        - Target: as for ``CrossEntropyLoss`` on logits :math:`(N, C, d_1..d_K)`, or
          :math:`(*)` / :math:`(*, C)` for :math:`(*, H)` inputs.
        - Output: scalar; with ``reduction='none'`` the target's index shape.

    >>> import torch, crossent
    >>> _ = torch.manual_seed(0)
    >>> head = crossent.nn.LinearCrossEntropyLoss(4, 10)
    >>> h = torch.randn(3, 4, requires_grad=True)
    >>> loss = head(h, torch.tensor([1, 5, 9]))
    >>> loss.backward()
    >>> bool(torch.allclose(loss, crossent.cross_entropy(head.linear(h), torch.tensor([1, 5, 9]))))
    True
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: Tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[torch.Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
        chunk_size: Optional[int] = None,
        class_chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        temperature: float = 1.0,
    ) -> None:
        name = type(self).__name__
        V.check_lm_head_options(name, z_loss=z_loss, temperature=temperature, softcap=softcap)
        reduction = V.check_reduction(name, reduction)
        label_smoothing = V.check_label_smoothing(name, label_smoothing)
        ignore_index = V.check_ignore_index(name, ignore_index)
        weight = V.as_weight_tensor(name, "weight", weight)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            V.fail(
                name,
                f"`weight` of shape ({num_classes},), one number per class",
                f"shape {V.shape_str(weight.shape)}",
                f"Pass weight=torch.ones({num_classes}) scaled per class.",
            )
        for arg, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                V.fail(name, f"`{arg}` to be a positive int", repr(v), "")
        super().__init__(
            in_features,
            num_classes,
            out_features=tuple(out_features),
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
        )
        V.check_weight_values_nonnegative(name, "weight", self.weight)
        self.validate = validate
        self.backend = backend
        self.chunk_size = chunk_size
        self.class_chunk_size = class_chunk_size
        self.memory_budget = memory_budget
        # LM-head options (docs/lm-head.md); per call: token_weight, return_accuracy
        self.z_loss, self.softcap, self.temperature = z_loss, softcap, temperature

    __prepare_scriptable__ = _not_scriptable

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        return_parts: bool = False,
        return_lse: bool = False,
        token_weight: Optional[torch.Tensor] = None,
        return_accuracy: bool = False,
    ):
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (
            None if self.linear.bias is None else self.linear.bias.reshape((self.num_classes, *self.out_features))
        )
        return F.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            validate=self.validate,
            return_parts=return_parts,
            return_lse=return_lse,
            backend=self.backend,
            chunk_size=self.chunk_size,
            class_chunk_size=self.class_chunk_size,
            memory_budget=self.memory_budget,
            z_loss=self.z_loss,
            softcap=self.softcap,
            temperature=self.temperature,
            token_weight=token_weight,
            return_accuracy=return_accuracy,
        )


class LinearBCEWithLogitsLoss(torch.nn.Module):
    r"""A multi-label head and its BCE-with-logits in one step, never storing the logits.

    .. math:: \ell_{n,j} = \mathrm{BCEWithLogits}\bigl((W h_n + b)_j,\; t_{n,j}\bigr)

    Built like :class:`LinearCrossEntropyLoss` (owns ``self.linear``); buffers ``weight``
    and ``pos_weight`` as in :class:`crossent.nn.BCEWithLogitsLoss`. ``forward(input,
    target, *, return_parts=False)`` takes dense ``(*, L)`` targets or sparse ``(*, P)``
    positive-label ids padded with -1 (see
    :func:`crossent.linear_binary_cross_entropy_with_logits`).
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight=None,
        pos_weight=None,
        label_smoothing: float = 0.0,
        ignore_index: Optional[int] = None,
        target_format: Optional[str] = None,
        validate: Optional[bool] = None,
        backend: Optional[str] = None,
        chunk_size: Optional[int] = None,
        class_chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.reduction = V.check_reduction(name, reduction)
        self.label_smoothing = V.check_label_smoothing(name, label_smoothing)
        self.ignore_index = V.check_binary_ignore_index(name, ignore_index)
        self.register_buffer("weight", V.as_weight_tensor(name, "weight", weight))
        self.register_buffer("pos_weight", V.as_weight_tensor(name, "pos_weight", pos_weight))
        V.check_weight_values_nonnegative(name, "pos_weight", self.pos_weight)
        self.linear = torch.nn.Linear(in_features, num_labels, bias=bias, device=device, dtype=dtype)
        self.target_format = target_format
        self.validate, self.backend = validate, backend
        self.chunk_size, self.class_chunk_size, self.memory_budget = chunk_size, class_chunk_size, memory_budget

    __prepare_scriptable__ = _not_scriptable

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, return_parts: bool = False):
        return F.linear_binary_cross_entropy_with_logits(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            target_format=self.target_format,
            validate=self.validate,
            return_parts=return_parts,
            backend=self.backend,
            chunk_size=self.chunk_size,
            class_chunk_size=self.class_chunk_size,
            memory_budget=self.memory_budget,
        )
