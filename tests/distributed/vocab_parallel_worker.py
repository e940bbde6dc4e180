"""One rank of the vocabulary-parallel tests: ``python vocab_parallel_worker.py SCENARIO[+SCENARIO...] OUTDIR``.

Environment: RANK, WORLD_SIZE, MASTER_PORT (gloo over TCP on 127.0.0.1). Each rank takes
its slice of the data made by :func:`data` (the same seeds as the test process, which
computes the single-process reference), runs the cases of SCENARIO and saves a dict of
results to OUTDIR/rank<r>.pt. Shapes are tiny: the point is the arithmetic, not the speed.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

N, V, H = 9, 11, 5
#: uneven shard boundaries of the V = 11 classes
BOUNDS = {1: [0, 11], 2: [0, 8, 11], 3: [0, 2, 7, 11]}
#: DTensor's own split of 11 classes (torch.chunk: ceil(11 / P) per rank)
DT_BOUNDS = {2: [0, 6, 11], 3: [0, 4, 8, 11]}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def data(dtype: torch.dtype, ignore: str = "some", seed: int = 0):
    """Logits x (N, V), targets y, class weights w, hidden h (N, H), head W (V, H), bias b,
    upstream u (N,) for reduction='none'. ``ignore``: 'some' (two rows), 'all', 'shard0'
    (every target in the first two classes: the other ranks hold no target), 'none'."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, 3] = 20.0  # a confident row: its loss and gradient are tiny
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = 3
    if ignore == "some":
        y[2] = y[5] = -100
    elif ignore == "all":
        y[:] = -100
    elif ignore == "shard0":
        y = torch.randint(0, 2, (N,), generator=g)
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    u = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    return x, y, w, h, W, b, u


def cases():
    """(key, options) of the parity scenario: every reduction, weights, smoothing, ignore patterns."""
    out = []
    for dt in DTYPES:
        for red in ("mean", "sum", "none"):
            for opts in ({}, {"weight": True}, {"label_smoothing": 0.1}, {"weight": True, "label_smoothing": 0.25}):
                out.append(dict(dtype=dt, reduction=red, ignore="some", **opts))
        for ig in ("all", "shard0", "none"):
            out.append(dict(dtype=dt, reduction="mean", ignore=ig, weight=True, label_smoothing=0.1))
    return out


def key(c) -> str:
    return ",".join(f"{k}={c[k]}" for k in sorted(c))


def _upstream(loss, u, reduction):
    return (loss * u).sum() if reduction == "none" else loss


