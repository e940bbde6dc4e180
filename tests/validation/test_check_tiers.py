"""The two tiers (metadata always; value checks switchable), their cost bounds, warn_once,
and the promise that valid inputs never warn or raise."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as TF

import crossent.functional as F
import crossent.nn as cnn
from crossent import CrossentTypeError, CrossentValueError, CrossentWarning
from crossent import _validation as V


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _boom(*args, **kwargs):
    raise AssertionError("a value check ran although validation is off")


def _calls():
    """One valid call per public entry point (functional and module)."""
    x, y, q = logits(8, 5), torch.arange(8) % 5, logits(8, 5, seed=1).softmax(1)
    xb, tb = logits(8, 4, seed=2), torch.rand(8, 4, generator=_gen(3))
    return {
        "cross_entropy/index": lambda **kw: F.cross_entropy(x, y, **kw),
        "cross_entropy/probs": lambda **kw: F.cross_entropy(x, q, **kw),
        "bce": lambda **kw: F.binary_cross_entropy(torch.sigmoid(xb), tb, **kw),
        "bce_logits": lambda **kw: F.binary_cross_entropy_with_logits(xb, tb, **kw),
        "CrossEntropyLoss": lambda **kw: cnn.CrossEntropyLoss(**kw)(x, y),
        "BCELoss": lambda **kw: cnn.BCELoss(**kw)(torch.sigmoid(xb), tb),
        "BCEWithLogitsLoss": lambda **kw: cnn.BCEWithLogitsLoss(**kw)(xb, tb),
    }


def _patch_value_checks(monkeypatch):
    for name in (
        "check_multiclass_values",
        "check_binary_values",
        "check_class_indices",
        "check_probability_target",
        "check_logits_not_probabilities",
        "_fetch",
    ):
        monkeypatch.setattr(V, name, _boom)


# --------------------------------------------------------------------------- switching off
@pytest.mark.parametrize("name", list(_calls()))
def test_validate_false_skips_every_value_check(monkeypatch, name):
    call = _calls()[name]
    _patch_value_checks(monkeypatch)
    call(validate=False)
    with pytest.raises(AssertionError, match="value check ran"):
        call()  # sanity: by default the (patched) value tier is reached


@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("env", ["0", "false", "off"])
def test_environment_variable_switches_value_checks_off(monkeypatch, name, env):
    call = _calls()[name]
    _patch_value_checks(monkeypatch)
    monkeypatch.setenv("CROSSENT_VALIDATE", env)
    call()
    with pytest.raises(AssertionError, match="value check ran"):
        call(validate=True)  # an explicit per-call/module choice wins over the environment


def test_bad_values_pass_through_when_validation_is_off(monkeypatch):
    x, t = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.0])
    with pytest.raises(CrossentValueError):
        F.binary_cross_entropy_with_logits(x, t)
    # off: the user asked for no checks, so the (torch-identical) value comes back
    torch.testing.assert_close(
        F.binary_cross_entropy_with_logits(x, t, validate=False), TF.binary_cross_entropy_with_logits(x, t)
    )
    monkeypatch.setenv("CROSSENT_VALIDATE", "0")
    torch.testing.assert_close(cnn.BCEWithLogitsLoss()(x, t), TF.binary_cross_entropy_with_logits(x, t))
    # off also means no heuristics: probabilities into the logits loss stay silent
    F.binary_cross_entropy_with_logits(torch.rand(64, generator=_gen()), torch.ones(64))


def test_metadata_checks_run_even_when_validation_is_off(monkeypatch):
    monkeypatch.setenv("CROSSENT_VALIDATE", "0")
    x, y = logits(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(CrossentValueError, match="`reduction`"):
        F.cross_entropy(x, y, reduction="avg", validate=False)
    with pytest.raises(CrossentValueError, match=r"`target\.squeeze\(1\)`"):
        F.cross_entropy(x, y[:, None], validate=False)
    with pytest.raises(CrossentValueError, match="`label_smoothing`"):
        cnn.CrossEntropyLoss(label_smoothing=-1, validate=False)
    with pytest.raises(CrossentTypeError, match=r"`target\.long\(\)`"):
        F.cross_entropy(x, y.float(), validate=False)
    with pytest.raises(CrossentValueError, match=r"input \(4, 3\) and target \(4,\)"):
        F.binary_cross_entropy_with_logits(x, y.float(), validate=False)


@pytest.mark.parametrize("case", ["ce_index", "ce_probs", "bce_logits"])
def test_validation_off_reads_no_tensor_data(case):
    """Meta tensors have no data: any read (item, tolist, bool(...)) raises. With value
    checks off the whole call works on them, so nothing syncs a GPU; with checks on, the
    same call must read data (proving this test can fail)."""
    x = torch.empty(4, 3, device="meta")
    if case == "ce_index":
        call = lambda **kw: F.cross_entropy(x, torch.empty(4, dtype=torch.long, device="meta"), **kw)
    elif case == "ce_probs":
        call = lambda **kw: F.cross_entropy(x, torch.empty(4, 3, device="meta"), **kw)
    else:
        call = lambda **kw: F.binary_cross_entropy_with_logits(x, torch.empty(4, 3, device="meta"), **kw)
    out = call(validate=False)
    assert out.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        call(validate=True)


# --------------------------------------------------------------------------- cost bounds
@pytest.mark.parametrize("name", list(_calls()))
def test_value_tier_synchronises_once_per_call(monkeypatch, name):
    fetches = []
    real = V._fetch

    def counting_fetch(values):
        fetches.append(len(values))
        return real(values)

    monkeypatch.setattr(V, "_fetch", counting_fetch)
    _calls()[name]()
    assert len(fetches) == 1, fetches


def test_softmax_heuristic_reads_a_bounded_number_of_rows():
    for shape in [(1000, 7), (3, 7, 500), (2, 7, 300, 300), (7,)]:
        x = torch.zeros(shape)
        rows = V._sample_rows(x, 1 if x.dim() > 1 else 0, V._ROWS_TO_INSPECT)
        assert rows.shape[1] == 7 and 1 <= rows.shape[0] <= V._ROWS_TO_INSPECT


def test_class_index_check_never_indexes_with_user_indices(monkeypatch):
    """On GPU an out-of-range index used by gather/scatter/index_select is a device-side
    assert; the check must find it with comparisons and reductions only."""
    called = []
    for name in ("gather", "scatter", "index_select", "take", "take_along_dim"):
        real = getattr(torch, name)

        def spy(*a, _real=real, _name=name, **k):
            called.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, spy)
    with pytest.raises(IndexError):
        V.check_class_indices("f", torch.tensor([0, 9, -5]), 3, -100)
    assert called == []


# --------------------------------------------------------------------------- warn_once
def test_crossent_warning_is_a_filterable_user_warning():
    assert issubclass(CrossentWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CrossentWarning)
        F.cross_entropy(logits(16, 4).softmax(1), torch.arange(16) % 4)  # filtered: no error


def test_a_loop_of_five_calls_warns_once_even_under_always():
    x, y = logits(16, 4).softmax(1), torch.arange(16) % 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            F.cross_entropy(x, y)
    assert len(caught) == 1 and issubclass(caught[0].category, CrossentWarning)


def test_two_call_sites_warn_once_each_and_point_at_the_user_line():
    x, y = logits(16, 4).softmax(1), torch.arange(16) % 4
    criterion = cnn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            line_a = _line() + 1  # the call on the next line
            F.cross_entropy(x, y)
            line_b = _line() + 1
            criterion(x, y)
    assert len(caught) == 2
    assert {w.filename for w in caught} == {__file__}
    assert sorted(w.lineno for w in caught) == sorted([line_a, line_b])


def _line():
    import sys

    return sys._getframe(1).f_lineno


def test_reset_warnings_shows_a_warning_again():
    x, y = logits(16, 4).softmax(1), torch.arange(16) % 4

    def call():
        F.cross_entropy(x, y)

    with pytest.warns(CrossentWarning):
        call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()  # same site: silent
    V.reset_warnings()
    with pytest.warns(CrossentWarning):
        call()


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("cls", [cnn.BCELoss, cnn.BCEWithLogitsLoss, cnn.CrossEntropyLoss])
def test_ignore_index_type_checked_at_construction(cls):
    with pytest.raises(
        CrossentTypeError,
        match=cls.__name__ + r": expected `ignore_index` to be an "
        r"integer, but got 1\.5\.",
    ):
        cls(ignore_index=1.5)
    with pytest.raises(CrossentTypeError, match=r"`ignore_index` to be an integer, but got 'x'"):
        cls(ignore_index="x")


def test_negative_class_weight_warns_at_construction():
    with pytest.warns(CrossentWarning, match=r"`weight` holds -1\.0 at flat position 1.*Use weights >= 0"):
        cnn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 2.0]))


# --------------------------------------------------------------------------- valid inputs
def _valid_cases():
    g = _gen(7)
    cases = []
    for dtype, reduction in itertools.product(
        [torch.float32, torch.float64, torch.float16, torch.bfloat16], ["mean", "sum", "none"]
    ):
        x = torch.randn(32, 6, generator=g).to(dtype)
        y = torch.randint(0, 6, (32,), generator=g)
        cases.append((f"ce-{dtype}-{reduction}", lambda x=x, y=y, r=reduction: F.cross_entropy(x, y, reduction=r)))
        q = torch.randn(32, 6, generator=g).softmax(1).to(dtype)
        cases.append(
            (
                f"ce-probs-{dtype}-{reduction}",
                lambda x=x, q=q, r=reduction: F.cross_entropy(x, q, reduction=r, label_smoothing=0.1),
            )
        )
        t = torch.randint(0, 2, (32, 6), generator=g).to(dtype)
        cases.append(
            (
                f"bcel-{dtype}-{reduction}",
                lambda x=x, t=t, r=reduction: F.binary_cross_entropy_with_logits(x, t, reduction=r),
            )
        )
        p = torch.sigmoid(x.float()).to(dtype)
        cases.append(
            (f"bce-{dtype}-{reduction}", lambda p=p, t=t, r=reduction: F.binary_cross_entropy(p, t, reduction=r))
        )
    x4, y4 = torch.randn(2, 5, 4, 3, generator=g), torch.randint(0, 5, (2, 4, 3), generator=g)
    y4[0, 0, 0] = -100
    w = torch.rand(5, generator=g) + 0.1
    cases += [
        ("ce-kdim-weight-ignore", lambda: cnn.CrossEntropyLoss(weight=w, label_smoothing=0.2)(x4, y4)),
        ("ce-kdim-probs", lambda: F.cross_entropy(x4, torch.randn(2, 5, 4, 3, generator=_gen(1)).softmax(1))),
        (
            "ce-seq-transposed",
            lambda: F.cross_entropy(
                torch.randn(2, 9, 40, generator=_gen(2)), torch.randint(0, 9, (2, 40), generator=_gen(3))
            ),
        ),
        ("ce-unbatched", lambda: F.cross_entropy(torch.randn(5, generator=_gen(4)), torch.tensor(3))),
        (
            "ce-int32-uint8-targets",
            lambda: (F.cross_entropy(x4, y4.clamp(min=0).int()), F.cross_entropy(x4, y4.clamp(min=0).to(torch.uint8))),
        ),
        (
            "ce-huge-logits",
            lambda: F.cross_entropy(torch.tensor([[1e4, -1e4, 0.0]] * 16), torch.zeros(16, dtype=torch.long)),
        ),
        (
            "ce-inf-logits",
            lambda: F.cross_entropy(torch.tensor([[float("inf"), 0.0, 0.0]] * 16), torch.zeros(16, dtype=torch.long)),
        ),
        (
            "ce-two-class",
            lambda: F.cross_entropy(
                torch.randn(64, 2, generator=_gen(5)), torch.randint(0, 2, (64,), generator=_gen(6))
            ),
        ),
        (
            "ce-all-ignored-sum",
            lambda: F.cross_entropy(torch.randn(4, 3, generator=_gen(5)), torch.full((4,), -100), reduction="sum"),
        ),
        (
            "ce-all-ignored-none",
            lambda: F.cross_entropy(torch.randn(4, 3, generator=_gen(5)), torch.full((4,), -100), reduction="none"),
        ),
        (
            "ce-all-class-0-ignore-0-some-kept",
            lambda: F.cross_entropy(torch.randn(4, 3, generator=_gen(5)), torch.tensor([0, 0, 2, 2]), ignore_index=2),
        ),
        (
            "ce-T-equals-V-transposed",
            lambda: F.cross_entropy(
                torch.randn(2, 5, 5, generator=_gen(5)).transpose(1, 2), torch.randint(0, 5, (2, 5), generator=_gen(6))
            ),
        ),
        ("ce-empty", lambda: F.cross_entropy(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))),
        (
            "ce-ignore-index-in-range",
            lambda: F.cross_entropy(torch.randn(4, 3, generator=_gen(5)), torch.tensor([0, 1, 2, 1]), ignore_index=1),
        ),
        (
            "ce-probs-ignore-neg",
            lambda: F.cross_entropy(x4, torch.randn(2, 5, 4, 3, generator=_gen(1)).softmax(1), ignore_index=-1),
        ),
        (
            "bcel-pos-weight-ignore",
            lambda: cnn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 1.0]), ignore_index=-1)(
                torch.randn(16, 2, generator=_gen(8)), torch.tensor([[1.0, -1.0], [0.0, 1.0]] * 8)
            ),
        ),
        (
            "bcel-soft-labels-int-bool-targets",
            lambda: (
                F.binary_cross_entropy_with_logits(
                    torch.randn(40, generator=_gen(9)), torch.rand(40, generator=_gen(10))
                ),
                F.binary_cross_entropy_with_logits(
                    torch.randn(40, generator=_gen(9)), torch.randint(0, 2, (40,), generator=_gen(1))
                ),
                F.binary_cross_entropy_with_logits(
                    torch.randn(40, generator=_gen(9)), torch.rand(40, generator=_gen(1)) > 0.5
                ),
            ),
        ),
        (
            "bcel-inf-logits",
            lambda: F.binary_cross_entropy_with_logits(
                torch.tensor([float("inf"), -float("inf")] * 20), torch.ones(40)
            ),
        ),
        ("bcel-zero-init-head", lambda: F.binary_cross_entropy_with_logits(torch.zeros(64), torch.ones(64))),
        (
            "bce-edges-0-1",
            lambda: F.binary_cross_entropy(torch.tensor([0.0, 1.0, 0.5] * 20), torch.tensor([0.0, 1.0, 1.0] * 20)),
        ),
        (
            "bce-weight-broadcast",
            lambda: cnn.BCELoss(weight=torch.rand(3, generator=_gen(2)))(
                torch.rand(5, 3, generator=_gen(3)), torch.rand(5, 3, generator=_gen(4))
            ),
        ),
        (
            "bcel-small-batch-in-0-1",
            lambda: F.binary_cross_entropy_with_logits(torch.tensor([0.2, 0.5, 0.9]), torch.ones(3)),
        ),
        ("ce-small-softmax-looking-logits", lambda: F.cross_entropy(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))),
        (
            "ce-target-requires-grad",
            lambda: F.cross_entropy(
                torch.randn(8, 4, generator=_gen(2)), torch.randn(8, 4, generator=_gen(3)).softmax(1).requires_grad_()
            ).backward(),
        ),
    ]
    return cases


@pytest.mark.parametrize("name, call", _valid_cases(), ids=[n for n, _ in _valid_cases()])
def test_valid_inputs_never_warn_or_raise(name, call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CrossentWarning)
        call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_distributions_rounded_to_low_precision_do_not_warn(dtype):
    """A float64 softmax cast to bf16 sums to 1 only within bf16 rounding (~0.004)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CrossentWarning)
        for C in (2, 3, 4, 7, 50, 1000):
            for seed in range(10):
                q = torch.softmax(2 * logits(64, C, seed=seed, dtype=torch.float64), 1).to(dtype)
                F.cross_entropy(logits(64, C, seed=seed + 100, dtype=dtype), q)
