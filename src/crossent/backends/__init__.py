"""Backends own speed; ``crossent.functional`` owns meaning. See ``_registry``.

Registered here, highest priority first in the automatic choice:

* ``triton`` (priority 20): fused Triton kernels, CUDA tensors only, needs ``triton``.
* ``chunked`` (priority 10): fused CPU kernels (compiled C++ when available, else chunked
  torch ops), CPU tensors only. Also the only CPU backend of ``cross_entropy_inplace``.
* ``chunked-torch`` (priority 1): ``chunked`` without the compiled kernel (its chunked
  torch-ops fallback); loss ops on CPU only, where ``chunked`` wins the automatic choice (it
  is there to be named: ``backend="chunked-torch"`` or ``CROSSENT_BACKEND=chunked-torch``);
  the fused linear ops (:mod:`.linear`) on any device, the automatic choice on CUDA without
  Triton.
* ``reference`` (priority 0): plain torch, any device, any order of derivative.

Double backward (``create_graph=True``) works with every backend: the fused backends
re-derive through the reference formulas when it is asked for.
"""

from . import chunked, reference
from . import triton as triton_backend
from ._registry import (Backend, BackendUnavailableError, available_backends, dispatch, register, resolve)


def _cpu_only(device):
    return None if device.type == "cpu" else f"it runs on CPU tensors only, got a {device.type} tensor"


register(Backend(
    name="reference",
    priority=0,
    ops={
        "binary_cross_entropy": reference.binary_cross_entropy,
        "binary_cross_entropy_with_logits": reference.binary_cross_entropy_with_logits,
        "cross_entropy": reference.cross_entropy,
    },
))

register(Backend(
    name="chunked",
    priority=10,
    ops=dict(chunked.OPS),
    unavailable=_cpu_only,
))

register(Backend(
    name="chunked-torch",
    priority=1,
    ops=dict(chunked.TORCH_OPS),
    unavailable=_cpu_only,
))

register(Backend(
    name="triton",
    priority=20,
    ops=dict(triton_backend.OPS),
    unavailable=triton_backend.unavailable_reason,
))

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "dispatch", "register", "resolve"]
from . import linear as _linear  # noqa: E402,F401  (fused linear + loss ops: chunked, reference)
from . import ops  # noqa: E402,F401  (the crossent:: torch.library ops, used under capture)
from . import lm_head as _lm_head  # noqa: E402,F401  (LM-head statistics: chunked-torch, reference)