def run_parity(rank, P, save):
    from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    lo, hi = BOUNDS[P][rank], BOUNDS[P][rank + 1]
    for c in cases():
        x, y, w, h, W, b, u = data(DTYPES[c["dtype"]], c["ignore"])
        kw = dict(reduction=c["reduction"], label_smoothing=c.get("label_smoothing", 0.0), return_parts=True)
        wl = w[lo:hi] if c.get("weight") else None
        xl = x[:, lo:hi].clone().requires_grad_()
        parts = vocab_parallel_cross_entropy(xl, y, weight=wl, **kw)
        _upstream(parts.loss, u, c["reduction"]).backward()
        save[key(c)] = dict(loss=parts.loss.detach(), total=parts.total, den=parts.denominator, grad=xl.grad)
        hl, Wl, bl = (t.clone().requires_grad_() for t in (h, W[lo:hi], b[lo:hi]))
        # chunk_size=4: three row blocks, so the block loop is exercised
        parts = vocab_parallel_linear_cross_entropy(
            hl, Wl, y, bias=bl, weight=wl, chunk_size=4, vocab_start=lo, vocab_size=V, **kw
        )
        _upstream(parts.loss, u, c["reduction"]).backward()
        save["linear," + key(c)] = dict(
            loss=parts.loss.detach(),
            total=parts.total,
            den=parts.denominator,
            grad_h=hl.grad,
            grad_W=Wl.grad,
            grad_b=bl.grad,
        )
    # K-dimensional logits (N, V_r, 3) and a (B, T, H) hidden state
    x = data(torch.float64)[0]
    xk = x.reshape(3, 3, V).transpose(1, 2)[:, lo:hi].clone().requires_grad_()
    yk = data(torch.float64)[1].reshape(3, 3)
    loss = vocab_parallel_cross_entropy(xk, yk, reduction="none")
    loss.sum().backward()
    save["kdim"] = dict(loss=loss.detach(), grad=xk.grad)
    # (B, T, H) hidden states and (B, T) targets
    _, y, _, h, W, b, _ = data(torch.float64)
    h3 = h.reshape(3, 3, H).clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h3, W[lo:hi], y.reshape(3, 3), reduction="none")
    loss.sum().backward()
    save["btH"] = dict(loss=loss.detach(), grad_h=h3.grad)
    # the meter adds the exact parts of every batch: two batches of each rank's copy
    from crossent.tracking import LossMeter

    x, y, w = data(torch.float64)[:3]
    meter = LossMeter(sync=False)
    for sl in (slice(0, 4), slice(4, N)):
        parts = vocab_parallel_cross_entropy(x[sl, lo:hi], y[sl], weight=w[lo:hi], return_parts=True)
        meter.update(parts.total, parts.denominator)
    save["meter"] = meter.compute()
    # data parallelism over the world, the vocabulary "sharded" over a one-rank group per rank
    # (group=): each rank meters its own rows; the meter's sync adds the exact parts
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(P)]  # every rank creates every group
    rows = [slice(r * N // P, (r + 1) * N // P) for r in range(P)][rank]
    synced = LossMeter()
    parts = vocab_parallel_cross_entropy(
        x[rows], y[rows], weight=w, label_smoothing=0.1, return_parts=True, group=groups[rank]
    )
    synced.update(parts.total, parts.denominator)
    save["meter_dp"] = synced.compute()


def run_dtensor(rank, P, save):
    import crossent
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (P,))
    for dt in DTYPES:
        x, y, w, h, W, b, u = data(DTYPES[dt])
        xd = distribute_tensor(x, mesh, [Shard(1)]).detach().requires_grad_()
        parts = crossent.cross_entropy(xd, y, weight=w, label_smoothing=0.1, return_parts=True)
        parts.loss.backward()
        save[f"logits,{dt}"] = dict(
            loss=parts.loss.full_tensor().detach(),
            total=parts.total,
            den=parts.denominator,
            grad=xd.grad.full_tensor(),
            placements=str(parts.loss.placements),
            local=tuple(xd.to_local().shape),
        )
        lm = torch.nn.Linear(H, V, dtype=DTYPES[dt])
        with torch.no_grad():
            lm.weight.copy_(W)
            lm.bias.copy_(b)
        parallelize_module(lm, mesh, ColwiseParallel())
        hl = h.clone().requires_grad_()
        loss = crossent.linear_cross_entropy(hl, lm.weight, y, linear_bias=lm.bias, reduction="sum")
        loss.backward()
        save[f"linear,{dt}"] = dict(
            loss=loss.full_tensor().detach(),
            grad_h=hl.grad,
            grad_W=lm.weight.grad.full_tensor(),
            grad_b=lm.bias.grad.full_tensor(),
            wplacements=str(lm.weight.placements),
        )
        # the logits a ColwiseParallel head returns as a DTensor (Shard(-1) of (N, V))
        head = torch.nn.Linear(H, V, bias=False, dtype=DTYPES[dt])
        with torch.no_grad():
            head.weight.copy_(W)
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        hl = h.clone().requires_grad_()
        logits = head(hl)
        loss = crossent.cross_entropy(logits, y, label_smoothing=0.1)
        loss.backward()
        logits3 = head(h.reshape(3, 3, H))  # (B, T, V): Shard(2)
        try:
            crossent.cross_entropy(logits3, y.reshape(3, 3))
            msg = ""
        except crossent.CrossentValueError as e:
            msg = str(e)
        flat = crossent.cross_entropy(logits3.flatten(0, -2), y)
        save[f"btv,{dt}"] = dict(error=msg, loss=flat.full_tensor().detach())
        save[f"head_logits,{dt}"] = dict(
            loss=loss.full_tensor().detach(),
            grad_h=hl.grad,
            grad_W=head.weight.grad.full_tensor(),
            placements=str(logits.placements),
        )
        # the LM-head options and probability targets (sharded like the logits, or full)
        tw, q, u2 = extra(DTYPES[dt])
        xd = distribute_tensor(x, mesh, [Shard(1)]).detach().requires_grad_()
        lm = dict(z_loss=0.05, softcap=4.0, temperature=1.5, token_weight=tw, return_lse=True, return_accuracy=True)
        parts, lse, hits = crossent.cross_entropy(xd, y, weight=w, return_parts=True, **lm)
        parts.loss.backward()
        save[f"options,{dt}"] = dict(
            loss=parts.loss.full_tensor().detach(),
            total=parts.total,
            den=parts.denominator,
            lse=lse.full_tensor(),
            hits=hits.full_tensor(),
            grad=xd.grad.full_tensor(),
        )
        for name, qq in (("probs_sharded", distribute_tensor(q, mesh, [Shard(1)])), ("probs_full", q)):
            xd = distribute_tensor(x, mesh, [Shard(1)]).detach().requires_grad_()
            loss = crossent.cross_entropy(xd, qq, weight=w, label_smoothing=0.2)
            loss.backward()
            save[f"{name},{dt}"] = dict(loss=loss.full_tensor().detach(), grad=xd.grad.full_tensor())
        lm2 = torch.nn.Linear(H, V, dtype=DTYPES[dt])
        with torch.no_grad():
            lm2.weight.copy_(W)
            lm2.bias.copy_(b)
        parallelize_module(lm2, mesh, ColwiseParallel())
        hl = h.clone().requires_grad_()
        loss = crossent.linear_cross_entropy(hl, lm2.weight, y, linear_bias=lm2.bias, softcap=4.0, z_loss=0.05)
        loss.backward()
        save[f"linear_options,{dt}"] = dict(
            loss=loss.full_tensor().detach(),
            grad_h=hl.grad,
            grad_W=lm2.weight.grad.full_tensor(),
            grad_b=lm2.bias.grad.full_tensor(),
        )
        xr = distribute_tensor(x, mesh, [Replicate()]).detach().requires_grad_()
        loss = crossent.cross_entropy(xr, y)
        loss.backward()
        save[f"replicated,{dt}"] = dict(loss=loss.full_tensor().detach(), grad=xr.grad.full_tensor())


def extra(dtype: torch.dtype, seed: int = 1):
    """Token weights tau (N,), class-probability targets q (N, V) and a second upstream
    u2 (N,) (another generator than :func:`data`, so its tensors stay as they are)."""
    g = torch.Generator().manual_seed(seed)
    tw = (torch.rand(N, generator=g, dtype=torch.float64) * 2).to(dtype)
    q = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, dim=1).to(dtype)
    q[1] = 0.0
    q[1, 3] = 1.0  # a one-hot row
    u2 = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    return tw, q, u2


