"""The arithmetic of crossent.distributed without processes: shard statistics, their
combination and the local gradients, for any split of the vocabulary, against a float64
composition written here from the formulas and against single-process crossent.

The exchange is simulated by stacking the shards' statistics in rank order (what the
``all_gather`` delivers), so every split and every option is cheap to try.
"""

from __future__ import annotations

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent
from crossent.distributed._stats import Layout, combine, local_grad, local_stats, transform_, transform_grad_
from _helpers import ULP

mpmath.mp.dps = 50


def _sharded(x, y, w, eps, bounds, g):
    """Per-row loss and the concatenated local gradients of a simulated run over ``bounds``."""
    keep = y != -100
    layout = Layout(weighted=w is not None, smoothing=bool(eps))
    V = x.shape[1]
    x = torch.where(keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype))
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rel = y - lo
        owned = keep & (rel >= 0) & (rel < hi - lo)
        yl = torch.where(owned, rel, 0)
        wl = None if w is None else w[lo:hi]
        smooth = None
        if eps:
            smooth = torch.full((hi - lo,), eps / V, dtype=x.dtype) if w is None else wl * (eps / V)
        shards.append((x[:, lo:hi], yl, owned, wl, smooth))
    G = torch.stack([local_stats(z, yl, owned, wl, sm, layout) for z, yl, owned, wl, sm in shards])
    grads = []
    for rank, (z, yl, owned, _wl, sm) in enumerate(shards):
        r = combine(G, keep, eps, layout, rank)
        grads.append(local_grad(z, yl, owned, sm, keep, r, g))
    r = combine(G, keep, eps, layout, 0)
    return r.loss, r.den, torch.cat(grads, dim=1)


def _bounds(data, V):
    P = data.draw(st.integers(1, min(V, 5)))
    cuts = (
        sorted(data.draw(st.lists(st.integers(1, V - 1), min_size=P - 1, max_size=P - 1, unique=True))) if V > 1 else []
    )
    return [0] + cuts + [V]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_split_equals_one_process(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    N = data.draw(st.integers(1, 6))
    V = data.draw(st.integers(2, 9))
    seed = data.draw(st.integers(0, 2**31 - 1))
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.7]))
    weighted = data.draw(st.booleans())
    scale = data.draw(st.sampled_from([0.1, 3.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.2).to(dtype) if weighted else None
    up = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    bounds = _bounds(data, V)
    loss, den, grad = _sharded(x, y, w, eps, bounds, up)

    xr = x.clone().requires_grad_()
    ref = crossent.cross_entropy(xr, y, weight=w, label_smoothing=eps, reduction="none", validate=False)
    (ref * up).sum().backward()
    tol = ULP["vocab_parallel"] * torch.finfo(dtype).eps
    assert (loss - ref.detach()).abs().max() <= tol * ref.detach().abs().max().clamp(min=1), bounds
    # the gradient A p_j - a_j subtracts terms up to A = sum_j a_j (both here and in one
    # process): its rounding is relative to g A, which heavy smoothing makes far larger than
    # the result (eps = 0.7 on near-uniform logits: terms ~0.5, difference ~0.01)
    keep = y != -100
    wv = torch.ones(V, dtype=torch.float64) if w is None else w.double()
    A = torch.where(keep, (1 - eps) * wv[y.clamp(min=0)] + eps / V * wv.sum(), 0.0)
    scale = torch.maximum(xr.grad.abs().max().double(), (up.double().abs() * A).max())
    assert (grad - xr.grad).abs().max() <= tol * scale.clamp(min=1e-30), bounds
    want = keep.to(dtype) if w is None else torch.where(keep, w[y.clamp(min=0)], 0)
    assert torch.equal(den, want)


def _mp_loss(row, target, eps, w):
    """-sum_c a_c log p_c in 50 digits (mpmath), from the definition."""
    V = len(row)
    lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row))
    nlp = [lse - mpmath.mpf(v) for v in row]
    return (1 - mpmath.mpf(eps)) * mpmath.mpf(w[target]) * nlp[target] + mpmath.mpf(eps) / V * mpmath.fsum(
        mpmath.mpf(w[c]) * nlp[c] for c in range(V)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [[0, 1, 5], [0, 3, 4, 5], [0, 5]])
