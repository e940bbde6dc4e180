"""Train and validation curves on the same axes, saved as PNG (matplotlib, optional extra).
Design notes: ``docs/design.md``, section ``crossent.tracking.plot``.
"""

from __future__ import annotations

import io
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .. import _validation as V
from .._files import atomic_write_bytes
from .history import History

__all__ = ["plot_history", "new_figure", "save_figure"]

INSTALL_HINT = 'pip install "crossent[plot]"'


def _matplotlib(func: str):
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            f"{func}: expected matplotlib (the optional 'plot' extra), but it is not installed "
            f"({exc}). Install it with: {INSTALL_HINT}"
        ) from exc
    return Figure


def new_figure(ncols: int = 1, *, width: float = 6.4, height: float = 4.4):
    """A pyplot-free figure with ``ncols`` side-by-side axes; returns ``(fig, axes_list)``."""
    Figure = _matplotlib("new_figure")
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig, path: Union[str, "os.PathLike[str]"], *, dpi: int = 110) -> str:
    """Render ``fig`` as PNG and write it atomically to ``path``; returns the path."""
    _matplotlib("save_figure")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def plot_history(
    history: Union[History, Iterable[Dict[str, Any]]],
    path: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    train: str = "train_loss",
    val: str = "val_loss",
    x: str = "epoch",
    by: Optional[str] = None,
    ax=None,
    title: Optional[str] = None,
    ylabel: str = "average loss (exact, per sample)",
):
    """Plot the ``train`` and ``val`` columns of ``history`` against ``x`` on one axes.

    Train curves are solid, validation curves dashed, in the same colour, so over-fitting
    shows as the dashed line turning up while the solid one keeps falling.

    Args:
        history: a :class:`History` or a list of record dicts.
        path: if given, the figure is saved there as PNG (atomically).
        train, val, x: column names. A record missing a value is skipped for that curve.
        by: optional column that splits the records into groups (e.g. ``"model"``): one
            train/val pair of curves per group, labelled with the group's value.
        ax: draw on this matplotlib axes (e.g. from :func:`new_figure`) instead of a new figure.
        title, ylabel: axes labels.

    Returns:
        the matplotlib ``Figure`` (its ``axes[i].get_lines()`` are the curves).
    """
    func = "plot_history"
    records: List[Dict[str, Any]] = list(history.records if isinstance(history, History) else history)
    if ax is None:
        fig, (ax,) = new_figure(1)
    else:
        _matplotlib(func)
        fig = ax.figure
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r.get(by) if by else None, []).append(r)
    drawn = 0
    markers = "oxs^vD"  # distinct markers keep identical curves (one on top of another) visible
    for i, (name, rows) in enumerate(groups.items()):
        color = f"C{i % 10}"
        marker = markers[i % len(markers)]
        prefix = f"{name} " if name is not None else ""
        for key, style, label in ((train, "-", "train"), (val, "--", "validation")):
            xs, ys = _series(rows, x, key)
            if not xs:
                continue
            ax.plot(
                xs,
                ys,
                linestyle=style,
                color=color,
                marker=marker if len(xs) <= 40 else None,
                markersize=4,
                markerfacecolor="none",
                label=f"{prefix}{label}",
            )
            drawn += 1
    if drawn == 0:
        cols = sorted({k for r in records for k in r})
        V.fail(
            func,
            f"records with numeric columns {x!r} and {train!r} or {val!r}",
            f"{len(records)} records with columns {cols}",
            "Log them with history.log(epoch=..., train_loss=..., val_loss=...), or name "
            "your columns with train=..., val=..., x=....",
        )
    if all(isinstance(v, int) for r in records for v in [r.get(x)] if v is not None):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        save_figure(fig, path)
    return fig


def _series(rows: Sequence[Dict[str, Any]], x: str, key: str):
    xs, ys = [], []
    for r in rows:
        xv, yv = r.get(x), r.get(key)
        if (
            isinstance(xv, (int, float))
            and isinstance(yv, (int, float))
            and not isinstance(xv, bool)
            and not isinstance(yv, bool)
        ):
            xs.append(xv)
            ys.append(yv)
    return xs, ys
