"""split / merge / wrap against an independent reference: apply(merge(...))."""

import dataclasses
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lora
from tests import _models as M

KEY = jax.random.key(0)


def _randomize(adapters, key=KEY, scale=0.2):
    """Non-zero A *and* B, so that a wrong delta cannot hide behind B = 0."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [(jax.random.normal(k, x.shape, jnp.float32) * scale).astype(x.dtype) for k, x in zip(keys, leaves)]
    )


def _case(name):
    k1, k2 = jax.random.split(jax.random.key(hash(name) % 2**31))
    if name == "dict-mlp":
        params = {"w1": jax.random.normal(k1, (6, 12)), "w2": jax.random.normal(k2, (12, 3)), "b": jnp.ones(3)}
        fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]
        return fn, params, (jax.random.normal(k2, (5, 6)),), lora.LoraSpec(rank=3, targets="w."), False
    if name == "layer-list":
        params = {"layers": [{"wq": jax.random.normal(k, (8, 8)) * 0.3, "b": jnp.zeros(8)} for k in (k1, k2)]}
        return M.layer_list_fn, params, (jnp.ones((2, 8)),), lora.LoraSpec(rank=2, targets=r"layers/\d+/wq"), False
    if name == "linen-mlp":
        m, x = M.MLP(), jax.random.normal(k1, (4, 10))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=4), False
    if name == "conv":
        m, x = M.ConvNet(), jax.random.normal(k1, (2, 9, 9, 3))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=2, targets=".*kernel"), True
    if name == "tied-embed":
        m, ids = M.TiedLM(), jnp.array([[1, 4, 9], [0, 49, 7]])
        return m.apply, m.init(k2, ids), (ids,), lora.LoraSpec(rank=4, targets=".*(embedding|kernel)"), True
    if name == "dense-general":
        m, x = M.Attention(), jax.random.normal(k1, (2, 5, 12))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=4, targets="all-linear"), True
    if name == "einsum":
        m, x = M.EinsumNet(), jax.random.normal(k1, (3, 7))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=2, targets=".*w_(in|out)"), True
    if name in ("scan", "scan-remat"):
        m, x = M.ScanStack(remat=name == "scan-remat"), jax.random.normal(k1, (2, 4, 16))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=4, targets=".*layers/(up|down)/kernel"), True
    if name == "remat":
        m, x = M.RematMLP(), jax.random.normal(k1, (3, 5))
        return m.apply, m.init(k2, x), (x,), lora.LoraSpec(rank=2, targets=".*kernel"), True
    if name == "control-flow":
        params, x = M.control_flow_params(k1), jax.random.normal(k2, (3, 6))
        return M.control_flow_fn, params, (x,), lora.LoraSpec(rank=2, targets="all-linear"), True
    if name == "batched-einsum":
        params = {"stack": jax.random.normal(k1, (3, 8, 5)) * 0.3}
        fn = lambda p, x: jnp.einsum("lbi,lio->lbo", x, p["stack"])
        return fn, params, (jax.random.normal(k2, (3, 2, 8)),), lora.LoraSpec(rank=2, targets="stack"), True
    if name == "reshaped-heads":
        params = {"wq": jax.random.normal(k1, (8, 16)) * 0.3, "wo": jax.random.normal(k2, (16, 8)) * 0.3}
        spec = lora.LoraSpec(rank=2, targets="w.")
        return M.reshaped_heads_fn, params, (jax.random.normal(k2, (3, 8)),), spec, True
    if name == "torch-layout":
        params = {"w": jax.random.normal(k1, (8, 8)) * 0.3, "o": jax.random.normal(k2, (5, 2, 4)) * 0.3}
        spec = lora.LoraSpec(rank=2, targets="w|o")
        return M.torch_layout_fn, params, (jax.random.normal(k2, (3, 8)),), spec, True
    if name == "stacked-loop":
        params = {"stack": jax.random.normal(k1, (3, 8, 8)) * 0.3}
        return M.stacked_loop_fn, params, (jnp.ones((2, 8)),), lora.LoraSpec(rank=2, targets="stack"), True
    raise KeyError(name)


CASES = [
    "dict-mlp",
    "layer-list",
    "linen-mlp",
    "conv",
    "tied-embed",
    "dense-general",
    "einsum",
    "scan",
    "scan-remat",
    "remat",
    "control-flow",
    "stacked-loop",
    "batched-einsum",
    "reshaped-heads",
    "torch-layout",
]


def _split(name, key=KEY):
    fn, params, args, spec, traced = _case(name)
    trace = (lambda p: fn(p, *args)) if traced else None
    frozen, adapters = lora.split(params, spec, key=key, trace=trace)
    return fn, params, args, frozen, adapters


# wrap compiles its own evaluation, so eager calls differ from jitted ones only
# in the reference; a few eager cases keep that path covered.
EAGER = ["dict-mlp", "tied-embed", "scan", "control-flow"]


@pytest.mark.parametrize(
    "name,jit",
    [(n, True) for n in CASES] + [(n, False) for n in EAGER],
    ids=lambda v: {True: "jit", False: "eager"}.get(v, v),
)
def test_wrap_matches_merge_and_gradients(name, jit):
    fn, params, args, frozen, adapters = _split(name)
    wrapped = lora.wrap(fn, strict=True)
    if jit:
        # At init B = 0, so wrap is exactly the base model and merge gives back the params.
        # wrap compiles its evaluation, so compare with the compiled base model.
        np.testing.assert_array_equal(wrapped(frozen, adapters, *args), jax.jit(fn)(params, *args))
        for a, b in zip(jax.tree.leaves(lora.merge(frozen, adapters)), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)
    adapters = _randomize(adapters)

    def loss_lora(ad):
        return jnp.sum(jnp.sin(wrapped(frozen, ad, *args)))

    def loss_ref(ad):
        return jnp.sum(jnp.sin(fn(lora.merge(frozen, ad), *args)))

    grad_lora, grad_ref = jax.value_and_grad(loss_lora), jax.value_and_grad(loss_ref)
    if jit:
        grad_lora, grad_ref = jax.jit(grad_lora), jax.jit(grad_ref)
    out = wrapped(frozen, adapters, *args)
    ref = fn(lora.merge(frozen, adapters), *args)
    assert not np.allclose(ref, fn(params, *args), atol=1e-3), "the adapters must change the output"
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    (v1, g1), (v2, g2) = grad_lora(adapters), grad_ref(adapters)
    np.testing.assert_allclose(v1, v2, rtol=2e-5, atol=2e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * np.abs(b).max())


def test_while_loop_forward_and_jvp():
    params = {"u": jax.random.normal(KEY, (6, 6)) * 0.5}
    x = jnp.ones((2, 6))
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="u"), key=KEY, trace=lambda p: M.while_fn(p, x))
    adapters = _randomize(adapters)
    tangent = _randomize(adapters, jax.random.key(1))
    wrapped = jax.jit(lambda ad: lora.wrap(M.while_fn, strict=True)(frozen, ad, x))
    ref = lambda ad: M.while_fn(lora.merge(frozen, ad), x)
    (y1, t1), (y2, t2) = jax.jvp(wrapped, (adapters,), (tangent,)), jax.jvp(ref, (adapters,), (tangent,))
    np.testing.assert_allclose(y1, y2, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(t1, t2, rtol=2e-4, atol=2e-6)


def test_layouts_read_from_trace():
    shapes = {}
    for name in ["conv", "tied-embed", "dense-general", "einsum", "scan"]:
        *_, adapters = _split(name)
        for path, f in lora._tree.adapter_entries(adapters).items():
            shapes[path] = (f.lora_a.shape, f.lora_b.shape, f.stack_axes)
    assert shapes["params/Conv_0/kernel"] == ((3, 3, 3, 2), (2, 8), ())
    assert shapes["params/Embed_0/embedding"] == ((50, 4), (4, 16), ())  # rows of A are gathered
    assert shapes["params/query/kernel"] == ((12, 4), (4, 4, 8), ())  # [D, H, hd]
    assert shapes["params/out/kernel"] == ((4, 8, 4), (4, 12), ())  # [H, hd, D]
    assert shapes["params/w_out"] == ((8, 3, 2), (2, 5), ())
    assert shapes["params/layers/up/kernel"] == ((3, 16, 4), (3, 4, 64), (0,))  # one adapter per layer
    *_, adapters = _split("torch-layout")
    # W is [out, in]: A takes W's axis 1, B its axis 0; the [d, heads, hd] projection contracts (heads, hd).
    assert (adapters["w"].lora_a.shape, adapters["w"].a_axes, adapters["w"].b_axes) == ((8, 2), (1,), (0,))
    assert (adapters["o"].lora_a.shape, adapters["o"].lora_b.shape) == ((2, 4, 2), (2, 5))
    assert (adapters["o"].a_axes, adapters["o"].b_axes) == ((1, 2), (0,))
    *_, adapters = _split("reshaped-heads")
    assert adapters["wq"].lora_a.shape == (8, 2) and adapters["wq"].lora_b.shape == (2, 16)  # [D, H*hd]
    assert adapters["wo"].lora_a.shape == (16, 2) and adapters["wo"].lora_b.shape == (2, 8)  # [H*hd, D]


def test_scan_layers_are_independent():
    fn, params, args, frozen, adapters = _split("scan")
    adapters = _randomize(adapters)
    g = jax.grad(lambda ad: jnp.sum(lora.wrap(fn)(frozen, ad, *args) ** 2))(adapters)
    up = g["params"]["layers"]["up"]["kernel"].lora_b
    assert up.shape[0] == 3 and all(np.abs(up[i]).max() > 0 for i in range(3))
    assert not np.allclose(up[0], up[1])


def test_vmap_over_examples():
    fn, params, args, frozen, adapters = _split("linen-mlp")
    adapters = _randomize(adapters)
    wrapped = lora.wrap(fn, strict=True)
    out = jax.vmap(lambda x: wrapped(frozen, adapters, x[None])[0])(args[0])
    np.testing.assert_allclose(out, fn(lora.merge(frozen, adapters), *args), rtol=2e-5, atol=2e-5)


def test_vmap_over_adapters():
    """Many adapters at once (one per example): vmap over the adapter tree."""
    fn, params, args, frozen, adapters = _split("linen-mlp")
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *[_randomize(adapters, jax.random.key(i)) for i in range(3)])
    x = args[0][:3]
    out = jax.vmap(lambda ad, xi: lora.wrap(fn)(frozen, ad, xi[None])[0])(stack, x)
    for i in range(3):
        ad = jax.tree.map(lambda s, i=i: s[i], stack)
        np.testing.assert_allclose(out[i], fn(lora.merge(frozen, ad), x[i : i + 1])[0], rtol=2e-5, atol=2e-5)


def test_bfloat16_model_keeps_dtypes():
    m, x = M.MLP(dtype=jnp.bfloat16), jax.random.normal(KEY, (4, 10)).astype(jnp.bfloat16)
    params = m.init(KEY, x)
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=4), key=KEY)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(adapters))
    adapters = _randomize(adapters)
    out = lora.wrap(m.apply, strict=True)(frozen, adapters, x)
    merged = lora.merge(frozen, adapters)
    assert jax.tree.map(lambda a: a.dtype, merged) == jax.tree.map(lambda a: a.dtype, params)
    ref = m.apply(merged, x)
    assert out.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=5e-2, atol=5e-2)


def test_float32_adapters_on_bfloat16_weights():
    m, x = M.MLP(dtype=jnp.bfloat16), jax.random.normal(KEY, (4, 10)).astype(jnp.bfloat16)
    params = m.init(KEY, x)
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=4, dtype=jnp.float32), key=KEY)
    assert {a.dtype for a in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    adapters = _randomize(adapters)
    wrapped = lora.wrap(m.apply, strict=True)
    out, ref = wrapped(frozen, adapters, x), m.apply(lora.merge(frozen, adapters), x)
    assert out.dtype == ref.dtype == jnp.bfloat16
    out, ref, base = (np.asarray(y, np.float32) for y in (out, ref, m.apply(params, x)))
    assert np.abs(ref - base).max() > 0.2 * np.abs(ref).max(), "the adapters must change the output"
    np.testing.assert_allclose(out, ref, rtol=5e-2, atol=3e-2 * np.abs(ref).max())
    # Gradients reach the float32 adapters through the bfloat16 model, and agree with merge's.
    loss = lambda y: jnp.sum(jnp.sin(y.astype(jnp.float32)))
    g1 = jax.jit(jax.grad(lambda ad: loss(wrapped(frozen, ad, x))))(adapters)
    g2 = jax.jit(jax.grad(lambda ad: loss(m.apply(lora.merge(frozen, ad), x))))(adapters)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.dtype == b.dtype == jnp.float32
        assert np.abs(b).max() > 0 and np.abs(a).max() > 0
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * np.abs(b).max())


def test_nnx_through_split_and_merge():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin1 = nnx.Linear(6, 16, rngs=rngs)
            self.lin2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.lin2(nnx.relu(self.lin1(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    apply = lambda st, x: nnx.merge(graphdef, st)(x)
    x = jax.random.normal(KEY, (4, 6))
    frozen, adapters = lora.split(state, lora.LoraSpec(rank=2, targets=r"lin\d/kernel"), key=KEY)
    assert set(adapters) == {"lin1", "lin2"}
    adapters = _randomize(adapters)
    np.testing.assert_allclose(
        lora.wrap(apply, strict=True)(frozen, adapters, x),
        apply(lora.merge(frozen, adapters), x),
        rtol=2e-5,
        atol=2e-5,
    )


def test_kwargs_and_static_arguments():
    class Drop(nnx.Module):
        pass

    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.Dense(8)(x)
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(2)(x)

    m, x = Net(), jnp.ones((3, 4))
    params = m.init(KEY, x, train=False)
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=2), key=KEY)
    adapters = _randomize(adapters)
    wrapped = lora.wrap(m.apply, strict=True)
    merged = lora.merge(frozen, adapters)
    rngs = {"dropout": jax.random.key(3)}
    np.testing.assert_allclose(
        wrapped(frozen, adapters, x, train=True, rngs=rngs), m.apply(merged, x, train=True, rngs=rngs), rtol=2e-5
    )
    np.testing.assert_allclose(wrapped(frozen, adapters, x, train=False), m.apply(merged, x, train=False), rtol=2e-5)


def test_full_training_of_chosen_leaves():
    fn, params, args, spec, _ = _case("linen-mlp")
    spec = lora.LoraSpec(rank=2, train=r".*(LayerNorm_0/scale|bias)")
    frozen, adapters = lora.split(params, spec, key=KEY)
    assert frozen["params"]["LayerNorm_0"]["scale"] is None
    assert adapters["params"]["LayerNorm_0"]["scale"].shape == (32,)
    adapters = _randomize(adapters)
    ref = lambda ad: jnp.sum(fn(lora.merge(frozen, ad), *args) ** 2)
    g1 = jax.jit(jax.grad(lambda ad: jnp.sum(lora.wrap(fn)(frozen, ad, *args) ** 2)))(adapters)
    g2 = jax.jit(jax.grad(ref))(adapters)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_scale_rslora_and_patterns():
    params = {"q": jnp.zeros((16, 16)), "v": jnp.zeros((16, 16))}
    spec = lora.LoraSpec(rank=4, alpha=8, targets="q|v", rank_pattern={"v": 8}, alpha_pattern={"v": 4})
    _, adapters = lora.split(params, spec, key=KEY)
    assert adapters["q"].scale == 2.0 and adapters["q"].rank == 4
    assert adapters["v"].scale == 0.5 and adapters["v"].rank == 8
    _, adapters = lora.split(params, lora.LoraSpec(rank=4, alpha=8, targets="q", rslora=True), key=KEY)
    assert adapters["q"].scale == 4.0
    assert lora.LoraSpec(rank=8).scale_for("x") == 2.0  # alpha defaults to 2 * rank


def test_exclude_removes_targets():
    params = _mlp_params()
    for targets in (".*kernel", "all-linear", lambda path, leaf: path.endswith("kernel")):
        _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets=targets), key=KEY)
        assert set(adapters["params"]) == {"Dense_0", "Dense_1"}
        for exclude in (r".*Dense_1/.*", [r"nothing", r".*Dense_1/kernel"], lambda path, leaf: "Dense_1" in path):
            frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets=targets, exclude=exclude), key=KEY)
            assert set(adapters["params"]) == {"Dense_0"}, (targets, exclude)
            assert frozen["params"]["Dense_1"]["kernel"] is params["params"]["Dense_1"]["kernel"]
    with pytest.raises(ValueError, match=r"selects no leaf \(after exclude="):
        lora.split(params, lora.LoraSpec(rank=2, targets=".*Dense_0/kernel", exclude=".*Dense_0.*"), key=KEY)


def test_callable_targets_select_by_path_and_leaf():
    params = _mlp_params()
    seen = []

    def wide_kernels(path, leaf):
        seen.append((path, leaf.shape))
        return path.endswith("kernel") and leaf.shape[-1] == 32

    _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets=wide_kernels), key=KEY)
    assert list(adapters["params"]) == ["Dense_0"] and adapters["params"]["Dense_0"]["kernel"].lora_b.shape == (2, 32)
    assert ("params/Dense_1/kernel", (32, 4)) in seen and ("params/Dense_0/bias", (32,)) in seen


def test_rank_and_alpha_patterns_first_match_wins():
    params = {"mlp_up": jnp.zeros((16, 16)), "mlp_down": jnp.zeros((16, 16)), "q": jnp.zeros((16, 16))}
    spec = lora.LoraSpec(
        rank=4,
        alpha=8,
        targets=".*",
        rank_pattern={"mlp_up": 2, "mlp_.*": 8},
        alpha_pattern={"mlp_.*": 4, "mlp_down": 32},
    )
    _, adapters = lora.split(params, spec, key=KEY)
    ranks = {k: f.rank for k, f in adapters.items()}
    scales = {k: f.scale for k, f in adapters.items()}
    assert ranks == {"mlp_up": 2, "mlp_down": 8, "q": 4}
    assert scales == {"mlp_up": 4 / 2, "mlp_down": 4 / 8, "q": 8 / 4}
    assert adapters["mlp_up"].lora_a.shape == (16, 2) and adapters["mlp_down"].lora_b.shape == (8, 16)


class _LanguageModel(nn.Module):
    """Embedding, two body projections and an untied output head."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(40, 16, name="embed_tokens")(ids)
        h = nn.Dense(16, name="proj")(jnp.tanh(nn.Dense(16, name="mix")(h)))
        return nn.Dense(40, use_bias=False, name="lm_head")(h)


