"""Benchmark presets for the fused linear + loss ops (``crossent bench``), and a runner.
Design notes: ``docs/design.md``, section ``crossent.bench.linear``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .presets import Case, register_preset

PRESET_NAMES = ("linear-ce", "linear-bce")
SIZES = {
    "linear-ce": {
        "smoke": [(64, 32, 1000)],
        "medium": [(512, 256, 32000), (256, 256, 128256)],
        "full": [(4096, 2048, 128256), (8192, 4096, 32000)],
    },
    "linear-bce": {"smoke": [(64, 32, 2000)], "medium": [(512, 256, 100000)], "full": [(4096, 1024, 100000)]},
}
DTYPES = (torch.float32, torch.bfloat16)


def _fresh(d):
    for k in ("x", "W"):
        d[k].grad = None


def _compiled(fn):
    holder = []

    def call(d):
        if not holder:
            holder.append(torch.compile(fn, dynamic=False))
        return holder[0](d)

    return call


class _MatmulBound(torch.autograd.Function):
    """Only the three products: logits = x W^T, grad_x = G W, grad_W = G^T x (G = logits)."""

    @staticmethod
    def forward(ctx, x, W):
        logits = x @ W.t()
        ctx.save_for_backward(x, W, logits)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        x, W, logits = ctx.saved_tensors
        return logits @ W, logits.t() @ x


def _make(N, H, C, dtype, kind):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(N, H, generator=g) / H**0.25).to(device, dtype).requires_grad_()
        W = (torch.randn(C, H, generator=g) / H**0.25).to(device, dtype).requires_grad_()
        d = {"x": x, "W": W}
        if kind == "ce":
            d["y"] = torch.randint(0, C, (N,), generator=g).to(device)
        else:
            pos = torch.randint(0, C, (N, 10), generator=g).to(device)
            d["pos"] = pos
            d["t"] = torch.zeros(N, C, dtype=dtype, device=device).scatter_(1, pos, 1.0)
        return d

    return make


def _ce_variants():
    import crossent

    def eager(d):
        _fresh(d)
        return F.cross_entropy(F.linear(d["x"], d["W"]), d["y"])

    v = {"torch eager": eager, "torch.compile": _compiled(eager)}
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()

        def chunked(d):
            _fresh(d)
            return F.linear_cross_entropy(d["x"], d["W"], d["y"], options=opts)

        v["torch chunked"] = chunked

    def ours(d):
        _fresh(d)
        return crossent.linear_cross_entropy(d["x"], d["W"], d["y"], validate=False)

    def bound(d):
        _fresh(d)
        return _MatmulBound.apply(d["x"], d["W"])

    v["crossent"] = ours
    v["matmul bound"] = bound
    return v


def _bce_variants():
    import crossent

    def eager(d):
        _fresh(d)
        return F.binary_cross_entropy_with_logits(F.linear(d["x"], d["W"]), d["t"])

    def ours(d):
        _fresh(d)
        return crossent.linear_binary_cross_entropy_with_logits(d["x"], d["W"], d["t"], validate=False)

    def ours_sparse(d):
        _fresh(d)
        return crossent.linear_binary_cross_entropy_with_logits(d["x"], d["W"], d["pos"], validate=False)

    def bound(d):
        _fresh(d)
        return _MatmulBound.apply(d["x"], d["W"])

    return {
        "torch eager": eager,
        "torch.compile": _compiled(eager),
        "crossent": ours,
        "crossent sparse": ours_sparse,
        "matmul bound": bound,
    }


def _cases(kind, size, device):
    out = []
    for N, H, C in SIZES["linear-" + kind][size]:
        for dtype in DTYPES:
            es = torch.finfo(dtype).bits // 8
            case = Case(
                name=f"{kind} {N}x{H}->{C} {str(dtype)[6:]}",
                make=_make(N, H, C, dtype, kind),
                variants=_ce_variants() if kind == "ce" else _bce_variants(),
                elements=N * C,
                bytes_per_element=0.0,
            )
            case.grad_bytes = (N * H + C * H) * es
            out.append(case)
    return out


@register_preset("linear-ce", "fused linear + cross-entropy: 4096x2048->128256, 8192x4096->32000 (fp32, bf16)")
def linear_ce(size, device):
    return _cases("ce", size, device)


@register_preset("linear-bce", "fused linear + multi-label BCE: 4096x1024->100000 (fp32, bf16; dense, sparse)")
def linear_bce(size, device):
    return _cases("bce", size, device)


# --------------------------------------------------------------------------- runner
def _call(fn, d):
    fn(d).backward()


def _status_kib(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise OSError(name)


def _child(kind, size, index, variant):
    """Peak resident bytes of one warm forward+backward beyond what was resident before."""
    case = _cases(kind, size, torch.device("cpu"))[index]
    d = case.make(torch.device("cpu"))
    fn = case.variants[variant]
    for _ in range(2):
        _call(fn, d)
    _fresh(d)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    _call(fn, d)
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024


def _memory(kind, size, index, variant):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "crossent.bench.linear", "--child", kind, size, str(index), variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def run(presets=PRESET_NAMES, size="smoke", repeats=5, compile=True, memory=True, log=print, match=None, variants=None):
    """Time (median of interleaved repeats, fwd+bwd) and measure memory; returns rows.

    ``match``: only cases whose name contains it; ``variants``: only these variants."""
    rows = []
    for preset in presets:
        kind = preset.split("-")[1]
        for index, case in enumerate(_cases(kind, size, torch.device("cpu"))):
            if match and match not in case.name:
                continue
            if variants:
                case.variants = {k: v for k, v in case.variants.items() if k in variants}
            d = case.make(torch.device("cpu"))
            names = [n for n in case.variants if compile or not n.startswith("torch.compile")]
            for n in names:  # warm-up (and compilation)
                _call(case.variants[n], d)
            samples = {n: [] for n in names}
            for r in range(repeats):
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    _call(case.variants[n], d)
                    samples[n].append(time.perf_counter() - t0)
            for n in names:
                ms = statistics.median(samples[n]) * 1e3
                peak = _memory(kind, size, index, n) if memory else None
                over = None if peak is None else peak - case.grad_bytes
                row = dict(
                    case=case.name,
                    variant=n,
                    median_ms=round(ms, 2),
                    peak_extra_MiB=None if peak is None else round(peak / 2**20, 1),
                    overhead_MiB=None if over is None else round(over / 2**20, 1),
                )
                rows.append(row)
                log(
                    f"{case.name:34s} {n:16s} {ms:10.1f} ms   peak extra "
                    f"{row['peak_extra_MiB']} MiB   beyond grads {row['overhead_MiB']} MiB"
                )
    return rows


def accuracy(N=256, H=128, C=8000, class_chunk=1000, log=print):
    """Max error (relative to the largest entry) of loss, grad_input, grad_weight against a
    float64 truth on the same rounded inputs: crossent vs eager, fp32 and bf16."""
    import crossent

    f64 = torch.float64
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kw in ({}, {"label_smoothing": 0.1}):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(N, H, generator=g) * 0.5).to(dtype)
            W = (torch.randn(C, H, generator=g) * 0.5).to(dtype)
            y = torch.randint(0, C, (N,), generator=g)

            def grads(fn, dt):
                xs, Ws = x.to(dt).requires_grad_(), W.to(dt).requires_grad_()
                loss = fn(xs, Ws)
                return [loss.detach()] + list(torch.autograd.grad(loss, (xs, Ws)))

            def eager(a, b):
                return F.cross_entropy(F.linear(a, b), y, **kw)

            truth, ref = grads(eager, f64), grads(eager, dtype)
            ours = grads(lambda a, b: crossent.linear_cross_entropy(a, b, y, class_chunk_size=class_chunk, **kw), dtype)
            row = {"dtype": str(dtype)[6:], **kw}
            for name, o, e, t in zip(("loss", "grad_input", "grad_weight"), ours, ref, truth):
                scale = float(t.abs().max())
                row[name] = (float((o.to(f64) - t).abs().max()) / scale, float((e.to(f64) - t).abs().max()) / scale)
            rows.append(row)
            log(
                "  ".join(
                    f"{k}: {v[0]:.1e} (eager {v[1]:.1e})" if isinstance(v, tuple) else f"{k}={v}"
                    for k, v in row.items()
                )
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m crossent.bench.linear", description=__doc__.splitlines()[0])
    p.add_argument("--preset", action="append", choices=PRESET_NAMES)
    p.add_argument("--size", default="smoke", choices=("smoke", "medium", "full"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--case", help="only cases whose name contains this, e.g. 'float32'")
    p.add_argument("--variant", action="append", help="only these variants (repeatable)")
    p.add_argument("--accuracy", action="store_true", help="print the error table against float64 and exit")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.accuracy:
        accuracy()
        return 0
    if a.child:
        kind, size, index, variant = a.child
        print(_child(kind, size, int(index), variant))
        return 0
    rows = run(
        a.preset or PRESET_NAMES, a.size, a.repeats, not a.no_compile, not a.no_memory, match=a.case, variants=a.variant
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
