r"""LM-head options and per-token outputs: the meaning, in one place (docs/lm-head.md).

Order of the transforms, per token: the logits :math:`x` are soft-capped first, then
divided by the temperature, then go through the softmax:

.. math::
    z_j = \frac{s \tanh(x_j / s)}{T} \;(\texttt{softcap}=s), \qquad z_j = \frac{x_j}{T} \;(\text{no cap}),
    \qquad \log p_j = z_j - \operatorname{lse}(z).

Per counted token i (target not ``ignore_index``), with class weights :math:`w`
(1 without), smoothing :math:`\epsilon`, token weight :math:`\tau_i` (1 without):

.. math::
    \ell_i = \tau_i\Bigl[(1-\epsilon)\,w_{y_i}(-\log p_{y_i})
        + \frac{\epsilon}{C}\sum_c w_c(-\log p_c)
        + \lambda_z\, w_{y_i}\operatorname{lse}(z)^2\Bigr],
    \qquad d_i = \tau_i\, w_{y_i},

``mean`` is :math:`\sum_i \ell_i / \sum_i d_i` (:class:`LossParts` holds both sums),
``sum`` is :math:`\sum_i \ell_i`. So without class or token weights the z-loss adds
:math:`\lambda_z \operatorname{lse}^2` per counted token and ``mean`` is the mean over
counted tokens (PaLM's z-loss). Ignored tokens have :math:`\ell_i = d_i = 0`, log-prob,
entropy and lse 0, and zero gradient, whatever their logits hold.

Entropy :math:`H = -\sum_j p_j \log p_j` is computed as :math:`B/(1+S') + \log(1+S')`
(:mod:`crossent.backends.lm_head`): non-negative terms only.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _validation as V
from .._capture import capturing, transforming
from ..backends import backend_for, dispatch
from ..backends.lm_head import plan_rows
from ._reduction import compute_dtype, reduce_loss


def wants_lm_head(z_loss, softcap, temperature, token_weight, return_accuracy) -> bool:
    """Does a call use an LM-head option (then :func:`lm_cross_entropy` computes it)?"""
    return (
        z_loss != 0.0 or softcap is not None or temperature != 1.0 or token_weight is not None or bool(return_accuracy)
    )


def lm_stats(x, W, b, y, keep, sigma, temperature: float, softcap: float, rows: int, backend):
    """``(nll, sm, lse, ent, correct)`` per row from the backend that implements ``lm_head``
    (``chunked`` on CPU, ``chunked-torch`` elsewhere: the Triton kernels do not compute
    these options; ``reference`` under ``torch.func`` transforms)."""
    fn = dispatch("lm_head", x, "reference" if transforming() else backend)
    return fn(x, W, b, y, keep, sigma, temperature, softcap, rows)


class LMOptions(NamedTuple):
    """The checked LM-head options of one call, with the loss options they combine with."""

    weight: Optional[torch.Tensor]
    label_smoothing: float
    reduction: str
    z_loss: float
    temperature: float
    softcap: float
    token_weight: Optional[torch.Tensor]
    return_lse: bool
    return_accuracy: bool
    return_parts: bool
    backend: Optional[str]


def lm_cross_entropy(func, x, W, b, y, keep, o: LMOptions, *, rows: int, out_shape):
    """The loss of the module docstring from the per-row statistics; returns what
    ``cross_entropy`` / ``linear_cross_entropy`` return: the loss (or :class:`LossParts`),
    then the lse (``return_lse``) and the accuracy count (``return_accuracy``), in ``x``'s
    dtype. ``W`` None: ``x`` holds the logits rows; else the hidden states of a linear head."""
    C = x.shape[1] if W is None else W.shape[0]
    cdt = compute_dtype(x.dtype)
    eps, z_loss, token_weight, weight = o.label_smoothing, o.z_loss, o.token_weight, o.weight
    w = None if weight is None else weight.to(cdt)
    sigma = None
    if eps:
        sigma = torch.full((C,), eps / C, dtype=cdt, device=x.device) if w is None else w * (eps / C)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    if w is None:
        dw = keep.to(cdt)
    else:
        dw = torch.where(keep, w.gather(0, torch.where(keep, y, 0).long()), zero)
    tw = None if token_weight is None else token_weight.reshape(-1).to(cdt)
    den = dw if tw is None else dw * tw
    chosen = backend_for("lm_head", x, "reference" if transforming() else o.backend)
    fn = chosen.ops["lm_head"]
    fused = chosen.ops["lm_head_loss"] if chosen.capabilities.lm_head_loss else None
    if (
        fused is not None
        and o.reduction != "none"
        and not any(t is not None and t.requires_grad for t in (token_weight, weight))
    ):
        # 'mean' / 'sum' of a loss whose coefficients need no gradient: one pass computes
        # the total and its gradients (the plain fused CE's three matrix products)
        c_nll = den * (1 - eps)
        c_sm = keep.to(cdt) if tw is None else torch.where(keep, tw, zero)
        total, lse, correct = fused(x, W, b, y, keep, sigma, c_nll, c_sm, den * z_loss, o.temperature, o.softcap, rows)
        loss = total
    else:
        nll, sm, lse, _, correct = fn(x, W, b, y, keep, sigma, o.temperature, o.softcap, rows)
        loss = nll * ((1 - eps) * dw)
        if eps:
            loss = loss + sm
        if z_loss:
            loss = loss + (z_loss * dw) * lse.square()
        if tw is not None:
            loss = loss * tw
        loss = loss.reshape(out_shape)
    capture = capturing(x)
    result = reduce_loss(loss, den.sum(), o.reduction, out_dtype=x.dtype, return_parts=o.return_parts, capture=capture)
    extras = []
    if o.return_lse:
        extras.append(lse.detach().reshape(out_shape))
    if o.return_accuracy:
        extras.append(correct.sum())
    return (result, *extras) if extras else result


def rows_for(N, C, dtype, chunk_size, memory_budget, func) -> int:
    """Rows per block of the LM-head op (checked ``chunk_size``, else from the budget)."""
    for name, v in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            V.fail(
                func,
                f"`{name}` to be a positive int or None",
                repr(v),
                "Leave it None to size row blocks from the memory budget.",
            )
    return chunk_size if chunk_size is not None else plan_rows(N, C, dtype, memory_budget)


def _check_index_target(func, target, lead, C, ignore_index, validate, capture):
    if not isinstance(target, torch.Tensor):
        V.fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            V.CrossentTypeError,
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        V.fail(
            func,
            "`target` of class indices (an integer dtype)",
            f"dtype {target.dtype}",
            "Pass the chosen token ids, e.g. `target.long()`.",
            V.CrossentTypeError,
        )
    if tuple(target.shape) != tuple(lead):
        V.fail(
            func,
            f"`target` of shape {V.shape_str(lead)} (one token id per row of logits)",
            f"shape {V.shape_str(target.shape)}",
            "The classes are the last dimension of the logits; for (B, T, V) logits pass (B, T) ids.",
        )
    if V.validation_enabled(validate):
        if capture:
            V.assert_multiclass_values(func, target, True, C, ignore_index)
        else:
            V.check_class_indices(func, target, C, ignore_index)


def _logprobs(func, input, W, b, target, temperature, softcap, ignore_index, return_entropy, validate, backend, rows):
    """The common part of :func:`token_logprobs` (``W`` None: ``input`` holds logits) and
    :func:`linear_token_logprobs` (``input`` holds hidden states): target checks, then the
    per-row statistics in blocks of ``rows`` rows."""
    C = input.shape[-1] if W is None else W.shape[0]
    lead = tuple(input.shape[:-1])
    capture = capturing(input)
    _check_index_target(func, target, lead, C, ignore_index, validate, capture)
    V.check_same_device(func, input, target=target)
    x = input.reshape(-1, input.shape[-1])
    y = target.reshape(-1)
    keep = y != ignore_index
    nll, _, _, ent, _ = lm_stats(x, W, b, y, keep, None, temperature, softcap, rows, backend)
    lp = (-nll).reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp


def token_logprobs(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
):
    r"""Per-token log-probability of the target under softcapped, tempered logits.

    With the transformed logits :math:`z = s\tanh(x/s)/T` (no cap: :math:`z = x/T`):

    .. math::
        \log p_{y} = z_{y} - \log\sum_j e^{z_j}
        = -\Bigl[(m - z_y) + \log\bigl(1 + \textstyle\sum_{j\ne k} e^{z_j - m}\bigr)\Bigr],
        \qquad
        H = -\sum_j p_j \log p_j = \frac{\sum_j e^{z_j-m}(m - z_j)}{1 + \sum_{j\ne k}e^{z_j-m}}
            + \log\bigl(1 + \textstyle\sum_{j\ne k} e^{z_j - m}\bigr)

    (:math:`m = z_k` the largest). Both brackets are sums of non-negative terms, so a
    confident token's log-prob (-4e-9 for logits [20, 0, 0], class 0) and a near-one-hot
    row's entropy (1e-30) keep their relative precision, where ``p * log p`` cancels.

    Args:
        input: logits ``(*, C)``, classes last (``(B, T, V)`` for a language model).
        target: token ids ``(*)`` (any integer dtype); ``ignore_index`` marks padding.
        temperature: logits are divided by it (after the soft cap).
        softcap: None, or ``s``: logits become ``s * tanh(logits / s)`` first.
        ignore_index: log-prob and entropy are 0 there, with zero gradient.
        return_entropy: also return the per-token entropy ``H``.
        validate, backend, chunk_size: value checks, backend choice (``'chunked'`` by
            default on CPU, ``'chunked-torch'``, ``'reference'``), rows per block.

    Returns:
        ``logp`` of shape ``(*)`` in float32 (float64 for float64 input), or ``(logp, H)``;
        both differentiable w.r.t. ``input`` (an RL loss backpropagates through both).

    >>> import torch, crossent
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> lp, H = crossent.token_logprobs(logits, torch.tensor([0, 1]), return_entropy=True)
    >>> [round(v, 4) for v in lp.tolist()], [round(v, 4) for v in H.tolist()]
    ([-0.2413, -0.5536], [0.6216, 0.9744])
    """
    func = "token_logprobs"
    V.check_floating_input(func, input)
    _, temperature, softcap = V.check_lm_head_options(func, temperature=temperature, softcap=softcap)
    ignore_index = V.check_ignore_index(func, ignore_index)
    if input.dim() < 1:
        V.fail(func, "`input` of shape (*, C)", "a 0-dim tensor", "Pass logits with the classes last.")
    C = input.shape[-1]
    lead = tuple(input.shape[:-1])
    rows = rows_for(math.prod(lead), C, input.dtype, chunk_size, None, func)
    return _logprobs(
        func, input, None, None, target, temperature, softcap, ignore_index, return_entropy, validate, backend, rows
    )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
):
    r""":func:`token_logprobs` of ``F.linear(hidden, weight, bias)`` without the ``(N, V)`` logits.

    Same formulas, values and gradients (w.r.t. ``hidden``, ``weight`` and ``bias``) as
    ``token_logprobs(F.linear(hidden, weight, bias), target, ...)``, computed in row blocks
    of ``chunk_size`` rows by all V classes (default: sized from ``memory_budget`` bytes,
    256 MiB or ``$CROSSENT_LINEAR_BUDGET``; 174 rows for V = 128256 in float32). The
    forward keeps four numbers per row; the backward recomputes each block's logits (one
    more matrix product), so no ``(N, V)`` tensor exists in either pass.

    Args:
        hidden: ``(*, H)``; weight: ``(V, H)`` (``nn.Linear.weight``); bias: ``(V,)`` or None.
        target: ``(*)`` token ids. Other arguments as :func:`token_logprobs`.

    >>> import torch, crossent
    >>> h = torch.tensor([[1.0, -0.5], [0.2, 0.3]])
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    >>> lp = crossent.linear_token_logprobs(h, W, torch.tensor([0, 2]))
    >>> torch.allclose(lp, crossent.token_logprobs(h @ W.T, torch.tensor([0, 2])))
    True
    """
    from ._linear import _check_linear

    func = "linear_token_logprobs"
    H, C, _ = _check_linear(func, hidden, weight, bias, allow_kdim=False)
    _, temperature, softcap = V.check_lm_head_options(func, temperature=temperature, softcap=softcap)
    ignore_index = V.check_ignore_index(func, ignore_index)
    lead = tuple(hidden.shape[:-1])
    rows = rows_for(math.prod(lead), C, hidden.dtype, chunk_size, memory_budget, func)
    return _logprobs(
        func, hidden, weight, bias, target, temperature, softcap, ignore_index, return_entropy, validate, backend, rows
    )