@pytest.mark.parametrize("traced", [False, True], ids=["no-trace", "trace"])
def test_all_linear_leaves_out_embeddings_and_heads(traced):
    m, ids = _LanguageModel(), jnp.array([[1, 2, 3]])
    params = m.init(KEY, ids)
    trace = (lambda p: m.apply(p, ids)) if traced else None
    _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="all-linear"), key=KEY, trace=trace)
    assert set(adapters["params"]) == {"mix", "proj"}
    # Named explicitly, the head and the embedding do get adapters.
    _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets=".*(lm_head|embed_tokens)/.*"), key=KEY, trace=trace)
    assert set(adapters["params"]) == {"lm_head", "embed_tokens"}
    # A tied head (the embedding used by `x @ E.T`) is left out too.
    m, ids = M.TiedLM(), jnp.array([[1, 4, 9]])
    params = m.init(KEY, ids)
    trace = (lambda p: m.apply(p, ids)) if traced else None
    _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="all-linear"), key=KEY, trace=trace)
    assert set(adapters["params"]) == {"Dense_0"}


# name -> (W's shape, how it is used, W + s·A@B in NumPy from W, A, B and s)
MERGE_LAYOUTS = {
    "in-out": ((5, 7), lambda w, x: x @ w, lambda w, a, b, s: w + s * a @ b),
    "torch [out, in]": ((7, 5), lambda w, x: x @ w.T, lambda w, a, b, s: w + s * (a @ b).T),
    "dense-general out [heads, hd, d]": (
        (2, 3, 5),
        lambda w, x: jnp.einsum("bhk,hkd->bd", x.reshape(-1, 2, 3), w),
        lambda w, a, b, s: w + s * np.einsum("hkr,rd->hkd", a, b),
    ),
    "out first [d, heads, hd]": (
        (5, 2, 3),
        lambda w, x: jnp.einsum("bhk,dhk->bd", x.reshape(-1, 2, 3), w),
        lambda w, a, b, s: w + s * np.einsum("hkr,rd->dhk", a, b),
    ),
}


