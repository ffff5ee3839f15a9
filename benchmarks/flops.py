"""Compiled FLOPs of one training step of a real Llama: LoRA through `wrap` vs full fine-tuning.

Everything is abstract (shapes only), so this runs on a laptop CPU for any
model size: the step is lowered and compiled, never executed.

    python benchmarks/flops.py                       # SmolLM2-135M, seq 512, batch 8
    python benchmarks/flops.py --model 853m --seq 1024
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

import lora_jax as lora
from lora_jax.models import LlamaConfig, LlamaForCausalLM

MODELS = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True,
    ),
    "853m": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    # Small enough to compile in seconds, wide enough that the matmuls dominate as in a real model.
    "tiny": dict(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)

    config = LlamaConfig(**MODELS[args.model], scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = LlamaForCausalLM(config)
    ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)

    def loss(logits, tokens):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    full = _flops(jax.grad(lambda p, t: loss(model.apply(p, t), t)), params, ids)
    spec = lora.LoraSpec(rank=args.rank, targets="all-linear")
    frozen, adapters = jax.eval_shape(
        lambda p: lora.split(p, spec, key=jax.random.key(1), trace=lambda q: model.apply(q, ids)), params
    )
    wrapped = lora.wrap(model.apply, strict=True)
    via_wrap = _flops(jax.grad(lambda a, f, t: loss(wrapped(f, a, t), t)), adapters, frozen, ids)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_train = sum(x.size for x in jax.tree.leaves(adapters))
    record = {
        "model": args.model,
        "params": n_params,
        "trainable": n_train,
        "tokens": args.batch * args.seq,
        "full_gflops": round(full / 1e9, 3),
        "lora_gflops": round(via_wrap / 1e9, 3),
        "lora_over_full": round(via_wrap / full, 3),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
