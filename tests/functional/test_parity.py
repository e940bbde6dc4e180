"""Drop-in parity with torch: values, output dtype/shape, gradients (input and, where torch
has them, target), second derivatives, modules, state_dict, legacy arguments and errors.

fp16/bf16: crossent computes in float32 inside, so the reference is torch run in float32
on the same (rounded) values, cast to the dtype torch itself returns for the low-precision
call; the output dtype must equal torch's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import crossent.functional as CF
import crossent.nn as CN
from _helpers import (
    DTYPES,
    LAYOUTS,
    REDUCTIONS,
    SHAPES_BINARY,
    SHAPES_MULTICLASS,
    TOL,
    assert_close,
    class_indices,
    class_probabilities,
    gen,
    logits,
    make_view,
    probabilities,
    ref_dtype,
    soft_targets,
    torch_quiet,
)

# Values, not warnings: random specs include fully ignored small batches (mean = nan, as in
# torch; the warning itself is tested in tests/validation/test_input_checks.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*targets equal ignore_index:crossent.CrossentWarning"),
    pytest.mark.usefixtures("backend"),
]  # every CPU backend (tests/conftest.py)

FN = {
    "bce": (TF.binary_cross_entropy, CF.binary_cross_entropy),
    "bce_logits": (TF.binary_cross_entropy_with_logits, CF.binary_cross_entropy_with_logits),
    "ce": (TF.cross_entropy, CF.cross_entropy),
}


# --------------------------------------------------------------------------- engine
def _call(fn, spec, kwargs, dtype, grad_names, upstream=None):
    """Build views from ``spec`` (name -> (float64 or integer values, layout)), call ``fn``
    and return ``(out, grads on the leaves)``. Floating values are cast to ``dtype``."""
    leaves, args = {}, {}
    for name, (values, layout) in spec.items():
        if values.is_floating_point():
            values = values.to(dtype)
        leaf, view = make_view(values, layout, requires_grad=name in grad_names and values.is_floating_point())
        leaves[name], args[name] = leaf, view
    out = fn(**args, **kwargs)
    grads = {}
    if grad_names:
        g = upstream.to(out.dtype) if upstream is not None else torch.ones_like(out)
        wrt = [leaves[n] for n in grad_names]
        res = torch.autograd.grad(out, wrt, g, allow_unused=True)
        grads = dict(zip(grad_names, res))
    return out, grads


def check_parity(loss, spec, kwargs, dtype, grad_names=("input",), msg=""):
    """Compare crossent with torch on one case (values, dtype, shape, gradients)."""
    torch_fn, our_fn = FN[loss]
    rdt = ref_dtype(dtype)
    # Both sides see the same values: rounded to ``dtype`` first.
    spec = {k: ((v.to(dtype).double() if v.is_floating_point() else v), layout) for k, (v, layout) in spec.items()}
    ours, our_grads = None, None
    # torch in the requested dtype: only for its output dtype (and as the reference when
    # it is float32/64).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native, _ = _call(torch_fn, spec, kwargs, dtype, ())
    # One upstream gradient, rounded to the output dtype, used by both sides.
    up = 0.5 + torch.rand(native.shape, generator=gen(7), dtype=torch.float64)
    up = up.to(native.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_grads = _call(torch_fn, spec, kwargs, rdt, grad_names, upstream=up)
    ours, our_grads = _call(our_fn, spec, kwargs, dtype, grad_names, upstream=up)
    assert ours.dtype == native.dtype, f"{msg}: dtype {ours.dtype} != torch's {native.dtype}"
    assert ours.shape == native.shape
    assert_close(ours, ref.to(ours.dtype), dtype=dtype, msg=f"{msg} value")
    for name in grad_names:
        a, b = our_grads[name], ref_grads[name]
        if b is None:
            assert a is None or not a.any(), f"{msg}: torch has no gradient for {name}"
            continue
        assert a is not None, f"{msg}: no gradient for {name}"
        assert a.dtype == spec[name][0].to(dtype).dtype
        assert_close(a, b.to(a.dtype), dtype=dtype, msg=f"{msg} grad {name}")


CASES = []  # collected ids, for the count in the report


def _weight_shape(kind, shape):
    if kind is None:
        return None
    if kind == "full":
        return tuple(shape)
    if kind == "last":
        return tuple(shape[-1:])
    if kind == "col":  # (N, 1, ..., 1): broadcast along everything but the batch dimension
        return (shape[0],) + (1,) * (len(shape) - 1)
    if kind == "scalar":
        return ()
    raise ValueError(kind)


def _weight_kinds(shape):
    kinds = [None, "full", "scalar"]
    if len(shape) >= 1:
        kinds.append("last")
    if len(shape) >= 2:
        kinds.append("col")
    return kinds


# --------------------------------------------------------------------------- binary grid
BINARY_GRID = [
    (loss, shape, wk, red, dt)
    for loss in ("bce", "bce_logits")
    for shape in SHAPES_BINARY
    for wk in _weight_kinds(shape)
    for red in REDUCTIONS
    for dt in DTYPES
]


def _binary_spec(loss, shape, seed=0, weight_kind=None, pos_weight_kind=None, layout="contiguous"):
    g = gen(seed)
    x = probabilities(shape, g) if loss == "bce" else logits(shape, g)
    spec = {"input": (x, layout), "target": (soft_targets(shape, g), layout)}
    if weight_kind is not None:
        w = 0.5 + 1.5 * torch.rand(_weight_shape(weight_kind, shape), generator=g, dtype=torch.float64)
        spec["weight"] = (w, layout if weight_kind == "full" else "contiguous")
    if pos_weight_kind is not None:
        pw = 0.25 + 3 * torch.rand(_weight_shape(pos_weight_kind, shape), generator=g, dtype=torch.float64)
        spec["pos_weight"] = (pw, layout if pos_weight_kind == "full" else "contiguous")
    return spec


@pytest.mark.parametrize(
    "loss,shape,weight_kind,reduction,dtype",
    BINARY_GRID,
    ids=[f"{l}-{s}-w{w}-{r}-{str(d)[6:]}" for l, s, w, r, d in BINARY_GRID],
)
def test_binary_parity(loss, shape, weight_kind, reduction, dtype):
    spec = _binary_spec(loss, shape, weight_kind=weight_kind)
    check_parity(
        loss,
        spec,
        {"reduction": reduction},
        dtype,
        ("input", "target"),
        msg=f"{loss} {shape} weight={weight_kind} {reduction} {dtype}",
    )


POS_WEIGHT_GRID = [
    (shape, pk, wk, red, dt)
    for shape in SHAPES_BINARY
    for pk in _weight_kinds(shape)
    if pk is not None
    for wk in (None, "last" if shape else "scalar")
    for red in REDUCTIONS
    for dt in DTYPES
]


@pytest.mark.parametrize(
    "shape,pos_weight_kind,weight_kind,reduction,dtype",
    POS_WEIGHT_GRID,
    ids=[f"{s}-pw{p}-w{w}-{r}-{str(d)[6:]}" for s, p, w, r, d in POS_WEIGHT_GRID],
)
def test_bce_with_logits_pos_weight_parity(shape, pos_weight_kind, weight_kind, reduction, dtype):
    spec = _binary_spec("bce_logits", shape, seed=1, weight_kind=weight_kind, pos_weight_kind=pos_weight_kind)
    check_parity(
        "bce_logits",
        spec,
        {"reduction": reduction},
        dtype,
        ("input", "target"),
        msg=f"{shape} pos_weight={pos_weight_kind} weight={weight_kind} {reduction} {dtype}",
    )


BINARY_LAYOUT_GRID = [
    (loss, layout, shape, red, dt)
    for loss in ("bce", "bce_logits")
    for layout in LAYOUTS
    for shape in [(5, 3), (5, 3, 1, 2), (3,), (0, 3)]
    for red in ("none", "mean")  # 'sum' adds nothing layout-specific
    for dt in DTYPES
]


@pytest.mark.parametrize(
    "loss,layout,shape,reduction,dtype",
    BINARY_LAYOUT_GRID,
    ids=[f"{l}-{a}-{s}-{r}-{str(d)[6:]}" for l, a, s, r, d in BINARY_LAYOUT_GRID],
)
def test_binary_layout_parity(loss, layout, shape, reduction, dtype):
    """Non-contiguous (transposed, sliced) and expanded (stride 0) input, target and weight."""
    spec = _binary_spec(
        loss, shape, seed=2, weight_kind="full", pos_weight_kind="last" if loss == "bce_logits" else None, layout=layout
    )
    check_parity(
        loss,
        spec,
        {"reduction": reduction},
        dtype,
        ("input", "target"),
        msg=f"{loss} {layout} {shape} {reduction} {dtype}",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bce_clamp_parity(reduction, dtype):
    """Probabilities exactly 0 and 1: torch's log clamp at -100 and its clamped gradient."""
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1e-30, 1 - 2**-20], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 0.2], dtype=torch.float64)
    check_parity(
        "bce",
        {"input": (p, "contiguous"), "target": (t, "contiguous")},
        {"reduction": reduction},
        dtype,
        ("input", "target"),
        msg="clamp",
    )


