"""Vocabulary-parallel cross-entropy on gloo (2 and 3 CPU processes, uneven shards) vs one process.

Each scenario starts P fresh interpreters (``vocab_parallel_worker.py``) that join a gloo
group over TCP on 127.0.0.1, take their slice of the vocabulary of the data made by
``vocab_parallel_worker.data`` and save their results; this process computes the same
losses with single-process crossent on the gathered data and compares: loss, LossParts,
the gradients of the local logits / hidden states / local weight and bias, to
``ULP["vocab_parallel"]`` ulp of each tensor's largest entry. Guardrails run in this process
on a one-rank group.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

import crossent
import vocab_parallel_worker as wk
from _helpers import ULP

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab_parallel_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, P: int, tmp_path, timeout: int = 300):
    port = str(_free_port())
    procs = []
    for rank in range(P):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(P),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, scenario, str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: distributed workers timed out")
        assert p.returncode == 0, err[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(P)]


def assert_ulp(actual, expected, msg="", dtype=None):
    """|actual - expected| <= ULP['vocab_parallel'] ulp of max(|expected|) (NaN equals NaN);
    ulp of ``dtype`` (default: ``expected``'s; float64 sums of float32 losses: float32)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype or actual.dtype == torch.float64, msg
    eps = torch.finfo(dtype or expected.dtype).eps
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{msg}: NaN pattern differs"
    fin = ~torch.isnan(e)
    if not fin.any():
        return
    scale = e[fin].abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    err = (a[fin] - e[fin]).abs().max()
    bound = ULP["vocab_parallel"] * eps * scale
    assert err <= bound, f"{msg}: max error {err:.3g} > {ULP['vocab_parallel']} ulp of {scale:.3g} ({bound:.3g})"


def _reference(c, linear=False):
    """Single-process crossent on the gathered data, same options; grads of the full tensors."""
    dt = wk.DTYPES[c["dtype"]]
    x, y, w, h, W, b, u = wk.data(dt, c["ignore"])
    kw = dict(
        reduction=c["reduction"],
        label_smoothing=c.get("label_smoothing", 0.0),
        return_parts=True,
        weight=w if c.get("weight") else None,
    )
    up = (lambda loss: (loss * u).sum()) if c["reduction"] == "none" else (lambda loss: loss)
    if linear:
        h, W, b = (t.clone().requires_grad_() for t in (h, W, b))
        parts = crossent.linear_cross_entropy(h, W, y, linear_bias=b, **kw)
        up(parts.loss).backward()
        return parts, dict(grad_h=h.grad, grad_W=W.grad, grad_b=b.grad)
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():  # every target ignored: the single-process loss warns (nan mean)
        if c["ignore"] == "all":
            warnings.simplefilter("ignore", crossent.CrossentWarning)
        parts = crossent.cross_entropy(x, y, **kw)
    up(parts.loss).backward()
    return parts, dict(grad=x.grad)


def _compare_parts(got, ref, msg):
    assert_ulp(got["loss"], ref.loss.detach(), msg + " loss")
    assert_ulp(got["total"], ref.total, msg + " total", dtype=ref.loss.dtype)
    assert torch.equal(got["den"], ref.denominator) or got["den"].isnan().all(), msg + " denominator"
    assert got["total"].dtype == torch.float64 and got["den"].dtype == torch.float64


@pytest.fixture(scope="module", params=[2, 3], ids=["P2", "P3"])
def parity_run(request, tmp_path_factory):
    """(P, results): one process group per P runs the parity and the options scenarios
    (spawning is the expensive part)."""
    P = request.param
    return P, _launch("parity+options", P, tmp_path_factory.mktemp(f"parity{P}"))


def test_parity_with_one_process_uneven_shards(parity_run):
    P, results = parity_run
    bounds = wk.BOUNDS[P]
    for c in wk.cases():
        k = wk.key(c)
        ref, grads = _reference(c)
        ref_l, grads_l = _reference(c, linear=True)
        for r, res in enumerate(results):
            lo, hi = bounds[r], bounds[r + 1]
            got = res[k]
            _compare_parts(got, ref, f"P={P} rank {r} {k}")
            # the gradient of the local logits is the slice of the full gradient
            assert_ulp(got["grad"], grads["grad"][:, lo:hi], f"P={P} rank {r} {k} grad")
            got = res["linear," + k]
            _compare_parts(got, ref_l, f"P={P} rank {r} linear {k}")
            assert_ulp(got["grad_h"], grads_l["grad_h"], f"P={P} rank {r} linear {k} grad_h")
            assert_ulp(got["grad_W"], grads_l["grad_W"][lo:hi], f"P={P} rank {r} linear {k} grad_W")
            assert_ulp(got["grad_b"], grads_l["grad_b"][lo:hi], f"P={P} rank {r} linear {k} grad_b")
        # every rank returns the same bits
        for res in results[1:]:
            assert torch.equal(res[k]["loss"].nan_to_num(7.0), results[0][k]["loss"].nan_to_num(7.0))
    # K-dimensional logits
    x, y = wk.data(torch.float64)[:2]
    xk = x.reshape(3, 3, wk.V).transpose(1, 2).clone().requires_grad_()
    loss = crossent.cross_entropy(xk, y.reshape(3, 3), reduction="none")
    loss.sum().backward()
    for r, res in enumerate(results):
        assert_ulp(res["kdim"]["loss"], loss.detach(), f"kdim rank {r}")
        assert_ulp(res["kdim"]["grad"], xk.grad[:, bounds[r] : bounds[r + 1]], f"kdim grad rank {r}")
    # (B, T, H) hidden states
    _, y, _, h, W, _, _ = wk.data(torch.float64)
    h3 = h.reshape(3, 3, wk.H).clone().requires_grad_()
    loss = crossent.linear_cross_entropy(h3, W, y.reshape(3, 3), reduction="none")
    loss.sum().backward()
    for r, res in enumerate(results):
        assert_ulp(res["btH"]["loss"], loss.detach(), f"(B, T, H) rank {r}")
        assert_ulp(res["btH"]["grad_h"], h3.grad, f"(B, T, H) grad rank {r}")
    # the meter's exact parts: equal to one process metering the same batches
    x, y, w = wk.data(torch.float64)[:3]
    ref_meter = crossent.tracking.LossMeter(sync=False)
    for sl in (slice(0, 4), slice(4, wk.N)):
        parts = crossent.cross_entropy(x[sl], y[sl], weight=w, return_parts=True)
        ref_meter.update(parts.total, parts.denominator)
    for res in results:
        assert abs(res["meter"] - ref_meter.compute()) <= 8 * 2.0**-52 * abs(ref_meter.compute())
    dp = crossent.cross_entropy(x, y, weight=w, label_smoothing=0.1).item()
    for res in results:  # each rank its own rows, synced over the world: the whole batch's mean
        assert abs(res["meter_dp"] - dp) <= 8 * 2.0**-52 * abs(dp)
    _confident_row(results, bounds)


def _reference_option(c):
    """Single-process crossent on the gathered data, the options of case ``c``: outputs and
    the gradients of the full tensors."""
    dt = wk.DTYPES[c["dtype"]]
    x, y, w, h, W, b, u = wk.data(dt, c["ignore"])
    tw, q, u2 = wk.extra(dt)
    fns = dict(
        ce=crossent.cross_entropy,
        lce=crossent.linear_cross_entropy,
        tlp=crossent.token_logprobs,
        ltlp=crossent.linear_token_logprobs,
    )
    with warnings.catch_warnings():  # every target ignored: the single-process loss warns (nan mean)
        warnings.simplefilter("ignore", crossent.CrossentWarning)
        out, res, leaves = wk.option_call(c, fns, x, y, w, h, W, b, tw, q, 0, wk.V, {})
    wk.option_backward(c, out, u, u2).backward()
    res.update({k: t.grad for k, t in leaves.items()})
    return res


def test_options_match_one_process(parity_run):
    """LM-head options, per-token log-probs and entropy, probability targets: values,
    LossParts, lse, hit counts and every gradient against one process, on every rank."""
    P, results = parity_run
    bounds = wk.BOUNDS[P]
    for c in wk.option_cases():
        k = "options," + wk.key(c)
        ref = _reference_option(c)
        for r, res in enumerate(results):
            lo, hi = bounds[r], bounds[r + 1]
            got = res[k]
            msg = f"P={P} rank {r} {k}"
            assert set(got) == set(ref), msg
            for name, want in ref.items():
                if name in ("grad", "grad_W", "grad_b"):
                    want = want[:, lo:hi] if name == "grad" else want[lo:hi]
                if name == "den":
                    assert torch.equal(got[name], want) or got[name].isnan().all(), msg + " den"
                elif name == "hits":
                    assert got[name].dtype == torch.int64 and torch.equal(got[name], want), msg + " hits"
                elif name == "total":
                    assert_ulp(got[name], want, f"{msg} {name}", dtype=wk.DTYPES[c["dtype"]])
                else:
                    assert_ulp(got[name], want.detach(), f"{msg} {name}")
        for res in results[1:]:  # every rank returns the same bits
            for name in ("loss", "lp", "H", "lse"):
                if name in ref:
                    assert torch.equal(res[k][name].nan_to_num(7.0), results[0][k][name].nan_to_num(7.0)), k


def _confident_row(results, bounds):
    """Row 0 has logit 20 on its target among N(0, 9) logits: its loss and the target's
    gradient p - 1 keep their relative precision in float32 (no 1 - p cancellation),
    against a float64 composition of the formulas."""
    c = dict(dtype="float32", reduction="none", ignore="some")
    x = wk.data(torch.float32)[0].double()
    u = wk.data(torch.float32)[-1].double()
    exact = torch.logsumexp(x[0], 0) - x[0, 3]
    g_exact = u[0] * (torch.softmax(x[0], 0)[3] - 1)
    r = next(r for r in range(len(results)) if bounds[r] <= 3 < bounds[r + 1])  # the rank of class 3
    got = results[r][wk.key(c)]
    assert exact < 1e-5
    assert abs(got["loss"][0].double() - exact) <= 8 * 2.0**-23 * exact
    assert abs(got["grad"][0, 3 - bounds[r]].double() - g_exact) <= 8 * 2.0**-23 * abs(g_exact)


@pytest.mark.parametrize("P", [3])
def test_dtensor_inputs_match_one_process(P, tmp_path):
    results = _launch("dtensor", P, tmp_path)
    for dt, dtype in wk.DTYPES.items():
        x, y, w, h, W, b, u = wk.data(dtype)
        xr = x.clone().requires_grad_()
        ref = crossent.cross_entropy(xr, y, weight=w, label_smoothing=0.1, return_parts=True)
        ref.loss.backward()
        hr, Wr, br = (t.clone().requires_grad_() for t in (h, W, b))
        ref_l = crossent.linear_cross_entropy(hr, Wr, y, linear_bias=br, reduction="sum")
        ref_l.backward()
        hh, Wh = h.clone().requires_grad_(), W.clone().requires_grad_()
        ref_h = crossent.cross_entropy(hh @ Wh.t(), y, label_smoothing=0.1)
        ref_h.backward()
        xp = x.clone().requires_grad_()
        plain = crossent.cross_entropy(xp, y)
        plain.backward()
        tw, q, _ = wk.extra(dtype)
        xo = x.clone().requires_grad_()
        lm = dict(z_loss=0.05, softcap=4.0, temperature=1.5, token_weight=tw, return_lse=True, return_accuracy=True)
        opt, opt_lse, opt_hits = crossent.cross_entropy(xo, y, weight=w, return_parts=True, **lm)
        opt.loss.backward()
        xq = x.clone().requires_grad_()
        pr = crossent.cross_entropy(xq, q, weight=w, label_smoothing=0.2)
        pr.backward()
        hl, Wl, bl = (t.clone().requires_grad_() for t in (h, W, b))
        lo_ref = crossent.linear_cross_entropy(hl, Wl, y, linear_bias=bl, softcap=4.0, z_loss=0.05)
        lo_ref.backward()
        for r, res in enumerate(results):
            got = res[f"logits,{dt}"]
            lo, hi = wk.DT_BOUNDS[P][r], wk.DT_BOUNDS[P][r + 1]
            assert got["local"] == (wk.N, hi - lo) and got["placements"] == "(Replicate(),)"
            _compare_parts(got, ref, f"dtensor logits {dt} rank {r}")
            assert_ulp(got["grad"], xr.grad, f"dtensor logits grad {dt} rank {r}")
            got = res[f"linear,{dt}"]
            assert got["wplacements"] == "(Shard(dim=0),)"
            assert_ulp(got["loss"], ref_l.detach(), f"dtensor linear {dt} rank {r}")
            for name, g in (("grad_h", hr.grad), ("grad_W", Wr.grad), ("grad_b", br.grad)):
                assert_ulp(got[name], g, f"dtensor linear {name} {dt} rank {r}")
            got = res[f"head_logits,{dt}"]  # ColwiseParallel(use_local_output=False) logits
            assert got["placements"] in ("(Shard(dim=1),)", "(Shard(dim=-1),)")
            assert_ulp(got["loss"], ref_h.detach(), f"head logits {dt} rank {r}")
            assert_ulp(got["grad_h"], hh.grad, f"head logits grad_h {dt} rank {r}")
            assert_ulp(got["grad_W"], Wh.grad, f"head logits grad_W {dt} rank {r}")
            got = res[f"btv,{dt}"]  # (B, T, V) logits: flattened they work, unflattened the error says so
            assert "flatten(0, -2)" in got["error"] and "placements" in got["error"]
            assert_ulp(got["loss"], crossent.cross_entropy(h @ W.t(), y), f"(B, T, V) {dt} rank {r}")
            got = res[f"options,{dt}"]  # LM-head options on DTensor logits
            _compare_parts(got, opt, f"dtensor options {dt} rank {r}")
            assert_ulp(got["lse"], opt_lse, f"dtensor lse {dt} rank {r}")
            assert torch.equal(got["hits"], opt_hits)
            assert_ulp(got["grad"], xo.grad, f"dtensor options grad {dt} rank {r}")
            for name in ("probs_sharded", "probs_full"):  # probability targets
                assert_ulp(res[f"{name},{dt}"]["loss"], pr.detach(), f"dtensor {name} {dt} rank {r}")
                assert_ulp(res[f"{name},{dt}"]["grad"], xq.grad, f"dtensor {name} grad {dt} rank {r}")
            got = res[f"linear_options,{dt}"]
            assert_ulp(got["loss"], lo_ref.detach(), f"dtensor linear options {dt} rank {r}")
            for name, g in (("grad_h", hl.grad), ("grad_W", Wl.grad), ("grad_b", bl.grad)):
                assert_ulp(got[name], g, f"dtensor linear options {name} {dt} rank {r}")
            got = res[f"replicated,{dt}"]  # the single-process path: same bits
            assert torch.equal(got["loss"], plain.detach()) and torch.equal(got["grad"], xp.grad)


#: Documented in docs/distributed.md: collectives per call.
DOCUMENTED = {
    "logits": dict(forward=["all_gather"], backward=[]),
    "logits_nolayout": dict(forward=["all_gather", "all_gather"], backward=[]),
    "linear": dict(forward=["all_gather"], backward=["all_reduce"]),
    # every LM-head option at once, log-probs with entropy, probability targets: the same
    "logits_options": dict(forward=["all_gather"], backward=[]),
    "linear_options": dict(forward=["all_gather"], backward=["all_reduce"]),
    "token_logprobs": dict(forward=["all_gather"], backward=[]),
    "linear_token_logprobs": dict(forward=["all_gather"], backward=["all_reduce"]),
    "probs": dict(forward=["all_gather"], backward=[]),
}


def test_collective_count_matches_the_documentation(tmp_path):
    results = _launch("count", 2, tmp_path)
    for res in results:
        assert res == DOCUMENTED


def test_compiled_step_has_one_graph_and_eager_values(tmp_path):
    results = _launch("compile", 2, tmp_path, timeout=600)
    for res in results:
        for name in ("logits", "linear", "logits_options", "linear_options", "token_logprobs", "probs", "dtensor"):
            got = res[name]
            assert (got["graphs"], got["breaks"]) == (1, 0), got["reasons"]
            assert_ulp(got["compiled"], got["eager"], f"compiled {name}")
            assert len(got["compiled_grads"]) == len(got["eager_grads"]) >= 1, name
            for a, e in zip(got["compiled_grads"], got["eager_grads"]):
                assert_ulp(a, e, f"compiled {name} grad")


def test_without_a_process_group_the_error_says_how_to_start_one():
    from crossent.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    x, y = wk.data(torch.float32)[:2]
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(x, y)


# --------------------------------------------------------------------------- guardrails
@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group in this process (every collective is then local)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    yield
    dist.destroy_process_group()


def test_one_rank_equals_one_process(one_rank):
    from crossent.distributed import vocab_parallel_cross_entropy

    x, y, w = wk.data(torch.float64)[:3]
    got = vocab_parallel_cross_entropy(x, y, weight=w, label_smoothing=0.2)
    assert_ulp(got, crossent.cross_entropy(x, y, weight=w, label_smoothing=0.2), "one rank")
    # token weights receive their gradient (loss_i / the mean's denominator), as in one process
    tw, q, _ = wk.extra(torch.float64)
    grads = []
    for fn in (vocab_parallel_cross_entropy, crossent.cross_entropy):
        t = tw.clone().requires_grad_()
        fn(x, y, weight=w, z_loss=0.1, softcap=5.0, token_weight=t).backward()
        grads.append(t.grad)
    assert_ulp(grads[0], grads[1], "token_weight grad")
    # K-dimensional and unbatched probability targets
    xk = x.reshape(3, 3, wk.V).transpose(1, 2)
    qk = q.reshape(3, 3, wk.V).transpose(1, 2)
    for xi, qi in ((xk, qk), (x[0], q[0])):
        for red in ("none", "mean"):
            got = vocab_parallel_cross_entropy(xi, qi, weight=w, label_smoothing=0.1, reduction=red)
            ref = crossent.cross_entropy(xi, qi, weight=w, label_smoothing=0.1, reduction=red)
            assert_ulp(got, ref, f"probs {tuple(xi.shape)} {red}")
    # float32 logits with float64 probabilities: torch's promotion (a float64 loss)
    got = vocab_parallel_cross_entropy(x.float(), q)
    assert got.dtype == torch.float64
    assert_ulp(got, crossent.cross_entropy(x.float(), q), "promoted")


def test_guardrails(one_rank):
    from crossent.distributed import vocab_parallel_cross_entropy as vp
    from crossent.distributed import vocab_parallel_linear_cross_entropy as vpl
    from crossent.distributed import vocab_parallel_linear_token_logprobs as vplt
    from crossent.distributed import vocab_parallel_token_logprobs as vpt
    from crossent import CrossentIndexError, CrossentTypeError, CrossentValueError

    x, y, w, h, W, b, u = wk.data(torch.float32)
    with pytest.raises(CrossentTypeError, match="class-index targets.*dtype torch.bool"):
        vp(x, y > 3)
    with pytest.raises(
        CrossentTypeError, match="class-index targets.*dtype torch.float32.*go to vocab_parallel_cross_entropy"
    ):
        vpl(h, W, y.float())
    q = torch.softmax(x, 1)
    with pytest.raises(CrossentValueError, match=r"target of shape \(9, 11\).*got target of shape \(9, 5\)"):
        vp(x, q[:, :5])
    with pytest.raises(CrossentValueError, match="class-index targets with the LM-head options.*probability"):
        vp(x, q, z_loss=1e-4)
    with pytest.raises(CrossentValueError, match="non-negative class-probability targets.*-0.5 at flat index 3"):
        vp(x, q.flatten().index_fill(0, torch.tensor([3]), -0.5).view(9, 11))
    with pytest.raises(CrossentValueError, match="`target` that does not require grad.*target.detach"):
        vp(x, q.clone().requires_grad_())
    with pytest.raises(CrossentValueError, match="`z_loss` to be a finite number >= 0"):
        vp(x, y, z_loss=-1.0)
    with pytest.raises(CrossentValueError, match="`softcap` to be None or a finite number > 0"):
        vpl(h, W, y, softcap=0.0)
    with pytest.raises(CrossentValueError, match=r"`token_weight` of the target's shape \(9,\)"):
        vp(x, y, token_weight=torch.ones(4))
    with pytest.raises(CrossentValueError, match="`temperature` to be a finite number > 0"):
        vpt(x, y, temperature=0.0)
    with pytest.raises(CrossentTypeError, match="class-index targets"):
        vplt(h, W, y.double())
    with pytest.raises(CrossentValueError, match=r"`target` of shape \(9,\) \(one token id per row"):
        vpt(x, y[:3])
    with pytest.raises(CrossentIndexError, match=r"class indices in \[0, 10\]"):
        vplt(h, W, y + 20)
    with pytest.raises(CrossentValueError, match=r"`weight` of shape \(11,\).*slice"):
        vp(x, y, weight=w[:5])
    with pytest.raises(CrossentValueError, match="both given or both None"):
        vp(x, y, vocab_start=0)
    with pytest.raises(CrossentValueError, match=r"inside \[0, vocab_size\).*vocab_start=3, vocab_size=11"):
        vp(x, y, vocab_start=3, vocab_size=11)
    with pytest.raises(CrossentValueError, match="at least one class"):
        vp(x[:, :0], y)
    with pytest.raises(CrossentValueError, match=r"target of shape \(9,\).*got target of shape \(4,\)"):
        vp(x, y[:4])
    bad = y.clone()
    bad[1] = 11
    with pytest.raises(CrossentIndexError, match=r"class indices in \[0, 10\]"):
        vp(x, bad)
    with pytest.raises(CrossentValueError, match="matching `local_weight`.*transpose"):
        vpl(h, W.t(), y)
    with pytest.raises(CrossentTypeError, match="hidden states' dtype"):
        vpl(h, W.double(), y)
    with pytest.raises(CrossentValueError, match=r"`bias` of shape \(11,\)"):
        vpl(h, W, y, bias=b[:3])
    with pytest.raises(CrossentValueError, match="`chunk_size` to be a positive int"):
        vpl(h, W, y, chunk_size=0)
    with pytest.raises(CrossentValueError, match="`weight` that does not require grad"):
        vpl(h, W, y, weight=w.clone().requires_grad_())


def test_docstring_examples():
    """The examples create (and destroy) a one-rank group: run them in a fresh interpreter."""
    code = (
        "import doctest, importlib, sys\n"
        "m = importlib.import_module('crossent.distributed._vocab_parallel')\n"
        "r = doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE)\n"
        "sys.exit(0 if r.failed == 0 and r.attempted > 10 else 1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, MASTER_ADDR="127.0.0.1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_layout_guardrails(one_rank):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from crossent.distributed import vocab_parallel_cross_entropy as vp
    from crossent import CrossentValueError

    x, y = wk.data(torch.float32)[:2]
    with pytest.raises(CrossentValueError, match="`vocab_start` to be a non-negative int.*'0'"):
        vp(x, y, vocab_start="0", vocab_size=11)
    with pytest.raises(CrossentValueError, match="`vocab_size` to be a non-negative int"):
        vp(x, y, vocab_start=0, vocab_size=-1)
    with FakeTensorMode():  # a captured call cannot read the other ranks' sizes
        fx, fy = torch.empty(9, 11), torch.zeros(9, dtype=torch.long)
        with pytest.raises(CrossentValueError, match="while the call is captured.*pass vocab_start="):
            vp(fx, fy)


def test_dtensor_guardrails(one_rank):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from crossent import CrossentValueError

    mesh = init_device_mesh("cpu", (1,))
    x, y, w, h, W, b, u = wk.data(torch.float32)
    xd = distribute_tensor(x, mesh, [Shard(1)])
    with pytest.raises(CrossentValueError, match="no `backend` with logits sharded on the vocabulary"):
        crossent.cross_entropy(xd, y, backend="reference")
    with pytest.raises(CrossentValueError, match="`target` replicated.*placements"):
        crossent.cross_entropy(xd, distribute_tensor(y, mesh, [Shard(0)]))
    Wd = distribute_tensor(W, mesh, [Shard(0)])
    with pytest.raises(CrossentValueError, match="no `backend` with a linear weight sharded.*backend='chunked'"):
        crossent.linear_cross_entropy(h, Wd, y, backend="chunked")
    with pytest.raises(CrossentValueError, match="no `inplace_backward` with logits sharded"):
        crossent.cross_entropy(xd, y, inplace_backward=True)
    # the LM-head options go along; lse and hits come back as replicated DTensors
    loss, lse, hits = crossent.cross_entropy(xd, y, z_loss=1e-2, softcap=3.0, return_lse=True, return_accuracy=True)
    ref, ref_lse, ref_hits = crossent.cross_entropy(
        x, y, z_loss=1e-2, softcap=3.0, return_lse=True, return_accuracy=True
    )
    assert_ulp(loss.full_tensor(), ref)
    assert_ulp(lse.full_tensor(), ref_lse)
    assert torch.equal(hits.full_tensor(), ref_hits)
    got = crossent.linear_cross_entropy(h, Wd, y, temperature=0.5, token_weight=u)
    assert_ulp(got.full_tensor(), crossent.linear_cross_entropy(h, W, y, temperature=0.5, token_weight=u))
    # on one rank the sharded path is the whole vocabulary: equal to the plain call
    assert_ulp(crossent.cross_entropy(xd, y, weight=w).full_tensor(), crossent.cross_entropy(x, y, weight=w))
    assert_ulp(crossent.linear_cross_entropy(h, Wd, y).full_tensor(), crossent.linear_cross_entropy(h, W, y))
