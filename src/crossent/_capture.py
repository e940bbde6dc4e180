"""Is this loss call being captured or transformed? One answer, asked once per call.

crossent has two ways to run a loss:

* **eager** (the common case): the fused autograd Functions of :mod:`crossent.backends`,
  with value checks that read results on the host (rich messages, one read per call) and
  the small-input shortcuts that read CPU scalars;
* **captured**: while ``torch.compile`` / ``torch.export`` trace the call, while
  ``torch.jit.trace`` records it, while a ``torch.func`` transform (``grad``, ``vmap``,
  ``jacrev``, ``jvp``) runs it, while a CUDA graph is being captured, or when the tensors
  are fake (``FakeTensorMode``). Then nothing may read a tensor's value on the host:
  kernels run as registered ``torch.library`` ops (:mod:`crossent.backends.ops`), value
  checks become device-side assertions (``torch._assert_async``), denominators stay 0-d
  tensors. Under ``torch.func`` transforms the plain-torch ``reference`` formulas run
  (their autograd Functions have vmap and forward-mode rules).
"""

from __future__ import annotations

import torch

try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover - very old torch
    _FakeTensor = ()


def transforming() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jacrev, jvp, ...)."""
    return torch._C._are_functorch_transforms_active()


def capturing(x: torch.Tensor) -> bool:
    """True when the loss call on ``x`` must not read tensor values on the host."""
    if torch.compiler.is_compiling():  # constant True while Dynamo traces (no guard, no break)
        return True
    if torch.jit.is_tracing() or transforming() or isinstance(x, _FakeTensor):
        return True
    if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return True  # tensor subclasses (functorch wrappers, DTensor, ...): no host reads
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
