r"""Class weights for imbalanced data, ready for ``weight=`` and ``pos_weight=``.

Count the labels once (:func:`count_labels`, over a target tensor or a whole
``DataLoader``), then turn the counts into weights:

* :func:`inverse_frequency`: :math:`w_c = N / (C\,n_c)` (scikit-learn's ``"balanced"``):
  every class contributes the same total weight.
* :func:`effective_number`: Cui et al. 2019, :math:`w_c \propto (1-\beta) / (1-\beta^{n_c})`,
  normalised to :math:`\sum_c w_c = C`; :math:`\beta \to 0` gives equal weights,
  :math:`\beta \to 1` inverse frequency.
* :func:`pos_weight_from_counts`: :math:`p_\ell = n^-_\ell / n^+_\ell` per label for
  :class:`crossent.nn.BCEWithLogitsLoss` (300 negatives, 100 positives: 3).

A class that never occurs has no finite weight: the functions raise, naming the classes,
unless ``smoothing`` adds a pseudo-count to every class.

>>> import torch, crossent
>>> y = torch.tensor([0, 0, 0, 1, 2, 2, -100])
>>> counts = crossent.class_weights.count_labels(y, 3, ignore_index=-100)
>>> counts.tolist()
[3, 1, 2]
>>> [round(v, 4) for v in crossent.class_weights.inverse_frequency(counts).tolist()]
[0.6667, 2.0, 1.0]
>>> crossent.class_weights.pos_weight_from_counts(torch.tensor([100]), torch.tensor([300])).tolist()
[3.0]
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional, Union

import torch

from ._validation import CrossentTypeError, fail

__all__ = ["LabelCounts", "count_labels", "effective_number", "inverse_frequency", "pos_weight_from_counts"]


class LabelCounts(NamedTuple):
    """Per-label counts of binary / multi-label targets (:func:`count_labels` with ``multilabel=True``)."""

    positives: torch.Tensor
    negatives: torch.Tensor


def _as_counts(func: str, name: str, counts, smoothing: float) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor):
        try:
            counts = torch.as_tensor(counts)
        except (TypeError, ValueError, RuntimeError):
            fail(
                func,
                f"`{name}` to be a tensor or sequence of counts",
                type(counts).__name__,
                "Pass one count per class, e.g. count_labels(targets, num_classes).",
                CrossentTypeError,
            )
    if counts.dim() != 1 or counts.numel() == 0:
        fail(
            func,
            f"`{name}` to be a non-empty 1-D tensor, one count per class",
            f"shape {tuple(counts.shape)}",
            "Pass counts of shape (C,).",
        )
    if counts.is_complex() or counts.dtype == torch.bool:
        fail(
            func,
            f"`{name}` to hold real counts",
            f"dtype {counts.dtype}",
            "Pass integer or float counts.",
            CrossentTypeError,
        )
    c = counts.to(torch.float64)
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        fail(func, f"`{name}` to be finite and >= 0", f"{counts.tolist()}", "Counts are numbers of examples.")
    if (
        isinstance(smoothing, bool)
        or not isinstance(smoothing, (int, float))
        or not (math.isfinite(smoothing) and smoothing >= 0)
    ):
        fail(
            func,
            "`smoothing` to be a finite number >= 0",
            repr(smoothing),
            "smoothing adds a pseudo-count to every class (1 is add-one smoothing).",
        )
    return c + smoothing


def _require_positive(func: str, name: str, c: torch.Tensor) -> None:
    zero = (c == 0).nonzero().flatten().tolist()
    if zero:
        fail(
            func,
            f"every entry of `{name}` to be > 0",
            f"zero counts at {zero[:10]}{'...' if len(zero) > 10 else ''}",
            "A class with no examples has no finite weight: pass smoothing=1 (add-one), or drop the class.",
        )


def inverse_frequency(counts, *, smoothing: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Inverse-frequency class weights :math:`w_c = N / (C\,n_c)`, :math:`N = \sum_c n_c`.

    The weights of a balanced data set are all 1, and :math:`\sum_c n_c w_c = N`: the
    weighted loss keeps the scale of the unweighted one. ``smoothing`` is added to every
    count first. Returns a (C,) tensor of ``dtype`` for ``weight=``.

    >>> import crossent
    >>> [round(v, 4) for v in crossent.class_weights.inverse_frequency([90, 10]).tolist()]
    [0.5556, 5.0]
    """
    func = "inverse_frequency"
    c = _as_counts(func, "counts", counts, smoothing)
    _require_positive(func, "counts", c)
    return (c.sum() / (c.numel() * c)).to(dtype)


