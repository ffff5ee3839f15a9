"""Serve three LoRA adapters and the base model in one batch, in one compiled call.

1. Makes three adapters of SmolLM2-135M-Instruct, of ranks 4, 8 and 16 and
   different alphas, each taught one made-up fact in ten AdamW steps: "My
   favourite colour is turquoise." (and crimson, and golden).
2. Stacks them with `lora_jax.serving.stack_adapters` (ranks zero-padded to
   16, each scale folded into its B; id -1 is the base model) and serves
   batches in which every row has its own adapter:
   * one forward pass scores each colour after "My favourite colour is" on
     12 rows: every adapter and the base model, with every colour;
   * `lora_jax.models.generate` decodes a few greedy tokens with a KV cache
     for four rows, adapters ``[0, 1, 2, -1]``, in one compiled loop.
3. Checks every row against that row run alone (`lora_jax.wrap` with its
   adapter, and generation on its merged model), and times the batched call
   against one call per row (for information).

    python examples/multi_adapter_serving.py            # SmolLM2: about a minute on 2 CPU cores
    python examples/multi_adapter_serving.py --smoke    # a tiny random byte-level Llama (for tests)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax.models import KVCache, LlamaForCausalLM, generate
from lora_jax.serving import BASE_MODEL, stack_adapters, wrap_many

PROMPT = "My favourite colour is"
COLOURS = (" turquoise", " crimson", " golden")
RANKS = (4, 8, 16)
ALPHAS = (8.0, 8.0, 32.0)
ROW_ADAPTERS = (0, 1, 2, BASE_MODEL)


def load(smoke: bool):
    """(config, params, tokenizer): a tiny random byte-level Llama, or SmolLM2-135M-Instruct."""
    if smoke:
        from lora_jax.experiments.learn_forget.smoke import ByteTokenizer, tiny_model

        config, params = tiny_model()
        return config, params, ByteTokenizer()
    from lora_jax.models import load_smollm2, load_smollm2_tokenizer

    config, params = load_smollm2(scan_layers=True)
    return config, params, load_smollm2_tokenizer()


def make_train_step(model, opt):
    """One jitted AdamW step on the adapters, for all the adapters (compiled once per adapter shape)."""
    apply = lora.wrap(model.apply)

    @jax.jit
    def step(frozen, adapters, opt_state, ids):
        def loss_fn(ad):
            logits = apply(frozen, ad, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def make_adapter(model, params, ids, step, opt, *, rank, alpha, steps, seed):
    """An adapter taught the text ``ids`` ``[1, seq]`` in ``steps`` steps: (frozen, adapters, losses)."""
    spec = lora.LoraSpec(rank=rank, alpha=alpha, targets="all-linear")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(seed), trace=lambda p: model.apply(p, ids))
    opt_state, losses = opt.init(adapters), []
    for _ in range(steps):
        adapters, opt_state, loss = step(frozen, adapters, opt_state, ids)
        losses.append(float(loss))
    return frozen, adapters, losses


def score_batch(tok, pad_id):
    """Rows ``prompt + colour`` for every (row adapter, colour), right-padded, and masks of the colour tokens."""
    prompt = tok.encode(PROMPT)
    texts = [tok.encode(PROMPT + colour) for colour in COLOURS]
    length = max(map(len, texts))
    ids = np.full((len(ROW_ADAPTERS) * len(COLOURS), length), pad_id, np.int32)
    mask = np.zeros(ids.shape, bool)
    adapter_ids = np.repeat(np.asarray(ROW_ADAPTERS, np.int32), len(COLOURS))
    for r in range(len(ROW_ADAPTERS)):
        for c, text in enumerate(texts):
            ids[r * len(COLOURS) + c, : len(text)] = text
            mask[r * len(COLOURS) + c, len(prompt) : len(text)] = True
    return jnp.asarray(ids), mask, jnp.asarray(adapter_ids)


def colour_logprobs(logits, ids, mask):
    """``log p(colour | prompt)``: the sum over the colour's tokens, one value per row."""
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    picked = np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return (picked * mask[:, 1:]).sum(axis=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Many LoRA adapters in one batch, in one compiled call.")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model (for tests)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per adapter")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--new-tokens", type=int, default=5)
    args = parser.parse_args(argv)
    lr = 1e-2 if args.smoke else args.lr
    t0 = time.perf_counter()

    config, params, tok = load(args.smoke)
    model = LlamaForCausalLM(config)

    # 1. Three adapters of different ranks and alphas, each taught its own colour.
    opt = optax.adamw(lr, weight_decay=0.0)
    step = make_train_step(model, opt)
    adapters = []
    for i, (colour, rank, alpha) in enumerate(zip(COLOURS, RANKS, ALPHAS)):
        text = jnp.asarray([tok.encode(PROMPT + colour + ".")], jnp.int32)
        frozen, ad, losses = make_adapter(
            model, params, text, step, opt, rank=rank, alpha=alpha, steps=args.steps, seed=i
        )
        adapters.append(ad)
        print(
            f"adapter {i}: rank {rank:2d}, alpha {alpha:2.0f}, taught {PROMPT + colour + '.'!r} in {args.steps} "
            f"steps: loss {losses[0]:.2f} -> {losses[-1]:.2f}"
        )
    t_train = time.perf_counter()

    # 2. Stack them (the base model is id -1) and serve a batch, one adapter per row, in one compiled call.
    stacked = stack_adapters(adapters, rank=max(RANKS))
    serve = jax.jit(wrap_many(model.apply))
    ids, mask, adapter_ids = score_batch(tok, tok.pad_token_id)
    logits = serve(frozen, stacked, adapter_ids, ids).block_until_ready()
    scores = colour_logprobs(logits, ids, mask).reshape(len(ROW_ADAPTERS), len(COLOURS))
    print(f"\nlog p(colour | {PROMPT!r}), {len(ids)} rows in one call, each row with its adapter:")
    print(f"{'adapter':<11}" + "".join(f"{c.strip():>11}" for c in COLOURS))
    for i, row in zip(ROW_ADAPTERS, scores):
        print(f"{'base' if i == BASE_MODEL else i:<11}" + "".join(f"{v:11.2f}" for v in row))

    # Greedy continuations with a KV cache, the four rows decoded together in one compiled loop. The
    # cache is [layers, batch, ...] with one shared write index, hence the axes.
    cache_axes = KVCache(1, 1, None)
    serve_cached = wrap_many(model.apply, kwargs_axes={"cache": cache_axes}, out_axes=(0, cache_axes))

    def apply_many(p, input_ids, **kwargs):
        return serve_cached(p["frozen"], p["stacked"], p["ids"], input_ids, **kwargs)

    row_ids = jnp.asarray(ROW_ADAPTERS, jnp.int32)
    prompts = jnp.asarray([tok.encode(PROMPT)] * len(ROW_ADAPTERS), jnp.int32)
    served = {"frozen": frozen, "stacked": stacked, "ids": row_ids}
    continuations = np.asarray(generate(model, served, prompts, max_new_tokens=args.new_tokens, apply_fn=apply_many))
    print("\ngreedy continuations, the four rows in one call:")
    for i, tokens in zip(ROW_ADAPTERS, continuations):
        name = "base model" if i == BASE_MODEL else f"adapter {i}"
        print(f"  {name:>10}: {PROMPT}{tok.decode(tokens.tolist())!r}")

    # 3. Each row alone: through lora.wrap with its own adapter (the base model for -1), and
    # generating on its merged model.
    apply = jax.jit(model.apply)
    wrapped = lora.wrap(model.apply)

    def alone(b):
        i = int(adapter_ids[b])
        return apply(params, ids[b : b + 1]) if i == BASE_MODEL else wrapped(frozen, adapters[i], ids[b : b + 1])

    alone_logits = [alone(b)[0] for b in range(len(ids))]
    max_abs_diff = max(float(jnp.abs(logits[b] - alone_logits[b]).max()) for b in range(len(ids)))
    merged = [params if i == BASE_MODEL else lora.merge(frozen, adapters[i]) for i in ROW_ADAPTERS]
    same_tokens = all(
        np.array_equal(tokens, generate(model, p, prompts[0], max_new_tokens=args.new_tokens))
        for tokens, p in zip(continuations, merged)
    )
    print(
        f"\neach row alone (lora.wrap with its adapter): max |logits difference| = {max_abs_diff:.2e} "
        f"(logits up to {float(jnp.abs(logits).max()):.1f})\n"
        f"each row generated alone on its merged model: same tokens = {same_tokens}"
    )

    # Timing, for information: the batched call against the same rows one call each (all compiled).
    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return min(times)

    t_batched = best_of(lambda: serve(frozen, stacked, adapter_ids, ids))
    t_separate = best_of(lambda: [alone(b) for b in range(len(ids))])
    print(
        f"forward pass of the {len(ids)} rows: {1e3 * t_batched:.1f} ms in one call, "
        f"{1e3 * t_separate:.1f} ms one row per call"
    )
    total = time.perf_counter() - t0
    print(f"done in {total:.1f} s (of which making the adapters {t_train - t0:.1f} s)")
    return {
        "scores": scores,
        "continuations": continuations.tolist(),
        "max_abs_diff": max_abs_diff,
        "same_tokens": same_tokens,
        "seconds": total,
    }


if __name__ == "__main__":
    main()
