"""LoRA fine-tuning on a (data, model) device mesh: one CPU, one GPU, a TPU pod slice.

The same script runs everywhere; only the devices differ:

    # 8 fake CPU devices on a laptop (4-way data x 2-way model parallel)
    python examples/train_sharded.py --fake-devices 8 --smoke

    # whatever accelerators this host has
    python examples/train_sharded.py --model-parallel 2

    # two processes on one machine, 4 CPU devices each, gloo collectives
    python examples/train_sharded.py --fake-devices 4 --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    python examples/train_sharded.py --fake-devices 4 --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

    # a TPU pod slice or a SLURM / Open MPI GPU cluster: run on every host
    python examples/train_sharded.py --distributed --model-parallel 4

Weights are sharded Megatron style: the column-parallel projections (q, k, v,
gate, up) split their output axis over ``model``, the row-parallel ones (o,
down) their input axis; the batch is split over ``data``. The adapters take
their shardings from the weights (`lora_jax.sharding.adapter_shardings`), so
XLA never gathers a frozen weight. The model is a small Llama-style decoder
trained on a synthetic next-token task; ``--model llama-tiny`` uses
`lora_jax.models.LlamaForCausalLM` instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny-lm", "llama-tiny"], default="tiny-lm")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over the data axis")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of A (B gets lr * --lora-plus-ratio)")
    p.add_argument("--lora-plus-ratio", type=float, default=16.0, help="LoRA+ lr_B / lr_A; 1 disables LoRA+")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--model-parallel",
        type=int,
        default=None,
        help="size of the 'model' mesh axis (default 2 if it divides the device count)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps: a quick end-to-end check")
    p.add_argument("--fake-devices", type=int, default=None, help="emulate N devices on the CPU (sets XLA_FLAGS)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM, Open MPI)",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0, for an explicit multi-process run")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--out", default=None, help="write the trained adapters and the loss curve to this .npz (process 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len = min(args.steps, 6), 16, 16
        args.width, args.layers, args.vocab, args.rank, args.log_every = 32, 1, 64, 4, 2
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        p.error("--coordinator needs --num-processes and --process-id")
    if args.fake_devices is not None and args.fake_devices < 1:
        p.error("--fake-devices must be >= 1")
    return args


def set_fake_devices(n: int) -> None:
    """Must run before jax is imported: XLA reads the flag once, at backend start."""
    if "jax" in sys.modules:
        raise RuntimeError("--fake-devices must be applied before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build_model(args):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if args.model == "llama-tiny":
        from lora_jax.models import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.width,
            intermediate_size=2 * args.width,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.seq_len,
        )
        return LlamaForCausalLM(config)

    class Block(nn.Module):
        width: int
        heads: int = 4

        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
            h = nn.RMSNorm(name="input_layernorm")(x)
            q, k, v = (
                dense(d, n)(h).reshape(b, t, self.heads, d // self.heads) for n in ("q_proj", "k_proj", "v_proj")
            )
            causal = jnp.tril(jnp.ones((t, t), bool))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
            probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            x = x + dense(d, "o_proj")(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d))
            h = nn.RMSNorm(name="post_attention_layernorm")(x)
            return x + dense(d, "down_proj")(nn.silu(dense(2 * d, "gate_proj")(h)) * dense(2 * d, "up_proj")(h))

    class TinyLM(nn.Module):
        vocab: int
        width: int
        layers: int

        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(self.vocab, self.width, name="embed_tokens")(ids)
            x = x + self.param("pos_embed", nn.initializers.normal(0.02), (ids.shape[1], self.width))
            for i in range(self.layers):
                x = Block(self.width, name=f"layers_{i}")(x)
            return nn.Dense(self.vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))

    return TinyLM(args.vocab, args.width, args.layers)


def make_corpus(args):
    """A synthetic next-token task: token t+1 is a fixed function of token t, with 10% noise."""
    import numpy as np

    rng = np.random.default_rng(1234)
    table = rng.permutation(args.vocab)
    n_rows = 4096
    seqs = np.empty((n_rows, args.seq_len + 1), np.int32)
    seqs[:, 0] = rng.integers(0, args.vocab, n_rows)
    for t in range(args.seq_len):
        noise = rng.random(n_rows) < 0.1
        seqs[:, t + 1] = np.where(noise, rng.integers(0, args.vocab, n_rows), table[seqs[:, t]])
    return seqs


# Megatron-style tensor parallelism over the "model" axis.
SHARDING_RULES = {
    r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel": ("model", 1),
    r".*(o_proj|down_proj)/kernel": ("model", 0),
    r".*lm_head/kernel": ("model", 1),
}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.fake_devices is not None:
        set_fake_devices(args.fake_devices)

    import jax

    if args.coordinator is not None:
        # CPU processes exchange collectives through gloo; GPUs and TPUs ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )
    elif args.distributed:
        jax.distributed.initialize()

    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    import lora_jax as lora
    from lora_jax import optim
    from lora_jax import sharding as lora_sharding

    n_devices = jax.device_count()
    model_parallel = args.model_parallel or (2 if n_devices % 2 == 0 else 1)
    if n_devices % model_parallel:
        raise SystemExit(f"--model-parallel {model_parallel} does not divide the {n_devices} devices")
    data_parallel = n_devices // model_parallel
    if args.batch_size % data_parallel:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the data axis ({data_parallel})")
    # Auto axes: shardings are given at the jit boundary and XLA's SPMD partitioner
    # propagates them inside (jax.make_mesh defaults to Explicit axes).
    mesh = jax.make_mesh((data_parallel, model_parallel), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    say(
        f"{jax.process_count()} process(es), {n_devices} {jax.devices()[0].platform} devices, "
        f"mesh data={data_parallel} x model={model_parallel}, model={args.model}"
    )

    model = build_model(args)
    sample = np.zeros((2, args.seq_len), np.int32)

    def spec_for(path, leaf):
        for regex, (axis, dim) in SHARDING_RULES.items():
            if re.fullmatch(regex, path) and leaf.shape[dim] % model_parallel == 0:
                return P(*[axis if i == dim else None for i in range(leaf.ndim)])
        return P()

    # The base weights are created where they live: each device builds only its shards.
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(args.seed), sample))
    param_shardings = lora_sharding.shardings_from_rules(abstract, spec_for, mesh=mesh)
    params = jax.jit(lambda: model.init(jax.random.key(args.seed), sample), out_shardings=param_shardings)()

    spec = lora.LoraSpec(rank=args.rank, targets="all-linear", train=r".*norm.*/scale")
    frozen, adapters = lora_sharding.split_sharded(
        params, spec, key=jax.random.key(args.seed + 1), trace=lambda p: model.apply(p, sample)
    )
    adapter_shardings = jax.tree.map(lambda x: x.sharding, adapters)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    opt = optim.adamw(
        args.lr,
        weight_decay=args.weight_decay,
        lora_plus_ratio=args.lora_plus_ratio if args.lora_plus_ratio != 1 else None,
    )
    # Optimizer moments mirror the adapters, so they take the adapters' shardings.
    state_shardings = lora_sharding.optimizer_state_shardings(opt, adapters, adapter_shardings)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.jit(opt.init, out_shardings=state_shardings)(adapters)

    apply = lora.wrap(model.apply)

    def loss_fn(adapters, frozen, batch):
        logits = apply(frozen, adapters, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def train_step(frozen, adapters, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    batch_sharding = NamedSharding(mesh, P("data", None))
    step = jax.jit(
        train_step,
        in_shardings=(frozen_shardings, adapter_shardings, state_shardings, batch_sharding),
        out_shardings=(adapter_shardings, state_shardings, replicated),
        donate_argnums=(1, 2),
    )

    corpus = make_corpus(args)
    global_shape = (args.batch_size, args.seq_len + 1)

    def batch_at(i: int):
        rows = (i * args.batch_size + np.arange(args.batch_size)) % len(corpus)
        # Each process reads only the rows of the devices it drives.
        return jax.make_array_from_callback(
            global_shape, batch_sharding, lambda index: corpus[rows[index[0]]][:, index[1]]
        )

    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), disable=args.quiet or not is_main, desc="train", dynamic_ncols=True)
    for i in bar:
        adapters, opt_state, loss = step(frozen, adapters, opt_state, batch_at(i))
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            losses.append((i + 1, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if args.quiet:
                say(f"step {i + 1:5d}  loss {losses[-1][1]:.6f}")
    elapsed = time.perf_counter() - start

    host = multihost_utils.process_allgather(adapters, tiled=True)
    flat = {path: np.asarray(x) for path, x in _flatten(host)}
    checksum = float(sum(np.abs(x.astype(np.float64)).sum() for x in flat.values()))
    final_loss = losses[-1][1]
    say(f"final loss: {final_loss:.8f}")
    say(f"adapters checksum: {checksum:.10f}")
    say(f"{args.steps} steps in {elapsed:.1f}s")
    if args.out is not None and is_main:
        np.savez(args.out, **flat, _losses=np.array(losses, np.float64))
    multihost_utils.sync_global_devices("train_sharded done")
    return {"final_loss": final_loss, "checksum": checksum, "adapters": flat}


def _flatten(tree):
    import jax

    import lora_jax as lora

    return [(lora.path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


if __name__ == "__main__":
    main()
