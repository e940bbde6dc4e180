"""The two parsers of crossent's environment variables: on/off switches and byte sizes.

One parser per kind, so every ``CROSSENT_*`` switch accepts the same words and every size
the same suffixes. Both read the variable when called (a dictionary lookup), so a change at
run time takes effect on the next call; neither runs at import.
"""

from __future__ import annotations

import os
import re

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

        fail(name, "a positive number of bytes, optionally with a suffix K, M, G, KiB, MiB or GiB "
                   "(powers of 1024), e.g. 268435456 or 256MiB", repr(raw),
             f"Set {name} to such a value, or unset it for the default ({default} bytes).")
    return value
