"""The runnable examples in the public algorithm functions' docstrings (numpydoc ``Examples``)."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["bids_uad.algorithms.histogram", "bids_uad.algorithms.masking", "bids_uad.algorithms.longitudinal",
           "bids_uad.algorithms.registration", "bids_uad.algorithms.resample", "bids_uad.algorithms.hmc"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
