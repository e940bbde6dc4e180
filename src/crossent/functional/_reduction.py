"""The one place that decides what ``reduction`` means.
Design notes: ``docs/design.md``, section ``crossent.functional._reduction``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple, Union

import torch

from .._dtypes import compute_dtype as compute_dtype  # re-exported: functional/* imports it from here
from .._dtypes import is_low_precision
from .._dtypes import mean_grad_scale as mean_grad_scale  # re-exported: functional/* imports it from here
from .._validation import check_reduction


class LossParts(NamedTuple):
    """What a loss call returns with ``return_parts=True``.

    Attributes:
        loss: the reduced loss exactly as without ``return_parts`` (keeps its graph).
        total: the sum of the per-element losses, detached, float64 (a 0-dim tensor).
        denominator: what ``mean`` divides ``total`` by, detached, float64 (a 0-dim tensor):
            the number of kept elements, or the sum of their class weights.
    """

    loss: torch.Tensor
    total: torch.Tensor
    denominator: torch.Tensor


def legacy_reduction(func: str, size_average, reduce, reduction: str) -> str:
    """Resolve torch's deprecated ``size_average`` / ``reduce`` pair, as torch does.

    torch's deprecated alias ``reduction='elementwise_mean'`` is accepted as ``'mean'``
    with a DeprecationWarning (torch warns too); everything else goes through
    :func:`crossent._validation.check_reduction`."""
    if reduction == "elementwise_mean":
        warnings.warn(
            f"{func}: reduction='elementwise_mean' is deprecated (as in torch); use reduction='mean'.",
            DeprecationWarning,
            stacklevel=3,
        )
        reduction = "mean"
    if size_average is None and reduce is None:
        return check_reduction(func, reduction)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        resolved = "mean"
    elif reduce:
        resolved = "sum"
    else:
        resolved = "none"
    warnings.warn(
        f"{func}: size_average and reduce are deprecated (as in torch); use reduction='{resolved}' instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    return resolved


def reduce_loss(
    loss: torch.Tensor,
    denominator: Union[torch.Tensor, int, None],
    reduction: str,
    *,
    out_dtype: torch.dtype,
    return_parts: bool = False,
    capture: bool = False,
):
    """Apply ``reduction`` to per-element ``loss`` (already multiplied by its weights).

    Args:
        loss: per-element losses, any shape, in the compute dtype.
        denominator: ``sum_i d_i`` for ``mean``: a tensor (for weighted or masked losses)
            or ``None`` meaning ``loss.numel()``.
        reduction: 'none' | 'mean' | 'sum'.
        out_dtype: the dtype of the result (the input's dtype, like torch).
        return_parts: also return the detached float64 numerator and denominator.
        capture: the call is being captured (:mod:`crossent._capture`): the denominator is
            never read on the host (the zero test is a select in the graph).
    """
    # A backend's 0-dim total is its own sum (no extra node: small inputs pay per op).
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss if loss.dim() == 0 else loss.sum()
    elif denominator is None:
        out = loss.sum() / loss.numel()  # empty: 0 / 0 = nan, like torch
    else:
        # A zero denominator (every element ignored, or kept weights summing to 0) gives
        # nan like torch, with a zero gradient (torch: zero when all are ignored) instead
        # of 0 * inf = nan flowing back.
        if isinstance(denominator, torch.Tensor):
            if denominator.dtype != loss.dtype:
                denominator = denominator.to(loss.dtype)
            # Reading a CPU number costs no device sync; elsewhere the select below
            # decides without reading it.
            nonzero = (
                not capture and denominator.device.type == "cpu" and denominator.item() != 0
            )  # item: no grad warning
        else:  # a Python number from a backend: divided by as a scalar (same bits as a
            # 0-dim tensor of it), made a tensor only for the selects
            denominator = float(denominator)
            nonzero = denominator != 0
            if not nonzero:
                denominator = torch.tensor(denominator, dtype=loss.dtype, device=loss.device)
        if nonzero:  # same value and gradient as the selects, two ops fewer
            out = (loss if loss.dim() == 0 else loss.sum()) / denominator
        else:
            empty = denominator == 0
            safe = torch.where(empty, torch.ones_like(denominator), denominator)
            out = torch.where(empty, torch.full_like(safe, float("nan")), loss.sum() / safe)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    if not return_parts:
        return out
    with torch.no_grad():
        total = loss.detach().sum(dtype=torch.float64)
        if denominator is None:
            den = torch.scalar_tensor(loss.numel(), dtype=torch.float64, device=loss.device)
        elif isinstance(denominator, torch.Tensor):
            den = denominator.detach().to(torch.float64)
        else:
            den = torch.tensor(float(denominator), dtype=torch.float64, device=loss.device)
    return LossParts(out, total, den)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def no_autocast(device: torch.device):
    """A context that switches autocast off on ``device`` while the loss is computed (a
    no-op where autocast is not active or does not exist for the device type)."""
    if not _autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def autocast_inputs(*tensors):
    """Under ``torch.autocast``, torch runs its losses in the float32 policy: fp16/bf16
    arguments are cast to float32 and the loss comes back in float32 (``F.binary_cross_entropy``
    on CUDA raises instead; crossent follows the float32 policy there too). Returns the
    tensors, cast where autocast is active on their device; non-tensors pass through."""
    first = (
        tensors[0]
        if isinstance(tensors[0], torch.Tensor)
        else next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    )
    if first is None or not _autocast_enabled(first.device.type):
        return tensors
    return tuple(t.float() if isinstance(t, torch.Tensor) and is_low_precision(t.dtype) else t for t in tensors)
