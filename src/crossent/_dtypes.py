"""The compute-dtype rule, in one place: float64 is computed in float64, every other floating
dtype (float32, float16, bfloat16) in float32, and results are cast back to the caller's dtype.

>>> import torch
>>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
(torch.float32, torch.float64)
"""

from __future__ import annotations

import torch

#: The dtypes computed in float32 and rounded once at the end.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32/fp16/bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_low_precision(dtype: torch.dtype) -> bool:
    """True for float16 and bfloat16, the dtypes whose arithmetic runs in float32."""
    return dtype in LOW_PRECISION
