"""Fused linear + loss: parity with the unfused losses, exactness, memory, guardrails.

References: torch's own ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits`` on
``F.linear`` logits in float64 (independent of crossent's code), and crossent's unfused
losses for the options torch does not have. Sizes are tiny; blocks are forced small
(``chunk_size`` / ``class_chunk_size``) so that every code path runs: one class block
(single pass), several class blocks (two passes, online log-sum-exp), ragged last blocks.
"""

import pytest
import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

import crossent
from crossent.backends import BackendUnavailableError

from _helpers import TOL, assert_close

F64 = torch.float64
# Blockings: default plan (one block here), rows only, rows x classes (ragged both ways).
BLOCKINGS = [dict(), dict(chunk_size=3), dict(chunk_size=4, class_chunk_size=3)]


def _close(a, b, dtype=F64):
    """Errors relative to the largest entry of the reference (the table's matmul entries)."""
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    err = float((a.detach().to(F64) - b.detach().to(F64)).abs().max()) if b.numel() else 0.0
    bound = TOL["f64_matmul" if dtype == F64 else "f32_matmul"]["atol"] * scale
    assert err <= bound, f"max error {err:.3g} (scale {scale:.3g})"


def _leaf(*shape, dtype=F64, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=dtype, generator=gen) * scale).requires_grad_()


def _grads(loss, params):
    out = (
        loss
        if loss.dim() == 0
        else (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)).sum()
    )
    return torch.autograd.grad(out, params, allow_unused=True)


def _problem(N=7, H=5, C=11, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _leaf(N, H, dtype=dtype, gen=g)
    W = _leaf(C, H, dtype=dtype, gen=g)
    b = _leaf(C, dtype=dtype, gen=g, scale=0.5)
    y = torch.randint(0, C, (N,), generator=g)
    q = torch.softmax(torch.randn(N, C, dtype=dtype, generator=g), 1)
    w = torch.rand(C, dtype=dtype, generator=g) + 0.2
    return x, W, b, y, q, w


CE_OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smooth": dict(label_smoothing=0.2),
    "all": dict(weight=True, ignore=True, label_smoothing=0.1),
    "probs": dict(probs=True),
    "probs_all": dict(probs=True, weight=True, label_smoothing=0.3),
}


def _ce_case(opt, y, q, w):
    kw = {}
    target = q if opt.get("probs") else y.clone()
    if opt.get("ignore"):
        target[1] = -100
        target[4] = -100
    if opt.get("weight"):
        kw["weight"] = w
    if "label_smoothing" in opt:
        kw["label_smoothing"] = opt["label_smoothing"]
    return target, kw


