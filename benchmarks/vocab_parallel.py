"""Vocabulary-parallel fused LM head + cross-entropy on gloo vs one process: memory, time, bytes.

    python benchmarks/vocab_parallel.py --nproc 2 --N 4096 --H 2048 --V 128256     # the issue's shape
    python benchmarks/vocab_parallel.py --nproc 2 --N 1024 --H 512 --V 32064 --budget 16M

The launcher runs, one after the other, each in fresh processes:

* ``single``: ``crossent.linear_cross_entropy`` in one process (the whole ``(V, H)`` weight);
* ``eager``: ``F.cross_entropy(F.linear(h, W), y)`` in one process (skipped with ``--no-eager``);
* ``vocab-parallel``: ``torchrun --nproc-per-node P`` ranks (gloo, CPU), each holding
  ``V / P`` rows of the weight, calling
  ``crossent.distributed.vocab_parallel_linear_cross_entropy``.

Per variant and rank it reports the median time of a forward + backward step over
``--repeats`` steps (after a warm-up; ranks start each step together after a barrier), the
peak memory of one step beyond what was in use before it, also with the gradients the
step leaves (hidden and weight) subtracted, and the bytes the step's collectives sent and
received (counted on the c10d ops). ``--budget`` is the single-process scratch budget
(``CROSSENT_LINEAR_BUDGET``); the vocab-parallel ranks get it divided by P, their default.
Memory is measured as in ``crossent.bench.memory`` (``VmHWM`` after resetting it, with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers leave the resident set; Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _data(N, H, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) / H**0.5
    W = torch.randn(V, H, generator=g) * 0.02
    y = torch.randint(0, V, (N,), generator=g)
    y[::17] = -100
    return h, W, y


class _Bytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes into and out of every communicating c10d op while active."""

    def __init__(self):
        super().__init__()
        self.sent = self.received = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace in ("_c10d_functional", "c10d") and name != "wait_tensor" and not name.startswith("_"):
            from torch.utils._pytree import tree_leaves

            def nbytes(tree):
                return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

            self.ops.append(name)
            self.sent += nbytes(args)
            self.received += nbytes(out)
        return out


def _worker(a) -> dict:
    """One process (a rank of the group, or the single-process baseline): JSON result."""
    from crossent.bench.memory import _measure_cpu

    torch.set_num_threads(a.threads)
    h, W, y = _data(a.N, a.H, a.V)
    lm = dict(softcap=30.0, z_loss=1e-4) if a.lm else {}
    rank, P = 0, 1
    if a.variant == "vocab-parallel":
        import torch.distributed as dist

        from crossent.distributed import vocab_parallel_linear_cross_entropy

        dist.init_process_group("gloo")
        rank, P = dist.get_rank(), dist.get_world_size()
        bounds = [a.V * r // P for r in range(P + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        W = W[lo:hi].clone()

        def loss_fn(h, W):
            return vocab_parallel_linear_cross_entropy(h, W, y, vocab_start=lo, vocab_size=a.V, **lm)

        sync = dist.barrier
    elif a.variant == "single":
        import crossent

        def loss_fn(h, W):
            return crossent.linear_cross_entropy(h, W, y, **lm)

        def sync():
            pass
    else:
        import torch.nn.functional as F

        def loss_fn(h, W):
            return F.cross_entropy(F.linear(h, W), y)

        def sync():
            pass

    h.requires_grad_()
    W.requires_grad_()

    def step():
        h.grad = W.grad = None
        loss_fn(h, W).backward()

    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sync()
    with _Bytes() as counted:
        step()
    h.grad = W.grad = None
    sync()
    extra = _measure_cpu(step)
    grads = (h.numel() + W.numel()) * 4
    return dict(
        variant=a.variant,
        rank=rank,
        P=P,
        median_s=statistics.median(times),
        times=times,
        peak_extra=extra,
        peak_beyond_grads=None if extra is None else extra - grads,
        sent=counted.sent,
        received=counted.received,
        ops=counted.ops,
        weight_bytes=W.numel() * 4,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(a, variant, nproc=1):
    out = tempfile.mkdtemp(prefix="vocab_parallel_")
    args = [
        f"--N={a.N}",
        f"--H={a.H}",
        f"--V={a.V}",
        f"--repeats={a.repeats}",
        f"--threads={a.threads}",
        f"--worker={variant}",
        *(["--lm"] if a.lm else []),
        f"--out={out}",
    ]
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="65536", CROSSENT_LINEAR_BUDGET=str(a.budget), OMP_NUM_THREADS=str(a.threads)
    )
    if variant == "vocab-parallel":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}",
            "--master-addr=127.0.0.1",
            os.path.abspath(__file__),
        ] + args
    else:
        cmd = [sys.executable, os.path.abspath(__file__)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rows = []
    for name in sorted(os.listdir(out)):  # one JSON file per rank (their stdout interleaves)
        with open(os.path.join(out, name)) as f:
            rows.append(json.load(f))
    return rows


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=2048)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--budget", default=str(256 * 2**20), help="single-process CROSSENT_LINEAR_BUDGET")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--lm", action="store_true", help="LM-head options: softcap=30, z_loss=1e-4 (not for eager)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.variant = a.worker
        res = _worker(a)
        with open(os.path.join(a.out, f"rank{res['rank']}.json"), "w") as f:
            json.dump(res, f)
        return 0
    rows = []
    variants = [("single", 1)] + ([] if a.no_eager else [("eager", 1)]) + [("vocab-parallel", a.nproc)]
    for variant, n in variants:
        rows += sorted(_run(a, variant, n), key=lambda r: r["rank"])
    single = next(r for r in rows if r["variant"] == "single")
    print(
        f"N={a.N} H={a.H} V={a.V} fp32, budget {a.budget}, {a.threads} thread(s) per process, "
        f"torch {torch.__version__}, median of {a.repeats}"
    )
    print(
        "| variant | rank | step (s) | peak extra (MiB) | beyond grads (MiB) | vs single | sent / received per step |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (
            ""
            if r["peak_beyond_grads"] is None or not single["peak_beyond_grads"]
            else f"{r['peak_beyond_grads'] / single['peak_beyond_grads']:.2f}x"
        )
        comm = f"{r['sent']} B / {r['received']} B ({', '.join(r['ops'])})" if r["ops"] else "-"
        print(
            f"| {r['variant']} | {r['rank']} | {r['median_s']:.3f} | {_mib(r['peak_extra'])} | "
            f"{_mib(r['peak_beyond_grads'])} | {ratio} | {comm} |"
        )
    print("RAW " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
