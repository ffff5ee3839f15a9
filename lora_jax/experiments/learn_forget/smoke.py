"""A tiny random Llama and a byte-level tokenizer: the stand-in model of ``--smoke`` runs and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import path_to_str
from lora_jax.models import LlamaConfig, LlamaForCausalLM

__all__ = ["ByteTokenizer", "tiny_model"]


class ByteTokenizer:
    """UTF-8 bytes as tokens, 256 as end of text, and a plain-text chat template.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("hi") + [tok.eos_token_id])
    'hi'
    """

    eos_token_id = 256
    pad_token_id = 256
    bos_token_id = None
    vocab_size = 257

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        text += "assistant: " if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def tiny_model(seed: int = 0) -> tuple[LlamaConfig, Any]:
    """A 2-layer random Llama over bytes, ``(config, float32 variables)``, with a scanned layer stack.

    >>> config, params = tiny_model()
    >>> config.vocab_size
    257
    """
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        scan_layers=True,
    )
    params = jax.jit(LlamaForCausalLM(config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    # At the init std of 0.02 the tied embedding gives nearly flat logits that only the embedding itself
    # (frozen under LoRA) could sharpen; a larger one lets the adapted layers move the loss too.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 5.0 if "embed_tokens" in path_to_str(path) else x, params
    )
    return config, params
