"""The one collective the tracking code needs: a float64 sum over the ranks of a group.
Design notes: ``docs/design.md``, section ``crossent.tracking._distributed``.
"""

from __future__ import annotations

import torch


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is compiled in and a default process group exists."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _collective_device(group) -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend (gloo, mpi) gets CPU tensors."""
    backend = torch.distributed.get_backend(group)
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise sum of ``values`` (float64) over the ranks of ``group``; a new tensor.

    Every rank of the group must call it with the same number of values.
    """
    buf = values.detach().to(device=_collective_device(group), dtype=torch.float64).clone()
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=group)
    return buf
