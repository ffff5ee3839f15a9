"""`split` and `merge`: a parameter tree <-> (frozen tree, adapter tree)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _init, _spec, _trace
from lora_jax._quantize import QuantizedArray, dequantize_tree
from lora_jax._spec import LoraSpec
from lora_jax._trace import Layout

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraFactors:
    """The two trainable factors of one adapted weight ``W``: ``W + scale·A@B``.

    For a 2-D kernel ``[in, out]``, ``lora_a`` is ``[in, rank]`` and
    ``lora_b`` is ``[rank, out]``. In general ``lora_a`` is
    ``[*W[stack_axes], *W[a_axes], rank]`` and ``lora_b`` is
    ``[*W[stack_axes], rank, *W[b_axes]]``: stacked axes (an ``nn.scan``
    layer axis) get one independent adapter per entry. ``scale`` and the
    axes are static pytree metadata, so ``jax.tree.map``, optax, orbax and
    pickle see only the two arrays.

    >>> import jax.numpy as jnp
    >>> f = LoraFactors(jnp.ones((3, 2)), jnp.ones((2, 4)), scale=0.5)
    >>> f.delta().shape
    (3, 4)
    """

    lora_a: jax.Array
    lora_b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    stack_axes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    a_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
    b_axes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    magnitude: jax.Array | None = None
    """DoRA's trained magnitude, ``[*W[stack_axes], *W[b_axes]]``, or ``None`` for plain LoRA."""

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    def delta(self, dtype: Any = None) -> jax.Array:
        """``scale·A@B`` laid out like ``W`` (computed in ``dtype``, default the factors').

        With DoRA (``magnitude`` set) this is the low-rank part only; the
        adapted weight is ``magnitude · (W + delta) / ||W + delta||``.
        """
        return low_rank_delta(self.lora_a, self.lora_b, self.scale, self.stack_axes, self.a_axes, self.b_axes, dtype)


def layout_without_rank(f: LoraFactors) -> tuple:
    """Everything about a factor pair's layout but its rank: the three axis groups and both shapes without
    the rank axis. Two adapters of one weight that differ only in rank have equal values."""
    ns = len(f.stack_axes)
    b_shape = tuple(f.lora_b.shape[:ns]) + tuple(f.lora_b.shape[ns + 1 :])
    return f.stack_axes, f.a_axes, f.b_axes, tuple(f.lora_a.shape[:-1]), b_shape


def low_rank_delta(a, b, scale, stack, a_axes, b_axes, dtype=None) -> jax.Array:
    """``scale·A@B`` with its axes put back in ``W``'s order."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    ns = len(stack)
    batch = tuple(range(ns))
    d = jax.lax.dot_general(a, b, (((a.ndim - 1,), (ns,)), (batch, batch)))
    d = jnp.transpose(d, np.argsort((*stack, *a_axes, *b_axes)))
    return d * jnp.asarray(scale, d.dtype)


def add_delta(w, a, b, scale, stack, a_axes, b_axes, *, sign: float = 1.0) -> jax.Array:
    """``W ± scale·A@B``, computed in at least float32 and returned in ``W``'s dtype."""
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, a.dtype), jnp.float32)
    delta = low_rank_delta(a, b, scale, stack, a_axes, b_axes, dtype)
    return (w.astype(dtype) + sign * delta).astype(w.dtype)


def _fold(w: jax.Array, f: LoraFactors, sign: float) -> jax.Array:
    from lora_jax._adapted import kind_of  # the update kinds are built on this module's formulas

    if isinstance(w, QuantizedArray):
        w = w.dequantize()
    return kind_of(f).merge(w, f, sign)


def column_norm(w: jax.Array, stack, a_axes, b_axes) -> jax.Array:
    """``||W||`` over the ``a`` (input) axes, laid out ``[*stack, *b]`` like a DoRA magnitude (float32)."""
    sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(a_axes))
    kept = [i for i in range(w.ndim) if i not in a_axes]  # the axes of `sq`, in W's order
    return jnp.sqrt(jnp.transpose(sq, [kept.index(i) for i in (*stack, *b_axes)]))


def expand_to_w(v: jax.Array, stack, a_axes, b_axes) -> jax.Array:
    """A ``[*stack, *b]`` array laid out against ``W``: size-1 ``a`` axes, the rest in W's order."""
    ndim = len(stack) + len(a_axes) + len(b_axes)
    order = (*stack, *b_axes)
    v = jnp.transpose(v, np.argsort(order))  # now in W's order without the a axes
    out = jnp.expand_dims(v, tuple(sorted(a_axes)))
    assert out.ndim == ndim
    return out


