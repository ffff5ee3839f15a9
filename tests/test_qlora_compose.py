"""QLoRA composed with serving and sharding: a quantised frozen base under `wrap_many` and on a mesh.

Serving is checked row by row against `lora_jax.wrap` with each row's own
adapter on the same quantised base, and against the plain apply function on
``merge(dequantize_tree(quantized), adapter)``. The sharded checks run in a
subprocess with 8 fake CPU devices (this module, run as
``python -m tests.test_qlora_compose``), since the device count must be set
before JAX starts; it prints one JSON object of measurements and the
assertions live in the tests.
"""

import os

if __name__ == "__main__":
    _flags = os.environ.get("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lora
from lora_jax import sharding as ls
from lora_jax.models import LlamaConfig, LlamaForCausalLM
from lora_jax.serving import stack_adapters, wrap_many
from tests._subprocess import run_json_module

# A small MLP with a scanned stack and a head, sized so that no activation shares a shape with a
# frozen weight, its NF4/int8 codes, a per-device shard of them or one layer of the stack (nor their
# transposes): weights and codes have dims 3, 10, 12, 20, 24, 40, 48, 80; activations [4 or 16, ...].
BATCH, DIM, HIDDEN, WIDTH, LAYERS, CLASSES, BLOCK = 16, 10, 80, 48, 3, 5, 8
QUANTIZED = "up|down|stack"  # the head ([48, 5]) stays in float: 5 is no multiple of a block
IDS = np.array([0, 2, -1, 1, 2, -1, 0], np.int32)


def _normal(rng, *shape, std=1.0):
    """NumPy draws: no small compiled program per shape."""
    return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)


def make_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "norm": 1.0 + _normal(rng, DIM, std=0.1),
        "up": _normal(rng, DIM, HIDDEN, std=DIM**-0.5),
        "down": _normal(rng, HIDDEN, WIDTH, std=HIDDEN**-0.5),
        "stack": _normal(rng, LAYERS, WIDTH, WIDTH, std=WIDTH**-0.5),
        "head": _normal(rng, WIDTH, CLASSES, std=WIDTH**-0.5),
    }


def apply(p, x):
    h = x * p["norm"]
    h = jax.nn.gelu(h @ p["up"]) @ p["down"]
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
    return h @ p["head"]


def _with_random_b(adapters, seed, std=0.3):
    """The adapters with a non-zero B, so each one changes the model and the tests can fail."""
    rng = np.random.default_rng(seed)

    def fill(f):
        if not isinstance(f, lora.LoraFactors):
            return f
        return dataclasses.replace(f, lora_b=_normal(rng, *f.lora_b.shape, std=std).astype(f.lora_b.dtype))

    return jax.tree.map(fill, adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))


def _cut(adapters, rank, scale):
    """The adapters cut to their first ``rank`` directions, with another scale."""

    def cut(f):
        b = jax.lax.slice_in_dim(f.lora_b, 0, rank, axis=len(f.stack_axes))
        return dataclasses.replace(f, lora_a=f.lora_a[..., :rank], lora_b=b, scale=float(scale))

    return jax.tree.map(cut, adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))


def _is_quantized(x):
    return isinstance(x, lora.QuantizedArray)


def _quantized_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)[0]
    return sorted(lora.path_to_str(p) for p, x in flat if _is_quantized(x))


# -- serving ------------------------------------------------------------------------------------------


@functools.cache
def _mlp_adapters():
    """The MLP's frozen params, 3 adapters of ranks 2, 4, 3 with different scales, and a batch."""
    params = make_params(1)
    x = _normal(np.random.default_rng(2), len(IDS), DIM)
    spec = lora.LoraSpec(rank=4, targets="up|down|stack|head")
    frozen, full = lora.split(params, spec, key=jax.random.key(10), trace=lambda p: apply(p, x[:1]))
    adapters = [_with_random_b(_cut(full, r, s), i) for i, (r, s) in enumerate([(2, 2.0), (4, 0.25), (3, 3.0)])]
    return params, frozen, adapters, x


def _check_rows(out, quantized, adapters, x, apply_fn, atol):
    """``out`` row b equals wrap(apply_fn)(quantized, adapter IDS[b]) and apply_fn(merge(dequantised, adapter))."""
    dense = lora.dequantize_tree(quantized)
    plain = jax.jit(apply_fn)
    base = np.asarray(plain(dense, x))
    wrapped_fn = lora.wrap(apply_fn)  # one compiled program per adapter structure (ranks, scales)
    merged_fn = jax.jit(lambda ad: apply_fn(lora.merge(dense, ad), x))
    wrapped = [np.asarray(wrapped_fn(quantized, ad, x)) for ad in adapters] + [base]
    merged = [np.asarray(merged_fn(ad)) for ad in adapters] + [base]
    for b, i in enumerate(IDS):
        np.testing.assert_allclose(out[b], wrapped[i][b], atol=atol, rtol=atol, err_msg=f"row {b}, adapter {i}")
        np.testing.assert_allclose(out[b], merged[i][b], atol=atol, rtol=atol, err_msg=f"row {b}, adapter {i} merged")
        # Every adapter moves its rows away from the base model; id -1 rows are the base model.
        assert (np.abs(out[b] - base[b]).max() > 1e-2) == (i != -1), (b, i)
    return base, plain


