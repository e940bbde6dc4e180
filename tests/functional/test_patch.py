"""crossent.patch(): torch's own loss entry points routed through crossent, and put back.

How a call is proven to go through crossent: a recorder wrapped around crossent's backend
``backend_for`` (only crossent calls it), values torch cannot produce (logits [20, 0, 0] with
class 0: torch float32 gives 0, crossent 4.12e-9), and crossent-only errors.
"""

import sys
import threading
import types

import pytest
import torch

import crossent
import crossent.functional._binary as _binary
import crossent.functional._multiclass as _multiclass
from crossent import _patch

TF = torch.nn.functional
ORIGINAL_FUNCTIONS = {name: getattr(TF, name) for name in _patch.LOSSES}
CLASSES = (torch.nn.BCELoss, torch.nn.BCEWithLogitsLoss, torch.nn.CrossEntropyLoss)
ORIGINAL_FORWARDS = {cls: vars(cls)["forward"] for cls in CLASSES}


def assert_torch_untouched():
    for name, fn in ORIGINAL_FUNCTIONS.items():
        assert getattr(TF, name) is fn, name
    for cls, fwd in ORIGINAL_FORWARDS.items():
        assert vars(cls)["forward"] is fwd, cls
    assert not _patch._active and not _patch._slots


def test_import_patches_nothing():
    for name, fn in ORIGINAL_FUNCTIONS.items():
        assert fn.__module__ == "torch.nn.functional" and not hasattr(fn, "__crossent_patch__"), name
    assert_torch_untouched()


@pytest.fixture(autouse=True)
def _leave_torch_as_found():
    yield
    crossent.unpatch()
    assert_torch_untouched()


@pytest.fixture
def calls(monkeypatch):
    """Every (op, backend) crossent's functional layer dispatches (``backend_for``), or
    resolves on the plain eager cross-entropy call, which skips it."""
    seen = []

    def recording(dispatch):
        def wrapped(op, like, backend=None):
            seen.append((op, backend))
            return dispatch(op, like, backend)

        return wrapped

    monkeypatch.setattr(_multiclass, "backend_for", recording(_multiclass.backend_for))
    monkeypatch.setattr(_multiclass, "resolve", recording(_multiclass.resolve))  # the plain eager call
    monkeypatch.setattr(_binary, "backend_for", recording(_binary.backend_for))
    return seen