def test_extremes_against_mpmath(dtype, bounds):
    """A confident right answer (tiny loss), a far-off max on another shard, huge logits,
    ties across shards: every loss within a few ulp of the 50-digit value."""
    rows = [
        [30.0, 0.0, -1.0, 2.0, 0.5],  # loss ~ 1e-13: the max on shard 0
        [0.0, 0.0, 25.0, 0.0, 0.0],  # target 0 far below a max on another shard
        [1e4, 1e4 - 1, 1e4 - 3, 1e4, 9.9e3],  # huge logits, a tie across shards
        [-50.0, -50.0, -50.0, -50.0, -50.0],
    ]  # all equal: log 5
    y = torch.tensor([0, 0, 3, 1])
    x = torch.tensor(rows, dtype=dtype)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25], dtype=dtype)
    for eps, weight in ((0.0, None), (0.3, w)):
        loss, _, grad = _sharded(x, y, weight, eps, bounds, torch.ones(4, dtype=dtype))
        wl = [1.0] * 5 if weight is None else weight.tolist()
        for i, row in enumerate(x.tolist()):
            exact = _mp_loss(row, int(y[i]), eps, wl)
            err = abs(mpmath.mpf(float(loss[i])) - exact)
            assert err <= ULP["ce"] * torch.finfo(dtype).eps * abs(exact), (i, eps, float(loss[i]), exact)
        assert torch.isfinite(grad).all()
        # the tiny gradient of the confident row's target keeps its relative precision
        p0 = 1 / mpmath.fsum(mpmath.exp(mpmath.mpf(v) - 30) for v in rows[0])
        if eps == 0:
            exact_g = p0 - 1
            assert abs(mpmath.mpf(float(grad[0, 0])) - exact_g) <= ULP["ce"] * torch.finfo(dtype).eps * abs(exact_g)


def test_gradcheck_float64_on_a_split():
    """Finite differences of the simulated sharded loss (every option at once)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([1, -100, 6, 3])
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    up = torch.rand(4, generator=g, dtype=torch.float64)

    class Sharded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            loss, _, grad = _sharded(x, y, w, 0.2, [0, 2, 5, 7], up)
            ctx.save_for_backward(grad)
            return (loss * up).sum()

        @staticmethod
        def backward(ctx, go):
            (grad,) = ctx.saved_tensors
            return go * grad

    torch.autograd.gradcheck(Sharded.apply, (x.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_and_nan_logits_as_one_process(dtype):
    """+inf on one shard gives the finite limit (as one process), an all -inf shard takes no
    mass, a NaN logit anywhere in a row makes that row's loss and gradient NaN."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 0.0, 1.0, -2.0], [0.5, -inf, -inf, 1.0], [0.0, 1.0, nan, 2.0]], dtype=dtype)
    y = torch.tensor([0, 3, 1])
    loss, _, grad = _sharded(x, y, None, 0.0, [0, 1, 3, 4], torch.ones(3, dtype=dtype))
    xr = x.clone().requires_grad_()
    ref = crossent.cross_entropy(xr, y, reduction="none", validate=False)
    ref.sum().backward()
    assert torch.equal(loss[:2], ref.detach()[:2]) or (loss[:2] - ref.detach()[:2]).abs().max() <= 1e-6
    assert torch.isfinite(loss[:2]).all() and torch.isfinite(grad[:2]).all()
    assert torch.equal(torch.isnan(grad[:2]), torch.isnan(xr.grad[:2]))
    assert (grad[:2] - xr.grad[:2]).abs().max() <= ULP["vocab_parallel"] * torch.finfo(dtype).eps
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


def _transform(x, T, s):
    return (s * torch.tanh(x / s) if s else x) / T


def _sharded_lm(x, y, T, s, bounds, g, g_lse, g_ent):
    """Simulated run of the per-token outputs over ``bounds``: (nll, lse, entropy, hits)
    per row and the concatenated local gradients w.r.t. the raw logits of
    ``sum(g nll + g_lse lse + g_ent H)``, as the vocabulary-parallel functions compute them."""
    keep = y != -100
    layout = Layout(weighted=False, smoothing=False, entropy=True, accuracy=True)
    x = torch.where(keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype))
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rel = y - lo
        owned = keep & (rel >= 0) & (rel < hi - lo)
        shards.append((x[:, lo:hi], torch.where(owned, rel, 0), owned))
    G = torch.stack([local_stats(transform_(z.clone(), T, s), yl, o, None, None, layout) for z, yl, o in shards])
    grads = []
    for rank, (z, yl, owned) in enumerate(shards):
        r = combine(G, keep, 0.0, layout, rank)
        gz = local_grad(transform_(z.clone(), T, s), yl, owned, None, keep, r, g, g_lse, g_ent, inplace=True)
        grads.append(transform_grad_(gz, z, T, s))
    r = combine(G, keep, 0.0, layout, 0)
    return r.loss, r.lse, r.ent, r.correct, torch.cat(grads, dim=1)


