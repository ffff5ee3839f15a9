"""The Flax Llama against Hugging Face transformers, through the safetensors loader."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.generate import generate, generate_many, sample_logits
from lora_jax.models.llama import (
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
    flax_path,
    hf_key,
    init_cache,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.loaders import load_hf_checkpoint
from tests._hf import ROPE_THETA, SMALL, random_hf_llama


def _save_hf_model(directory: pathlib.Path, *, tied: bool, seed: int = 0) -> object:
    """Saves a random transformers Llama (norm weights randomised too) and returns it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = random_hf_llama(tied=tied, seed=seed)
    model.save_pretrained(directory)
    return model


def _hf_logits(model: object, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(2, 11))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tied" if request.param else "untied")
    model = _save_hf_model(directory, tied=request.param)
    return directory, _hf_logits(model, IDS), request.param


@pytest.fixture(scope="module")
def decoders() -> dict[bool, tuple[LlamaConfig, dict]]:
    """A random untied Llama built in Flax (no torch needed), per ``scan_layers``: ``(config, variables)``.

    Weights and norm scales are drawn as in `_save_hf_model`, so logits are far from uniform.
    """
    config = LlamaConfig(**SMALL, rope_theta=ROPE_THETA, tie_word_embeddings=False)
    variables = LlamaForCausalLM(config).init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    variables = treedef.unflatten(
        [
            1.0 + 0.2 * jax.random.normal(k, x.shape) if x.ndim == 1 else 0.05 * jax.random.normal(k, x.shape)
            for k, x in zip(keys, leaves)
        ]
    )
    return {False: (config, variables), True: (config.replace(scan_layers=True), stack_layers(variables))}


@functools.lru_cache(maxsize=8)
def _jitted_apply(config: LlamaConfig):
    """One compiled forward per config, shared by every test that recomputes logits."""
    return jax.jit(LlamaForCausalLM(config).apply)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(checkpoint, scan_layers: bool) -> None:
    directory, expected, tied = checkpoint
    config, variables = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert config.tie_word_embeddings == tied
    assert config.rope_theta == ROPE_THETA
    assert ("lm_head" in variables["params"]) == (not tied)
    logits = LlamaForCausalLM(config).apply(variables, jnp.asarray(IDS))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_parameter_paths(checkpoint) -> None:
    directory, _, tied = checkpoint
    _, variables = load_hf_checkpoint(directory)
    paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(variables)}
    for path in (
        "params/model/embed_tokens/embedding",
        "params/model/norm/scale",
        "params/model/layers_1/self_attn/q_proj/kernel",
        "params/model/layers_1/mlp/gate_proj/kernel",
        "params/model/layers_0/input_layernorm/scale",
        "params/model/layers_0/post_attention_layernorm/scale",
    ):
        assert path in paths
    assert ("params/lm_head/kernel" in paths) == (not tied)
    q = variables["params"]["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
    assert q.shape == (64, 2 * 16)  # [in, out]
    _, scanned = load_hf_checkpoint(directory, scan_layers=True)
    assert scanned["params"]["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 32)


def test_scan_and_unscan_trees_round_trip(checkpoint) -> None:
    directory, _, _ = checkpoint
    config, flat = load_hf_checkpoint(directory)
    _, scanned = load_hf_checkpoint(directory, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(flat), scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), flat)
    inner = unstack_layers(scanned["params"])
    assert "layers_1" in inner["model"] and "params" not in inner
    with pytest.raises(ValueError, match="no 'model/layers_<i>'"):
        stack_layers(scanned)
    with pytest.raises(ValueError, match="no stacked 'model/layers'"):
        unstack_layers(flat)
    with pytest.raises(ValueError, match="'model' entry"):
        stack_layers({"params": {"encoder": {}}})


def _loss(variables, model):
    return jnp.mean(model.apply(variables, jnp.asarray(IDS)) ** 2)


_grad = jax.jit(jax.grad(_loss), static_argnums=1)


@pytest.fixture(scope="module")
def reference_logits_and_grads(decoders):
    """The plain (no scan, no remat) model's logits and gradients, computed once."""
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    return _jitted_apply(config)(variables, jnp.asarray(IDS)), _grad(variables, model)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_and_scan_give_identical_logits_and_grads(
    decoders, reference_logits_and_grads, scan_layers: bool
) -> None:
    reference, expected = reference_logits_and_grads
    config, variables = decoders[scan_layers]
    model = LlamaForCausalLM(config.replace(remat=True))
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(IDS)), reference, atol=1e-5)
    grads = _grad(variables, model)
    if scan_layers:
        grads = unstack_layers(grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, expected)


def test_init_matches_loaded_structure(checkpoint) -> None:
    directory, _, _ = checkpoint
    for scan_layers in (False, True):
        config, loaded = load_hf_checkpoint(directory, scan_layers=scan_layers)
        init = LlamaForCausalLM(config).init
        initialised = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
        assert shapes(initialised) == shapes(loaded)


