r"""Optional compiled CPU kernels for the fused backend (C, AVX2 intrinsics, OpenMP).
Design notes: ``docs/design.md``, section ``crossent.backends.chunked_cpp``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import _config
from ..errors import KernelCacheWarning, fail

_SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c99"]

#: Seconds the compiler may run (``CROSSENT_BUILD_TIMEOUT`` overrides); a normal build takes 1-2 s.
BUILD_TIMEOUT_S = 120.0
#: A ``build-*`` directory older than this is the debris of a killed build and is removed.
_STALE_BUILD_S = 600.0

_lock = threading.Lock()
_lib = None
_error: Optional[str] = None
_tried = False
_path: Optional[Path] = None  # the library that was loaded
_cache_note: Optional[str] = None  # why the private temporary directory is used, if it is


@functools.lru_cache(maxsize=None)
def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


@functools.lru_cache(maxsize=None)
def _compiler() -> Tuple[Optional[Tuple[str, ...]], Optional[str]]:
    """(compiler command, None) or (None, why there is none); looked up once per process."""
    raw = _config.c_compiler()
    if raw:
        try:
            argv = shlex.split(raw)
        except ValueError as exc:
            return None, f"CC={raw!r} is not a valid command line ({exc}); fix CC or unset it"
        exe = shutil.which(argv[0])
        if exe is None:
            return None, (
                f"CC={raw!r}: {argv[0]!r} is not an executable file or on PATH; "
                "fix CC, or unset it to use cc, gcc or clang"
            )
        return (exe, *argv[1:]), None
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe is not None:
            return (exe,), None
    return None, "no C compiler found (install gcc, or set CC)"


def disabled_reason() -> Optional[str]:
    """Why the compiled kernel cannot be used here, or None."""
    if not _config.cpu_kernel_enabled():
        return f"disabled by CROSSENT_CPU_KERNEL={_config.raw('CROSSENT_CPU_KERNEL')}"
    cap = _cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU capability is {cap}, the kernel needs AVX2"
    why = _compiler()[1]
    return why if why is not None else _error


def get():
    """The kernel module (building it on the first call), or None when unavailable.

    A thread that calls while another thread builds waits for that build and gets its result.
    """
    if not _config.cpu_kernel_enabled():
        return None
    if _lib is not None:
        return _CFunctions
    if _tried:
        return None
    with _lock:
        notes = _first_use() if not _tried else []
    for note in notes:  # outside the lock: a warning turned into an error must not block others
        warnings.warn(note, KernelCacheWarning, stacklevel=2)
    return _CFunctions if _lib is not None else None


def kernel_path() -> Optional[Path]:
    """The library that was loaded, or None."""
    return _path


def cache_note() -> Optional[str]:
    """Why the kernel lives in a private temporary directory for this process, or None."""
    return _cache_note


def _first_use() -> List[str]:
    """Build or load the library once (under ``_lock``); returns the warnings to show."""
    global _lib, _error, _tried, _path
    notes: List[str] = []
    try:
        if disabled_reason() is None:
            kdir = _kernel_dir(notes)
            _lib, _path = _build(kdir, _compiler()[0], notes)
    except Exception as exc:  # compiler error or timeout, missing Sleef symbols, no usable directory...
        _error = f"build failed: {type(exc).__name__}: {exc}"[:2000]
    _tried = True
    return notes


# --------------------------------------------------------------------------- the cache directory
class _Unsafe(Exception):
    """A directory or file that others could have written: never load from it."""


def _kernel_dir(notes: List[str]) -> Path:
    """The ``kernels`` directory, created and checked; decided once per process."""
    global _cache_note
    explicit = _config.cache_dir()
    try:
        root = Path(explicit) if explicit else Path.home() / ".cache" / "crossent"
    except Exception as exc:  # no HOME and no passwd entry for this UID (Path.home raises)
        _cache_note = f"no home directory ({exc}); set CROSSENT_CACHE_DIR to keep the kernel between runs"
        return _private_dir()
    kdir = Path(os.path.abspath(root)) / "kernels"
    try:
        _make_private_dirs(kdir, ours=2)
        return kdir
    except _Unsafe as exc:
        name = "CROSSENT_CACHE_DIR" if explicit else "the default cache directory"
        notes.append(
            f"crossent: not using {kdir} for the compiled CPU kernel ({name}): {exc}. "
            f"The kernel is built into a private temporary directory for this process instead. "
            f"Fix the directory's owner or mode, or set CROSSENT_CACHE_DIR to a directory only you "
            f"can write."
        )
        _cache_note = f"{kdir} refused: {exc}"
    except OSError as exc:
        if explicit:
            notes.append(
                f"crossent: cannot create {kdir} (CROSSENT_CACHE_DIR) for the compiled CPU kernel: "
                f"{exc}. The kernel is built into a private temporary directory for this process "
                f"instead."
            )
        _cache_note = f"cannot create {kdir}: {exc.strerror or exc}"
    return _private_dir()


def _private_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="crossent-kernels-"))
    atexit.register(shutil.rmtree, path, True)
    _make_private_dirs(path, ours=1)  # check it like any other (TMPDIR could be anywhere)
    return path


def _make_private_dirs(path: Path, ours: int) -> None:
    """Create the missing directories of ``path`` 0700, then check every component of its
    real path: the last ``ours`` must be this user's and writable by nobody else, the ones
    above must belong to this user or root and be writable by nobody else unless sticky."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)
    real = Path(os.path.realpath(path))
    uid = os.geteuid()
    for i, p in enumerate([real, *real.parents]):
        st = os.stat(p)
        writable = st.st_mode & 0o022
        if not stat.S_ISDIR(st.st_mode):
            raise _Unsafe(f"{p} is not a directory")
        if i < ours:
            if st.st_uid != uid:
                raise _Unsafe(f"{p} belongs to uid {st.st_uid}, not to this user (uid {uid})")
            if writable:
                raise _Unsafe(f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        else:
            if st.st_uid not in (uid, 0):
                raise _Unsafe(f"its parent {p} belongs to uid {st.st_uid}, neither this user nor root")
            if writable and not st.st_mode & stat.S_ISVTX:
                raise _Unsafe(
                    f"its parent {p} is writable by group or others and not sticky (mode {stat.S_IMODE(st.st_mode):o})"
                )


# --------------------------------------------------------------------------- build and load
def _build(kdir: Path, cc: Tuple[str, ...], notes: List[str]) -> Tuple[ctypes.CDLL, Path]:
    libdir = str(Path(torch.__file__).parent / "lib")
    key = hashlib.sha256("\n".join([_SOURCE, *cc, *_FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    manifest = kdir / f"crossent_cpu_{key}.sha256"
    timeout = _build_timeout()
    with _flock(kdir / ".lock", timeout + 60):
        so, problem = _verified(manifest, kdir, key)
        if so is None:
            if problem is not None:
                notes.append(
                    f"crossent: refusing to load the cached CPU kernel {problem}; it is not loaded and "
                    f"a fresh one is built (a truncated or corrupted file, or one crossent did not "
                    f"build)."
                )
            _remove_stale_builds(kdir)
            cmd = [*cc, *_FLAGS, "kernels.c", "-o", "kernel.so", f"-L{libdir}", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]
            _compile(kdir, key, manifest, cmd, timeout)
            so, problem = _verified(manifest, kdir, key)
            if so is None:
                raise RuntimeError(f"the freshly built kernel failed its check: {problem}")
        lib = ctypes.CDLL(str(so))
    _declare(lib)
    return lib, so


def _build_timeout() -> float:
    return _config.build_timeout(BUILD_TIMEOUT_S)


@contextlib.contextmanager
def _flock(path: Path, wait: float):
    """An exclusive ``flock`` on ``path``, waited for at most ``wait`` seconds. Where the file
    system has no locks the atomic renames alone keep concurrent builders harmless."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held {path} for more than {wait:g} s") from None
                time.sleep(0.05)
            except OSError:  # pragma: no cover - no locking here
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_private(path: Path) -> bytes:
    """The bytes of ``path``, a regular file of this user that nobody else can write; else _Unsafe."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Unsafe(f"{path}: not a regular file")
        if st.st_uid != os.geteuid():
            raise _Unsafe(f"{path}: owned by uid {st.st_uid}, not by this user")
        if st.st_mode & 0o022:
            raise _Unsafe(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def _verified(manifest: Path, kdir: Path, key: str) -> Tuple[Optional[Path], Optional[str]]:
    """(library, None) when the manifest and the library it names pass every check;
    (None, None) when there is nothing to load; (None, what is wrong) otherwise."""
    try:
        digest = _read_private(manifest).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None, None
    except (_Unsafe, OSError) as exc:
        return None, f"manifest {exc}"
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None, f"manifest {manifest}: not a SHA-256 digest"
    so = kdir / f"crossent_cpu_{key}-{digest[:16]}.so"
    try:
        data = _read_private(so)
    except FileNotFoundError:
        return None, None
    except (_Unsafe, OSError) as exc:
        return None, str(exc)
    if hashlib.sha256(data).hexdigest() != digest:
        return None, f"{so}: its SHA-256 differs from the one recorded in {manifest.name} when it was built"
    return so, None


def _remove_stale_builds(kdir: Path) -> None:
    now = time.time()
    for p in kdir.glob("build-*"):
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(p)


def _compile(kdir: Path, key: str, manifest: Path, cmd: List[str], timeout: float) -> None:
    """Run ``cmd`` in a fresh build directory; put the library, then its manifest, in place."""
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=kdir))
    try:
        (tmp / "kernels.c").write_text(_SOURCE)
        _run(cmd, tmp, timeout)
        out = tmp / "kernel.so"
        os.chmod(out, 0o700)
        data = _fsynced(out)
        digest = hashlib.sha256(data).hexdigest()
        so = kdir / f"crossent_cpu_{key}-{digest[:16]}.so"
        os.replace(out, so)
        fd = os.open(tmp / "manifest", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / "manifest", manifest)
        _fsync_dir(kdir)
        for old in kdir.glob(f"crossent_cpu_{key}-*.so"):  # superseded or refused copies
            if old != so:
                with contextlib.suppress(OSError):
                    old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: List[str], cwd: Path, timeout: float) -> None:
    """The compiler in its own process group: on timeout the whole group (wrappers, cc1) dies."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        raise TimeoutError(
            f"the compiler did not finish within {timeout:g} s (CROSSENT_BUILD_TIMEOUT): {shlex.join(cmd)}"
        ) from None
    if proc.returncode != 0:
        text = out.decode(errors="replace")
        raise RuntimeError(f"{shlex.join(cmd)} exited with status {proc.returncode}\n{text[-1500:]}")


def _fsynced(path: Path) -> bytes:
    with open(path, "rb+") as f:
        data = f.read()
        os.fsync(f.fileno())
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _declare(lib: ctypes.CDLL) -> None:
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.crossent_bce.argtypes = [ctypes.c_int, P, P, P, I64, P, P, ctypes.c_float, I64, ctypes.c_int]
    lib.crossent_bce.restype = ctypes.c_double
    lib.crossent_bce_grad.argtypes = [ctypes.c_int, P, P, P, I64, P, ctypes.c_float, I64, ctypes.c_int]
    lib.crossent_bce_grad.restype = None
    lib.crossent_ce_index.argtypes = [P, P, P, P, P, P, P, ctypes.c_float, I64, I64, ctypes.c_int, P, I64]
    lib.crossent_ce_index_grad.argtypes = [P, P, P, P, P, P, ctypes.c_float, I64, I64, ctypes.c_int]
    lib.crossent_ce_index_grad.restype = None
    lib.crossent_ce_index.restype = ctypes.c_int64
    lib.crossent_ce_index_ncs.argtypes = [P, P, P, P, P, P, ctypes.c_float, I64, I64, I64, ctypes.c_int]
    lib.crossent_ce_index_ncs.restype = ctypes.c_int64
    lib.crossent_focal.argtypes = [
        P,
        P,
        P,
        I64,
        P,
        P,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_float,
        I64,
        ctypes.c_int,
    ]
    lib.crossent_focal.restype = ctypes.c_double
    F = ctypes.c_float
    lib.crossent_lm_stats.argtypes = [P, P, P, F, F, P, P, I64, I64, ctypes.c_int]
    lib.crossent_lm_stats.restype = None
    lib.crossent_lm_grad.argtypes = [P, P, P, F, F, P, P, P, I64, I64, ctypes.c_int]
    lib.crossent_lm_grad.restype = None
    lib.crossent_lm_loss_grad.argtypes = [P, P, P, F, F, P, P, P, I64, I64, ctypes.c_int]
    lib.crossent_lm_loss_grad.restype = ctypes.c_int


def _threads(work: int) -> int:
    # Below ~64k elements a parallel region costs more than it saves.
    return 1 if work < (1 << 16) else torch.get_num_threads()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _bad_targets(y, C, bad):
    lo, hi = int(y.min()), int(y.max())
    fail(
        "cross_entropy",
        f"class indices in [0, {C})",
        f"{bad} target(s) outside it (min {lo}, max {hi})",
        "Targets must index the class dimension (validate=False skipped the friendlier check).",
    )


class _CFunctions:
    """The functions of the compiled C library as tensor-level calls (not a backend kernel
    table: that is :class:`crossent.backends.chunked.Kernels`); callers guarantee float32,
    contiguous, CPU."""

    @staticmethod
    def bce_with_logits(x, t, pw, L, want_loss, scale=None):
        return _CFunctions._bce(0, x, t, pw, L, want_loss, scale)

    @staticmethod
    def bce_probs(p, t, pw, L, want_loss, scale=None):
        return _CFunctions._bce(1, p, t, pw, L, want_loss, scale)

    @staticmethod
    def bce_with_logits_into(x, t, pw, L, loss, grad):
        """Per-element BCE-with-logits losses into ``loss`` (may be ``x`` itself: each
        vector is read before it is written) and gradients into ``grad``."""
        _lib.crossent_bce(
            0, _ptr(x), _ptr(t), _ptr(pw), int(L), _ptr(loss), _ptr(grad), 1.0, x.numel(), _threads(x.numel())
        )

    @staticmethod
    def _bce(kind, x, t, pw, L, want_loss, scale=None, want_grad=True):
        grad = torch.empty_like(x) if want_grad else None
        loss = torch.empty_like(x) if want_loss else None
        s = 1.0 if scale is None else float(scale)  # a float32 value: exact as a C float
        total = _lib.crossent_bce(
            kind, _ptr(x), _ptr(t), _ptr(pw), int(L), _ptr(loss), _ptr(grad), s, x.numel(), _threads(x.numel())
        )
        if not want_loss:
            loss = torch.tensor(total, dtype=x.dtype)
        return loss, grad

    @staticmethod
    def _bce_grad(kind, x, t, pw, L, scale=None):
        """The gradient alone (times ``scale``) of ``_bce``: no loss is evaluated."""
        grad = torch.empty_like(x)
        s = 1.0 if scale is None else float(scale)
        _lib.crossent_bce_grad(kind, _ptr(x), _ptr(t), _ptr(pw), int(L), _ptr(grad), s, x.numel(), _threads(x.numel()))
        return grad

    @staticmethod
    def ce_index(x, y, c, grad, scale=None, smooth=None, stats=None):
        """Per-row cross-entropy of ``x`` (M, C); the gradient times ``scale`` into ``grad``
        if given; each row's (max, s) into ``stats`` (M, 2) if given, for :meth:`ce_index_grad`."""
        M, C = x.shape
        loss = torch.empty(M, dtype=x.dtype)
        s = 1.0 if scale is None else float(scale)
        sm = None if smooth is None else smooth.to(torch.float32).contiguous()
        bad = _lib.crossent_ce_index(
            _ptr(x), _ptr(y), _ptr(c), _ptr(sm), _ptr(loss), _ptr(grad), _ptr(stats), s, M, C, _threads(M * C), None, 0
        )
        if bad:
            _bad_targets(y, C, bad)
        return loss

    @staticmethod
    def ce_index_plain(x, y, grad, scale: float, range_rows: int):
        """:meth:`ce_index` without row coefficients (every row counts once), for a caller
        that has a path for targets outside [0, C) (``ignore_index``, errors): None when
        there is one (nothing is computed), else the per-row loss and, for ``range_rows``
        > 0, the (min, max) of the first ``range_rows`` rows' logits (NaN when one is NaN)."""
        M, C = x.shape
        loss = torch.empty(M, dtype=x.dtype)
        out = (ctypes.c_float * 2)() if range_rows else None
        bad = _lib.crossent_ce_index(
            _ptr(x), _ptr(y), None, None, _ptr(loss), _ptr(grad), None, scale, M, C, _threads(M * C), out, range_rows
        )
        if bad:
            return None
        return loss, (None if out is None else (out[0], out[1]))

    @staticmethod
    def ce_index_grad(x, y, c, stats, scale=None, smooth=None):
        """The gradient (times ``scale``) of :meth:`ce_index` from the ``stats`` its forward
        wrote: one pass over ``x``, bit for bit the gradient the forward would have written."""
        M, C = x.shape
        grad = torch.empty_like(x)
        s = 1.0 if scale is None else float(scale)
        sm = None if smooth is None else smooth.to(torch.float32).contiguous()
        _lib.crossent_ce_index_grad(
            _ptr(x), _ptr(y), _ptr(c), _ptr(sm), _ptr(stats), _ptr(grad), s, M, C, _threads(M * C)
        )
        return grad

    @staticmethod
    def ce_index_ncs(x, y, c, grad, scale=None, smooth=None):
        """Class-index cross-entropy of ``x`` (N, C, S) without a layout change: loss (N*S,),
        gradient (if ``grad`` is given) written into ``grad`` (N, C, S). ``y``, ``c``: (N*S,)."""
        N, C, S = x.shape
        loss = torch.empty(N * S, dtype=x.dtype)
        s = 1.0 if scale is None else float(scale)
        sm = None if smooth is None else smooth.to(torch.float32).contiguous()
        bad = _lib.crossent_ce_index_ncs(
            _ptr(x), _ptr(y), _ptr(c), _ptr(sm), _ptr(loss), _ptr(grad), s, N, C, S, _threads(N * C * S)
        )
        if bad < 0:
            raise MemoryError(f"cross_entropy: the compiled kernel could not allocate its {C} x 64 float tile")
        if bad:
            _bad_targets(y, C, bad)
        return loss

    @staticmethod
    def focal(x, t, pw, L, alpha: float, half2: int, eps: float, sum_only: bool = False, scale=None):
        """Sigmoid focal / Poly-1 loss (per element, or its 0-dim sum when ``sum_only``) and
        gradient times ``scale`` (``crossent_focal``); gamma = half2 / 2."""
        grad = torch.empty_like(x)
        loss = None if sum_only else torch.empty_like(x)
        s = 1.0 if scale is None else float(scale)  # a float32 value: exact as a C float
        total = _lib.crossent_focal(
            _ptr(x),
            _ptr(t),
            _ptr(pw),
            int(L),
            _ptr(loss),
            _ptr(grad),
            float(alpha),
            int(half2),
            float(eps),
            s,
            x.numel(),
            _threads(x.numel()),
        )
        if sum_only:
            loss = torch.tensor(total, dtype=x.dtype)
        return loss, grad

    @staticmethod
    def lm_stats(x, y, smooth, temperature: float, softcap: float):
        """LM-head row statistics of the raw logits ``x`` (R, C) (``crossent_lm_stats``):
        ``(out, correct)``, ``out`` (5, R) holding m, log1p(S'), nll, B/(1+S'), sm;
        ``y`` int64 in [0, C); ``smooth`` (C,) float32 or None; ``softcap`` 0: none.
        ``x`` is scratch: a temperature or soft cap overwrites it with the transformed logits."""
        R, C = x.shape
        out = torch.empty(5, R, dtype=torch.float32)
        correct = torch.empty(R, dtype=torch.bool)
        _lib.crossent_lm_stats(
            _ptr(x),
            _ptr(y),
            _ptr(smooth),
            float(temperature),
            float(softcap),
            _ptr(out),
            _ptr(correct),
            R,
            C,
            _threads(R * C),
        )
        return out, correct

    @staticmethod
    def lm_grad(x, y, smooth, temperature: float, softcap: float, stats, g, out):
        """d/dx of the upstream-weighted LM-head outputs of ``x`` (R, C) into ``out`` (may
        be ``x``) (``crossent_lm_grad``): ``stats`` (4, R) m, log1p(S'), nll, B/(1+S') from
        :meth:`lm_stats`, ``g`` (4, R) the upstream g_nll, g_sm, g_lse, g_ent."""
        R, C = x.shape
        _lib.crossent_lm_grad(
            _ptr(x),
            _ptr(y),
            _ptr(smooth),
            float(temperature),
            float(softcap),
            _ptr(stats),
            _ptr(g),
            _ptr(out),
            R,
            C,
            _threads(R * C),
        )
        return out

    @staticmethod
    def lm_loss_grad(x, y, smooth, temperature: float, softcap: float, coefs):
        """The summed LM-head loss of ``x`` (R, C) with per-row ``coefs`` (3, R) (c_nll,
        c_sm, c_z) (``crossent_lm_loss_grad``): ``(out, correct)``, ``out`` (3, R) holding
        nll, lse, sm, and its gradient written over ``x``."""
        R, C = x.shape
        out = torch.empty(3, R, dtype=torch.float32)
        correct = torch.empty(R, dtype=torch.bool)
        failed = _lib.crossent_lm_loss_grad(
            _ptr(x),
            _ptr(y),
            _ptr(smooth),
            float(temperature),
            float(softcap),
            _ptr(coefs),
            _ptr(out),
            _ptr(correct),
            R,
            C,
            _threads(R * C),
        )
        if failed:
            raise MemoryError(f"the compiled LM-head kernel could not allocate its {C}-float row")
        return out, correct
