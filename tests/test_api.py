"""The public surface: every exported name is documented, and the docstring examples run."""

import doctest
import importlib
import inspect

import pytest

MODULES = [
    "lora_jax._spec",
    "lora_jax._tree",
    "lora_jax._trace",
    "lora_jax._transform",
    "lora_jax._adapted",
    "lora_jax._primitives",
    "lora_jax.losses",
    "lora_jax.optim",
    "lora_jax.sharding",
    "lora_jax.checkpoint",
    "lora_jax.peft",
    "lora_jax.models.llama",
    "lora_jax.models.loaders",
    "lora_jax.models.tokenizer",
    "lora_jax.models.generate",
    "lora_jax.analysis",
    "lora_jax.experiments.data",
    "lora_jax.experiments.execution",
    "lora_jax.experiments.scoring",
    "lora_jax.experiments.probes",
    "lora_jax.experiments.learn_forget.config",
    "lora_jax.experiments.learn_forget.tasks",
    "lora_jax.experiments.learn_forget.train",
    "lora_jax.experiments.learn_forget.evaluate",
    "lora_jax.experiments.learn_forget.spectra",
    "lora_jax.experiments.learn_forget.store",
    "lora_jax.experiments.learn_forget.runner",
    "lora_jax.experiments.learn_forget.report",
    "lora_jax.experiments.learn_forget.smoke",
]


PUBLIC = [
    "lora_jax",
    "lora_jax.arithmetic",
    "lora_jax.losses",
    "lora_jax.serving",
    "lora_jax.optim",
    "lora_jax.sharding",
    "lora_jax.checkpoint",
    "lora_jax.peft",
    "lora_jax.models",
    "lora_jax.analysis",
    "lora_jax.experiments.data",
    "lora_jax.experiments.execution",
    "lora_jax.experiments.scoring",
    "lora_jax.experiments.probes",
    "lora_jax.experiments.learn_forget",
]
NAMES = [(m, n) for m in PUBLIC for n in getattr(importlib.import_module(m), "__all__", [])]


def test_every_public_module_declares_all():
    assert all(hasattr(importlib.import_module(m), "__all__") for m in PUBLIC)


@pytest.mark.parametrize("module,name", NAMES, ids=[f"{m}.{n}" for m, n in NAMES])
def test_exported_name_has_docstring(module, name):
    obj = getattr(importlib.import_module(module), name)
    if isinstance(obj, str):  # constants are documented where they are defined
        return
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 40, f"{module}.{name} needs a docstring"
    if inspect.isfunction(obj):
        assert ">>>" in doc, f"{module}.{name} needs a short example"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
