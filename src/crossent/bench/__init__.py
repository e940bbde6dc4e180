"""`crossent bench`: a timing harness plus named presets.
Design notes: ``docs/design.md``, section ``crossent.bench``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import linear as _linear  # noqa: F401  (registers the linear-ce and linear-bce presets)
from .presets import DESCRIPTIONS, PRESETS, Case, register_preset

__all__ = ["Case", "DESCRIPTIONS", "PRESETS", "register_preset", "run"]


def run(
    presets: Optional[Sequence[str]] = None,
    *,
    size: str = "full",
    modes: Sequence[str] = ("full",),
    repeats: int = 7,
    device: str = "cpu",
    compile: bool = True,
    memory: bool = True,
    min_sample_s: float = 0.02,
    log: Callable[[str], None] = print,
) -> Tuple[list, Dict[str, str], Dict[str, float]]:
    """Run the presets; returns ``(results, provenance, machine_limits)``."""
    from . import harness, machine
    from .memory import measure_in_child

    dev = torch.device(device)
    names = list(PRESETS) if not presets else list(presets)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        from .._validation import fail

        fail("crossent bench", f"presets among {sorted(PRESETS)}", repr(unknown), "Check --preset.")
    prov = machine.provenance(dev)
    prov["size"] = size
    limits = machine.measure_limits(dev, elements=1 << (20 if size == "smoke" else 23))
    results: List[harness.Result] = []
    for name in names:
        log(f"preset {name}: {DESCRIPTIONS.get(name, '')}")
        for index, case in enumerate(PRESETS[name](size, dev)):
            variants = [v for v in case.variants if compile or not v.startswith("torch.compile")]
            case_results = harness.time_case(
                case, dev, modes=modes, repeats=repeats, min_sample_s=min_sample_s, variants=variants, log=log
            )
            mem: Dict[str, Optional[int]] = {}
            if memory:
                try:
                    mem = measure_in_child(name, index, size, device, variants)
                except Exception as exc:  # report, never hide: the column stays empty
                    log(f"    {case.name}: memory measurement failed: {exc}")
            for r in case_results:
                r.preset = name
                if r.mode == "full":
                    r.peak_extra_bytes = mem.get(r.variant)
                    r.limit_fraction = harness.limit_fraction(case, r.timing.median_ms, limits)
            harness.add_ratios(case_results)
            for r in case_results:
                log(
                    f"    {r.case:28s} {r.mode:8s} {r.variant:26s} {r.timing.median_ms:10.3f} ms"
                    + (f"  x{r.extra['vs_eager']:.2f} eager" if "vs_eager" in r.extra else "")
                    + (f"  x{r.extra['vs_compile']:.2f} compile" if "vs_compile" in r.extra else "")
                )
            results.extend(case_results)
    return results, prov, limits
