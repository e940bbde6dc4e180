"""Shared test helpers (``from _helpers import ...``): ONE tolerance table, input generators.

Tolerances live here and nowhere else (a test that needs a wider tolerance widens it here,
with the reason). Generators make diverse inputs: shapes (N, C), (N, C, 1), (N, C, 1, 2),
unbatched (C,), empty batches, and four memory layouts of the same values (contiguous,
transposed, sliced, expanded) so that non-contiguous and stride-0 tensors are exercised.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

# --------------------------------------------------------------------------- tolerances
#: ``rtol``/``atol`` for comparing crossent with a reference **of the same dtype**.
#: float64 and float32: a few ulp of relative error plus an absolute floor for values that
#: are sums of many terms (means, sums over classes). float16/bfloat16: both sides are
#: float32 results rounded once to the low dtype, so they may differ by one rounding step
#: (1 ulp = 2**-10 resp. 2**-7 relative); the table allows two.
TOL: Dict[Union[torch.dtype, str], Dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2 * 2.0**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2.0**-7, atol=1e-5),
    #: Named entries: comparisons the per-dtype rows do not describe (``assert_close(..., tol=name)``).
    #: A float32 result against a float64 truth written from the formulas: relative, 16 ulp
    #: of float32 (2**-23 = 1.2e-7), wherever float32 has normal numbers (from 1.2e-38), so
    #: tiny losses and gradients keep their relative precision.
    "f32_vs_f64": dict(rtol=2e-6, atol=1.2e-38),
    #: float32 softmax gradients over many (1 500 to 20 000) classes against float64: each
    #: p_j = exp(x_j - lse) inherits lse's absolute error (a few ulp of |lse|) as relative
    #: error; the absolute floor is far below 1 / C.
    "f32_softmax_grad_vs_f64": dict(rtol=1e-4, atol=1e-9),
    #: Two float32 evaluations of the same formulas (another exp, another order of a row's
    #: sum): a few ulp apart, relative wherever float32 has normal numbers.
    "f32_same_formulas": dict(rtol=2e-6, atol=1.2e-38),
    #: float32 gradients through matrix products (the fused linear losses): the blocks sum in
    #: another order than torch's one GEMM, and entries near zero carry an absolute error of
    #: the size of the largest products (about 1e-5 for unit-scale inputs).
    "f32_matmul": dict(rtol=2e-5, atol=1e-5),
    #: The same in float64, as an error relative to the largest entry of the reference
    #: (callers scale ``atol`` by it): a few ulp of the largest products summed into an entry.
    "f64_matmul": dict(rtol=0.0, atol=1e-12),
    #: (1 - p)^gamma for a gamma that is not a multiple of 1/2 is exp(gamma log(1 - p)) in
    #: float32 (Triton): its relative error grows with |gamma log(1 - p)|.
    "f32_pow": dict(rtol=5e-5, atol=2e-6),
    #: Two float64 evaluations of one quantity along different formulas (conversions between
    #: one- and two-logit heads, CE on two logits vs BCE on their difference): a few thousand
    #: ulp at most, relative even for tiny probabilities.
    "f64_same_math": dict(rtol=1e-12, atol=1e-300),
    #: Second derivatives: torch's BCE double backward is its own hand-written formula, which
    #: agrees with the derivative of its (and our) first derivative to ~1e-11 relative only.
    "second_order": dict(rtol=1e-8, atol=1e-10),
    #: torch.autograd.gradcheck / gradgradcheck in float64: central differences with step
    #: eps = 1e-6 have a truncation error ~eps^2 and a rounding error ~1e-16 / eps = 1e-10
    #: relative; second differences of a first derivative lose one more factor.
    "gradcheck": dict(eps=1e-6, atol=1e-7, rtol=1e-5),
    "gradgradcheck": dict(eps=1e-6, atol=1e-6, rtol=1e-4),
}

#: ulp bounds for the extreme-value tests against mpmath (values and gradients).
ULP = {
    "bce_with_logits": 4,  # a sum of two non-negative softplus terms
    "bce": 4,  # log / log1p of a representable probability
    "ce": 8,  # log1p of a sum over C terms (pairwise summation error ~ log2 C ulp)
    "ce_large_c": 32,  # C = 50 000: the sum over classes dominates
    # (1 - p_t)^gamma times the base loss: pow amplifies the few-ulp error of 1 - p_t by
    # gamma (<= 5 here), plus the base loss's and the product's roundings
    "focal": 16,
    # the reference backend's gradient is autograd through that composition (pow, sigmoid,
    # softplus, logaddexp): each backward step rounds once more
    "focal_reference_grad": 32,
    # crossent.distributed vs one process, in ulp of each tensor's largest entry: the sums
    # over the vocabulary run per shard, then over the ranks (another order, a few ulp)
    "vocab_parallel": 8,
}

#: The backends that run on CPU tensors; every drop-in and exactness test runs on each.
CPU_BACKENDS = ("reference", "chunked", "chunked-torch")
#: Plus Triton, through its interpreter on CPU (slow: only tests marked with all of them).
ALL_BACKENDS = CPU_BACKENDS + ("triton",)

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the reference runs: fp16/bf16 are compared to torch run in float32 and cast
    (crossent computes in float32 inside)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    msg: str = "",
    *,
    tol: Optional[str] = None,
    **override,
) -> None:
    """Compare with the table's tolerance: the named entry ``tol``, else the row of ``dtype``
    (default: ``expected``'s dtype); NaN equals NaN, shapes must match exactly."""
    key: Union[torch.dtype, str] = tol if tol is not None else (dtype or expected.dtype)
    tol_ = dict(TOL[key])
    tol_.update(override)
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, msg=lambda m: f"{msg}\n{m}", **tol_)


