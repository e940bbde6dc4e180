"""Every CPU backend gives torch's values and gradients, and the reference's exactness.

Backends under test: ``reference``, ``chunked`` (the compiled C kernel where it can be
built, which is what users get) and ``chunked-torch`` (the same backend with the kernel
switched off: the chunked torch-ops fallback). Expected values come from torch and from
float64 formulas written from the math, never from our own output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent
from _helpers import ALL_BACKENDS, TOL, assert_close
from crossent.backends import BackendUnavailableError, chunked, chunked_cpp, dispatch, reference


# Tests that take ``backend`` run on every CPU backend (tests/conftest.py); those marked
# ``all_backends`` on Triton's interpreter too (small shapes: the interpreter is slow).
def all_backends(test):
    # numpy, running the Triton interpreter, evaluates both sides of tl.where
    return pytest.mark.backends(*ALL_BACKENDS)(pytest.mark.filterwarnings("ignore::RuntimeWarning")(test))


def _grad(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _close(a, b, dtype=torch.float32, **kw):
    tol = dict(TOL[dtype])
    tol.update(kw)
    torch.testing.assert_close(a, b, **tol)


# --------------------------------------------------------------- BCE with logits
@all_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (7,), (33, 5), (4, 3, 9)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_logits_matches_torch(backend, dtype, shape, reduction):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 4).requires_grad_()
    t = torch.rand(shape, generator=g, dtype=dtype)
    L = shape[-1] if shape else 1
    pw = torch.rand(L, generator=g, dtype=dtype) * 3 if shape else None
    w = torch.rand(shape, generator=g, dtype=dtype)
    for kw in ({}, {"pos_weight": pw}, {"weight": w}, {"weight": w, "pos_weight": pw}):
        ours = crossent.binary_cross_entropy_with_logits(x, t, reduction=reduction, backend=backend, **kw)
        ref = F.binary_cross_entropy_with_logits(x, t, reduction=reduction, **kw)
        _close(ours, ref, dtype)
        gy = torch.rand_like(ref)
        _close(_grad((ours * gy).sum(), x)[0], _grad((ref * gy).sum(), x)[0], dtype)


@pytest.mark.parametrize("shape", [(5, 4099), (3, 8200)])
def test_bce_logits_many_blocks_cycled_pos_weight(backend, shape):
    """Several kernel blocks (16384 elements each) that start mid-row of pos_weight."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    t = torch.rand(shape, generator=g)
    pw = torch.rand(shape[-1], generator=g) * 4
    for reduction in ("sum", "none"):
        ours = crossent.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction, backend=backend)
        ref = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction=reduction)
        _close(ours, ref)
        _close(_grad(ours.sum(), x)[0], _grad(ref.sum(), x)[0])


def _bce_logits_f64(x, t, pw=1.0):
    """Per-element BCE-with-logits from the math, float64: pw t softplus(-x) + (1-t) softplus(x)."""

    def softplus(z):
        return max(z, 0.0) + math.log1p(math.exp(-abs(z)))

    out = []
    for xi, ti in zip(x.tolist(), t.tolist()):
        a = 0.0 if pw * ti == 0 else pw * ti * softplus(-xi)
        b = 0.0 if 1 - ti == 0 else (1 - ti) * softplus(xi)
        out.append(a + b)
    return torch.tensor(out, dtype=torch.float64)


@all_backends
def test_bce_logits_extremes_are_exact_and_finite(backend):
    x = torch.tensor([-math.inf, -1e9, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e9, math.inf])
    for tv in (0.0, 1.0, 0.25):
        t = torch.full_like(x, tv)
        xr = x.clone().requires_grad_()
        loss = crossent.binary_cross_entropy_with_logits(xr, t, reduction="none", backend=backend)
        expected = _bce_logits_f64(x.double(), t.double())
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(loss), finite)
        # relative 2e-6 wherever float32 has normal numbers (below 1.2e-38 it has fewer digits)
        assert_close(loss[finite].double(), expected[finite], tol="f32_vs_f64")
        (grad,) = _grad(loss.sum(), xr)
        assert torch.isfinite(grad).all()
        # d/dx = (1-t) sigmoid(x) - t sigmoid(-x)
        sig = torch.sigmoid(x.double())
        assert_close(grad.double(), (1 - tv) * sig - tv * (1 - sig), tol="f32_vs_f64")
    # the small loss torch's formula rounds to 0: x=-20, t=0 -> log1p(e^-20) = 2.06e-9
    loss = crossent.binary_cross_entropy_with_logits(torch.tensor([-20.0]), torch.tensor([0.0]), backend=backend)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-20.0)), rel=1e-6)


@all_backends
def test_bce_logits_label_smoothing_ignore_index_against_math(backend):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(40, 6, generator=g) * 3).double().requires_grad_()
    t = torch.randint(0, 2, (40, 6), generator=g).double()
    t[0, :3] = -1
    pw = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    eps = 0.1
    loss = crossent.binary_cross_entropy_with_logits(
        x, t, pos_weight=pw, label_smoothing=eps, ignore_index=-1, backend=backend
    )
    keep = t != -1
    ts = torch.where(keep, t, 0.0) * (1 - eps) + eps / 2
    per = pw * ts * F.softplus(-x) + (1 - ts) * F.softplus(x)
    expected = (per * keep).sum() / keep.sum()
    _close(loss, expected, torch.float64)
    _close(_grad(loss, x)[0], _grad(expected, x)[0], torch.float64)


