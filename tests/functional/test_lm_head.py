"""LM-head options and per-token outputs (docs/lm-head.md): parity with float64 compositions
written here from the formulas, gradcheck, mpmath at the extremes, guardrails."""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch
import torch.nn.functional as TF

import crossent
from crossent.backends import BackendUnavailableError

from _helpers import TOL, assert_close

mpmath.mp.dps = 60
C = 7
BACKENDS = ("chunked", "chunked-torch", "reference")


# ----------------------------------------------------------------------- references
def ref_z(x, T=1.0, s=None):
    """Transformed logits, float64: soft cap first, then temperature."""
    x = x.double()
    if s is not None:
        x = s * torch.tanh(x / s)
    return x / T


def ref_ce(x, y, *, weight=None, eps=0.0, ignore_index=-100, z_loss=0.0, T=1.0, s=None, tw=None, reduction="mean"):
    """The LM-head loss from its definition, x (M, C) rows, float64: returns (loss, lse, hits, den)."""
    z = ref_z(x, T, s)
    logp = torch.log_softmax(z, -1)
    lse = torch.logsumexp(z, -1)
    keep = y != ignore_index
    ys = torch.where(keep, y, 0)
    w = torch.ones(z.shape[-1], dtype=torch.float64) if weight is None else weight.double()
    wy = w[ys] * keep
    nll = -logp.gather(-1, ys[:, None])[:, 0]
    smooth = -(logp * w).sum(-1) * (eps / z.shape[-1]) * keep
    per = (1 - eps) * wy * nll + smooth + z_loss * wy * lse**2
    den = wy
    if tw is not None:
        per, den = per * tw.double().reshape(-1), den * tw.double().reshape(-1)
    hits = ((z.argmax(-1) == ys) & keep).sum()
    out = {"none": per, "sum": per.sum(), "mean": per.sum() / den.sum()}[reduction]
    return out, torch.where(keep, lse, 0.0), hits, den.sum()


def ref_logprobs(x, y, *, T=1.0, s=None, ignore_index=-100):
    z = ref_z(x, T, s)
    logp = torch.log_softmax(z, -1)
    keep = y != ignore_index
    ys = torch.where(keep, y, 0)
    lp = torch.where(keep, logp.gather(-1, ys[..., None])[..., 0], 0.0)
    ent = torch.where(keep, -(logp.exp() * logp).sum(-1), 0.0)
    return lp, ent


def _data(M=9, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, C, (M,), generator=g)
    y[2] = -100
    tw = torch.rand(M, generator=g, dtype=torch.float64).to(dtype if dtype.is_floating_point else torch.float32)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, y, tw, w


OPTIONS = [
    dict(z_loss=1e-2),
    dict(softcap=2.5),
    dict(temperature=0.7),
    dict(softcap=4.0, temperature=1.3, z_loss=1e-3),
    dict(token_weight=True),
    dict(softcap=3.0, temperature=0.9, z_loss=1e-2, token_weight=True),
]


def _kw(opts, tw):
    kw = dict(opts)
    if kw.pop("token_weight", False):
        kw["token_weight"] = tw
    return kw


def _refkw(opts, tw):
    return dict(
        z_loss=opts.get("z_loss", 0.0),
        T=opts.get("temperature", 1.0),
        s=opts.get("softcap"),
        tw=tw if opts.get("token_weight") else None,
    )


# ----------------------------------------------------------------------- cross_entropy on logits
@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_cross_entropy_options_match_the_formulas(backend, opts, reduction, weighted, eps):
    x, y, tw, w = _data(dtype=torch.float64)
    weight = w if weighted else None
    got, lse, hits = crossent.cross_entropy(
        x,
        y,
        weight,
        reduction=reduction,
        label_smoothing=eps,
        backend=backend,
        return_lse=True,
        return_accuracy=True,
        **_kw(opts, tw),
    )
    want, want_lse, want_hits, _ = ref_ce(x, y, weight=weight, eps=eps, reduction=reduction, **_refkw(opts, tw))
    assert_close(got, want)
    assert_close(lse, want_lse)
    assert hits.item() == want_hits.item() and hits.dtype == torch.int64


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_cross_entropy_options_low_precision(dtype):
    x, y, tw, _ = _data(dtype=dtype)
    opts = dict(softcap=3.0, temperature=0.9, z_loss=1e-2, token_weight=True)
    got = crossent.cross_entropy(x, y, **_kw(opts, tw))
    want, _, _, _ = ref_ce(x.float(), y, **_refkw(opts, tw.float()))  # computed in float32 inside
    assert got.dtype == dtype
    assert_close(got, want.to(dtype), dtype=dtype)
    xg = x.float().double().requires_grad_()
    ref_ce(xg, y, **_refkw(opts, tw.float()))[0].backward()
    xi = x.clone().requires_grad_()
    crossent.cross_entropy(xi, y, **_kw(opts, tw)).backward()
    assert_close(xi.grad, xg.grad.to(dtype), dtype=dtype)