# --------------------------------------------------------------------------- generators
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")

SHAPES_BINARY = [(5, 3), (5, 3, 1), (5, 3, 1, 2), (3,), (), (0, 3)]
SHAPES_MULTICLASS = [(5, 4), (5, 4, 1), (5, 4, 1, 2), (4,), (0, 4), (0, 4, 2)]


def make_view(values: torch.Tensor, layout: str, requires_grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(leaf, view)``: ``view`` holds exactly ``values`` in the given memory layout
    and is computed from ``leaf`` (gradients are compared on the leaf).

    * contiguous: the leaf itself;
    * transposed: a ``.mT``/``.t()`` of a contiguous tensor of the transposed shape;
    * sliced: every other element along the first dimension of a twice-as-large tensor;
    * expanded: stride 0 along the first dimension (all rows equal, the leaf holds one row).
    """
    v = values.detach()
    if layout == "contiguous" or v.dim() == 0:
        leaf = v.clone().requires_grad_(requires_grad)
        return leaf, leaf
    if layout == "transposed":
        if v.dim() == 1:  # a column of a (C, 2) tensor: stride 2
            leaf = torch.stack([v, torch.zeros_like(v)], dim=1).requires_grad_(requires_grad)
            return leaf, leaf[:, 0]
        leaf = v.transpose(0, -1).contiguous().requires_grad_(requires_grad)
        return leaf, leaf.transpose(0, -1)
    if layout == "sliced":
        filler = torch.full_like(v, float("nan")) if v.is_floating_point() else torch.zeros_like(v)
        big = torch.stack([v, filler], dim=1)  # (N, 2, ...): the rows in between are unused
        big = (
            big.reshape((v.shape[0] * 2,) + tuple(v.shape[1:]))
            if v.shape[0]
            else big.reshape((0,) + tuple(v.shape[1:]))
        )
        leaf = big.clone().requires_grad_(requires_grad)
        return leaf, leaf[::2]
    if layout == "expanded":
        row = v[:1] if v.shape[0] else v
        leaf = row.clone().requires_grad_(requires_grad)
        return leaf, leaf.expand(v.shape) if v.shape[0] else leaf
    raise ValueError(layout)


def expand_values(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The values a view of ``layout`` will hold (expanded views repeat the first row)."""
    if layout == "expanded" and values.dim() > 0 and values.shape[0]:
        return values[:1].expand(values.shape).clone()
    return values


def probabilities(
    shape: Sequence[int], generator: torch.Generator, dtype=torch.float64, lo: float = 0.02, hi: float = 0.98
) -> torch.Tensor:
    """BCE inputs inside (0, 1), away from the clamp."""
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def logits(shape: Sequence[int], generator: torch.Generator, dtype=torch.float64, scale: float = 3.0):
    return scale * torch.randn(shape, generator=generator, dtype=dtype)


def soft_targets(shape: Sequence[int], generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Soft BCE targets in [0, 1] with some exact 0s and 1s."""
    t = torch.rand(shape, generator=generator, dtype=dtype)
    hard = torch.rand(shape, generator=generator, dtype=dtype)
    t = torch.where(hard < 0.25, torch.zeros_like(t), t)
    return torch.where(hard > 0.75, torch.ones_like(t), t)


def class_probabilities(
    shape: Sequence[int], class_dim: int, generator: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """Rows summing to 1 along ``class_dim``, some entries exactly 0.

    Entries are multiples of 1/64, so every row sums to exactly 1 in every dtype down to
    bfloat16 (a softmax rounded to bfloat16 may sum to 1 +- 4e-3, which the value checks
    may rightly or wrongly flag; that is a validation question, not a parity one)."""
    q = torch.softmax(2 * torch.randn(shape, generator=generator, dtype=dtype), dim=class_dim)
    q = torch.round(q * 64) / 64
    top = q.argmax(dim=class_dim, keepdim=True)
    rest = q.sum(dim=class_dim, keepdim=True) - q.gather(class_dim, top)
    return q.scatter(class_dim, top, 1 - rest)


def class_indices(
    shape: Sequence[int], C: int, generator: torch.Generator, ignore_index: Optional[int] = None
) -> torch.Tensor:
    y = torch.randint(0, C, tuple(shape), generator=generator)
    if ignore_index is not None and y.numel():
        drop = torch.rand(tuple(shape), generator=generator) < 0.3
        y = torch.where(drop, torch.full_like(y, ignore_index), y)
        y.view(-1)[0] = ignore_index  # at least one ignored element
    return y


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def torch_quiet(fn, *args, **kwargs):
    """Call a torch reference, silencing torch's own deprecation chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- training steps
# The captured-code tests run ``loss = crossent_loss(model(x), target)`` on a small linear
# model: logits (STEP_N, STEP_C) from STEP_H features, one ignored target (row 1).
STEP_N, STEP_H, STEP_C = 12, 6, 5
STEP_PW = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
STEP_W = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])


