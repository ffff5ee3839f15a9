"""QLoRA: a quantised frozen base through `wrap`, dequantised where each weight is used.

The reference is the same wrapped model on the dequantised base (the same
numbers in full precision), and `merge` on the quantised base.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora
from lora_jax.models import LlamaConfig, LlamaForCausalLM

IDS = jax.random.randint(jax.random.key(0), (2, 16), 0, 128)


def _model(scan):
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        scan_layers=scan,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("scan, fmt, double_quant", [(True, "nf4", False), (False, "nf4", True), (True, "int8", False)])
def test_wrap_on_a_quantised_base_equals_the_dequantised_base(scan, fmt, double_quant):
    model = _model(scan)
    params = model.init(jax.random.key(1), IDS)
    frozen, adapters = lora.split(
        params, lora.LoraSpec(rank=4, targets="all-linear"), key=jax.random.key(2), trace=lambda p: model.apply(p, IDS)
    )
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)
    quantized = lora.quantize(frozen, fmt, double_quant=double_quant, min_size=1024)
    kernels = [
        x for x in jax.tree.leaves(quantized, is_leaf=lora._quantize.is_quantized) if lora._quantize.is_quantized(x)
    ]
    # q, o, gate, up, down, the embedding and the head (k and v have 32 outputs, less than a block of 64).
    assert len(kernels) == (7 if scan else 12)
    dense = lora.dequantize_tree(quantized)
    wrapped = lora.wrap(model.apply, strict=True)  # strict: the low-rank path stays factored
    out = wrapped(quantized, adapters, IDS)
    np.testing.assert_allclose(out, wrapped(dense, adapters, IDS), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, wrapped(frozen, adapters, IDS), atol=1e-3)  # the base really is quantised
    np.testing.assert_allclose(out, model.apply(lora.merge(quantized, adapters), IDS), rtol=5e-4, atol=5e-4)

    def loss(base, ad):
        return optax.softmax_cross_entropy_with_integer_labels(wrapped(base, ad, IDS), IDS).mean()

    g, g_ref = jax.grad(loss, argnums=1)(quantized, adapters), jax.grad(loss, argnums=1)(dense, adapters)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_compiled_step_holds_the_base_in_nf4():
    # Scanned layers: each layer's codes are sliced, then dequantised inside the loop body.
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        scan_layers=True,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
    )
    model = LlamaForCausalLM(config)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    spec = lora.LoraSpec(rank=8, targets="all-linear")
    frozen, adapters = jax.eval_shape(
        lambda p: lora.split(p, spec, key=jax.random.key(1), trace=lambda q: model.apply(q, ids)), params
    )
    quantized = jax.eval_shape(lambda f: lora.quantize(f, "nf4", include=r".*_proj/kernel"), frozen)
    wrapped = lora.wrap(model.apply, strict=True)

    def memory(base):
        step = jax.jit(jax.grad(lambda ad, b, t: wrapped(b, ad, t, method="loss")))
        return step.lower(adapters, base, ids).compile().memory_analysis()

    bf16, nf4 = memory(frozen), memory(quantized)
    proj_bytes = sum(x.size * 2 for p, x in jax.tree_util.tree_flatten_with_path(frozen)[0] if "_proj" in str(p))
    saved = bf16.argument_size_in_bytes - nf4.argument_size_in_bytes
    # The projections' arguments shrink to NF4 size: 0.5625 bytes per weight against 2.
    assert saved >= 0.7 * proj_bytes, (saved, proj_bytes)
    # Dequantised weights live inside the loop, one layer at a time, and the backward pass dequantises
    # again rather than keeping the forward pass's copies: no bf16 copy of the stack appears.
    print(f"\ntemporaries: bf16 base {bf16.temp_size_in_bytes}, NF4 base {nf4.temp_size_in_bytes}")
    assert nf4.temp_size_in_bytes <= bf16.temp_size_in_bytes + proj_bytes / config.num_hidden_layers


def _float_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every floating-point value a jaxpr (and each jaxpr inside it) computes."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _float_shapes(inner)
    return shapes


def test_a_python_loop_over_a_quantised_stack_dequantises_one_layer_at_a_time():
    """``w[i]`` of a quantised ``[L, d, d]`` stack (a slice and a squeeze of a leading axis) stays quantised, so
    only that layer is ever dequantised, whether the stack is adapted or only frozen."""
    layers, d = 4, 128
    k = jax.random.split(jax.random.key(3), 3)
    params = {"w": jax.random.normal(k[0], (layers, d, d)) / 11, "v": jax.random.normal(k[1], (layers, d, d)) / 11}
    x = jax.random.normal(k[2], (4, d))

    def f(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p["w"][i]) + jnp.tanh(x @ p["v"][i])
        return jnp.sum(x**2)

    spec = lora.LoraSpec(rank=4, targets="w")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(4), trace=lambda p: f(p, x))
    adapters = jax.tree.map(lambda a: a + 0.05, adapters)
    quantized = lora.quantize(frozen, "nf4", block_size=64)
    wrapped = lora.wrap(f, strict=True)
    got = jax.grad(wrapped, argnums=1)(quantized, adapters, x)
    want = jax.grad(lambda a: f(lora.merge(lora.dequantize_tree(quantized), a), x))(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=3e-4)
    shapes = _float_shapes(jax.make_jaxpr(jax.grad(wrapped, argnums=1))(quantized, adapters, x).jaxpr)
    assert (d, d) in shapes  # one layer, dequantised where it is used
    assert (layers, d, d) not in shapes


@pytest.mark.parametrize(
    "name, op",
    [
        ("cast", lambda w: w.astype(jnp.bfloat16)),
        ("transpose", lambda w: jnp.transpose(w, (1, 0, 2))),
        ("reshape", lambda w: w.reshape(3, 2, 64)),
        ("slice", lambda w: w[:, 1:]),
        ("squeeze", lambda w: w[1]),
        ("dynamic_slice", lambda w: jax.lax.dynamic_slice(w, (0, 1, 0), (2, 2, 64))),
        ("transpose of the blocks", lambda w: jnp.swapaxes(w, 1, 2)),
        ("reshape of the blocks", lambda w: w.reshape(2, 3, 2, 32)),
    ],
)
def test_relayouts_that_leave_the_blocks_alone_keep_the_weight_quantised(name, op):
    """The quantised frozen kind applies a re-layout of leading axes to the codes; the result dequantises to the
    re-laid-out dequantised weight. One that moves or cuts the blocks' axis gives the dense result."""
    from lora_jax import _adapted

    q = lora.quantize({"w": jax.random.normal(jax.random.key(5), (2, 3, 64))}, "nf4", block_size=32, min_size=0)["w"]
    dense = q.dequantize()
    jaxpr = jax.make_jaxpr(op)(dense).jaxpr
    value = q
    for eqn in jaxpr.eqns:  # e.g. a slice then a squeeze
        invals = [value] + [v.val if hasattr(v, "val") else None for v in eqn.invars[1:]]
        value = _adapted.QUANTIZED.relayout(eqn, invals)
    if "of the blocks" in name:
        assert not isinstance(value, lora.QuantizedArray)
        np.testing.assert_array_equal(value, op(dense))
    else:
        assert isinstance(value, lora.QuantizedArray), name
        np.testing.assert_array_equal(value.dequantize(), op(dense))
