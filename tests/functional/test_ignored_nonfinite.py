"""NaN and +-inf at ignored positions: exactly zero loss and gradient, on every backend.

The rule (``crossent.functional._reduction``): an element or row equal to ``ignore_index``
gives exactly 0 loss and exactly 0 gradient whatever its input holds, also w.r.t. class
weights, per-element weights and targets; everything else equals torch's result on the
same input with the ignored positions replaced by a finite value. torch itself gives a
NaN gradient row for an ignored NaN row (which then poisons the layer below); crossent
does better, so the expectation is torch on the *sanitised* input, not torch on the raw one.

Backends: ``reference``, ``chunked`` (the compiled C kernel), ``chunked-torch`` and
``triton`` through its interpreter on CPU (as in ``tests/backends/test_triton.py``; skipped without
triton). The fused linear ops are covered with NaN/inf in the hidden rows (and, for BCE,
weight rows) whose targets are all ignored. A hypothesis fuzz compares every CPU backend
with torch on random shapes and options: a fast profile by default, a long one behind the
``slow`` marker (``pytest -m slow tests/functional/test_ignored_nonfinite.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import crossent  # noqa: E402
from crossent.backends import chunked, chunked_cpp  # noqa: E402

from _helpers import ALL_BACKENDS, CPU_BACKENDS, assert_close  # noqa: E402

NAN, INF = float("nan"), float("inf")
BAD = {"nan": NAN, "+inf": INF, "-inf": -INF}
REDUCTIONS = ("none", "mean", "sum")
BCE_OPTS = ("plain", "weighted", "smoothed")
CE_OPTS = ("plain", "weighted", "smoothed", "weighted+smoothed")
BACKENDS = ALL_BACKENDS  # the `backend` fixture of tests/conftest.py: Triton (interpreter) included

pytestmark = [
    # The interpreter evaluates both sides of tl.where with numpy (inf * 0 and inf - inf warn).
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    # C = 1 is here on purpose (crossent warns that a single class learns nothing).
    pytest.mark.filterwarnings("ignore:cross_entropy. the input has a single class"),
    # The fuzz draws fully ignored batches on purpose (the warning is tested in test_guardrails_extra).
    pytest.mark.filterwarnings("ignore:.*targets equal ignore_index"),
]


@pytest.fixture(autouse=True)
def _small_blocks(request, monkeypatch):
    """Chunks of 16 elements (chunked-torch) and 4-class tiles (Triton's fused linear
    kernels), so that even these small inputs span many blocks."""
    if "backend" not in request.fixturenames:
        return
    name = request.getfixturevalue("backend")
    if name == "chunked-torch":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 16)
    if name == "triton":
        from crossent.backends.triton import linear as triton_linear

        monkeypatch.setattr(triton_linear, "BLOCK_C_MAX", 4)


def _bad(k: int, rotation: int) -> float:
    """The k-th non-finite value of a case: NaN, +inf, -inf in turn, starting at ``rotation``.
    The grid tests take the rotation from their other parameters, so that over the options
    (or reductions) of one backend every kind of ignored position holds every value."""
    return tuple(BAD.values())[(k + rotation) % 3]


def _rotation(reduction: str, opts: str, all_opts) -> int:
    return (REDUCTIONS.index(reduction) + all_opts.index(opts)) % 3


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _assert_zero_where(grad, ignored, what):
    """Ignored entries: exactly 0 (+0 or -0); everything: finite (kept inputs are finite)."""
    assert grad is not None, what
    assert bool(torch.isfinite(grad).all()), f"{what}: non-finite gradient\n{grad}"
    assert bool((grad[ignored] == 0).all()), f"{what}: non-zero gradient at ignored entries\n{grad}"


def _reduce(loss, keep_weight, reduction):
    """torch's reduction of per-element losses, ``mean`` over the kept weight (nothing kept:
    nan with a zero gradient, the documented rule, as torch's cross-entropy does)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    den = keep_weight.sum()
    empty = den == 0
    return torch.where(empty, NAN, loss.sum() / torch.where(empty, 1.0, den))


# ------------------------------------------------------------------ BCE with logits
def _bce_case(seed, shape=(6, 5), n_bad=4):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    ignored = torch.zeros(shape, dtype=torch.bool)
    ignored.view(-1)[torch.randperm(ignored.numel(), generator=g)[:n_bad]] = True
    ignored.view(-1)[0] = False  # one kept element at least
    return x, t, ignored