class PlainModel(torch.nn.Module):
    """Code you do not own: calls torch's function by its full name."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.lin(x), y)


CONFIDENT = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])  # true loss 4.1223e-9


def test_inside_functional_goes_through_crossent_outside_torch(calls):
    x, y = CONFIDENT
    assert TF.cross_entropy(x, y).item() == 0.0 and calls == []
    with crossent.patch():
        assert TF.cross_entropy(x, y).item() == pytest.approx(4.1223e-9, rel=1e-4)
        assert calls == [("cross_entropy", None)]
        with pytest.raises(crossent.CrossentIndexError, match="class indices"):
            TF.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    assert TF.cross_entropy(x, y).item() == 0.0
    with pytest.raises(IndexError) as info:
        TF.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    assert not isinstance(info.value, crossent.CrossentIndexError)


def test_plain_module_equal_losses_and_gradients(calls):
    torch.manual_seed(0)
    model = PlainModel()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = model(x, y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    with crossent.patch():
        got = model(x, y)
        got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert calls == [("cross_entropy", None)]
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_binary_functions_routed(calls):
    x, t = torch.tensor([-20.0, 0.5]), torch.tensor([0.0, 1.0])
    with crossent.patch():
        loss = TF.binary_cross_entropy_with_logits(x, t, reduction="none")
        assert loss[0].item() == pytest.approx(2.0612e-9, rel=1e-4)  # torch: 0
        p = torch.tensor([0.2, 0.7])
        torch.testing.assert_close(TF.binary_cross_entropy(p, t), ORIGINAL_FUNCTIONS["binary_cross_entropy"](p, t))
        with pytest.raises(crossent.CrossentValueError, match="probabilities"):
            TF.binary_cross_entropy(torch.tensor([1.5, -0.5]), t)
    assert [op for op, _ in calls] == ["binary_cross_entropy_with_logits", "binary_cross_entropy"]
    assert TF.binary_cross_entropy_with_logits(x, t, reduction="none")[0].item() == 0.0


def _modules():
    return [
        torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=1, label_smoothing=0.1),
        torch.nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 3.0]), pos_weight=torch.tensor([2.0, 0.5])),
        torch.nn.BCELoss(reduction="sum"),
    ]


def _module_inputs():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 3, generator=g, requires_grad=True), torch.randint(0, 3, (8,), generator=g)),
        (torch.randn(8, 2, generator=g, requires_grad=True), torch.rand(8, 2, generator=g)),
        (torch.rand(8, 2, generator=g, requires_grad=True), torch.rand(8, 2, generator=g)),
    ]


@pytest.mark.parametrize("built", ["before", "inside"])
def test_torch_loss_modules_routed_with_their_options(calls, built):
    inputs = _module_inputs()
    refs = [m(x, t) for m, (x, t) in zip(_modules(), inputs)]
    ref_grads = [torch.autograd.grad(r, x)[0] for r, (x, _) in zip(refs, inputs)]
    before = _modules()
    with crossent.patch(functional=False):  # forward patched in place, functions left alone
        assert TF.cross_entropy is ORIGINAL_FUNCTIONS["cross_entropy"]
        mods = before if built == "before" else _modules()
        assert [type(m) for m in mods] == [torch.nn.CrossEntropyLoss, torch.nn.BCEWithLogitsLoss, torch.nn.BCELoss]
        got = [m(x, t) for m, (x, t) in zip(mods, inputs)]
    assert [op for op, _ in calls] == ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy"]
    for g, r, (x, _), rg in zip(got, refs, inputs, ref_grads):
        torch.testing.assert_close(g, r)
        torch.testing.assert_close(torch.autograd.grad(g, x)[0], rg)


def test_crossent_modules_keep_their_own_forward(calls):
    m = crossent.nn.CrossEntropyLoss(backend="reference")
    with crossent.patch(backend="chunked-torch"):
        m(*CONFIDENT)
    assert calls == [("cross_entropy", "reference")]


def test_choose_losses_and_entry_points(calls):
    with crossent.patch(losses=["cross_entropy"], modules=False):
        assert TF.cross_entropy is not ORIGINAL_FUNCTIONS["cross_entropy"]
        assert TF.binary_cross_entropy is ORIGINAL_FUNCTIONS["binary_cross_entropy"]
        assert vars(torch.nn.CrossEntropyLoss)["forward"] is ORIGINAL_FORWARDS[torch.nn.CrossEntropyLoss]
        TF.binary_cross_entropy_with_logits(torch.zeros(2), torch.ones(2))
        assert calls == []
    with crossent.patch(losses="binary_cross_entropy", functional=False):
        assert TF.binary_cross_entropy is ORIGINAL_FUNCTIONS["binary_cross_entropy"]
        assert vars(torch.nn.BCELoss)["forward"] is not ORIGINAL_FORWARDS[torch.nn.BCELoss]
        assert vars(torch.nn.CrossEntropyLoss)["forward"] is ORIGINAL_FORWARDS[torch.nn.CrossEntropyLoss]


def test_options_reach_every_call_and_explicit_keywords_win(calls):
    x, y = CONFIDENT
    with crossent.patch(backend="reference", validate=False):
        TF.cross_entropy(x, y)
        TF.cross_entropy(x, y, backend="chunked-torch")
        torch.nn.CrossEntropyLoss()(x, y)
    assert calls == [("cross_entropy", "reference"), ("cross_entropy", "chunked-torch"), ("cross_entropy", "reference")]


def test_bad_arguments_are_errors_and_patch_nothing():
    with pytest.raises(crossent.CrossentValueError, match="losses.*'nll_loss'"):
        crossent.patch(losses=["nll_loss"])
    with pytest.raises(crossent.CrossentValueError, match="backend.*'fast'"):
        crossent.patch(backend="fast")
    with pytest.raises(crossent.CrossentTypeError, match="rebind"):
        crossent.patch(rebind=[42])
    assert_torch_untouched()


def test_patching_twice_does_not_wrap_twice():
    first = crossent.patch()
    wrapper = TF.cross_entropy
    second = crossent.patch()
    assert TF.cross_entropy is wrapper and wrapper.__wrapped__ is crossent.functional.cross_entropy
    assert vars(torch.nn.CrossEntropyLoss)["forward"] is _patch._FORWARDS["cross_entropy"]
    first.unpatch()
    assert TF.cross_entropy is wrapper  # the second is still active
    first.unpatch()  # leaving twice is nothing
    second.unpatch()
    assert_torch_untouched()


def test_call_then_unpatch_leaves_everything():
    crossent.patch()
    crossent.patch(losses=["cross_entropy"], backend="reference")
    with crossent.patch():
        crossent.unpatch()  # leaves the context's patch too; its exit is then nothing
        assert_torch_untouched()
    crossent.unpatch()  # nothing active: nothing happens
    assert_torch_untouched()


def test_nested_contexts_are_a_stack(calls):
    x, y = CONFIDENT
    with crossent.patch() as outer:
        with crossent.patch(backend="reference") as inner:
            TF.cross_entropy(x, y)
            assert inner.active and outer.active
        TF.cross_entropy(x, y)
        assert not inner.active
        with crossent.patch(losses=["binary_cross_entropy"], backend="reference"):
            TF.cross_entropy(x, y)  # the innermost patch covering cross_entropy is `outer`
    TF.cross_entropy(x, y)
    assert calls == [("cross_entropy", "reference"), ("cross_entropy", None), ("cross_entropy", None)]


def test_restores_someone_elses_patch(monkeypatch):
    def theirs(*args, **kwargs):
        return ORIGINAL_FUNCTIONS["cross_entropy"](*args, **kwargs)

    monkeypatch.setattr(TF, "cross_entropy", theirs)
    with crossent.patch():
        assert TF.cross_entropy is _patch._FUNCTIONS["cross_entropy"]
        assert TF.cross_entropy(*CONFIDENT).item() > 0
    assert TF.cross_entropy is theirs
    monkeypatch.undo()


def test_keeps_a_patch_made_on_top_of_crossents():
    def later(*args, **kwargs):
        return ORIGINAL_FUNCTIONS["cross_entropy"](*args, **kwargs)

    try:
        with crossent.patch(losses=["cross_entropy"], modules=False):
            TF.cross_entropy = later
        assert TF.cross_entropy is later  # theirs to restore, not crossent's to overwrite
    finally:
        TF.cross_entropy = ORIGINAL_FUNCTIONS["cross_entropy"]


def test_rebind_names_bound_at_import(calls):
    lib = types.ModuleType("some_lib_losses")
    exec(
        "from torch.nn.functional import cross_entropy\n"
        "from torch.nn.functional import binary_cross_entropy_with_logits as bce\n"
        "import torch.nn.functional as F\n"
        "def loss(x, y):\n    return cross_entropy(x, y)\n",
        lib.__dict__,
    )
    sys.modules[lib.__name__] = lib
    try:
        with crossent.patch():  # without rebind, the name bound at import stays torch's
            assert lib.loss(*CONFIDENT).item() == 0.0
        with crossent.patch(rebind=["some_lib_losses"]):
            assert lib.loss(*CONFIDENT).item() == pytest.approx(4.1223e-9, rel=1e-4)
            assert lib.bce is _patch._FUNCTIONS["binary_cross_entropy_with_logits"]
            assert lib.F is TF
        assert lib.cross_entropy is ORIGINAL_FUNCTIONS["cross_entropy"]
        assert lib.bce is ORIGINAL_FUNCTIONS["binary_cross_entropy_with_logits"]
        with crossent.patch(losses=["cross_entropy"], rebind=[lib]):
            assert lib.bce is ORIGINAL_FUNCTIONS["binary_cross_entropy_with_logits"]
        assert lib.cross_entropy is ORIGINAL_FUNCTIONS["cross_entropy"]
    finally:
        del sys.modules[lib.__name__]


def test_no_recursion_through_patched_torch(backend):  # every CPU backend (tests/conftest.py)
    """crossent's implementations never call the three patched torch functions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (6, 3), generator=g)
    t = torch.rand(6, 5, 3, generator=g)
    W = torch.randn(5, 5, generator=g, requires_grad=True)
    cases = [
        lambda: TF.cross_entropy(x, y, label_smoothing=0.1),
        lambda: TF.cross_entropy(x, t.softmax(1)),
        lambda: TF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(3)),
        lambda: TF.binary_cross_entropy(x.sigmoid(), t),
    ]
    refs = [case() for case in cases]
    with crossent.patch(backend=backend):
        got = [case() for case in cases]
        for g_, r in zip(got, refs):
            torch.testing.assert_close(g_, r)
            g_.backward()
        crossent.linear_cross_entropy(x[:, :, 0].detach(), W, y[:, 0]).backward()