# --------------------------------------------------------------------------- multiclass grid
def _ce_spec(shape, target_kind, weighted, seed=0, layout="contiguous", ignore_index=-100):
    g = gen(seed)
    class_dim = 1 if len(shape) >= 2 else 0
    C = shape[class_dim]
    x = logits(shape, g)
    spec = {"input": (x, layout)}
    index_shape = tuple(shape[:class_dim]) + tuple(shape[class_dim + 1 :])
    if target_kind == "prob":
        # An expanded (C,) target would repeat one probability: keep unbatched ones contiguous.
        t_layout = "contiguous" if (layout == "expanded" and len(shape) == 1) else layout
        spec["target"] = (class_probabilities(shape, class_dim, g), t_layout)
    else:
        ign = ignore_index if target_kind == "index_ignore" else None
        spec["target"] = (class_indices(index_shape, C, g, ignore_index=ign), layout)
    if weighted:
        spec["weight"] = (0.5 + 1.5 * torch.rand(C, generator=g, dtype=torch.float64), "contiguous")
    return spec


CE_GRID = [
    (shape, tk, w, ls, red, dt)
    for shape in SHAPES_MULTICLASS
    for tk in ("index", "index_ignore", "prob")
    for w in (False, True)
    for ls in (0.0, 0.2)
    for red in REDUCTIONS
    for dt in DTYPES
]


