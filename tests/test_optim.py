"""lora_jax.optim: one-tree masking, LoRA+ rates and adapter-only weight decay."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora
from lora_jax import optim

KEY = jax.random.key(0)
SPEC = lora.LoraSpec(rank=2, targets="w.", train="norm")


def _params():
    k1, k2 = jax.random.split(KEY)
    return {
        "w1": jax.random.normal(k1, (16, 48)),
        "w2": jax.random.normal(k2, (48, 8)),
        "norm": jnp.ones(48),
        "bias": jnp.zeros(8),
    }


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] * p["norm"]) @ p["w2"] + p["bias"]


def _split():
    frozen, adapters = lora.split(_params(), SPEC, key=KEY)
    # Non-zero B so every factor has a gradient.
    adapters["w1"].lora_b = jnp.full_like(adapters["w1"].lora_b, 0.1)
    adapters["w2"].lora_b = jnp.full_like(adapters["w2"].lora_b, 0.1)
    return frozen, adapters


def _nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def _assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


def _in_place(frozen, adapters):
    """Params with LoraFactors in place of the weights they adapt (the other one-tree layout)."""
    out = dict(frozen)
    for path, entry in lora._tree.adapter_entries(adapters).items():
        out[path] = entry
    return out


def test_trainable_mask_layouts():
    frozen, adapters = _split()
    mask = optim.trainable_mask({"frozen": frozen, "adapters": adapters})
    assert mask["frozen"]["w1"] is False and mask["frozen"]["bias"] is False and mask["frozen"]["norm"] is None
    assert mask["adapters"]["w1"].lora_a is True and mask["adapters"]["norm"] is True

    mask = optim.trainable_mask(_in_place(frozen, adapters), train="norm")
    assert mask["w1"].lora_a and mask["w2"].lora_b and mask["norm"] and not mask["bias"]
    mask = optim.trainable_mask(_in_place(frozen, adapters))
    assert not mask["norm"]


@pytest.mark.parametrize("layout", ["dict", "in-place"])
def test_only_adapters_keeps_no_state_and_no_updates_for_frozen(layout):
    frozen, adapters = _split()
    if layout == "dict":
        tree = {"frozen": frozen, "adapters": adapters}
        opt = optim.only_adapters(optax.adam(1e-2))
        trained = lambda t: t["adapters"]
        frozen_part = lambda t: t["frozen"]
    else:
        tree = _in_place(frozen, adapters)
        opt = optim.only_adapters(optax.adam(1e-2), trainable=lambda t: optim.trainable_mask(t, train="norm"))
        trained = lambda t: {k: t[k] for k in adapters}
        frozen_part = lambda t: {"bias": t["bias"]}
    state = opt.init(tree)
    # Adam: two moments per trainable entry, plus one int32 step count.
    assert _nbytes(state) == 2 * _nbytes(adapters) + 4
    assert _nbytes(state) < _nbytes(frozen)

    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), tree)
    updates, state = jax.jit(opt.update)(grads, state, tree)
    assert all(bool((u == 0).all()) for u in jax.tree.leaves(frozen_part(updates)))
    # The trainable part moves exactly as a plain Adam on the adapters alone would move it.
    ref_opt = optax.adam(1e-2)
    ref, _ = ref_opt.update(jax.tree.map(lambda x: jnp.full_like(x, 0.5), adapters), ref_opt.init(adapters))
    got = trained(updates)
    _assert_trees_close(got, ref, rtol=1e-6)


def test_only_adapters_trains_one_tree_like_adapters_alone():
    frozen, adapters = _split()
    x = jax.random.normal(jax.random.key(1), (5, 16))
    tree = {"frozen": frozen, "adapters": adapters}

    def loss(t):
        return jnp.mean(lora.wrap(_apply)(t["frozen"], t["adapters"], x) ** 2)

    opt = optim.only_adapters(optax.adam(1e-2))

    @jax.jit
    def step(t, s):
        g = jax.grad(loss)(t)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s

    ref_opt = optax.adam(1e-2)

    @jax.jit
    def ref_step(a, s):
        g = jax.grad(lambda a: loss({"frozen": frozen, "adapters": a}))(a)
        u, s = ref_opt.update(g, s)
        return optax.apply_updates(a, u), s

    s, ref_s, ref_a = opt.init(tree), ref_opt.init(adapters), adapters
    for _ in range(3):
        tree, s = step(tree, s)
        ref_a, ref_s = ref_step(ref_a, ref_s)
    _assert_trees_close(tree["adapters"], ref_a, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(tree["frozen"]), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)
    assert float(loss(tree)) < float(loss({"frozen": frozen, "adapters": adapters}))


@pytest.mark.parametrize("ratio", [16.0, 4.0])
def test_lora_plus_sgd_rates(ratio):
    frozen, adapters = _split()
    lr = 0.05
    opt = optim.lora_plus(lr, ratio=ratio, optimizer=optax.sgd, full_learning_rate=0.01)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), adapters)
    updates, _ = opt.update(grads, opt.init(adapters), adapters)
    for name in ("w1", "w2"):
        rate_a = updates[name].lora_a / grads[name].lora_a
        rate_b = updates[name].lora_b / grads[name].lora_b
        np.testing.assert_allclose(rate_a, -lr, rtol=1e-6)
        np.testing.assert_allclose(rate_b, ratio * rate_a[0, 0], rtol=1e-6)
    np.testing.assert_allclose(updates["norm"] / grads["norm"], -0.01, rtol=1e-6)


def test_lora_plus_follows_a_schedule():
    _, adapters = _split()
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    opt = optim.lora_plus(schedule, optimizer=optax.sgd)
    grads = jax.tree.map(jnp.ones_like, adapters)
    state = opt.init(adapters)
    for step in range(3):
        updates, state = opt.update(grads, state, adapters)
        np.testing.assert_allclose(updates["w1"].lora_a, -schedule(step), rtol=1e-6)
        np.testing.assert_allclose(updates["w1"].lora_b, -16.0 * schedule(step), rtol=1e-6)


def test_lora_plus_on_one_tree():
    frozen, adapters = _split()
    tree = {"frozen": frozen, "adapters": adapters}
    opt = optim.lora_plus(1e-3, ratio=8.0, trainable=optim.trainable_mask)
    state = opt.init(tree)
    assert _nbytes(state) == 2 * _nbytes(adapters) + 3 * 4  # one Adam step count per label
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = opt.update(grads, state, tree)
    assert all(bool((u == 0).all()) for u in jax.tree.leaves(updates["frozen"]))
    np.testing.assert_allclose(updates["adapters"]["w1"].lora_b, -8e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["adapters"]["w1"].lora_a, -1e-3, rtol=1e-4)


@pytest.mark.parametrize("decay_full", [False, True])
@pytest.mark.parametrize("ratio", [None, 16.0])
def test_adamw_decays_factors_only(decay_full, ratio):
    _, adapters = _split()
    lr, wd = 1e-2, 0.5
    opt = optim.adamw(lr, weight_decay=wd, lora_plus_ratio=ratio, decay_full=decay_full)
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    updates, _ = opt.update(zeros, opt.init(adapters), adapters)
    b_lr = lr * (ratio or 1.0)
    for name in ("w1", "w2"):
        np.testing.assert_allclose(updates[name].lora_a, -lr * wd * adapters[name].lora_a, rtol=1e-6)
        np.testing.assert_allclose(updates[name].lora_b, -b_lr * wd * adapters[name].lora_b, rtol=1e-6)
    expected_norm = -lr * wd * adapters["norm"] if decay_full else jnp.zeros(48)
    np.testing.assert_allclose(updates["norm"], expected_norm, rtol=1e-6)


def test_adamw_on_one_tree_never_decays_frozen():
    frozen, adapters = _split()
    tree = {"frozen": frozen, "adapters": adapters}
    opt = optim.adamw(1e-2, weight_decay=0.5, trainable=optim.trainable_mask)
    state = opt.init(tree)
    assert _nbytes(state) == 2 * _nbytes(adapters) + 4
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, tree), state, tree)
    assert all(bool((u == 0).all()) for u in jax.tree.leaves(updates["frozen"]))
    assert bool((updates["adapters"]["w1"].lora_a != 0).all())


def test_factor_labels():
    _, adapters = _split()
    labels = optim.factor_labels(adapters)
    assert dataclasses.asdict(labels["w1"])["lora_a"] == "lora_a"
    assert labels["w2"].lora_b == "lora_b" and labels["norm"] == "full"


def test_errors():
    frozen, adapters = _split()
    with pytest.raises(ValueError, match="nothing in `tree` trains"):
        optim.trainable_mask(_params())
    with pytest.raises(TypeError, match="`inner` must be an optax.GradientTransformation"):
        optim.only_adapters(optax.adam)
    with pytest.raises(TypeError, match="`trainable` must be a tree of bools"):
        optim.only_adapters(optax.adam(1e-3), trainable="adapters")
    with pytest.raises(ValueError, match="`ratio`.*positive"):
        optim.lora_plus(1e-3, ratio=0.0)
    with pytest.raises(ValueError, match="`ratio`.*positive"):
        optim.lora_plus(1e-3, ratio=True)
    with pytest.raises(TypeError, match="Pass the factory"):
        optim.lora_plus(1e-3, optimizer=optax.adam(1e-3))
    with pytest.raises(TypeError, match="`learning_rate` must be a number or an optax schedule"):
        optim.lora_plus("fast")
    with pytest.raises(TypeError, match="`full_learning_rate` must be a number"):
        optim.lora_plus(1e-3, full_learning_rate=[1e-3])
    with pytest.raises(TypeError, match="`trainable` must be a tree of bools"):
        optim.lora_plus(1e-3, trainable=3)
    with pytest.raises(ValueError, match="`weight_decay` must be a non-negative"):
        optim.adamw(1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="`lora_plus_ratio` must be a positive"):
        optim.adamw(1e-3, lora_plus_ratio=-2.0)
    with pytest.raises(TypeError, match="`learning_rate` must be a number"):
        optim.adamw(None)
    with pytest.raises(TypeError, match="`trainable` must be a tree of bools"):
        optim.adamw(1e-3, trainable=1.0)


def test_one_tree_step_computes_no_frozen_gradient():
    """Zero updates read nothing from the frozen gradients, so XLA drops them: same FLOPs as adapters alone."""
    params = {"w1": jnp.full((128, 256), 0.01), "w2": jnp.full((256, 128), 0.01)}
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=4, targets="w."), key=KEY)
    x = jnp.ones((32, 128))
    loss = lambda f, a: jnp.mean(lora.wrap(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"])(f, a, x) ** 2)
    one_tree_opt, plain_opt = optim.only_adapters(optax.adam(1e-3)), optax.adam(1e-3)
    tree = {"frozen": frozen, "adapters": adapters}

    def one_tree(t, s):
        u, s = one_tree_opt.update(jax.grad(lambda t: loss(t["frozen"], t["adapters"]))(t), s, t)
        return optax.apply_updates(t, u), s

    def adapters_only(a, s):
        u, s = plain_opt.update(jax.grad(lambda a: loss(frozen, a))(a), s, a)
        return optax.apply_updates(a, u), s

    flops_one = jax.jit(one_tree).lower(tree, one_tree_opt.init(tree)).compile().cost_analysis()["flops"]
    flops_ref = jax.jit(adapters_only).lower(adapters, plain_opt.init(adapters)).compile().cost_analysis()["flops"]
    assert flops_one == pytest.approx(flops_ref, rel=0.01)
