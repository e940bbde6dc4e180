"""``crossent demo``: the tutorials' training loop, done right, on real bundled data.
Design notes: ``docs/design.md``, section ``crossent.cli.demo``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Tuple

DEFAULT_OUT = "crossent-out"
BINARY_MODELS = ("sigmoid+BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss(2)")
DIGITS_MODEL = "digits CrossEntropyLoss(10)"


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, the init and the batch order (default 0)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps or auto (default cpu)")
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"parent folder of the run folders (default ./{DEFAULT_OUT}); each run "
        "writes to a new OUT/run-NNN, so earlier results are never overwritten",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


# --------------------------------------------------------------------------- data
def _split(n: int, target, val_fraction: float, generator):
    """Stratified split: the same fraction of every class goes to validation."""
    import torch

    train, val = [], []
    for c in torch.unique(target):
        idx = (target == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(val_fraction * idx.numel()))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _standardise(x_train, x_val):
    mean = x_train.mean(0)
    std = x_train.std(0).clamp_min(1e-6)
    return (x_train - mean) / std, (x_val - mean) / std


def _batches(n: int, batch_size: int, generator=None):
    import torch

    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- models
class _Classifier:
    """A model, its criterion, how to turn outputs into predictions, and its optimiser."""

    def __init__(self, name, model, criterion, predict, lr):
        import torch

        self.name = name
        self.model = model
        self.criterion = criterion
        self.predict = predict
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)


def _build(args, device, n_features_binary: int, n_features_digits: int) -> List[_Classifier]:
    import torch
    from torch import nn as tnn

    import crossent
    from crossent import probabilities as P

    torch.manual_seed(args.seed)
    trunk = tnn.Sequential(tnn.Linear(n_features_binary, 16), tnn.ReLU())
    head1 = tnn.Linear(16, 1)
    head2 = P.one_logit_head_to_two(head1)  # z1 - z0 == head1's logit at step 0
    squeeze = tnn.Flatten(0)  # (N, 1) -> (N,)
    sig = tnn.Sequential(copy.deepcopy(trunk), copy.deepcopy(head1), squeeze, tnn.Sigmoid())
    logit = tnn.Sequential(copy.deepcopy(trunk), copy.deepcopy(head1), squeeze)
    two = tnn.Sequential(copy.deepcopy(trunk), head2)
    digits = tnn.Sequential(tnn.Linear(n_features_digits, 32), tnn.ReLU(), tnn.Linear(32, 10))
    lr = 3e-3
    models = [
        _Classifier(BINARY_MODELS[0], sig, crossent.nn.BCELoss(), lambda p: (p > 0.5).long(), lr),
        _Classifier(BINARY_MODELS[1], logit, crossent.nn.BCEWithLogitsLoss(), P.binary_predictions, lr),
        _Classifier(BINARY_MODELS[2], two, crossent.nn.CrossEntropyLoss(), P.multiclass_predictions, lr),
        _Classifier(DIGITS_MODEL, digits, crossent.nn.CrossEntropyLoss(), P.multiclass_predictions, lr),
    ]
    for m in models:
        m.model.to(device)
    return models


def _target_for(clf: _Classifier, y):
    """BCE heads take float 0/1 targets of the output's shape; CE heads take class indices."""
    return y.float() if clf.name in BINARY_MODELS[:2] else y


def _train_epoch(clf: _Classifier, x, y, batch_size: int, generator) -> float:
    from crossent.tracking import LossMeter

    clf.model.train()
    meter = LossMeter()
    for idx in _batches(x.shape[0], batch_size, generator):
        clf.optimizer.zero_grad()
        loss = meter(clf.criterion, clf.model(x[idx]), _target_for(clf, y[idx]))
        loss.backward()
        clf.optimizer.step()
    return meter.compute()


def _evaluate(clf: _Classifier, x, y, batch_size: int) -> Tuple[float, float, float]:
    """(exact average loss, accuracy, mean of batch means) over the whole split."""
    import torch

    from crossent.tracking import LossMeter

    clf.model.eval()
    meter = LossMeter()
    correct = 0
    batch_means = []
    with torch.no_grad():
        for idx in _batches(x.shape[0], batch_size):
            out = clf.model(x[idx])
            loss = meter(clf.criterion, out, _target_for(clf, y[idx]))
            batch_means.append(loss.item())
            correct += int((clf.predict(out) == y[idx]).sum())
    return meter.compute(), correct / x.shape[0], sum(batch_means) / len(batch_means)


