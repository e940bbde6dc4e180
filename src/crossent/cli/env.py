"""``crossent env``: versions, devices, backends and the compiled CPU kernel, for bug reports.
Design notes: ``docs/design.md``, section ``crossent.cli.env``.
"""

from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    pass


def _triton_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_kernel() -> str:
    from crossent.backends import chunked_cpp

    lib = chunked_cpp.get()
    reason = chunked_cpp.disabled_reason()
    if lib is None:
        return f"off, chunked torch ops instead ({reason or 'unavailable'})"
    line = f"compiled, loaded from {chunked_cpp.kernel_path()}"
    note = chunked_cpp.cache_note()
    if note:
        line += f" (a private temporary directory for this process: {note})"
    return line


def run(args) -> int:
    import torch

    import crossent
    from crossent.backends._registry import _BACKENDS, available_backends

    gpu = torch.cuda.is_available()
    print(f"crossent {crossent.__version__}")
    print(f"torch {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"gpu: {torch.cuda.get_device_name(0) if gpu else 'none'} (torch.cuda.is_available(): {gpu})")
    triton = _triton_version()
    if triton != "not installed" and not gpu:
        triton += " (installed; the triton backend needs a CUDA GPU, none here)"
    print(f"triton: {triton}")
    print(f"cpu kernel: {_cpu_kernel()}")
    for device in ["cpu"] + (["cuda"] if gpu else []):
        usable = [n for n in available_backends() if _BACKENDS[n].unavailable(torch.device(device)) is None]
        print(f"backends on {device}: {', '.join(usable)}")
    return 0
