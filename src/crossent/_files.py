"""Files replaced atomically: write a temporary file next to the target, fsync, rename.
Design notes: ``docs/design.md``, section ``crossent._files``.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Union

__all__ = ["atomic_write_bytes", "atomic_write_text"]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same directory, fsync, rename).

    The directory must exist. On any error the temporary file is removed and ``path`` keeps
    its previous content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _create_temp(directory, os.path.basename(path))
    except OSError as exc:  # name the user's path, not the hidden temporary file
        why = exc.strerror or str(exc)
        if isinstance(exc, FileNotFoundError):
            why += f" (the folder {directory} does not exist; create it first)"
        raise type(exc)(exc.errno, why, path) from None
    try:
        try:  # keep the mode of the file we replace
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _create_temp(directory: str, name: str):
    """A new hidden temp file next to the target, created with mode 0o666 minus the umask.

    (``tempfile.mkstemp`` would create it 0o600, and ``os.replace`` would hand that mode
    to the target: a history file that only its owner can read.)
    """
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"atomic_write: could not create a temporary file in {directory}")


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
