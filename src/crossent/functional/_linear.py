r"""Fused linear layer + loss for huge label spaces: the (N, C) logits are never stored.

``linear_cross_entropy(x, W, y)`` is ``cross_entropy(x @ W.T + b, y)`` (same values, same
gradients w.r.t. ``x``, ``W`` and ``b``, every option of :func:`crossent.cross_entropy`),
computed block by block; ``linear_binary_cross_entropy_with_logits`` is the same for
multi-label heads. Validation and the meaning of every option live here; the arithmetic
lives in :mod:`crossent.backends.linear`; ``mean`` is applied by
:func:`crossent.functional._reduction.reduce_loss`, as for every loss.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple, Union, overload

import torch

from .. import _validation as V
from .._capture import capturing
from ..backends import dispatch, ops, resolve
from ..backends.linear import BUFFERS_DENSE, BUFFERS_INDEX, BCETarget, ce_targets, plan_chunks
from ._lm_head import LMOptions, lm_cross_entropy, rows_for, wants_lm_head
from ._reduction import LossParts, compute_dtype, reduce_loss

_INT = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_linear(func: str, input, linear_weight, linear_bias, *, allow_kdim: bool):
    """Shapes and dtypes of the linear part; returns (H, C, out_features)."""
    V.check_floating_input(func, input)
    if not isinstance(linear_weight, torch.Tensor):
        V.fail(
            func,
            "`linear_weight` to be a torch.Tensor",
            type(linear_weight).__name__,
            "Pass the classifier's weight, e.g. `model.lm_head.weight`.",
            V.CrossentTypeError,
        )
    if linear_weight.dim() < 2 or (linear_weight.dim() > 2 and not allow_kdim):
        want = "(C, in_features) or (C, d1, ..., dK, in_features)" if allow_kdim else "(L, in_features)"
        V.fail(
            func,
            f"`linear_weight` of shape {want}",
            f"shape {V.shape_str(linear_weight.shape)}",
            "Pass the weight of an nn.Linear (out_features x in_features).",
        )
    if linear_weight.dtype != input.dtype:
        V.fail(
            func,
            "`linear_weight` with the input's dtype",
            f"input {input.dtype} and linear_weight {linear_weight.dtype}",
            f"Cast one of them, e.g. `input.to({linear_weight.dtype})` (as torch.nn.functional.linear requires).",
            V.CrossentTypeError,
        )
    if input.dim() == 0:
        V.fail(
            func,
            "`input` of shape (in_features,) or (N, in_features)",
            "a 0-dim tensor",
            "Pass the hidden states that feed the classifier.",
        )
    H = input.shape[-1]
    if linear_weight.shape[-1] != H:
        V.fail(
            func,
            "the last dimensions of `input` and `linear_weight` (in_features) to match",
            f"input {V.shape_str(input.shape)} and linear_weight {V.shape_str(linear_weight.shape)}",
            "linear_weight has shape (num_classes, in_features), like nn.Linear.weight; did you pass its transpose?",
        )
    C = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (C,) + out_features:
            found = (
                f"shape {V.shape_str(linear_bias.shape)}"
                if isinstance(linear_bias, torch.Tensor)
                else type(linear_bias).__name__
            )
            V.fail(
                func,
                f"`linear_bias` of shape {V.shape_str((C,) + out_features)}",
                found,
                "Pass the classifier's bias (nn.Linear.bias), one number per output.",
            )
    V.check_same_device(func, input, linear_weight=linear_weight, linear_bias=linear_bias)
    return H, C, out_features


def _block_args(func, chunk_size, class_chunk_size, memory_budget, options):
    """``(rows, classes, budget)`` for :func:`plan_chunks`, checked (``options.batch_chunk_size``
    is torch's spelling of ``chunk_size``)."""
    if chunk_size is None and options is not None and getattr(options, "batch_chunk_size", None):
        chunk_size = options.batch_chunk_size
    for name, v in (
        ("chunk_size", chunk_size),
        ("class_chunk_size", class_chunk_size),
        ("memory_budget", memory_budget),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            V.fail(
                func,
                f"`{name}` to be a positive int or None",
                repr(v),
                "Leave it None to size blocks from the memory budget.",
            )
    return chunk_size, class_chunk_size, memory_budget


def _plan(N, C, H, dtype, block_args, buffers):
    rows, classes, budget = block_args
    return plan_chunks(N, C, H, dtype, budget=budget, rows=rows, classes=classes, buffers=buffers)


def _no_target_grad(func, **tensors):
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            V.fail(
                func,
                f"`{name}` that does not require grad",
                f"`{name}` with requires_grad=True",
                "The fused op differentiates w.r.t. input, linear_weight and linear_bias only: "
                f"pass `{name}.detach()`, or use the unfused loss on `F.linear(...)` logits.",
            )


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    return_lse: Literal[False] = ...,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> torch.Tensor: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    return_lse: Literal[False] = ...,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> LossParts: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    return_lse: Literal[True],
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    return_lse: Literal[True],
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Tuple[LossParts, torch.Tensor]: ...


@overload
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: bool = ...,
    return_lse: bool = ...,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Union[torch.Tensor, LossParts, Tuple[Union[torch.Tensor, LossParts], torch.Tensor]]: ...


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options=None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    token_weight: Optional[torch.Tensor] = None,
    return_accuracy: bool = False,
) -> Union[
    torch.Tensor,
    LossParts,
    Tuple[Union[torch.Tensor, LossParts], torch.Tensor],
    Tuple[Union[torch.Tensor, LossParts], torch.Tensor, torch.Tensor],
]:
    r"""Cross-entropy of a linear layer's logits without storing the logits.

    Exactly ``crossent.cross_entropy(F.linear(input, linear_weight, linear_bias), target,
    weight, ignore_index=..., reduction=..., label_smoothing=...)``: per row,

    .. math::
        z = W h + b, \qquad
        \ell = \sum_j a_j\,(-\log p_j), \qquad
        -\log p_j = (m - z_j) + \log\bigl(1 + \textstyle\sum_{i \ne k} e^{z_i - m}\bigr)

    with :math:`m = z_k` the largest logit and :math:`a_j` the class coefficients of
    :func:`crossent.cross_entropy` (class weight, label smoothing, probability targets).
    Both terms are non-negative (no cancellation, as in ``cross_entropy``); over class
    blocks the maxima and sums are merged exactly.

    Same call as :func:`torch.nn.functional.linear_cross_entropy` (torch 2.13): input
    ``(in_features,)`` or ``(N, in_features)``, ``linear_weight`` ``(C, in_features)`` or
    ``(C, d_1, ..., d_K, in_features)`` (K-dimensional loss, targets ``(N, d_1, ..., d_K)``),
    ``ignore_index=None`` meaning -100 for class indices. ``options``
    (``torch.nn.LinearCrossEntropyOptions``) is accepted; only its ``batch_chunk_size`` is
    used (as ``chunk_size``): crossent is always chunked.

    The rows are processed in blocks of ``chunk_size`` rows by ``class_chunk_size`` classes,
    sized by default from ``memory_budget`` bytes (256 MiB, or ``CROSSENT_LINEAR_BUDGET``;
    see :func:`crossent.backends.linear.plan_chunks`). The gradients w.r.t. ``input``,
    ``linear_weight`` and ``linear_bias`` are computed during the forward pass (accumulated
    in float32 for fp16/bf16) and scaled by the incoming gradient in backward; with
    ``reduction='none'``, or any non-uniform incoming gradient, backward recomputes them
    block by block. Double backward is not supported (raises).

    Keyword-only extensions: input ``(*, in_features)`` with any leading dimensions (e.g.
    ``(B, T, H)``: classes last, targets ``(B, T)`` or probabilities ``(B, T, C)``; loss
    ``(B, T)`` for ``'none'``), ``validate``, ``return_parts``, ``return_lse`` (also return
    the per-row :math:`\log\sum_j e^{z_j}`, detached, shaped like the unreduced loss:
    ``(loss, lse)``), ``backend`` (None chooses: ``'triton'`` on CUDA, ``'chunked'`` on CPU,
    ``'chunked-torch'`` anywhere; ``'reference'`` stores the full logits),
    ``chunk_size``, ``class_chunk_size``, ``memory_budget``.

    LM-head options, as in :func:`crossent.cross_entropy` (formulas in ``docs/lm-head.md``):
    ``z_loss``, ``softcap``, ``temperature``, ``token_weight`` (shape of the target),
    ``return_accuracy``; with any of them ``return_lse`` gives the lse of the transformed
    logits (0 at ignored tokens) and the result is ``(loss, lse?, accuracy?)``. They need
    class-index targets without K dimensions, and run as the registered op
    ``crossent::lm_head_loss_fused`` (``chunked``, ``chunked-torch``; row blocks of
    ``chunk_size`` rows by all classes; ``class_chunk_size`` does not apply): never
    ``(N, C)``; gradients in the forward pass for ``'mean'``/``'sum'`` (three matrix
    products), recomputed in backward for ``'none'`` or weights that require grad
    (``crossent::lm_head_forward``, four).

    >>> import torch, crossent
    >>> h = torch.tensor([[1.0, -0.5], [0.2, 0.3]])
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    >>> round(crossent.linear_cross_entropy(h, W, torch.tensor([0, 2])).item(), 4)
    0.6897
    >>> round(crossent.cross_entropy(h @ W.T, torch.tensor([0, 2])).item(), 4)
    0.6897
    """
    func = "linear_cross_entropy"
    if "DTensor" in (type(input).__name__, type(linear_weight).__name__):  # crossent.distributed
        from ..distributed._dtensor import linear_cross_entropy as dtensor_linear_cross_entropy

        return dtensor_linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            options=options,
            return_lse=return_lse,
            backend=backend,
            class_chunk_size=class_chunk_size,
            z_loss=z_loss,
            softcap=softcap,
            temperature=temperature,
            token_weight=token_weight,
            return_accuracy=return_accuracy,
        )
    reduction = V.check_reduction(func, reduction)
    H, C, out_features = _check_linear(func, input, linear_weight, linear_bias, allow_kdim=True)
    label_smoothing = V.check_label_smoothing(func, label_smoothing)
    ii_given = ignore_index is not None
    ignore_index = V.check_ignore_index(func, -100 if ignore_index is None else ignore_index)
    if not isinstance(target, torch.Tensor):
        V.fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            V.CrossentTypeError,
        )
    D = math.prod(out_features)
    lead = tuple(input.shape[:-1])
    if out_features and input.dim() != 2:
        V.fail(
            func,
            f"input of shape (N, {H}) for the K-dimensional loss of linear_weight {V.shape_str(linear_weight.shape)}",
            f"input {V.shape_str(input.shape)}",
            "Batch the input: `input.unsqueeze(0)` (as torch).",
        )
    # Validate through the core checks, on a shape-only stand-in for the logits.
    if input.dim() <= 2:
        logits_shape = lead + (C,) + out_features
        check_target, class_dim = target, (1 if input.dim() == 2 else 0)
        out_shape = lead + out_features
    else:
        M = math.prod(lead)
        logits_shape = (M, C)
        out_shape = lead
        if tuple(target.shape) == lead + (C,):
            check_target = target.reshape(M, C)
        elif tuple(target.shape) == lead:
            check_target = target.reshape(M)
        else:
            V.fail(
                func,
                f"target of shape {V.shape_str(lead)} (class indices) or "
                f"{V.shape_str(lead + (C,))} (class probabilities) for input {V.shape_str(input.shape)}",
                f"target of shape {V.shape_str(target.shape)}",
                "With (*, in_features) inputs the classes are the last dimension of the logits.",
            )
        class_dim = -1
    meta = torch.empty(logits_shape, dtype=input.dtype, device="meta")
    check_target, index_target = V.check_multiclass_shapes(func, meta, check_target, ignore_index)
    if not index_target and ii_given:
        V.fail(
            func,
            "no `ignore_index` with class-probability targets",
            f"ignore_index={ignore_index}",
            "ignore_index applies to class indices only (torch raises too); give ignored rows "
            "zero probability mass instead.",
        )
    weight = V.as_weight_tensor(func, "weight", weight, like=input)
    V.check_class_weight(func, weight, C)
    V.check_same_device(func, input, target=target, weight=weight)
    _no_target_grad(func, target=target, weight=weight)
    capture = capturing(input)
    if V.validation_enabled(validate):
        if capture:
            V.assert_multiclass_values(func, target, index_target, C, ignore_index)
        elif index_target:
            V.check_class_indices(func, target, C, ignore_index)
        else:
            V.check_probability_target(func, target, class_dim)

    if wants_lm_head(z_loss, softcap, temperature, token_weight, return_accuracy):
        zts = V.check_lm_head_options(func, z_loss=z_loss, temperature=temperature, softcap=softcap)
        if not index_target or out_features:
            V.fail(
                func,
                "class-index targets and a 2-D `linear_weight` with the LM-head options (z_loss, "
                "softcap, temperature, token_weight, return_accuracy)",
                "class-probability targets"
                if not index_target
                else f"linear_weight {V.shape_str(linear_weight.shape)} (a K-dimensional loss)",
                "Pass token ids and an (C, in_features) weight, or use the unfused loss on F.linear(...) logits.",
            )
        token_weight = V.check_token_weight(func, token_weight, target, validate=validate, capture=capture)
        o = LMOptions(
            weight, label_smoothing, reduction, *zts, token_weight, return_lse, return_accuracy, return_parts, backend
        )
        x = input.reshape(-1, H)
        y = check_target.reshape(-1)
        rows = rows_for(x.shape[0], C, input.dtype, chunk_size, memory_budget, func)
        return lm_cross_entropy(
            func, x, linear_weight, linear_bias, y, y != ignore_index, o, rows=rows, out_shape=out_shape
        )

    cdt = compute_dtype(input.dtype)
    x = input.reshape(-1, H)
    N = x.shape[0]
    W3 = linear_weight.reshape(C, D, H).permute(1, 0, 2)  # (D, C, H), a view
    b2 = None if linear_bias is None else linear_bias.reshape(C, D).t()  # (D, C)
    if index_target:
        t = check_target.reshape(N, D)
        keep = t != ignore_index
    else:
        t = target.reshape(N, C, D)  # (C,), (N, C), (N, C, d1..dK) and (*, C) alike
        keep = None
    w = None if weight is None else weight.to(cdt)
    block_args = _block_args(func, chunk_size, class_chunk_size, memory_budget, options)
    tgts, den = ce_targets(t, index_target, w, keep, label_smoothing, C, cdt)
    denominator = den.sum() if index_target else None
    if capture:
        # A registered op (crossent::linear_cross_entropy_fused) for 'mean' and 'sum'; the
        # per-row losses of reduction='none' come from the unfused formulas below, which the
        # tracer captures op by op (and the compiler may fuse).
        name = resolve("linear_cross_entropy", x.device, backend)
        if reduction != "none" and name != "reference":
            total, lse = ops.linear_cross_entropy(
                x, W3, b2, t, index_target, w, keep, label_smoothing, block_args, backend=name
            )
            if reduction == "mean" and denominator is None:  # probabilities: one per position
                denominator = torch.scalar_tensor(N * D, dtype=cdt, device=x.device)
            result = reduce_loss(
                total, denominator, reduction, out_dtype=input.dtype, return_parts=return_parts, capture=True
            )
            return (result, lse.detach().reshape(out_shape)) if return_lse else result
    precompute = reduction != "none"
    if reduction == "mean":
        grad_scale = 1 / (denominator if denominator is not None else torch.scalar_tensor(N * D, dtype=cdt))
    else:
        grad_scale = torch.ones((), dtype=cdt)
    plan = _plan(N, C, H, input.dtype, block_args, BUFFERS_INDEX if index_target else BUFFERS_DENSE)
    op = dispatch("linear_cross_entropy", x, backend)
    if capture:  # reduction='none' (or backend='reference'): the unfused formulas
        op = dispatch("linear_cross_entropy", x, "reference")
    loss, lse = op(x, W3, b2, tgts, plan, grad_scale, precompute)
    loss = loss.reshape(out_shape)
    result = reduce_loss(
        loss, denominator, reduction, out_dtype=input.dtype, return_parts=return_parts, capture=capture
    )
    if return_lse:
        return result, lse.detach().reshape(out_shape)
    return result


