"""The backend contract is declared, not probed: every registered backend carries a
:class:`Capabilities` record, each declaration is true of its ops, and the functional
layer calls a backend exactly as its declaration says (a backend that declares nothing
gets the plain reference signature, whatever its functions accept)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as TF

import crossent
from _helpers import ALL_BACKENDS, TOL, assert_close
from crossent.backends import Backend, Capabilities, _registry, available_backends, capabilities, chunked, reference

BACKENDS = ALL_BACKENDS


def _ce_inputs(g, N=3, C=5, S=4):
    x = torch.randn(N, C, S, generator=g, dtype=torch.float64).float()
    y = torch.randint(0, C, (N, S), generator=g)
    return x, y


# ------------------------------------------------------------------ the declarations
def test_every_backend_declares_its_capabilities():
    assert set(available_backends()) >= {"reference", "chunked", "chunked-torch", "triton"}
    for name in available_backends():
        caps = capabilities(name)
        assert isinstance(caps, Capabilities)
        with pytest.raises(dataclasses.FrozenInstanceError):
            caps.bce_sum_only = not caps.bce_sum_only  # type: ignore[misc]
        # a declared flag is backed by the ops it is about
        for f in dataclasses.fields(caps):
            if getattr(caps, f.name):
                assert set(_registry._CAPABILITY_OPS[f.name]) <= set(_registry._BACKENDS[name].ops)
    assert capabilities("reference") == Capabilities()  # the reference contract, nothing more
    # LM-head fused loss only where the row-block LM-head op lives
    assert [n for n in available_backends() if capabilities(n).lm_head_loss] == ["chunked", "chunked-torch"]


def test_every_capability_names_its_ops():
    assert {f.name for f in dataclasses.fields(Capabilities)} == set(_registry._CAPABILITY_OPS)


def test_unknown_backend_or_capability_is_an_error():
    with pytest.raises(
        crossent.CrossentValueError, match=r"capabilities: expected one of \[.*'reference'.*\], but got 'nope'"
    ):
        capabilities("nope")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sum_only'"):
        Capabilities(sum_only=True)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        capabilities("reference").accepts_spatial  # noqa: B018  (the probed names are gone)


def test_register_refuses_a_capability_without_its_ops(monkeypatch):
    monkeypatch.setattr(_registry, "_BACKENDS", dict(_registry._BACKENDS))
    monkeypatch.setattr(_registry, "_ORDER", list(_registry._ORDER))
    b = Backend(
        name="test-half",
        priority=-1,
        ops={"cross_entropy": reference.cross_entropy},
        capabilities=Capabilities(cross_entropy_reduction=True),
    )
    with pytest.raises(
        crossent.CrossentValueError,
        match=r"register: expected backend 'test-half' declaring cross_entropy_reduction=True .*"
        r"but got no \['cross_entropy_inplace'\]\. Add the ops, or leave cross_entropy_reduction False\.",
    ):
        _registry.register(b)
    assert "test-half" not in available_backends()


# ------------------------------------------------------- each declaration is true
def test_bce_sum_only_declaration_matches_the_ops(backend, g):
    """Where declared, ``sum_only=True`` returns the 0-dim sum of the per-element losses;
    where not, the op does not take the argument at all."""
    x = torch.randn(6, 7, generator=g)
    t = torch.rand(6, 7, generator=g)
    for op in ("binary_cross_entropy_with_logits", "binary_cross_entropy"):
        fn = _registry._BACKENDS[backend].ops[op]
        inp = x if op.endswith("logits") else torch.sigmoid(x)
        elements = fn(inp, t, None, None, None)
        if capabilities(backend).bce_sum_only:
            total = fn(inp, t, None, None, None, sum_only=True, grad_scale=None)
            assert total.dim() == 0
            assert_close(total, elements.sum(), **TOL[torch.float32])
        else:
            with pytest.raises(TypeError, match="sum_only"):
                fn(inp, t, None, None, None, sum_only=True, grad_scale=None)


def test_cross_entropy_declarations_match_the_ops(backend, g):
    """``cross_entropy_spatial``: (N, C, S) logits give the per-position losses of the
    rows; ``cross_entropy_reduction``: ``reduction=`` is taken and leaves the values alone."""
    x, y = _ce_inputs(g)
    N, C, S = x.shape
    rows = x.movedim(1, -1).reshape(-1, C)
    fn = _registry._BACKENDS[backend].ops["cross_entropy"]
    want, _ = reference.cross_entropy(rows, y.reshape(-1), True, None, None, 0.0)
    caps = capabilities(backend)
    if caps.cross_entropy_spatial:
        got, _ = fn(x, y.reshape(-1), True, None, None, 0.0)
        assert_close(got.reshape(-1), want, **TOL[torch.float32])
    if caps.cross_entropy_reduction:
        got, _ = fn(rows, y.reshape(-1), True, None, None, 0.0, reduction="mean")
        assert_close(got, want, **TOL[torch.float32])
    else:
        with pytest.raises(TypeError, match="reduction"):
            fn(rows, y.reshape(-1), True, None, None, 0.0, reduction="mean")


# ------------------------------------------- the functional layer reads the declaration
class _Recorder:
    """Wraps an op and records the rank of its first argument and its keyword names."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args[0].dim(), sorted(kwargs)))
        return self.fn(*args, **kwargs)


@pytest.mark.backends("chunked-torch")
@pytest.mark.parametrize("declared", [False, True])
def test_functional_calls_a_backend_as_declared(backend, declared, monkeypatch, g):
    """The same fused functions, registered once with nothing declared and once with
    everything: only the declaration decides the arguments (no attribute probing)."""
    monkeypatch.setattr(_registry, "_BACKENDS", dict(_registry._BACKENDS))
    monkeypatch.setattr(_registry, "_ORDER", list(_registry._ORDER))
    monkeypatch.delenv("CROSSENT_BACKEND")
    ops = {op: _Recorder(fn) for op, fn in chunked.TORCH_OPS.items()}
    caps = Capabilities(cross_entropy_spatial=True, cross_entropy_reduction=True, bce_sum_only=True)
    _registry.register(
        Backend(name="test-fused", priority=-1, ops=ops, capabilities=caps if declared else Capabilities())
    )

    x, y = _ce_inputs(g)
    loss = crossent.cross_entropy(x, y, backend="test-fused")
    assert_close(loss, TF.cross_entropy(x, y), **TOL[torch.float32])
    assert ops["cross_entropy"].calls == ([(3, ["reduction"])] if declared else [(2, [])])

    z = torch.randn(4, 3, generator=g)
    t = torch.rand(4, 3, generator=g)
    loss = crossent.binary_cross_entropy_with_logits(z, t, backend="test-fused")
    assert_close(loss, TF.binary_cross_entropy_with_logits(z, t), **TOL[torch.float32])
    kw = ops["binary_cross_entropy_with_logits"].calls
    assert kw == ([(2, ["grad_scale", "sum_only"])] if declared else [(2, [])])
