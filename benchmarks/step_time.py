"""Step time, throughput, peak memory and compiled FLOPs of one training step.

A Llama-style decoder in plain JAX (bf16, RMSNorm, rotary, grouped-query
attention, SwiGLU), trained with AdamW three ways on the same data:

* ``full``: every weight trains;
* ``wrap``: LoRA through ``lora_jax.wrap`` on the unmodified forward;
* ``hand``: the same LoRA written by hand into the forward
  (``x@W + s·(x@A)@B``), the reference a transform has to match.

Each run prints one JSON line. Run each mode in its own process so that peak
memory belongs to that mode alone::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/step_time.py wrap
    python benchmarks/step_time.py full --size tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lora

SIZES = {
    # 853M parameters: D 2048, 16 layers, 16 heads (4 KV), MLP 5632, vocab 32000.
    "853m": dict(vocab=32000, dim=2048, layers=16, heads=16, kv_heads=4, mlp=5632, seq=1024, batch=8),
    # Matmul-dominated like the big one, yet a step takes a fraction of a second on a laptop CPU.
    "small": dict(vocab=2048, dim=512, layers=2, heads=8, kv_heads=4, mlp=1408, seq=256, batch=2),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=4, kv_heads=2, mlp=128, seq=32, batch=2),
}
TARGETS = r"layers/\d+/(wq|wk|wv|wo|wg|wu|wd)"


def init_params(key, c, dtype):
    def normal(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)

    hd = c["dim"] // c["heads"]
    keys = iter(jax.random.split(key, 7 * c["layers"] + 2))
    layers = []
    for _ in range(c["layers"]):
        layers.append(
            {
                "attn_norm": jnp.ones(c["dim"], dtype),
                "mlp_norm": jnp.ones(c["dim"], dtype),
                "wq": normal(next(keys), (c["dim"], c["heads"] * hd)),
                "wk": normal(next(keys), (c["dim"], c["kv_heads"] * hd)),
                "wv": normal(next(keys), (c["dim"], c["kv_heads"] * hd)),
                "wo": normal(next(keys), (c["heads"] * hd, c["dim"])),
                "wg": normal(next(keys), (c["dim"], c["mlp"])),
                "wu": normal(next(keys), (c["dim"], c["mlp"])),
                "wd": normal(next(keys), (c["mlp"], c["dim"])),
            }
        )
    return {
        "embed": normal(next(keys), (c["vocab"], c["dim"])),
        "layers": layers,
        "final_norm": jnp.ones(c["dim"], dtype),
        "head": normal(next(keys), (c["dim"], c["vocab"])),
    }


def rms_norm(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
    return y.astype(x.dtype) * scale


def rotary(x, theta=10000.0):
    seq, hd = x.shape[1], x.shape[-1]
    freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angle = jnp.arange(seq, dtype=jnp.float32)[:, None] * freq[None]
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def make_loss(c, lora_scale=None):
    """Next-token cross-entropy. With ``lora_scale`` the forward takes hand-written
    LoRA factors ``{layer: {name: (A, B)}}`` as a second argument."""
    hd = c["dim"] // c["heads"]

    def loss(params, tokens, hand=None):
        def proj(x, i, name):
            y = x @ params["layers"][i][name]
            if hand is not None:
                a, b = hand[i][name]
                y = y + ((x @ a) * lora_scale) @ b
            return y

        bsz, seq = tokens.shape
        h = params["embed"][tokens]
        for i, layer in enumerate(params["layers"]):
            x = rms_norm(h, layer["attn_norm"])
            q = rotary(proj(x, i, "wq").reshape(bsz, seq, c["heads"], hd))
            k = rotary(proj(x, i, "wk").reshape(bsz, seq, c["kv_heads"], hd))
            v = proj(x, i, "wv").reshape(bsz, seq, c["kv_heads"], hd)
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            h = h + proj(o.reshape(bsz, seq, c["heads"] * hd), i, "wo")
            x = rms_norm(h, layer["mlp_norm"])
            h = h + proj(jax.nn.silu(proj(x, i, "wg")) * proj(x, i, "wu"), i, "wd")
        logits = (rms_norm(h, params["final_norm"]) @ params["head"]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss


def build(mode, c, *, rank, dtype):
    key = jax.random.key(0)
    params = init_params(key, c, dtype)
    tokens = jax.random.randint(jax.random.key(1), (c["batch"], c["seq"]), 0, c["vocab"])
    opt = optax.adamw(1e-4)
    spec = lora.LoraSpec(rank=rank, alpha=2 * rank, targets=TARGETS)
    if mode == "full":
        trainable, fixed = params, None
        loss = make_loss(c)
        objective = lambda t, fx, tok: loss(t, tok)
    elif mode == "wrap":
        fixed, trainable = lora.split(params, spec, key=jax.random.key(2))
        wrapped = lora.wrap(make_loss(c), strict=True)
        objective = lambda t, fx, tok: wrapped(fx, t, tok)
    elif mode == "hand":
        _, adapters = lora.split(params, spec, key=jax.random.key(2))
        trainable = [{n: (f.lora_a, f.lora_b) for n, f in layer.items()} for layer in adapters["layers"].values()]
        fixed = params
        loss = make_loss(c, lora_scale=spec.scale_for("layers/0/wq"))
        objective = lambda t, fx, tok: loss(fx, tok, t)
    else:
        raise ValueError(f"mode must be full, wrap or hand; got {mode!r}")

    @jax.jit
    def step(t, state, fx, tok):
        value, grads = jax.value_and_grad(objective)(t, fx, tok)
        updates, state = opt.update(grads, state, t)
        return optax.apply_updates(t, updates), state, value

    return step, trainable, opt.init(trainable), fixed, tokens, params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["full", "wrap", "hand"])
    parser.add_argument("--size", choices=sorted(SIZES), default="853m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    c = SIZES[args.size]
    rank = min(args.rank, c["dim"] // 4)
    step, trainable, state, fixed, tokens, params = build(args.mode, c, rank=rank, dtype=jnp.dtype(args.dtype))

    t0 = time.perf_counter()
    compiled = step.lower(trainable, state, fixed, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    trainable, state, loss = step(trainable, state, fixed, tokens)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        trainable, state, loss = step(trainable, state, fixed, tokens)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainable, state, loss = step(trainable, state, fixed, tokens)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    record = {
        "mode": args.mode,
        "size": args.size,
        "rank": rank,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "trainable": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "step_ms": round(dt * 1e3, 2),
        "tokens_per_s": round(c["batch"] * c["seq"] / dt),
        "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "gflops": round(float(cost.get("flops", float("nan"))) / 1e9, 3),
        "compile_s": round(compile_s, 1),
        "loss": float(loss),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
