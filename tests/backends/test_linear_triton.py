"""The Triton path of the fused linear losses, run by the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` (set before the kernels are first imported) executes the kernels
with numpy on CPU tensors. The ``triton`` backend only accepts CUDA tensors, so the tests
let it accept CPU ones (monkeypatched availability); class tiles are made tiny
(``BLOCK_C_MAX = 4``) so that rows span several tiles. Shapes are tiny: the interpreter is
slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip(
    "triton",
    reason="triton is not installed (pip install 'crossent[triton]'); "
    "the Triton kernels are tested through its interpreter",
)

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import crossent  # noqa: E402
from crossent.backends import _registry  # noqa: E402

from _helpers import assert_close  # noqa: E402

F64 = torch.float64
# The interpreter evaluates both sides of tl.where with numpy: masked lanes warn about
# inf * 0 and inf - inf that the kernels then discard.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    from crossent.backends.triton import linear as tl_linear

    monkeypatch.setattr(_registry._BACKENDS["triton"], "unavailable", lambda device: None)
    monkeypatch.setattr(tl_linear, "BLOCK_C_MAX", 4)
    yield


def _setup(seed=0, N=6, H=3, C=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, requires_grad=True)
    W = torch.randn(C, H, generator=g, requires_grad=True)
    b = torch.randn(C, generator=g, requires_grad=True)
    return x, W, b, g


def _check(got, ref, params):
    assert_close(got, ref.to(got.dtype), tol="f32_matmul")
    weights = torch.linspace(0.5, 1.5, got.numel()).reshape(got.shape)
    ga = torch.autograd.grad((got * weights).sum(), params)
    gr = torch.autograd.grad((ref * weights).sum(), params)
    for a, r in zip(ga, gr):
        assert_close(a, r.to(a.dtype), tol="f32_matmul")


@pytest.mark.parametrize("blocking", [dict(), dict(chunk_size=4, class_chunk_size=5)], ids=["one_block", "blocks"])
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(label_smoothing=0.2, ignore_index=3), dict(reduction="none")],
    ids=["plain", "smooth_ignore", "none"],
)
def test_triton_ce_matches_torch(kw, blocking):
    x, W, b, g = _setup()
    y = torch.randint(0, 9, (6,), generator=g)
    w = torch.rand(9, generator=g) + 0.2
    got = crossent.linear_cross_entropy(x, W, y, linear_bias=b, weight=w, backend="triton", **kw, **blocking)
    ref = TF.cross_entropy(TF.linear(x, W, b), y, w, **kw)
    _check(got, ref, (x, W, b))


def test_triton_ce_wide_margin_and_infinite_logit():
    x = torch.tensor([[1.0, 0.0]], requires_grad=True)
    W = torch.tensor([[20.0, 0.0]] + [[0.0, 1.0]] * 4, requires_grad=True)
    loss = crossent.linear_cross_entropy(x, W, torch.tensor([0]), backend="triton", class_chunk_size=2)
    truth = 4 * torch.exp(torch.tensor(-20.0, dtype=F64))
    assert abs(loss.item() / float(truth) - 1) < 1e-5
    b = torch.tensor([0.0, float("inf"), 0.0])
    out = crossent.linear_cross_entropy(
        torch.zeros(2, 2), torch.zeros(3, 2), torch.tensor([1, 0]), linear_bias=b, reduction="none", backend="triton"
    )
    assert out.tolist() == [0.0, float("inf")]


def test_triton_probability_targets_and_bf16_fall_back_to_same_results():
    x, W, b, g = _setup(seed=1)
    q = torch.softmax(torch.randn(6, 9, generator=g), 1)
    _check(
        crossent.linear_cross_entropy(x, W, q, linear_bias=b, backend="triton", class_chunk_size=4),
        TF.cross_entropy(TF.linear(x, W, b), q),
        (x, W, b),
    )
    xb, Wb = x.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    y = torch.randint(0, 9, (6,), generator=g)
    a = crossent.linear_cross_entropy(xb, Wb, y, backend="triton")
    r = crossent.linear_cross_entropy(xb, Wb, y, backend="chunked-torch")
    assert a.dtype == torch.bfloat16 and torch.equal(a, r)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_bce_matches_torch(sparse, reduction):
    x, W, b, g = _setup(seed=2)
    pos = torch.tensor([[0, 3], [2, -1], [-1, -1], [1, 8], [5, 5], [7, 0]])
    dense = torch.zeros(6, 9)
    r, s = (pos >= 0).nonzero(as_tuple=True)
    dense[r, pos[r, s]] = 1.0
    pw = torch.rand(9, generator=g) * 3
    got = crossent.linear_binary_cross_entropy_with_logits(
        x,
        W,
        pos if sparse else dense,
        linear_bias=b,
        pos_weight=pw,
        reduction=reduction,
        backend="triton",
        chunk_size=4,
        class_chunk_size=5,
    )
    ref = TF.binary_cross_entropy_with_logits(TF.linear(x, W, b), dense, pos_weight=pw, reduction=reduction)
    _check(got, ref, (x, W, b))


def test_triton_backend_refuses_cpu_without_the_patch(monkeypatch):
    monkeypatch.undo()
    x, W, b, g = _setup()
    with pytest.raises(crossent.BackendUnavailableError, match="CUDA"):
        crossent.linear_cross_entropy(x, W, torch.tensor([0] * 6), backend="triton")


def test_triton_kernels_really_run(monkeypatch):
    """Class-index CE and BCE blocks never touch the torch block code on this path."""
    from crossent.backends import linear as L

    def boom(*a, **k):
        raise AssertionError("fell back to the torch block code")

    for name in ("ce_stats", "ce_grad", "bce"):
        monkeypatch.setattr(L.TorchBlocks, name, staticmethod(boom))
    x, W, b, g = _setup(seed=3)
    y = torch.randint(0, 9, (6,), generator=g)
    crossent.linear_cross_entropy(x, W, y, linear_bias=b, backend="triton", class_chunk_size=4).backward()
    crossent.linear_binary_cross_entropy_with_logits(x, W, y.unsqueeze(1), backend="triton").backward()
