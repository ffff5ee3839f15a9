"""Block-wise quantisation (NF4 / int8, QLoRA) against NumPy references."""

import doctest
import inspect
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import _quantize as qmod
from lora_jax._quantize import (
    NF4_CODE,
    QuantizedArray,
    dequantize,
    dequantize_tree,
    is_quantized,
    nf4_code_from_normal,
    quantize,
    quantize_array,
)

# --- independent NumPy references -------------------------------------------------


def np_blocks(x, block_size):
    x = np.asarray(x, np.float32)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def np_nf4(x, block_size):
    """Nearest NF4 value per element by brute force (argmin of the distance)."""
    blocks = np_blocks(x, block_size)
    absmax = np.abs(blocks).max(axis=-1)
    normalised = blocks / np.where(absmax > 0, absmax, np.float32(1))[..., None]
    code = NF4_CODE.astype(np.float64)
    index = np.argmin(np.abs(normalised[..., None].astype(np.float64) - code), axis=-1).astype(np.uint8)
    index = index.reshape(np.shape(x))
    packed = (index[..., 0::2] << 4) | index[..., 1::2]
    values = (NF4_CODE[index].reshape(blocks.shape) * absmax[..., None]).reshape(np.shape(x))
    return packed, absmax, values


def np_int8(x, block_size):
    blocks = np_blocks(x, block_size)
    absmax = np.abs(blocks).max(axis=-1)
    normalised = blocks / np.where(absmax > 0, absmax, np.float32(1))[..., None]
    codes = np.clip(np.round(normalised * 127), -127, 127).astype(np.int8)
    values = codes.astype(np.float32) * (absmax / np.float32(127))[..., None]
    return codes.reshape(np.shape(x)), absmax, values.reshape(np.shape(x))


def relative_rmse(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact**2)))


def known_matrix(dtype):
    x = np.random.default_rng(0).normal(size=(6, 256)).astype(np.float32)
    x[1, 64:128] = 0.0  # a zero block
    x[2, :64] *= 1e-3  # a tiny block
    x[3, 128:192] = -np.abs(x[3, 128:192])  # a block whose absmax comes from a negative value
    return jnp.asarray(x, dtype)


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


# --- the NF4 code -----------------------------------------------------------------


def test_nf4_table_structure():
    assert NF4_CODE.shape == (16,) and NF4_CODE.dtype == np.float32
    assert np.all(np.diff(NF4_CODE) > 0)
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and (NF4_CODE == 0).sum() == 1
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0
    assert NF4_CODE[9] == np.float32(0.16093020141124725) and NF4_CODE[1] == np.float32(-0.6961928009986877)
    with pytest.raises(ValueError):
        NF4_CODE[0] = 0.0


def test_nf4_recomputed_from_normal_quantiles():
    code = nf4_code_from_normal()
    # The published table used a rounded delta (0.9677083) and float32: < 2e-7 apart.
    np.testing.assert_allclose(code, NF4_CODE, rtol=0, atol=2e-7)
    # Independently, through the CDF: un-normalised, the positive values sit at
    # evenly spaced probabilities from delta down to 0.5, the negative ones mirror
    # 7 evenly spaced probabilities.
    delta = 1 - (1 / 30 + 1 / 32) / 2
    top = NormalDist().inv_cdf(delta)
    cdf = np.array([NormalDist().cdf(c * top) for c in code])
    np.testing.assert_allclose(cdf[8:][::-1], np.linspace(delta, 0.5, 9)[:-1], atol=1e-12)
    np.testing.assert_allclose(1 - cdf[:7], np.linspace(delta, 0.5, 8)[:-1], atol=1e-12)
    assert cdf[7] == 0.5


