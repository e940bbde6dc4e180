"""Timing harness: interleaved repeats, medians with p20/p80, compile time apart.
Design notes: ``docs/design.md``, section ``crossent.bench.harness``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .presets import Case

MODES = ("forward", "backward", "full")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    number: int


@dataclass
class Result:
    preset: str
    case: str
    mode: str
    variant: str
    timing: Timing
    compile_s: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    elements: int = 0
    limit_fraction: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Layer(torch.autograd.Function):
    """Stand-in for the layer that produced the logits (an LM head's matmul), minus its cost.

    Forward: a fresh copy of ``src`` (made outside the timer) that requires grad and is not
    a leaf, as real logits are. Backward: takes the logits' gradient, as the layer's
    backward would, and reports a zero gradient for the 1-element ``anchor``: it neither
    copies nor accumulates the (N, C) gradient, so what is timed and measured is the
    loss's own work and memory.
    """

    @staticmethod
    def forward(ctx, src, anchor):
        return src.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, torch.zeros(1, dtype=grad.dtype, device=grad.device)


def _prepare(case: Case, inputs: Dict) -> Dict:
    x0 = inputs[case.grad_input]
    if case.fresh_input:
        anchor = inputs.setdefault("_anchor", torch.zeros(1, device=x0.device, requires_grad=True))
        anchor.grad = None
        return {**inputs, case.grad_input: _Layer.apply(x0.detach(), anchor)}
    x0.grad = None
    return inputs


def timed_call(fn, case: Case, inputs: Dict, mode: str, device: torch.device) -> float:
    """Seconds spent in the timed part of one call of ``fn`` in ``mode``."""
    d = _prepare(case, inputs)
    _sync(device)
    if mode == "backward":
        loss = fn(d)
        _sync(device)
        t0 = time.perf_counter()
        loss.backward()
        _sync(device)
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = fn(d)
    if mode == "full":
        loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - t0
    del loss, d
    return elapsed


def _quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_case(
    case: Case,
    device: torch.device,
    modes=("full",),
    repeats: int = 7,
    min_sample_s: float = 0.02,
    variants: Optional[List[str]] = None,
    log=print,
) -> List[Result]:
    """Time every variant of ``case`` in every mode (see ``docs/design.md``)."""
    inputs = case.make(device)
    names = [v for v in case.variants if variants is None or v in variants]
    compile_s: Dict[str, Optional[float]] = {}
    per_call: Dict[str, float] = {}
    for name in names:
        fn = case.variants[name]
        first = timed_call(fn, case, inputs, "full", device)
        compile_s[name] = first if name.startswith("torch.compile") else None
        per_call[name] = timed_call(fn, case, inputs, "full", device)
        if compile_s[name] is not None:
            log(f"    {case.name}: {name} compiled in {first:.1f} s")
    number = {n: max(1, math.ceil(min_sample_s / max(per_call[n], 1e-7))) for n in names}
    results: List[Result] = []
    for mode in modes:
        samples: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                fn = case.variants[n]
                total = 0.0
                for _ in range(number[n]):
                    total += timed_call(fn, case, inputs, mode, device)
                samples[n].append(total / number[n])
            gc.collect()
        for n in names:
            s = samples[n]
            results.append(
                Result(
                    preset="",
                    case=case.name,
                    mode=mode,
                    variant=n,
                    timing=Timing(
                        statistics.median(s) * 1e3, _quantile(s, 0.2) * 1e3, _quantile(s, 0.8) * 1e3, len(s), number[n]
                    ),
                    compile_s=compile_s[n],
                    elements=case.elements,
                )
            )
    inputs[case.grad_input].grad = None
    inputs.pop("_anchor", None)
    return results


def add_ratios(results: List[Result]) -> Dict[tuple, Dict[str, float]]:
    """Speedups against 'torch eager' and 'torch.compile' of the same case and mode.

    Returns {(case, mode, variant): {"vs_eager": x, "vs_compile": y}} where x > 1 means
    the variant is faster (baseline median / variant median).
    """
    base: Dict[tuple, float] = {}
    for r in results:
        if r.variant in ("torch eager", "torch.compile"):
            base[(r.case, r.mode, r.variant)] = r.timing.median_ms
    ratios = {}
    for r in results:
        out = {}
        for key, name in (("vs_eager", "torch eager"), ("vs_compile", "torch.compile")):
            b = base.get((r.case, r.mode, name))
            if b is not None and r.timing.median_ms > 0:
                out[key] = b / r.timing.median_ms
        ratios[(r.case, r.mode, r.variant)] = out
        r.extra.update(out)
    return ratios


def limit_fraction(case: Case, median_ms: float, limits: Dict[str, float]) -> Optional[float]:
    """Lower-bound time of forward+backward on this machine / measured time.

    The lower bound is the larger of (a) the case's least memory traffic at the measured
    copy bandwidth and (b) its exp/log1p count at eager torch's measured throughput.
    """
    if not case.elements or not limits or median_ms <= 0:
        return None
    mem_s = case.elements * case.bytes_per_element / limits["copy_bytes_per_s"]
    math_s = sum(
        n * case.elements / limits[f"{f}_per_s"] for f, n in case.transcendentals.items() if f"{f}_per_s" in limits
    )
    return max(mem_s, math_s) / (median_ms / 1e3)
