"""lora_jax.sharding: derived adapter shardings, and sharded training on 8 fake CPU devices.

The multi-device checks run in a subprocess (tests/_sharded_checks.py), since
the fake device count must be set before JAX starts; the rest runs here.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lora
from lora_jax import optim
from lora_jax import sharding as ls
from tests._subprocess import run_json_module

KEY = jax.random.key(0)


def _adapters():
    params = {
        "w": jnp.zeros((8, 16)),
        "stack": jnp.zeros((3, 8, 16)),
        "dg": jnp.zeros((8, 4, 2)),  # DenseGeneral-like [D, H, hd]
        "norm": jnp.ones(16),
    }

    def fn(p):
        x = jnp.ones((2, 8))
        y = [x @ p["stack"][i] for i in range(3)]
        return x @ p["w"], y, jnp.einsum("bd,dhk->bhk", x, p["dg"])

    return params, lora.split(params, lora.LoraSpec(rank=2, targets="w|stack|dg", train="norm"), key=KEY, trace=fn)[1]


def test_factor_specs_follow_the_weight():
    params, adapters = _adapters()
    specs = {"w": P("x", "y"), "stack": P("s", "x", "y"), "dg": P("x", "y"), "norm": P("y")}
    out = ls.adapter_shardings(specs, adapters)
    assert (out["w"].lora_a, out["w"].lora_b) == (P("x", None), P(None, "y"))
    # The stacked axis keeps its sharding on both factors.
    assert (out["stack"].lora_a, out["stack"].lora_b) == (P("s", "x", None), P("s", None, "y"))
    # A spec shorter than the weight's rank: the trailing axes are replicated.
    assert (out["dg"].lora_a, out["dg"].lora_b) == (P("x", None), P(None, "y", None))
    assert out["norm"] == P("y")
    assert jax.tree.structure(out) == jax.tree.structure(adapters)


def test_factor_specs_with_tuple_axes_and_abstract_adapters():
    params, _ = _adapters()
    spec = lora.LoraSpec(rank=2, targets="w")
    abstract = jax.eval_shape(lambda p, k: lora.split(p, spec, key=k)[1], params, KEY)
    out = ls.adapter_shardings({"w": P(("data", "fsdp"), "model")}, abstract)
    assert out["w"].lora_a == P(("data", "fsdp"), None) and out["w"].lora_b == P(None, "model")


def test_named_shardings_and_arrays_as_input():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params, adapters = _adapters()
    placed = jax.device_put(params, NamedSharding(mesh, P()))
    out = ls.adapter_shardings(placed, adapters)  # arrays: their .sharding is used
    assert isinstance(out["w"].lora_a, NamedSharding) and out["w"].lora_a.mesh == mesh
    out = ls.adapter_shardings({"w": P(None, "model"), "stack": None, "dg": None, "norm": None}, adapters, mesh=mesh)
    assert out["w"].lora_b == NamedSharding(mesh, P(None, "model")) and out["norm"] == NamedSharding(mesh, P())
    one = SingleDeviceSharding(jax.devices()[0])
    out = ls.adapter_shardings(jax.tree.map(lambda _: one, params), adapters)
    assert out["stack"].lora_a == one and out["norm"] == one


def test_optimizer_state_shardings_follow_the_adapters():
    _, adapters = _adapters()
    shardings = ls.adapter_shardings({"w": P(None, "m"), "stack": P("s"), "dg": P(), "norm": P("m")}, adapters)
    opt = optim.adamw(1e-3, lora_plus_ratio=16.0)  # nested multi_transform / masked states
    state = ls.optimizer_state_shardings(opt, adapters, shardings)
    assert jax.tree.structure(state, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        jax.eval_shape(opt.init, adapters)
    )
    mu = state.inner_states["lora_b"].inner_state[0].mu
    assert mu["w"].lora_b == P(None, "m") and mu["stack"].lora_b == P("s", None, None)
    assert state.inner_states["full"].inner_state[0].nu["norm"] == P("m")
    assert state.inner_states["lora_a"].inner_state[0].count == P()


def test_shardings_from_rules():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params, _ = _adapters()
    out = ls.shardings_from_rules(params, {"w": P(None, "model"), "s.*": P("data")}, mesh=mesh)
    assert out["w"].spec == P(None, "model") and out["stack"].spec == P("data") and out["norm"].spec == P()
    out = ls.shardings_from_rules(params, lambda path, x: P("model") if x.ndim == 1 else None, mesh=mesh)
    assert out["norm"].spec == P("model") and out["w"].spec == P()


def test_split_sharded_matches_split():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params = {"w": jax.random.normal(KEY, (8, 16)), "norm": jnp.ones(16)}
    spec = lora.LoraSpec(rank=2, targets="w", train="norm")
    frozen, adapters = ls.split_sharded(
        params, spec, key=KEY, shardings={"w": P(None, "model"), "norm": P()}, mesh=mesh
    )
    ref_frozen, ref_adapters = lora.split(params, spec, key=KEY)
    assert frozen["norm"] is None and frozen["w"].sharding.spec == P(None, "model")
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(ref_adapters)):
        assert bool((a == b).all())
    assert adapters["w"].lora_b.sharding.spec == P(None, "model")
    # A legacy uint32 key works too.
    _, legacy = ls.split_sharded(frozen | {"norm": params["norm"]}, spec, key=jax.random.PRNGKey(0), mesh=mesh)
    assert legacy["w"].lora_a.shape == (8, 2)


def test_errors():
    params, adapters = _adapters()
    with pytest.raises(ValueError, match="'stack' has no sharding in `param_shardings`"):
        ls.adapter_shardings({"w": P(), "dg": P(), "norm": P()}, adapters)
    with pytest.raises(ValueError, match="has 3 entries but the weight has 2 axes"):
        ls.adapter_shardings({"w": P("a", "b", "c"), "stack": P(), "dg": P(), "norm": P()}, adapters)
    with pytest.raises(TypeError, match="at 'w' is a str"):
        ls.adapter_shardings({"w": "model", "stack": P(), "dg": P(), "norm": P()}, adapters)
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        ls.adapter_shardings(params, adapters, mesh="mesh")
    with pytest.raises(TypeError, match="must be the adapter tree"):
        ls.adapter_shardings(params, [1, 2])
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    with pytest.raises(ValueError, match="names mesh axes \\['tensor'\\]"):
        ls.shardings_from_rules(params, {"w": P("tensor")}, mesh=mesh)
    with pytest.raises(ValueError, match="has 2 entries"):
        ls.shardings_from_rules(params, {"norm": P(None, "model")}, mesh=mesh)
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        ls.shardings_from_rules(params, {}, mesh=None)
    spec = lora.LoraSpec(rank=2, targets="w")
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        ls.split_sharded(params, spec, key=0)
    with pytest.raises(TypeError, match="carry no sharding"):
        ls.split_sharded({"w": jnp.zeros((4, 4)).__array__()}, spec, key=KEY)
    with pytest.raises(ValueError, match="no mesh is known"):
        ls.split_sharded(params, spec, key=KEY, shardings=jax.tree.map(lambda _: P(), params))
    with pytest.raises(ValueError, match="`shardings` has 1 leaves"):
        ls.optimizer_state_shardings(optax.adam(1e-3), adapters, {"w": P()})


@pytest.fixture(scope="module")
def sharded_run():
    return run_json_module("tests._sharded_checks")


def test_sharded_step_equals_single_device(sharded_run):
    assert sharded_run["loss_rel_err"] <= 1e-5, (sharded_run["losses"], sharded_run["ref_losses"])
    assert max(sharded_run["adapter_rel_err"].values()) <= 1e-5, sharded_run["adapter_rel_err"]
    assert sharded_run["b_trained"]  # the comparison is not between two untouched inits


def test_adapters_come_out_with_the_derived_shardings(sharded_run):
    assert sharded_run["init_equal"], "split_sharded drew different factors than split"
    assert sharded_run["init_shardings_match"] and sharded_run["trained_shardings_match"]
    assert sharded_run["state_shardings_match"] and sharded_run["frozen_untouched"]
    assert sharded_run["specs"]["up"] == ["P(None, None)", "P(None, 'model')"]
    assert sharded_run["specs"]["down"] == ["P('model', None)", "P(None, None)"]
    assert sharded_run["specs"]["stack"] == ["P(None, None, None)", "P(None, None, 'model')"]


def test_uneven_rule_is_reported(sharded_run):
    assert "splits a dimension of 3 into 2 shards" in sharded_run["uneven_error"]


def test_frozen_weights_are_never_gathered(sharded_run):
    shapes = sharded_run["weight_shapes"]
    # The detector matches each weight's per-device shard and one layer of the stack, not only the full shape.
    assert [12, 20] in shapes["up"] and [20, 18] in shapes["down"] and [18, 9] in shapes["stack"]
    # No collective in the compiled LoRA step moves an array of a frozen weight's shape...
    assert sharded_run["weight_collectives"] == {name: [] for name in shapes}
    # ...nor does the plain forward pass, so no activation shares those shapes either.
    assert sharded_run["inference_weight_collectives"] == {name: [] for name in shapes}
    # Positive controls: the detector sees the gradient reduction of every kind of weight (column-parallel,
    # row-parallel, stacked) both in full fine-tuning and in LoRA that forms W + s·A@B for each matmul.
    for control in ("full_ft_weight_reductions", "merged_weight_reductions"):
        for name in ("up", "down", "stack"):
            assert sharded_run[control][name], (control, name, sharded_run[control])
