"""Pretrained language models for the experiments: a Flax Llama, loaders, tokenizer, generation."""

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
from lora_jax.models.loaders import (
    load_gguf,
    load_hf_checkpoint,
    load_smollm2,
    read_gguf_config,
    smollm2_path,
)
from lora_jax.models.tokenizer import Tokenizer, load_smollm2_tokenizer

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Tokenizer",
    "flax_path",
    "generate",
    "generate_many",
    "hf_key",
    "init_cache",
    "load_gguf",
    "load_hf_checkpoint",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "read_gguf_config",
    "sample_logits",
    "smollm2_path",
    "stack_layers",
    "unstack_layers",
]
