"""LossMeter under torch.distributed: 2 gloo processes on CPU, uneven shards, vs one process.

Each rank is a fresh interpreter (subprocess) that joins a gloo group over TCP on
127.0.0.1 and a free port, meters its own shard and prints JSON. The reference is
torch.nn.functional on the whole data set in this process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF

import crossent

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

N, C, SPLIT, BATCH = 103, 5, 70, 16  # rank 0: rows [0, 70), rank 1: [70, 103)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(crossent.__file__)))


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    w = torch.tensor([0.3, 1.0, 2.5, 0.8, 1.7], dtype=torch.float64)
    return x, y, w


WORKER = textwrap.dedent(f"""
    import datetime, json, os, sys, warnings
    sys.path.insert(0, {SRC!r})
    import torch
    import torch.distributed as dist
    import crossent
    from crossent.tracking import LossMeter
    warnings.simplefilter("error", crossent.CrossentWarning)

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"],
                            rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(7)
    x = torch.randn({N}, {C}, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, {C}, ({N},), generator=g)
    y[torch.rand({N}, generator=g) < 0.2] = -100
    w = torch.tensor([0.3, 1.0, 2.5, 0.8, 1.7], dtype=torch.float64)
    lo, hi = (0, {SPLIT}) if rank == 0 else ({SPLIT}, {N})
    crit = crossent.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    meter = LossMeter()
    for i in range(lo, hi, {BATCH}):
        j = min(i + {BATCH}, hi)
        meter(crit, x[i:j], y[i:j])
    # a meter that only rank 0 feeds: rank 1 contributes zeros and must not warn
    lonely = LossMeter()
    if rank == 0:
        lonely(crit, x[:10], y[:10])
    out = dict(rank=rank, global_=meter.compute(), local=meter.compute(sync=False),
               lonely=lonely.compute())
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(out))
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks():
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
        assert p.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    return sorted(results, key=lambda r: r["rank"])


def test_two_gloo_ranks_with_uneven_shards_get_the_single_process_average():
    x, y, w = _data()
    r0, r1 = _run_two_ranks()
    ref = TF.cross_entropy(x, y, weight=w, label_smoothing=0.1).item()
    # every rank gets the global average, bit-identical across ranks, equal to one process
    assert r0["global_"] == r1["global_"]
    assert abs(r0["global_"] - ref) <= 1e-12 * ref
    # the local values are the shards' own averages ...
    for r, (lo, hi) in ((r0, (0, SPLIT)), (r1, (SPLIT, N))):
        shard = TF.cross_entropy(x[lo:hi], y[lo:hi], weight=w, label_smoothing=0.1).item()
        assert abs(r["local"] - shard) <= 1e-12 * shard
    # ... and a mean of the two rank means (what averaging `loss` across ranks gives) is wrong
    assert abs((r0["local"] + r1["local"]) / 2 - ref) > 1e-4 * ref
    # a rank with nothing added contributes zeros, and everyone gets rank 0's value
    lonely = TF.cross_entropy(x[:10], y[:10], weight=w, label_smoothing=0.1).item()
    assert abs(r0["lonely"] - lonely) <= 1e-12 * lonely and r1["lonely"] == r0["lonely"]