def test_cross_entropy_kdim_with_token_weight_and_parts():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (3, 4), generator=g)
    y[1, 2] = -100
    tw = torch.rand(3, 4, generator=g, dtype=torch.float64)
    parts, lse = crossent.cross_entropy(
        x, y, softcap=2.0, z_loss=0.1, token_weight=tw, return_parts=True, return_lse=True
    )
    rows = x.movedim(1, -1).reshape(-1, C)
    want, want_lse, _, den = ref_ce(rows, y.reshape(-1), s=2.0, z_loss=0.1, tw=tw)
    assert_close(parts.loss, want)
    assert_close(parts.total / parts.denominator, want)
    assert_close(parts.denominator, den)
    assert_close(lse, want_lse.reshape(3, 4))
    none = crossent.cross_entropy(x, y, softcap=2.0, z_loss=0.1, token_weight=tw, reduction="none")
    assert none.shape == (3, 4)


def test_defaults_of_the_options_equal_the_plain_loss():
    """temperature=1, token weights 1, z_loss=0: the LM-head path gives the plain loss."""
    x, y, _, w = _data(dtype=torch.float64)
    plain = TF.cross_entropy(x, y, w, label_smoothing=0.1)
    got = crossent.cross_entropy(x, y, w, label_smoothing=0.1, token_weight=torch.ones(y.shape, dtype=torch.float64))
    assert_close(got, plain)


def test_mean_divides_by_the_sum_of_effective_weights():
    x, y, tw, w = _data(dtype=torch.float64)
    total = crossent.cross_entropy(x, y, w, token_weight=tw, reduction="sum")
    mean = crossent.cross_entropy(x, y, w, token_weight=tw)
    keep = y != -100
    den = (w[torch.where(keep, y, 0)] * tw * keep).sum()
    assert_close(mean, total / den)


def test_ignored_nan_rows_give_zero_gradient_and_finite_loss():
    x, y, tw, _ = _data(dtype=torch.float64)
    x[2] = float("nan")  # row 2 is ignored
    for backend in BACKENDS:
        xi = x.clone().requires_grad_()
        loss = crossent.cross_entropy(xi, y, softcap=3.0, z_loss=1e-2, token_weight=tw, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xi.grad).all()
        assert (xi.grad[2] == 0).all()


# ----------------------------------------------------------------------- token_logprobs
@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("T,s", [(1.0, None), (0.6, None), (1.0, 2.0), (1.4, 5.0)])
def test_token_logprobs_and_entropy_match_log_softmax(backend, T, s):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (2, 5), generator=g)
    y[0, 3] = -100
    lp, ent = crossent.token_logprobs(
        x, y, temperature=T, softcap=s, return_entropy=True, backend=backend, chunk_size=3
    )
    want_lp, want_ent = ref_logprobs(x, y, T=T, s=s)
    assert lp.shape == ent.shape == (2, 5)
    assert_close(lp, want_lp)
    assert_close(ent, want_ent)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_token_logprobs_low_precision_are_float32(dtype):
    x, y, _, _ = _data(dtype=dtype)
    lp, ent = crossent.token_logprobs(x, y, return_entropy=True, softcap=3.0)
    want_lp, want_ent = ref_logprobs(x.float(), y, s=3.0)
    assert lp.dtype == ent.dtype == torch.float32
    assert_close(lp, want_lp.float())
    assert_close(ent, want_ent.float())


@pytest.mark.backends(*BACKENDS)
def test_gradcheck_token_logprobs_through_both_outputs(backend):
    x, y, _, _ = _data(M=5, dtype=torch.float64)
    x.requires_grad_()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)

    def f(x):
        lp, ent = crossent.token_logprobs(
            x, y, temperature=0.8, softcap=2.5, return_entropy=True, backend=backend, chunk_size=2
        )
        return (lp * a).sum() + (ent * b).sum()

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)))
def test_gradcheck_cross_entropy_options(opts):
    x, y, tw, w = _data(M=5, dtype=torch.float64)
    x.requires_grad_()
    kw = _kw(opts, tw[:5])
    assert torch.autograd.gradcheck(lambda x: crossent.cross_entropy(x, y, w, label_smoothing=0.1, **kw), (x,))


