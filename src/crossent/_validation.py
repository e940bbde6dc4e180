"""Every guardrail of crossent, in one place.
Design notes: ``docs/design.md``, section ``crossent._validation``.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from numbers import Number
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import _config
from ._dtypes import compute_dtype
from .errors import CrossentIndexError
from .errors import CrossentTypeError
from .errors import CrossentValueError
from .errors import CrossentWarning
from .errors import KernelCacheWarning
from .errors import fail  # the message template, shared with the backends

__all__ = [
    "CrossentWarning",
    "CrossentValueError",
    "CrossentTypeError",
    "CrossentIndexError",
    "KernelCacheWarning",
    "validation_enabled",
]

REDUCTIONS = ("none", "mean", "sum")

# Below this many elements a batch cannot tell logits from probabilities: logits of an
# untrained model sit near 0, and for standard-normal logits the chance that all n of
# them land in [0, 1] is 0.34**n: 1.4% for the tutorial's n = 4 (a training loop would
# warn falsely within a few hundred steps), 1e-15 for n = 32.
_MIN_ELEMENTS_TO_TELL = 32
# Elements read by the "looks like probabilities / softmax" heuristics (bounded cost;
# BCELoss's own range check, an error, reads everything).
_ELEMENTS_TO_INSPECT = 1 << 16
# Rows inspected by the "looks like softmax / log_softmax" heuristic: bounded cost.
_ROWS_TO_INSPECT = 64
# Autograd nodes that reveal where an input came from (a free, exact signal).
_PROBABILITY_NODES = {"SigmoidBackward0": "torch.sigmoid"}
_SOFTMAX_NODES = {"SoftmaxBackward0": "softmax", "LogSoftmaxBackward0": "log_softmax"}
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def validation_enabled(validate: Optional[bool] = None) -> bool:
    """Whether value checks run: the per-call ``validate`` wins, else ``CROSSENT_VALIDATE``.

    ``CROSSENT_VALIDATE`` set to ``0``, ``false``, ``no`` or ``off`` switches the value
    tier off for every call that does not pass ``validate=True``; it is read on each call
    (a dictionary lookup), so it can be changed at run time.
    """
    if validate is not None:
        return bool(validate)
    return _config.validate_default()


# --------------------------------------------------------------------------- warnings
_WARNED: set = set()
_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_NN_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn") + os.sep


def _user_frame_and_level():
    """First frame outside crossent and torch.nn (where the user called the loss).

    Returns ``(frame, stacklevel)`` where ``stacklevel`` is the value that makes
    ``warnings.warn`` called from :func:`warn_once` point at that frame.
    """
    frame = sys._getframe(2)  # the caller of warn_once
    level = 2
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(_PKG_DIR) or fname.startswith(_TORCH_NN_DIR)):
            return frame, level
        frame = frame.f_back
        level += 1
    return None, 1


def warn_once(key: str, message: str) -> None:
    """Warn with :class:`CrossentWarning` once per (key, user call site).

    The call site is the first stack frame outside crossent and ``torch.nn`` (the line
    that called the loss or the module). Python's "default" filter already shows a
    warning once per location; the registry here also holds under
    ``simplefilter("always")`` (pytest, notebooks), so a training loop sees a mistake
    once, not every step. Two different call sites each warn once. This is also the
    helper for the bookkeeping warnings (a meter fed a loss that still requires grad).
    """
    frame, level = _user_frame_and_level()
    site = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)
    if (key, site) in _WARNED:
        return
    _WARNED.add((key, site))
    warnings.warn(message, CrossentWarning, stacklevel=level)


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests and notebooks)."""
    _WARNED.clear()


def _fetch(values: List[Union[torch.Tensor, float]]) -> List[float]:
    """Bring a few 0-dim statistics to the host in ONE transfer (one GPU sync).

    Python numbers pass through: on CPU a stats function may read a number early (no
    sync to save) and skip the statistics it makes unnecessary."""
    if not values:
        return []
    if all(not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in values):
        return [float(v) for v in values]  # no transfer to save on CPU; skip the stack
    return torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]).tolist()


def _on_host(t: torch.Tensor) -> bool:
    """Reading ``t``'s numbers costs no device synchronisation (CPU tensors)."""
    return t.device.type == "cpu"


def _grad_fn_name(t: torch.Tensor) -> str:
    fn = t.grad_fn
    return type(fn).__name__ if fn is not None else ""