# --------------------------------------------------------------- BCE on probabilities
@all_backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_probs_matches_torch(backend, reduction):
    g = torch.Generator().manual_seed(2)
    p = torch.rand(50, 3, generator=g)
    p[0] = torch.tensor([0.0, 1.0, 1e-30])
    p = p.requires_grad_()
    t = torch.rand(50, 3, generator=g)
    t[0] = torch.tensor([1.0, 0.0, 1.0])
    w = torch.rand(3, generator=g)
    for kw in ({}, {"weight": w}):
        ours = crossent.binary_cross_entropy(p, t, reduction=reduction, backend=backend, **kw)
        ref = F.binary_cross_entropy(p, t, reduction=reduction, **kw)
        _close(ours, ref)
        _close(_grad(ours.sum(), p)[0], _grad(ref.sum(), p)[0])


# --------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("C", [1, 3, 8, 13, 37, 300])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_index_targets_match_torch(backend, C, reduction):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(19, C, generator=g) * 3).requires_grad_()
    y = torch.randint(0, C, (19,), generator=g)
    y[::5] = -100
    w = torch.rand(C, generator=g) + 0.1
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.05}):
        ours = crossent.cross_entropy(
            x, y, reduction=reduction, backend=backend, validate=False, **kw
        )  # C=1 warns otherwise
        ref = F.cross_entropy(x, y, reduction=reduction, **kw)
        _close(ours, ref)
        _close(_grad(ours.sum(), x)[0], _grad(ref.sum(), x)[0])


@all_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_probability_targets_and_kdim_match_torch(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 4, 5, generator=g, dtype=dtype).requires_grad_()
    q = torch.softmax(torch.randn(3, 11, 4, 5, generator=g, dtype=dtype), 1)
    y = torch.randint(0, 11, (3, 4, 5), generator=g)
    w = torch.rand(11, generator=g, dtype=dtype)
    for target in (q, y):
        for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
            ours = crossent.cross_entropy(x, target, backend=backend, **kw)
            ref = F.cross_entropy(x, target, **kw)
            _close(ours, ref, dtype)
            _close(_grad(ours, x)[0], _grad(ref, x)[0], dtype)


@all_backends
def test_ce_wide_margin_keeps_tiny_loss_and_gradient(backend):
    x = torch.tensor([[20.0, 0.0, 0.0], [30.0, -5.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    loss = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    xd = x.detach().double()
    s = torch.exp(xd[:, 1:] - xd[:, :1]).sum(1)  # sum_{j != 0} e^{x_j - x_0}
    assert_close(loss.double(), torch.log1p(s), tol="f32_vs_f64")
    assert loss[0].item() == pytest.approx(4.122307e-9, rel=1e-5)
    (grad,) = _grad(loss.sum(), x)
    # d/dx_0 = p_0 - 1 = -s / (1 + s): tiny but exact, not rounded to 0
    assert_close(grad[:, 0].double(), -s / (1 + s), tol="f32_vs_f64")


@all_backends
def test_ce_infinite_logits_give_finite_limits(backend):
    x = torch.tensor(
        [[math.inf, 0.0, 1.0], [math.inf, math.inf, 0.0], [-math.inf, 0.0, 2.0], [-math.inf, -math.inf, -math.inf]],
        requires_grad=True,
    )
    y = torch.tensor([0, 1, 1, 2])
    loss = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    expected = torch.tensor([0.0, math.log(2.0), math.log1p(math.exp(2.0)), math.log(3.0)])
    assert_close(loss, expected)
    (grad,) = _grad(loss.sum(), x)
    assert torch.isfinite(grad).all()
    ref = crossent.cross_entropy(x, y, reduction="none", backend="reference")
    _close(grad, _grad(ref.sum(), x)[0])


def test_ce_many_classes_accumulate_accurately(backend):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 20011, generator=g) * 2).requires_grad_()
    y = torch.tensor([5, 20010])
    loss = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    xd = x.detach().double()
    expected = torch.logsumexp(xd, 1) - xd.gather(1, y[:, None]).squeeze(1)
    assert_close(loss.double(), expected, tol="f32_vs_f64")
    (grad,) = _grad(loss.sum(), x)
    exp_grad = torch.softmax(xd, 1) - F.one_hot(y, 20011).double()
    assert_close(grad.double(), exp_grad, tol="f32_softmax_grad_vs_f64")


# ------------------------------------------------------- autograd: orders, inputs, reuse
@all_backends
def test_double_backward_matches_torch(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,), generator=g)
    t = torch.rand(6, 5, generator=g, dtype=torch.float64)
    for ours_fn, ref_fn in [
        (lambda: crossent.cross_entropy(x, y, backend=backend), lambda: F.cross_entropy(x, y)),
        (
            lambda: crossent.binary_cross_entropy_with_logits(x, t, backend=backend),
            lambda: F.binary_cross_entropy_with_logits(x, t),
        ),
    ]:
        (g1,) = torch.autograd.grad(ours_fn(), x, create_graph=True)
        (h1,) = torch.autograd.grad(g1.square().sum(), x)
        (g2,) = torch.autograd.grad(ref_fn(), x, create_graph=True)
        (h2,) = torch.autograd.grad(g2.square().sum(), x)
        _close(h1, h2, torch.float64)