# ----------------------------------------------------------------------- linear versions
def _linear_data(N=10, H=4, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(C, H, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[3] = -100
    return h, W, b, y


@pytest.mark.backends(*BACKENDS)
@pytest.mark.parametrize("chunk", (None, 3))
@pytest.mark.parametrize("T,s", [(1.0, None), (0.7, 3.0)])
def test_linear_token_logprobs_match_the_unfused_composition(backend, chunk, T, s):
    h, W, b, y = _linear_data()
    params = [t.clone().requires_grad_() for t in (h, W, b)]
    lp, ent = crossent.linear_token_logprobs(
        *params[:2], y, bias=params[2], temperature=T, softcap=s, return_entropy=True, backend=backend, chunk_size=chunk
    )
    ref = [t.clone().requires_grad_() for t in (h, W, b)]
    want_lp, want_ent = ref_logprobs(TF.linear(*ref), y, T=T, s=s)
    assert_close(lp, want_lp)
    assert_close(ent, want_ent)
    g = torch.Generator().manual_seed(7)
    a, c = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    ((lp * a).sum() + (ent * c).sum()).backward()
    ((want_lp * a).sum() + (want_ent * c).sum()).backward()
    for p, r in zip(params, ref):
        assert_close(p.grad, r.grad)


def test_gradcheck_linear_token_logprobs():
    h, W, b, y = _linear_data(N=5, H=3)
    params = tuple(t.requires_grad_() for t in (h, W, b))

    def f(h, W, b):
        lp, ent = crossent.linear_token_logprobs(
            h, W, y, bias=b, temperature=1.2, softcap=2.0, return_entropy=True, chunk_size=2
        )
        return lp * 1.5 - ent

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_linear_cross_entropy_options_match_the_formulas(opts, reduction):
    h, W, b, y = _linear_data()
    tw = torch.rand(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (h, W, b)]
    got, lse, hits = crossent.linear_cross_entropy(
        params[0],
        params[1],
        y,
        linear_bias=params[2],
        reduction=reduction,
        label_smoothing=0.05,
        chunk_size=4,
        return_lse=True,
        return_accuracy=True,
        **_kw(opts, tw),
    )
    ref = [t.clone().requires_grad_() for t in (h, W, b)]
    want, want_lse, want_hits, _ = ref_ce(TF.linear(*ref), y, eps=0.05, reduction=reduction, **_refkw(opts, tw))
    assert_close(got, want)
    assert_close(lse, want_lse)
    assert hits.item() == want_hits.item()
    got.sum().backward()
    want.sum().backward()
    for p, r in zip(params, ref):
        assert_close(p.grad, r.grad)


def test_gradcheck_linear_cross_entropy_options():
    h, W, b, y = _linear_data(N=5, H=3)
    tw = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = tuple(t.requires_grad_() for t in (h, W, b))
    assert torch.autograd.gradcheck(
        lambda h, W, b: crossent.linear_cross_entropy(
            h,
            W,
            y,
            linear_bias=b,
            softcap=3.0,
            temperature=0.8,
            z_loss=1e-2,
            token_weight=tw,
            label_smoothing=0.1,
            chunk_size=2,
        ),
        params,
    )


def test_linear_bf16_matches_float32_composition():
    h, W, b, y = _linear_data(N=12, H=8, dtype=torch.bfloat16)
    lp, ent = crossent.linear_token_logprobs(h, W, y, bias=b, return_entropy=True, chunk_size=5)
    want_lp, want_ent = ref_logprobs(TF.linear(h.float(), W.float(), b.float()), y)
    assert_close(lp, want_lp.float())
    assert_close(ent, want_ent.float())


# ----------------------------------------------------------------------- float32 (the compiled kernel)
# float32 is what the ``chunked`` backend runs in its compiled C kernel (float64 takes the
# torch-ops blocks). 37 classes: four full 8-lane vectors and a 5-class tail.
def _data_f32(M=11, C=37, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, C, generator=g, dtype=torch.float64) * 3).float()
    y = torch.randint(0, C, (M,), generator=g)
    y[4] = -100
    tw = torch.rand(M, generator=g, dtype=torch.float64).float()
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float()
    up = torch.randn(M, generator=g, dtype=torch.float64)
    return x, y, tw, w, up


@pytest.mark.backends("chunked", "chunked-torch")
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.1)])
def test_float32_options_match_the_formulas(backend, opts, reduction, weighted, eps):
    x, y, tw, w, up = _data_f32()
    weight = w if weighted else None
    xi = x.clone().requires_grad_()
    got, lse, hits = crossent.cross_entropy(
        xi,
        y,
        weight,
        reduction=reduction,
        label_smoothing=eps,
        return_lse=True,
        return_accuracy=True,
        **_kw(opts, tw),
    )
    xr = x.double().requires_grad_()
    want, want_lse, want_hits, _ = ref_ce(xr, y, weight=weight, eps=eps, reduction=reduction, **_refkw(opts, tw))
    assert got.dtype == torch.float32
    assert_close(got, want.float())
    assert_close(lse, want_lse.float())
    assert hits.item() == want_hits.item()
    upstream = up.float() if reduction == "none" else torch.tensor(1.5)
    (got * upstream).sum().backward()
    (want * upstream.double()).sum().backward()
    assert_close(xi.grad, xr.grad.float())


