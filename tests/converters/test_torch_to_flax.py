"""converters.torch_to_flax is the entry point: it re-exports the modules below it."""

import importlib

import converters
from converters import torch_to_flax

MODULES = ("layout", "architecture", "mapping", "checkpoint", "reference")


def test_reexports_are_the_same_objects():
    below = [importlib.import_module(f"converters.torch_{name}") for name in MODULES]
    for name in torch_to_flax.__all__:
        if name in ("Converted", "convert_file"):  # defined in torch_to_flax itself
            continue
        homes = [module for module in below if name in vars(module)]
        assert homes, name
        assert all(getattr(module, name) is getattr(torch_to_flax, name) for module in homes), name
    for name in converters.__all__:
        assert getattr(converters, name) is getattr(torch_to_flax, name), name
