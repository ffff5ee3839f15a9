"""add_weighted / truncate against NumPy: W + Σ w_i·s_i·A_i@B_i, and the truncated SVD of the delta."""

import dataclasses
import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import arithmetic
from lora_jax.arithmetic import add_weighted, truncate

X = jnp.ones((3, 2, 8))


def _model(p):
    """A 2-D kernel, an nn.scan-like stack [L, in, out] used through an einsum, and a trained norm."""
    h = jnp.einsum("lbi,lio->lbo", X, p["stack"]).sum(0)
    return jnp.tanh(h @ p["v"]) * p["norm"] + (X[0] @ p["w2d"]).sum()


def _params():
    rng = np.random.default_rng(0)
    shapes = {"w2d": (8, 16), "stack": (3, 8, 16), "v": (16, 4)}
    return {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()} | {"norm": jnp.ones(4)}


def _randomize(adapters, seed):
    """Non-zero A *and* B (split starts B at zero), so a wrong combination cannot hide."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(adapters)
    return treedef.unflatten([jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) for x in leaves])


def _split(rank, alpha, seed, *, trace=True):
    spec = lora.LoraSpec(rank=rank, alpha=alpha, targets="w2d|stack|v", train="norm")
    frozen, adapters = lora.split(_params(), spec, key=jax.random.key(seed), trace=_model if trace else None)
    return frozen, _randomize(adapters, seed)


def _np_delta(f):
    """``s·A@B`` as NumPy float64 [P, in, out] for a LoraFactors (one matrix per stacked entry)."""
    a, b = np.asarray(f.lora_a, np.float64), np.asarray(f.lora_b, np.float64)
    ns, r = len(f.stack_axes), a.shape[-1]
    p = math.prod(a.shape[:ns])
    return f.scale * a.reshape(p, -1, r) @ b.reshape(p, r, -1)


def _np_weight_layout(d, f, shape):
    """A [P, in, out] delta put back in the weight's layout (for comparing with merged weights)."""
    perm = (*f.stack_axes, *f.a_axes, *f.b_axes)
    d = d.reshape(*(shape[i] for i in perm))
    return np.transpose(d, np.argsort(perm))


def test_add_weighted_merges_to_the_weighted_sum_of_deltas():
    frozen, a1 = _split(2, 4.0, 1)
    _, a2 = _split(3, 1.0, 2)
    _, a3 = _split(4, 8.0, 3)
    trees, weights = [a1, a2, a3], [0.7, -0.4, 1.5]
    params = _params()
    combined = add_weighted(trees, weights, base=params)
    merged = lora.merge(frozen, combined)
    for path in ("w2d", "stack", "v"):
        assert combined[path].rank == 2 + 3 + 4
        assert combined[path].scale == a1[path].scale
        want = np.asarray(params[path], np.float64) + sum(
            w * _np_weight_layout(_np_delta(t[path]), t[path], params[path].shape) for w, t in zip(weights, trees)
        )
        np.testing.assert_allclose(np.asarray(merged[path]), want, rtol=1e-5, atol=1e-4)
    # The fully trained leaf: task arithmetic on its values, base + Σ w_i·(x_i - base).
    base = np.asarray(params["norm"], np.float64)
    want_norm = base + sum(w * (np.asarray(t["norm"], np.float64) - base) for w, t in zip(weights, trees))
    np.testing.assert_allclose(np.asarray(merged["norm"]), want_norm, rtol=1e-6)
    # The stacked weight: each layer got its own combination, as the layout from the trace says.
    assert combined["stack"].stack_axes == (0,) and combined["stack"].lora_b.shape == (3, 9, 16)
    # The combined adapters run in the model like any other.
    out = _model(merged)
    assert out.shape == (2, 4) and bool(jnp.isfinite(out).all())