def _compare_linear(loss, expected, ours, theirs, backend):
    """Loss and the gradients w.r.t. (input, linear_weight, linear_bias) under a non-uniform
    grad_output equal torch's; returns ours."""
    assert_close(loss.detach(), expected.detach(), msg=f"{backend} loss")
    gw = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    got = torch.autograd.grad((loss * gw).sum(), list(ours))
    want = torch.autograd.grad((expected * gw).sum(), list(theirs))
    for name, a, bb in zip(["input", "linear_weight", "linear_bias"], got, want):
        assert_close(a, bb, msg=f"{backend} d/d{name}", tol="f32_matmul")
    return got


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", BCE_OPTS)
@pytest.mark.parametrize("probabilities", [False, True], ids=["logits", "probs"])
def test_bce_ignored_elements(backend, reduction, opts, probabilities):
    """BCE / BCE-with-logits with ignore_index (a crossent extension): torch's values on the
    sanitised input (ignored elements masked through ``weight``), exact zeros at ignored
    elements in the input, target, weight and pos_weight gradients."""
    x, t, ignored = _bce_case(1)
    keep = ~ignored
    x = torch.sigmoid(x) if probabilities else x
    ii = 2
    r = _rotation(reduction, opts, BCE_OPTS)
    raw_x = x.float()
    raw_x[ignored] = torch.tensor([_bad(k, r) for k in range(int(ignored.sum()))])
    raw_t = t.masked_fill(ignored, ii).float()
    w = (0.5 + torch.rand(x.shape, generator=torch.Generator().manual_seed(2))).float()
    pw = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5])
    eps = 0.1 if opts == "smoothed" else 0.0
    weighted = opts == "weighted"
    if probabilities and weighted:
        pw = None  # torch's BCE on probabilities has no pos_weight
    kw = dict(weight=None, pos_weight=None)
    if weighted:
        kw = dict(weight=_leaf(w), pos_weight=None if pw is None else _leaf(pw))
    xl, tl = _leaf(raw_x), _leaf(raw_t)
    fn = crossent.binary_cross_entropy if probabilities else crossent.binary_cross_entropy_with_logits
    loss = fn(xl, tl, reduction=reduction, ignore_index=ii, label_smoothing=eps, backend=backend, **kw)

    # torch on the sanitised input: ignored elements replaced (x: 0.5 / 0, target: 0) and
    # weighted by 0, through torch.where so that their gradients are exactly 0 too
    ex, et = _leaf(raw_x), _leaf(raw_t)
    x_ok = torch.where(keep, ex, 0.5 if probabilities else 0.0)
    t_ok = torch.where(keep, et, 0.0) * (1 - eps) + eps / 2
    ew = _leaf(w) if weighted else None
    epw = _leaf(pw) if weighted and pw is not None else None
    w_ok = keep.float() if ew is None else torch.where(keep, ew, 0.0)
    # torch's losses are not differentiable in `weight` or `pos_weight`: the weight is the
    # same product taken outside, and with pos_weight the gradients come from the formula
    # p t softplus(-x) + (1 - t) softplus(x), the values from torch
    if probabilities:
        per = F.binary_cross_entropy(x_ok, t_ok, reduction="none") * w_ok
    elif epw is None:
        per = F.binary_cross_entropy_with_logits(x_ok, t_ok, reduction="none") * w_ok
    else:
        values = F.binary_cross_entropy_with_logits(
            x_ok.detach(), t_ok.detach(), weight=w_ok.detach(), pos_weight=pw, reduction="none"
        )
        per = (epw * t_ok * F.softplus(-x_ok) + (1 - t_ok) * F.softplus(x_ok)) * w_ok
        assert_close(per.detach(), values, msg="the formula is torch's")
    expected = _reduce(per, keep.float(), reduction)
    assert_close(loss.detach(), expected.detach(), msg=f"{backend} loss")
    if reduction == "none":
        assert bool((loss.detach()[ignored] == 0).all())

    pairs = {"input": (xl, ex), "target": (tl, et)}
    if weighted:
        pairs["weight"] = (kw["weight"], ew)
    if epw is not None:
        pairs["pos_weight"] = (kw["pos_weight"], epw)
    gw = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    got = torch.autograd.grad((loss * gw).sum(), [a for a, _ in pairs.values()])
    want = torch.autograd.grad((expected * gw).sum(), [b for _, b in pairs.values()])
    for name, a, b in zip(pairs, got, want):
        assert_close(
            a, b, torch.float32, msg=f"{backend} d/d{name}", **({"atol": 2e-5} if name == "pos_weight" else {})
        )
        if name != "pos_weight":
            _assert_zero_where(a, ignored, f"{backend} d/d{name}")