@pytest.mark.backends("chunked", "chunked-torch")
@pytest.mark.parametrize("T,s", [(1.0, None), (0.6, None), (1.0, 2.0), (1.4, 30.0)])
def test_float32_token_logprobs_entropy_and_gradients(backend, T, s):
    x, y, _, _, up = _data_f32()
    xi = x.clone().requires_grad_()
    lp, ent = crossent.token_logprobs(xi, y, temperature=T, softcap=s, return_entropy=True, chunk_size=4)
    xr = x.double().requires_grad_()
    want_lp, want_ent = ref_logprobs(xr, y, T=T, s=s)
    assert_close(lp, want_lp.float())
    assert_close(ent, want_ent.float())
    b = up.flip(0)
    ((lp * up.float()).sum() + (ent * b.float()).sum()).backward()
    ((want_lp * up).sum() + (want_ent * b).sum()).backward()
    assert_close(xi.grad, xr.grad.float())


@pytest.mark.backends("chunked", "chunked-torch")
@pytest.mark.parametrize("fn", ("linear_token_logprobs", "linear_cross_entropy"))
def test_float32_linear_versions_match_the_unfused_composition(backend, fn):
    x, y, tw, _, up = _data_f32(M=13)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(13, 6, generator=g).float()
    W = (torch.randn(37, 6, generator=g) * 0.7).float()
    bias = torch.randn(37, generator=g).float()
    params = [t.clone().requires_grad_() for t in (h, W, bias)]
    ref = [t.double().requires_grad_() for t in (h, W, bias)]
    if fn == "linear_token_logprobs":
        lp, ent = crossent.linear_token_logprobs(
            *params[:2], y, bias=params[2], temperature=0.8, softcap=4.0, return_entropy=True, chunk_size=5
        )
        want_lp, want_ent = ref_logprobs(TF.linear(*ref), y, T=0.8, s=4.0)
        got, want = (lp * up.float()).sum() + ent.sum(), (want_lp * up).sum() + want_ent.sum()
    else:
        got = crossent.linear_cross_entropy(
            *params[:2],
            y,
            linear_bias=params[2],
            z_loss=1e-2,
            softcap=4.0,
            temperature=0.8,
            token_weight=tw,
            label_smoothing=0.05,
            chunk_size=5,
        )
        want = ref_ce(TF.linear(*ref), y, eps=0.05, z_loss=1e-2, T=0.8, s=4.0, tw=tw)[0]
    assert_close(got, want.float())
    got.backward()
    want.backward()
    for p, r in zip(params, ref):
        assert_close(p.grad, r.grad.float())


def test_kernel_softcap_transform_and_derivative_against_float64():
    """The compiled kernel's z = s tanh(x / s) / T and dz/dx = sech^2(x / s) / T, read from
    one-class rows (m = z; the gradient of lse is dz/dx), against float64, on a log-spaced
    grid of |x / s| from 1e-6 to 60 (both signs, across the polynomial / exp switch at
    0.625) and at +-inf: z within 3 ulp, dz/dx within (8 + 2 |x / s|) ulp wherever it is a
    normal float (the rounding of x / s to float32 alone moves sech^2 by 2 |x / s| ulp: the
    function's condition number, which any float32 evaluation pays)."""
    from crossent.backends import chunked_cpp

    K = chunked_cpp.get()
    if K is None:
        pytest.skip(f"compiled CPU kernel unavailable: {chunked_cpp.disabled_reason()}")
    s, T = 3.0, 0.7
    a = torch.logspace(-6, math.log10(60), 4001, dtype=torch.float64)
    a = torch.cat([a, torch.tensor([0.625, 0.62499, 0.62501])])
    x = torch.cat([a, -a]).mul(s).float()
    x = torch.cat([x, torch.tensor([0.0, math.inf, -math.inf])])[:, None].contiguous()
    y = torch.zeros(x.shape[0], dtype=torch.long)
    out, _ = K.lm_stats(x.clone(), y, None, T, s)  # x is scratch there: it gets z
    xd = x[:, 0].double()
    z_true = s * torch.tanh(xd / s) / T
    d_true = 1 / torch.cosh(xd / s) ** 2 / T
    ulp = 2.0**-23
    z_err = ((out[0].double() - z_true).abs() / z_true.abs().clamp_min(1e-300)).where(
        z_true != 0, out[0].double().abs()
    )
    assert z_err.max() <= 3 * ulp
    g = torch.zeros(4, x.shape[0])
    g[2] = 1.0  # the upstream of lse
    dz = K.lm_grad(x, y, None, T, s, out[:4].contiguous(), g, torch.empty_like(x))[:, 0].double()
    normal = d_true >= torch.finfo(torch.float32).tiny
    bound = (8 + 2 * (xd / s).abs()) * ulp
    assert (((dz - d_true).abs() / d_true)[normal] <= bound[normal]).all()
    # subnormal: w = exp(-2 |x / s|) is a multiple of 1.4e-45 there, scaled by 4 / T
    slack = torch.where(d_true > 0, bound * d_true, 0.0) + 2 * 1.4e-45 * 4 / T  # (at +-inf: 0)
    assert ((dz - d_true).abs() <= slack)[~normal].all()


