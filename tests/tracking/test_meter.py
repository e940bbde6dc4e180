"""LossMeter: the epoch average equals the whole-dataset loss, whatever the loss's options.

References are torch.nn.functional in float64 on the whole data set in one call (or the
formula written out where torch has no such option), never crossent itself.
"""

import gc
import json
import math
import weakref

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as TF

import crossent
import crossent.nn as cnn
from crossent._validation import reset_warnings
from crossent.tracking import LossMeter

REL = 1e-12
N = 103  # 6 full batches of 16 and a last batch of 7
BATCH = 16


def _batches(n=N, size=BATCH):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _meter_over(criterion, x, y):
    meter = LossMeter()
    for s in _batches(x.shape[0]):
        meter(criterion, x[s], y[s])
    return meter


def _close(a, b, rel=REL):
    assert math.isfinite(a) and math.isfinite(b)
    assert abs(a - b) <= rel * abs(b), (a, b, abs(a - b) / abs(b))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def _logits(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * 3


def test_cross_entropy_uneven_last_batch(gen):
    x, y = _logits(gen, N, 5), torch.randint(0, 5, (N,), generator=gen)
    _close(_meter_over(cnn.CrossEntropyLoss(), x, y).compute(), TF.cross_entropy(x, y).item())


def test_cross_entropy_class_weight(gen):
    x, y = _logits(gen, N, 5), torch.randint(0, 5, (N,), generator=gen)
    w = torch.tensor([0.2, 1.0, 3.5, 0.7, 2.0], dtype=torch.float64)
    ref = TF.cross_entropy(x, y, weight=w).item()
    # mean = sum(w[y] * l) / sum(w[y]), written out
    per = TF.cross_entropy(x, y, reduction="none")
    assert abs(ref - ((w[y] * per).sum() / w[y].sum()).item()) < 1e-14
    _close(_meter_over(cnn.CrossEntropyLoss(weight=w), x, y).compute(), ref)


def test_cross_entropy_ignore_index_with_a_fully_ignored_batch(gen):
    x, y = _logits(gen, N, 4), torch.randint(0, 4, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < 0.3] = -100
    y[16:32] = -100  # a batch with nothing to count: adds 0 / 0 to the sums
    w = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match=r"all 16 targets equal ignore_index"):
        meter = _meter_over(cnn.CrossEntropyLoss(weight=w), x, y)
    _close(meter.compute(), TF.cross_entropy(x, y, weight=w).item())
    assert meter.denominator == pytest.approx(w[y[y != -100]].sum().item(), rel=1e-15)


def test_cross_entropy_label_smoothing_with_weight_and_ignore(gen):
    x, y = _logits(gen, N, 6), torch.randint(0, 6, (N,), generator=gen)
    y[::9] = 3
    y[::11] = -1
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    crit = cnn.CrossEntropyLoss(weight=w, ignore_index=-1, label_smoothing=0.15)
    ref = TF.cross_entropy(x, y, weight=w, ignore_index=-1, label_smoothing=0.15).item()
    _close(_meter_over(crit, x, y).compute(), ref)


def test_cross_entropy_k_dimensional_counts_elements_not_samples(gen):
    x, y = _logits(gen, N, 3, 4, 2), torch.randint(0, 3, (N, 4, 2), generator=gen)
    y[y == 2] = -100
    meter = _meter_over(cnn.CrossEntropyLoss(), x, y)
    _close(meter.compute(), TF.cross_entropy(x, y).item())
    assert meter.denominator == (y != -100).sum().item()


def test_cross_entropy_probability_targets(gen):
    x = _logits(gen, N, 5)
    q = torch.softmax(torch.randn(N, 5, generator=gen, dtype=torch.float64), 1)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    crit = cnn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    _close(_meter_over(crit, x, q).compute(), TF.cross_entropy(x, q, weight=w, label_smoothing=0.1).item())


def test_bce_on_probabilities_with_weight(gen):
    p = torch.rand(N, 3, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    t = (torch.rand(N, 3, generator=gen) < 0.4).double()
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)  # broadcast over the batch
    _close(_meter_over(cnn.BCELoss(weight=w), p, t).compute(), TF.binary_cross_entropy(p, t, weight=w).item())


