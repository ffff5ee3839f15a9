"""Adapter arithmetic: exact weighted sums of adapters, and truncation to a lower rank.

Both work on adapter trees as `lora_jax.split` returns them: nested dicts
holding a `LoraFactors` at each adapted weight and a plain array at each
leaf that trains in full.

* `add_weighted` combines several adapters into one whose delta is exactly
  ``Σ w_i·s_i·A_i@B_i`` (task arithmetic, adapter soups), by stacking their
  factors along the rank axis: the ranks add up.
* `truncate` brings an adapter back to a given rank with the best
  approximation of its delta (Eckart-Young), computed from QR
  decompositions of the thin factors and the SVD of a small core, never
  from the full ``[in, out]`` delta.

References:
    Ilharco et al. 2023, "Editing Models with Task Arithmetic".
    Eckart and Young 1936, "The approximation of one matrix by another of
    lower rank".
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._spec import path_to_str
from lora_jax._tree import LoraFactors, layout_without_rank

__all__ = ["add_weighted", "truncate"]

PyTree = Any

# How far from 1 the weights' sum may be for the weighted sum of fully trained leaves to count as an average.
_SUM_TO_ONE_TOLERANCE = 1e-6


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _entries(caller: str, name: str, tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    """``[(path, LoraFactors or array)]`` in tree order, and the treedef to rebuild the tree."""
    if not isinstance(tree, dict):
        raise TypeError(
            f"{caller}: {name} must be an adapter tree returned by lora_jax.split (a dict); got {type(tree).__name__}."
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_factors)
    entries = [(path_to_str(p), x) for p, x in flat]
    if not any(_is_factors(x) for _, x in entries):
        raise ValueError(
            f"{caller}: {name} holds no LoraFactors (paths: {[p for p, _ in entries][:5]}); it looks like a "
            "parameter tree rather than an adapter tree. Pass the adapter tree returned by lora_jax.split."
        )
    dora = [p for p, x in entries if _is_factors(x) and x.magnitude is not None]
    if dora:
        raise ValueError(
            f"{caller}: {name} holds DoRA adapters (with a magnitude) at {dora[:3]}; a DoRA weight m·V/||V|| is not "
            "a sum of low-rank deltas, so it cannot be added or truncated as one. Merge them instead."
        )
    return entries, treedef


def add_weighted(adapters_list: Sequence[PyTree], weights: Sequence[float], *, base: PyTree | None = None) -> PyTree:
    """One adapter tree whose delta is exactly ``Σ w_i·s_i·A_i@B_i`` at every path.

    At each adapted weight the factors are concatenated along the rank
    axis: ``A = [A_1 … A_n]`` and ``B = [c_1·B_1; …; c_n·B_n]`` with
    ``c_i = w_i·s_i / s``, where ``s``, the scale of the result, is the
    first tree's scale at that path. So ``s·A@B = Σ w_i·s_i·A_i@B_i`` with
    no approximation, and the rank is the sum of the ranks (use `truncate`
    to bring it down). With equal scales, ``B_i`` is just multiplied by
    ``w_i``. The result keeps the first tree's dropout, and its factors
    have the promoted dtype of all the factors at that path.

    Leaves that train in full (plain arrays) hold trained values, not
    deltas, so they are combined as the matching weighted average: with
    ``base=None``, ``Σ w_i·x_i``, which is only consistent with the adapted
    weights when the weights sum to 1 (then the whole model is
    ``Σ w_i·model_i``), so other weights raise; with ``base`` (the params
    given to `split`), ``x_0 + Σ w_i·(x_i - x_0)`` with ``x_0`` the base
    value, task arithmetic for any weights.

    Args:
      adapters_list: adapter trees from `lora_jax.split` with the same
        paths and, at each path, the same factor layout (axes and shapes,
        except the rank).
      weights: one number per tree (Python numbers, not traced values).
      base: the original parameter tree, needed only for plain-array leaves
        when the weights do not sum to 1.

    Returns:
      An adapter tree with the structure of the first tree.

    Raises:
      ValueError: an empty list, a ``weights`` of another length or with a
        non-finite entry, trees with different paths (naming the first
        one), layouts that differ at a path (naming the path and shapes),
        or plain-array leaves with weights that do not sum to 1 and no
        ``base``.
      TypeError: an entry that is not an adapter tree, or a non-numeric weight.

    References:
      Ilharco et al. 2023, "Editing Models with Task Arithmetic".

    >>> import jax, jax.numpy as jnp, lora_jax as lora
    >>> _, adapters = lora.split({"w": jnp.ones((8, 4))}, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> both = add_weighted([adapters, adapters], [0.5, 0.5])
    >>> both["w"].rank
    4
    """
    caller = "add_weighted"
    if isinstance(adapters_list, (dict, LoraFactors)) or not isinstance(adapters_list, Sequence):
        raise TypeError(
            f"{caller}: `adapters_list` must be a list of adapter trees; got {type(adapters_list).__name__}. "
            "Wrap a single tree in a list: [adapters]."
        )
    if not adapters_list:
        raise ValueError(f"{caller}: `adapters_list` is empty; pass at least one adapter tree.")
    weights = _check_weights(caller, weights, len(adapters_list))
    flats = [_entries(caller, f"adapters_list[{i}]", t) for i, t in enumerate(adapters_list)]
    first, treedef = flats[0]
    lookups = [dict(entries) for entries, _ in flats]
    _check_same_paths(caller, [[p for p, _ in entries] for entries, _ in flats])

    base_entries = None
    out = []
    for path, leaf in first:
        items = [lookup[path] for lookup in lookups]
        if _is_factors(leaf):
            out.append(_add_factors(caller, path, items, weights))
            continue
        for i, x in enumerate(items[1:], 1):
            if _is_factors(x):
                raise ValueError(
                    f"{caller}: at {path!r}, adapters_list[0] holds a plain array (a leaf that trains in full) "
                    f"but adapters_list[{i}] holds LoraFactors; the trees come from different specs."
                )
            if x.shape != leaf.shape:
                raise ValueError(
                    f"{caller}: the fully trained leaf {path!r} has shape {tuple(leaf.shape)} in adapters_list[0] "
                    f"but {tuple(x.shape)} in adapters_list[{i}]; the trees do not belong to one model."
                )
        if base is None:
            if abs(sum(weights) - 1.0) > _SUM_TO_ONE_TOLERANCE:
                raise ValueError(
                    f"{caller}: {path!r} trains in full (a plain array in the adapter trees), and such leaves hold "
                    f"trained values rather than deltas: with weights summing to {sum(weights):g} instead of 1, "
                    "their weighted sum is not consistent with the adapted weights' W + Σ w_i·Δ_i. Pass "
                    "base=<the params given to lora_jax.split> to combine them as x_0 + Σ w_i·(x_i - x_0), or "
                    "weights that sum to 1."
                )
            out.append(_weighted_sum(items, weights, None))
        else:
            if base_entries is None:
                base_entries = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
            x0 = base_entries.get(path)
            if x0 is None or getattr(x0, "shape", None) != leaf.shape:
                raise ValueError(
                    f"{caller}: `base` has {'no leaf' if x0 is None else f'shape {tuple(x0.shape)}'} at {path!r}, "
                    f"where the adapters hold a fully trained leaf of shape {tuple(leaf.shape)}. Pass as base the "
                    "params tree that was given to lora_jax.split."
                )
            out.append(_weighted_sum(items, weights, x0))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_weights(caller: str, weights: Any, n: int) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        if hasattr(weights, "shape") and getattr(weights, "ndim", 0) == 1:
            weights = list(weights)
        else:
            raise TypeError(f"{caller}: `weights` must be a list of numbers; got {type(weights).__name__}.")
    if len(weights) != n:
        raise ValueError(f"{caller}: got {n} adapter trees but {len(weights)} weights; pass one weight per tree.")
    out = []
    for i, w in enumerate(weights):
        try:
            w = float(w)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{caller}: weights[{i}] must be a number (a concrete value, not a traced one); got {w!r}."
            ) from err
        if not math.isfinite(w):
            raise ValueError(f"{caller}: weights[{i}] is {w}; weights must be finite.")
        out.append(w)
    return out


def _check_same_paths(caller: str, paths: list[list[str]]) -> None:
    first = set(paths[0])
    for i, other in enumerate(paths[1:], 1):
        others = set(other)
        missing = [p for p in paths[0] if p not in others]
        extra = [p for p in other if p not in first]
        if missing or extra:
            what = (
                f"{missing[0]!r} is in adapters_list[0] but not in adapters_list[{i}]"
                if missing
                else f"{extra[0]!r} is in adapters_list[{i}] but not in adapters_list[0]"
            )
            raise ValueError(
                f"{caller}: the adapter trees have different paths: {what}. Combine adapters split from one model "
                "with the same targets (rank and alpha may differ)."
            )


def _add_factors(caller: str, path: str, items: list[Any], weights: list[float]) -> LoraFactors:
    f0 = items[0]
    layout0 = layout_without_rank(f0)
    for i, f in enumerate(items[1:], 1):
        if not _is_factors(f):
            raise ValueError(
                f"{caller}: at {path!r}, adapters_list[0] holds LoraFactors but adapters_list[{i}] holds a plain "
                "array (a leaf that trains in full); the trees come from different specs."
            )
        if layout_without_rank(f) != layout0:
            raise ValueError(
                f"{caller}: the adapters at {path!r} have incompatible layouts: adapters_list[0] has lora_a "
                f"{tuple(f0.lora_a.shape)}, lora_b {tuple(f0.lora_b.shape)} (stack_axes={f0.stack_axes}, "
                f"a_axes={f0.a_axes}, b_axes={f0.b_axes}) and adapters_list[{i}] has lora_a "
                f"{tuple(f.lora_a.shape)}, lora_b {tuple(f.lora_b.shape)} (stack_axes={f.stack_axes}, "
                f"a_axes={f.a_axes}, b_axes={f.b_axes}); only the rank may differ. Combine adapters of the same model."
            )
    if f0.scale == 0:
        raise ValueError(
            f"{caller}: the adapter at {path!r} in adapters_list[0] has scale 0, which cannot carry the others' "
            "deltas (the result takes its scale). Put an adapter with a non-zero scale first."
        )
    dtype = jnp.result_type(*(f.lora_a for f in items), *(f.lora_b for f in items))
    coefs = tuple(w * f.scale / f0.scale for w, f in zip(weights, items))
    lora_a, lora_b = _concat_factors(
        tuple(f.lora_a for f in items),
        tuple(f.lora_b for f in items),
        coefs=coefs,
        rank_axis=len(f0.stack_axes),
        dtype=jnp.dtype(dtype),
    )
    return LoraFactors(lora_a, lora_b, f0.scale, f0.stack_axes, f0.a_axes, f0.b_axes, f0.dropout)


@functools.partial(jax.jit, static_argnames=("coefs", "rank_axis", "dtype"))
def _concat_factors(a_list, b_list, *, coefs, rank_axis, dtype):
    work = jnp.promote_types(dtype, jnp.float32)
    lora_a = jnp.concatenate([a.astype(dtype) for a in a_list], axis=-1)
    lora_b = jnp.concatenate([(c * b.astype(work)).astype(dtype) for c, b in zip(coefs, b_list)], axis=rank_axis)
    return lora_a, lora_b


def _weighted_sum(items: list[Any], weights: list[float], x0: Any) -> jax.Array:
    dtype = jnp.asarray(items[0]).dtype
    work = jnp.promote_types(dtype, jnp.float32)
    if x0 is None:
        total = sum(w * jnp.asarray(x, work) for w, x in zip(weights, items))
    else:
        x0 = jnp.asarray(x0, work)
        total = x0 + sum(w * (jnp.asarray(x, work) - x0) for w, x in zip(weights, items))
    return total.astype(dtype)


def truncate(
    adapters: PyTree, rank: int | Mapping[str, int], *, return_error: bool = True
) -> tuple[PyTree, dict[str, float]] | PyTree:
    """Best rank-``rank`` approximation of every adapter's delta ``s·A@B``.

    For each stacked entry, with the thin QR decompositions ``A = Q_a R_a``
    and ``B^T = Q_b R_b``, the delta is ``Q_a (s·R_a R_b^T) Q_b^T``; the SVD
    of the small ``r×r`` core ``U S V^T`` gives the delta's SVD
    ``(Q_a U) S (Q_b V)^T``. The result keeps the top ``rank`` triples,
    split evenly: ``A' = Q_a U_k sqrt(S_k / s)`` and
    ``B' = sqrt(S_k / s) V_k^T Q_b^T``, with the scale ``s`` kept (so a
    truncated adapter trains at the same scale as before). This is the best
    rank-``rank`` approximation in Frobenius and spectral norm
    (Eckart-Young), at the cost of QR decompositions of the thin factors,
    never forming the ``[in, out]`` delta. ``A'^T A' = B' B'^T = S_k / s``.

    Adapters whose rank is already at most the target are returned as they
    are. If the delta's rank is below the target (a rank larger than the
    weight's sides, as `add_weighted` can produce), the extra rank
    components are zero. Plain arrays (leaves that train in full) are
    returned as they are.

    Args:
      adapters: an adapter tree from `lora_jax.split` (or `add_weighted`).
      rank: the target rank, or ``{regex: rank}`` matched with
        ``re.fullmatch`` against each adapter's ``/``-joined path (first
        match wins; adapters no pattern matches are kept as they are).
      return_error: also return the relative errors. Computing them moves
        one number per adapter to the host, so pass ``False`` to call
        `truncate` under ``jax.jit``.

    Returns:
      ``(adapters, errors)``, or only ``adapters`` with
      ``return_error=False``. ``errors`` maps each adapter's path to the
      relative Frobenius error ``||Δ - Δ_k|| / ||Δ||`` over the whole
      (stacked) delta, computed exactly from the discarded singular values;
      it is 0.0 for adapters kept as they are and for a zero delta.

    Raises:
      ValueError: a rank below 1, an invalid regex, a pattern that matches
        no adapter, an adapter tree with no `LoraFactors`, or an adapter
        with scale 0.
      TypeError: ``adapters`` is not a dict, or ``rank`` is neither an
        integer nor a mapping of regexes to integers.

    References:
      Eckart and Young 1936, "The approximation of one matrix by another of
      lower rank".

    >>> import jax.numpy as jnp, lora_jax as lora
    >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> b = jnp.array([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    >>> small, errors = truncate({"w": lora.LoraFactors(a, b)}, 1)
    >>> small["w"].rank, round(errors["w"], 4)
    (1, 0.0333)
    """
    caller = "truncate"
    entries, treedef = _entries(caller, "`adapters`", adapters)
    targets = _target_ranks(caller, rank, [p for p, x in entries if _is_factors(x)])
    out, errors = [], {}
    for path, leaf in entries:
        k = targets.get(path)
        if not _is_factors(leaf) or k is None or leaf.rank <= k:
            out.append(leaf)
            if _is_factors(leaf):
                errors[path] = 0.0
            continue
        if leaf.scale == 0:
            raise ValueError(
                f"{caller}: the adapter at {path!r} has scale 0; its delta is zero and a truncated adapter could "
                "not keep that scale. Remove it or give it a non-zero scale."
            )
        a, b, discarded, total = _truncate_factors(
            leaf.lora_a, leaf.lora_b, jnp.float32(leaf.scale), rank=k, n_stack=len(leaf.stack_axes)
        )
        out.append(LoraFactors(a, b, leaf.scale, leaf.stack_axes, leaf.a_axes, leaf.b_axes, leaf.dropout))
        errors[path] = (discarded, total)
    tree = jax.tree_util.tree_unflatten(treedef, out)
    if not return_error:
        return tree
    for path, value in errors.items():
        if isinstance(value, tuple):
            discarded, total = float(value[0]), float(value[1])
            errors[path] = math.sqrt(discarded / total) if total > 0 else 0.0
    return tree, errors


def _target_ranks(caller: str, rank: Any, paths: list[str]) -> dict[str, int]:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{caller}: {where} must be an integer rank; got {type(value).__name__}: {value!r}.")
        if value < 1:
            raise ValueError(f"{caller}: {where} must be at least 1; got {value}.")
        return int(value)

    if not isinstance(rank, Mapping):
        k = check(rank, "`rank`")
        return {p: k for p in paths}
    out: dict[str, int] = {}
    for pattern, value in rank.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{caller}: the keys of `rank` must be regex strings; got {pattern!r}.")
        k = check(value, f"rank[{pattern!r}]")
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{caller}: rank key {pattern!r} is not a valid regular expression ({err}).") from err
        hits = [p for p in paths if regex.fullmatch(p) is not None]
        if not hits:
            raise ValueError(
                f"{caller}: rank pattern {pattern!r} matches no adapter (patterns are matched with re.fullmatch "
                f"against '/'-joined paths); adapter paths are {paths[:8]}."
            )
        for p in hits:
            out.setdefault(p, k)
    return out


@functools.partial(jax.jit, static_argnames=("rank", "n_stack"))
def _truncate_factors(a, b, scale, *, rank, n_stack):
    stack_shape, a_shape, b_shape = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1 :]
    p, r = math.prod(stack_shape), a.shape[-1]
    work = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    a_m = a.reshape(p, math.prod(a_shape), r).astype(work)
    b_t = jnp.swapaxes(b.reshape(p, r, math.prod(b_shape)).astype(work), -1, -2)
    q_a, r_a = jnp.linalg.qr(a_m)
    q_b, r_b = jnp.linalg.qr(b_t)
    u, s, vt = jnp.linalg.svd(scale * r_a @ jnp.swapaxes(r_b, -1, -2), full_matrices=False)
    kept = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :kept] / jnp.abs(scale))
    new_a = (q_a @ u[..., :kept]) * root[..., None, :]
    new_b = (root[..., :, None] * vt[..., :kept, :]) @ jnp.swapaxes(q_b, -1, -2) * jnp.sign(scale)
    if kept < rank:
        new_a = jnp.pad(new_a, ((0, 0), (0, 0), (0, rank - kept)))
        new_b = jnp.pad(new_b, ((0, 0), (0, rank - kept), (0, 0)))
    new_a = new_a.reshape(*stack_shape, *a_shape, rank).astype(a.dtype)
    new_b = new_b.reshape(*stack_shape, rank, *b_shape).astype(b.dtype)
    return new_a, new_b, jnp.sum(s[..., kept:] ** 2), jnp.sum(s**2)
