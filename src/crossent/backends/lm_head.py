r"""LM-head statistics of (transformed) logits, per row, in one pass over the classes.

One op, ``lm_head(x, W, b, y, keep, sigma, temperature, softcap, rows)``, serves every
LM-head option of :mod:`crossent.functional` (z-loss, softcap, temperature, token
weights, accuracy, per-token log-probs and entropy). ``x`` is either the logits (N, C)
(``W`` None) or hidden states (N, H) of a linear layer ``W`` (C, H), ``b`` (C,) or None.
Per row i, with the transformed logits

.. math::
    z_j = \frac{1}{T}\, s \tanh\!\left(\frac{x_j}{s}\right) \quad(\text{softcap } s),
    \qquad z_j = x_j / T \quad(\text{no softcap}),

``m = max_j z_j`` (at index k), :math:`S' = \sum_{j \ne k} e^{z_j - m}`,
:math:`B = \sum_j e^{z_j - m}(m - z_j)`, it returns

* ``nll`` :math:`= (m - z_y) + \log(1 + S') = -\log p_y`,
* ``sm`` :math:`= \sum_j \sigma_j (m - z_j) + (\sum_j \sigma_j)\log(1 + S') = \sum_j \sigma_j(-\log p_j)`
  (label-smoothing term; 0 when ``sigma`` is None),
* ``lse`` :math:`= m + \log(1 + S')`,
* ``ent`` :math:`= B / (1 + S') + \log(1 + S') = -\sum_j p_j \log p_j`,
* ``correct``: ``argmax_j z_j == y`` (bool, not differentiable).

Every formula is a sum of non-negative terms: no ``p log p`` cancellation, so the entropy
of a near-one-hot row (1e-30) and the loss of a confident token keep relative precision.
Every output is 0 (``correct`` False) where ``keep`` is False, with zero gradient, whatever
the row holds (NaN, inf).

Gradient (``ent`` differentiable, so an RL loss can push on the entropy), with the upstream
``g_nll, g_sm, g_lse, g_ent`` of one row:

.. math::
    \frac{\partial}{\partial z_j} = p_j\,(g_{nll} + g_{sm}\textstyle\sum\sigma + g_{lse})
    + g_{ent}\, p_j\,\bigl((m - z_j) - B/(1+S')\bigr) - g_{nll}[j = y] - g_{sm}\sigma_j,

where at ``j = y`` the ``p_y - 1`` of the ``nll`` term is evaluated as
``expm1(-nll)`` (exact for confident tokens), then through the transform
(:math:`\partial z/\partial x = \mathrm{sech}^2(x/s)/T`) and the linear layer.

Implementations:

* ``lm_head`` of ``chunked`` and ``chunked-torch``: the registered op
  ``crossent::lm_head_forward`` (and its backward op; bodies :func:`forward_rows` /
  :func:`backward_rows`), row blocks of ``rows`` rows by **all** classes: memory
  ``O(rows * C)``, never ``(N, C)`` for the linear version. Forward keeps per row ``m``,
  ``log(1 + S')``, ``nll`` and ``B/(1+S')``; backward recomputes each block's logits (one
  more matrix product). ``chunked`` computes each float32 block in the compiled C kernel
  (``crossent_lm_stats`` / ``crossent_lm_grad``), ``chunked-torch`` (and ``chunked`` in
  float64) in plain torch ops (:func:`_block_stats` / :func:`_block_grad`): any device.
* ``lm_head_loss`` of the same two: the registered op ``crossent::lm_head_loss_fused``
  (body :func:`loss_rows`) for a summed loss
  :math:`\sum_i c^{nll}_i nll_i + c^{sm}_i sm_i + c^{z}_i lse_i^2`: its per-row upstream is
  known once the row's lse is, so the gradients are computed in the same pass (no
  recomputation: the plain fused CE's three matrix products); the C kernel
  ``crossent_lm_loss_grad`` does a block in three passes over its rows.
* ``lm_head_unfused``: the same formulas on the full logits, differentiated by autograd
  (``reference``; also what ``torch.func`` transforms run).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._dtypes import compute_dtype
from . import chunked
from .linear import default_budget


def plan_rows(N: int, C: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows per block: ``budget // (C * BUFFERS * itemsize)`` (at least 1, at most N).

    ``budget``: bytes of scratch (None: ``$CROSSENT_LINEAR_BUDGET`` or 256 MiB). A
    4096 x 2048 -> 128256 float32 head gets 174-row blocks."""
    budget = default_budget() if budget is None else int(budget)
    esize = 8 if dtype == torch.float64 else 4
    return int(max(1, min(max(N, 1), budget // max(1, C * BUFFERS * esize))))


def transform_(L: Tensor, temperature: float, softcap: float) -> Tensor:
    """``softcap * tanh(L / softcap) / temperature`` (``softcap`` 0: no cap), in place on
    the scratch block ``L``."""
    if softcap:
        return L.div_(softcap).tanh_().mul_(softcap / temperature)
    return L.div_(temperature) if temperature != 1.0 else L


# ----------------------------------------------------------------------- block kernels
# Each block is a few (R, C) buffers in the compute dtype, rewritten in place: forward 2
# (``m - z`` and ``e^{z - m}``), backward 3 (the raw logits, kept for the softcap's
# derivative; ``m - z``; ``p``, which becomes the gradient).
BUFFERS = 3


def _on_host_all(t: Tensor) -> bool:
    """``bool(t.all())`` where reading it costs no device sync (CPU); elsewhere False, which
    selects the path that is right either way (so a CUDA graph can capture the op)."""
    return t.device.type == "cpu" and bool(t.all())


def _all_finite(z: Tensor) -> bool:
    """No inf/nan in ``z``: one reduction, no mask buffer (a sum that overflows only sends
    the block to the exact masked path). Read on the host only where that is free."""
    return _on_host_all(torch.isfinite(z.sum()))


def _block_stats(L: Tensor, y: Tensor, sigma: Optional[Tensor], temperature: float, softcap: float):
    """Per-row statistics of one block of raw logits ``L`` (R, C; scratch, overwritten).

    Works on ``t = z - m <= 0`` (so ``m - z_j = -t_j``). Returns (m, lp1, nll, BA, sm,
    correct); see the module docstring."""
    z = transform_(L, temperature, softcap)
    k = z.argmax(1, keepdim=True)
    m = z.gather(1, k)
    finite = _all_finite(z)
    t = z.sub_(m)  # z_j - m <= 0
    e = torch.exp(t)
    e.scatter_(1, k, 0.0)  # S' sums the others: log1p keeps tiny sums
    s = e.sum(1)
    lp1 = torch.log1p(s)
    nll = lp1 - t.gather(1, y.unsqueeze(1)).squeeze(1)
    sm = None
    if sigma is not None:
        sm = sigma.sum() * lp1 - t @ sigma
    # B = sum_j e_j (m - z_j) as a batched dot product (no (R, C) temporary); a -inf logit
    # has e_j = 0 and contributes 0, not 0 * inf (the masked path)
    if finite:
        B = -torch.bmm(e.unsqueeze(1), t.unsqueeze(2)).view(-1)
    else:
        zero_e = e == 0
        B = -e.mul_(t).masked_fill_(zero_e, 0.0).sum(1)
    BA = B / (1 + s)
    return m.squeeze(1), lp1, nll, BA, sm, k.squeeze(1) == y


def _block_grad(
    L: Tensor,
    y: Tensor,
    sigma: Optional[Tensor],
    temperature: float,
    softcap: float,
    m,
    lp1,
    nll,
    BA,
    g_nll,
    g_sm,
    g_lse,
    g_ent,
) -> Tensor:
    """d/dx of ``g_nll*nll + g_sm*sm + g_lse*lse + g_ent*ent`` for one block of raw logits
    ``L`` (R, C; scratch, overwritten); see the module docstring for the formula.

    With ``t = z - m``: ``p_j = exp(t_j - log1p(S'))`` and the entropy term
    ``p_j ((m - z_j) - B/(1+S')) = -p_j (t_j + B/(1+S'))``, so per row
    ``dz_j = p_j (a + b t_j)`` with ``a = coef - g_ent B/(1+S')``, ``b = -g_ent``."""
    z = torch.div(L, softcap) if softcap else L
    if softcap:
        z.tanh_().mul_(softcap / temperature)
    elif temperature != 1.0:
        z.div_(temperature)
    finite = _all_finite(z)
    t = z.sub_(m.unsqueeze(1))  # z_j - m
    yy = y.unsqueeze(1)
    t_y = t.gather(1, yy).squeeze(1)
    p = torch.sub(t, lp1.unsqueeze(1)).exp_()
    coef = g_nll + g_lse
    if sigma is not None:
        coef = coef + g_sm * sigma.sum()
    if g_ent is not None:
        a = coef - g_ent * BA
        zero_p = None if finite else p == 0
        dz = p.mul_(t.mul_(-g_ent.unsqueeze(1)).add_(a.unsqueeze(1)))
        if zero_p is not None:
            dz.masked_fill_(zero_p, 0.0)  # p_j = 0 at a -inf logit: 0, not 0 * inf
    else:
        dz = p.mul_(coef.unsqueeze(1))
    del t, z
    if sigma is not None:
        dz.addr_(g_sm, sigma, alpha=-1.0)
    # the target column: p_y (coef - g_nll) + g_nll (p_y - 1), with p_y - 1 = expm1(-nll)
    p_y = torch.exp(-nll)
    col = p_y * (coef - g_nll) + g_nll * torch.expm1(-nll)
    if g_ent is not None:
        col = col - g_ent * torch.where(p_y > 0, p_y * (t_y + BA), torch.zeros((), dtype=p_y.dtype, device=p_y.device))
    if sigma is not None:
        col = col - g_sm * sigma[y]
    dz.scatter_(1, yy, col.unsqueeze(1))
    # through the transform: dz/dx = sech^2(x/s) / T, as 1 / cosh^2 (keeps relative
    # precision where 1 - tanh^2 would cancel; cosh overflows to inf far out: the limit 0)
    if softcap:
        dz.div_(L.div_(softcap).cosh_().square_())
    if temperature != 1.0:
        dz.div_(temperature)
    return dz


def _logits(x: Tensor, W: Optional[Tensor], b: Optional[Tensor], r0: int, r1: int, cdt) -> Tensor:
    """A fresh (scratch) block of raw logits in the compute dtype (never the caller's)."""
    if W is None:
        return x[r0:r1].to(cdt, copy=True)
    xr = x[r0:r1].to(cdt)
    if b is None:
        return xr @ W.t()
    return torch.addmm(b.to(cdt), xr, W.t())


def _safe_y(y: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device)).long()


def _c_functions(backend: str, cdt: torch.dtype, device: torch.device):
    """The compiled C functions when ``backend`` is ``chunked`` and they apply (float32
    compute on the CPU, the library built), else None: the torch-ops blocks."""
    if backend != "chunked" or cdt != torch.float32 or device.type != "cpu":
        return None
    return chunked._cpp()


def _c_block_stats(K, L, y, sigma, temperature, softcap):
    """:func:`_block_stats` in the compiled kernel (``crossent_lm_stats``; ``L`` is scratch)."""
    out, correct = K.lm_stats(L, y, sigma, temperature, softcap)
    m, lp1, nll, BA, sm = out.unbind(0)
    return m, lp1, nll, BA, (sm if sigma is not None else None), correct


def _c_block_grad(K, L, y, sigma, temperature, softcap, m, lp1, nll, BA, g_nll, g_sm, g_lse, g_ent):
    """:func:`_block_grad` in the compiled kernel (``crossent_lm_grad``), written over ``L``."""
    zero = torch.zeros_like(m)
    g = torch.stack([g_nll, zero if g_sm is None else g_sm, g_lse, zero if g_ent is None else g_ent])
    return K.lm_grad(L, y, sigma, temperature, softcap, torch.stack([m, lp1, nll, BA]), g, L)


def _c_block_loss_grad(K, L, y, keep, sigma, temperature, softcap, c_nll, c_sm, c_z):
    """:func:`_block_loss_grad` in the compiled kernel (``crossent_lm_loss_grad``): the
    gradient is written over ``L``."""
    out, ok = K.lm_loss_grad(L, y, sigma, temperature, softcap, torch.stack([c_nll, c_sm, c_z]))
    nll, lse, sm = out.unbind(0)
    zero = torch.zeros((), dtype=L.dtype)
    lse = torch.where(keep, lse, zero)
    loss = c_nll * torch.where(keep, nll, zero) + c_z * lse.square()
    if sigma is not None:
        loss = loss + c_sm * torch.where(keep, sm, zero)
    return loss, lse, ok, L


def forward_rows(x, W, b, y, keep, sigma, temperature, softcap, rows, backend):
    """The forward of ``crossent::lm_head_forward`` (no autograd): per-row outputs
    ``(nll, sm, lse, ent, correct)`` and the saved ``(m, lp1, BA)``. ``backend``
    ``chunked`` runs the blocks in the compiled C kernel where it applies (:func:`_c_functions`)."""
    cdt = compute_dtype(x.dtype)
    K = _c_functions(backend, cdt, x.device)
    N = x.shape[0]
    y = _safe_y(y, keep)
    sig = None if sigma is None else sigma.to(cdt).contiguous()
    m_, lp1_, nll_, BA_, sm_ = (torch.zeros(N, dtype=cdt, device=x.device) for _ in range(5))
    correct = torch.empty(N, dtype=torch.bool, device=x.device)
    if W is not None and W.dtype != cdt:  # fp16/bf16: one float32 copy of the weight
        W = W.to(cdt)
    block = _block_stats if K is None else functools.partial(_c_block_stats, K)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        m, lp1, nll, BA, sm, ok = block(_logits(x, W, b, r0, r1, cdt), y[r0:r1], sig, temperature, softcap)
        m_[r0:r1], lp1_[r0:r1], nll_[r0:r1], BA_[r0:r1] = m, lp1, nll, BA
        if sm is not None:
            sm_[r0:r1] = sm
        correct[r0:r1] = ok
    zero = torch.zeros((), dtype=cdt, device=x.device)
    nll_ = torch.where(keep, nll_, zero)
    sm_ = torch.where(keep, sm_, zero)
    ent = torch.where(keep, BA_ + lp1_, zero)
    lse = torch.where(keep, m_ + lp1_, zero)
    return (nll_, sm_, lse, ent, correct & keep), (m_, lp1_, nll_, BA_)


def _grad_loop(x, W, b, keep, rows, cdt, need_x, need_W, need_b, block_dx):
    """Row blocks: ``block_dx(sl, L)`` turns the block's raw logits ``L`` (scratch) into
    d/dlogits; accumulated into ``(grad_x, grad_W, grad_b)`` (empty where not needed)."""
    N = x.shape[0]
    Wc = None if W is None else (W if W.dtype == cdt else W.to(cdt))
    gx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_x else None
    gW = torch.zeros(Wc.shape, dtype=cdt, device=x.device) if (need_W and W is not None) else None
    gb = torch.zeros(Wc.shape[0], dtype=cdt, device=x.device) if (need_b and b is not None) else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        sl = slice(r0, r1)
        dx = block_dx(sl, _logits(x, Wc, b, r0, r1, cdt))
        # rows whose gradient is zero (ignored) may hold non-finite hidden states: a fill,
        # never 0 * nan in the products
        dropped = ~keep[sl].unsqueeze(1)
        partial = not _on_host_all(keep[sl])
        if partial:
            dx.masked_fill_(dropped, 0.0)
        if W is None:
            if gx is not None:
                gx[sl] = dx
            continue
        if gx is not None:
            gx[sl] = dx @ Wc
        if gW is not None:
            h = x[sl].to(cdt)
            if partial:
                h = h.masked_fill(dropped, 0.0)
            gW.addmm_(dx.t(), h)
        if gb is not None:
            gb.add_(dx.sum(0))
    return (
        gx.to(x.dtype) if gx is not None else x.new_empty((0,)),
        gW.to(W.dtype) if gW is not None else x.new_empty((0,)),
        gb.to(b.dtype) if gb is not None else x.new_empty((0,)),
    )


def backward_rows(x, W, b, y, keep, sigma, temperature, softcap, rows, backend, saved, grads, need):
    """``(grad_x, grad_W, grad_b)`` of the upstream-weighted outputs, block by block:
    ``saved`` is the forward's ``(m, lp1, nll, BA)``, ``grads`` the upstream
    ``(g_nll, g_sm, g_lse, g_ent)`` (each may be None), ``need`` ``(need_x, need_W, need_b)``."""
    m, lp1, nll, BA = saved
    g_nll, g_sm, g_lse, g_ent = grads
    need_x, need_W, need_b = need
    cdt = compute_dtype(x.dtype)
    N = x.shape[0]
    y = _safe_y(y, keep)
    sig = None if sigma is None else sigma.to(cdt).contiguous()
    zero = torch.zeros((), dtype=cdt, device=x.device)

    def up(g, always=False):
        if g is None:
            return torch.zeros(N, dtype=cdt, device=x.device) if always else None
        return torch.where(keep, g.to(cdt), zero)

    g_nll, g_lse, g_ent = up(g_nll, True), up(g_lse, True), up(g_ent)
    g_sm = up(g_sm, True) if sig is not None else None

    K = _c_functions(backend, cdt, x.device)

    def block_dx(sl, L):
        return (_block_grad if K is None else functools.partial(_c_block_grad, K))(
            L,
            y[sl],
            sig,
            temperature,
            softcap,
            m[sl],
            lp1[sl],
            nll[sl],
            BA[sl],
            g_nll[sl],
            None if g_sm is None else g_sm[sl],
            g_lse[sl],
            None if g_ent is None else g_ent[sl],
        )

    return _grad_loop(x, W, b, keep, rows, cdt, need_x, need_W, need_b, block_dx)


def _block_loss_grad(
    L: Tensor, y: Tensor, keep: Tensor, sigma: Optional[Tensor], temperature: float, softcap: float, c_nll, c_sm, c_z
):
    """Loss terms and d loss/dx of one block of raw logits ``L`` (R, C; scratch) in one
    sweep: ``(loss, lse, correct, dx)``. ``p_j = e^{t_j} / (1 + S')`` reuses the forward's
    exponentials (``p_k = 1 / (1 + S')``), so no exponential or transform is recomputed."""
    zero = torch.zeros((), dtype=L.dtype, device=L.device)
    cosh2 = torch.div(L, softcap).cosh_().square_() if softcap else None  # dz/dx = 1 / (T cosh^2)
    z = transform_(L, temperature, softcap)
    k = z.argmax(1, keepdim=True)
    m = z.gather(1, k)
    t = z.sub_(m)  # z_j - m <= 0
    e = torch.exp(t)
    e.scatter_(1, k, 0.0)
    s = e.sum(1)
    lp1 = torch.log1p(s)
    nll = torch.where(keep, lp1 - t.gather(1, y.unsqueeze(1)).squeeze(1), zero)
    lse = torch.where(keep, m.squeeze(1) + lp1, zero)
    loss = c_nll * nll + c_z * lse.square()
    coef = c_nll + 2 * c_z * lse
    if sigma is not None:
        sm = torch.where(keep, sigma.sum() * lp1 - t @ sigma, zero)
        loss = loss + c_sm * sm
        coef = coef + c_sm * sigma.sum()
    del t, z
    scale = coef / (1 + s)
    dz = e.mul_(scale.unsqueeze(1))  # p_j coef for j != k
    dz.scatter_(1, k, scale.unsqueeze(1))  # p_k = 1 / (1 + S')
    if sigma is not None:
        dz.addr_(c_sm, sigma, alpha=-1.0)
    # the target column: p_y (coef - c_nll) + c_nll (p_y - 1), with p_y - 1 = expm1(-nll)
    p_y = torch.exp(-nll)
    col = p_y * (coef - c_nll) + c_nll * torch.expm1(-nll)
    if sigma is not None:
        col = col - c_sm * sigma[y]
    dz.scatter_(1, y.unsqueeze(1), col.unsqueeze(1))
    if cosh2 is not None:
        dz.div_(cosh2)  # cosh^2 = inf far out: the exact limit 0
    if temperature != 1.0:
        dz.div_(temperature)
    return loss, lse, k.squeeze(1) == y, dz


def loss_rows(x, W, b, y, keep, sigma, c_nll, c_sm, c_z, temperature, softcap, rows, need_x, need_W, need_b, backend):
    """One pass for a summed loss ``sum_i c_nll_i nll_i + c_sm_i sm_i + c_z_i lse_i^2``:
    ``(total, lse, correct, grad_x, grad_W, grad_b)`` with the gradients of ``total``
    computed block by block in the same pass (the per-row upstream of each statistic is
    known once its row's lse is: ``c_nll``, ``c_sm``, ``2 c_z lse``), so the fused linear
    version costs the three matrix products of the plain fused CE. Blocks hold 2 (R, C)
    buffers, 3 with a soft cap (its derivative)."""
    cdt = compute_dtype(x.dtype)
    N = x.shape[0]
    y = _safe_y(y, keep)
    sig = None if sigma is None else sigma.to(cdt).contiguous()
    zero = torch.zeros((), dtype=cdt, device=x.device)
    c_nll, c_sm, c_z = (torch.where(keep, c.to(cdt), zero) for c in (c_nll, c_sm, c_z))
    total = torch.zeros((), dtype=cdt, device=x.device)
    lse_ = torch.zeros(N, dtype=cdt, device=x.device)
    correct = torch.zeros(N, dtype=torch.bool, device=x.device)
    K = _c_functions(backend, cdt, x.device)
    block = _block_loss_grad if K is None else functools.partial(_c_block_loss_grad, K)

    def block_dx(sl, L):
        nonlocal total
        loss, lse, ok, dz = block(L, y[sl], keep[sl], sig, temperature, softcap, c_nll[sl], c_sm[sl], c_z[sl])
        total = total + loss.sum()
        lse_[sl] = lse
        correct[sl] = ok & keep[sl]
        return dz

    gx, gW, gb = _grad_loop(x, W, b, keep, rows, cdt, need_x, need_W, need_b, block_dx)
    return total, lse_, correct, gx, gW, gb


# ----------------------------------------------------------------------- reference
def lm_head_unfused(x, W, b, y, keep, sigma, temperature, softcap, rows=None):
    """The same outputs from the full logits, differentiated by autograd (reference)."""
    cdt = compute_dtype(x.dtype)
    # ignored rows are read as zeros (a select): exactly zero gradient, never 0 * nan
    x = torch.where(keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    L = x.to(cdt) if W is None else torch.nn.functional.linear(x, W, b).to(cdt)
    z = softcap * torch.tanh(L / softcap) / temperature if softcap else L / temperature
    ys = _safe_y(y, keep)
    k = z.detach().argmax(1, keepdim=True)
    m = z.gather(1, k)  # differentiable: lse's gradient reaches z_k
    d0 = m - z
    zero = torch.zeros((), dtype=cdt, device=x.device)
    onehot_k = torch.zeros_like(z, dtype=torch.bool).scatter(1, k, True)
    e = torch.where(onehot_k, zero, torch.exp(-d0))
    s = e.sum(1)
    lp1 = torch.log1p(s)
    nll = d0.gather(1, ys.unsqueeze(1)).squeeze(1) + lp1
    B = torch.where(e > 0, e * torch.where(e > 0, d0, zero), zero).sum(1)
    ent = B / (1 + s) + lp1
    sm = torch.zeros_like(nll)
    if sigma is not None:
        sig = sigma.to(cdt)
        sm = (d0 * sig).sum(1) + sig.sum() * lp1
    lse = m.squeeze(1) + lp1
    correct = (k.squeeze(1) == ys) & keep
    return (
        torch.where(keep, nll, zero),
        torch.where(keep, sm, zero),
        torch.where(keep, lse, zero),
        torch.where(keep, ent, zero),
        correct,
    )
