"""Triton backend (CUDA). Placeholder until the kernels land."""

def unavailable_reason(device):
    return "not implemented yet"