@all_backends
def test_target_and_weight_gradients_match_torch(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pw = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    ours = crossent.binary_cross_entropy_with_logits(x, t, pos_weight=pw, backend=backend)
    ref = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
    for a, b in zip(_grad(ours, x, t), _grad(ref, x, t)):
        _close(a, b, torch.float64)
    # torch cannot differentiate w.r.t. pos_weight; the math: d mean / d pw_j = sum_i t_ij softplus(-x_ij) / numel
    pw.requires_grad_()
    ours = crossent.binary_cross_entropy_with_logits(x, t, pos_weight=pw, backend=backend)
    expected = (t * F.softplus(-x)).sum(0).detach() / x.numel()
    _close(_grad(ours, pw)[0], expected, torch.float64)
    q = torch.softmax(torch.randn(8, 4, generator=g, dtype=torch.float64), 1).requires_grad_()
    ours = crossent.cross_entropy(x, q, backend=backend)
    ref = F.cross_entropy(x, q)
    for a, b in zip(_grad(ours, x, q), _grad(ref, x, q)):
        _close(a, b, torch.float64)


@all_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_twice_with_retain_graph_gives_the_same_gradient(backend, dtype, reduction):
    """Backward is reentrant: a second backward through the same graph (retain_graph, as
    gradcheck does) returns bit-for-bit the first one's gradient, whatever grad_output."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 6, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 6, (9,), generator=g)
    y[2] = -100
    t = torch.rand(9, 6, generator=g, dtype=dtype)
    p = torch.rand(9, 6, generator=g, dtype=dtype).requires_grad_()
    cases = [
        (crossent.cross_entropy(x, y, reduction=reduction, backend=backend), x),
        (crossent.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2, backend=backend), x),
        (crossent.cross_entropy(x, t.softmax(1), reduction=reduction, backend=backend), x),
        (crossent.binary_cross_entropy_with_logits(x, t, reduction=reduction, backend=backend), x),
        (crossent.binary_cross_entropy(p, t, reduction=reduction, backend=backend), p),
    ]
    for loss, inp in cases:
        for go in (torch.ones_like(loss), torch.full_like(loss, 3.0)):
            (a,) = torch.autograd.grad(loss, inp, go, retain_graph=True)
            (b,) = torch.autograd.grad(loss, inp, go, retain_graph=True)
            (c,) = torch.autograd.grad(loss, inp, go, retain_graph=True)
            assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_torch(backend, dtype):
    g = torch.Generator().manual_seed(8)
    x64 = torch.randn(64, 50, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 50, (64,), generator=g)
    x = x64.to(dtype)
    truth = F.cross_entropy(x.double(), y, reduction="none")
    ours = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    theirs = F.cross_entropy(x.float(), y, reduction="none").to(dtype)
    assert ours.dtype == dtype
    err_ours = (ours.double() - truth).abs().max()
    err_torch = (theirs.double() - truth).abs().max()
    assert err_ours <= err_torch + 1e-6
    t = torch.rand(64, 50, generator=g).to(dtype)
    b = crossent.binary_cross_entropy_with_logits(x, t, backend=backend)
    truth = F.binary_cross_entropy_with_logits(x.double(), t.double())
    assert b.dtype == dtype
    assert abs(b.double() - truth) <= abs(truth) * 2**-7


@all_backends
def test_return_parts_total_equals_sum_of_elements(backend):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 7, generator=g)
    t = torch.randint(0, 2, (30, 7), generator=g).float()
    t[0, 0] = -1
    parts = crossent.binary_cross_entropy_with_logits(x, t, ignore_index=-1, return_parts=True, backend=backend)
    per = crossent.binary_cross_entropy_with_logits(x, t, ignore_index=-1, reduction="none", backend=backend)
    assert_close(parts.total, per.double().sum(), tol="f32_vs_f64")
    assert parts.denominator.item() == 30 * 7 - 1


# --------------------------------------------------------------- in-place cross-entropy
def _lm_head(seed=10, C=37):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(12, 8, generator=g, requires_grad=True)
    W = torch.randn(8, C, generator=g, requires_grad=True)
    y = torch.randint(0, C, (12,), generator=g)
    y[2] = -100
    return h, W, y


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"reduction": "sum"}, {"weight": "w"}])
def test_inplace_equals_normal_path(kw):
    h, W, y = _lm_head()
    if kw.get("weight") == "w":
        kw = {"weight": torch.rand(37) + 0.5}
    results = []
    for inplace in (False, True):
        loss = crossent.cross_entropy(h @ W, y, inplace_backward=inplace, **kw)
        results.append((loss.detach(), *_grad(loss, h, W)))
    for a, b in zip(*results):
        assert_close(a, b)


def test_inplace_writes_gradient_into_the_logits_buffer():
    h, W, y = _lm_head()
    logits = h @ W
    ptr = logits.data_ptr()
    loss = crossent.cross_entropy(logits, y, inplace_backward=True)
    captured = {}
    logits.register_hook(lambda g: captured.update(ptr=g.data_ptr()))
    loss.backward()
    assert captured["ptr"] == ptr  # no second (N, C) buffer
    # the module form
    loss = crossent.nn.CrossEntropyLoss(inplace_backward=True)(h @ W, y)
    loss.backward()


def test_inplace_misuse_is_an_error_not_a_wrong_number():
    h, W, y = _lm_head()
    logits = h @ W
    other = logits.pow(2).sum()  # pow saves its input for backward
    loss = crossent.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()

    loss = crossent.cross_entropy(h @ W, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass through an inplace_backward=True loss"):
        loss.backward()

    leaf = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="leaf tensor"):
        crossent.cross_entropy(leaf, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(ValueError, match="class-probability targets"):
        crossent.cross_entropy(h @ W, torch.softmax(torch.randn(12, 37), 1), inplace_backward=True)
    with pytest.raises(ValueError, match="weight that does not require grad"):
        crossent.cross_entropy(h @ W, y, weight=torch.rand(37, requires_grad=True), inplace_backward=True)


def test_inplace_is_off_by_default_and_inert_without_autograd():
    h, W, y = _lm_head()
    logits = h @ W
    before = logits.detach().clone()
    crossent.cross_entropy(logits, y).backward()
    assert torch.equal(logits.detach(), before)
    with torch.no_grad():
        logits = h @ W
        crossent.cross_entropy(logits, y, inplace_backward=True)
        assert torch.equal(logits, before)


# --------------------------------------------------------------- registry
def test_automatic_choice_and_explicit_failures(monkeypatch):
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    x = torch.randn(3, 4)
    assert dispatch("cross_entropy", x) is chunked.cross_entropy
    assert dispatch("cross_entropy_inplace", x) is chunked.cross_entropy_inplace
    meta = torch.empty(3, 4, device="meta")
    assert dispatch("cross_entropy", meta).__module__ == "crossent.backends.reference"
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend 'chunked' cannot run cross_entropy on meta.*"
        r"Usable here: \['reference'\]",
    ):
        dispatch("cross_entropy", meta, "chunked")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run .* on cpu: .*CUDA"):
        crossent.cross_entropy(x, torch.tensor([0, 1, 2]), backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend 'reference' cannot run cross_entropy_inplace"):
        crossent.cross_entropy(
            x.requires_grad_() * 1, torch.tensor([0, 1, 2]), backend="reference", inplace_backward=True
        )


def test_chunked_torch_runs_loss_ops_on_cpu_and_linear_ops_anywhere(monkeypatch):
    """One backend name, two device rules: the chunked loss ops need CPU, the fused linear
    ops are plain torch and run on any device (the CUDA fallback without Triton)."""
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    from crossent.backends import linear

    meta = torch.empty(3, 4, device="meta")
    assert dispatch("linear_cross_entropy", meta, "chunked-torch") is linear.linear_cross_entropy_chunked
    assert dispatch("linear_cross_entropy", meta) is linear.linear_cross_entropy_chunked  # beats unfused reference
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend 'chunked-torch' cannot run cross_entropy on meta: "
        r"it runs on CPU tensors only.*Usable here: \['reference'\]",
    ):
        dispatch("cross_entropy", meta, "chunked-torch")
    with pytest.raises(
        BackendUnavailableError,
        match=r"backend 'chunked' cannot run linear_cross_entropy on meta"
        r".*Usable here: \['chunked-torch', 'reference'\]",
    ):
        dispatch("linear_cross_entropy", meta, "chunked")
    with pytest.raises(ValueError, match=r"backend: expected one of .*'torch-chunked'"):
        dispatch("linear_cross_entropy", meta, "torch-chunked")


def test_crossent_backend_environment_variable(monkeypatch):
    """CROSSENT_BACKEND makes backend=None/'auto' behave as if that backend were named;
    ops it does not implement at all keep the automatic choice; backend= still wins."""
    x = torch.randn(3, 4)
    monkeypatch.setenv("CROSSENT_BACKEND", "reference")
    assert dispatch("cross_entropy", x) is dispatch("cross_entropy", x, "auto") is reference.cross_entropy
    assert dispatch("binary_cross_entropy", x) is reference.binary_cross_entropy
    assert dispatch("cross_entropy", x, "chunked") is chunked.cross_entropy
    # reference has no in-place mode: the automatic choice (chunked) serves it
    assert dispatch("cross_entropy_inplace", x) is chunked.cross_entropy_inplace
    monkeypatch.setenv("CROSSENT_BACKEND", "chunked-torch")
    assert dispatch("cross_entropy", x) is chunked.TORCH_OPS["cross_entropy"]
    meta = torch.empty(3, 4, device="meta")
    with pytest.raises(BackendUnavailableError, match="backend 'chunked-torch' cannot run cross_entropy on meta"):
        dispatch("cross_entropy", meta)
    monkeypatch.setenv("CROSSENT_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"CROSSENT_BACKEND: expected one of .*'nope'.*Unset it"):
        dispatch("cross_entropy", x)
    monkeypatch.setenv("CROSSENT_BACKEND", "auto")
    assert dispatch("cross_entropy", x) is chunked.cross_entropy


def test_chunked_torch_backend_never_uses_the_compiled_kernel(monkeypatch):
    def boom():
        raise AssertionError("compiled kernel used")

    monkeypatch.setattr(chunked, "_cpp", boom)
    x = torch.randn(5, 7, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    t = torch.rand(5, 7)
    for ours, ref in (
        (crossent.cross_entropy(x, y, backend="chunked-torch"), F.cross_entropy(x, y)),
        (
            crossent.binary_cross_entropy_with_logits(x, t, backend="chunked-torch"),
            F.binary_cross_entropy_with_logits(x, t),
        ),
        (
            crossent.binary_cross_entropy(x.sigmoid(), t, backend="chunked-torch"),
            F.binary_cross_entropy(x.sigmoid(), t),
        ),
    ):
        _close(ours, ref)
        _close(_grad(ours, x)[0], _grad(ref, x)[0])


def test_compiled_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CROSSENT_CPU_KERNEL", "0")
    assert "CROSSENT_CPU_KERNEL=0" in chunked_cpp.disabled_reason()


def test_out_of_range_targets_without_validation_raise_never_read_out_of_bounds(backend):
    x = torch.randn(4, 9, requires_grad=True)
    y = torch.tensor([0, 9, 3, 1])
    with pytest.raises((ValueError, IndexError, RuntimeError), match=r"out of bounds|outside|index"):
        crossent.cross_entropy(x, y, validate=False, backend=backend)


def test_empty_batches(backend):
    x = torch.randn(0, 5, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(crossent.cross_entropy(x, y, backend=backend))
    assert crossent.cross_entropy(x, y, reduction="sum", backend=backend).item() == 0
    b = torch.randn(0, 3, requires_grad=True)
    assert torch.isnan(crossent.binary_cross_entropy_with_logits(b, torch.rand(0, 3), backend=backend))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_any_grad_output_is_exact_after_prescaled_forward(backend, reduction):
    """The fused BCE pre-scales its gradient by the grad_output of a plain backward();
    any other grad_output (loss * 3, a GradScaler) must still give torch's gradient."""
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(70, 9, generator=g) * 3).requires_grad_()
    t = torch.rand(70, 9, generator=g)
    p = torch.rand(70, 9, generator=g).requires_grad_()
    for factor in (1.0, 3.0, 2.0**-10):
        for ours, ref, inp in (
            (
                crossent.binary_cross_entropy_with_logits(x, t, reduction=reduction, backend=backend),
                F.binary_cross_entropy_with_logits(x, t, reduction=reduction),
                x,
            ),
            (
                crossent.binary_cross_entropy(p, t, reduction=reduction, backend=backend),
                F.binary_cross_entropy(p, t, reduction=reduction),
                p,
            ),
        ):
            _close(_grad(ours * factor, inp)[0], _grad(ref * factor, inp)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ce_any_grad_output_is_exact_after_prescaled_forward(backend, reduction, inplace):
    if inplace and backend == "reference":
        pytest.skip("the reference backend has no in-place mode")
    g = torch.Generator().manual_seed(14)
    h = torch.randn(11, 6, generator=g, requires_grad=True)
    W = torch.randn(6, 29, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (11,), generator=g)
    y[4] = -100
    w = torch.rand(29, generator=g) + 0.2
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.1}):
        for factor in (1.0, 3.0, 2.0**16):
            ours = crossent.cross_entropy(
                h @ W, y, reduction=reduction, backend=backend, inplace_backward=inplace, **kw
            )
            ref = F.cross_entropy(h @ W, y, reduction=reduction, **kw)
            for a, b in zip(_grad(ours * factor, h, W), _grad(ref * factor, h, W)):
                # the gradients are scaled by `factor`: so is the table's absolute floor
                assert_close(a, b, atol=TOL[torch.float32]["atol"] * factor)