@pytest.mark.parametrize("fn", ("token_logprobs", "cross_entropy"))
def test_float32_softcap_gradient_far_out_keeps_relative_precision(fn):
    """In float32 (the compiled kernel): d/dx of 2 tanh(x / 2) at x / 2 = 40 is sech^2(40) ~ 7e-35,
    a normal float32 that 1 - tanh^2 would round to 0."""
    x = torch.tensor([[80.0, 0.0, -3.0]], requires_grad=True)
    if fn == "token_logprobs":
        crossent.token_logprobs(x, torch.tensor([1]), softcap=2.0).sum().backward()
        sign = -1.0
    else:
        crossent.cross_entropy(x, torch.tensor([1]), softcap=2.0).backward()
        sign = 1.0
    p0 = _mp_row([2 * math.tanh(v / 2) for v in (80.0, 0.0, -3.0)])[1][0]
    truth = sign * p0 / mpmath.cosh(40) ** 2
    assert 1e-36 < abs(float(truth)) < 1e-33
    assert _rel(x.grad[0, 0], truth) < 16 * 2.0**-23


# ----------------------------------------------------------------------- extremes (mpmath)
def _mp_row(row, T=1.0):
    """(lse, p, entropy) at 60 digits, each from -log p_j = (m - z_j) + log1p(S') (exact
    however large the margin: lse itself would need hundreds of digits to resolve S')."""
    z = [mpmath.mpf(float(v)) / T for v in row]
    k = max(range(len(z)), key=lambda j: z[j])
    m = z[k]
    lp1 = mpmath.log1p(sum(mpmath.exp(v - m) for j, v in enumerate(z) if j != k))
    nlp = [(m - v) + lp1 for v in z]
    p = [mpmath.exp(-v) for v in nlp]
    return m + lp1, p, sum(pi * v for pi, v in zip(p, nlp))


def _one_minus_p(row, j):
    _, p, _ = _mp_row(row)
    return sum(pi for i, pi in enumerate(p) if i != j)


def _rel(got, truth):
    truth = float(truth)
    return abs(float(torch.as_tensor(got).detach()) - truth) / abs(truth)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("margin", (1.0, 30.0, 1e2, 1e3, 1e4))
def test_z_loss_and_lse_at_margins_mpmath(dtype, margin):
    x = torch.tensor([[margin, 0.0, -1.0, 0.5]], dtype=dtype)
    y = torch.tensor([1])
    loss, lse = crossent.cross_entropy(x, y, z_loss=1e-4, return_lse=True)
    t_lse, p, _ = _mp_row(x[0].tolist())
    t_loss = -mpmath.log(p[1]) + mpmath.mpf("1e-4") * t_lse**2
    eps = torch.finfo(dtype).eps
    assert _rel(lse[0], t_lse) <= 4 * eps
    assert _rel(loss, t_loss) <= 8 * eps


