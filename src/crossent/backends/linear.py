r"""Fused linear + loss in plain PyTorch, chunked: the ``(N, C)`` logits never exist.
Design notes: ``docs/design.md``, section ``crossent.backends.linear``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _config
from .._dtypes import is_low_precision
from .. import _capture
from . import reference
from ._registry import Backend, _BACKENDS, register
from .triton import unavailable_reason as triton_unavailable_reason

# Default per-call scratch budget (bytes) for the chunked kernels. 256 MiB gives a
# 4096 x 2048 -> 128256 float32 head row blocks of 418 rows (one pass, about 1/19 of
# eager's 5 GiB of overhead): on CPU the matrix products of a block lose speed quickly
# below ~400 rows (measured: 87-row blocks cost 2.0x, 256 rows 1.5x, 384-512 rows 1.15x
# the time of one whole-batch product; see docs/linear.md). ``CROSSENT_LINEAR_BUDGET``
# (bytes, or with a K/M/G/KiB/MiB/GiB suffix) overrides it: read by :func:`default_budget`
# when a call uses the default, so a bad value fails that call, never ``import crossent``.
DEFAULT_BUDGET = 256 * 2**20


def default_budget() -> int:
    """``$CROSSENT_LINEAR_BUDGET`` parsed by :func:`crossent._config.env_bytes`, else :data:`DEFAULT_BUDGET`."""
    return _config.linear_budget(DEFAULT_BUDGET)


# Fewest rows a block may have before the classes are split too (two passes): 32 rows of
# all classes must fit the budget.
_MIN_ROWS = 32
# Block-sized (R, Cc) buffers alive at once, per kind of target. Class indices: the logits
# block is turned into exp, then into the gradient, in place (1), plus a bool mask where a
# row's max is infinite (1/4 of a float32 buffer). Probability targets and BCE: the logits
# block, the target/weight blocks read from the caller's tensors, and work buffers (3).
BUFFERS_INDEX = 1.25
BUFFERS_DENSE = 3.0


@dataclass(frozen=True)
class ChunkPlan:
    rows: int  # R: rows per block
    classes: int  # Cc: classes per block
    budget: int  # the budget the plan was sized for (bytes)
    blocks: object = None  # per-block arithmetic (None: TorchBlocks; the Triton backend sets its own)

    @property
    def impl(self):
        return TORCH_BLOCKS if self.blocks is None else self.blocks

    def describe(self, N: int, C: int) -> str:
        return (
            f"{math.ceil(N / self.rows)} row blocks of {self.rows} x "
            f"{math.ceil(C / self.classes)} class blocks of {self.classes}"
        )


def plan_chunks(
    N: int,
    C: int,
    H: int,
    dtype: torch.dtype,
    *,
    budget: Optional[int] = None,
    rows: Optional[int] = None,
    classes: Optional[int] = None,
    buffers: float = BUFFERS_DENSE,
) -> ChunkPlan:
    """Block sizes from a memory budget (bytes of scratch per call).

    ``Cc = C`` when ``min(N, 32)`` rows of all classes fit (then cross-entropy needs a
    single pass); otherwise ``Cc`` is what fits with 32 rows. ``R`` then fills the
    budget: ``R * Cc * buffers * 4`` bytes (8 for float64; ``buffers``: how many
    block-sized buffers the op keeps alive, :data:`BUFFERS_INDEX` or
    :data:`BUFFERS_DENSE`). fp16/bf16 inputs give half the
    budget to the float32 weight block and its gradient accumulator (``2 * Cc * H * 4``
    bytes, which sets ``Cc``) and half to the logits blocks.
    """
    budget = default_budget() if budget is None else int(budget)
    esize = 8 if dtype == torch.float64 else 4
    low = is_low_precision(dtype)
    per_logit = buffers * esize
    per_class_extra = 2 * H * 4 if low else 0
    logit_budget = budget
    if low:
        # Half the budget for the float32 weight block + its gradient, half for the logits.
        logit_budget = budget // 2
        if classes is None:
            classes = (budget - logit_budget) // per_class_extra
    if classes is None:
        r0 = max(1, min(N, _MIN_ROWS))
        classes = int(logit_budget // (r0 * per_logit))
    classes = int(max(1, min(C, classes)))
    if rows is None:
        rows = int(logit_budget // (classes * per_logit))
    rows = int(max(1, min(max(N, 1), rows)))
    return ChunkPlan(rows=rows, classes=classes, budget=budget)


# --------------------------------------------------------------------------- targets
class CETarget:
    r"""Per-class coefficients :math:`a_{ij}` of one position, produced block by block.

    Class indices: :math:`a_{ij} = c_i [j = y_i] + s_i\,\sigma_j` with
    :math:`c_i = (1-\epsilon) w_{y_i}` (0 when ignored), :math:`s_i` = 1 for kept rows
    (0 for ignored ones) and :math:`\sigma_j = \epsilon w_j / C` (``smooth``), exactly the
    coefficients ``reference.cross_entropy`` builds.
    Probabilities: :math:`a_{ij} = w_j ((1-\epsilon) q_{ij} + \epsilon/C)`, made per block.
    """

    def __init__(self, *, y=None, c=None, srow=None, smooth=None, q=None, eps=0.0, weight=None, C=0):
        self.y, self.c, self.srow, self.smooth = y, c, srow, smooth
        self.q, self.eps, self.weight, self.C = q, eps, weight, C
        self.index = q is None

    def dense(self, r0, r1, c0, c1, dtype):
        """(R, Cc) coefficients of probability targets (a fresh block, never the full (N, C))."""
        a = self.q[r0:r1, c0:c1].to(dtype, copy=True)
        if self.eps:
            a = a * (1 - self.eps) + self.eps / self.C
        if self.weight is not None:
            a = a * self.weight[c0:c1]
        return a

    def total(self, dtype, rows: int = 64, classes: int = 4096) -> torch.Tensor:
        """A_i = sum_j a_ij per row (N,), read in (rows, classes) blocks."""
        if self.index:
            A = self.c.to(dtype)
            if self.smooth is not None:
                A = A + self.srow * self.smooth.sum()
            return A
        N = self.q.shape[0]
        A = torch.zeros(N, dtype=dtype, device=self.q.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            for c0 in range(0, self.C, classes):
                A[r0:r1] += self.dense(r0, r1, c0, min(self.C, c0 + classes), dtype).sum(1)
        return A

    def rest(
        self, k: torch.Tensor, dtype, r0: int = 0, r1: Optional[int] = None, rows: int = 64, classes: int = 4096
    ) -> torch.Tensor:
        """A_i - a_{i k_i} for rows r0:r1, as a sum of the other terms (no cancellation)."""
        r1 = (self.q.shape[0] if self.q is not None else self.y.shape[0]) if r1 is None else r1
        k = k[r0:r1]
        if self.index:
            y = self.y[r0:r1]
            R = torch.where(y == k, torch.zeros((), dtype=dtype, device=k.device), self.c[r0:r1].to(dtype))
            if self.smooth is not None:
                # sum_{j != k} sigma_j: the sum of non-negative weights minus one of them.
                R = R + self.srow[r0:r1] * (self.smooth.sum() - self.smooth[k])
            return R
        R = torch.zeros(r1 - r0, dtype=dtype, device=k.device)
        for a0 in range(r0, r1, rows):
            a1 = min(r1, a0 + rows)
            kk = k[a0 - r0 : a1 - r0]
            for c0 in range(0, self.C, classes):
                c1 = min(self.C, c0 + classes)
                a = self.dense(a0, a1, c0, c1, dtype)
                hit = ((kk >= c0) & (kk < c1)).nonzero().squeeze(1)
                if hit.numel():
                    a[hit, kk[hit] - c0] = 0.0
                R[a0 - r0 : a1 - r0] += a.sum(1)
        return R


def _neg_dot(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (-z_j) per row with 0 * inf = 0 (a: (Cc,) or (R, Cc); z <= 0).

    A sum of non-negative terms (no cancellation); the fast path is a matrix-vector
    product, the exact fallback (only when a -inf logit meets a zero weight) masks.
    """
    out = -(z @ a) if a.dim() == 1 else -(a * z).sum(1)
    if bool(torch.isnan(out).any()):
        out = reference._times(a.expand_as(z), -z).sum(1)
    return out


