"""Small models exercising every way a weight can be used (shared by tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    width: int = 32
    out: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(nn.gelu(x))
        return nn.Dense(self.out, dtype=self.dtype, param_dtype=self.dtype)(x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
        x = nn.Conv(6, (3, 3), strides=(2, 2), kernel_dilation=(1, 1))(x)
        return jnp.mean(x, axis=(1, 2))


class TiedLM(nn.Module):
    vocab: int = 50
    dim: int = 16

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.dim)
        h = embed(ids)
        h = nn.tanh(nn.Dense(self.dim)(h))
        return embed.attend(h)


class Attention(nn.Module):
    heads: int = 4
    head_dim: int = 8

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w_in", nn.initializers.normal(0.3), (x.shape[-1], 3, 8))
        h = jnp.einsum("bd,dhk->bhk", x, w)
        u = self.param("w_out", nn.initializers.normal(0.3), (8, 3, 5))
        return jnp.einsum("bhk,khe->be", jnp.tanh(h), u)


class Block(nn.Module):
    dim: int = 16

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.dim, name="up")(h)
        h = nn.Dense(self.dim, name="down")(nn.gelu(h))
        return x + h, None


class ScanStack(nn.Module):
    layers: int = 3
    dim: int = 16
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(self.dim, name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


class RematMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(nn.Dense)(16)(x)
        return nn.remat(nn.Dense)(4)(nn.relu(x))


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


_softplus.defjvp(lambda p, t: (_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


@jax.custom_vjp
def _clip_grad(x):
    return x


_clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))


def control_flow_fn(params, x):
    """A plain function with jit, cond, custom_jvp/vjp, fori_loop and a scan closing over weights."""
    w, v = params["w"], params["v"]

    @jax.jit
    def inner(x, w):
        return x @ w

    h = inner(x, w)
    h = jax.lax.cond(h.sum() > 0, lambda: _softplus(h @ v), lambda: -(h @ v))

    h = jax.lax.fori_loop(0, 2, lambda i, y: jnp.tanh(y @ params["u"]), h)
    h = _clip_grad(h)
    h, _ = jax.lax.scan(lambda c, _: (jnp.sin(c @ params["u"]), None), h, None, length=2)
    return jax.checkpoint(lambda y: y @ params["out"])(h)


def control_flow_params(key):
    k = jax.random.split(key, 4)
    return {
        "w": jax.random.normal(k[0], (6, 8)) * 0.4,
        "v": jax.random.normal(k[1], (8, 8)) * 0.4,
        "u": jax.random.normal(k[2], (8, 8)) * 0.4,
        "out": jax.random.normal(k[3], (8, 2)) * 0.4,
    }


def stacked_loop_fn(params, x):
    """A stacked weight [L, in, out] indexed layer by layer in a Python loop."""
    for i in range(params["stack"].shape[0]):
        x = jnp.tanh(x @ params["stack"][i])
    return x


def layer_list_fn(params, x):
    for layer in params["layers"]:
        x = jax.nn.relu(x @ layer["wq"] + layer["b"])
    return x


def while_fn(params, x):
    """A while_loop with a data-dependent trip count (forward-mode differentiable only)."""

    def body(carry):
        i, y = carry
        return i + 1, jnp.tanh(y @ params["u"])

    return jax.lax.while_loop(lambda c: (c[0] < 4) & (jnp.abs(c[1]).sum() > 1e-3), body, (0, x))[1]


def reshaped_heads_fn(params, x):
    """Attention-style projections whose weights are reshaped to heads before an einsum."""
    heads = 4
    wq = params["wq"].reshape(x.shape[-1], heads, -1)  # split the out side
    q = jnp.einsum("bd,dhk->bhk", x, wq)
    wo = params["wo"].reshape(heads, -1, x.shape[-1])  # split the in side
    return jnp.einsum("bhk,hkd->bd", jnp.tanh(q), wo)


def torch_layout_fn(params, x):
    """Weights stored PyTorch's way, [out, in], so the out side comes first in W.

    ``w`` is used as ``x @ w.T``; ``o`` is an output projection stored
    ``[d, heads, hd]`` and contracted over its last two axes.
    """
    h = jnp.tanh(x @ params["w"].T)
    h = h.reshape(*h.shape[:-1], 2, 4)
    return jnp.einsum("bhk,dhk->bd", h, params["o"])