#: the LM-head options of the option cases: each alone, then all at once
LM_ALONE = ({"z_loss": 0.05}, {"softcap": 4.0}, {"temperature": 0.7}, {"token_weight": True}, {"lse": True})
LM_ALL = {
    "weight": True,
    "label_smoothing": 0.1,
    "z_loss": 0.05,
    "softcap": 4.0,
    "temperature": 1.5,
    "token_weight": True,
    "lse": True,
}


def option_cases():
    """(kind, options) of the options scenario. kind: 'ce' (logits), 'lce' (linear),
    'tlp' / 'ltlp' (token log-probs of logits / linear), 'probs' (probability targets)."""
    out = []
    for dt in DTYPES:
        for kind in ("ce", "lce"):
            for opts in LM_ALONE:
                out.append(dict(kind=kind, dtype=dt, reduction="mean", ignore="some", **opts))
            for red in ("mean", "sum", "none"):
                out.append(dict(kind=kind, dtype=dt, reduction=red, ignore="some", **LM_ALL))
            for ig in ("all", "shard0"):
                out.append(dict(kind=kind, dtype=dt, reduction="mean", ignore=ig, **LM_ALL))
        for kind in ("tlp", "ltlp"):
            for ig in ("some", "all", "shard0"):
                out.append(dict(kind=kind, dtype=dt, reduction="none", ignore=ig, entropy=True))
            out.append(dict(kind=kind, dtype=dt, reduction="none", ignore="some", softcap=4.0, temperature=0.7))
            out.append(
                dict(kind=kind, dtype=dt, reduction="none", ignore="some", softcap=4.0, temperature=0.7, entropy=True)
            )
        for red in ("mean", "sum", "none"):
            for opts in ({}, {"weight": True}, {"weight": True, "label_smoothing": 0.2}):
                out.append(dict(kind="probs", dtype=dt, reduction=red, ignore="none", **opts))
    return out


