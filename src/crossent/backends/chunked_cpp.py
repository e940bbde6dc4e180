r"""Optional compiled CPU kernels for the fused backend (AVX2 + OpenMP via ATen's ``Vectorized``).

Built on first use with :func:`torch.utils.cpp_extension.load_inline` (cached by torch in
``~/.cache/torch_extensions``; the first build takes about a minute on 2 cores, later
imports are instant). It is used only when all of these hold, otherwise the chunked
torch path of :mod:`crossent.backends.chunked` runs (same formulas, same results):

* ``CROSSENT_CPU_KERNEL`` is not ``0`` (``=0`` disables; ``=1`` builds eagerly on first use
  even when no build exists yet — the default is also to build on first use);
* a C++ compiler is found and the CPU has AVX2 (what torch reports);
* the build succeeds (a failure is remembered, reported once by ``crossent env``, and the
  torch path is used).

Why a compiled kernel: with torch ops, every formula step is a pass over memory and the
exp/log1p run at eager speed; the targets of issue 5 (BCE 1.2x, CE 1.3x torch.compile)
were not reachable by chunked torch ops. The kernel evaluates exactly the formulas of
:mod:`crossent.backends.reference` with Sleef's 1-ulp ``exp``/``log1p`` (the ones torch
itself vectorises with), one read of the inputs and one write of loss and gradient.

Precision: float32 lanes, row sums accumulated in blocks of 256 (32 partial lanes) and the
block sums in float64, so a 128k-class row keeps ~1e-7 relative accuracy.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Optional

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <cmath>

using Vec = at::vec::Vectorized<float>;
static constexpr int64_t W = Vec::size();

// Loss and gradient of BCE-with-logits (reference formulas):
//   loss = p t softplus(-x) + (1-t) softplus(x)   (terms with a zero coefficient are 0)
//   grad = (1-t) sigmoid(x) - p t sigmoid(-x)
// with e = exp(-|x|): softplus(+-x) = max(+-x, 0) + log1p(e), sigmoid(|x|) = 1/(1+e).
static inline void bce_vec(Vec x, Vec t, Vec pw, Vec& loss, Vec& grad) {
  const Vec zero(0.f), one(1.f);
  Vec e = (x.abs()).neg().exp();
  Vec l1 = e.log1p();
  Vec r = one / (one + e);
  Vec er = e * r;
  Vec neg = x < zero;
  Vec sp_pos = at::vec::maximum(x, zero) + l1;
  Vec sp_neg = at::vec::maximum(x.neg(), zero) + l1;
  Vec sig = Vec::blendv(r, er, neg);
  Vec sig_neg = Vec::blendv(er, r, neg);
  Vec p = pw * t;
  Vec omt = one - t;
  Vec a = Vec::blendv(p * sp_neg, zero, p == zero);
  Vec b = Vec::blendv(omt * sp_pos, zero, omt == zero);
  loss = a + b;
  grad = omt * sig - p * sig_neg;
}

// Returns {loss, grad}; with want_loss == false, loss is the 0-dim sum (accumulated in
// float64 per block of BLOCK elements, blocks summed in order: deterministic).
std::vector<at::Tensor> bcewl(at::Tensor x, at::Tensor t, c10::optional<at::Tensor> pw_opt, int64_t L,
                              bool want_loss) {
  constexpr int64_t BLOCK = 16384;
  const int64_t n = x.numel();
  auto grad = at::empty_like(x);
  at::Tensor loss = want_loss ? at::empty_like(x) : at::empty({}, x.options());
  const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
  std::vector<double> partial(want_loss ? 0 : nblocks, 0.0);
  const float* xp = x.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const float* pwp = pw_opt.has_value() ? pw_opt->data_ptr<float>() : nullptr;
  float* lp = want_loss ? loss.data_ptr<float>() : nullptr;
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    float pwbuf[W];
    float lbuf[W];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * BLOCK, end = std::min(n, begin + BLOCK);
      Vec acc(0.f);
      double s = 0.0;
      int64_t i = begin;
      int flush = 0;
      for (; i + W <= end; i += W) {
        if (!lp && ++flush == 32) {  // float lanes hold at most 32 terms: ~1e-7 relative
          acc.store(lbuf);
          for (int j = 0; j < W; ++j) s += lbuf[j];
          acc = Vec(0.f);
          flush = 0;
        }
        Vec pw(1.f);
        if (pwp) {
          if (L == n) pw = Vec::loadu(pwp + i);
          else { for (int j = 0; j < W; ++j) pwbuf[j] = pwp[(i + j) % L]; pw = Vec::loadu(pwbuf); }
        }
        Vec lo, gr;
        bce_vec(Vec::loadu(xp + i), Vec::loadu(tp + i), pw, lo, gr);
        if (lp) lo.store(lp + i); else acc = acc + lo;
        gr.store(gp + i);
      }
      if (i < end) {
        int64_t m = end - i;
        float xb[W] = {0}, tb[W] = {0}, pb[W], lb[W], gb[W];
        for (int j = 0; j < W; ++j) pb[j] = 1.f;
        for (int64_t j = 0; j < m; ++j) { xb[j] = xp[i + j]; tb[j] = tp[i + j]; if (pwp) pb[j] = pwp[(i + j) % L]; }
        Vec lo, gr;
        bce_vec(Vec::loadu(xb), Vec::loadu(tb), Vec::loadu(pb), lo, gr);
        lo.store(lb); gr.store(gb);
        for (int64_t j = 0; j < m; ++j) { if (lp) lp[i + j] = lb[j]; else s += lb[j]; gp[i + j] = gb[j]; }
      }
      if (!lp) {
        acc.store(lbuf);
        for (int j = 0; j < W; ++j) s += lbuf[j];
        partial[b] = s;
      }
    }
  });
  if (!want_loss) {
    double total = 0.0;
    for (double v : partial) total += v;
    loss.fill_(total);
  }
  return {loss, grad};
}

// Cross-entropy with class-index targets, one row at a time (reference formulas):
//   m = max_j x_j, k = first arg-max, z_j = x_j - m (0 where x_j == m),
//   s = sum_{j != k} exp(z_j)  (ties with the max count 1 each),
//   loss = c (log1p(s) - z_y)  (0 when c == 0),
//   grad_j = c e_j / (1+s) - c [j == y];  grad_k = c [k != y] - c s / (1+s).
// grad may alias x (in-place mode): x_y is read before the row is overwritten.
at::Tensor ce_index(at::Tensor x, at::Tensor y, at::Tensor c, c10::optional<at::Tensor> grad_opt) {
  const int64_t M = x.size(0), C = x.size(1);
  auto loss = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* cp = c.data_ptr<float>();
  float* lp = loss.data_ptr<float>();
  float* gp = grad_opt.has_value() ? grad_opt->data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      float* gr = gp ? gp + r * C : nullptr;
      // pass 1: max
      float m = -INFINITY;
      int64_t j = 0;
      bool has_nan = false;
      if (C >= W) {
        Vec vm(-INFINITY);
        for (; j + W <= C; j += W) vm = at::vec::maximum(vm, Vec::loadu(xr + j));
        float tmp[W];
        vm.store(tmp);
        for (int q = 0; q < W; ++q) { if (std::isnan(tmp[q])) has_nan = true; m = std::max(m, tmp[q]); }
      }
      for (; j < C; ++j) { if (std::isnan(xr[j])) has_nan = true; m = std::max(m, xr[j]); }
      const int64_t yr = yp[r];
      const float cr = cp[r];
      if (has_nan) {
        lp[r] = NAN;
        if (gr) for (int64_t q = 0; q < C; ++q) gr[q] = NAN;
        continue;
      }
      const float zy = (xr[yr] == m) ? 0.f : xr[yr] - m;
      // pass 2: e_j = exp(z_j) (1 for ties), s = sum over j != k; k = first tie.
      int64_t k = -1;
      int64_t ties = 0;
      double s_total = 0.0;
      const Vec vm(m), zero(0.f), one(1.f);
      j = 0;
      while (j + W <= C) {
        const int64_t block_end = std::min<int64_t>(C - (C - j) % W, j + 256);
        Vec acc(0.f);
        for (; j < block_end; j += W) {
          Vec xv = Vec::loadu(xr + j);
          Vec eq = (xv == vm);
          int eqbits = (~eq.zero_mask()) & ((1 << W) - 1);
          Vec e = Vec::blendv((xv - vm).exp(), one, eq);
          if (eqbits) {
            ties += __builtin_popcount(eqbits);
            if (k < 0) k = j + __builtin_ctz(eqbits);
            acc = acc + Vec::blendv(e, zero, eq);
          } else {
            acc = acc + e;
          }
          if (gr) e.store(gr + j);
        }
        float tmp[W];
        acc.store(tmp);
        for (int q = 0; q < W; ++q) s_total += tmp[q];
      }
      for (; j < C; ++j) {
        float e;
        if (xr[j] == m) { e = 1.f; ++ties; if (k < 0) k = j; }
        else { e = std::exp(xr[j] - m); s_total += e; }
        if (gr) gr[j] = e;
      }
      const float s = (float)(s_total + (double)(ties - 1));
      const float lse = std::log1p(s);
      lp[r] = (cr == 0.f) ? 0.f : cr * (lse - zy);
      if (!gr) continue;
      // pass 3: grad
      const float inv = 1.f / (1.f + s);
      const Vec vscale(cr * inv);
      j = 0;
      for (; j + W <= C; j += W) (vscale * Vec::loadu(gr + j)).store(gr + j);
      for (; j < C; ++j) gr[j] = cr * inv * gr[j];
      gr[yr] -= cr;
      gr[k] = ((k == yr) ? 0.f : cr) - cr * (s * inv);
    }
  });
  return loss;
}
"""

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_tried = False


def disabled_reason() -> Optional[str]:
    """Why the compiled kernel cannot be used here, or None."""
    if os.environ.get("CROSSENT_CPU_KERNEL", "1") == "0":
        return "disabled by CROSSENT_CPU_KERNEL=0"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "unknown"
    if cap not in ("AVX2", "AVX512"):
        return f"the CPU capability is {cap}, the kernel needs AVX2"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    return _error


def get():
    """The compiled module (building it on first call), or None when unavailable."""
    global _module, _error, _tried
    if _module is not None:
        return _module
    if _tried or disabled_reason() is not None:
        return None
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils.cpp_extension import load_inline

            flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
            _module = load_inline(
                name="crossent_chunked_cpu_v2",
                cpp_sources=[_SOURCE],
                functions=["bcewl", "ce_index"],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # compiler missing, headers mismatch, ...
            _error = f"build failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _module = None
    return _module