# ------------------------------------------------------------------ cross-entropy
CE_SHAPES = {
    "rows-C1": (6, 1),
    "rows-C5": (7, 5),
    "rows-C37": (5, 37),  # several Triton class tiles (CE_BLOCK_C_MAX = 16)
    "kdim-2x4x3x8": (2, 4, 3, 8),  # S = 24: full 8-lane vectors, one of them all ignored
    "kdim-2x4x3x5": (2, 4, 3, 5),  # S = 15: a partial vector
}


def _ce_case(shape, rotation, seed=0):
    """Logits with NaN/inf in ignored rows (positions): in turn a whole row of a bad value,
    one at the arg-max, one in the middle (the values rotate: :func:`_bad`); targets with
    ignore_index there."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = 2 * torch.randn(shape, generator=g)
    y = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    if len(shape) == 2:
        ignored = torch.zeros(shape[0], dtype=torch.bool)
        ignored[[1, 3, shape[0] - 1]] = True
        rows = x
    else:
        ignored = torch.zeros(y.shape, dtype=torch.bool)
        ignored[0, 0, :] = True  # a whole vector of 8 lanes
        ignored[1, 1, 2] = ignored[1, 2, 0] = ignored[0, 2, 4] = True
        rows = x.movedim(1, -1)  # a view: (N, H, W, C)
    idx = ignored.nonzero()
    for n, pos in enumerate(idx.tolist()):
        r = rows[tuple(pos)]
        v = _bad(n, rotation)
        if n % 3 == 0:
            r.fill_(v)
        elif n % 3 == 1:
            r[r.argmax()] = v
        else:
            r[C // 2] = v
    return x, y, ignored


def _ce_math(x, y, keep, weight, eps, reduction, C):
    """Cross-entropy from the definition in float64 (log_softmax, then the weighted sum),
    differentiable w.r.t. ``weight``; ignored rows must hold finite values."""
    class_dim = 1
    nlp = -torch.log_softmax(x.double(), dim=class_dim).movedim(class_dim, -1).reshape(-1, C)
    yy = torch.where(keep, y, 0).reshape(-1)
    kk = keep.reshape(-1).double()
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    per = (1 - eps) * w[yy] * nlp.gather(1, yy[:, None]).squeeze(1) + (eps / C) * (nlp * w).sum(1)
    per = per * kk
    den = (w[yy] * kk).sum()
    if reduction == "none":
        return per.reshape(y.shape)
    return per.sum() if reduction == "sum" else per.sum() / den


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", CE_OPTS)
@pytest.mark.parametrize("shape", list(CE_SHAPES), ids=list(CE_SHAPES))
def test_cross_entropy_ignored_rows(backend, reduction, opts, shape):
    """Rows and (N, C, H, W) positions with ignore_index: torch's value and input gradient
    on the sanitised logits; the class-weight gradient against float64 math; exact zeros."""
    shape = CE_SHAPES[shape]
    C = shape[1]
    x, y, ignored = _ce_case(shape, _rotation(reduction, opts, CE_OPTS))
    ii = -100 if len(shape) == 2 else 255
    y = y.masked_fill(ignored, ii)
    keep = ~ignored
    keep_c = keep.unsqueeze(1).expand(x.shape)
    eps = 0.1 if "smoothed" in opts else 0.0
    w = torch.linspace(0.5, 2.0, C) if "weighted" in opts else None

    xl = _leaf(x)
    wl = None if w is None else _leaf(w)
    loss = crossent.cross_entropy(
        xl, y, weight=wl, ignore_index=ii, reduction=reduction, label_smoothing=eps, backend=backend
    )
    ex = _leaf(x)
    x_ok = torch.where(keep_c, ex, 0.0)
    expected = F.cross_entropy(x_ok, y, weight=w, ignore_index=ii, reduction=reduction, label_smoothing=eps)
    assert_close(loss.detach(), expected.detach(), msg=f"{backend} loss")
    if reduction == "none":
        assert bool((loss.detach()[ignored] == 0).all())

    gw = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    got = torch.autograd.grad((loss * gw).sum(), [xl] + ([wl] if wl is not None else []))
    (want,) = torch.autograd.grad((expected * gw).sum(), [ex])
    assert_close(got[0], want, msg=f"{backend} d/dinput")
    _assert_zero_where(got[0], keep_c.logical_not(), f"{backend} d/dinput")
    if wl is not None:
        mw = _leaf(w)
        truth = _ce_math(torch.where(keep_c, x, 0.0), y, keep, mw, eps, reduction, C)
        (want_w,) = torch.autograd.grad((truth * gw.double()).sum(), [mw])
        assert_close(got[1], want_w.float(), torch.float32, msg=f"{backend} d/dweight")


@pytest.mark.parametrize("bad", list(BAD))
def test_cross_entropy_nonfinite_ignored_row_example(backend, bad):
    """``x=[[1, 2, .5], [nan, 0, 0]], y=[0, -100]`` gives torch's 1.464369 and a
    zero gradient row for the ignored one (torch's own gradient row is NaN there)."""
    xl = torch.tensor([[1.0, 2.0, 0.5], [BAD[bad], 0.0, 0.0]], requires_grad=True)
    loss = crossent.cross_entropy(xl, torch.tensor([0, -100]), backend=backend)
    expected = F.cross_entropy(torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]), torch.tensor([0, -100]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(1.464369, rel=1e-6)
    loss.backward()
    assert torch.equal(xl.grad[1], torch.zeros(3))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_kept_row_with_minus_zero_class_weight_is_not_ignored(backend, smoothing):
    """Ignored rows reach the C kernel as coefficient -0.0; a kept row whose class weight
    is -0.0 must still be computed (with smoothing its loss is not 0)."""
    x = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])
    w = torch.tensor([-0.0, 1.0, 2.0])
    y = torch.tensor([0, 2])
    xl = _leaf(x)
    loss = crossent.cross_entropy(xl, y, weight=w, reduction="none", label_smoothing=smoothing, backend=backend)
    ex = _leaf(x)
    expected = F.cross_entropy(ex, y, weight=w, reduction="none", label_smoothing=smoothing)
    assert_close(loss.detach(), expected.detach())
    assert_close(torch.autograd.grad(loss.sum(), xl)[0], torch.autograd.grad(expected.sum(), ex)[0])


