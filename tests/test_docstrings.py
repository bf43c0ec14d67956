"""The examples in the public modules' docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "pleas_jax.spec",
    "pleas_jax.permutation",
    "pleas_jax.matching.lap",
    "pleas_jax.matching.weights",
    "pleas_jax.merge",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