@pytest.mark.parametrize("fmt, double_quant", [("nf4", True), ("int8", False)], ids=["nf4-double", "int8"])
def test_served_rows_on_a_quantised_base_match_each_adapter_alone(fmt, double_quant):
    """wrap_many over a quantised base: each row equals its adapter run alone, and the merged dequantised model."""
    params, frozen, adapters, x = _mlp_adapters()
    quantized = lora.quantize(frozen, fmt, block_size=BLOCK, double_quant=double_quant, include=QUANTIZED, min_size=0)
    assert _quantized_paths(quantized) == ["down", "stack", "up"]
    out = np.asarray(jax.jit(wrap_many(apply))(quantized, stack_adapters(adapters), jnp.asarray(IDS), x))
    base, plain = _check_rows(out, quantized, adapters, x, apply, atol=1e-5)
    # The base really is quantised: the base-model rows differ from the float model's.
    assert np.abs(base - np.asarray(plain(params, x))).max() > 1e-3


def test_served_tiny_llama_on_an_nf4_base():
    """The same on a tiny scanned Llama with NF4 projections and embedding (single quantisation)."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        scan_layers=True,
    )
    model = LlamaForCausalLM(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (len(IDS), 5)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), tokens[:1])
    spec = lora.LoraSpec(rank=4, targets="all-linear")
    frozen, full = lora.split(params, spec, key=jax.random.key(2), trace=lambda p: model.apply(p, tokens[:1]))
    # Three adapters from one split with a fresh random B each; one rank and scale, so one program each
    # for wrap and merge (the MLP test mixes ranks and scales).
    adapters = [_with_random_b(full, 100 + i, std=0.2) for i in range(3)]
    quantized = lora.quantize(
        frozen, "nf4", block_size=16, include=r".*_proj/kernel|.*embed_tokens/embedding", min_size=0
    )
    assert len(_quantized_paths(quantized)) == 8  # 7 projections and the embedding
    out = np.asarray(jax.jit(wrap_many(model.apply))(quantized, stack_adapters(adapters), jnp.asarray(IDS), tokens))
    base, plain = _check_rows(out, quantized, adapters, tokens, model.apply, atol=2e-5)
    assert np.abs(base - np.asarray(plain(params, tokens))).max() > 1e-3


# -- sharding: the checks run in a subprocess with 8 devices ---------------------------------------------

RULES = {
    "up": P(None, "model"),  # column parallel: the codes' and absmax' block axis is split
    "down": P("model", None),  # row parallel
    "stack": P(None, None, "model"),  # per-layer column parallel, stack axis kept whole
}
# (format, double_quant, whether to compile and run the training step too): the layout checks run for
# both formats, the step (the slow part) for NF4 with double quantisation, the most involved layout.
SHARDED_FORMATS = [("nf4", True, True), ("int8", False, False)]
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SPEC = lora.LoraSpec(rank=3, targets="up|down|stack|head", train="norm")


def loss_fn(adapters, frozen, x, y):
    logits = lora.wrap(apply)(frozen, adapters, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def merged_loss_fn(adapters, dense, x, y):
    """The reference: the plain apply function on the merged float weights."""
    logits = apply(lora.merge(dense, adapters), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _weight_shapes(quantized, shardings) -> dict[str, set]:
    """Every shape a quantised weight can take in a compiled step: its dequantised values and its codes,
    in full and per device, one layer of the stack, and the transposes of all of them."""
    out = {}
    for name in QUANTIZED.split("|"):
        q, s = quantized[name], shardings[name]
        shapes = set()
        for full in (tuple(q.shape), tuple(q.codes.shape)):
            shapes |= {full, tuple(s.codes.shard_shape(full))}
        if name == "stack":
            shapes |= {x[1:] for x in shapes}
        shapes |= {(*x[:-2], x[-1], x[-2]) for x in shapes if len(x) >= 2}
        out[name] = shapes
    return out


def _weight_collectives(hlo: str, shapes: dict[str, set]) -> dict[str, list[str]]:
    """HLO collectives whose result has one of a weight's shapes, per weight."""
    hits = {name: [] for name in shapes}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m is None:
            continue
        result = {tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))}
        for name, weight in shapes.items():
            if result & weight:
                hits[name].append(line.strip()[:160])
    return hits


