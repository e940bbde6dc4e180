r"""Probabilities and predictions from logits: sigmoid heads, softmax heads, and the bridge.
Design notes: ``docs/design.md``, section ``crossent.probabilities``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validation as V
from ._dtypes import compute_dtype

__all__ = [
    "binary_probabilities",
    "binary_class_probabilities",
    "binary_predictions",
    "multilabel_probabilities",
    "multilabel_predictions",
    "multiclass_probabilities",
    "multiclass_predictions",
    "two_logits_to_one",
    "one_logit_to_two",
    "two_logit_head_to_one",
    "one_logit_head_to_two",
]


def _check_logits(func: str, logits) -> None:
    V.check_floating_input(func, logits)


def _check_threshold(func: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        V.fail(
            func,
            "`threshold` to be a float in (0, 1)",
            type(threshold).__name__,
            "Pass a probability such as threshold=0.5.",
            V.CrossentTypeError,
        )
    t = float(threshold)
    if not 0.0 < t < 1.0:
        V.fail(
            func,
            "`threshold` in (0, 1) (a probability, not a logit)",
            repr(threshold),
            "0.5 is the usual choice; a threshold of 0 or 1 would predict one class for every sample.",
        )
    return t


def _logit(p: float) -> float:
    """log(p / (1 - p)) in float64 (exact enough for any threshold a user types)."""
    return math.log(p) - math.log1p(-p)


def _check_one_logit(func: str, logits: torch.Tensor) -> None:
    """A binary head gives one logit per sample: (N,), (N, 1) or (N, 1, d1, ...) / (N, d1, ...)."""
    if logits.dim() == 2 and logits.shape[1] >= 2:
        fix = "A binary head gives one logit per sample, shape (N,) or (N, 1). "
        if logits.shape[1] == 2:
            fix += (
                "For a 2-logit softmax head use multiclass_probabilities(z)[:, 1] or "
                "torch.sigmoid(two_logits_to_one(z)): a sigmoid of each of the two logits "
                "separately is not a probability of anything. "
            )
        fix += "For several independent labels use multilabel_probabilities / multilabel_predictions."
        V.fail(
            func,
            "one logit per sample",
            f"shape {V.shape_str(logits.shape)} ({logits.shape[1]} logits per sample)",
            fix,
        )


def binary_probabilities(logits: torch.Tensor) -> torch.Tensor:
    r"""Probability of the positive class, :math:`\sigma(z)`, from a 1-logit binary head.

    Args:
        logits: shape :math:`(N)`, :math:`(N, 1)` or with extra dimensions
            (:math:`(N, d_1, \dots)`), raw scores (what ``BCEWithLogitsLoss`` takes).

    Returns:
        :math:`P(y=1)`, same shape and dtype.

    >>> import torch
    >>> [round(p, 4) for p in binary_probabilities(torch.tensor([-2.34, 0.0, 3.45])).tolist()]
    [0.0879, 0.5, 0.9692]
    """
    func = "binary_probabilities"
    _check_logits(func, logits)
    _check_one_logit(func, logits)
    return torch.sigmoid(logits)


def binary_class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    r"""Both class probabilities :math:`(\sigma(-z), \sigma(z))` of a 1-logit head, stacked last.

    Equal to ``softmax(one_logit_to_two(z))``. :math:`P(y=0)` is :math:`\sigma(-z)`, not
    :math:`1-\sigma(z)`: at :math:`z = 20` float32 gives ``2.06e-9`` instead of ``0``.

    Args:
        logits: shape :math:`(N)` or :math:`(N, 1)` (the trailing 1 of a 2-D input is dropped).

    Returns:
        shape :math:`(N, 2)`; each row sums to 1.

    >>> import torch
    >>> p = binary_class_probabilities(torch.tensor([20.0]))
    >>> f"{p[0, 0].item():.3g}", (1 - torch.sigmoid(torch.tensor([20.0]))).item()
    ('2.06e-09', 0.0)
    """
    func = "binary_class_probabilities"
    _check_logits(func, logits)
    _check_one_logit(func, logits)
    z = logits.squeeze(-1) if logits.dim() == 2 and logits.shape[-1] == 1 else logits
    return torch.stack([torch.sigmoid(-z), torch.sigmoid(z)], dim=-1)


def binary_predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    r"""0/1 predictions (int64) of a 1-logit head: 1 where :math:`\sigma(z) > t`.

    Decided on the logit scale, :math:`z > \log(t / (1 - t))` (for ``t = 0.5``: ``z > 0``), so
    rounding in the sigmoid never flips a prediction. A logit exactly at the threshold
    predicts 0. NaN logits predict 0 (compare with ``torch.isnan`` if that matters).

    Args:
        logits: as for :func:`binary_probabilities`.
        threshold: probability above which the positive class is predicted, in (0, 1).

    Returns:
        int64 tensor of the logits' shape.
    """
    func = "binary_predictions"
    _check_logits(func, logits)
    _check_one_logit(func, logits)
    cut = _logit(_check_threshold(func, threshold))
    return (logits > cut).long()


def multilabel_probabilities(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-label probabilities :math:`\sigma(z_{n,l})` of a multi-label head (``BCEWithLogitsLoss``).

    Each label is its own yes/no question, so a row need not sum to 1.

    Args:
        logits: shape :math:`(N, L)` or any shape (element-wise).

    Returns:
        same shape and dtype.
    """
    _check_logits("multilabel_probabilities", logits)
    return torch.sigmoid(logits)


