"""Every environment variable is read by crossent._config and documented in one table."""

import pathlib
import re

import pytest

import crossent
from crossent import _config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "crossent"


def test_no_module_but_config_reads_the_environment():
    readers = []
    for path in SRC.rglob("*.py"):
        if path.name == "_config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # dict(os.environ, ...) builds a child process's environment; it reads no setting.
            if re.search(r"os\.environ\b|os\.getenv\(", line) and "dict(os.environ" not in line:
                readers.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert readers == []


def test_every_variable_named_in_the_source_is_in_the_table():
    named = set()
    for path in SRC.rglob("*.py"):
        named |= set(re.findall(r"\bCROSSENT_[A-Z_]+\b", path.read_text()))
    named.discard("CROSSENT_EXAMPLE")  # the doctests' scratch variable
    assert named <= set(_config.VARIABLES)


def test_docs_table_is_the_variables_table():
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = re.findall(r"^\| `([A-Z_]+)` \| (.*) \|$", text, flags=re.M)
    assert documented == list(_config.VARIABLES.items())


def test_each_accessor_reads_its_variable_at_call_time(monkeypatch):
    monkeypatch.setenv("CROSSENT_VALIDATE", "off")
    assert _config.validate_default() is False
    monkeypatch.setenv("CROSSENT_VALIDATE", "1")
    assert _config.validate_default() is True
    monkeypatch.setenv("CROSSENT_BACKEND", " reference ")
    assert _config.forced_backend() == "reference"
    monkeypatch.setenv("CROSSENT_LINEAR_BUDGET", "2KiB")
    assert _config.linear_budget(1) == 2048
    monkeypatch.delenv("CROSSENT_LINEAR_BUDGET")
    assert _config.linear_budget(7) == 7


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_bad_build_timeout_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("CROSSENT_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"CROSSENT_BUILD_TIMEOUT: expected a positive number of seconds"):
        _config.build_timeout(120.0)


def test_a_bad_backend_variable_names_the_choices(monkeypatch):
    import torch

    monkeypatch.setenv("CROSSENT_BACKEND", "fastest")
    with pytest.raises(crossent.CrossentValueError, match=r"CROSSENT_BACKEND: expected one of \['auto'"):
        crossent.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
