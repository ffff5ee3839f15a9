"""Each step-level option of the Llama keeps its outputs and gradients equal to the plain path.

The plain path is ``attention="einsum"``, no remat, and whole-batch logits
with optax's cross-entropy. Each lever is checked on its own, in full
fine-tuning and through `lora_jax.wrap` with non-zero adapters. (cuDNN
attention needs an NVIDIA GPU; ``benchmarks/device_suite.sh`` runs it there.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora
from lora_jax.losses import softmax_cross_entropy
from lora_jax.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    scan_layers=True,
)
IDS = jax.random.randint(jax.random.key(0), (2, 40), 0, 101)
MASK = jnp.ones((2, 40), jnp.int32).at[0, :7].set(0)
LOSS_MASK = jnp.ones((2, 40), jnp.int32).at[1, :11].set(0)


def _plain_loss(logits, ids, loss_mask):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * w).sum() / w.sum()


@pytest.fixture(scope="module")
def setup():
    model = LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(1), IDS)
    spec = lora.LoraSpec(rank=4, targets="all-linear")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(2), trace=lambda p: model.apply(p, IDS))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    adapters = treedef.unflatten([jax.random.normal(k, x.shape) * 0.2 for k, x in zip(keys, leaves)])
    return params, frozen, adapters


LEVERS = {
    "xla attention": dict(attention="xla"),
    "auto attention": dict(attention="auto"),
    "blockwise attention": dict(attention="blockwise", attention_block=16),
    "remat nothing": dict(remat_policy="nothing"),
    "remat dots": dict(remat_policy="dots"),
    "remat dots_with_batch": dict(remat_policy="dots_with_batch"),
    "all together": dict(attention="blockwise", attention_block=8, remat_policy="nothing"),
}
# Padding changes only how attention masks; remat policies see the same program either way.
CASES = [(lever, False) for lever in LEVERS] + [
    ("xla attention", True),
    ("blockwise attention", True),
    ("all together", True),
]


def _full_loss(model, p, kw):
    return _plain_loss(model.apply(p, IDS, **kw), IDS, LOSS_MASK)


def _lora_loss(model, frozen, ad, kw):
    return _plain_loss(lora.wrap(model.apply, strict=True)(frozen, ad, IDS, **kw), IDS, LOSS_MASK)


@pytest.fixture(scope="module")
def references(setup):
    params, frozen, adapters = setup
    plain, out = LlamaForCausalLM(CONFIG), {}
    for padded in (False, True):
        kw = dict(attention_mask=MASK) if padded else {}
        out[padded] = (
            plain.apply(params, IDS, **kw),
            jax.jit(jax.grad(lambda p, kw=kw: _full_loss(plain, p, kw)))(params),
            jax.jit(jax.grad(lambda ad, kw=kw: _lora_loss(plain, frozen, ad, kw)))(adapters),
        )
    return out


@pytest.mark.parametrize("lever, padded", CASES)
def test_lever_keeps_logits_and_gradients(setup, references, lever, padded):
    params, frozen, adapters = setup
    logits_ref, g_full_ref, g_lora_ref = references[padded]
    fast = LlamaForCausalLM(CONFIG.replace(**LEVERS[lever]))
    kw = dict(attention_mask=MASK) if padded else {}
    np.testing.assert_allclose(fast.apply(params, IDS, **kw), logits_ref, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda p: _full_loss(fast, p, kw)))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    g = jax.jit(jax.grad(lambda ad: _lora_loss(fast, frozen, ad, kw)))(adapters)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_lora_ref)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# Several chunks with a padded last one, tied and untied heads; the one-chunk path is the loss helper's test below.
@pytest.mark.parametrize("tied, chunk", [(True, 7), (False, 7)])
def test_chunked_loss_method_equals_the_logits_path(tied, chunk):
    config = CONFIG.replace(tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(1), IDS)
    ref = jax.value_and_grad(lambda p: _plain_loss(model.apply(p, IDS), IDS, LOSS_MASK))
    ours = jax.value_and_grad(lambda p: model.apply(p, IDS, loss_mask=LOSS_MASK, method="loss", chunk_size=chunk))
    (value, grads), (value_ref, grads_ref) = jax.jit(ours)(params), jax.jit(ref)(params)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # Through wrap, with an adapter on the head too: it stays factored inside the chunked loop.
    spec = lora.LoraSpec(rank=3, targets=["all-linear", r".*/(lm_head/kernel|embed_tokens/embedding)"])
    frozen, adapters = lora.split(params, spec, key=jax.random.key(5), trace=lambda p: model.apply(p, IDS))
    leaves, treedef = jax.tree.flatten(adapters)
    adapters = treedef.unflatten([x + 0.1 for x in leaves])
    wrapped = lora.wrap(model.apply, strict=True)
    got = jax.value_and_grad(lambda ad: wrapped(frozen, ad, IDS, loss_mask=LOSS_MASK, method="loss", chunk_size=chunk))
    want = jax.value_and_grad(lambda ad: _plain_loss(model.apply(lora.merge(frozen, ad), IDS), IDS, LOSS_MASK))
    (value, grads), (value_ref, grads_ref) = jax.jit(got)(adapters), jax.jit(want)(adapters)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_loss_helper_matches_optax_with_weights_and_reductions():
    k = jax.random.split(jax.random.key(7), 4)
    hidden = jax.random.normal(k[0], (3, 10, 8))
    head = jax.random.normal(k[1], (8, 13))
    labels = jax.random.randint(k[2], (3, 10), 0, 13)
    weights = jax.random.uniform(k[3], (3, 10))
    nll = optax.softmax_cross_entropy_with_integer_labels(hidden @ head, labels)
    for chunk in (None, 4, 30, 64):
        got = softmax_cross_entropy(hidden, head, labels, weights=weights, chunk_size=chunk, reduction="none")
        np.testing.assert_allclose(got, nll * weights, rtol=1e-5, atol=1e-6)
        got = softmax_cross_entropy(hidden, head, labels, weights=weights, chunk_size=chunk)
        np.testing.assert_allclose(got, (nll * weights).sum() / weights.sum(), rtol=1e-5)
        got = softmax_cross_entropy(hidden, head.T, labels, chunk_size=chunk, head_is_vocab_first=True, reduction="sum")
        np.testing.assert_allclose(got, nll.sum(), rtol=1e-5)
    assert float(softmax_cross_entropy(hidden, head, labels, weights=jnp.zeros((3, 10)))) == 0.0


def test_loss_helper_and_config_reject_bad_input():
    h, w, y = jnp.ones((2, 3, 4)), jnp.ones((4, 5)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="Flip `head_is_vocab_first`"):
        softmax_cross_entropy(h, w.T, y)
    with pytest.raises(ValueError, match="`labels` must have"):
        softmax_cross_entropy(h, w, y[:, :2])
    with pytest.raises(TypeError, match="integer token ids"):
        softmax_cross_entropy(h, w, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="`weights` must have shape"):
        softmax_cross_entropy(h, w, y, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        softmax_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="`reduction` must be"):
        softmax_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="`attention` must be one of"):
        CONFIG.replace(attention="flash")
    with pytest.raises(ValueError, match="`remat_policy` must be None or one of"):
        CONFIG.replace(remat_policy="everything")
    with pytest.raises(ValueError, match="`attention_block` must be a positive int"):
        CONFIG.replace(attention_block=0)
    assert CONFIG.replace(remat=True).layer_policy is jax.checkpoint_policies.nothing_saveable
    assert CONFIG.layer_policy is None