def option_call(c, fns, x, y, w, h, W, b, tw, q, lo, hi, group_kw):
    """Run case ``c`` with ``fns`` (the single-process or the vocabulary-parallel functions:
    ce, lce, tlp, ltlp) on the classes [lo, hi); returns (outputs, leaves) where outputs
    is a dict of result tensors and leaves the differentiated inputs by name."""
    kind = c["kind"]
    kw = {}
    if kind in ("ce", "lce", "probs"):
        kw = dict(reduction=c["reduction"], return_parts=True, label_smoothing=c.get("label_smoothing", 0.0))
        if c.get("weight"):
            kw["weight"] = w[lo:hi]
    for k in ("z_loss", "softcap", "temperature"):
        if k in c:
            kw[k] = c[k]
    if c.get("token_weight"):
        kw["token_weight"] = tw
    if c.get("lse"):
        kw.update(return_lse=True, return_accuracy=True)
    if c.get("entropy"):
        kw["return_entropy"] = True
    kw.update(group_kw)
    if kind in ("ce", "tlp", "probs"):
        leaves = dict(grad=x[:, lo:hi].clone().requires_grad_())
        t = q[:, lo:hi] if kind == "probs" else y
        out = fns["tlp" if kind == "tlp" else "ce"](leaves["grad"], t, **kw)
    else:
        leaves = dict(grad_h=h.clone().requires_grad_(), grad_W=W[lo:hi].clone().requires_grad_())
        leaves["grad_b"] = b[lo:hi].clone().requires_grad_()
        fn = fns["ltlp" if kind == "ltlp" else "lce"]
        bias = "linear_bias" if kind == "lce" and not group_kw else "bias"  # crossent.linear_cross_entropy's name
        out = fn(leaves["grad_h"], leaves["grad_W"], y, **{bias: leaves["grad_b"]}, chunk_size=4, **kw)
    res = {}
    if kind in ("tlp", "ltlp"):
        lp, H = out if c.get("entropy") else (out, None)
        res["lp"] = lp.detach()
        if H is not None:
            res["H"] = H.detach()
    else:
        parts, *extras = out if isinstance(out, tuple) and not hasattr(out, "_fields") else (out,)
        res.update(loss=parts.loss.detach(), total=parts.total, den=parts.denominator)
        if extras:
            res.update(lse=extras[0], hits=extras[1])
    return out, res, leaves


def option_backward(c, out, u, u2):
    """The scalar the gradients are taken of: every output, with upstream weights."""
    if c["kind"] in ("tlp", "ltlp"):
        if c.get("entropy"):
            lp, H = out
            return (lp * u).sum() + (H * u2).sum()
        return (out * u).sum()
    parts = out[0] if isinstance(out, tuple) and not hasattr(out, "_fields") else out
    return (parts.loss * u).sum() if c["reduction"] == "none" else parts.loss


def run_options(rank, P, save):
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
        vocab_parallel_linear_token_logprobs,
        vocab_parallel_token_logprobs,
    )

    fns = dict(
        ce=vocab_parallel_cross_entropy,
        lce=vocab_parallel_linear_cross_entropy,
        tlp=vocab_parallel_token_logprobs,
        ltlp=vocab_parallel_linear_token_logprobs,
    )
    lo, hi = BOUNDS[P][rank], BOUNDS[P][rank + 1]
    for c in option_cases():
        dt = DTYPES[c["dtype"]]
        x, y, w, h, W, b, u = data(dt, c["ignore"])
        tw, q, u2 = extra(dt)
        out, res, leaves = option_call(c, fns, x, y, w, h, W, b, tw, q, lo, hi, dict(vocab_start=lo, vocab_size=V))
        option_backward(c, out, u, u2).backward()
        res.update({k: t.grad for k, t in leaves.items()})
        save["options," + key(c)] = res