def test_bce_with_logits_weight_and_pos_weight(gen):
    x, t = _logits(gen, N, 3), (torch.rand(N, 3, generator=gen) < 0.3).double()
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    pw = torch.tensor([3.0, 1.0, 0.25], dtype=torch.float64)
    crit = cnn.BCEWithLogitsLoss(weight=w, pos_weight=pw)
    ref = TF.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw).item()
    _close(_meter_over(crit, x, t).compute(), ref)


def test_bce_with_logits_ignore_index(gen):
    x = _logits(gen, N, 2)
    t = (torch.rand(N, 2, generator=gen) < 0.5).double()
    t[torch.rand(N, 2, generator=gen) < 0.25] = -1
    keep = t != -1
    # torch has no ignore_index for BCE: the mean over the kept elements, from the math
    per = TF.binary_cross_entropy_with_logits(x, t.clamp(min=0), reduction="none")
    ref = (per[keep].sum() / keep.sum()).item()
    meter = _meter_over(cnn.BCEWithLogitsLoss(ignore_index=-1), x, t)
    _close(meter.compute(), ref)
    assert meter.denominator == keep.sum().item()


def test_bce_label_smoothing(gen):
    x, t = _logits(gen, N), (torch.rand(N, generator=gen) < 0.5).double()
    ref = TF.binary_cross_entropy_with_logits(x, t * 0.8 + 0.1).item()
    _close(_meter_over(cnn.BCEWithLogitsLoss(label_smoothing=0.2), x, t).compute(), ref)


def test_functional_losses_and_other_reductions_give_the_same_parts(gen):
    x, y = _logits(gen, N, 5), torch.randint(0, 5, (N,), generator=gen)
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    ref = TF.cross_entropy(x, y, weight=w).item()
    for reduction in ("mean", "sum", "none"):
        meter = LossMeter()
        for s in _batches():
            meter(crossent.functional.cross_entropy, x[s], y[s], weight=w, reduction=reduction)
        _close(meter.compute(), ref)


def test_the_tutorial_recipe_is_wrong_where_the_meter_is_right(gen):
    """loss.item() * x.size(0) / len(dataset) vs the meter, with class weights and ignore_index."""
    x, y = _logits(gen, N, 3), torch.randint(0, 3, (N,), generator=gen)
    y[::5] = -100
    crit = cnn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64))
    ref = TF.cross_entropy(x, y, weight=crit.weight).item()
    running, meter = 0.0, LossMeter()
    for s in _batches():
        running += meter(crit, x[s], y[s]).item() * x[s].size(0)
    _close(meter.compute(), ref)
    assert abs(running / N - ref) > 1e-3 * ref


def test_update_with_numbers_and_tensors_equals_parts(gen):
    x, y = _logits(gen, N, 4), torch.randint(0, 4, (N,), generator=gen)
    crit = cnn.CrossEntropyLoss(reduction="sum")
    a, b = LossMeter(), LossMeter()
    for s in _batches():
        loss = crit(x[s], y[s])
        a.update(loss, y[s].numel())
        b.update(loss.item(), float(y[s].numel()))
    ref = TF.cross_entropy(x, y).item()
    _close(a.compute(), ref)
    assert a.compute() == b.compute()
    assert a.updates == b.updates == len(_batches())


def test_meter_never_modifies_or_aliases_the_callers_tensors():
    total = torch.tensor(2.0, dtype=torch.float64)
    den = torch.tensor(4.0, dtype=torch.float64)
    meter = LossMeter()
    meter.update(total, den)
    meter.update(total, den)
    assert total.item() == 2.0 and den.item() == 4.0
    assert meter.total == 4.0 and meter.denominator == 8.0 and meter.compute() == 0.5


def test_compute_does_not_consume_and_reset_clears(gen):
    meter = LossMeter()
    meter.update(3.0, 2)
    assert meter.compute() == 1.5
    meter.update(1.0, 2)
    assert meter.compute() == 1.0
    meter.reset()
    assert meter.updates == 0 and meter.total == 0.0
    meter.update(5.0, 1)
    assert meter.compute() == 5.0