_LOGIT = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([math.inf, -math.inf, 0.0, 20.0, -20.0]))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(_LOGIT, min_size=11, max_size=11), min_size=1, max_size=4), data=st.data())
def test_fused_cpu_kernels_agree_with_reference_on_any_logits(rows, data):
    """Property: the compiled CPU kernels give the reference's values and gradients
    (finite exactly where the reference is) for arbitrary logits, +-inf and ties included."""
    if chunked_cpp.get() is None:
        pytest.skip(f"compiled CPU kernel unavailable: {chunked_cpp.disabled_reason()}")
    x = torch.tensor(rows)
    y = torch.tensor([data.draw(st.integers(0, 10)) for _ in rows])
    t = torch.tensor([[data.draw(st.sampled_from([0.0, 1.0, 0.3])) for _ in range(11)] for _ in rows])
    # a weight of 0 with an infinite -log p_y gives 0 on both sides (the term is absent)
    w = torch.tensor([data.draw(st.sampled_from([0.0, 0.5, 2.0])) for _ in range(11)])
    for fn in (
        lambda a, b: crossent.cross_entropy(a, y, reduction="none", backend=b),
        lambda a, b: crossent.cross_entropy(a, y, weight=w, label_smoothing=0.1, reduction="none", backend=b),
        lambda a, b: crossent.binary_cross_entropy_with_logits(a, t, reduction="none", backend=b),
    ):
        outs = []
        for b in ("chunked", "reference"):
            xr = x.clone().requires_grad_()
            loss = fn(xr, b)
            outs.append((loss.detach(), _grad(loss.sum(), xr)[0]))
        for ours, ref in zip(*outs):
            assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
            fin = torch.isfinite(ref)
            assert_close(ours[fin], ref[fin])


