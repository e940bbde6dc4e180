"""Binary cross-entropy on probabilities and on logits (``torch.nn.functional`` drop-ins)."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Union, overload

import torch

from .. import _validation as V
from .._capture import capturing
from ..backends import backend_for, ops, resolve
from ._reduction import (
    LossParts,
    autocast_inputs,
    no_autocast,
    compute_dtype,
    legacy_reduction,
    mean_grad_scale,
    reduce_loss,
)


class BinaryCall(NamedTuple):
    """One BCE call after validation and canonicalisation: what the backend and the
    shared reduction need (``out_dtype`` is torch's result dtype)."""

    reduction: str
    x: torch.Tensor
    t: torch.Tensor
    weight: Optional[torch.Tensor]
    pos_weight: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    denominator: Optional[torch.Tensor]
    capture: bool
    out_dtype: torch.dtype


def _prepare(
    func, input, target, weight, pos_weight, ignore_index, label_smoothing, reduction, probabilities_in, validate
) -> BinaryCall:
    """Validate and canonicalise once (autocast policy included): returns what the backend
    needs. ``reduction`` is already resolved from the legacy ``size_average``/``reduce``."""
    input, target, weight, pos_weight = autocast_inputs(input, target, weight, pos_weight)
    capture = capturing(input)
    V.check_floating_input(func, input)
    given_target = target
    target = V.check_binary_target(func, input, target)
    # torch's result dtype: the input's for probabilities; on logits the dtype of a floating
    # target (torch's kernel works in place on ``1 - target``: float32 input with a float16
    # target gives float16). Integer and bool targets (an extension) give the input's dtype.
    floating_target = given_target.is_floating_point()
    out_dtype = given_target.dtype if floating_target and not probabilities_in else input.dtype
    label_smoothing = V.check_label_smoothing(func, label_smoothing)
    ignore_index = V.check_binary_ignore_index(func, ignore_index)
    weight = V.as_weight_tensor(func, "weight", weight, like=input)
    pos_weight = V.as_weight_tensor(func, "pos_weight", pos_weight, like=input)
    V.check_same_device(func, input, target=target, weight=weight, pos_weight=pos_weight)
    per_element = lambda: (
        "Per-element weights need the input's shape (or a shape that broadcasts to it, "
        f"e.g. {V.shape_str(input.shape[-1:])} for one weight per label)."
    )
    per_label = lambda: (
        "One weight per label, along the last dimension: use pos_weight of shape "
        f"({input.shape[-1] if input.dim() else 1},) (e.g. num_negatives / num_positives per label)."
    )
    for name, value, fix in (("weight", weight, per_element), ("pos_weight", pos_weight, per_label)):
        V.check_broadcastable(func, name, value, input.shape, "the input's shape", fix)
    keep = None
    if ignore_index is not None:
        keep = target != ignore_index
    if V.validation_enabled(validate):
        if capture:  # device-side assertions: no host read, no graph break
            V.assert_binary_values(func, input, target, keep, probabilities_in=probabilities_in)
        else:
            V.check_binary_values(func, input, target, keep, probabilities_in=probabilities_in)
    cdt = compute_dtype(input.dtype if input.dtype == target.dtype else torch.promote_types(input.dtype, target.dtype))
    x = input if input.dtype == cdt else input.to(cdt)
    t = target if target.dtype == cdt else target.to(cdt)
    if keep is not None:
        t = torch.where(keep, t, torch.zeros((), dtype=cdt, device=t.device))
    if label_smoothing:
        t = t * (1 - label_smoothing) + label_smoothing / 2
    weight = None if weight is None else weight.to(cdt)
    pos_weight = None if pos_weight is None else pos_weight.to(cdt)
    denominator = None if keep is None else keep.sum()
    return BinaryCall(reduction, x, t, weight, pos_weight, keep, denominator, capture, out_dtype)


def _run_backend(op, x, t, weight, pos_weight, keep, denominator, reduction, backend, capture):
    """Per-element losses, or their 0-dim sum when the backend offers it and the reduction
    does not need the elements (fused backends then skip a full-size loss buffer, and may
    pre-scale the gradient by the grad_output a plain ``backward()`` sends); the
    denominator of ``mean`` is unchanged. A captured call runs the registered op."""
    if capture:
        # BCE on probabilities usually follows a sigmoid (or softmax) in the same graph:
        # traced as its formulas, the compiler fuses the two (one pass, like torch's own
        # compiled composition); the registered op would be a wall between them.
        fuse = op == "binary_cross_entropy" and backend is None and torch.compiler.is_compiling()
        name = "reference" if fuse else resolve(op, x.device, backend)
        # 'mean' / 'sum' take the op's 0-dim total (no per-element buffer); the mean's
        # denominator stays a tensor (no host read, no shape specialisation)
        total = reduction != "none"
        loss = ops.binary_cross_entropy(
            x, t, weight, pos_weight, keep, logits=op.endswith("logits"), backend=name, total=total
        )
        if total and denominator is None:
            denominator = torch.scalar_tensor(x.numel(), dtype=loss.dtype, device=loss.device)
        return loss, denominator
    chosen = backend_for(op, x, backend)
    fn = chosen.ops[op]
    if reduction != "none" and chosen.capabilities.bce_sum_only:
        hint = None
        if denominator is None and x.numel():
            # the grad_output loss.backward() will send, computed as autograd computes it
            hint = mean_grad_scale(x.numel(), x.dtype) if reduction == "mean" else 1.0
        total = fn(x, t, weight, pos_weight, keep, sum_only=True, grad_scale=hint)
        return total, (x.numel() if denominator is None else denominator)
    return fn(x, t, weight, pos_weight, keep), denominator


def _run(func: str, c: BinaryCall, backend, return_parts):
    """The backend's losses for a prepared call, reduced by the shared rule."""
    with no_autocast(c.x.device):
        loss, denominator = _run_backend(
            func, c.x, c.t, c.weight, c.pos_weight, c.keep, c.denominator, c.reduction, backend, c.capture
        )
    return reduce_loss(
        loss, denominator, c.reduction, out_dtype=c.out_dtype, return_parts=return_parts, capture=c.capture
    )


@overload
def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    *,
    pos_weight=None,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    backend: Optional[str] = None,
) -> torch.Tensor: ...