# --------------------------------------------------------------------------- output
def _table_header() -> List[str]:
    names = list(BINARY_MODELS) + [DIGITS_MODEL]
    top = "epoch |" + "|".join(f" {n:^19} " for n in names)
    sub = "      |" + "|".join(f" {'train':>9} {'val':>9} " for _ in names)
    return [top.rstrip(), sub.rstrip(), "-" * len(top.rstrip())]


def _table_row(epoch: int, rows: Dict[str, Tuple[float, float]]) -> str:
    names = list(BINARY_MODELS) + [DIGITS_MODEL]
    return (f"{epoch:5d} |" + "|".join(f" {rows[n][0]:9.5f} {rows[n][1]:9.5f} " for n in names)).rstrip()


def _resolve_device(spec: str):
    import torch

    from ._checks import check_device

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device("--device", spec)  # also refuses meta, xla, ... (the demo trains for real)
    return torch.device(spec)


def run(args) -> int:
    t_start = time.perf_counter()
    import torch

    from ._checks import at_least, new_run_dir

    at_least("--epochs", args.epochs)
    at_least("--batch-size", args.batch_size)
    device = _resolve_device(args.device)
    out_dir = new_run_dir(os.path.abspath(args.out))  # claimed and probed before any training
    # Tiny models: one thread is fastest (more threads only add synchronisation, and on a
    # busy 2-core machine OpenMP spin-waits make small ops 10-20x slower). Restored at the end.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, device, out_dir, t_start)
    except BaseException:
        try:
            os.rmdir(out_dir)  # only if nothing was written: a failed run leaves no empty run folder
        except OSError:
            pass
        raise
    finally:
        torch.set_num_threads(threads)