@pytest.mark.skipif(chunked_cpp.get() is None, reason="compiled CPU kernel unavailable here")
def test_compiled_softplus_is_within_two_ulps():
    """The kernel's softplus, log1p(exp(-|x|)) + max(x, 0), seen through BCE-with-logits
    with target 0 (loss = softplus(x)), against float64 over 2^20 logits in [-80, 20] (normal
    float32 results) and the ends: the vectorised exp (1 ulp) and the kernel's own log1p on
    [0, 1] (1 ulp)."""
    x = torch.cat([torch.linspace(-80.0, 20.0, 1 << 20), torch.tensor([0.0, -0.0, -1e-30, 1e-30])])
    loss = crossent.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none", backend="chunked")
    truth = torch.nn.functional.softplus(x.double())
    nearest = truth.float()
    ulp = (torch.nextafter(nearest, torch.tensor(math.inf)) - nearest).double()
    err = (loss.double() - truth).abs() / ulp
    assert err.max() <= 2.0, (err.max(), x[err.argmax()])


# ------------------------------------------- K-dimensional cross-entropy: the lane kernel
# (N, C, d1..dK) float32 contiguous logits with class-index targets go to the compiled
# kernel that vectorises across spatial positions (chunked_cpp.crossent_ce_index_ncs),
# without moving the classes last. Same formulas as the row kernel; checked here against
# torch and against the float64 reference (ulps of the truth, or of the gradient's
# condition-aware scale |A p_j| + |a_j|, as tests/extremes.py measures).
needs_kernel = pytest.mark.skipif(chunked_cpp.get() is None, reason="compiled CPU kernel unavailable here")

KDIM_SPATIAL = [(13,), (3, 5), (2, 3, 3), (9, 11), (17, 19)]  # S = 13, 15, 18, 99, 323: never a multiple of 8


