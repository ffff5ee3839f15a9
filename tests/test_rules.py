"""Every primitive rule of `wrap` (the README's table), one small function each.

Each function uses an adapted weight through one primitive. In strict mode a
use that cannot stay factored is an error, so the equivalence test below only
passes if the rule keeps the weight factored *and* computes the right thing;
`test_removing_the_rule_materializes` deletes the rule and checks that the
same function then needs ``W + s·A@B``, which shows the test reaches the rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import _transform
from tests import _models as M

KEY = jax.random.key(0)
K = jax.random.split(KEY, 4)
X = jax.random.normal(K[0], (3, 6))
IDS = jnp.array([[0, 4, 2], [5, 5, 1]])


@jax.custom_jvp
def _custom_jvp_matmul(x, w):
    return x @ w


_custom_jvp_matmul.defjvp(lambda p, t: (p[0] @ p[1], t[0] @ p[1] + p[0] @ t[1]))


@jax.custom_vjp
def _custom_vjp_matmul(x, w):
    return x @ w


_custom_vjp_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def _conv(p, x):
    img = x.reshape(1, 3, 6, 1)
    return jax.lax.conv_general_dilated(img, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# primitive -> (function of (params, x), params, x, whether split needs `trace=`)
CASES = {
    "dot_general": (lambda p, x: x @ p["w"], {"w": jax.random.normal(K[1], (6, 5))}, X, False),
    "conv_general_dilated": (_conv, {"w": jax.random.normal(K[1], (3, 3, 1, 4))}, X, True),
    "gather": (lambda p, ids: p["w"][ids], {"w": jax.random.normal(K[1], (7, 5))}, IDS, True),
    "transpose": (lambda p, x: x @ p["w"].T, {"w": jax.random.normal(K[1], (5, 6))}, X, True),
    "convert_element_type": (
        lambda p, x: x @ p["w"].astype(jnp.float32),
        {"w": jax.random.normal(K[1], (6, 5)).astype(jnp.bfloat16)},
        X,
        False,
    ),
    "copy": (lambda p, x: x @ jnp.copy(p["w"]), {"w": jax.random.normal(K[1], (6, 5))}, X, False),
    # Rounds W's mantissa where it is used; A and B keep full precision (as with a cast).
    "reduce_precision": (
        lambda p, x: x @ jax.lax.reduce_precision(p["w"], exponent_bits=8, mantissa_bits=7),
        {"w": jax.random.normal(K[1], (6, 5))},
        X,
        False,
    ),
    "reshape": (
        lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(6, 2, 4)),
        {"w": jax.random.normal(K[1], (6, 8))},
        X,
        False,
    ),
    "slice": (lambda p, x: x @ p["w"][1], {"w": jax.random.normal(K[1], (3, 6, 6))}, X, True),
    "squeeze": (lambda p, x: x @ p["w"][1], {"w": jax.random.normal(K[1], (3, 6, 6))}, X, True),
    "dynamic_slice": (
        # A stacked weight indexed by the loop's traced counter.
        lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x),
        {"w": jax.random.normal(K[1], (3, 6, 6)) * 0.5},
        X,
        True,
    ),
    "jit": (lambda p, x: jax.jit(lambda a, b: a @ b)(x, p["w"]), {"w": jax.random.normal(K[1], (6, 5))}, X, False),
    "custom_jvp_call": (
        lambda p, x: _custom_jvp_matmul(x, p["w"]),
        {"w": jax.random.normal(K[1], (6, 5))},
        X,
        False,
    ),
    "custom_vjp_call": (
        lambda p, x: _custom_vjp_matmul(x, p["w"]),
        {"w": jax.random.normal(K[1], (6, 5))},
        X,
        False,
    ),
    "scan": (
        lambda p, x: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0],
        {"w": jax.random.normal(K[1], (3, 6, 6)) * 0.5},
        X,
        True,
    ),
    "remat2": (lambda p, x: jax.checkpoint(lambda y: y @ p["w"])(x), {"w": jax.random.normal(K[1], (6, 5))}, X, False),
    "cond": (
        lambda p, x: jax.lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: -(x @ p["w"])),
        {"w": jax.random.normal(K[1], (6, 5))},
        X,
        False,
    ),
    "while": (M.while_fn, {"u": jax.random.normal(K[1], (6, 6)) * 0.5}, X, True),
}


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _setup(name):
    fn, params, x, traced = CASES[name]
    (target,) = params
    spec = lora.LoraSpec(rank=2, targets=target, dtype=jnp.float32)
    frozen, adapters = lora.split(params, spec, key=KEY, trace=(lambda p: fn(p, x)) if traced else None)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(K[2], len(leaves))
    adapters = treedef.unflatten([jax.random.normal(k, a.shape) * 0.3 for k, a in zip(keys, leaves)])
    return fn, params, x, frozen, adapters


@pytest.mark.parametrize("name", list(CASES))
def test_rule_keeps_the_weight_factored_and_matches_merge(name):
    fn, params, x, frozen, adapters = _setup(name)
    assert name in _primitives(jax.make_jaxpr(fn)(params, x).jaxpr), "the case must use the primitive"
    wrapped = lora.wrap(fn, strict=True)
    merged = lora.merge(frozen, adapters)
    ref = fn(merged, x)
    out = wrapped(frozen, adapters, x)
    assert not np.allclose(ref, fn(params, x), atol=1e-3), "the adapters must change the output"
    # W + s·A@B is rounded to W's bfloat16 by merge (or to fewer mantissa bits by reduce_precision).
    tol = 3e-2 if name in ("convert_element_type", "reduce_precision") else 2e-5
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    if name == "while":  # a while_loop has no reverse-mode derivative; forward mode instead
        tangent = jax.tree.map(jnp.ones_like, adapters)
        t1 = jax.jvp(lambda ad: wrapped(frozen, ad, x), (adapters,), (tangent,))[1]
        t2 = jax.jvp(lambda ad: fn(lora.merge(frozen, ad), x), (adapters,), (tangent,))[1]
        np.testing.assert_allclose(t1, t2, rtol=2e-4, atol=2e-5)
        return
    loss_lora = lambda ad: jnp.sum(jnp.sin(wrapped(frozen, ad, x)))
    loss_ref = lambda ad: jnp.sum(jnp.sin(fn(lora.merge(frozen, ad), x)))
    g1, g2 = jax.grad(loss_lora)(adapters), jax.grad(loss_ref)(adapters)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_removing_the_rule_materializes(name, monkeypatch):
    fn, params, x, frozen, adapters = _setup(name)
    monkeypatch.delitem(_transform._RULES, name)
    with pytest.raises(lora.MaterializationError, match=f"'{name}'"):
        lora.wrap(fn, strict=True)(frozen, adapters, x)


def test_every_rule_in_the_table_has_a_case():
    # Aliases of one rule under other names JAX has used (pjit, checkpoint, copy_p, ...), and
    # call primitives this JAX version no longer emits, share the code of a rule tested here.
    aliases = {"pjit", "closed_call", "core_call", "checkpoint", "copy_p"}
    assert set(_transform._RULES) - aliases == set(CASES)
