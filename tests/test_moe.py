"""LoRA on mixture-of-experts weights: one adapter per expert (PEFT's `target_parameters`).

A small MoE layer in plain JAX, ``{"router": [d, E], "w_in": [E, d, f],
"w_out": [E, f, d]}``, with top-2 routing and softmax gates over the two
chosen logits, in four dispatch styles:

* ``"capacity"``: each expert gets a buffer of ``CAPACITY`` token slots
  (tokens in order, overflow dropped), ``einsum("ecd,edf->ecf", x_e, w_in)``;
* ``"dense"``: every expert runs on every token, written with the tokens
  broadcast over experts, ``einsum("etd,edf->etf", x_e, w_in)``;
* ``"dense-shared"``: every expert on every token, written as
  ``einsum("td,edf->etf", x, w_in)``;
* ``"gather"``: each token indexes its experts' weights, ``w_in[experts]``.

In "capacity" and "dense" the expert axis is a batch dimension of
``dot_general``, and `split`'s trace reads it as stacked: ``A`` is
``[E, d, r]`` and ``B`` ``[E, r, f]``, an independent adapter per expert.
"gather" gives the same: ``w[experts]`` picks whole ``[d, f]`` matrices, so
the trace follows the picked matrices to the matmul, where the token axis
(standing for the expert axis) is a batch axis; `wrap` gathers ``A`` and
``B`` the same way and keeps every product low-rank (``"tkd,tkdr->tkr"``).
Only "dense-shared" does not give one adapter per expert: the expert axis
of ``w_in`` is a free (output) axis of the contraction, so the trace puts it
on the ``B`` side like any output axis: ``A`` is ``[d, r]``, shared by all
experts, and ``B`` is ``[r, E, f]``, a rank-r adapter of ``w_in`` seen as
one ``[d, E·f]`` matrix (every expert's update lies in the same
r-dimensional row space). It is still exact through `wrap` and checked here
as such; for per-expert adapters, write the expert axis as a batch axis of
the contraction (broadcast the tokens as ``"dense"`` does), or use the
weight that way once anywhere (see the "both ways" test).

The references are ``moe(merge(frozen, adapters), x)`` and a NumPy MoE in
float64 that forms each expert's ``W_e + s·ΔW_e`` explicitly and routes
token by token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora

E, D, F, T, TOP_K, RANK, ALPHA = 4, 16, 32, 24, 2, 4, 8.0
CAPACITY = 10  # below the mean load T·k/E = 12, so some tokens overflow and are dropped
STYLES = ("capacity", "dense", "dense-shared", "gather")


def _gates(router, x):
    """Top-k experts per token and their gates: softmax over the chosen logits."""
    values, experts = jax.lax.top_k(x @ router, TOP_K)
    return experts, jax.nn.softmax(values, axis=-1)


def _routing(router, x, n_experts):
    """``[T, E]`` 0/1 choice mask and gate of each (token, expert)."""
    experts, gates = _gates(router, x)
    onehot = jax.nn.one_hot(experts, n_experts, dtype=x.dtype)  # [T, k, E]
    return onehot.sum(1), jnp.einsum("tke,tk->te", onehot, gates)


def moe(params, x, *, style, capacity=CAPACITY, dot=None):
    """The MoE layer. ``dot(name, spec, x, w)`` computes each expert matmul (``jnp.einsum`` by default)."""
    dot = dot or (lambda name, spec, x, w: jnp.einsum(spec, x, w))
    w_in, w_out = params["w_in"], params["w_out"]
    n_experts = w_in.shape[0]
    chosen, gate = _routing(params["router"], x, n_experts)
    if style == "capacity":
        # Slot of each token in its expert's buffer: tokens in order, the rest dropped.
        slot = jnp.cumsum(chosen.astype(jnp.int32), axis=0) - 1
        dispatch = chosen[..., None] * jax.nn.one_hot(slot, capacity, dtype=x.dtype)  # [T, E, C]
        x_e = jnp.einsum("tec,td->ecd", dispatch, x)
        h = jax.nn.silu(dot("w_in", "ecd,edf->ecf", x_e, w_in))
        y = dot("w_out", "ecf,efd->ecd", h, w_out)
        return jnp.einsum("tec,te,ecd->td", dispatch, gate, y)
    if style == "dense":
        x_e = jnp.broadcast_to(x, (n_experts, *x.shape))
        h = jax.nn.silu(dot("w_in", "etd,edf->etf", x_e, w_in))
    elif style == "dense-shared":
        h = jax.nn.silu(dot("w_in", "td,edf->etf", x, w_in))
    elif style == "gather":
        # Each token picks its experts' weights by index: [T, k, d, f], formed per token by the base model too.
        experts, gates = _gates(params["router"], x)
        h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, w_in[experts]))
        return jnp.einsum("tk,tkf,tkfd->td", gates, h, w_out[experts])
    else:
        raise ValueError(style)
    y = dot("w_out", "etf,efd->etd", h, w_out)
    return jnp.einsum("te,etd->td", gate, y)


# The same matmuls with LoRA written in by hand, for each layout split finds.
_HAND_SPECS = {
    "ecd,edf->ecf": ("ecd,edr->ecr", "ecr,erf->ecf"),
    "ecf,efd->ecd": ("ecf,efr->ecr", "ecr,erd->ecd"),
    "etd,edf->etf": ("etd,edr->etr", "etr,erf->etf"),
    "etf,efd->etd": ("etf,efr->etr", "etr,erd->etd"),
    "td,edf->etf": ("td,dr->tr", "tr,ref->etf"),
}


def hand_lora_dot(adapters):
    """``einsum(x, W) + einsum(s·einsum(x, A), B)`` for every adapted expert weight.

    The scale multiplies the rank-r intermediate, as LoRA written by hand usually does
    (and as `tests/test_flops.py` does), not the full-size output.
    """

    def dot(name, spec, x, w):
        f = adapters[name]
        first, second = _HAND_SPECS[spec]
        return jnp.einsum(spec, x, w) + jnp.einsum(second, f.scale * jnp.einsum(first, x, f.lora_a), f.lora_b)

    return dot


# -- the independent reference ---------------------------------------------------------------------


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _expert_weights(w, factors):
    """``[W_e + s·ΔW_e for each expert e]`` in float64, from the factors' layout, one expert at a time."""
    w = np.asarray(w, np.float64)
    a, b = np.asarray(factors.lora_a, np.float64), np.asarray(factors.lora_b, np.float64)
    out = []
    for e in range(w.shape[0]):
        if factors.stack_axes == (0,):  # one adapter per expert: A [E, in, r], B [E, r, out]
            delta = a[e] @ b[e]
        elif factors.stack_axes == () and factors.a_axes == (1,) and factors.b_axes == (0, 2):
            delta = a @ b[:, e, :]  # A [in, r] shared, B [r, E, out]
        else:
            raise AssertionError(f"unexpected layout {factors}")
        out.append(w[e] + factors.scale * delta)
    return out


