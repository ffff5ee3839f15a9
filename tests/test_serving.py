"""`lora_jax.serving`: many adapters in one batch, checked against each example run alone."""

import dataclasses
import doctest
import functools
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

import lora_jax as lora
from lora_jax import serving
from lora_jax.models import LlamaConfig, LlamaForCausalLM, unstack_layers
from lora_jax.serving import StackedAdapters, stack_adapters, wrap_many

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = np.array([0, 2, -1, 1, 2], np.int32)
SEQ = 7  # no activation shape collides with a projection's (in, out)
RANKS = (2, 4, 8)
ALPHAS = (4.0, 1.0, 32.0)


def _config(scan_layers: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        scan_layers=scan_layers,
    )


def _with_random_b(adapters, seed, std=0.2):
    """The adapters with a non-zero B, so each one changes the model and the tests can fail."""
    rng = np.random.default_rng(seed)  # NumPy, not one small compiled program per factor shape

    def fill(f):
        return dataclasses.replace(f, lora_b=jnp.asarray(std * rng.standard_normal(f.lora_b.shape), f.lora_b.dtype))

    return jax.tree.map(fill, adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))


def _cut(adapters, rank, alpha, seed):
    """A rank-``rank`` adapter with a random non-zero B, cut from a larger one (as split would make it)."""

    def cut(f):
        return dataclasses.replace(f, lora_a=jnp.asarray(np.asarray(f.lora_a)[..., :rank]), scale=alpha / rank)

    cut_tree = jax.tree.map(cut, adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))
    return _with_random_b(_with_rank_b(cut_tree, rank), 100 + seed)


def _with_rank_b(adapters, rank):
    def shape_b(f):
        shape = list(f.lora_b.shape)
        shape[len(f.stack_axes)] = rank
        return dataclasses.replace(f, lora_b=np.zeros(shape, f.lora_b.dtype))

    return jax.tree.map(shape_b, adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))


@functools.cache
def _llama(scan_layers: bool):
    """A tiny Llama, 3 adapters of ranks 2, 4, 8 with different alphas, a batch, and per-example references."""
    model = LlamaForCausalLM(_config(scan_layers))
    x = jax.random.randint(jax.random.key(0), (len(IDS), SEQ), 0, 64)
    params, full = _scan_split()
    frozen = params
    if not scan_layers:  # the same weights and factors, one layer per entry
        params = frozen = jax.tree.map(jnp.asarray, unstack_layers(jax.tree.map(np.asarray, params)))
        full = _unstack_factors(full)
    adapters = [_cut(full, r, a, i) for i, (r, a) in enumerate(zip(RANKS, ALPHAS))]
    apply = jax.jit(model.apply)
    # References: each adapter through lora.wrap, and each example alone through its merged model.
    base = np.asarray(apply(params, x))
    wrapped = [lora.wrap(model.apply)(frozen, ad, x) for ad in adapters] + [base]
    wrapped = np.stack([np.asarray(wrapped[i][b]) for b, i in enumerate(IDS)])
    merged_params = [lora.merge(frozen, ad) for ad in adapters] + [params]
    merged = np.stack([np.asarray(apply(merged_params[i], x[b : b + 1])[0]) for b, i in enumerate(IDS)])
    return model, params, frozen, adapters, x, full, (wrapped, merged, base, apply)


@functools.cache
def _served(scan_layers: bool):
    """One jitted serving function per layout, shared by the tests: every call must reuse its one program."""
    return jax.jit(wrap_many(_llama(scan_layers)[0].apply))


@functools.cache
def _scan_split():
    """Params of the scanned model and rank-8 factors of all its linear weights (``frozen`` is ``params``)."""
    model = LlamaForCausalLM(_config(True))
    ids = jnp.zeros((1, SEQ), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), ids)
    spec = lora.LoraSpec(rank=max(RANKS), targets="all-linear")
    frozen, full = lora.split(params, spec, key=jax.random.key(2), trace=lambda p: model.apply(p, ids))
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, frozen, params))
    return params, full


