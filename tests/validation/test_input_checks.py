"""Guardrails beyond the classic mistakes (decisions documented in crossent._validation).

Rule: raise only where torch raises too or the answer would be wrong (NaN targets);
warn where the input is legal but probably a mistake."""

import pytest
import torch
import torch.nn.functional as TF

import crossent.functional as F
import crossent.nn as cnn
from crossent import CrossentTypeError, CrossentValueError, CrossentWarning
from crossent import _validation as V


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- input dtype
@pytest.mark.parametrize(
    "bad",
    [torch.randint(0, 3, (4, 3)), torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 3, dtype=torch.cfloat)],
    ids=["int64", "bool", "complex"],
)
@pytest.mark.parametrize("loss", ["ce", "bce", "bce_logits"])
def test_non_floating_input_is_a_type_error_as_in_torch(bad, loss):
    target = torch.tensor([0, 1, 2, 1]) if loss == "ce" else torch.ones(4, 3)
    ours = {"ce": F.cross_entropy, "bce": F.binary_cross_entropy, "bce_logits": F.binary_cross_entropy_with_logits}[
        loss
    ]
    theirs = {
        "ce": TF.cross_entropy,
        "bce": TF.binary_cross_entropy,
        "bce_logits": TF.binary_cross_entropy_with_logits,
    }[loss]
    with pytest.raises(Exception):
        theirs(bad, target)  # torch refuses these too, so refusing keeps drop-in parity
    with pytest.raises(
        CrossentTypeError,
        match=r"expected `input` to be a floating-point tensor .*"
        r"but got dtype torch\.\w+\. .*",
    ):
        ours(bad, target)


def test_labels_passed_as_input_hint_at_argument_order():
    with pytest.raises(CrossentTypeError, match=r"argument order is \(input, target\)"):
        F.cross_entropy(torch.tensor([0, 1, 2]), logits(3, 3))


# --------------------------------------------------------------------------- NaN / inf targets
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_bce_target_raises(bad):
    with pytest.raises(
        CrossentValueError,
        match=r"expected `target` values in \[0, 1\], but got "
        r"(nan|inf) at position \(1,\).*NaN or infinite target",
    ):
        F.binary_cross_entropy_with_logits(logits(3), torch.tensor([1.0, bad, 0.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probability_target_raises_with_row(bad):
    q = torch.tensor([[0.2, 0.8], [bad, 1.0]])
    with pytest.raises(
        CrossentValueError,
        match=r"expected finite class-probability targets, but got "
        r"row 1 = \[(nan|inf), 1\]",
    ):
        F.cross_entropy(logits(2, 2), q)


def test_nan_probability_input_to_bce_raises_with_position():
    with pytest.raises(CrossentValueError, match=r"probabilities in \[0, 1\], but got NaN at position \(0, 1\)"):
        cnn.BCELoss()(torch.tensor([[0.5, float("nan")]]), torch.tensor([[1.0, 0.0]]))


# --------------------------------------------------------------------------- cross-entropy
def test_single_class_cross_entropy_warns_that_loss_is_always_zero():
    x = logits(8, 1, seed=3)
    with pytest.warns(
        CrossentWarning,
        match=r"single class \(C=1, shape \(8, 1\)\).*always 0.*"
        r"BCEWithLogitsLoss",
    ):
        out = F.cross_entropy(x, torch.zeros(8, dtype=torch.long))
    assert out.item() == 0.0 == TF.cross_entropy(x, torch.zeros(8, dtype=torch.long)).item()
    F.cross_entropy(x, torch.zeros(8, dtype=torch.long), validate=False)  # a heuristic: off with the tier


def test_probability_targets_with_nonnegative_ignore_index_raise_like_torch():
    x, q = logits(4, 3), logits(4, 3, seed=1).softmax(1)
    with pytest.raises(RuntimeError):
        TF.cross_entropy(x, q, ignore_index=0)
    with pytest.raises(
        CrossentValueError,
        match=r"expected ignore_index < 0 with class-probability "
        r"targets, but got ignore_index=0",
    ):
        cnn.CrossEntropyLoss(ignore_index=0)(x, q)


def test_ignore_index_none_for_cross_entropy_is_a_type_error_like_torch():
    with pytest.raises(TypeError):
        TF.cross_entropy(logits(2, 3), torch.tensor([0, 1]), ignore_index=None)
    with pytest.raises(
        CrossentTypeError,
        match=r"`ignore_index` to be an integer, but got None\. "
        r"Keep the default ignore_index=-100",
    ):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 1]), ignore_index=None)


