r"""Vocabulary-parallel cross-entropy: logits, or the LM head's weight, sharded over ranks.

The meaning of every option is that of :func:`crossent.cross_entropy` on the gathered
logits; the arithmetic is in :mod:`crossent.distributed._stats`; ``mean`` is applied by
:func:`crossent.functional._reduction.reduce_loss`, as for every loss.

Communication per call, on a group of P ranks with N tokens (K = 4, +1 with class
weights, +2 with label smoothing or probability targets, +1 with the entropy, +1 with
``return_accuracy``; compute dtype: 4 or 8 bytes), whatever the options:

* forward: one ``all_gather`` of the packed ``(N, K)`` per-token statistics (each rank
  receives ``P * N * K`` numbers), never ``(N, V)`` data;
* backward of the logits functions: nothing;
* backward of the linear functions: one ``all_reduce`` (sum) of
  the ``(N, H)`` hidden-state gradient, as a column-parallel linear layer does;
* without ``vocab_start`` and ``vocab_size``: one ``all_gather`` of the local sizes first
  (one number per rank) to find the layout; pass both to skip it (required while
  capturing, where a host read of the sizes would break the graph).

Collectives are the traceable functional collectives
(:mod:`torch.distributed._functional_collectives`), so ``torch.compile`` captures them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .. import _validation as V
from .._capture import capturing
from ..backends.linear import default_budget
from ..functional._reduction import compute_dtype, reduce_loss
from ..functional._lm_head import wants_lm_head
from ._stats import Layout, Shard, combine, local_grad, local_stats, rows_of, transform_, transform_grad_

# (rows, V_r) blocks of the fused linear head: one block-sized buffer is alive at a time
# (the logits block, turned into exp and then into the gradient in place); sized with the
# single-process head's allowance (``backends.linear.BUFFERS_INDEX``) for the matrix
# products' own scratch.
_BLOCK_BUFFERS = 1.25


# ------------------------------------------------------------------------ layout
def _group(group):
    return dist.group.WORLD if group is None else group


def shard_of(func: str, Vr: int, group, vocab_start: Optional[int], vocab_size: Optional[int], capture: bool) -> Shard:
    """The layout of this rank's slice: given (``vocab_start`` and ``vocab_size``), or found
    with one ``all_gather`` of the local sizes (eager only)."""
    if not (dist.is_available() and dist.is_initialized()):
        V.fail(
            func,
            "an initialised torch.distributed process group",
            "none",
            "Call torch.distributed.init_process_group(...) first (torchrun sets the "
            "environment it reads), or use crossent.cross_entropy in a single process.",
            RuntimeError,
        )
    group = _group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if Vr < 1:
        V.fail(
            func,
            "at least one class in every rank's shard",
            f"a local shard of {Vr} classes",
            "Split the vocabulary so that every rank holds one class or more.",
        )
    if (vocab_start is None) != (vocab_size is None):
        V.fail(
            func,
            "`vocab_start` and `vocab_size` both given or both None",
            f"vocab_start={vocab_start!r}, vocab_size={vocab_size!r}",
            "Pass both (no layout collective), or neither (one all_gather of the local sizes).",
        )
    if vocab_start is None:
        if capture:
            V.fail(
                func,
                "`vocab_start` and `vocab_size` while the call is captured",
                "None",
                "Reading the other ranks' sizes is a host read (a graph break): pass "
                "vocab_start=<this rank's first class> and vocab_size=<V>.",
            )
        sizes = funcol.wait_tensor(
            funcol.all_gather_single(torch.tensor([Vr], dtype=torch.int64, device=_device(group)), 0, group)
        ).tolist()
        vocab_start, vocab_size = sum(sizes[:rank]), sum(sizes)
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            V.fail(
                func,
                f"`{name}` to be a non-negative int",
                repr(v),
                "vocab_start is this rank's first global class index, vocab_size the global V.",
            )
    if vocab_start + Vr > vocab_size:
        V.fail(
            func,
            f"the local shard [vocab_start, vocab_start + {Vr}) inside [0, vocab_size)",
            f"vocab_start={vocab_start}, vocab_size={vocab_size}",
            "vocab_start is this rank's first global class index, vocab_size the global V.",
        )
    return Shard(group, world, rank, vocab_start, vocab_size)


def _device(group) -> torch.device:
    """NCCL communicates CUDA tensors only; gloo and mpi CPU tensors."""
    if str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange(stats: torch.Tensor, sh: Shard) -> torch.Tensor:
    """``(P, N, K)``: every rank's ``(N, K)`` statistics, in rank order (one all_gather)."""
    dev = stats.device
    if str(dist.get_backend(sh.group)).lower() != "nccl" and dev.type != "cpu":
        stats = stats.cpu()
    out = funcol.all_gather_single(stats.contiguous(), 0, sh.group)
    out = funcol.wait_tensor(out)
    return out.view(sh.world, stats.shape[0], stats.shape[1]).to(dev)