def _ulps(ours, truth, scale=None):
    """Error in ulps of the truth (or of ``scale``), over the normal range of float32 as
    tests/extremes.py measures it (a subnormal result has fewer bits: checked apart)."""
    import numpy as np
    from extremes import ulp_error

    ref = (truth if scale is None else scale).detach().numpy()
    err = ulp_error(ours.detach().numpy(), truth.detach().numpy(), torch.float32, None if scale is None else ref)
    a = np.abs(ref)
    return np.where((a == 0) | (a >= np.finfo(np.float32).tiny), err, 0.0)


def _ulp_bound(x):
    """Allowed ulps per gradient entry and per loss: 8 (conftest.ULP['ce']) plus the
    float32 conditioning of e_j = exp(x_j - m): ``x_j - m`` is rounded (0.5 ulp of |z|,
    z = x_j - m), which moves e_j by up to |z| 2^-24 relative, i.e. up to |z| ulps; the
    sum s (in the loss and in every p_j) by up to max |z| ulps. The reference in float32,
    torch and the row kernel carry the same terms; they vanish at the margins of the
    extremes test (0 - m is exact), which is held to 8 ulps flat."""
    xd = x.detach().double()
    z = (xd - xd.amax(1, keepdim=True)).abs().nan_to_num(0.0, posinf=0.0)
    zmax = z.amax(1, keepdim=True)
    return (8 + z + zmax).numpy(), (8 + zmax.squeeze(1)).numpy()


def _kdim_truth(x, y, weight=None, ignore_index=-100, label_smoothing=0.0):
    """float64 reference per position (reduction 'none'), its gradient, and the gradient's
    condition-aware scale: A p_j + a_j (a_j = c [j == y] + eps w_j / C, A = sum_j a_j),
    except at a dominant arg-max k (p_k > 1/2), whose cancellation-free form
    (A - a_k) - A (1 - p_k) has the scale |A - a_k| + A (1 - p_k): a confident correct
    prediction (A = a_k) must keep the relative precision of its tiny gradient."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.double()
    loss = crossent.cross_entropy(
        xd,
        y,
        weight=wd,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
        backend="reference",
        validate=False,
    )
    (grad,) = torch.autograd.grad(loss.sum(), xd)
    C = x.shape[1]
    w = torch.ones(C, dtype=torch.float64) if wd is None else wd
    keep = y != ignore_index
    yk = torch.where(keep, y, 0)
    c = torch.where(keep, (1 - label_smoothing) * w[yk], 0.0)  # (N, d...)
    a = F.one_hot(yk, C).movedim(-1, 1).double() * c.unsqueeze(1)
    a = a + (label_smoothing * w / C).view(1, C, *([1] * (x.dim() - 2))) * (keep.unsqueeze(1) if label_smoothing else 1)
    A = a.sum(1, keepdim=True)
    xs = xd.detach()
    m = xs.amax(1, keepdim=True)
    e = torch.exp(torch.where(xs == m, 0.0, xs - m))  # +inf logits: their limit shares
    p = e / e.sum(1, keepdim=True)
    scale = A * p + a
    k = xd.detach().nan_to_num(0.0).argmax(1, keepdim=True)
    pk, ak = p.gather(1, k), a.gather(1, k)
    one_m_pk = e.scatter(1, k, 0.0).sum(1, keepdim=True) / e.sum(1, keepdim=True)  # 1 - p_k, no cancellation
    dominant = (A - ak).abs() + A * one_m_pk
    scale = torch.where(pk > 0.5, scale.scatter(1, k, dominant), scale)
    return loss.detach(), grad, scale


def _spy_kernels(monkeypatch):
    """The premise of the lane-kernel tests: their inputs reach the lane kernel (the row
    kernel raises). Returns the lane kernel's calls; which inputs go where is reported by
    benchmarks/op_counts.py."""
    calls = []
    K = chunked_cpp._CFunctions
    lane = K.ce_index_ncs

    def row(*a, **k):
        raise AssertionError("the row kernel ran for K-dim logits")

    def spy(*a, **k):
        calls.append(a[0].shape)
        return lane(*a, **k)

    monkeypatch.setattr(K, "ce_index", staticmethod(row))
    monkeypatch.setattr(K, "ce_index_ncs", staticmethod(spy))
    return calls


@needs_kernel
def test_kdim_cross_entropy_matches_torch(monkeypatch):
    calls = _spy_kernels(monkeypatch)
    x = torch.randn(2, 5, 3, 7, requires_grad=True)
    y = torch.randint(0, 5, (2, 3, 7))
    loss = crossent.cross_entropy(x, y)
    (grad,) = _grad(loss, x)
    ref = F.cross_entropy(x, y)
    _close(loss, ref)
    _close(grad, _grad(ref, x)[0])
    with torch.no_grad():  # loss only (grad NULL in the kernel)
        _close(crossent.cross_entropy(x, y, reduction="none"), F.cross_entropy(x, y, reduction="none"))
    assert calls


@needs_kernel
def test_kdim_cases_the_lane_kernel_does_not_take_match_torch():
    """float64, non-contiguous logits (channels-last, a slice), probability targets and the
    in-place mode (rows of classes): same values as torch."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(3, 6, 5, 4, generator=g)
    y = torch.randint(0, 6, (3, 5, 4), generator=g)
    q = torch.softmax(torch.randn(3, 6, 5, 4, generator=g), 1)
    wide = torch.randn(3, 6, 5, 8, generator=g)
    for leaf, view, t in (
        (base.double(), lambda v: v, y),
        (base.to(memory_format=torch.channels_last), lambda v: v, y),
        (wide, lambda v: v[..., ::2], y),
        (base, lambda v: v, q),
    ):
        leaf = leaf.clone().requires_grad_()
        assert view(leaf).dtype == torch.float64 or not view(leaf).is_contiguous() or t is q
        ours = crossent.cross_entropy(view(leaf), t, reduction="sum")
        ref = F.cross_entropy(view(leaf), t, reduction="sum")
        _close(ours, ref, leaf.dtype)
        _close(_grad(ours, leaf)[0], _grad(ref, leaf)[0], leaf.dtype)
    h = base.clone().requires_grad_()
    ours = crossent.cross_entropy(h * 1.0, y, inplace_backward=True)
    ref = F.cross_entropy(h * 1.0, y)
    _close(ours, ref)
    _close(_grad(ours, h)[0], _grad(ref, h)[0])