def numpy_moe(frozen, adapters, x, *, style, capacity=CAPACITY):
    x = np.asarray(x, np.float64)
    router = np.asarray(frozen["router"], np.float64)
    w_in = _expert_weights(frozen["w_in"], adapters["w_in"])
    w_out = _expert_weights(frozen["w_out"], adapters["w_out"])
    logits = x @ router
    y = np.zeros_like(x)
    load = [0] * len(w_in)
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t])[:TOP_K]
        gates = np.exp(logits[t, top] - logits[t, top].max())
        gates /= gates.sum()
        for e, g in zip(top, gates):
            load[e] += 1
            if style == "capacity" and load[e] > capacity:
                continue  # expert e's buffer is full: this token is dropped there
            y[t] += g * (_silu(x[t] @ w_in[e]) @ w_out[e])
    return y


# -- fixtures --------------------------------------------------------------------------------------


def _params(key, n_experts=E, d=D, f=F):
    k_router, k_in, k_out = jax.random.split(key, 3)
    return {
        "router": jax.random.normal(k_router, (d, n_experts)),
        "w_in": jax.random.normal(k_in, (n_experts, d, f)) / d**0.5,
        "w_out": jax.random.normal(k_out, (n_experts, f, d)) / f**0.5,
    }


def _randomize(adapters, key, scale=0.3):
    """Non-zero A and B, so a wrong per-expert delta cannot hide behind B = 0."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) * scale for k, x in zip(keys, leaves)])


def _setup(style, *, n_experts=E, d=D, f=F, tokens=T, capacity=CAPACITY, randomize=True):
    params = _params(jax.random.key(0), n_experts, d, f)
    x = jax.random.normal(jax.random.key(1), (tokens, d))
    fn = lambda p, x: moe(p, x, style=style, capacity=capacity)
    spec = lora.LoraSpec(rank=RANK, alpha=ALPHA, targets="w_in|w_out")
    frozen, adapters = lora.split(params, spec, key=jax.random.key(2), trace=lambda p: fn(p, x))
    if randomize:
        adapters = _randomize(adapters, jax.random.key(3))
    return fn, frozen, adapters, x


def _loss(y):
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


# -- layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["capacity", "dense"])
def test_expert_axis_as_a_dot_batch_axis_gives_one_adapter_per_expert(style):
    _, _, adapters, _ = _setup(style, randomize=False)
    for name, (n_in, n_out) in (("w_in", (D, F)), ("w_out", (F, D))):
        f = adapters[name]
        assert f.lora_a.shape == (E, n_in, RANK) and f.lora_b.shape == (E, RANK, n_out), name
        assert (f.stack_axes, f.a_axes, f.b_axes) == ((0,), (1,), (2,)), name


def test_expert_axis_as_a_free_output_axis_gives_one_shared_adapter():
    # "td,edf->etf": E is an output axis of the contraction, not a batch axis, so it lands on B's
    # side and A is shared across experts. w_out ("etf,efd->etd") still has E as a batch axis.
    _, _, adapters, _ = _setup("dense-shared", randomize=False)
    f = adapters["w_in"]
    assert f.lora_a.shape == (D, RANK) and f.lora_b.shape == (RANK, E, F)
    assert (f.stack_axes, f.a_axes, f.b_axes) == ((), (1,), (0, 2))
    g = adapters["w_out"]
    assert g.lora_a.shape == (E, F, RANK) and g.lora_b.shape == (E, RANK, D)
    assert g.stack_axes == (0,)


def test_experts_picked_per_token_give_one_adapter_per_expert():
    # w[experts] picks whole [in, out] matrices, which the matmul then uses per token: the expert axis is
    # stacked, as with a batch-axis einsum, and the rank is bounded by in/out, not by the number of experts.
    _, _, adapters, _ = _setup("gather", randomize=False)
    for name, (n_in, n_out) in (("w_in", (D, F)), ("w_out", (F, D))):
        f = adapters[name]
        assert f.lora_a.shape == (E, n_in, RANK) and f.lora_b.shape == (E, RANK, n_out), name
        assert (f.stack_axes, f.a_axes, f.b_axes) == ((0,), (1,), (2,)), name
    params = _params(jax.random.key(0))
    _, wide = lora.split(
        params,
        lora.LoraSpec(rank=2 * E, targets="w_in"),
        key=jax.random.key(2),
        trace=lambda p: moe(p, jnp.ones((T, D)), style="gather"),
    )
    assert wide["w_in"].lora_a.shape == (E, D, 2 * E)
    # A table whose rows are vectors is still an embedding: rows on A's side.
    _, table = lora.split(
        {"emb": jnp.ones((E, D))},
        lora.LoraSpec(rank=2, targets="emb"),
        key=jax.random.key(2),
        trace=lambda p: p["emb"][jnp.array([0, 3])] @ jnp.ones((D, 2)),
    )
    assert (table["emb"].stack_axes, table["emb"].a_axes, table["emb"].b_axes) == ((), (0,), (1,))
    # ... also when its looked-up vectors meet in a batched product (the batch axis is the tokens', not a stack).
    _, table = lora.split(
        {"emb": jnp.ones((E, D))},
        lora.LoraSpec(rank=2, targets="emb"),
        key=jax.random.key(2),
        trace=lambda p: jnp.einsum("bsd,btd->bst", p["emb"][jnp.ones((2, 3), int)], p["emb"][jnp.ones((2, 3), int)]),
    )
    assert (table["emb"].stack_axes, table["emb"].a_axes, table["emb"].b_axes) == ((), (0,), (1,))


def test_a_weight_used_both_ways_gets_per_expert_adapters_in_both_uses():
    # The batch use makes the expert axis stacked; in the "td,edf->etf" use that axis is free, so each
    # expert's adapter applies to every token there: a batch axis of the second low-rank product.
    params = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (T, D))

    def fn(p, x):
        shared = jnp.einsum("td,edf->etf", x, p["w_in"])
        batched = jnp.einsum("etd,edf->etf", jnp.broadcast_to(x, (E, *x.shape)), p["w_in"])
        return shared + batched

    frozen, adapters = lora.split(
        params, lora.LoraSpec(rank=RANK, targets="w_in"), key=jax.random.key(2), trace=lambda p: fn(p, x)
    )
    assert adapters["w_in"].stack_axes == (0,)
    adapters = _randomize(adapters, jax.random.key(3))
    out = lora.wrap(fn, strict=True)(frozen, adapters, x)
    np.testing.assert_allclose(out, fn(lora.merge(frozen, adapters), x), rtol=1e-5, atol=1e-5)
    # The reference by hand: expert e's own W_e + s·A_e@B_e on every token.
    f = adapters["w_in"]
    per_expert = frozen["w_in"] + f.scale * jnp.einsum("edr,erf->edf", f.lora_a, f.lora_b)
    np.testing.assert_allclose(out, 2 * jnp.einsum("td,edf->etf", x, per_expert), rtol=1e-5, atol=1e-5)


def test_capacity_routing_drops_tokens():
    # The capacity case must really drop tokens, or it would only repeat the dense case.
    params = _params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (T, D))
    chosen, _ = _routing(params["router"], x, E)
    assert int(chosen.sum(0).max()) > CAPACITY
    assert not np.allclose(moe(params, x, style="capacity"), moe(params, x, style="dense"), atol=1e-3)


# -- values and gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_wrap_equals_merge_and_numpy_per_expert_reference(style, jit):
    fn, frozen, adapters, x = _setup(style)
    wrapped = lora.wrap(fn, strict=True)  # strict: no expert weight is ever formed as W + s·A@B
    if jit:
        wrapped = jax.jit(wrapped)
    out = wrapped(frozen, adapters, x)
    merged = fn(lora.merge(frozen, adapters), x)
    reference = numpy_moe(frozen, adapters, x, style=style)
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    # The adapters matter: without them the output is clearly different.
    assert not np.allclose(fn(frozen, x), reference, atol=1e-2)


@pytest.mark.parametrize("style", STYLES)
def test_adapter_gradients_equal_those_through_merge(style):
    fn, frozen, adapters, x = _setup(style)
    wrapped = lora.wrap(fn, strict=True)
    g_wrap = jax.grad(lambda ad: _loss(wrapped(frozen, ad, x)))(adapters)
    g_merge = jax.grad(lambda ad: _loss(fn(lora.merge(frozen, ad), x)))(adapters)
    for name in ("w_in", "w_out"):
        for got, want in ((g_wrap[name].lora_a, g_merge[name].lora_a), (g_wrap[name].lora_b, g_merge[name].lora_b)):
            size = np.abs(want).max()
            assert size > 1e-3
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * size)  # float32 sums in another order
    if style in ("capacity", "dense", "gather"):
        # Every expert's own adapter gets its own, non-zero gradient.
        assert all(np.abs(g_wrap["w_in"].lora_a[e]).max() > 0 for e in range(E))


# -- compiled FLOPs --------------------------------------------------------------------------------


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("style", ["capacity", "dense", "dense-shared"])
def test_wrap_step_costs_what_per_expert_lora_by_hand_costs(style):
    # Big enough that the expert matmuls dominate: 8 experts, d 128, f 256, 128 tokens,
    # capacity factor 1 (32 slots per expert).
    n_experts, d, f, tokens = 8, 128, 256, 128
    fn, frozen, adapters, x = _setup(
        style, n_experts=n_experts, d=d, f=f, tokens=tokens, capacity=tokens * TOP_K // n_experts, randomize=False
    )
    capacity = tokens * TOP_K // n_experts
    wrapped = lora.wrap(fn, strict=True)
    via_wrap = _flops(jax.grad(lambda ad, fr, x: _loss(wrapped(fr, ad, x))), adapters, frozen, x)
    via_merge = _flops(jax.grad(lambda ad, fr, x: _loss(fn(lora.merge(fr, ad), x))), adapters, frozen, x)

    def hand_loss(ad, fr, x):
        return _loss(moe(fr, x, style=style, capacity=capacity, dot=hand_lora_dot(ad)))

    by_hand = _flops(jax.grad(hand_loss), adapters, frozen, x)
    print(
        f"{style}: wrap {via_wrap:.4e}  merge {via_merge:.4e}  hand {by_hand:.4e}  "
        f"wrap/merge {via_wrap / via_merge:.3f}  wrap/hand {via_wrap / by_hand:.4f}"
    )
    assert via_wrap < via_merge
    assert abs(via_wrap / by_hand - 1.0) <= 0.01


def test_wrap_step_with_experts_picked_per_token_costs_what_lora_by_hand_costs():
    # The "gather" style at the size above: wrap gathers each token's A_e and B_e as the base gathers W_e,
    # and forms no [d, f] delta per token.
    n_experts, d, f, tokens = 8, 128, 256, 128
    fn, frozen, adapters, x = _setup("gather", n_experts=n_experts, d=d, f=f, tokens=tokens, randomize=False)
    wrapped = lora.wrap(fn, strict=True)
    via_wrap = _flops(jax.grad(lambda ad, fr, x: _loss(wrapped(fr, ad, x))), adapters, frozen, x)
    via_merge = _flops(jax.grad(lambda ad, fr, x: _loss(fn(lora.merge(fr, ad), x))), adapters, frozen, x)

    def hand_loss(ad, fr, x):
        experts, gates = _gates(fr["router"], x)
        a_in, b_in = ad["w_in"].lora_a[experts], ad["w_in"].lora_b[experts]
        a_out, b_out = ad["w_out"].lora_a[experts], ad["w_out"].lora_b[experts]
        s = ad["w_in"].scale
        h = jnp.einsum("td,tkdf->tkf", x, fr["w_in"][experts])
        h = jax.nn.silu(h + jnp.einsum("tkr,tkrf->tkf", s * jnp.einsum("td,tkdr->tkr", x, a_in), b_in))
        y = jnp.einsum("tk,tkf,tkfd->td", gates, h, fr["w_out"][experts])
        low = s * jnp.einsum("tk,tkf,tkfr->tkr", gates, h, a_out)
        return _loss(y + jnp.einsum("tkr,tkrd->td", low, b_out))

    by_hand = _flops(jax.grad(hand_loss), adapters, frozen, x)
    print(
        f"gather: wrap {via_wrap:.4e}  merge {via_merge:.4e}  hand {by_hand:.4e}  "
        f"wrap/merge {via_wrap / via_merge:.3f}  wrap/hand {via_wrap / by_hand:.4f}"
    )
    assert via_wrap < via_merge
    assert abs(via_wrap / by_hand - 1.0) <= 0.02
