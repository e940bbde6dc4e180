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


_EXP_DRIVER = """
#include "{source}"
void exp_nonpos_array(const float *z, float *out, long n) {{
  long i = 0;
  for (; i + W <= n; i += W) _mm256_storeu_ps(out + i, vexp_nonpos(_mm256_loadu_ps(z + i)));
  for (; i < n; ++i) out[i] = exp_nonpos(z[i]);
}}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_inline_exp_is_within_one_ulp(tmp_path):
    """vexp_nonpos (every exponential of the kernels) against float64 exp on every 499th float
    in [-104, 0] (all binades, the subnormal results included) and the special values."""
    import ctypes

    import torch

    source = Path(chunked_cpp.__file__).with_name("kernels.c")
    driver = tmp_path / "exp_driver.c"
    driver.write_text(_EXP_DRIVER.format(source=source))
    libdir = Path(torch.__file__).with_name("lib")
    lib_path = tmp_path / "exp_driver.so"
    flags = chunked_cpp._FLAGS
    cmd = ["gcc", *flags, str(driver), "-o", str(lib_path), f"-L{libdir}", "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(lib_path))

    # float32 bit patterns from -0.0 (0x80000000) to -104.0 (0xC2D00000), every 499th
    bits = torch.arange(0x80000000, 0xC2D00001, 499, dtype=torch.int64)
    z = (bits - (1 << 32)).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, -1e-30, -87.3, -87.4, -103.9, -104.0, -200.0, -float("inf")])
    z = torch.cat([z, special]).contiguous()
    out = torch.empty_like(z)
    lib.exp_nonpos_array(ctypes.c_void_p(z.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_long(z.numel()))

    ref = torch.exp(z.double())
    ulp = torch.clamp(
        torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))).double() - ref.float().abs(), min=2.0**-149
    )
    err = ((out.double() - ref).abs() / ulp).max().item()
    assert err <= 1.0, f"max error {err:.3f} ulp"
    assert out[-1].item() == 0.0 and out[z.numel() - special.numel()].item() == 1.0  # exp(-inf), exp(0)

    nan = torch.full((8,), float("nan"))  # one vector: NaN stays NaN
    nan_out = torch.empty_like(nan)
    lib.exp_nonpos_array(ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(nan_out.data_ptr()), ctypes.c_long(8))
    assert torch.isnan(nan_out).all()
