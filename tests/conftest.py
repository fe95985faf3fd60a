"""Shared test settings.

- The ``gpu`` marker skips without CUDA.
- A test module whose import needs an optional package that is not installed (megatron-core,
  hydra, omegaconf, wandb: a GPU machine as shipped has none of them; transformers, safetensors
  and tokenizers: the ``hf`` extra) is skipped as a whole, and a
  test that imports one while it runs is skipped, with the missing package named. Only a missing
  *top-level* package does this: an ImportError from inside an installed package, or from our own
  code, still fails.
"""
import importlib

import pytest
import torch

OPTIONAL_PACKAGES = {"megatron": "megatron-core", "hydra": "hydra-core", "omegaconf": "omegaconf",
                     "wandb": "wandb", "transformers": "transformers", "safetensors": "safetensors",
                     "tokenizers": "tokenizers"}
"""Top-level module -> distribution that provides it."""


def _missing_optional_package(error: BaseException) -> str | None:
    """The distribution whose absence caused ``error``, or None if the error is anything else."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.split(".")[0]
    if top not in OPTIONAL_PACKAGES:
        return None
    try:
        importlib.import_module(top)
    except ImportError:
        return OPTIONAL_PACKAGES[top]
    return None           # the package is there: a broken install or a wrong name is a real error


class _Module(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            missing = _missing_optional_package(error.__cause__)
            if missing is None:
                raise
            pytest.skip(f"{self.path.name} needs {missing} (not installed: {error.__cause__})",
                        allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    return _Module.from_parent(parent, path=module_path)


def _skip_if_optional_package_missing():
    try:
        return (yield)
    except ModuleNotFoundError as error:
        missing = _missing_optional_package(error)
        if missing is None:
            raise
        pytest.skip(f"needs {missing} (not installed: {error})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_if_optional_package_missing())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_if_optional_package_missing())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
