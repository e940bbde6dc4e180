"""Fixtures for every test: the ``backend`` parametrisation, thread count, warning registry.

Helpers (tolerances, generators) are plain functions in ``tests/_helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# The Triton tests run the kernels through Triton's interpreter (no GPU). Triton reads the
# variable once, when it is first imported, and torch._dynamo / export import it early:
# set it before any test module imports torch.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Compiled graphs come from this session's compilations, not from a warm Inductor cache
# filled by an older crossent (it keys graphs by op names, not by their decompositions);
# the directory is removed when the session ends.
_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossent-tests-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402

from hypothesis import settings  # noqa: E402

from _helpers import CPU_BACKENDS, gen  # noqa: E402
from crossent import _validation  # noqa: E402

# Property tests draw the same examples on every run (CI's verdict on a commit does not
# depend on luck); `pytest --hypothesis-profile=explore` draws new ones to search for bugs.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("reproducible")


def pytest_generate_tests(metafunc):
    """A test that uses the ``backend`` fixture runs once per backend: those of its
    ``@pytest.mark.backends(...)`` mark, else its module's ``BACKENDS``, else the CPU ones."""
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("backends")
    names = mark.args if mark else getattr(metafunc.module, "BACKENDS", CPU_BACKENDS)
    metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend's name, also set as ``CROSSENT_BACKEND`` so that calls that name no
    backend run on it too.

    ``chunked``: skipped when the compiled kernel is unavailable here (``chunked-torch`` is
    the same code without it). ``chunked-torch``: chunks of 64 elements, so even small
    inputs span many chunks. ``triton``: the Triton interpreter on CPU tensors (the backend
    is made to accept them) with 16-class tiles, so rows span several tiles.
    """
    name = request.param
    if name == "chunked":
        from crossent.backends import chunked_cpp

        if chunked_cpp.get() is None:
            pytest.skip(f"compiled CPU kernel unavailable: {chunked_cpp.disabled_reason()}")
    elif name == "chunked-torch":
        from crossent.backends import chunked

        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64)
    elif name == "triton":
        pytest.importorskip("triton", reason="triton is not installed (pip install 'crossent[triton]')")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET=0 in the environment: the Triton tests need the interpreter")
        from crossent.backends import _registry
        from crossent.backends import triton as triton_backend

        monkeypatch.setattr(_registry._BACKENDS["triton"], "unavailable", lambda device: None)
        monkeypatch.setattr(triton_backend, "CE_BLOCK_C_MAX", 16)
    monkeypatch.setenv("CROSSENT_BACKEND", name)
    return name


@pytest.fixture
def g():
    return gen(1234)


_SMALL_TENSOR_MODULES = ("test_parity", "test_exact", "test_properties", "test_extensions", "test_standin")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_tiny_tensors(request):
    """These modules run thousands of calls on tensors of a few dozen elements: with the
    default thread pool on a busy 2-core machine, OpenMP hand-offs cost 5-10x the work
    itself (see docs/performance.md, small inputs). One thread, restored after."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    if not name.startswith(_SMALL_TENSOR_MODULES):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _fresh_warning_registry(monkeypatch):
    """Each test sees crossent's once-per-call-site warnings afresh, with the value checks
    and the backend choice at their defaults (a developer's ``CROSSENT_VALIDATE`` or
    ``CROSSENT_BACKEND`` does not leak in; the ``backend`` fixture sets the latter)."""
    monkeypatch.delenv("CROSSENT_VALIDATE", raising=False)
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    _validation.reset_warnings()
    yield
    _validation.reset_warnings()


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
