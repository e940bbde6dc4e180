"""DTensor inputs of ``crossent.cross_entropy`` and ``crossent.linear_cross_entropy``.

* logits sharded on the class dimension (``Shard(1)``, or ``Shard(0)`` for one unbatched
  row) go to :func:`vocab_parallel_cross_entropy` on the local shard;
* a linear weight sharded on the vocabulary (``Shard(0)``, what ``ColwiseParallel`` makes
  of ``lm_head``) goes to :func:`vocab_parallel_linear_cross_entropy`;
* fully replicated DTensors take the single-process path on their local tensors.

The loss comes back as a replicated DTensor on the same mesh (as torch's
``loss_parallel``); gradients flow back to the DTensors through ``to_local``. The shard
layout (offsets of uneven shards) is read from the DTensor, so no collective is spent on
it. Other mesh dimensions must replicate the tensors: a batch sharded over a
data-parallel dimension is a different loss (a mean per data-parallel rank).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (no import of the DTensor package)."""
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _replicate_all(mesh):
    from torch.distributed.tensor import Replicate

    return [Replicate()] * mesh.ndim


def _shard_dim(func: str, name: str, t, dim: int) -> Optional[int]:
    """The mesh dimension that shards ``t`` on tensor dimension ``dim`` (None: replicated);
    every other placement must be ``Replicate``."""
    from torch.distributed.tensor import Replicate, Shard

    found = None
    for i, p in enumerate(t.placements):
        if isinstance(p, Shard) and p.dim % t.dim() == dim % t.dim() and found is None:
            found = i
        elif not isinstance(p, Replicate):
            V.fail(
                func,
                f"`{name}` sharded on dimension {dim % t.dim()} (the vocabulary) over one mesh "
                "dimension and replicated over the others",
                f"placements {tuple(t.placements)}",
                "Logits (B, T, V) sharded on the last dimension (ColwiseParallel's output): pass "
                "`logits.flatten(0, -2)` and `target.flatten()`. Otherwise redistribute it "
                "(`t.redistribute(mesh, [Shard(dim)])`); a batch sharded over data parallelism is a "
                "separate loss per data-parallel rank: call the loss on the local batch and add up "
                "LossParts (crossent.tracking).",
            )
    return found


def _local(func: str, name: str, t):
    """A replicated DTensor's local tensor; plain tensors and None pass through."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if not all(isinstance(p, Replicate) for p in t.placements):
        V.fail(
            func,
            f"`{name}` replicated (or a plain tensor)",
            f"placements {tuple(t.placements)}",
            f"Only the logits (or the linear weight) are sharded on the vocabulary; pass "
            f"`{name}.full_tensor()` or a replicated DTensor.",
        )
    return t.to_local()


def _slice(func: str, name: str, t, start: int, size: int, dim0_sharded_ok: bool):
    """This rank's slice of a per-class tensor (class weights, bias): a DTensor sharded on
    dimension 0 gives its local shard, a plain or replicated one is sliced."""
    if t is None:
        return None
    if is_dtensor(t):
        if dim0_sharded_ok and _shard_dim(func, name, t, 0) is not None:
            return t.to_local()
        t = t.to_local()
    return t[start : start + size]


#: The single-process options the vocabulary-parallel path does not take, at their defaults
#: (a sharded call with any other value raises; a replicated call passes them through).
_DEFAULTS = {
    "backend": None,
    "inplace_backward": False,
    "options": None,
    "return_lse": False,
    "class_chunk_size": None,
    "z_loss": 0.0,
    "softcap": None,
    "temperature": 1.0,
    "token_weight": None,
    "return_accuracy": False,
}


def _reject_options(func: str, what: str, options: dict) -> None:
    for k, v in options.items():
        d = _DEFAULTS.get(k)
        if v is d or (not isinstance(v, torch.Tensor) and v == d):
            continue
        V.fail(
            func,
            f"no `{k}` with {what} sharded on the vocabulary",
            f"{k}={v!r}",
            "The vocabulary-parallel path supports weight, ignore_index, label_smoothing, "
            "reduction, validate and return_parts (docs/distributed.md); leave it at its default, "
            "or gather the logits (`.full_tensor()`) for the single-process options.",
        )


def _wrap(result, mesh):
    from torch.distributed.tensor import DTensor

    def wrap(x):
        return DTensor.from_local(x, mesh, _replicate_all(mesh), run_check=False)

    if isinstance(result, tuple) and hasattr(result, "_fields"):  # LossParts
        return result._replace(loss=wrap(result.loss))
    return wrap(result)


def _layout(t, dim: int):
    """(start, global size) of this rank's shard of DTensor ``t`` on tensor dimension ``dim``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[dim]), int(t.shape[dim])


def cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, *, validate, return_parts, **unsupported
):
    """``crossent.cross_entropy`` for DTensor logits (see the module doc)."""
    from ..functional._multiclass import cross_entropy as single
    from ._vocab_parallel import vocab_parallel_cross_entropy

    func = "cross_entropy"
    mesh = input.device_mesh
    class_dim = 1 if input.dim() >= 2 else 0
    mesh_dim = _shard_dim(func, "input", input, class_dim)
    target = _local(func, "target", target)
    if mesh_dim is None:  # replicated: the normal path on the local tensor
        result = single(
            input.to_local(),
            target,
            _local(func, "weight", weight),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            **unsupported,
        )
        return _wrap(result, mesh)
    _reject_options(func, "logits", unsupported)
    start, size = _layout(input, class_dim)
    local = input.to_local()
    w = _slice(func, "weight", weight, start, local.shape[class_dim], True)
    result = vocab_parallel_cross_entropy(
        local,
        target,
        group=mesh.get_group(mesh_dim),
        vocab_start=start,
        vocab_size=size,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        validate=validate,
        return_parts=return_parts,
    )
    return _wrap(result, mesh)


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    validate,
    return_parts,
    chunk_size,
    memory_budget,
    **unsupported,
):
    """``crossent.linear_cross_entropy`` with a DTensor weight (see the module doc)."""
    from ..functional._linear import linear_cross_entropy as single
    from ._vocab_parallel import vocab_parallel_linear_cross_entropy

    func = "linear_cross_entropy"
    if not is_dtensor(linear_weight):  # a DTensor input with a plain weight
        mesh = input.device_mesh
        result = single(
            _local(func, "input", input),
            linear_weight,
            _local(func, "target", target),
            linear_bias=_local(func, "linear_bias", linear_bias),
            weight=_local(func, "weight", weight),
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            **unsupported,
        )
        return _wrap(result, mesh)
    mesh = linear_weight.device_mesh
    mesh_dim = _shard_dim(func, "linear_weight", linear_weight, 0)
    if mesh_dim is None:
        result = single(
            _local(func, "input", input),
            linear_weight.to_local(),
            _local(func, "target", target),
            linear_bias=_local(func, "linear_bias", linear_bias),
            weight=_local(func, "weight", weight),
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            **unsupported,
        )
        return _wrap(result, mesh)
    _reject_options(func, "a linear weight", unsupported)
    if linear_weight.dim() != 2:
        V.fail(
            func,
            "a (V, in_features) linear_weight when it is sharded on the vocabulary",
            f"shape {V.shape_str(linear_weight.shape)}",
            "K-dimensional heads are not vocabulary-parallel.",
        )
    start, size = _layout(linear_weight, 0)
    local_w = linear_weight.to_local()
    Vr = local_w.shape[0]
    return _wrap(
        vocab_parallel_linear_cross_entropy(
            _local(func, "input", input),
            local_w,
            _local(func, "target", target),
            group=mesh.get_group(mesh_dim),
            bias=_slice(func, "linear_bias", linear_bias, start, Vr, True),
            vocab_start=start,
            vocab_size=size,
            weight=_slice(func, "weight", weight, start, Vr, True),
            ignore_index=-100 if ignore_index is None else ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            validate=validate,
            return_parts=return_parts,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
        ),
        mesh,
    )