def effective_number(
    counts, beta: float = 0.999, *, smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""Class-balanced weights by the effective number of samples (Cui et al. 2019).

    .. math::
        E_c = \frac{1 - \beta^{n_c}}{1 - \beta},\qquad w_c = \frac{C\,/E_c}{\sum_j 1/E_j}

    :math:`1 - \beta^{n}` is evaluated as ``-expm1(n * log(beta))``, exact for ``beta``
    close to 1 (the paper's 0.9999). ``beta = 0`` gives equal weights; ``beta -> 1``
    inverse frequency (normalised the same way).

    >>> import crossent
    >>> w = crossent.class_weights.effective_number([1000, 10], beta=0.99)
    >>> [round(v, 4) for v in w.tolist()]
    [0.1746, 1.8254]
    """
    func = "effective_number"
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 <= beta < 1):
        fail(
            func,
            "`beta` in [0, 1)",
            repr(beta),
            "Cui et al. use 0.9, 0.99, 0.999 or 0.9999 (larger for larger data sets).",
        )
    c = _as_counts(func, "counts", counts, smoothing)
    _require_positive(func, "counts", c)
    if beta == 0:
        inv = torch.ones_like(c)
    else:
        inv = (1 - beta) / -torch.expm1(c * math.log(beta))  # 1 / E_c
    return (inv * (c.numel() / inv.sum())).to(dtype)


def pos_weight_from_counts(
    positives, negatives, *, smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""``pos_weight`` per label: :math:`p_\ell = n^-_\ell / n^+_\ell`.

    With it, BCE treats the positives of each label as if there were as many as negatives
    (100 positives, 300 negatives: 3). ``smoothing`` is added to both counts.

    >>> import torch, crossent
    >>> crossent.class_weights.pos_weight_from_counts([100, 50], [300, 950]).tolist()
    [3.0, 19.0]
    """
    func = "pos_weight_from_counts"
    p = _as_counts(func, "positives", positives, smoothing)
    n = _as_counts(func, "negatives", negatives, smoothing)
    if p.shape != n.shape:
        fail(
            func,
            "`positives` and `negatives` of the same shape",
            f"{tuple(p.shape)} and {tuple(n.shape)}",
            "Pass one count of each per label.",
        )
    _require_positive(func, "positives", p)
    return (n / p).to(dtype)


def _target_of(batch, func: str):
    """The target of a DataLoader batch: a tensor, the second item of a tuple/list, or the
    ``labels`` / ``label`` / ``target`` / ``targets`` / ``y`` entry of a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label", "target", "targets", "y"):
            if key in batch:
                return batch[key]
    fail(
        func,
        "batches that are (input, target) pairs, dicts with a 'labels'/'target' entry, or target tensors",
        type(batch).__name__,
        "Pass target=lambda batch: ... to pick the target out of a batch.",
        CrossentTypeError,
    )


def count_labels(
    source: Union[torch.Tensor, Iterable],
    num_classes: Optional[int] = None,
    *,
    ignore_index: Optional[int] = None,
    multilabel: bool = False,
    target=None,
):
    """Count labels in a target tensor or in every batch of a ``DataLoader`` (any iterable).

    Class indices (integer targets, any shape): returns the (C,) int64 counts, ``C =
    num_classes`` or ``max + 1``; entries equal to ``ignore_index`` are not counted.
    ``multilabel=True`` (0/1 targets of shape (N, L) or (N,); float, int or bool): returns
    :class:`LabelCounts` ``(positives, negatives)`` per label (last dimension), ignoring
    entries equal to ``ignore_index`` -- exactly :func:`pos_weight_from_counts`'s arguments.
    ``target`` picks the target out of a batch (default: the batch itself if a tensor, the
    second item of a tuple, or the ``labels`` / ``target`` entry of a dict).

    >>> import torch, crossent
    >>> t = torch.tensor([[1., 0.], [1., 1.], [0., 0.], [0., -1.]])
    >>> crossent.class_weights.count_labels(t, multilabel=True, ignore_index=-1)
    LabelCounts(positives=tensor([2, 1]), negatives=tensor([2, 2]))
    """
    func = "count_labels"
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        fail(
            func,
            "`num_classes` to be a positive int or None",
            repr(num_classes),
            "Pass the number of classes C (or None to use max label + 1).",
        )
    batches = [source] if isinstance(source, torch.Tensor) else source
    pick = target if target is not None else (lambda b: _target_of(b, func))
    counts = pos = neg = None
    for batch in batches:
        t = pick(batch)
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        t = t.detach().cpu()
        keep = None if ignore_index is None else t != ignore_index
        if multilabel:
            tt = t if t.dim() >= 1 else t.reshape(1)
            tt = tt.reshape(-1, tt.shape[-1]) if tt.dim() >= 2 else tt.reshape(-1, 1)
            kk = None if keep is None else keep.reshape(tt.shape)
            valid = (tt == 0) | (tt == 1)
            if kk is not None:
                valid = valid | ~kk
            if not bool(valid.all()):
                bad = tt[~valid][0].item()
                fail(
                    func,
                    "multi-label targets of 0 and 1",
                    f"the value {bad}",
                    f"Pass ignore_index={int(bad) if float(bad).is_integer() else bad} if it marks a missing label;"
                    " soft labels cannot be counted.",
                )
            one = tt == 1
            zero = tt == 0
            if kk is not None:
                one, zero = one & kk, zero & kk
            p, n = one.sum(0), zero.sum(0)
            if pos is None:
                pos, neg = p, n
            elif pos.shape != p.shape:
                fail(
                    func,
                    "the same number of labels in every batch",
                    f"{pos.numel()} and then {p.numel()}",
                    "Check the DataLoader's collate function.",
                )
            else:
                pos, neg = pos + p, neg + n
            continue
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            fail(
                func,
                "integer class-index targets",
                f"dtype {t.dtype}",
                "Class probabilities cannot be counted; for 0/1 multi-label targets pass multilabel=True.",
                CrossentTypeError,
            )
        flat = t.reshape(-1)
        if keep is not None:
            flat = flat[keep.reshape(-1)]
        if flat.numel() and int(flat.min()) < 0:
            fail(
                func,
                "class indices >= 0",
                f"the label {int(flat.min())}",
                f"Pass ignore_index={int(flat.min())} if it marks a missing label.",
            )
        if num_classes is not None and flat.numel() and int(flat.max()) >= num_classes:
            fail(
                func,
                f"class indices < num_classes={num_classes}",
                f"the label {int(flat.max())}",
                "Pass the right num_classes (or None to use max label + 1).",
            )
        b = torch.bincount(flat, minlength=num_classes or 0)
        if counts is None:
            counts = b
        else:
            size = max(counts.numel(), b.numel())
            counts = torch.nn.functional.pad(counts, (0, size - counts.numel())) + torch.nn.functional.pad(
                b, (0, size - b.numel())
            )
    if multilabel:
        if pos is None:
            fail(func, "at least one batch", "an empty source", "Pass a non-empty tensor or DataLoader.")
        return LabelCounts(pos, neg)
    if counts is None:
        fail(func, "at least one batch", "an empty source", "Pass a non-empty tensor or DataLoader.")
    return counts
