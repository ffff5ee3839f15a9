"""Memory of one training step, from XLA's compiler: full fine-tuning, LoRA through `wrap`, hand-written LoRA.

Everything is abstract (shapes only): each step is lowered and compiled,
never executed, so this runs on a laptop CPU for an 853M model. The
figures are XLA's buffer assignment (`memory_analysis()`): arguments,
outputs, the part of the outputs that reuses donated arguments, and
temporaries; ``total = arguments + outputs - aliased + temporaries``.

    python benchmarks/memory.py                     # the README's table (853M, float32)
    python benchmarks/memory.py --dtype bfloat16    # see the note on bfloat16 below
    python benchmarks/memory.py --model smollm2-135m

XLA's CPU backend computes bfloat16 matmuls in float32 and hoists the cast
of a whole scanned weight stack out of the loop, which adds a float32 copy
of every frozen weight to the temporaries: an artefact no GPU compile has.
The float32 figures are free of it, so those are the ones the tests assert.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flops import MODELS  # noqa: E402

import lora_jax as lora  # noqa: E402
from lora_jax.models import LlamaConfig, LlamaForCausalLM  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Levers:
    """The step-level options of one row."""

    remat_policy: str | None = None
    attention: str = "einsum"
    chunk: int | None = 1024  # None: whole-batch logits and optax's cross-entropy

    @property
    def name(self) -> str:
        return f"remat={self.remat_policy or 'none'}, attention={self.attention}, loss={self.chunk or 'logits'}"


BASELINE = Levers(None, "einsum", None)
LEVERS = Levers("nothing", "blockwise", 1024)


def _measure(step, *args) -> dict:
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "argument_gib": m.argument_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "alias_gib": m.alias_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "total_gib": total / GIB,
        "gflops": float(cost["flops"]) / 1e9,
        "hlo": compiled.as_text(),
    }


def _train_step(objective, optimizer):
    def step(trainable, opt_state, fixed, tokens):
        loss, grads = jax.value_and_grad(objective)(trainable, fixed, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def llama_step(
    mode: str,
    levers: Levers = BASELINE,
    *,
    model: str = "853m",
    dtype: str = "float32",
    batch: int = 8,
    seq: int = 1024,
    rank: int = 16,
) -> dict:
    """Compiles one AdamW step of `LlamaForCausalLM` (``nn.scan`` over layers) and reads its memory.

    ``mode`` is ``"full"`` (every weight trains) or ``"wrap"`` (LoRA of
    ``rank`` on all seven projections, through `lora_jax.wrap`).
    """
    config = LlamaConfig(
        **MODELS[model],
        scan_layers=True,
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(dtype),
        remat_policy=levers.remat_policy,
        attention=levers.attention,
    )
    net = LlamaForCausalLM(config)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(net.init, jax.random.key(0), ids)

    def loss(apply, p, tokens):
        if levers.chunk is None:
            logits = apply(p, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
        return apply(p, tokens, method="loss", chunk_size=levers.chunk)

    if mode == "full":
        trainable, fixed = params, None
        objective = lambda t, f, tokens: loss(net.apply, t, tokens)  # noqa: E731
    elif mode == "wrap":
        spec = lora.LoraSpec(rank=rank, targets="all-linear")
        fixed, trainable = jax.eval_shape(
            lambda p: lora.split(p, spec, key=jax.random.key(1), trace=lambda q: net.apply(q, ids)), params
        )
        wrapped = lora.wrap(net.apply, strict=True)
        objective = lambda t, f, tokens: loss(lambda _, *a, **k: wrapped(f, t, *a, **k), None, tokens)  # noqa: E731
    else:
        raise ValueError(f"mode must be 'full' or 'wrap'; got {mode!r}")
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    record = _measure(_train_step(objective, optimizer), trainable, opt_state, fixed, ids)
    logits_shape = f"f32[{batch},{seq - 1},{config.vocab_size}]"
    record["whole_batch_logits"] = logits_shape in record.pop("hlo")
    return {"model": model, "mode": mode, "levers": levers.name, "dtype": dtype, **record}


def plain_step(mode: str, *, size: str = "853m", dtype: str = "float32", rank: int = 16) -> dict:
    """The plain-JAX decoder of ``step_time.py``: ``full``, ``wrap`` or ``hand`` (LoRA written into the forward)."""
    import step_time

    c = step_time.SIZES[size]
    dt = jnp.dtype(dtype)
    params = jax.eval_shape(lambda k: step_time.init_params(k, c, dt), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((c["batch"], c["seq"]), jnp.int32)
    spec = lora.LoraSpec(rank=rank, alpha=2 * rank, targets=step_time.TARGETS)
    if mode == "full":
        trainable, fixed, loss = params, None, step_time.make_loss(c)
        objective = lambda t, f, tok: loss(t, tok)  # noqa: E731
    elif mode == "wrap":
        fixed, trainable = jax.eval_shape(lambda p: lora.split(p, spec, key=jax.random.key(2)), params)
        wrapped = lora.wrap(step_time.make_loss(c), strict=True)
        objective = lambda t, f, tok: wrapped(f, t, tok)  # noqa: E731
    elif mode == "hand":
        _, adapters = jax.eval_shape(lambda p: lora.split(p, spec, key=jax.random.key(2)), params)
        trainable = [{n: (f.lora_a, f.lora_b) for n, f in layer.items()} for layer in adapters["layers"].values()]
        fixed, loss = params, step_time.make_loss(c, lora_scale=spec.scale_for("layers/0/wq"))
        objective = lambda t, f, tok: loss(f, tok, t)  # noqa: E731
    else:
        raise ValueError(f"mode must be 'full', 'wrap' or 'hand'; got {mode!r}")
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    record = _measure(_train_step(objective, optimizer), trainable, opt_state, fixed, tokens)
    record.pop("hlo")
    return {"model": f"plain-{size}", "mode": mode, "levers": "plain decoder", "dtype": dtype, **record}


def table(rows: list[dict]) -> str:
    """A markdown table of records, with each total's ratio to full fine-tuning under the same levers."""
    full = {(r["model"], r["levers"]): r["total_gib"] for r in rows if r["mode"] == "full"}
    lines = [
        "| model | levers | mode | arguments GiB | temporaries GiB | total GiB | / full | whole-batch logits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = full.get((r["model"], r["levers"]))
        ratio = f"{r['total_gib'] / ref:.2f}" if ref else ""
        logits = {True: "yes", False: "no"}.get(r.get("whole_batch_logits"), "")
        lines.append(
            f"| {r['model']} | {r['levers']} | {r['mode']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} "
            f"| {r['total_gib']:.2f} | {ratio} | {logits} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="853m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args(argv)
    shape = dict(model=args.model, dtype=args.dtype, batch=args.batch, seq=args.seq)
    rows = []
    for levers in (BASELINE, Levers("nothing", "einsum", None), Levers("nothing", "einsum", 1024), LEVERS):
        for mode in ("full", "wrap"):
            rows.append(llama_step(mode, levers, **shape))
            print(json.dumps(rows[-1]), flush=True)
    if args.model == "853m":
        for mode in ("full", "wrap", "hand"):
            rows.append(plain_step(mode, dtype=args.dtype))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