@overload
def linear_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    target_format: Optional[str] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[False] = ...,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> torch.Tensor: ...


@overload
def linear_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    target_format: Optional[str] = None,
    validate: Optional[bool] = None,
    return_parts: Literal[True],
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> LossParts: ...


@overload
def linear_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    target_format: Optional[str] = None,
    validate: Optional[bool] = None,
    return_parts: bool = ...,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Union[torch.Tensor, LossParts]: ...


def linear_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: Optional[int] = None,
    target_format: Optional[str] = None,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    class_chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Union[torch.Tensor, LossParts]:
    r"""Multi-label BCE-with-logits of a linear layer's logits without storing them.

    Exactly ``crossent.binary_cross_entropy_with_logits(F.linear(input, linear_weight,
    linear_bias), dense_target, weight, pos_weight=..., reduction=...)``: per element

    .. math::
        z = W h + b, \qquad
        \ell_{j} = w_{j}\,\bigl[p_j\,t_{j}\,\mathrm{softplus}(-z_{j}) + (1 - t_{j})\,\mathrm{softplus}(z_{j})\bigr],

    the sum of non-negative terms of :func:`crossent.binary_cross_entropy_with_logits`
    (exact for tiny losses, finite at :math:`\pm\infty`). ``mean`` divides by the number of
    (kept) elements N * L, like the unfused loss.

    Targets (``target_format``, inferred when None):

    * ``'dense'``: shape ``(*, L)`` like the logits (float, or 0/1 int/bool), probabilities in [0, 1].
    * ``'sparse'``: int64 ``(*, P)``: the ids of the positive labels of each row, padded
      with -1 (any P, e.g. the largest number of positives in the batch). All other labels
      are 0. Inferred for an integer target whose last dimension differs from L. Memory:
      N * P ids instead of N * L targets: for 100k labels and 10 positives a row, 10^4
      times less.

    ``weight``: broadcastable to the logits ``(*, L)`` (e.g. ``(L,)`` per label);
    ``pos_weight``: ``(L,)`` per label. ``label_smoothing`` and ``ignore_index`` (dense
    only) as in :func:`crossent.binary_cross_entropy_with_logits`. ``reduction='none'``
    returns the ``(*, L)`` per-element losses (output-sized, necessarily). Blocks and
    gradients as in :func:`linear_cross_entropy` (one pass: no log-sum-exp is needed).

    >>> import torch, crossent
    >>> h = torch.tensor([[1.0, -0.5], [0.2, 0.3]])
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    >>> dense = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    >>> sparse = torch.tensor([[0, -1], [1, 2]])
    >>> round(crossent.linear_binary_cross_entropy_with_logits(h, W, dense).item(), 4)
    0.4857
    >>> round(crossent.linear_binary_cross_entropy_with_logits(h, W, sparse).item(), 4)
    0.4857
    """
    func = "linear_binary_cross_entropy_with_logits"
    reduction = V.check_reduction(func, reduction)
    H, L, _ = _check_linear(func, input, linear_weight, linear_bias, allow_kdim=False)
    label_smoothing = V.check_label_smoothing(func, label_smoothing)
    ignore_index = V.check_binary_ignore_index(func, ignore_index)
    if not isinstance(target, torch.Tensor):
        V.fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            V.CrossentTypeError,
        )
    lead = tuple(input.shape[:-1])
    logits_shape = lead + (L,)
    if target_format is None:
        is_int = target.dtype in _INT
        target_format = (
            "sparse"
            if is_int
            and tuple(target.shape) != logits_shape
            and tuple(target.shape[:-1]) == lead
            and target.dim() == len(lead) + 1
            else "dense"
        )
    if target_format not in ("dense", "sparse"):
        V.fail(
            func,
            "`target_format` to be 'dense', 'sparse' or None",
            repr(target_format),
            "'sparse' means int64 positive-label ids padded with -1.",
        )
    N = math.prod(lead)
    meta = torch.empty(logits_shape, dtype=input.dtype, device="meta")
    if target_format == "dense":
        V.check_binary_target(func, meta, torch.empty(target.shape, dtype=target.dtype, device="meta"))
    else:
        if target.dtype not in _INT or target.dim() != len(lead) + 1 or tuple(target.shape[:-1]) != lead:
            V.fail(
                func,
                f"sparse targets: integer label ids of shape {V.shape_str(lead + ('P',))} padded with -1",
                f"dtype {target.dtype}, shape {V.shape_str(target.shape)}",
                f"Row i lists the positive labels of row i of the input (any P); or pass a dense "
                f"target of shape {V.shape_str(logits_shape)}.",
            )
        if ignore_index is not None:
            V.fail(
                func,
                "no `ignore_index` with sparse targets",
                f"ignore_index={ignore_index}",
                "Sparse targets list positives; every other label is a negative.",
            )
    weight = V.as_weight_tensor(func, "weight", weight, like=input)
    pos_weight = V.as_weight_tensor(func, "pos_weight", pos_weight, like=input)
    V.check_same_device(func, input, target=target, weight=weight, pos_weight=pos_weight)
    _no_target_grad(func, target=target, weight=weight, pos_weight=pos_weight)
    for name, value in (("weight", weight), ("pos_weight", pos_weight)):
        V.check_broadcastable(
            func,
            name,
            value,
            torch.Size(logits_shape),
            "the logits' shape",
            lambda: f"Use shape ({L},) for one number per label.",
        )

    sparse = target_format == "sparse"
    x = input.reshape(-1, H)
    tflat = target.reshape(N, -1)
    if capturing(input):
        # Captured: the logits, then the registered BCE-with-logits op (its checks become
        # device-side assertions); sparse ids become the dense 0/1 target first.
        if sparse:
            ids = torch.where(tflat < 0, L, tflat.long())
            tflat = torch.zeros(N, L + 1, dtype=input.dtype, device=input.device).scatter(1, ids, 1.0)[:, :L]
        from ._binary import binary_cross_entropy_with_logits

        logits = torch.nn.functional.linear(x, linear_weight, linear_bias)
        return binary_cross_entropy_with_logits(
            logits.reshape(logits_shape),
            tflat.reshape(logits_shape),
            weight,
            reduction=reduction,
            pos_weight=pos_weight,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            validate=validate,
            return_parts=return_parts,
            backend=backend,
        )
    if V.validation_enabled(validate):
        if sparse:
            _check_sparse_ids(func, tflat, L)
        else:
            keep_v = None if ignore_index is None else tflat != ignore_index
            V.check_binary_values(func, torch.empty(0), tflat, keep_v, probabilities_in=False)
    cdt = compute_dtype(input.dtype)

    def _as_rows(v):
        return None if v is None else v.expand(logits_shape).reshape(N, L)

    tgt = BCETarget(
        dense=None if sparse else tflat,
        sparse=tflat.long() if sparse else None,
        L=L,
        weight=_as_rows(weight),
        pos_weight=_as_rows(pos_weight),
        ignore_index=ignore_index,
        eps=label_smoothing,
    )
    if ignore_index is None or sparse:
        denominator = torch.tensor(float(N * L), dtype=cdt, device=input.device)
    else:
        denominator = sum(
            ((tflat[r0 : r0 + 1024] != ignore_index).sum() for r0 in range(0, N, 1024)),
            torch.zeros((), dtype=torch.long, device=input.device),
        ).to(cdt)
    per_element = reduction == "none"
    grad_scale = 1 / denominator if reduction == "mean" else torch.ones((), dtype=cdt)
    plan = _plan(
        N, L, H, input.dtype, _block_args(func, chunk_size, class_chunk_size, memory_budget, None), BUFFERS_DENSE
    )
    W3 = linear_weight.unsqueeze(0)
    b2 = None if linear_bias is None else linear_bias.unsqueeze(0)
    loss = dispatch("linear_binary_cross_entropy_with_logits", x, backend)(
        x, W3, b2, tgt, plan, grad_scale, not per_element, per_element
    )
    loss = loss.reshape(logits_shape) if per_element else loss.reshape(lead)
    out_dtype = (
        torch.promote_types(input.dtype, target.dtype) if (not sparse and target.is_floating_point()) else input.dtype
    )
    return reduce_loss(loss, denominator, reduction, out_dtype=out_dtype, return_parts=return_parts)


def _check_sparse_ids(func, ids, L):
    if ids.numel() == 0:
        return
    bad = (ids < -1) | (ids >= L)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        V.fail(
            func,
            f"positive-label ids in [0, {L - 1}] or -1 (padding)",
            f"{int(ids[r, c])} at row {r}, slot {c}",
            "Sparse targets list the ids of positive labels; pad short rows with -1.",
            V.CrossentIndexError,
        )
