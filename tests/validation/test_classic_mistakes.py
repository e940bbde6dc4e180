"""The classic loss mistakes, one test per case (messages asserted by regex).

A meter fed a loss that still requires grad belongs to ``crossent.tracking``;
its warning uses the same :func:`crossent._validation.warn_once`, tested in
``test_check_tiers.py``.
"""

import re

import pytest
import torch
import torch.nn.functional as TF

import crossent.functional as F
import crossent.nn as cnn
from crossent import CrossentIndexError, CrossentTypeError, CrossentValueError, CrossentWarning


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, t: F.binary_cross_entropy(x, t),
        lambda x, t: cnn.BCELoss()(x, t),
    ],
    ids=["functional", "module"],
)
def test_logits_fed_to_bce_raise_with_min_max(call):
    x = torch.tensor([0.2, -1.5, 3.0, 0.7])
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with pytest.raises(
        CrossentValueError,
        match=r"expected `input` to hold probabilities in \[0, 1\], but got "
        r"min -1\.5, max 3\. .*BCEWithLogitsLoss",
    ):
        call(x, t)


def test_sigmoid_before_bce_with_logits_warns_on_a_big_batch():
    x = torch.sigmoid(logits(64))
    t = (logits(64, seed=1) > 0).float()
    with pytest.warns(
        CrossentWarning,
        match=r"all 64 inputs lie in \[.*looks like probabilities.*"
        r"applies the sigmoid itself",
    ):
        F.binary_cross_entropy_with_logits(x, t)
    with pytest.warns(CrossentWarning, match=r"applies the sigmoid itself"):
        cnn.BCEWithLogitsLoss()(x, t)


def test_sigmoid_output_detected_from_autograd_history_at_any_size():
    raw = torch.tensor([0.2, -1.5, 3.0, 0.7], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with pytest.warns(CrossentWarning, match=r"straight out of torch\.sigmoid .*SigmoidBackward0"):
        cnn.BCEWithLogitsLoss()(torch.sigmoid(raw), t)


def test_tutorial_pitfall_value_and_why_four_values_do_not_warn():
    """The tutorial expected an error; torch silently returns ~0.663 (verified here).

    crossent gives the same (well-defined) number and, on these 4 values without autograd
    history, does not warn: 4 logits of an uncertain model land in (0, 1) too often
    (1.4% for standard-normal logits), see ``check_binary_values``."""
    raw = torch.tensor([0.2, -1.5, 3.0, 0.7])
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    probs = torch.sigmoid(raw)
    torch_value = torch.nn.BCEWithLogitsLoss()(probs, t).item()
    assert abs(torch_value - 0.663) < 5e-4
    assert abs(torch_value - torch.nn.BCEWithLogitsLoss()(raw, t).item()) > 0.1  # really wrong
    ours = cnn.BCEWithLogitsLoss()(probs, t).item()  # no warning (pytest turns one into an error)
    assert abs(ours - torch_value) < 1e-6


def test_zero_logits_of_a_zero_initialised_head_do_not_warn():
    F.binary_cross_entropy_with_logits(torch.zeros(64), torch.ones(64))


def test_softmax_before_cross_entropy_warns():
    x = logits(16, 5).softmax(1)
    y = torch.arange(16) % 5
    with pytest.warns(
        CrossentWarning,
        match=r"non-negative and sum to 1, which looks like softmax "
        r"output\. .*pass the raw logits",
    ):
        F.cross_entropy(x, y)


def test_log_softmax_before_cross_entropy_warns():
    x = logits(16, 5).log_softmax(1)
    y = torch.arange(16) % 5
    with pytest.warns(
        CrossentWarning,
        match=r"logsumexp 0, which looks like log_softmax output\. "
        r".*pass the raw logits",
    ):
        cnn.CrossEntropyLoss()(x, y)


def test_softmax_detected_from_autograd_history_at_any_size():
    x = logits(2, 3).requires_grad_()
    with pytest.warns(CrossentWarning, match=r"straight out of softmax .*pass the raw logits"):
        F.cross_entropy(x.softmax(1), torch.tensor([0, 2]))
    with pytest.warns(CrossentWarning, match=r"straight out of log_softmax .*pass the raw logits"):
        F.cross_entropy(torch.log_softmax(x, 1), torch.tensor([0, 2]))


def test_softmax_on_k_dim_input_warns():
    x = logits(2, 4, 8, 8).softmax(1)
    with pytest.warns(CrossentWarning, match=r"looks like softmax"):
        F.cross_entropy(x, torch.zeros(2, 8, 8, dtype=torch.long))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: F.cross_entropy(x, y),
        lambda x, y: cnn.CrossEntropyLoss()(x, y),
    ],
    ids=["functional", "module"],
)
def test_class_index_too_large_shows_value_position_C_range_and_hints(call):
    x = logits(6, 5)
    y = torch.tensor([1, 2, 3, 4, 5, 1])  # labels 1..5 for C = 5
    with pytest.raises(
        CrossentIndexError,
        match=r"expected class indices in \[0, 4\] \(C=5\) or ignore_index=-100, "
        r"but got 5 at position \(4,\).*Labels start at 1\? subtract 1.*"
        r"Marks no label\? pass ignore_index=5\.",
    ):
        call(x, y)


