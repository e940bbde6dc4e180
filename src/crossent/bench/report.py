"""Markdown and CSV output of a `crossent bench` run (provenance in the header and in every CSV row)."""

from __future__ import annotations

import csv
import io
from typing import Dict, List, Optional

from .harness import Result

COLUMNS = [
    "preset",
    "case",
    "mode",
    "variant",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",
    "calls_per_sample",
    "vs_eager",
    "vs_compile",
    "compile_s",
    "peak_extra_mib",
    "limit_fraction",
]


def _fmt(v: Optional[float], spec: str) -> str:
    return "" if v is None else format(v, spec)


def rows(results: List[Result]) -> List[Dict[str, str]]:
    out = []
    for r in results:
        out.append(
            {
                "preset": r.preset,
                "case": r.case,
                "mode": r.mode,
                "variant": r.variant,
                "median_ms": _fmt(r.timing.median_ms, ".4g"),
                "p20_ms": _fmt(r.timing.p20_ms, ".4g"),
                "p80_ms": _fmt(r.timing.p80_ms, ".4g"),
                "samples": str(r.timing.samples),
                "calls_per_sample": str(r.timing.number),
                "vs_eager": _fmt(r.extra.get("vs_eager"), ".2f"),
                "vs_compile": _fmt(r.extra.get("vs_compile"), ".2f"),
                "compile_s": _fmt(r.compile_s, ".1f"),
                "peak_extra_mib": _fmt(None if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**20, ".1f"),
                "limit_fraction": _fmt(r.limit_fraction, ".2f"),
            }
        )
    return out


def to_csv(results: List[Result], provenance: Dict[str, str]) -> str:
    buf = io.StringIO()
    keys = list(provenance)
    w = csv.DictWriter(buf, fieldnames=COLUMNS + keys, lineterminator="\n")
    w.writeheader()
    for row in rows(results):
        w.writerow({**row, **provenance})
    return buf.getvalue()


def to_markdown(results: List[Result], provenance: Dict[str, str], limits: Dict[str, float]) -> str:
    lines = ["# crossent bench", ""]
    lines.append(" | ".join(f"{k}: {v}" for k, v in provenance.items()))
    lines.append("")
    if limits:
        lines.append(
            "Machine limits (same run): copy {:.1f} GB/s, exp {:.2f}e9/s, log1p {:.2f}e9/s (eager torch, all threads).".format(
                limits["copy_bytes_per_s"] / 1e9, limits["exp_per_s"] / 1e9, limits["log1p_per_s"] / 1e9
            )
        )
        lines.append("")
    lines.append(
        "Times per call in ms: median [p20, p80] of interleaved repeats. `vs eager` / `vs compile`: "
        "baseline median / this median (>1 = faster). `compile s`: first call of torch.compile, "
        "excluded from the steady state. `peak extra`: MiB beyond the inputs during one "
        "forward+backward, gradient included (see crossent.bench.memory). `limit`: lower-bound time "
        "(memory traffic at copy bandwidth, exp/log1p at eager torch's rate) / median."
    )
    lines.append("")
    header = [
        "preset",
        "case",
        "mode",
        "variant",
        "median ms",
        "[p20, p80]",
        "vs eager",
        "vs compile",
        "compile s",
        "peak extra MiB",
        "limit",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows(results):
        lines.append(
            "| "
            + " | ".join(
                [
                    r["preset"],
                    r["case"],
                    r["mode"],
                    r["variant"],
                    r["median_ms"],
                    f"[{r['p20_ms']}, {r['p80_ms']}]",
                    r["vs_eager"],
                    r["vs_compile"],
                    r["compile_s"],
                    r["peak_extra_mib"],
                    r["limit_fraction"],
                ]
            )
            + " |"
        )
    lines.append("")
    return "\n".join(lines)
