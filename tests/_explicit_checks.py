"""Run in a subprocess with 8 fake CPU devices: wrap on a mesh with explicit axes."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax as lora  # noqa: E402
from lora_jax import sharding  # noqa: E402


def main():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    jax.sharding.set_mesh(mesh)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    params = {
        "w1": put(jax.random.normal(jax.random.key(0), (16, 32)), None, "model"),  # column parallel
        "w2": put(jax.random.normal(jax.random.key(1), (32, 16)), "model", None),  # row parallel
    }
    x = put(jax.random.normal(jax.random.key(2), (8, 16)), "data", None)

    def f(p, x):
        h = jnp.tanh(jnp.dot(x, p["w1"]))
        return jnp.dot(h, p["w2"], out_sharding=P("data", None))

    frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w."), key=jax.random.key(3))
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    shardings = sharding.adapter_shardings({k: v.sharding for k, v in params.items()}, adapters)
    adapters = jax.tree.map(jax.device_put, adapters, shardings)
    assert adapters["w2"].lora_a.sharding.spec == P("model", None)

    wrapped = lora.wrap(f, strict=True)
    y = jax.jit(wrapped)(frozen, adapters, x)
    ref = jax.jit(f)(lora.merge(frozen, adapters), x)
    assert y.sharding.spec == P("data", None), y.sharding
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    grads = jax.jit(jax.grad(lambda a: jnp.sum(wrapped(frozen, a, x) ** 2)))(adapters)
    ref_grads = jax.jit(jax.grad(lambda a: jnp.sum(f(lora.merge(frozen, a), x) ** 2)))(adapters)
    for g, r, a in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), jax.tree.leaves(adapters)):
        assert g.sharding.spec == a.sharding.spec, (g.sharding.spec, a.sharding.spec)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))
    print("explicit-ok")


if __name__ == "__main__":
    main()
