r"""Per-token statistics of a vocabulary shard, how the ranks' statistics combine, and the local gradient.

Every rank ``r`` holds the logits :math:`x_{ij}` of the classes ``[start_r, start_r + V_r)``,
transforms them elementwise (soft cap first, then temperature:
:math:`z = s\tanh(x/s)/T`, or :math:`z = x/T` without a cap; the identity by default) and
computes, per row ``i`` (in the compute dtype, float32 or float64):

=======  ================================================================  =================
column   value                                                             present
=======  ================================================================  =================
``m``    :math:`m_r = \max_j z_{ij}` (first arg-max :math:`k_r`)             always
``s``    :math:`s_r = \sum_{j \ne k_r} e^{z_{ij} - m_r}`                    always
``t``    :math:`m_r - z_{iy_i}` on the rank that holds :math:`y_i`, else 0  always
``o``    1 on the rank that holds :math:`y_i`, else 0                       always
``w``    :math:`w_{y_i}` on the rank that holds :math:`y_i`, else 0          class weights
``d``    :math:`\sum_j \sigma_{ij} (m_r - z_{ij})`                          smoothing / probs
``W``    :math:`\sum_j \sigma_{ij}` (local)                                 smoothing / probs
``B``    :math:`\sum_j e^{z_{ij} - m_r} (m_r - z_{ij})`                     entropy
``a``    1 where :math:`k_r = y_i` on the rank that holds :math:`y_i`       accuracy
=======  ================================================================  =================

:math:`\sigma_{ij}` are the coefficients of the non-target terms: :math:`\epsilon w_j / V`
for label smoothing (the same for every row), :math:`w_j((1-\epsilon) q_{ij} + \epsilon/V)`
for class-probability targets :math:`q` (sharded like the logits; then ``t``, ``o`` are 0).

One ``all_gather`` of these ``(N, K)`` columns gives every rank the same ``(P, N, K)``
table, from which each computes the same loss (:func:`combine`): with the global max
:math:`M = \max_r m_r`, its owner :math:`r^*` (the lowest rank reaching it, so ties
resolve to the first index as in one process) and the gap :math:`\delta_r = M - m_r \ge 0`,

.. math::
    S' = s_{r^*} + \sum_{r \ne r^*} (1 + s_r)\,e^{-\delta_r}, \qquad
    -\log p_j = (M - z_j) + \operatorname{log1p}(S'),

    \ell_i = c_i \Bigl(\sum_r o_r (\delta_r + t_r) + \operatorname{log1p} S'\Bigr)
           + \sum_r (d_r + W_r \delta_r) + \Bigl(\sum_r W_r\Bigr) \operatorname{log1p} S',

    \operatorname{lse}_i = M + \operatorname{log1p} S', \qquad
    B = \sum_r e^{-\delta_r} \bigl(B_r + \delta_r (1 + s_r)\bigr), \qquad
    H_i = \frac{B}{1 + S'} + \operatorname{log1p} S'

with :math:`c_i = (1 - \epsilon) w_{y_i}` (0 for probability targets). Every term is a sum
of non-negative numbers, as in the single-process formulas of
:mod:`crossent.backends.reference` and :mod:`crossent.backends.lm_head` (no cancellation:
a confident correct prediction keeps its tiny loss, a near-one-hot row its tiny entropy),
so the results agree with one process on the gathered logits to a few ulp. The gradient
needs no further communication (:func:`local_grad`): with
:math:`p_{ij} = e^{z_{ij} - M} / (1 + S')` from local logits and the per-row :math:`M`,
:math:`S'`, :math:`B` the exchange gave every rank, and the upstream gradients
:math:`g, g_{\mathrm{lse}}, g_H` of the loss, the lse and the entropy,

.. math::
    \frac{\partial}{\partial z_{ij}} = (g_i A_i + g_{\mathrm{lse},i})\,p_{ij}
        + g_{H,i}\,p_{ij}\Bigl((M_i - z_{ij}) - \frac{B_i}{1 + S'_i}\Bigr) - g_i a_{ij},

:math:`a_{ij} = \sigma_{ij} + c_i [j = y_i]`, :math:`A_i = \sum_j a_{ij}` (global), then
through the transform (:math:`\partial z / \partial x = \operatorname{sech}^2(x/s)/T`,
evaluated as :math:`1/\cosh^2`, exact far out where :math:`1 - \tanh^2` cancels).
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
    ``W``: label smoothing or probability targets; ``B``: entropy; ``a``: accuracy);
    ``index``: class-index targets (False: probability targets); ``K`` is the number of
    columns."""

    weighted: bool
    smoothing: bool
    entropy: bool = False
    accuracy: bool = False
    index: bool = True

    @property
    def K(self) -> int:
        return 4 + int(self.weighted) + 2 * int(self.smoothing) + int(self.entropy) + int(self.accuracy)

    def col(self, name: str) -> int:
        """The index of column ``name`` (``'w'``, ``'d'``, ``'W'``, ``'B'`` or ``'a'``)."""
        order = ["m", "s", "t", "o"]
        order += ["w"] if self.weighted else []
        order += ["d", "W"] if self.smoothing else []
        order += ["B"] if self.entropy else []
        order += ["a"] if self.accuracy else []
        return order.index(name)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def transform_(x: torch.Tensor, temperature: float, softcap: float) -> torch.Tensor:
    """``softcap * tanh(x / softcap) / temperature`` (``softcap`` 0: no cap), in place on
    the work buffer ``x``; the same operations as the single-process LM-head op."""
    if softcap:
        return x.div_(softcap).tanh_().mul_(softcap / temperature)
    return x.div_(temperature) if temperature != 1.0 else x


