r"""Per-token statistics of a vocabulary shard, how the ranks' statistics combine, and the local gradient.

Every rank ``r`` holds the logits :math:`z_{ij}` of the classes ``[start_r, start_r + V_r)``
and computes, per row ``i`` (in the compute dtype, float32 or float64):

=======  ================================================================  ===========
column   value                                                             always?
=======  ================================================================  ===========
``m``    :math:`m_r = \max_j z_{ij}` (first arg-max :math:`k_r`)             yes
``s``    :math:`s_r = \sum_{j \ne k_r} e^{z_{ij} - m_r}`                    yes
``t``    :math:`m_r - z_{iy_i}` on the rank that holds :math:`y_i`, else 0  yes
``o``    1 on the rank that holds :math:`y_i`, else 0                       yes
``w``    :math:`w_{y_i}` on the rank that holds :math:`y_i`, else 0          class weights
``d``    :math:`\sum_j \sigma_j (m_r - z_{ij})`, :math:`\sigma = \epsilon w / V`  smoothing
``W``    :math:`\sum_j \sigma_j` (local)                                    smoothing
=======  ================================================================  ===========

One ``all_gather`` of these ``(N, K)`` columns gives every rank the same ``(P, N, K)``
table, from which each computes the same loss (:func:`combine`): with the global max
:math:`M = \max_r m_r`, its owner :math:`r^*` (the lowest rank reaching it, so ties
resolve to the first index as in one process) and the gap :math:`\delta_r = M - m_r \ge 0`,

.. math::
    S' = s_{r^*} + \sum_{r \ne r^*} (1 + s_r)\,e^{-\delta_r}, \qquad
    -\log p_j = (M - z_j) + \operatorname{log1p}(S'),

    \ell_i = c_i \Bigl(\sum_r o_r (\delta_r + t_r) + \operatorname{log1p} S'\Bigr)
           + \sum_r (d_r + W_r \delta_r) + \Bigl(\sum_r W_r\Bigr) \operatorname{log1p} S'

with :math:`c_i = (1 - \epsilon) w_{y_i}`. Every term is a sum of non-negative numbers,
as in the single-process formula of :mod:`crossent.backends.reference` (no cancellation:
a confident correct prediction keeps its tiny loss), so the result agrees with
``crossent.cross_entropy`` on the gathered logits to a few ulp. The gradient needs no
further communication: :math:`\partial \ell_i / \partial z_{ij} = A_i p_{ij} - a_{ij}` with
:math:`p_{ij} = e^{z_{ij} - M} / (1 + S')`, computed from local logits and the per-row
:math:`M`, :math:`S'` the exchange gave every rank.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Shard(NamedTuple):
    """What a rank needs to know about its slice of the vocabulary."""

    group: object  # a ProcessGroup
    world: int  # P, ranks in the group
    rank: int  # this rank's index in the group
    start: int  # first global class index of the local slice
    vocab: int  # V, the global number of classes


class Layout(NamedTuple):
    """Which optional columns the packed statistics carry (``w``: class weights; ``d``,
    ``W``: label smoothing); ``K`` is their number."""

    weighted: bool
    smoothing: bool

    @property
    def K(self) -> int:
        return 4 + int(self.weighted) + 2 * int(self.smoothing)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def shifted(z: torch.Tensor, m: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``z - m`` for the row maxima ``m`` (rows, 1), exactly 0 where ``z == m``: a finite
    difference of equal numbers is 0 already, and ``inf - inf`` (a row whose max is
    infinite) is set to 0 (a +inf logit is its own max: the finite limit, not NaN).
    Setting every NaN to 0 is safe: a NaN logit makes its row's max NaN (``max``
    propagates NaN), and the max carries the NaN into the loss and the gradient.
    ``inplace``: overwrite ``z`` (a work buffer of the caller's); no other scratch."""
    zz = z.sub_(m) if inplace else z - m
    return zz.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def local_stats(
    z: torch.Tensor,
    yl: torch.Tensor,
    owned: torch.Tensor,
    wl: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    layout: Layout,
    inplace: bool = False,
) -> torch.Tensor:
    """The ``(rows, K)`` statistics of local logits ``z`` (rows, V_r); see the module doc.

    ``yl``: the target's local index (any valid index where not ``owned``), ``owned``:
    the target lies in this shard (and the row is kept), ``wl``: local class weights,
    ``smooth``: local :math:`\\sigma_j` or None. One ``(rows, V_r)`` work buffer (``z``
    itself with ``inplace``): the shifted logits become their exponentials in place."""
    m, k = z.max(dim=1, keepdim=True)
    zz = shifted(z, m, inplace)
    t = torch.where(owned, -zz.gather(1, yl.unsqueeze(1)).squeeze(1), _zero(z))
    o = owned.to(z.dtype)
    cols = [m.squeeze(1), None, t, o]
    if layout.weighted:
        cols.append(torch.where(owned, wl.gather(0, yl), _zero(z)))
    if layout.smoothing:
        cols.append(-(zz @ smooth))  # sum_j sigma_j (m - z_j), a matrix-vector product
        cols.append(smooth.sum().expand(z.shape[0]))
    e = zz.exp_().scatter_(1, k, 0.0)  # e^{z - m}, the arg-max left out
    cols[1] = e.sum(dim=1)
    return torch.stack(cols, dim=1)


