r"""Triton kernels of the focal and Poly-1 losses (:mod:`crossent.backends.focal` has the
math): loss and gradient w.r.t. the logits in one launch, float32 inside.

* ``binary_focal_kernel``: elementwise, ``BLOCK`` = 1024 elements per program (as the BCE
  kernel). :math:`(1-p_t)^\gamma` for :math:`\gamma = k/2` (``HALF2 = k`` <= 20) is k/2
  products and one correctly rounded square root (``sqrt_rn``): a few ulp, like the CPU
  kernel; other gammas use ``exp2(gamma * log2(m))`` (relative error about
  :math:`\gamma |\log m|` ulp).
* ``softmax_focal_kernel``: one program per row, tiles of ``BLOCK_C`` classes (at most 4096):
  pass 1 is the cross-entropy kernel's online max / arg-max / sum, pass 2 sums the loss and
  :math:`\sum_c a_c \varphi'_c`, pass 3 writes the gradient
  :math:`p_j \sum_c a_c\varphi'_c - a_j\varphi'_j`, its arg-max entry without cancellation.
  :math:`1 - p_c` is :math:`s/(1+s)` at the arg-max and :math:`1 - p_c` (:math:`p_c \le 1/2`)
  elsewhere: never the cancelling ``1 - softmax`` near 1.

The tensor wrappers take float32 (or fp16/bf16) rows; float64 runs the chunked torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import _log1p, _online_max_sum, _softplus_sigmoid, _times, _weigh_and_store

BLOCK = 1024
BLOCK_C_MAX = 4096


@triton.jit
def _pow(m, gamma, HALF2: tl.constexpr):
    if HALF2 >= 0:
        r = tl.full(m.shape, 1.0, tl.float32)
        for _ in tl.static_range(HALF2 // 2):
            r = r * m
        if HALF2 % 2 == 1:
            r = r * tl.sqrt_rn(m)
    else:
        r = tl.exp2(gamma * tl.log2(m))
    return r


@triton.jit
def binary_focal_kernel(
    x_ptr,
    t_ptr,
    pw_ptr,
    w_ptr,
    keep_ptr,
    loss_ptr,
    grad_ptr,
    n,
    L,
    alpha,
    gamma,
    eps,
    HAS_PW: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HALF2: tl.constexpr,
    HAS_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_KEEP:
        kk = tl.load(keep_ptr + offs, mask=mask, other=0)
        x = tl.where(kk != 0, x, 0.0)
        t = tl.where(kk != 0, t, 0.0)
    sp_pos, sp_neg, s, u = _softplus_sigmoid(x)
    p = t
    if HAS_PW:
        p = t * tl.load(pw_ptr + offs % L, mask=mask, other=1.0).to(tl.float32)
    omt = 1.0 - t
    ce = _times(p, sp_neg) + _times(omt, sp_pos)
    grad = omt * s - p * u
    m = t * u + omt * s
    sign = 1.0 - 2.0 * t
    loss = ce
    if HAS_GAMMA:
        mg = _pow(m, gamma, HALF2)
        rr = (s * u) / tl.maximum(m, 1.17549435e-38)
        rr = tl.where(t >= 1.0, s, tl.where(t <= 0.0, u, rr))
        grad = mg * (grad + gamma * _times(ce, rr) * sign)
        loss = _times(mg, ce)
    if HAS_ALPHA:
        a = alpha * t + (1.0 - alpha) * omt
        loss = a * loss
        grad = a * grad
    if HAS_EPS:
        loss = loss + eps * m
        grad = grad + eps * (s * u) * sign
    _weigh_and_store(loss, grad, offs, mask, pid, w_ptr, keep_ptr, loss_ptr, grad_ptr, HAS_W, HAS_KEEP, False)


def _flat(v: torch.Tensor, shape) -> torch.Tensor:
    return v.expand(shape).contiguous().view(-1)


def _half2(gamma: float) -> int:
    k = 2 * gamma
    return int(k) if float(k).is_integer() and k <= 20 else -1


def binary_focal_forward(x, t, weight, pos_weight, keep, alpha: float, gamma: float, epsilon: float):
    """(per-element loss, gradient) of the binary family; float32 results."""
    shape = x.shape
    n = x.numel()
    xf = x.contiguous().view(-1)
    tf = _flat(t, shape)
    L, pw = 1, None
    if pos_weight is not None:
        if x.dim() >= 1 and pos_weight.numel() == shape[-1] and pos_weight.shape[-1:] == shape[-1:]:
            pw, L = pos_weight.contiguous().view(-1), shape[-1]  # one weight per label, cycled
        else:
            pw, L = _flat(pos_weight, shape), max(n, 1)
    w = None if weight is None else _flat(weight, shape)
    kp = None if keep is None else _flat(keep, shape).view(torch.uint8)
    grad = torch.empty_like(xf, dtype=torch.float32)
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        binary_focal_kernel[(triton.cdiv(n, BLOCK),)](
            xf,
            tf,
            pw if pw is not None else xf,
            w if w is not None else xf,
            kp if kp is not None else xf,
            loss,
            grad,
            n,
            L,
            float(alpha),
            float(gamma),
            float(epsilon),
            HAS_PW=pw is not None,
            HAS_W=w is not None,
            HAS_KEEP=kp is not None,
            HAS_ALPHA=alpha >= 0,
            HAS_GAMMA=gamma != 0,
            HALF2=_half2(gamma),
            HAS_EPS=epsilon != 0,
            BLOCK=BLOCK,
            num_warps=4,
        )
    return loss.view(shape).to(x.dtype), grad.view(shape).to(x.dtype)


@triton.jit
def _phi_slope(x, m, lse, inv, s, cols, k, param, POLY: tl.constexpr, HALF2: tl.constexpr):
    """phi(n_c) and phi'(n_c) of a tile (see crossent.backends.focal), and p_c."""
    z = tl.where(x == m, 0.0, x - m)
    nll = lse - z
    p = tl.exp(z) * inv
    om = tl.where(cols == k, s * inv, 1.0 - p)  # 1 - p_c: exact at the arg-max, p <= 1/2 elsewhere
    if POLY:
        phi = nll + param * om
        slope = 1.0 + param * p
    else:
        mg = _pow(om, param, HALF2)
        ratio = tl.where(om > 0.0, nll * p / tl.maximum(om, 1.17549435e-38), 1.0)  # n / expm1(n)
        phi = _times(mg, nll)
        slope = mg * (1.0 + param * ratio)
    return phi, slope, p