def transform_grad_(
    grad: torch.Tensor, x: torch.Tensor, temperature: float, softcap: float, scratch: bool = False
) -> torch.Tensor:
    """``grad * dz/dx`` in place: ``dz/dx = sech^2(x / s) / T`` as ``1 / cosh^2`` (exact far
    out, where ``1 - tanh^2`` cancels; ``cosh`` overflows to inf: the limit 0). ``x``: the
    raw logits, overwritten with ``scratch`` (else read only: one more work buffer with a cap)."""
    if softcap:
        c = x.div_(softcap) if scratch else torch.div(x, softcap)
        grad.div_(c.cosh_().square_())
    return grad.div_(temperature) if temperature != 1.0 else grad


def shifted(z: torch.Tensor, m: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``z - m`` for the row maxima ``m`` (rows, 1), exactly 0 where ``z == m``: a finite
    difference of equal numbers is 0 already, and ``inf - inf`` (a row whose max is
    infinite) is set to 0 (a +inf logit is its own max: the finite limit, not NaN).
    Setting every NaN to 0 is safe: a NaN logit makes its row's max NaN (``max``
    propagates NaN), and the max carries the NaN into the loss and the gradient.
    ``inplace``: overwrite ``z`` (a work buffer of the caller's); no other scratch."""
    zz = z.sub_(m) if inplace else z - m
    return zz.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def _row_dot(a: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij sigma_ij`` per row, for ``sigma`` of shape (V_r,) or (rows, V_r),
    without an (rows, V_r) temporary."""
    if smooth.dim() == 1:
        return a @ smooth
    return torch.bmm(a.unsqueeze(1), smooth.unsqueeze(2)).view(-1)


def _row_sum(smooth: torch.Tensor, rows: int) -> torch.Tensor:
    return smooth.sum().expand(rows) if smooth.dim() == 1 else smooth.sum(dim=1)


def local_stats(
    z: torch.Tensor,
    yl: torch.Tensor,
    owned: torch.Tensor,
    wl: Optional[torch.Tensor],
    smooth: Optional[torch.Tensor],
    layout: Layout,
    inplace: bool = False,
) -> torch.Tensor:
    """The ``(rows, K)`` statistics of local (transformed) logits ``z`` (rows, V_r); see
    the module doc.

    ``yl``: the target's local index (any valid index where not ``owned``), ``owned``:
    the target lies in this shard (and the row is kept), ``wl``: local class weights,
    ``smooth``: local :math:`\\sigma` ((V_r,) or (rows, V_r)) or None. One ``(rows, V_r)``
    work buffer (``z`` itself with ``inplace``; one more for the entropy column): the
    shifted logits become their exponentials in place."""
    m, k = z.max(dim=1, keepdim=True)
    zz = shifted(z, m, inplace)
    t = torch.where(owned, -zz.gather(1, yl.unsqueeze(1)).squeeze(1), _zero(z))
    o = owned.to(z.dtype)
    cols = [m.squeeze(1), None, t, o]
    if layout.weighted:
        cols.append(torch.where(owned, wl.gather(0, yl), _zero(z)))
    if layout.smoothing:
        cols.append(-_row_dot(zz, smooth))  # sum_j sigma_j (m - z_j)
        cols.append(_row_sum(smooth, z.shape[0]))
    if layout.entropy:
        # B_r = sum_j e^{z_j - m} (m - z_j): a -inf logit has e_j = 0 and adds 0 (not 0 * inf)
        zz.clamp_(min=torch.finfo(zz.dtype).min)
        e = torch.exp(zz)
        cols.append(-torch.bmm(e.unsqueeze(1), zz.unsqueeze(2)).view(-1))
        e = e.scatter_(1, k, 0.0)
    else:
        e = zz.exp_().scatter_(1, k, 0.0)  # e^{z - m}, the arg-max left out
    cols[1] = e.sum(dim=1)
    if layout.accuracy:
        cols.append((owned & (k.squeeze(1) == yl)).to(z.dtype))
    return torch.stack(cols, dim=1)


class Combined(NamedTuple):
    """Per-row results of :func:`combine`, identical on every rank."""

    loss: torch.Tensor  # (N,) per-row loss: c nll_y + sum_j sigma_j nll_j
    den: torch.Tensor  # (N,) per-row ``mean`` denominator weight
    M: torch.Tensor  # (N,) global max
    S: torch.Tensor  # (N,) S' of the global max
    c: torch.Tensor  # (N,) target coefficient (1 - eps) w_y
    A: torch.Tensor  # (N,) sum of all coefficients a_ij
    mine: torch.Tensor  # (N,) bool: this rank holds the global arg-max
    rest_other: torch.Tensor  # (N,) sum of the coefficients held by the other ranks
    lse: torch.Tensor  # (N,) M + log1p(S'), 0 at ignored rows
    ent: torch.Tensor  # (N,) entropy, 0 at ignored rows (0 without the ``B`` column)
    BA: torch.Tensor  # (N,) B / (1 + S') (0 without the ``B`` column)
    correct: torch.Tensor  # (N,) bool: the global arg-max is the target (False without ``a``)


def combine(G: torch.Tensor, keep: torch.Tensor, eps: float, layout: Layout, rank: int) -> Combined:
    """The loss and the per-row quantities of the backward from the gathered ``(P, N, K)`` table."""
    m, s, t, o = G[..., 0], G[..., 1], G[..., 2], G[..., 3]
    P = G.shape[0]
    M, owner = m.max(dim=0)
    is_owner = torch.arange(P, device=G.device).unsqueeze(1) == owner.unsqueeze(0)
    gap = torch.where(m == M, torch.zeros_like(m), M - m)  # >= 0; 0 for a shared +inf max
    scale = torch.exp(-gap)
    S = torch.where(is_owner, s, (1 + s) * scale).sum(dim=0)
    L1 = torch.log1p(S)
    T = torch.where(o > 0, gap + t, torch.zeros_like(t)).sum(dim=0)  # not 0 * inf: a shard's max may be -inf
    if not layout.index:
        den = keep.to(G.dtype)
    elif layout.weighted:
        den = G[..., layout.col("w")].sum(dim=0) + 0.0
    else:
        den = keep.to(G.dtype)
    if not layout.index:
        c = torch.zeros_like(den)
    else:
        c = den * (1 - eps) if eps else den
    nlp_y = T + L1
    loss = torch.where(c == 0, torch.zeros_like(c), c * nlp_y)
    A = c
    rest_other = torch.where(is_owner, torch.zeros_like(o), o).sum(dim=0) * c
    if layout.smoothing:
        d, Wr = G[..., layout.col("d")], G[..., layout.col("W")]
        Wt = Wr.sum(dim=0)
        loss = loss + ((d + Wr * gap).sum(dim=0) + Wt * L1)
        A = c + Wt
        rest_other = rest_other + torch.where(is_owner, torch.zeros_like(Wr), Wr).sum(dim=0)
    zero = torch.zeros_like(loss)
    loss = torch.where(keep, loss, zero)
    lse = torch.where(keep, M + L1, zero)
    if layout.entropy:
        Br = G[..., layout.col("B")]
        # each shard's B rescaled to the global max; a shard whose scale underflows (or whose
        # max is -inf) adds 0, not 0 * inf
        B = torch.where(scale > 0, scale * (Br + gap * (1 + s)), torch.zeros_like(Br)).sum(dim=0)
        BA = B / (1 + S)
        ent = torch.where(keep, BA + L1, zero)
    else:
        BA, ent = zero, zero
    if layout.accuracy:
        correct = keep & (torch.where(is_owner, G[..., layout.col("a")], torch.zeros_like(m)).sum(dim=0) > 0)
    else:
        correct = torch.zeros_like(keep)
    return Combined(loss, den, M, S, c, A, owner == rank, rest_other, lse, ent, BA, correct)


def rows_of(r: Combined, sl: slice) -> Combined:
    """The rows ``sl`` of every per-row field."""
    return Combined(*(v[sl] for v in r))


def local_grad(
    z: torch.Tensor,
    yl: torch.Tensor,
    owned: torch.Tensor,
    smooth: Optional[torch.Tensor],
    keep: torch.Tensor,
    r: Combined,
    g: Optional[torch.Tensor],
    g_lse: Optional[torch.Tensor] = None,
    g_ent: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> torch.Tensor:
    r"""``d (g loss + g_lse lse + g_ent H) / d z_ij`` for local (transformed) logits ``z``
    (rows of ``r``'s rows); ``g``, ``g_lse``, ``g_ent`` per row or None (zero).

    At the global arg-max, on its rank, when it dominates (:math:`S' < 1`) the loss part
    :math:`A_i p_{ik} - a_{ik}` is evaluated as :math:`(A_i - a_{ik}) - A_i S'/(1 + S')`
    with :math:`A_i - a_{ik}` summed from the other coefficients (as the single-process
    backward does): no cancellation in ``p - 1``. One ``(rows, V_r)`` buffer (``z`` itself
    with ``inplace``), updated in place; one more with ``g_ent``."""
    zero = torch.zeros((), dtype=z.dtype, device=z.device)

    def kept(v):
        return zero.expand(keep.shape) if v is None else torch.where(keep, v, zero)

    gl, gh, gk = kept(g_lse), kept(g_ent), kept(g)
    M = r.M.unsqueeze(1)
    S = r.S.unsqueeze(1)
    A = r.A.unsqueeze(1)
    c_here = torch.where(owned, r.c, zero)
    _, k = z.max(dim=1, keepdim=True)
    coef = gk * r.A + gl  # the coefficient of p_j
    t = shifted(z, M, inplace)  # z - M <= 0
    if g_ent is None:
        grad = t.exp_().div_(1 + S).mul_(coef.unsqueeze(1))
    else:
        # p_j (coef - g_H B/(1+S') - g_H (z_j - M)); p_j = 0 at a -inf logit: 0, not 0 * inf
        p = torch.exp(t).div_(1 + S)
        zero_p = p == 0
        grad = p.mul_(t.mul_(-gh.unsqueeze(1)).add_((coef - gh * r.BA).unsqueeze(1))).masked_fill_(zero_p, 0.0)
        del t
    if smooth is not None:
        grad.addcmul_(smooth, gk.unsqueeze(1), value=-1.0)
    grad.scatter_add_(1, yl.unsqueeze(1), -(c_here * gk).unsqueeze(1))
    k1 = k.squeeze(1)
    a_rest = torch.where(owned & (yl != k1), r.c, zero) + r.rest_other
    if smooth is not None:
        sk = smooth.gather(0, k1) if smooth.dim() == 1 else smooth.gather(1, k).squeeze(1)
        a_rest = a_rest + (_row_sum(smooth, z.shape[0]) - sk)
    Sd = S / (1 + S)
    dom = gk.unsqueeze(1) * (a_rest.unsqueeze(1) - A * Sd) + ((gl - gh * r.BA).unsqueeze(1) / (1 + S))
    g_k = torch.where(r.mine.unsqueeze(1) & (S < 1), dom, grad.gather(1, k))
    grad.scatter_(1, k, g_k)
    return grad.masked_fill_(~keep.unsqueeze(1), 0.0)
