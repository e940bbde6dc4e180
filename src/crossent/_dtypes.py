"""The compute-dtype rule, in one place: float64 is computed in float64, every other floating
dtype (float32, float16, bfloat16) in float32, and results are cast back to the caller's dtype;
and the value ``1 / n`` that autograd sends through ``mean`` in such a dtype (``mean_grad_scale``).

>>> import torch
>>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
(torch.float32, torch.float64)
"""

from __future__ import annotations

import struct

import torch

#: The dtypes computed in float32 and rounded once at the end.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32/fp16/bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_low_precision(dtype: torch.dtype) -> bool:
    """True for float16 and bfloat16, the dtypes whose arithmetic runs in float32."""
    return dtype in LOW_PRECISION


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]


def mean_grad_scale(n: int, dtype: torch.dtype) -> float:
    """The grad_output a plain ``loss.backward()`` sends to each of ``n`` elements through
    ``mean`` = ``sum / n`` (no other denominator), as autograd computes it: ``1 / n`` in
    ``dtype`` (float32 or float64). Computed on the host, no torch call: in float32, 1 and
    float32(n) are float32 values, and their quotient computed in double then rounded to
    float32 is the float32 quotient (double has more than 2 x 24 + 2 bits). Fused backends
    pre-scale their gradient by it; backward checks the value it really receives."""
    if dtype == torch.float64:
        return 1.0 / n
    return _f32(1.0 / _f32(float(n)))
