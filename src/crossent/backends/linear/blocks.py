r"""The arithmetic on one ``(R, Cc)`` block of logits, shared by every fused linear path.

:class:`TorchBlocks` computes a block in torch ops (any device): the cross-entropy row
statistics (:class:`RowStats`, merged exactly over class blocks), the cross-entropy
gradient and the BCE-with-logits loss and gradient. :class:`CpuKernelBlocks` runs the
usual BCE-with-logits block in the compiled C kernel; the Triton backend
(:mod:`crossent.backends.triton.linear`) subclasses :class:`TorchBlocks` with Triton
kernels. :func:`logits_block` is the one matrix product that makes a block.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .. import reference

if TYPE_CHECKING:
    from .targets import CETarget


def _neg_dot(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (-z_j) per row with 0 * inf = 0 (a: (Cc,) or (R, Cc); z <= 0).

    A sum of non-negative terms (no cancellation); the fast path is a matrix-vector
    product, the exact fallback (only when a -inf logit meets a zero weight) masks.
    """
    out = -(z @ a) if a.dim() == 1 else -(a * z).sum(1)
    if bool(torch.isnan(out).any()):
        out = reference._times(a.expand_as(z), -z).sum(1)
    return out


# --------------------------------------------------------------------------- cross-entropy blocks
def logits_block(xr, Wb, bb, out=None):
    """x_rows @ W_block.T (+ bias) in the compute dtype (operands already cast)."""
    if bb is None:
        return torch.mm(xr, Wb.t(), out=out)
    if out is None:
        return torch.addmm(bb, xr, Wb.t())
    return torch.addmm(bb, xr, Wb.t(), out=out)


