"""Quickstart: fine-tune a small Flax model with LoRA on the CPU in seconds.

A randomly initialised MLP stands in for a pretrained model. The new task is
what that model computes after a rank-2 change of its hidden layer: the kind
of change LoRA is built to learn. Only the adapters (a few percent of the
parameters) train, and the loss on the new task falls by orders of
magnitude; the merged model gives the same answers as the adapted one.

    python examples/quickstart.py            # a few seconds on a laptop CPU
    python examples/quickstart.py --smoke    # a few steps, for tests
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lora


class MLP(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(8)(x)


def make_task(key, teacher_params, model, n=1024, dim=32):
    x = jax.random.normal(key, (n, dim))
    return x, model.apply(teacher_params, x)


def fit(loss_fn, trainable, steps, lr, log_every=0, label=""):
    opt = optax.adam(lr)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        value, grads = jax.value_and_grad(loss_fn)(t)
        updates, s = opt.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    for i in range(steps):
        trainable, state, value = step(trainable, state)
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"  {label} step {i:4d}  loss {float(value):.5f}")
    return trainable, float(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description="LoRA quickstart on a small Flax MLP.")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (for tests)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    steps = 20 if args.smoke else args.steps
    t0 = time.perf_counter()

    model = MLP()
    keys = jax.random.split(jax.random.key(0), 4)
    base = model.init(keys[0], jnp.ones((1, 32)))  # stands in for pretrained weights

    # The new task: the base model with a rank-2 update of its hidden layer.
    u = jax.random.normal(keys[1], (256, 2)) * 0.15
    v = jax.random.normal(keys[2], (2, 256)) * 0.15
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, w: w + u @ v if "Dense_1" in lora.path_to_str(path) and w.ndim == 2 else w, base
    )
    x_new, y_new = make_task(keys[3], shifted, model)

    # 3. LoRA: split, wrap, train only the adapters.
    spec = lora.LoraSpec(rank=args.rank, alpha=2 * args.rank, targets="all-linear")
    frozen, adapters = lora.split(base, spec, key=jax.random.key(1))
    apply = lora.wrap(model.apply)
    n_train = sum(x.size for x in jax.tree.leaves(adapters))
    n_all = sum(x.size for x in jax.tree.leaves(base))
    print(
        f"LoRA rank {args.rank} on {len(jax.tree.leaves(adapters)) // 2} weights: "
        f"{n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.1f}%)"
    )

    def new_loss(ad):
        return jnp.mean((apply(frozen, ad, x_new) - y_new) ** 2)

    before = float(new_loss(adapters))
    adapters, after = fit(new_loss, adapters, steps, 1e-2, log_every=max(steps // 8, 1), label="LoRA")
    merged = lora.merge(frozen, adapters)
    merged_loss = float(jnp.mean((model.apply(merged, x_new) - y_new) ** 2))
    print(
        f"new task: loss {before:.5f} -> {after:.5f} ({before / max(after, 1e-12):.0f}x lower); "
        f"merged model gives {merged_loss:.5f}"
    )
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return before, after, merged_loss


if __name__ == "__main__":
    main()
