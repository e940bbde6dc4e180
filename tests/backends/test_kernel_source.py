"""The C kernel source compiles cleanly with warnings as errors (the build at run time
uses the same flags without -Werror, so a newer compiler's new warning never costs a user
the kernel)."""

import shutil
import subprocess
from pathlib import Path

import pytest

import crossent.backends.chunked_cpp as chunked_cpp


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_kernels_c_compiles_with_wall_werror(tmp_path):
    source = Path(chunked_cpp.__file__).with_name("kernels.c")
    flags = [f for f in chunked_cpp._FLAGS if f != "-shared"]
    proc = subprocess.run(
        ["gcc", *flags, "-Wall", "-Wextra", "-Werror", "-c", str(source), "-o", str(tmp_path / "kernels.o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
