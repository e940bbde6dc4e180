"""The fast paths for small inputs change nothing: every shortcut taken on CPU gives the
same values, gradients, errors and warnings as the general path it skips.

How many torch calls the shortcuts save is measured, not tested: benchmarks/op_counts.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import crossent
from crossent import _validation as V
from crossent.backends import Backend, _registry, chunked, dispatch, reference
from crossent.functional import _multiclass
from _helpers import assert_close
from crossent.functional._reduction import reduce_loss


def _classifier(M=64, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, C, generator=g).requires_grad_(), torch.randint(0, C, (M,), generator=g)


def _needs_kernel():
    if chunked._cpp() is None:  # the chunked torch-ops fallback does more, smaller calls
        pytest.skip("compiled CPU kernel unavailable")


# ------------------------------------------------------------------ value tier on CPU
def test_softmax_heuristic_judges_what_it_reads_on_cpu():
    """Mixed-sign logits pass without a warning; softmax and log_softmax outputs warn
    (the CPU path reads the sign range first and skips the row sums it makes unnecessary:
    benchmarks/op_counts.py counts them)."""
    x, _ = _classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V.check_logits_not_probabilities("f", x, 1)
    p = x.detach().softmax(1)
    with pytest.warns(crossent.CrossentWarning, match="looks like softmax"):
        V.check_logits_not_probabilities("f", p, 1)
    V.reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match="looks like log_softmax"):
        V.check_logits_not_probabilities("f", x.detach().log_softmax(1), 1)


@pytest.mark.parametrize("make", ["logits", "softmax", "log_softmax", "nan_first_row", "non_negative"])
def test_plain_call_warns_exactly_as_the_general_path(monkeypatch, make):
    """The plain call hands the heuristic the sign range its kernel read
    (``chunked_cpp.ce_index_plain``); the warnings are those of the general path, which
    reads the rows itself, for inputs of every kind the heuristic tells apart."""
    _needs_kernel()
    x, y = _classifier(M=100, C=12, seed=3)
    z = {
        "logits": x.detach(),
        "softmax": x.detach().softmax(1),
        "log_softmax": x.detach().log_softmax(1),
        "nan_first_row": x.detach().index_fill(0, torch.tensor([0]), float("nan")),
        "non_negative": x.detach().abs(),  # no sign change, rows do not sum to 1
    }[make]

    def warned():
        V.reset_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            crossent.cross_entropy(z.clone().requires_grad_(), y)
        return [str(w.message) for w in caught]

    taken = []
    real = chunked.plain_cross_entropy
    monkeypatch.setattr(chunked, "plain_cross_entropy", lambda *a: taken.append(a[3]) or real(*a))
    fast = warned()
    assert taken == [V.softmax_rows_to_inspect(12)]
    monkeypatch.setattr(_multiclass, "_plain_call", lambda *a: None)
    assert fast == warned()
    assert bool(fast) == (make in ("softmax", "log_softmax"))


def test_kernel_reads_the_sample_range_and_refuses_out_of_range_targets():
    """``ce_index_plain``: the (min, max) of the first rows (NaN when one is NaN, all rows
    when fewer), and for a target outside [0, C) None with nothing written."""
    _needs_kernel()
    cpp = chunked._cpp()
    x, y = _classifier(M=50, C=13, seed=4)
    x = x.detach()
    grad = torch.empty_like(x)
    for rows in (1, 7, 50, 80):
        loss, (lo, hi) = cpp.ce_index_plain(x, y, grad, 1.0, rows)
        assert (lo, hi) == tuple(t.item() for t in torch.aminmax(x[:rows]))
        assert_close(loss, torch.nn.functional.cross_entropy(x, y, reduction="none"))
    assert cpp.ce_index_plain(x, y, grad, 1.0, 0)[1] is None
    xn = x.clone()
    xn[6, 12] = float("nan")
    assert all(v != v for v in cpp.ce_index_plain(xn, y, grad, 1.0, 7)[1])
    assert cpp.ce_index_plain(xn, y, grad, 1.0, 6)[1] == tuple(t.item() for t in torch.aminmax(x[:6]))
    for bad in (-100, -1, 13):
        yb = y.clone()
        yb[31] = bad
        grad.fill_(7.0)
        assert cpp.ce_index_plain(x, yb, grad, 1.0, 5) is None
        assert bool((grad == 7.0).all())  # nothing written


def test_index_check_decides_the_range_with_and_without_ignored_targets():
    """The CPU check masks ``ignore_index`` only when a target equals it (op counts:
    benchmarks/op_counts.py); the decision is the same either way."""
    V.check_class_indices("f", torch.tensor([0, 3, 2, 1]), 4, -100)
    V.check_class_indices("f", torch.tensor([0, -100, 2, -100]), 4, -100)
    with pytest.raises(crossent.CrossentIndexError, match=r"4 at position \(1,\)"):
        V.check_class_indices("f", torch.tensor([0, 4, 2, 1]), 4, -100)
    with pytest.raises(crossent.CrossentIndexError, match=r"-1 at position \(2,\)"):
        V.check_class_indices("f", torch.tensor([0, -100, -1, 1]), 4, -100)
    with pytest.raises(crossent.CrossentIndexError, match=r"7 at position \(0,\)"):
        V.check_class_indices("f", torch.tensor([7, -100, 0]), 4, -100)
    # ignore_index inside [0, C) is a class index like any other: no mask needed to pass
    V.check_class_indices("f", torch.tensor([0, 3, 3]), 4, 3)


# ------------------------------------------------------------------ reduction shortcuts
@pytest.mark.parametrize("den", ["tensor", "python", "zero", "zero-python"])
def test_reduce_loss_shortcuts_give_the_select_formula(den):
    """The CPU shortcut (read the denominator, divide) against the formula it replaces,
    written here from _reduction's docstring: nan for a zero denominator, with a zero
    gradient; sum / den otherwise."""
    g = torch.Generator().manual_seed(2)
    loss = torch.rand(7, generator=g).requires_grad_()
    value = {"tensor": torch.tensor(3.5), "python": 3, "zero": torch.tensor(0.0), "zero-python": 0}[den]
    out = reduce_loss(loss, value, "mean", out_dtype=torch.float32)
    d = torch.as_tensor(float(value))
    if float(value) == 0:
        assert torch.isnan(out)
        expected_grad = torch.zeros(7)
    else:
        assert out.item() == (loss.detach().sum() / d).item()
        expected_grad = torch.full((7,), (torch.ones(()) / d).item())
    (grad,) = torch.autograd.grad(out, loss)
    assert torch.equal(grad, expected_grad)


def test_sum_of_a_backend_total_is_that_total():
    total = torch.tensor(2.5, requires_grad=True)
    out = reduce_loss(total, None, "sum", out_dtype=torch.float32)
    assert out.item() == 2.5
    (grad,) = torch.autograd.grad(out, total)
    assert grad.item() == 1.0


def test_prescaled_gradient_is_used_as_is_on_small_inputs():
    """The 'mean' scale computed in forward (reciprocal of the denominator) must equal
    what autograd sends, bit for bit, or backward would redo the work: check by
    comparing with a backward that receives a different grad_output."""
    x, y = _classifier(M=37, C=5, seed=3)
    y[::4] = -100
    loss = crossent.cross_entropy(x, y)
    (g_fast,) = torch.autograd.grad(loss, x)
    loss = crossent.cross_entropy(x, y, reduction="sum")
    kept = (y != -100).sum().to(torch.float32)
    (g_sum,) = torch.autograd.grad(loss, x, grad_outputs=torch.ones(()) / kept)
    assert torch.equal(g_fast, g_sum)
    got = chunked.ce_grad_scale("mean", (y != -100).to(torch.float32), 37, x)
    assert got.item() == (torch.ones(()) / kept).item()


# ------------------------------------------------------------------ dispatch
def test_automatic_choice_is_the_fused_cpu_backend_at_every_size():
    """No size rule: the compiled/chunked backend is the fastest CPU backend measured from
    64 x 10 up (docs/performance.md), so tiny inputs dispatch like big ones."""
    for shape in [(1, 2), (64, 10), (512, 100)]:
        assert dispatch("cross_entropy", torch.zeros(shape)) is chunked.cross_entropy
        assert (
            dispatch("binary_cross_entropy_with_logits", torch.zeros(shape)) is chunked.binary_cross_entropy_with_logits
        )


def test_registry_order_is_kept_up_to_date_by_register(monkeypatch):
    monkeypatch.setattr(_registry, "_BACKENDS", dict(_registry._BACKENDS))
    monkeypatch.setattr(_registry, "_ORDER", list(_registry._ORDER))

    def marker(*args, **kwargs):
        raise AssertionError("not called")

    x = torch.zeros(2, 3)
    assert dispatch("cross_entropy", x) is chunked.cross_entropy
    _registry.register(Backend(name="test-first", priority=99, ops={"cross_entropy": marker}))
    assert _registry.available_backends()[0] == "test-first"
    assert dispatch("cross_entropy", x) is marker
    _registry.register(Backend(name="test-first", priority=-5, ops={"cross_entropy": marker}))
    assert _registry.available_backends()[-1] == "test-first"
    assert dispatch("cross_entropy", x) is chunked.cross_entropy


def test_environment_is_read_on_every_call(monkeypatch):
    x = torch.zeros(2, 3)
    assert dispatch("cross_entropy", x) is chunked.cross_entropy
    monkeypatch.setenv("CROSSENT_BACKEND", "reference")
    assert dispatch("cross_entropy", x) is reference.cross_entropy
    monkeypatch.setenv("CROSSENT_VALIDATE", "0")
    assert not V.validation_enabled()
    monkeypatch.setenv("CROSSENT_VALIDATE", "1")
    assert V.validation_enabled()


# ------------------------------------------------------------------ option fast paths
def test_option_fast_paths_refuse_what_the_full_checks_refuse():
    assert V.check_label_smoothing("f", 0.1) == 0.1
    for bad in (float("nan"), -0.1, 1.5, float("inf")):
        with pytest.raises(crossent.CrossentValueError, match="label_smoothing"):
            V.check_label_smoothing("f", bad)
    assert V.check_ignore_index("cross_entropy", -100) == -100
    assert V.check_ignore_index("cross_entropy", 0) == 0
    assert V.check_binary_ignore_index("binary_cross_entropy", -1) == -1
    for bad in (0, 1):
        with pytest.raises(crossent.CrossentValueError, match="different from the labels 0 and 1"):
            V.check_binary_ignore_index("binary_cross_entropy_with_logits", bad)
    with pytest.raises(crossent.CrossentTypeError):
        V.check_ignore_index("cross_entropy", True)


def test_small_calls_match_torch_values_and_gradients():
    """The end-to-end contract on the shapes the fast paths target (validation on)."""
    x, y = _classifier(M=64, C=10, seed=4)
    y[5] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = crossent.cross_entropy(x, y)
        (g_ours,) = torch.autograd.grad(ours, x)
    ref = torch.nn.functional.cross_entropy(x, y)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert_close(ours, ref)
    assert_close(g_ours, g_ref)
    z = torch.randn(256, 10, generator=torch.Generator().manual_seed(5)).requires_grad_()
    t = (torch.rand(256, 10) < 0.3).float()
    ours = crossent.binary_cross_entropy_with_logits(z, t)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(z, t)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0])


# ------------------------------------------------------------------ plain-rows kernel path
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_call_is_bitwise_the_general_path(monkeypatch, reduction, validate):
    """The plain eager call (``_multiclass._plain_call``: float32 rows, int64 targets all in
    range, no weights, smoothing or options) gives the same bits as the general path (forced
    here by switching the shortcut off) for the loss, the gradient, a second backward
    (retain_graph), a scaled backward (loss * 3) and double backward; the general path's
    own shortcut (``chunked._plain_rows``) is checked the same way."""
    _needs_kernel()
    x, y = _classifier(M=300, C=37, seed=6)
    taken = []
    real = chunked.plain_cross_entropy
    monkeypatch.setattr(chunked, "plain_cross_entropy", lambda *a: taken.append(True) or real(*a))

    def run():
        loss = crossent.cross_entropy(x, y, reduction=reduction, validate=validate)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g3,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
        (gg,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad(gg.square().sum(), x)
        return loss.detach(), g1, g2, g3, h

    fast = run()
    assert taken == [True]
    monkeypatch.setattr(_multiclass, "_plain_call", lambda *a: None)
    general = run()
    monkeypatch.setattr(chunked, "_plain_rows", lambda *a: False)
    slow = run()
    assert len(taken) == 1
    for a, b, c in zip(fast, general, slow):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("ignore_index", [-100, 0, 2, 4, 5, 99])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_calls_ignore_like_torch(ignore_index, reduction):
    """Whatever ignore_index is (a class, below or above the classes), the eager call on
    plain inputs ignores exactly what torch ignores."""
    x, y = _classifier(M=40, C=5, seed=11)
    ours = crossent.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction)
    ref = torch.nn.functional.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])


def test_plain_call_declines_what_it_does_not_cover():
    _needs_kernel()
    x, y = _classifier(M=8, C=5, seed=7)
    plain = lambda x=x, y=y, ignore_index=-100, reduction="mean": _multiclass._plain_call(
        x, y, ignore_index, reduction, False
    )
    assert plain() is not None
    assert plain(reduction="none") is None
    assert plain(y=torch.tensor([0, 1, 2, 3, 4, -100, 0, 1])) is None  # an ignored target
    assert plain(ignore_index=2) is None  # a class may be ignored
    assert plain(y=torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])) is None  # out of range: the error path
    assert plain(y=y.int()) is None
    assert plain(x=x.detach()) is None  # no gradient wanted
    assert plain(x=x.double().detach().requires_grad_()) is None
    assert plain(x=x.detach().t().contiguous().t().requires_grad_()) is None  # not contiguous
    assert plain(x=torch.nn.Parameter(x.detach())) is None  # a subclass: general path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain() is None
    with pytest.raises(crossent.CrossentValueError, match="outside it"):
        crossent.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), validate=False)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_option_free_call_equals_the_call_with_neutral_options(reduction):
    """No weights, no smoothing, nothing ignored (the compiled kernel's all-ones fast
    path) gives what neutral options give (class weights of 1: the general path), for the
    loss, the gradient, a second backward (retain_graph), a scaled backward (loss * 3) and
    double backward."""
    _needs_kernel()
    x, y = _classifier(M=300, C=37, seed=6)

    def run(**kw):
        loss = crossent.cross_entropy(x, y, reduction=reduction, validate=False, **kw)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g3,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
        (gg,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad(gg.square().sum(), x)
        return loss.detach(), g1, g2, g3, h

    for a, b in zip(run(), run(weight=torch.ones(37))):
        assert_close(a, b)


def test_an_out_of_range_class_index_fails_with_validation_off():
    """The kernel counts indices outside [0, C) even when the value checks are off."""
    _needs_kernel()
    x, _ = _classifier(M=8, C=5, seed=7)
    with pytest.raises(crossent.CrossentValueError, match="outside it"):
        crossent.cross_entropy(x, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), validate=False)


def test_shortcuts_raise_no_warning_when_weights_require_grad():
    """Reading a denominator that carries a graph (class weights with requires_grad) must
    not trigger torch's 'converting a tensor with requires_grad=True to a scalar' warning."""
    x, y = _classifier(M=16, C=4, seed=8)
    y[3] = -100
    w = torch.rand(4, generator=torch.Generator().manual_seed(9)).add(0.5).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for validate in (True, False):
            loss = crossent.cross_entropy(x, y, weight=w, validate=validate)
            gx, gw = torch.autograd.grad(loss, (x, w))
    ref = torch.nn.functional.cross_entropy(x, y, weight=w.detach())  # torch: no weight gradient
    (rx,) = torch.autograd.grad(ref, x)
    assert_close(gx, rx)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_grad_scale_is_what_autograd_sends(dtype):
    """The host-computed 1/n must be bit for bit the grad_output of ``sum / n`` (else
    fused backends redo their gradient in backward); n beyond 2**24 is not a float32."""
    from crossent.functional._reduction import mean_grad_scale

    for n in [1, 3, 7, 10, 640, 2560, 65536, 100003, (1 << 24) + 1, 3 * (1 << 24) + 5, 10**9 + 7]:
        total = torch.zeros((), dtype=dtype, requires_grad=True)
        (g,) = torch.autograd.grad(total / n, total)
        assert mean_grad_scale(n, dtype) == g.item(), n