def test_bfloat16_is_close_to_float32(checkpoint) -> None:
    directory, expected, _ = checkpoint
    config, variables = load_hf_checkpoint(directory, dtype=jnp.bfloat16)
    assert jax.tree.leaves(variables)[0].dtype == jnp.bfloat16
    logits = LlamaForCausalLM(config).apply(variables, jnp.asarray(IDS))
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - expected).max() < 0.1 * np.abs(expected).max()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_matches_full_forward(decoders, scan_layers: bool) -> None:
    config, variables = decoders[scan_layers]
    apply = _jitted_apply(config)
    ids = jnp.asarray(IDS)
    full = apply(variables, ids)
    cache = init_cache(config, 2, 16)
    first, cache = apply(variables, ids[:, :6], cache=cache)
    assert isinstance(cache, KVCache) and int(cache.index) == 6
    steps = [first]
    for t in range(6, ids.shape[1]):
        logits, cache = apply(variables, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def _greedy_by_recomputing(model, variables, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that re-runs the full sequence for every token, no cache."""
    # A fixed-length buffer keeps one compiled program; causality makes the
    # zeros after the current length irrelevant to the logits read.
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, : len(prompt)] = prompt
    apply = _jitted_apply(model.config)
    for t in range(len(prompt), len(prompt) + steps):
        logits = apply(variables, jnp.asarray(buffer))
        buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
    return buffer[0, len(prompt) :].tolist()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_generation_matches_recomputation(decoders, scan_layers: bool) -> None:
    config, variables = decoders[scan_layers]
    model = LlamaForCausalLM(config)
    prompt = [5, 17, 99, 3]
    expected = _greedy_by_recomputing(model, variables, prompt, 8)
    out = generate(model, variables, prompt, max_new_tokens=8)
    assert out.shape == (8,)
    assert out.tolist() == expected


def test_generation_stops_on_eos_and_pads(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    prompt = [5, 17, 99, 3]
    free = _greedy_by_recomputing(model, variables, prompt, 6)
    eos = free[2]
    first = free.index(eos)
    out = generate(model, variables, prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out.tolist() == free[: first + 1] + [0] * (5 - first)


def test_generate_many_batches_pads_and_cuts_at_eos(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    prompts = [[7, 8], [1, 2, 3, 4, 5], [9], [4, 4, 4]]  # two batches of 3, the second filled up
    free = [_greedy_by_recomputing(model, variables, p, 5) for p in prompts]
    assert generate_many(model, variables, prompts, max_new_tokens=5, pad_token_id=0, batch_size=3) == free
    eos = free[1][2]
    cut = generate_many(model, variables, prompts, max_new_tokens=5, pad_token_id=0, eos_token_id=eos, batch_size=3)
    assert cut == [f[: f.index(eos)] if eos in f else f for f in free] and len(cut[1]) == free[1].index(eos)
    with pytest.raises(ValueError, match="non-empty"):
        generate_many(model, variables, [[1], []], max_new_tokens=2, pad_token_id=0)


def test_left_padded_batch_matches_single_prompts(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    short, long = [7, 8], [1, 2, 3, 4, 5]
    batch = np.array([[0, 0, 0, *short], long])
    mask = np.array([[0, 0, 0, 1, 1], [1] * 5])
    out = generate(model, variables, batch, prompt_mask=mask, max_new_tokens=5)
    assert out[0].tolist() == _greedy_by_recomputing(model, variables, short, 5)
    assert out[1].tolist() == _greedy_by_recomputing(model, variables, long, 5)


def test_sampling_is_seeded_and_respects_top_k(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, key=jax.random.key(1))
    a = generate(model, variables, [1, 2, 3], **kwargs)
    b = generate(model, variables, [1, 2, 3], **kwargs)
    assert a.tolist() == b.tolist()
    greedy = generate(model, variables, [1, 2, 3], max_new_tokens=6)
    top1 = generate(model, variables, [1, 2, 3], max_new_tokens=6, temperature=0.7, top_k=1, key=jax.random.key(2))
    assert top1.tolist() == greedy.tolist()


def test_sample_logits_filters() -> None:
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)

    def draw(**kwargs):
        sample = lambda k: sample_logits(logits, k, temperature=1.0, **kwargs)[0]  # noqa: E731
        return set(np.asarray(jax.jit(jax.vmap(sample))(keys)).tolist())

    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it
    assert draw(top_p=0.4) == {0}
    assert draw() == {0, 1, 2, 3}


FIXED = np.array([0.5, 0.3, 0.15, 0.05])


def _target(temperature: float, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    p = FIXED ** (1.0 / temperature)
    p = p / p.sum()
    if top_k is not None:
        p[top_k:] = 0.0
    if top_p is not None:
        p[np.searchsorted(np.cumsum(p) - p, top_p, side="left") :] = 0.0
    return p / p.sum()


def _assert_frequencies(tokens: np.ndarray, p: np.ndarray) -> None:
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=len(p)) / tokens.size
    sigma = np.sqrt(p * (1 - p) / tokens.size)
    assert np.all(np.abs(freq - p) <= 4 * sigma + 1e-12), (freq.round(4), p.round(4))


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 2, None), (1.0, None, 0.7)],
)
def test_sample_logits_follows_the_distribution(temperature, top_k, top_p) -> None:
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(FIXED, jnp.float32)), (8000, len(FIXED)))
    tokens = sample_logits(logits, jax.random.key(4), temperature=temperature, top_k=top_k, top_p=top_p)
    _assert_frequencies(np.asarray(tokens), _target(temperature, top_k, top_p))


def _fixed_logits(params, input_ids, *, positions, attention_mask, cache):
    """A stand-in model whose next-token distribution is always FIXED."""
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(FIXED, jnp.float32)), (*input_ids.shape, len(FIXED)))
    return logits, cache


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (1.0, 2)])
def test_generate_samples_the_model_distribution(decoders, temperature, top_k) -> None:
    config, _ = decoders[False]
    prompts = np.ones((64, 1), np.int32)
    tokens = generate(
        LlamaForCausalLM(config),
        {},
        prompts,
        max_new_tokens=40,
        temperature=temperature,
        top_k=top_k,
        key=jax.random.key(5),
        apply_fn=_fixed_logits,
    )
    assert tokens.shape == (64, 40)
    _assert_frequencies(np.asarray(tokens), _target(temperature, top_k))


def test_sampling_with_different_keys_gives_different_sequences(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    outs = {
        tuple(generate(model, variables, [1, 2, 3], max_new_tokens=8, temperature=1.0, key=jax.random.key(i)).tolist())
        for i in range(3)
    }
    assert len(outs) == 3


def test_generate_argument_errors(decoders) -> None:
    config, variables = decoders[False]
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        generate(model, variables, [1, 2], max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, variables, [[1, 2, 0]], prompt_mask=[[1, 1, 0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="`top_p`"):
        generate(model, variables, [1], max_new_tokens=2, temperature=1.0, top_p=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        generate(model, variables, [1], max_new_tokens=0)
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        model.apply(variables, jnp.ones((1, 3), jnp.int32), attention_mask=jnp.ones((1, 4)))


def test_hf_key_round_trip() -> None:
    assert hf_key("params/model/layers_3/self_attn/q_proj/kernel") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_key(("params", "model", "layers_3", "mlp", "gate_proj")) == "model.layers.3.mlp.gate_proj"
    assert hf_key("model/layers/self_attn/o_proj/kernel", layer=2) == "model.layers.2.self_attn.o_proj.weight"
    assert hf_key("params/lm_head/kernel") == "lm_head.weight"
    assert hf_key("params/model/embed_tokens/embedding") == "model.embed_tokens.weight"
    assert hf_key("params/model/norm/scale") == "model.norm.weight"
    with pytest.raises(ValueError, match="pass `layer=`"):
        hf_key("params/model/layers/self_attn/q_proj/kernel")
    with pytest.raises(ValueError, match="not a LlamaForCausalLM parameter path"):
        hf_key("params/encoder/dense/kernel")
    config = LlamaConfig(**SMALL)
    for scan_layers in (False, True):
        variables = jax.eval_shape(
            LlamaForCausalLM(config.replace(scan_layers=scan_layers)).init,
            jax.random.key(0),
            jnp.zeros((1, 2), jnp.int32),
        )
        for path, _ in jax.tree_util.tree_leaves_with_path(variables):
            parts = tuple(str(k.key) for k in path)
            layers = range(config.num_hidden_layers) if scan_layers and "layers" in parts else [None]
            for layer in layers:
                key = hf_key(parts, layer=layer)
                assert flax_path(key, scan_layers=scan_layers) == (parts, layer)


def test_loader_errors(tmp_path: pathlib.Path, checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    raw = dict(SMALL, model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, model_type="gpt2")))
    with pytest.raises(ValueError, match="only 'llama'"):
        load_hf_checkpoint(tmp_path)
    scaled = dict(raw, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(NotImplementedError, match="llama3"):
        load_hf_checkpoint(tmp_path)
    directory, _, _ = checkpoint
    wrong = json.loads((directory / "config.json").read_text())
    wrong["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    for file in directory.glob("*.safetensors"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match="missing"):
        load_hf_checkpoint(tmp_path)


def test_sharded_checkpoint_and_old_rope_theta(tmp_path: pathlib.Path) -> None:
    model = _save_hf_model(tmp_path, tied=False, seed=1)
    # Re-save in shards, and rewrite the config the way transformers 4 did.
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = ROPE_THETA
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, variables = load_hf_checkpoint(tmp_path)
    assert config.rope_theta == ROPE_THETA
    logits = LlamaForCausalLM(config).apply(variables, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, IDS), atol=1e-4, rtol=1e-4)
