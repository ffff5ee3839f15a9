"""Cross-entropy from hidden states, in chunks, so whole-batch logits never exist.

A language model's last step, ``logits = hidden @ head`` followed by a
softmax over the vocabulary, makes the largest activation of a training
step: for a batch of 8 × 1024 tokens and a 32,000-token vocabulary the
float32 logits alone take 1 GiB, and their softmax and gradient as much
again. `softmax_cross_entropy` computes the same loss a chunk of tokens at
a time, under `jax.checkpoint`, so only one chunk's logits exist at once in
the forward pass and again in the backward pass. It works the same through
`lora_jax.wrap` (an adapted head stays factored).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

__all__ = ["softmax_cross_entropy"]

Reduction = Literal["mean", "sum", "none"]


def _nll(hidden: jax.Array, head: jax.Array, labels: jax.Array, head_is_vocab_first: bool, dtype: Any) -> jax.Array:
    """Negative log-likelihood of ``labels`` for one chunk of tokens ``[n, d]``."""
    contract = 1 if head_is_vocab_first else 0
    logits = jax.lax.dot_general(
        hidden.astype(dtype),
        head.astype(dtype),
        (((1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return log_z - picked


def softmax_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    chunk_size: int | None = 1024,
    head_is_vocab_first: bool = False,
    dtype: Any = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Softmax cross-entropy of ``hidden @ head`` against integer labels, a chunk at a time.

    Equal to ``optax.softmax_cross_entropy_with_integer_labels(hidden @ head,
    labels)`` with the logits in float32, but the logits of at most
    ``chunk_size`` tokens exist at any time, forward and backward: each chunk
    is recomputed in the backward pass (`jax.checkpoint`) instead of stored.

    Args:
      hidden: ``[..., d]`` final hidden states (after the last norm).
      head: the output projection, ``[d, vocab]``, or ``[vocab, d]`` with
        ``head_is_vocab_first=True`` (a tied input embedding).
      labels: integer ``[...]`` target token of each position.
      weights: optional ``[...]`` weight of each position (a loss mask: 0
        for prompt or padding tokens).
      chunk_size: tokens per chunk; ``None`` computes all logits at once.
      head_is_vocab_first: whether ``head`` is ``[vocab, d]``.
      dtype: dtype of the matmul inputs (default: ``hidden``'s); the logits
        and the softmax are always float32.
      reduction: ``"mean"`` (weighted mean over positions; 0 when every
        weight is 0), ``"sum"``, or ``"none"`` (``[...]`` per-position losses,
        already multiplied by ``weights``).

    Returns:
      The loss: a float32 scalar, or ``[...]`` for ``reduction="none"``.

    Raises:
      ValueError: shapes that do not fit together, a non-positive
        ``chunk_size``, or an unknown ``reduction``.
      TypeError: non-integer ``labels``.

    >>> import jax.numpy as jnp
    >>> hidden, head = jnp.ones((2, 5, 4)), jnp.zeros((4, 11))
    >>> float(softmax_cross_entropy(hidden, head, jnp.zeros((2, 5), jnp.int32), chunk_size=3))  # log(11)
    2.397895...
    """
    if hidden.ndim < 1 or head.ndim != 2:
        raise ValueError(
            f"softmax_cross_entropy: `hidden` must be [..., d] and `head` [d, vocab] (or [vocab, d] with "
            f"head_is_vocab_first=True); got hidden {hidden.shape} and head {head.shape}."
        )
    d = hidden.shape[-1]
    head_d = head.shape[1] if head_is_vocab_first else head.shape[0]
    if head_d != d:
        hint = "" if head.shape[1 - int(head_is_vocab_first)] != d else " Flip `head_is_vocab_first`."
        raise ValueError(
            f"softmax_cross_entropy: `hidden` has width {d} but `head` {head.shape} has {head_d} on its "
            f"{'second' if head_is_vocab_first else 'first'} axis.{hint}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"softmax_cross_entropy: `labels` must have hidden's leading shape {hidden.shape[:-1]}; got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax_cross_entropy: `labels` must be integer token ids; got dtype {labels.dtype}.")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"softmax_cross_entropy: `weights` must have shape {labels.shape}; got {weights.shape}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"softmax_cross_entropy: `chunk_size` must be a positive int or None; got {chunk_size!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"softmax_cross_entropy: `reduction` must be 'mean', 'sum' or 'none'; got {reduction!r}.")

    dtype = hidden.dtype if dtype is None else dtype
    n = math.prod(labels.shape)
    flat_hidden, flat_labels = hidden.reshape(n, d), labels.reshape(n)
    if chunk_size is None or chunk_size >= n:
        nll = _nll(flat_hidden, head, flat_labels, head_is_vocab_first, dtype)
    else:
        chunks = -(-n // chunk_size)
        pad = chunks * chunk_size - n
        # Padded positions get label 0 and are cut off below; they cost one partial chunk at most.
        flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0))).reshape(chunks, chunk_size, d)
        flat_labels = jnp.pad(flat_labels, (0, pad)).reshape(chunks, chunk_size)
        chunk_nll = jax.checkpoint(lambda h, y: _nll(h, head, y, head_is_vocab_first, dtype))
        nll = jax.lax.map(lambda args: chunk_nll(*args), (flat_hidden, flat_labels)).reshape(-1)[:n]
    nll = nll.reshape(labels.shape)
    if weights is not None:
        nll = nll * weights.astype(jnp.float32)
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    count = jnp.float32(n) if weights is None else weights.astype(jnp.float32).sum()
    return total / jnp.maximum(count, jnp.finfo(jnp.float32).tiny)