def _run(args, device, out_dir: str, t_start: float) -> int:
    import torch

    import crossent
    from crossent import probabilities as P
    from crossent.data import load_breast_cancer, load_digits
    from crossent.tracking import History

    # ---- data: stratified 80/20 splits, standardised with training statistics
    g = torch.Generator().manual_seed(args.seed)
    bc, dg = load_breast_cancer(), load_digits()
    tr, va = _split(bc.target.numel(), bc.target, 0.2, g)
    bx_tr, bx_va = _standardise(bc.features[tr], bc.features[va])
    by_tr, by_va = bc.target[tr], bc.target[va]
    tr, va = _split(dg.target.numel(), dg.target, 0.2, g)
    dx_tr, dx_va = _standardise(dg.features[tr], dg.features[va])
    dy_tr, dy_va = dg.target[tr], dg.target[va]
    data: dict = {n: (bx_tr, by_tr, bx_va, by_va) for n in BINARY_MODELS}
    data[DIGITS_MODEL] = (dx_tr, dy_tr, dx_va, dy_va)
    data = {n: tuple(t.to(device) for t in d) for n, d in data.items()}

    models = _build(args, device, bc.features.shape[1], dg.features.shape[1])
    # the same batch order for the three binary heads (they must stay comparable)
    gens = {m.name: torch.Generator().manual_seed(args.seed + (1 if m.name == DIGITS_MODEL else 0)) for m in models}

    print(
        f"crossent {crossent.__version__} demo: torch {torch.__version__}, device {device}, "
        f"seed {args.seed}, {args.epochs} epochs, batch size {args.batch_size}"
    )
    print(
        f"  breast cancer: {by_tr.numel()} train / {by_va.numel()} validation tumours "
        f"(30 features, {int(bc.target.sum())} of {bc.target.numel()} malignant)"
    )
    print(f"  digits:        {dy_tr.numel()} train / {dy_va.numel()} validation images (8x8, 10 classes)")
    print(
        "  losses below are exact per-sample averages over each split (LossMeter); "
        "train = average over the epoch's batches while training"
    )
    print()

    bar = _progress(args.epochs, args.progress)
    emit = bar.write if bar is not None else print
    for line in _table_header():
        emit(line)
    history = History()
    final: Dict[str, Tuple[float, float, float, float]] = {}
    for epoch in range(1, args.epochs + 1):
        rows = {}
        for clf in models:
            x_tr, y_tr, x_va, y_va = data[clf.name]
            train_loss = _train_epoch(clf, x_tr, y_tr, args.batch_size, gens[clf.name])
            val_loss, val_acc, val_mean_of_means = _evaluate(clf, x_va, y_va, args.batch_size)
            rows[clf.name] = (train_loss, val_loss)
            history.log(
                task="digits" if clf.name == DIGITS_MODEL else "breast_cancer",
                model=clf.name,
                epoch=epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_accuracy=val_acc,
            )
            final[clf.name] = (train_loss, val_loss, val_acc, val_mean_of_means)
        emit(_table_row(epoch, rows))
        if bar is not None:
            bar.set_postfix_str(f"digits val {rows[DIGITS_MODEL][1]:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()

    # ---- final accuracies and the two identities of the tutorials' heads
    lines = ["", "final accuracy:"]
    for clf in models:
        x_tr, y_tr, x_va, y_va = data[clf.name]
        _, train_acc, _ = _evaluate(clf, x_tr, y_tr, args.batch_size)
        tl, vl, va_acc, _ = final[clf.name]
        lines.append(
            f"  {clf.name:<28} train {train_acc:7.2%}  validation {va_acc:7.2%} "
            f"({round(va_acc * y_va.numel())}/{y_va.numel()})   val loss {vl:.5f}"
        )
    two = next(m for m in models if m.name == BINARY_MODELS[2])
    with torch.no_grad():
        z = two.model(data[two.name][2]).cpu().double()  # float64 on the CPU (MPS has none)
        gap = (torch.sigmoid(P.two_logits_to_one(z)) - P.multiclass_probabilities(z)[:, 1]).abs().max().item()
    drift = max(
        abs(a - b)
        for a, b in zip(
            history.column("val_loss", model=BINARY_MODELS[0]), history.column("val_loss", model=BINARY_MODELS[1])
        )
    )
    vl, mom = final[BINARY_MODELS[1]][1], final[BINARY_MODELS[1]][3]
    n_val = data[BINARY_MODELS[1]][3].numel()
    last = n_val % args.batch_size or args.batch_size
    lines += [
        "",
        "checks:",
        f"  CrossEntropyLoss(2) head: max |sigmoid(z1 - z0) - softmax(z)[:, 1]| = {gap:.1e} "
        "(one model, two parametrisations)",
        f"  sigmoid+BCELoss vs BCEWithLogitsLoss: max |val loss difference| over {args.epochs} "
        f"epochs = {drift:.1e} (same math; the logits form is the stable one)",
        f"  BCEWithLogitsLoss val loss: exact {vl:.6f}; a mean of batch means would say "
        f"{mom:.6f} (last batch {last} of {n_val} samples)",
    ]
    for line in lines:
        print(line)

    # ---- files
    written = history.save(out_dir)
    png = os.path.join(out_dir, "curves.png")
    try:
        _plot(history, png)
        written.append(png)
    except ImportError as exc:
        print(f"\ncurves not drawn: {exc}")
    elapsed = time.perf_counter() - t_start
    summary = os.path.join(out_dir, "summary.txt")
    from crossent._files import atomic_write_text

    atomic_write_text(
        summary,
        "\n".join(
            [
                f"crossent {crossent.__version__} demo, torch {torch.__version__}, device {device}, "
                f"seed {args.seed}, epochs {args.epochs}, batch size {args.batch_size}",
                f"data: {bc.source}; {dg.source}",
                *lines[1:],
                "",
                f"time: {elapsed:.1f} s",
                "files: " + ", ".join(os.path.basename(p) for p in written + [summary]),
            ]
        )
        + "\n",
    )
    written.append(summary)
    print(f"\nwrote {len(written)} files to {out_dir}{os.sep}:")
    for p in written:
        print(f"  {p}")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


def _progress(total: int, wanted):
    """A tqdm bar on stderr (auto: only when stderr is a terminal); None when off or missing."""
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print('(no progress bar: tqdm is not installed; pip install "crossent[demo]")', file=sys.stderr)
        return None
    return tqdm(total=total, desc="epochs", unit="epoch", file=sys.stderr, leave=False, dynamic_ncols=True)


def _plot(history, path: str) -> None:
    from crossent.tracking import plot_history
    from crossent.tracking.plot import new_figure, save_figure

    fig, (ax1, ax2) = new_figure(2, width=6.0, height=4.4)
    binary = [r for r in history if r["task"] == "breast_cancer"]
    digits = [r for r in history if r["task"] == "digits"]
    plot_history(binary, ax=ax1, by="model", title="breast cancer (binary): three heads")
    plot_history(digits, ax=ax2, by="model", title="digits (10 classes): CrossEntropyLoss")
    fig.suptitle("exact per-sample average loss (crossent LossMeter): train solid, validation dashed")
    save_figure(fig, path)