@pytest.mark.parametrize("dtype,m", [(torch.float64, 70.0), (torch.float32, 60.0), (torch.float64, 600.0)])
def test_entropy_of_near_one_hot_rows_keeps_relative_precision(dtype, m):
    x = torch.tensor([[m, 0.0, 0.0, -2.0]], dtype=dtype)
    _, ent = crossent.token_logprobs(x, torch.tensor([0]), return_entropy=True)
    _, _, t_ent = _mp_row(x[0].tolist())
    assert 0 < float(t_ent) < 1e-20
    assert _rel(ent[0], t_ent) <= 16 * torch.finfo(dtype).eps
    # the unfused torch composition loses it (p * log p, with log p_max rounded to 0)
    lp = torch.log_softmax(x, -1)
    torch_ent = -(lp.exp() * lp).sum(-1)
    assert _rel(torch_ent[0], t_ent) > 1e-3


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("margin", (20.0, 40.0))
def test_log_probs_and_gradient_of_confident_tokens_mpmath(dtype, margin):
    x = torch.tensor([[margin, 0.0, 0.0]], dtype=dtype, requires_grad=True)
    lp = crossent.token_logprobs(x, torch.tensor([0]))
    lp.sum().backward()
    _, p, _ = _mp_row([margin, 0.0, 0.0])
    eps = torch.finfo(dtype).eps
    assert _rel(lp[0], mpmath.log(p[0])) <= 4 * eps
    assert _rel(x.grad[0, 0], _one_minus_p([margin, 0.0, 0.0], 0)) <= 8 * eps  # d log p_y / d x_y = 1 - p_y, tiny
    assert _rel(x.grad[0, 1], -p[1]) <= 8 * eps


@pytest.mark.parametrize("fn", ("token_logprobs", "cross_entropy"))
def test_softcap_gradient_far_out_keeps_relative_precision(fn):
    """d/dx of softcap * tanh(x / softcap) at x / softcap = 200 is sech^2(200) ~ 1e-173:
    evaluated as 1 / cosh^2 (1 - tanh^2 would give 0)."""
    x = torch.tensor([[400.0, 0.0, -3.0]], dtype=torch.float64, requires_grad=True)
    if fn == "token_logprobs":
        crossent.token_logprobs(x, torch.tensor([1]), softcap=2.0).sum().backward()
        sign = -1.0  # d log p_1 / d z_0 = -p_0
    else:
        crossent.cross_entropy(x, torch.tensor([1]), softcap=2.0).backward()
        sign = 1.0  # d(-log p_1) / d z_0 = p_0
    p0 = _mp_row([2 * math.tanh(v / 2) for v in (400.0, 0.0, -3.0)])[1][0]
    truth = sign * p0 / mpmath.cosh(200) ** 2
    assert 0 < abs(float(truth)) < 1e-170
    assert _rel(x.grad[0, 0], truth) < 1e-13


# ----------------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", range(4))
def test_entropy_between_zero_and_log_c_and_temperature_is_a_rescaling(seed):
    x, y, _, _ = _data(M=20, seed=seed, dtype=torch.float64, scale=10.0)
    lp, ent = crossent.token_logprobs(x, y, temperature=2.5, return_entropy=True)
    lp2, ent2 = crossent.token_logprobs(x / 2.5, y, return_entropy=True)
    assert_close(lp, lp2)
    assert_close(ent, ent2)
    assert (ent >= 0).all() and (ent <= math.log(C) + 1e-12).all()


# ----------------------------------------------------------------------- guardrails
@pytest.mark.parametrize(
    "kw,cls,match",
    [
        (dict(z_loss=-1.0), crossent.CrossentValueError, r"`z_loss` to be a finite number >= 0, but got -1.0"),
        (dict(temperature=0.0), crossent.CrossentValueError, r"`temperature` to be a finite number > 0, but got 0.0"),
        (dict(softcap=-2.0), crossent.CrossentValueError, r"`softcap` to be None or a finite number > 0, but got -2.0"),
        (dict(softcap="30"), crossent.CrossentTypeError, r"`softcap` to be None or a finite number > 0, but got str"),
        (
            dict(token_weight=torch.ones(3)),
            crossent.CrossentValueError,
            r"`token_weight` of the target's shape \(9,\), but got shape \(3,\)",
        ),
        (dict(token_weight=torch.ones(9, dtype=torch.long)), crossent.CrossentTypeError, r"floating-point tensor"),
        (dict(token_weight=-torch.ones(9)), crossent.CrossentValueError, r"finite `token_weight` >= 0, but got -1.0"),
    ],
)
def test_cross_entropy_option_guardrails(kw, cls, match):
    x, y, _, _ = _data()
    with pytest.raises(cls, match=match):
        crossent.cross_entropy(x, y, **kw)


def test_options_need_class_index_targets():
    x, _, _, _ = _data()
    with pytest.raises(crossent.CrossentValueError, match="class-index targets with the LM-head options"):
        crossent.cross_entropy(x, x.softmax(-1), z_loss=1e-4)


def test_backends_without_the_options_raise_when_named():
    x, y, _, _ = _data()
    with pytest.raises(BackendUnavailableError, match=r"does not implement 'lm_head'.*'chunked', 'chunked-torch'"):
        crossent.cross_entropy(x, y, softcap=3.0, backend="triton")


