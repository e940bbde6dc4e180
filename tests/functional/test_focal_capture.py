"""The focal, Poly-1 and asymmetric losses under capture: torch._dynamo.explain (one graph,
no break), torch.compile(fullgraph=True) equal to eager (values and the model's gradients),
torch.export, torch.library.opcheck of the registered ops, torch.func transforms."""

from __future__ import annotations

import pytest
import torch

import crossent
from crossent.backends import focal

from _helpers import STEP_C, STEP_H, STEP_N, STEP_PW, STEP_W, assert_close, check_compiled_step, step_data

torch._dynamo.config.cache_size_limit = 64

N, H, C = STEP_N, STEP_H, STEP_C
PW, W = STEP_PW, STEP_W


CASES = {
    "sigmoid_focal_mean": lambda z, y, s: crossent.sigmoid_focal_loss(z, s.round(), reduction="mean"),
    "sigmoid_focal_options": lambda z, y, s: crossent.nn.SigmoidFocalLoss(
        0.5, 1.5, "sum", pos_weight=PW, ignore_index=-1, label_smoothing=0.1
    )(z, torch.where(s > 0.9, -1.0, s)),
    "sigmoid_focal_none": lambda z, y, s: crossent.sigmoid_focal_loss(z, s, gamma=0.5).square().sum(),
    "sigmoid_focal_gamma0": lambda z, y, s: crossent.sigmoid_focal_loss(z, s, gamma=0.0, reduction="mean"),
    "softmax_focal": lambda z, y, s: crossent.softmax_focal_loss(z, y),
    "softmax_focal_options": lambda z, y, s: crossent.nn.SoftmaxFocalLoss(1.0, W, label_smoothing=0.1)(z, y),
    "softmax_focal_probabilities": lambda z, y, s: crossent.softmax_focal_loss(z, s.softmax(1), 0.5),
    "softmax_focal_kdim": lambda z, y, s: crossent.softmax_focal_loss(z.view(3, 4, C).transpose(1, 2), y.view(3, 4)),
    "poly1_ce": lambda z, y, s: crossent.poly1_cross_entropy(z, y, W, label_smoothing=0.2),
    "poly1_bce": lambda z, y, s: crossent.nn.Poly1BCEWithLogitsLoss(pos_weight=PW)(z, s),
    "asymmetric": lambda z, y, s: crossent.asymmetric_loss(z, s.round()),
    "parts": lambda z, y, s: crossent.sigmoid_focal_loss(z, s, reduction="mean", return_parts=True).loss,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_step_is_one_graph_equal_to_eager(name):
    check_compiled_step(CASES[name])


def test_compiled_out_of_range_target_raises_inside_the_graph():
    f = torch.compile(
        lambda z, t: crossent.sigmoid_focal_loss(z, t, reduction="mean"), fullgraph=True, backend="aot_eager"
    )
    z = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"values in \[0, 1\]"):
        f(z, torch.full((4, 3), 2.0))


class _Head(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.lin = torch.nn.Linear(H, C)
        self.loss = loss

    def forward(self, x, target):
        return self.loss(self.lin(x), target)


@pytest.mark.parametrize(
    "loss, target",
    [
        (crossent.nn.SigmoidFocalLoss(reduction="mean"), "s"),
        (crossent.nn.SoftmaxFocalLoss(weight=W), "y"),
    ],
)
def test_export_records_the_registered_op(loss, target):
    torch.manual_seed(0)
    module = _Head(loss)
    x, y, s = step_data()
    t = y if target == "y" else s.round()
    program = torch.export.export(module, (x, t))
    ops_used = {str(n.target) for n in program.graph.nodes}
    assert any("crossent" in o and "focal" in o for o in ops_used), ops_used
    x2, y2, s2 = step_data(seed=5)
    t2 = y2 if target == "y" else s2.round()
    assert_close(program.module()(x2, t2), module(x2, t2))


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.rand(6, 4, generator=g)
    keep = torch.rand(6, 4, generator=g) > 0.2
    for backend in ("chunked", "chunked-torch"):
        yield focal.binary_focal_fused, (x, t, None, None, None, 0.25, 2.0, 0.0, backend)
        yield (
            focal.binary_focal_fused,
            (x, t, torch.rand(4, generator=g), torch.rand(4, generator=g) + 0.5, keep, -1.0, 0.5, 1.0, backend),
        )
        y = torch.randint(0, 4, (6,), generator=g)
        c = torch.rand(6, generator=g)
        yield focal.softmax_focal_fused, (x, None, y, c, None, None, "focal", 2.0, backend)
        yield focal.softmax_focal_fused, (x, None, y, c, torch.full((4,), 0.05), keep[:, 0], "poly", 1.0, backend)
        yield focal.softmax_focal_fused, (x, t.softmax(1), None, None, None, None, "focal", 0.5, backend)


@pytest.mark.parametrize("i", range(10))
def test_opcheck(i):
    op, args = list(_opcheck_samples())[i]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("fn", ["sigmoid", "softmax"])
def test_torch_func_transforms_match_the_composition(fn):
    from torch.func import grad, hessian, vmap

    x = torch.randn(7, C, dtype=torch.float64)
    y = torch.randint(0, C, (7,))
    t = (torch.rand(7, C, dtype=torch.float64) > 0.5).double()
    if fn == "sigmoid":
        ours = lambda z: crossent.sigmoid_focal_loss(z, t, reduction="mean")  # noqa: E731
        one = lambda zi, ti, yi: crossent.sigmoid_focal_loss(zi, ti).sum()  # noqa: E731
    else:
        ours = lambda z: crossent.softmax_focal_loss(z, y, 1.5)  # noqa: E731
        one = lambda zi, ti, yi: crossent.softmax_focal_loss(zi.unsqueeze(0), yi.unsqueeze(0), 1.5)  # noqa: E731
    # torch.func runs the reference composition; eager runs the fused op (its double
    # backward re-derives through the reference): both must agree
    xx = x.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(ours(xx), xx, create_graph=True)
    assert_close(grad(ours)(x), g_eager.detach())
    v = torch.randn_like(x)
    (hv,) = torch.autograd.grad(g_eager, xx, v)
    h = hessian(ours)(x)
    assert_close((h.reshape(x.numel(), -1) @ v.reshape(-1)).reshape(x.shape), hv, tol="second_order")
    per = vmap(one)(x, t, y)
    assert_close(per, torch.stack([one(x[i], t[i], y[i]) for i in range(len(x))]))