def _sharded_checks(fmt: str, double_quant: bool, run_step: bool, mesh) -> dict:
    params = make_params(1)
    rng = np.random.default_rng(7)
    x, y = _normal(rng, BATCH, DIM), jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32)
    frozen, adapters = lora.split(params, SPEC, key=jax.random.key(3), trace=lambda p: apply(p, x))
    adapters = _with_random_b(adapters, 5)
    quantize = functools.partial(
        lora.quantize, format=fmt, block_size=BLOCK, double_quant=double_quant, include=QUANTIZED, min_size=0
    )
    quantized = quantize(frozen)
    out = {"quantized_paths": _quantized_paths(quantized)}

    # The helper gives each quantised weight a QuantizedArray of shardings, which device_put follows.
    q_shardings = ls.shardings_from_rules(quantized, RULES, mesh=mesh)
    is_named = lambda s: isinstance(s, NamedSharding)
    out["helper_specs"] = {
        name: [str(s.spec) for s in jax.tree.leaves(q_shardings[name], is_leaf=is_named)] for name in RULES
    }
    out["helper_is_quantized"] = {name: _is_quantized(q_shardings[name]) for name in RULES}
    placed = jax.device_put(quantized, q_shardings)

    def matches(tree, shardings) -> bool:
        leaves, expected = jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=is_named)
        return len(leaves) == len(expected) and all(
            a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(leaves, expected)
        )

    out["placed_match"] = matches(placed, q_shardings)
    out["codes"] = {
        name: {
            "spec": str(placed[name].codes.sharding.spec),
            "shape": list(placed[name].codes.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in placed[name].codes.addressable_shards}),
            "distinct_shards": len({str(s.index) for s in placed[name].codes.addressable_shards}),
        }
        for name in RULES
    }
    # Quantising the frozen tree after placing it in float keeps the layout the helper derives.
    dense_shardings = ls.shardings_from_rules(frozen, RULES, mesh=mesh)
    out["quantized_after_placing_match"] = matches(quantize(jax.device_put(frozen, dense_shardings)), q_shardings)

    # Adapter shardings from the placed quantised tree, from its shardings, and from the float tree agree.
    derived = ls.adapter_shardings(placed, adapters)
    out["adapter_shardings_agree"] = [
        derived == ls.adapter_shardings(q_shardings, adapters),
        derived == ls.adapter_shardings(dense_shardings, adapters),
    ]
    out["adapter_specs"] = {
        path: [str(s.spec) for s in jax.tree.leaves(entry, is_leaf=is_named)]
        for path, entry in lora._tree.adapter_entries(derived).items()
    }

    # A rule that would cut quantisation blocks is refused, naming the weight.
    try:
        ls.shardings_from_rules(quantized, {"down": P(None, "data")}, mesh=mesh)
        out["block_error"] = ""
    except ValueError as e:
        out["block_error"] = str(e)
    if not run_step:
        return out

    # One jitted LoRA gradient step on the sharded quantised base, against one device.
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(derived, q_shardings, batch, batch),
        out_shardings=(replicated, derived),
    )
    compiled = step.lower(adapters, placed, x, y).compile()
    sharded_adapters = jax.device_put(adapters, derived)
    loss, grads = compiled(sharded_adapters, placed, jax.device_put(x, batch), jax.device_put(y, batch))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(adapters, quantized, x, y)
    dense = lora.dequantize_tree(quantized)
    merged_loss, merged_grads = jax.jit(jax.value_and_grad(merged_loss_fn))(adapters, dense, x, y)
    float_loss = float(jax.jit(loss_fn)(adapters, frozen, x, y))
    paths = [lora.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
    out.update(
        loss=float(loss),
        ref_loss=float(ref_loss),
        merged_loss=float(merged_loss),
        float_loss=float_loss,
        grad_rel_err={p: _rel_err(a, b) for p, a, b in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(ref_grads))},
        merged_grad_rel_err={
            p: _rel_err(a, b) for p, a, b in zip(paths, jax.tree.leaves(ref_grads), jax.tree.leaves(merged_grads))
        },
        grads_nonzero={p: float(np.abs(g).max()) > 0 for p, g in zip(paths, jax.tree.leaves(ref_grads))},
        grads_match=matches(grads, derived),
    )

    # The compiled step never moves a quantised weight (codes or dequantised values) between devices;
    # positive control: dequantising to a replicated array must gather every one of them.
    shapes = _weight_shapes(quantized, q_shardings)
    everything = [s for group in shapes.values() for s in group]
    assert len(everything) == len(set(everything)), f"two weights share a shape: {shapes}"
    out["weight_collectives"] = _weight_collectives(compiled.as_text(), shapes)
    gather = jax.jit(lora.dequantize_tree, in_shardings=(q_shardings,), out_shardings=replicated)
    out["control_collectives"] = _weight_collectives(gather.lower(placed).compile().as_text(), shapes)
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    json.dump({f"{fmt}-{dq}": _sharded_checks(fmt, dq, step, mesh) for fmt, dq, step in SHARDED_FORMATS}, sys.stdout)