@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["one_block", "rows", "rows_classes"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_ce_matches_torch_float64(option, reduction, blocking):
    x, W, b, y, q, w = _problem()
    target, kw = _ce_case(CE_OPTIONS[option], y, q, w)
    got = crossent.linear_cross_entropy(x, W, target, linear_bias=b, reduction=reduction, **kw, **blocking)
    ref = TF.cross_entropy(TF.linear(x, W, b), target, reduction=reduction, **kw)
    _close(got, ref)
    for a, r in zip(_grads(got, (x, W, b)), _grads(ref, (x, W, b))):
        _close(a, r)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_kdim_matches_torch_linear_cross_entropy(reduction):
    g = torch.Generator().manual_seed(1)
    N, H, C, d = 4, 3, 6, (2, 3)
    x = _leaf(N, H, gen=g)
    W = _leaf(C, *d, H, gen=g)
    b = _leaf(C, *d, gen=g)
    y = torch.randint(0, C, (N, *d), generator=g)
    y[0, 1, 2] = -100
    w = torch.rand(C, dtype=F64, generator=g)
    for target in (y, torch.softmax(torch.randn(N, C, *d, dtype=F64, generator=g), 1)):
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
        got = crossent.linear_cross_entropy(x, W, target, linear_bias=b, chunk_size=3, class_chunk_size=4, **kw)
        ref = TF.linear_cross_entropy(x, W, target, linear_bias=b, **kw)
        assert got.shape == ref.shape
        _close(got, ref)
        for a, r in zip(_grads(got, (x, W, b)), _grads(ref, (x, W, b))):
            _close(a, r)


def test_ce_unbatched_and_sequence_inputs():
    x, W, b, y, q, w = _problem(N=6)
    # (H,) input with a () target, as torch.
    for t in (y[0], q[0]):
        _close(crossent.linear_cross_entropy(x[0], W, t, linear_bias=b), TF.cross_entropy(TF.linear(x[0], W, b), t))
    # (B, T, H) extension: classes last, same as the flattened call.
    xs, ys, qs = x.reshape(2, 3, 5), y.reshape(2, 3), q.reshape(2, 3, -1)
    for t, tf in ((ys, y), (qs, q)):
        got = crossent.linear_cross_entropy(xs, W, t, reduction="none", chunk_size=4, class_chunk_size=5)
        assert got.shape == (2, 3)
        ref = TF.cross_entropy(TF.linear(x, W), tf, reduction="none").reshape(2, 3)
        _close(got, ref)
        for a, r in zip(_grads(got, (x, W)), _grads(ref, (x, W))):
            _close(a, r)


def test_torch_options_batch_chunk_size_is_used():
    x, W, b, y, q, w = _problem(N=10)
    with _CountMatmuls() as n:
        got = crossent.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4))
    assert n.calls == 3 * 3  # 3 row blocks of at most 4 rows
    _close(got, TF.cross_entropy(TF.linear(x, W), y))


def test_ce_matches_crossent_unfused_and_reference_backend():
    x, W, b, y, q, w = _problem(seed=3)
    kw = dict(linear_bias=b, weight=w, label_smoothing=0.1, ignore_index=2)
    got = crossent.linear_cross_entropy(x, W, y, chunk_size=2, class_chunk_size=4, **kw)
    via_ref = crossent.linear_cross_entropy(x, W, y, backend="reference", **kw)
    unfused = crossent.cross_entropy(TF.linear(x, W, b), y, w, ignore_index=2, label_smoothing=0.1)
    _close(got, unfused)
    _close(via_ref, unfused)
    for a, r in zip(_grads(got, (x, W, b)), _grads(unfused, (x, W, b))):
        _close(a, r)


def test_ce_return_lse_parts_and_non_uniform_upstream():
    x, W, b, y, q, w = _problem(seed=4)
    loss, lse = crossent.linear_cross_entropy(
        x, W, y, linear_bias=b, reduction="none", return_lse=True, class_chunk_size=3
    )
    logits = TF.linear(x, W, b)
    _close(lse, torch.logsumexp(logits, 1))
    assert not lse.requires_grad
    parts = crossent.linear_cross_entropy(x, W, y, weight=w, return_parts=True)
    ref = crossent.cross_entropy(TF.linear(x, W), y, w, return_parts=True)
    for a, r in zip(parts, ref):
        _close(a, r)
    # A per-token weighting after reduction='none' (RL-style): backward recomputes.
    adv = torch.linspace(-1, 2, x.shape[0], dtype=F64)
    got = (crossent.linear_cross_entropy(x, W, y, linear_bias=b, reduction="none", chunk_size=2) * adv).sum()
    exp = (TF.cross_entropy(logits, y, reduction="none") * adv).sum()
    for a, r in zip(torch.autograd.grad(got, (x, W, b)), torch.autograd.grad(exp, (x, W, b))):
        _close(a, r)