# --------------------------------------------------------------------------- CE blocks
def _logits_block(xr, Wb, bb, out=None):
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


class _RowStats:
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
        return _bce_block(L, tgt, r0, r1, c0, c1, dtype, want_grad)


TORCH_BLOCKS = TorchBlocks()


class CpuKernelBlocks(TorchBlocks):
    """:class:`TorchBlocks` with the usual BCE block (float32 on CPU, labels 0/1 or soft,
    no per-element weight, no ``ignore_index``, no smoothing, ``pos_weight`` per label) in
    the compiled kernel of :mod:`.chunked_cpp`: loss and gradient in one pass, the losses
    written over the logits block (no block temporaries besides the gradient). Anything
    else, or no compiled kernel, takes the torch-ops block."""

    @staticmethod
    def bce(L, tgt, r0, r1, c0, c1, dtype, want_grad):
        from . import chunked_cpp

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
            return _bce_block(L, tgt, r0, r1, c0, c1, dtype, want_grad)
        t, _ = tgt.block(r0, r1, c0, c1, dtype)
        g = torch.empty_like(L)
        kernel.bcewl_into(L, t.contiguous(), pw, c1 - c0, L, g)
        return L, (g if want_grad else None)


CPU_KERNEL_BLOCKS = CpuKernelBlocks()