def test_linear_options_refuse_kdim_and_probabilities():
    h, W, b, y = _linear_data()
    with pytest.raises(crossent.CrossentValueError, match="K-dimensional loss"):
        crossent.linear_cross_entropy(h, W.reshape(C, 1, 4), y[:, None], z_loss=1e-4)
    with pytest.raises(crossent.CrossentValueError, match="class-probability targets"):
        crossent.linear_cross_entropy(h, W, torch.rand(10, C, dtype=torch.float64).softmax(-1), softcap=2.0)


@pytest.mark.parametrize("fn", ("token_logprobs", "linear_token_logprobs"))
def test_token_logprobs_guardrails(fn):
    h, W, b, y = _linear_data()
    call = (
        (lambda t, **k: crossent.token_logprobs(h @ W.T, t, **k))
        if fn == "token_logprobs"
        else (lambda t, **k: crossent.linear_token_logprobs(h, W, t, **k))
    )
    with pytest.raises(crossent.CrossentTypeError, match=r"`target` of class indices \(an integer dtype\)"):
        call(y.double())
    with pytest.raises(crossent.CrossentValueError, match=r"`target` of shape \(10,\)"):
        call(y[:4])
    with pytest.raises(crossent.CrossentIndexError, match=r"class indices in \[0, 6\]"):
        call(torch.full((10,), C))
    with pytest.raises(crossent.CrossentValueError, match="`temperature` to be a finite number > 0"):
        call(y, temperature=-1.0)
    with pytest.raises(crossent.CrossentValueError, match="`chunk_size` to be a positive int"):
        call(y, chunk_size=0)


def test_every_option_combination_runs_once():
    """Every subset of the options, one call each, against the formulas (small, float64)."""
    x, y, tw, w = _data(M=6, dtype=torch.float64)
    names = ("z_loss", "softcap", "temperature", "token_weight")
    values = dict(z_loss=1e-2, softcap=2.0, temperature=1.7, token_weight=True)
    for k in range(len(names) + 1):
        for combo in itertools.combinations(names, k):
            opts = {n: values[n] for n in combo}
            got = crossent.cross_entropy(x, y, w, label_smoothing=0.1, **_kw(opts, tw[:6]))
            want = ref_ce(x, y, weight=w, eps=0.1, **_refkw(opts, tw[:6]))[0]
            assert_close(got, want, msg=str(combo))
    assert TOL[torch.float64]["rtol"] <= 1e-10


# ----------------------------------------------------------------------- nn modules
def test_modules_pass_the_options_and_keep_torchs_state_dict():
    x, y, tw, w = _data(dtype=torch.float64)
    mod = crossent.nn.CrossEntropyLoss(w, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, temperature=0.8)
    got, lse, hits = mod(x, y, token_weight=tw, return_lse=True, return_accuracy=True)
    want = crossent.cross_entropy(
        x,
        y,
        w,
        label_smoothing=0.1,
        z_loss=1e-2,
        softcap=3.0,
        temperature=0.8,
        token_weight=tw,
        return_lse=True,
        return_accuracy=True,
    )
    assert_close(got, want[0])
    assert_close(lse, want[1])
    assert hits.item() == want[2].item()
    assert set(mod.state_dict()) == set(torch.nn.CrossEntropyLoss(w).state_dict())
    head = crossent.nn.LinearCrossEntropyLoss(4, C, bias=True, dtype=torch.float64, softcap=2.0, z_loss=1e-3)
    h, _, _, yl = _linear_data()
    got = head(h, yl, token_weight=tw[:1].expand(10).contiguous())
    want = crossent.cross_entropy(head.linear(h), yl, softcap=2.0, z_loss=1e-3, token_weight=tw[:1].expand(10))
    assert_close(got, want)
    with pytest.raises(
        crossent.CrossentValueError, match=r"CrossEntropyLoss: expected `temperature` to be a finite number > 0"
    ):
        crossent.nn.CrossEntropyLoss(temperature=0.0)
    with pytest.raises(
        crossent.CrossentValueError, match=r"LinearCrossEntropyLoss: expected `z_loss` to be a finite number"
    ):
        crossent.nn.LinearCrossEntropyLoss(4, C, z_loss=float("nan"))