@pytest.mark.parametrize("layout", list(MERGE_LAYOUTS))
def test_merge_matches_numpy(layout):
    shape, use, reference = MERGE_LAYOUTS[layout]
    params = {"w": np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    x = jnp.ones((2, 6 if len(shape) == 3 else 5))
    frozen, adapters = lora.split(
        params, lora.LoraSpec(rank=3, alpha=6, targets="w"), key=KEY, trace=lambda p: use(p["w"], x)
    )
    adapters = _randomize(adapters)
    a, b = np.asarray(adapters["w"].lora_a), np.asarray(adapters["w"].lora_b)
    expected = reference(params["w"], a, b, 2.0)
    np.testing.assert_allclose(lora.merge(frozen, adapters)["w"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adapters["w"].delta(), expected - params["w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.unmerge(lora.merge(frozen, adapters), adapters)["w"], params["w"], atol=1e-5)
    wrapped = lora.wrap(lambda p, x: use(p["w"], x), strict=True)(frozen, adapters, x)
    np.testing.assert_allclose(wrapped, use(expected, x), rtol=1e-5, atol=1e-5)


def test_init_distributions():
    params = {"w": jnp.zeros((256, 64))}
    _, ad = lora.split(params, lora.LoraSpec(rank=16, targets="w"), key=KEY)
    a = np.asarray(ad["w"].lora_a)
    assert np.abs(a).max() <= 1 / 16 and np.abs(a).max() > 0.9 / 16  # kaiming-uniform bound 1/sqrt(256)
    assert not np.asarray(ad["w"].lora_b).any()
    _, ad = lora.split(params, lora.LoraSpec(rank=16, targets="w", init="gaussian"), key=KEY)
    assert abs(np.asarray(ad["w"].lora_a).std() - 1 / 16) < 0.01
    _, ad2 = lora.split(params, lora.LoraSpec(rank=16, targets="w", init="gaussian"), key=KEY)
    np.testing.assert_array_equal(ad["w"].lora_a, ad2["w"].lora_a)  # deterministic in the key


def test_adapters_are_a_plain_pytree():
    fn, params, args, frozen, adapters = _split("scan")
    adapters = _randomize(adapters)
    back = pickle.loads(pickle.dumps(adapters))
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, b)
    doubled = jax.tree.map(lambda x: 2 * x, adapters)
    assert doubled["params"]["layers"]["up"]["kernel"].scale == adapters["params"]["layers"]["up"]["kernel"].scale
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    assert n_adapter < n_frozen


def test_optax_trains_adapters_and_loss_falls():
    fn, params, args, frozen, adapters = _split("linen-mlp")
    target = jnp.ones((args[0].shape[0], 4))
    loss = lambda ad: jnp.mean((lora.wrap(fn)(frozen, ad, *args) - target) ** 2)
    opt = optax.adam(3e-2)
    state = opt.init(adapters)

    @jax.jit
    def step(ad, st):
        value, g = jax.value_and_grad(loss)(ad)
        updates, st = opt.update(g, st, ad)
        return optax.apply_updates(ad, updates), st, value

    first = None
    for _ in range(30):
        adapters, state, value = step(adapters, state)
        first = value if first is None else first
    assert value < 0.2 * first
    # Frozen weights are untouched by construction: they never enter the optimizer.
    assert frozen["params"]["Dense_0"]["kernel"] is params["params"]["Dense_0"]["kernel"]


def test_materialization_is_reported_and_strict_raises():
    params = {"w": jnp.ones((4, 4)) * 0.1}
    fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"] ** 2)
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w"), key=KEY)
    adapters = _randomize(adapters)
    x = jnp.ones((2, 4))
    with pytest.warns(lora.MaterializationWarning, match=r"'w'.*integer_pow"):
        out = lora.wrap(fn)(frozen, adapters, x)
    np.testing.assert_allclose(out, fn(lora.merge(frozen, adapters), x), rtol=1e-5)
    with pytest.raises(lora.MaterializationError, match="integer_pow"):
        lora.wrap(fn, strict=True)(frozen, adapters, x)


def test_reshape_across_in_and_out_sides_is_materialized():
    params = {"w": jax.random.normal(KEY, (2, 8))}
    fn = lambda p, x: x @ p["w"].reshape(4, 4)  # mixes W's in and out axes: not a low-rank reshape
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=1, targets="w"), key=KEY)
    adapters = _randomize(adapters)
    x = jnp.ones((3, 4))
    with pytest.warns(lora.MaterializationWarning, match="'reshape'"):
        out = lora.wrap(fn)(frozen, adapters, x)
    np.testing.assert_allclose(out, fn(lora.merge(frozen, adapters), x), rtol=1e-5)


def test_wrap_does_not_retrace_the_model_per_call():
    calls = []

    def fn(p, x):
        calls.append(1)
        return x @ p["w"]

    frozen, adapters = lora.split({"w": jnp.ones((3, 3))}, lora.LoraSpec(rank=1, targets="w"), key=KEY)
    wrapped = lora.wrap(fn)
    for _ in range(3):
        wrapped(frozen, adapters, jnp.ones((2, 3)))
    assert len(calls) == 1


# -- errors ---------------------------------------------------------------------------------


def _mlp_params():
    return _case("linen-mlp")[1]


def test_error_targets_match_nothing_lists_nearest_paths():
    with pytest.raises(ValueError, match=r"matches no leaf.*params/Dense_0/kernel"):
        lora.split(_mlp_params(), lora.LoraSpec(targets=r"params/Dense0/kernel"), key=KEY)
    with pytest.raises(ValueError, match=r"pattern 'nope' matches no leaf"):
        lora.split(_mlp_params(), lora.LoraSpec(targets=[".*Dense_0/kernel", "nope"]), key=KEY)
    with pytest.raises(ValueError, match="selects no leaf"):
        lora.split(_mlp_params(), lora.LoraSpec(targets=lambda p, x: False), key=KEY)


@pytest.mark.parametrize("rank", [0, -2, 1.5])
def test_error_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LoraSpec(rank=rank)


def test_error_bad_spec_fields():
    with pytest.raises(ValueError, match="alpha must be a positive"):
        lora.LoraSpec(alpha=0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora.LoraSpec(targets="(unclosed")
    with pytest.raises(TypeError, match="targets must be a regex"):
        lora.LoraSpec(targets=3)
    with pytest.raises(ValueError, match="init must be"):
        lora.LoraSpec(init="orthogonal")
    with pytest.raises(TypeError, match="must be a lora_jax.LoraSpec"):
        lora.split(_mlp_params(), {"rank": 2}, key=KEY)


def test_error_rank_too_large():
    with pytest.raises(ValueError, match=r"rank 8 is larger than target 'params/Dense_1/kernel'.*<= 4"):
        lora.split(_mlp_params(), lora.LoraSpec(rank=8), key=KEY)


def test_error_non_float_target():
    with pytest.raises(TypeError, match=r"target 'ids' has dtype int32"):
        lora.split({"ids": jnp.zeros((3, 3), jnp.int32)}, lora.LoraSpec(targets="ids"), key=KEY)


def test_error_ambiguous_layout_without_trace():
    fn, params, args, spec, _ = _case("scan")
    with pytest.raises(ValueError, match=r"'params/layers/(up|down)/kernel'.*ambiguous.*trace="):
        lora.split(params, spec, key=KEY)


def test_error_target_not_used_linearly():
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"'w'.*only used by \['sin'\]"):
        lora.split(params, lora.LoraSpec(rank=1, targets="w"), key=KEY, trace=lambda p: jnp.sin(p["w"]))


def test_error_missing_key_and_overlap():
    with pytest.raises(TypeError, match="key"):
        lora.split(_mlp_params(), lora.LoraSpec(), key=None)
    with pytest.raises(ValueError, match="both by spec.targets"):
        lora.split(_mlp_params(), lora.LoraSpec(rank=2, train=".*Dense_0/kernel"), key=KEY)


def test_error_adapters_from_other_params():
    fn, params, args, frozen, adapters = _split("linen-mlp")
    other = M.MLP(width=16).init(KEY, args[0])
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel'.*do not belong"):
        lora.wrap(fn)(other, adapters, *args)
    with pytest.raises(ValueError, match="have no matching leaf"):
        lora.merge({"params": {"x": jnp.ones(2)}}, adapters)
    with pytest.raises(TypeError, match="adapter tree returned by lora_jax.split"):
        lora.merge(frozen, [1, 2])
    with pytest.raises(TypeError, match="must be callable"):
        lora.wrap(3)


def test_error_full_params_passed_as_adapters():
    fn, params, args, frozen, adapters = _split("linen-mlp")
    # The whole parameter tree where the adapters belong would train every weight.
    for call in (lambda: lora.wrap(fn)(frozen, params, *args), lambda: lora.merge(frozen, params)):
        with pytest.raises(ValueError, match=r"holds no LoraFactors.*full parameter tree.*None at its place"):
            call()
    with pytest.raises(ValueError, match=r"holds no LoraFactors"):
        lora.unmerge(params, params)
    # Adapters mixed with a plain array at a path where frozen holds an array.
    mixed = dict(adapters, params=dict(adapters["params"], Dense_1=dict(params["params"]["Dense_1"])))
    for call in (lambda: lora.wrap(fn)(frozen, mixed, *args), lambda: lora.merge(frozen, mixed)):
        with pytest.raises(ValueError, match=r"plain array at 'params/Dense_1/(bias|kernel)'.*None at its place"):
            call()
    # A leaf that split moved out of frozen is accepted.
    frozen_t, trained = lora.split(params, lora.LoraSpec(rank=2, train=r".*/bias"), key=KEY)
    trained = _randomize(trained)
    ref = fn(lora.merge(frozen_t, trained), *args)
    np.testing.assert_allclose(lora.wrap(fn)(frozen_t, trained, *args), ref, rtol=1e-5, atol=1e-6)


# -- dropout on the low-rank path ---------------------------------------------------------


def test_dropout_only_with_a_key_and_unbiased():
    params = {"w": jax.random.normal(KEY, (6, 5))}
    fn = lambda p, x: x @ p["w"]
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w", dropout=0.5), key=KEY)
    adapters = _randomize(adapters)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    wrapped = lora.wrap(fn, strict=True)
    ref = fn(lora.merge(frozen, adapters), x)
    np.testing.assert_allclose(wrapped(frozen, adapters, x), ref, rtol=1e-5)  # no key: evaluation
    k1, k2 = jax.random.key(7), jax.random.key(8)
    y1 = wrapped(frozen, adapters, x, lora_dropout_key=k1)
    assert not np.allclose(y1, ref, atol=1e-4)
    np.testing.assert_array_equal(y1, wrapped(frozen, adapters, x, lora_dropout_key=k1))
    assert not np.allclose(y1, wrapped(frozen, adapters, x, lora_dropout_key=k2))
    # The frozen path is never dropped: with B = 0 the output is the base model's.
    zero_b = jax.tree.map(lambda f: f, adapters)
    zero_b["w"] = lora.LoraFactors(adapters["w"].lora_a, 0 * adapters["w"].lora_b, adapters["w"].scale, dropout=0.5)
    np.testing.assert_allclose(wrapped(frozen, zero_b, x, lora_dropout_key=k1), fn(params, x), rtol=1e-6)
    # Inverted dropout is unbiased, and the low-rank path is linear in the mask.
    keys = jax.random.split(jax.random.key(9), 4000)
    mean = jax.vmap(lambda k: wrapped(frozen, adapters, x, lora_dropout_key=k))(keys).mean(0)
    delta = ref - fn(params, x)
    assert np.abs(mean - ref).max() < 0.1 * np.abs(delta).max()


RATE = 0.2


def _identity_adapters(frozen, adapters, path):
    """A = B = I (rank = width) and s = 1 at ``path``: the low-rank path is the identity map."""
    f = adapters[path]
    eye = jnp.broadcast_to(jnp.eye(f.lora_a.shape[-1]), f.lora_a.shape)
    assert f.scale == 1.0
    return dict(adapters, **{path: dataclasses.replace(f, lora_a=eye, lora_b=eye)})


def test_dropout_acts_on_the_input_exactly():
    # With A = B = I and s = 1, output - base = dropout(x): each entry is 0 (dropped, probability p)
    # or x / (1 - p) (kept).
    d = 16
    params = {"w": jax.random.normal(KEY, (d, d))}
    fn = lambda p, x: x @ p["w"]
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=d, alpha=d, targets="w", dropout=RATE), key=KEY)
    adapters = _identity_adapters(frozen, adapters, "w")
    x = 1.0 + jax.random.uniform(jax.random.key(1), (256, d))  # no entry is 0 by chance
    wrapped = lora.wrap(fn, strict=True)
    base = fn(params, x)
    np.testing.assert_allclose(wrapped(frozen, adapters, x), base + x, rtol=1e-5, atol=1e-5)  # no key: no dropout
    delta = np.asarray(wrapped(frozen, adapters, x, lora_dropout_key=jax.random.key(2)) - base)
    dropped = np.abs(delta) < 1e-3
    kept_value = np.asarray(x) / (1 - RATE)
    np.testing.assert_allclose(delta[~dropped], kept_value[~dropped], rtol=1e-4, atol=1e-4)
    assert abs(dropped.mean() - RATE) < 0.02, dropped.mean()  # 4096 draws: std 0.006

    # The mask is drawn over the inputs of A, not over x @ A: with a rank-1 A of ones and inputs 2^j,
    # (output - base)·(1 - p) is the binary number whose bits are the kept inputs of each row.
    d = 10
    params = {"w": jnp.zeros((d, 3))}
    frozen, adapters = lora.split(params, lora.LoraSpec(rank=1, alpha=1, targets="w", dropout=RATE), key=KEY)
    adapters = {"w": dataclasses.replace(adapters["w"], lora_a=jnp.ones((d, 1)), lora_b=jnp.ones((1, 3)))}
    x = jnp.broadcast_to(2.0 ** jnp.arange(d), (512, d))
    delta = np.asarray(lora.wrap(fn)(frozen, adapters, x, lora_dropout_key=jax.random.key(3)))
    code = delta[:, 0] * (1 - RATE)
    np.testing.assert_allclose(code, np.round(code), atol=1e-2)
    bits = (np.round(code).astype(np.int64)[:, None] >> np.arange(d)) & 1
    assert abs(1 - bits.mean() - RATE) < 0.03, bits.mean()
    assert len(set(np.round(code).tolist())) > 100  # per-input masks, not one keep/drop per row