def test_negative_class_index_names_ignore_index():
    x = logits(2, 5, 3)
    y = torch.tensor([[0, 1, 2], [3, -7, 1]])
    with pytest.raises(
        CrossentIndexError,
        match=r"class indices in \[0, 4\] \(C=5\).*but got -7 at position \(1, 1\) "
        r".*Marks no label\? pass ignore_index=-7\.",
    ):
        F.cross_entropy(x, y)


def test_index_error_is_an_index_error_and_a_value_error():
    with pytest.raises(IndexError):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 3]))


def test_labels_beyond_C_with_zero_say_how_many_outputs_are_needed():
    with pytest.raises(CrossentIndexError, match=r"got 7 .*needs at least 8 outputs \(it has 5\)"):
        F.cross_entropy(logits(3, 5), torch.tensor([0, 7, 2]))


def test_minus_one_padding_with_default_ignore_index_suggests_minus_one():
    x = logits(4, 5)
    y = torch.tensor([0, 3, -1, -1])
    with pytest.raises(
        CrossentIndexError,
        match=r"or ignore_index=-100, but got -1 at position \(2,\).*"
        r"Padded with -1\? .*pass ignore_index=-1",
    ):
        cnn.CrossEntropyLoss()(x, y)
    # and the fix works (same value as torch)
    ours = cnn.CrossEntropyLoss(ignore_index=-1)(x, y)
    ref = torch.nn.CrossEntropyLoss(ignore_index=-1)(x, y)
    torch.testing.assert_close(ours, ref)


def test_float_class_ids_need_long():
    with pytest.raises(
        CrossentTypeError,
        match=r"expected integer class indices.*but got dtype torch\.float32\. "
        r"Class indices must be integers: use `target\.long\(\)`\. "
        r"Class-probability targets must have the input's shape \(4, 3\)",
    ):
        F.cross_entropy(logits(4, 3), torch.tensor([0.0, 2.0, 1.0, 1.0]))


def test_one_hot_integer_targets_suggest_argmax_or_float():
    y = TF.one_hot(torch.tensor([0, 2, 1, 1]), 3)
    with pytest.raises(
        CrossentValueError,
        match=r"but got an integer target of shape \(4, 3\).*looks one-hot.*"
        r"`target\.argmax\(1\)`.*`target\.float\(\)`",
    ):
        cnn.CrossEntropyLoss()(logits(4, 3), y)


def test_n_by_1_targets_suggest_squeeze():
    with pytest.raises(CrossentValueError, match=r"but got target of shape \(4, 1\)\..*`target\.squeeze\(1\)`"):
        F.cross_entropy(logits(4, 3), torch.tensor([[0], [2], [1], [1]]))


def test_sequence_logits_btv_suggest_transpose():
    x = logits(2, 7, 11)  # (B, T, V)
    y = torch.randint(0, 11, (2, 7), generator=_gen(1))
    with pytest.raises(
        CrossentValueError,
        match=r"but got target of shape \(2, 7\)\. For sequences the class dimension "
        r"is dim 1.*`input\.transpose\(1, 2\)`",
    ):
        cnn.CrossEntropyLoss()(x, y)
    # the suggested fix gives torch's value
    torch.testing.assert_close(F.cross_entropy(x.transpose(1, 2), y), TF.cross_entropy(x.transpose(1, 2), y))