def _unstack_factors(adapters):
    """Factors of ``[layers, in, out]`` weights as per-layer factors of ``[in, out]`` ones."""
    host = jax.tree.map(np.asarray, adapters)
    per_layer = unstack_layers(host)  # slices every factor's leading (layer) axis
    return jax.tree.map(
        lambda f: dataclasses.replace(
            f, lora_a=jnp.asarray(f.lora_a), lora_b=jnp.asarray(f.lora_b), stack_axes=(), a_axes=(0,), b_axes=(1,)
        ),
        per_layer,
        is_leaf=lambda x: isinstance(x, lora.LoraFactors),
    )


LAYOUTS = pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])


@pytest.mark.parametrize(
    "scan_layers,jit", [(True, True), (True, False), (False, True)], ids=["scan-jit", "scan-eager", "unrolled-jit"]
)
def test_batch_of_adapters_matches_each_example_alone(scan_layers, jit):
    model, _, frozen, adapters, x, _, (wrapped, merged, base, _) = _llama(scan_layers)
    served = _served(scan_layers) if jit else wrap_many(model.apply)
    out = np.asarray(served(frozen, stack_adapters(adapters), jnp.asarray(IDS), x))
    np.testing.assert_allclose(out, wrapped, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, merged, atol=1e-5, rtol=1e-5)
    for b, i in enumerate(IDS):  # every adapter moves its rows away from the base model
        assert (np.abs(out[b] - base[b]).max() > 1e-2) == (i != -1)


def test_padding_and_scale_folding_keep_each_delta():
    _, _, frozen, adapters, *_ = _llama(True)
    stacked = stack_adapters(adapters, rank=10)
    for i, ad in enumerate(adapters):
        got = lora.merge(frozen, jax.tree.map(lambda x, i=i: x[i], stacked.adapters))
        want = lora.merge(frozen, ad)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)
    zero = lora.merge(frozen, jax.tree.map(lambda x: x[-1], stacked.adapters))
    jax.tree.map(np.testing.assert_array_equal, zero, frozen)
    for f in jax.tree.leaves(stacked.adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors)):
        assert (f.scale, f.lora_a.shape[0], f.rank, f.lora_b.shape[len(f.stack_axes) + 1]) == (1.0, 4, 10, 10)


def test_swapping_an_adapter_reuses_the_compiled_call():
    _, _, frozen, adapters, x, full, (*_, apply) = _llama(True)
    other = _cut(full, 3, 7.0, seed=9)  # rank 3 and another alpha in place of adapter 1
    before = stack_adapters(adapters, rank=8)
    after = stack_adapters([adapters[0], other, adapters[2]], rank=8)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert [jax.typeof(a) for a in jax.tree.leaves(before)] == [jax.typeof(a) for a in jax.tree.leaves(after)]

    served = _served(True)
    ids = jnp.asarray(IDS)
    out_before = np.asarray(served(frozen, before, ids, x))
    out_after = np.asarray(served(frozen, after, ids, x))
    assert served._cache_size() == 1
    uses_1 = IDS == 1
    np.testing.assert_array_equal(out_after[~uses_1], out_before[~uses_1])
    assert np.abs(out_after[uses_1] - out_before[uses_1]).max() > 1e-2
    (b,) = np.flatnonzero(uses_1)
    np.testing.assert_allclose(out_after[b], apply(lora.merge(frozen, other), x[b : b + 1])[0], atol=1e-5)