@pytest.mark.parametrize(
    "shape,target_kind,weighted,label_smoothing,reduction,dtype",
    CE_GRID,
    ids=[f"{s}-{t}-w{int(w)}-ls{l}-{r}-{str(d)[6:]}" for s, t, w, l, r, d in CE_GRID],
)
def test_cross_entropy_parity(shape, target_kind, weighted, label_smoothing, reduction, dtype):
    spec = _ce_spec(shape, target_kind, weighted)
    grads = ("input", "target") if target_kind == "prob" else ("input",)
    check_parity(
        "ce",
        spec,
        {"reduction": reduction, "label_smoothing": label_smoothing},
        dtype,
        grads,
        msg=f"{shape} {target_kind} weight={weighted} ls={label_smoothing} {reduction} {dtype}",
    )


CE_LAYOUT_GRID = [
    (layout, shape, tk, red, dt)
    for layout in LAYOUTS
    for shape in [(5, 4), (5, 4, 1, 2)] + ([(4,)] if layout != "expanded" else [])  # (4,) expanded: equal logits
    for tk in ("index_ignore", "prob")
    for red in ("none", "mean")
    for dt in DTYPES
]


@pytest.mark.parametrize(
    "layout,shape,target_kind,reduction,dtype",
    CE_LAYOUT_GRID,
    ids=[f"{a}-{s}-{t}-{r}-{str(d)[6:]}" for a, s, t, r, d in CE_LAYOUT_GRID],
)
def test_cross_entropy_layout_parity(layout, shape, target_kind, reduction, dtype):
    spec = _ce_spec(shape, target_kind, weighted=True, seed=3, layout=layout)
    grads = ("input", "target") if target_kind == "prob" else ("input",)
    check_parity(
        "ce",
        spec,
        {"reduction": reduction, "label_smoothing": 0.1},
        dtype,
        grads,
        msg=f"{layout} {shape} {target_kind} {reduction} {dtype}",
    )


