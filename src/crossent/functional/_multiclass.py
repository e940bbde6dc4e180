"""Cross-entropy over classes (``torch.nn.functional.cross_entropy`` drop-in)."""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Tuple, Union, overload

import torch

from .. import _validation as V
from .._capture import capturing
from ..backends import backend_for, chunked, ops, resolve
from ._lm_head import LMOptions, lm_cross_entropy, rows_for, wants_lm_head
from ._reduction import (
    LossParts,
    _autocast_enabled,
    autocast_inputs,
    compute_dtype,
    legacy_reduction,
    no_autocast,
    reduce_loss,
)


def _rows(t: torch.Tensor, dtype: torch.dtype, class_dim: int, C: int) -> torch.Tensor:
    """``t`` in ``dtype`` as rows of C classes (M, C); no op at all for (N, C) in ``dtype``
    (small inputs pay per torch call)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.dim() == 2 and class_dim == 1:
        return t
    return t.movedim(class_dim, -1).reshape(-1, C)


def _plain_call(input, target, ignore_index, reduction: str, validate) -> Optional[torch.Tensor]:
    """The most common eager call, in few Python steps, or None for the general path.

    Plain means: an eager CPU call (nothing captured, no autocast) on float32 (N, C) logits
    (C >= 2, contiguous) that need a gradient, int64 (N,) class indices all in [0, C) with
    ignore_index outside it (so none is ignored), no weights or smoothing, reduction 'mean'
    or 'sum', and the compiled kernel chosen. Then every check of the general path passes
    except the softmax heuristic, which runs here too (on the sign range the kernel read),
    and the kernel computes exactly what the general path would
    (:func:`crossent.backends.chunked.plain_cross_entropy`). The kernel itself looks at the
    targets first: with one outside [0, C) it computes nothing and the call, ignored
    targets and errors alike, takes the general path, as does anything else."""
    if not (
        type(input) is torch.Tensor
        and type(target) is torch.Tensor
        and input.dim() == 2
        and target.dim() == 1
        and input.dtype == torch.float32
        and target.dtype == torch.int64
        and input.requires_grad
        and torch.is_grad_enabled()
        and input.device.type == "cpu"
        and target.device.type == "cpu"
        and reduction in ("mean", "sum")
        and type(ignore_index) is int
    ):
        return None
    M, C = input.shape
    if (
        M == 0
        or C < 2
        or target.shape[0] != M
        or not input.is_contiguous()
        or not target.is_contiguous()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or _autocast_enabled("cpu")
        or resolve("cross_entropy", input.device) != "chunked"
        or chunked._cpp() is None
    ):
        return None
    if 0 <= ignore_index < C:  # a class index may be ignored: the general path masks it
        return None
    check = V.validation_enabled(validate)
    out = chunked.plain_cross_entropy(input, target, reduction, V.softmax_rows_to_inspect(C) if check else 0)
    if out is None:  # a target outside [0, C): ignored (ignore_index < 0 or >= C) or an error
        return None
    loss, sampled_range = out
    if check:
        V.check_logits_not_probabilities("cross_entropy", input, 1, sampled_range)
    return loss


class MulticlassCall(NamedTuple):
    """A cross-entropy-shaped call after the checks: the (possibly reshaped) target, whether
    it holds class indices, the class dimension and count, the checked options."""

    target: torch.Tensor
    index_target: bool
    class_dim: int
    C: int
    weight: Optional[torch.Tensor]
    label_smoothing: float
    ignore_index: int
    capture: bool


def _check(func, input, target, weight, ignore_index, label_smoothing, reduction, validate) -> MulticlassCall:
    """The checks of :func:`cross_entropy` (metadata, then the value tier), shared by the
    losses with its arguments (focal, Poly-1)."""
    V.check_floating_input(func, input)
    label_smoothing = V.check_label_smoothing(func, label_smoothing)
    ignore_index = V.check_ignore_index(func, ignore_index)
    if (
        isinstance(target, torch.Tensor)
        and input.dim() == 1
        and tuple(target.shape) == (1,)
        and tuple(input.shape) != (1,)
        and not target.is_floating_point()
    ):
        # torch accepts one class index of shape (1,) for an unbatched (C,) input and
        # returns a 0-dim loss: same here.
        target = target.reshape(())
    target, index_target = V.check_multiclass_shapes(func, input, target, ignore_index)
    class_dim = 1 if input.dim() >= 2 else 0
    C = input.shape[class_dim]
    weight = V.as_weight_tensor(func, "weight", weight, like=input)
    V.check_class_weight(func, weight, C)
    V.check_same_device(func, input, target=target, weight=weight)
    capture = capturing(input)
    if V.validation_enabled(validate):
        if capture:  # device-side assertions: no host read, no graph break
            V.assert_multiclass_values(func, target, index_target, C, ignore_index)
        else:  # value tier: one pass, one sync, before any kernel
            V.check_multiclass_values(
                func, input, target, index_target, C, ignore_index, class_dim, reduction=reduction
            )
    return MulticlassCall(target, index_target, class_dim, C, weight, label_smoothing, ignore_index, capture)


def _out_dtype(input, target, weight, index_target) -> torch.dtype:
    """torch's result dtype: the input's for class indices; for probability targets the
    promotion of input, target and weight (torch's composite formula promotes: float16
    logits with float32 targets give float32)."""
    out_dtype = input.dtype
    if not index_target:
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None and weight.is_floating_point():
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    return out_dtype


@overload
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
    z_loss: float = ...,
    return_lse: Literal[False] = ...,
    softcap: Optional[float] = ...,
    temperature: float = ...,
    token_weight: Optional[torch.Tensor] = ...,
    return_accuracy: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    backend: Optional[str] = None,
    inplace_backward: bool = False,
    z_loss: float = ...,
    return_lse: Literal[False] = ...,
    softcap: Optional[float] = ...,
    temperature: float = ...,
    token_weight: Optional[torch.Tensor] = ...,
    return_accuracy: Literal[False] = ...,
) -> LossParts: ...


@overload
def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Optional[bool] = None,
    return_parts: bool = ...,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
    z_loss: float = ...,
    return_lse: bool = ...,
    softcap: Optional[float] = ...,
    temperature: float = ...,
    token_weight: Optional[torch.Tensor] = ...,
    return_accuracy: bool = ...,
) -> Union[torch.Tensor, LossParts, Tuple[Union[torch.Tensor, LossParts], ...]]: ...


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    token_weight: Optional[torch.Tensor] = None,
    return_accuracy: bool = False,
) -> Union[torch.Tensor, LossParts, Tuple[Union[torch.Tensor, LossParts], ...]]:
    r"""Cross-entropy between logits ``input`` and class indices or class probabilities.

    With :math:`-\log p_{c} = \log\sum_j e^{x_j} - x_c`, smoothing :math:`\epsilon` and
    class weights :math:`w`:

    .. math::
        \ell_i = (1-\epsilon)\,w_{y_i}\,(-\log p_{y_i}) + \frac{\epsilon}{C}\sum_c w_c\,(-\log p_c)
        \quad\text{(class indices)},\qquad
        \ell_i = -\sum_c w_c\,q'_{ic}\,\log p_{ic},\; q' = (1-\epsilon) q + \epsilon/C
        \quad\text{(probabilities)}

    ``mean`` divides by :math:`\sum_i w_{y_i}` over non-ignored targets (class indices)
    or by the number of samples (probabilities), exactly as torch.

    Drop-in for :func:`torch.nn.functional.cross_entropy`; shapes in
    :class:`crossent.nn.CrossEntropyLoss`. ``-log p`` is evaluated as
    :math:`(m - x_c) + \log(1 + \sum_{j \ne k} e^{x_j - m})` (m the max, at index k): both
    terms are non-negative, so a confident correct prediction keeps its tiny loss (logits
    [20, 0, 0], class 0: 4.12e-9 where torch's float32 gives -0) and its tiny gradient.
    fp16/bf16 inputs are computed in float32 and returned in the input dtype.

    Keyword-only extensions: ``validate``, ``return_parts`` (a :class:`LossParts`),
    ``backend``, ``inplace_backward``. Class-index targets may have any integer dtype.

    LM-head options (class-index targets; formulas in ``docs/lm-head.md`` and
    :mod:`crossent.functional._lm_head`): ``softcap`` (logits become
    :math:`s\tanh(x/s)`, first), ``temperature`` (then divided by :math:`T`),
    ``z_loss`` (adds :math:`\lambda_z w_{y_i}\,\mathrm{lse}(z)^2` per counted token),
    ``token_weight`` (shape of the target: multiplies each token's loss and its ``mean``
    denominator weight), ``return_lse`` (also return the per-token log-sum-exp of the
    transformed logits, detached, float32; 0 at ignored tokens) and ``return_accuracy``
    (also return the int64 count of counted tokens whose argmax is the target), all in
    the same pass. Returned in that order after the loss: ``(loss, lse, accuracy)``.
    They run on the ``chunked-torch`` backend (row blocks in torch ops) or ``reference``;
    the C and Triton kernels do not compute them (``backend='chunked'`` raises).

    >>> import torch, crossent
    >>> z = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> loss, lse, hits = crossent.cross_entropy(z, torch.tensor([0, 2]), z_loss=1e-4, return_lse=True,
    ...                                          return_accuracy=True)
    >>> round(loss.item(), 4), [round(v, 4) for v in lse.tolist()], hits.item()
    (0.8478, [2.2413, 1.7536], 1)

    ``inplace_backward=True`` (opt-in, off by default; class-index targets) writes the
    gradient into the logits' buffer during the forward pass, so no second (N, C) buffer
    is allocated (LM heads, whose logits are dead after the loss). **The logits hold the
    gradient afterwards**: autograd is told (``mark_dirty``), so an op that saved them for
    its backward raises "modified by an inplace operation" instead of computing garbage,
    but plain reads (``logits.argmax()`` after the loss) see the gradient: compute
    anything you need from the logits *before* the loss. Only the logits' own buffer is
    reused when it already is float32/float64 rows of classes (2-D, contiguous); otherwise
    a converted copy is overwritten (correct, just no memory saved). Under ``no_grad`` the
    logits are left untouched.

    >>> import torch, crossent
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> round(crossent.cross_entropy(logits, torch.tensor([0, 1])).item(), 4)
    0.3974
    """
    func = "cross_entropy"
    if (
        weight is None
        and size_average is None
        and reduce is None
        and not label_smoothing
        and backend is None
        and not inplace_backward
        and not return_parts
        and not z_loss
        and softcap is None
        and temperature == 1.0
        and token_weight is None
        and not return_lse
        and not return_accuracy
    ):
        loss = _plain_call(input, target, ignore_index, reduction, validate)
        if loss is not None:
            return loss
    if type(input).__name__ == "DTensor":  # sharded on the classes: crossent.distributed
        from ..distributed._dtensor import cross_entropy as dtensor_cross_entropy

        return dtensor_cross_entropy(
            input,
            target,
            weight,
            ignore_index,
            legacy_reduction(func, size_average, reduce, reduction),
            label_smoothing,
            validate=validate,
            return_parts=return_parts,
            backend=backend,
            inplace_backward=inplace_backward,
            z_loss=z_loss,
            return_lse=return_lse,
            softcap=softcap,
            temperature=temperature,
            token_weight=token_weight,
            return_accuracy=return_accuracy,
        )
    input, target, weight = autocast_inputs(input, target, weight)
    reduction = legacy_reduction(func, size_average, reduce, reduction)
    m = _check(func, input, target, weight, ignore_index, label_smoothing, reduction, validate)
    target, index_target, class_dim, C, weight, label_smoothing, ignore_index, capture = m
    lm = wants_lm_head(z_loss, softcap, temperature, token_weight, return_accuracy) or return_lse
    if lm:
        zts = V.check_lm_head_options(func, z_loss=z_loss, temperature=temperature, softcap=softcap)
        if not index_target:
            V.fail(
                func,
                "class-index targets with the LM-head options (z_loss, softcap, temperature, "
                "token_weight, return_lse, return_accuracy)",
                "class-probability targets",
                "Pass token ids, or compute the options on probability targets with the unfused "
                "formulas of docs/lm-head.md.",
            )
        token_weight = V.check_token_weight(func, token_weight, target, validate=validate, capture=capture)
        o = LMOptions(
            weight, label_smoothing, reduction, *zts, token_weight, return_lse, return_accuracy, return_parts, backend
        )
        x = _rows(input, input.dtype, class_dim, C)
        y = target.reshape(-1)
        rows = rows_for(x.shape[0], C, input.dtype, None, None, func)
        out_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        with no_autocast(x.device):
            return lm_cross_entropy(func, x, None, None, y, y != ignore_index, o, rows=rows, out_shape=out_shape)

    # Canonical layout: rows of C logits.
    out_dtype = _out_dtype(input, target, weight, index_target)
    cdt = compute_dtype(out_dtype)
    out_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if capture:
        # Registered ops (crossent::cross_entropy_rows); inplace_backward has no effect here:
        # the compiler owns the buffers.
        name = resolve("cross_entropy", input.device, backend)
        spatial = True
    else:
        op = "cross_entropy_inplace" if inplace_backward else "cross_entropy"
        chosen = backend_for(op, input, backend)
        fn, caps = chosen.ops[op], chosen.capabilities
        spatial = caps.cross_entropy_spatial and not inplace_backward
    if index_target and input.dim() > 2 and spatial:
        # (N, C, S) (a view of contiguous input): the backend picks the layout, no copy here
        x = (input if input.dtype == cdt else input.to(cdt)).flatten(2)
    else:
        x = _rows(input, cdt, class_dim, C)
    keep = None
    if index_target:
        t = target.reshape(-1) if target.dim() != 1 else target
        keep = t != ignore_index
    else:
        t = _rows(target, cdt, class_dim, C)
    w = weight if weight is None or weight.dtype == cdt else weight.to(cdt)
    with no_autocast(x.device):
        if capture:
            loss, den = ops.cross_entropy(x, t, index_target, w, keep, label_smoothing, backend=name)
        else:
            # Fused backends may pre-scale the gradient by what a plain backward() sends.
            kw = {"reduction": reduction} if caps.cross_entropy_reduction else {}
            loss, den = fn(x, t, index_target, w, keep, label_smoothing, **kw)
    if loss.shape != out_shape:
        loss = loss.reshape(out_shape)
    # Backends return per-row denominator weights, or their 0-dim total when they needed it.
    denominator = None if den is None else den if den.dim() == 0 else den.sum()
    return reduce_loss(loss, denominator, reduction, out_dtype=out_dtype, return_parts=return_parts, capture=capture)