def _bce_ignored(tgt) -> tuple:
    """(rows, labels): bool vectors of the hidden rows and weight rows of a BCE head whose
    targets are all ignore_index, or (None, None). One pass over the targets in blocks."""
    if tgt.ignore_index is None or tgt.dense_t is None or tgt.dense_t.numel() == 0:
        return None, None
    t = tgt.dense_t
    rows = max(1, (1 << 20) // max(1, t.shape[-1]))
    kept_rows, kept_labels = [], torch.zeros(t.shape[1], dtype=torch.bool, device=t.device)
    for block in t.split(rows):
        k = block != tgt.ignore_index
        kept_rows.append(k.any(1))
        kept_labels |= k.any(0)
    return ~torch.cat(kept_rows), ~kept_labels


def _zero_nonfinite_rows(t: torch.Tensor, rows: Optional[torch.Tensor], owned: bool) -> torch.Tensor:
    """``t`` with the rows marked in ``rows`` (dim 0) set to 0 when any of them holds NaN
    or +-inf; ``t`` itself when none does (the usual case: one small read, no copy).
    ``owned``: ``t`` is a private copy that may be changed in place."""
    if rows is None:
        return t
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0 or bool(torch.isfinite(t.index_select(0, idx)).all()):
        return t
    t = t if owned else t.clone()
    t.index_fill_(0, idx, 0.0)
    return t


class _Operands:
    """Inputs in the compute dtype, weights cast block by block (fp16/bf16 -> float32).

    ``ignored``: (rows, labels) from :func:`_ce_ignored` / :func:`_bce_ignored`: hidden rows
    and weight rows (with their bias) whose targets are all ignored are read as zeros
    when they hold NaN or +-inf (a copy of that tensor, made only then)."""

    def __init__(self, x, W, b, cdt, ignored=(None, None)):
        self.cdt = cdt
        self.low = x.dtype != cdt
        self.x = x.to(cdt) if self.low else x  # (N, H): input-sized copy for fp16/bf16
        rows, labels = ignored
        self.x = _zero_nonfinite_rows(self.x, rows, owned=self.low)
        if labels is not None:  # BCE: one position, W (1, L, H), b (1, L)
            W = _zero_nonfinite_rows(W[0], labels, owned=False).unsqueeze(0)
            if b is not None:
                b = _zero_nonfinite_rows(b[0], labels, owned=False).unsqueeze(0)
        self.W, self.b = W, b

    def wblock(self, p, c0, c1):
        Wb = self.W[p, c0:c1]
        return Wb.to(self.cdt) if self.low else Wb

    def bblock(self, p, c0, c1):
        return None if self.b is None else self.b[p, c0:c1].to(self.cdt)


def _blocks(n, size):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _ce_forward_pass(ops, tgts, plan, grads, scale):
    """Per-row loss and lse (N, D); gradients (times ``scale``) into ``grads`` if given."""
    x = ops.x
    N = x.shape[0]
    D, C = ops.W.shape[0], ops.W.shape[1]
    cdt = ops.cdt
    loss = torch.empty(N, D, dtype=cdt, device=x.device)
    lse = torch.empty(N, D, dtype=cdt, device=x.device)
    buf = torch.empty(min(plan.rows, N) * min(plan.classes, C), dtype=cdt, device=x.device)
    all_stats = []
    for p in range(D):
        tgt = tgts[p]
        stats = _RowStats(N, cdt, x.device)
        if plan.classes >= C and grads is not None:
            # One class block: statistics and gradients from the same logits.
            A = tgt.total(cdt, rows=plan.rows, classes=plan.classes)
            Wb, bb = ops.wblock(p, 0, C), ops.bblock(p, 0, C)
            for r0, r1 in _blocks(N, plan.rows):
                L = _logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * C].view(r1 - r0, C))
                e = plan.impl.ce_stats(L, r0, r1, 0, C, tgt, stats, cdt)
                Arest = tgt.rest(stats.k, cdt, r0, r1, rows=plan.rows, classes=plan.classes)
                g = plan.impl.ce_grad(e, True, r0, r1, 0, C, tgt, stats, A[r0:r1], Arest, scale, cdt)
                grads.add(p, g, r0, r1, 0, C, Wb)
            grads.finish_class_block(p, 0, C)
        else:
            for c0, c1 in _blocks(C, plan.classes):
                Wb, bb = ops.wblock(p, c0, c1), ops.bblock(p, c0, c1)
                for r0, r1 in _blocks(N, plan.rows):
                    L = _logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
                    plan.impl.ce_stats(L, r0, r1, c0, c1, tgt, stats, cdt)
            if grads is not None:
                _ce_grad_pass(ops, p, tgt, stats, plan, grads, buf, scale)
        loss[:, p] = stats.loss(tgt)
        lse[:, p] = stats.lse()
        all_stats.append(stats)
    return loss, lse, all_stats