def _all_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    shapes += _all_shapes(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    shapes += _all_shapes(sub)
    return shapes


def _merged_weights(shapes, frozen, adapters, leading) -> list[tuple[int, ...]]:
    """Intermediates shaped like an adapted weight ``[in, out]`` (or ``[out, in]``) with a batch or adapter axis."""
    frozen_leaves = {path: w for path, _, w in lora._tree._flatten(frozen)[0]}
    weights = set()
    for path, f in lora._tree.adapter_entries(adapters).items():
        w = frozen_leaves[path]
        io = (w.shape[f.a_axes[0]], w.shape[f.b_axes[0]])
        weights |= {io, io[::-1]}
    return [s for s in shapes if len(s) >= 3 and s[-2:] in weights and set(s[:-2]) & set(leading)]


@LAYOUTS
def test_no_merged_weight_is_formed(scan_layers):
    model, _, frozen, adapters, x, *_ = _llama(scan_layers)
    stacked = stack_adapters(adapters)
    ids = jnp.asarray(IDS)
    leading = (len(IDS), len(adapters) + 1)
    program = jax.make_jaxpr(jax.jit(wrap_many(model.apply, strict=True)))(frozen, stacked, ids, x)
    assert _merged_weights(_all_shapes(program.jaxpr), frozen, adapters[0], leading) == []

    # The detector does see merged weights: the naive way forms one per example.
    def naive(frozen, stacked, ids, x):
        per_example = jax.tree.map(lambda a: a[ids], stacked.adapters)
        return jax.vmap(lambda ad, xb: model.apply(lora.merge(frozen, ad), xb[None])[0])(per_example, x)

    program = jax.make_jaxpr(naive)(frozen, stacked, ids, x)
    assert _merged_weights(_all_shapes(program.jaxpr), frozen, adapters[0], leading)


# -- a small function for the options and the errors ------------------------------------------------


def _dense(p, x, bias=None):
    y = x @ p["w"]
    return y if bias is None else y + bias


@pytest.fixture(scope="module")
def small():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4))}
    made = [
        lora.split(params, lora.LoraSpec(rank=r, alpha=a, targets="w"), key=jax.random.key(r))
        for r, a in ((1, 2.0), (2, 5.0))
    ]
    adapters = [_with_random_b(ad, i) for i, (_, ad) in enumerate(made)]
    return params, made[0][0], adapters


def test_shared_argument_and_keyword_axes(small):
    params, frozen, adapters = small
    stacked = stack_adapters(adapters)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    bias = jnp.arange(4.0)
    ids = jnp.array([1, -1, 0, 1])
    by_position = jax.jit(wrap_many(_dense, in_axes=(0, None)))(frozen, stacked, ids, x, bias)
    by_keyword = jax.jit(wrap_many(_dense, kwargs_axes={"bias": None}))(frozen, stacked, ids, x, bias=bias)

    def with_count(p, x, count):  # an output shared by all examples, like a KV cache's index
        return x @ p["w"], count + 1

    y, count = wrap_many(with_count, in_axes=(0, None), out_axes=(0, None))(frozen, stacked, ids, x, jnp.int32(3))
    assert int(count) == 4
    for b, i in enumerate(np.asarray(ids)):
        w = params["w"] if i == -1 else lora.merge(frozen, adapters[i])["w"]
        np.testing.assert_allclose(by_position[b], x[b] @ w + bias, atol=1e-5)
        np.testing.assert_allclose(by_keyword[b], x[b] @ w + bias, atol=1e-5)
        np.testing.assert_allclose(y[b], x[b] @ w, atol=1e-5)


def test_out_of_range_ids_under_jit_give_nan_rows_only(small):
    _, frozen, adapters = small
    x = jnp.ones((4, 3))
    out = np.asarray(jax.jit(wrap_many(_dense))(frozen, stack_adapters(adapters), jnp.array([0, 2, -2, -1]), x))
    assert np.isfinite(out[[0, 3]]).all() and np.isnan(out[[1, 2]]).all()


def _factors(a_shape, b_shape, dtype=jnp.float32):
    return {"w": lora.LoraFactors(jnp.ones(a_shape, dtype), jnp.ones(b_shape, dtype))}