def test_state_dict_resume_is_bit_identical(gen):
    x, y = _logits(gen, N, 5), torch.randint(0, 5, (N,), generator=gen)
    crit = cnn.CrossEntropyLoss(weight=torch.rand(5, generator=gen, dtype=torch.float64) + 0.5, label_smoothing=0.05)
    full = _meter_over(crit, x, y)
    batches = _batches()
    first = LossMeter()
    for s in batches[:3]:
        first(crit, x[s], y[s])
    saved = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = LossMeter()
    resumed.load_state_dict(saved)
    for s in batches[3:]:
        resumed(crit, x[s], y[s])
    assert resumed.compute() == full.compute()
    assert resumed.updates == full.updates
    assert resumed.state_dict() == full.state_dict()


def test_load_state_dict_rejects_foreign_dicts():
    with pytest.raises(ValueError, match=r"LossMeter.load_state_dict: expected a dict with keys"):
        LossMeter().load_state_dict({"sum": 1.0, "count": 2})
    with pytest.raises(TypeError, match=r"`total` to be a number"):
        LossMeter().load_state_dict({"total": "1.0", "denominator": 2.0, "updates": 1})


def test_grad_tensor_warns_once_and_no_graph_is_kept():
    reset_warnings()
    w = torch.randn(8, 3, requires_grad=True, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    meter = LossMeter()
    loss = TF.cross_entropy(w.exp(), y, reduction="sum")
    ref = weakref.ref(loss)
    with pytest.warns(crossent.CrossentWarning, match=r"`total` still requires grad.*detach"):
        meter.update(loss, 8)
    del loss
    gc.collect()
    assert ref() is None  # the meter kept neither the loss nor its graph
    assert meter._total.grad_fn is None and not meter._total.requires_grad
    assert meter.compute() == pytest.approx(TF.cross_entropy(w.exp(), y).item(), rel=1e-12)


def test_return_parts_path_keeps_no_graph():
    w = torch.randn(8, 3, requires_grad=True, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    meter = LossMeter()
    loss = meter(cnn.CrossEntropyLoss(), w * 2, y)  # returns the graph-carrying loss, no warning
    assert loss.requires_grad
    ref = weakref.ref(loss)
    loss.backward()
    del loss
    gc.collect()
    assert ref() is None and not meter._total.requires_grad


def test_single_mean_loss_is_refused_with_the_fix():
    loss = torch.tensor(0.7)
    with pytest.raises(TypeError, match=r"LossMeter.update: expected a LossParts.*return_parts=True"):
        LossMeter().update(loss)


def test_non_scalar_total_is_refused():
    with pytest.raises(ValueError, match=r"`total` to be a single number.*shape \(4,\)"):
        LossMeter().update(torch.ones(4), 4)


def test_parts_plus_denominator_is_refused():
    parts = cnn.CrossEntropyLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), return_parts=True)
    with pytest.raises(TypeError, match=r"LossParts already carries its denominator"):
        LossMeter().update(parts, 4)


def test_plain_torch_criterion_is_refused_with_the_import_fix():
    with pytest.raises(TypeError, match=r"crossent loss that accepts return_parts=True.*import crossent.nn"):
        LossMeter()(torch.nn.CrossEntropyLoss(), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_compute_without_updates_warns_and_is_nan():
    reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match=r"no batch was added"):
        assert math.isnan(LossMeter().compute())


def test_everything_ignored_is_nan_like_torch_and_the_batch_warns():
    reset_warnings()
    meter = LossMeter()
    with pytest.warns(crossent.CrossentWarning, match=r"all 4 targets equal ignore_index=-100"):
        meter(cnn.CrossEntropyLoss(), torch.randn(4, 3), torch.full((4,), -100))
    assert math.isnan(meter.compute())
    assert math.isnan(TF.cross_entropy(torch.randn(4, 3), torch.full((4,), -100)).item())


def test_float32_losses_are_summed_in_float64(gen):
    x = torch.randn(1000, 10, generator=gen)
    y = torch.randint(0, 10, (1000,), generator=gen)
    meter = LossMeter()
    for i in range(0, 1000, 37):
        meter(cnn.CrossEntropyLoss(), x[i : i + 37], y[i : i + 37])
    ref = TF.cross_entropy(x.double(), y).item()
    # each batch's sum is exact to float32 rounding, the accumulation adds nothing
    assert abs(meter.compute() - ref) <= 1e-6 * ref