@pytest.mark.parametrize("ignore_index", [0, 2, -1, -100])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_ignore_index_values(ignore_index, label_smoothing, reduction):
    """ignore_index equal to a real class, or negative; with weights and smoothing."""
    spec = _ce_spec((6, 4, 2), "index_ignore", weighted=True, seed=4, ignore_index=ignore_index)
    check_parity(
        "ce",
        spec,
        {"reduction": reduction, "label_smoothing": label_smoothing, "ignore_index": ignore_index},
        torch.float64,
        ("input",),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_all_ignored_and_extreme_rows(reduction, dtype):
    """Every target ignored (mean is 0/0 = nan, like torch) and rows with huge margins."""
    x = torch.tensor([[30.0, 0.0, -5.0], [0.0, 0.0, 0.0], [-50.0, 50.0, 0.0]], dtype=torch.float64)
    y = torch.full((3,), -100)
    check_parity(
        "ce", {"input": (x, "contiguous"), "target": (y, "contiguous")}, {"reduction": reduction}, dtype, ("input",)
    )
    y = torch.tensor([0, 1, 1])
    check_parity(
        "ce",
        {"input": (x, "contiguous"), "target": (y, "contiguous")},
        {"reduction": reduction, "label_smoothing": 0.05},
        dtype,
        ("input",),
    )


def test_cross_entropy_unbatched_target_of_shape_one():
    """torch's forward accepts a (1,)-shaped class index for a (C,) input (0-dim result;
    its backward then fails with 'size mismatch'); crossent gives the same value and the
    gradient of the 0-dim-target call."""
    x = torch.randn(5, dtype=torch.float64)
    for red in REDUCTIONS:
        check_parity(
            "ce",
            {"input": (x, "contiguous"), "target": (torch.tensor([3]), "contiguous")},
            {"reduction": red},
            torch.float64,
            (),
        )
        xi = x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(CF.cross_entropy(xi, torch.tensor([3]), reduction=red), xi)
        (g0,) = torch.autograd.grad(TF.cross_entropy(xi, torch.tensor(3), reduction=red), xi)
        assert_close(g1, g0)


@pytest.mark.parametrize("loss", ["bce", "bce_logits", "ce"])
def test_elementwise_mean_alias(loss):
    """torch still accepts reduction='elementwise_mean' (deprecated alias of 'mean')."""
    spec = _ce_spec((4, 3), "index", True) if loss == "ce" else _binary_spec(loss, (4, 3))
    args = {k: v[0] for k, v in spec.items()}
    expected = torch_quiet(FN[loss][0], **args, reduction="elementwise_mean")
    with pytest.warns(DeprecationWarning, match="elementwise_mean"):
        got = FN[loss][1](**args, reduction="elementwise_mean")
    assert_close(got, expected)


# --------------------------------------------------------------------------- mixed dtypes
MIXED = [(a, b) for a in DTYPES for b in DTYPES if a != b]


@pytest.mark.parametrize("in_dtype,target_dtype", MIXED, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in MIXED])
def test_mixed_dtypes_output_dtype(in_dtype, target_dtype):
    """torch accepts mixed input/target dtypes for BCE-with-logits (result has the target's
    dtype) and for CE probability targets (result promotes); crossent returns the same dtype
    and a value at least as close to the float64 truth."""
    g = gen(5)
    x, t = logits((4, 3), g), soft_targets((4, 3), g)
    q = class_probabilities((4, 3), 1, g)
    for tf, cf, tgt in [
        (TF.binary_cross_entropy_with_logits, CF.binary_cross_entropy_with_logits, t),
        (TF.cross_entropy, CF.cross_entropy, q),
    ]:
        xi, ti = x.to(in_dtype), tgt.to(target_dtype)
        expected = tf(xi, ti, reduction="none")
        ours = cf(xi, ti, reduction="none")
        assert ours.dtype == expected.dtype
        truth = tf(xi.double(), ti.double(), reduction="none")
        err_ours = (ours.double() - truth).abs().max()
        err_torch = (expected.double() - truth).abs().max()
        # never worse than torch, up to one rounding step of the output dtype
        assert err_ours <= err_torch + torch.finfo(expected.dtype).eps * truth.abs().max()


def test_cross_entropy_prob_target_weight_dtype_promotes():
    x = torch.randn(4, 3, dtype=torch.float16)
    q = torch.softmax(torch.randn(4, 3), 1)
    w = torch.rand(3, dtype=torch.float64)
    assert CF.cross_entropy(x, q, weight=w).dtype == TF.cross_entropy(x, q, weight=w).dtype == torch.float64


# --------------------------------------------------------------------------- second order
SECOND = [
    ("bce", {}),
    ("bce", {"weight": "last"}),
    ("bce_logits", {}),
    ("bce_logits", {"weight": "last", "pos_weight": "last"}),
    ("ce", {"target": "index"}),
    ("ce", {"target": "index_ignore", "weight": True, "label_smoothing": 0.2}),
    ("ce", {"target": "prob", "weight": True, "label_smoothing": 0.2}),
]


@pytest.mark.parametrize("loss,opts", SECOND, ids=[f"{l}-{'-'.join(o)}" for l, o in SECOND])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_derivatives_match_torch(loss, opts, reduction):
    """Hessian-vector products (double backward) equal torch's in float64."""
    if loss == "ce":
        spec = _ce_spec((5, 4, 2), opts.get("target"), opts.get("weight", False), seed=6)
        kwargs = {"label_smoothing": opts.get("label_smoothing", 0.0)}
    else:
        spec = _binary_spec(
            loss, (5, 3), seed=6, weight_kind=opts.get("weight"), pos_weight_kind=opts.get("pos_weight")
        )
        kwargs = {}
    kwargs["reduction"] = reduction
    results = []
    for fn in FN[loss]:
        x = spec["input"][0].clone().requires_grad_()
        others = {k: v[0] for k, v in spec.items() if k != "input"}
        out = fn(x, **others, **kwargs)
        up = torch.rand(out.shape, generator=gen(8), dtype=torch.float64)
        (gx,) = torch.autograd.grad(out, x, up, create_graph=True)
        v = torch.rand(x.shape, generator=gen(9), dtype=torch.float64)
        (hv,) = torch.autograd.grad((gx * v).sum(), x)
        results.append(hv)
    torch.testing.assert_close(results[1], results[0], **TOL["second_order"])


# --------------------------------------------------------------------------- modules
MODULE_CASES = [
    ("BCELoss", {}, "bce"),
    ("BCELoss", {"weight": "last", "reduction": "sum"}, "bce"),
    ("BCEWithLogitsLoss", {}, "bce_logits"),
    ("BCEWithLogitsLoss", {"weight": "last", "pos_weight": "last", "reduction": "none"}, "bce_logits"),
    ("BCEWithLogitsLoss", {"pos_weight": "last", "reduction": "mean"}, "bce_logits"),
    ("CrossEntropyLoss", {}, "ce"),
    ("CrossEntropyLoss", {"weight": True, "ignore_index": 1, "label_smoothing": 0.1}, "ce"),
    ("CrossEntropyLoss", {"weight": True, "reduction": "none", "target": "prob"}, "ce"),
    ("CrossEntropyLoss", {"label_smoothing": 0.2, "reduction": "sum", "target": "index_ignore"}, "ce"),
]


def _module_pair(name, opts, loss, dtype):
    g = gen(11)
    kwargs = {k: v for k, v in opts.items() if k in ("reduction", "ignore_index", "label_smoothing")}
    C = 3
    if opts.get("weight"):
        kwargs["weight"] = (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).to(dtype)
    if opts.get("pos_weight"):
        kwargs["pos_weight"] = (0.5 + 3 * torch.rand(C, generator=g, dtype=torch.float64)).to(dtype)
    theirs = getattr(torch.nn, name)(**kwargs)
    ours = getattr(CN, name)(**kwargs)
    if loss == "ce":
        spec = _ce_spec(
            (6, C, 2), opts.get("target", "index"), False, seed=12, ignore_index=opts.get("ignore_index", -100)
        )
    else:
        spec = _binary_spec(loss, (6, C), seed=12)
    return theirs, ours, spec


@pytest.mark.parametrize("name,opts,loss", MODULE_CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MODULE_CASES)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_parity(name, opts, loss, dtype):
    theirs, ours, spec = _module_pair(name, opts, loss, dtype)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    assert ours.reduction == theirs.reduction
    x = spec["input"][0].to(dtype).requires_grad_()
    t = spec["target"][0].to(dtype) if spec["target"][0].is_floating_point() else spec["target"][0]
    a, b = theirs(x, t), ours(x, t)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert_close(b, a, msg=name)
    up = torch.rand(a.shape, generator=gen(13), dtype=dtype)
    (ga,) = torch.autograd.grad(a, x, up)
    (gb,) = torch.autograd.grad(b, x, up)
    assert_close(gb, ga, msg=name + " grad")


@pytest.mark.parametrize("name,opts,loss", MODULE_CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MODULE_CASES)])
def test_state_dict_round_trip(name, opts, loss):
    """A torch module's state_dict loads into ours and back (weight, pos_weight buffers)."""
    theirs, ours, spec = _module_pair(name, opts, loss, torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    # Fresh modules with different buffer values, then load.
    fresh_ours = getattr(CN, name)(
        **{k: (v * 0 + 7 if isinstance(v, torch.Tensor) else v) for k, v in _module_kwargs(theirs).items()}
    )
    fresh_ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[k], v)
    fresh_theirs = getattr(torch.nn, name)(
        **{k: (v * 0 + 7 if isinstance(v, torch.Tensor) else v) for k, v in _module_kwargs(theirs).items()}
    )
    fresh_theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh_theirs.state_dict()[k], v)
    # and the loaded module computes torch's loss
    x = spec["input"][0].float()
    t = spec["target"][0].float() if spec["target"][0].is_floating_point() else spec["target"][0]
    assert_close(fresh_ours(x, t), theirs(x, t))


