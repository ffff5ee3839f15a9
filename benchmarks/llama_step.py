"""Step time, throughput and memory of one training step of the Flax Llama, with its speed levers.

`lora_jax.models.LlamaForCausalLM` (layers under ``nn.scan``, bf16 weights and
activations) trained with AdamW two ways on the same random tokens:

* ``full``: every weight trains;
* ``wrap``: LoRA (rank 16, alpha 32, all linear layers) through
  ``lora_jax.wrap`` on the unmodified ``model.apply``.

The levers are the model's own options: ``--attention`` (``einsum`` is the
reference with explicit scores; ``cudnn`` the fused kernel on NVIDIA GPUs),
``--remat-policy`` (what each layer keeps for the backward pass) and
``--chunk`` (cross-entropy a chunk of tokens at a time through
``method="loss"``; ``none`` computes the whole batch's float32 logits and
``optax.softmax_cross_entropy_with_integer_labels``, the plain baseline).

Each run prints one JSON line; run each in its own process so that peak
memory belongs to that run alone::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/llama_step.py wrap --attention cudnn
    python benchmarks/llama_step.py full --model tiny --batch 2 --seq 32 --steps 2 --warmup 1  # CPU smoke
    python benchmarks/llama_step.py --table results.jsonl   # markdown table of collected JSON lines
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

REMAT_CHOICES = ["none", "nothing", "dots", "dots_with_batch"]
ATTENTION_CHOICES = ["einsum", "xla", "cudnn", "auto", "blockwise"]


def _chunk(value: str) -> int | None:
    if value.lower() == "none":
        return None
    size = int(value)
    if size < 1:
        raise argparse.ArgumentTypeError(f"--chunk must be a positive int or 'none'; got {value!r}")
    return size


def _gib(n_bytes) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def build(args):
    """The jitted step, its inputs and a description of the run, from parsed arguments."""
    import jax
    import jax.numpy as jnp
    import optax
    from flops import MODELS

    import lora_jax as lora
    from lora_jax.models import LlamaConfig, LlamaForCausalLM

    dtype = jnp.dtype(args.dtype)
    config = LlamaConfig(
        **MODELS[args.model],
        scan_layers=True,
        dtype=dtype,
        param_dtype=dtype,
        attention=args.attention,
        remat_policy=None if args.remat_policy == "none" else args.remat_policy,
    )
    model = LlamaForCausalLM(config)
    # The levers change how the forward runs, not its parameters: initialise and trace the reference
    # path, so that a lever that fails (cudnn on a machine without it) fails in the step alone.
    reference = LlamaForCausalLM(config.replace(attention="einsum", remat_policy=None))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size, jnp.int32)
    # Initialised on the device in one program: eager init of 853M parameters would dispatch op by op.
    params = jax.jit(reference.init)(jax.random.key(0), ids[:1, :8])

    def loss_of(apply, variables, tok):
        if args.chunk is None:  # the plain baseline: the whole batch's float32 logits at once
            logits = apply(*variables, tok)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()
        return apply(*variables, tok, method="loss", chunk_size=args.chunk)

    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    if args.mode == "full":
        trainable, frozen = params, None
        objective = lambda t, fx, tok: loss_of(model.apply, (t,), tok)
    elif args.mode == "wrap":
        spec = lora.LoraSpec(rank=args.rank, alpha=2 * args.rank, targets="all-linear")
        trace = lambda p: reference.apply(p, ids[:1, :8])  # finds the linear layers, abstractly
        frozen, trainable = lora.split(params, spec, key=jax.random.key(2), trace=trace)
        wrapped = lora.wrap(model.apply, strict=True)
        objective = lambda t, fx, tok: loss_of(wrapped, (fx, t), tok)
    else:
        raise ValueError(f"mode must be 'full' or 'wrap'; got {args.mode!r}")
    del params
    opt = optax.adamw(1e-4)
    state = opt.init(trainable)

    # The trainable tree and optimiser state are donated: their buffers are reused for the update.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(t, s, fx, tok):
        value, grads = jax.value_and_grad(objective)(t, fx, tok)
        updates, s = opt.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    n_trainable = int(sum(x.size for x in jax.tree.leaves(trainable)))
    info = {
        "levers": {
            "attention": args.attention,
            "remat_policy": args.remat_policy,
            "chunk": args.chunk,
            "scan_layers": True,
        },
        "params": n_params,
        "trainable": n_trainable,
    }
    return step, trainable, state, frozen, ids, info


def measure(args) -> dict:
    """Compiles, warms up and times the step; returns the JSON record."""
    import jax

    step, trainable, state, frozen, ids, info = build(args)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, state, frozen, ids).compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        gflops = round(float(cost["flops"]) / 1e9, 3)
    except Exception:  # best effort: some backends and versions report no cost
        gflops = None
    try:
        memory = compiled.memory_analysis()
    except Exception:
        memory = None
    trainable, state, loss = compiled(trainable, state, frozen, ids)
    first_loss = float(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        trainable, state, loss = compiled(trainable, state, frozen, ids)
    jax.block_until_ready((trainable, loss))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainable, state, loss = compiled(trainable, state, frozen, ids)
    jax.block_until_ready((trainable, loss))
    seconds = (time.perf_counter() - t0) / args.steps
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    device = jax.devices()[0]
    return {
        "impl": "jax",
        "mode": args.mode,
        "model": args.model,
        **info,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank if args.mode == "wrap" else None,
        "dtype": args.dtype,
        "steps": args.steps,
        "step_ms": round(seconds * 1e3, 2),
        "tokens_per_s": round(args.batch * args.seq / seconds),
        "peak_gib": _gib(stats.get("peak_bytes_in_use")),
        "compile_s": round(compile_s, 1),
        "gflops": gflops,
        "temp_gib": _gib(getattr(memory, "temp_size_in_bytes", None)),
        "argument_gib": _gib(getattr(memory, "argument_size_in_bytes", None)),
        "output_gib": _gib(getattr(memory, "output_size_in_bytes", None)),
        "first_loss": first_loss,
        "loss": float(loss),
        "device": str(device.device_kind),
        "platform": device.platform,
        "jax": jax.__version__,
    }


# ----------------------------------------------------------------------------
# Markdown table of collected records
# ----------------------------------------------------------------------------


def _fmt(value, digits=1):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(records: list[dict]) -> str:
    """A markdown table of benchmark records, one row each.

    A record's ``run`` names its row (else its ``impl`` and ``mode``). Two
    ratios compare step times on the same machine: ``÷ full`` against the run
    named ``full`` (JAX full fine-tuning, same levers), ``÷ plain full``
    against ``plain full`` (the plain-JAX reference decoder). A record with a
    ``status`` other than ``ok`` shows its error instead of figures.
    """

    def ms_of(name):
        for r in records:
            if r.get("run") == name and r.get("step_ms"):
                return r["step_ms"]
        return None

    full_ms, plain_ms = ms_of("full"), ms_of("plain full")
    lines = [
        "| run | step ms | tokens/s | peak GiB | ÷ full | ÷ plain full | trainable | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        name = r.get("run") or f"{r.get('impl', '?')} {r.get('mode', '?')}"
        if r.get("status", "ok") != "ok" or r.get("step_ms") is None:
            error = str(r.get("error", "no result")).replace("|", "/")[:120]
            lines.append(f"| {name} | {r.get('status', 'failed')} | | | | | | {error} |")
            continue
        ms = float(r["step_ms"])
        notes = []
        if r.get("levers"):
            notes.append(", ".join(f"{k}={v}" for k, v in r["levers"].items() if k != "scan_layers"))
        if r.get("note"):
            notes.append(str(r["note"]))
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                _fmt(ms),
                _fmt(r.get("tokens_per_s") or r.get("tok_s")),
                _fmt(r.get("peak_gib"), 2),
                _fmt(ms / full_ms if full_ms else None, 2),
                _fmt(ms / plain_ms if plain_ms else None, 2),
                _fmt(r.get("trainable")),
                "; ".join(notes).replace("|", "/"),
            )
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["full", "wrap"])
    parser.add_argument("--table", metavar="JSONL", help="print a markdown table of the JSON lines in this file")
    parser.add_argument("--model", choices=["853m", "smollm2-135m", "tiny"], default="853m")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto")
    parser.add_argument("--remat-policy", choices=REMAT_CHOICES, default="none")
    parser.add_argument("--chunk", type=_chunk, default=1024, help="tokens per cross-entropy chunk, or 'none'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            records = [json.loads(line) for line in f if line.strip().startswith("{")]
        text = table(records)
        print(text)
        return text
    if args.mode is None:
        parser.error("give a mode (full or wrap), or --table JSONL")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps and --warmup must be >= 1; got {args.steps} and {args.warmup}")
    record = measure(args)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