@pytest.mark.filterwarnings("ignore:.*targets equal ignore_index:crossent.CrossentWarning")
@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 59), max_size=8, unique=True),
    seed=st.integers(0, 2**31 - 1),
    smoothing=st.sampled_from([0.0, 0.1]),
    ignore=st.booleans(),
)
def test_any_split_into_batches_gives_the_whole_dataset_loss(cuts, seed, smoothing, ignore):
    g = torch.Generator().manual_seed(seed)
    n = 60
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    if ignore:
        y[torch.rand(n, generator=g) < 0.3] = -100
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.05
    crit = cnn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)
    edges = [0] + sorted(cuts) + [n]
    meter = LossMeter()
    for lo, hi in zip(edges[:-1], edges[1:]):
        meter(crit, x[lo:hi], y[lo:hi])
    ref = TF.cross_entropy(x, y, weight=w, label_smoothing=smoothing).item()
    if math.isnan(ref):
        assert math.isnan(meter.compute())
    else:
        _close(meter.compute(), ref)


# --------------------------------------------------------------------------- invalid batches and states
@pytest.mark.parametrize("den", [-3.0, math.nan, math.inf, torch.tensor(-1.0)])
def test_a_bad_denominator_is_refused(den):
    meter = LossMeter()
    meter.update(2.0, 4.0)
    with pytest.raises(ValueError, match=r"LossMeter.update: expected a finite `denominator` >= 0.*but got"):
        meter.update(1.0, den)
    assert meter.state_dict() == {"total": 2.0, "denominator": 4.0, "updates": 1}  # not added


def test_update_one_minus_three_is_refused():
    with pytest.raises(ValueError, match=r"`denominator` >= 0 .*but got -3.0"):
        LossMeter().update(1.0, -3.0)


@pytest.mark.parametrize(
    "state, match",
    [
        ({"total": math.nan, "denominator": 2.0, "updates": 1}, r"a finite `total`, but got nan.*reset\(\)"),
        ({"total": math.inf, "denominator": 2.0, "updates": 1}, r"a finite `total`, but got inf"),
        ({"total": 1.0, "denominator": -2.0, "updates": 1}, r"a finite `denominator` >= 0.*but got -2.0"),
        ({"total": 1.0, "denominator": math.nan, "updates": 1}, r"a finite `denominator` >= 0.*but got nan"),
    ],
)
def test_load_state_dict_refuses_invalid_states(state, match):
    meter = LossMeter()
    with pytest.raises(ValueError, match=r"LossMeter.load_state_dict: expected " + match):
        meter.load_state_dict(state)
    assert meter.updates == 0


def test_a_nan_batch_warns_once():
    reset_warnings()
    meter = LossMeter()
    x = torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    meter(cnn.CrossEntropyLoss(), x, y)
    x[2, 1] = math.nan
    with pytest.warns(crossent.CrossentWarning, match=r"LossMeter.update: the total of batch 2 is nan.*isfinite"):
        for _ in range(3):
            meter(cnn.CrossEntropyLoss(), x, y)
    assert math.isnan(meter.compute())


def test_device_batches_are_checked_at_compute(monkeypatch):
    """Off the CPU, update keeps two flags on the device (no sync); compute reads them."""
    meter = LossMeter()
    from crossent.tracking import meter as meter_module

    monkeypatch.setattr(meter_module, "_on_host", lambda t: False)
    meter.update(torch.tensor(math.nan), torch.tensor(2.0))
    reset_warnings()
    with pytest.warns(crossent.CrossentWarning, match=r"LossMeter.compute: 1 batch\(es\) had a NaN or infinite total"):
        assert math.isnan(meter.compute())
    meter.update(torch.tensor(1.0), torch.tensor(-2.0))
    with pytest.raises(
        ValueError,
        match=r"LossMeter.compute: expected finite denominators >= 0 in every "
        r"batch, but got 1 batch\(es\) with a negative",
    ):
        meter.compute()
    meter.reset()
    meter.update(torch.tensor(1.0), torch.tensor(2.0))
    assert meter.compute() == 0.5