def dora_weight(w, a, b, scale, stack, a_axes, b_axes, magnitude) -> jax.Array:
    """DoRA's adapted weight ``m · V / ||V||`` with ``V = W + scale·A@B``, the norm per output column.

    The norm is treated as a constant for differentiation, as in DoRA (Liu et al. 2024, section 4.3)
    and PEFT.
    """
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, a.dtype), jnp.float32)
    v = w.astype(dtype) + low_rank_delta(a, b, scale, stack, a_axes, b_axes, dtype)
    norm = jax.lax.stop_gradient(column_norm(v, stack, a_axes, b_axes))
    factor = magnitude.astype(dtype) / norm
    return (v * expand_to_w(factor, stack, a_axes, b_axes)).astype(w.dtype)


def _flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    out = []
    for p, x in flat:
        parts = _spec.path_parts(p)
        out.append(("/".join(parts), parts, x))
    return out, treedef


def _nest(entries: Iterator[tuple[tuple[str, ...], Any]]) -> dict:
    out: dict = {}
    for parts, value in entries:
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def adapter_entries(adapters: PyTree) -> dict[str, Any]:
    """``{path: LoraFactors or array}`` for everything in an adapter tree."""
    if isinstance(adapters, LoraFactors) or not isinstance(adapters, dict):
        raise TypeError(
            f"`adapters` must be the adapter tree returned by lora_jax.split (a dict); got {type(adapters).__name__}."
        )
    flat, _ = _flatten(adapters, is_leaf=_is_factors)
    return {path: x for path, _, x in flat}


def _is_float(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _layout_without_trace(path: str, leaf: Any) -> Layout:
    if leaf.ndim == 2:
        return Layout((), (0,), (1,))
    raise ValueError(
        f"split: the layout of target {path!r} with shape {tuple(leaf.shape)} is ambiguous without a trace: "
        "a 2-D weight is read as [in, out], but for other shapes (conv [*window, in, out], DenseGeneral "
        "[D, H, hd], nn.scan stacks [L, in, out], ...) the in/out/stacked axes depend on how it is used. "
        "Pass trace=lambda p: model.apply(p, x) so split can read the layout from the traced use."
    )


def _factor_plan(leaf, layout: Layout, rank: int, spec: LoraSpec) -> tuple:
    """Static description of one target's factors: shapes, dtype and init of ``A``."""
    shape = leaf.shape
    stack_shape = tuple(shape[i] for i in layout.stack)
    a_shape = tuple(shape[i] for i in layout.a)
    b_shape = tuple(shape[i] for i in layout.b)
    dtype = jnp.dtype(spec.dtype if spec.dtype is not None else leaf.dtype)
    return (*stack_shape, *a_shape, rank), (*stack_shape, rank, *b_shape), dtype, spec.init, math.prod(a_shape)


@functools.partial(jax.jit, static_argnums=1)
def _draw_factors(keys: jax.Array, plans: tuple) -> list[tuple[jax.Array, jax.Array]]:
    # One program draws every target's A (and zero B), rather than one small
    # compiled program per target shape.
    out = []
    for key, (a_shape, b_shape, dtype, init, fan_in) in zip(keys, plans):
        if init == "kaiming":
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, a_shape, jnp.float32) / a_shape[-1]
        out.append((a.astype(dtype), jnp.zeros(b_shape, dtype)))
    return out


