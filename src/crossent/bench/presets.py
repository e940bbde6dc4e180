"""Named benchmark presets: what `crossent bench` measures.
Design notes: ``docs/design.md``, section ``crossent.bench.presets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

Inputs = Dict[str, Any]


@dataclass
class Case:
    """One benchmark shape.

    Attributes:
        name: short label, e.g. ``"ce 8192x32000 fp32"``.
        make: builds the inputs on a device: a dict of tensors. ``inputs[grad_input]`` is a
            leaf with ``requires_grad=True``.
        variants: name -> ``fn(inputs) -> scalar loss``. The names ``"torch eager"`` and
            ``"torch.compile"`` are the baselines of the ratios; a variant whose name starts
            with ``"torch.compile"`` is compiled (first call timed separately).
        grad_input: the input the gradient is taken for.
        fresh_input: hand each call fresh logits: a non-leaf copy of the grad input made
            outside the timer by a stand-in layer whose backward consumes the gradient
            without copying it (``harness._Layer``), like an LM head's output; needed by
            in-place variants, applied to every variant of the case alike.
        elements: number of loss elements (logits) for throughput.
        bytes_per_element: the least memory traffic of forward+backward per element
            (read inputs, write the gradient), for the machine-limit fraction.
        transcendentals: per element, e.g. ``{"exp": 1, "log1p": 1}``.
    """

    name: str
    make: Callable[[torch.device], Inputs]
    variants: Dict[str, Callable[[Inputs], torch.Tensor]]
    grad_input: str = "x"
    fresh_input: bool = False
    elements: int = 0
    bytes_per_element: float = 0.0
    transcendentals: Dict[str, float] = field(default_factory=dict)


PresetFn = Callable[[str, torch.device], List[Case]]
PRESETS: Dict[str, PresetFn] = {}
DESCRIPTIONS: Dict[str, str] = {}


def register_preset(name: str, description: str = "") -> Callable[[PresetFn], PresetFn]:
    """Decorator: register ``fn(size, device) -> list[Case]`` as preset ``name``."""

    def deco(fn: PresetFn) -> PresetFn:
        PRESETS[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def _pick(size: str, smoke, medium, full):
    return {"smoke": smoke, "medium": medium, "full": full}[size]


def _compiled(fn: Callable) -> Callable:
    """torch.compile(fn), created on the first call (importing dynamo costs seconds)."""
    compiled: List[Callable] = []

    def call(d):
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](d)

    return call


def _crossent():
    import crossent

    return crossent


# ------------------------------------------------------------------------ variants
def _ce_variants(extra: Optional[Dict[str, Any]] = None, inplace: bool = False):
    extra = extra or {}
    ce = _crossent().cross_entropy

    def eager(d):
        return F.cross_entropy(d["x"], d["y"], **extra)

    v = {
        "torch eager": eager,
        "torch.compile": _compiled(eager),
        "crossent": lambda d: ce(d["x"], d["y"], validate=False, **extra),
    }
    if inplace:
        v["crossent inplace"] = lambda d: ce(d["x"], d["y"], validate=False, inplace_backward=True, **extra)
    return v


def _bce_logits_variants(pos_weight: bool):
    bce = _crossent().binary_cross_entropy_with_logits

    def eager(d):
        return F.binary_cross_entropy_with_logits(d["x"], d["t"], pos_weight=d.get("pw"))

    return {
        "torch eager": eager,
        "torch.compile": _compiled(eager),
        "crossent": lambda d: bce(d["x"], d["t"], pos_weight=d.get("pw"), validate=False),
    }


def _bce_probs_variants():
    bce = _crossent().binary_cross_entropy

    def eager(d):
        return F.binary_cross_entropy(torch.sigmoid(d["x"]), d["t"])

    return {
        "torch eager": eager,
        "torch.compile": _compiled(eager),
        "crossent": lambda d: bce(torch.sigmoid(d["x"]), d["t"], validate=False),
    }


def _logits(shape, device, scale=2.0):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * scale).to(device).requires_grad_()


def _ce_case(name, M, C, device_shape=None, inplace=False, extra=None):
    shape = device_shape or (M, C)

    def make(device):
        g = torch.Generator().manual_seed(1)
        tshape = (shape[0],) + tuple(shape[2:])
        return {"x": _logits(shape, device), "y": torch.randint(0, shape[1], tshape, generator=g).to(device)}

    n = 1
    for s in shape:
        n *= s
    return Case(
        name=name,
        make=make,
        variants=_ce_variants(extra, inplace),
        fresh_input=inplace,
        elements=n,
        bytes_per_element=8.0,
        transcendentals={"exp": 1.0},
    )


# ------------------------------------------------------------------------- presets
@register_preset("small", "small classifier: cross-entropy (N, C) with few classes, many calls")
def small(size, device):
    M, C = _pick(size, (64, 10), (512, 100), (512, 100))
    return [_ce_case(f"ce {M}x{C}", M, C)]


@register_preset("segmentation", "segmentation-like cross-entropy on (N, C, H, W) logits")
def segmentation(size, device):
    shape = _pick(size, (2, 5, 8, 8), (4, 21, 64, 64), (8, 21, 128, 128))
    return [_ce_case("ce " + "x".join(map(str, shape)) + " (N,C,H,W)", shape[0], shape[1], device_shape=shape)]


@register_preset("multilabel", "16M-element multi-label BCE-with-logits (plain, pos_weight) and sigmoid+BCE")
def multilabel(size, device):
    R, L = _pick(size, (64, 64), (1024, 2048), (4096, 4096))

    def make(device, pw=False):
        g = torch.Generator().manual_seed(2)
        d = {"x": _logits((R, L), device), "t": (torch.rand((R, L), generator=g) < 0.1).float().to(device)}
        if pw:
            d["pw"] = (torch.rand(L, generator=g) * 5 + 0.5).to(device)
        return d

    n = R * L
    tag = f"{n / 2**20:.0f}M" if n >= 2**20 else f"{n}"
    common = dict(elements=n, bytes_per_element=12.0, transcendentals={"exp": 1.0, "log1p": 1.0})
    return [
        Case(f"bce-logits {tag}", lambda d: make(d), _bce_logits_variants(False), **common),
        Case(f"bce-logits {tag} pos_weight", lambda d: make(d, True), _bce_logits_variants(True), **common),
        Case(
            f"sigmoid+bce {tag}",
            lambda d: make(d),
            _bce_probs_variants(),
            elements=n,
            bytes_per_element=12.0,
            transcendentals={"exp": 1.0, "log1p": 2.0},
        ),
    ]


@register_preset("lm-head", "LM-head cross-entropy 8192x32000 and 4096x128256, with the in-place mode")
def lm_head(size, device):
    shapes = _pick(size, [(16, 100)], [(1024, 32000), (256, 128256)], [(8192, 32000), (4096, 128256)])
    cases = [_ce_case(f"ce {M}x{C}", M, C, inplace=True) for M, C in shapes]
    liger = _liger_cross_entropy(device)
    for case in cases:
        if liger is not None:  # overwrites the logits with the gradient, like crossent inplace
            case.variants["liger-kernel"] = lambda d: liger(d["x"], d["y"])
    return cases


def _liger_cross_entropy(device):
    """Liger Kernel's cross-entropy on CUDA when `liger-kernel` is installed, else None."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss()


@register_preset("validation", "cost of validate=True (value checks) against validate=False")
def validation(size, device):
    shapes = _pick(size, [(16, 10), (64, 100)], [(512, 100), (1024, 32000)], [(512, 100), (8192, 32000)])
    ce = _crossent().cross_entropy
    cases = []
    for M, C in shapes:
        base = _ce_case(f"ce {M}x{C}", M, C)
        base.variants = {
            "torch eager": base.variants["torch eager"],
            "crossent validate=False": lambda d: ce(d["x"], d["y"], validate=False),
            "crossent validate=True": lambda d: ce(d["x"], d["y"], validate=True),
        }
        cases.append(base)
    return cases
