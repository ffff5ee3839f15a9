"""Shardings for adapters, derived from the shardings of the weights they adapt.

A LoRA factor inherits its layout from its weight ``W``. ``A`` holds ``W``'s
input (contracted) axes and ``B`` its output axes, so each factor takes the
mesh axes of the ``W`` axes it holds: ``A`` is sharded like ``W``'s input
axes, ``B`` like its output axes, a stacked (``nn.scan``) layer axis keeps its
sharding on both, and the rank axis is replicated. ``x @ A`` then contracts
the same shards as ``x @ W``, and ``(x @ A) @ B`` produces the same output
shards as ``x @ W``, so XLA's SPMD partitioner adds at most a small
``[batch, rank]`` reduction and never needs to gather ``W``. Leaves trained
in full keep their own sharding.

With these, one `jax.jit` with ``in_shardings``/``out_shardings`` runs the
same training step on one CPU, one GPU, a host with 8 accelerators or a
multi-host pod slice (after `jax.distributed.initialize`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from lora_jax import _spec, _tree
from lora_jax._quantize import QuantizedArray
from lora_jax._spec import LoraSpec
from lora_jax._tree import LoraFactors

__all__ = ["adapter_shardings", "factor_specs", "optimizer_state_shardings", "shardings_from_rules", "split_sharded"]

PyTree = Any
ShardingLike = NamedSharding | PartitionSpec | SingleDeviceSharding | None


def _is_sharding_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (Sharding, PartitionSpec))


def _is_param_leaf(x: Any) -> bool:
    """A leaf of a params (or params shardings) tree: a `QuantizedArray` stands for its whole weight."""
    return _is_sharding_leaf(x) or isinstance(x, QuantizedArray)


def _sharding_leaves(tree: PyTree) -> list:
    """The leaves of an adapter shardings tree, one per array of the adapter tree, in its order.

    ``None`` means replicated, except in a `LoraFactors`' ``magnitude`` slot,
    where it means the adapter has no magnitude (plain LoRA, not DoRA).
    """
    out: list = []
    for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LoraFactors) or _is_sharding_leaf(x)):
        if isinstance(x, LoraFactors):
            out += [x.lora_a, x.lora_b] + ([] if x.magnitude is None else [x.magnitude])
        else:
            out.append(x)
    return out


def factor_specs(w_spec: PartitionSpec, factors: LoraFactors) -> tuple[PartitionSpec, PartitionSpec]:
    """The `PartitionSpec`\\ s of ``lora_a`` and ``lora_b`` for a weight sharded as ``w_spec``.

    ``lora_a`` (``[*stack, *a_side, rank]``) takes ``w_spec``'s entries for the
    stacked and input axes, ``lora_b`` (``[*stack, rank, *b_side]``) those for
    the stacked and output axes; the rank axis is replicated. A ``w_spec``
    shorter than ``W``'s rank means the trailing axes are replicated.

    Args:
      w_spec: the partition spec of the adapted weight ``W``.
      factors: the weight's `LoraFactors` (only its axes are read, so
        abstract factors from `jax.eval_shape` work).

    Returns:
      ``(spec_a, spec_b)``.

    Raises:
      ValueError: ``w_spec`` has more entries than ``W`` has axes.

    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> f = LoraFactors(jnp.zeros((8, 2)), jnp.zeros((2, 16)))
    >>> factor_specs(P("data", "model"), f)
    (P('data', None), P(None, 'model'))
    """
    ndim = len(factors.stack_axes) + len(factors.a_axes) + len(factors.b_axes)
    entries = tuple(w_spec)
    if len(entries) > ndim:
        raise ValueError(
            f"factor_specs: the weight's PartitionSpec {w_spec} has {len(entries)} entries but the weight has "
            f"{ndim} axes; it does not belong to this weight."
        )
    entries = entries + (None,) * (ndim - len(entries))
    stack = tuple(entries[i] for i in factors.stack_axes)
    spec_a = PartitionSpec(*stack, *(entries[i] for i in factors.a_axes), None)
    spec_b = PartitionSpec(*stack, None, *(entries[i] for i in factors.b_axes))
    return spec_a, spec_b


def _sharding_of(path: str, x: Any) -> ShardingLike:
    """A leaf of ``param_shardings``: a sharding, a spec, None, or an array carrying one."""
    if isinstance(x, QuantizedArray):
        # The codes have the weight's axes one for one (the last one packed), so
        # the weight's layout is theirs.
        return _sharding_of(path, x.codes)
    if _is_sharding_leaf(x):
        return x
    sharding = getattr(x, "sharding", None)
    if sharding is not None and isinstance(sharding, Sharding):
        return sharding
    raise TypeError(
        f"adapter_shardings: `param_shardings` at {path!r} is a {type(x).__name__}; expected a NamedSharding, a "
        "PartitionSpec, None (replicated), or a jax.Array / ShapeDtypeStruct that carries a sharding."
    )


def _find_mesh(shardings: Mapping[str, ShardingLike]) -> Mesh | None:
    for s in shardings.values():
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def adapter_shardings(param_shardings: PyTree, adapters: PyTree, *, mesh: Mesh | None = None) -> PyTree:
    """Shardings for an adapter tree, derived from the base weights' shardings.

    Each `LoraFactors` gets ``lora_a`` sharded like ``W``'s input axes and
    ``lora_b`` like its output axes, with the rank axis replicated and a
    stacked layer axis sharded as in ``W`` on both (see `factor_specs`). A
    leaf trained in full keeps its own sharding.

    Args:
      param_shardings: a tree with the structure of the params (or of
        ``frozen``) whose leaves are `NamedSharding`\\ s, `PartitionSpec`\\ s,
        ``None`` (replicated), or arrays whose ``.sharding`` is used (so the
        sharded params themselves can be passed). A quantised weight
        (`lora_jax.QuantizedArray`, placed or from `shardings_from_rules`)
        counts as sharded like its ``codes``.
      adapters: the adapter tree from `lora_jax.split`, concrete or abstract
        (``jax.eval_shape`` of the split).
      mesh: the mesh for `PartitionSpec` leaves. When given, every returned
        leaf is a `NamedSharding` on it; when omitted, the mesh of the first
        `NamedSharding` found is used, and with none found the result holds
        `PartitionSpec`\\ s (to be used under ``jax.set_mesh``).

    Returns:
      A tree with the structure of ``adapters`` (`LoraFactors` nodes whose
      ``lora_a``/``lora_b`` are shardings), ready for ``jax.jit``'s
      ``in_shardings``/``out_shardings`` or `jax.device_put`.

    Raises:
      ValueError: an adapter's path has no entry in ``param_shardings``, or a
        spec has more entries than its weight has axes.
      TypeError: a leaf of ``param_shardings`` is not a sharding, or is a
        sharding other than `NamedSharding` / `SingleDeviceSharding`.

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lora
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jnp.zeros((8, 16)), "norm": jnp.ones(16)}
    >>> _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w", train="norm"), key=jax.random.key(0))
    >>> s = adapter_shardings({"w": P("data", "model"), "norm": P()}, adapters)
    >>> s["w"].lora_a, s["w"].lora_b, s["norm"]
    (P('data', None), P(None, 'model'), P())
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"adapter_shardings: `mesh` must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
    _tree.adapter_entries(adapters)  # a clear TypeError for anything but an adapter tree
    flat, _ = _tree._flatten(param_shardings, is_leaf=_is_param_leaf)
    by_path = {path: _sharding_of(path, x) for path, _, x in flat}
    mesh = mesh if mesh is not None else _find_mesh(by_path)

    def finish(spec: PartitionSpec, like: ShardingLike) -> ShardingLike:
        if isinstance(like, NamedSharding):
            return NamedSharding(like.mesh, spec, memory_kind=like.memory_kind)
        return NamedSharding(mesh, spec) if mesh is not None else spec

    def spec_of(path: str, s: ShardingLike) -> PartitionSpec:
        if s is None:
            return PartitionSpec()
        if isinstance(s, PartitionSpec):
            return s
        if isinstance(s, NamedSharding):
            return s.spec
        raise TypeError(
            f"adapter_shardings: the sharding of {path!r} is a {type(s).__name__}; only NamedSharding, "
            "PartitionSpec and SingleDeviceSharding can be carried over to adapters. Describe the weights' "
            "layout with NamedSharding(mesh, PartitionSpec(...))."
        )

    out_flat, treedef = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_tree._is_factors)
    leaves = []
    for keypath, entry in out_flat:
        path = _spec.path_to_str(keypath)
        if path not in by_path:
            raise ValueError(
                f"adapter_shardings: the adapter {path!r} has no sharding in `param_shardings`; it must have the "
                f"structure of the params the adapters were split from. Nearest paths there: "
                f"{_spec.nearest_paths(path, list(by_path))}."
            )
        s = by_path[path]
        if isinstance(s, SingleDeviceSharding):
            if isinstance(entry, LoraFactors):
                magnitude = None if entry.magnitude is None else s
                leaves.append(dataclasses.replace(entry, lora_a=s, lora_b=s, magnitude=magnitude))
            else:
                leaves.append(s)
            continue
        spec = spec_of(path, s)
        if isinstance(entry, LoraFactors):
            try:
                spec_a, spec_b = factor_specs(spec, entry)
            except ValueError as e:
                raise ValueError(f"adapter_shardings: at {path!r}: {e}") from None
            # A DoRA magnitude [*stack, *b] is sharded like the weight's stacked and output axes.
            magnitude = None
            if entry.magnitude is not None:
                spec_m = PartitionSpec(*spec_b[: len(entry.stack_axes)], *spec_b[len(entry.stack_axes) + 1 :])
                magnitude = finish(spec_m, s)
            leaves.append(
                dataclasses.replace(entry, lora_a=finish(spec_a, s), lora_b=finish(spec_b, s), magnitude=magnitude)
            )
        else:
            leaves.append(finish(spec, s))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def optimizer_state_shardings(optimizer: optax.GradientTransformation, adapters: PyTree, shardings: PyTree) -> PyTree:
    """Shardings for ``optimizer.init(adapters)``: moments follow their adapter, the rest is replicated.

    A state leaf that mirrors an adapter leaf (Adam's ``mu``/``nu``, momentum,
    even inside `optax.multi_transform` or `optax.masked` states) is
    recognised by its key path ending with that leaf's path and by its
    shape, and takes that leaf's sharding; counters and other scalars are
    replicated.

    Args:
      optimizer: the optax transformation.
      adapters: the adapter tree (concrete or abstract).
      shardings: the adapters' shardings (from `adapter_shardings`, or
        ``jax.tree.map(lambda x: x.sharding, adapters)``).

    Returns:
      A tree with the structure of the optimizer state, for
      ``jax.jit(optimizer.init, out_shardings=...)`` and as the state's
      in/out shardings of the training step.

    Raises:
      ValueError: ``shardings`` does not have the structure of ``adapters``.

    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_jax as lora
    >>> from jax.sharding import PartitionSpec as P
    >>> _, adapters = lora.split({"w": jnp.zeros((8, 16))}, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> s = optimizer_state_shardings(optax.adam(1e-3), adapters, adapter_shardings({"w": P(None, "model")}, adapters))
    >>> s[0].mu["w"].lora_b, s[0].count
    (P(None, 'model'), P())
    """
    param_flat, param_def = jax.tree_util.tree_flatten_with_path(adapters)
    shard_leaves = _sharding_leaves(shardings)
    if len(shard_leaves) != len(param_flat):
        raise ValueError(
            f"optimizer_state_shardings: `shardings` has {len(shard_leaves)} leaves but `adapters` has "
            f"{len(param_flat)}; pass the adapters' shardings (adapter_shardings(param_shardings, adapters))."
        )
    by_path = {tuple(p): (tuple(np.shape(x)), s) for (p, x), s in zip(param_flat, shard_leaves)}
    mesh = next((s.mesh for s in shard_leaves if isinstance(s, NamedSharding)), None)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else PartitionSpec()
    if any(isinstance(s, SingleDeviceSharding) for s in shard_leaves):
        replicated = next(s for s in shard_leaves if isinstance(s, SingleDeviceSharding))

    def one(keypath: tuple, leaf: Any) -> ShardingLike:
        # The longest adapter path that ends this state path, so nested
        # names ("a/w" vs "w") cannot be confused.
        for start in range(len(keypath)):
            hit = by_path.get(tuple(keypath[start:]))
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, adapters))


