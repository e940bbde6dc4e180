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

* ``lm_head_chunked``: the registered op ``crossent::lm_head_forward`` (and its backward
  op), row blocks of ``rows`` rows by **all** classes: memory ``O(rows * C)``, never
  ``(N, C)`` for the linear version. Forward keeps per row ``m``, ``log(1 + S')``, ``nll``
  and ``B/(1+S')``; backward recomputes each block's logits (one more matrix product).
  Plain torch ops: any device (registered on ``chunked-torch``).
* ``lm_head_unfused``: the same formulas on the full logits, differentiated by autograd
  (``reference``; also what ``torch.func`` transforms run).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._env import env_bytes

DEFAULT_BUDGET = 256 * 2**20
# (R, C) buffers alive at once in the backward block (raw logits, transformed logits,
# -log p, gradient), in the compute dtype.
BUFFERS = 4


def plan_rows(N: int, C: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows per block: ``budget // (C * BUFFERS * itemsize)`` (at least 1, at most N).

    ``budget``: bytes of scratch (None: ``$CROSSENT_LINEAR_BUDGET`` or 256 MiB). A
    4096 x 2048 -> 128256 float32 head gets 130-row blocks."""
    budget = env_bytes("CROSSENT_LINEAR_BUDGET", DEFAULT_BUDGET) if budget is None else int(budget)
    esize = 8 if dtype == torch.float64 else 4
    return int(max(1, min(max(N, 1), budget // max(1, C * BUFFERS * esize))))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform(L: Tensor, temperature: float, softcap: float) -> Tensor:
    """``softcap * tanh(L / softcap) / temperature`` (``softcap`` 0: no cap); a new tensor."""
    if softcap:
        return torch.tanh(L / softcap).mul_(softcap / temperature)
    return L / temperature if temperature != 1.0 else L.clone()


def transform_grad(L: Tensor, temperature: float, softcap: float):
    """dz/dx of :func:`transform` as a tensor (softcap: ``sech^2(L/s)/T``), or a float."""
    if softcap:
        # sech^2 = 1 / cosh^2 keeps relative precision where 1 - tanh^2 would cancel;
        # cosh overflows to inf far out, giving the exact limit 0.
        return torch.cosh(L / softcap).square_().reciprocal_().div_(temperature)
    return 1.0 / temperature


# ----------------------------------------------------------------------- block kernels
def _block_stats(z: Tensor, y: Tensor, sigma: Optional[Tensor]):
    """Per-row statistics of a block of transformed logits ``z`` (R, C); see module docs.

    Returns (m, lp1, nll, BA, sm, correct)."""
    k = z.argmax(1, keepdim=True)
    m = z.gather(1, k)
    d0 = torch.sub(m, z)                      # m - z_j >= 0
    e = torch.exp(-d0)
    e.scatter_(1, k, 0.0)                     # S' sums the others: log1p keeps tiny sums
    s = e.sum(1)
    lp1 = torch.log1p(s)
    nll = d0.gather(1, y.unsqueeze(1)).squeeze(1) + lp1
    # B = sum_j e_j (m - z_j): a -inf logit has e_j = 0 and contributes 0 (not 0 * inf)
    B = torch.where(e > 0, e * d0, torch.zeros((), dtype=z.dtype, device=z.device)).sum(1)
    BA = B / (1 + s)
    sm = None
    if sigma is not None:
        sm = d0 @ sigma + sigma.sum() * lp1
    return m.squeeze(1), lp1, nll, BA, sm, k.squeeze(1) == y


def _block_grad(z: Tensor, y: Tensor, sigma: Optional[Tensor], m, lp1, nll, BA, g_nll, g_sm, g_lse, g_ent):
    """d/dz of ``g_nll*nll + g_sm*sm + g_lse*lse + g_ent*ent`` for a block (R, C)."""
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    d0 = torch.sub(m.unsqueeze(1), z)         # m - z_j
    p = torch.exp(-(d0 + lp1.unsqueeze(1)))
    coef = g_nll + g_lse
    if sigma is not None:
        coef = coef + g_sm * sigma.sum()
    dz = p * coef.unsqueeze(1)
    if g_ent is not None:
        ent = torch.where(p > 0, p * (d0 - BA.unsqueeze(1)), zero)
        dz.add_(ent * g_ent.unsqueeze(1))
    if sigma is not None:
        dz.sub_(g_sm.unsqueeze(1) * sigma)
    # the target column: p_y (coef - g_nll) + g_nll (p_y - 1), with p_y - 1 = expm1(-nll)
    yy = y.unsqueeze(1)
    p_y = torch.exp(-nll)
    col = p_y * (coef - g_nll) + g_nll * torch.expm1(-nll)
    if g_ent is not None:
        d0_y = d0.gather(1, yy).squeeze(1)
        col = col + g_ent * torch.where(p_y > 0, p_y * (d0_y - BA), zero)
    if sigma is not None:
        col = col - g_sm * sigma[y]
    dz.scatter_(1, yy, col.unsqueeze(1))
    return dz


def _logits(x: Tensor, W: Optional[Tensor], b: Optional[Tensor], r0: int, r1: int, cdt) -> Tensor:
    if W is None:
        return x[r0:r1].to(cdt)
    xr = x[r0:r1].to(cdt)
    Wc = W if W.dtype == cdt else W.to(cdt)
    if b is None:
        return xr @ Wc.t()
    return torch.addmm(b.to(cdt), xr, Wc.t())


def _safe_y(y: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device)).long()


def forward_rows(x, W, b, y, keep, sigma, temperature, softcap, rows):
    """The forward of ``crossent::lm_head_forward`` (no autograd): per-row outputs
    ``(nll, sm, lse, ent, correct)`` and the saved ``(m, lp1, BA)``."""
    cdt = compute_dtype(x.dtype)
    N = x.shape[0]
    y = _safe_y(y, keep)
    sig = None if sigma is None else sigma.to(cdt)
    outs = [torch.empty(N, dtype=cdt, device=x.device) for _ in range(6)]
    m_, lp1_, nll_, BA_, sm_, lse_ = outs
    correct = torch.empty(N, dtype=torch.bool, device=x.device)
    if W is not None and W.dtype != cdt:     # fp16/bf16: one float32 copy of the weight
        W = W.to(cdt)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = transform(_logits(x, W, b, r0, r1, cdt), temperature, softcap)
        m, lp1, nll, BA, sm, ok = _block_stats(z, y[r0:r1], sig)
        m_[r0:r1], lp1_[r0:r1], nll_[r0:r1], BA_[r0:r1] = m, lp1, nll, BA
        sm_[r0:r1] = 0.0 if sm is None else sm
        correct[r0:r1] = ok
        lse_[r0:r1] = m + lp1
        del z
    zero = torch.zeros((), dtype=cdt, device=x.device)
    nll_ = torch.where(keep, nll_, zero)
    sm_ = torch.where(keep, sm_, zero)
    ent = torch.where(keep, BA_ + lp1_, zero)
    lse_ = torch.where(keep, lse_, zero)
    return (nll_, sm_, lse_, ent, correct & keep), (m_, lp1_, nll_, BA_)


def backward_rows(x, W, b, y, keep, sigma, temperature, softcap, rows, m, lp1, nll, BA,
                  g_nll, g_sm, g_lse, g_ent, need_x: bool, need_W: bool, need_b: bool):
    """``(grad_x, grad_W, grad_b)`` of the upstream-weighted outputs, block by block."""
    cdt = compute_dtype(x.dtype)
    N = x.shape[0]
    y = _safe_y(y, keep)
    sig = None if sigma is None else sigma.to(cdt)
    zero = torch.zeros((), dtype=cdt, device=x.device)

    def up(g):
        return None if g is None else torch.where(keep, g.to(cdt), zero)

    g_nll = up(g_nll) if g_nll is not None else torch.zeros(N, dtype=cdt, device=x.device)
    g_sm, g_lse, g_ent = up(g_sm), up(g_lse), up(g_ent)
    g_lse = torch.zeros(N, dtype=cdt, device=x.device) if g_lse is None else g_lse
    if sig is not None and g_sm is None:
        g_sm = torch.zeros(N, dtype=cdt, device=x.device)
    Wc = None if W is None else (W if W.dtype == cdt else W.to(cdt))
    gx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_x else None
    gW = torch.zeros(Wc.shape, dtype=cdt, device=x.device) if (need_W and W is not None) else None
    gb = torch.zeros(Wc.shape[0], dtype=cdt, device=x.device) if (need_b and b is not None) else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        sl = slice(r0, r1)
        L = _logits(x, Wc, b, r0, r1, cdt)
        z = transform(L, temperature, softcap)
        dz = _block_grad(z, y[sl], sig, m[sl], lp1[sl], nll[sl], BA[sl], g_nll[sl],
                         None if g_sm is None else g_sm[sl], g_lse[sl], None if g_ent is None else g_ent[sl])
        del z
        dx = dz.mul_(transform_grad(L, temperature, softcap))
        del L
        # rows whose gradient is zero (ignored) may hold non-finite hidden states: a select,
        # never 0 * nan in the products
        kr = keep[sl].unsqueeze(1)
        dx = torch.where(kr, dx, zero)
        if W is None:
            gx[sl] = dx
            continue
        if gx is not None:
            gx[sl] = dx @ Wc
        if gW is not None:
            h = torch.where(kr, x[sl].to(cdt), zero)
            gW.addmm_(dx.t(), h)
        if gb is not None:
            gb.add_(dx.sum(0))
    return (gx.to(x.dtype) if gx is not None else x.new_empty((0,)),
            gW.to(W.dtype) if gW is not None else x.new_empty((0,)),
            gb.to(b.dtype) if gb is not None else x.new_empty((0,)))


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
    m = z.gather(1, k)                          # differentiable: lse's gradient reaches z_k
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
    return (torch.where(keep, nll, zero), torch.where(keep, sm, zero), torch.where(keep, lse, zero),
            torch.where(keep, ent, zero), correct)


def lm_head_chunked(x, W, b, y, keep, sigma, temperature, softcap, rows):
    """The registered op (``crossent::lm_head_forward``): row blocks, never (N, C)."""
    from . import ops

    return ops.lm_head(x, W, b, y, keep, sigma, float(temperature), float(softcap or 0.0), int(rows))



# ----------------------------------------------------------------------- registration
# Declared capability: ``reference`` (full logits, autograd) and ``chunked-torch`` (the
# registered row-block op, plain torch ops, any device) implement ``lm_head``. The C
# kernel of ``chunked`` and the Triton kernels do not compute these options, so the
# automatic choice skips them and an explicit ``backend='chunked'`` or ``'triton'``
# raises BackendUnavailableError naming the backends that can.
def _register() -> None:
    from .linear import _add_ops

    _add_ops("reference", 0, {"lm_head": lm_head_unfused})
    _add_ops("chunked-torch", 1, {"lm_head": lm_head_chunked}, any_device=True)


_register()