def split(params: PyTree, spec: LoraSpec, *, key: jax.Array, trace: Callable[[PyTree], Any] | None = None):
    """Splits a parameter tree into a frozen tree and a small tree of what trains.

    Args:
      params: any pytree of arrays (Flax linen variables, an NNX state, a dict
        or list of arrays).
      spec: which leaves get adapters and which train in full.
      key: a PRNG key for the initial ``A`` factors.
      trace: optional function of ``params`` (for example
        ``lambda p: model.apply(p, x)``) that is traced abstractly to read
        how every weight is used; needed for non-2-D targets (conv,
        ``DenseGeneral``, ``nn.scan`` stacks) and for ``"all-linear"`` to
        mean "every weight a matmul consumes".

    Returns:
      ``(frozen, adapters)``. ``frozen`` has the structure of ``params``
      with the original arrays, and ``None`` where a leaf trains in full.
      With ``spec.init`` ``"pissa"``/``"olora"`` each adapted leaf of
      ``frozen`` is instead the residual ``W - s·A@B``: the frozen tree is
      then no longer the pretrained one (``merge(frozen, adapters)`` gives
      it back), so save it with the adapters, and export the merged model
      or this residual base rather than pairing the adapters with the
      original weights.
      ``adapters`` is a nested dict, keyed by path components, holding a
      `LoraFactors` for each target and the array of each fully trained leaf.

    Raises:
      ValueError: a pattern matches no leaf (the message lists the nearest
        real paths), a target is also in ``spec.train``, the rank exceeds
        what the weight allows, a layout is ambiguous without ``trace=``, or
        a target is not used linearly by ``trace``.
      TypeError: ``key`` is missing or a target is not a float array.

    >>> import jax, jax.numpy as jnp
    >>> params = {"w1": jnp.ones((8, 16)), "w2": jnp.ones((16, 4)), "bias": jnp.zeros(4)}
    >>> frozen, adapters = split(params, LoraSpec(rank=2, targets="w.*"), key=jax.random.key(0))
    >>> adapters["w1"].lora_a.shape, adapters["w1"].lora_b.shape
    ((8, 2), (2, 16))
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"split: `spec` must be a lora_jax.LoraSpec; got {type(spec).__name__}.")
    if key is None or not isinstance(key, jax.Array):
        raise TypeError(
            "split: `key` must be a JAX PRNG key for the initial A factors, e.g. key=jax.random.key(0); "
            f"got {type(key).__name__}."
        )
    flat, treedef = _flatten(params)
    if not flat:
        raise ValueError("split: `params` has no array leaves.")
    uses = _trace.trace_uses(trace, params) if trace is not None else None
    paths = [p for p, _, _ in flat]

    def linear(i: int, path: str, leaf: Any) -> bool:
        if not _is_float(leaf) or leaf.ndim < 2 or _spec.is_embed_or_head(path):
            return False
        return _trace.is_linear_weight(uses[i]) if uses is not None else _spec.default_linear(path, leaf)

    targets = []
    for i, (path, _, leaf) in enumerate(flat):
        if spec.uses_all_linear and linear(i, path, leaf):
            hit = True
        else:
            hit = _spec.matches(spec.path_targets, path, leaf)
        targets.append(hit and not _spec.matches(spec.exclude, path, leaf))
    trained = [_spec.matches(spec.train, path, leaf) for path, _, leaf in flat]

    _check_patterns_hit("targets", spec.path_targets, flat)
    _check_patterns_hit("train", spec.train, flat)
    if not any(targets):
        raise ValueError(
            f"split: spec.targets={spec.targets!r} selects no leaf"
            + (f" (after exclude={spec.exclude!r})" if spec.exclude is not None else "")
            + f". Paths look like: {_spec.nearest_paths(spec.targets, paths)}."
        )

    frozen_leaves, entries, plans = [], [], []
    for i, ((path, parts, leaf), is_target, is_trained) in enumerate(zip(flat, targets, trained)):
        if is_target and is_trained:
            raise ValueError(
                f"split: {path!r} is selected both by spec.targets (gets an adapter) and by spec.train "
                "(trains in full); a leaf can be one or the other. Narrow one of the patterns."
            )
        if is_trained:
            frozen_leaves.append(None)
            entries.append((parts, leaf))
            continue
        frozen_leaves.append(leaf)
        if not is_target:
            continue
        if not _is_float(leaf):
            raise TypeError(
                f"split: target {path!r} has dtype {getattr(leaf, 'dtype', type(leaf).__name__)}; only float "
                "weights can be adapted. Exclude it with spec.exclude or narrow spec.targets."
            )
        if uses is not None:
            layout, why = _trace.layout_from_uses(uses[i], leaf.ndim)
            if layout is None:
                raise ValueError(
                    f"split: target {path!r} (shape {tuple(leaf.shape)}) cannot get a low-rank adapter: {why}. "
                    "Adapt weights used by a matmul, einsum, conv or embedding lookup."
                )
        else:
            layout = _layout_without_trace(path, leaf)
        rank = spec.rank_for(path)
        a_size = math.prod(leaf.shape[i] for i in layout.a)
        b_size = math.prod(leaf.shape[i] for i in layout.b)
        if rank > min(a_size, b_size):
            raise ValueError(
                f"split: rank {rank} is larger than target {path!r} allows: its in side has {a_size} and its "
                f"out side {b_size} entries (shape {tuple(leaf.shape)}), so rank must be <= {min(a_size, b_size)}. "
                "Lower spec.rank or set a smaller rank for it in spec.rank_pattern."
            )
        plans.append(_factor_plan(leaf, layout, rank, spec))
        entries.append((parts, (layout, spec.scale_for(path), len(frozen_leaves) - 1)))
    keys = jax.random.split(key, len(plans))
    from_weight = spec.init_from_weight
    drawn = iter(_draw_factors(keys, tuple(plans)) if from_weight is None else ())
    targets_seen = 0
    for i, (parts, entry) in enumerate(entries):
        if isinstance(entry, tuple):
            layout, scale, leaf_index = entry
            if from_weight is None:
                a, b = next(drawn)
            else:
                # The factors come from W itself; the frozen tree keeps the residual W - s·A@B.
                a, b, frozen_leaves[leaf_index] = _init.init_factors(
                    frozen_leaves[leaf_index],
                    stack=layout.stack,
                    a_axes=layout.a,
                    b_axes=layout.b,
                    rank=plans[targets_seen][0][-1],
                    scale=scale,
                    method=from_weight[0],
                    niter=from_weight[1],
                    key=keys[targets_seen],
                    dtype=plans[targets_seen][2],
                )
            targets_seen += 1
            magnitude = None
            if spec.use_dora:
                # DoRA starts at the base: the magnitude is the column norm of W + s·A@B, the pretrained W's.
                v = add_delta(frozen_leaves[leaf_index], a, b, scale, layout.stack, layout.a, layout.b)
                magnitude = column_norm(v, layout.stack, layout.a, layout.b).astype(a.dtype)
            entries[i] = (
                parts,
                LoraFactors(a, b, scale, layout.stack, layout.a, layout.b, float(spec.dropout), magnitude),
            )
    frozen = jax.tree_util.tree_unflatten(treedef, frozen_leaves)
    return frozen, _nest(iter(entries))


def _check_patterns_hit(name: str, filt: Any, flat: list) -> None:
    if filt is None or callable(filt):
        return
    patterns = [filt] if isinstance(filt, str) else list(filt)
    paths = [p for p, _, _ in flat]
    for pattern in patterns:
        if not any(_spec.matches(pattern, p, x) for p, _, x in flat):
            raise ValueError(
                f"split: spec.{name} pattern {pattern!r} matches no leaf (patterns are matched with re.fullmatch "
                f"against '/'-joined paths). Nearest paths: {_spec.nearest_paths(pattern, paths)}."
            )


def combine(
    frozen: PyTree,
    adapters: PyTree,
    fn: Callable[[str, Any, LoraFactors], Any],
    *,
    caller: str,
    keep_trained: bool = False,
):
    """Rebuilds the params tree: ``fn(path, W, factors)`` at each target, the
    adapter's array at each fully trained leaf (or the leaf of ``frozen``
    with ``keep_trained``), the frozen leaf elsewhere.

    Checks that every adapter has a home in ``frozen`` of the right shape.
    """
    entries = adapter_entries(adapters)
    if entries and not any(isinstance(e, LoraFactors) for e in entries.values()):
        raise ValueError(
            f"{caller}: `adapters` holds no LoraFactors, only plain arrays (at {sorted(entries)[:3]}...): it looks "
            "like a full parameter tree, which would replace every weight it holds and train all of them. Pass the "
            "adapter tree returned by lora_jax.split (split marks each leaf that trains in full by moving its "
            "array to the adapter tree and putting None at its place in `frozen`)."
        )
    flat, treedef = _flatten(frozen, is_leaf=lambda x: x is None or isinstance(x, QuantizedArray))
    leaves, seen = [], set()
    for path, _, leaf in flat:
        entry = entries.get(path)
        if entry is None:
            leaves.append(leaf)
            continue
        seen.add(path)
        if isinstance(entry, LoraFactors):
            _check_factors(caller, path, leaf, entry)
            leaves.append(fn(path, leaf, entry))
        else:
            if leaf is not None and not keep_trained:
                raise ValueError(
                    f"{caller}: the adapter tree holds a plain array at {path!r} (shape {np.shape(entry)}) where "
                    f"`frozen` holds an array too (shape {np.shape(leaf)}). lora_jax.split marks a leaf that trains "
                    "in full (LoraSpec(train=...)) by moving its array to the adapter tree and putting None at its "
                    "place in `frozen`; an array in both means the trees do not come from one split (for example "
                    "the full params passed as adapters). Pass the pair returned by one lora_jax.split."
                )
            if leaf is not None and np.shape(leaf) != np.shape(entry):
                raise ValueError(
                    f"{caller}: the adapter tree's fully trained leaf {path!r} has shape {np.shape(entry)} but "
                    f"the params have shape {np.shape(leaf)} there; these adapters do not belong to these params."
                )
            leaves.append(leaf if keep_trained else entry)
    missing = sorted(set(entries) - seen)
    if missing:
        raise ValueError(
            f"{caller}: adapters at {missing[:5]} have no matching leaf in `frozen` "
            f"(frozen paths look like {_spec.nearest_paths(missing[0], [p for p, _, _ in flat])}); "
            "these adapters do not belong to these frozen params. Use the pair returned by one lora_jax.split."
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_factors(caller: str, path: str, w: Any, f: LoraFactors) -> None:
    if w is None or not hasattr(w, "shape"):
        raise ValueError(f"{caller}: adapter {path!r} has no frozen weight in `frozen` (found {w!r}).")
    shape = tuple(w.shape)
    axes = (*f.stack_axes, *f.a_axes, *f.b_axes)
    ok = sorted(axes) == list(range(len(shape)))
    if ok:
        r = f.lora_a.shape[-1] if f.lora_a.ndim else -1
        want_a = (*(shape[i] for i in f.stack_axes), *(shape[i] for i in f.a_axes), r)
        want_b = (*(shape[i] for i in f.stack_axes), r, *(shape[i] for i in f.b_axes))
        ok = tuple(f.lora_a.shape) == want_a and tuple(f.lora_b.shape) == want_b
    if ok and f.magnitude is not None:
        want_m = (*(shape[i] for i in f.stack_axes), *(shape[i] for i in f.b_axes))
        if tuple(f.magnitude.shape) != want_m:
            raise ValueError(
                f"{caller}: adapter {path!r} has a DoRA magnitude of shape {tuple(f.magnitude.shape)}, but the "
                f"frozen weight of shape {shape} needs {want_m} ([*stacked, *output] axes)."
            )
    if not ok:
        raise ValueError(
            f"{caller}: adapter {path!r} has lora_a {tuple(f.lora_a.shape)} and lora_b {tuple(f.lora_b.shape)}, "
            f"which do not fit the frozen weight of shape {shape}; these adapters do not belong to these "
            "frozen params. Use the pair returned by one lora_jax.split."
        )


def merge(frozen: PyTree, adapters: PyTree) -> PyTree:
    """Folds the adapters back in: ``W + s·A@B`` at every target.

    Args:
      frozen: the frozen tree from `split` (or the original params, when no
        leaf trains in full).
      adapters: the adapter tree from `split`, trained or not.

    Returns:
      A tree with the structure and dtypes of the original params (a
      quantised ``frozen`` from `lora_jax.quantize` is dequantised).

    Raises:
      ValueError: if the adapters do not belong to ``frozen``, or ``adapters``
        is a full parameter tree (plain arrays where ``frozen`` holds arrays).

    >>> import jax, jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 4))}
    >>> frozen, adapters = split(params, LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> bool((merge(frozen, adapters)["w"] == params["w"]).all())  # B starts at zero
    True
    """
    merged = combine(frozen, adapters, lambda path, w, f: _fold(w, f, 1.0), caller="merge")
    # A quantised base (`lora_jax.quantize`) comes back in full precision, ready for any apply function.
    return dequantize_tree(merged)


def unmerge(params: PyTree, adapters: PyTree) -> PyTree:
    """Inverse of `merge` on the adapted weights: ``W - s·A@B`` at every target.

    Fully trained leaves are left as they are in ``params``. Exact up to
    floating-point rounding (in low precision, keep the original frozen
    tree rather than relying on this).

    Raises:
      ValueError: if the adapters do not belong to ``params``, or ``adapters``
        holds no `LoraFactors` (a full parameter tree passed as adapters).

    >>> import jax, jax.numpy as jnp
    >>> frozen, adapters = split({"w": jnp.ones((4, 4))}, LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> unmerge(merge(frozen, adapters), adapters)["w"].shape
    (4, 4)
    """

    def fold_out(path, w, f):
        if f.magnitude is not None:
            raise ValueError(
                f"unmerge: the adapter at {path!r} is DoRA (it has a magnitude); a DoRA weight m·V/||V|| cannot be "
                "undone from the merged weight alone. Keep the frozen tree from split instead."
            )
        return _fold(w, f, -1.0)

    return combine(params, adapters, fold_out, caller="unmerge", keep_trained=True)