def _ce_grad_pass(ops, p, tgt, stats, plan, grads, buf, scale):
    """Pass 2: recompute logits block by block (classes outer) and accumulate gradients.

    ``scale``: None, a 0-dim tensor, or an (N,) tensor of per-row factors.
    """
    x = ops.x
    N = x.shape[0]
    C = ops.W.shape[1]
    cdt = ops.cdt
    A = tgt.total(cdt, rows=plan.rows, classes=plan.classes)
    Arest = tgt.rest(stats.k, cdt, rows=plan.rows, classes=plan.classes)
    for c0, c1 in _blocks(C, plan.classes):
        Wb, bb = ops.wblock(p, c0, c1), ops.bblock(p, c0, c1)
        for r0, r1 in _blocks(N, plan.rows):
            L = _logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
            sc = scale if (scale is None or scale.dim() == 0) else scale[r0:r1]
            g = plan.impl.ce_grad(L, False, r0, r1, c0, c1, tgt, stats, A[r0:r1], Arest[r0:r1], sc, cdt)
            grads.add(p, g, r0, r1, c0, c1, Wb)
        grads.finish_class_block(p, c0, c1)


class _GradAcc:
    """Gradient accumulators: grad_x (N, H), grad_W (D, C, H), grad_b (D, C).

    float32/float64 inputs accumulate straight into the result tensors; fp16/bf16 inputs
    accumulate grad_x in a float32 (N, H) buffer and each class block of grad_W in a
    float32 (Cc, H) buffer that is rounded into the result once, when its rows are done.
    """

    def __init__(self, ops, needs):
        x, W, b = ops.x, ops.W, ops.b
        self.ops, self.needs = ops, needs
        self.gx = torch.zeros(x.shape, dtype=ops.cdt, device=x.device) if needs[0] else None
        self.gW = torch.empty(W.shape, dtype=W.dtype, device=W.device) if needs[1] else None
        self.gb = torch.zeros(b.shape, dtype=ops.cdt, device=W.device) if (needs[2] and b is not None) else None
        self._acc = None
        self._started = False

    def add(self, p, g, r0, r1, c0, c1, Wb):
        x = self.ops.x
        if self.gx is not None:
            self.gx[r0:r1].addmm_(g, Wb)
        if self.gW is not None:
            if not self._started:
                target = self.gW[p, c0:c1] if not self.ops.low else None
                if target is not None and target.is_contiguous():
                    torch.mm(g.t(), x[r0:r1], out=target)
                    self._acc = target
                else:
                    self._acc = torch.mm(g.t(), x[r0:r1])
                self._started = True
            else:
                self._acc.addmm_(g.t(), x[r0:r1])
        if self.gb is not None:
            self.gb[p, c0:c1] += g.sum(0)

    def finish_class_block(self, p, c0, c1):
        if self.gW is not None and self._acc is not None:
            dst = self.gW[p, c0:c1]
            if self._acc.data_ptr() != dst.data_ptr():
                dst.copy_(self._acc)
        self._acc = None
        self._started = False

    def results(self, x_dtype, b_dtype):
        gx = None if self.gx is None else self.gx.to(x_dtype)
        gb = None if self.gb is None else self.gb.to(b_dtype)
        return gx, self.gW, gb