def shardings_from_rules(
    params: PyTree,
    rules: Mapping[str, PartitionSpec] | Callable[[str, Any], PartitionSpec | None],
    *,
    mesh: Mesh,
    default: PartitionSpec = PartitionSpec(),  # noqa: B008 (immutable)
) -> PyTree:
    """`NamedSharding`\\ s for a params tree from ``{regex: PartitionSpec}`` rules.

    A `lora_jax.QuantizedArray` (a QLoRA base from `lora_jax.quantize`) is
    matched as one weight, by its path and its (dequantised) shape, and gets a
    `QuantizedArray` of `NamedSharding`\\ s, for `jax.device_put` and
    ``jax.jit``: ``codes`` and ``absmax`` take the weight's spec (their axes
    are the weight's, the last one counting packed codes or blocks), and the
    double-quantisation statistics, one value per 256 blocks, take it with
    their last axis replicated.

    Args:
      params: the params (arrays or `jax.ShapeDtypeStruct`\\ s, some of them
        possibly `lora_jax.QuantizedArray`\\ s).
      rules: ``{regex: PartitionSpec}``, each regex matched with
        ``re.fullmatch`` against a leaf's ``/``-joined path, first match
        wins; or a callable ``(path, leaf) -> PartitionSpec | None``.
      mesh: the device mesh.
      default: the spec of leaves no rule matches (replicated by default).

    Returns:
      A tree with the structure of ``params`` holding a `NamedSharding` per
      leaf (a `QuantizedArray` of them per quantised weight).

    Raises:
      ValueError: a rule's spec names an axis that is not in ``mesh``, or
        does not divide the dimension it shards, or splits a quantised
        weight's last axis inside a quantisation block.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> s = shardings_from_rules({"up": jnp.zeros((4, 8))}, {"up": P(None, "model")}, mesh=mesh)
    >>> s["up"].spec
    P(None, 'model')
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"shardings_from_rules: `mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if not callable(rules):
        compiled = [(re.compile(k), v) for k, v in rules.items()]
        rule_fn = lambda path, _: next((v for r, v in compiled if r.fullmatch(path)), None)
    else:
        rule_fn = rules

    def one(keypath: tuple, leaf: Any) -> NamedSharding | QuantizedArray:
        path = _spec.path_to_str(keypath)
        spec = rule_fn(path, leaf)
        spec = default if spec is None else spec
        shape = tuple(leaf.shape) if isinstance(leaf, QuantizedArray) else tuple(np.shape(leaf))
        if len(spec) > len(shape):
            raise ValueError(
                f"shardings_from_rules: {path!r} has shape {shape} but its spec {spec} has {len(spec)} entries."
            )
        for dim, axes in zip(shape, spec):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            missing = [a for a in names if a not in mesh.shape]
            if missing:
                raise ValueError(
                    f"shardings_from_rules: the spec {spec} of {path!r} names mesh axes {missing} that the mesh "
                    f"{dict(mesh.shape)} does not have."
                )
            size = int(np.prod([mesh.shape[a] for a in names]))
            if dim % size:
                raise ValueError(
                    f"shardings_from_rules: {path!r} has shape {shape}; its spec {spec} splits a dimension of "
                    f"{dim} into {size} shards, which does not divide it. Change the rule or the mesh."
                )
        if isinstance(leaf, QuantizedArray):
            return _quantized_shardings(path, leaf, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _quantized_shardings(path: str, q: QuantizedArray, spec: PartitionSpec, mesh: Mesh) -> QuantizedArray:
    """A `QuantizedArray` of `NamedSharding`\\ s for a quantised weight sharded as ``spec``."""
    entries = tuple(spec) + (None,) * (q.ndim - len(spec))
    last = entries[-1]
    names = () if last is None else (last,) if isinstance(last, str) else tuple(last)
    size = int(np.prod([mesh.shape[a] for a in names]))
    blocks = q.absmax.shape[-1]
    if blocks % size:
        raise ValueError(
            f"shardings_from_rules: {path!r} is quantised with block_size={q.block_size} (shape {q.shape}, "
            f"{blocks} blocks per row); its spec {spec} splits the last axis into {size} shards, which would cut "
            f"quantisation blocks. Shard another axis, or quantise with a block_size that divides "
            f"{q.shape[-1] // size}."
        )
    full = NamedSharding(mesh, PartitionSpec(*entries))
    stats = NamedSharding(mesh, PartitionSpec(*entries[:-1], None)) if q.double_quant else None
    return dataclasses.replace(q, codes=full, absmax=full, absmax_scale=stats, absmax_mean=stats)


def _key_to_host(key: jax.Array) -> tuple[np.ndarray, Any]:
    """The key's raw bits on the host (and its implementation), so every process passes the same value."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)
    return np.asarray(key), None


