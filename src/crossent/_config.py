"""Every environment variable crossent reads, read here and nowhere else.
Design notes: ``docs/design.md``, section ``crossent._config``.
"""

from __future__ import annotations

import os
import re
from typing import Dict

#: Every variable read by crossent, with what it does (the table of ``docs/configuration.md``).
VARIABLES: Dict[str, str] = {
    "CROSSENT_VALIDATE": "`0`/`false`/`no`/`off` switches the value checks off for calls "
    "that do not pass `validate=`; default on",
    "CROSSENT_BACKEND": "a backend name (`reference`, `chunked`, `chunked-torch`, `triton`) "
    "used by calls with `backend=None`; `auto` or unset: automatic choice",
    "CROSSENT_CPU_KERNEL": "`0`/`false`/`no`/`off` disables the compiled CPU kernel "
    "(the chunked torch ops run instead); default on",
    "CROSSENT_CACHE_DIR": "where the compiled CPU kernel is cached (`<dir>/kernels`); default `~/.cache/crossent`",
    "CROSSENT_BUILD_TIMEOUT": "seconds the C compiler may run (default 120)",
    "CC": "the C compiler command for the CPU kernel; default the first of cc, gcc, clang",
    "CROSSENT_LINEAR_BUDGET": "bytes of temporary memory for the fused linear losses (e.g. `256MiB`, the default)",
    "THP_MEM_ALLOC_ENABLE": "torch's transparent-huge-pages switch; `crossent bench` records "
    "it in its provenance and sets it with `--thp`",
}

#: Values (case-insensitive, surrounding blanks ignored) that switch a flag off.
FALSE_WORDS = ("0", "false", "no", "off")

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmg])(?:ib)?)?\s*", re.IGNORECASE)


def env_flag(name: str, default: bool = True) -> bool:
    """``False`` when ``$name`` is one of :data:`FALSE_WORDS`, ``default`` when it is unset
    or empty, ``True`` otherwise.

    >>> import os; os.environ["CROSSENT_EXAMPLE"] = " Off "
    >>> env_flag("CROSSENT_EXAMPLE")
    False
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip().lower() not in FALSE_WORDS


def env_bytes(name: str, default: int) -> int:
    """A positive byte count from ``$name`` (``default`` when unset or empty).

    Accepted: a whole number of bytes, or one followed by ``K``, ``M``, ``G``, ``KiB``,
    ``MiB`` or ``GiB`` (case-insensitive, powers of 1024: ``256MiB`` = 268435456).
    Anything else, and 0, raises :class:`crossent.CrossentValueError` naming the variable.

    >>> import os; os.environ["CROSSENT_EXAMPLE"] = "256MiB"
    >>> env_bytes("CROSSENT_EXAMPLE", 1)
    268435456
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    match = _SIZE.fullmatch(raw)
    value = int(match.group(1)) * _UNITS[(match.group(2) or "").lower()] if match else 0
    if value <= 0:
        from ._validation import fail

        fail(
            name,
            "a positive number of bytes, optionally with a suffix K, M, G, KiB, MiB or GiB "
            "(powers of 1024), e.g. 268435456 or 256MiB",
            repr(raw),
            f"Set {name} to such a value, or unset it for the default ({default} bytes).",
        )
    return value


def raw(name: str) -> str:
    """``$name`` with surrounding blanks removed; ``""`` when unset."""
    return os.environ.get(name, "").strip()


def validate_default() -> bool:
    """Whether value checks run for a call that passes no ``validate=`` (``CROSSENT_VALIDATE``)."""
    return env_flag("CROSSENT_VALIDATE")


def forced_backend() -> str:
    """``$CROSSENT_BACKEND``: the backend for ``backend=None`` calls; ``""`` when unset."""
    return raw("CROSSENT_BACKEND")


def cpu_kernel_enabled() -> bool:
    """Whether the compiled CPU kernel may be used (``CROSSENT_CPU_KERNEL``)."""
    return env_flag("CROSSENT_CPU_KERNEL")


def cache_dir() -> str:
    """``$CROSSENT_CACHE_DIR``; ``""`` when unset (the default cache directory)."""
    return raw("CROSSENT_CACHE_DIR")


def c_compiler() -> str:
    """``$CC``, the compiler command line for the CPU kernel; ``""`` when unset."""
    return raw("CC")


def build_timeout(default: float) -> float:
    """``$CROSSENT_BUILD_TIMEOUT`` seconds (a positive number), ``default`` when unset.

    >>> import os; os.environ["CROSSENT_BUILD_TIMEOUT"] = "30"
    >>> build_timeout(120.0)
    30.0
    >>> del os.environ["CROSSENT_BUILD_TIMEOUT"]
    """
    text = raw("CROSSENT_BUILD_TIMEOUT")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(
            f"CROSSENT_BUILD_TIMEOUT: expected a positive number of seconds, but got {text!r}. "
            f"Set it to e.g. 300, or unset it for the default ({default:g} s)."
        )
    return value


def linear_budget(default: int) -> int:
    """``$CROSSENT_LINEAR_BUDGET`` bytes (:func:`env_bytes`), ``default`` when unset."""
    return env_bytes("CROSSENT_LINEAR_BUDGET", default)


def thp_setting() -> str:
    """``$THP_MEM_ALLOC_ENABLE`` as set (torch's switch), ``""`` when unset."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "")
