r"""Triton path of the fused linear + loss ops (CUDA; tested on CPU with TRITON_INTERPRET=1).
Design notes: ``docs/design.md``, section ``crossent.backends.triton.linear``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..linear.binary import linear_bce_with_logits_chunked as _linear_bce_with_logits_blocked
from ..linear.blocks import TorchBlocks
from ..linear.cross_entropy import linear_cross_entropy_chunked as _linear_cross_entropy_blocked
from .kernels import _times  # c * v with 0 * inf = 0, the one Triton form of the rule

# Largest class tile of the row kernels; tests lower it so rows span several tiles.
BLOCK_C_MAX = 4096


@triton.jit
def ce_block_stats_kernel(
    l_ptr,
    stride_l,
    Cc,
    c0,
    y_ptr,
    sm_ptr,
    m_out,
    k_out,
    s_out,
    t_out,
    dy_out,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    base = l_ptr + row * stride_l
    BIG: tl.constexpr = 2147483647
    m = -float("inf")
    k = BIG
    for start in range(0, Cc, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < Cc
        x = tl.load(base + cols, mask=mask, other=-float("inf"))
        bm = tl.max(x, 0)
        bk = tl.min(tl.where(mask & (x == bm), cols, BIG), 0)
        k = tl.where(bm > m, bk, k)
        m = tl.maximum(m, bm)
    k = tl.where(k == BIG, 0, k)
    s = 0.0
    t = 0.0
    for start in range(0, Cc, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < Cc
        x = tl.load(base + cols, mask=mask, other=-float("inf"))
        z = tl.where(x == m, 0.0, x - m)
        s += tl.sum(tl.where(mask & (cols != k), tl.exp(z), 0.0), 0)
        if HAS_SMOOTH:
            sig = tl.load(sm_ptr + c0 + cols, mask=mask, other=0.0)
            t += tl.sum(tl.where(mask, _times(sig, -z), 0.0), 0)
    y = tl.load(y_ptr + row) - c0
    inb = (y >= 0) & (y < Cc)
    xy = tl.load(base + tl.where(inb, y, 0))
    dy = tl.where(xy == m, 0.0, m - xy)
    tl.store(m_out + row, m)
    tl.store(k_out + row, k + c0)
    tl.store(s_out + row, s)
    tl.store(t_out + row, t)
    tl.store(dy_out + row, tl.where(inb, dy, 0.0))


@triton.jit
def ce_block_grad_kernel(
    l_ptr,
    stride_l,
    Cc,
    c0,
    m_ptr,
    k_ptr,
    s_ptr,
    a_ptr,
    ar_ptr,
    sc_ptr,
    y_ptr,
    c_ptr,
    srow_ptr,
    sm_ptr,
    HAS_SMOOTH: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    base = l_ptr + row * stride_l
    m = tl.load(m_ptr + row)
    k = tl.load(k_ptr + row) - c0
    s = tl.load(s_ptr + row)
    A = tl.load(a_ptr + row)
    gk = tl.load(ar_ptr + row) - A * (s / (1.0 + s))
    y = tl.load(y_ptr + row) - c0
    c = tl.load(c_ptr + row)
    if ROW_SCALE:
        scale = tl.load(sc_ptr + row)
    else:
        scale = tl.load(sc_ptr)
    pscale = A / (1.0 + s)
    srow = 0.0
    if HAS_SMOOTH:
        srow = tl.load(srow_ptr + row)
    for start in range(0, Cc, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < Cc
        x = tl.load(base + cols, mask=mask, other=0.0)
        z = tl.where(x == m, 0.0, x - m)
        g = tl.exp(z) * pscale
        g = g - tl.where(cols == y, c, 0.0)
        if HAS_SMOOTH:
            g = g - srow * tl.load(sm_ptr + c0 + cols, mask=mask, other=0.0)
        g = tl.where(cols == k, gk, g)
        tl.store(base + cols, g * scale, mask=mask)


@triton.jit
def bce_block_kernel(
    l_ptr,
    t_ptr,
    w_ptr,
    pw_ptr,
    keep_ptr,
    loss_ptr,
    Cc,
    stride_l,
    stride_t,
    stride_w,
    stride_pw,
    HAS_W: tl.constexpr,
    HAS_PW: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < Cc
    x = tl.load(l_ptr + row * stride_l + cols, mask=mask, other=0.0)
    t = tl.load(t_ptr + row * stride_t + cols, mask=mask, other=0.0)
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    l1 = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))  # log1p(e), exact for tiny e
    r = 1.0 / u
    neg = x < 0
    sp_pos = tl.maximum(x, 0.0) + l1  # softplus(x)
    sp_neg = tl.maximum(-x, 0.0) + l1  # softplus(-x)
    sig = tl.where(neg, e * r, r)  # sigmoid(x)
    sig_neg = tl.where(neg, r, e * r)  # sigmoid(-x)
    p = t
    if HAS_PW:
        p = t * tl.load(pw_ptr + row * stride_pw + cols, mask=mask, other=1.0)
    omt = 1.0 - t
    loss = _times(p, sp_neg) + _times(omt, sp_pos)
    grad = omt * sig - p * sig_neg
    if HAS_W:
        w = tl.load(w_ptr + row * stride_w + cols, mask=mask, other=0.0)
        loss = loss * w
        grad = grad * w
    if HAS_KEEP:
        kp = tl.load(keep_ptr + row * stride_t + cols, mask=mask, other=0)
        loss = tl.where(kp != 0, loss, 0.0)
        grad = tl.where(kp != 0, grad, 0.0)
    tl.store(loss_ptr + row * stride_l + cols, loss, mask=mask)
    if WANT_GRAD:
        tl.store(l_ptr + row * stride_l + cols, grad, mask=mask)


def _block_c(Cc):
    return min(BLOCK_C_MAX, triton.next_power_of_2(max(Cc, 16)))


def _warps(bc):
    return 8 if bc >= 2048 else 4


class TritonBlocks(TorchBlocks):
    """Per-block arithmetic in Triton kernels (class-index CE and BCE); float64 and
    probability targets use the inherited torch implementation."""

    @staticmethod
    def _native(logits, tgt):
        return logits.dtype == torch.float32 and (tgt is None or getattr(tgt, "index", True)) and logits.stride(1) == 1

    @staticmethod
    def ce_stats(logits, r0, r1, c0, c1, tgt, stats, dtype):
        if not TritonBlocks._native(logits, tgt):
            return TorchBlocks.ce_stats(logits, r0, r1, c0, c1, tgt, stats, dtype)
        R, Cc = logits.shape
        dev = logits.device
        mb, sb, tb, dy = (torch.empty(R, dtype=torch.float32, device=dev) for _ in range(4))
        kb = torch.empty(R, dtype=torch.int64, device=dev)
        has_smooth = tgt.smooth is not None
        y = tgt.y[r0:r1].contiguous()
        bc = _block_c(Cc)
        if R:
            ce_block_stats_kernel[(R,)](
                logits,
                logits.stride(0),
                Cc,
                c0,
                y,
                tgt.smooth if has_smooth else mb,
                mb,
                kb,
                sb,
                tb,
                dy,
                HAS_SMOOTH=has_smooth,
                BLOCK_C=bc,
                num_warps=_warps(bc),
            )
        inb = (y >= c0) & (y < c1)
        stats.dy[r0:r1] = torch.where(inb, dy, stats.dy[r0:r1])
        stats.my[r0:r1] = torch.where(inb, mb, stats.my[r0:r1])
        if has_smooth:
            srow = tgt.srow[r0:r1]
            tb = srow * tb
            wb = srow * tgt.smooth[c0:c1].sum()
        else:
            tb = wb = torch.zeros(R, dtype=dtype, device=dev)
        stats.merge(r0, r1, mb, kb, sb, tb, wb)
        return logits  # untouched: the gradient kernel re-reads the logits

    @staticmethod
    def ce_grad(logits, reused, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype):
        if not TritonBlocks._native(logits, tgt):
            if reused:  # torch's ce_grad(reused=True) expects e, the Triton stats left logits
                reused = False
            return TorchBlocks.ce_grad(logits, reused, r0, r1, c0, c1, tgt, stats, A, Arest, scale, dtype)
        R, Cc = logits.shape
        dev = logits.device
        if scale is None:
            scale = torch.ones((), dtype=torch.float32, device=dev)
        sc = scale.to(torch.float32).contiguous()
        has_smooth = tgt.smooth is not None
        c = tgt.c[r0:r1].to(torch.float32).contiguous()
        srow = tgt.srow[r0:r1].contiguous() if has_smooth else c
        bc = _block_c(Cc)
        if R:
            ce_block_grad_kernel[(R,)](
                logits,
                logits.stride(0),
                Cc,
                c0,
                stats.m[r0:r1].contiguous(),
                stats.k[r0:r1].contiguous(),
                stats.s[r0:r1].contiguous(),
                A.contiguous(),
                Arest.contiguous(),
                sc,
                tgt.y[r0:r1].contiguous(),
                c,
                srow,
                tgt.smooth if has_smooth else c,
                HAS_SMOOTH=has_smooth,
                ROW_SCALE=sc.dim() == 1,
                BLOCK_C=bc,
                num_warps=_warps(bc),
            )
        return logits

    @staticmethod
    def bce(logits, tgt, r0, r1, c0, c1, dtype, want_grad):
        if not TritonBlocks._native(logits, None):
            return TorchBlocks.bce(logits, tgt, r0, r1, c0, c1, dtype, want_grad)
        t, keep = tgt.block(r0, r1, c0, c1, dtype)
        w, pw = tgt.wblock(r0, r1, c0, c1, dtype)
        R, Cc = logits.shape
        t = t.contiguous()
        w = None if w is None else w.contiguous()
        pw = None if pw is None else pw.contiguous()
        kp = None if keep is None else keep.contiguous().view(torch.uint8)
        loss = torch.empty_like(logits)
        bc = min(1024, triton.next_power_of_2(max(Cc, 16)))
        if R:
            bce_block_kernel[(R, triton.cdiv(Cc, bc))](
                logits,
                t,
                w if w is not None else t,
                pw if pw is not None else t,
                kp if kp is not None else t,
                loss,
                Cc,
                logits.stride(0),
                t.stride(0),
                0 if w is None else w.stride(0),
                0 if pw is None else pw.stride(0),
                HAS_W=w is not None,
                HAS_PW=pw is not None,
                HAS_KEEP=kp is not None,
                WANT_GRAD=want_grad,
                BLOCK_C=bc,
                num_warps=4,
            )
        return loss, (logits if want_grad else None)


TRITON_BLOCKS = TritonBlocks()


def _with_triton(plan):
    return dataclasses.replace(plan, blocks=TRITON_BLOCKS)


def linear_cross_entropy_chunked(x, W, b, tgts, plan, grad_scale, precompute):
    return _linear_cross_entropy_blocked(x, W, b, tgts, _with_triton(plan), grad_scale, precompute)


def linear_bce_with_logits_chunked(x, W, b, tgt, plan, grad_scale, precompute, per_element):
    return _linear_bce_with_logits_blocked(x, W, b, tgt, _with_triton(plan), grad_scale, precompute, per_element)
