"""Many LoRA adapters in one batch: each example runs with its own adapter.

`stack_adapters` puts N adapter trees of one frozen model on a new leading
"adapter" axis (plus an all-zero slot for the base model), and
`wrap_many(apply_fn)` runs ``apply_fn`` on a batch in which example ``b``
uses adapter ``adapter_ids[b]``:

    >>> stacked = stack_adapters([adapters_a, adapters_b], rank=16)  # doctest: +SKIP
    >>> serve = jax.jit(wrap_many(model.apply))                      # doctest: +SKIP
    >>> logits = serve(frozen, stacked, jnp.array([0, 1, -1]), ids)  # doctest: +SKIP

How it runs: the factors of each example's adapter are gathered from the
stack (``[batch, ...]``), and `lora_jax.wrap`'s function is `jax.vmap`-ed over
the batch. The frozen weights are not mapped, so each base matmul stays one
matmul over the whole batch; the low-rank path ``s·(x A_b) B_b`` becomes a
batched matmul over the gathered factors. No merged weight ``W + s·A@B`` is
formed, per adapter or per example, and the cost over the base model is the
low-rank path alone.

Swapping adapters does not recompile: the stack's shapes depend only on the
number of adapters, the common rank (fix it with ``rank=``) and the model, and
its static metadata not at all on the adapters' scales (each ``scale`` is
folded into its ``B``). The ids are an ordinary array argument.

References:
  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
  Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters"
  (gathering each request's factors rather than merging them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree
from lora_jax._transform import wrap
from lora_jax._tree import LoraFactors

__all__ = ["BASE_MODEL", "StackedAdapters", "stack_adapters", "wrap_many"]

PyTree = Any

BASE_MODEL = -1
"""The adapter id that runs an example on the frozen model alone (the stack's all-zero slot)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedAdapters:
    """N adapters of one frozen model, stacked for `wrap_many`.

    ``adapters`` has the structure of one adapter tree from `lora_jax.split`,
    with a `LoraFactors` at each target whose ``lora_a`` is
    ``[N + 1, *A_shape[:-1], rank]`` and ``lora_b`` ``[N + 1, *B_shape]``
    with ``rank`` at the B's rank axis: entry ``i < N`` is adapter ``i``, its
    rank zero-padded to the common rank and its ``scale`` folded into
    ``lora_b``; entry ``N`` is all zeros, the base model (id ``-1``). Every
    `LoraFactors` in it has ``scale=1.0`` and ``dropout=0.0``; its axes
    metadata describe one entry, so `lora_jax.merge`/`lora_jax.wrap` take
    ``jax.tree.map(lambda x: x[i], stacked.adapters)``, not the stack itself.

    ``count`` (N) is static pytree metadata; the arrays are the leaves.

    >>> import jax, jax.numpy as jnp, lora_jax as lora
    >>> frozen, ad = lora.split({"w": jnp.ones((4, 6))}, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> stacked = stack_adapters([ad, ad, ad])
    >>> stacked.count, stacked.adapters["w"].lora_a.shape
    (3, (4, 4, 2))
    """

    adapters: PyTree
    count: int = dataclasses.field(metadata=dict(static=True))


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def stack_adapters(adapters_list: Sequence[PyTree], *, rank: int | None = None) -> StackedAdapters:
    """Stacks adapters of one frozen model for serving them in one batch.

    Each adapter's rank is zero-padded to a common rank, which leaves its
    delta ``s·A@B`` unchanged (the new rank directions are zero in both
    ``A`` and ``B``). Its ``scale`` is folded into its ``B`` (``B·s``,
    computed in float32 and cast back to ``B``'s dtype) and the stack keeps
    ``scale=1.0``, so adapters with different ``alpha`` or rsLoRA settings
    mix, and the stack's structure does not depend on them. An all-zero entry
    for the base model goes last.

    Fix ``rank`` to the largest rank you will serve: then swapping one
    adapter for another, of any rank up to it, gives arrays of the same
    shapes and dtypes and a jitted `wrap_many` call does not recompile.

    The adapters must come from `lora_jax.split` of the same frozen params,
    with an init that leaves the frozen tree untouched (not ``"pissa"`` or
    ``"olora"``, whose frozen tree is a per-adapter residual: that cannot be
    checked here). Fully trained leaves (``LoraSpec(train=...)``) are refused:
    serving them would take one full copy of the leaf per adapter. So are
    DoRA adapters (``use_dora=True``).

    Args:
      adapters_list: N >= 1 adapter trees from `lora_jax.split`, trained or
        not, with the same paths, layouts and dtypes; ranks and scales may
        differ.
      rank: the common rank; defaults to the largest rank at each target.
        Must be at least every adapter's rank.

    Returns:
      A `StackedAdapters` with ``count == N``; adapter ``i`` is id ``i``, and
      id ``-1`` (`BASE_MODEL`) is the base model.

    Raises:
      ValueError: ``adapters_list`` is empty; the trees differ in paths,
        layouts, shapes or dtypes (the message names the path and the
        adapter); one holds a fully trained array or is a DoRA adapter; or
        ``rank`` is smaller than an adapter's rank.
      TypeError: an entry is not an adapter tree, or ``rank`` not an int.

    >>> import jax, jax.numpy as jnp, lora_jax as lora
    >>> params = {"w": jnp.ones((8, 16))}
    >>> _, ad2 = lora.split(params, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> _, ad4 = lora.split(params, lora.LoraSpec(rank=4, alpha=8, targets="w"), key=jax.random.key(1))
    >>> stacked = stack_adapters([ad2, ad4], rank=8)
    >>> stacked.adapters["w"].lora_a.shape, stacked.adapters["w"].lora_b.shape, stacked.adapters["w"].scale
    ((3, 8, 8), (3, 8, 16), 1.0)
    """
    if isinstance(adapters_list, dict) or not isinstance(adapters_list, Sequence) or not adapters_list:
        raise ValueError(
            "stack_adapters: `adapters_list` must be a non-empty list of adapter trees from lora_jax.split; got "
            + (
                f"an empty {type(adapters_list).__name__}."
                if not adapters_list
                else f"a {type(adapters_list).__name__}."
            )
            + " Pass [adapters] for a single adapter."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))):
        raise TypeError(f"stack_adapters: `rank` must be an int or None; got {type(rank).__name__}.")
    if rank is not None and rank < 1:
        raise ValueError(f"stack_adapters: `rank` must be >= 1; got {rank}.")

    flats = []
    for i, adapters in enumerate(adapters_list):
        try:
            _tree.adapter_entries(adapters)
        except TypeError as e:
            raise TypeError(f"stack_adapters: adapters_list[{i}]: {e}") from None
        flat, treedef = _tree._flatten(adapters, is_leaf=_tree._is_factors)
        for path, _, x in flat:
            if not isinstance(x, LoraFactors):
                raise ValueError(
                    f"stack_adapters: adapters_list[{i}] holds a fully trained array at {path!r} (shape "
                    f"{np.shape(x)}), not LoraFactors. Serving one full copy of a leaf per adapter is not "
                    "supported: split without LoraSpec(train=...) for adapters served together, or serve that "
                    "adapter on its own with lora_jax.merge."
                )
            if x.magnitude is not None:
                raise ValueError(
                    f"stack_adapters: adapters_list[{i}] is a DoRA adapter (LoraSpec(use_dora=True): a magnitude at "
                    f"{path!r}); serving DoRA adapters in one batch is not supported, since the base model and "
                    "plain LoRA adapters in the same stack would need magnitudes of their own. Serve it on its own "
                    "with lora_jax.wrap or lora_jax.merge."
                )
        flats.append((flat, treedef))

    first_flat, first_def = flats[0]
    first_paths = [p for p, _, _ in first_flat]
    for i, (flat, treedef) in enumerate(flats[1:], start=1):
        paths = [p for p, _, _ in flat]
        if treedef != first_def or paths != first_paths:
            missing = sorted(set(first_paths) - set(paths))
            extra = sorted(set(paths) - set(first_paths))
            where = f"it lacks {missing[:3]}" if missing else f"it has {extra[:3]}" if extra else "its nesting differs"
            raise ValueError(
                f"stack_adapters: adapters_list[{i}] does not have the paths of adapters_list[0]: {where}. "
                "Stacked adapters must adapt the same weights of the same frozen params: split each with the "
                "same LoraSpec targets (ranks and alphas may differ)."
            )

    commons, rank_axes, scales = [], [], []
    for j, (path, _, f0) in enumerate(first_flat):
        group = [flat[j][2] for flat, _ in flats]
        ranks = [f.rank for f in group]
        common = max(ranks) if rank is None else int(rank)
        for i, f in enumerate(group):
            _check_same_layout(path, i, f, f0)
            if f.rank > common:
                raise ValueError(
                    f"stack_adapters: adapters_list[{i}] has rank {f.rank} at {path!r}, more than rank={common}. "
                    f"Pass rank >= {max(ranks)} (the largest rank served), or None for the largest at each target."
                )
        commons.append(common)
        rank_axes.append(len(f0.stack_axes))
        scales.append([f.scale for f in group])
    factors = [[(flat[j][2].lora_a, flat[j][2].lora_b) for flat, _ in flats] for j in range(len(first_flat))]
    stacked = _stack(factors, jnp.asarray(scales, jnp.float32), tuple(commons), tuple(rank_axes))
    leaves = [
        LoraFactors(a, b, scale=1.0, stack_axes=f0.stack_axes, a_axes=f0.a_axes, b_axes=f0.b_axes, dropout=0.0)
        for (a, b), (_, _, f0) in zip(stacked, first_flat)
    ]
    return StackedAdapters(jax.tree_util.tree_unflatten(first_def, leaves), len(adapters_list))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _stack(factors: list, scales: jax.Array, ranks: tuple[int, ...], rank_axes: tuple[int, ...]) -> list:
    # One program for the whole tree rather than a few small ones per target; the scales are an
    # argument, so restacking with adapters of other alphas reuses it.
    out = []
    for group, scale, rank, rank_b in zip(factors, scales, ranks, rank_axes):
        a_parts, b_parts = [], []
        for (a, b), s in zip(group, scale):
            b = (b.astype(jnp.promote_types(b.dtype, jnp.float32)) * s).astype(b.dtype)
            a_parts.append(_pad_rank(a, a.ndim - 1, rank))
            b_parts.append(_pad_rank(b, rank_b, rank))
        a_parts.append(jnp.zeros_like(a_parts[0]))
        b_parts.append(jnp.zeros_like(b_parts[0]))
        out.append((jnp.stack(a_parts), jnp.stack(b_parts)))
    return out


