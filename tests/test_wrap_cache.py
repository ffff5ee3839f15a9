"""`wrap`'s compile cache: its size, its eviction order, and calls it cannot cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora

PARAMS = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
FROZEN, ADAPTERS = lora.split(PARAMS, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(1))


def _counting():
    traces = []

    def apply(p, x, power=1):
        traces.append(power)
        return (x @ p["w"]) ** power

    return apply, traces


def test_least_recently_used_program_is_dropped_first():
    apply, traces = _counting()
    f = lora.wrap(apply, cache_size=2)
    x = jnp.ones((2, 4))
    for power in (1, 2, 1, 3):  # 1 is used again before 3 arrives, so 2 is the one dropped
        f(FROZEN, ADAPTERS, x, power=power)
    assert traces == [1, 2, 3]
    f(FROZEN, ADAPTERS, x, power=1)
    assert traces == [1, 2, 3]  # still cached
    f(FROZEN, ADAPTERS, x, power=2)
    assert traces == [1, 2, 3, 2]  # recompiled


@pytest.mark.parametrize("size, expected", [(None, [1, 2, 3]), (0, [1, 2, 3, 1, 2, 3])])
def test_unbounded_and_disabled_cache(size, expected):
    apply, traces = _counting()
    f = lora.wrap(apply, cache_size=size)
    for _ in range(2):
        for power in (1, 2, 3):
            f(FROZEN, ADAPTERS, jnp.ones((2, 4)), power=power)
    assert traces == expected


def test_an_unhashable_static_argument_warns_once_and_still_computes():
    def apply(p, x, powers):
        return sum((x @ p["w"]) ** k for k in powers)

    f = lora.wrap(apply)
    x = jnp.ones((2, 4))
    # A set is a leaf to jax.tree_util (lists and tuples are flattened) and cannot be hashed.
    with pytest.warns(lora.RetraceWarning, match=r"\['set'\] cannot be hashed"):
        out = f(FROZEN, ADAPTERS, x, {1, 2})
    np.testing.assert_allclose(out, apply(lora.merge(FROZEN, ADAPTERS), x, {1, 2}), rtol=1e-6)
    f(FROZEN, ADAPTERS, x, {1, 2})  # no second warning (filterwarnings=error would raise)
    f(FROZEN, ADAPTERS, x, frozenset({1, 2}))  # hashable: cached


@pytest.mark.parametrize("size", [-1, 1.5, True])
def test_bad_cache_size(size):
    with pytest.raises(ValueError, match="`cache_size` must be a non-negative int or None"):
        lora.wrap(lambda p, x: x, cache_size=size)