def ce_forward_with_grads(x, W, b, tgts, plan, needs, scale, ignored=None):
    """One blocked pass: per-row loss and lse (N, D), the row statistics, and -- when
    ``needs`` (grad of x, W, b wanted) is given -- the gradients of ``scale * sum(loss)``
    w.r.t. (x, W, b) (None where not wanted). ``ignored``: what :class:`_Operands` reads as
    zeros (default: the hidden rows whose targets are all ignored, :func:`_ce_ignored`)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    ops = _Operands(x, W, b, cdt, (_ce_ignored(tgts), None) if ignored is None else ignored)
    grads = _GradAcc(ops, needs) if needs is not None else None
    loss, lse, stats = _ce_forward_pass(ops, tgts, plan, grads, scale)
    pre = grads.results(x.dtype, None if b is None else b.dtype) if grads is not None else None
    return loss, lse, stats, pre


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients from the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, x, W, b, tgts, plan, grad_scale, precompute):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        needs = (x.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        ignored = (_ce_ignored(tgts), None)
        want = precompute and any(needs)  # (grad mode is off in here: decided by the caller)
        scale = _usable_scale(grad_scale, cdt) if want else None
        loss, lse, stats, pre = ce_forward_with_grads(x, W, b, tgts, plan, needs if want else None, scale, ignored)
        ctx.save_for_backward(x, W, b)
        ctx.tgts, ctx.plan, ctx.stats, ctx.cdt, ctx.ignored = tgts, plan, stats, cdt, ignored
        ctx.pre = pre
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        if g_loss is None:
            return (None,) * 7

        def recompute(ops, grads):
            x, W = ops.x, ops.W
            N, C = x.shape[0], W.shape[1]
            buf = torch.empty(min(ctx.plan.rows, N) * min(ctx.plan.classes, C), dtype=ctx.cdt, device=x.device)
            for p in range(W.shape[0]):
                _ce_grad_pass(ops, p, ctx.tgts[p], ctx.stats[p], ctx.plan, grads, buf, g_loss[:, p].to(ctx.cdt))

        return _linear_backward(ctx, "linear_cross_entropy", g_loss, recompute, 4)


def _linear_backward(ctx, func, g_loss, recompute, n_other_inputs):
    """Backward of both fused linear Functions: the gradients computed in forward, rescaled
    by the ratio of the incoming gradient to ``ctx.scale`` (exactly 1 for ``sum`` /
    ``mean``) when it is uniform; otherwise ``recompute(ops, grads)`` accumulates them
    chunk by chunk. Returns (grad_x, grad_W, grad_b) and None for the other inputs."""
    _no_double_backward(func)
    with torch.no_grad():
        x, W, b = ctx.saved_tensors
        pre, ctx.pre = ctx.pre, None
        if pre is not None and _uniform(g_loss):
            out = _rescale(pre, g_loss.reshape(-1)[:1].to(ctx.cdt) / ctx.scale)
        else:
            ops = _Operands(x, W, b, ctx.cdt, ctx.ignored)
            needs = ctx.needs_input_grad[:3]
            grads = _GradAcc(ops, (needs[0], needs[1], needs[2] and b is not None))
            recompute(ops, grads)
            out = grads.results(x.dtype, None if b is None else b.dtype)
    return (out[0], out[1], out[2]) + (None,) * n_other_inputs


def _no_double_backward(func):
    """Second derivatives would silently be zero: refuse ``create_graph=True`` loudly."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{func}: expected a first-order backward, but got create_graph=True (double "
            "backward). The fused op computes its gradients chunk by chunk without a graph; for "
            "second derivatives use the unfused loss on `F.linear(...)` logits."
        )


def _usable_scale(grad_scale, cdt):
    """The factor the forward gradients are computed for: ``grad_scale`` if finite and
    positive (1/denominator for ``mean``), else 1."""
    if grad_scale is None:
        return torch.ones((), dtype=cdt)
    s = grad_scale.to(cdt)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))  # no device sync


def _rescale(pre, ratio):
    """Scale the precomputed gradients in place by ``ratio`` (skipped on CPU when it is 1)."""
    if ratio.device.type == "cpu" and float(ratio) == 1.0:
        return list(pre)
    return [None if t is None else t.mul_(ratio.to(t.dtype)) for t in pre]