@overload
def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    *,
    pos_weight=None,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    backend: Optional[str] = None,
) -> LossParts: ...


@overload
def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    *,
    pos_weight=None,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = ...,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, LossParts]: ...


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    *,
    pos_weight=None,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, LossParts]:
    r"""Binary cross-entropy between probabilities ``input`` and ``target``.

    .. math::
        \ell_i = -w_i\,\bigl[p_w\,t_i\,\max(\log x_i, -100) + (1 - t_i)\,\max(\log(1 - x_i), -100)\bigr]

    Drop-in for :func:`torch.nn.functional.binary_cross_entropy` (same positional
    arguments, defaults, values and gradients; the log clamp at -100 is torch's). See
    :class:`crossent.nn.BCELoss` for shapes. ``log(1 - x)`` is evaluated as ``log1p(-x)``,
    so probabilities near 0 keep full precision. Computed in float32 for fp16/bf16 inputs
    and returned in the input dtype; under ``torch.autocast`` it follows torch's float32
    policy (float32 in, float32 out) where torch's CUDA kernel raises "unsafe to autocast".

    Keyword-only extensions: ``pos_weight`` (pytorch#20424), ``label_smoothing``
    (targets become :math:`t(1-\epsilon) + \epsilon/2`), ``ignore_index`` (those elements
    count neither in the sum nor in the ``mean`` denominator), ``validate`` (value checks,
    see :mod:`crossent._validation`), ``return_parts`` (a :class:`LossParts`) and
    ``backend``. Integer and bool 0/1 targets are accepted.

    Example (the tutorial's numbers, computed right):

    >>> import torch, crossent
    >>> p = torch.tensor([0.8, 0.3, 0.6])
    >>> round(crossent.binary_cross_entropy(p, torch.tensor([1., 0., 1.])).item(), 4)
    0.3635
    >>> probs = torch.sigmoid(torch.tensor([0.2, -1.0, 3.0, 0.5]))
    >>> round(crossent.binary_cross_entropy(probs, torch.tensor([1., 0., 1., 0.])).item(), 4)
    0.4835
    """
    func = "binary_cross_entropy"
    reduction = legacy_reduction(func, size_average, reduce, reduction)
    c = _prepare(func, input, target, weight, pos_weight, ignore_index, label_smoothing, reduction, True, validate)
    return _run(func, c, backend, return_parts)


@overload
def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    backend: Optional[str] = None,
) -> torch.Tensor: ...


@overload
def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    backend: Optional[str] = None,
) -> LossParts: ...


@overload
def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = ...,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, LossParts]: ...


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[torch.Tensor] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, LossParts]:
    r"""Binary cross-entropy on logits: sigmoid and BCE in one exact step.

    .. math::
        \ell_i = w_i\,\bigl[p_w\,t_i\,\mathrm{softplus}(-x_i) + (1 - t_i)\,\mathrm{softplus}(x_i)\bigr],
        \qquad \mathrm{softplus}(z) = \log(1 + e^{z})

    Drop-in for :func:`torch.nn.functional.binary_cross_entropy_with_logits`. torch
    evaluates the algebraically equal ``(1-t) x + (1 + (p_w-1) t) softplus(-x)``, whose
    cancellation loses small losses (float32 x=-20, t=0 gives 0 instead of 2.06e-9) and
    gives NaN at x = +-inf; the form above is a sum of non-negative terms, exact to a few
    ulp everywhere and finite at +-inf. Shapes and the ``pos_weight`` example: see
    :class:`crossent.nn.BCEWithLogitsLoss`.

    Keyword-only extensions as for :func:`binary_cross_entropy`.

    >>> import torch, crossent
    >>> logits = torch.tensor([0.2, -1.5, 3.0, 0.7])
    >>> round(crossent.binary_cross_entropy_with_logits(logits, torch.tensor([1., 0., 1., 0.])).item(), 4)
    0.4878
    """
    func = "binary_cross_entropy_with_logits"
    reduction = legacy_reduction(func, size_average, reduce, reduction)
    c = _prepare(func, input, target, weight, pos_weight, ignore_index, label_smoothing, reduction, False, validate)
    return _run(func, c, backend, return_parts)