def test_class_dim_last_on_image_input_suggests_movedim():
    with pytest.raises(
        CrossentValueError,
        match=r"class dimension is dim 1, not the last one: use "
        r"`input\.movedim\(-1, 1\)`",
    ):
        F.cross_entropy(logits(2, 4, 4, 3), torch.zeros(2, 4, 4, dtype=torch.long))


def test_probability_target_requires_grad_gets_torch_gradient():
    x = logits(4, 3)
    q = logits(4, 3, seed=1).softmax(1).requires_grad_()
    (g_ours,) = torch.autograd.grad(F.cross_entropy(x, q), q)
    (g_torch,) = torch.autograd.grad(TF.cross_entropy(x, q), q)
    torch.testing.assert_close(g_ours, g_torch)


# --------------------------------------------------------------------------- binary
def test_bce_two_column_input_with_one_label_per_row_suggests_cross_entropy():
    with pytest.raises(
        CrossentValueError,
        match=r"input \(6, 2\) and target \(6,\).*2-class "
        r"cross-entropy: use CrossEntropyLoss with `target\.long\(\)`",
    ):
        cnn.BCEWithLogitsLoss()(logits(6, 2), torch.tensor([0.0, 1, 1, 0, 1, 0]))


def test_bce_class_index_targets_suggest_one_hot():
    with pytest.raises(
        CrossentValueError,
        match=r"input \(3, 4\) and target \(3,\).*"
        r"`F\.one_hot\(target\.long\(\), 4\)\.float\(\)`",
    ):
        F.binary_cross_entropy_with_logits(logits(3, 4), torch.tensor([0.0, 3, 2]))


@pytest.mark.parametrize("value, dropped", [(0, "negative"), (1, "positive")])
def test_bce_ignore_index_equal_to_a_label_is_refused(value, dropped):
    with pytest.raises(CrossentValueError, match=rf"ignore_index={value} would drop every {dropped} label"):
        cnn.BCEWithLogitsLoss(ignore_index=value)
    with pytest.raises(CrossentValueError, match=r"different from the labels 0 and 1"):
        F.binary_cross_entropy(torch.rand(3), torch.ones(3), ignore_index=value)


def test_non_tensor_target_is_a_type_error():
    with pytest.raises(CrossentTypeError, match=r"expected `target` to be a torch\.Tensor, but got list"):
        F.binary_cross_entropy_with_logits(logits(3), [1.0, 0.0, 1.0])
    with pytest.raises(CrossentTypeError, match=r"expected `target` to be a torch\.Tensor, but got list"):
        F.cross_entropy(logits(3, 3), [1, 0, 1])


# --------------------------------------------------------------------------- ignore_index type and range
@pytest.mark.parametrize("value", [-100.0, 1.5, float("nan")])
def test_float_ignore_index_is_a_type_error_like_torch(value):
    with pytest.raises(TypeError, match=r"must be int, not float"):
        TF.cross_entropy(logits(3, 4), torch.tensor([0, 1, -100]), ignore_index=value)
    with pytest.raises(
        CrossentTypeError,
        match=r"cross_entropy: expected `ignore_index` to be an integer, "
        r"but got .*It must be an int, not a float",
    ):
        F.cross_entropy(logits(3, 4), torch.tensor([0, 1, -100]), ignore_index=value)
    with pytest.raises(CrossentTypeError, match=r"CrossEntropyLoss: expected `ignore_index` to be an integer"):
        cnn.CrossEntropyLoss(ignore_index=value)
    with pytest.raises(CrossentTypeError, match=r"BCEWithLogitsLoss: expected `ignore_index` to be an integer"):
        cnn.BCEWithLogitsLoss(ignore_index=value)


