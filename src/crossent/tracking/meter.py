r"""Exact epoch averages of a loss: add up numerators and denominators, divide once.
Design notes: ``docs/design.md``, section ``crossent.tracking.meter``.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Any, Dict, Optional

import torch

from .. import _validation as V
from ..functional._reduction import LossParts
from ._distributed import all_reduce_sum, distributed_ready

__all__ = ["LossMeter"]

_STATE_KEYS = ("total", "denominator", "updates")


class LossMeter:
    r"""Exact average of a loss over an epoch (or any stream of batches), in float64.

    Feed it the :class:`~crossent.LossParts` of each batch, or let it call the criterion::

        meter = crossent.tracking.LossMeter()
        for x, y in loader:
            loss = meter(criterion, model(x), y)     # criterion(..., return_parts=True)
            loss.backward()
        print(meter.compute())                       # sum of losses / sum of denominators

    ``update(total, denominator)`` accepts the two numbers directly (tensors or floats),
    for losses computed elsewhere: ``total`` must be a *sum* of per-element losses.

    Nothing is kept that has a graph: tensors are detached when added, and a ``total`` that
    still requires grad (the ``running += loss`` pattern) gets a one-time
    :class:`~crossent.CrossentWarning`. The running sums stay on the device of the losses,
    so ``update`` never synchronises a GPU; :meth:`compute` does, once.

    Each batch is checked: a negative, NaN or infinite denominator is an error (a
    :class:`~crossent.CrossentValueError`), and a NaN or infinite total gets a one-time
    :class:`~crossent.CrossentWarning` (the epoch average becomes NaN with it). Numbers and
    CPU tensors are checked in ``update``; for tensors on an accelerator the check is two
    flags summed on the device and read by :meth:`compute` with its one synchronisation.

    Args:
        sync (bool): with ``torch.distributed`` initialised, :meth:`compute` all-reduces the
            sums over the process group (every rank must call it). Default ``True``.
        process_group: the group to reduce over (default: the world).

    Attributes:
        total (float): this process's running numerator.
        denominator (float): this process's running denominator.
        updates (int): number of batches added on this process since :meth:`reset`.
    """

    def __init__(self, *, sync: bool = True, process_group=None) -> None:
        self.sync = bool(sync)
        self.process_group = process_group
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything added (start of an epoch)."""
        self._total: Optional[torch.Tensor] = None
        self._denominator: Optional[torch.Tensor] = None
        # device-side counts of (bad denominators, non-finite totals), read by compute()
        self._flags: Optional[torch.Tensor] = None
        self.updates = 0

    @property
    def total(self) -> float:
        return 0.0 if self._total is None else float(self._total)

    @property
    def denominator(self) -> float:
        return 0.0 if self._denominator is None else float(self._denominator)

    def state_dict(self) -> Dict[str, Any]:
        """This process's running sums as plain Python numbers (exact float64, JSON-friendly).

        Save it with the model checkpoint to resume an epoch; ranks save their own.
        """
        return {"total": self.total, "denominator": self.denominator, "updates": int(self.updates)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (replaces the current sums)."""
        func = "LossMeter.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != set(_STATE_KEYS):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            V.fail(
                func, f"a dict with keys {list(_STATE_KEYS)}", repr(found), "Pass what LossMeter.state_dict() returned."
            )
        total, den = state_dict["total"], state_dict["denominator"]
        updates = state_dict["updates"]
        for name, v in (("total", total), ("denominator", den)):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, Number):
                V.fail(
                    func,
                    f"`{name}` to be a number",
                    type(v).__name__,
                    "Pass what LossMeter.state_dict() returned.",
                    V.CrossentTypeError,
                )
        if not math.isfinite(float(total)):
            V.fail(
                func,
                "a finite `total`",
                repr(float(total)),
                "A NaN or infinite total means a NaN/inf batch was added before the state was "
                "saved: that epoch's average is lost. Start the epoch again (reset()).",
            )
        if not (math.isfinite(float(den)) and float(den) >= 0):
            V.fail(
                func,
                "a finite `denominator` >= 0 (a count of elements or a sum of weights)",
                repr(float(den)),
                "Pass what LossMeter.state_dict() returned.",
            )
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            V.fail(
                func,
                "`updates` to be a non-negative int",
                repr(updates),
                "Pass what LossMeter.state_dict() returned.",
                V.CrossentTypeError,
            )
        device = self._total.device if self._total is not None else torch.device("cpu")
        self._total = torch.tensor(float(total), dtype=torch.float64, device=device)
        self._denominator = torch.tensor(float(den), dtype=torch.float64, device=device)
        self._flags = None
        self.updates = updates

    # ------------------------------------------------------------------ adding
    def update(self, total, denominator=None) -> None:
        """Add one batch: ``update(parts)`` or ``update(total, denominator)``.

        Args:
            total: a :class:`~crossent.LossParts` (then ``denominator`` is omitted), or the
                batch's *sum* of per-element losses (0-dim tensor or number).
            denominator: what the loss's ``mean`` divides by for that batch (number of kept
                elements, or the sum of their class weights).
        """
        func = "LossMeter.update"
        if isinstance(total, LossParts):
            if denominator is not None:
                V.fail(
                    func,
                    "either a LossParts or (total, denominator)",
                    "a LossParts and a denominator",
                    "LossParts already carries its denominator: call meter.update(parts).",
                    V.CrossentTypeError,
                )
            total, denominator = total.total, total.denominator
        elif denominator is None:
            found = (
                f"a single tensor of shape {V.shape_str(total.shape)}"
                if isinstance(total, torch.Tensor)
                else f"a single {type(total).__name__}"
            )
            V.fail(
                func,
                "a LossParts, or a batch's (total, denominator)",
                found,
                "A batch mean has lost its denominator (the batch size, the sum of class "
                "weights, the kept elements): call the loss with return_parts=True and pass "
                "the result, or use `loss = meter(criterion, input, target)`.",
                V.CrossentTypeError,
            )
        t = self._as_scalar(func, "total", total)
        d = self._as_scalar(func, "denominator", denominator)
        if self._total is None:
            self._total = torch.zeros((), dtype=torch.float64, device=t.device)
            self._denominator = torch.zeros((), dtype=torch.float64, device=t.device)
        t, d = t.to(self._total.device), d.to(self._total.device)
        self._check_batch(func, t, d)
        # add_ on our own accumulators: never aliases (or modifies) the caller's tensors.
        self._total.add_(t)
        self._denominator.add_(d)
        self.updates += 1

    def _check_batch(self, func: str, t: torch.Tensor, d: torch.Tensor) -> None:
        """Refuse a bad denominator, warn on a non-finite total: now on the CPU (reading is
        free), at :meth:`compute` elsewhere (two flags summed on the device: no sync here)."""
        if not _on_host(t):
            flags = torch.stack([~(torch.isfinite(d) & (d >= 0)), ~torch.isfinite(t)]).to(torch.float64)
            self._flags = flags if self._flags is None else self._flags + flags
            return
        tv, dv = float(t), float(d)
        if not (math.isfinite(dv) and dv >= 0):
            V.fail(
                func,
                "a finite `denominator` >= 0 (a count of elements or a sum of weights)",
                repr(dv),
                "The denominator is what the batch's mean divides by; pass the "
                "LossParts of return_parts=True, or `(loss_sum, number_of_elements)`.",
            )
        if not math.isfinite(tv):
            _warn_nonfinite(func, f"the total of batch {self.updates + 1} is {tv}")

    def __call__(self, criterion, input, target, **kwargs):
        """Compute ``criterion(input, target, return_parts=True, **kwargs)``, add it, return the loss.

        ``criterion`` is a crossent loss module or function (``crossent.nn.CrossEntropyLoss()``,
        ``crossent.functional.cross_entropy``, ...). The returned loss keeps its graph, for
        ``loss.backward()``; only the detached parts are kept here.
        """
        try:
            parts = criterion(input, target, return_parts=True, **kwargs)
        except TypeError as exc:
            if "return_parts" not in str(exc):
                raise
            name = getattr(criterion, "__qualname__", type(criterion).__qualname__)
            V.fail(
                "LossMeter",
                "a crossent loss that accepts return_parts=True",
                f"{getattr(criterion, '__module__', type(criterion).__module__)}.{name}",
                "Use the crossent drop-in (`import crossent.nn as nn`, or "
                "crossent.functional), or call meter.update(loss_sum, denominator) yourself.",
                V.CrossentTypeError,
            )
        if not isinstance(parts, LossParts):
            V.fail(
                "LossMeter",
                "the criterion to return a LossParts with return_parts=True",
                type(parts).__name__,
                "Use a crossent loss (crossent.nn / crossent.functional).",
                V.CrossentTypeError,
            )
        self.update(parts)
        return parts.loss

    @staticmethod
    def _as_scalar(func: str, name: str, value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                V.fail(
                    func,
                    f"`{name}` to be a single number",
                    f"a tensor of shape {V.shape_str(value.shape)}",
                    "Pass the batch's sum (`loss.sum()` of reduction='none' losses), or the "
                    "LossParts of return_parts=True.",
                )
            if value.requires_grad:
                V.warn_once(
                    f"meter-grad-{name}",
                    f"{func}: `{name}` still requires grad; a running sum of such tensors "
                    "keeps every batch's autograd graph (and activations) alive. The meter "
                    "detached it. Pass the LossParts of return_parts=True, or "
                    f"`{name}.detach()`.",
                )
            if value.is_complex():
                V.fail(func, f"`{name}` to be real", f"dtype {value.dtype}", "", V.CrossentTypeError)
            v = value.detach().reshape(())
            if v.device.type == "mps":  # no float64 there
                v = v.cpu()
            return v.to(torch.float64)
        if isinstance(value, bool) or not isinstance(value, Number):
            V.fail(
                func,
                f"`{name}` to be a tensor or a number",
                type(value).__name__,
                "Pass the LossParts of return_parts=True.",
                V.CrossentTypeError,
            )
        return torch.tensor(float(value), dtype=torch.float64)

    # ------------------------------------------------------------------ result
    def compute(self, sync: Optional[bool] = None) -> float:
        """The average ``sum(total) / sum(denominator)``; over all ranks when distributed.

        Args:
            sync: override the constructor's ``sync`` for this call. When it is on and
                ``torch.distributed`` is initialised, this is a collective: every rank of
                the group must call it (one ``all_reduce`` of five float64 numbers: the sums, the
                batch count and the two check flags).

        Returns:
            a Python float; ``nan`` when the denominator is 0 (nothing added, or every
            element ignored), like torch's ``mean`` of an empty batch. Nothing added at all
            (on any rank) also warns once, since it usually means a missing ``update``.
            The running sums are not changed: more batches can be added afterwards.
        """
        total, den, updates, bad_den, bad_total = self._reduced(self.sync if sync is None else sync)
        if bad_den:
            V.fail(
                "LossMeter.compute",
                "finite denominators >= 0 in every batch",
                f"{int(bad_den)} batch(es) with a negative, NaN or infinite denominator",
                "The denominator is what a batch's mean divides by; pass the LossParts of "
                "return_parts=True, or `(loss_sum, number_of_elements)`.",
            )
        if bad_total:
            _warn_nonfinite("LossMeter.compute", f"{int(bad_total)} batch(es) had a NaN or infinite total")
        if updates == 0:
            V.warn_once(
                "meter-empty",
                "LossMeter.compute: no batch was added since the last reset(), so the "
                "average is nan. Call meter.update(parts) (or meter(criterion, input, "
                "target)) for every batch.",
            )
        if den == 0:
            return math.nan
        return total / den

    def _reduced(self, sync: bool):
        if self._total is None:
            local = torch.zeros(5, dtype=torch.float64)
        else:
            dev = self._total.device
            flags = self._flags if self._flags is not None else torch.zeros(2, dtype=torch.float64, device=dev)
            local = torch.cat(
                [
                    torch.stack(
                        [
                            self._total,
                            self._denominator,
                            torch.tensor(float(self.updates), dtype=torch.float64, device=dev),
                        ]
                    ),
                    flags,
                ]
            )
        if sync and distributed_ready():
            local = all_reduce_sum(local, self.process_group)
        total, den, updates, bad_den, bad_total = (float(v) for v in local.cpu())
        return total, den, int(updates), bad_den, bad_total

    def __repr__(self) -> str:
        return f"LossMeter(total={self.total!r}, denominator={self.denominator!r}, updates={self.updates})"


def _on_host(t: torch.Tensor) -> bool:
    """Reading ``t`` costs no device synchronisation."""
    return t.device.type == "cpu"


def _warn_nonfinite(func: str, what: str) -> None:
    V.warn_once(
        "meter-nonfinite",
        f"{func}: {what}, so the average is nan or inf from here on. Usual causes: a "
        "NaN/inf in the inputs or logits, a diverged model (learning rate too high), "
        "or log(0) in a hand-written loss; `torch.isfinite(logits).all()` per batch "
        "or torch.autograd.set_detect_anomaly(True) finds the batch.",
    )