def collective_kind(func) -> str:
    """'all_gather' / 'all_reduce' / ... for a communicating c10d op (functional or in-place
    ``c10d::allreduce_``), '' for everything else (wait_tensor and the autograd wrapper
    move no data)."""
    name = func.__name__.split(".")[0]
    if func.namespace not in ("_c10d_functional", "c10d") or name == "wait_tensor" or name.startswith("_"):
        return ""
    flat = name.replace("_", "")
    for kind in ("allgather", "allreduce", "reducescatter", "alltoall", "broadcast"):
        if flat.startswith(kind):
            return kind.replace("all", "all_", 1) if kind.startswith("all") else kind
    return name


def run_count(rank, P, save):
    """Collectives per forward and backward, counted on the c10d ops the dispatcher sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from crossent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kind = collective_kind(func)
            if kind:
                self.ops.append(kind)
            return func(*args, **(kwargs or {}))

    lo, hi = BOUNDS[P][rank], BOUNDS[P][rank + 1]
    x, y, w, h, W, b, u = data(torch.float32)
    for name, given in (("logits", True), ("logits_nolayout", False), ("linear", True)):
        layout = dict(vocab_start=lo, vocab_size=V) if given else {}
        xl = x[:, lo:hi].clone().requires_grad_()
        Wl = W[lo:hi].clone().requires_grad_()
        hl = h.clone().requires_grad_()
        with Count() as fwd:
            if name == "linear":
                loss = vocab_parallel_linear_cross_entropy(
                    hl, Wl, y, weight=w[lo:hi], label_smoothing=0.1, chunk_size=4, **layout
                )
            else:
                loss = vocab_parallel_cross_entropy(xl, y, weight=w[lo:hi], label_smoothing=0.1, **layout)
        with Count() as bwd:
            loss.backward()
        save[name] = dict(forward=fwd.ops, backward=bwd.ops)
    # every option at once, the per-token outputs, probability targets: the same collectives
    from crossent.distributed import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs

    tw, q, u2 = extra(torch.float32)
    layout = dict(vocab_start=lo, vocab_size=V)
    lm = dict(z_loss=0.05, softcap=4.0, temperature=1.5, token_weight=tw, return_lse=True, return_accuracy=True)
    for name in ("logits_options", "linear_options", "token_logprobs", "linear_token_logprobs", "probs"):
        xl = x[:, lo:hi].clone().requires_grad_()
        Wl = W[lo:hi].clone().requires_grad_()
        hl = h.clone().requires_grad_()
        with Count() as fwd:
            if name == "logits_options":
                loss = vocab_parallel_cross_entropy(xl, y, weight=w[lo:hi], label_smoothing=0.1, **lm, **layout)[0]
            elif name == "linear_options":
                loss = vocab_parallel_linear_cross_entropy(
                    hl, Wl, y, weight=w[lo:hi], label_smoothing=0.1, chunk_size=4, **lm, **layout
                )[0]
            elif name == "token_logprobs":
                lp, H = vocab_parallel_token_logprobs(xl, y, softcap=4.0, return_entropy=True, **layout)
                loss = (lp * u).sum() + (H * u2).sum()
            elif name == "linear_token_logprobs":
                lp, H = vocab_parallel_linear_token_logprobs(
                    hl, Wl, y, softcap=4.0, return_entropy=True, chunk_size=4, **layout
                )
                loss = (lp * u).sum() + (H * u2).sum()
            else:
                loss = vocab_parallel_cross_entropy(xl, q[:, lo:hi], weight=w[lo:hi], label_smoothing=0.1, **layout)
        with Count() as bwd:
            loss.backward()
        save[name] = dict(forward=fwd.ops, backward=bwd.ops)


def _compiled_case(step, args, backend=None):
    """explain (graphs, breaks) of ``step(*args, target)``, then eager and ``fullgraph=True``
    compiled values and gradients of ``args`` (DTensors compared as full tensors)."""
    import crossent.distributed._dtensor as D

    def full(t):
        return t.full_tensor() if D.is_dtensor(t) else t

    *args, target = args
    ex = torch._dynamo.explain(step)(*args, target)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    eager = step(*leaves, target)
    eager.backward()
    eager_grads = [full(t.grad) for t in leaves]
    leaves = [a.detach().clone().requires_grad_() for a in args]
    kw = {} if backend is None else {"backend": backend}
    compiled = torch.compile(step, fullgraph=True, **kw)(*leaves, target)
    compiled.backward()
    return dict(
        graphs=ex.graph_count,
        breaks=ex.graph_break_count,
        reasons=[str(r.reason)[:200] for r in ex.break_reasons],
        eager=full(eager).detach(),
        compiled=full(compiled).detach(),
        eager_grads=eager_grads,
        compiled_grads=[full(t.grad) for t in leaves],
    )


def run_compile(rank, P, save):
    """One compiled training step per loss: explain (graphs, breaks), then fullgraph values.
    The base losses compile with inductor; the option steps and the DTensor step with
    ``aot_eager`` (the same capture -- Dynamo and AOT autograd, where graph breaks and
    tracing failures live -- without a second C++ code generation, which takes a minute
    per step on CPU)."""
    import crossent
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
        vocab_parallel_token_logprobs,
    )

    lo, hi = BOUNDS[P][rank], BOUNDS[P][rank + 1]
    x, y, w, h, W, b, u = data(torch.float32)
    tw, q, u2 = extra(torch.float32)
    layout = dict(vocab_start=lo, vocab_size=V)

    def logits_step(xl, y):
        return vocab_parallel_cross_entropy(xl * 2.0, y, weight=w[lo:hi], label_smoothing=0.1, **layout)

    def linear_step(hl, Wl, y):
        return vocab_parallel_linear_cross_entropy(hl, Wl, y, chunk_size=4, label_smoothing=0.1, **layout)

    def logits_options_step(xl, y):
        lm = dict(z_loss=0.05, softcap=4.0, temperature=1.5, token_weight=tw)
        return vocab_parallel_cross_entropy(xl * 2.0, y, weight=w[lo:hi], label_smoothing=0.1, **lm, **layout)

    def linear_options_step(hl, Wl, y):
        lm = dict(z_loss=0.05, softcap=4.0, temperature=1.5, token_weight=tw)
        return vocab_parallel_linear_cross_entropy(hl, Wl, y, chunk_size=4, **lm, **layout)

    def logprobs_step(xl, y):
        lp, H = vocab_parallel_token_logprobs(xl, y, softcap=4.0, temperature=0.7, return_entropy=True, **layout)
        return (lp * u).sum() + (H * u2).sum()

    def probs_step(xl, ql):
        return vocab_parallel_cross_entropy(xl * 2.0, ql, weight=w[lo:hi], label_smoothing=0.1, **layout)

    def dtensor_step(xd, y):
        return crossent.cross_entropy(xd * 2.0, y, label_smoothing=0.1, z_loss=0.05, softcap=4.0)

    xd = distribute_tensor(x, init_device_mesh("cpu", (P,)), [Shard(1)])
    for name, step, args, backend in (
        ("logits", logits_step, (x[:, lo:hi], y), None),
        ("linear", linear_step, (h, W[lo:hi], y), None),
        ("logits_options", logits_options_step, (x[:, lo:hi], y), "aot_eager"),
        ("linear_options", linear_options_step, (h, W[lo:hi], y), "aot_eager"),
        ("token_logprobs", logprobs_step, (x[:, lo:hi], y), "aot_eager"),
        ("probs", probs_step, (x[:, lo:hi], q[:, lo:hi]), "aot_eager"),
        ("dtensor", dtensor_step, (xd, y), "aot_eager"),
    ):
        torch._dynamo.reset()
        save[name] = _compiled_case(step, args, backend)


SCENARIOS = {
    "parity": run_parity,
    "options": run_options,
    "dtensor": run_dtensor,
    "count": run_count,
    "compile": run_compile,
}


def main():
    import torch.distributed as dist

    scenario, outdir = sys.argv[1], sys.argv[2]
    rank, P = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"],
        rank=rank,
        world_size=P,
        timeout=datetime.timedelta(seconds=120),
    )
    save = {}
    for name in scenario.split("+"):  # several scenarios in one process group: one spawn
        SCENARIOS[name](rank, P, save)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(save, os.path.join(outdir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
