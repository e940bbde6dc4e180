"""Guardrails beyond the issue's list (decisions documented in crossent._validation).

Rule: raise only where torch raises too or the answer would be wrong (NaN targets);
warn where the input is legal but probably a mistake."""

import pytest
import torch
import torch.nn.functional as TF

import crossent.functional as F
import crossent.nn as cnn
from crossent import CrossentTypeError, CrossentValueError, CrossentWarning
from crossent import _validation as V


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    V.reset_warnings()
    yield
    V.reset_warnings()


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- input dtype
@pytest.mark.parametrize("bad", [
    torch.randint(0, 3, (4, 3)), torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 3, dtype=torch.cfloat)],
    ids=["int64", "bool", "complex"])
@pytest.mark.parametrize("loss", ["ce", "bce", "bce_logits"])
def test_non_floating_input_is_a_type_error_as_in_torch(bad, loss):
    target = torch.tensor([0, 1, 2, 1]) if loss == "ce" else torch.ones(4, 3)
    ours = {"ce": F.cross_entropy, "bce": F.binary_cross_entropy,
            "bce_logits": F.binary_cross_entropy_with_logits}[loss]
    theirs = {"ce": TF.cross_entropy, "bce": TF.binary_cross_entropy,
              "bce_logits": TF.binary_cross_entropy_with_logits}[loss]
    with pytest.raises(Exception):
        theirs(bad, target)  # torch refuses these too, so refusing keeps drop-in parity
    with pytest.raises(CrossentTypeError, match=r"expected `input` to be a floating-point tensor .*"
                                                r"but got dtype torch\.\w+\. .*"):
        ours(bad, target)


def test_labels_passed_as_input_hint_at_argument_order():
    with pytest.raises(CrossentTypeError, match=r"argument order is \(input, target\)"):
        F.cross_entropy(torch.tensor([0, 1, 2]), logits(3, 3))


# --------------------------------------------------------------------------- NaN / inf targets
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_bce_target_raises(bad):
    with pytest.raises(CrossentValueError, match=r"expected `target` values in \[0, 1\], but got "
                                                 r"(nan|inf) at position \(1,\).*NaN or infinite target"):
        F.binary_cross_entropy_with_logits(logits(3), torch.tensor([1.0, bad, 0.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probability_target_raises_with_row(bad):
    q = torch.tensor([[0.2, 0.8], [bad, 1.0]])
    with pytest.raises(CrossentValueError, match=r"expected finite class-probability targets, but got "
                                                 r"row 1 = \[(nan|inf), 1\]"):
        F.cross_entropy(logits(2, 2), q)


def test_nan_probability_input_to_bce_raises_with_position():
    with pytest.raises(CrossentValueError, match=r"probabilities in \[0, 1\], but got NaN at position \(0, 1\)"):
        cnn.BCELoss()(torch.tensor([[0.5, float("nan")]]), torch.tensor([[1.0, 0.0]]))


# --------------------------------------------------------------------------- cross-entropy
def test_single_class_cross_entropy_warns_that_loss_is_always_zero():
    x = logits(8, 1, seed=3)
    with pytest.warns(CrossentWarning, match=r"single class \(C=1, shape \(8, 1\)\).*always 0.*"
                                             r"BCEWithLogitsLoss"):
        out = F.cross_entropy(x, torch.zeros(8, dtype=torch.long))
    assert out.item() == 0.0 == TF.cross_entropy(x, torch.zeros(8, dtype=torch.long)).item()
    F.cross_entropy(x, torch.zeros(8, dtype=torch.long), validate=False)  # a heuristic: off with the tier


def test_probability_targets_with_nonnegative_ignore_index_raise_like_torch():
    x, q = logits(4, 3), logits(4, 3, seed=1).softmax(1)
    with pytest.raises(RuntimeError):
        TF.cross_entropy(x, q, ignore_index=0)
    with pytest.raises(CrossentValueError, match=r"expected ignore_index < 0 with class-probability "
                                                 r"targets, but got ignore_index=0"):
        cnn.CrossEntropyLoss(ignore_index=0)(x, q)


def test_ignore_index_none_for_cross_entropy_is_a_type_error_like_torch():
    with pytest.raises(TypeError):
        TF.cross_entropy(logits(2, 3), torch.tensor([0, 1]), ignore_index=None)
    with pytest.raises(CrossentTypeError, match=r"`ignore_index` to be an integer, but got None\. "
                                                r"Keep the default ignore_index=-100"):
        F.cross_entropy(logits(2, 3), torch.tensor([0, 1]), ignore_index=None)


def test_class_dim_last_on_image_input_suggests_movedim():
    with pytest.raises(CrossentValueError, match=r"class dimension is dim 1, not the last one: use "
                                                 r"`input\.movedim\(-1, 1\)`"):
        F.cross_entropy(logits(2, 4, 4, 3), torch.zeros(2, 4, 4, dtype=torch.long))


def test_probability_target_requires_grad_gets_torch_gradient():
    x = logits(4, 3)
    q = logits(4, 3, seed=1).softmax(1).requires_grad_()
    (g_ours,) = torch.autograd.grad(F.cross_entropy(x, q), q)
    (g_torch,) = torch.autograd.grad(TF.cross_entropy(x, q), q)
    torch.testing.assert_close(g_ours, g_torch)


# --------------------------------------------------------------------------- binary
def test_bce_two_column_input_with_one_label_per_row_suggests_cross_entropy():
    with pytest.raises(CrossentValueError, match=r"input \(6, 2\) and target \(6,\).*2-class "
                                                 r"cross-entropy: use CrossEntropyLoss with `target\.long\(\)`"):
        cnn.BCEWithLogitsLoss()(logits(6, 2), torch.tensor([0.0, 1, 1, 0, 1, 0]))


def test_bce_class_index_targets_suggest_one_hot():
    with pytest.raises(CrossentValueError, match=r"input \(3, 4\) and target \(3,\).*"
                                                 r"`F\.one_hot\(target\.long\(\), 4\)\.float\(\)`"):
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