@needs_kernel
@pytest.mark.parametrize("spatial", KDIM_SPATIAL)
@pytest.mark.parametrize("C", [1, 2, 3, 21, 40])
def test_kdim_lane_kernel_matches_torch_and_float64_reference(monkeypatch, spatial, C):
    calls = _spy_kernels(monkeypatch)
    g = torch.Generator().manual_seed(C * 100 + len(spatial))
    N = 2
    x = (torch.randn(N, C, *spatial, generator=g) * 4).requires_grad_()
    y = torch.randint(0, C, (N, *spatial), generator=g)
    y.view(-1)[::7] = -100
    w = torch.rand(C, generator=g) + 0.1
    options = (
        {},
        {"weight": w},
        {"label_smoothing": 0.2},
        {"weight": w, "label_smoothing": 0.05},
        {"ignore_index": 1 % C, "label_smoothing": 0.1},
    )
    y_default = y
    for kw in options:
        # a non-default ignore_index: the ignored positions carry it
        y = y_default if "ignore_index" not in kw else torch.where(y_default == -100, kw["ignore_index"], y_default)
        truth, gtruth, gscale = _kdim_truth(x, y, **kw)
        for reduction in ("none", "sum", "mean"):
            ours = crossent.cross_entropy(x, y, reduction=reduction, validate=False, **kw)
            ref = F.cross_entropy(x, y, reduction=reduction, **kw)
            _close(ours, ref, equal_nan=True)  # C = 1 with ignore_index 0: all ignored, mean 0/0
            # a grad_output other than the one a plain backward() sends
            go = torch.rand(ours.shape, generator=g) + 0.5 if reduction == "none" else torch.tensor(0.37)
            (gx,) = torch.autograd.grad(ours, x, go)
            _close(gx, torch.autograd.grad(ref, x, go)[0], equal_nan=True)
            if reduction == "none":  # per position, in ulps of the float64 truth
                gbound, lbound = _ulp_bound(x)
                assert (_ulps(ours, truth) <= lbound).all(), kw
                gt = gtruth * go.double().unsqueeze(1)
                assert (_ulps(gx, gt, gscale * go.double().unsqueeze(1)) <= gbound).all(), kw
    # 'none': one call; 'sum'/'mean' pre-scale the gradient for a plain backward(), so the
    # grad_output 0.37 makes backward recompute it unscaled with the same kernel: two calls
    assert len(calls) == len(options) * (1 + 2 + 2)