def split_sharded(
    params: PyTree,
    spec: LoraSpec,
    *,
    key: jax.Array,
    shardings: PyTree | None = None,
    mesh: Mesh | None = None,
    trace: Callable[[PyTree], Any] | None = None,
) -> tuple[PyTree, PyTree]:
    """`lora_jax.split` with the adapters created directly in their sharded layout.

    The adapter structure is read abstractly (`jax.eval_shape` of the
    split), its shardings derived with `adapter_shardings`, and the initial
    factors are then drawn by one `jax.jit` whose ``out_shardings`` are those
    shardings: every device creates only its own shards, nothing large is
    built on one device or on the host, and (the PRNG being partitionable)
    the values equal those of an unsharded `lora_jax.split` with the same key.
    Works unchanged across processes after `jax.distributed.initialize`.

    Args:
      params: the base params, ideally already placed with their shardings
        (``jax.jit(model.init, out_shardings=...)``); host arrays are placed
        with `jax.device_put` first.
      spec: which leaves get adapters and which train in full.
      key: a PRNG key for the initial ``A`` factors (the same on every process).
      shardings: the params' shardings (`NamedSharding`\\ s, or
        `PartitionSpec`\\ s with ``mesh``); default: each leaf's own ``.sharding``.
      mesh: the mesh for `PartitionSpec` shardings.
      trace: as in `lora_jax.split`.

    Returns:
      ``(frozen, adapters)`` as from `lora_jax.split`: ``frozen`` holds the
      placed params (``None`` where a leaf trains in full), ``adapters`` is
      sharded as `adapter_shardings` says.

    Raises:
      ValueError: ``shardings`` holds `PartitionSpec`\\ s or ``None`` but no
        ``mesh`` is given (nor any `NamedSharding` to take it from), or
        anything `lora_jax.split` / `adapter_shardings` raise.
      TypeError: ``params`` leaves carry no sharding and ``shardings`` is missing.

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lora
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> params = jax.device_put({"w": jnp.ones((8, 16))}, NamedSharding(mesh, P(None, "model")))
    >>> frozen, adapters = split_sharded(params, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> adapters["w"].lora_b.sharding.spec
    P(None, 'model')
    """
    if key is None or not isinstance(key, jax.Array):
        raise TypeError(
            "split_sharded: `key` must be a JAX PRNG key for the initial A factors, e.g. key=jax.random.key(0); "
            f"got {type(key).__name__}."
        )
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
        if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda s: s is None)):
            raise TypeError(
                "split_sharded: some leaves of `params` are not placed jax.Arrays, so they carry no sharding. "
                "Pass shardings=... (NamedShardings, or PartitionSpecs with mesh=...)."
            )
    flat, _ = _tree._flatten(shardings, is_leaf=_is_sharding_leaf)
    if mesh is None and any(s is None or isinstance(s, PartitionSpec) for _, _, s in flat):
        mesh = _find_mesh({p: s for p, _, s in flat})
        if mesh is None:
            raise ValueError(
                "split_sharded: `shardings` holds PartitionSpecs (or None) but no mesh is known; pass mesh=... "
                "(for example jax.make_mesh((n_data, n_model), ('data', 'model')))."
            )
    placed_shardings = jax.tree.map(
        lambda s: (
            NamedSharding(mesh, PartitionSpec() if s is None else s) if s is None or isinstance(s, PartitionSpec) else s
        ),
        shardings,
        is_leaf=_is_sharding_leaf,
    )
    # device_put is a no-op for arrays already laid out this way; host arrays
    # are sent shard by shard.
    params = jax.device_put(params, placed_shardings)
    key_bits, impl = _key_to_host(key)

    def adapters_of(p: PyTree) -> PyTree:
        # The key travels as a host constant: the same literal on every
        # process, with no single-device array to move onto the mesh.
        k = jnp.asarray(key_bits) if impl is None else jax.random.wrap_key_data(key_bits, impl=impl)
        return _tree.split(p, spec, key=k, trace=trace)

    abstract_frozen, abstract = jax.eval_shape(adapters_of, params)
    out_shardings = adapter_shardings(placed_shardings, abstract, mesh=mesh)
    # Frozen leaves are unused by the init (split reads only their shapes),
    # so jit prunes them: no device copies or reads the big weights.
    adapters = jax.jit(lambda p: adapters_of(p)[1], out_shardings=out_shardings)(params)

    is_none = lambda x: x is None
    keep = jax.tree.leaves(abstract_frozen, is_leaf=is_none)
    frozen_leaves = [None if k is None else x for k, x in zip(keep, jax.tree.leaves(params, is_leaf=is_none))]
    frozen = jax.tree.unflatten(jax.tree.structure(abstract_frozen, is_leaf=is_none), frozen_leaves)
    return frozen, adapters