@pytest.mark.parametrize("loss", ["bce", "bce_logits"])
def test_n_by_1_input_with_n_target_no_broadcasting(loss):
    x = torch.rand(4, 1, generator=_gen()) if loss == "bce" else logits(4, 1)
    f = F.binary_cross_entropy if loss == "bce" else F.binary_cross_entropy_with_logits
    with pytest.raises(
        CrossentValueError,
        match=r"but got input \(4, 1\) and target \(4,\)\..*"
        r"`target\.unsqueeze\(1\)` or `input\.squeeze\(1\)`",
    ):
        f(x, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    with pytest.raises(
        CrossentValueError,
        match=r"but got input \(4,\) and target \(4, 1\)\..*"
        r"`target\.squeeze\(1\)` or `input\.unsqueeze\(1\)`",
    ):
        f(x.squeeze(1), torch.tensor([[1.0], [0.0], [1.0], [0.0]]))


@pytest.mark.parametrize("loss", ["bce", "bce_logits"])
def test_bce_targets_outside_0_1_raise(loss):
    x = torch.tensor([0.9, 0.2]) if loss == "bce" else torch.tensor([3.0, -1.0])
    f = F.binary_cross_entropy if loss == "bce" else F.binary_cross_entropy_with_logits
    with pytest.raises(
        CrossentValueError,
        match=r"expected `target` values in \[0, 1\], but got 2 at position \(0,\) "
        r"\(targets range over \[0, 2\]\)\..*CrossEntropyLoss",
    ):
        f(x, torch.tensor([2.0, 0.0]))


def test_torch_returns_a_negative_loss_for_target_2():
    # what crossent protects against: torch's BCEWithLogitsLoss silently goes negative
    assert torch.nn.BCEWithLogitsLoss()(torch.tensor([3.0]), torch.tensor([2.0])).item() < 0


def test_minus_one_target_suggests_ignore_index_and_it_works():
    x, t = logits(4), torch.tensor([1.0, -1.0, 0.0, 1.0])
    with pytest.raises(CrossentValueError, match=r"got -1 at position \(1,\).*pass ignore_index=-1"):
        cnn.BCEWithLogitsLoss()(x, t)
    kept = torch.tensor([0, 2, 3])
    torch.testing.assert_close(
        cnn.BCEWithLogitsLoss(ignore_index=-1)(x, t), TF.binary_cross_entropy_with_logits(x[kept], t[kept])
    )


def test_negative_probability_target_shows_first_bad_row():
    q = torch.tensor([[0.5, 0.5, 0.0], [1.2, -0.2, 0.0], [0.0, -1.0, 2.0]])
    with pytest.raises(
        CrossentValueError,
        match=r"expected class-probability targets with non-negative entries, but got "
        r"row 1 = \[1\.2, -0\.2, 0\]\.",
    ):
        F.cross_entropy(logits(3, 3), q)


def test_rows_not_summing_to_one_warn_once_showing_row_and_sum():
    q = torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 0.0]])  # multi-hot second row
    with pytest.warns(
        CrossentWarning,
        match=r"rows should sum to 1, but row 1 = \[1, 1, 0\] sums to 2\. .*"
        r"multi-hot.*BCEWithLogitsLoss",
    ):
        out = F.cross_entropy(logits(2, 3), q)
    torch.testing.assert_close(out, TF.cross_entropy(logits(2, 3), q))  # legal: torch's value


def test_k_dim_probability_rows_are_along_dim_1():
    q = logits(2, 3, 4).softmax(1)
    q[1, :, 2] = torch.tensor([0.1, 0.1, 0.1])
    with pytest.warns(CrossentWarning, match=r"row 6 = \[0\.1, 0\.1, 0\.1\] sums to 0\.3"):
        F.cross_entropy(logits(2, 3, 4), q)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range_fails_at_construction_and_call(value):
    pattern = r"expected `label_smoothing` in \[0, 1\], but got " + re.escape(repr(value))
    with pytest.raises(CrossentValueError, match=r"CrossEntropyLoss: " + pattern):
        cnn.CrossEntropyLoss(label_smoothing=value)
    with pytest.raises(CrossentValueError, match=r"BCEWithLogitsLoss: " + pattern):
        cnn.BCEWithLogitsLoss(label_smoothing=value)
    with pytest.raises(CrossentValueError, match=r"cross_entropy: " + pattern):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 1]), label_smoothing=value)