def test_add_weighted_average_without_base_and_identity():
    _, a1 = _split(2, 4.0, 1, trace=True)
    _, a2 = _split(2, 4.0, 2, trace=True)
    avg = add_weighted([a1, a2], [0.25, 0.75])
    np.testing.assert_allclose(np.asarray(avg["norm"]), 0.25 * np.asarray(a1["norm"]) + 0.75 * np.asarray(a2["norm"]))
    np.testing.assert_allclose(
        _np_delta(avg["w2d"]), 0.25 * _np_delta(a1["w2d"]) + 0.75 * _np_delta(a2["w2d"]), rtol=1e-5, atol=1e-5
    )
    # One tree with weight 1 comes back unchanged (equal scales: B is only multiplied by the weight).
    same = add_weighted([a1], [1.0])
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(a1)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_add_weighted_without_trace_and_mixed_dtypes():
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((6, 10)), jnp.float32)}
    frozen, a1 = lora.split(params, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(1))
    _, a2 = lora.split(params, lora.LoraSpec(rank=3, targets="w", dtype=jnp.bfloat16), key=jax.random.key(2))
    a1, a2 = _randomize(a1, 1), _randomize(a2, 2)
    combined = add_weighted([a1, a2], [1.0, 1.0])
    assert combined["w"].lora_a.dtype == jnp.float32 and combined["w"].rank == 5
    want = np.asarray(params["w"], np.float64) + _np_delta(a1["w"])[0] + _np_delta(a2["w"])[0]
    np.testing.assert_allclose(np.asarray(lora.merge(frozen, combined)["w"]), want, rtol=1e-5, atol=1e-5)


def _factors(layout, rank, seed, scale=0.7):
    """Random LoraFactors for (weight shape, stack, a_axes, b_axes)."""
    shape, stack, a_axes, b_axes = layout
    rng = np.random.default_rng(seed)
    a_shape = (*(shape[i] for i in stack), *(shape[i] for i in a_axes), rank)
    b_shape = (*(shape[i] for i in stack), rank, *(shape[i] for i in b_axes))
    return lora.LoraFactors(
        jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
        jnp.asarray(rng.standard_normal(b_shape), jnp.float32),
        scale,
        stack,
        a_axes,
        b_axes,
    )


LAYOUTS = {
    "dense": ((12, 10), (), (0,), (1,)),
    "stacked": ((3, 12, 10), (0,), (1,), (2,)),
    "dense-general": ((10, 3, 4), (), (0,), (1, 2)),
    "stack-in-middle": ((12, 2, 10), (1,), (0,), (2,)),
}


def _np_best(d, k):
    """NumPy's best rank-k approximation of each matrix of a [P, in, out] stack."""
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("k", [1, 3])
def test_truncate_is_the_best_low_rank_approximation(name, k):
    f = _factors(LAYOUTS[name], 6, seed=len(name) + k)
    small, errors = truncate({"layer": {"w": f}, "norm": jnp.ones(3)}, k)
    g = small["layer"]["w"]
    assert g.rank == k and g.lora_a.shape[:-1] == f.lora_a.shape[:-1]
    assert (g.scale, g.stack_axes, g.a_axes, g.b_axes) == (f.scale, f.stack_axes, f.a_axes, f.b_axes)
    d = _np_delta(f)
    best = _np_best(d, k)
    np.testing.assert_allclose(_np_delta(g), best, rtol=1e-4, atol=1e-4 * np.abs(d).max())
    want = np.linalg.norm(d - best) / np.linalg.norm(d)
    assert errors == {"layer/w": pytest.approx(want, rel=1e-4)}
    assert 0.05 < errors["layer/w"] < 1  # a real truncation, not a no-op
    # The singular values are split evenly between the new factors.
    a, b = np.asarray(g.lora_a, np.float64), np.asarray(g.lora_b, np.float64)
    p = d.shape[0]
    gram_a = np.swapaxes(a.reshape(p, -1, k), -1, -2) @ a.reshape(p, -1, k)
    gram_b = b.reshape(p, k, -1) @ np.swapaxes(b.reshape(p, k, -1), -1, -2)
    np.testing.assert_allclose(gram_a, gram_b, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(small["norm"]), np.ones(3))


def test_truncating_a_sum_that_shares_a_is_exact():
    layout = LAYOUTS["stacked"]
    f1 = _factors(layout, 4, seed=1, scale=2.0)
    f2 = _factors(layout, 4, seed=2, scale=0.5)
    shared = lora.LoraFactors(f1.lora_a, f2.lora_b, 0.5, *layout[1:])
    combined = add_weighted([{"w": f1}, {"w": shared}], [1.0, -2.0])
    assert combined["w"].rank == 8
    back, errors = truncate(combined, 4)
    assert back["w"].rank == 4 and errors["w"] < 1e-5, errors
    np.testing.assert_allclose(_np_delta(back["w"]), _np_delta(f1) - 2.0 * _np_delta(shared), rtol=1e-4, atol=1e-4)
    # Two independent rank-4 adapters really need rank 8: the same truncation is far from exact.
    _, errors = truncate(add_weighted([{"w": f1}, {"w": f2}], [1.0, -2.0]), 4)
    assert errors["w"] > 0.1, errors