def test_ce_second_backward_recomputes_and_double_backward_raises():
    x, W, b, y, q, w = _problem(seed=5)
    loss = crossent.linear_cross_entropy(x, W, y, linear_bias=b, class_chunk_size=4)
    g1 = torch.autograd.grad(loss, (x, W, b), retain_graph=True)
    g2 = torch.autograd.grad(loss * 3, (x, W, b), retain_graph=True)  # precomputed grads are used up
    for a, c in zip(g1, g2):
        _close(3 * a, c)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_ce_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    x, W, b = _leaf(3, 2, gen=g), _leaf(5, 2, gen=g), _leaf(5, gen=g)
    y = torch.tensor([0, 4, -100])
    q = torch.softmax(torch.randn(3, 5, dtype=F64, generator=g), 1)
    w = torch.rand(5, dtype=F64, generator=g) + 0.1
    for t, kw in ((y, dict(weight=w, label_smoothing=0.2)), (q, dict(weight=w))):
        for red in ("mean", "none"):
            fn = lambda x, W, b: crossent.linear_cross_entropy(  # noqa: E731
                x, W, t, linear_bias=b, reduction=red, chunk_size=2, class_chunk_size=2, **kw
            )
            assert torch.autograd.gradcheck(fn, (x, W, b), fast_mode=True)


def test_ce_exact_for_confident_predictions_and_infinite_logits():
    # Logits [20, 0, 0, 0, 0] for class 0: loss 4 e^-20 = 8.24e-9 (float32 eager gives 0 or less).
    H = 2
    x = torch.tensor([[1.0, 0.0]], requires_grad=True)
    W = torch.tensor([[20.0, 0.0]] + [[0.0, 1.0]] * 4, requires_grad=True)
    for cc in (None, 2):
        loss = crossent.linear_cross_entropy(x, W, torch.tensor([0]), class_chunk_size=cc)
        truth = 4 * torch.exp(torch.tensor(-20.0, dtype=F64)) - 8 * torch.exp(torch.tensor(-40.0, dtype=F64))
        assert abs(loss.item() - float(truth)) <= 1e-6 * float(truth)
        (gx,) = torch.autograd.grad(loss, x)
        # d/dx0 = -20 (1 - p_0) = -20 S/(1+S), S = 4 e^-20: keeps its relative precision.
        assert abs(float(gx[0, 0]) / float(-20 * truth) - 1) < 1e-5
    # +inf through the bias is its own maximum: finite limit, across class blocks too.
    b = torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0])
    xi = torch.zeros(2, H, dtype=F64)
    Wi = torch.zeros(5, H, dtype=F64)
    out = crossent.linear_cross_entropy(
        xi, Wi, torch.tensor([1, 0]), linear_bias=b.to(F64), reduction="none", class_chunk_size=2
    )
    assert float(out[0]) == 0.0 and float(out[1]) == float("inf")
    # -inf logit with zero smoothing weight: a zero-weight term is absent, not NaN.
    bn = torch.tensor([0.0, float("-inf"), 0.0, 1.0, 0.5], dtype=F64)
    wt = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)
    for cc in (None, 2):
        got = crossent.linear_cross_entropy(
            xi, Wi, torch.tensor([0, 3]), linear_bias=bn, weight=wt, label_smoothing=0.1, class_chunk_size=cc
        )
        ref = crossent.cross_entropy(bn.expand(2, 5), torch.tensor([0, 3]), wt, label_smoothing=0.1)
        assert torch.isfinite(got)
        _close(got, ref)


def _truth_and_eager(x, W, b, y, loss_fn):
    """float64 truth on the same (rounded) inputs, and the eager path in the input dtype."""
    xs = [t.detach().to(F64).requires_grad_() for t in (x, W, b)]
    truth = loss_fn(TF.linear(*xs))
    tg = torch.autograd.grad(truth, xs)
    xe = [t.detach().clone().requires_grad_() for t in (x, W, b)]
    eager = loss_fn(TF.linear(*xe))
    eg = torch.autograd.grad(eager, xe)
    return (truth, *tg), (eager, *eg)