def all_reduce_sum(t: torch.Tensor, sh: Shard) -> torch.Tensor:
    """Sum of ``t`` over the ranks. Eager: in place (``dist.all_reduce``), so the hidden
    gradient needs no second ``(N, H)`` buffer; captured: the functional collective (the
    compiler owns the buffers)."""
    dev = t.device
    on_host = str(dist.get_backend(sh.group)).lower() != "nccl" and dev.type != "cpu"
    if on_host:
        t = t.cpu()
    if torch.compiler.is_compiling():
        t = funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", sh.group))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=sh.group)
    return t.to(dev) if on_host else t


# ------------------------------------------------------------- autograd Functions
# ------------------------------------------------------------- autograd Functions
class _Targets:
    """The target in local terms (index into the shard, and which rows this shard holds),
    the non-target coefficients :math:`\\sigma` and the options the statistics depend on.

    ``probs``: this rank's slice of class-probability targets (rows, V_r), or None for
    class indices ``y``."""

    def __init__(
        self,
        y: Optional[torch.Tensor],
        keep: torch.Tensor,
        sh: Shard,
        Vr: int,
        weight: Optional[torch.Tensor],
        eps: float,
        cdt: torch.dtype,
        *,
        probs: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        softcap: float = 0.0,
        entropy: bool = False,
        accuracy: bool = False,
    ):
        self.keep = keep
        self.wl = weight
        self.eps = eps
        self.temperature = temperature
        self.softcap = softcap
        self.smooth: Optional[torch.Tensor] = None
        if probs is None:
            assert y is not None
            rel = y - sh.start
            self.owned = keep & (rel >= 0) & (rel < Vr)
            self.yl = torch.where(self.owned, rel, 0)
            if eps:
                self.smooth = (
                    torch.full((Vr,), eps / sh.vocab, dtype=cdt, device=y.device)
                    if weight is None
                    else weight * (eps / sh.vocab)
                )
        else:  # sigma_ij = w_j ((1 - eps) q_ij + eps / V): every coefficient is a "smoothing" one
            self.owned = torch.zeros_like(keep)
            self.yl = torch.zeros(keep.shape, dtype=torch.long, device=keep.device)
            q = probs * (1 - eps) + eps / sh.vocab if eps else probs
            self.smooth = q if weight is None else q * weight
        self.layout = Layout(
            weighted=weight is not None and probs is None,
            smoothing=self.smooth is not None,
            entropy=entropy,
            accuracy=accuracy,
            index=probs is None,
        )

    @property
    def transformed(self) -> bool:
        return bool(self.softcap) or self.temperature != 1.0

    def rows(self, sl: slice):
        """(yl, owned, smooth, keep) of the rows ``sl``."""
        sm = self.smooth if self.smooth is None or self.smooth.dim() == 1 else self.smooth[sl]
        return self.yl[sl], self.owned[sl], sm, self.keep[sl]


