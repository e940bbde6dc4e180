"""LM-head options under capture: each is one graph with no break, compiles with
``fullgraph=True`` and gives the eager values and gradients (tests/test_capture.py style);
the fused ops are the registered ``crossent::lm_head_forward``/``_backward``."""

from __future__ import annotations

import pytest
import torch

import crossent
from crossent.backends import ops

from _helpers import assert_close

torch._dynamo.config.cache_size_limit = 64

N, H, C = 12, 6, 5


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(H, C)


def _data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    y[1] = -100
    tw = torch.rand(n, generator=g)
    return x, y, tw


# name -> step(model, x, y, tw) returning a scalar that depends on every output
CASES = {
    "ce_z_loss": lambda m, x, y, tw: crossent.cross_entropy(m(x), y, z_loss=1e-2),
    "ce_softcap": lambda m, x, y, tw: crossent.cross_entropy(m(x), y, softcap=2.0),
    "ce_temperature": lambda m, x, y, tw: crossent.cross_entropy(m(x), y, temperature=0.7),
    "ce_token_weight": lambda m, x, y, tw: crossent.cross_entropy(m(x), y, token_weight=tw),
    "ce_all_none": lambda m, x, y, tw: crossent.cross_entropy(
        m(x), y, z_loss=1e-2, softcap=2.0, temperature=0.7, token_weight=tw, label_smoothing=0.1, reduction="none"
    ).sum(),
    "ce_return_lse_accuracy": lambda m, x, y, tw: (lambda r: r[0] + r[1].sum() * 0 + r[2] * 0)(
        crossent.cross_entropy(m(x), y, softcap=3.0, return_lse=True, return_accuracy=True)
    ),
    "ce_parts": lambda m, x, y, tw: (
        crossent.cross_entropy(m(x), y, z_loss=1e-3, token_weight=tw, return_parts=True).loss
    ),
    "token_logprobs_entropy": lambda m, x, y, tw: (lambda r: (r[0] * tw).sum() - 0.1 * r[1].sum())(
        crossent.token_logprobs(m(x), y, temperature=0.9, softcap=3.0, return_entropy=True)
    ),
    "linear_ce_options": lambda m, x, y, tw: crossent.linear_cross_entropy(
        x, m.weight, y, linear_bias=m.bias, z_loss=1e-2, softcap=2.0, temperature=0.8, token_weight=tw, chunk_size=5
    ),
    "linear_ce_lse_accuracy": lambda m, x, y, tw: (lambda r: r[0] + r[2] * 0)(
        crossent.linear_cross_entropy(
            x, m.weight, y, linear_bias=m.bias, z_loss=1e-2, return_lse=True, return_accuracy=True
        )
    ),
    "linear_token_logprobs_entropy": lambda m, x, y, tw: (lambda r: r[0].sum() - 0.1 * r[1].sum())(
        crossent.linear_token_logprobs(x, m.weight, y, bias=m.bias, temperature=1.2, return_entropy=True, chunk_size=5)
    ),
}


def _run(step, model, x, y, tw):
    model.zero_grad()
    loss = step(model, x, y, tw)
    loss.backward()
    return loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_option_is_one_graph_equal_to_eager(name):
    step = CASES[name]
    model = _model()
    x, y, tw = _data()
    explained = torch._dynamo.explain(lambda x, y, tw: step(model, x, y, tw))(x, y, tw)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _run(compiled, model, x, y, tw)
    want = _run(step, model, x, y, tw)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_captured_graph_uses_the_registered_op_and_no_host_reads():
    model = _model()
    x, y, tw = _data()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x, y, tw):
            lp, ent = crossent.linear_token_logprobs(x, self.lin.weight, y, bias=self.lin.bias, return_entropy=True)
            return crossent.cross_entropy(self.lin(x), y, z_loss=1e-3, token_weight=tw) + lp.sum() + ent.sum()

    program = torch.export.export(Head(), (x, y, tw))
    used = {str(n.target) for n in program.graph.nodes}
    assert any("crossent.lm_head_forward" in o for o in used), used
    assert not any(
        o.endswith(("_local_scalar_dense.default", "nonzero.default", "is_nonzero.default")) for o in used
    ), used
    x2, y2, tw2 = _data(seed=4)
    assert_close(program.module()(x2, y2, tw2), Head()(x2, y2, tw2))


def test_compiled_negative_token_weight_raises_inside_the_graph():
    compiled = torch.compile(
        lambda z, y, tw: crossent.cross_entropy(z, y, token_weight=tw), fullgraph=True, backend="aot_eager"
    )
    z = torch.randn(4, C)
    y = torch.tensor([0, 1, 2, 3])
    compiled(z, y, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"finite `token_weight` >= 0"):
        compiled(z, y, -torch.ones(4))


# float32 on ``chunked`` runs the compiled C kernel's blocks, float64 the torch-ops blocks
_OPCHECK_CASES = [("chunked", torch.float32), ("chunked-torch", torch.float64)]


@pytest.mark.parametrize("name,dtype", _OPCHECK_CASES)
def test_opcheck_lm_head_op(name, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 4, 2, -100, 1, 3])
    keep = y != -100
    sigma = torch.full((5,), 0.02, dtype=dtype)
    logits = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    for args in (
        (x, W, b, y, keep, sigma, 0.8, 2.0, 4, name),
        (logits, None, None, y, keep, None, 1.0, 0.0, 2, name),
    ):
        torch.library.opcheck(ops.lm_head_forward, args)


def test_torch_func_grad_runs_the_reference_formulas():
    x, y, tw = _data()
    z = torch.nn.Linear(H, C)(x).detach()

    def loss(z):
        lp, ent = crossent.token_logprobs(z, y, softcap=3.0, return_entropy=True)
        return crossent.cross_entropy(z, y, z_loss=1e-2, token_weight=tw) + lp.sum() - 0.1 * ent.sum()

    got = torch.func.grad(loss)(z)
    zz = z.clone().requires_grad_()
    loss(zz).backward()
    assert_close(got, zz.grad)


@pytest.mark.parametrize("name,dtype", _OPCHECK_CASES)
def test_opcheck_lm_head_loss_op(name, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(5, 4, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 4, 2, -100, 1, 3])
    keep = y != -100
    sigma = torch.full((5,), 0.02, dtype=dtype)
    c = torch.rand(6, generator=g, dtype=dtype)
    torch.library.opcheck(
        ops.lm_head_loss_fused,
        (x, W, b, y, keep, sigma, c, c * 0.5, c * 1e-2, 0.8, 2.0, 4, True, True, True, name),
    )
