"""Which implementation computes a loss: chosen per call.
Design notes: ``docs/design.md``, section ``crossent.backends._registry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .. import _config
from .._validation import fail
from ..errors import BackendUnavailableError


@dataclass
class Backend:
    name: str
    priority: int  # higher wins in automatic choice
    ops: Dict[str, Callable] = field(default_factory=dict)
    # Returns None when usable for this device, else the reason why not.
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    # Per-op exceptions to ``unavailable`` (e.g. chunked-torch: loss ops CPU only, the fused
    # linear ops on any device).
    op_unavailable: Dict[str, Callable[[torch.device], Optional[str]]] = field(default_factory=dict)

    def reason(self, op: str, device: torch.device) -> Optional[str]:
        """None when this backend can run ``op`` on ``device``, else why not."""
        if op not in self.ops:
            return f"it does not implement {op!r}"
        return self.op_unavailable.get(op, self.unavailable)(device)


_BACKENDS: Dict[str, Backend] = {}
_ORDER: List[str] = []  # names by priority, recomputed by register() (not on every call)


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _ORDER[:] = sorted(_BACKENDS, key=lambda n: -_BACKENDS[n].priority)


def available_backends() -> List[str]:
    return list(_ORDER)


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The name of the backend that runs ``op`` on ``device``.

    ``backend`` None/``"auto"``: ``$CROSSENT_BACKEND`` when set (see ``docs/design.md``),
    else the highest-priority backend that implements ``op`` and can run on the device.
    """
    if backend is None or backend == "auto":
        forced = _config.forced_backend()
        if forced and forced != "auto":
            b = _BACKENDS.get(forced)
            if b is None:
                fail(
                    "CROSSENT_BACKEND",
                    f"one of {['auto'] + available_backends()}",
                    repr(forced),
                    "Unset it (or set it to 'auto') for the automatic choice.",
                )
            if op in b.ops:
                return resolve(op, device, forced)
        for name in _ORDER:
            if _BACKENDS[name].reason(op, device) is None:
                return name
        raise BackendUnavailableError(f"no backend implements {op!r} on {device}")  # reference covers all
    b = _BACKENDS.get(backend)
    if b is None:
        fail(
            "backend",
            f"one of {['auto'] + available_backends()}",
            repr(backend),
            "Leave backend=None for the automatic choice.",
        )
    reason = b.reason(op, device)
    if reason is not None:
        usable = [n for n in available_backends() if _BACKENDS[n].reason(op, device) is None]
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run {op} on {device}: {reason}. "
            f"Usable here: {usable}; backend=None chooses automatically."
        )
    return backend


def dispatch(op: str, like: torch.Tensor, backend: Optional[str] = None) -> Callable:
    """Return the implementation of ``op`` for tensors like ``like`` (see :func:`resolve`)."""
    return _BACKENDS[resolve(op, like.device, backend)].ops[op]