def _uniform(g: torch.Tensor) -> bool:
    """The incoming gradient is one number broadcast (the backward of sum / mean)."""
    return g.numel() > 0 and all(st == 0 or n == 1 for st, n in zip(g.stride(), g.shape))


def _ce_ignored(tgts) -> Optional[torch.Tensor]:
    """Hidden rows whose targets are ignored at every position (class indices), or None."""
    keeps = [getattr(tg, "keep", None) for tg in tgts]
    if not keeps or any(k is None for k in keeps):
        return None
    return ~torch.stack(keeps, 1).any(1)


def _where_rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The unfused paths' :func:`_zero_nonfinite_rows`, differentiable (``torch.where``:
    exactly zero gradient for the rows replaced)."""
    if rows is None:
        return t
    if not _capture.capturing(t) and (not bool(rows.any()) or bool(torch.isfinite(t[rows]).all())):
        return t  # eager shortcut (host reads); captured graphs always take the select
    return torch.where(rows.view((-1,) + (1,) * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)


def linear_cross_entropy_chunked(x, W, b, tgts, plan, grad_scale, precompute):
    """Per-row losses and log-sum-exp (N, D); see ``docs/design.md``."""
    precompute = precompute and torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(x, W, b, tgts, plan, grad_scale, precompute)


def linear_cross_entropy_unfused(x, W, b, tgts, plan, grad_scale, precompute):
    """Reference semantics as plain code: the full logits, then ``reference.cross_entropy``.

    Allocates the (N, C) logits of every position: for tests and comparisons only.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = _where_rows(x, _ce_ignored(tgts))
    losses, lses = [], []
    for p, tgt in enumerate(tgts):
        logits = torch.nn.functional.linear(x, W[p], None if b is None else b[p]).to(cdt)
        target = tgt.raw_target if tgt.index else tgt.q.to(cdt)
        loss, _ = reference.cross_entropy(logits, target, tgt.index, tgt.weight, tgt.keep, tgt.eps)
        losses.append(loss)
        lses.append(torch.logsumexp(logits.detach(), dim=1))
    return torch.stack(losses, 1), torch.stack(lses, 1)


def ce_targets(target, index, weight, keep, eps, C, cdt):
    """Per-position :class:`CETarget` and per-row ``mean`` denominators (N, D).

    ``target``: (N, D) class indices or (N, C, D) probabilities; ``keep``: (N, D) bool or
    None; ``weight``: (C,) in ``cdt`` or None. The coefficients and denominators are built
    exactly as ``reference.cross_entropy`` builds them: for class indices
    ``d_i = weight[y_i]`` (1 without weights), 0 where ignored; one per row for
    probabilities.
    """
    D = target.shape[-1]
    tgts, dens = [], []
    for p in range(D):
        if not index:
            tgts.append(CETarget(q=target[:, :, p], eps=eps, weight=weight, C=C))
            tgts[-1].raw_target, tgts[-1].keep = None, None
            dens.append(torch.ones(target.shape[0], dtype=cdt, device=target.device))
            continue
        t = target[:, p]
        kp = None if keep is None else keep[:, p]
        y, c, smooth, den = reference.index_coefficients(t, weight, kp, eps, C, cdt)
        srow = None
        if eps:
            srow = torch.ones(y.shape, dtype=cdt, device=y.device) if kp is None else kp.to(cdt)
        tg = CETarget(y=y, c=c, srow=srow, smooth=smooth, C=C)
        tg.raw_target, tg.keep, tg.weight, tg.eps = t, kp, weight, eps
        tgts.append(tg)
        dens.append(den)
    return tgts, torch.stack(dens, 1)