class _LogitsCE(torch.autograd.Function):
    """Per-row loss, denominator weight, lse, entropy and hit of sharded logits ``x``
    (N, V_r); backward is local (no collective)."""

    @staticmethod
    def forward(ctx, x, tg, sh):
        x = torch.where(tg.keep.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        z = transform_(x.clone(), tg.temperature, tg.softcap) if tg.transformed else x
        stats = local_stats(z, tg.yl, tg.owned, tg.wl, tg.smooth, tg.layout, inplace=z is not x)
        del z
        r = combine(exchange(stats, sh), tg.keep, tg.eps, tg.layout, sh.rank)
        ctx.save_for_backward(x)
        ctx.tg, ctx.r = tg, r
        ctx.mark_non_differentiable(r.den, r.correct)
        ctx.set_materialize_grads(False)
        return r.loss, r.den, r.lse, r.ent, r.correct

    @staticmethod
    def backward(ctx, g_loss, g_den, g_lse, g_ent, g_correct):
        (x,) = ctx.saved_tensors
        tg = ctx.tg
        z = transform_(x.clone(), tg.temperature, tg.softcap) if tg.transformed else x
        grad = local_grad(z, tg.yl, tg.owned, tg.smooth, tg.keep, ctx.r, g_loss, g_lse, g_ent, inplace=z is not x)
        if tg.transformed:
            transform_grad_(grad, x, tg.temperature, tg.softcap)
        return grad, None, None


def _row_blocks(
    N: int,
    Vr: int,
    world: int,
    cdt: torch.dtype,
    chunk_size: Optional[int],
    memory_budget: Optional[int],
    softcap: float = 0.0,
    entropy: bool = False,
) -> int:
    """Rows per block: ``chunk_size``, or what fits ``memory_budget`` bytes in
    ``_BLOCK_BUFFERS`` (rows, V_r) buffers (one more with a soft cap: its backward keeps the
    raw block; 1.25 more with the entropy: ``p`` and a mask beside the shifted logits). The
    default budget is the single-process one divided by the ranks: a rank holds 1/P of the
    classes, so its blocks keep the row count (the speed of the matrix products) of one
    process while its scratch is 1/P of it."""
    if chunk_size is not None:
        return max(1, chunk_size)
    budget = default_budget() // world if memory_budget is None else memory_budget
    esize = 8 if cdt == torch.float64 else 4
    buffers = _BLOCK_BUFFERS + (1 if softcap else 0) + (1.25 if entropy else 0)
    return max(1, min(max(N, 1), int(budget // (buffers * esize * Vr))))


class _LinearCE(torch.autograd.Function):
    """Per-row outputs of ``x @ W_r.T + b_r`` (as :class:`_LogitsCE`) computed in row
    blocks; backward recomputes each block's logits, accumulates the local weight (and
    bias) gradient and all-reduces the hidden-state gradient once."""

    @staticmethod
    def forward(ctx, x, W, b, tg, sh, R):
        cdt = compute_dtype(x.dtype)
        N = x.shape[0]
        Wc = W if W.dtype == cdt else W.to(cdt)
        bc = None if b is None else (b if b.dtype == cdt else b.to(cdt))
        stats = []
        for r0 in range(0, N, R):
            z = transform_(_block_logits(x, Wc, bc, tg.keep, r0, R, cdt), tg.temperature, tg.softcap)
            yl, owned, sm, _ = tg.rows(slice(r0, r0 + R))
            stats.append(local_stats(z, yl, owned, tg.wl, sm, tg.layout, inplace=True))
            del z  # free the block before the next one is allocated: one block alive at a time
        S = torch.cat(stats) if stats else x.new_empty((0, tg.layout.K), dtype=cdt)
        r = combine(exchange(S, sh), tg.keep, tg.eps, tg.layout, sh.rank)
        ctx.save_for_backward(x, W, b)
        ctx.tg, ctx.r, ctx.sh, ctx.R = tg, r, sh, R
        ctx.mark_non_differentiable(r.den, r.correct)
        ctx.set_materialize_grads(False)
        return r.loss, r.den, r.lse, r.ent, r.correct

    @staticmethod
    def backward(ctx, g_loss, g_den, g_lse, g_ent, g_correct):
        x, W, b = ctx.saved_tensors
        tg, r, sh, R = ctx.tg, ctx.r, ctx.sh, ctx.R
        cdt = compute_dtype(x.dtype)
        N = x.shape[0]
        Wc = W if W.dtype == cdt else W.to(cdt)
        bc = None if b is None else (b if b.dtype == cdt else b.to(cdt))
        gx = torch.zeros(x.shape, dtype=cdt, device=x.device)
        gW = torch.zeros(W.shape, dtype=cdt, device=W.device)
        gb = None if b is None else torch.zeros(b.shape, dtype=cdt, device=b.device)

        def block(g, sl):
            return None if g is None else g[sl].to(cdt)

        for r0 in range(0, N, R):
            sl = slice(r0, r0 + R)
            L = _block_logits(x, Wc, bc, tg.keep, r0, R, cdt)
            # a cap's derivative needs the raw logits: then a second block buffer
            z = transform_(L.clone() if tg.softcap else L, tg.temperature, tg.softcap)
            yl, owned, sm, keep = tg.rows(sl)
            gz = local_grad(
                z, yl, owned, sm, keep, rows_of(r, sl), block(g_loss, sl), block(g_lse, sl), block(g_ent, sl), True
            )
            if tg.transformed:
                transform_grad_(gz, L, tg.temperature, tg.softcap, scratch=True)
            xb = _block_rows(x, tg.keep, r0, R, cdt)
            gW.addmm_(gz.t(), xb)
            gx[sl] = gz @ Wc
            if gb is not None:
                gb.add_(gz.sum(dim=0))
            del L, z, gz  # one block alive at a time
        gx = all_reduce_sum(gx, sh)  # the column-parallel sum over the ranks' partial products
        return (gx.to(x.dtype), gW.to(W.dtype), None if gb is None else gb.to(b.dtype), None, None, None)


def _block_rows(x, keep, r0, R, cdt):
    """Rows ``[r0, r0 + R)`` of ``x`` in ``cdt``; ignored rows read as zeros (NaN there
    must not reach the weight gradient through ``0 * nan``)."""
    xb = x[r0 : r0 + R]
    if xb.dtype != cdt:
        xb = xb.to(cdt)
    return torch.where(keep[r0 : r0 + R].unsqueeze(1), xb, torch.zeros((), dtype=cdt, device=x.device))


def _block_logits(x, Wc, bc, keep, r0, R, cdt):
    xb = _block_rows(x, keep, r0, R, cdt)
    return xb @ Wc.t() if bc is None else torch.addmm(bc, xb, Wc.t())


def _finish(
    outs, *, z_loss, token_weight, reduction, return_parts, return_lse, return_accuracy, out_shape, out_dtype, capture
):
    """The LM-head terms on the per-row outputs, then the reduction (as
    :func:`crossent.functional._lm_head.lm_cross_entropy`): ``loss_i = tau_i (base_i +
    z_loss w_{y_i} lse_i^2)``, ``d_i = tau_i w_{y_i}``; then ``(result, lse, hits)``
    with the requested extras."""
    loss, den, lse, _, correct = outs
    if z_loss:
        loss = loss + (z_loss * den) * lse.square()
    if token_weight is not None:
        tw = token_weight.reshape(-1).to(loss.dtype)
        loss = loss * tw
        den = den * tw
    result = reduce_loss(
        loss.reshape(out_shape), den.sum(), reduction, out_dtype=out_dtype, return_parts=return_parts, capture=capture
    )
    extras = []
    if return_lse:
        extras.append(lse.detach().reshape(out_shape))
    if return_accuracy:
        extras.append(correct.sum())
    return (result, *extras) if extras else result


# ----------------------------------------------------------------------- checks
def _check_target_type(func, target, probs_ok: bool):
    if not isinstance(target, torch.Tensor):
        V.fail(
            func,
            "`target` to be a torch.Tensor",
            type(target).__name__,
            "Convert it with torch.as_tensor(...).",
            V.CrossentTypeError,
        )
    if target.dtype == torch.bool or target.is_complex() or (target.is_floating_point() and not probs_ok):
        V.fail(
            func,
            "class-index targets (an integer tensor)",
            f"dtype {target.dtype}",
            "This function takes class indices (token ids); class-probability targets, sharded "
            "like the logits, go to vocab_parallel_cross_entropy.",
            V.CrossentTypeError,
        )


def _common_checks(func, target, weight, Vr, like, ignore_index, label_smoothing, reduction, probs_ok=False):
    reduction = V.check_reduction(func, reduction)
    label_smoothing = V.check_label_smoothing(func, label_smoothing)
    ignore_index = V.check_ignore_index(func, ignore_index)
    _check_target_type(func, target, probs_ok)
    weight = V.as_weight_tensor(func, "weight", weight, like=like)
    if weight is not None and tuple(weight.shape) != (Vr,):
        V.fail(
            func,
            f"`weight` of shape ({Vr},): this rank's slice of the class weights",
            f"shape {V.shape_str(weight.shape)}",
            "Shard the class weights like the logits: weight[vocab_start:vocab_start + V_r].",
        )
    return reduction, label_smoothing, -100 if ignore_index is None else ignore_index, weight


def _check_values(func, target, sh, ignore_index, validate, capture):
    if not V.validation_enabled(validate):
        return
    if capture:
        V.assert_multiclass_values(func, target, True, sh.vocab, ignore_index)
    else:
        V.check_class_indices(func, target, sh.vocab, ignore_index)


def _check_probs(func, target, validate, capture):
    """Value tier for this rank's slice of probability targets: entries finite and >= 0.
    That each row sums to 1 over the whole vocabulary is not checked (it would take a
    collective)."""
    if not V.validation_enabled(validate) or target.numel() == 0:
        return
    if capture:
        V.assert_multiclass_values(func, target, False, 0, None)
        return
    t = target.detach()
    ok = (t >= 0) & torch.isfinite(t)
    if not bool(ok.all()):
        flat = int((~ok).reshape(-1).nonzero()[0])
        V.fail(
            func,
            "finite, non-negative class-probability targets",
            f"{t.reshape(-1)[flat].item()} at flat index {flat} of this rank's slice",
            "Probabilities cannot be negative, NaN or infinite; fix or drop that row.",
        )


def _lm_options(func, z_loss, temperature, softcap, token_weight, target, validate, capture):
    """Checked ``(z_loss, temperature, softcap, token_weight)`` (softcap 0.0: none)."""
    z_loss, temperature, softcap = V.check_lm_head_options(
        func, z_loss=z_loss, temperature=temperature, softcap=softcap
    )
    token_weight = V.check_token_weight(func, token_weight, target, validate=validate, capture=capture)
    return z_loss, temperature, softcap, token_weight


def _check_no_grad(func, **tensors):
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            V.fail(
                func,
                f"`{name}` that does not require grad",
                f"`{name}` with requires_grad=True",
                f"The vocabulary-parallel op differentiates w.r.t. the logits (or hidden, local_weight "
                f"and bias) and token_weight only: pass `{name}.detach()`.",
            )


# ------------------------------------------------------------------------ public
def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    z_loss: float = 0.0,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    token_weight: Optional[torch.Tensor] = None,
    return_accuracy: bool = False,
):
    r"""Cross-entropy of logits sharded along the classes over the ranks of ``group``.

    Rank ``r`` holds ``local_logits`` for the classes ``[vocab_start, vocab_start + V_r)``
    (any sizes: uneven shards are fine); ``target`` (class indices into the *global*
    vocabulary) is the same on every rank. Every rank gets the loss of
    ``crossent.cross_entropy(full_logits, target, full_weight, ignore_index=...,
    reduction=..., label_smoothing=..., z_loss=..., ...)``, the same ``LossParts``, and the
    gradient of its own slice of the logits. With :math:`z = s\tanh(x/s)/T` (``softcap``
    :math:`s` first, then ``temperature`` :math:`T`; the identity by default):

    .. math::
        \ell_i = \tau_i\Bigl[(1-\epsilon)\,w_{y_i}(-\log p_{y_i})
            + \frac{\epsilon}{V}\sum_{c<V} w_c(-\log p_c) + \lambda_z w_{y_i}\operatorname{lse}_i^2\Bigr],
        \qquad -\log p_c = (M_i - z_{ic}) + \operatorname{log1p}\Bigl(\sum_{j \ne k} e^{z_{ij} - M_i}\Bigr)

    with the max :math:`M_i` and sums over the *global* vocabulary (label smoothing is
    :math:`\epsilon / V` of the whole vocabulary, not of the shard), :math:`\lambda_z` =
    ``z_loss``, :math:`\tau` = ``token_weight``; ``mean`` divides by
    :math:`\sum_i \tau_i w_{y_i}` over kept targets. They are assembled from per-token
    statistics of each shard (:mod:`crossent.distributed._stats`): one ``all_gather`` of
    ``(N, 4..8)`` numbers per forward, nothing in the backward, whatever the options.

    **Class-probability targets** (a floating ``target`` shaped like ``local_logits``:
    this rank's slice of the ``(N, V)`` probabilities):
    :math:`\ell_i = -\sum_c w_c\,q'_{ic}\log p_{ic}`, :math:`q' = (1-\epsilon) q + \epsilon/V`,
    ``mean`` divides by the number of rows, as torch; the LM-head options take class indices.

    Args:
        local_logits: ``(N, V_r)``, ``(N, V_r, d_1, ..., d_K)`` or ``(V_r,)``: this rank's classes.
        target: class indices ``(N,)``, ``(N, d_1, ..., d_K)`` or ``()``, identical on every
            rank; or this rank's slice of class probabilities, the shape of ``local_logits``.
        group: the process group the vocabulary is sharded over (default: the world).
        vocab_start, vocab_size: this rank's first class and the global V; both None
            finds them with one ``all_gather`` of the local sizes (eager only).
        weight: ``(V_r,)``, this rank's slice of the class weights.
        ignore_index, reduction, label_smoothing, validate, return_parts: as in
            :func:`crossent.cross_entropy`.
        z_loss, return_lse, softcap, temperature, token_weight, return_accuracy: the
            LM-head options of :func:`crossent.cross_entropy` (``token_weight`` the
            target's shape, identical on every rank).

    Returns:
        The loss (shape of ``target`` for ``reduction='none'``), the same on every rank
        (a :class:`crossent.LossParts` with ``return_parts=True``); then the per-token lse
        (``return_lse``, detached, in the compute dtype) and the int64 count of counted
        tokens whose arg-max is the target (``return_accuracy``), in that order.

    With two ranks, rank ``r`` passes ``logits[:, 2 * r:2 * r + 2]`` and ``vocab_start=2 * r``;
    the runnable example uses a one-rank group, where the shard is the whole vocabulary:

    >>> import torch, torch.distributed as dist, crossent
    >>> from crossent.distributed import vocab_parallel_cross_entropy
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> logits = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 1.2, 0.3, 0.0]])
    >>> y = torch.tensor([0, 3])
    >>> loss = vocab_parallel_cross_entropy(logits, y, vocab_start=0, vocab_size=4)
    >>> round(loss.item(), 4), round(crossent.cross_entropy(logits, y).item(), 4)
    (1.1443, 1.1443)
    >>> loss, lse = vocab_parallel_cross_entropy(logits, y, vocab_start=0, vocab_size=4, z_loss=1e-4,
    ...                                          softcap=30.0, return_lse=True)
    >>> ref, ref_lse = crossent.cross_entropy(logits, y, z_loss=1e-4, softcap=30.0, return_lse=True)
    >>> round(loss.item(), 4) == round(ref.item(), 4), torch.allclose(lse, ref_lse)
    (True, True)
    >>> dist.destroy_process_group()
    """
    func = "vocab_parallel_cross_entropy"
    V.check_floating_input(func, local_logits)
    class_dim = 1 if local_logits.dim() >= 2 else 0
    Vr = local_logits.shape[class_dim]
    reduction, eps, ignore_index, weight = _common_checks(
        func, target, weight, Vr, local_logits, ignore_index, label_smoothing, reduction, probs_ok=True
    )
    probs = target.is_floating_point()
    out_shape = local_logits.shape[:class_dim] + local_logits.shape[class_dim + 1 :]
    want = tuple(local_logits.shape) if probs else tuple(out_shape)
    if tuple(target.shape) != want:
        V.fail(
            func,
            f"target of shape {V.shape_str(want)} for local logits {V.shape_str(local_logits.shape)}",
            f"target of shape {V.shape_str(target.shape)}",
            "Class indices: the global class of each row, the same on every rank. Class "
            "probabilities: this rank's slice, the shape of the local logits.",
        )
    V.check_same_device(func, local_logits, target=target, weight=weight)
    _check_no_grad(func, target=target, weight=weight)
    capture = capturing(local_logits)
    lm = wants_lm_head(z_loss, softcap, temperature, token_weight, return_accuracy) or return_lse
    if lm and probs:
        V.fail(
            func,
            "class-index targets with the LM-head options (z_loss, softcap, temperature, "
            "token_weight, return_lse, return_accuracy)",
            "class-probability targets",
            "Pass token ids, as with crossent.cross_entropy.",
        )
    z_loss, temperature, softcap, token_weight = _lm_options(
        func, z_loss, temperature, softcap, token_weight, target, validate, capture
    )
    sh = shard_of(func, Vr, group, vocab_start, vocab_size, capture)
    out_dtype = local_logits.dtype
    if probs:
        _check_probs(func, target, validate, capture)
        out_dtype = torch.promote_types(out_dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        _check_values(func, target, sh, ignore_index, validate, capture)
    cdt = compute_dtype(out_dtype)

    def rows(t):
        t = t if t.dtype == cdt else t.to(cdt)
        return t.unsqueeze(0) if class_dim == 0 else (t if t.dim() == 2 else t.movedim(1, -1).reshape(-1, Vr))

    z = rows(local_logits)
    w = None if weight is None else weight.to(cdt)
    if probs:
        keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        tg = _Targets(None, keep, sh, Vr, w, eps, cdt, probs=rows(target))
    else:
        y = target.reshape(-1).long()
        keep = y != ignore_index
        tg = _Targets(
            y, keep, sh, Vr, w, eps, cdt, temperature=temperature, softcap=softcap, accuracy=bool(return_accuracy)
        )
    return _finish(
        _LogitsCE.apply(z, tg, sh),
        z_loss=z_loss,
        token_weight=token_weight,
        reduction=reduction,
        return_parts=return_parts,
        return_lse=return_lse,
        return_accuracy=return_accuracy,
        out_shape=out_shape,
        out_dtype=out_dtype,
        capture=capture,
    )


def _check_linear(func, hidden, local_weight, bias):
    """``(V_r, H)`` of a checked sharded head."""
    V.check_floating_input(func, hidden)
    if not isinstance(local_weight, torch.Tensor) or local_weight.dim() != 2:
        found = (
            f"shape {V.shape_str(local_weight.shape)}"
            if isinstance(local_weight, torch.Tensor)
            else type(local_weight).__name__
        )
        V.fail(
            func,
            "`local_weight` of shape (V_r, in_features)",
            found,
            "Pass this rank's rows of the LM head's weight (nn.Linear.weight layout).",
        )
    if hidden.dim() == 0 or hidden.shape[-1] != local_weight.shape[1]:
        V.fail(
            func,
            "`hidden` of shape (*, in_features) matching `local_weight` (V_r, in_features)",
            f"hidden {V.shape_str(hidden.shape)} and local_weight {V.shape_str(local_weight.shape)}",
            "local_weight has nn.Linear.weight's layout (out_features, in_features); did you pass its transpose?",
        )
    if local_weight.dtype != hidden.dtype:
        V.fail(
            func,
            "`local_weight` with the hidden states' dtype",
            f"hidden {hidden.dtype} and local_weight {local_weight.dtype}",
            f"Cast one of them, e.g. `hidden.to({local_weight.dtype})`.",
            V.CrossentTypeError,
        )
    Vr, H = local_weight.shape
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (Vr,)):
        found = f"shape {V.shape_str(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        V.fail(
            func,
            f"`bias` of shape ({Vr},): this rank's slice of the head's bias",
            found,
            "Shard the bias like the weight rows.",
        )
    return Vr, H


def _check_lead(func, target, hidden):
    lead = tuple(hidden.shape[:-1])
    if tuple(target.shape) != lead:
        V.fail(
            func,
            f"target of shape {V.shape_str(lead)} for hidden {V.shape_str(hidden.shape)}",
            f"target of shape {V.shape_str(target.shape)}",
            "One global class index per hidden row, the same on every rank.",
        )
    return lead


def _check_blocks(func, chunk_size, memory_budget):
    for name, v in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            V.fail(
                func,
                f"`{name}` to be a positive int or None",
                repr(v),
                "Leave it None to size blocks from the memory budget.",
            )


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    bias: Optional[torch.Tensor] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    validate: Optional[bool] = None,
    return_parts: bool = False,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    token_weight: Optional[torch.Tensor] = None,
    return_accuracy: bool = False,
):
    r"""Fused LM head + cross-entropy with the head's weight sharded along the vocabulary.

    Rank ``r`` holds ``local_weight`` = rows ``[vocab_start, vocab_start + V_r)`` of the
    ``(V, H)`` weight (and ``bias`` likewise), as ``ColwiseParallel`` shards an
    ``nn.Linear``; ``hidden`` ``(*, H)`` and ``target`` ``(*)`` are the same on every rank.
    The result equals ``crossent.linear_cross_entropy(hidden, full_weight, target,
    linear_bias=full_bias, ...)``, computed as

    .. math::
        x_{ij} = h_i \cdot W_j + b_j \ (j \text{ in the shard}), \qquad
        \ell_i \text{ as in } :func:`vocab_parallel_cross_entropy`

    (the LM-head options ``softcap``, ``temperature``, ``z_loss``, ``token_weight``,
    ``return_lse``, ``return_accuracy`` included) in blocks of ``chunk_size`` rows
    (default: as many as fit 1.25 buffers of ``(rows, V_r)`` in ``memory_budget`` bytes, by
    default the single-process budget -- 256 MiB or ``CROSSENT_LINEAR_BUDGET`` -- divided
    by the number of ranks; one more with a soft cap, whose backward keeps the raw block): neither
    ``(N, V)`` nor ``(N, V_r)`` is ever stored. Backward recomputes each block, returns the
    local weight's (and bias's) gradient and the full ``hidden`` gradient: one
    ``all_reduce`` of the ``(N, H)`` partial sums, like a column-parallel linear layer.

    Communication: forward one ``all_gather`` of ``(N, 4..8)`` per-token statistics;
    backward one ``all_reduce`` of ``(N, H)``.

    With two ranks, rank ``r`` passes ``W[2 * r:2 * r + 2]`` and ``vocab_start=2 * r``; the
    runnable example uses a one-rank group:

    >>> import torch, torch.distributed as dist, crossent
    >>> from crossent.distributed import vocab_parallel_linear_cross_entropy
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> h = torch.tensor([[1.0, -0.5], [0.2, 0.3]])
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [0.5, 0.5]])
    >>> y = torch.tensor([0, 2])
    >>> loss = vocab_parallel_linear_cross_entropy(h, W, y, vocab_start=0, vocab_size=4)
    >>> round(loss.item(), 4), round(crossent.linear_cross_entropy(h, W, y).item(), 4)
    (0.9031, 0.9031)
    >>> loss = vocab_parallel_linear_cross_entropy(h, W, y, vocab_start=0, vocab_size=4, temperature=2.0)
    >>> round(loss.item(), 4), round(crossent.linear_cross_entropy(h, W, y, temperature=2.0).item(), 4)
    (1.0494, 1.0494)
    >>> dist.destroy_process_group()
    """
    func = "vocab_parallel_linear_cross_entropy"
    Vr, H = _check_linear(func, hidden, local_weight, bias)
    reduction, eps, ignore_index, weight = _common_checks(
        func, target, weight, Vr, hidden, ignore_index, label_smoothing, reduction
    )
    lead = _check_lead(func, target, hidden)
    V.check_same_device(func, hidden, local_weight=local_weight, bias=bias, target=target, weight=weight)
    _check_no_grad(func, target=target, weight=weight)
    _check_blocks(func, chunk_size, memory_budget)
    capture = capturing(hidden)
    z_loss, temperature, softcap, token_weight = _lm_options(
        func, z_loss, temperature, softcap, token_weight, target, validate, capture
    )
    sh = shard_of(func, Vr, group, vocab_start, vocab_size, capture)
    _check_values(func, target, sh, ignore_index, validate, capture)
    cdt = compute_dtype(hidden.dtype)
    x = hidden.reshape(-1, H)
    N = x.shape[0]
    y = target.reshape(-1).long()
    keep = y != ignore_index
    w = None if weight is None else weight.to(cdt)
    tg = _Targets(
        y, keep, sh, Vr, w, eps, cdt, temperature=temperature, softcap=softcap, accuracy=bool(return_accuracy)
    )
    R = _row_blocks(N, Vr, sh.world, cdt, chunk_size, memory_budget, softcap)
    return _finish(
        _LinearCE.apply(x, local_weight, bias, tg, sh, R),
        z_loss=z_loss,
        token_weight=token_weight,
        reduction=reduction,
        return_parts=return_parts,
        return_lse=return_lse,
        return_accuracy=return_accuracy,
        out_shape=lead,
        out_dtype=hidden.dtype,
        capture=capture,
    )


def vocab_parallel_token_logprobs(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: Optional[bool] = None,
):
    r"""Per-token log-probability (and entropy) of the target, logits sharded along the classes.

    :func:`crossent.token_logprobs` of the gathered ``(*, V)`` logits, from each rank's
    slice ``(*, V_r)`` (classes last; ``target`` ``(*)`` holds global token ids, the same on
    every rank). With :math:`z = s\tanh(x/s)/T`, the global max :math:`M`,
    :math:`S' = \sum_{j \ne k} e^{z_j - M}` and :math:`B = \sum_j e^{z_j - M}(M - z_j)`
    over the whole vocabulary:

    .. math::
        \log p_y = -\Bigl[(M - z_y) + \operatorname{log1p} S'\Bigr], \qquad
        H = \frac{B}{1 + S'} + \operatorname{log1p} S'

    Sums of non-negative terms, assembled from the shards' statistics (``B`` rescaled per
    shard to the global max, :mod:`crossent.distributed._stats`): no ``p log p``
    cancellation. One ``all_gather`` of ``(N, 4)`` numbers (5 with ``return_entropy``) per
    forward; the backward of both outputs is local.

    Args:
        local_logits: ``(*, V_r)``: this rank's classes of the logits.
        target: ``(*)`` global token ids; ``ignore_index`` marks padding (log-prob and
            entropy 0 there, zero gradient).
        group, vocab_start, vocab_size: as :func:`vocab_parallel_cross_entropy`.
        temperature, softcap, return_entropy, validate: as :func:`crossent.token_logprobs`.

    Returns:
        ``logp`` ``(*)`` in float32 (float64 for float64 logits), or ``(logp, H)``; both
        differentiable w.r.t. ``local_logits``, identical on every rank.

    >>> import torch, torch.distributed as dist, crossent
    >>> from crossent.distributed import vocab_parallel_token_logprobs
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]])
    >>> lp, H = vocab_parallel_token_logprobs(logits, torch.tensor([0, 1]), vocab_start=0, vocab_size=3,
    ...                                       return_entropy=True)
    >>> [round(v, 4) for v in lp.tolist()], [round(v, 4) for v in H.tolist()]
    ([-0.2413, -0.5536], [0.6216, 0.9744])
    >>> dist.destroy_process_group()
    """
    func = "vocab_parallel_token_logprobs"
    V.check_floating_input(func, local_logits)
    if local_logits.dim() < 1:
        V.fail(func, "`local_logits` of shape (*, V_r)", "a 0-dim tensor", "Pass logits with the classes last.")
    _, temperature, softcap = V.check_lm_head_options(func, temperature=temperature, softcap=softcap)
    ignore_index = V.check_ignore_index(func, ignore_index)
    ignore_index = -100 if ignore_index is None else ignore_index
    _check_target_type(func, target, False)
    Vr = local_logits.shape[-1]
    lead = tuple(local_logits.shape[:-1])
    if tuple(target.shape) != lead:
        V.fail(
            func,
            f"`target` of shape {V.shape_str(lead)} (one token id per row of logits)",
            f"shape {V.shape_str(target.shape)}",
            "The classes are the last dimension of the logits; for (B, T, V_r) logits pass (B, T) ids.",
        )
    V.check_same_device(func, local_logits, target=target)
    capture = capturing(local_logits)
    sh = shard_of(func, Vr, group, vocab_start, vocab_size, capture)
    _check_values(func, target, sh, ignore_index, validate, capture)
    cdt = compute_dtype(local_logits.dtype)
    x = local_logits.reshape(-1, Vr)
    x = x if x.dtype == cdt else x.to(cdt)
    y = target.reshape(-1).long()
    keep = y != ignore_index
    tg = _Targets(y, keep, sh, Vr, None, 0.0, cdt, temperature=temperature, softcap=softcap, entropy=return_entropy)
    nll, _, _, ent, _ = _LogitsCE.apply(x, tg, sh)
    lp = (-nll).reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp


def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    bias: Optional[torch.Tensor] = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    validate: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
):
    r""":func:`vocab_parallel_token_logprobs` of ``F.linear(hidden, W, b)`` with ``W`` sharded
    along the vocabulary, without the logits.

    Equals :func:`crossent.linear_token_logprobs` on the gathered weight (values; gradients
    w.r.t. ``hidden``, ``local_weight``, ``bias``), computed in row blocks as
    :func:`vocab_parallel_linear_cross_entropy`. Communication: forward one
    ``all_gather`` of ``(N, 4)`` numbers (5 with ``return_entropy``), backward one
    ``all_reduce`` of the ``(N, H)`` hidden-state gradient.

    Args:
        hidden: ``(*, H)``, the same on every rank; local_weight: ``(V_r, H)``; bias: ``(V_r,)``.
        target: ``(*)`` global token ids. Other arguments as
            :func:`vocab_parallel_token_logprobs` and :func:`vocab_parallel_linear_cross_entropy`.

    >>> import torch, torch.distributed as dist, crossent
    >>> from crossent.distributed import vocab_parallel_linear_token_logprobs
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> h = torch.tensor([[1.0, -0.5], [0.2, 0.3]])
    >>> W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    >>> y = torch.tensor([0, 2])
    >>> lp = vocab_parallel_linear_token_logprobs(h, W, y, vocab_start=0, vocab_size=3)
    >>> torch.allclose(lp, crossent.linear_token_logprobs(h, W, y))
    True
    >>> dist.destroy_process_group()
    """
    func = "vocab_parallel_linear_token_logprobs"
    Vr, H = _check_linear(func, hidden, local_weight, bias)
    _, temperature, softcap = V.check_lm_head_options(func, temperature=temperature, softcap=softcap)
    ignore_index = V.check_ignore_index(func, ignore_index)
    ignore_index = -100 if ignore_index is None else ignore_index
    _check_target_type(func, target, False)
    lead = _check_lead(func, target, hidden)
    V.check_same_device(func, hidden, local_weight=local_weight, bias=bias, target=target)
    _check_blocks(func, chunk_size, memory_budget)
    capture = capturing(hidden)
    sh = shard_of(func, Vr, group, vocab_start, vocab_size, capture)
    _check_values(func, target, sh, ignore_index, validate, capture)
    cdt = compute_dtype(hidden.dtype)
    x = hidden.reshape(-1, H)
    y = target.reshape(-1).long()
    keep = y != ignore_index
    tg = _Targets(y, keep, sh, Vr, None, 0.0, cdt, temperature=temperature, softcap=softcap, entropy=return_entropy)
    R = _row_blocks(x.shape[0], Vr, sh.world, cdt, chunk_size, memory_budget, softcap, return_entropy)
    nll, _, _, ent, _ = _LinearCE.apply(x, local_weight, bias, tg, sh, R)
    lp = (-nll).reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp
