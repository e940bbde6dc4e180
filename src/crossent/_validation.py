"""Every guardrail of crossent, in one place.

Two tiers (the torchmetrics habit):

* **Metadata checks** look only at shapes, dtypes, devices and option values. They
  never touch tensor data, cost microseconds, never synchronise a GPU, and always run
  (also in ``crossent.nn`` constructors, so a bad option fails when the module is built).
* **Value checks** read the data: targets in range, probabilities inside [0, 1],
  inputs that look like probabilities or log-probabilities where logits are expected.
  Each costs one reduction pass over the tensor it inspects (about a third of the
  loss itself on CPU, one device synchronisation on GPU). They run by default and
  are switched off per call (``validate=False``) or for the whole process with the
  environment variable ``CROSSENT_VALIDATE=0``.

Errors follow one template, ``{function}: expected {what}, but got {found}. {fix}``,
and are ``ValueError`` / ``TypeError`` / ``IndexError`` subclasses (never ``assert``).
Warnings are :class:`CrossentWarning` (a ``UserWarning``) and are shown once per
call site of user code.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from numbers import Number
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "CrossentWarning",
    "CrossentValueError",
    "CrossentTypeError",
    "CrossentIndexError",
    "validation_enabled",
]

REDUCTIONS = ("none", "mean", "sum")

# Below this many elements a batch cannot tell logits from probabilities reliably:
# 32 raw logits of an untrained model all landing inside [0, 1] has probability ~2**-32.
_MIN_ELEMENTS_TO_TELL = 32
# Rows inspected by the "looks like softmax / log_softmax" heuristics: bounded cost.
_ROWS_TO_INSPECT = 64


class CrossentWarning(UserWarning):
    """A probable mistake that still has a well-defined answer.

    Filter it like any warning: ``warnings.filterwarnings("ignore", category=CrossentWarning)``.
    """


class CrossentValueError(ValueError):
    """A value or shape that would give a wrong loss."""


class CrossentTypeError(TypeError):
    """A dtype or argument type that crossent cannot use."""


class CrossentIndexError(CrossentValueError, IndexError):
    """A class index outside ``[0, C)`` that is not ``ignore_index``."""


def validation_enabled(validate: Optional[bool] = None) -> bool:
    """Whether value checks run: the per-call ``validate`` wins, else ``CROSSENT_VALIDATE``."""
    if validate is not None:
        return bool(validate)
    return os.environ.get("CROSSENT_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")


def fail(func: str, what: str, found: str, fix: str = "", cls: type = CrossentValueError):
    """Raise ``cls`` with the house message template."""
    msg = f"{func}: expected {what}, but got {found}."
    if fix:
        msg += f" {fix}"
    raise cls(msg)


# --------------------------------------------------------------------------- warnings
_WARNED: set = set()
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_NN_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn")


def _user_frame_and_level():
    """First frame outside crossent and torch.nn (where the user called the loss)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        fname = os.path.abspath(frame.f_code.co_filename)
        if not (fname.startswith(_PKG_DIR) or fname.startswith(_TORCH_NN_DIR)):
            return frame, level
        frame = frame.f_back
        level += 1
    return None, 1