@needs_kernel
@pytest.mark.parametrize("C", [3, 21, 300])
def test_kdim_extremes_ties_infinities_nan_and_wide_margins(monkeypatch, C):
    """Per position: ties (first arg-max), +-inf logits (finite limits), an all -inf
    position (log C), a NaN (NaN loss and gradient at that position only; at an ignored
    position: 0 and 0), wide margins (tiny losses keep their relative precision)."""
    calls = _spy_kernels(monkeypatch)
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, 4, 5, generator=g)
    y = torch.randint(0, C, (2, 4, 5), generator=g)
    x[0, :, 0, 0] = 3.0  # all tied
    x[0, 0, 0, 1] = x[0, C - 1, 0, 1] = 7.0  # two tied maxima, target the second
    y[0, 0, 1] = C - 1
    x[0, 1 % C, 0, 2] = math.inf  # one +inf
    x[0, 0, 0, 3] = x[0, C - 1, 0, 3] = math.inf  # two +inf
    x[0, :, 0, 4] = -math.inf  # all -inf: log C
    x[0, C // 2, 1, 0] = -math.inf  # one -inf
    x[1, C // 2, 2, 1] = math.nan
    x[1, 0, 2, 2] = math.nan  # ignored: 0 loss, 0 gradient
    y[1, 2, 2] = -100
    for i, margin in enumerate((20.0, 40.0, 80.0, 100.0)):  # exp(-margin): losses down to 1e-44
        x[1, :, 3, i] = 0.0
        x[1, 0, 3, i] = margin
        y[1, 3, i] = 0
    xr = x.clone().requires_grad_()
    for kw in ({}, {"label_smoothing": 0.1, "weight": torch.rand(C, generator=g) + 0.1}):
        loss = crossent.cross_entropy(xr, y, reduction="none", validate=False, **kw)
        (gx,) = _grad(loss.sum(), xr)
        truth, gtruth, gscale = _kdim_truth(x, y, **kw)
        nan_pos = torch.zeros(2, 4, 5, dtype=torch.bool)
        nan_pos[1, 2, 1] = True
        # an ignored NaN position: exactly 0 loss and gradient, with or without smoothing
        # (the rule in functional._reduction; torch's gradient there is NaN)
        ignored = torch.zeros(2, 4, 5, dtype=torch.bool)
        ignored[1, 2, 2] = True
        assert loss[1, 2, 2].item() == 0 and torch.equal(gx[1, :, 2, 2], torch.zeros(C))
        assert torch.equal(loss.isnan(), nan_pos)
        assert torch.equal(gx.isnan(), nan_pos.unsqueeze(1).expand_as(gx))
        assert torch.equal(torch.isfinite(loss), torch.isfinite(truth))
        gbound, lbound = _ulp_bound(x)
        assert (_ulps(loss, truth) <= lbound).all(), kw
        fin = ~(nan_pos | ignored).unsqueeze(1).expand_as(gx)
        assert (_ulps(gx[fin], gtruth[fin], gscale[fin]) <= gbound[fin.numpy()]).all(), kw
        # margins 20, 40, 80 (exact z: 8 ulps flat); at 100 the loss is subnormal (few bits)
        margins = (slice(1, 2), slice(None), slice(3, 4), slice(0, 3))
        assert _ulps(loss[1, 3, :3], truth[1, 3, :3]).max() <= 8
        assert _ulps(gx[margins], gtruth[margins], gscale[margins]).max() <= 8
        if not kw:
            assert loss[1, 3, 3].item() == pytest.approx(truth[1, 3, 3].item(), rel=1e-2)  # subnormal, not 0
            assert loss[0, 0, 4].item() == pytest.approx(math.log(C), rel=1e-6)
        ref = F.cross_entropy(xr, y, reduction="none", **kw)  # torch agrees where it is finite
        ok = torch.isfinite(ref) & ~nan_pos  # torch: 0 for an ignored NaN position
        _close(loss[ok], ref[ok])
    assert calls


@needs_kernel
def test_kdim_empty_inputs_and_out_of_range_targets(monkeypatch):
    for shape in ((0, 4, 3, 5), (2, 4, 0), (2, 4, 3, 0)):
        x = torch.randn(*shape, requires_grad=True)
        y = torch.zeros((shape[0],) + shape[2:], dtype=torch.long)
        ours = crossent.cross_entropy(x, y, reduction="sum")
        assert ours.item() == 0
        assert torch.isnan(crossent.cross_entropy(x, y))
        assert _grad(ours, x)[0].shape == x.shape
    calls = _spy_kernels(monkeypatch)
    x = torch.randn(2, 4, 3, 5, requires_grad=True)
    for bad in (4, -1, 1 << 40):
        y = torch.randint(0, 4, (2, 3, 5))
        y[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"class indices in \[0, 4\).*1 target\(s\) outside it"):
            crossent.cross_entropy(x, y, validate=False)
    assert len(calls) == 3


@needs_kernel
def test_kdim_lane_kernel_accumulates_many_classes_accurately(monkeypatch):
    """A lane sums C terms; float64 accumulation keeps the loss within a few ulp for any C."""
    calls = _spy_kernels(monkeypatch)
    g = torch.Generator().manual_seed(40)
    x = (torch.randn(1, 5000, 3, 3, generator=g) * 2).requires_grad_()
    y = torch.randint(0, 5000, (1, 3, 3), generator=g)
    loss = crossent.cross_entropy(x, y, reduction="none")
    truth, gtruth, gscale = _kdim_truth(x, y)
    gbound, lbound = _ulp_bound(x)
    assert (_ulps(loss, truth) <= lbound).all()
    assert (_ulps(_grad(loss.sum(), x)[0], gtruth, gscale) <= gbound).all()
    assert calls


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    N=st.integers(0, 3),
    C=st.integers(1, 12),
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    smooth=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
    data=st.data(),
)
def test_kdim_lane_kernel_agrees_with_reference_on_random_shapes(N, C, spatial, smooth, weighted, data):
    """Property: on random (N, C, d1..dK) shapes and logits (+-inf, ties, big values), the
    automatic backend (the lane kernel) gives the reference's values and gradients, finite
    exactly where the reference is."""
    shape = (N, C, *spatial)
    n = math.prod(shape)
    x = torch.tensor(data.draw(st.lists(_LOGIT, min_size=n, max_size=n)), dtype=torch.float32).view(shape)
    y = torch.tensor(
        data.draw(st.lists(st.integers(0, C - 1), min_size=n // C, max_size=n // C)), dtype=torch.long
    ).view((N, *spatial))
    if y.numel():
        y.view(-1)[0] = -100
    w = torch.rand(C) + 0.1 if weighted else None
    outs = []
    for b in ("chunked", "reference"):
        xr = x.clone().requires_grad_()
        loss = crossent.cross_entropy(
            xr, y, weight=w, label_smoothing=smooth, reduction="none", backend=b, validate=False
        )
        outs.append((loss.detach(), _grad(loss.sum(), xr)[0]))
    for ours, ref in zip(*outs):
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        fin = torch.isfinite(ref)
        assert_close(ours[fin], ref[fin])


@needs_kernel
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kdim_option_free_call_equals_the_call_with_neutral_options(monkeypatch, reduction):
    """No weights, no smoothing, nothing ignored (the lane kernel with c NULL, all 1, and a
    host-computed 1/(N*S)) gives what class weights of 1 give (the general path), for the
    loss, two backwards (retain_graph), a scaled backward and double backward."""
    calls = _spy_kernels(monkeypatch)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 7, 5, 9, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (3, 5, 9), generator=g)

    def run(**kw):
        loss = crossent.cross_entropy(x, y, reduction=reduction, validate=False, **kw)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g3,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
        (gg,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad(gg.square().sum(), x)
        return loss.detach(), g1, g2, g3, h

    fast = run()
    assert calls
    for a, b in zip(fast, run(weight=torch.ones(7))):
        _close(a, b)
    ref = F.cross_entropy(x, y, reduction=reduction)
    _close(fast[0], ref.detach())
    _close(fast[1], _grad(ref, x)[0])