def test_truncate_keeps_small_adapters_and_zero_deltas():
    def tree(rank, seed):  # B = 0, as split makes it
        f = _factors(LAYOUTS["dense"], rank, seed)
        return {"w2d": f, "v": dataclasses.replace(f, lora_b=jnp.zeros_like(f.lora_b))}

    fresh, big = tree(2, 1), tree(6, 2)
    kept, errors = truncate(fresh, 4)
    assert kept["w2d"] is fresh["w2d"] and errors == {"w2d": 0.0, "v": 0.0}
    small, errors = truncate(big, 3)  # B = 0 as split made it: the delta is zero, and so is the error
    assert small["v"].rank == 3 and errors["v"] == 0.0 and errors["w2d"] > 0
    np.testing.assert_array_equal(np.asarray(small["v"].delta()), 0.0)


def test_truncate_rank_above_the_delta_rank_pads_with_zeros():
    f = _factors(((4, 16), (), (0,), (1,)), 8, seed=3)  # the delta has rank <= 4
    out, errors = truncate({"w": f}, 6)
    assert out["w"].rank == 6 and errors["w"] < 1e-6
    np.testing.assert_allclose(_np_delta(out["w"]), _np_delta(f), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out["w"].lora_a[:, 4:]), 0.0)


def test_truncate_rank_patterns_jit_and_dtype():
    tree = {
        "attn": {"wq": _factors(LAYOUTS["dense"], 6, 1), "wk": _factors(LAYOUTS["dense"], 6, 2)},
        "mlp": _factors(LAYOUTS["stacked"], 6, 3),
    }
    out, errors = truncate(tree, {r"attn/wq": 2, r"attn/.*": 3})  # first match wins; mlp is kept
    assert (out["attn"]["wq"].rank, out["attn"]["wk"].rank, out["mlp"].rank) == (2, 3, 6)
    assert errors["mlp"] == 0.0 and errors["attn/wq"] > errors["attn/wk"] > 0
    jitted = jax.jit(lambda t: truncate(t, 2, return_error=False))(tree)
    eager, _ = truncate(tree, 2)
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
    out, _ = truncate(half, 2)
    assert out["mlp"].lora_a.dtype == out["mlp"].lora_b.dtype == jnp.bfloat16


def _f(shape_a, shape_b, **kw):
    return lora.LoraFactors(jnp.ones(shape_a), jnp.ones(shape_b), **kw)