# --------------------------------------------------------------------------- options
def check_reduction(func: str, reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        hint = ""
        if isinstance(reduction, str) and reduction.strip().lower() in REDUCTIONS:
            hint = f" Reduction names are lower case: use reduction='{reduction.strip().lower()}'."
        elif reduction in ("avg", "average", "elementwise_mean", "batchmean"):
            hint = " Use reduction='mean'."
        elif reduction is None:
            hint = " For per-element losses use reduction='none' (the string)."
        fail(
            func,
            "`reduction` to be one of 'none', 'mean', 'sum'",
            repr(reduction),
            ("Pick one of those." + hint).strip(),
        )
    return reduction


def check_label_smoothing(func: str, label_smoothing) -> float:
    if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:
        return label_smoothing  # the usual case, decided without the ABC checks below
    if isinstance(label_smoothing, torch.Tensor) and label_smoothing.numel() == 1:
        label_smoothing = float(label_smoothing)
    if not isinstance(label_smoothing, Number) or isinstance(label_smoothing, (bool, complex)):
        fail(
            func,
            "`label_smoothing` to be a float in [0, 1]",
            f"{type(label_smoothing).__name__}",
            "Pass a Python float such as label_smoothing=0.1.",
            CrossentTypeError,
        )
    value = float(label_smoothing)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        fail(
            func,
            "`label_smoothing` in [0, 1]",
            repr(label_smoothing),
            "0 turns smoothing off; typical values are 0.05 to 0.2. (torch silently ignores "
            "negative and NaN values; crossent refuses them.)",
        )
    return value


def check_ignore_index(func: str, ignore_index) -> Optional[int]:
    """``ignore_index`` must be an int64 integer (None is allowed: the BCE losses' default).

    Like torch: Python and NumPy integers and integer 0-dim tensors are accepted; a float
    is a ``TypeError`` even when integral (``-100.0``), as in ``F.cross_entropy``. Outside
    the int64 range it is a ``ValueError`` (torch: a bare "Overflow when unpacking long").
    The BCE losses add one rule on top: :func:`check_binary_ignore_index`."""
    if ignore_index is None:
        return None
    if type(ignore_index) is int and _INT64_MIN <= ignore_index <= _INT64_MAX:
        return ignore_index  # the usual case, decided without the ABC checks below
    if (
        isinstance(ignore_index, torch.Tensor)
        and ignore_index.numel() == 1
        and not (ignore_index.is_floating_point() or ignore_index.is_complex() or ignore_index.dtype == torch.bool)
    ):
        ignore_index = ignore_index.item()
    if isinstance(ignore_index, (bool, torch.Tensor)) or not hasattr(type(ignore_index), "__index__"):
        fix = "Pass the integer label that marks elements to skip, e.g. ignore_index=-100."
        if isinstance(ignore_index, Number) and not isinstance(ignore_index, bool):
            fix = "It must be an int, not a float (torch raises TypeError here too)" + (
                f": pass ignore_index={int(ignore_index)}."
                if isinstance(ignore_index, float) and math.isfinite(ignore_index) and int(ignore_index) == ignore_index
                else ", e.g. ignore_index=-100."
            )
        fail(func, "`ignore_index` to be an integer", repr(ignore_index), fix, CrossentTypeError)
    ignore_index = operator.index(ignore_index)
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        fail(
            func,
            "`ignore_index` in the int64 range [-2**63, 2**63 - 1]",
            repr(ignore_index),
            "Targets are int64, so no target can equal it; use a value such as -100.",
        )
    return ignore_index


def check_binary_ignore_index(func: str, ignore_index) -> Optional[int]:
    """``ignore_index`` for a BCE loss: :func:`check_ignore_index`, and never 0 or 1.

    Every BCE entry point (functional, ``nn`` and the fused linear head) calls this one
    check. 0 and 1 are the labels themselves, so ``ignore_index=0`` would silently drop
    every negative example and ``ignore_index=1`` every positive one (a crossent
    extension: torch's BCE has no ``ignore_index``)."""
    ignore_index = check_ignore_index(func, ignore_index)
    if ignore_index in (0, 1):
        fail(
            func,
            "`ignore_index` different from the labels 0 and 1",
            f"ignore_index={ignore_index}",
            f"ignore_index={ignore_index} would drop every {'negative' if ignore_index == 0 else 'positive'} "
            "label; mark missing labels with another value, e.g. -1, and pass ignore_index=-1.",
        )
    return ignore_index


def as_weight_tensor(func: str, name: str, value, like: Optional[torch.Tensor] = None):
    """Accept tensors, Python scalars and sequences for ``weight`` / ``pos_weight``.

    Tensors are kept as they are (their dtype is resolved at call time: a float64 weight
    on a float32 input is cast, where torch's cross_entropy raises); scalars and
    sequences become float tensors on ``like``'s device (an extension over torch).
    """
    if value is None or isinstance(value, torch.Tensor):
        if value is not None and not (
            value.is_floating_point() or value.dtype in _INTEGER_DTYPES or value.dtype == torch.bool
        ):
            fail(
                func,
                f"`{name}` to be a real-valued tensor",
                f"dtype {value.dtype}",
                f"Pass `{name}` as a float tensor.",
                CrossentTypeError,
            )
        return value
    if isinstance(value, bool):
        fail(
            func,
            f"`{name}` to be a tensor, a number or a sequence of numbers",
            "a bool",
            f"Pass `{name}` as a float, e.g. {name}=1.0.",
            CrossentTypeError,
        )
    try:
        kwargs = {"dtype": torch.get_default_dtype()}
        if like is not None:
            kwargs = {
                "dtype": like.dtype if like.is_floating_point() else torch.get_default_dtype(),
                "device": like.device,
            }
        return torch.as_tensor(value, **kwargs)
    except (TypeError, ValueError, RuntimeError):
        fail(
            func,
            f"`{name}` to be a tensor, a number or a sequence of numbers",
            f"{type(value).__name__}",
            f"Pass `{name}` as torch.tensor([...]).",
            CrossentTypeError,
        )


def check_broadcastable(
    func: str, name: str, value: Optional[torch.Tensor], shape, what: str, fix: Callable[[], str]
) -> None:
    """``value`` (a weight) must broadcast to ``shape`` without growing it; ``what`` names
    the shape for the message ("the input's shape"). The one broadcast rule of every
    per-element weight (``weight`` and ``pos_weight`` of the BCE losses, also fused).
    ``fix`` builds the remedy only on failure: formatting a shape is not traceable while
    ``torch.compile`` treats it as symbolic."""
    if value is None:
        return
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        fail(func, f"`{name}` broadcastable to {what} {shape_str(shape)}", f"shape {shape_str(value.shape)}", fix())


def check_weight_values_nonnegative(func: str, name: str, value: Optional[torch.Tensor]) -> None:
    """Warn about negative or NaN weights (legal in torch, but they turn the loss into a reward).

    Weights are C numbers, not data, so this runs at construction only (skipped on GPU
    and for huge tensors, so that it never synchronises or costs real time)."""
    if value is None or value.numel() == 0 or value.numel() > 1_000_000 or value.device.type != "cpu":
        return
    from ._capture import capturing

    if capturing(value):  # a module built inside a compiled function: no host read
        return
    bad = ~(value >= 0)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        warn_once(
            f"negative-{name}",
            f"{func}: `{name}` holds {value.flatten()[idx].item()} at flat position {idx}; "
            "a negative or NaN weight rewards the model for that class instead of "
            "penalising it. Use weights >= 0.",
        )


def check_same_device(func: str, input: torch.Tensor, **others) -> None:
    """Every tensor argument on the input's device (0-dim CPU tensors count as scalars)."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != input.device and t.dim() > 0:
            fail(
                func,
                f"`{name}` on the same device as `input` ({input.device})",
                f"`{name}` on {t.device}",
                f"Move it with `{name}.to(input.device)` (for a module, `criterion.to(device)` moves its buffers).",
            )


def check_floating_input(func: str, input) -> None:
    if not isinstance(input, torch.Tensor):
        fail(
            func,
            "`input` to be a torch.Tensor",
            type(input).__name__,
            "Convert it with torch.as_tensor(...).",
            CrossentTypeError,
        )
    if not input.is_floating_point():
        if input.is_complex():
            fix = "Losses need real scores: pass `input.real` or `input.abs()`, whichever you mean."
        else:
            fix = (
                "Losses need real-valued scores: call `input.float()` (and check that you did "
                "not pass the labels as the input: the argument order is (input, target))."
            )
        fail(
            func,
            "`input` to be a floating-point tensor (float16/bfloat16/float32/float64)",
            f"dtype {input.dtype}",
            fix,
            CrossentTypeError,
        )


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _where(shape: Sequence[int], flat_pos: int) -> str:
    """Position of a flat index in ``shape`` as a tuple string, e.g. ``(1, 3)``."""
    if len(shape) == 0:
        return "()"
    idx = []
    for size in reversed(tuple(shape)):
        idx.append(flat_pos % size)
        flat_pos //= size
    return shape_str(tuple(reversed(idx)))


def _row_repr(row: torch.Tensor, limit: int = 6) -> str:
    vals = [f"{v:.4g}" for v in row[:limit].tolist()]
    if row.numel() > limit:
        vals.append("...")
    return "[" + ", ".join(vals) + "]"


# --------------------------------------------------------------------------- binary
def check_binary_target(func: str, input: torch.Tensor, target) -> torch.Tensor:
    """Shape and dtype of a BCE target; returns it cast to a floating dtype.

    Shapes must match exactly (torch raises too); never silent broadcasting."""
    if not isinstance(target, torch.Tensor):
        fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            CrossentTypeError,
        )
    if target.shape != input.shape:
        ish, tsh = tuple(input.shape), tuple(target.shape)
        found = f"input {shape_str(ish)} and target {shape_str(tsh)}"
        fix = "BCE compares input and target element by element, so their shapes must match."
        if ish == tsh + (1,):
            k = input.dim() - 1
            fix += f" Use `target.unsqueeze({k})` or `input.squeeze({k})`."
        elif tsh == ish + (1,):
            k = target.dim() - 1
            fix += f" Use `target.squeeze({k})` or `input.unsqueeze({k})`."
        elif input.dim() == 2 and tsh == ish[:1] and ish[1] == 2:
            fix += (
                " Two scores per sample and one label each is 2-class cross-entropy: use "
                "CrossEntropyLoss with `target.long()`, or give the model one output "
                "per sample for BCEWithLogitsLoss."
            )
        elif input.dim() == 2 and tsh == ish[:1]:
            fix += (
                f" Class indices for {ish[1]} classes? Use CrossEntropyLoss with "
                f"`target.long()`, or one-hot encode them for multi-label BCE: "
                f"`F.one_hot(target.long(), {ish[1]}).float()`."
            )
        elif input.numel() == target.numel():
            fix += f" They have the same number of elements: `target.view({', '.join(map(str, ish))})` if the order matches."
        fail(func, "`target` with the same shape as `input`", found, fix)
    if target.dtype == torch.bool or target.dtype in _INTEGER_DTYPES:
        # Extension (pytorch#842): 0/1 integer and bool labels are cast.
        return target.to(input.dtype)
    if not target.is_floating_point():
        fail(
            func,
            "`target` to be a floating, integer or bool tensor",
            f"dtype {target.dtype}",
            "Pass 0/1 labels or probabilities.",
            CrossentTypeError,
        )
    return target


def _first_bad(t: torch.Tensor, bad: torch.Tensor):
    """(flat position, value) of the first True in ``bad`` (failure path only)."""
    pos = int(bad.reshape(-1).nonzero()[0])
    return pos, t.reshape(-1)[pos].item()


def check_binary_values(
    func: str, input: torch.Tensor, target: torch.Tensor, keep: Optional[torch.Tensor], *, probabilities_in: bool
) -> None:
    """Value tier for BCE: targets inside [0, 1]; input range matching the loss.

    One ``aminmax`` over the target, one over the input (only its first
    :data:`_ELEMENTS_TO_INSPECT` elements for the logits heuristic), one host transfer.

    BCELoss (``probabilities_in``): every input must lie in [0, 1] (an error, as torch).
    BCEWithLogitsLoss: a warning when the input looks like probabilities: its autograd
    history ends in ``sigmoid`` (any size), or at least :data:`_MIN_ELEMENTS_TO_TELL`
    values all lie in [0, 1] and are not all equal (an all-zero input is what a
    zero-initialised head produces, not a probability). Smaller batches without
    history are not judged: the tutorial's ``sigmoid([0.2, -1.5, 3.0, 0.7])`` is four
    numbers in (0, 1), and four raw logits of an uncertain model land there 1.4% of
    the time (standard normal) or far more often (logits near 0), so a warning would
    cry wolf in a training loop. Every probability is the sigmoid of *some* logit, so
    no value test can do better; the ``SigmoidBackward0`` history can, and does.
    """
    if not probabilities_in and _grad_fn_name(input) in _PROBABILITY_NODES:
        warn_once(
            "sigmoid-before-logits",
            f"{func}: the input comes straight out of torch.sigmoid (its grad_fn is "
            f"{_grad_fn_name(input)}), but this loss applies the sigmoid itself: pass the "
            "raw logits (drop the sigmoid / nn.Sigmoid), or use BCELoss on probabilities.",
        )
    stats, names = [], []
    t = target.detach()
    if t.numel():
        if keep is not None:
            t = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
        stats += list(torch.aminmax(t))
        names += ["tmin", "tmax"]
    x = input.detach()
    inspect_logits = (not probabilities_in) and x.numel() >= _MIN_ELEMENTS_TO_TELL
    if probabilities_in and x.numel():
        if keep is not None:  # an ignored element's value is never used (0 loss, 0 gradient)
            x = torch.where(keep, x, 0.5)
        stats += list(torch.aminmax(x))
        names += ["xmin", "xmax"]
    elif inspect_logits:
        xs = x.reshape(-1)[:_ELEMENTS_TO_INSPECT] if x.is_contiguous() and x.numel() > _ELEMENTS_TO_INSPECT else x
        stats += list(torch.aminmax(xs))
        names += ["xmin", "xmax"]
    s = dict(zip(names, _fetch(stats)))  # the one synchronisation

    if probabilities_in and "xmin" in s and not (s["xmin"] >= 0.0 and s["xmax"] <= 1.0):
        xd = x
        if math.isnan(s["xmin"]) or math.isnan(s["xmax"]):
            pos, _ = _first_bad(xd, torch.isnan(xd))
            found = f"NaN at position {_where(xd.shape, pos)}"
            fix = "A NaN probability has no loss: find where the model produced it (torch raises here too)."
        else:
            found = f"min {s['xmin']:.6g}, max {s['xmax']:.6g}"
            fix = (
                "These look like raw logits: use BCEWithLogitsLoss / "
                "binary_cross_entropy_with_logits on them (it applies the sigmoid itself, "
                "exactly), or apply torch.sigmoid first."
            )
        fail(func, "`input` to hold probabilities in [0, 1]", found, fix)

    if "tmin" in s and not (s["tmin"] >= 0.0 and s["tmax"] <= 1.0):
        bad = ~((t >= 0) & (t <= 1))
        pos, value = _first_bad(t, bad)
        found = f"{value:.6g} at position {_where(t.shape, pos)}"
        if not math.isnan(s["tmin"]) and not math.isnan(s["tmax"]):
            found += f" (targets range over [{s['tmin']:.6g}, {s['tmax']:.6g}])"
        fix = "Targets are probabilities of the positive class: 0, 1, or a soft label in between."
        if math.isnan(value) or math.isinf(value):
            fix += " A NaN or infinite target makes the loss and every gradient NaN; mask it with ignore_index."
        elif s["tmax"] > 1 and float(s["tmax"]) == int(s["tmax"]):
            fix += (
                " Integer labels above 1 mean several classes: use CrossEntropyLoss, or "
                "one-hot encode them for multi-label BCE."
            )
        if value < 0 and value == int(value):
            fix += f" If {int(value)} marks a missing label, pass ignore_index={int(value)}."
        if not probabilities_in and value > 1:
            fix += " (torch returns a wrong, possibly negative, loss here.)"
        fail(func, "`target` values in [0, 1]", found, fix)

    if inspect_logits and 0.0 <= s["xmin"] < s["xmax"] <= 1.0:
        warn_once(
            "sigmoid-before-logits",
            f"{func}: all {xs.numel()} inputs{' inspected' if xs.numel() < x.numel() else ''} lie in [{s['xmin']:.3g}, {s['xmax']:.3g}], which "
            "looks like probabilities (sigmoid already applied?). This loss applies the "
            "sigmoid itself: pass the raw logits (drop the torch.sigmoid), or use BCELoss "
            "on probabilities. If these really are logits, pass validate=False.",
        )


# --------------------------------------------------------------------------- multiclass
def check_multiclass_shapes(func: str, input: torch.Tensor, target, ignore_index):
    """Decide between class-index and probability targets, as torch does, and catch the
    classic shape mistakes. Returns ``(target, is_index_target)``; index targets are
    returned as int64 (any integer dtype is accepted: pytorch#45540). Metadata only."""
    if not isinstance(target, torch.Tensor):
        fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            CrossentTypeError,
        )
    if ignore_index is None:
        fail(
            func,
            "`ignore_index` to be an integer",
            "None",
            "Keep the default ignore_index=-100 when no target should be skipped (torch raises here too).",
            CrossentTypeError,
        )
    if input.dim() == 0:
        fail(
            func,
            "`input` of shape (C,), (N, C) or (N, C, d1, ..., dK)",
            "a 0-dim tensor",
            "Cross-entropy needs one score per class.",
        )
    ish, tsh = tuple(input.shape), tuple(target.shape)
    index_shape = (ish[0],) + ish[2:] if input.dim() >= 2 else ()
    if ish == tsh:
        if not target.is_floating_point():
            fail(
                func,
                "class-index targets of shape "
                + shape_str(index_shape)
                + " or float class-probability targets of shape "
                + shape_str(ish),
                f"an integer target of shape {shape_str(tsh)} (the input's shape; looks one-hot)",
                "Use `target.argmax(1)` for class indices, or `target.float()` if these are class probabilities.",
            )
        if ignore_index >= 0:
            fail(
                func,
                "ignore_index < 0 with class-probability targets",
                f"ignore_index={ignore_index}",
                "ignore_index applies to class-index targets only (torch raises too); give "
                "ignored rows zero weight or drop them instead.",
            )
        return target, False
    if tsh == index_shape:
        if target.is_floating_point():
            fail(
                func,
                "integer class indices for a target of shape " + shape_str(tsh),
                f"dtype {target.dtype}",
                "Class indices must be integers: use `target.long()`. Class-probability "
                f"targets must have the input's shape {shape_str(ish)}.",
                CrossentTypeError,
            )
        if target.dtype == torch.bool or target.dtype in _INTEGER_DTYPES:
            return target.long(), True
        fail(func, "an integer target", f"dtype {target.dtype}", "Use `target.long()`.", CrossentTypeError)
    # Shape mistakes, most specific first.
    fix = ""
    if input.dim() >= 2 and tsh == (ish[0], 1):
        fix = "Targets of shape (N, 1) hold one class per row: use `target.squeeze(1)`."
    elif input.dim() >= 3 and tsh == (ish[0], 1) + ish[2:]:
        fix = (
            f"A mask of shape {shape_str(tsh)} holds one class per position: use "
            f"`target.squeeze(1){'.long()' if target.is_floating_point() else ''}` "
            f"(shape {shape_str(index_shape)})."
        )
    elif input.dim() == 3 and tsh == ish[:2]:
        fix = (
            f"For sequences the class dimension is dim 1: input (B, T, V) = {shape_str(ish)} "
            f"needs `input.transpose(1, 2)` (or flatten: `input.reshape(-1, {ish[2]})` "
            "with `target.reshape(-1)`)."
        )
    elif input.dim() >= 3 and tsh == ish[:-1]:
        fix = "The class dimension is dim 1, not the last one: use `input.movedim(-1, 1)`."
    elif input.dim() > 2 and tsh == (ish[0],):
        fix = f"Inputs with extra dimensions {shape_str(ish[2:])} need targets of shape {shape_str(index_shape)}."
    elif target.dim() == input.dim() and target.is_floating_point():
        fix = "Class-probability targets must have exactly the input's shape."
    elif input.dim() >= 2 and target.numel() == ish[0]:
        fix = f"Use `target.reshape({ish[0]})`."
    fail(
        func,
        f"target of shape {shape_str(index_shape)} (class indices) or {shape_str(ish)} "
        f"(class probabilities) for input of shape {shape_str(ish)}",
        f"target of shape {shape_str(tsh)}",
        fix,
    )


def _warn_single_class(func: str, C: int, input: torch.Tensor) -> None:
    if C == 1 and input.numel() > 0:
        warn_once(
            "single-class-ce",
            f"{func}: the input has a single class (C=1, shape {shape_str(input.shape)}), so "
            "softmax is always 1 and the loss and its gradient are always 0: nothing is "
            "learned. A single logit per sample needs BCEWithLogitsLoss (binary), or give "
            "the model one output per class.",
        )


def check_class_weight(func: str, weight: Optional[torch.Tensor], C: int) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != C:
        fail(
            func,
            f"`weight` of shape ({C},), one number per class (C={C})",
            f"shape {shape_str(weight.shape)}",
            f"Pass one weight per class, e.g. weight=torch.ones({C}).",
        )


def _sum_tol(dtype: torch.dtype, C: int) -> float:
    """How far a row sum may be from 1 and still count as 1.

    A distribution stored in ``dtype`` has each entry rounded by up to eps/2 of itself,
    so its sum is off by up to eps/2 (bf16: 0.004, fp16: 0.0005), whatever C is; the
    float32/float64 accumulation adds about sqrt(C) * 1e-7. Both get a wide margin:
    real mistakes (multi-hot rows, unnormalised counts) are off by far more."""
    return 2.0 * torch.finfo(dtype).eps + 1e-4 * max(1.0, C**0.5)


# Each value check is split into stats (0-dim tensors, no sync) and a judgement on the
# fetched numbers, so that one loss call synchronises once, whatever it checks.
def _index_stats(target: torch.Tensor, ignore_index: Optional[int]):
    flat = target.detach()
    if flat.dim() != 1:
        flat = flat.reshape(-1)
    if ignore_index is not None:
        if _on_host(flat):
            # CPU: read the raw range first (no sync to save). When ignore_index lies
            # outside it, no target equals it and masking would change nothing.
            tmin, tmax = (int(v) for v in torch.aminmax(flat))
            if not tmin <= ignore_index <= tmax:
                return [tmin, tmax]
        flat = torch.where(flat == ignore_index, 0, flat)
    return list(torch.aminmax(flat))


def _index_judge(func: str, target: torch.Tensor, C: int, ignore_index: Optional[int], tmin, tmax) -> None:
    if tmin >= 0 and tmax < C:
        return
    # Failure path: find the first offending element (comparisons only, no indexing).
    flat = target.detach().reshape(-1)
    bad = (flat < 0) | (flat >= C)
    if ignore_index is not None:
        bad &= flat != ignore_index
    if not bool(bad.any()):
        return
    pos = int(bad.nonzero()[0])
    value = int(flat[pos])
    labels = flat if ignore_index is None else flat[flat != ignore_index]
    lo, hi = (int(v) for v in torch.aminmax(labels))
    what = f"class indices in [0, {C - 1}] (C={C})"
    if ignore_index is not None:
        what += f" or ignore_index={ignore_index}"
    found = f"{value} at position {_where(target.shape, pos)} (targets range over [{lo}, {hi}])"
    hints = []
    if value < 0:
        if value == -1 and ignore_index != -1:
            now = (
                "the default -100" if ignore_index == -100 else "not set" if ignore_index is None else f"{ignore_index}"
            )
            hints.append(
                f"Padded with -1? Marks no label? pass ignore_index=-1 (ignore_index "
                f"is {now}, so -1 counts as a class index)."
            )
        else:
            hints.append(f"Marks no label? pass ignore_index={value}.")
    else:
        if lo >= 1:
            hints.append("Labels start at 1? subtract 1 (`target - 1`).")
        else:
            hints.append(f"The labels go up to {hi}: the model needs at least {hi + 1} outputs (it has {C}).")
        hints.append(f"Marks no label? pass ignore_index={value}.")
    fail(func, what, found, " ".join(hints), CrossentIndexError)


def check_class_indices(func: str, target: torch.Tensor, C: int, ignore_index: Optional[int]) -> None:
    """Value tier: every index is in [0, C) or equals ignore_index (one pass, one sync)."""
    if target.numel() == 0:
        return
    tmin, tmax = _fetch(_index_stats(target, ignore_index))
    _index_judge(func, target, C, ignore_index, tmin, tmax)


def _prob_stats(target: torch.Tensor, class_dim: int):
    t = target.detach()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    tmin, tmax = torch.aminmax(t)
    dev = (t.sum(dim=class_dim, dtype=acc) - 1).abs().amax()
    return [tmin, tmax, dev]


def _prob_rows(target: torch.Tensor, class_dim: int) -> torch.Tensor:
    t = target.detach()
    return t.movedim(class_dim, -1).reshape(-1, t.shape[class_dim])


def _prob_judge(func: str, target: torch.Tensor, class_dim: int, tmin, tmax, dev) -> None:
    if not (tmin >= 0 and math.isfinite(tmax)):
        rows = _prob_rows(target, class_dim)
        bad = ~((rows >= 0) & torch.isfinite(rows)).all(dim=1)
        r = int(bad.nonzero()[0])
        if bool(torch.isfinite(rows[r]).all()):
            fail(
                func,
                "class-probability targets with non-negative entries",
                f"row {r} = {_row_repr(rows[r])}",
                "Probabilities cannot be negative (torch would return a wrong loss). If these "
                "are class indices, pass an integer tensor of shape (N,) instead.",
            )
        fail(
            func,
            "finite class-probability targets",
            f"row {r} = {_row_repr(rows[r])}",
            "A NaN or infinite target makes the loss and every gradient NaN or infinite; fix or drop that row.",
        )
    C = target.shape[class_dim]
    tol = _sum_tol(target.dtype, C)
    if dev > tol:
        rows = _prob_rows(target, class_dim)
        sums = rows.sum(dim=1, dtype=torch.float64)
        r = int(((sums - 1).abs() > tol).nonzero()[0])
        s = float(sums[r])
        fix = "Cross-entropy with probability targets expects each row to be a distribution."
        if s > 1 + tol:
            fix += (
                " Several classes at once (multi-hot)? use BCEWithLogitsLoss for multi-label;"
                " otherwise normalise: `target / target.sum(1, keepdim=True)`."
            )
        else:
            fix += " Normalise: `target / target.sum(1, keepdim=True)`."
        warn_once(
            "prob-target-sum",
            f"{func}: class-probability target rows should sum to 1, but row {r} = "
            f"{_row_repr(rows[r])} sums to {s:.6g}. {fix}",
        )


def check_probability_target(func: str, target: torch.Tensor, class_dim: int) -> None:
    """Value tier for class-probability targets: entries finite and >= 0 (else an error
    showing the first bad row); rows summing to 1 (else a one-time warning: torch
    accepts them, and so do its own tests). One aminmax, one row sum, one sync."""
    if target.numel() == 0:
        return
    _prob_judge(func, target, class_dim, *_fetch(_prob_stats(target, class_dim)))


def _sample_rows(x: torch.Tensor, class_dim: int, k: int) -> torch.Tensor:
    """At most ``k`` rows of C scores, copying only those rows (views, then a small copy)."""
    if x.dim() == 1:
        return x[None]
    if x.dim() == 2:
        return x[:k] if x.shape[0] > k else x
    y = x[:1]
    budget = k
    for d in range(2, y.dim()):
        n = max(1, min(y.shape[d], budget))
        y = y.narrow(d, 0, n)
        budget = max(1, budget // n)
    return y.movedim(1, -1).reshape(-1, x.shape[class_dim])


def softmax_rows_to_inspect(C: int) -> int:
    """How many rows of C classes the "looks like softmax output" check reads: at most
    :data:`_ROWS_TO_INSPECT` rows and about :data:`_ELEMENTS_TO_INSPECT` numbers (at least
    one row). With a 32000-word vocabulary two rows already cannot be raw logits by chance."""
    return max(1, min(_ROWS_TO_INSPECT, _ELEMENTS_TO_INSPECT // max(C, 1)))


def _softmax_stats(input: torch.Tensor, class_dim: int):
    C = input.shape[class_dim]
    if C < 2 or input.numel() < _MIN_ELEMENTS_TO_TELL:
        return []
    xs = _sample_rows(input.detach(), class_dim, softmax_rows_to_inspect(C))
    xs = xs.to(compute_dtype(xs.dtype))
    xmin, xmax = torch.aminmax(xs)
    if _on_host(xs):
        # CPU: read the range first (no sync to save). Entries of both signs (the usual
        # raw logits) rule out softmax (>= 0) and log_softmax (<= 0) output: the row
        # sums are then never judged, so they are not computed (inf: "not close to 1").
        xmin, xmax = float(xmin), float(xmax)
        if xmin < 0 < xmax:
            return [xmin, xmax, math.inf, math.inf]
    sum_dev = (xs.sum(1) - 1).abs().amax()  # softmax rows sum to 1
    exp_dev = (xs.exp().sum(1) - 1).abs().amax()  # log_softmax rows: exp sums to 1
    return [xmin, xmax, sum_dev, exp_dev]


_SOFTMAX_MSG = (
    "{func}: {why}, which looks like softmax output. Cross-entropy applies "
    "log_softmax itself: pass the raw logits (drop the softmax); otherwise the loss "
    "and its gradients are wrong."
)
_LOG_SOFTMAX_MSG = (
    "{func}: {why}, which looks like log_softmax output. Cross-entropy applies "
    "log_softmax itself: pass the raw logits (the value happens to be the same, "
    "but the extra op is wasted; use F.nll_loss if you mean log-probabilities)."
)


def _softmax_judge(func: str, input: torch.Tensor, class_dim: int, stats) -> None:
    node = _grad_fn_name(input)
    if node == "SoftmaxBackward0":
        warn_once(
            "softmax-before-ce",
            _SOFTMAX_MSG.format(func=func, why="the input comes straight out of softmax (grad_fn SoftmaxBackward0)"),
        )
        return
    if node == "LogSoftmaxBackward0":
        warn_once(
            "log-softmax-before-ce",
            _LOG_SOFTMAX_MSG.format(
                func=func, why="the input comes straight out of log_softmax (grad_fn LogSoftmaxBackward0)"
            ),
        )
        return
    if not stats:
        return
    xmin, xmax, sum_dev, exp_dev = stats
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        return
    tol = _sum_tol(input.dtype, input.shape[class_dim])
    if xmin >= 0 and sum_dev < tol:
        warn_once(
            "softmax-before-ce", _SOFTMAX_MSG.format(func=func, why="the input rows are non-negative and sum to 1")
        )
    elif xmax <= 0 and exp_dev < tol:
        warn_once("log-softmax-before-ce", _LOG_SOFTMAX_MSG.format(func=func, why="the input rows have logsumexp 0"))


def check_logits_not_probabilities(
    func: str, input: torch.Tensor, class_dim: int, sampled_range: Optional[Tuple[float, float]] = None
) -> None:
    """Value tier heuristic: warn when the input looks like softmax or log_softmax output.

    Exact signal first: the autograd node that produced the input (any size, free).
    Otherwise, on at least :data:`_MIN_ELEMENTS_TO_TELL` elements, the first
    :func:`softmax_rows_to_inspect` rows are all non-negative and sum to 1 (softmax), or
    all have logsumexp 0 (log_softmax): raw logits never do either.

    ``sampled_range``: the (min, max) of those rows when a kernel has read them already
    (``chunked_cpp.ce_index_plain``). Entries of both signs settle it (neither output
    has them); any other range is checked from the rows as without it."""
    if sampled_range is not None and sampled_range[0] < 0 < sampled_range[1]:
        _softmax_judge(func, input, class_dim, [])
        return
    _softmax_judge(func, input, class_dim, _fetch(_softmax_stats(input, class_dim)))


_CLASS_DIM_MOVED = ("TransposeBackward0", "PermuteBackward0", "ConvolutionBackward0")


def _warn_ambiguous_class_dim(func: str, input: torch.Tensor, target: torch.Tensor) -> None:
    """(B, T, V) logits with T == V and a (B, T) target pass the (N, C, d1) shape check with
    the wrong class dimension. Warn unless the input shows that dim 1 was made the class
    dimension on purpose: its autograd node (a transpose, permute or convolution), or,
    without autograd, the strides of a transposed view."""
    if input.dim() != 3 or input.shape[1] != input.shape[2] or target.dim() != 2:
        return
    if _grad_fn_name(input) in _CLASS_DIM_MOVED or (input.stride(1) == 1 and input.stride(2) != 1):
        return
    B, T, V = input.shape
    warn_once(
        "ambiguous-class-dim",
        f"{func}: the input has shape {shape_str(input.shape)} with target {shape_str(target.shape)}: "
        f"dims 1 and 2 both have size {T}, so the class dimension is ambiguous, and like torch "
        "crossent takes dim 1 as the classes ((N, C, d1) layout). If these are (B, T, V) "
        "logits with the classes last (e.g. straight from nn.Linear), the loss is wrong: "
        f"pass `logits.transpose(1, 2)`, or `logits.view(-1, {V})` with `target.view(-1)`. If "
        "dim 1 really holds the classes, pass validate=False or filter this warning.",
    )


def _all_ignored_stats(target: torch.Tensor, ignore_index: Optional[int], reduction: Optional[str]):
    """Off the CPU: whether any target is kept, fetched with the other statistics (no second
    sync). On the CPU nothing: :func:`_warn_all_ignored` decides from the index range."""
    if reduction != "mean" or ignore_index is None or target.numel() == 0 or _on_host(target):
        return []
    return [(target.detach() != ignore_index).any()]


def _warn_all_ignored(
    func: str, target: torch.Tensor, ignore_index: Optional[int], reduction: Optional[str], tmin, tmax, kept=None
) -> None:
    """Warn when every target equals ignore_index under reduction='mean' (0 / 0 = nan)."""
    if reduction != "mean" or ignore_index is None or target.numel() == 0:
        return
    if kept is None:
        # CPU: with every target ignored the (masked) index range is a single value, so
        # the exact test runs only when tmin == tmax (reading costs no sync here).
        if tmin != tmax:
            return
        kept = bool((target != ignore_index).any())
    if kept:
        return
    warn_once(
        "all-ignored",
        f"{func}: all {target.numel()} targets equal ignore_index={ignore_index}, so "
        "reduction='mean' is 0/0 = nan (as in torch; the gradient is zero). For batches "
        "that may be fully masked (LLM micro-batches, padding), use reduction='sum' with your "
        "own normaliser (e.g. num_items_in_batch over the whole step), or return_parts=True "
        "and backpropagate parts.total / that normaliser (a LossMeter counts such a batch "
        "as 0/0 and skips it).",
    )


def check_multiclass_values(
    func: str,
    input: torch.Tensor,
    target: torch.Tensor,
    index_target: bool,
    C: int,
    ignore_index: Optional[int],
    class_dim: int,
    reduction: Optional[str] = None,
) -> None:
    """The whole value tier of cross-entropy with ONE host synchronisation.

    Class indices: one ``aminmax`` over the targets (ignore_index masked out), so an
    index outside [0, C) is reported before any kernel indexes with it (no device-side
    assert on GPU). Probabilities: see :func:`check_probability_target`. Input: see
    :func:`check_logits_not_probabilities`. With ``reduction='mean'``, a warning when every
    target is ignored (from the same statistics: :func:`_warn_all_ignored`); and a warning
    when (B, T, V) logits with T == V make the class dimension ambiguous."""
    _warn_single_class(func, C, input)
    if index_target:
        _warn_ambiguous_class_dim(func, input, target)
    stats = []
    if target.numel():
        stats += _index_stats(target, ignore_index) if index_target else _prob_stats(target, class_dim)
    n_t = len(stats)
    kept = _all_ignored_stats(target, ignore_index, reduction) if index_target else []
    stats += kept
    stats += _softmax_stats(input, class_dim)
    values = _fetch(stats)
    if kept:
        kept = [values.pop(n_t)]
    if n_t:
        if index_target:
            _index_judge(func, target, C, ignore_index, *values[:n_t])
            _warn_all_ignored(func, target, ignore_index, reduction, *values[:2], *kept)
        else:
            _prob_judge(func, target, class_dim, *values[:n_t])
    _softmax_judge(func, input, class_dim, values[n_t:])


# ------------------------------------------------------------------- under capture
def _capture_note() -> str:
    return (
        "(This check ran as a device-side assertion inside a compiled, exported or traced "
        "graph; call the loss eagerly to see the position and value.)"
    )


def assert_multiclass_values(
    func: str, target: torch.Tensor, index_target: bool, C: int, ignore_index: Optional[int]
) -> None:
    """The raising value checks of cross-entropy as ``torch._assert_async``: no host read,
    no graph break; the compiled graph raises ``RuntimeError`` with this message at run
    time. The warning heuristics need host values and are skipped while capturing."""
    from ._capture import transforming

    if transforming():  # no vmap rule for _assert_async: torch.func runs without value checks
        return
    t = target.detach()
    if index_target:
        ok = (t >= 0) & (t < C)
        if ignore_index is not None:
            ok = ok | (t == ignore_index)
        what = f"class indices in [0, {C - 1}] (C={C})" + (
            f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        )
        torch._assert_async(
            ok.all(),
            f"{func}: expected {what}, but got a target outside that range. "
            f"Labels start at 1? subtract 1; a padding value? pass it as ignore_index. " + _capture_note(),
        )
    else:
        torch._assert_async(
            ((t >= 0) & torch.isfinite(t)).all(),
            f"{func}: expected finite, non-negative class-probability targets, but got a "
            f"negative, NaN or infinite entry. " + _capture_note(),
        )


def assert_binary_values(
    func: str, input: torch.Tensor, target: torch.Tensor, keep: Optional[torch.Tensor], *, probabilities_in: bool
) -> None:
    """The raising value checks of the BCE losses as ``torch._assert_async`` (see
    :func:`assert_multiclass_values`)."""
    from ._capture import transforming

    if transforming():
        return
    t = target.detach()
    ok = (t >= 0) & (t <= 1)
    if keep is not None:
        ok = ok | ~keep
    torch._assert_async(
        ok.all(),
        f"{func}: expected `target` values in [0, 1], but got one outside it. "
        "Integer labels above 1 mean several classes: use CrossEntropyLoss; a "
        "missing-label marker? pass ignore_index. " + _capture_note(),
    )
    if probabilities_in:
        x = input.detach()
        torch._assert_async(
            ((x >= 0) & (x <= 1)).all(),
            f"{func}: expected `input` to hold probabilities in [0, 1], but got a value "
            "outside it (or NaN). Raw logits? use binary_cross_entropy_with_logits. " + _capture_note(),
        )


# --------------------------------------------------------------------------- LM-head options
def check_real(func: str, name: str, value, ok: Callable[[float], bool], what: str, fix: str) -> float:
    """A real-valued option (int, float or a one-element floating tensor; never bool or
    complex) as a Python float, finite and with ``ok(value)`` true. Every such option
    fails with one message: ``expected `name` to be {what}, but got {found}. {fix}``
    (``CrossentTypeError`` for a non-number, ``CrossentValueError`` for a value)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    if not isinstance(value, Number) or isinstance(value, (bool, complex)):
        fail(func, f"`{name}` to be {what}", type(value).__name__, fix, CrossentTypeError)
    x = float(value)
    if not (math.isfinite(x) and ok(x)):
        fail(func, f"`{name}` to be {what}", repr(value), fix)
    return x


def check_lm_head_options(func: str, *, z_loss=0.0, temperature=1.0, softcap=None) -> Tuple[float, float, float]:
    """``(z_loss, temperature, softcap)`` as floats: ``z_loss`` finite and >= 0,
    ``temperature`` finite and > 0, ``softcap`` None or finite and > 0 (returned as 0.0
    meaning none)."""
    z = check_real(
        func,
        "z_loss",
        z_loss,
        lambda v: v >= 0,
        "a finite number >= 0",
        "0 turns the z-loss off; PaLM uses z_loss=1e-4.",
    )
    t = check_real(
        func,
        "temperature",
        temperature,
        lambda v: v > 0,
        "a finite number > 0",
        "The logits are divided by it; 1.0 leaves them unchanged (greedy decoding has no "
        "finite temperature: use the argmax instead).",
    )
    s = 0.0
    if softcap is not None:
        s = check_real(
            func,
            "softcap",
            softcap,
            lambda v: v > 0,
            "None or a finite number > 0",
            "Logits become softcap * tanh(logits / softcap); None turns the cap off (Gemma 2 uses softcap=30.0).",
        )
    return z, t, s


def check_token_weight(
    func: str, token_weight, target: torch.Tensor, *, validate: Optional[bool] = None, capture: bool = False
) -> Optional[torch.Tensor]:
    """``token_weight``: None or a floating tensor with the target's shape, >= 0 (value
    tier: one read; under capture a device-side assertion)."""
    if token_weight is None:
        return None
    if not isinstance(token_weight, torch.Tensor) or not token_weight.is_floating_point():
        found = f"dtype {token_weight.dtype}" if isinstance(token_weight, torch.Tensor) else type(token_weight).__name__
        fail(
            func,
            "`token_weight` to be a floating-point tensor",
            found,
            "Pass one weight per token, e.g. `mask.float()`.",
            CrossentTypeError,
        )
    if tuple(token_weight.shape) != tuple(target.shape):
        fail(
            func,
            f"`token_weight` of the target's shape {shape_str(target.shape)}",
            f"shape {shape_str(token_weight.shape)}",
            "One weight per target token; class weights go to `weight`.",
        )
    check_same_device(func, target, token_weight=token_weight)
    if validation_enabled(validate) and token_weight.numel():
        ok = (token_weight.detach() >= 0) & torch.isfinite(token_weight.detach())
        if capture:
            from ._capture import transforming

            if not transforming():
                torch._assert_async(
                    ok.all(),
                    f"{func}: expected finite `token_weight` >= 0, but got a "
                    "negative, NaN or infinite weight. " + _capture_note(),
                )
        elif not bool(ok.all()):
            flat = (~ok).reshape(-1).nonzero()[0].item()
            fail(
                func,
                "finite `token_weight` >= 0",
                f"{token_weight.reshape(-1)[flat].item()} at {_where(token_weight.shape, flat)}",
                "Zero drops a token; negative weights would reward the loss.",
            )
    return token_weight
