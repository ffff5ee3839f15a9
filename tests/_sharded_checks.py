"""Sharded LoRA training on 8 fake CPU devices, compared with one device.

Run by tests/test_sharding.py in a subprocess (the device count must be set
before JAX starts): ``python -m tests._sharded_checks``. Prints one JSON
object of measurements; the assertions live in the test.
"""

import json
import os
import re
import sys

if __name__ == "__main__":
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lora
from lora_jax import optim
from lora_jax import sharding as lora_sharding

# Sizes chosen so that no activation shares a shape with a frozen weight, with
# its per-device shard, with one layer of the stack or with any of their
# transposes: the MLP widens DIM -> HIDDEN and narrows to WIDTH, so the column-
# and row-parallel shards ([12, 20] and [20, 18]) are not each other's
# transpose; activations are [4 or 16, 12 | 18 | 20 | 40 | 9 | 5].
BATCH, DIM, HIDDEN, WIDTH, LAYERS, CLASSES, RANK, STEPS = 16, 12, 40, 18, 3, 5, 4, 3

RULES = {
    "up": P(None, "model"),  # column parallel
    "down": P("model", None),  # row parallel
    "stack": P(None, None, "model"),  # per-layer column parallel, stack axis kept whole
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def make_params(key):
    k = jax.random.split(key, 4)
    return {
        "norm": jnp.ones(DIM),
        "up": jax.random.normal(k[0], (DIM, HIDDEN)) / np.sqrt(DIM),
        "down": jax.random.normal(k[1], (HIDDEN, WIDTH)) / np.sqrt(HIDDEN),
        "stack": jax.random.normal(k[2], (LAYERS, WIDTH, WIDTH)) / np.sqrt(WIDTH),
        "head": jax.random.normal(k[3], (WIDTH, CLASSES)) / np.sqrt(WIDTH),
    }


def apply(p, x):
    h = x * p["norm"]
    h = jax.nn.gelu(h @ p["up"]) @ p["down"]
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
    return h @ p["head"]


def data():
    kx, ky = jax.random.split(jax.random.key(7))
    return jax.random.normal(kx, (STEPS, BATCH, DIM)), jax.random.randint(ky, (STEPS, BATCH), 0, CLASSES)


SPEC = lora.LoraSpec(rank=RANK, targets="up|down|stack", train="norm")
OPT = optim.adamw(5e-3, weight_decay=0.01, lora_plus_ratio=16.0)


def loss_fn(adapters, frozen, x, y):
    logits = lora.wrap(apply)(frozen, adapters, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(frozen, adapters, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, frozen, x, y)
    updates, opt_state = OPT.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss


def full_finetune_step(params, x, y):
    """Full fine-tuning: its dW all-reduce is what the collective check must be able to see."""
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean())(params)
    return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)


def merged_lora_grads(frozen, adapters, x, y):
    """LoRA that forms W + s·A@B for every matmul: what `wrap` must never compile to."""

    def loss(ad):
        logits = apply(lora.merge(frozen, ad), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss)(adapters)


def forward(params, x):
    return apply(params, x)


STACKED = {"stack"}
REDUCTIONS = ("all-reduce", "reduce-scatter")


def weight_shapes(frozen, shardings) -> dict[str, set[tuple[int, ...]]]:
    """Every shape under which a frozen weight (or its gradient) can appear in a compiled step.

    The full shape, the per-device shard under the weight's sharding (a sharded
    weight's gradient is all-reduced at that shape), one layer of a stack (a
    scan reduces each layer's gradient inside the loop), and the transposes of
    all of them (XLA may compute ``dW^T``).
    """
    out = {}
    for name, w in frozen.items():
        if w is None:
            continue
        full = tuple(w.shape)
        shapes = {full, tuple(shardings[name].shard_shape(full))}
        if name in STACKED:
            shapes |= {s[1:] for s in shapes}
        shapes |= {(*s[:-2], s[-1], s[-2]) for s in shapes if len(s) >= 2}
        out[name] = shapes
    return out


def weight_collectives(hlo: str, shapes: dict[str, set], ops=COLLECTIVES) -> dict[str, list[str]]:
    """HLO collectives among ``ops`` whose result has one of a weight's shapes, per weight."""
    hits = {name: [] for name in shapes}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(" + "|".join(ops) + r")(-start)?\(", line)
        if m is None:
            continue
        result_shapes = {
            tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))
        }
        for name, weight in shapes.items():
            if result_shapes & weight:
                hits[name].append(line.strip()[:160])
    return hits