# --- exactness against the references -------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block_size", [64, 32])
def test_nf4_matches_numpy_reference(dtype, block_size):
    x = known_matrix(dtype)
    q = quantize_array(x, "nf4", block_size=block_size)
    packed, absmax, values = np_nf4(np.asarray(x.astype(jnp.float32)), block_size)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (6, 128)
    assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (6, 256 // block_size)
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), values)
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), values.astype(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_matches_numpy_reference(dtype):
    x = known_matrix(dtype)
    q = quantize_array(x, "int8", block_size=64)
    codes, absmax, values = np_int8(np.asarray(x.astype(jnp.float32)), 64)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == x.shape
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    np.testing.assert_allclose(np.asarray(q.dequantize(jnp.float32)), values, rtol=1e-6, atol=0)
    assert q.dequantize().dtype == dtype


def test_nf4_ties_go_to_the_lower_code():
    # A value exactly halfway between two codes (in float32) maps to the lower one.
    mid = np.float32((NF4_CODE[8] + NF4_CODE[9]) / 2)
    x = np.zeros((1, 64), np.float32)
    x[0, 0], x[0, 1] = 1.0, mid
    index = np.asarray(quantize_array(jnp.asarray(x), block_size=64).codes)[0, 0] & 0xF
    assert index == 8


# --- error of each format on N(0, 1) ---------------------------------------------


def test_error_on_standard_normal():
    x = normal((512, 1024))
    nf4 = relative_rmse(quantize_array(x, "nf4", block_size=64).dequantize(), x)
    int8 = relative_rmse(quantize_array(x, "int8", block_size=64).dequantize(), x)
    # Measured: NF4 0.092, int8 0.0059. Round-to-nearest on a grid of step h
    # has RMS error h/sqrt(12); for int8, h = absmax/127 per block.
    absmax = np.abs(np_blocks(x, 64)).max(axis=-1)
    predicted_int8 = math.sqrt(np.mean(absmax**2) / np.mean(np.asarray(x) ** 2)) / 127 / math.sqrt(12)
    assert 0.9 * predicted_int8 < int8 < 1.1 * predicted_int8
    # NF4 puts its 16 levels at normal quantiles, so on normal data it beats a
    # uniform symmetric 4-bit grid (15 levels, -7..7) scaled the same way.
    blocks = np_blocks(x, 64)
    step = absmax[..., None] / 7
    uniform = relative_rmse((np.round(blocks / step) * step).reshape(x.shape), x)
    assert nf4 < 0.95 * uniform
    assert 0.085 < nf4 < 0.10


def test_int8_error_bound_per_element():
    x = normal((64, 512), seed=1) * 3.0
    q = quantize_array(x, "int8", block_size=128)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(x)).reshape(64, 4, 128)
    bound = np.asarray(q.absmax)[..., None] / 254
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)


def test_values_on_the_grid_round_trip_exactly():
    rng = np.random.default_rng(2)
    index = rng.integers(0, 16, size=(4, 128))
    index[:, ::64] = 15  # each block holds +absmax
    x = NF4_CODE[index] * np.float32(2.0)  # absmax 2: dividing by it is exact
    q = quantize_array(jnp.asarray(x), "nf4", block_size=64)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), x)

    ints = rng.integers(-127, 128, size=(4, 128)).astype(np.float32)
    ints[:, ::64] = 127  # absmax 127: the int8 step is 1
    for dtype in (jnp.float32, jnp.bfloat16):
        q = quantize_array(jnp.asarray(ints, dtype), "int8", block_size=64)
        np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), ints)


@pytest.mark.parametrize("format", ["nf4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_blocks_give_zeros(format, double_quant):
    x = jnp.zeros((4, 128), jnp.bfloat16).at[0, :64].set(1.5)
    out = np.asarray(quantize_array(x, format, block_size=64, double_quant=double_quant).dequantize(jnp.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1:], 0.0)
    np.testing.assert_array_equal(out[0, 64:], 0.0)
    np.testing.assert_allclose(out[0, :64], 1.5, rtol=0.02)


# --- double quantisation ----------------------------------------------------------


@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_double_quant(format):
    # 300 blocks per row: two second-level groups, the second one partial (44).
    x = normal((3, 64 * 300), seed=3) * jnp.linspace(0.1, 4.0, 64 * 300)
    plain = quantize_array(x, format, block_size=64)
    dq = quantize_array(x, format, block_size=64, double_quant=True)
    assert dq.double_quant and not plain.double_quant
    assert dq.absmax.dtype == jnp.int8 and dq.absmax.shape == (3, 300)
    assert dq.absmax_scale.shape == dq.absmax_mean.shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(dq.codes), np.asarray(plain.codes))

    true = np.asarray(plain.absmax)
    recovered = np.asarray(qmod._dequantize_absmax(dq))
    group_of_block = np.arange(300) // 256
    step = np.asarray(dq.absmax_scale)[:, group_of_block] / 127
    assert np.all(np.abs(recovered - true) <= step / 2 * (1 + 1e-4) + 1e-6)
    assert not np.array_equal(recovered, true)  # the test can tell the two apart

    # Reference for the second level: mean and max deviation per group.
    for g, sl in enumerate([slice(0, 256), slice(256, 300)]):
        np.testing.assert_allclose(np.asarray(dq.absmax_mean)[:, g], true[:, sl].mean(axis=1), rtol=1e-5)
        dev = np.abs(true[:, sl] - true[:, sl].mean(axis=1, keepdims=True)).max(axis=1)
        np.testing.assert_allclose(np.asarray(dq.absmax_scale)[:, g], dev, rtol=1e-5)

    assert dq.nbytes < plain.nbytes
    # Same codes, absmax off by at most half a step, and |code value| <= 1: each
    # value moves by at most half the second-level step of its block.
    moved = np.abs(np.asarray(dq.dequantize()) - np.asarray(plain.dequantize())).reshape(3, 300, 64)
    assert np.all(moved <= step[..., None] / 2 * (1 + 1e-4) + 1e-6)
    assert relative_rmse(dq.dequantize(), x) < relative_rmse(plain.dequantize(), x) * 1.2


@pytest.mark.parametrize("double_quant", [False, True])
def test_memory_of_a_bf16_matrix(double_quant):
    # Abstract evaluation: no 4M-element arrays are built.
    x = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)
    q = jax.eval_shape(lambda w: quantize_array(w, "nf4", block_size=64, double_quant=double_quant), x)
    n = 2048 * 2048
    if double_quant:
        # 0.5 B codes + 1 B int8 absmax per 64 + 8 B (scale, mean) per row group of 32 blocks.
        expected = n // 2 + n // 64 + 8 * 2048
    else:
        expected = n // 2 + 4 * (n // 64)  # 0.5 B + 4 B per 64 values = 0.5625 B/param
    assert q.nbytes == expected
    ratio = q.nbytes / (2 * n)  # bf16: 2 B/param
    assert ratio == pytest.approx(0.259766 if double_quant else 0.28125, abs=1e-6)
    assert ratio <= 0.3


