"""The public surface: every exported name is documented, and the docstring examples run."""

import doctest
import importlib
import inspect

import pytest

import lora_jax

CORE_MODULES = ["lora_jax._spec", "lora_jax._tree", "lora_jax._trace", "lora_jax._transform"]


@pytest.mark.parametrize("name", lora_jax.__all__)
def test_exported_name_has_docstring(name):
    obj = getattr(lora_jax, name)
    if isinstance(obj, str):  # constants are documented where they are defined
        return
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 40, f"lora_jax.{name} needs a docstring"
    if inspect.isfunction(obj):
        assert ">>>" in doc, f"lora_jax.{name} needs a short example"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