def test_torch_ignores_negative_label_smoothing():
    x, y = logits(4, 3), torch.tensor([0, 1, 2, 1])
    assert TF.cross_entropy(x, y, label_smoothing=-0.1).item() == TF.cross_entropy(x, y).item()


def test_class_weight_of_wrong_length_gives_C_and_working_shape():
    with pytest.raises(
        CrossentValueError,
        match=r"expected `weight` of shape \(5,\), one number per class \(C=5\), but "
        r"got shape \(4,\)\. .*weight=torch\.ones\(5\)",
    ):
        cnn.CrossEntropyLoss(weight=torch.ones(4))(logits(2, 5), torch.tensor([0, 1]))


def test_class_weight_of_wrong_rank_fails_at_construction():
    with pytest.raises(
        CrossentValueError,
        match=r"CrossEntropyLoss: expected `weight` of shape \(C,\)"
        r".*but got shape \(1, 5\)",
    ):
        cnn.CrossEntropyLoss(weight=torch.ones(1, 5))


def test_bce_weight_not_broadcastable():
    with pytest.raises(
        CrossentValueError,
        match=r"`weight` broadcastable to the input's shape \(4, 3\)"
        r", but got shape \(4,\)",
    ):
        F.binary_cross_entropy_with_logits(logits(4, 3), torch.rand(4, 3), weight=torch.ones(4))


@pytest.mark.parametrize(
    "reduction, hint",
    [
        ("avg", r"Use reduction='mean'"),
        ("MEAN", r"lower case: use reduction='mean'"),
        (None, r"reduction='none' \(the string\)"),
    ],
)
def test_unknown_reduction_lists_the_valid_ones(reduction, hint):
    pattern = (
        r"expected `reduction` to be one of 'none', 'mean', 'sum', but got "
        + re.escape(repr(reduction))
        + r"\..*"
        + hint
    )
    for cls in (cnn.BCELoss, cnn.BCEWithLogitsLoss, cnn.CrossEntropyLoss):
        with pytest.raises(CrossentValueError, match=cls.__name__ + ": " + pattern):
            cls(reduction=reduction)
    with pytest.raises(CrossentValueError, match="cross_entropy: " + pattern):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 1]), reduction=reduction)


def test_weight_on_another_device_names_tensor_and_devices():
    w = torch.ones(3, device="meta")
    with pytest.raises(
        CrossentValueError,
        match=r"expected `weight` on the same device as `input` \(cpu\), but got "
        r"`weight` on meta\. Move it with `weight\.to\(input\.device\)`",
    ):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 1]), weight=w)
    with pytest.raises(CrossentValueError, match=r"`pos_weight` on meta"):
        F.binary_cross_entropy_with_logits(logits(2, 3), torch.rand(2, 3), pos_weight=torch.ones(3, device="meta"))
    with pytest.raises(CrossentValueError, match=r"`target` on meta"):
        F.binary_cross_entropy(torch.rand(2, 3), torch.rand(2, 3, device="meta"))


def test_float64_weight_on_float32_input_is_handled():
    x, y = logits(4, 3), torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 2.0, 0.5])
    ours = F.cross_entropy(x, y, weight=w.double())  # torch raises a dtype error here
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, TF.cross_entropy(x, y, weight=w))
    t = torch.rand(4, 3, generator=_gen(2))
    torch.testing.assert_close(
        F.binary_cross_entropy_with_logits(x, t, pos_weight=w.double()),
        TF.binary_cross_entropy_with_logits(x, t, pos_weight=w),
    )


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_range_index_is_a_readable_error_not_a_device_assert():
    x = torch.randn(8, 5, device="cuda")
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1], device="cuda")
    with pytest.raises(CrossentIndexError, match=r"but got 5 at position \(5,\)"):
        F.cross_entropy(x, y)
    torch.cuda.synchronize()  # the context is still healthy: no kernel indexed with 5
    F.cross_entropy(x, y.clamp(max=4)).item()