@pytest.fixture(scope="module")
def sharded_run():
    return run_json_module("tests.test_qlora_compose")


SHARDED = pytest.mark.parametrize("case", [f"{fmt}-{dq}" for fmt, dq, _ in SHARDED_FORMATS], ids=["nf4-double", "int8"])


@SHARDED
def test_shardings_from_rules_shards_the_codes(sharded_run, case):
    """shardings_from_rules gives each quantised weight a QuantizedArray of shardings, and device_put follows it."""
    run = sharded_run[case]
    assert run["quantized_paths"] == ["down", "stack", "up"]
    assert run["helper_is_quantized"] == {"up": True, "down": True, "stack": True}
    double = case.startswith("nf4")
    # codes and absmax take the weight's spec; the double-quantisation statistics replicate their last axis.
    stats = {"up": ["P(None, None)"] * 2, "down": ["P('model', None)"] * 2, "stack": ["P(None, None, None)"] * 2}
    for name, spec in RULES.items():
        assert run["helper_specs"][name] == [str(spec)] * 2 + (stats[name] if double else []), name
    assert run["placed_match"] and run["quantized_after_placing_match"]
    packed = 2 if case.startswith("nf4") else 1
    codes = run["codes"]
    assert codes["up"]["shape"] == [DIM, HIDDEN // packed] and codes["up"]["spec"] == "P(None, 'model')"
    assert codes["up"]["shard_shapes"] == [[DIM, HIDDEN // packed // 2]]
    assert codes["down"]["shard_shapes"] == [[HIDDEN // 2, WIDTH // packed]]
    assert codes["stack"]["shard_shapes"] == [[LAYERS, WIDTH, WIDTH // packed // 2]]
    # Two distinct shards on the 8 devices: split over "model", replicated over "data".
    assert {name: c["distinct_shards"] for name, c in codes.items()} == {"up": 2, "down": 2, "stack": 2}


@SHARDED
def test_adapter_shardings_accept_a_quantised_base(sharded_run, case):
    """adapter_shardings reads a quantised weight's layout from its codes, as from the float weight."""
    run = sharded_run[case]
    assert run["adapter_shardings_agree"] == [True, True]
    specs = run["adapter_specs"]
    assert specs["up"] == ["P(None, None)", "P(None, 'model')"]
    assert specs["down"] == ["P('model', None)", "P(None, None)"]
    assert specs["stack"] == ["P(None, None, None)", "P(None, None, 'model')"]
    assert specs["head"] == ["P(None, None)", "P(None, None)"] and specs["norm"] == ["P()"]


def test_sharded_step_on_a_quantised_base_equals_one_device(sharded_run):
    """Loss and adapter gradients on the sharded NF4 base equal the one-device run and the merged reference."""
    run = sharded_run["nf4-True"]
    assert abs(run["loss"] - run["ref_loss"]) <= 1e-5 * abs(run["ref_loss"]), run
    assert max(run["grad_rel_err"].values()) <= 1e-5, run["grad_rel_err"]
    assert all(run["grads_nonzero"].values()), run["grads_nonzero"]
    assert run["grads_match"]  # and come out sharded like the adapters
    # Independent reference: the plain model on merge(dequantize_tree(quantized), adapters).
    assert abs(run["ref_loss"] - run["merged_loss"]) <= 1e-5 * abs(run["merged_loss"])
    assert max(run["merged_grad_rel_err"].values()) <= 1e-5, run["merged_grad_rel_err"]
    # The base really is quantised: the float base gives another loss.
    assert abs(run["float_loss"] - run["ref_loss"]) > 1e-4


def test_sharded_step_never_gathers_a_quantised_weight(sharded_run):
    """No collective in the compiled step has the shape of a quantised weight, its codes or their shards."""
    run = sharded_run["nf4-True"]
    assert run["weight_collectives"] == {name: [] for name in RULES}
    # Positive control: gathering the dequantised weights onto every device is seen for each of them.
    assert all(run["control_collectives"][name] for name in RULES), run["control_collectives"]


def test_a_rule_that_cuts_blocks_is_refused(sharded_run):
    """A last-axis split that does not hold whole quantisation blocks raises, naming the weight."""
    for case in sharded_run:
        error = sharded_run[case]["block_error"]
        assert "'down' is quantised with block_size=8" in error and "6 blocks per row" in error, error
        assert "into 4 shards" in error, error


if __name__ == "__main__":
    main()
