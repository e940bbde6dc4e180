r"""The targets of the fused linear + loss ops, produced block by block.

:class:`CETarget` gives the per-class coefficients of cross-entropy (class indices or
probabilities, with weights and label smoothing) for one position, :func:`ce_targets`
builds them and the ``mean`` denominators exactly as ``reference.cross_entropy`` does;
:class:`BCETarget` gives the multi-label targets, weights and ``pos_weight`` of a
BCE-with-logits head. :func:`ce_ignored` / :func:`bce_ignored` find the hidden rows (and,
for BCE, weight rows) whose targets are all ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import reference


@dataclasses.dataclass(frozen=True)
class CETarget:
    r"""Per-class coefficients :math:`a_{ij}` of one position, produced block by block.

    Class indices: :math:`a_{ij} = c_i [j = y_i] + s_i\,\sigma_j` with
    :math:`c_i = (1-\epsilon) w_{y_i}` (0 when ignored), :math:`s_i` = 1 for kept rows
    (0 for ignored ones) and :math:`\sigma_j = \epsilon w_j / C` (``smooth``), exactly the
    coefficients ``reference.cross_entropy`` builds.
    Probabilities: :math:`a_{ij} = w_j ((1-\epsilon) q_{ij} + \epsilon/C)`, made per block.
    ``raw_target`` and ``keep`` are the position's class indices and kept mask as given
    (None for probabilities), for the unfused reference formulas.
    """

    C: int
    y: Optional[torch.Tensor] = None
    c: Optional[torch.Tensor] = None
    srow: Optional[torch.Tensor] = None
    smooth: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    eps: float = 0.0
    weight: Optional[torch.Tensor] = None
    raw_target: Optional[torch.Tensor] = None
    keep: Optional[torch.Tensor] = None

    @property
    def index(self) -> bool:
        """Class-index targets (else probabilities)."""
        return self.q is None

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


def ce_ignored(tgts) -> Optional[torch.Tensor]:
    """Hidden rows whose targets are ignored at every position (class indices), or None."""
    keeps = [getattr(tg, "keep", None) for tg in tgts]
    if not keeps or any(k is None for k in keeps):
        return None
    return ~torch.stack(keeps, 1).any(1)


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
            tgts.append(CETarget(C, q=target[:, :, p], eps=eps, weight=weight))
            dens.append(torch.ones(target.shape[0], dtype=cdt, device=target.device))
            continue
        t = target[:, p]
        kp = None if keep is None else keep[:, p]
        y, c, smooth, den = reference.index_coefficients(t, weight, kp, eps, C, cdt)
        srow = None
        if eps:
            srow = torch.ones(y.shape, dtype=cdt, device=y.device) if kp is None else kp.to(cdt)
        tgts.append(CETarget(C, y=y, c=c, srow=srow, smooth=smooth, eps=eps, weight=weight, raw_target=t, keep=kp))
        dens.append(den)
    return tgts, torch.stack(dens, 1)


# --------------------------------------------------------------------------- BCE-with-logits
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


def bce_ignored(tgt) -> tuple:
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
