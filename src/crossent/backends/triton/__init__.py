"""Triton backend: fused loss + gradient kernels for CUDA tensors.
Design notes: ``docs/design.md``, section ``crossent.backends.triton``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .. import chunked

# Largest class tile of the cross-entropy kernel (see kernels.py); tests lower it to make
# small rows span several tiles.
CE_BLOCK_C_MAX = 4096
BLOCK = 1024


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton backend can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"it runs on CUDA tensors only (got a {device.type} tensor)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'crossent[triton]')"
    return None


def _kernels():
    from . import kernels

    return kernels


def _flat(t: torch.Tensor, shape) -> torch.Tensor:
    return t.expand(shape).contiguous().view(-1)


def _elementwise(probabilities: bool):
    """The forward of BCE on probabilities or on logits (``kernels.bce_kernel``)."""

    def forward(x, t, weight, pos_weight, keep, sum_only=False, scale=None):  # scale: see Kernels.prescale
        if x.dtype == torch.float64:
            chunk = chunked._bce_chunk if probabilities else chunked._bce_with_logits_chunk
            return chunked._elementwise_forward(chunk, x, t, weight, pos_weight, keep, sum_only)
        k = _kernels()
        shape = x.shape
        n = x.numel()
        xf = x.contiguous().view(-1)
        tf = _flat(t, shape)
        L = 1
        pw = None
        if pos_weight is not None:
            if x.dim() >= 1 and pos_weight.numel() == shape[-1] and pos_weight.shape[-1:] == shape[-1:]:
                pw, L = pos_weight.contiguous().view(-1), shape[-1]  # one weight per label, cycled
            else:
                pw, L = _flat(pos_weight, shape), max(n, 1)
        w = None if weight is None else _flat(weight, shape)
        kp = None if keep is None else _flat(keep, shape).view(torch.uint8)
        grad = torch.empty_like(xf)
        nblocks = triton_cdiv(n, BLOCK)
        loss = torch.empty(nblocks if sum_only else n, dtype=torch.float32, device=x.device)
        if n:
            k.bce_kernel[(nblocks,)](
                xf,
                tf,
                pw if pw is not None else xf,
                w if w is not None else xf,
                kp if kp is not None else xf,
                loss,
                grad,
                n,
                L,
                PROBS=probabilities,
                HAS_PW=pw is not None,
                HAS_W=w is not None,
                HAS_KEEP=kp is not None,
                SUM_ONLY=sum_only,
                BLOCK=BLOCK,
                num_warps=4,
            )
        grad = grad.view(shape)
        if sum_only:
            return loss.sum(dtype=torch.float64).to(x.dtype), grad
        return loss.view(shape).to(x.dtype), grad

    return forward


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _ce_forward(x, q, y, c, smooth, keep, want_grad: bool, grad_out=None, scale=None):
    # scale is ignored: KERNELS.prescale is False (reading grad_output would sync the GPU)
    if x.dtype == torch.float64:
        return chunked._ce_forward(x, q, y, c, smooth, keep, want_grad, grad_out)
    k = _kernels()
    M, C = x.shape
    if x.stride(1) != 1 and C > 1:  # the kernel walks a row with unit stride
        if grad_out is x:  # in-place on an odd layout: compute in a copy, write back
            tmp = x.contiguous()
            loss, _ = _ce_forward(tmp, q, y, c, smooth, keep, want_grad, grad_out=tmp)
            x.copy_(tmp)
            return loss, x
        x = x.contiguous()
    if want_grad and grad_out is None:
        grad_out = torch.empty_like(x)
    loss = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return loss, grad_out
    block_c = min(CE_BLOCK_C_MAX, 1 << max(0, (C - 1).bit_length()))
    dummy = x
    kp = None if keep is None else keep.contiguous().view(torch.uint8)  # ignored rows: 0 loss, 0 gradient
    k.ce_kernel[(M,)](
        x,
        q.contiguous() if q is not None else dummy,
        y.long() if y is not None else dummy,
        c.float() if c is not None else dummy,
        smooth.float().contiguous() if smooth is not None else dummy,
        kp if kp is not None else dummy,
        loss,
        grad_out if want_grad else dummy,
        C,
        x.stride(0),
        grad_out.stride(0) if want_grad else 0,
        DENSE=q is not None,
        HAS_SMOOTH=smooth is not None,
        HAS_KEEP=kp is not None,
        WANT_GRAD=want_grad,
        BLOCK_C=block_c,
        num_warps=8 if block_c >= 2048 else 4,
    )
    return loss.to(x.dtype), grad_out


KERNELS = chunked.Kernels(_elementwise(False), _elementwise(True), _ce_forward)
OPS = chunked.make_ops(KERNELS)
binary_cross_entropy = OPS["binary_cross_entropy"]
binary_cross_entropy_with_logits = OPS["binary_cross_entropy_with_logits"]
cross_entropy = OPS["cross_entropy"]
cross_entropy_inplace = OPS["cross_entropy_inplace"]


def _linear_op(name):
    """The Triton fused linear op ``name`` of :mod:`.linear`, imported on first call (it
    imports ``triton``, which ``import crossent`` never does)."""

    def call(*args):
        from . import linear

        return getattr(linear, name)(*args)

    call.__name__ = name
    return call


LINEAR_OPS: Dict[str, Callable] = {
    "linear_cross_entropy": _linear_op("linear_cross_entropy_chunked"),
    "linear_binary_cross_entropy_with_logits": _linear_op("linear_bce_with_logits_chunked"),
}
