"""Backends own speed; ``crossent.functional`` owns meaning. See ``_registry``.
Design notes: ``docs/design.md``, section ``crossent.backends``.
"""

from . import chunked, reference
from . import triton as triton_backend
from ._registry import Backend, BackendUnavailableError, available_backends, dispatch, register, resolve


def _cpu_only(device):
    return None if device.type == "cpu" else f"it runs on CPU tensors only, got a {device.type} tensor"


register(
    Backend(
        name="reference",
        priority=0,
        ops={
            "binary_cross_entropy": reference.binary_cross_entropy,
            "binary_cross_entropy_with_logits": reference.binary_cross_entropy_with_logits,
            "cross_entropy": reference.cross_entropy,
        },
    )
)

register(
    Backend(
        name="chunked",
        priority=10,
        ops=dict(chunked.OPS),
        unavailable=_cpu_only,
    )
)

register(
    Backend(
        name="chunked-torch",
        priority=1,
        ops=dict(chunked.TORCH_OPS),
        unavailable=_cpu_only,
    )
)

register(
    Backend(
        name="triton",
        priority=20,
        ops=dict(triton_backend.OPS),
        unavailable=triton_backend.unavailable_reason,
    )
)

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "dispatch", "register", "resolve"]
from . import linear as _linear  # noqa: E402,F401  (fused linear + loss ops: chunked, reference)
from . import ops  # noqa: E402,F401  (the crossent:: torch.library ops, used under capture)
from . import lm_head as _lm_head  # noqa: E402,F401  (LM-head statistics: chunked-torch, reference)