@pytest.mark.parametrize(
    "trees, weights, kw, error, match",
    [
        ([], [], {}, ValueError, r"`adapters_list` is empty"),
        ({"w": _f((4, 2), (2, 3))}, [1.0], {}, TypeError, r"must be a list of adapter trees; got dict.*\[adapters\]"),
        ([{"w": _f((4, 2), (2, 3))}], [1.0, 2.0], {}, ValueError, r"got 1 adapter trees but 2 weights"),
        ([{"w": _f((4, 2), (2, 3))}], ["a"], {}, TypeError, r"weights\[0\] must be a number"),
        ([{"w": _f((4, 2), (2, 3))}], [float("nan")], {}, ValueError, r"weights\[0\] is nan"),
        ([{"w": _f((4, 2), (2, 3))}, [1]], [1.0, 1.0], {}, TypeError, r"adapters_list\[1\] must be an adapter tree"),
        ([{"w": jnp.ones(3)}], [1.0], {}, ValueError, r"adapters_list\[0\] holds no LoraFactors"),
        (
            [{"w": _f((4, 2), (2, 3)), "x": _f((4, 2), (2, 3))}, {"w": _f((4, 2), (2, 3))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"different paths: 'x' is in adapters_list\[0\] but not in adapters_list\[1\]",
        ),
        (
            [{"w": _f((4, 2), (2, 3))}, {"w": _f((4, 2), (2, 3)), "y": _f((4, 2), (2, 3))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"'y' is in adapters_list\[1\] but not in adapters_list\[0\]",
        ),
        (
            [{"w": _f((4, 2), (2, 3))}, {"w": _f((5, 2), (2, 3))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"at 'w' have incompatible layouts: adapters_list\[0\] has lora_a \(4, 2\).*"
            r"adapters_list\[1\] has lora_a \(5, 2\)",
        ),
        (
            [{"w": _f((4, 2), (2, 3))}, {"w": _f((4, 2), (2, 3), a_axes=(1,), b_axes=(0,))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"incompatible layouts.*a_axes=\(1,\)",
        ),
        (
            [{"w": _f((4, 2), (2, 3)), "n": jnp.ones(3)}, {"w": _f((4, 2), (2, 3)), "n": _f((4, 2), (2, 3))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"at 'n', adapters_list\[0\] holds a plain array",
        ),
        (
            [{"a": _f((4, 2), (2, 3)), "z": jnp.ones(3)}, {"a": jnp.ones(3), "z": _f((4, 2), (2, 3))}],
            [1.0, 1.0],
            {},
            ValueError,
            r"at 'a', adapters_list\[0\] holds LoraFactors but adapters_list\[1\]",
        ),
        (
            [{"w": _f((4, 2), (2, 3)), "n": jnp.ones(3)}, {"w": _f((4, 2), (2, 3)), "n": jnp.ones(4)}],
            [0.5, 0.5],
            {},
            ValueError,
            r"'n' has shape \(3,\) in adapters_list\[0\] but \(4,\)",
        ),
        (
            [{"w": _f((4, 2), (2, 3)), "n": jnp.ones(3)}] * 2,
            [1.0, 1.0],
            {},
            ValueError,
            r"'n' trains in full.*summing to 2 instead of 1.*Pass base=",
        ),
        (
            [{"w": _f((4, 2), (2, 3)), "n": jnp.ones(3)}] * 2,
            [1.0, 1.0],
            {"base": {"w": jnp.ones((4, 3))}},
            ValueError,
            r"`base` has no leaf at 'n'",
        ),
        (
            [{"w": _f((4, 2), (2, 3), scale=0.0)}],
            [1.0],
            {},
            ValueError,
            r"'w' in adapters_list\[0\] has scale 0",
        ),
    ],
)
def test_add_weighted_errors(trees, weights, kw, error, match):
    with pytest.raises(error, match=match):
        add_weighted(trees, weights, **kw)


@pytest.mark.parametrize(
    "adapters, rank, error, match",
    [
        ({"w": _f((4, 3), (3, 5))}, 0, ValueError, r"`rank` must be at least 1; got 0"),
        ({"w": _f((4, 3), (3, 5))}, 2.0, TypeError, r"`rank` must be an integer rank; got float"),
        ({"w": _f((4, 3), (3, 5))}, {"(": 2}, ValueError, r"rank key '\(' is not a valid regular expression"),
        ({"w": _f((4, 3), (3, 5))}, {"v": 2}, ValueError, r"rank pattern 'v' matches no adapter.*\['w'\]"),
        ({"w": _f((4, 3), (3, 5))}, {"w": -1}, ValueError, r"rank\['w'\] must be at least 1"),
        ({"w": _f((4, 3), (3, 5))}, {1: 2}, TypeError, r"keys of `rank` must be regex strings"),
        (_f((4, 3), (3, 5)), 2, TypeError, r"`adapters` must be an adapter tree .* got LoraFactors"),
        ({"w": jnp.ones((4, 5))}, 2, ValueError, r"`adapters` holds no LoraFactors"),
        ({"w": _f((4, 3), (3, 5), scale=0.0)}, 2, ValueError, r"'w' has scale 0"),
    ],
)
def test_truncate_errors(adapters, rank, error, match):
    with pytest.raises(error, match=match):
        truncate(adapters, rank)


def test_docstring_examples():
    result = doctest.testmod(arithmetic, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_dora_adapters_are_refused():
    params = {"w": jnp.ones((8, 6))}
    _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w", use_dora=True), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"DoRA adapters .* at \['w'\]"):
        add_weighted([adapters, adapters], [0.5, 0.5])
    with pytest.raises(ValueError, match="DoRA adapters"):
        truncate(adapters, 1)