def test_integral_float_ignore_index_names_the_int_to_pass():
    with pytest.raises(
        CrossentTypeError,
        match=r"but got -100\.0\. It must be an int, not a float "
        r"\(torch raises TypeError here too\): pass ignore_index=-100\.",
    ):
        F.cross_entropy(logits(3, 4), torch.tensor([0, 1, -100]), ignore_index=-100.0)


def test_integer_like_ignore_index_is_accepted_like_torch():
    np = pytest.importorskip("numpy")
    x, y = logits(3, 4), torch.tensor([0, 1, -100])
    ref = TF.cross_entropy(x, y)
    for value in (np.int64(-100), torch.tensor(-100), torch.tensor(-100, dtype=torch.int32)):
        torch.testing.assert_close(F.cross_entropy(x, y, ignore_index=value), ref)
    with pytest.raises(CrossentTypeError, match=r"expected `ignore_index` to be an integer, but got tensor\(-100\.\)"):
        F.cross_entropy(x, y, ignore_index=torch.tensor(-100.0))


@pytest.mark.parametrize("value", [2**70, 2**63, -(2**63) - 1])
def test_ignore_index_outside_int64_is_a_clear_value_error(value):
    with pytest.raises(
        CrossentValueError,
        match=rf"expected `ignore_index` in the int64 range "
        rf"\[-2\*\*63, 2\*\*63 - 1\], but got {value}\.",
    ):
        F.cross_entropy(logits(3, 4), torch.tensor([0, 1, 2]), ignore_index=value)
    with pytest.raises(CrossentValueError, match=r"int64 range"):
        cnn.BCEWithLogitsLoss(ignore_index=value)


def test_ignore_index_at_the_int64_limits_works():
    x, y = logits(3, 4), torch.tensor([0, 1, 2])
    for value in (2**63 - 1, -(2**63)):
        torch.testing.assert_close(F.cross_entropy(x, y, ignore_index=value), TF.cross_entropy(x, y))


# --------------------------------------------------------------------------- every target ignored
def test_every_target_ignored_with_mean_warns_with_the_fix():
    x = logits(4, 3)
    y = torch.full((4,), -100)
    with pytest.warns(
        CrossentWarning,
        match=r"cross_entropy: all 4 targets equal ignore_index=-100, so "
        r"reduction='mean' is 0/0 = nan .*reduction='sum' with your own "
        r"normaliser \(e\.g\. num_items_in_batch.*return_parts=True",
    ):
        out = F.cross_entropy(x, y)
    assert out.isnan() and TF.cross_entropy(x, y).isnan()  # the value is torch's


def test_every_target_ignored_warns_for_the_module_and_other_ignore_values():
    with pytest.warns(CrossentWarning, match=r"all 8 targets equal ignore_index=2"):
        cnn.CrossEntropyLoss(ignore_index=2)(logits(2, 3, 4), torch.full((2, 4), 2))
    with pytest.warns(CrossentWarning, match=r"all 2 targets equal ignore_index=0"):
        F.cross_entropy(logits(2, 3), torch.zeros(2, dtype=torch.long), ignore_index=0)


def test_every_target_ignored_warns_once_per_call_site():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            F.cross_entropy(logits(4, 3), torch.full((4,), -100))
    assert len([w for w in seen if "targets equal ignore_index" in str(w.message)]) == 1


def test_partly_ignored_or_other_reductions_do_not_warn():
    with warnings_as_errors():
        F.cross_entropy(logits(4, 3), torch.tensor([-100, 0, -100, -100]))  # one kept
        F.cross_entropy(logits(4, 3), torch.tensor([0, 0, 0, 0]))  # every target class 0, none ignored
        F.cross_entropy(logits(4, 3), torch.tensor([2, 2, 2, 2]), ignore_index=1)
        F.cross_entropy(logits(4, 3), torch.full((4,), -100), reduction="sum")
        F.cross_entropy(logits(4, 3), torch.full((4,), -100), reduction="none")
        F.cross_entropy(logits(4, 3), torch.full((4,), -100), validate=False)


