"""Training and saving jobs that tests/test_checkpoint.py runs in subprocesses.

``resume``: a small LoRA run (dropout, LoRA+ AdamW on a schedule, a leaf
trained in full) that trains, checkpoints, is killed, and resumes in a new
process. ``big-save``: saves one small step, then starts a large save for the
test to kill midway. ``sharded``: saves adapters and optimizer state sharded
over 8 fake devices and restores them onto the mesh from the base weights'
shardings. ``read-merged``: reads a merged export with orbax alone.
``restore``: restores a checkpoint and prints the error it raises, if any.
"""

import argparse
import json
import os
import signal
import sys

import numpy as np


def _resume(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lora
    from lora_jax import checkpoint, optim

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "l1": {"kernel": jax.random.normal(k1, (16, 32)) / 4, "bias": jnp.zeros(32)},
        "l2": {"kernel": jax.random.normal(k2, (32, 8)) / 6, "bias": jnp.zeros(8)},
    }
    spec = lora.LoraSpec(rank=4, targets=r".*/kernel", train=r"l2/bias", dropout=0.1)
    frozen, adapters = lora.split(params, spec, key=k3)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 3, args.total)
    opt = optim.adamw(schedule, weight_decay=0.01, lora_plus_ratio=4.0)
    apply = lora.wrap(
        lambda p, x: jax.nn.gelu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"]
    )

    @jax.jit
    def step(adapters, opt_state, rng, x, y):
        rng, sub = jax.random.split(rng)
        loss_fn = lambda ad: optax.softmax_cross_entropy_with_integer_labels(
            apply(frozen, ad, x, lora_dropout_key=sub), y
        ).mean()
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, rng, loss

    def batch(i: int):
        r = np.random.default_rng(1000 + i)  # the data position is the step: batch i is fixed
        return r.normal(size=(8, 16)).astype(np.float32), r.integers(0, 8, size=8)

    ckpt = checkpoint.CheckpointManager(args.dir, max_to_keep=2)
    if args.mode == "resume":
        state = ckpt.restore(optimizer=opt, frozen=frozen, spec=spec)
        adapters, opt_state, rng, start = state.adapters, state.opt_state, state.rng, state.data["next_batch"]
        assert state.step == start
    else:
        opt_state, rng, start = opt.init(adapters), jax.random.key(42), 0
    losses = []
    for i in range(start, start + args.steps):
        adapters, opt_state, rng, loss = step(adapters, opt_state, rng, *batch(i))
        losses.append(np.asarray(loss))
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    np.savez(args.out, losses=np.asarray(losses), **leaves)
    if args.mode == "save-and-die":
        ckpt.save(
            start + args.steps,
            adapters,
            opt_state=opt_state,
            rng=rng,
            spec=spec,
            data={"next_batch": start + args.steps},
        )
        ckpt.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)  # preempted: no clean shutdown
    ckpt.close()


def _big_save(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    import lora_jax as lora
    from lora_jax import checkpoint

    def adapters(fill: float, n: int):
        a = {f"w{i}": lora.LoraFactors(jnp.full((n, 64), fill), jnp.full((64, 64), fill), 0.5) for i in range(8)}
        return {"layers": a, "norm": jnp.full((64,), fill)}

    ckpt = checkpoint.CheckpointManager(args.dir, async_save=False)
    ckpt.save(1, adapters(1.0, 16), data={"which": "small"})
    print("SAVING", flush=True)
    ckpt.save(2, adapters(2.0, 1 << 18), data={"which": "big"})  # 8 x 64 MiB of lora_a
    print("SAVED", flush=True)


def _sharded(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lora_jax as lora
    from lora_jax import checkpoint, sharding

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = {
        "up": jax.random.normal(jax.random.key(0), (3, 16, 32)),  # a stack of 3 column-parallel weights
        "down": jax.random.normal(jax.random.key(1), (32, 16)),  # row parallel
        "norm": jnp.ones(16),
    }
    rules = {"up": P(None, None, "model"), "down": P("model", None), "norm": P()}
    param_shardings = sharding.shardings_from_rules(params, rules, mesh=mesh)
    params = jax.device_put(params, param_shardings)

    def fn(p):
        h = jnp.ones((4, 16))
        for i in range(3):
            h = jnp.tanh(h @ p["up"][i])[:, :16]
        return (jnp.concatenate([h, h], -1) @ p["down"]) * p["norm"]

    spec = lora.LoraSpec(rank=4, targets="up|down", train="norm")
    frozen, adapters = sharding.split_sharded(params, spec, key=jax.random.key(2), trace=fn)
    adapters = jax.tree.map(lambda x: x + 0.25, adapters)
    opt = optax.adam(1e-3)
    ad_shardings = sharding.adapter_shardings(param_shardings, adapters)
    st_shardings = sharding.optimizer_state_shardings(opt, adapters, ad_shardings)
    opt_state = jax.jit(opt.init, out_shardings=st_shardings)(adapters)
    opt_state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, opt_state)
    with checkpoint.CheckpointManager(args.dir) as ckpt:
        ckpt.save(5, adapters, opt_state=opt_state, spec=spec)
    state = checkpoint.restore(args.dir, optimizer=opt, param_shardings=param_shardings, frozen=frozen)
    report = {"leaves": 0, "mismatch": [], "sharding": []}
    pairs = [(adapters, state.adapters, ad_shardings), (opt_state, state.opt_state, st_shardings)]
    for before, after, want in pairs:
        flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
        flat_a = jax.tree.leaves(after)
        flat_w = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, NamedSharding))
        for (p, b), a, w in zip(flat_b, flat_a, flat_w):
            report["leaves"] += 1
            if not np.array_equal(np.asarray(b), np.asarray(a)):
                report["mismatch"].append(jax.tree_util.keystr(p))
            if not a.sharding.is_equivalent_to(w, a.ndim) or not b.sharding.is_equivalent_to(a.sharding, a.ndim):
                report["sharding"].append(f"{jax.tree_util.keystr(p)}: {a.sharding} vs {w}")
    shard = state.adapters["up"].lora_b.addressable_shards[0].data.shape
    report["up_lora_b_shard"] = list(shard)
    report["spec_ok"] = state.spec == spec
    print("REPORT " + json.dumps(report), flush=True)


def _restore(args: argparse.Namespace) -> None:
    from lora_jax import checkpoint

    try:
        state = checkpoint.restore(args.dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"{type(e).__name__}: {e}", flush=True)
        return
    print(f"RESTORED step {state.step}", flush=True)


def _read_merged(args: argparse.Namespace) -> None:
    import jax
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore(args.dir)
    assert not any(m == "lora_jax" or m.startswith("lora_jax.") for m in sys.modules), "lora_jax was imported"
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(args.out, **flat)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["resume", "big-save", "sharded", "read-merged", "restore"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out")
    parser.add_argument("--mode", choices=["straight", "save-and-die", "resume"], default="straight")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--total", type=int, default=20)
    args = parser.parse_args()
    jobs = {"resume": _resume, "big-save": _big_save, "sharded": _sharded, "read-merged": _read_merged}
    jobs["restore"] = _restore
    jobs[args.job](args)


if __name__ == "__main__":
    main()
