"""A Llama decoder in Flax linen whose parameter names follow Hugging Face's.

The model is written with ordinary ``jnp`` operations and plain
``nn.Dense(use_bias=False)`` projections (kernel ``[in, out]``), so every
weight matmul appears in the jaxpr as a ``dot_general`` on its parameter.
Parameter paths mirror the Hugging Face module tree::

    params/model/embed_tokens/embedding
    params/model/layers_3/self_attn/q_proj/kernel        # scan_layers=False
    params/model/layers/self_attn/q_proj/kernel          # scan_layers=True, [L, in, out]
    params/model/layers_3/input_layernorm/scale
    params/model/norm/scale
    params/lm_head/kernel                                # untied head only

which :func:`hf_key` and :func:`flax_path` translate to and from
``model.layers.3.self_attn.q_proj.weight``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._spec import path_parts
from lora_jax.losses import softmax_cross_entropy

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "flax_path",
    "hf_key",
    "init_cache",
    "stack_layers",
    "unstack_layers",
]

PyTree = Any
Array = jax.Array

_INIT_STD = 0.02

ATTENTION = ("einsum", "xla", "cudnn", "auto", "blockwise")
"""The values of `LlamaConfig.attention`."""

REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_batch": jax.checkpoint_policies.checkpoint_dots,
}
"""The values of `LlamaConfig.remat_policy` and the `jax.checkpoint` policy each names."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and execution options of a Llama decoder.

    The architecture fields use Hugging Face's names so a ``config.json`` maps
    onto them one to one.

    Args:
        vocab_size: Number of tokens.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query
            attention); ``None`` means as many as query heads.
        head_dim: Width of one head; ``None`` means
            ``hidden_size // num_attention_heads``.
        rms_norm_eps: Epsilon of RMSNorm.
        rope_theta: Base of the rotary frequencies.
        tie_word_embeddings: Whether the output head reuses the input
            embedding matrix.
        max_position_embeddings: Longest context the model was trained for
            (informational; positions beyond it still work).
        scan_layers: Run the layers with ``nn.scan`` over parameters stacked on
            a leading layer axis (faster compiles for deep models).
        remat: Rematerialise each layer's activations in the backward pass
            (the same as ``remat_policy="nothing"``).
        remat_policy: What each layer keeps for the backward pass, if it is
            rematerialised: ``None`` (no remat unless ``remat``),
            ``"nothing"`` (keep only the layer's input; recompute the rest),
            ``"dots"`` (keep the outputs of the weight matmuls, recompute
            norms, rotary, softmax and activations: most of the memory saving
            for little recompute), ``"dots_with_batch"`` (keep every matmul
            output, attention's too).
        attention: How attention is computed: ``"einsum"`` (the reference:
            explicit scores and softmax), ``"xla"`` or ``"cudnn"``
            (`jax.nn.dot_product_attention` with that implementation;
            ``"cudnn"`` is the fused kernel on NVIDIA GPUs), ``"auto"``
            (`jax.nn.dot_product_attention`'s own choice), or ``"blockwise"``
            (queries in blocks of ``attention_block`` under `jax.checkpoint`,
            so the ``[seq, seq]`` scores of a whole layer never exist at once:
            for long sequences on any backend).
        attention_block: Query block of ``attention="blockwise"``.
        dtype: Compute dtype of activations and matmuls.
        param_dtype: Dtype of parameters created by ``init``.

    >>> config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                      num_hidden_layers=2, num_attention_heads=4,
    ...                      num_key_value_heads=2)
    >>> config.head_size, config.kv_heads
    (16, 2)
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str | None = None
    attention: str = "einsum"
    attention_block: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a "
                f"multiple of `num_key_value_heads` ({self.kv_heads}) for "
                "grouped-query attention."
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) is not divisible by "
                f"`num_attention_heads` ({self.num_attention_heads}); pass "
                "`head_dim` explicitly."
            )
        if self.head_size % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {self.head_size}.")
        if self.attention not in ATTENTION:
            raise ValueError(f"`attention` must be one of {ATTENTION}; got {self.attention!r}.")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"`remat_policy` must be None or one of {sorted(REMAT_POLICIES)}; got {self.remat_policy!r}."
            )
        if (
            isinstance(self.attention_block, bool)
            or not isinstance(self.attention_block, int)
            or self.attention_block < 1
        ):
            raise ValueError(f"`attention_block` must be a positive int; got {self.attention_block!r}.")

    @property
    def layer_policy(self) -> Any:
        """The `jax.checkpoint` policy of each layer, or ``None`` when layers are not rematerialised."""
        if self.remat_policy is not None:
            return REMAT_POLICIES[self.remat_policy]
        return REMAT_POLICIES["nothing"] if self.remat else None

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.num_key_value_heads or self.num_attention_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """Returns a copy with some fields changed.

        >>> LlamaConfig(num_hidden_layers=2).replace(scan_layers=True).scan_layers
        True
        """
        return dataclasses.replace(self, **changes)


