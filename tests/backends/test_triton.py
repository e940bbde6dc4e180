"""The Triton kernels pass the backend parity suite, run by the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` (set here, before the kernels are first imported) executes the
kernels with numpy on CPU tensors: no GPU is needed. The Triton backend is registered for
CUDA only, so the ``backend`` fixture lets it accept CPU tensors and makes class tiles
small (``CE_BLOCK_C_MAX = 16``) so rows span several tiles and the online max / sum
rescaling is exercised.

The backend parity tests of ``test_backends.py`` marked with every backend run on Triton
too (the ``backend`` fixture of ``tests/conftest.py``); these are Triton's own.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip(
    "triton",
    reason="triton is not installed (pip install 'crossent[triton]'); "
    "the Triton kernels are tested through its interpreter",
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent  # noqa: E402
from crossent.backends import triton as triton_backend  # noqa: E402

from _helpers import assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy evaluates both sides of tl.where

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip(
        "TRITON_INTERPRET=0 in the environment: these tests need the interpreter (no GPU)", allow_module_level=True
    )


BACKENDS = ("triton",)  # the `backend` fixture of tests/conftest.py, Triton only


# The interpreter runs every program in Python: smaller shapes than test_backends.py.
@pytest.mark.parametrize("C", [1, 3, 37])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_index_targets_match_torch_small(backend, C, reduction):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(5, C, generator=g) * 3).requires_grad_()
    y = torch.randint(0, C, (5,), generator=g)
    y[2] = -100
    w = torch.rand(C, generator=g) + 0.1
    for kw in ({}, {"weight": w}, {"label_smoothing": 0.2}, {"weight": w, "label_smoothing": 0.05}):
        ours = crossent.cross_entropy(
            x, y, reduction=reduction, backend=backend, validate=False, **kw
        )  # C=1 warns otherwise
        ref = F.cross_entropy(x, y, reduction=reduction, **kw)
        assert_close(ours, ref)
        assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 20, generator=g) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, 20, (6,), generator=g)
    ours = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    assert ours.dtype == dtype
    truth = F.cross_entropy(x.detach().double(), y, reduction="none")
    theirs = F.cross_entropy(x.detach().float(), y, reduction="none").to(dtype)
    assert (ours.double() - truth).abs().max() <= (theirs.double() - truth).abs().max() + 1e-6
    (grad,) = torch.autograd.grad(ours.sum(), x)
    assert grad.dtype == dtype
    t = torch.rand(6, 20, generator=g).to(dtype)
    b = crossent.binary_cross_entropy_with_logits(x, t, backend=backend)
    assert abs(b.double() - F.binary_cross_entropy_with_logits(x.double(), t.double())) <= 2**-7


def test_ce_many_classes_with_online_tiles(backend, monkeypatch):
    monkeypatch.setattr(triton_backend, "CE_BLOCK_C_MAX", 256)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 1501, generator=g) * 2).requires_grad_()
    x.data[0, 1499] = 12.0  # the max sits in the last tile: every earlier tile is rescaled
    y = torch.tensor([5, 1500])
    loss = crossent.cross_entropy(x, y, reduction="none", backend=backend)
    xd = x.detach().double()
    expected = torch.logsumexp(xd, 1) - xd.gather(1, y[:, None]).squeeze(1)
    assert_close(loss.double(), expected, tol="f32_vs_f64")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert_close(grad.double(), torch.softmax(xd, 1) - F.one_hot(y, 1501).double(), tol="f32_softmax_grad_vs_f64")


def test_ce_ties_across_tiles_count_once_each(backend):
    x = torch.zeros(1, 40)
    x[0, 3] = x[0, 20] = x[0, 39] = 5.0  # three maxima in three different tiles
    x.requires_grad_()
    y = torch.tensor([20])
    loss = crossent.cross_entropy(x, y, backend=backend)
    ref = F.cross_entropy(x, y)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, x)[0])


def test_inplace_through_triton_equals_normal_path(backend):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 5, generator=g, requires_grad=True)
    W = torch.randn(5, 45, generator=g, requires_grad=True)
    y = torch.randint(0, 45, (6,), generator=g)
    y[1] = -100
    out = []
    for inplace in (False, True):
        logits = h @ W
        loss = crossent.cross_entropy(logits, y, label_smoothing=0.1, backend=backend, inplace_backward=inplace)
        out.append((loss.detach(), *torch.autograd.grad(loss, (h, W))))
    for a, b in zip(*out):
        assert_close(a, b)


def test_triton_backend_is_cuda_only_in_automatic_choice():
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert "CUDA tensors only" in reason
    assert crossent.backends.dispatch("cross_entropy", torch.zeros(2, 3)).__qualname__.startswith("make_ops")


def test_out_of_range_target_gives_nan_not_a_stray_read(backend):
    x = torch.randn(3, 9)
    y = torch.tensor([0, 9, 3])
    loss = crossent.cross_entropy(x, y, validate=False, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
