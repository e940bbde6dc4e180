r"""Triton kernels: loss and gradient in one pass, float32 inside (imported only when used).
Design notes: ``docs/design.md``, section ``crossent.backends.triton.kernels``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _times(c, v):
    # c * v with 0 * inf = 0: a term with zero weight is absent.
    return tl.where(c == 0.0, 0.0, c * v)


@triton.jit
def _softplus_sigmoid(x):
    """softplus(x), softplus(-x), sigmoid(x), sigmoid(-x) from one e = exp(-|x|): the
    softplus terms are max(+-x, 0) + log1p(e), the sigmoids 1/(1+e) and e/(1+e) by sign."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    # log1p(e) without cancellation for small e: log(1+e) * e / ((1+e) - 1)
    l1 = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    r = 1.0 / u
    neg = x < 0
    return (
        tl.maximum(x, 0.0) + l1,
        tl.maximum(-x, 0.0) + l1,
        tl.where(neg, e * r, r),
        tl.where(neg, r, e * r),
    )


@triton.jit
def _weigh_and_store(
    loss,
    grad,
    offs,
    mask,
    pid,
    w_ptr,
    keep_ptr,
    loss_ptr,
    grad_ptr,
    HAS_W: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    SUM_ONLY: tl.constexpr,
):
    """The BCE kernels' common tail: per-element weight, ignore mask (0 loss and gradient),
    store the gradient and the losses (or this block's sum)."""
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        loss = loss * w
        grad = grad * w
    if HAS_KEEP:
        k = tl.load(keep_ptr + offs, mask=mask, other=0)
        loss = tl.where(k != 0, loss, 0.0)
        grad = tl.where(k != 0, grad, 0.0)
    tl.store(grad_ptr + offs, grad, mask=mask)
    if SUM_ONLY:
        tl.store(loss_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + offs, loss, mask=mask)


@triton.jit
def bce_kernel(
    x_ptr,
    t_ptr,
    pw_ptr,
    w_ptr,
    keep_ptr,
    loss_ptr,
    grad_ptr,
    n,
    L,
    PROBS: tl.constexpr,
    HAS_PW: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    SUM_ONLY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BCE with logits (``PROBS`` False) or on probabilities (``PROBS`` True), one block of
    elements: loss and gradient w.r.t. ``x``, ``pw`` cycled over L labels."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.5).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = t
    if HAS_PW:
        p = t * tl.load(pw_ptr + offs % L, mask=mask, other=1.0).to(tl.float32)
    omt = 1.0 - t
    if PROBS:
        # torch's clamp of the logs at -100 and its gradient; x is the probability
        log_x = tl.maximum(tl.log(x), -100.0)
        q = 1.0 - x
        # log1p(-x) = log(1-x) * (-x) / ((1-x) - 1), exact also for tiny x
        log_1mx = tl.where(q == 1.0, -x, tl.log(q) * (-x) / (q - 1.0))
        log_1mx = tl.where(q == 0.0, -float("inf"), log_1mx)
        log_1mx = tl.maximum(log_1mx, -100.0)
        loss = -(p * log_x + omt * log_1mx)
        grad = (omt * x - p * (1.0 - x)) / tl.maximum(x * (1.0 - x), 1e-12)
    else:
        sp_pos, sp_neg, sig, sig_neg = _softplus_sigmoid(x)
        loss = _times(p, sp_neg) + _times(omt, sp_pos)
        grad = omt * sig - p * sig_neg
    _weigh_and_store(loss, grad, offs, mask, pid, w_ptr, keep_ptr, loss_ptr, grad_ptr, HAS_W, HAS_KEEP, SUM_ONLY)


@triton.jit
def _log1p(s):
    # log(1+s) * s / ((1+s) - 1): exact for tiny s (s >= 0)
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * s / (u - 1.0))