def _module_kwargs(m):
    kw = {"reduction": m.reduction}
    for k in ("weight", "pos_weight"):
        if getattr(m, k, None) is not None:
            kw[k] = getattr(m, k)
    for k in ("ignore_index", "label_smoothing"):
        if hasattr(m, k) and not isinstance(m, torch.nn.BCELoss):
            kw[k] = getattr(m, k)
    return kw


def test_bce_module_without_buffers_loads_torch_state():
    ours, theirs = CN.BCELoss(), torch.nn.BCELoss()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert dict(ours.named_buffers()) == dict(theirs.named_buffers()) == {}


@pytest.mark.parametrize("name", ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss"])
def test_isinstance_and_buffers_move(name):
    m = getattr(CN, name)(weight=torch.ones(3))
    assert isinstance(m, getattr(torch.nn, name))
    assert isinstance(m, torch.nn.Module)
    assert "weight" in dict(m.named_buffers())
    m = m.double()
    assert m.weight.dtype == torch.float64


# --------------------------------------------------------------------------- legacy arguments
LEGACY = [(None, False), (True, None), (False, None), (False, True), (True, False), (None, True), (True, True)]


@pytest.mark.parametrize("size_average,reduce", LEGACY)
@pytest.mark.parametrize("loss", ["bce", "bce_logits", "ce"])
def test_deprecated_size_average_and_reduce(loss, size_average, reduce):
    if loss == "ce":
        spec = _ce_spec((4, 3), "index_ignore", True)
    else:
        spec = _binary_spec(loss, (4, 3), weight_kind="last")
    args = {k: v[0] for k, v in spec.items()}
    torch_fn, our_fn = FN[loss]
    expected = torch_quiet(torch_fn, **args, size_average=size_average, reduce=reduce)
    with pytest.warns(DeprecationWarning, match="size_average and reduce are deprecated"):
        got = our_fn(**args, size_average=size_average, reduce=reduce)
    assert_close(got, expected)
    name = {"bce": "BCELoss", "bce_logits": "BCEWithLogitsLoss", "ce": "CrossEntropyLoss"}[loss]
    kw = {"weight": args.pop("weight")}
    theirs = torch_quiet(getattr(torch.nn, name), **kw, size_average=size_average, reduce=reduce)
    with pytest.warns(DeprecationWarning, match="deprecated"):
        ours = getattr(CN, name)(**kw, size_average=size_average, reduce=reduce)
    assert ours.reduction == theirs.reduction
    assert_close(ours(args["input"], args["target"]), theirs(args["input"], args["target"]))


def test_positional_signatures_match_torch():
    """Every positional parameter of torch's functions and modules sits at the same place."""
    import inspect

    pairs = [
        (TF.binary_cross_entropy, CF.binary_cross_entropy),
        (TF.binary_cross_entropy_with_logits, CF.binary_cross_entropy_with_logits),
        (TF.cross_entropy, CF.cross_entropy),
        (torch.nn.BCELoss.__init__, CN.BCELoss.__init__),
        (torch.nn.BCEWithLogitsLoss.__init__, CN.BCEWithLogitsLoss.__init__),
        (torch.nn.CrossEntropyLoss.__init__, CN.CrossEntropyLoss.__init__),
    ]
    for theirs, ours in pairs:
        tp = [
            (p.name, p.default)
            for p in inspect.signature(theirs).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        op = [
            (p.name, p.default)
            for p in inspect.signature(ours).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert op == tp, theirs


# --------------------------------------------------------------------------- errors
def _p(*shape):
    return torch.rand(shape, generator=gen(21)) * 0.9 + 0.05


def _x(*shape):
    return torch.randn(shape, generator=gen(22))


# Inputs torch rejects; crossent must reject them too. Not listed on purpose (crossent
# accepts them, see test_extensions.py and docs/exactness.md): bool/integer BCE
# targets, non-int64 integer CE targets (incl. bool), Python scalars/sequences for weight
# and pos_weight, integer weight tensors, mixed float dtypes of BCE input/target and of a
# CE class-index weight, gradients w.r.t. weight/pos_weight.
RAISES = {
    # binary_cross_entropy
    "bce target shape (4,1) for input (4,3)": lambda f: f.binary_cross_entropy(_p(4, 3), _p(4, 1)),
    "bce target shape (4,) for input (4,1)": lambda f: f.binary_cross_entropy(_p(4, 1), _p(4)),
    "bce target with more elements": lambda f: f.binary_cross_entropy(_p(4), _p(5)),
    "bce integer input": lambda f: f.binary_cross_entropy(torch.ones(4, dtype=torch.long), _p(4)),
    "bce complex input": lambda f: f.binary_cross_entropy(_p(2).to(torch.cfloat), _p(2).to(torch.cfloat)),
    "bce input above 1": lambda f: f.binary_cross_entropy(_p(4) + 1, _p(4)),
    "bce input below 0": lambda f: f.binary_cross_entropy(-_p(4), _p(4)),
    "bce NaN input": lambda f: f.binary_cross_entropy(torch.tensor([float("nan"), 0.5]), _p(2)),
    "bce target above 1": lambda f: f.binary_cross_entropy(_p(4), _p(4) + 1),
    "bce weight enlarges output": lambda f: f.binary_cross_entropy(_p(4, 3), _p(4, 3), weight=_p(2, 4, 3)),
    "bce weight not broadcastable": lambda f: f.binary_cross_entropy(_p(4, 3), _p(4, 3), weight=_p(2)),
    "bce bad reduction": lambda f: f.binary_cross_entropy(_p(4), _p(4), reduction="avg"),
    "bce reduction None": lambda f: f.binary_cross_entropy(_p(4), _p(4), reduction=None),
    "bce string target": lambda f: f.binary_cross_entropy(_p(4), "1"),
    "bce module weight enlarges": lambda f: f.BCELoss(weight=_p(2, 4, 3))(_p(4, 3), _p(4, 3)),
    # binary_cross_entropy_with_logits
    "bcel target shape (4,1) for input (4,3)": lambda f: f.binary_cross_entropy_with_logits(_x(4, 3), _p(4, 1)),
    "bcel target shape (4,3) for input (4,1)": lambda f: f.binary_cross_entropy_with_logits(_x(4, 1), _p(4, 3)),
    "bcel target shape (4,) for input (4,1)": lambda f: f.binary_cross_entropy_with_logits(_x(4, 1), _p(4)),
    "bcel integer input": lambda f: f.binary_cross_entropy_with_logits(torch.ones(4, dtype=torch.long), _p(4)),
    "bcel complex input": lambda f: f.binary_cross_entropy_with_logits(_x(2).to(torch.cfloat), _p(2).to(torch.cfloat)),
    "bcel pos_weight not broadcastable": lambda f: f.binary_cross_entropy_with_logits(
        _x(4, 3), _p(4, 3), pos_weight=_p(2)
    ),
    "bcel pos_weight enlarges": lambda f: f.binary_cross_entropy_with_logits(
        _x(4, 3), _p(4, 3), pos_weight=_p(2, 4, 3)
    ),
    "bcel weight not broadcastable": lambda f: f.binary_cross_entropy_with_logits(_x(4, 3), _p(4, 3), weight=_p(4)),
    "bcel weight enlarges": lambda f: f.binary_cross_entropy_with_logits(_x(4, 3), _p(4, 3), weight=_p(2, 4, 3)),
    "bcel bad reduction": lambda f: f.binary_cross_entropy_with_logits(_x(4), _p(4), reduction="MEAN"),
    "bcel module bad reduction": lambda f: f.BCEWithLogitsLoss(reduction="Sum")(_x(4), _p(4)),
    # cross_entropy
    "ce class index >= C": lambda f: f.cross_entropy(_x(4, 3), torch.tensor([0, 1, 3, 0])),
    "ce negative class index": lambda f: f.cross_entropy(_x(4, 3), torch.tensor([0, -1, 2, 0])),
    "ce index out of range unbatched": lambda f: f.cross_entropy(_x(3), torch.tensor(5)),
    "ce C=0": lambda f: f.cross_entropy(torch.randn(2, 0), torch.tensor([0, 0])),
    "ce weight wrong length": lambda f: f.cross_entropy(_x(4, 3), torch.tensor([0, 1, 2, 0]), weight=_p(4)),
    "ce weight 2-D": lambda f: f.cross_entropy(_x(4, 3), torch.tensor([0, 1, 2, 0]), weight=_p(1, 3)),
    "ce prob weight wrong length": lambda f: f.cross_entropy(_x(4, 3), torch.softmax(_x(4, 3), 1), weight=_p(2)),
    "ce float target of shape (N,)": lambda f: f.cross_entropy(_x(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0])),
    "ce integer target of input's shape": lambda f: f.cross_entropy(_x(4, 3), torch.ones(4, 3, dtype=torch.long)),
    "ce prob target with ignore_index >= 0": lambda f: f.cross_entropy(
        _x(4, 3), torch.softmax(_x(4, 3), 1), ignore_index=1
    ),
    "ce prob target wrong C": lambda f: f.cross_entropy(_x(2, 3), torch.softmax(_x(2, 4), 1)),
    "ce target (N,) for K-dim input": lambda f: f.cross_entropy(_x(2, 3, 4), torch.zeros(2, dtype=torch.long)),
    "ce target (B,T) for (B,T,V)": lambda f: f.cross_entropy(_x(2, 5, 3), torch.zeros(2, 5, dtype=torch.long)),
    "ce target (N,1)": lambda f: f.cross_entropy(_x(4, 3), torch.zeros(4, 1, dtype=torch.long)),
    "ce target batch mismatch": lambda f: f.cross_entropy(_x(4, 3), torch.zeros(5, dtype=torch.long)),
    "ce 0-dim target for (N,C)": lambda f: f.cross_entropy(_x(2, 3), torch.tensor(1)),
    "ce (C,) input with (2,) target": lambda f: f.cross_entropy(_x(3), torch.tensor([0, 1])),
    "ce 0-dim input": lambda f: f.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
    "ce integer input": lambda f: f.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1])),
    "ce complex input": lambda f: f.cross_entropy(_x(2, 3).to(torch.cfloat), torch.tensor([0, 1])),
    "ce label_smoothing > 1": lambda f: f.cross_entropy(_x(2, 3), torch.tensor([0, 1]), label_smoothing=1.5),
    "ce ignore_index float": lambda f: f.cross_entropy(_x(2, 3), torch.tensor([0, 1]), ignore_index=1.5),
    "ce bad reduction": lambda f: f.cross_entropy(_x(2, 3), torch.tensor([0, 1]), reduction="avg"),
    "ce string target": lambda f: f.cross_entropy(_x(2, 3), [0, 1]),
    "ce module label_smoothing > 1": lambda f: f.CrossEntropyLoss(label_smoothing=1.5)(_x(2, 3), torch.tensor([0, 1])),
    "ce module weight wrong length": lambda f: f.CrossEntropyLoss(weight=_p(4))(_x(2, 3), torch.tensor([0, 1])),
}
ALLOWED = (ValueError, TypeError, IndexError, RuntimeError)