def _mp_lm_grad(row, zrow, y, T, s, gn, gl, ge):
    """d(gn nll + gl lse + ge H)/dx of one row in 50 digits, from the definitions:
    dnll/dz = p - [j = y], dlse/dz = p, dH/dz = -p (log p + H), dz/dx = sech^2(x/s)/T, at the
    transformed logits ``zrow`` (as rounded in the input dtype) and the raw ``row``."""
    x = [mpmath.mpf(v) for v in row]
    z = [mpmath.mpf(v) for v in zrow]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z))
    lp = [v - lse for v in z]
    p = [mpmath.exp(v) for v in lp]
    H = -mpmath.fsum(a * b for a, b in zip(p, lp))
    dz = [gn * (p[j] - (1 if j == y else 0)) + gl * p[j] - ge * p[j] * (lp[j] + H) for j in range(len(x))]
    return [d * (mpmath.sech(v / s) ** 2 if s else 1) / T for d, v in zip(dz, x)]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_split_lm_outputs_equal_one_process(data):
    """Log-prob, lse, entropy and hits of any split, softcap and temperature, against a
    float64 composition of torch ops written from the definitions (log_softmax,
    -(p log p).sum); the gradient of all three outputs at once against 50-digit mpmath.
    Both references start from the transformed logits as rounded in the input dtype (that
    rounding, ``eps |z|``, is the input's, the same in one process; what is checked is the
    arithmetic after it)."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    N = data.draw(st.integers(1, 6))
    V = data.draw(st.integers(2, 9))
    seed = data.draw(st.integers(0, 2**31 - 1))
    T = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
    s = data.draw(st.sampled_from([0.0, 3.0, 30.0]))
    scale = data.draw(st.sampled_from([0.1, 3.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    up = [torch.rand(N, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    bounds = _bounds(data, V)
    nll, lse, ent, hits, grad = _sharded_lm(x, y, T, s, bounds, *up)

    keep = y != -100
    zd = transform_(x.clone(), T, s)  # rounded as the functions round it
    z = zd.double()
    logp = torch.log_softmax(z, 1)
    r_nll = torch.where(keep, -logp.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    r_lse = torch.where(keep, torch.logsumexp(z, 1), 0.0)
    r_ent = torch.where(keep, -(logp.exp() * logp).sum(1), 0.0)
    tol = ULP["vocab_parallel"] * torch.finfo(dtype).eps
    for got, want in ((nll, r_nll), (lse, r_lse), (ent, r_ent)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max().clamp(min=1), bounds
    exact = torch.zeros(N, V, dtype=torch.float64)
    for i in range(N):
        if keep[i]:
            u = [float(t[i]) for t in up]
            g_i = _mp_lm_grad(x[i].tolist(), zd[i].tolist(), int(y[i]), T, s, *u)
            exact[i] = torch.tensor([float(v) for v in g_i], dtype=torch.float64)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    # the gradient sums three terms that can cancel (gn (p - [j = y]) + gl p - ge p (log p + H)):
    # its error is relative to the size of the terms, not of their sum
    gn, gl, ge = (t.double().unsqueeze(1) for t in up)
    pr, H = logp.exp(), r_ent.unsqueeze(1)
    onehot = torch.zeros_like(pr).scatter_(1, y.clamp(min=0).unsqueeze(1), 1.0)
    terms = gn * (pr - onehot).abs() + gl * pr + ge * pr * (logp + H).abs()
    sech2 = 1 / torch.cosh(x.double() / s) ** 2 if s else torch.ones_like(terms)
    size = torch.where(keep.unsqueeze(1), terms * sech2 / T, 0.0)
    assert (grad.double() - exact).abs().max() <= tol * size.max().clamp(min=1e-30), bounds
    # hits: the first arg-max of the transformed logits (a float32 soft cap makes ties)
    assert torch.equal(hits, keep & (zd.argmax(1) == y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [[0, 1, 5], [0, 3, 4, 5], [0, 5]])
def test_entropy_extremes_against_mpmath(dtype, bounds):
    """A near-one-hot row (entropy 5.9e-16), its max on one shard and the rest on others,
    huge logits and ties: the entropy within a few ulp of the 50-digit value, relative to
    itself (a ``p log p`` sum loses it entirely in float32)."""
    rows = [
        [40.0, 0.0, 0.0, -1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 30.0],
        [1e4, 1e4 - 1, 1e4 - 3, 1e4, 9.9e3],
        [2.0, 2.0, 2.0, 2.0, 2.0],
    ]
    x = torch.tensor(rows, dtype=dtype)
    y = torch.tensor([0, 1, 3, 2])
    one = torch.ones(4, dtype=dtype)
    _, _, ent, _, _ = _sharded_lm(x, y, 1.0, 0.0, bounds, one, one, one)
    for i, row in enumerate(x.tolist()):
        r = [mpmath.mpf(v) for v in row]
        Z = mpmath.fsum(mpmath.exp(v) for v in r)
        exact = -mpmath.fsum(mpmath.exp(v) / Z * (v - mpmath.log(Z)) for v in r)
        err = abs(mpmath.mpf(float(ent[i])) - exact)
        assert err <= ULP["ce"] * torch.finfo(dtype).eps * abs(exact), (i, float(ent[i]), exact)
