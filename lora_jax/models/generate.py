"""Autoregressive generation with a fixed-size KV cache, compiled once per shape.

The prompt is prefilled in one call, then tokens are decoded one at a time
inside ``jax.lax.while_loop``; the whole thing is a single ``jit`` whose cache
key is the prompt shape and the static options, so repeated calls with the same
shapes do not recompile. The parameters are an ordinary argument, so LoRA-
adapted or merged parameters generate without any change, and ``apply_fn``
lets a wrapped forward function (e.g. one that applies adapters on the fly)
stand in for ``model.apply``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache

__all__ = ["generate", "generate_many", "sample_logits"]

PyTree = Any
ApplyFn = Callable[..., Any]


def sample_logits(
    logits: jax.Array,
    key: jax.Array | None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Picks one token per row of ``logits`` ``[batch, vocab]``.

    Args:
        logits: Unnormalised scores.
        key: PRNG key; unused (may be ``None``) when ``temperature == 0``.
        temperature: 0 for greedy (argmax), otherwise the softmax temperature.
        top_k: Keep only the ``top_k`` most likely tokens before sampling.
        top_p: Keep the smallest set of tokens whose probability reaches
            ``top_p`` (nucleus sampling).

    Returns:
        int32 token ids ``[batch]``.

    >>> sample_logits(jnp.array([[0.0, 2.0, 1.0]]), None)
    Array([1], dtype=int32)
    """
    return _sample(logits, key, temperature, top_p, greedy=temperature == 0, top_k=top_k)


def _sample(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float | jax.Array,
    top_p: float | jax.Array | None,
    *,
    greedy: bool,
    top_k: int | None,
) -> jax.Array:
    # `temperature` and `top_p` may be traced, so a new value does not recompile.
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token stays if the mass strictly before it is below top_p, so the
        # most likely token always survives.
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, neg)
        inverse = jnp.argsort(order, axis=-1)
        logits = jnp.take_along_axis(sorted_logits, inverse, axis=-1)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _default_apply(config: LlamaConfig) -> ApplyFn:
    # One function object per config, so generating with a fresh but equal
    # model reuses the compiled program (bound methods compare by instance).
    return LlamaForCausalLM(config).apply


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "config", "max_new_tokens", "greedy", "top_k", "use_top_p"),
)
def _generate(
    params: PyTree,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    apply_fn: ApplyFn,
    config: LlamaConfig,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
) -> jax.Array:
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    cache = init_cache(config, batch, total)
    mask = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt_mask)
    # Left padding: real tokens count positions from 0 wherever they start.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, cache = apply_fn(params, prompt_ids, positions=positions, attention_mask=mask, cache=cache)

    def sample(logits: jax.Array, key: jax.Array) -> jax.Array:
        nucleus = top_p if use_top_p else None
        return _sample(logits, key, temperature, nucleus, greedy=greedy, top_k=top_k)

    def cond(state: tuple) -> jax.Array:
        step, _, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, cache, mask, tokens, done, last_logits, position, key = state
        key, subkey = jax.random.split(key)
        token = jnp.where(done, pad_id, sample(last_logits, subkey))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        done = done | jnp.isin(token, eos_ids)
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((batch, 1), jnp.int32), (0, prompt_len + step))
        logits, cache = apply_fn(params, token[:, None], positions=position[:, None], attention_mask=mask, cache=cache)
        return step + 1, cache, mask, tokens, done, logits[:, -1], position + 1, key

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (
        jnp.zeros((), jnp.int32),
        cache,
        mask,
        tokens,
        jnp.zeros((batch,), bool),
        logits[:, -1],
        positions[:, -1] + 1,
        key,
    )
    return jax.lax.while_loop(cond, body, state)[3]