def test_concurrent_enter_and_leave():
    """Threads entering and leaving at will: every loss inside a patch is crossent's, and
    torch is whole again once the last one has left."""
    x, y = CONFIDENT
    errors = []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for k in range(40):
                with crossent.patch(
                    losses=None if (i + k) % 2 else ["cross_entropy"], backend="reference" if i % 3 == 0 else None
                ):
                    if TF.cross_entropy(x, y).item() == 0.0:
                        errors.append(f"thread {i}: torch inside a patch")
                    torch.nn.CrossEntropyLoss()(x, y)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert_torch_untouched()


def test_patch_is_process_wide():
    """Documented: torch's attributes are global, so another thread sees the patch too."""
    inside, done = threading.Event(), threading.Event()
    seen = []

    def other():
        inside.wait()
        seen.append(TF.cross_entropy(*CONFIDENT).item())
        done.set()

    th = threading.Thread(target=other)
    th.start()
    with crossent.patch():
        inside.set()
        done.wait(10)
    th.join()
    assert seen and seen[0] > 0


def test_modules_pickle_across_the_patch():
    """The classes stay torch's: a module saved inside the patch loads and runs outside."""
    import pickle

    with crossent.patch():
        blob = pickle.dumps(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    m = pickle.loads(blob)
    assert type(m) is torch.nn.CrossEntropyLoss and m.label_smoothing == 0.1
    torch.testing.assert_close(m(*CONFIDENT), ORIGINAL_FUNCTIONS["cross_entropy"](*CONFIDENT, label_smoothing=0.1))