def multilabel_predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-label 0/1 predictions (int64): 1 where the label's probability exceeds ``threshold``.

    Decided on the logit scale as in :func:`binary_predictions`.
    """
    func = "multilabel_predictions"
    _check_logits(func, logits)
    cut = _logit(_check_threshold(func, threshold))
    return (logits > cut).long()


def _class_dim(func: str, logits: torch.Tensor, dim: Optional[int]) -> int:
    if logits.dim() == 0:
        V.fail(
            func,
            "logits of shape (C,), (N, C) or (N, C, d1, ...)",
            "a 0-dim tensor",
            "A single logit is a binary head: use binary_probabilities.",
        )
    d = (1 if logits.dim() >= 2 else 0) if dim is None else dim
    if not -logits.dim() <= d < logits.dim():
        V.fail(
            func,
            f"`dim` in [{-logits.dim()}, {logits.dim() - 1}]",
            repr(dim),
            "Pass the dimension that holds the classes.",
        )
    if logits.shape[d] == 1:
        V.fail(
            func,
            "at least 2 classes along the class dimension",
            f"shape {V.shape_str(logits.shape)} with 1 logit along dim {d}",
            "softmax over one logit is always 1. A 1-logit head is binary: use "
            "binary_probabilities / binary_predictions.",
        )
    return d


def multiclass_probabilities(logits: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    r"""Class probabilities :math:`\mathrm{softmax}(z)` of a multi-class head (``CrossEntropyLoss``).

    Args:
        logits: shape :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, \dots)`.
        dim: the class dimension; default as ``CrossEntropyLoss``: 1, or 0 for a 1-D input.

    Returns:
        same shape; sums to 1 along ``dim``. Computed in float32 for fp16/bf16 logits and
        returned in their dtype.
    """
    func = "multiclass_probabilities"
    _check_logits(func, logits)
    d = _class_dim(func, logits, dim)
    return torch.softmax(logits, dim=d, dtype=compute_dtype(logits.dtype)).to(logits.dtype)


def multiclass_predictions(logits: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Predicted class indices (int64): the argmax along the class dimension (first on ties).

    The softmax is monotonic, so the argmax of the logits is the argmax of the probabilities.

    Returns:
        shape :math:`()`, :math:`(N)` or :math:`(N, d_1, \\dots)`: the target shape of
        ``CrossEntropyLoss``.
    """
    func = "multiclass_predictions"
    _check_logits(func, logits)
    return logits.argmax(dim=_class_dim(func, logits, dim))


def two_logits_to_one(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""The 1-logit equivalent :math:`z_1 - z_0` of a 2-logit softmax head.

    ``sigmoid(two_logits_to_one(z)) == softmax(z)[..., 1]`` and
    ``binary_cross_entropy_with_logits(two_logits_to_one(z), y) == cross_entropy(z, y)``.

    Args:
        logits: a tensor with size 2 along ``dim`` (default the last, as for ``(N, 2)``).

    Returns:
        the logits' shape without ``dim``.
    """
    func = "two_logits_to_one"
    _check_logits(func, logits)
    if logits.dim() == 0 or logits.shape[dim] != 2:
        V.fail(
            func,
            "exactly 2 logits along `dim`",
            f"shape {V.shape_str(logits.shape)} (dim={dim})",
            "This converts a 2-class softmax head; for C > 2 classes there is no single logit.",
        )
    z0, z1 = logits.unbind(dim)
    return z1 - z0


def one_logit_to_two(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""A 2-logit softmax head :math:`(0, z)` equivalent to the 1-logit head :math:`z`.

    ``softmax(one_logit_to_two(z))[..., 1] == sigmoid(z)``, and
    ``two_logits_to_one(one_logit_to_two(z)) == z`` exactly (:math:`z - 0`). A trailing
    dimension of size 1 of a 2-D input (shape :math:`(N, 1)`) is replaced, not kept.

    Args:
        logits: shape :math:`(N)` or :math:`(N, 1)` (or any shape; the pair is stacked at ``dim``).
    """
    func = "one_logit_to_two"
    _check_logits(func, logits)
    z = logits.squeeze(-1) if logits.dim() == 2 and logits.shape[-1] == 1 else logits
    return torch.stack([torch.zeros_like(z), z], dim=dim)


def _check_linear(func: str, head, out_features: int) -> None:
    if not isinstance(head, torch.nn.Linear):
        V.fail(
            func,
            "a torch.nn.Linear head",
            type(head).__name__,
            "Convert the last Linear layer of the model.",
            V.CrossentTypeError,
        )
    if head.out_features != out_features:
        V.fail(
            func,
            f"a Linear head with out_features={out_features}",
            f"out_features={head.out_features}",
            "two_logit_head_to_one takes a 2-output head, one_logit_head_to_two a 1-output head.",
        )


def two_logit_head_to_one(head: torch.nn.Linear) -> torch.nn.Linear:
    """A 1-output ``nn.Linear`` whose logit is :math:`z_1 - z_0` of the given 2-output head.

    Weight row ``W[1] - W[0]``, bias ``b[1] - b[0]``: the new head's logit equals
    ``two_logits_to_one(head(h))`` up to rounding (the difference is taken on the weights,
    not on the outputs). Same dtype and device; the new parameters are independent copies.
    """
    _check_linear("two_logit_head_to_one", head, 2)
    new = torch.nn.Linear(
        head.in_features, 1, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(head.weight[1:2] - head.weight[0:1])
        if head.bias is not None:
            new.bias.copy_(head.bias[1:2] - head.bias[0:1])
    return new


def one_logit_head_to_two(head: torch.nn.Linear) -> torch.nn.Linear:
    """A 2-output ``nn.Linear`` head giving logits :math:`(0, z)` for the 1-output head :math:`z`.

    Row 0 (weights and bias) is zero, row 1 is a copy of the head, so ``new(h)[:, 0]`` is
    exactly 0 and ``new(h)[:, 1]`` is ``head(h)`` (up to the rounding of a matrix product of a
    different shape): ``softmax(new(h))[:, 1] = sigmoid(head(h))``. Useful to
    start a ``CrossEntropyLoss`` head from the same function as a ``BCEWithLogitsLoss`` head
    (the demo does this). Note that plain SGD then moves :math:`z_1 - z_0` twice as fast as
    it moves the 1-logit head (both rows get the gradient, with opposite signs).
    """
    _check_linear("one_logit_head_to_two", head, 1)
    new = torch.nn.Linear(
        head.in_features, 2, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[1:2].copy_(head.weight)
        if head.bias is not None:
            new.bias.zero_()
            new.bias[1:2].copy_(head.bias)
    return new
