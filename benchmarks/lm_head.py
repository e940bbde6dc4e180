"""LM-head options: time and peak memory of the fused linear versions, and the exactness rows.

Time (median of ``--repeats`` forward+backward calls, after one warm-up, the variants
interleaved) and peak extra
CPU memory (one call in a fresh child process, measured as ``crossent.bench.memory``
does: ``VmHWM - VmRSS`` with ``MALLOC_MMAP_THRESHOLD_=65536``; "beyond grads" subtracts
the gradients the call leaves, ``grad_hidden`` and ``grad_weight``) of:

* ``token_logprobs``: ``crossent.linear_token_logprobs(h, W, y, return_entropy=True)``;
* ``unfused``: ``log_softmax(F.linear(h, W)).gather(...)`` and ``-(p * log p).sum(-1)``;
* ``fused_ce``: ``crossent.linear_cross_entropy(h, W, y)``;
* ``fused_ce_options``: the same with ``z_loss=1e-4, softcap=30, temperature=0.9``;
* ``bare_products``: the three matrix products of the fused CE (``h W^T``, ``G W``,
  ``G^T h``) on the whole batch, nothing else;
* ``bare_products_4``: the four that ``token_logprobs`` needs (``h W^T`` again in the
  backward: its upstream gradient is unknown in the forward, so the logits are recomputed).

    PYTHONPATH=src python benchmarks/lm_head.py --shape 2048x256x32000 --repeats 3
    PYTHONPATH=src python benchmarks/lm_head.py --shape 4096x2048x128256 --repeats 1 --warmup 0 --no-memory
    PYTHONPATH=src python benchmarks/lm_head.py --exactness    # README exactness rows (mpmath)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as TF

import crossent

VARIANTS = ("token_logprobs", "unfused", "fused_ce", "fused_ce_options", "bare_products", "bare_products_4")


def _inputs(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, y


BUDGET = None  # memory_budget of the crossent variants (bytes; None: the default 256 MiB)


def _step(name, h, W, y):
    if name == "token_logprobs":
        lp, ent = crossent.linear_token_logprobs(h, W, y, return_entropy=True, memory_budget=BUDGET)
        (lp.sum() + 0.01 * ent.sum()).backward()
    elif name == "unfused":
        lp_all = torch.log_softmax(TF.linear(h, W), -1)
        lp = lp_all.gather(-1, y[:, None])[:, 0]
        ent = -(lp_all.exp() * lp_all).sum(-1)
        (lp.sum() + 0.01 * ent.sum()).backward()
    elif name == "fused_ce":
        crossent.linear_cross_entropy(h, W, y, memory_budget=BUDGET).backward()
    elif name == "fused_ce_options":
        crossent.linear_cross_entropy(
            h, W, y, z_loss=1e-4, softcap=30.0, temperature=0.9, memory_budget=BUDGET
        ).backward()
    elif name in ("bare_products", "bare_products_4"):
        with torch.no_grad():
            L = h @ W.t()
            if name == "bare_products_4":
                L = h @ W.t()
            L @ W
            L.t() @ h
    else:
        raise SystemExit(f"unknown variant {name!r}")


def _times(names, N, H, V, repeats, warmup=1):
    """Median seconds per variant: ``warmup`` calls each, then ``repeats`` rounds that
    run every variant once (interleaved, so a slow spell of the machine hits them all)."""
    h, W, y = _inputs(N, H, V)
    for _ in range(warmup):
        for name in names:
            _step(name, h, W, y)
    out = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            h.grad = W.grad = None
            t0 = time.perf_counter()
            _step(name, h, W, y)
            out[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in out.items()}


def _memory_child(name, N, H, V):
    from crossent.bench.memory import _measure_cpu

    h, W, y = _inputs(N, H, V)
    _step(name, h, W, y)
    h.grad = W.grad = None
    extra = _measure_cpu(lambda: _step(name, h, W, y))
    grads = (h.numel() + W.numel()) * 4 if not name.startswith("bare_products") else 0
    print(json.dumps({"extra": extra, "grads": grads}))


def _memory(name, N, H, V):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    budget = [] if BUDGET is None else ["--budget", str(BUDGET)]
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, "--shape", f"{N}x{H}x{V}", *budget],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _exactness():
    """Worst relative errors vs mpmath (60 digits): crossent and the unfused torch composition."""
    import mpmath

    mpmath.mp.dps = 60

    def truth(row, y):
        z = [mpmath.mpf(float(v)) for v in row]
        k = max(range(len(z)), key=lambda j: z[j])
        lp1 = mpmath.log1p(sum(mpmath.exp(v - z[k]) for j, v in enumerate(z) if j != k))
        nlp = [(z[k] - v) + lp1 for v in z]
        ent = sum(mpmath.exp(-v) * v for v in nlp)
        return z[k] + lp1, -nlp[y], ent

    def rel(a, t):
        return abs(float(a) - float(t)) / abs(float(t))

    rows = []
    for dtype in (torch.float32, torch.float64):
        worst = {k: [0.0, 0.0] for k in ("zloss", "logprob", "entropy")}
        for margin in (1.0, 10.0, 30.0, 100.0, 1e3, 1e4):
            x = torch.tensor([[margin, 0.0, -1.0, 0.5]], dtype=dtype)
            lse_t, lp_t, _ = truth(x[0].tolist(), 1)
            z_t = -lp_t + mpmath.mpf("1e-4") * lse_t**2
            ours = crossent.cross_entropy(x, torch.tensor([1]), z_loss=1e-4)
            theirs = TF.cross_entropy(x, torch.tensor([1])) + 1e-4 * torch.logsumexp(x, -1)[0] ** 2
            worst["zloss"][0] = max(worst["zloss"][0], rel(ours, z_t))
            worst["zloss"][1] = max(worst["zloss"][1], rel(theirs, z_t))
        for margin in (5.0, 20.0, 40.0, 80.0):
            x = torch.tensor([[margin, 0.0, 0.0, -3.0]], dtype=dtype)
            _, lp_t, ent_t = truth(x[0].tolist(), 0)
            lp, ent = crossent.token_logprobs(x, torch.tensor([0]), return_entropy=True)
            lps = torch.log_softmax(x, -1)
            worst["logprob"][0] = max(worst["logprob"][0], rel(lp[0], lp_t))
            worst["logprob"][1] = max(worst["logprob"][1], rel(lps[0, 0], lp_t))
            if float(ent_t) > torch.finfo(dtype).tiny:
                worst["entropy"][0] = max(worst["entropy"][0], rel(ent[0], ent_t))
                worst["entropy"][1] = max(worst["entropy"][1], rel(-(lps.exp() * lps).sum(), ent_t))
        rows.append((dtype, worst))
    names = {
        "zloss": "z-loss (1e-4) + CE, margins 1 to 1e4",
        "logprob": "log-prob of a confident token, margins 5 to 80",
        "entropy": "entropy of near-one-hot rows (down to 1e-33)",
    }
    for key, label in names.items():
        for dtype, worst in rows:
            print(f"| {label} | {str(dtype).replace('torch.', '')} | {worst[key][0]:.1e} | {worst[key][1]:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048x256x32000", help="N x H x V")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (0 at the full size)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--exactness", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="memory_budget (bytes) of the crossent variants; scale it with N * V to model "
        "a larger head's ratio (the default 256 MiB is 1/20 of 4096 x 128256's logits)",
    )
    args = ap.parse_args(argv)
    global BUDGET
    BUDGET = args.budget
    if args.exactness:
        _exactness()
        return 0
    N, H, V = (int(v) for v in args.shape.lower().split("x"))
    if args.memory_child:
        _memory_child(args.memory_child, N, H, V)
        return 0
    print(
        f"# {N} x {H} -> {V} float32, budget {BUDGET or 'default'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    names = args.variants.split(",")
    times = _times(names, N, H, V, args.repeats, args.warmup)
    print("| variant | time (median) | vs fused CE | vs 3 bare products | peak extra memory | beyond grads |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t = times[name]
        mem = "" if args.no_memory else _memory(name, N, H, V)
        ms = "" if not mem or mem["extra"] is None else f"{mem['extra'] / 2**20:.0f} MiB"
        beyond = "" if not mem or mem["extra"] is None else f"{(mem['extra'] - mem['grads']) / 2**20:.0f} MiB"
        rel = [f"{t / times[b]:.3f}x" if b in times else "" for b in ("fused_ce", "bare_products")]
        print(f"| {name} | {t * 1e3:.0f} ms | {rel[0]} | {rel[1]} | {ms} | {beyond} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
