"""plot_history: a valid PNG with the train and validation curves on one axes."""

import os
import subprocess
import sys

import pytest

import crossent
from crossent.tracking import History, plot_history
from crossent.tracking.plot import new_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history():
    h = History()
    for e, (tr, va) in enumerate([(0.9, 1.0), (0.5, 0.7), (0.3, 0.6), (0.2, 0.65)], start=1):
        h.log(epoch=e, train_loss=tr, val_loss=va)
    return h


def test_png_is_valid_and_has_two_curves(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "curves.png"
    h = _history()
    fig = plot_history(h, path, title="t")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(fig.axes) == 1
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    train, val = lines
    assert list(train.get_xdata()) == [1, 2, 3, 4] and list(train.get_ydata()) == h.column("train_loss")
    assert list(val.get_ydata()) == h.column("val_loss")
    assert train.get_linestyle() == "-" and val.get_linestyle() == "--"
    assert train.get_color() == val.get_color()
    assert os.listdir(tmp_path) == ["curves.png"]  # written atomically: no temp left


def test_groups_share_one_axes(tmp_path):
    pytest.importorskip("matplotlib")
    h = History()
    for model in ("a", "b"):
        for e in (1, 2, 3):
            h.log(model=model, epoch=e, train_loss=1 / e, val_loss=1.5 / e)
    fig, (ax,) = new_figure(1)
    assert plot_history(h, ax=ax, by="model") is fig
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels == ["a train", "a validation", "b train", "b validation"]


def test_nothing_to_plot_is_an_error():
    pytest.importorskip("matplotlib")
    h = History()
    h.log(step=1, loss=0.3)
    with pytest.raises(ValueError, match=r"plot_history: expected records with numeric columns 'epoch'"):
        plot_history(h)


def test_missing_matplotlib_names_the_install_command(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r'pip install "crossent\[plot\]"'):
        plot_history(_history())


def test_importing_crossent_does_not_import_matplotlib():
    src = os.path.dirname(os.path.dirname(os.path.abspath(crossent.__file__)))
    code = (
        "import sys; sys.path.insert(0, %r); import crossent, crossent.tracking, crossent.probabilities; "
        "print('matplotlib' in sys.modules)" % src
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_missing_folder_is_reported_with_the_users_path(tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "no" / "such" / "dir" / "c.png"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        plot_history(_history(), target)
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)
