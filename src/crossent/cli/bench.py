"""``crossent bench``: crossent against torch eager and torch.compile, side by side.
Design notes: ``docs/design.md``, section ``crossent.cli.bench``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--preset", action="append", default=None, help="preset to run (repeatable; default: all). `--list` shows them."
    )
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, 3 repeats, no torch.compile, no memory child: seconds"
    )
    parser.add_argument(
        "--size",
        choices=["smoke", "medium", "full"],
        default=None,
        help="shape set (default full; --smoke implies smoke)",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=["forward", "backward", "full"],
        default=None,
        help="what is timed (repeatable; default: full = forward+backward)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; smoke 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--compile", action="store_true", help="keep torch.compile even with --smoke")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--thp",
        choices=["inherit", "on", "off", "both"],
        default="inherit",
        help="THP_MEM_ALLOC_ENABLE for the run (read by torch at start-up, so on/off/both "
        "re-run the benchmark in child processes); inherit = as in the environment",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="directory for bench.md and bench.csv (created if missing); one that "
        "already holds them is refused unless --force",
    )
    parser.add_argument("--force", action="store_true", help="replace bench.md and bench.csv already in --out")


OUTPUTS = ("bench.md", "bench.csv")


def _check(args, out: Path | None) -> None:
    """Every argument that can be wrong, before any work (see crossent.cli._checks)."""
    from crossent.bench import PRESETS

    from ._checks import UsageError, at_least, check_device, probe_writable, refuse_overwrite

    at_least("--repeats", args.repeats)
    at_least("--threads", args.threads)
    unknown = [p for p in args.preset or [] if p not in PRESETS]
    if unknown:
        raise UsageError(
            f"expected --preset among {', '.join(PRESETS)}, but got "
            f"{', '.join(map(repr, unknown))}. `crossent bench --list` describes them."
        )
    check_device("--device", args.device, allowed=("cpu", "cuda"))
    if out is not None:
        dirs = [out / f"thp-{v}" for v in ("off", "on")] if args.thp == "both" else [out]
        for d in dirs:
            refuse_overwrite(str(d), OUTPUTS, args.force)
        for d in dirs:
            probe_writable(str(d))


def _rerun_with_thp(args, value: str, out: Path | None) -> int:
    # Rebuild the command from args rather than from sys.argv (tests call main(argv)).
    cmd = [sys.executable, "-m", "crossent", "bench", "--thp", "inherit"]
    for p in args.preset or []:
        cmd += ["--preset", p]
    for m in args.mode or []:
        cmd += ["--mode", m]
    for flag in ("smoke", "no_compile", "compile", "no_memory", "force"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    for opt in ("size", "repeats", "device", "threads"):
        if getattr(args, opt) is not None:
            cmd += ["--" + opt, str(getattr(args, opt))]
    if out is not None:
        cmd += ["--out", str(out)]
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if value == "on" else "0")
    return subprocess.call(cmd, env=env)


def run(args) -> int:
    from crossent.bench import DESCRIPTIONS

    if args.list:
        for name, text in DESCRIPTIONS.items():
            print(f"{name:14s} {text}")
        return 0
    out = Path(args.out) if args.out else None
    _check(args, out)
    if args.thp != "inherit":
        values = ["off", "on"] if args.thp == "both" else [args.thp]
        rc = 0
        for v in values:
            print(f"== THP_MEM_ALLOC_ENABLE={'1' if v == 'on' else '0'} ==", flush=True)
            sub = None if out is None else (out / f"thp-{v}" if args.thp == "both" else out)
            rc = rc or _rerun_with_thp(args, v, sub)
        return rc

    import torch

    from crossent.bench import report, run as run_bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = args.size or ("smoke" if args.smoke else "full")
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 7)
    compile_ = (not args.no_compile) and (args.compile or not args.smoke)
    memory = not args.no_memory and not args.smoke
    results, prov, limits = run_bench(
        args.preset,
        size=size,
        modes=tuple(args.mode or ["full"]),
        repeats=repeats,
        device=args.device,
        compile=compile_,
        memory=memory,
        min_sample_s=0.002 if args.smoke else 0.02,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    md = report.to_markdown(results, prov, limits)
    print(md)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(md)
        (out / "bench.csv").write_text(report.to_csv(results, prov))
        print(f"wrote {out / 'bench.md'} and {out / 'bench.csv'}", file=sys.stderr)
    return 0
