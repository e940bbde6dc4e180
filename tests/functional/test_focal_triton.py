"""The focal Triton kernels, run by the Triton interpreter on CPU (see test_triton.py):
the same parity checks as the CPU backends, against float64 compositions."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels are tested through its interpreter")

import torch  # noqa: E402

import crossent  # noqa: E402
from crossent.backends import _registry  # noqa: E402

from _helpers import assert_close  # noqa: E402
from test_focal import binary_composition, softmax_composition  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy evaluates both sides of tl.where

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip(
        "TRITON_INTERPRET=0 in the environment: these tests need the interpreter (no GPU)", allow_module_level=True
    )


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    from crossent.backends.triton import focal as triton_focal

    monkeypatch.setattr(_registry._BACKENDS["triton"], "unavailable", lambda device: None)
    monkeypatch.setattr(triton_focal, "BLOCK_C_MAX", 16)  # rows span several class tiles


@pytest.mark.parametrize("gamma", (0.5, 2.0, 5.0, 0.7))
@pytest.mark.parametrize("opts", (dict(), dict(pos_weight=True, weight=True, ignore=True, smoothing=0.1)))
def test_sigmoid_focal_triton_matches_composition(gamma, opts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g) * 4
    t = torch.rand(37, 5, generator=g)
    t[:20] = t[:20].round()
    kw, comp = {}, {}
    if opts.get("pos_weight"):
        kw["pos_weight"] = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5])
        comp["pos_weight"] = kw["pos_weight"].double()
    if opts.get("weight"):
        kw["weight"] = torch.linspace(0.5, 2.0, 5)
        comp["weight"] = kw["weight"].double()
    tc = t.double()
    if opts.get("ignore"):
        t[3, 2] = -1
        x[3, 2] = float("nan")
        kw["ignore_index"] = -1
        comp["keep"] = t != -1
        tc = torch.where(comp["keep"], t, 0.0).double()
    if opts.get("smoothing"):
        kw["label_smoothing"] = 0.1
        tc = tc * 0.9 + 0.05
    xa = x.clone().requires_grad_()
    got = crossent.sigmoid_focal_loss(xa, t, 0.25, gamma, "sum", backend="triton", **kw)
    xr = torch.where(torch.isnan(x), 0.0, x).double().requires_grad_()
    want = binary_composition(xr, tc, alpha=0.25, gamma=gamma, **comp).sum()
    assert_close(got, want.float(), tol="f32_pow" if gamma == 0.7 else None)
    got.backward()
    want.backward()
    assert_close(xa.grad, (xr.grad * ~torch.isnan(x)).float())


def test_poly1_bce_triton():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(9, 4, generator=g) * 3, torch.rand(9, 4, generator=g)
    got = crossent.poly1_binary_cross_entropy_with_logits(x, t, reduction="none", backend="triton")
    assert_close(got, binary_composition(x.double(), t.double(), epsilon=1.0).float())


@pytest.mark.parametrize("kind", ("index", "probabilities"))
@pytest.mark.parametrize("loss, param", (("focal", 2.0), ("focal", 0.5), ("focal", 1.3), ("poly1", 1.0)))
@pytest.mark.parametrize("C", (3, 37))
def test_softmax_family_triton_matches_composition(kind, loss, param, C):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, C, generator=g) * 3
    x[0, 1] = 30.0  # a confident row: 1 - p at the arg-max without cancellation
    w = torch.rand(C, generator=g) + 0.5
    if kind == "index":
        t = torch.randint(0, C, (7,), generator=g)
        t[0] = 1
        t[2] = -100
        x[2, 0] = float("nan")
    else:
        t = torch.rand(7, C, generator=g).softmax(1)
    xa = x.clone().requires_grad_()
    if loss == "focal":
        got = crossent.softmax_focal_loss(xa, t, param, w, label_smoothing=0.1, backend="triton")
        ck = dict(gamma=param)
    else:
        got = crossent.poly1_cross_entropy(xa, t, w, label_smoothing=0.1, epsilon=param, backend="triton")
        ck = dict(epsilon=param)
    xc = torch.where(torch.isnan(x), 0.0, x).double().requires_grad_()
    per, den = softmax_composition(xc, t, weight=w.double(), smoothing=0.1, **ck)
    want = per.sum() / den
    assert_close(got, want.float(), tol="f32_pow" if param == 1.3 else None)
    got.backward()
    want.backward()
    assert_close(xa.grad, (xc.grad * ~torch.isnan(x)).float(), tol="f32_pow" if param == 1.3 else None)


def test_confident_rows_keep_their_tiny_focal_loss_on_triton():
    x = torch.tensor([[20.0, 0.0, 0.0], [0.0, 12.0, 0.0]])  # losses 4e-26 and 2e-15
    y = torch.tensor([0, 1])
    got = crossent.softmax_focal_loss(x, y, 2.0, reduction="none", backend="triton")
    want, _ = softmax_composition(x.double(), y, gamma=2.0)
    assert (got > 0).all()
    assert_close(got, want.float())
