"""Backends own speed; ``crossent.functional`` owns meaning. See ``_registry``."""

from . import reference
from ._registry import Backend, BackendUnavailableError, available_backends, dispatch, register

register(Backend(
    name="reference",
    priority=0,
    ops={
        "binary_cross_entropy": reference.binary_cross_entropy,
        "binary_cross_entropy_with_logits": reference.binary_cross_entropy_with_logits,
        "cross_entropy": reference.cross_entropy,
    },
))

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "dispatch", "register"]
from . import linear as _linear  # noqa: E402,F401  (fused linear + loss ops: chunked, reference)