@triton.jit
def _online_max_sum(x, msk, cols, m, k, s):
    """One tile of the online row statistics: the max ``m``, the first arg-max ``k`` (-1
    before the first tile) and ``s = sum_{j != k} exp(x_j - m)`` (ties count 1)."""
    BIG: tl.constexpr = 2147483647
    mt = tl.max(x, axis=0)
    new_max = (mt > m) | (k < 0)
    # the reference point for this tile's exponentials
    ref = tl.where(new_max, mt, m)
    z = tl.where(x == ref, 0.0, x - ref)
    e = tl.where(msk, tl.exp(z), 0.0)
    kt = tl.min(tl.where((x == ref) & msk, cols, BIG), axis=0)
    # a new max: old sum and old arg-max (one more term, exp(0) = 1) rescaled, and the
    # tile's own arg-max excluded; otherwise every term of the tile counts (ties as 1).
    scale = tl.where(k < 0, 0.0, tl.exp(tl.where(m == mt, 0.0, m - mt)))
    e_excl = tl.where(cols == kt, 0.0, e)
    s_new = (s + 1.0) * scale + tl.sum(e_excl, axis=0)
    s_same = s + tl.sum(e, axis=0)
    s = tl.where(new_max, s_new, s_same)
    k = tl.where(new_max & (kt != BIG), kt, k)
    m = tl.where(new_max, mt, m)
    return m, k, s


@triton.jit
def ce_kernel(
    x_ptr,
    q_ptr,
    y_ptr,
    c_ptr,
    sm_ptr,
    keep_ptr,
    loss_ptr,
    grad_ptr,
    C,
    stride_x,
    stride_g,
    DENSE: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    gr = grad_ptr + row * stride_g
    qr = q_ptr + row * stride_x
    cols0 = tl.arange(0, BLOCK_C)

    # ---- pass 1: m, first arg-max k, s = sum_{j != k} exp(x_j - m), nan flag, A = sum a_j
    m = -float("inf")
    k = -1
    s = 0.0
    nan_count = 0
    A_dense = 0.0
    A_smooth = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        msk = cols < C
        x = tl.load(xr + cols, mask=msk, other=-float("inf")).to(tl.float32)
        nan_count += tl.sum((x != x).to(tl.int32), axis=0)
        if DENSE:
            A_dense += tl.sum(tl.load(qr + cols, mask=msk, other=0.0).to(tl.float32), axis=0)
        if HAS_SMOOTH:
            A_smooth += tl.sum(tl.load(sm_ptr + cols, mask=msk, other=0.0).to(tl.float32), axis=0)
        m, k, s = _online_max_sum(x, msk, cols, m, k, s)
    lse = _log1p(s)
    inv = 1.0 / (1.0 + s)

    keep = 1
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row)
    if DENSE:
        A = A_dense
        cy = 0.0
        y = -1
    else:
        y = tl.load(y_ptr + row)
        y_ok = (y >= 0) & (y < C)  # never read out of bounds: a bad target gives NaN
        cy = tl.load(c_ptr + row).to(tl.float32)
        A = cy + A_smooth
        xy = tl.load(xr + y, mask=y_ok, other=float("nan")).to(tl.float32)
        zy = tl.where(xy == m, 0.0, xy - m)

    # ---- pass 2: gradient, and the loss parts that need the final m
    loss = 0.0
    a_rest = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        msk = cols < C
        x = tl.load(xr + cols, mask=msk, other=0.0).to(tl.float32)
        z = tl.where(x == m, 0.0, x - m)
        nlp = lse - z
        if DENSE:
            a = tl.load(qr + cols, mask=msk, other=0.0).to(tl.float32)
            loss += tl.sum(tl.where(msk, _times(a, nlp), 0.0), axis=0)
        else:
            a = tl.where(cols == y, cy, 0.0)
            if HAS_SMOOTH:
                sm = tl.load(sm_ptr + cols, mask=msk, other=0.0).to(tl.float32)
                a = a + sm
                loss += tl.sum(tl.where(msk, _times(sm, nlp), 0.0), axis=0)
        a_rest += tl.sum(tl.where(msk & (cols != k), a, 0.0), axis=0)
        if WANT_GRAD:
            g = A * (tl.exp(z) * inv) - a
            g = tl.where(keep != 0, g, 0.0)
            tl.store(gr + cols, g, mask=msk)
    if not DENSE:
        loss += tl.where(cy == 0.0, 0.0, cy * (lse - zy))
    loss = tl.where((nan_count > 0) & (keep != 0), float("nan"), loss)
    loss = tl.where(keep != 0, loss, 0.0)
    tl.store(loss_ptr + row, loss)
    if WANT_GRAD:
        # arg-max entry: (A - a_k) - A s/(1+s), with A - a_k summed without cancellation
        gk = a_rest - A * (s * inv)
        gk = tl.where(keep != 0, gk, 0.0)
        tl.store(gr + k, gk, mask=k >= 0)
        if (nan_count > 0) & (keep != 0):
            for start in range(0, C, BLOCK_C):
                cols = start + cols0
                tl.store(gr + cols, float("nan"), mask=cols < C)