@pytest.mark.parametrize(
    "adapters_list,kwargs,error,match",
    [
        ([], {}, ValueError, "non-empty list"),
        (_factors((3, 1), (1, 4)), {}, ValueError, "non-empty list of adapter trees"),
        ([jnp.ones(3)], {}, TypeError, r"adapters_list\[0\].*must be the adapter tree"),
        ([_factors((3, 1), (1, 4)), {"v": _factors((3, 1), (1, 4))["w"]}], {}, ValueError, r"\[1\].*lacks \['w'\]"),
        ([_factors((3, 1), (1, 4)), _factors((5, 1), (1, 4))], {}, ValueError, r"\[1\] at 'w' has lora_a \(5, 1\)"),
        ([_factors((3, 1), (1, 4)), _factors((3, 2), (2, 4), jnp.bfloat16)], {}, ValueError, "dtype bfloat16"),
        ([{"w": jnp.ones((3, 4))}], {}, ValueError, "fully trained array at 'w'"),
        ([{"w": lora.LoraFactors(jnp.ones((3, 1)), jnp.ones((1, 4)), magnitude=jnp.ones(4))}], {}, ValueError, "DoRA"),
        ([_factors((3, 1), (1, 4)), _factors((3, 2), (2, 4))], {"rank": 1}, ValueError, r"rank 2 at 'w'.*rank=1"),
        ([_factors((3, 1), (1, 4))], {"rank": 0}, ValueError, "must be >= 1"),
        ([_factors((3, 1), (1, 4))], {"rank": 2.0}, TypeError, "must be an int"),
    ],
)
def test_stack_adapters_errors(adapters_list, kwargs, error, match):
    with pytest.raises(error, match=match):
        stack_adapters(adapters_list, **kwargs)


def test_wrap_many_errors(small):
    _, frozen, adapters = small
    stacked = stack_adapters(adapters)
    served = wrap_many(_dense)
    x = jnp.ones((3, 3))
    with pytest.raises(TypeError, match="`apply_fn` must be callable"):
        wrap_many(None)
    with pytest.raises(TypeError, match="must be the StackedAdapters"):
        served(frozen, adapters[0], jnp.array([0, 0, 0]), x)
    with pytest.raises(TypeError, match="integer array"):
        served(frozen, stacked, jnp.array([0.0, 1.0, 0.0]), x)
    with pytest.raises(ValueError, match=r"must be 1-D.*\(3, 1\)"):
        served(frozen, stacked, jnp.zeros((3, 1), jnp.int32), x)
    with pytest.raises(ValueError, match="has 2 entries.*size 3"):
        served(frozen, stacked, jnp.array([0, 1]), x)
    with pytest.raises(ValueError, match=r"\[-2, 2\], out of range.*2 adapters"):
        served(frozen, stacked, np.array([2, -2, 0]), x)
    with pytest.raises(ValueError, match="not a pytree prefix"):
        wrap_many(_dense, in_axes=(0, None, None))(frozen, stacked, [0, 1, 0], x, jnp.ones(4))
    with pytest.raises(TypeError, match="ints or None"):
        wrap_many(_dense, in_axes="0")(frozen, stacked, [0, 1, 0], x)
    with pytest.raises(ValueError, match="should have size 1"):
        wrap_many(_dense, out_axes=1)(frozen, stacked, [0, 1, 0], x)
    with pytest.raises(ValueError, match="do not belong to these frozen params"):
        served({"w": jnp.ones((5, 4))}, stacked, [0, 1, 0], jnp.ones((3, 5)))


def test_public_names_documented_and_doctests_pass():
    for name in serving.__all__:
        obj = getattr(serving, name)
        if not isinstance(obj, int):
            assert obj.__doc__ and (">>>" in obj.__doc__ or isinstance(obj, type))
    assert isinstance(stack_adapters([_factors((3, 1), (1, 4))]), StackedAdapters)
    result = doctest.testmod(serving, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_example_smoke():
    path = ROOT / "examples" / "multi_adapter_serving.py"
    old = sys.argv
    sys.argv = [str(path), "--smoke"]
    try:
        result = runpy.run_path(str(path), run_name="not_main")["main"](["--smoke"])
    finally:
        sys.argv = old
    # Each row matches its adapter run alone, in logits and in tokens generated with a KV cache.
    assert result["max_abs_diff"] < 1e-4 and result["same_tokens"]
    scores = result["scores"]  # [adapter row, colour]
    assert np.abs(scores[:3] - scores[3]).min() > 1e-2  # every adapter moves every score off the base model
