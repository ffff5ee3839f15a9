"""DoRA (Liu et al. 2024): ``m · (W + s·A@B) / ||W + s·A@B||``, the norm per output column.

References: the formula in NumPy, ``apply(merge(...))``, and (in
``test_peft.py``) PEFT's own DoRA on a transformers Llama. `wrap` computes
the norm from ``AᵀW`` and ``AᵀA`` without forming ``W + s·A@B``; the FLOPs
test checks that no full-size gradient appears.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lora
from lora_jax import checkpoint, sharding

K = jax.random.split(jax.random.key(0), 8)
X = jax.random.normal(K[0], (4, 6))
PARAMS = {
    "w": jax.random.normal(K[1], (6, 5)),
    "stack": jax.random.normal(K[2], (3, 5, 4)) * 0.5,
    "dense_general": jax.random.normal(K[3], (5, 2, 3)),
}


def fn(p, x):
    h = x @ p["w"]
    h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w @ jnp.ones((4, 5)) * 0.3), None), h, p["stack"])[0]
    return jnp.einsum("bd,dhk->bhk", h, p["dense_general"])


def _trained(seed=5):
    spec = lora.LoraSpec(rank=2, targets=["w", "stack", "dense_general"], use_dora=True)
    frozen, adapters = lora.split(PARAMS, spec, key=K[4], trace=lambda p: fn(p, X))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return frozen, treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_magnitude_starts_at_the_column_norm_so_the_model_starts_at_the_base():
    frozen, adapters = lora.split(
        PARAMS, lora.LoraSpec(rank=2, targets=["w", "stack", "dense_general"], use_dora=True), key=K[4],
        trace=lambda p: fn(p, X),
    )  # fmt: skip
    np.testing.assert_allclose(adapters["w"].magnitude, np.linalg.norm(np.asarray(PARAMS["w"]), axis=0), rtol=1e-6)
    assert adapters["stack"].magnitude.shape == (3, 4)  # [layers, out]
    assert adapters["dense_general"].magnitude.shape == (2, 3)  # [heads, head_dim]
    np.testing.assert_allclose(lora.wrap(fn, strict=True)(frozen, adapters, X), fn(PARAMS, X), rtol=1e-5, atol=1e-5)


def test_merge_is_the_dora_formula_in_numpy():
    frozen, adapters = _trained()
    merged = lora.merge(frozen, adapters)
    for name in ("w", "stack", "dense_general"):
        f = adapters[name]
        w, a, b, m = (np.asarray(x, np.float64) for x in (PARAMS[name], f.lora_a, f.lora_b, f.magnitude))
        if name == "stack":
            v = w + f.scale * np.einsum("lir,lro->lio", a, b)
            want = v * (m / np.linalg.norm(v, axis=1))[:, None, :]
        elif name == "dense_general":
            v = w + f.scale * np.einsum("dr,rhk->dhk", a, b)
            want = v * (m / np.linalg.norm(v, axis=0))[None]
        else:
            v = w + f.scale * a @ b
            want = v * (m / np.linalg.norm(v, axis=0))
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_wrap_equals_merge_with_gradients():
    frozen, adapters = _trained()
    wrapped = lora.wrap(fn, strict=True)
    ref = fn(lora.merge(frozen, adapters), X)
    assert not np.allclose(ref, fn(PARAMS, X), atol=1e-2)
    np.testing.assert_allclose(wrapped(frozen, adapters, X), ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda a: jnp.sum(jnp.sin(wrapped(frozen, a, X))))(adapters)
    g_ref = jax.grad(lambda a: jnp.sum(jnp.sin(fn(lora.merge(frozen, a), X))))(adapters)
    for path in ("w", "stack", "dense_general"):
        for field in ("lora_a", "lora_b", "magnitude"):
            got, want = getattr(g[path], field), getattr(g_ref[path], field)
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{path}.{field}")


def test_the_norm_is_a_constant_for_differentiation():
    # DoRA's section 4.3 and PEFT: gradients do not flow through ||W + s·A@B||.
    frozen, adapters = _trained()
    f, w = adapters["w"], PARAMS["w"]
    linear = lambda p, x: x @ p["w"]  # noqa: E731
    ours = jax.grad(lambda a: jnp.sum(jnp.sin(lora.wrap(linear, strict=True)(frozen, a, X))))(adapters)["w"]

    def by_hand(a, b, detach):
        v = w + f.scale * a @ b
        norm = jnp.linalg.norm(v, axis=0)
        return jnp.sum(jnp.sin(X @ (v * f.magnitude / (jax.lax.stop_gradient(norm) if detach else norm))))

    detached = jax.grad(lambda a, b: by_hand(a, b, True), argnums=(0, 1))(f.lora_a, f.lora_b)
    attached = jax.grad(lambda a, b: by_hand(a, b, False), argnums=(0, 1))(f.lora_a, f.lora_b)
    np.testing.assert_allclose(ours.lora_a, detached[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.lora_b, detached[1], rtol=1e-4, atol=1e-6)
    assert not np.allclose(ours.lora_b, attached[1], rtol=1e-3, atol=1e-4)


def test_dora_on_the_llama_through_wrap_matches_merge():
    from lora_jax.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, scan_layers=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = jax.random.randint(K[5], (2, 12), 0, 64)
    params = model.init(K[6], ids)
    spec = lora.LoraSpec(rank=4, targets="all-linear", use_dora=True)
    frozen, adapters = lora.split(params, spec, key=K[7], trace=lambda p: model.apply(p, ids))
    adapters = jax.tree.map(lambda x: x * 1.1 + 0.02, adapters)
    wrapped = lora.wrap(model.apply, strict=True)
    np.testing.assert_allclose(
        wrapped(frozen, adapters, ids), model.apply(lora.merge(frozen, adapters), ids), rtol=1e-4, atol=1e-4
    )


def _flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_dora_through_wrap_forms_no_full_size_gradient():
    d, tokens = 512, 256
    params = {"w1": jax.random.normal(K[1], (d, d)) / 20, "w2": jax.random.normal(K[2], (d, d)) / 20}
    x = jax.random.normal(K[3], (tokens, d))
    model = lambda p, x: jnp.sum(jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]))  # noqa: E731
    costs = {}
    for dora in (False, True):
        spec = lora.LoraSpec(rank=8, targets="w.", use_dora=dora)
        frozen, adapters = lora.split(params, spec, key=K[4])
        costs[dora] = _flops(jax.grad(lambda a, f: lora.wrap(model, strict=True)(f, a, x)), adapters, frozen)
    full = _flops(jax.grad(model), params, x)
    weight_grad = 2 * tokens * d * d  # one weight-gradient matmul
    # DoRA adds, per weight, one AᵀW product (2·d·d·r) and the squared column norms, no weight gradient.
    extra = costs[True] - costs[False]
    print(
        f"\nFLOPs: LoRA {costs[False]:.4g}, DoRA {costs[True]:.4g} ({costs[True] / costs[False]:.3f}x), full {full:.4g}"
    )
    assert extra < 2 * (2 * d * d * 8 + 3 * d * d) * 1.2
    assert extra < 0.2 * weight_grad
    assert costs[True] < full - 1.5 * weight_grad


def test_checkpoint_and_shardings_carry_the_magnitude(tmp_path):
    frozen, adapters = _trained()
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(3, adapters)
    state = checkpoint.restore(tmp_path)
    for name in adapters:
        np.testing.assert_array_equal(state.adapters[name].magnitude, adapters[name].magnitude)
        np.testing.assert_array_equal(state.adapters[name].lora_b, adapters[name].lora_b)
    specs = sharding.adapter_shardings({"w": P(None, "model"), "stack": P(), "dense_general": P()}, adapters)
    assert specs["w"].magnitude == P("model") and specs["w"].lora_b == P(None, "model")


def test_unmerge_and_bad_magnitudes_are_refused():
    frozen, adapters = _trained()
    with pytest.raises(ValueError, match="DoRA.*cannot be undone"):
        lora.unmerge(lora.merge(frozen, adapters), adapters)
    bad = dict(adapters, w=dataclasses.replace(adapters["w"], magnitude=jnp.ones(6)))
    with pytest.raises(ValueError, match=r"DoRA magnitude of shape \(6,\).*needs \(5,\)"):
        lora.merge(frozen, bad)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        lora.LoraSpec(use_dora="yes")


def test_a_use_that_does_not_contract_the_input_axes_is_formed_in_full_with_a_warning():
    frozen, adapters = _trained()
    fn_t = lambda p, x: x[:, :5] @ p["w"].T  # noqa: E731  contracts W's output axis: no per-column scaling
    with pytest.warns(lora.MaterializationWarning, match="'dot_general'"):
        out = lora.wrap(fn_t)(frozen, adapters, X)
    np.testing.assert_allclose(out, fn_t(lora.merge(frozen, adapters), X), rtol=1e-5, atol=1e-5)


def _dora_pair(params, targets, trace, seed=11):
    spec = lora.LoraSpec(rank=2, targets=targets, use_dora=True)
    frozen, adapters = lora.split(params, spec, key=K[4], trace=trace)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return frozen, treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("use", ["embedding", "conv", "reshape"])
def test_dora_stays_factored_through_an_embedding_a_conv_and_a_reshape(use):
    """The per-column scale commutes with a row lookup, a conv kernel's output channels and a regrouping of W's
    output axes, so each stays factored (strict) and equals the merged DoRA weight."""
    if use == "embedding":
        params = {"w": jax.random.normal(K[1], (10, 6))}
        x = jnp.array([[1, 4, 4, 9], [0, 2, 7, 3]])
        f = lambda p, i: jnp.tanh(p["w"][i])  # noqa: E731
    elif use == "conv":
        params = {"w": jax.random.normal(K[1], (3, 3, 4, 5)) * 0.3}
        x = jax.random.normal(K[2], (2, 7, 7, 4))
        f = lambda p, x: jax.lax.conv_general_dilated(
            x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )  # noqa: E731, E501
    else:
        params = {"w": jax.random.normal(K[1], (6, 2, 3))}
        x = X
        f = lambda p, x: x @ p["w"].reshape(6, 6)  # noqa: E731  merges W's two output axes
    frozen, adapters = _dora_pair(params, "w", lambda p: f(p, x))
    got = lora.wrap(f, strict=True)(frozen, adapters, x)
    np.testing.assert_allclose(got, f(lora.merge(frozen, adapters), x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, f(frozen, x), atol=1e-3)  # the adapter changes the output


def test_dora_over_a_quantised_base_equals_merge_of_the_dequantised_base():
    """DoRA and a quantised frozen part are independent choices: QDoRA needs no code of its own."""
    params = {"w": jax.random.normal(K[1], (64, 32)) * 0.1}
    frozen, adapters = _dora_pair(params, "w", lambda p: X[:, :1] @ jnp.ones((1, 64)) @ p["w"])
    quantized = lora.quantize(frozen, "nf4", block_size=32, min_size=0)
    x = jax.random.normal(K[2], (5, 64))
    f = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    got = lora.wrap(f, strict=True)(quantized, adapters, x)
    want = f(lora.merge(lora.dequantize_tree(quantized), adapters), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, f(lora.merge(frozen, adapters), x), atol=1e-4)  # the base really is quantised


def test_dora_per_expert_with_experts_picked_per_token():
    """``w[experts]`` then a per-token matmul: one DoRA adapter (and magnitude) per expert, factored."""
    params = {"w": jax.random.normal(K[1], (4, 6, 5))}
    experts = jnp.array([[0, 3], [1, 1], [2, 0], [3, 2], [0, 1]])
    x = jax.random.normal(K[2], (5, 6))
    f = lambda p, x: jnp.einsum("td,tkdf->tkf", x, p["w"][experts])  # noqa: E731
    frozen, adapters = _dora_pair(params, "w", lambda p: f(p, x))
    assert adapters["w"].magnitude.shape == (4, 5) and adapters["w"].lora_a.shape == (4, 6, 2)
    got = lora.wrap(f, strict=True)(frozen, adapters, x)
    np.testing.assert_allclose(got, f(lora.merge(frozen, adapters), x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, f(frozen, x), atol=1e-3)
    # Summing over the picked experts in the same matmul would mix columns of different scales: that use is
    # formed in full, with a warning, and is still right.
    gates = jax.random.uniform(K[3], experts.shape)
    g = lambda p, x: jnp.einsum("tk,td,tkdf->tf", gates, x, p["w"][experts])  # noqa: E731
    with pytest.warns(lora.MaterializationWarning, match="'dot_general'"):
        summed = lora.wrap(g)(frozen, adapters, x)
    np.testing.assert_allclose(summed, g(lora.merge(frozen, adapters), x), rtol=1e-5, atol=1e-5)