def warn_once(key: str, message: str) -> None:
    """Warn with :class:`CrossentWarning` once per (key, user call site).

    Python's own "default" filter already shows a warning once per location; we keep a
    registry as well so that a training loop under ``simplefilter("always")`` (pytest,
    notebooks) still sees it once, not every step.
    """
    frame, level = _user_frame_and_level()
    site = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)
    if (key, site) in _WARNED:
        return
    _WARNED.add((key, site))
    # +1: this function's own frame.
    warnings.warn(message, CrossentWarning, stacklevel=level + 1)


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests and notebooks)."""
    _WARNED.clear()


# --------------------------------------------------------------------------- options
def check_reduction(func: str, reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        hint = ""
        if isinstance(reduction, str) and reduction.lower() in REDUCTIONS:
            hint = f" Reduction names are lower case: use reduction='{reduction.lower()}'."
        elif reduction in ("avg", "average", "elementwise_mean"):
            hint = " Use reduction='mean'."
        fail(func, "`reduction` to be one of 'none', 'mean', 'sum'", repr(reduction),
             ("Pick one of those." + hint).strip())
    return reduction


def check_label_smoothing(func: str, label_smoothing) -> float:
    if isinstance(label_smoothing, torch.Tensor) and label_smoothing.numel() == 1:
        label_smoothing = float(label_smoothing)
    if not isinstance(label_smoothing, Number) or isinstance(label_smoothing, bool):
        fail(func, "`label_smoothing` to be a float in [0, 1]", f"{type(label_smoothing).__name__}",
             "Pass a Python float such as label_smoothing=0.1.", CrossentTypeError)
    value = float(label_smoothing)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        fail(func, "`label_smoothing` in [0, 1]", repr(label_smoothing),
             "0 turns smoothing off; typical values are 0.05 to 0.2. (torch silently ignores "
             "negative values; crossent refuses them.)")
    return value


def check_ignore_index(func: str, ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, torch.Tensor) and ignore_index.numel() == 1:
        ignore_index = ignore_index.item()
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Number) or int(ignore_index) != ignore_index:
        fail(func, "`ignore_index` to be an integer", repr(ignore_index),
             "Pass the integer label that marks elements to skip, e.g. ignore_index=-100.",
             CrossentTypeError)
    return int(ignore_index)


def as_weight_tensor(func: str, name: str, value, like: Optional[torch.Tensor] = None):
    """Accept tensors, Python scalars and sequences for ``weight`` / ``pos_weight``.

    Tensors are kept as they are (their dtype is resolved at call time); scalars and
    sequences become float tensors on ``like``'s device (an extension over torch).
    """
    if value is None or isinstance(value, torch.Tensor):
        if value is not None and not (value.is_floating_point() or value.dtype in _INTEGER_DTYPES
                                      or value.dtype == torch.bool):
            fail(func, f"`{name}` to be a real-valued tensor", f"dtype {value.dtype}",
                 f"Pass `{name}` as a float tensor.", CrossentTypeError)
        return value
    if isinstance(value, bool):
        fail(func, f"`{name}` to be a tensor, a number or a sequence of numbers", "a bool",
             f"Pass `{name}` as a float, e.g. {name}=1.0.", CrossentTypeError)
    try:
        kwargs = {"dtype": torch.get_default_dtype()}
        if like is not None:
            kwargs = {"dtype": like.dtype if like.is_floating_point() else torch.get_default_dtype(),
                      "device": like.device}
        return torch.as_tensor(value, **kwargs)
    except (TypeError, ValueError, RuntimeError):
        fail(func, f"`{name}` to be a tensor, a number or a sequence of numbers",
             f"{type(value).__name__}", f"Pass `{name}` as torch.tensor([...]).", CrossentTypeError)


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_weight_values_nonnegative(func: str, name: str, value: Optional[torch.Tensor]) -> None:
    """Warn about negative or NaN weights (legal in torch, but they turn the loss into a reward).

    Weights are C numbers, not data, so this runs at construction only (skipped on GPU)."""
    if value is None or value.numel() == 0 or value.numel() > 1_000_000 or value.is_cuda:
        return
    bad = ~(value >= 0)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        warn_once(f"negative-{name}",
                  f"{func}: `{name}` holds {value.flatten()[idx].item()} at flat position {idx}; "
                  "a negative or NaN weight rewards the model for that class instead of "
                  "penalising it. Use weights >= 0.")


def check_same_device(func: str, input: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != input.device and t.dim() > 0:
            fail(func, f"`{name}` on the same device as `input` ({input.device})",
                 f"`{name}` on {t.device}",
                 f"Move it with `{name}.to(input.device)` (for a module, `criterion.to(device)` "
                 "moves its buffers).")


def check_floating_input(func: str, input) -> None:
    if not isinstance(input, torch.Tensor):
        fail(func, "`input` to be a torch.Tensor", type(input).__name__,
             "Convert it with torch.as_tensor(...).", CrossentTypeError)
    if not input.is_floating_point():
        fail(func, "`input` to be a floating-point tensor (float16/bfloat16/float32/float64)",
             f"dtype {input.dtype}",
             "Losses need real-valued scores: call `input.float()` (and check that you did "
             "not pass the labels as the input).", CrossentTypeError)


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# --------------------------------------------------------------------------- binary
def check_binary_target(func: str, input: torch.Tensor, target) -> torch.Tensor:
    """Shape and dtype of a BCE target; returns it cast to a floating dtype."""
    if not isinstance(target, torch.Tensor):
        fail(func, "`target` to be a torch.Tensor", type(target).__name__,
             "Convert it with torch.as_tensor(...).", CrossentTypeError)
    if target.shape != input.shape:
        found = f"input {shape_str(input.shape)} and target {shape_str(target.shape)}"
        fix = "BCE compares input and target element by element, so their shapes must match."
        ish, tsh = tuple(input.shape), tuple(target.shape)
        if ish == tsh + (1,):
            fix += " Use `target.unsqueeze(-1)` or `input.squeeze(-1)`; torch would otherwise broadcast or fail."
        elif tsh == ish + (1,):
            fix += " Use `target.squeeze(-1)` or `input.unsqueeze(-1)`."
        elif input.numel() == target.numel():
            fix += f" They have the same number of elements: `target.view({shape_str(ish)[1:-1].rstrip(',')})` if the order matches."
        fail(func, "`target` with the same shape as `input`", found, fix)
    if target.dtype == torch.bool or target.dtype in _INTEGER_DTYPES:
        # Extension (pytorch#842): 0/1 integer and bool labels are cast.
        return target.to(input.dtype)
    if not target.is_floating_point():
        fail(func, "`target` to be a floating, integer or bool tensor", f"dtype {target.dtype}",
             "Pass 0/1 labels or probabilities.", CrossentTypeError)
    return target


def check_binary_values(func: str, input: torch.Tensor, target: torch.Tensor,
                        keep: Optional[torch.Tensor], *, probabilities_in: bool) -> None:
    """Value tier for BCE: targets inside [0, 1]; input range matching the loss."""
    if target.numel() == 0:
        return
    t = target if keep is None else target[keep]
    if t.numel():
        tmin, tmax = torch.aminmax(t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach())
        tmin, tmax = float(tmin), float(tmax)
        if not (tmin >= 0.0 and tmax <= 1.0):
            if math.isnan(tmin) or math.isnan(tmax):
                found = "NaN"
            else:
                found = f"values in [{tmin:.6g}, {tmax:.6g}]"
            fix = ("Targets are probabilities of the positive class: 0, 1, or a soft label in "
                   "between.")
            if tmax > 1 and float(tmax) == int(tmax):
                fix += (" Integer labels above 1 mean several classes: use CrossEntropyLoss, or "
                        "one-hot encode for a multi-label BCE.")
            if tmin < 0 and tmin == -1:
                fix += " If -1 marks missing labels, pass ignore_index=-1."
            fail(func, "`target` values in [0, 1]", found, fix)
    x = input.detach()
    if x.numel() == 0:
        return
    xmin, xmax = torch.aminmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    xmin, xmax = float(xmin), float(xmax)
    if probabilities_in:
        if not (xmin >= 0.0 and xmax <= 1.0):
            found = "NaN" if (math.isnan(xmin) or math.isnan(xmax)) else f"min {xmin:.6g}, max {xmax:.6g}"
            fail(func, "`input` to hold probabilities in [0, 1]", found,
                 "These look like raw logits: use BCEWithLogitsLoss / "
                 "binary_cross_entropy_with_logits on them (it applies the sigmoid itself, "
                 "exactly), or apply torch.sigmoid first.")
    elif x.numel() >= _MIN_ELEMENTS_TO_TELL and xmin >= 0.0 and xmax <= 1.0:
        warn_once("sigmoid-before-logits",
                  f"{func}: all {x.numel()} inputs lie in [{xmin:.3g}, {xmax:.3g}], which looks like "
                  "probabilities. This loss applies the sigmoid itself: pass the raw logits "
                  "(drop the torch.sigmoid), or use BCELoss on probabilities.")


# --------------------------------------------------------------------------- multiclass
def check_multiclass_shapes(func: str, input: torch.Tensor, target, ignore_index: int):
    """Decide between class-index and probability targets, as torch does, and catch the
    classic shape mistakes. Returns ``(target, is_index_target)``; index targets are
    returned as int64 (any integer dtype is accepted: pytorch#45540)."""
    if not isinstance(target, torch.Tensor):
        fail(func, "`target` to be a torch.Tensor", type(target).__name__,
             "Convert it with torch.as_tensor(...).", CrossentTypeError)
    if input.dim() == 0:
        fail(func, "`input` of shape (C,), (N, C) or (N, C, d1, ..., dK)", "a 0-dim tensor",
             "Cross-entropy needs one score per class.")
    ish, tsh = tuple(input.shape), tuple(target.shape)
    C = ish[1] if input.dim() >= 2 else ish[0]
    index_shape = (ish[0],) + ish[2:] if input.dim() >= 2 else ()
    if ish == tsh:
        if not target.is_floating_point():
            fail(func, "class-index targets of shape " + shape_str(index_shape)
                 + " or float class-probability targets of shape " + shape_str(ish),
                 f"an integer target of shape {shape_str(tsh)} (the input's shape; looks one-hot)",
                 "Use `target.argmax(1)` for class indices, or `target.float()` if these are "
                 "class probabilities.")
        if ignore_index >= 0:
            fail(func, "ignore_index < 0 with class-probability targets", f"ignore_index={ignore_index}",
                 "ignore_index applies to class-index targets only; give ignored rows zero "
                 "probability mass instead.")
        return target, False
    if tsh == index_shape:
        if target.is_floating_point():
            fail(func, "integer class indices for a target of shape " + shape_str(tsh),
                 f"dtype {target.dtype}",
                 "Class indices must be integers: use `target.long()`. Class-probability "
                 f"targets must have the input's shape {shape_str(ish)}.", CrossentTypeError)
        if target.dtype == torch.bool or target.dtype in _INTEGER_DTYPES:
            return target.long(), True
        fail(func, "an integer target", f"dtype {target.dtype}", "Use `target.long()`.", CrossentTypeError)
    # Shape mistakes, most specific first.
    fix = ""
    if input.dim() >= 2 and tsh == (ish[0], 1):
        fix = "Targets of shape (N, 1) hold one class per row: use `target.squeeze(1)`."
    elif input.dim() == 3 and tsh == ish[:2]:
        fix = (f"For sequences the class dimension is dim 1: input (B, T, V) = {shape_str(ish)} "
               f"needs `input.transpose(1, 2)` (or flatten: `input.reshape(-1, {ish[2]})` "
               "with `target.reshape(-1)`).")
    elif input.dim() >= 3 and tsh == ish[:-1]:
        fix = ("The class dimension is dim 1, not the last one: use `input.movedim(-1, 1)`.")
    elif input.dim() >= 2 and tsh == (ish[0],) and input.dim() > 2:
        fix = f"Inputs with extra dimensions {shape_str(ish[2:])} need targets of shape {shape_str(index_shape)}."
    elif target.dim() == input.dim() and target.is_floating_point():
        fix = "Class-probability targets must have exactly the input's shape."
    elif input.dim() >= 2 and target.numel() == ish[0]:
        fix = f"Use `target.reshape({ish[0]})`."
    fail(func, f"target of shape {shape_str(index_shape)} (class indices) or {shape_str(ish)} "
         f"(class probabilities) for input of shape {shape_str(ish)}",
         f"target of shape {shape_str(tsh)}", fix)


def check_class_weight(func: str, weight: Optional[torch.Tensor], C: int) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != C:
        fail(func, f"`weight` of shape ({C},), one number per class (C={C})",
             f"shape {shape_str(weight.shape)}",
             f"Pass one weight per class, e.g. weight=torch.ones({C}).")


def check_class_indices(func: str, target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Value tier: every index is in [0, C) or equals ignore_index."""
    if target.numel() == 0:
        return
    flat = target.reshape(-1)
    bad = ((flat < 0) | (flat >= C)) & (flat != ignore_index)
    if not bool(bad.any()):
        return
    pos = int(bad.nonzero()[0])
    value = int(flat[pos])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), tuple(target.shape))) if target.dim() else ()
    tmin, tmax = (int(v) for v in torch.aminmax(flat[flat != ignore_index]))
    hints = []
    if value == C and tmin >= 1:
        hints.append("Labels start at 1? subtract 1 (`target - 1`).")
    if value < 0:
        if value == -1 and ignore_index != -1:
            hints.append("Marks no label? pass ignore_index=-1.")
        else:
            hints.append(f"Marks no label? pass ignore_index={value}.")
    elif value >= C:
        if not hints:
            hints.append(f"Labels start at 1? subtract 1. Marks no label? pass ignore_index={value}. "
                         f"Otherwise the model needs at least {tmax + 1} outputs.")
    fail(func, f"class indices in [0, {C - 1}] (C={C}) or ignore_index={ignore_index}",
         f"{value} at position {where if where else '()'}", " ".join(hints), CrossentIndexError)


def check_probability_target(func: str, target: torch.Tensor, class_dim: int) -> None:
    """Value tier for class-probability targets."""
    if target.numel() == 0:
        return
    t = target.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    rows = t.movedim(class_dim, -1).reshape(-1, t.shape[class_dim])
    bad = ~(rows >= 0).all(dim=1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        fail(func, "class-probability targets with non-negative entries",
             f"row {r} = {_row_repr(rows[r])}",
             "Probabilities cannot be negative. If these are class indices, pass an integer "
             "tensor of shape (N,) instead.")
    sums = rows.sum(dim=1, dtype=torch.float64)
    tol = 1e-3 if target.dtype in (torch.float16, torch.bfloat16) else 1e-5 * max(1, rows.shape[1]) ** 0.5
    off = (sums - 1).abs() > tol
    if bool(off.any()):
        r = int(off.nonzero()[0])
        s = float(sums[r])
        fix = "Cross-entropy with probability targets expects each row to be a distribution."
        if s > 1 + tol:
            fix += " Several classes at once (multi-hot)? use BCEWithLogitsLoss for multi-label."
        warn_once("prob-target-sum",
                  f"{func}: class-probability target rows should sum to 1, but row {r} = "
                  f"{_row_repr(rows[r])} sums to {s:.6g}. {fix}")


def check_logits_not_probabilities(func: str, input: torch.Tensor, class_dim: int) -> None:
    """Value tier heuristic: warn when input rows look like softmax or log_softmax output."""
    C = input.shape[class_dim]
    if C < 2 or input.numel() < _MIN_ELEMENTS_TO_TELL:
        return
    x = input.detach().movedim(class_dim, -1).reshape(-1, C)[:_ROWS_TO_INSPECT]
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        return
    tol = 1e-3 if input.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if bool((x >= 0).all()) and bool(((x.sum(1) - 1).abs() < tol * max(1.0, C ** 0.5)).all()):
        warn_once("softmax-before-ce",
                  f"{func}: the input rows are non-negative and sum to 1, which looks like "
                  "softmax output. Cross-entropy applies log_softmax itself: pass the raw "
                  "logits (drop the softmax), otherwise the loss and its gradients are wrong.")
    elif bool((x <= 0).all()) and bool((torch.logsumexp(x, 1).abs() < tol * max(1.0, C ** 0.5)).all()):
        warn_once("log-softmax-before-ce",
                  f"{func}: the input rows have logsumexp 0, which looks like log_softmax "
                  "output. Cross-entropy applies log_softmax itself: pass the raw logits (the "
                  "value is the same, but use F.nll_loss if you mean log-probabilities).")


def _row_repr(row: torch.Tensor, limit: int = 6) -> str:
    vals = [f"{v:.4g}" for v in row[:limit].tolist()]
    if row.numel() > limit:
        vals.append("...")
    return "[" + ", ".join(vals) + "]"


Tensorish = Union[torch.Tensor, Number, Sequence[Number], None]