@pytest.mark.parametrize("rotation", [0, 1, 2])
def test_cross_entropy_inplace_ignored_rows(backend, rotation):
    """``inplace_backward=True`` (the gradient written over the logits) gives zero rows too."""
    if backend == "reference":
        pytest.skip("reference has no in-place cross-entropy")
    x, y, ignored = _ce_case((7, 5), rotation)
    y = y.masked_fill(ignored, -100)
    base = _leaf(x)
    logits = base * 1.0  # not a leaf: its buffer may hold the gradient
    loss = crossent.cross_entropy(logits, y, inplace_backward=True, backend=backend)
    ex = _leaf(x)
    expected = F.cross_entropy(torch.where(~ignored[:, None], ex, 0.0), y)
    assert_close(loss.detach(), expected.detach())
    loss.backward()
    expected.backward()
    assert_close(base.grad, ex.grad)
    _assert_zero_where(base.grad, ignored, "in-place d/dinput")


# ------------------------------------------------------------------ fused linear ops
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", BCE_OPTS)
def test_linear_cross_entropy_ignored_hidden_rows(backend, reduction, opts):
    """NaN/inf in the hidden rows of ignored targets: torch's values and gradients on the
    sanitised hidden states (torch's own W gradient would be all NaN), zero x gradient there."""
    g = torch.Generator().manual_seed(3)
    N, H, C = 7, 4, 9
    x = torch.randn(N, H, generator=g)
    W = torch.randn(C, H, generator=g)
    b = torch.randn(C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    ignored = torch.zeros(N, dtype=torch.bool)
    ignored[[1, 4]] = True
    y = y.masked_fill(ignored, -100)
    r = _rotation(reduction, opts, BCE_OPTS)
    x[1].fill_(_bad(0, r))
    x[4, 2] = _bad(1, r)
    eps = 0.1 if opts == "smoothed" else 0.0
    w = torch.linspace(0.5, 2.0, C) if opts == "weighted" else None
    xl, Wl, bl = _leaf(x), _leaf(W), _leaf(b)
    loss = crossent.linear_cross_entropy(
        xl, Wl, y, linear_bias=bl, weight=w, reduction=reduction, label_smoothing=eps, backend=backend
    )
    ex, eW, eb = _leaf(x), _leaf(W), _leaf(b)
    logits = F.linear(torch.where(ignored[:, None], 0.0, ex), eW, eb)
    expected = F.cross_entropy(logits, y, weight=w, reduction=reduction, label_smoothing=eps)
    got = _compare_linear(loss, expected, (xl, Wl, bl), (ex, eW, eb), backend)
    _assert_zero_where(got[0], ignored, f"{backend} d/dinput")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", BCE_OPTS)
def test_linear_bce_ignored_rows_and_labels(backend, reduction, opts):
    """Multi-label head with ignore_index: NaN/inf in a hidden row whose labels are all
    ignored, in a weight row (and bias) of a label ignored in every row, and scattered
    ignored elements; torch on the sanitised operands, zero gradients there."""
    g = torch.Generator().manual_seed(4)
    N, H, L = 6, 3, 5
    x = torch.randn(N, H, generator=g)
    W = torch.randn(L, H, generator=g)
    b = torch.randn(L, generator=g)
    t = torch.randint(0, 2, (N, L), generator=g).float()
    ii = 7
    ignored = torch.zeros(N, L, dtype=torch.bool)
    ignored[2] = True  # hidden row 2: every label ignored
    ignored[:, 3] = True  # label 3: ignored in every row
    ignored[0, 1] = ignored[5, 4] = True
    t = t.masked_fill(ignored, ii)
    r = _rotation(reduction, opts, BCE_OPTS)
    x[2, 1] = _bad(0, r)
    W[3].fill_(_bad(1, r))
    b[3] = _bad(2, r)
    keep = ~ignored
    eps = 0.1 if opts == "smoothed" else 0.0
    pw = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5]) if opts == "weighted" else None
    w = torch.linspace(0.5, 2.0, L) if opts == "weighted" else None
    xl, Wl, bl = _leaf(x), _leaf(W), _leaf(b)
    loss = crossent.linear_binary_cross_entropy_with_logits(
        xl,
        Wl,
        t,
        linear_bias=bl,
        weight=w,
        pos_weight=pw,
        reduction=reduction,
        label_smoothing=eps,
        ignore_index=ii,
        backend=backend,
    )
    ex, eW, eb = _leaf(x), _leaf(W), _leaf(b)
    dead_row, dead_label = ~keep.any(1), ~keep.any(0)
    logits = F.linear(
        torch.where(dead_row[:, None], 0.0, ex),
        torch.where(dead_label[:, None], 0.0, eW),
        torch.where(dead_label, 0.0, eb),
    )
    t_ok = torch.where(keep, t, 0.0) * (1 - eps) + eps / 2
    w_ok = keep.float() if w is None else keep.float() * w
    per = F.binary_cross_entropy_with_logits(logits, t_ok, weight=w_ok, pos_weight=pw, reduction="none")
    expected = _reduce(per, keep.float(), reduction)
    got = _compare_linear(loss, expected, (xl, Wl, bl), (ex, eW, eb), backend)
    _assert_zero_where(got[0], dead_row, f"{backend} d/dinput")
    _assert_zero_where(got[1], dead_label, f"{backend} d/dlinear_weight")
    _assert_zero_where(got[2], dead_label, f"{backend} d/dlinear_bias")