def run_single(params, key, xs, ys):
    frozen, adapters = lora.split(params, SPEC, key=key, trace=lambda p: apply(p, xs[0]))
    step = jax.jit(train_step)
    opt_state, losses = OPT.init(adapters), []
    for x, y in zip(xs, ys):
        adapters, opt_state, loss = step(frozen, adapters, opt_state, x, y)
        losses.append(float(loss))
    return adapters, losses


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    key = jax.random.key(0)
    params, (xs, ys) = make_params(jax.random.key(1)), data()
    ref_adapters, ref_losses = run_single(params, key, xs, ys)
    _, ref_init = lora.split(params, SPEC, key=key, trace=lambda p: apply(p, xs[0]))

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    param_shardings = lora_sharding.shardings_from_rules(params, RULES, mesh=mesh)
    sharded_params = jax.device_put(params, param_shardings)
    frozen, adapters = lora_sharding.split_sharded(sharded_params, SPEC, key=key, trace=lambda p: apply(p, xs[0]))
    derived = lora_sharding.adapter_shardings(param_shardings, adapters)

    def shardings_match(tree, expected) -> bool:
        return all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(
                jax.tree.leaves(tree), jax.tree.leaves(expected, is_leaf=lambda s: isinstance(s, NamedSharding))
            )
        )

    out = {
        "init_equal": all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(ref_init))),
        "init_shardings_match": shardings_match(adapters, derived),
        "frozen_untouched": all(
            x is sharded_params[k] or x.sharding == sharded_params[k].sharding
            for k, x in frozen.items()
            if x is not None
        ),
        "specs": {
            path: [str(s.spec) for s in jax.tree.leaves(entry, is_leaf=lambda s: isinstance(s, NamedSharding))]
            for path, entry in lora._tree.adapter_entries(derived).items()
        },
    }

    state_shardings = lora_sharding.optimizer_state_shardings(OPT, adapters, derived)
    opt_state = jax.jit(OPT.init, out_shardings=state_shardings)(adapters)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    step = jax.jit(
        train_step,
        in_shardings=(frozen_shardings, derived, state_shardings, batch, batch),
        out_shardings=(derived, state_shardings, replicated),
        donate_argnums=(1, 2),
    )
    xs_s, ys_s = (
        jax.device_put(xs, NamedSharding(mesh, P(None, "data"))),
        jax.device_put(ys, NamedSharding(mesh, P(None, "data"))),
    )
    compiled = step.lower(frozen, adapters, opt_state, xs_s[0], ys_s[0]).compile()
    losses = []
    for i in range(STEPS):
        adapters, opt_state, loss = compiled(frozen, adapters, opt_state, xs_s[i], ys_s[i])
        losses.append(float(loss))

    shapes = weight_shapes(frozen, frozen_shardings)
    everything = [shape for group in shapes.values() for shape in group]
    assert len(everything) == len(set(everything)), f"two weights share a shape: {shapes}"
    full_ft = (
        jax.jit(full_finetune_step, in_shardings=(param_shardings, batch, batch), out_shardings=param_shardings)
        .lower(sharded_params, xs_s[0], ys_s[0])
        .compile()
    )
    merged = (
        jax.jit(merged_lora_grads, in_shardings=(frozen_shardings, derived, batch, batch), out_shardings=derived)
        .lower(frozen, adapters, xs_s[0], ys_s[0])
        .compile()
    )
    inference = jax.jit(forward, in_shardings=(param_shardings, batch)).lower(sharded_params, xs_s[0]).compile()
    out.update(
        losses=losses,
        ref_losses=ref_losses,
        loss_rel_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        adapter_rel_err={
            path: rel_err(a, b)
            for (path, a), b in zip(
                ((lora.path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]),
                jax.tree.leaves(ref_adapters),
            )
        },
        trained_shardings_match=shardings_match(adapters, derived),
        state_shardings_match=shardings_match(opt_state, state_shardings),
        weight_collectives=weight_collectives(compiled.as_text(), shapes),
        full_ft_weight_reductions=weight_collectives(full_ft.as_text(), shapes, REDUCTIONS),
        merged_weight_reductions=weight_collectives(merged.as_text(), shapes, REDUCTIONS),
        inference_weight_collectives=weight_collectives(inference.as_text(), shapes),
        weight_shapes={name: sorted(group) for name, group in shapes.items()},
        b_trained=all(
            float(jnp.abs(f.lora_b).max()) > 0
            for f in lora._tree.adapter_entries(adapters).values()
            if isinstance(f, lora.LoraFactors)
        ),
    )
    try:
        lora_sharding.shardings_from_rules({"w": jnp.zeros((12, 3))}, {"w": P(None, "model")}, mesh=mesh)
        out["uneven_error"] = ""
    except ValueError as e:
        out["uneven_error"] = str(e)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