def _err(a, r):
    r = r.detach()
    return float((a.detach().to(F64) - r).abs().max() / max(1e-30, float(r.abs().max())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "blocking", [dict(chunk_size=8), dict(chunk_size=12, class_chunk_size=16)], ids=["rows", "rows_classes"]
)
def test_ce_low_precision_no_worse_than_eager(dtype, blocking):
    g = torch.Generator().manual_seed(7)
    N, H, C = 32, 16, 50
    x = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    W = torch.randn(C, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(C, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    w = torch.rand(C, generator=g) + 0.5
    for kw in (dict(), dict(label_smoothing=0.1)):
        ref, eager = _truth_and_eager(x, W, b, y, lambda z: TF.cross_entropy(z, y, w.to(z.dtype), **kw))
        loss = crossent.linear_cross_entropy(x, W, y, linear_bias=b, weight=w.to(dtype), **kw, **blocking)
        assert loss.dtype == dtype
        ours = (loss, *torch.autograd.grad(loss, (x, W, b)))
        slack = 1e-6 if dtype == torch.float32 else 1e-3
        for name, o, e, r in zip(("loss", "grad_input", "grad_weight", "grad_bias"), ours, eager, ref):
            assert o.dtype == dtype
            assert _err(o, r) <= _err(e, r) + slack, f"{name}: ours {_err(o, r):.3g} eager {_err(e, r):.3g}"


class _Sizes(TorchDispatchMode):
    """Records the largest *new* storage (in elements) behind any tensor an op produces:
    views of existing tensors (a slice of the caller's target, a stride-0 ``expand``) do
    not allocate and are not counted."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.device.type != "meta"
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("op", ["ce", "ce_probs_smooth", "bce_dense", "bce_sparse"])
def test_full_logits_never_allocated(op):
    g = torch.Generator().manual_seed(8)
    N, H, C = 32, 8, 200
    x = torch.randn(N, H, generator=g, requires_grad=True)
    W = torch.randn(C, H, generator=g, requires_grad=True)
    b = torch.randn(C, generator=g, requires_grad=True)
    budget = 16 * 1024  # bytes of block scratch: blocks of a few hundred logits
    if op.startswith("ce"):
        t = torch.randint(0, C, (N,), generator=g)
        kw = {}
        if op == "ce_probs_smooth":
            t = torch.softmax(torch.randn(N, C, generator=g), 1)  # the target is (N, C) by nature
            kw = dict(label_smoothing=0.1, weight=torch.rand(C, generator=g))

        def fused():
            return crossent.linear_cross_entropy(x, W, t, linear_bias=b, memory_budget=budget, validate=False, **kw)

        def unfused():
            return crossent.cross_entropy(TF.linear(x, W, b), t, validate=False, **kw)
    else:
        pos = torch.randint(0, C, (N, 3), generator=g)
        t = pos if op == "bce_sparse" else torch.zeros(N, C).scatter_(1, pos, 1.0)

        def fused():
            return crossent.linear_binary_cross_entropy_with_logits(
                x, W, t, linear_bias=b, pos_weight=torch.full((C,), 2.0), memory_budget=budget, validate=False
            )

        def unfused():
            return crossent.binary_cross_entropy_with_logits(TF.linear(x, W, b), torch.zeros(N, C), validate=False)

    with _Sizes() as seen_ref:
        unfused().backward()
    assert seen_ref.largest >= N * C  # the detector sees the logits when they exist
    grads_elems = max(W.numel(), x.numel())
    with _Sizes() as seen:
        fused().backward()
    assert seen.largest <= max(grads_elems, budget // 4), seen.largest
    assert seen.largest < N * C


# --------------------------------------------------------------------------- BCE
def _bce_problem(N=6, H=4, L=9, dtype=F64, seed=9):
    g = torch.Generator().manual_seed(seed)
    x, W, b = _leaf(N, H, dtype=dtype, gen=g), _leaf(L, H, dtype=dtype, gen=g), _leaf(L, dtype=dtype, gen=g)
    pos = torch.tensor([[0, 3, -1], [2, -1, -1], [-1, -1, -1], [1, 2, 8], [5, 5, -1], [7, 0, -1]])[:N]
    dense = torch.zeros(N, L, dtype=dtype)
    rows, slots = (pos >= 0).nonzero(as_tuple=True)
    dense[rows, pos[rows, slots]] = 1.0
    return x, W, b, pos, dense, g


@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["one_block", "rows", "rows_classes"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "weights", "row_weight", "smooth"])
def test_bce_dense_and_sparse_match_torch(option, reduction, blocking):
    x, W, b, pos, dense, g = _bce_problem()
    kw = {}
    if option == "weights":
        kw = dict(weight=torch.rand(9, dtype=F64, generator=g), pos_weight=torch.rand(9, dtype=F64, generator=g) * 3)
    if option == "row_weight":
        kw = dict(weight=torch.rand(6, 1, dtype=F64, generator=g))
    smooth = 0.1 if option == "smooth" else 0.0
    ref_t = dense * (1 - smooth) + smooth / 2
    ref = TF.binary_cross_entropy_with_logits(TF.linear(x, W, b), ref_t, reduction=reduction, **kw)
    rg = _grads(ref, (x, W, b))
    for t in (dense, pos):
        got = crossent.linear_binary_cross_entropy_with_logits(
            x, W, t, linear_bias=b, reduction=reduction, label_smoothing=smooth, **kw, **blocking
        )
        assert got.shape == ref.shape
        _close(got, ref)
        for a, r in zip(_grads(got, (x, W, b)), rg):
            _close(a, r)


def test_bce_ignore_index_sequence_input_and_gradcheck():
    x, W, b, pos, dense, g = _bce_problem()
    t = dense.clone()
    t[0, 1] = t[3, 4] = -1
    got = crossent.linear_binary_cross_entropy_with_logits(
        x, W, t, linear_bias=b, ignore_index=-1, chunk_size=4, class_chunk_size=4
    )
    ref = crossent.binary_cross_entropy_with_logits(TF.linear(x, W, b), t, ignore_index=-1)
    _close(got, ref)
    for a, r in zip(_grads(got, (x, W, b)), _grads(ref, (x, W, b))):
        _close(a, r)
    got3 = crossent.linear_binary_cross_entropy_with_logits(
        x.reshape(2, 3, 4), W, pos.reshape(2, 3, 3), reduction="none"
    )
    assert got3.shape == (2, 3, 9)
    _close(got3.reshape(6, 9), TF.binary_cross_entropy_with_logits(TF.linear(x, W), dense, reduction="none"))
    xs, Ws, bs = (
        x[:3, :2].detach().requires_grad_(),
        W[:5, :2].detach().requires_grad_(),
        b[:5].detach().requires_grad_(),
    )
    ps = torch.tensor([[0, 4], [-1, -1], [2, -1]])
    for red in ("mean", "none"):
        fn = lambda x, W, b: crossent.linear_binary_cross_entropy_with_logits(  # noqa: E731
            x,
            W,
            ps,
            linear_bias=b,
            pos_weight=torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0], dtype=F64),
            reduction=red,
            chunk_size=2,
            class_chunk_size=2,
        )
        assert torch.autograd.gradcheck(fn, (xs, Ws, bs), fast_mode=True)


def test_bce_exact_small_losses():
    # logits -20, -30 with target 0: losses softplus(-20) = 2.06e-9 and 9.4e-14 (torch's
    # float32 (1-t) x + softplus(-x) form gives 0 for both).
    x = torch.tensor([[1.0]])
    W = torch.tensor([[-20.0], [-30.0]])
    got = crossent.linear_binary_cross_entropy_with_logits(x, W, torch.tensor([[-1]]), reduction="none")
    truth = torch.log1p(torch.exp(torch.tensor([-20.0, -30.0], dtype=F64)))
    assert float(((got[0].to(F64) - truth) / truth).abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bce_low_precision_no_worse_than_eager(dtype):
    g = torch.Generator().manual_seed(10)
    N, H, L = 32, 16, 40
    x = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    W = torch.randn(L, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(L, generator=g).to(dtype).requires_grad_()
    t = (torch.rand(N, L, generator=g) < 0.1).to(dtype)
    pw = torch.rand(L, generator=g) * 3
    ref, eager = _truth_and_eager(
        x, W, b, None, lambda z: TF.binary_cross_entropy_with_logits(z, t.to(z.dtype), pos_weight=pw.to(z.dtype))
    )
    loss = crossent.linear_binary_cross_entropy_with_logits(
        x, W, t, linear_bias=b, pos_weight=pw.to(dtype), chunk_size=8, class_chunk_size=16
    )
    ours = (loss, *torch.autograd.grad(loss, (x, W, b)))
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    for o, e, r in zip(ours, eager, ref):
        assert _err(o, r) <= _err(e, r) + slack


# --------------------------------------------------------------------------- modules
def test_module_is_torch_drop_in():
    torch.manual_seed(11)
    ours = crossent.nn.LinearCrossEntropyLoss(
        5, 7, bias=True, label_smoothing=0.1, weight=torch.rand(7), chunk_size=3, class_chunk_size=4
    )
    theirs = torch.nn.LinearCrossEntropyLoss(5, 7, bias=True, label_smoothing=0.1, weight=ours.weight.clone())
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, y = torch.randn(6, 5), torch.randint(0, 7, (6,))
    a, r = ours(x, y), theirs(x, y)
    assert_close(a, r)
    a.backward()
    r.backward()
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad, tol="f32_matmul")
    loss, lse = ours(x, y, return_lse=True)
    assert lse.shape == (6,)
    bce = crossent.nn.LinearBCEWithLogitsLoss(5, 7, pos_weight=[2.0] * 7, reduction="sum")
    t = torch.tensor([[1, 3], [0, -1], [-1, -1], [6, 2], [5, 4], [0, 1]])
    dense = torch.zeros(6, 7).scatter_(1, t.clamp(min=0), 1.0) * (t >= 0).any(1, keepdim=True)
    dense[1] = 0
    dense[1, 0] = 1
    ref = TF.binary_cross_entropy_with_logits(bce.linear(x), dense, pos_weight=bce.pos_weight, reduction="sum")
    assert_close(bce(x, t), ref)


# --------------------------------------------------------------------------- guardrails
def test_guardrails():
    x, W, b, y, q, w = _problem()
    lce = crossent.linear_cross_entropy
    with pytest.raises(crossent.CrossentValueError, match="transpose"):
        lce(x, W.t(), y)
    with pytest.raises(crossent.CrossentTypeError, match="dtype"):
        lce(x.float(), W, y)
    with pytest.raises(crossent.CrossentValueError, match="linear_bias"):
        lce(x, W, y, linear_bias=b[:3])
    with pytest.raises(crossent.CrossentValueError, match="ignore_index"):
        lce(x, W, q, ignore_index=-100)
    with pytest.raises(crossent.CrossentIndexError, match="class indices"):
        lce(x, W, torch.full_like(y, 11))
    with pytest.raises(crossent.CrossentValueError, match="requires_grad"):
        lce(x, W, q.clone().requires_grad_())
    with pytest.raises(crossent.CrossentValueError, match="chunk_size"):
        lce(x, W, y, chunk_size=0)
    with pytest.raises(crossent.CrossentValueError, match="reduction"):
        lce(x, W, y, reduction="avg")
    with pytest.raises(crossent.CrossentValueError, match="shape"):
        lce(x.reshape(1, 7, 5), W, y)
    with pytest.raises(crossent.CrossentValueError, match="backend"):
        lce(x, W, y, backend="nope")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        lce(x, W, y, backend="triton")  # explicit and impossible here: loud, with the alternatives
    lbce = crossent.linear_binary_cross_entropy_with_logits
    with pytest.raises(crossent.CrossentIndexError, match="positive-label ids"):
        lbce(x, W, torch.tensor([[0, 11]] * 7))
    with pytest.raises(crossent.CrossentValueError, match="sparse"):
        lbce(x, W, torch.tensor([[0, 1]] * 7), ignore_index=-1)
    with pytest.raises(crossent.CrossentValueError, match="in \\[0, 1\\]"):
        lbce(x, W, torch.full((7, 11), 2.0))
    with pytest.raises(crossent.CrossentValueError, match="broadcastable"):
        lbce(x, W, torch.zeros(7, 11), pos_weight=torch.ones(3))
    with pytest.raises(crossent.CrossentValueError, match="label_smoothing"):
        crossent.nn.LinearCrossEntropyLoss(4, 3, label_smoothing=1.5)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["ce", "bce"])
def test_gradients_come_from_the_forward_pass(op):
    """3 matrix products per block (logits, grad_input, grad_weight) and none in backward;
    a second class block costs one more (the log-sum-exp pass) for cross-entropy only."""
    x, W, b, y, q, w = _problem(N=8, H=4, C=10)
    if op == "ce":

        def call(**kw):
            return crossent.linear_cross_entropy(x, W, y, linear_bias=b, chunk_size=4, **kw)
    else:

        def call(**kw):
            return crossent.linear_binary_cross_entropy_with_logits(
                x, W, y.unsqueeze(1), linear_bias=b, chunk_size=4, **kw
            )

    for classes, expected in ((None, 3 * 2), (5, (4 if op == "ce" else 3) * 2 * 2)):
        with _CountMatmuls() as fwd:
            loss = call(class_chunk_size=classes)
        with _CountMatmuls() as bwd:
            loss.backward()
        assert (fwd.calls, bwd.calls) == (expected, 0)


@pytest.mark.parametrize("targets", ["sparse", "dense01", "soft"])
@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_float32_cpu_blocks_match_the_reference(targets, pos_weight, reduction):
    """float32 CPU blocks of the usual kind (the compiled BCE kernel's, loss written over
    the logits block): values and the three gradients equal the unfused float64 reference
    within float32 rounding, across several row and class blocks."""
    from crossent.backends import chunked_cpp

    if chunked_cpp.get() is None:
        pytest.skip("compiled CPU kernel unavailable here")
    g = torch.Generator().manual_seed(3)
    N, H, L = 37, 16, 50
    x = torch.randn(N, H, generator=g, requires_grad=True)
    W = (torch.randn(L, H, generator=g) * 2).requires_grad_()
    b = torch.randn(L, generator=g, requires_grad=True)
    pos = torch.randint(0, L, (N, 4), generator=g)
    dense = torch.zeros(N, L).scatter_(1, pos, 1.0)
    t = {"sparse": pos, "dense01": dense, "soft": torch.rand(N, L, generator=g)}[targets]
    kw = {"pos_weight": torch.rand(L, generator=g) * 3} if pos_weight else {}
    got = crossent.linear_binary_cross_entropy_with_logits(
        x, W, t, linear_bias=b, reduction=reduction, chunk_size=8, class_chunk_size=16, **kw
    )
    gg = _grads(got, (x, W, b))
    x64, W64, b64 = (v.detach().double().requires_grad_() for v in (x, W, b))
    t64 = (dense if targets == "sparse" else t).double()
    kw64 = {k: v.double() for k, v in kw.items()}
    ref = TF.binary_cross_entropy_with_logits(TF.linear(x64, W64, b64), t64, reduction="none", **kw64)
    ref = ref if reduction == "none" else ref.mean()
    rg = _grads(ref, (x64, W64, b64))
    assert_close(got.double(), ref, torch.float32)
    for a, r in zip(gg, rg):  # float32 matrix products: errors relative to the largest entry
        _close(a, r, torch.float32)