def generate(
    model: LlamaForCausalLM,
    params: PyTree,
    prompt_ids: Sequence[int] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prompt_mask: np.ndarray | jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    apply_fn: ApplyFn | None = None,
) -> jax.Array:
    """Generates tokens after a prompt, greedily or by sampling.

    Args:
        model: The :class:`LlamaForCausalLM` (its config sizes the cache).
        params: The variables passed to ``apply_fn`` (``{"params": ...}`` for
            ``model.apply``), e.g. merged LoRA weights.
        prompt_ids: ``[seq]`` or ``[batch, seq]`` token ids; batches of unequal
            prompts must be left-padded and described by ``prompt_mask``.
        max_new_tokens: Number of tokens to generate (the cache holds
            ``seq + max_new_tokens`` slots).
        eos_token_id: Id or ids that end a sequence; generation stops once every
            sequence has produced one. ``None`` generates ``max_new_tokens``.
        pad_token_id: Written after a sequence has ended; defaults to the first
            EOS id, or 0.
        prompt_mask: ``[batch, seq]`` 1 for prompt tokens, 0 for left padding.
        temperature: 0 for greedy decoding, otherwise the sampling temperature.
        top_k: Sample among the ``top_k`` most likely tokens.
        top_p: Nucleus sampling threshold.
        key: PRNG key, required when ``temperature > 0``.
        apply_fn: ``apply_fn(params, input_ids, *, positions, attention_mask,
            cache) -> (logits, cache)``; defaults to ``model.apply``. Pass a
            function defined once (not a fresh lambda per call) so the compiled
            program is reused: the program is cached per prompt shape,
            ``max_new_tokens``, ``apply_fn``, greedy-or-not, ``top_k`` and
            whether ``top_p`` is set; new ``temperature``/``top_p`` values and
            new parameters reuse it.

    Returns:
        int32 ids ``[batch, max_new_tokens]`` (``[max_new_tokens]`` for a 1-D
        prompt), the EOS token included and ``pad_token_id`` after it.

    Raises:
        ValueError: If the prompt is not 1-D/2-D, the mask's shape differs, a
            prompt row is all padding or right-padded, or sampling lacks a key.

    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> generate(model, variables, [1, 2, 3], max_new_tokens=4).shape
    (4,)
    """
    ids = jnp.asarray(prompt_ids, jnp.int32)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"`prompt_ids` must be a non-empty [seq] or [batch, seq], got {ids.shape}.")
    if prompt_mask is None:
        mask = jnp.ones(ids.shape, jnp.int32)
    else:
        mask = jnp.asarray(prompt_mask, jnp.int32).reshape(ids.shape if not squeeze else (1, -1))
        if mask.shape != ids.shape:
            raise ValueError(f"`prompt_mask` has shape {mask.shape}; expected {ids.shape}.")
        host_mask = np.asarray(mask)
        if not host_mask[:, -1].all():
            raise ValueError(
                "`prompt_mask` marks the last prompt position as padding; pad prompts on "
                "the left so every row ends with a real token."
            )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("sampling (`temperature > 0`) needs a PRNG `key`, e.g. jax.random.key(0).")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"`top_k` must be in [1, vocab_size], got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")

    if eos_token_id is None:
        eos = [-1]  # matches no token
    elif isinstance(eos_token_id, int):
        eos = [eos_token_id]
    else:
        eos = [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = max(eos[0], 0)
    tokens = _generate(
        params,
        ids,
        mask,
        jax.random.key(0) if key is None else key,
        jnp.asarray(eos, jnp.int32),
        jnp.asarray(pad_token_id, jnp.int32),
        jnp.asarray(max(temperature, 1e-6), jnp.float32),  # unused when greedy
        jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        apply_fn=_default_apply(model.config) if apply_fn is None else apply_fn,
        config=model.config,
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        top_k=top_k,
        use_top_p=top_p is not None,
    )
    return tokens[0] if squeeze else tokens


def generate_many(
    model: LlamaForCausalLM,
    params: PyTree,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    batch_size: int = 16,
    length_multiple: int = 16,
    apply_fn: ApplyFn | None = None,
) -> list[list[int]]:
    """Greedy continuations of prompts of any lengths, in fixed-size batches.

    Prompts are left-padded to a multiple of ``length_multiple`` (so a few
    shapes cover them all and the compiled program is reused) and the last
    batch is filled with copies of its first prompt; each continuation is
    cut before its first ``eos_token_id``.

    Args:
        model: The :class:`LlamaForCausalLM`.
        params: The variables for ``apply_fn``.
        prompts: Token id lists, at least one, each non-empty.
        max_new_tokens: Tokens generated per prompt.
        pad_token_id: Id written into the left padding.
        eos_token_id: End-of-sequence id, or ``None``.
        batch_size: Prompts per call to :func:`generate`.
        length_multiple: Padded prompt lengths are multiples of this.
        apply_fn: As for :func:`generate`.

    Returns:
        One list of generated ids per prompt, in order, without the EOS token.

    Raises:
        ValueError: If ``prompts`` or a prompt is empty, or ``batch_size`` is not positive.

    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> [len(t) for t in generate_many(model, variables, [[1, 2], [3]], max_new_tokens=3, pad_token_id=0)]
    [3, 3]
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty token id lists.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        length = -(-max(len(p) for p in chunk) // length_multiple) * length_multiple
        ids = np.full((batch_size, length), pad_token_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, prompt in enumerate(chunk):
            ids[i, length - len(prompt) :] = prompt
            mask[i, length - len(prompt) :] = 1
        tokens = generate(
            model, params, ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, prompt_mask=mask, apply_fn=apply_fn,
        )  # fmt: skip
        for row in np.asarray(tokens)[:real]:
            row = [int(t) for t in row]
            out.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return out
