"""``crossent env``: versions, devices and backends, for bug reports."""

from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import torch

    import crossent
    from crossent.backends import available_backends

    print(f"crossent {crossent.__version__}")
    print(f"torch {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"cuda available: {torch.cuda.is_available()}")
    print(f"backends: {', '.join(available_backends())}")
    return 0