def _check_same_layout(path: str, i: int, f: LoraFactors, f0: LoraFactors) -> None:
    if _tree.layout_without_rank(f) != _tree.layout_without_rank(f0):
        raise ValueError(
            f"stack_adapters: adapters_list[{i}] at {path!r} has lora_a {tuple(f.lora_a.shape)}, lora_b "
            f"{tuple(f.lora_b.shape)} (axes stack={f.stack_axes}, a={f.a_axes}, b={f.b_axes}), which does not "
            f"match adapters_list[0]'s lora_a {tuple(f0.lora_a.shape)}, lora_b {tuple(f0.lora_b.shape)} (axes "
            f"stack={f0.stack_axes}, a={f0.a_axes}, b={f0.b_axes}) apart from the rank. Stacked adapters must "
            "come from lora_jax.split of the same frozen params."
        )
    if (f.lora_a.dtype, f.lora_b.dtype) != (f0.lora_a.dtype, f0.lora_b.dtype):
        raise ValueError(
            f"stack_adapters: adapters_list[{i}] at {path!r} has factors of dtype {f.lora_a.dtype}/{f.lora_b.dtype} "
            f"but adapters_list[0] has {f0.lora_a.dtype}/{f0.lora_b.dtype}. Cast them to one dtype first, e.g. "
            "jax.tree.map(lambda x: x.astype(jnp.float32), adapters)."
        )