class Combined(NamedTuple):
    """Per-row results of :func:`combine`, identical on every rank."""

    loss: torch.Tensor  # (N,) per-row loss
    den: torch.Tensor  # (N,) per-row ``mean`` denominator weight
    M: torch.Tensor  # (N,) global max
    S: torch.Tensor  # (N,) S' of the global max
    c: torch.Tensor  # (N,) target coefficient (1 - eps) w_y
    A: torch.Tensor  # (N,) sum of all coefficients a_ij
    mine: torch.Tensor  # (N,) bool: this rank holds the global arg-max
    rest_other: torch.Tensor  # (N,) sum of the coefficients held by the other ranks


def combine(G: torch.Tensor, keep: torch.Tensor, eps: float, layout: Layout, rank: int) -> Combined:
    """The loss and the per-row quantities of the backward from the gathered ``(P, N, K)`` table."""
    m, s, t, o = G[..., 0], G[..., 1], G[..., 2], G[..., 3]
    P = G.shape[0]
    M, owner = m.max(dim=0)
    is_owner = torch.arange(P, device=G.device).unsqueeze(1) == owner.unsqueeze(0)
    gap = torch.where(m == M, torch.zeros_like(m), M - m)  # >= 0; 0 for a shared +inf max
    S = torch.where(is_owner, s, (1 + s) * torch.exp(-gap)).sum(dim=0)
    L1 = torch.log1p(S)
    T = torch.where(o > 0, gap + t, torch.zeros_like(t)).sum(dim=0)  # not 0 * inf: a shard's max may be -inf
    if layout.weighted:
        den = G[..., 4].sum(dim=0) + 0.0
    else:
        den = keep.to(G.dtype)
    c = den * (1 - eps) if eps else den
    nlp_y = T + L1
    loss = torch.where(c == 0, torch.zeros_like(c), c * nlp_y)
    A = c
    rest_other = torch.where(is_owner, torch.zeros_like(o), o).sum(dim=0) * c
    if layout.smoothing:
        d, Wr = G[..., -2], G[..., -1]
        Wt = Wr.sum(dim=0)
        loss = loss + ((d + Wr * gap).sum(dim=0) + Wt * L1)
        A = c + Wt
        rest_other = rest_other + torch.where(is_owner, torch.zeros_like(Wr), Wr).sum(dim=0)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    return Combined(loss, den, M, S, c, A, owner == rank, rest_other)


def local_grad(
    z: torch.Tensor,
    yl: torch.Tensor,
    owned: torch.Tensor,
    smooth: Optional[torch.Tensor],
    keep: torch.Tensor,
    r: Combined,
    g: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    r"""``g_i * d loss_i / d z_ij`` for local logits ``z`` (rows of ``r``'s rows).

    :math:`A_i p_{ij} - a_{ij}` with :math:`a_{ij} = \sigma_j + c_i [j = y_i]`; at the global
    arg-max, on its rank, when it dominates (:math:`S' < 1`) the entry is evaluated as
    :math:`(A_i - a_{ik}) - A_i S'/(1 + S')` with :math:`A_i - a_{ik}` summed from the
    other coefficients (as the single-process backward does): no cancellation in ``p - 1``.
    One ``(rows, V_r)`` buffer (``z`` itself with ``inplace``), updated in place."""
    M = r.M.unsqueeze(1)
    S = r.S.unsqueeze(1)
    A = r.A.unsqueeze(1)
    c_here = torch.where(owned, r.c, torch.zeros_like(r.c))
    _, k = z.max(dim=1, keepdim=True)
    grad = shifted(z, M, inplace).exp_().div_(1 + S).mul_(A)  # A p
    if smooth is not None:
        grad.sub_(smooth)
    grad.scatter_add_(1, yl.unsqueeze(1), -c_here.unsqueeze(1))
    k1 = k.squeeze(1)
    a_rest = torch.where(owned & (yl != k1), r.c, torch.zeros_like(r.c)) + r.rest_other
    if smooth is not None:
        a_rest = a_rest + (smooth.sum() - smooth.gather(0, k1))
    g_k = torch.where(r.mine.unsqueeze(1) & (S < 1), a_rest.unsqueeze(1) - A * (S / (1 + S)), grad.gather(1, k))
    grad.scatter_(1, k, g_k)
    return grad.mul_(torch.where(keep, g, torch.zeros_like(g)).unsqueeze(1))
