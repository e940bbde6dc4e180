"""The compiled CPU kernel's build cache: private, verified, self-healing, configurable.

Each scenario that builds or loads the kernel runs in a fresh Python process with its own
``CROSSENT_CACHE_DIR`` under ``tmp_path`` (the real cache is never touched; a process decides
its kernel once). One process builds a cache for the whole module (with four threads racing
its first call); scenarios that need a valid cache start from a copy of it, so only the
scenarios that must build do. Checks of pure helpers (directory and file checks, the
environment parsers) run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import crossent
from crossent import _config
from crossent.backends import chunked_cpp

pytestmark = pytest.mark.skipif(
    chunked_cpp._compiler()[0] is None or chunked_cpp._cpu_capability() not in ("AVX2", "AVX512"),
    reason="the compiled CPU kernel cannot be built here",
)

# Runs a cross-entropy (which asks chunked_cpp for the kernel on its first call), then prints
# one JSON line: what the process got, and the KernelCacheWarnings it saw.
PROBE = """
import json, os, pathlib, sys, time, warnings
if os.environ.get("TEST_NO_HOME"):
    def _no_home():
        raise RuntimeError("no home directory in this test")
    pathlib.Path.home = staticmethod(_no_home)
import torch
import crossent
from crossent.backends import chunked_cpp
EXTRA_BEFORE
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t0 = time.monotonic()
    x = torch.randn(64, 10, requires_grad=True)
    y = torch.randint(0, 10, (64,))
    loss = crossent.cross_entropy(x, y)
    seconds = time.monotonic() - t0
ref = torch.nn.functional.cross_entropy(x, y)
out = dict(
    kernel=chunked_cpp.get() is not None,
    reason=chunked_cpp.disabled_reason(),
    path=str(chunked_cpp.kernel_path()),
    note=chunked_cpp.cache_note(),
    warnings=[str(w.message) for w in caught if issubclass(w.category, crossent.KernelCacheWarning)],
    close=abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()),
    seconds=seconds,
)
EXTRA_AFTER
print(json.dumps(out))
"""

THREADS = """
import threading
barrier = threading.Barrier(4)
got = []
def first_call():
    barrier.wait()
    got.append(chunked_cpp.get() is not None)