class _Axis:
    """A batch axis attached to one leaf (a wrapper, so ``None`` stays a leaf)."""

    __slots__ = ("axis",)

    def __init__(self, axis: int | None):
        self.axis = axis


def _is_axis(x: Any) -> bool:
    return isinstance(x, _Axis)


def _leaf_axes(axes: Any, tree: Any, name: str) -> list[int | None]:
    """One axis per leaf of ``tree``, from ``axes``, a pytree prefix of it (as `jax.vmap`'s ``in_axes``)."""
    try:
        per_leaf = jax.tree.map(
            lambda ax, sub: jax.tree.map(lambda _: _Axis(ax), sub), axes, tree, is_leaf=lambda x: x is None
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"wrap_many: `{name}`={axes!r} is not a pytree prefix of the arguments it describes "
            f"({jax.tree.structure(tree)}): {e}. Give an int or None for all of them, or a tuple with one entry "
            "per argument."
        ) from None
    out = [a.axis for a in jax.tree.leaves(per_leaf, is_leaf=_is_axis)]
    for ax in out:
        if ax is not None and (isinstance(ax, bool) or not isinstance(ax, (int, np.integer))):
            raise TypeError(f"wrap_many: `{name}` entries must be ints or None; got {ax!r}.")
    return out


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _adapter_index(adapter_ids: jax.Array, count: int) -> jax.Array:
    """Index into the stack: ``-1`` -> the zero slot ``count``; an invalid id -> ``count + 1`` (out of range)."""
    valid = (adapter_ids >= 0) & (adapter_ids < count)
    return jnp.where(adapter_ids == BASE_MODEL, count, jnp.where(valid, adapter_ids, count + 1))