# --- jit, pytree, slicing ---------------------------------------------------------


def test_pytree_leaves_and_jit_argument():
    x = normal((8, 128), seed=4)
    q = quantize_array(x, "nf4", block_size=64)
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 2 and leaves[0] is q.codes and leaves[1] is q.absmax
    assert len(jax.tree.leaves(quantize_array(x, double_quant=True))) == 4

    traces = []

    @jax.jit
    def f(q):
        traces.append(1)
        return q.dequantize() * 2

    eager = np.asarray(dequantize(q))
    np.testing.assert_array_equal(np.asarray(f(q)), eager * 2)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(q)), eager)
    f(quantize_array(normal((8, 128), seed=5), "nf4", block_size=64))
    assert len(traces) == 1  # same static metadata: no retrace
    # Quantising inside jit works too.
    jitted = jax.jit(lambda w: quantize_array(w, "int8", block_size=32))(x)
    np.testing.assert_array_equal(np.asarray(jitted.codes), np.asarray(quantize_array(x, "int8", block_size=32).codes))
    r = repr(q)
    assert "shape=(8, 128)" in r and "format=nf4" in r


@pytest.mark.parametrize("format,double_quant", [("nf4", False), ("nf4", True), ("int8", True)])
def test_slicing_a_stack_commutes(format, double_quant):
    stack = normal((3, 16, 128), seed=6)  # [L, in, out]
    q = quantize_array(stack, format, block_size=32, double_quant=double_quant)
    full = np.asarray(q.dequantize())
    layer = q.map_leading(lambda a: a[1])
    assert isinstance(layer, QuantizedArray) and layer.shape == (16, 128)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), full[1])
    # The same slice taken from the quantised layer alone.
    alone = quantize_array(stack[1], format, block_size=32, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(layer.codes), np.asarray(alone.codes))

    picked = jax.jit(lambda q, i: q.map_leading(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)))
    np.testing.assert_array_equal(np.asarray(picked(q, 2).dequantize()), full[2])
    # scan over the quantised stack hands one layer per step.
    _, per_layer = jax.lax.scan(lambda c, layer_q: (c, layer_q.dequantize()), None, q)
    np.testing.assert_array_equal(np.asarray(per_layer), full)

    with pytest.raises(ValueError, match="must keep the last axis"):
        q.map_leading(lambda a: a[..., :2])


# --- trees ------------------------------------------------------------------------


def make_tree():
    return {
        "layers": [
            {"kernel": normal((64, 128), seed=7), "bias": jnp.zeros(128), "norm": jnp.ones(128)},
            {"kernel": normal((64, 128), seed=8).astype(jnp.bfloat16), "bias": jnp.zeros(128)},
        ],
        "odd": normal((64, 100), seed=9),  # last axis not divisible by 64
        "small": normal((4, 64), seed=10),
        "ids": jnp.ones((64, 128), jnp.int32),
        "head": None,  # a leaf that trains in full (as lora_jax.split leaves it)
    }


def test_quantize_tree_defaults_and_min_size():
    tree = make_tree()
    q = quantize(tree, "nf4", min_size=1024)
    assert is_quantized(q["layers"][0]["kernel"]) and is_quantized(q["layers"][1]["kernel"])
    assert q["layers"][1]["kernel"].dtype == "bfloat16"
    for path in [("layers", 0, "bias"), ("layers", 0, "norm"), ("odd",), ("small",), ("ids",)]:
        leaf = q
        for k in path:
            leaf = leaf[k]
        orig = tree
        for k in path:
            orig = orig[k]
        assert leaf is orig, path
    assert q["head"] is None
    assert jax.tree.structure(q, is_leaf=is_quantized) == jax.tree.structure(tree, is_leaf=is_quantized)

    # min_size: the 256-element "small" leaf is quantised only below that threshold.
    assert is_quantized(quantize(tree, min_size=256)["small"])
    assert not is_quantized(quantize(tree, min_size=257)["small"])