def test_one_dropout_mask_per_layer_of_a_stack():
    layers, d = 4, 16
    fn = lambda p, x: jax.lax.scan(lambda c, w: (c, c @ w), x, p["stack"])[1]
    params = {"stack": jax.random.normal(KEY, (layers, d, d))}
    x = 1.0 + jax.random.uniform(jax.random.key(1), (64, d))
    spec = lora.LoraSpec(rank=d, alpha=d, targets="stack", dropout=RATE)
    frozen, adapters = lora.split(params, spec, key=KEY, trace=lambda p: fn(p, x))
    adapters = _identity_adapters(frozen, adapters, "stack")
    base = fn(params, x)
    delta = np.asarray(lora.wrap(fn, strict=True)(frozen, adapters, x, lora_dropout_key=jax.random.key(5)) - base)
    dropped = np.abs(delta) < 1e-3
    for layer in range(layers):
        kept = ~dropped[layer]
        np.testing.assert_allclose(delta[layer][kept], (np.asarray(x) / (1 - RATE))[kept], rtol=1e-4, atol=1e-4)
        assert abs(dropped[layer].mean() - RATE) < 0.04, dropped[layer].mean()  # 1024 draws: std 0.0125
        for other in range(layer):
            assert (dropped[layer] != dropped[other]).mean() > 0.15  # independent masks differ in ~32%


def test_error_bad_dropout():
    with pytest.raises(ValueError, match="dropout must be a probability"):
        lora.LoraSpec(dropout=1.0)