# --------------------------------------------------------------------------- BCE
class BCETarget:
    """Multi-label targets of an (N, L) head, produced block by block.

    ``dense``: (N, L) target (any real/int/bool dtype), ``sparse``: (N, P) int64 positive
    label ids padded with -1. ``weight`` / ``pos_weight``: views broadcast to (N, L)
    (stride 0 where broadcast, so nothing (N, L)-sized is stored), or None.
    """

    def __init__(self, *, dense=None, sparse=None, L=0, weight=None, pos_weight=None, ignore_index=None, eps=0.0):
        self.dense_t, self.sparse_t, self.L = dense, sparse, L
        self.weight, self.pos_weight = weight, pos_weight
        self.ignore_index, self.eps = ignore_index, eps
        self.hard = sparse is not None or _all_zero_one(dense, ignore_index)

    def block(self, r0, r1, c0, c1, dtype):
        """(t, keep) for the block; t already smoothed and zeroed where ignored."""
        keep = None
        if self.sparse_t is not None:
            pos = self.sparse_t[r0:r1]
            t = torch.zeros(r1 - r0, c1 - c0, dtype=dtype, device=pos.device)
            inb = (pos >= c0) & (pos < c1)
            rr = inb.nonzero()
            if rr.numel():
                t[rr[:, 0], pos[rr[:, 0], rr[:, 1]] - c0] = 1.0
        else:
            raw = self.dense_t[r0:r1, c0:c1]
            t = raw.to(dtype)
            if self.ignore_index is not None:
                keep = raw != self.ignore_index
                t = torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))
        if self.eps:
            t = t * (1 - self.eps) + self.eps / 2
        return t, keep

    def wblock(self, r0, r1, c0, c1, dtype):
        w = None if self.weight is None else self.weight[r0:r1, c0:c1].to(dtype)
        pw = None if self.pos_weight is None else self.pos_weight[r0:r1, c0:c1].to(dtype)
        return w, pw