@triton.jit
def _tile(xr, qr, sm_ptr, cols, msk, keep, y, cy, m, lse, inv, s, k, param, DENSE, HAS_SMOOTH, HAS_KEEP, POLY, HALF2):
    """One class tile of a row: phi, phi', p (:func:`_phi_slope`) and the coefficients a_c
    (the probability target, or the target's c_y plus the smoothing term)."""
    x = tl.load(xr + cols, mask=msk, other=0.0).to(tl.float32)
    if HAS_KEEP:
        x = tl.where(keep == 0, 0.0, x)
    phi, slope, p = _phi_slope(x, m, lse, inv, s, cols, k, param, POLY, HALF2)
    if DENSE:
        a = tl.load(qr + cols, mask=msk, other=0.0).to(tl.float32)
    else:
        a = tl.where(cols == y, cy, 0.0)
        if HAS_SMOOTH:
            a = a + tl.load(sm_ptr + cols, mask=msk, other=0.0).to(tl.float32)
    return phi, slope, p, a


@triton.jit
def softmax_focal_kernel(
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
    param,
    DENSE: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    POLY: tl.constexpr,
    HALF2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    gr = grad_ptr + row * stride_x
    qr = q_ptr + row * stride_x
    cols0 = tl.arange(0, BLOCK_C)
    keep = 1
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row)
    # ---- pass 1 (the cross-entropy kernel's): max m, first arg-max k, s = sum_{j != k} exp(x_j - m)
    m = -float("inf")
    k = -1
    s = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        msk = cols < C
        x = tl.load(xr + cols, mask=msk, other=-float("inf")).to(tl.float32)
        if HAS_KEEP:
            x = tl.where(msk & (keep == 0), 0.0, x)
        m, k, s = _online_max_sum(x, msk, cols, m, k, s)
    lse = _log1p(s)
    inv = 1.0 / (1.0 + s)
    cy = 0.0
    y = -1
    if not DENSE:
        y = tl.load(y_ptr + row)
        cy = tl.load(c_ptr + row).to(tl.float32)
    # ---- pass 2: loss = sum_c a_c phi_c, total = sum_c a_c phi'_c, and the arg-max's share
    loss = 0.0
    total = 0.0
    ab_k = 0.0
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        msk = cols < C
        phi, slope, p, a = _tile(
            xr, qr, sm_ptr, cols, msk, keep, y, cy, m, lse, inv, s, k, param, DENSE, HAS_SMOOTH, HAS_KEEP, POLY, HALF2
        )
        ab = tl.where(msk, _times(a, slope), 0.0)
        loss += tl.sum(tl.where(msk, _times(a, phi), 0.0), axis=0)
        total += tl.sum(ab, axis=0)
        ab_k += tl.sum(tl.where(cols == k, ab, 0.0), axis=0)
    # ---- pass 3: gradient p_j total - a_j phi'_j; arg-max: p_k (total - ab_k) - ab_k s/(1+s)
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        msk = cols < C
        phi, slope, p, a = _tile(
            xr, qr, sm_ptr, cols, msk, keep, y, cy, m, lse, inv, s, k, param, DENSE, HAS_SMOOTH, HAS_KEEP, POLY, HALF2
        )
        g = total * p - _times(a, slope)
        g = tl.where(cols == k, p * (total - ab_k) - ab_k * (s * inv), g)
        g = tl.where(keep != 0, g, 0.0)
        tl.store(gr + cols, g, mask=msk)
    loss = tl.where(keep != 0, loss, 0.0)
    tl.store(loss_ptr + row, loss)


def softmax_focal_forward(x, q, y, c, smooth, keep, kind: str, param: float):
    """(per-row loss (M,), gradient (M, C)) of the softmax family for rows ``x`` (M, C)."""
    x = x.contiguous()
    M, C = x.shape
    grad = torch.empty_like(x, dtype=torch.float32)
    loss = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return loss, grad
    block_c = min(BLOCK_C_MAX, 1 << max(0, (C - 1).bit_length()))
    kp = None if keep is None else keep.contiguous().view(torch.uint8)
    softmax_focal_kernel[(M,)](
        x,
        q.contiguous() if q is not None else x,
        y.long().contiguous() if y is not None else x,
        c.float().contiguous() if c is not None else x,
        smooth.float().contiguous() if smooth is not None else x,
        kp if kp is not None else x,
        loss,
        grad,
        C,
        x.stride(0),
        float(param),
        DENSE=q is not None,
        HAS_SMOOTH=smooth is not None,
        HAS_KEEP=kp is not None,
        POLY=kind == "poly",
        HALF2=_half2(param) if kind != "poly" else 0,
        BLOCK_C=block_c,
        num_warps=8 if block_c >= 2048 else 4,
    )
    return loss.to(x.dtype), grad.to(x.dtype)