class KVCache(NamedTuple):
    """Key/value buffers of all layers for incremental decoding.

    Attributes:
        keys: ``[layers, batch, max_length, kv_heads, head_size]``.
        values: Same shape as ``keys``.
        index: int32 scalar, the number of slots already written; the next call
            writes its tokens at ``index, index + 1, ...``.
    """

    keys: Array
    values: Array
    index: Array


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, *, dtype: Any = None) -> KVCache:
    """Returns an empty :class:`KVCache` with room for ``max_length`` tokens.

    Args:
        config: The model's configuration.
        batch_size: Number of sequences decoded together.
        max_length: Number of slots (prompt plus generated tokens).
        dtype: Dtype of the buffers; defaults to ``config.dtype``.

    Returns:
        A cache with zeroed buffers and ``index == 0``.

    >>> cache = init_cache(LlamaConfig(num_hidden_layers=2, hidden_size=64,
    ...                    num_attention_heads=4), 1, 8)
    >>> cache.keys.shape
    (2, 1, 8, 4, 16)
    """
    shape = (config.num_hidden_layers, batch_size, max_length, config.kv_heads, config.head_size)
    dtype = config.dtype if dtype is None else dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32 as Hugging Face computes them."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def _rotary(positions: Array, head_size: int, theta: float) -> tuple[Array, Array]:
    """Cos/sin tables ``[batch, seq, head_size]`` in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` ``[batch, seq, heads, head_size]`` (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def _dense(features: int, config: LlamaConfig, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(_INIT_STD),
        name=name,
    )


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        layer_cache: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, size = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        q = _dense(heads * size, cfg, "q_proj")(x).reshape(batch, length, heads, size)
        k = _dense(kv_heads * size, cfg, "k_proj")(x).reshape(batch, length, kv_heads, size)
        v = _dense(kv_heads * size, cfg, "v_proj")(x).reshape(batch, length, kv_heads, size)
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)

        new_cache = None
        if layer_cache is not None:
            cached_k, cached_v = layer_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
            new_cache = (k, v)
            k, v = k.astype(cfg.dtype), v.astype(cfg.dtype)

        out = _attend(cfg, q, k, v, mask).reshape(batch, length, heads * size)
        return _dense(cfg.hidden_size, cfg, "o_proj")(out), new_cache


def _grouped_attention(q: Array, k: Array, v: Array, mask: Array, dtype: Any) -> Array:
    """Reference attention with explicit scores: ``q`` ``[B, T, H, D]``, ``k``/``v`` ``[B, S, K, D]``,
    ``mask`` broadcastable to ``[B, K, H // K, T, S]``."""
    batch, length, heads, size = q.shape
    kv_heads = k.shape[2]
    # Query head h reads key/value head h // group, as Hugging Face's repeat_kv does;
    # grouping the query heads avoids materialising repeated keys.
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, size)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (size**-0.5)
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads, size)


