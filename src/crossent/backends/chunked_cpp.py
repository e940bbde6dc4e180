r"""Optional compiled CPU kernels for the fused backend (C, AVX2 intrinsics, OpenMP).

The C file ``kernels.c`` (next to this module) is compiled on first use with the system C compiler into
``~/.cache/crossent/kernels/`` (or ``$CROSSENT_CACHE_DIR``) and loaded with :mod:`ctypes`.
It includes no torch headers, so the build takes about a second; it links against
``libtorch_cpu`` only for Sleef's vectorised ``expf`` / ``logf`` / ``log1pf`` (1-ulp accuracy,
the very functions torch's own vectorised CPU kernels use). softplus's ``log1p(e)``, e in
[0, 1], has its own 1-ulp form (``log1p01``), twice as fast as the general ``log1pf``. The kernel is used only when all of
these hold, otherwise the chunked torch path of :mod:`crossent.backends.chunked` runs (same
formulas, same results to a few ulp):

* ``CROSSENT_CPU_KERNEL`` is not ``0`` (``=0`` disables it);
* torch reports AVX2 (or better) for this CPU, and a C compiler is found (``$CC`` or ``cc``);
* the build succeeds (a failure is remembered; ``crossent env`` shows the reason);
* the tensors are float32, contiguous, on CPU (float64 and odd layouts use the torch path).

Why a compiled kernel: with torch ops every formula step is a pass over memory, and the
targets of issue 5 (BCE 1.2x, CE 1.3x torch.compile) were not reachable that way. The kernel
evaluates exactly the formulas of :mod:`crossent.backends.reference` in one read of the
inputs and one write of the gradient (and of the loss, unless only its sum is wanted).

Two cross-entropy kernels: ``crossent_ce_index`` for rows of classes (M, C), and
``crossent_ce_index_ncs`` for K-dimensional logits (N, C, S) as they lie in memory, one
AVX2 lane per spatial position (no transpose of the logits or of the gradient; see its
comment for the tiling).

Precision: float32 lanes; sums (the softmax denominator of a row, the BCE total) are
accumulated 8 lanes x at most 32 terms in float32, then in float64 -- about 1e-7 relative
even for a 128k-class row. The (N, C, S) kernel sums each lane's C terms in float64. Threads: OpenMP, ``torch.get_num_threads()`` of them; ctypes
releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

_SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c99"]

_lock = threading.Lock()
_lib = None
_error: Optional[str] = None
_tried = False


def _torch_lib_dir() -> str:
    return str(Path(torch.__file__).parent / "lib")


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def disabled_reason() -> Optional[str]:
    """Why the compiled kernel cannot be used here, or None."""
    if os.environ.get("CROSSENT_CPU_KERNEL", "1") == "0":
        return "disabled by CROSSENT_CPU_KERNEL=0"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "unknown"
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU capability is {cap}, the kernel needs AVX2"
    if _compiler() is None:
        return "no C compiler found (set CC or install gcc)"
    return _error


def _build() -> ctypes.CDLL:
    cc = _compiler()
    key = hashlib.sha256("\n".join([_SOURCE, cc, *_FLAGS, torch.__version__]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CROSSENT_CACHE_DIR", Path.home() / ".cache" / "crossent")) / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"crossent_cpu_{key}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / so.name
            libdir = _torch_lib_dir()
            cmd = [cc, *_FLAGS, str(src), "-o", str(out), f"-L{libdir}", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-2000:]}")
            os.replace(out, so)  # atomic: concurrent builders are harmless
    lib = ctypes.CDLL(str(so))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.crossent_bce.argtypes = [ctypes.c_int, P, P, P, I64, P, P, ctypes.c_float, I64, ctypes.c_int]
    lib.crossent_bce.restype = ctypes.c_double
    lib.crossent_ce_index.argtypes = [P, P, P, P, P, P, ctypes.c_float, I64, I64, ctypes.c_int]
    lib.crossent_ce_index.restype = ctypes.c_int64
    lib.crossent_ce_index_ncs.argtypes = [P, P, P, P, P, P, ctypes.c_float, I64, I64, I64, ctypes.c_int]
    lib.crossent_ce_index_ncs.restype = ctypes.c_int64
    lib.crossent_log1p01.argtypes = [P, P, I64]
    lib.crossent_log1p01.restype = None
    return lib


def get():
    """The kernel module (building it on the first call), or None when unavailable."""
    global _lib, _error, _tried
    if _lib is not None:
        return _Kernels
    if _tried or disabled_reason() is not None:
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except Exception as exc:  # compiler error, missing Sleef symbols, ...
                _error = f"build failed: {type(exc).__name__}: {exc}"[:500]
    return _Kernels if _lib is not None else None


def _threads(work: int) -> int:
    # Below ~64k elements a parallel region costs more than it saves.
    return 1 if work < (1 << 16) else torch.get_num_threads()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _bad_targets(y, C, bad):
    from .._validation import fail

    lo, hi = int(y.min()), int(y.max())
    fail("cross_entropy", f"class indices in [0, {C})", f"{bad} target(s) outside it (min {lo}, max {hi})",
         "Targets must index the class dimension (validate=False skipped the friendlier check).")


class _Kernels:
    """Tensor-level wrappers; callers guarantee float32, contiguous, CPU."""

    @staticmethod
    def bcewl(x, t, pw, L, want_loss, scale=None):
        return _Kernels._bce(0, x, t, pw, L, want_loss, scale)

    @staticmethod
    def bce_probs(p, t, pw, L, want_loss, scale=None):
        return _Kernels._bce(1, p, t, pw, L, want_loss, scale)

    @staticmethod
    def bcewl_into(x, t, pw, L, loss, grad):
        """Per-element BCE-with-logits losses into ``loss`` (may be ``x`` itself: each
        vector is read before it is written) and gradients into ``grad``."""
        _lib.crossent_bce(0, _ptr(x), _ptr(t), _ptr(pw), int(L), _ptr(loss), _ptr(grad), 1.0, x.numel(),
                          _threads(x.numel()))

    @staticmethod
    def _bce(kind, x, t, pw, L, want_loss, scale=None):
        grad = torch.empty_like(x)
        loss = torch.empty_like(x) if want_loss else None
        s = 1.0 if scale is None else float(scale)   # a float32 value: exact as a C float
        total = _lib.crossent_bce(kind, _ptr(x), _ptr(t), _ptr(pw), int(L), _ptr(loss), _ptr(grad), s,
                                  x.numel(), _threads(x.numel()))
        if not want_loss:
            loss = torch.tensor(total, dtype=x.dtype)
        return loss, grad

    @staticmethod
    def ce_index(x, y, c, grad, scale=None, smooth=None):
        M, C = x.shape
        loss = torch.empty(M, dtype=x.dtype)
        s = 1.0 if scale is None else float(scale)
        sm = None if smooth is None else smooth.to(torch.float32).contiguous()
        bad = _lib.crossent_ce_index(_ptr(x), _ptr(y), _ptr(c), _ptr(sm), _ptr(loss), _ptr(grad), s, M, C,
                                     _threads(M * C))
        if bad:
            _bad_targets(y, C, bad)
        return loss

    @staticmethod
    def ce_index_ncs(x, y, c, grad, scale=None, smooth=None):
        """Class-index cross-entropy of ``x`` (N, C, S) without a layout change: loss (N*S,),
        gradient (if ``grad`` is given) written into ``grad`` (N, C, S). ``y``, ``c``: (N*S,)."""
        N, C, S = x.shape
        loss = torch.empty(N * S, dtype=x.dtype)
        s = 1.0 if scale is None else float(scale)
        sm = None if smooth is None else smooth.to(torch.float32).contiguous()
        bad = _lib.crossent_ce_index_ncs(_ptr(x), _ptr(y), _ptr(c), _ptr(sm), _ptr(loss), _ptr(grad), s,
                                         N, C, S, _threads(N * C * S))
        if bad < 0:
            raise MemoryError(f"cross_entropy: the compiled kernel could not allocate its {C} x 64 float tile")
        if bad:
            _bad_targets(y, C, bad)
        return loss