def test_every_target_ignored_adds_no_second_sync_on_a_device(monkeypatch):
    """Off the CPU the 'any kept' flag is fetched with the index range: one _fetch per call."""
    fetches = []
    real = V._fetch
    monkeypatch.setattr(V, "_fetch", lambda values: fetches.append(len(values)) or real(values))
    monkeypatch.setattr(V, "_on_host", lambda t: False)
    with pytest.warns(CrossentWarning, match=r"all 4 targets equal ignore_index=-100"):
        F.cross_entropy(logits(4, 3), torch.full((4,), -100))
    F.cross_entropy(logits(4, 3), torch.tensor([0, 0, 0, -100]))  # class 0 and ignored: kept, silent
    assert fetches == [3, 3]  # (min, max, any kept) in the call's one fetch


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", CrossentWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# --------------------------------------------------------------------------- ambiguous class dimension
def test_sequence_logits_with_T_equal_to_V_warn_with_the_transpose_fix():
    B, T, V_ = 2, 5, 5
    head = torch.nn.Linear(8, V_)
    seq_logits = head(torch.randn(B, T, 8))  # (B, T, V): classes last, as nn.Linear gives them
    y = torch.randint(0, V_, (B, T))
    with pytest.warns(
        CrossentWarning,
        match=r"cross_entropy: the input has shape \(2, 5, 5\) with target "
        r"\(2, 5\): dims 1 and 2 both have size 5, so the class "
        r"dimension is ambiguous.*`logits\.transpose\(1, 2\)`, or "
        r"`logits\.view\(-1, 5\)` with `target\.view\(-1\)`",
    ):
        F.cross_entropy(seq_logits, y)


def test_no_ambiguity_warning_when_dim_1_was_made_the_class_dimension():
    y = torch.randint(0, 5, (2, 5))
    with warnings_as_errors():
        F.cross_entropy(torch.randn(2, 5, 5, requires_grad=True).transpose(1, 2), y)  # autograd: transpose
        F.cross_entropy(torch.randn(2, 5, 5).transpose(1, 2), y)  # no autograd: a transposed view
        F.cross_entropy(torch.randn(2, 5, 5).permute(0, 2, 1), y)
        conv = torch.nn.Conv1d(3, 5, 1)
        F.cross_entropy(conv(torch.randn(2, 3, 5)), y)  # channels first by construction
        F.cross_entropy(torch.randn(2, 5, 6), torch.randint(0, 5, (2, 6)))  # sizes differ
        F.cross_entropy(torch.randn(2, 5, 5), y, validate=False)


# --------------------------------------------------------------------------- mask-shaped target
@pytest.mark.parametrize(
    "dtype, fix",
    [
        (torch.long, r"`target\.squeeze\(1\)` \(shape \(2, 4, 4\)\)"),
        (torch.float32, r"`target\.squeeze\(1\)\.long\(\)` \(shape \(2, 4, 4\)\)"),
    ],
)
def test_mask_shaped_target_says_squeeze_1(dtype, fix):
    x = logits(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 1, 4, 4)).to(dtype)
    with pytest.raises(
        CrossentValueError,
        match=r"target of shape \(2, 1, 4, 4\)\. A mask of shape "
        r"\(2, 1, 4, 4\) holds one class per position: use " + fix,
    ):
        F.cross_entropy(x, mask)
    with pytest.raises(CrossentValueError, match=r"squeeze\(1\)"):
        cnn.CrossEntropyLoss()(x, mask)
    torch.testing.assert_close(F.cross_entropy(x, mask.squeeze(1).long()), TF.cross_entropy(x, mask.squeeze(1).long()))
