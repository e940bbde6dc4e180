"""Which implementation computes a loss: chosen per call, from one declared table.

Each backend is a :class:`Backend` record: its ops, when it can run, and its
:class:`Capabilities` (what its ops accept beyond the reference contract). The functional
layer reads those declarations (``backend_for(op, x).capabilities``), never attributes of
the functions. Design notes: ``docs/design.md``, section ``crossent.backends._registry``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _config
from ..errors import BackendUnavailableError, fail


@dataclass(frozen=True)
class Capabilities:
    """What a backend's ops accept beyond the contract of :mod:`crossent.backends.reference`.

    Every flag is False for a backend that only implements that contract (the reference,
    or one a user registers); the functional layer then calls the plain signature. A flag
    names the ops it is about, and :func:`register` refuses a flag whose ops the backend
    does not implement.

    >>> from crossent.backends import capabilities
    >>> capabilities("chunked").bce_sum_only, capabilities("reference").bce_sum_only
    (True, False)
    """

    cross_entropy_spatial: bool = False
    """``cross_entropy`` (not ``cross_entropy_inplace``) takes K-dim logits as (N, C, S)
    with class-index targets (N*S,): the functional layer skips its move-classes-last copy
    and the op makes one only where its kernel needs rows."""

    cross_entropy_reduction: bool = False
    """``cross_entropy`` and ``cross_entropy_inplace`` take ``reduction=``: the gradient is
    pre-scaled in the same pass by the grad_output a plain ``backward()`` will send."""

    bce_sum_only: bool = False
    """``binary_cross_entropy`` and ``binary_cross_entropy_with_logits`` take
    ``sum_only=True, grad_scale=``: they return the 0-dim sum (no per-element loss buffer)
    with the gradient pre-scaled by ``grad_scale``."""

    lm_head_loss: bool = False
    """The backend implements the op ``lm_head_loss``: the summed LM-head loss with its
    gradients in the same pass, used for ``mean`` / ``sum`` when only the inputs need a
    gradient (see :mod:`crossent.backends.lm_head`)."""


#: The ops each capability is about (all must be implemented when the flag is set).
_CAPABILITY_OPS: Dict[str, Tuple[str, ...]] = {
    "cross_entropy_spatial": ("cross_entropy",),
    "cross_entropy_reduction": ("cross_entropy", "cross_entropy_inplace"),
    "bce_sum_only": ("binary_cross_entropy", "binary_cross_entropy_with_logits"),
    "lm_head_loss": ("lm_head", "lm_head_loss"),
}


@dataclass
class Backend:
    """One registered backend: its name, its rank in the automatic choice, its ops (name
    -> implementation), where it runs and what its ops accept (:class:`Capabilities`)."""

    name: str
    priority: int  # higher wins in automatic choice
    ops: Dict[str, Callable] = field(default_factory=dict)
    # Returns None when usable for this device, else the reason why not.
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    # Per-op exceptions to ``unavailable`` (e.g. chunked-torch: loss ops CPU only, the fused
    # linear ops on any device).
    op_unavailable: Dict[str, Callable[[torch.device], Optional[str]]] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)

    def reason(self, op: str, device: torch.device) -> Optional[str]:
        """None when this backend can run ``op`` on ``device``, else why not."""
        if op not in self.ops:
            return f"it does not implement {op!r}"
        return self.op_unavailable.get(op, self.unavailable)(device)


_BACKENDS: Dict[str, Backend] = {}
_ORDER: List[str] = []  # names by priority, recomputed by register() (not on every call)


def register(backend: Backend) -> None:
    """Add ``backend`` (or replace the one of that name) and recompute the priority order.

    Raises ``ValueError`` when a declared capability names an op the backend lacks."""
    for flag in dataclasses.fields(backend.capabilities):
        missing = [op for op in _CAPABILITY_OPS[flag.name] if op not in backend.ops]
        if getattr(backend.capabilities, flag.name) and missing:
            fail(
                "register",
                f"backend {backend.name!r} declaring {flag.name}=True to implement {list(_CAPABILITY_OPS[flag.name])}",
                f"no {missing}",
                f"Add the ops, or leave {flag.name} False.",
            )
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


def backend_for(op: str, like: torch.Tensor, backend: Optional[str] = None) -> Backend:
    """The :class:`Backend` record that runs ``op`` for tensors like ``like`` (the one
    :func:`dispatch` takes the implementation from): ``.ops[op]`` and ``.capabilities``."""
    return _BACKENDS[resolve(op, like.device, backend)]


def capabilities(name: str) -> Capabilities:
    """The declared :class:`Capabilities` of the backend called ``name``."""
    b = _BACKENDS.get(name)
    if b is None:
        fail("capabilities", f"one of {available_backends()}", repr(name), "Name a registered backend.")
    return b.capabilities
