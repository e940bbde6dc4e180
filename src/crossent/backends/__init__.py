"""Backends own speed; ``crossent.functional`` owns meaning. See ``_registry``.

Every backend is registered here, once, with all of its ops, where it runs and its
declared :class:`Capabilities`: this table is the whole answer to "what can each backend
do". Design notes: ``docs/design.md``, section ``crossent.backends``.
"""

import dataclasses
from typing import Callable, Dict

from . import chunked, lm_head, reference
from . import linear as _linear
from . import triton as triton_backend
from ._registry import (
    Backend,
    BackendUnavailableError,
    Capabilities,
    available_backends,
    backend_for,
    capabilities,
    dispatch,
    register,
    resolve,
)
from . import ops  # the crossent:: torch.library ops (under capture, and the LM-head ops)


def _cpu_only(device):
    return None if device.type == "cpu" else f"it runs on CPU tensors only, got a {device.type} tensor"


def _any_device(device):
    return None


#: The fused loss ops of ``chunked``, ``chunked-torch`` and ``triton`` (``chunked.make_ops``):
#: the cross-entropy ops take ``reduction=`` and (``cross_entropy``) (N, C, S) logits, the
#: BCE ops ``sum_only=``.
FUSED = Capabilities(cross_entropy_spatial=True, cross_entropy_reduction=True, bce_sum_only=True)

# LM-head options (z_loss, softcap, temperature, ...): ``reference`` (full logits, autograd),
# ``chunked`` (the registered row-block ops with the blocks in the compiled C kernel, CPU)
# and ``chunked-torch`` (the same ops in plain torch ops, any device) compute them. The
# Triton kernels do not, so on CUDA the automatic choice skips ``triton`` and an explicit
# ``backend='triton'`` raises BackendUnavailableError naming the backends that can.


def _lm_head_ops(backend: str) -> Dict[str, Callable]:
    """``lm_head`` and ``lm_head_loss`` through the registered ops
    ``crossent::lm_head_forward`` (row blocks, never (N, C); bodies in :mod:`.lm_head`) and
    ``crossent::lm_head_loss_fused`` (the summed loss with its gradients from the same
    pass: ``(total, lse, correct)``), their blocks computed by ``backend``'s kernels."""

    def lm_head_op(x, W, b, y, keep, sigma, temperature, softcap, rows):
        return ops.lm_head(x, W, b, y, keep, sigma, float(temperature), float(softcap or 0.0), int(rows), backend)

    def lm_head_loss_op(x, W, b, y, keep, sigma, c_nll, c_sm, c_z, temperature, softcap, rows):
        return ops.lm_head_loss(
            x, W, b, y, keep, sigma, c_nll, c_sm, c_z, float(temperature), float(softcap or 0.0), int(rows), backend
        )

    return {"lm_head": lm_head_op, "lm_head_loss": lm_head_loss_op}


register(
    Backend(
        name="reference",
        priority=0,
        ops={
            "binary_cross_entropy": reference.binary_cross_entropy,
            "binary_cross_entropy_with_logits": reference.binary_cross_entropy_with_logits,
            "cross_entropy": reference.cross_entropy,
            **_linear.OPS_REFERENCE,  # unfused: the full (N, C) logits
            "lm_head": lm_head.lm_head_unfused,
        },
        capabilities=Capabilities(),
    )
)

register(
    Backend(
        name="chunked",
        priority=10,
        ops={**chunked.OPS, **_linear.OPS_CPU, **_lm_head_ops("chunked")},
        unavailable=_cpu_only,
        capabilities=dataclasses.replace(FUSED, lm_head_loss=True),
    )
)


# The same fused autograd with the compiled kernel never used (the chunked torch-ops
# fallback), selectable by name, e.g. CROSSENT_BACKEND=chunked-torch. Its loss ops run on
# CPU only (where ``chunked`` wins the automatic choice); its fused linear and LM-head ops
# are plain torch ops on any device: the CUDA fallback without Triton, outranking the
# unfused ``reference``.
_CHUNKED_TORCH_ANY_DEVICE: Dict[str, Callable] = {
    **_linear.OPS_CHUNKED,
    **_lm_head_ops("chunked-torch"),
}
register(
    Backend(
        name="chunked-torch",
        priority=1,
        ops={**chunked.TORCH_OPS, **_CHUNKED_TORCH_ANY_DEVICE},
        unavailable=_cpu_only,
        op_unavailable={op: _any_device for op in _CHUNKED_TORCH_ANY_DEVICE},
        capabilities=dataclasses.replace(FUSED, lm_head_loss=True),
    )
)

register(
    Backend(
        name="triton",
        priority=20,
        ops={**triton_backend.OPS, **triton_backend.LINEAR_OPS},
        unavailable=triton_backend.unavailable_reason,
        capabilities=FUSED,
    )
)

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Capabilities",
    "available_backends",
    "backend_for",
    "capabilities",
    "dispatch",
    "register",
    "resolve",
]
