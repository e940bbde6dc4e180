"""DTensor inputs of ``crossent.cross_entropy`` and ``crossent.linear_cross_entropy``.

* logits sharded on the class dimension (``Shard(1)``, or ``Shard(0)`` for one unbatched
  row) go to :func:`vocab_parallel_cross_entropy` on the local shard;
* a linear weight sharded on the vocabulary (``Shard(0)``, what ``ColwiseParallel`` makes
  of ``lm_head``) goes to :func:`vocab_parallel_linear_cross_entropy`;
* fully replicated DTensors take the single-process path on their local tensors.

The LM-head options (``z_loss``, ``softcap``, ``temperature``, ``token_weight``,
``return_lse``, ``return_accuracy``) go along; probability targets may be a DTensor
sharded like the logits, or a full tensor (each rank takes its slice).

The loss (and the lse and hit count) comes back as a replicated DTensor on the same mesh
(as torch's ``loss_parallel``); gradients flow back to the DTensors through ``to_local``. The shard
layout (offsets of uneven shards) is read from the DTensor, so no collective is spent on
it, and a compiled step traces it. Other mesh dimensions must replicate the tensors: a batch sharded over a
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
    "class_chunk_size": None,
}

#: The LM-head options, passed on to the vocabulary-parallel functions.
_LM_OPTIONS = ("z_loss", "return_lse", "softcap", "temperature", "token_weight", "return_accuracy")


def _split_options(func: str, what: str, options: dict) -> dict:
    """The LM-head options of ``options`` (``token_weight`` as a local tensor); any other
    option away from its default raises."""
    lm = {k: options.pop(k) for k in _LM_OPTIONS if k in options}
    if "token_weight" in lm:
        lm["token_weight"] = _local(func, "token_weight", lm["token_weight"])
    for k, v in options.items():
        d = _DEFAULTS.get(k)
        if v is d or (not isinstance(v, torch.Tensor) and v == d):
            continue
        V.fail(
            func,
            f"no `{k}` with {what} sharded on the vocabulary",
            f"{k}={v!r}",
            "The vocabulary-parallel path supports weight, ignore_index, label_smoothing, "
            "reduction, validate, return_parts and the LM-head options (docs/distributed.md); "
            "leave it at its default, or gather the logits (`.full_tensor()`).",
        )
    return lm


def _wrap(result, mesh):
    """The loss (or LossParts' loss), and the lse and hit count that follow it with
    ``return_lse`` / ``return_accuracy``, as replicated DTensors on ``mesh``."""
    from torch.distributed.tensor import DTensor

    def wrap(x):
        return DTensor.from_local(x, mesh, _replicate_all(mesh), run_check=False)

    def one(r):
        if isinstance(r, tuple) and hasattr(r, "_fields"):  # LossParts
            return r._replace(loss=wrap(r.loss))
        return wrap(r)

    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return tuple(one(r) for r in result)
    return one(result)


def _layout(t, dim: int, mesh_dim: int):
    """(start, global size) of this rank's shard of DTensor ``t`` on tensor dimension ``dim``,
    sharded over mesh dimension ``mesh_dim``.

    DTensor's ``Shard`` splits as ``torch.chunk`` does: ``ceil(size / n)`` per rank, the last
    ones shorter or empty. Computed here from the mesh coordinate (Python ints, so a
    compiled step traces it without a graph break: torch's own
    ``compute_local_shape_and_global_offset`` reads the offset from a tensor); any other
    split (a ``Shard`` subclass with its own layout) is read with that function in eager."""
    size = int(t.shape[dim])
    n = t.device_mesh.size(mesh_dim)
    coord = t.device_mesh.get_coordinate()
    local = int(t.to_local().shape[dim])
    if coord is not None:
        chunk = -(-size // n)
        start = min(coord[mesh_dim] * chunk, size)
        if local == min(chunk, size - start) and type(t.placements[mesh_dim]).__name__ == "Shard":
            return start, size
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[dim]), size


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
    # probability targets may be sharded like the logits: then their local shard is this rank's slice
    sharded_probs = (
        mesh_dim is not None
        and is_dtensor(target)
        and target.is_floating_point()
        and _shard_dim(func, "target", target, class_dim) == mesh_dim
    )
    target = target.to_local() if sharded_probs else _local(func, "target", target)
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
    lm = _split_options(func, "logits", unsupported)
    start, size = _layout(input, class_dim, mesh_dim)
    local = input.to_local()
    w = _slice(func, "weight", weight, start, local.shape[class_dim], True)
    if isinstance(target, torch.Tensor) and target.is_floating_point() and not sharded_probs:
        # probability targets of the whole vocabulary: this rank's slice of the classes
        target = target.narrow(class_dim, start, local.shape[class_dim])
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
        **lm,
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
    plain = not is_dtensor(linear_weight)  # then the input is the DTensor
    mesh = input.device_mesh if plain else linear_weight.device_mesh
    mesh_dim = None if plain else _shard_dim(func, "linear_weight", linear_weight, 0)
    if mesh_dim is None:  # a plain or replicated weight: the single-process loss on local tensors
        result = single(
            _local(func, "input", input),
            linear_weight if plain else linear_weight.to_local(),
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
    lm = _split_options(func, "a linear weight", unsupported)
    if linear_weight.dim() != 2:
        V.fail(
            func,
            "a (V, in_features) linear_weight when it is sharded on the vocabulary",
            f"shape {V.shape_str(linear_weight.shape)}",
            "K-dimensional heads are not vocabulary-parallel.",
        )
    start, size = _layout(linear_weight, 0, mesh_dim)
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
            **lm,
        ),
        mesh,
    )