threads = [threading.Thread(target=first_call) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def _start(cache, *, before="", after="", env=None, unset=()):
    """Start :data:`PROBE` in a fresh interpreter (see :func:`_probe`)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSENT_") and k != "CC"}
    if cache is not None:
        run_env["CROSSENT_CACHE_DIR"] = str(cache)
    run_env.update(env or {})
    for name in unset:
        run_env.pop(name, None)
    code = PROBE.replace("EXTRA_BEFORE", textwrap.dedent(before)).replace("EXTRA_AFTER", textwrap.dedent(after))
    return subprocess.Popen(
        [sys.executable, "-c", code], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{stdout}\n{stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


def _probe(cache, **kwargs):
    """Run :data:`PROBE` in a fresh interpreter; returns its JSON dict."""
    return _finish(_start(cache, **kwargs))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _library(cache: Path) -> Path:
    (so,) = (cache / "kernels").glob("crossent_cpu_*-*.so")
    return so


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache built by a process whose four threads all make their first call at once."""
    cache = tmp_path_factory.mktemp("seed") / "cache"
    out = _probe(cache, before=THREADS, after="out['threads'] = got")
    return cache, out


def _copy(built, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(built[0], dst)
    return dst


# --------------------------------------------------------------------------- a fresh build
def test_threads_racing_the_first_call_all_get_the_compiled_kernel(built):
    cache, out = built
    assert out["threads"] == [True] * 4
    assert out["kernel"] and out["close"] and out["warnings"] == []
    assert out["path"].startswith(str(cache / "kernels"))


def test_cache_directories_are_created_0700_and_files_private(built):
    cache, _ = built
    assert _mode(cache) == 0o700 and _mode(cache / "kernels") == 0o700
    assert _mode(_library(cache)) == 0o700
    (manifest,) = (cache / "kernels").glob("*.sha256")
    assert _mode(manifest) == 0o600
    assert not list((cache / "kernels").glob("build-*"))  # the build directory is gone


# --------------------------------------------------------------------------- bad files
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
"""


def test_a_planted_library_is_refused_with_a_warning_and_never_runs(built, tmp_path):
    cache = _copy(built, tmp_path)
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    planted = tmp_path / "planted.so"
    subprocess.run([chunked_cpp._compiler()[0][0], "-shared", "-fPIC", str(src), "-o", str(planted)], check=True)
    so = _library(cache)
    shutil.copyfile(planted, so)  # the name the manifest points at
    key = so.name.split("-")[0]  # crossent_cpu_<key>
    shutil.copyfile(planted, so.with_name(key + ".so"))  # a name without a manifest
    shutil.copyfile(planted, so.with_name(key + "-0123456789abcdef.so"))  # another plausible name
    marker = tmp_path / "marker"
    out = _probe(cache, env={"PLANTED_MARKER": str(marker)})
    assert not marker.exists()
    assert out["kernel"] and out["close"]
    assert len(out["warnings"]) == 1 and str(so) in out["warnings"][0]
    assert "SHA-256" in out["warnings"][0]
    assert _library(cache).read_bytes() != planted.read_bytes()  # rebuilt
    assert [p.name for p in (cache / "kernels").glob("*-*.so")] == [_library(cache).name]  # refused copies removed


def test_a_truncated_library_is_rebuilt_not_loaded(built, tmp_path):
    """Loaded, a library cut to 1000 bytes dies with SIGBUS; one with flipped bytes in .text
    with SIGILL. Both fail the same digest check; the truncated one stands for both."""
    cache = _copy(built, tmp_path)
    so = _library(cache)
    so.write_bytes(so.read_bytes()[:1000])
    out = _probe(cache)
    assert out["kernel"] and out["close"]
    assert len(out["warnings"]) == 1 and str(so) in out["warnings"][0]
    assert _library(cache).stat().st_size > 1000


def test_library_file_checks(tmp_path):
    kdir = tmp_path / "kernels"
    kdir.mkdir(mode=0o700)
    data = b"\x7fELF not really"
    digest = __import__("hashlib").sha256(data).hexdigest()
    manifest = kdir / "crossent_cpu_k.sha256"
    manifest.write_text(digest + "\n")
    os.chmod(manifest, 0o600)
    so = kdir / f"crossent_cpu_k-{digest[:16]}.so"
    so.write_bytes(data)
    os.chmod(so, 0o700)
    assert chunked_cpp._verified(manifest, kdir, "k") == (so, None)
    os.chmod(so, 0o720)
    path, problem = chunked_cpp._verified(manifest, kdir, "k")
    assert path is None and "writable by group or others" in problem
    os.chmod(so, 0o700)
    if os.geteuid() == 0:  # a file another user planted, e.g. uid nobody
        os.chown(so, 65534, 65534)
        path, problem = chunked_cpp._verified(manifest, kdir, "k")
        assert path is None and "owned by uid 65534" in problem
        os.chown(so, 0, 0)
    manifest.unlink()
    manifest.symlink_to(tmp_path / "elsewhere")
    path, problem = chunked_cpp._verified(manifest, kdir, "k")
    assert path is None and problem.startswith("manifest")
    manifest.unlink()
    assert chunked_cpp._verified(manifest, kdir, "k") == (None, None)


# --------------------------------------------------------------------------- directories
def test_a_group_writable_cache_directory_is_refused(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, 0o770)
    out = _probe(cache)
    assert out["kernel"] and out["close"]
    assert len(out["warnings"]) == 1 and str(cache / "kernels") in out["warnings"][0]
    assert "writable by group or others" in out["warnings"][0]
    assert not out["path"].startswith(str(cache)) and "refused" in out["note"]
    assert not (cache / "kernels").exists() or not list((cache / "kernels").iterdir())


def test_directory_checks(tmp_path):
    check = chunked_cpp._make_private_dirs
    check(tmp_path / "a" / "b" / "kernels", ours=2)
    for d in ("a", "a/b", "a/b/kernels"):
        assert _mode(tmp_path / d) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(chunked_cpp._Unsafe, match="its parent .*not sticky"):
        check(loose / "cache" / "kernels", ours=2)
    os.chmod(loose, 0o1777)  # sticky, like /tmp: fine as a parent
    check(loose / "cache2" / "kernels", ours=2)
    with pytest.raises(chunked_cpp._Unsafe, match="writable by group or others"):
        check(loose / "kernels", ours=2)  # but not as the cache directory itself
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(OSError):
        check(afile / "kernels", ours=2)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_cache_directory_owned_by_another_user_is_refused(tmp_path):
    cache = tmp_path / "theirs"
    (cache / "kernels").mkdir(parents=True, mode=0o700)
    os.chown(cache, 65534, 65534)
    with pytest.raises(chunked_cpp._Unsafe, match="belongs to uid 65534"):
        chunked_cpp._make_private_dirs(cache / "kernels", ours=2)


# --------------------------------------------------------------------------- a hung compiler
def test_a_hung_compiler_times_out_and_the_torch_path_runs(tmp_path):
    cache = tmp_path / "cache"
    kdir = cache / "kernels"
    kdir.mkdir(parents=True)
    os.chmod(cache, 0o700)
    os.chmod(kdir, 0o700)
    stale, fresh = kdir / "build-stale", kdir / "build-fresh"
    stale.mkdir()
    fresh.mkdir()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    pidfile = tmp_path / "pid"
    hang = tmp_path / "hang-cc"
    hang.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    hang.chmod(0o755)
    out = _probe(cache, env={"CC": str(hang), "CROSSENT_BUILD_TIMEOUT": "1"})
    assert not out["kernel"] and out["close"]
    assert "did not finish within 1 s" in out["reason"] and "CROSSENT_BUILD_TIMEOUT" in out["reason"]
    assert out["seconds"] < 30
    assert not _alive(int(pidfile.read_text()))  # the whole process group was killed
    assert not stale.exists() and fresh.exists()  # old debris removed, a recent one left alone
    assert [p.name for p in kdir.glob("build-*")] == ["build-fresh"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- no home directory
def test_a_valid_cache_is_loaded_without_a_build_and_without_home(built, tmp_path):
    cache = _copy(built, tmp_path)
    before = _library(cache).stat().st_mtime_ns
    out = _probe(cache, env={"TEST_NO_HOME": "1"}, unset=("HOME",))  # Path.home() raises
    assert out["kernel"] and out["close"] and out["warnings"] == [] and out["note"] is None
    assert out["path"] == str(_library(cache))
    assert _library(cache).stat().st_mtime_ns == before


def test_no_home_and_no_cache_dir_builds_into_a_private_temp_dir(tmp_path):
    out = _probe(
        None,
        env={"TEST_NO_HOME": "1", "TMPDIR": str(tmp_path)},
        unset=("HOME",),
        after="""
                 import io, contextlib
                 from crossent.cli import main
                 buf = io.StringIO()
                 with contextlib.redirect_stdout(buf):
                     main(["env"])
                 out["env"] = buf.getvalue()
                 """,
    )
    assert out["kernel"] and out["close"] and out["warnings"] == []
    assert out["path"].startswith(str(tmp_path / "crossent-kernels-"))
    assert "no home directory" in out["note"]
    assert "private temporary directory" in out["env"] and out["path"] in out["env"]
    assert not list(tmp_path.glob("crossent-kernels-*"))  # removed at exit


# --------------------------------------------------------------------------- configuration
def test_cc_with_arguments_and_two_processes_building_at_once(tmp_path):
    log = tmp_path / "args"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nshift\nexec {chunked_cpp._compiler()[0][0]} "$@"\n')
    wrapper.chmod(0o755)
    procs = [_start(tmp_path / "cache", env={"CC": f"{wrapper} --through-the-wrapper"}) for _ in range(2)]
    outs = [_finish(p) for p in procs]
    assert all(out["kernel"] and out["close"] and out["warnings"] == [] for out in outs)
    assert outs[0]["path"] == outs[1]["path"]
    # one compiler run: the second process waited on the lock, then loaded the first one's build
    assert log.read_text().split() == ["--through-the-wrapper"]


def test_a_missing_explicit_cc_is_the_reason(tmp_path):
    out = _probe(
        tmp_path / "cache",
        env={"CC": "/nonexistent/cc -O2"},
        after="""
                 import io, contextlib
                 from crossent.cli import main
                 buf = io.StringIO()
                 with contextlib.redirect_stdout(buf):
                     main(["env"])
                 out["env"] = buf.getvalue()
                 """,
    )
    assert not out["kernel"] and out["close"]
    assert "/nonexistent/cc" in out["reason"] and "CC=" in out["reason"]
    assert "cpu kernel: off" in out["env"] and "/nonexistent/cc" in out["env"]
    assert not (tmp_path / "cache").exists()  # nothing was built or created


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "OFF", " No "])
def test_cpu_kernel_switch_words(monkeypatch, value):
    monkeypatch.setenv("CROSSENT_CPU_KERNEL", value)
    assert chunked_cpp.get() is None
    assert chunked_cpp.disabled_reason() == f"disabled by CROSSENT_CPU_KERNEL={value.strip()}"
    x = torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    torch.testing.assert_close(crossent.cross_entropy(x, y), torch.nn.functional.cross_entropy(x, y))


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, True),
        ("", True),
        ("1", True),
        ("yes", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("oFF", False),
    ],
)
def test_env_flag(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CROSSENT_EXAMPLE", raising=False)
    else:
        monkeypatch.setenv("CROSSENT_EXAMPLE", value)
    assert _config.env_flag("CROSSENT_EXAMPLE") is expected


def test_cpu_capability_and_compiler_are_looked_up_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: calls.append(1) or "AVX2")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: calls.append(1))
    for _ in range(3):
        chunked_cpp.disabled_reason()
    assert calls == []


# --------------------------------------------------------------------------- CROSSENT_LINEAR_BUDGET
@pytest.mark.parametrize(
    "value,expected",
    [
        ("268435456", 2**28),
        ("256MiB", 2**28),
        ("256M", 2**28),
        ("256 mib", 2**28),
        ("64K", 2**16),
        ("1GiB", 2**30),
        ("2g", 2**31),
    ],
)
def test_linear_budget_sizes(monkeypatch, value, expected):
    from crossent.backends import linear

    monkeypatch.setenv("CROSSENT_LINEAR_BUDGET", value)
    assert linear.default_budget() == expected
    assert linear.plan_chunks(8, 16, 4, torch.float32).budget == expected


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5G", "12MB", "0KiB"])
def test_linear_budget_garbage_fails_the_first_call_that_uses_it(monkeypatch, value):
    monkeypatch.setenv("CROSSENT_LINEAR_BUDGET", value)
    x, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    with pytest.raises(
        ValueError,
        match=r"CROSSENT_LINEAR_BUDGET: expected a positive number of bytes.*" + repr(value).replace(".", r"\."),
    ):
        crossent.linear_cross_entropy(x, w, y)
    crossent.linear_cross_entropy(x, w, y, memory_budget=2**20)  # an explicit budget does not read it


def test_import_never_parses_the_linear_budget():
    env = dict(os.environ, CROSSENT_LINEAR_BUDGET="256MiB garbage", CROSSENT_CPU_KERNEL="0")
    proc = subprocess.run(
        [sys.executable, "-c", "import crossent, crossent.nn, crossent.backends.linear"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
