"""The one table of primitives, and what happens when JAX gives lora_jax something it does not know.

Whatever JAX changes, an unknown primitive or parameter layout must never
give a wrong answer: `wrap` forms ``W + s·A@B`` with a warning that names the
primitive and the JAX version, `split` refuses the target, and a primitive
JAX itself cannot re-run raises an error naming both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

import lora_jax as lora
from lora_jax import _primitives as P
from lora_jax import _trace, _transform

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (3, 6))
PARAMS = {"w": jax.random.normal(jax.random.key(2), (6, 5))}


def _trained(params, spec, trace=None):
    frozen, adapters = lora.split(params, spec, key=KEY, trace=trace)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return frozen, treedef.unflatten([jax.random.normal(k, a.shape) * 0.3 for k, a in zip(keys, leaves)])


def test_every_role_has_a_rule_in_both_walkers():
    assert set(_transform._ROLE_RULES) == set(P.Role)
    assert set(_trace._HANDLERS) == set(P.Role)
    # Both walkers read the names from the one table.
    assert set(_transform._RULES) == set(P.ROLES)
    assert P.names_with_role(P.Role.CAST) >= {"convert_element_type", "reduce_precision"}


# A matmul under a name lora_jax has never heard of.
_mystery_p = Primitive("mystery_matmul")
_mystery_p.def_impl(lambda x, w: jnp.matmul(x, w))
_mystery_p.def_abstract_eval(lambda x, w: jax.core.ShapedArray((*x.shape[:-1], w.shape[-1]), x.dtype))
mlir.register_lowering(_mystery_p, mlir.lower_fun(lambda x, w: jnp.matmul(x, w), multiple_results=False))


def _mystery(p, x):
    return _mystery_p.bind(x, p["w"])


def test_an_unknown_primitive_materialises_with_a_warning_and_the_right_answer():
    frozen, adapters = _trained(PARAMS, lora.LoraSpec(rank=2, targets="w"))
    ref = X @ lora.merge(frozen, adapters)["w"]
    assert not np.allclose(ref, X @ PARAMS["w"], atol=1e-3)
    with pytest.warns(lora.MaterializationWarning, match="'mystery_matmul'"):
        out = lora.wrap(_mystery)(frozen, adapters, X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(lora.MaterializationError, match="'mystery_matmul'"):
        lora.wrap(_mystery, strict=True)(frozen, adapters, X)


def test_split_refuses_a_target_only_an_unknown_primitive_uses():
    with pytest.raises(ValueError, match=r"w.*only used by \['mystery_matmul'\]"):
        lora.split(PARAMS, lora.LoraSpec(rank=2, targets="w"), key=KEY, trace=lambda p: _mystery(p, X))


def _hide(name):
    real = P.param

    def param(eqn, key, default=...):
        if key == name:
            raise P.UnknownLayout(eqn.primitive.name, f"no parameter {name!r}")
        return real(eqn, key, default)

    return param


def test_a_parameter_layout_it_does_not_know_materialises_naming_primitive_and_jax_version(monkeypatch):
    # As if a JAX release renamed dot_general's `dimension_numbers`.
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    frozen, adapters = _trained(PARAMS, lora.LoraSpec(rank=2, targets="w"))
    ref = fn(lora.merge(frozen, adapters), X)
    monkeypatch.setattr(P, "param", _hide("dimension_numbers"))
    match = rf"'dot_general' with parameters .* on JAX {jax.__version__}.*dimension_numbers"
    with pytest.warns(lora.MaterializationWarning, match=match):
        out = lora.wrap(fn)(frozen, adapters, X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.warns(lora.MaterializationWarning, match=match):
        g = jax.grad(lambda a: lora.wrap(fn)(frozen, a, X).sum())(adapters)
    g_ref = jax.grad(lambda a: fn(lora.merge(frozen, a), X).sum())(adapters)
    np.testing.assert_allclose(g["w"].lora_b, g_ref["w"].lora_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=match):
        lora.split(PARAMS, lora.LoraSpec(rank=2, targets="w"), key=KEY, trace=lambda p: fn(p, X))


def test_an_unknown_layout_inside_a_scan_body_materialises_only_there(monkeypatch):
    stacked = {"w": jax.random.normal(jax.random.key(4), (3, 6, 6)) * 0.3}

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    frozen, adapters = _trained(stacked, lora.LoraSpec(rank=2, targets="w"), trace=lambda p: fn(p, X))
    ref = fn(lora.merge(frozen, adapters), X)
    monkeypatch.setattr(P, "param", _hide("dimension_numbers"))
    with pytest.warns(lora.MaterializationWarning, match="'dot_general' with parameters"):
        out = lora.wrap(fn)(frozen, adapters, X)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


class _Unbindable(Primitive):
    def get_bind_params(self, params):
        raise TypeError("unexpected parameter 'layout_v2'")


_unbindable_p = _Unbindable("unbindable_matmul")
_unbindable_p.def_impl(lambda x, w: jnp.matmul(x, w))
_unbindable_p.def_abstract_eval(lambda x, w: jax.core.ShapedArray((*x.shape[:-1], w.shape[-1]), x.dtype))


def test_a_primitive_jax_cannot_rerun_is_an_error_naming_it_and_the_jax_version():
    frozen, adapters = _trained(PARAMS, lora.LoraSpec(rank=2, targets="w"))
    fn = lambda p, x: _unbindable_p.bind(x, p["w"])  # noqa: E731
    with pytest.warns(lora.MaterializationWarning):
        with pytest.raises(RuntimeError, match=rf"'unbindable_matmul' on JAX {jax.__version__}.*layout_v2"):
            lora.wrap(fn)(frozen, adapters, X)


def test_params_mapping_reads_like_a_dict_and_names_what_is_missing():
    eqn = jax.make_jaxpr(lambda x, w: x @ w)(X, PARAMS["w"]).jaxpr.eqns[0]
    params = P.params(eqn)
    assert set(params) == set(eqn.params) and len(params) == len(eqn.params)
    assert params["dimension_numbers"] == eqn.params["dimension_numbers"]
    assert params.get("no_such", 7) == 7
    with pytest.raises(P.UnknownLayout, match=r"'dot_general' with .* on JAX .*no parameter 'no_such'"):
        params["no_such"]
