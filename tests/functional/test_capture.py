"""Captured and transformed code: torch.compile (full graph, dynamic shapes), torch.export,
torch.func, torch.jit.trace / script, torch.library.opcheck, and no host reads in a graph.

Every case is a training step ``loss = crossent_loss(model(x), target)`` compared with the
same step run eagerly by crossent (values and the model's gradients) and with torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as TF

import crossent
from crossent.backends import ops

from _helpers import (
    STEP_C,
    STEP_H,
    STEP_N,
    STEP_PW,
    STEP_W,
    assert_close,
    check_compiled_step,
    run_step,
    step_data,
    step_model,
)

torch._dynamo.config.cache_size_limit = 64

N, H, C = STEP_N, STEP_H, STEP_C
PW, W = STEP_PW, STEP_W


# name -> (crossent step, torch step) taking (logits (n, C), y, soft); each returns a loss
CASES = {
    "ce": (lambda z, y, s: crossent.cross_entropy(z, y), lambda z, y, s: TF.cross_entropy(z, y)),
    "ce_weight_smoothing": (
        lambda z, y, s: crossent.nn.CrossEntropyLoss(weight=W, label_smoothing=0.1)(z, y),
        lambda z, y, s: TF.cross_entropy(z, y, weight=W, label_smoothing=0.1),
    ),
    "ce_ignore_sum": (
        lambda z, y, s: crossent.cross_entropy(z, y.clamp(min=0), ignore_index=3, reduction="sum"),
        lambda z, y, s: TF.cross_entropy(z, y.clamp(min=0), ignore_index=3, reduction="sum"),
    ),
    "ce_probabilities": (
        lambda z, y, s: crossent.cross_entropy(z, s.softmax(1), label_smoothing=0.2),
        lambda z, y, s: TF.cross_entropy(z, s.softmax(1), label_smoothing=0.2),
    ),
    "ce_kdim": (
        lambda z, y, s: crossent.cross_entropy(z.view(3, 4, C).transpose(1, 2), y.view(3, 4)),
        lambda z, y, s: TF.cross_entropy(z.view(3, 4, C).transpose(1, 2), y.view(3, 4)),
    ),
    "ce_none": (
        lambda z, y, s: crossent.cross_entropy(z, y, reduction="none").square().sum(),
        lambda z, y, s: TF.cross_entropy(z, y, reduction="none").square().sum(),
    ),
    "ce_parts": (
        lambda z, y, s: crossent.cross_entropy(z, y, return_parts=True).loss,
        lambda z, y, s: TF.cross_entropy(z, y),
    ),
    "ce_inplace": (
        lambda z, y, s: crossent.cross_entropy(z * 1, y, inplace_backward=True),
        lambda z, y, s: TF.cross_entropy(z, y),
    ),
    "bce_logits_pos_weight": (
        lambda z, y, s: crossent.nn.BCEWithLogitsLoss(pos_weight=PW)(z, s),
        lambda z, y, s: TF.binary_cross_entropy_with_logits(z, s, pos_weight=PW),
    ),
    "bce_logits_weight_none": (
        lambda z, y, s: crossent.binary_cross_entropy_with_logits(z, s, W, reduction="none").sum(),
        lambda z, y, s: TF.binary_cross_entropy_with_logits(z, s, W, reduction="none").sum(),
    ),
    "bce_probabilities": (
        lambda z, y, s: crossent.nn.BCELoss()(torch.sigmoid(z), s),
        lambda z, y, s: TF.binary_cross_entropy(torch.sigmoid(z), s),
    ),
    "bce_ignore_index": (
        lambda z, y, s: crossent.binary_cross_entropy_with_logits(
            z, torch.where(s > 0.8, -1.0, s.round()), ignore_index=-1
        ),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_step_is_one_graph_equal_to_eager(name):
    step, torch_step = CASES[name]
    got, (model, x, y, s) = check_compiled_step(step)
    if torch_step is not None:
        for a, b in zip(got, run_step(torch_step, model, x, y, s)):
            assert_close(a, b)


def test_compiled_gpt_with_a_warm_inductor_cache(tmp_path):
    """A nanoGPT-style model returning (logits, loss) compiled with Inductor (full graph),
    in two fresh processes sharing one Inductor cache: both runs train like eager crossent
    (the second from the warm cache), and the individual losses compiled by Inductor equal
    eager. In subprocesses: Inductor's Triton imports break TRITON_INTERPRET in this one."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "compiled_gpt.py"
    # One compile thread: Inductor's default worker pool costs more to start than these few
    # small kernels take to compile on a CI machine with two cores.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_COMPILE_THREADS="1")
    runs = []
    for extra in (["--checks"], []):
        proc = subprocess.run(
            [sys.executable, str(script), *extra], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for run in runs:
        # Inductor's fused kernels sum in another order than eager, and the difference grows
        # over the training steps: a looser bound than one float32 comparison
        torch.testing.assert_close(torch.tensor(run["compiled"]), torch.tensor(run["eager"]), rtol=1e-5, atol=1e-5)
    assert runs[0]["compiled"] == runs[1]["compiled"]
    assert all(v < 1e-5 for v in runs[0]["checks"].values()), runs[0]["checks"]


@pytest.mark.parametrize("name", ["ce", "ce_weight_smoothing", "bce_logits_pos_weight", "bce_probabilities"])
def test_dynamic_batch_recompiles_no_more_than_torch(name):
    """Compiled code entries for the step after four batch sizes (each entry is one compile;
    Dynamo's internal restarts of one analysis are not recompiles)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    counts = []
    for step in CASES[name]:
        torch._dynamo.reset()
        compiled = torch.compile(step, dynamic=True, backend="aot_eager", fullgraph=True)
        model = step_model()
        for n in (8, 12, 20, 36):
            x, y, s = step_data(n)
            run_step(compiled, model, x, y, s)
        counts.append(len(_debug_get_cache_entry_list(step.__code__)))
    assert counts[0] <= counts[1] and counts[0] >= 1, counts


@pytest.mark.parametrize("name", ["ce", "ce_weight_smoothing", "ce_ignore_sum", "ce_kdim"])
def test_inductor_compiles_the_cross_entropy_formulas_not_the_op(name):
    """With Inductor on CPU, the cross-entropy row ops are compiled from their formulas
    (``backends/inductor.py``): the generated code calls no crossent op, and the step gives
    eager's loss and gradients."""
    from torch._inductor.utils import run_and_get_code

    step = CASES[name][0]
    model = step_model()
    x, y, s = step_data()
    compiled = torch.compile(lambda z, y, s: step(z, y, s), fullgraph=True)
    got, code = run_and_get_code(lambda: run_step(compiled, model, x, y, s))
    assert not any("crossent" in c for c in code)
    for a, b in zip(got, run_step(step, model, x, y, s)):
        assert_close(a, b)


def test_inductor_uses_the_formulas_after_compiling_another_model_first(tmp_path):
    """Inductor caches its decomposition table at its first compilation in a process; the
    formulas are registered later (the first trace of a crossent op) and must still be used."""
    code = (
        "import torch, crossent\n"
        "from torch._inductor.utils import run_and_get_code\n"
        "torch.compile(lambda a: a.sin() * 2, fullgraph=True)(torch.randn(8))\n"
        "z = torch.randn(16, 5, requires_grad=True)\n"
        "f = torch.compile(lambda z, y: crossent.cross_entropy(z, y), fullgraph=True)\n"
        "_, code = run_and_get_code(lambda: f(z, torch.arange(16) % 5).backward())\n"
        "print('op called:', any('crossent' in c for c in code))\n"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "op called: False" in out.stdout, out.stdout + out.stderr


def _ce_row_inputs():
    """(x, y, c, smooth) for the row ops: ties, +-inf, NaN, ignored rows (c = -0.0) with
    garbage logits, dominant and flat rows, zero weights, with and without smoothing."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 7, generator=g) * 4
    x[0] = torch.tensor([20.0, 0, 0, 0, 0, 0, 0])  # a tiny loss: 6 e^-20
    x[1] = 3.0  # all tied
    x[2, 3] = x[2, 5] = x[2].max() + 1  # a tie at the max
    x[3, 2] = float("inf")
    x[4, :] = float("-inf")
    x[4, 1] = 0.0
    x[5, 4] = float("nan")
    x[6] = float("nan")  # ignored below: loss 0, gradient 0
    x[7] = torch.tensor([100.0, -100, 3, 0, 0, 0, 0])  # a subnormal probability
    y = torch.tensor([0, 3, 3, 2, 1, 0, 0, 1, 6, 2, 4, 5])
    c = torch.rand(12, generator=g) + 0.5
    c[6] = -0.0
    c[9] = 0.0
    smooth = torch.full((7,), 0.1 / 7)
    smooth[2] = 0.0
    return x, y, c, smooth


@pytest.mark.parametrize("coefficients", ["none", "weights", "smoothing"])
@pytest.mark.parametrize("layout", ["rows", "ncs"])
def test_inductor_formulas_match_the_row_kernel(coefficients, layout):
    """The functions Inductor compiles (run here as plain torch code) give the C kernel's
    per-row loss, statistics and gradient times grad_loss, special rows included."""
    from crossent.backends import inductor

    x, y, c, smooth = _ce_row_inputs()
    c, smooth = {"none": (None, None), "weights": (c, None), "smoothing": (c, smooth)}[coefficients]
    if layout == "ncs":  # rows (N * S, C) as (N, C, S), N = 3, S = 4
        x = x.view(3, 4, 7).transpose(1, 2).contiguous()
    want = ops.cross_entropy_rows(x, None, y, c, smooth, None, "chunked")
    got = inductor.cross_entropy_rows(x, None, y, c, smooth, None, "chunked")
    assert_close(got[0], want[0], tol="f32_same_formulas")
    finite = torch.isfinite(want[0])
    if layout == "rows":  # the lane kernel of (N, C, S) writes no statistics
        assert_close(got[1][finite], want[1][finite], tol="f32_same_formulas")
    stats = got[1]
    g_loss = torch.linspace(0.5, 2.0, 12)
    want_g = ops.cross_entropy_rows_backward(g_loss, x, None, y, c, smooth, None, stats, "chunked")
    got_g = inductor.cross_entropy_rows_backward(g_loss, x, None, y, c, smooth, None, stats, "chunked")
    assert_close(got_g, want_g, tol="f32_same_formulas")
    assert inductor.cross_entropy_rows(x, torch.ones_like(x), None, None, None, None, "chunked") is NotImplemented
    assert inductor.cross_entropy_rows(x, None, y, c, smooth, None, "chunked-torch") is NotImplemented


def test_compiled_out_of_range_target_raises_inside_the_graph():
    compiled = torch.compile(lambda z, y: crossent.cross_entropy(z, y), fullgraph=True)
    z = torch.randn(4, C)
    compiled(z, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"class indices in \[0, 4\].*device-side assertion"):
        compiled(z, torch.tensor([0, 1, 5, 3]))
    bce = torch.compile(lambda z, t: crossent.binary_cross_entropy_with_logits(z, t), fullgraph=True)
    with pytest.raises(RuntimeError, match=r"values in \[0, 1\]"):
        bce(z, torch.full((4, C), 2.0))


def test_compiled_out_of_range_target_with_validate_false_still_raises():
    compiled = torch.compile(lambda z, y: crossent.cross_entropy(z, y, validate=False), fullgraph=True)
    with pytest.raises(Exception, match="class indices"):
        compiled(torch.randn(4, C), torch.tensor([0, 1, 7, 3]))


# ------------------------------------------------------------------------------ export
class _Head(torch.nn.Module):
    def __init__(self, loss, probabilities=False):
        super().__init__()
        self.lin, self.loss, self.probabilities = torch.nn.Linear(H, C), loss, probabilities

    def forward(self, x, target):
        z = self.lin(x)
        return self.loss(torch.sigmoid(z) if self.probabilities else z, target)


# BCE on probabilities is exported as its formulas (fused with the sigmoid by a compiler);
# the others as crossent's registered ops
@pytest.mark.parametrize(
    "loss,target,probs",
    [
        (crossent.nn.CrossEntropyLoss(), "y", False),
        (crossent.nn.CrossEntropyLoss(weight=W, label_smoothing=0.1, ignore_index=-100), "y", False),
        (crossent.nn.BCEWithLogitsLoss(pos_weight=PW), "s", False),
        (crossent.nn.BCELoss(), "s", True),
    ],
)
def test_export_gives_the_eager_values(loss, target, probs):
    torch.manual_seed(0)
    module = _Head(loss, probs)
    x, y, s = step_data()
    t = y if target == "y" else s
    program = torch.export.export(module, (x, t))
    ops_used = {str(n.target) for n in program.graph.nodes}
    assert any("crossent" in o for o in ops_used) != probs, ops_used
    assert not any(
        o.endswith(("_local_scalar_dense.default", "nonzero.default", "is_nonzero.default")) for o in ops_used
    ), ops_used
    x2, y2, s2 = step_data(seed=5)
    t2 = y2 if target == "y" else s2
    assert_close(program.module()(x2, t2), module(x2, t2))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.rand(6, 4, generator=g)
    keep = torch.rand(6, 4, generator=g) > 0.2
    for backend in ("chunked", "chunked-torch"):
        yield ops.bce_fused, (x, t, None, None, None, True, backend)
        yield ops.bce_fused, (x, t, torch.rand(4, generator=g), torch.rand(4, generator=g) + 0.5, keep, True, backend)
        yield ops.bce_fused, (torch.rand(6, 4, generator=g).requires_grad_(), t, None, None, None, False, backend)
        y = torch.randint(0, 4, (6,), generator=g)
        c = torch.rand(6, generator=g)
        yield ops.cross_entropy_rows, (x, None, y, c, None, None, backend)
        yield ops.cross_entropy_rows, (x, None, y, c, torch.full((4,), 0.05), keep[:, 0], backend)
        yield ops.cross_entropy_rows, (x, t.softmax(1), None, None, None, None, backend)
        x3 = torch.randn(2, 4, 3, generator=g, requires_grad=True)
        yield ops.cross_entropy_rows, (x3, None, torch.randint(0, 4, (6,), generator=g), c, None, None, backend)
        stats = ops.cross_entropy_rows(x.detach(), None, y, c, None, None, backend)[1]
        for g_loss in (torch.full((6,), 0.25), torch.rand(6, generator=g)):  # uniform and per-row
            yield ops.cross_entropy_rows_backward, (g_loss, x.detach(), None, y, c, None, None, stats, backend)
        yield ops.bce_fused_sum, (x, t, None, torch.rand(4, generator=g) + 0.5, None, True, backend)
        p = torch.rand(6, 4, generator=g).requires_grad_()
        yield ops.bce_fused_sum, (p, t, torch.rand(4, generator=g), None, keep, False, backend)
        yield ops.bce_fused_sum_backward, (torch.tensor(0.3), x.detach(), t, None, None, None, True, backend)


@pytest.mark.parametrize("i", range(24))
def test_opcheck(i):
    op, args = list(_opcheck_samples())[i]
    torch.library.opcheck(op, args)


@pytest.mark.backends("chunked", "chunked-torch")
@pytest.mark.parametrize("uniform", [True, False])
def test_ce_op_backward_recomputes_the_gradient_times_grad_loss(backend, uniform):
    # The forward saves its inputs and the (M, 2) row statistics, no (M, C) gradient; the
    # backward equals the reference gradient of sum(g * loss), uniform g (mean, sum) or not.
    # float32: the C kernel (backend 'chunked'); the reference in float64.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 5, generator=gen) * 4).requires_grad_()
    y = torch.randint(0, 5, (9,), generator=gen)
    c = torch.rand(9, generator=gen)
    g = torch.full((9,), 0.3) if uniform else torch.rand(9, generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, stats = ops.cross_entropy_rows(x, None, y, c, None, None, backend)
    assert {t.data_ptr() for t in saved} <= {x.data_ptr(), y.data_ptr(), c.data_ptr(), stats.data_ptr()}
    assert stats.shape == (9, 2)
    (grad,) = torch.autograd.grad(loss, x, g)
    z = x.detach().double().requires_grad_()
    ref = c.double() * (torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0])
    (want,) = torch.autograd.grad(ref, z, g.double())
    assert_close(loss, ref.detach(), dtype=torch.float32)
    assert_close(grad, want, dtype=torch.float32)


@pytest.mark.backends("chunked", "chunked-torch")
@pytest.mark.parametrize("logits", [True, False])
def test_bce_sum_op_saves_only_its_inputs_and_recomputes_the_gradient(backend, logits):
    # The 0-dim total of a captured mean / sum: nothing but the inputs is kept for the
    # backward, which equals the float64 reference gradient times grad_total.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 5, generator=gen) * 3
    x = (x if logits else torch.sigmoid(x)).requires_grad_()
    t = torch.rand(7, 5, generator=gen)
    pw = torch.rand(5, generator=gen) + 0.5
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        total = ops.bce_fused_sum(x, t, None, pw, None, logits, backend)
    assert {s.data_ptr() for s in saved} <= {x.data_ptr(), t.data_ptr(), pw.data_ptr()}
    (grad,) = torch.autograd.grad(total, x, torch.tensor(0.3))
    z = x.detach().double().requires_grad_()
    if logits:
        ref = TF.binary_cross_entropy_with_logits(z, t.double(), pos_weight=pw.double(), reduction="sum")
    else:
        ref = -(pw.double() * t.double() * z.log() + (1 - t.double()) * (-z).log1p()).sum()
    (want,) = torch.autograd.grad(ref, z, torch.tensor(0.3, dtype=torch.float64))
    assert_close(total, ref.detach(), dtype=torch.float32)
    assert_close(grad, want, dtype=torch.float32)


def test_op_vmap_rule_matches_a_loop():
    x = torch.randn(3, 5, 4)
    t = torch.rand(3, 5, 4)
    loss, grad = torch.vmap(lambda a, b: ops.bce_fused(a, b, None, None, None, True, "chunked"))(x, t)
    for i in range(3):
        li, gi = ops.bce_fused(x[i], t[i], None, None, None, True, "chunked")
        assert torch.equal(loss[i], li) and torch.equal(grad[i], gi)


# ----------------------------------------------------------------------------- func
def _func_cases():
    x = torch.randn(7, C, dtype=torch.float64)
    y = torch.randint(0, C, (7,))
    s = torch.rand(7, C, dtype=torch.float64)
    pw, w = PW.double(), W.double()
    return (
        x,
        y,
        s,
        [
            ("ce", lambda z, y, s: crossent.cross_entropy(z, y), lambda z, y, s: TF.cross_entropy(z, y)),
            (
                "ce_options",
                lambda z, y, s: crossent.cross_entropy(z, y, weight=w, label_smoothing=0.1, ignore_index=2),
                lambda z, y, s: TF.cross_entropy(z, y, weight=w, label_smoothing=0.1, ignore_index=2),
            ),
            ("ce_probabilities", lambda z, y, s: crossent.cross_entropy(z, s), lambda z, y, s: TF.cross_entropy(z, s)),
            (
                "bce_logits",
                lambda z, y, s: crossent.binary_cross_entropy_with_logits(z, s, pos_weight=pw),
                lambda z, y, s: TF.binary_cross_entropy_with_logits(z, s, pos_weight=pw),
            ),
            (
                "bce",
                lambda z, y, s: crossent.binary_cross_entropy(torch.sigmoid(z), s),
                lambda z, y, s: TF.binary_cross_entropy(torch.sigmoid(z), s),
            ),
        ],
    )


@pytest.mark.parametrize("k", range(5))
def test_torch_func_transforms_match_torch(k):
    from torch.func import grad, hessian, jacrev, jvp, vmap

    x, y, s, cases = _func_cases()
    _, ours, theirs = cases[k]
    a, b = (lambda z: ours(z, y, s)), (lambda z: theirs(z, y, s))
    assert_close(grad(a)(x), grad(b)(x))
    assert_close(jacrev(a)(x), jacrev(b)(x))
    v = torch.randn_like(x)
    assert_close(jvp(a, (x,), (v,))[1], jvp(b, (x,), (v,))[1])
    assert_close(hessian(a)(x), hessian(b)(x), tol="second_order")

    # per-example losses and per-sample gradients (torch's side as a loop: torch's own
    # cross_entropy with ignore_index and smoothing cannot run under vmap)
    def one(f, zi, yi, si):
        return f(zi.unsqueeze(0), yi.unsqueeze(0), si.unsqueeze(0))

    assert_close(
        vmap(lambda *a: one(ours, *a))(x, y, s), torch.stack([one(theirs, x[i], y[i], s[i]) for i in range(len(x))])
    )
    assert_close(
        vmap(grad(lambda *a: one(ours, *a)))(x, y, s),
        torch.stack([grad(lambda *a: one(theirs, *a))(x[i], y[i], s[i]) for i in range(len(x))]),
    )


def test_per_sample_gradients_of_a_model():
    from torch.func import functional_call, grad, vmap

    model = step_model()
    x, y, _ = step_data()
    y = y.clamp(min=0)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi, yi, f):
        return f(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    ours = vmap(grad(loss_of), in_dims=(None, 0, 0, None))(params, x, y, crossent.cross_entropy)
    theirs = vmap(grad(loss_of), in_dims=(None, 0, 0, None))(params, x, y, TF.cross_entropy)
    for k in params:
        assert_close(ours[k], theirs[k])


# ------------------------------------------------------------------------- jit
@pytest.mark.parametrize(
    "loss,target", [(crossent.nn.CrossEntropyLoss(), "y"), (crossent.nn.BCEWithLogitsLoss(pos_weight=PW), "s")]
)
def test_jit_trace_records_the_op_and_is_right_on_new_inputs(loss, target):
    torch.manual_seed(0)
    module = _Head(loss)
    x, y, s = step_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (x, y if target == "y" else s))
    assert "crossent::" in str(traced.inlined_graph)
    x2, y2, s2 = step_data(seed=9)
    t2 = y2 if target == "y" else s2
    out = traced(x2, t2)
    assert_close(out, module(x2, t2))
    out.backward()
    assert module.lin.weight.grad is not None and module.lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [crossent.nn.CrossEntropyLoss, crossent.nn.BCELoss, crossent.nn.BCEWithLogitsLoss])
def test_jit_script_names_the_alternatives(cls):
    with pytest.raises(TypeError, match=r"cannot be compiled to TorchScript.*torch.compile.*torch.jit.trace"):
        torch.jit.script(cls())
    with pytest.raises(TypeError, match=r"torch\.nn\." + cls.__name__):
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2), cls()))


# ---------------------------------------------------------------------- no host reads
def test_meta_tensors_with_validate_false_read_nothing():
    """Any host read of a meta tensor raises: the eager path off CPU reads no values."""
    x = torch.randn(8, C, device="meta", requires_grad=True)
    y = torch.zeros(8, dtype=torch.long, device="meta")
    for loss in (
        crossent.cross_entropy(x, y, validate=False),
        crossent.cross_entropy(x, y, ignore_index=0, label_smoothing=0.1, weight=W.to("meta"), validate=False),
        crossent.binary_cross_entropy_with_logits(x, torch.zeros(8, C, device="meta"), validate=False),
    ):
        assert loss.device.type == "meta"
        loss.backward()


def test_fake_tensors_run_the_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(8, C, requires_grad=True)
        y = torch.zeros(8, dtype=torch.long)
        loss = crossent.cross_entropy(x, y, label_smoothing=0.1)
        loss.backward()
        assert x.grad.shape == (8, C)


# ------------------------------------------------------------------ fused linear ops
_IDS = torch.tensor([[0, 2, -1]] * N)
LINEAR_CASES = {
    "linear_ce": lambda h, Wt, y, s: crossent.linear_cross_entropy(h, Wt, y),
    "linear_ce_smoothing_sum": lambda h, Wt, y, s: crossent.linear_cross_entropy(
        h, Wt, y.clamp(min=0), label_smoothing=0.1, weight=W, ignore_index=2, reduction="sum"
    ),
    "linear_ce_none": lambda h, Wt, y, s: crossent.linear_cross_entropy(h, Wt, y, reduction="none").square().sum(),
    "linear_ce_probabilities": lambda h, Wt, y, s: crossent.linear_cross_entropy(h, Wt, s.softmax(1)),
    "linear_bce_dense": lambda h, Wt, y, s: crossent.linear_binary_cross_entropy_with_logits(h, Wt, s, pos_weight=PW),
    "linear_bce_sparse": lambda h, Wt, y, s: crossent.linear_binary_cross_entropy_with_logits(h, Wt, _IDS),
}


@pytest.mark.parametrize("name", sorted(LINEAR_CASES))
def test_compiled_fused_linear_losses_are_one_graph_equal_to_eager(name):
    f = LINEAR_CASES[name]
    x, y, s = step_data()
    torch.manual_seed(3)
    h = x.clone().requires_grad_()
    Wt = torch.randn(C, H, requires_grad=True)
    explained = torch._dynamo.explain(f)(h, Wt, y, s)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(h, Wt, y, s)
    want = f(h, Wt, y, s)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, Wt)), torch.autograd.grad(want, (h, Wt))):
        assert_close(a, b)


def test_opcheck_linear_cross_entropy_op():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    Wt = torch.randn(1, 7, 4, generator=g, requires_grad=True)
    b = torch.randn(1, 7, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (6, 1), generator=g)
    for backend in ("chunked", "chunked-torch"):
        torch.library.opcheck(
            ops.linear_cross_entropy_fused, (h, Wt, b, y, None, y != 3, True, 0.1, None, None, None, backend)
        )
        torch.library.opcheck(
            ops.linear_cross_entropy_fused,
            (h, Wt, None, y, torch.rand(7, generator=g), None, True, 0.0, 2, 3, None, backend),
        )


# ------------------------------------------------------------------------ CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
@pytest.mark.parametrize("name", ["ce", "ce_weight_smoothing", "bce_logits_pos_weight", "linear_ce"])
def test_cuda_graph_replays_a_training_step(name):
    """A whole training step (forward, backward, SGD update) captured in a CUDA graph and
    replayed on new data in the captured buffers: no host sync breaks the capture, and each
    replay updates the model exactly as the same eager step with torch's loss does."""
    dev = torch.device("cuda")
    step_losses = {
        "ce": (lambda m, x, y, s: crossent.cross_entropy(m(x), y), lambda m, x, y, s: TF.cross_entropy(m(x), y)),
        "ce_weight_smoothing": (
            lambda m, x, y, s: crossent.cross_entropy(m(x), y, weight=W.to(dev), label_smoothing=0.1),
            lambda m, x, y, s: TF.cross_entropy(m(x), y, weight=W.to(dev), label_smoothing=0.1),
        ),
        "bce_logits_pos_weight": (
            lambda m, x, y, s: crossent.binary_cross_entropy_with_logits(m(x), s, pos_weight=PW.to(dev)),
            lambda m, x, y, s: TF.binary_cross_entropy_with_logits(m(x), s, pos_weight=PW.to(dev)),
        ),
        "linear_ce": (
            lambda m, x, y, s: crossent.linear_cross_entropy(x, m.weight, y, bias=m.bias),
            lambda m, x, y, s: TF.cross_entropy(m(x), y),
        ),
    }
    ours, theirs = step_losses[name]
    model, ref = step_model().to(dev), step_model().to(dev)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    batches = [tuple(t.to(dev) for t in step_data(seed=s)) for s in range(6)]
    static = [t.clone() for t in batches[0]]

    def step():
        opt.zero_grad(set_to_none=False)
        loss = ours(model, *static)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel builds, allocator) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for batch in batches[1:]:
        for buf, t in zip(static, batch):
            buf.copy_(t)
        graph.replay()
        ref_opt.zero_grad()
        want = theirs(ref, *batch)
        want.backward()
        ref_opt.step()
        assert_close(static_loss, want.detach())
        for p, q in zip(model.parameters(), ref.parameters()):
            assert_close(p, q)


def test_compiled_bce_on_probabilities_is_traced_as_formulas():
    """Under torch.compile, BCE on probabilities is traced as its formulas (no opaque op), so
    the compiler can fuse it with the sigmoid before it; values and gradients stay eager's."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, _, soft = step_data()
    z = x[:, :C].clone().requires_grad_()
    f = lambda z, s: crossent.nn.BCELoss()(torch.sigmoid(z), s)
    got = torch.compile(f, backend=backend, fullgraph=True)(z, soft)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not any("crossent" in t for t in targets), targets
    want = f(z, soft)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])
