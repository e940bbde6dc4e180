r"""Hugging Face ``transformers`` causal LMs with crossent's loss.
Design notes: ``docs/design.md``, section ``crossent.integrations.huggingface``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..functional import cross_entropy, linear_cross_entropy


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels of the next token at every position; the last position is ignored."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _normalise(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: Optional[int] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    *,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
    **kwargs,
) -> torch.Tensor:
    r"""Causal LM loss: ``transformers``' ``ForCausalLMLoss`` with crossent's cross-entropy.

    .. math::
        L = \frac{1}{D} \sum_{b,t:\ y_{b,t+1} \ne \text{ignore}} -\log \mathrm{softmax}(z_{b,t})_{y_{b,t+1}}

    with :math:`D` the number of kept targets, or ``num_items_in_batch`` when given (the
    Trainer's count over all gradient-accumulation steps, so that the sum of the steps'
    losses is the mean over all of them).

    Args:
        logits: (B, T, V) scores; computed in float32 (as ``transformers`` does).
        labels: (B, T) token ids, ``ignore_index`` where no loss is wanted; shifted here
            (position t predicts t + 1) unless ``shift_labels`` is given.
        vocab_size: V (checked against the logits when given).
        num_items_in_batch: divide the sum by this instead of taking the mean.
        validate, backend: crossent options. Other keywords (what a model's forward
            passes along) are ignored.

    Use it as ``model.loss_function = causal_lm_loss``; its result equals the model's
    own loss (values and gradients, to float32 rounding).
    """
    func = "causal_lm_loss"
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        V.fail(
            func,
            f"logits with vocab_size={vocab_size} classes in the last dimension",
            f"shape {V.shape_str(logits.shape)}",
            "Pass the model's config.vocab_size.",
        )
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    logits = logits.float()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction=reduction,
        validate=validate,
        backend=backend,
    )
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)


def compute_loss(outputs, labels: torch.Tensor, num_items_in_batch=None, **kwargs) -> torch.Tensor:
    """``Trainer(compute_loss_func=compute_loss)``: :func:`causal_lm_loss` of ``outputs.logits``."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch, **kwargs)


def fused_causal_lm_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
    memory_budget: Optional[int] = None,
    **model_kwargs,
) -> torch.Tensor:
    r"""A causal LM's loss without its ``(B, T, V)`` logits.

    Runs the model's body (``model.base_model``) for the last hidden states :math:`h`
    (B, T, d) and computes :func:`causal_lm_loss` of :math:`h W^\top (+ b)` with
    :func:`crossent.linear_cross_entropy` and the output layer
    (``model.get_output_embeddings()``), chunk by chunk: the same loss and gradients as
    ``model(input_ids, labels=labels).loss`` to float32 rounding, while the memory of the
    loss is a few chunks instead of several ``B*T*V`` buffers.

    For models whose logits are the plain linear head (GPT-2, Llama, Mistral, Qwen, ...).
    Models that transform the logits after the head (``final_logit_softcapping``,
    ``logit_scale``) are refused, since the fused loss would differ from theirs.

    Args:
        model: a ``transformers`` ``...ForCausalLM`` model.
        input_ids, labels: (B, T); labels as for the model (shifted here, ``-100`` ignored).
        attention_mask, model_kwargs: passed to the model's body (``**model_kwargs``).
        num_items_in_batch: as in :func:`causal_lm_loss`.
        validate, backend, memory_budget: crossent options (see
            :func:`crossent.linear_cross_entropy`; the budget bounds the loss's chunks).
    """
    func = "fused_causal_lm_loss"
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None):
            V.fail(
                func,
                "a model whose logits are its plain linear head",
                f"config.{name}={getattr(config, name)!r}",
                "Use model.loss_function = causal_lm_loss for this model (it sees the real logits).",
            )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        V.fail(
            func,
            "model.get_output_embeddings() to be an nn.Linear",
            type(head).__name__,
            "Use model.loss_function = causal_lm_loss for this model.",
            V.CrossentTypeError,
        )
    hidden = model.base_model(input_ids, attention_mask=attention_mask, **model_kwargs)[0]
    target = _shift(labels, ignore_index).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        target.reshape(-1),
        linear_bias=head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        validate=validate,
        backend=backend,
        memory_budget=memory_budget,
    )
    return loss if num_items_in_batch is None else _normalise(loss, num_items_in_batch)