def step_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(STEP_H, STEP_C)


def step_data(n: int = STEP_N, seed: int = 1):
    """``(x, y, soft)``: features (n, H), class indices (n,) with y[1] ignored (-100),
    and unnormalised soft scores (n, C) in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, STEP_H, generator=g)
    y = torch.randint(0, STEP_C, (n,), generator=g)
    y[1] = -100
    soft = torch.rand(n, STEP_C, generator=g)
    return x, y, soft


def run_step(step, model, x, y, s):
    """One training step ``step(model(x), y, s).backward()``: the loss and the model's gradients."""
    model.zero_grad()
    loss = step(model(x), y, s)
    loss.backward()
    return loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()


def check_compiled_step(step):
    """The captured-code contract for a loss ``step(logits, y, soft)``: a training step is
    one graph with no break (``torch._dynamo.explain``), and compiled with fullgraph=True
    it gives eager's loss and gradients. Returns the compiled step's
    ``(loss, grad_W, grad_b)`` and the data, for comparisons with torch."""
    model = step_model()
    x, y, s = step_data()

    def train_step(x, y, s):
        return step(model(x), y, s)

    explained = torch._dynamo.explain(train_step)(x, y, s)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(lambda z, y, s: step(z, y, s), fullgraph=True, backend="aot_eager")
    got = run_step(compiled, model, x, y, s)
    want = run_step(step, model, x, y, s)
    for a, b in zip(got, want):
        assert_close(a, b)
    return got, (model, x, y, s)