# ----------------------------------------------------------------------- buffers and -inf
@pytest.mark.parametrize("s", (None, 3.0))
def test_the_callers_logits_are_left_untouched(s):
    x, y, tw, _ = _data()
    before = x.clone()
    xi = x.requires_grad_()
    lp, ent = crossent.token_logprobs(xi, y, softcap=s, temperature=0.8, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    crossent.cross_entropy(xi, y, z_loss=1e-3, token_weight=tw).backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.backends(*BACKENDS)
def test_masked_vocabulary_minus_inf_logits(backend):
    """-inf logits (a masked vocabulary) have p = 0: finite log-probs, entropy and gradients."""
    x, y, _, _ = _data(dtype=torch.float64)
    x[:, 5:] = -math.inf
    y = torch.where(y >= 5, 1, y)
    xi = x.clone().requires_grad_()
    lp, ent = crossent.token_logprobs(xi, y, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    finite = x[:, :5].clone().requires_grad_()
    want_lp, want_ent = ref_logprobs(finite, y)
    (want_lp.sum() + want_ent.sum()).backward()
    assert_close(lp, want_lp)
    assert_close(ent, want_ent)
    assert_close(xi.grad[:, :5], finite.grad)
    assert (xi.grad[:, 5:] == 0).all()


# ----------------------------------------------------------------------- hypothesis
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(-60, 60), min_size=4, max_size=4), min_size=1, max_size=5),
    T=st.floats(0.2, 5.0),
    s=st.one_of(st.none(), st.floats(0.5, 50.0)),
)
def test_logprobs_normalise_and_entropy_is_bounded(rows, T, s):
    """For every row: sum_y exp(log p_y) = 1, log p_y <= 0, 0 <= H <= log C, and H equals
    -sum_y p_y log p_y built from the returned log-probs."""
    x = torch.tensor(rows, dtype=torch.float64)
    M = x.shape[0]
    lps = torch.stack([crossent.token_logprobs(x, torch.full((M,), j), temperature=T, softcap=s) for j in range(4)], 1)
    _, ent = crossent.token_logprobs(x, torch.zeros(M, dtype=torch.long), temperature=T, softcap=s, return_entropy=True)
    assert (lps <= 0).all()
    assert_close(lps.exp().sum(1), torch.ones(M, dtype=torch.float64))
    assert (ent >= 0).all() and (ent <= math.log(4) + 1e-12).all()
    assert_close(ent, -(lps.exp() * lps).sum(1))


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_loss_with_minus_inf_logits_and_confident_gradient(reduction):
    """The one-pass loss op ('mean') and the two-pass composition ('none') on a masked
    vocabulary (no soft cap: it would map -inf to -softcap); the gradient of a confident
    token keeps its relative precision."""
    x, y, tw, _ = _data(dtype=torch.float64)
    x[:, 5:] = -math.inf
    y = torch.where(y >= 5, 1, y)
    xi = x.clone().requires_grad_()
    crossent.cross_entropy(
        xi, y, z_loss=1e-2, temperature=0.7, token_weight=tw, reduction=reduction, label_smoothing=0.0
    ).sum().backward()
    finite = x[:, :5].clone().requires_grad_()
    ref_ce(finite, y, z_loss=1e-2, T=0.7, tw=tw, reduction=reduction)[0].sum().backward()
    assert_close(xi.grad[:, :5], finite.grad)
    assert (xi.grad[:, 5:] == 0).all()
    z = torch.tensor([[20.0, 0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    crossent.cross_entropy(
        z, torch.tensor([0]), temperature=1.0, reduction=reduction, token_weight=torch.ones(1)
    ).sum().backward()
    truth = _one_minus_p([20.0, 0.0, 0.0], 0)
    assert _rel(-z.grad[0, 0], truth) <= 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("opts", [{"softcap": 30.0}, {"z_loss": 1e-4}, {"temperature": 0.7}])
def test_linear_options_make_one_weight_sized_buffer(opts):
    # forward + backward of the fused linear loss with LM-head options creates exactly one
    # tensor the size of the weight (its gradient): the incoming scale is applied in place,
    # no zeros are materialised for the op's unused gradient outputs
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    N, H, V = 24, 8, 301
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    made = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == W.shape and out._base is None:
                if not any(out is a for a in args if isinstance(a, torch.Tensor)):  # not in place
                    made.append(func)
            return out

    with Allocations():
        crossent.linear_cross_entropy(h, W, y, chunk_size=5, **opts).backward()
    assert len(made) == 1, made
    loss = crossent.linear_cross_entropy(h, W, y, chunk_size=5, **opts)
    first = torch.autograd.grad(loss * 3, (h, W), retain_graph=True)  # the forward's gradients, used up
    again = torch.autograd.grad(loss * 3, (h, W))  # a second backward recomputes them
    for got, want in zip(again, first):
        assert_close(got, want, dtype=torch.float32)
    assert_close(W.grad * 3, first[1], dtype=torch.float32)
    assert_close(h.grad * 3, first[0], dtype=torch.float32)