def wrap_many(
    apply_fn: Callable[..., Any],
    *,
    in_axes: Any = 0,
    kwargs_axes: int | None | Mapping[str, Any] = 0,
    out_axes: Any = 0,
    strict: bool = False,
) -> Callable[..., Any]:
    """Turns ``apply_fn(params, *args)`` into ``f(frozen, stacked, adapter_ids, *args)`` over many adapters.

    Example ``b`` of the batch is computed as
    ``lora_jax.wrap(apply_fn)(frozen, adapter_{adapter_ids[b]}, example_b)``,
    or ``apply_fn(frozen, example_b)`` where the id is ``-1``, all in one
    call. ``apply_fn`` sees each example as a batch of one: the batch axis
    of size 1 is kept where ``in_axes`` puts it, and removed from its
    outputs where ``out_axes`` says. Wrap the result in `jax.jit` for one
    compiled program; new adapters of the same stacked shapes and new ids
    reuse it.

    Array arguments are batched; other leaves (Python numbers, strings,
    ``None``) are passed to ``apply_fn`` as static values, as in
    `lora_jax.wrap`. The batch computation is `jax.vmap`, so ``apply_fn``
    must treat the examples of a batch independently (no batch statistics).

    Args:
      apply_fn: a function whose first argument is the params tree (for
        example ``model.apply``).
      in_axes: the batch axis of each positional argument after
        ``adapter_ids``, as in `jax.vmap`: an int, ``None`` (the argument is
        shared by the whole batch), or a tuple with one pytree prefix per
        argument.
      kwargs_axes: the batch axis of keyword arguments: an int or ``None``
        for all, or a dict from keyword to a pytree prefix of its value
        (keywords it does not name are batched on axis 0). For example a
        Llama KV cache ``[layers, batch, ...]`` with a shared ``index`` is
        ``{"cache": KVCache(1, 1, None)}``.
      out_axes: where the batch axis of each output goes, as in `jax.vmap`;
        ``apply_fn`` returns it there with size 1. ``None`` marks an output
        that is the same for every example (such as a cache index).
      strict: as in `lora_jax.wrap`: raise if an adapted weight would be
        formed in full.

    Returns:
      ``served(frozen, stacked, adapter_ids, *args, **kwargs)``, with
      ``frozen`` from `lora_jax.split`, ``stacked`` from `stack_adapters`
      and ``adapter_ids`` an integer ``[batch]`` array: adapter ``i`` for
      ``0 <= i < stacked.count``, ``-1`` for the base model. The outputs are
      ``apply_fn``'s, batched along ``out_axes``.

      Ids out of range raise when they are concrete (a NumPy array, or a JAX
      array outside `jax.jit`). Under `jax.jit` they cannot be checked: an
      example with such an id gets NaN factors, so its float outputs are NaN
      (and only its), rather than silently another adapter's or the base
      model's.

    Raises:
      TypeError: (when called) ``stacked`` is not a `StackedAdapters`, or
        ``adapter_ids`` is not an integer array.
      ValueError: (when called) ``adapter_ids`` is not ``[batch]`` with the
        batch size of the batched arguments, a concrete id is out of range,
        an axes option does not fit the arguments, an output lacks its
        size-1 batch axis, or the adapters do not belong to ``frozen``.

    >>> import jax, jax.numpy as jnp, lora_jax as lora
    >>> frozen, ad = lora.split({"w": jnp.ones((3, 4))}, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> ad["w"].lora_b = jnp.ones((2, 4))
    >>> served = jax.jit(wrap_many(lambda p, x: x @ p["w"]))
    >>> y = served(frozen, stack_adapters([ad]), jnp.array([0, -1]), jnp.ones((2, 3)))
    >>> y.shape, bool((y[0] != y[1]).all())
    ((2, 4), True)
    """
    if not callable(apply_fn):
        raise TypeError(f"wrap_many: `apply_fn` must be callable; got {type(apply_fn).__name__}.")
    wrapped = wrap(apply_fn, strict=strict)

    def served(frozen: PyTree, stacked: StackedAdapters, adapter_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(stacked, StackedAdapters):
            raise TypeError(
                f"wrap_many: `stacked` must be the StackedAdapters from lora_jax.serving.stack_adapters; got "
                f"{type(stacked).__name__}. For one adapter tree, use stack_adapters([adapters])."
            )
        ids = _check_ids(adapter_ids, stacked.count)

        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        kw_axes = {k: kwargs_axes.get(k, 0) for k in kwargs} if isinstance(kwargs_axes, Mapping) else kwargs_axes
        axes = _leaf_axes(in_axes if isinstance(in_axes, (int, type(None))) else tuple(in_axes), args, "in_axes")
        axes += _leaf_axes(kw_axes, kwargs, "kwargs_axes")
        dynamic = [_is_dynamic(x) for x in leaves]
        dyn = [x for x, d in zip(leaves, dynamic) if d]
        dyn_axes = [ax for ax, d in zip(axes, dynamic) if d]
        static = [None if d else x for x, d in zip(leaves, dynamic)]

        batch = ids.shape[0]
        for x, ax in zip(dyn, dyn_axes):
            if ax is None:
                continue
            if not -np.ndim(x) <= ax < np.ndim(x) or np.shape(x)[ax] != batch:
                raise ValueError(
                    f"wrap_many: `adapter_ids` has {batch} entries (one per example) but an argument of shape "
                    f"{np.shape(x)} has batch axis {ax}"
                    + (f" of size {np.shape(x)[ax]}" if -np.ndim(x) <= ax < np.ndim(x) else " (out of range)")
                    + ". Give one id per example, and in_axes/kwargs_axes where an argument's batch axis is "
                    "not 0 (None for one shared by all examples)."
                )

        index = _adapter_index(ids, stacked.count)
        gathered = jax.tree.map(lambda x: jnp.take(x, index, axis=0, mode="fill", fill_value=jnp.nan), stacked.adapters)

        def one(adapters: PyTree, xs: list) -> Any:
            it = iter(jnp.expand_dims(x, ax) if ax is not None else x for x, ax in zip(xs, dyn_axes))
            a, kw = jax.tree_util.tree_unflatten(treedef, [next(it) if d else s for s, d in zip(static, dynamic)])
            out = wrapped(frozen, adapters, *a, **kw)
            out_leaves, out_def = jax.tree_util.tree_flatten(out)
            per_leaf = _leaf_axes(out_axes, out, "out_axes")
            return jax.tree_util.tree_unflatten(out_def, [_unbatch(y, ax) for y, ax in zip(out_leaves, per_leaf)])

        return jax.vmap(one, in_axes=(0, dyn_axes), out_axes=out_axes)(gathered, dyn)

    return served


def _unbatch(y: Any, axis: int | None) -> Any:
    if axis is None:
        return y
    if not -np.ndim(y) <= axis < np.ndim(y) or np.shape(y)[axis] != 1:
        raise ValueError(
            f"wrap_many: an output of apply_fn has shape {np.shape(y)} for one example, but out_axes puts its "
            f"batch axis at {axis}, which should have size 1 there. Set out_axes to where apply_fn returns the "
            "batch axis (None for an output shared by all examples)."
        )
    return jnp.squeeze(y, axis)


def _check_ids(adapter_ids: Any, count: int) -> jax.Array:
    if isinstance(adapter_ids, (list, tuple)):
        adapter_ids = np.asarray(adapter_ids)
    if not hasattr(adapter_ids, "dtype") or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
        raise TypeError(
            "wrap_many: `adapter_ids` must be an integer array with one adapter id per example (-1 for the base "
            f"model); got {getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}. "
            "Use jnp.asarray(ids, jnp.int32)."
        )
    if np.ndim(adapter_ids) != 1:
        raise ValueError(
            f"wrap_many: `adapter_ids` must be 1-D, [batch]; got shape {np.shape(adapter_ids)}. "
            "Give one id per example of the batch."
        )
    if not isinstance(adapter_ids, jax.core.Tracer):
        host = np.asarray(adapter_ids)
        bad = host[(host < BASE_MODEL) | (host >= count)]
        if bad.size:
            raise ValueError(
                f"wrap_many: `adapter_ids` holds {sorted(set(bad.tolist()))[:5]}, out of range: the stack has "
                f"{count} adapters, ids 0..{count - 1}, and -1 for the base model."
            )
    return jnp.asarray(adapter_ids, jnp.int32)
