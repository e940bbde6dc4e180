"""Packaging: torch is the only core dependency, extras carry the rest, one version source."""

import gzip
import importlib.metadata
import pathlib
import sys

import pytest
import torch

import crossent
from crossent import data

ROOT = pathlib.Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_torch_only():
    assert [d.split(">")[0].split("<")[0].strip() for d in _project()["dependencies"]] == ["torch"]


def test_dev_extra_is_built_from_the_other_extras():
    extras = _project()["optional-dependencies"]
    (dev,) = extras["dev"]
    named = dev.split("[", 1)[1].rstrip("]").split(",")
    assert set(named) <= set(extras) - {"dev"}
    assert {"demo", "triton", "test", "lint", "docs"} <= set(named)


def test_triton_extra_is_linux_only():
    (req,) = _project()["optional-dependencies"]["triton"]
    assert "platform_system == 'Linux'" in req


def test_installed_version_is_the_package_version():
    assert "version" in _project()["dynamic"]
    assert importlib.metadata.version("crossent") == crossent.__version__


def test_package_is_marked_typed():
    assert (pathlib.Path(crossent.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    "loader, name", [(data.load_breast_cancer, "breast_cancer.csv.gz"), (data.load_digits, "digits.csv.gz")]
)
def test_bundled_data_parses_like_numpy(loader, name):
    """The torch-only CSV reader gives numpy's values, bit for bit."""
    np = pytest.importorskip("numpy")
    text = gzip.decompress((pathlib.Path(data.__file__).parent / name).read_bytes()).decode("ascii")
    body = text.split("\n", 1)[1] if name.startswith("breast") else text
    arr = np.loadtxt(body.splitlines(), delimiter=",", dtype=np.float64, ndmin=2)
    ds = loader()
    assert torch.equal(ds.features, torch.from_numpy(arr[:, :-1].astype(np.float32)))
    labels = arr[:, -1].astype(np.int64)
    assert torch.equal(ds.target, torch.from_numpy(1 - labels if name.startswith("breast") else labels))


def test_missing_matplotlib_names_the_pip_command(monkeypatch):
    from crossent.tracking import History, plot_history

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ImportError
    history = History()
    history.log(epoch=1, train_loss=1.0)
    with pytest.raises(ImportError, match=r'pip install "crossent\[plot\]"'):
        plot_history(history)


def test_missing_triton_names_the_pip_command(monkeypatch):
    from crossent.backends import triton as triton_backend

    monkeypatch.setitem(sys.modules, "triton", None)
    assert "pip install 'crossent[triton]'" in triton_backend.unavailable_reason(torch.device("cuda"))


def test_missing_tqdm_names_the_pip_command(monkeypatch, capsys):
    from crossent.cli import demo

    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert demo._progress(3, True) is None
    assert 'pip install "crossent[demo]"' in capsys.readouterr().err
