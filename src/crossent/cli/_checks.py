"""Argument checks shared by the subcommands: run before any work, fail in one line.
Design notes: ``docs/design.md``, section ``crossent.cli._checks``.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Optional, Sequence

DEVICE_SPEC = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


class UsageError(Exception):
    """A user mistake in the command line: one line, exit status 2."""


def at_least(option: str, value: Optional[int], low: int = 1) -> None:
    if value is not None and value < low:
        raise UsageError(f"expected {option} >= {low}, but got {value}.")


def check_device(option: str, spec: str, allowed: Sequence[str] = ("cpu", "cuda", "mps")) -> None:
    """``spec`` names a device type in ``allowed`` that this machine has (``cuda:N``: N exists)."""
    kinds = ", ".join(f"{k}[:N]" if k != "cpu" else k for k in allowed)
    m = DEVICE_SPEC.match(spec)
    if m is None or m.group(1) not in allowed:
        raise UsageError(f"expected {option} to be one of {kinds}, but got {spec!r}.")
    import torch

    kind, index = m.group(1), int(m.group(2)[1:]) if m.group(2) else 0
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"expected a CUDA device for {option} {spec}, but torch sees none. Use --device cpu.")
        if index >= count:
            raise UsageError(f"expected {option} cuda:0 to cuda:{count - 1}, but got {spec!r}.")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"expected an MPS device for {option} {spec}, but torch sees none. Use --device cpu.")


def probe_writable(directory: str) -> None:
    """Create ``directory`` (and parents) and write and delete a file in it, or raise UsageError."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(
            f"expected --out to be a folder, but {directory} is an existing file. "
            "Pass a folder path (it is created if missing)."
        )
    probe = os.path.join(directory, f".crossent-probe-{secrets.token_hex(4)}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"expected --out to be a folder this user can write, but {directory} is "
            f"not ({exc.strerror or exc}). Pass another --out."
        ) from None


def refuse_overwrite(directory: str, names: Sequence[str], force: bool) -> None:
    """Without ``--force``, refuse a folder that already holds any of ``names``."""
    if force or not os.path.isdir(directory):
        return
    there = [n for n in names if os.path.lexists(os.path.join(directory, n))]
    if there:
        raise UsageError(
            f"expected --out to hold no earlier results, but {directory} has "
            f"{', '.join(there)}. Pass --force to replace them, or another --out."
        )


def new_run_dir(parent: str) -> str:
    """Claim the next free ``parent/run-NNN`` (``os.mkdir`` is atomic: two runs never share one)."""
    probe_writable(parent)
    taken = [int(n[4:]) for n in os.listdir(parent) if re.fullmatch(r"run-\d{3,}", n)]
    k = max(taken, default=0) + 1
    while True:
        path = os.path.join(parent, f"run-{k:03d}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            k += 1
        except OSError as exc:
            raise UsageError(
                f"expected to create {path}, but could not ({exc.strerror or exc}). Pass another --out."
            ) from None