# ------------------------------------------------------------------ differential fuzz
@st.composite
def _fuzz_cases(draw):
    kind = draw(st.sampled_from(["bce_logits", "bce", "ce_rows", "ce_kdim"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    reduction = draw(st.sampled_from(REDUCTIONS))
    eps = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
    weighted = draw(st.booleans())
    bad_values = draw(st.lists(st.sampled_from(list(BAD.values())), min_size=1, max_size=6))
    if kind.startswith("bce"):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    elif kind == "ce_rows":
        shape = (draw(st.integers(1, 40)), draw(st.integers(1, 70)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 5)), draw(st.integers(1, 19)))
    return kind, shape, reduction, eps, weighted, bad_values, g


def _fuzz_one(case):
    kind, shape, reduction, eps, weighted, bad_values, g = case
    if kind.startswith("bce"):
        x = 4 * torch.randn(shape, generator=g)
        if kind == "bce":
            x = torch.sigmoid(x)
        t = torch.rand(shape, generator=g)
        ignored = torch.rand(shape, generator=g) < 0.3
        flat = x.view(-1)
        cand = ignored.view(-1).nonzero().squeeze(1)
        for i, v in zip(cand.tolist(), bad_values):
            flat[i] = v
        keep = ~ignored
        tt = t.masked_fill(ignored, 2)
        w = 0.5 + torch.rand(shape, generator=g) if weighted else None
        x_ok = torch.where(keep, x, 0.5 if kind == "bce" else 0.0)
        t_ok = torch.where(keep, t, 0.0) * (1 - eps) + eps / 2
        w_ok = keep.float() if w is None else keep.float() * w
        ex = _leaf(x_ok)
        if kind == "bce":
            per = F.binary_cross_entropy(ex, t_ok, weight=w_ok, reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(ex, t_ok, weight=w_ok, reduction="none")
        expected = _reduce(per, keep.float(), reduction)
        fn = crossent.binary_cross_entropy if kind == "bce" else crossent.binary_cross_entropy_with_logits
        call = lambda xl, b: fn(
            xl,
            tt,
            weight=w,
            reduction=reduction,
            ignore_index=2,  # noqa: E731
            label_smoothing=eps,
            backend=b,
        )
        ignored_x = ignored
    else:
        C = shape[1]
        x = 3 * torch.randn(shape, generator=g)
        y = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
        ignored = torch.rand(y.shape, generator=g) < 0.3
        rows = x.movedim(1, -1)
        for pos, v in zip(ignored.nonzero().tolist(), bad_values):
            r = rows[tuple(pos)]
            r[int(torch.randint(0, C, (1,), generator=g))] = v
        ii = -100 if kind == "ce_rows" else 255
        y = y.masked_fill(ignored, ii)
        w = 0.25 + torch.rand(C, generator=g) if weighted else None
        keep_c = (~ignored).unsqueeze(1).expand(x.shape)
        ex = _leaf(torch.where(keep_c, x, 0.0))
        expected = F.cross_entropy(ex, y, weight=w, ignore_index=ii, reduction=reduction, label_smoothing=eps)
        call = lambda xl, b: crossent.cross_entropy(
            xl,
            y,
            weight=w,
            ignore_index=ii,  # noqa: E731
            reduction=reduction,
            label_smoothing=eps,
            backend=b,
        )
        ignored_x = ~keep_c
    gw = torch.rand(expected.shape, generator=g) + 0.5
    if expected.numel() and expected.requires_grad:
        (want,) = torch.autograd.grad((expected * gw).sum(), [ex])
    else:
        want = torch.zeros_like(x)
    for b in CPU_BACKENDS:
        if b == "chunked" and chunked_cpp.get() is None:
            continue
        xl = _leaf(x)
        loss = call(xl, b)
        # torch's empty / all-ignored mean is nan with a zero gradient, ours too
        assert_close(loss.detach(), expected.detach(), msg=f"{b} {kind} {tuple(shape)} loss")
        (got,) = torch.autograd.grad((loss * gw).sum(), [xl], allow_unused=True)
        got = torch.zeros_like(x) if got is None else got
        assert_close(got, want, msg=f"{b} {kind} {tuple(shape)} d/dinput", tol="f32_matmul")
        _assert_zero_where(got, ignored_x, f"{b} {kind} {tuple(shape)}")


_FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=50, **_FUZZ_SETTINGS)
@given(_fuzz_cases())
def test_fuzz_ignored_nonfinite_against_torch(case):
    """Random shapes, options and NaN/inf at ignored positions: every CPU backend gives
    torch's values and input gradients on the sanitised input, exact zeros where ignored."""
    _fuzz_one(case)


@pytest.mark.slow
@settings(max_examples=3000, **_FUZZ_SETTINGS)
@given(_fuzz_cases())
def test_fuzz_ignored_nonfinite_against_torch_long(case):
    """The same fuzz, long profile (``pytest -m slow``)."""
    _fuzz_one(case)