def _all_zero_one(t: torch.Tensor, ignore_index) -> bool:
    """Every entry is 0 or 1 (ignore_index entries aside): three reductions, no temporaries.

    For targets in [0, 1] (the value checks guarantee it), sum(t) == count_nonzero(t)
    exactly when every non-zero entry is 1; min >= 0 and max <= 1 make that airtight.
    """
    if t.numel() == 0:
        return True
    if t.dtype == torch.bool:
        return True
    if ignore_index is not None:  # row blocks: the masks stay small
        rows = max(1, (1 << 20) // max(1, t.shape[-1]))
        return all(bool(((b == 0) | (b == 1) | (b == ignore_index)).all()) for b in t.split(rows))
    lo, hi = torch.aminmax(t)
    if not (float(lo) >= 0 and float(hi) <= 1):
        return False
    # float64 sums of row blocks (a float64 sum of the whole target would cast all of it).
    rows = max(1, (1 << 20) // max(1, t.shape[-1]))
    total = sum(float(b.sum(dtype=torch.float64)) for b in t.split(rows))
    return total == float(torch.count_nonzero(t))


def _bce_block(L, tgt, r0, r1, c0, c1, dtype, want_grad):
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


def _bce_pass(ops, tgt, plan, grads, scale, per_element, loss_out):
    """One pass, classes outer and rows inner: loss (rows or elements) and gradients.

    ``scale``: None, 0-dim, (N,) per-row or (N, L) per-element factors of the gradient.
    """
    x = ops.x
    N = x.shape[0]
    L_ = ops.W.shape[1]
    cdt = ops.cdt
    buf = torch.empty(min(plan.rows, N) * min(plan.classes, L_), dtype=cdt, device=x.device)
    for c0, c1 in _blocks(L_, plan.classes):
        Wb, bb = ops.wblock(0, c0, c1), ops.bblock(0, c0, c1)
        for r0, r1 in _blocks(N, plan.rows):
            Lg = _logits_block(x[r0:r1], Wb, bb, out=buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
            loss, g = plan.impl.bce(Lg, tgt, r0, r1, c0, c1, cdt, grads is not None)
            if loss_out is not None:
                if per_element:
                    loss_out[r0:r1, c0:c1] = loss
                else:
                    loss_out[r0:r1] += loss.sum(1)
            if grads is not None:
                if scale is not None:
                    if scale.dim() == 0:
                        g.mul_(scale)
                    elif scale.dim() == 1:
                        g.mul_(scale[r0:r1].unsqueeze(1))
                    else:
                        g.mul_(scale[r0:r1, c0:c1])
                grads.add(0, g, r0, r1, c0, c1, Wb)
        if grads is not None:
            grads.finish_class_block(0, c0, c1)


class LinearBCEWithLogitsFunction(torch.autograd.Function):
    """Autograd wrapper for the fused linear + BCE-with-logits (see ``docs/design.md``)."""

    @staticmethod
    def forward(ctx, x, W, b, tgt, plan, grad_scale, precompute, per_element):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        needs = (x.requires_grad, W.requires_grad, b is not None and b.requires_grad)
        ignored = _bce_ignored(tgt)
        ops = _Operands(x, W, b, cdt, ignored)
        want = precompute and any(needs)  # (grad mode is off in here: decided by the caller)
        scale = _usable_scale(grad_scale, cdt) if want else None
        grads = _GradAcc(ops, needs) if want else None
        N, L_ = x.shape[0], W.shape[1]
        if per_element:
            loss = torch.empty(N, L_, dtype=cdt, device=x.device)
        else:
            loss = torch.zeros(N, dtype=cdt, device=x.device)
        _bce_pass(ops, tgt, plan, grads, scale, per_element, loss)
        ctx.save_for_backward(x, W, b)
        ctx.tgt, ctx.plan, ctx.cdt, ctx.scale, ctx.ignored = tgt, plan, cdt, scale, ignored
        ctx.pre = grads.results(x.dtype, None if b is None else b.dtype) if want else None
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        def recompute(ops, grads):
            _bce_pass(ops, ctx.tgt, ctx.plan, grads, g_loss.to(ctx.cdt), g_loss.dim() == 2, None)

        return _linear_backward(ctx, "linear_binary_cross_entropy_with_logits", g_loss, recompute, 5)


def linear_bce_with_logits_chunked(x, W, b, tgt, plan, grad_scale, precompute, per_element):
    """Per-row loss sums (N,) or, with ``per_element``, the (N, L) losses."""
    precompute = precompute and torch.is_grad_enabled()
    return LinearBCEWithLogitsFunction.apply(x, W, b, tgt, plan, grad_scale, precompute, per_element)


def linear_bce_with_logits_unfused(x, W, b, tgt, plan, grad_scale, precompute, per_element):
    """Reference semantics as plain code: full (N, L) logits and targets, then
    ``reference.binary_cross_entropy_with_logits``. For tests and comparisons only."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows, labels = _bce_ignored(tgt)
    x, W0 = _where_rows(x, rows), _where_rows(W[0], labels)
    b0 = None if b is None else _where_rows(b[0], labels)
    logits = torch.nn.functional.linear(x, W0, b0).to(cdt)
    N, L_ = logits.shape
    t, keep = tgt.block(0, N, 0, L_, cdt)
    w, pw = tgt.wblock(0, N, 0, L_, cdt)
    loss = reference.binary_cross_entropy_with_logits(logits, t, w, pw, keep)
    return loss if per_element else loss.sum(1)


# --------------------------------------------------------------------------- registration
_OPS_CHUNKED = {
    "linear_cross_entropy": linear_cross_entropy_chunked,
    "linear_binary_cross_entropy_with_logits": linear_bce_with_logits_chunked,
}
_OPS_REFERENCE = {
    "linear_cross_entropy": linear_cross_entropy_unfused,
    "linear_binary_cross_entropy_with_logits": linear_bce_with_logits_unfused,
}


def _add_ops(name: str, priority: int, ops: dict, unavailable=None, any_device=False) -> None:
    """Add ops to backend ``name`` (created if no other module registered it);
    ``any_device``: these ops run on every device, whatever the backend's other ops need."""
    b = _BACKENDS.get(name)
    if b is None:
        kwargs = {} if unavailable is None else {"unavailable": unavailable}
        b = Backend(name=name, priority=priority, ops={}, **kwargs)
        register(b)
    b.ops.update(ops)
    if any_device:
        b.op_unavailable.update({op: (lambda device: None) for op in ops})


def _triton_linear_op(name):
    def call(*args):
        from .triton import linear as triton_linear  # imports triton: only when used

        return getattr(triton_linear, name)(*args)

    call.__name__ = name
    return call


_OPS_TRITON = {op: _triton_linear_op(fn.__name__) for op, fn in _OPS_CHUNKED.items()}


def _with_blocks(fn, blocks):
    def call(x, W, b, tgts, plan, *rest):
        if plan.blocks is None:
            plan = dataclasses.replace(plan, blocks=blocks)
        return fn(x, W, b, tgts, plan, *rest)

    call.__name__ = fn.__name__
    return call


_OPS_CPU = {op: _with_blocks(fn, CPU_KERNEL_BLOCKS) for op, fn in _OPS_CHUNKED.items()}

# "chunked-torch" runs these plain-torch kernels on any device (the CUDA fallback without
# Triton: it outranks the unfused "reference"); "chunked" (the CPU backend) has them too.
_add_ops("reference", 0, _OPS_REFERENCE)
_add_ops("chunked-torch", 1, _OPS_CHUNKED, any_device=True)
_add_ops("chunked", 10, _OPS_CPU)
_add_ops("triton", 20, _OPS_TRITON, unavailable=triton_unavailable_reason)