def _shift(L: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """z = L - m in place, with z = 0 where L == m (so a +inf logit is its own max)."""
    if bool(torch.isinf(m).any()):
        eq = L == m
        L.sub_(m)
        L.masked_fill_(eq, 0.0)
    else:
        L.sub_(m)
    return L


class RowStats:
    r"""Per-row statistics of one position, merged exactly over class blocks ((N,) each).

    ``m`` running max, ``k`` its index, ``s`` :math:`S' = \sum_{j \ne k} e^{x_j - m}`,
    ``t`` :math:`\sum_j a^{soft}_j (m - x_j)` and ``w`` :math:`\sum_j a^{soft}_j` of the
    smoothing / probability part, ``dy`` = max of y's block minus :math:`x_y`, ``my`` that
    block max. Merging only ever adds non-negative terms.
    """

    def __init__(self, N, dtype, device):
        self.m = torch.full((N,), -math.inf, dtype=dtype, device=device)
        self.k = torch.zeros(N, dtype=torch.long, device=device)
        self.s = torch.zeros(N, dtype=dtype, device=device)
        self.t = torch.zeros(N, dtype=dtype, device=device)
        self.w = torch.zeros(N, dtype=dtype, device=device)
        self.dy = torch.zeros(N, dtype=dtype, device=device)
        self.my = torch.zeros(N, dtype=dtype, device=device)

    def merge(self, r0, r1, mb, kb, sb, tb, wb):
        m, s, t, w = self.m[r0:r1], self.s[r0:r1], self.t[r0:r1], self.w[r0:r1]
        first = torch.isinf(m) & (m < 0)
        newer = (mb > m) | first
        M = torch.where(newer, mb, m)
        one = torch.ones_like(m)
        zero = torch.zeros_like(m)
        e_old = torch.where(m == M, one, torch.exp(m - M))  # 1 where equal (also +-inf)
        e_new = torch.where(mb == M, one, torch.exp(mb - M))
        s_new = torch.where(newer, sb + (1 + s) * e_old, s + (1 + sb) * e_new)
        s_new = torch.where(first, sb, s_new)
        d_old = torch.where(m == M, zero, M - m)
        d_new = torch.where(mb == M, zero, M - mb)
        t_new = torch.where(first, tb, t + reference._times(w, d_old) + tb + reference._times(wb, d_new))
        self.k[r0:r1] = torch.where(newer, kb, self.k[r0:r1])
        self.m[r0:r1] = M
        self.s[r0:r1] = s_new
        self.t[r0:r1] = t_new
        self.w[r0:r1] = w + wb

    def loss(self, tgt: CETarget) -> torch.Tensor:
        """Per-row loss: c ((m - x_y) + log1p(S')) + t + w log1p(S'), every term >= 0."""
        lp = torch.log1p(self.s)
        loss = self.t + reference._times(self.w, lp)
        if tgt.index:
            dm = torch.where(self.my == self.m, torch.zeros_like(self.m), self.m - self.my)
            loss = loss + reference._times(tgt.c.to(self.m.dtype), (dm + self.dy) + lp)
        return loss

    def lse(self) -> torch.Tensor:
        return self.m + torch.log1p(self.s)


def _ce_block_stats(L, r0, r1, c0, c1, tgt, stats, dtype):
    """Pass 1 on one block; leaves ``L`` = e^{x - m_block} with the block arg-max zeroed."""
    mb, kb = L.max(dim=1, keepdim=True)
    z = _shift(L, mb)
    if tgt.index:
        y = tgt.y[r0:r1]
        inb = (y >= c0) & (y < c1)
        if bool(inb.any()):
            yl = (y - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)
            zy = z.gather(1, yl).squeeze(1)
            stats.dy[r0:r1] = torch.where(inb, -zy, stats.dy[r0:r1])
            stats.my[r0:r1] = torch.where(inb, mb.squeeze(1), stats.my[r0:r1])
        if tgt.smooth is not None:
            sig = tgt.smooth[c0:c1]
            srow = tgt.srow[r0:r1]
            tb = srow * _neg_dot(sig, z)
            wb = srow * sig.sum()
        else:
            tb = wb = torch.zeros(r1 - r0, dtype=dtype, device=L.device)
    else:
        a = tgt.dense(r0, r1, c0, c1, dtype)
        tb = _neg_dot(a, z)
        wb = a.sum(1)
        del a
    e = z.exp_()
    e.scatter_(1, kb, 0.0)
    sb = e.sum(1)
    stats.merge(r0, r1, mb.squeeze(1), kb.squeeze(1) + c0, sb, tb, wb)
    return e


def _ce_block_grad(e, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype):
    """d loss / d logits of one block, in place of ``e`` = e^{x - m} (global m, e_k = 0).

    g = A p - a, and at the arg-max k: g_k = (A - a_k) - A S'/(1+S') (reference.py's
    form, so a confident right answer keeps its tiny gradient). ``A``, ``Arest`` are the
    rows' values (R,); ``scale`` multiplies each row (a 0-dim or (R,) tensor, or None); it
    is folded into the per-row factors, so the block is swept twice, not three times.
    """
    s = stats.s[r0:r1]
    if scale is None:
        sc = torch.ones((), dtype=dtype, device=e.device)
    else:
        sc = scale.to(dtype)
    g = e.mul_((sc * A / (1 + s)).unsqueeze(1))
    if tgt.index:
        y = tgt.y[r0:r1]
        rows = ((y >= c0) & (y < c1)).nonzero().squeeze(1)
        if rows.numel():
            cs = tgt.c[r0:r1].to(dtype) * sc
            g[rows, y[rows] - c0] -= cs[rows]
        if tgt.smooth is not None:
            g.addr_(tgt.srow[r0:r1] * sc, tgt.smooth[c0:c1], alpha=-1)  # in place: no block temporary
    else:
        a = tgt.dense(r0, r1, c0, c1, dtype)
        g.sub_(a.mul_(sc.unsqueeze(1) if sc.dim() else sc))
    k = stats.k[r0:r1]
    hit = ((k >= c0) & (k < c1)).nonzero().squeeze(1)
    if hit.numel():
        gk = (Arest - A * (s / (1 + s))) * sc
        g[hit, k[hit] - c0] = gk[hit]
    return g


class TorchBlocks:
    """The per-block arithmetic in torch ops (any device). Another implementation (the
    Triton one) provides the same three methods:

    * ``ce_stats(L, r0, r1, c0, c1, tgt, stats, dtype)``: merge the block's statistics into
      ``stats``; returns what ``ce_grad(..., reused=True)`` accepts (may destroy ``L``).
    * ``ce_grad(L_or_e, reused, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype)``: the
      block of d loss / d logits (may overwrite its input).
    * ``bce(L, tgt, r0, r1, c0, c1, dtype, want_grad)``: (per-element loss, gradient or None).
    """

    @staticmethod
    def ce_stats(L, r0, r1, c0, c1, tgt, stats, dtype):
        return _ce_block_stats(L, r0, r1, c0, c1, tgt, stats, dtype)

    @staticmethod
    def ce_grad(L, reused, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype):
        if reused:
            e = L  # e^{x - m} with the arg-max zeroed, from ce_stats (one class block)
        else:
            e = _shift(L, stats.m[r0:r1].unsqueeze(1)).exp_()
            k = stats.k[r0:r1]
            hit = ((k >= c0) & (k < c1)).nonzero().squeeze(1)
            if hit.numel():
                e[hit, k[hit] - c0] = 0.0
        return _ce_block_grad(e, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype)

    @staticmethod
    def bce(L, tgt, r0, r1, c0, c1, dtype, want_grad):
        return bce_with_logits_block(L, tgt, r0, r1, c0, c1, dtype, want_grad)


TORCH_BLOCKS = TorchBlocks()


class CpuKernelBlocks(TorchBlocks):
    """:class:`TorchBlocks` with the usual BCE-with-logits block (float32 on CPU, labels
    0/1 or soft, no per-element weight, no ``ignore_index``, no smoothing, ``pos_weight``
    per label) in the compiled kernel of :mod:`crossent.backends.chunked_cpp`: loss and
    gradient in one pass, the losses written over the logits block (no block temporaries
    besides the gradient). Anything else, or no compiled kernel, takes the torch-ops block."""

    @staticmethod
    def bce(L, tgt, r0, r1, c0, c1, dtype, want_grad):
        from .. import chunked_cpp

        kernel = (
            chunked_cpp.get() if (L.dtype == torch.float32 and L.device.type == "cpu" and L.is_contiguous()) else None
        )
        pw = tgt.pos_weight
        if pw is not None:
            pw = pw[r0:r1, c0:c1]
            pw = pw[0].to(torch.float32).contiguous() if pw.stride(0) == 0 else None
        if (
            kernel is None
            or tgt.weight is not None
            or tgt.ignore_index is not None
            or tgt.eps
            or (tgt.pos_weight is not None and pw is None)
        ):
            return bce_with_logits_block(L, tgt, r0, r1, c0, c1, dtype, want_grad)
        t, _ = tgt.block(r0, r1, c0, c1, dtype)
        g = torch.empty_like(L)
        kernel.bce_with_logits_into(L, t.contiguous(), pw, c1 - c0, L, g)
        return L, (g if want_grad else None)


CPU_KERNEL_BLOCKS = CpuKernelBlocks()


# --------------------------------------------------------------------------- BCE-with-logits blocks
def bce_with_logits_block(L, tgt, r0, r1, c0, c1, dtype, want_grad):
    """Per-element loss (reference.py's exact softplus form) and, optionally, its gradient
    ``w [(1 - t) sigmoid(x) - p t sigmoid(-x)]`` (zero where ignored).

    Hard 0/1 targets (sparse ids, or a dense block that holds only 0 and 1) take a shorter
    route with the same values: with ``s = -x`` where t = 1 and ``x`` where t = 0, the
    loss is ``c softplus(s)`` and the gradient ``+-c sigmoid(s)`` (c = w, times p where
    t = 1): one softplus and one sigmoid instead of two of each.
    """
    t, keep = tgt.block(r0, r1, c0, c1, dtype)
    w, pw = tgt.wblock(r0, r1, c0, c1, dtype)
    if keep is not None:
        L.masked_fill_(~keep, 0.0)  # (L is scratch) ignored logits: 0 loss, 0 gradient, whatever they were
    hard = tgt.eps == 0 and tgt.hard
    if hard:
        sgn = torch.add(1.0, t, alpha=-2.0)  # +1 where t = 0, -1 where t = 1
        s = L.mul_(sgn)  # (L is scratch) s = x, or -x where t = 1
        loss = reference._softplus(s)
        coef = None
        if pw is not None:
            coef = (pw - 1).mul_(t).add_(1)  # p where t = 1, else 1
        if w is not None:
            coef = w if coef is None else coef.mul_(w)
        if keep is not None:
            kf = keep.to(dtype)
            coef = kf if coef is None else coef.mul_(kf)
        g = None
        if want_grad:
            g = torch.sigmoid(s).mul_(sgn)  # d/dx softplus(-x) = -sigmoid(-x)
            if coef is not None:
                g.mul_(coef)
        if coef is not None:
            loss = reference._times(coef, loss)  # 0 * inf = 0: a zero-weight term is absent
        return loss, g
    loss = reference.binary_cross_entropy_with_logits(L, t, w, pw, keep)
    g = None
    if want_grad:
        pos = t if pw is None else pw * t
        g = (1 - t) * torch.sigmoid(L) - pos * torch.sigmoid(-L)
        if w is not None:
            g.mul_(w)
        if keep is not None:
            g.masked_fill_(~keep, 0.0)
    return loss, g