def test_quantize_tree_default_min_size():
    tree = make_tree()
    q = quantize(tree)  # min_size=4096: the 64x128 kernels (8192) qualify, "small" (256) does not
    assert is_quantized(q["layers"][0]["kernel"]) and not is_quantized(q["small"])
    again = quantize(q)  # already quantised leaves are left alone
    assert again["layers"][0]["kernel"] is q["layers"][0]["kernel"]

    out = dequantize_tree(q)
    assert out["head"] is None and out["odd"] is tree["odd"]
    assert out["layers"][1]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out["layers"][0]["kernel"]), np.asarray(q["layers"][0]["kernel"].dequantize())
    )
    assert dequantize_tree(q, jnp.float32)["layers"][1]["kernel"].dtype == jnp.float32


def test_quantize_tree_include():
    tree = make_tree()
    q = quantize(tree, "int8", block_size=32, include=r"layers/0/.*", min_size=0)
    assert is_quantized(q["layers"][0]["kernel"]) and q["layers"][0]["kernel"].format == "int8"
    assert not is_quantized(q["layers"][1]["kernel"])
    assert q["layers"][0]["bias"] is tree["layers"][0]["bias"]  # 1-D: never quantised
    q = quantize(tree, include=[r"layers/1/kernel", r"small"], min_size=0)
    assert is_quantized(q["layers"][1]["kernel"]) and is_quantized(q["small"])
    assert not is_quantized(q["layers"][0]["kernel"])

    with pytest.raises(ValueError, match=r"'odd'.*size 100.*block_size=50"):
        quantize(tree, include="odd")
    with pytest.raises(ValueError, match=r"matches no leaf.*Nearest paths"):
        quantize(tree, include="layers/2/kernel")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        quantize(tree, include="layers/(")
    with pytest.raises(TypeError, match="`include` must be a regex"):
        quantize(tree, include=3)


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,kwargs,error,match",
    [
        (jnp.ones((4, 64), jnp.int32), {}, TypeError, "floating dtype.*int32"),
        ([[1.0] * 64], {}, TypeError, "must be a float array.*list"),
        (jnp.ones((4, 64)), {"format": "fp4"}, ValueError, r"`format` must be one of.*'fp4'"),
        (jnp.ones((4, 64)), {"block_size": 0}, ValueError, "`block_size` must be a positive integer"),
        (jnp.ones((4, 64)), {"block_size": 2.0}, ValueError, "`block_size` must be a positive integer"),
        (jnp.ones((4, 63)), {"block_size": 21}, ValueError, "must be even for format='nf4'"),
        (jnp.ones((4, 96)), {"block_size": 64}, ValueError, r"size 96.*block_size=64.*block_size=48"),
        (jnp.ones((4, 7)), {"block_size": 64}, ValueError, r"No even block_size divides 7.*format='int8'"),
        (jnp.float32(1.0), {}, ValueError, "scalar"),
        (jnp.ones((0, 64)), {}, ValueError, "empty"),
        (jnp.ones((4, 64)), {"double_quant": 1}, TypeError, "`double_quant` must be True or False"),
    ],
)
def test_quantize_array_errors(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_array(x, **kwargs)


def test_other_errors():
    q = quantize_array(jnp.ones((2, 64)))
    with pytest.raises(TypeError, match="must be a QuantizedArray"):
        dequantize(jnp.ones((2, 64)))
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        q.dequantize(jnp.int8)
    with pytest.raises(ValueError, match="`min_size` must be a non-negative integer"):
        quantize({"w": jnp.ones((2, 64))}, min_size=-1)
    with pytest.raises(ValueError, match="`block_size` must be even"):
        quantize({"w": jnp.ones((2, 64))}, block_size=3)
    q2 = quantize_array(jnp.ones((4, 2, 64)), double_quant=True)
    with pytest.raises(ValueError, match="gave codes the leading axes"):
        q2.map_leading(lambda a: a[0] if a.dtype == jnp.uint8 else a[:, 0])


# --- documentation ----------------------------------------------------------------


def test_public_names_documented_and_examples_run():
    for name in qmod.__all__:
        obj = getattr(qmod, name)
        if callable(obj):
            doc = inspect.getdoc(obj)
            assert doc and ">>>" in doc, name
    assert "NF4" in qmod.__doc__ or "nf4" in qmod.__doc__
    result = doctest.testmod(qmod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 10
