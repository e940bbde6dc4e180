"""Run the docstring examples of the public modules (the README numbers live there)."""

import doctest
import importlib

import pytest

MODULES = [
    "crossent._patch",
    "crossent.functional._binary",
    "crossent.functional._multiclass",
    "crossent.nn._loss",
    "crossent.functional._focal",
    "crossent.functional._asymmetric",
    "crossent.nn._focal",
    "crossent.class_weights",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
