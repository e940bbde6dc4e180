"""Route torch's own loss entry points through crossent, for code you do not own.
Design notes: ``docs/design.md``, section ``crossent._patch``.
"""

from __future__ import annotations

import importlib
import threading
import types
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from . import _validation as V
from . import functional as _cf
from .backends import available_backends

LOSSES = ("binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy")
_CLASS_OF = {
    "binary_cross_entropy": "BCELoss",
    "binary_cross_entropy_with_logits": "BCEWithLogitsLoss",
    "cross_entropy": "CrossEntropyLoss",
}
# torch's functions as they were when crossent was imported: what `rebind=` looks for.
_TORCH_FUNCTIONS = {name: getattr(torch.nn.functional, name) for name in LOSSES}
_MISSING = object()


def _options(loss: str) -> dict:
    """The crossent options of the most recently entered active patch covering ``loss``."""
    for handle in reversed(_active):
        if loss in handle.losses:
            return handle.options
    return {}


def _functional_wrapper(loss: str):
    impl = getattr(_cf, loss)

    def wrapper(*args, **kwargs):
        options = _options(loss)
        return impl(*args, **{**options, **kwargs}) if options else impl(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = loss
    wrapper.__doc__ = (
        f"torch.nn.functional.{loss}, routed through crossent.functional.{loss} by crossent.patch().\n\n{impl.__doc__}"
    )
    wrapper.__wrapped__ = impl
    wrapper.__crossent_patch__ = True
    return wrapper


def _bce_forward(self, input, target):
    return _cf.binary_cross_entropy(
        input, target, self.weight, reduction=self.reduction, **_options("binary_cross_entropy")
    )


def _bce_with_logits_forward(self, input, target):
    return _cf.binary_cross_entropy_with_logits(
        input,
        target,
        self.weight,
        reduction=self.reduction,
        pos_weight=self.pos_weight,
        **_options("binary_cross_entropy_with_logits"),
    )


def _cross_entropy_forward(self, input, target):
    return _cf.cross_entropy(
        input,
        target,
        self.weight,
        ignore_index=self.ignore_index,
        reduction=self.reduction,
        label_smoothing=self.label_smoothing,
        **_options("cross_entropy"),
    )


# One replacement per attribute, made once: an attribute crossent holds is always this object.
_FUNCTIONS = {loss: _functional_wrapper(loss) for loss in LOSSES}
_FORWARDS = {
    "binary_cross_entropy": _bce_forward,
    "binary_cross_entropy_with_logits": _bce_with_logits_forward,
    "cross_entropy": _cross_entropy_forward,
}
for _loss, _fwd in _FORWARDS.items():
    _fwd.__qualname__ = f"{_CLASS_OF[_loss]}.forward"
    _fwd.__doc__ = f"torch.nn.{_CLASS_OF[_loss]}.forward, routed through crossent by crossent.patch()."
    _fwd.__crossent_patch__ = True


class _Slot:
    """One attribute crossent replaced: what was there, and how many patches use it."""

    __slots__ = ("owner", "name", "saved", "replacement", "users")

    def __init__(self, owner, name: str, replacement) -> None:
        self.owner, self.name, self.replacement = owner, name, replacement
        self.saved = vars(owner).get(name, _MISSING)
        self.users = 0


_lock = threading.RLock()
_slots: Dict[Tuple[int, str], _Slot] = {}
# Active patches in the order they were entered; replaced (never mutated) under the lock,
# so the wrappers read it without taking the lock.
_active: Tuple["Patch", ...] = ()


class Patch:
    """An active :func:`patch`: a context manager, or call :meth:`unpatch` to leave it."""

    def __init__(self, losses: Tuple[str, ...], targets: List[Tuple[object, str, object]], options: dict) -> None:
        self.losses = losses
        self.options = options
        self._targets = targets
        self._keys: List[Tuple[int, str]] = []

    @property
    def active(self) -> bool:
        return self in _active

    def _enter(self) -> None:
        global _active
        with _lock:
            _active = _active + (self,)
            for owner, name, replacement in self._targets:
                key = (id(owner), name)
                slot = _slots.get(key)
                if slot is None:
                    slot = _slots[key] = _Slot(owner, name, replacement)
                    setattr(owner, name, replacement)
                slot.users += 1
                self._keys.append(key)

    def unpatch(self) -> None:
        """Leave this patch (again: nothing). Attributes no other active patch uses get back
        exactly what was there before crossent replaced them."""
        global _active
        with _lock:
            if self not in _active:
                return
            _active = tuple(h for h in _active if h is not self)
            for key in reversed(self._keys):
                slot = _slots[key]
                slot.users -= 1
                if slot.users == 0:
                    del _slots[key]
                    if vars(slot.owner).get(slot.name, _MISSING) is slot.replacement:
                        if slot.saved is _MISSING:
                            delattr(slot.owner, slot.name)
                        else:
                            setattr(slot.owner, slot.name, slot.saved)
            self._keys = []

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "left"
        return f"<crossent.patch losses={self.losses} options={self.options} ({state})>"


def _module(m: Union[str, types.ModuleType]) -> types.ModuleType:
    if isinstance(m, types.ModuleType):
        return m
    if isinstance(m, str):
        return importlib.import_module(m)
    V.fail(
        "patch",
        "`rebind` to be modules or module names",
        f"{type(m).__name__} {m!r}",
        "Pass the module object or its dotted name, e.g. rebind=['mylib.losses'].",
        V.CrossentTypeError,
    )


def patch(
    *,
    functional: bool = True,
    modules: bool = True,
    losses: Optional[Iterable[str]] = None,
    rebind: Iterable[Union[str, types.ModuleType]] = (),
    validate: Optional[bool] = None,
    backend: Optional[str] = None,
) -> Patch:
    """Route torch's own loss entry points through crossent; returns the active patch.

    Use it as a context manager, or call it and later :func:`unpatch` (or the returned
    handle's ``unpatch()``)::

        with crossent.patch():                   # torch's losses are crossent's in here
            trainer.train()

        crossent.patch(losses=["cross_entropy"], validate=False)
        ...
        crossent.unpatch()

    Args:
        functional: replace ``torch.nn.functional.<loss>``. Default True.
        modules: replace ``forward`` of ``torch.nn.BCELoss`` / ``BCEWithLogitsLoss`` /
            ``CrossEntropyLoss`` in place (modules built before the patch included).
            Default True.
        losses: which of ``"binary_cross_entropy"``, ``"binary_cross_entropy_with_logits"``,
            ``"cross_entropy"`` (each with its class). Default: all three.
        rebind: modules (or their dotted names) whose global names are bound to torch's
            loss functions (``from torch.nn.functional import cross_entropy``); those names
            are replaced too, and restored on leaving.
        validate, backend: crossent options applied to every routed call (see
            :func:`crossent.cross_entropy`); an explicit keyword in the call wins.

    The patch is process-wide and nests; see :mod:`crossent._patch` for the exact rules
    and for what it cannot reach. Nothing is patched at import.

    A confident right answer: torch's float32 loss rounds to 0, crossent's keeps it.

    >>> import torch, crossent
    >>> logits, target = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])
    >>> print(f"{torch.nn.functional.cross_entropy(logits, target).item():.4e}")
    0.0000e+00
    >>> with crossent.patch():
    ...     print(f"{torch.nn.functional.cross_entropy(logits, target).item():.4e}")
    ...     print(f"{torch.nn.CrossEntropyLoss()(logits, target).item():.4e}")
    4.1223e-09
    4.1223e-09
    """
    func = "patch"
    chosen = LOSSES if losses is None else tuple(dict.fromkeys([losses] if isinstance(losses, str) else losses))
    for loss in chosen:
        if loss not in LOSSES:
            V.fail(
                func,
                f"`losses` among {list(LOSSES)}",
                repr(loss),
                "The class goes with its function: 'cross_entropy' also covers CrossEntropyLoss.",
            )
    if backend is not None and backend != "auto" and backend not in available_backends():
        V.fail(func, f"`backend` one of {['auto'] + available_backends()}", repr(backend))
    options = {k: v for k, v in (("validate", validate), ("backend", backend)) if v is not None}
    targets = []
    for loss in chosen:
        if functional:
            targets.append((torch.nn.functional, loss, _FUNCTIONS[loss]))
        if modules:
            targets.append((getattr(torch.nn.modules.loss, _CLASS_OF[loss]), "forward", _FORWARDS[loss]))
    for m in rebind:
        m = _module(m)
        for loss in chosen:
            originals = (_TORCH_FUNCTIONS[loss], vars(torch.nn.functional)[loss])
            for name, value in list(vars(m).items()):
                if any(value is o for o in originals) and value is not _FUNCTIONS[loss]:
                    targets.append((m, name, _FUNCTIONS[loss]))
    handle = Patch(chosen, targets, options)
    handle._enter()
    return handle


def unpatch() -> None:
    """Leave every active :func:`patch` (context managers included): torch's attributes get
    back exactly what was there before crossent replaced them. Without an active patch,
    nothing happens."""
    with _lock:
        for handle in reversed(_active):
            handle.unpatch()