class _TorchNS:
    binary_cross_entropy = staticmethod(TF.binary_cross_entropy)
    binary_cross_entropy_with_logits = staticmethod(TF.binary_cross_entropy_with_logits)
    cross_entropy = staticmethod(TF.cross_entropy)
    BCELoss, BCEWithLogitsLoss, CrossEntropyLoss = (
        torch.nn.BCELoss,
        torch.nn.BCEWithLogitsLoss,
        torch.nn.CrossEntropyLoss,
    )


class _OursNS:
    binary_cross_entropy = staticmethod(CF.binary_cross_entropy)
    binary_cross_entropy_with_logits = staticmethod(CF.binary_cross_entropy_with_logits)
    cross_entropy = staticmethod(CF.cross_entropy)
    BCELoss, BCEWithLogitsLoss, CrossEntropyLoss = CN.BCELoss, CN.BCEWithLogitsLoss, CN.CrossEntropyLoss


@pytest.mark.parametrize("case", sorted(RAISES))
def test_raises_where_torch_raises(case):
    """With the default (validation on), crossent raises its own clear error."""
    make = RAISES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as theirs:
            make(_TorchNS)
    assert isinstance(theirs.value, ALLOWED + (AttributeError,)), theirs.value
    with pytest.raises(ALLOWED) as ours:
        make(_OursNS)
    assert type(ours.value).__module__.startswith("crossent"), f"raw error escaped: {ours.value!r}"


# --------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("loss", ["bce_logits", "ce", "bce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_float32_policy(loss, dtype):
    """Under CPU autocast torch runs these losses in float32 (float32 result); so does
    crossent. (torch's BCE on probabilities raises under CUDA autocast; on CPU it follows
    the float32 policy, which is what crossent does on every device.)"""
    g = gen(60)
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(6, 4, generator=g)
    t = soft_targets((6, 3), g).float()
    results = []
    for fn in FN[loss]:
        lin_f = torch.nn.Linear(4, 3)
        lin_f.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
        with torch.autocast("cpu", dtype=dtype):
            z = lin_f(x)
            inp = torch.sigmoid(z) if loss == "bce" else z
            tgt = t.argmax(1) if loss == "ce" else t
            out = fn(inp, tgt)
        out.backward()
        results.append((out, lin_f.weight.grad))
    (a, ga), (b, gb) = results
    assert a.dtype == b.dtype == torch.float32
    assert_close(b, a)
    assert_close(gb, ga)