def _attend(cfg: LlamaConfig, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Attention output ``[B, T, H, D]``; ``mask`` ``[B, 1, 1, T, S]``, or ``None`` for plain causal (T == S)."""
    length, keys = q.shape[1], k.shape[1]
    if cfg.attention in ("xla", "cudnn", "auto"):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=None if mask is None else mask[:, 0],
            is_causal=mask is None,
            implementation=None if cfg.attention == "auto" else cfg.attention,
        )
    if cfg.attention == "einsum" or length <= cfg.attention_block:
        if mask is None:
            mask = jnp.tril(jnp.ones((length, keys), bool))
        return _grouped_attention(q, k, v, mask, cfg.dtype)
    # Blockwise: one block of queries at a time, each recomputed in the backward pass, so a layer's
    # [T, S] scores exist one block at a time (Rabe & Staats 2021 without the key blocking).
    block = cfg.attention_block
    blocks = -(-length // block)
    pad = blocks * block - length
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_blocks = jnp.moveaxis(q_blocks.reshape(q.shape[0], blocks, block, *q.shape[2:]), 1, 0)
    if mask is None:
        slots = jnp.arange(blocks * block).reshape(blocks, block)
        mask_blocks = (jnp.arange(keys)[None, None, :] <= slots[:, :, None])[:, None, None, None]
    else:
        mask_blocks = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        mask_blocks = jnp.moveaxis(mask_blocks.reshape(*mask.shape[:3], blocks, block, keys), 3, 0)
    one = jax.checkpoint(lambda qb, mb: _grouped_attention(qb, k, v, mb, cfg.dtype))
    out = jax.lax.map(lambda args: one(*args), (q_blocks, mask_blocks))  # [blocks, B, block, H, D]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], blocks * block, *q.shape[2:])
    return out[:, :length]


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward block."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residual connections.

    The signature ``(carry, *xs) -> (carry, ys)`` is what ``nn.scan`` expects.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        hidden: Array,
        cos: Array,
        sin: Array,
        mask: Array,
        layer_cache: tuple[Array, Array] | None,
        cache_index: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        attn_out, new_cache = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(hidden), cos, sin, mask, layer_cache, cache_index
        )
        hidden = hidden + attn_out
        hidden = hidden + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(hidden))
        return hidden, new_cache


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (Hugging Face's ``model.*``)."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(_INIT_STD),
        )
        layer_cls = LlamaDecoderLayer
        if cfg.layer_policy is not None:
            # Inside scan the loop boundary already stops CSE, so it can stay on.
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers, policy=cfg.layer_policy)
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers,
            )
            self.layers = scanned(cfg)
        else:
            # A list attribute named `layers` yields modules `layers_0`, `layers_1`, ...
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        mask: Array,
        cache: KVCache | None,
    ) -> tuple[Array, KVCache | None]:
        cfg = self.config
        hidden = self.embed_tokens(input_ids)
        cos, sin = _rotary(positions, cfg.head_size, cfg.rope_theta)
        index = None if cache is None else cache.index
        if cfg.scan_layers:
            layer_caches = None if cache is None else (cache.keys, cache.values)
            hidden, new = self.layers(hidden, cos, sin, mask, layer_caches, index)
        else:
            new = None if cache is None else (cache.keys, cache.values)
            for i, layer in enumerate(self.layers):
                layer_cache = None if new is None else (new[0][i], new[1][i])
                hidden, layer_new = layer(hidden, cos, sin, mask, layer_cache, index)
                if new is not None:
                    # Indexed writes into the stacked buffers let XLA update in place.
                    new = (new[0].at[i].set(layer_new[0]), new[1].at[i].set(layer_new[1]))
        hidden = self.norm(hidden)
        if cache is None:
            return hidden, None
        return hidden, KVCache(new[0], new[1], cache.index + input_ids.shape[1])

    def attend(self, hidden: Array) -> Array:
        """Projects hidden states on the (tied) embedding matrix."""
        return self.embed_tokens.attend(hidden)


class LlamaForCausalLM(nn.Module):
    """Llama decoder with a language-modelling head.

    Call it as ``model.apply(variables, input_ids, positions=..., attention_mask=...,
    cache=...)``:

    * ``input_ids``: int ``[batch, seq]``.
    * ``positions``: int ``[batch, seq]`` rotary positions; defaults to the slot
      of each token (``arange(seq)``, shifted by ``cache.index`` with a cache).
      Pass them explicitly for left-padded batches.
    * ``attention_mask``: ``[batch, keys]`` with 1 for real tokens and 0 for
      padding, where ``keys`` is ``seq`` without a cache and the cache length
      with one. Causality is by slot and is always applied.
    * ``cache``: a :class:`KVCache` from :func:`init_cache`; the new keys and
      values are written at ``cache.index``.

    Returns float32 logits ``[batch, seq, vocab]``, or ``(logits, new_cache)``
    when a cache was given.

    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> ids = jnp.zeros((1, 4), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids).shape
    (1, 4, 32)
    """

    config: LlamaConfig

    def setup(self) -> None:
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config.vocab_size, self.config, "lm_head")

    def __call__(
        self,
        input_ids: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        hidden, new_cache = self._hidden(input_ids, positions, attention_mask, cache)
        if self.config.tie_word_embeddings:
            logits = self.model.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)

    def _hidden(self, input_ids, positions, attention_mask, cache):
        batch, length = input_ids.shape
        offset = 0 if cache is None else cache.index
        keys = length if cache is None else cache.keys.shape[2]
        query_slots = offset + jnp.arange(length)
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (batch, length))
        if attention_mask is not None and attention_mask.shape != (batch, keys):
            raise ValueError(
                f"`attention_mask` must have shape (batch, keys) = {(batch, keys)} "
                f"(keys is the cache length when a cache is given), got "
                f"{attention_mask.shape}."
            )
        if cache is None and attention_mask is None:
            mask = None  # plain causal: each attention implementation applies it its own way
        else:
            mask = jnp.arange(keys)[None, :] <= query_slots[:, None]  # [seq, keys]
            mask = jnp.broadcast_to(mask, (batch, length, keys))
            if attention_mask is not None:
                mask = mask & attention_mask.astype(bool)[:, None, :]
            mask = mask[:, None, None, :, :]  # broadcast over kv heads and groups
        return self.model(input_ids, positions, mask, cache)

    def loss(
        self,
        input_ids: Array,
        *,
        loss_mask: Array | None = None,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        chunk_size: int | None = 1024,
    ) -> Array:
        """Mean next-token cross-entropy, with the logits computed a chunk of tokens at a time.

        Call it as ``model.apply(variables, input_ids, method="loss")`` (or
        through ``lora_jax.wrap(model.apply)(frozen, adapters, input_ids,
        method="loss")``). Position ``t`` predicts token ``t + 1``. The logits
        of at most ``chunk_size`` tokens exist at once, forward and backward
        (`lora_jax.losses.softmax_cross_entropy`), instead of the whole
        batch's ``[batch, seq, vocab]`` float32 logits.

        Args:
            input_ids: int ``[batch, seq]``.
            loss_mask: optional ``[batch, seq]``; 1 where a token is a target
                (the loss counts ``input_ids[:, t]`` if ``loss_mask[:, t]``).
                ``None`` counts every token after the first.
            positions: as in ``__call__``.
            attention_mask: as in ``__call__``.
            chunk_size: tokens per chunk of logits; ``None`` for all at once.

        Returns:
            The float32 mean loss over the counted tokens.
        """
        hidden, _ = self._hidden(input_ids, positions, attention_mask, None)
        if self.is_initializing() and not self.config.tie_word_embeddings:
            self.lm_head(hidden[:, :1])  # creates the head's kernel
        if self.config.tie_word_embeddings:
            head, vocab_first = self.model.embed_tokens.embedding, True
        else:
            head, vocab_first = self.lm_head.variables["params"]["kernel"], False
        weights = None if loss_mask is None else loss_mask[:, 1:]
        return softmax_cross_entropy(
            hidden[:, :-1],
            head,
            input_ids[:, 1:],
            weights=weights,
            chunk_size=chunk_size,
            head_is_vocab_first=vocab_first,
            dtype=self.config.dtype,
        )


# ----------------------------------------------------------------------------
# Parameter paths and layouts
# ----------------------------------------------------------------------------

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_LAYER_RE = re.compile(r"^layers_(\d+)$")


def _as_parts(path: str | Sequence[Any]) -> list[str]:
    if isinstance(path, str):
        parts = [p for p in path.replace(".", "/").split("/") if p]
    else:
        parts = list(path_parts(tuple(path)))  # the library's one rule for key paths
    if parts and parts[0] == "params":
        parts = parts[1:]
    return parts


def hf_key(path: str | Sequence[Any], *, layer: int | None = None) -> str:
    """Maps a parameter path of :class:`LlamaForCausalLM` to its Hugging Face key.

    Args:
        path: ``"params/model/layers_3/self_attn/q_proj/kernel"``, the tuple of
            its parts, or a ``jax.tree_util`` key path. A path that stops at a
            module (no leaf name) gives the module name.
        layer: The layer index, required for paths into a scanned stack
            (``model/layers/...``), whose leaves hold all layers at once.

    Returns:
        The key, e.g. ``"model.layers.3.self_attn.q_proj.weight"``, or the module
        name ``"model.layers.3.self_attn.q_proj"`` for a module path.

    Raises:
        ValueError: If a scanned path is given without ``layer``, or the path is
            not one of this model's.

    >>> hf_key("params/model/layers_3/self_attn/q_proj/kernel")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_key(("model", "layers", "mlp", "up_proj"), layer=0)
    'model.layers.0.mlp.up_proj'
    """
    parts = _as_parts(path)
    if not parts or parts[0] not in ("model", "lm_head"):
        raise ValueError(
            f"`path` {path!r} is not a LlamaForCausalLM parameter path; expected it to "
            "start with 'model' or 'lm_head' (after an optional 'params')."
        )
    out = []
    for i, part in enumerate(parts):
        match = _LAYER_RE.match(part)
        if match:
            out += ["layers", match.group(1)]
        elif part == "layers" and i == 1:
            if layer is None:
                raise ValueError(
                    f"`path` {path!r} points into a scanned layer stack; pass `layer=` "
                    "to say which layer's key you want."
                )
            out += ["layers", str(layer)]
        elif i == len(parts) - 1 and part in _LEAF_TO_HF:
            out.append(_LEAF_TO_HF[part])
        else:
            out.append(part)
    return ".".join(out)


_HF_LEAF = {
    "embed_tokens": "embedding",
    "norm": "scale",
    "input_layernorm": "scale",
    "post_attention_layernorm": "scale",
}


def flax_path(key: str, *, scan_layers: bool = False) -> tuple[tuple[str, ...], int | None]:
    """Maps a Hugging Face Llama key (or module name) to a parameter path.

    Args:
        key: ``"model.layers.3.self_attn.q_proj.weight"`` or a module name such as
            ``"model.layers.3.self_attn.q_proj"``.
        scan_layers: Whether the target tree stacks layers on a leading axis.

    Returns:
        ``(path, layer)``: the path under ``variables`` (starting with
        ``"params"``) and, for a scanned tree, the layer index to take along the
        leading axis (``None`` otherwise or outside the layers).

    >>> flax_path("model.layers.3.mlp.down_proj.weight")
    (('params', 'model', 'layers_3', 'mlp', 'down_proj', 'kernel'), None)
    >>> flax_path("model.layers.3.input_layernorm", scan_layers=True)
    (('params', 'model', 'layers', 'input_layernorm'), 3)
    """
    parts = key.split(".")
    has_leaf = parts[-1] == "weight"
    if has_leaf:
        parts = parts[:-1]
    layer = None
    out: list[str] = ["params"]
    i = 0
    while i < len(parts):
        if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
            layer = int(parts[i + 1])
            out.append("layers" if scan_layers else f"layers_{layer}")
            i += 2
            continue
        out.append(parts[i])
        i += 1
    if has_leaf:
        out.append(_HF_LEAF.get(out[-1], "kernel"))
    return tuple(out), (layer if scan_layers else None)


def _model_subtree(variables: Mapping[str, Any]) -> tuple[dict, bool]:
    has_params = "params" in variables
    params = variables["params"] if has_params else variables
    if "model" not in params:
        raise ValueError(
            "expected a LlamaForCausalLM parameter tree with a 'model' entry (optionally "
            f"under 'params'); got top-level keys {sorted(params)}."
        )
    return dict(params), has_params


def stack_layers(variables: PyTree) -> PyTree:
    """Converts an unscanned parameter tree to the ``scan_layers=True`` layout.

    Args:
        variables: A tree with ``model/layers_0 ... model/layers_{L-1}``, with or
            without the leading ``params`` key.

    Returns:
        The same tree with those entries replaced by ``model/layers`` whose
        leaves have a leading layer axis of size ``L``.

    Raises:
        ValueError: If the tree has no ``layers_i`` entries.

    >>> tree = {"model": {"layers_0": {"w": np.ones(2)}, "layers_1": {"w": np.ones(2)}}}
    >>> stack_layers(tree)["model"]["layers"]["w"].shape
    (2, 2)
    """
    params, has_params = _model_subtree(variables)
    model = dict(params["model"])
    names = sorted((k for k in model if _LAYER_RE.match(k)), key=lambda k: int(k[7:]))
    if not names:
        raise ValueError("`variables` has no 'model/layers_<i>' entries to stack.")
    layers = [model.pop(name) for name in names]
    stack = jnp.stack if isinstance(jax.tree.leaves(layers)[0], jax.Array) else np.stack
    model["layers"] = jax.tree.map(lambda *xs: stack(xs), *layers)
    params["model"] = model
    return {"params": params} if has_params else params


def unstack_layers(variables: PyTree) -> PyTree:
    """Converts a ``scan_layers=True`` parameter tree to the unscanned layout.

    Args:
        variables: A tree with ``model/layers`` holding stacked leaves, with or
            without the leading ``params`` key.

    Returns:
        The same tree with ``model/layers_0 ... model/layers_{L-1}``.

    Raises:
        ValueError: If the tree has no stacked ``model/layers`` entry.

    >>> tree = {"model": {"layers": {"w": np.ones((2, 3))}}}
    >>> sorted(unstack_layers(tree)["model"])
    ['layers_0', 'layers_1']
    """
    params, has_params = _model_subtree(variables)
    model = dict(params["model"])
    if "layers" not in model:
        raise ValueError("`variables` has no stacked 'model/layers' entry to unstack.")
    stacked = model.pop("layers")
    count = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(count):
        model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    params["model"] = model
    return {"params": params} if has_params else params
