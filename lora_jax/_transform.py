"""`wrap`: run a function of params with each adapted weight kept factored.

`wrap(apply_fn)` traces ``apply_fn`` to a jaxpr and evaluates it with an
interpreter in which every adapted weight is a `Factored` value
``(W, A, B, s)``. Operations that commute with the factorisation keep it
factored; the ones that consume a weight apply both parts:

* ``dot_general``: ``dot(x, W) + s·dot(dot(x, A), B)`` with the dimension
  numbers carried over, so the backward pass needs only ``x``, ``A``, ``B``
  and the upstream gradient, never a full-size gradient of ``W``;
* ``conv_general_dilated``: ``A`` as a conv to ``rank`` channels, ``B`` as a
  1x1 projection;
* ``gather`` (an embedding lookup): gather rows of ``A``, then ``@ B``.

Higher-order primitives are re-entered through their public ops
(`jax.lax.scan`, `jax.checkpoint`, `jax.lax.switch`, `jax.lax.while_loop`)
with factored values passed through as pytrees. Anything else forms
``W + s·A@B`` at that point (correct, but it defeats LoRA) and says so.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from lora_jax import _primitives as prims
from lora_jax import _tree
from lora_jax._quantize import QuantizedArray
from lora_jax._trace import reshape_chunks
from lora_jax._tree import LoraFactors, add_delta, dora_weight


class MaterializationWarning(UserWarning):
    """An adapted weight had to be formed in full (``W + s·A@B``) inside `wrap`."""


class MaterializationError(ValueError):
    """`wrap(..., strict=True)` met a use of an adapted weight it cannot keep factored."""


@dataclasses.dataclass(frozen=True)
class _Meta:
    scale: float
    stack: tuple[int, ...]
    a_axes: tuple[int, ...]
    b_axes: tuple[int, ...]
    path: str
    dropout: float = 0.0


@jax.tree_util.register_pytree_node_class
class Factored:
    """An adapted weight inside the interpreter: ``W + s·A@B``, never summed."""

    __slots__ = ("w", "a", "b", "meta", "magnitude")

    def __init__(self, w, a, b, meta: _Meta, magnitude=None):
        self.w, self.a, self.b, self.meta, self.magnitude = w, a, b, meta, magnitude

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.magnitude), self.meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        w, a, b, magnitude = children
        return cls(w, a, b, meta, magnitude)

    def replace(self, w=None, a=None, b=None, magnitude=None, **meta) -> Factored:
        return Factored(
            self.w if w is None else w,
            self.a if a is None else a,
            self.b if b is None else b,
            dataclasses.replace(self.meta, **meta),
            self.magnitude if magnitude is None else magnitude,
        )

    def a_pos(self, axis: int) -> int:
        """Position in ``A`` of W's axis ``axis`` (stack or a side)."""
        m = self.meta
        return m.stack.index(axis) if axis in m.stack else len(m.stack) + m.a_axes.index(axis)

    def b_pos(self, axis: int) -> int:
        """Position in ``B`` of W's axis ``axis`` (stack or b side)."""
        m = self.meta
        return m.stack.index(axis) if axis in m.stack else len(m.stack) + 1 + m.b_axes.index(axis)

    def full(self) -> jax.Array:
        m = self.meta
        if self.magnitude is not None:
            return dora_weight(_dense(self.w), self.a, self.b, m.scale, m.stack, m.a_axes, m.b_axes, self.magnitude)
        return add_delta(_dense(self.w), self.a, self.b, m.scale, m.stack, m.a_axes, m.b_axes)


def _dense(w: Any) -> Any:
    """A quantised frozen weight in full precision, at the point of use; anything else as it is."""
    return w.dequantize() if isinstance(w, QuantizedArray) else w


def _lazy_cast(eqn: prims.JaxprEqn, q: QuantizedArray) -> QuantizedArray | None:
    """A cast of a quantised weight, kept quantised: it dequantises straight to the new dtype later."""
    if eqn.primitive.name == "convert_element_type":
        new_dtype = prims.params(eqn)["new_dtype"]
        if jnp.issubdtype(new_dtype, jnp.floating):
            return dataclasses.replace(q, dtype=jnp.dtype(new_dtype).name)
        return None
    return q if eqn.primitive.name in ("copy", "copy_p") else None


def _bind_dequantizing(eqn: prims.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Binds ``eqn`` on its inputs with quantised weights dequantised inside a `jax.checkpoint`.

    Without the checkpoint the backward pass would keep the full-precision
    weight from the forward pass (a matmul's input gradient needs it); with
    it, the backward pass keeps the codes and dequantises again.
    """
    if not any(isinstance(x, QuantizedArray) for x in invals):
        return prims.bind(eqn, invals)
    return jax.checkpoint(lambda *vals: prims.bind(eqn, [_dense(v) for v in vals]))(*invals)


_BODY_ROLES = frozenset({prims.Role.CALL, prims.Role.REMAT, prims.Role.SCAN, prims.Role.WHILE, prims.Role.COND})
"""Roles whose rules pass values into a body as pytrees, so a quantised weight can travel into it."""


def _renumber(axes: Sequence[int], removed: Sequence[int]) -> tuple[int, ...]:
    return tuple(ax - sum(r < ax for r in removed) for ax in axes)


class _Interpreter:
    def __init__(self, strict: bool, dropout_key: jax.Array | None = None):
        self.strict = strict
        self.warned: set[tuple[str, str]] = set()
        self.dropout_key = dropout_key
        self.dropout_uses = 0
        self.remat_depth = 0  # > 0 while evaluating the body of a jax.checkpoint

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Inverted dropout on the input of a low-rank path (identity without a key)."""
        if self.dropout_key is None or rate == 0.0:
            return x
        # One key per use site; inside a scan the key itself differs per
        # iteration (see `_scan`), so every layer of a stack gets its own mask.
        key = jax.random.fold_in(self.dropout_key, self.dropout_uses)
        self.dropout_uses += 1
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    @contextlib.contextmanager
    def keyed(self, key: jax.Array | None):
        """Evaluates a body with its own dropout key and use counter."""
        saved = self.dropout_key, self.dropout_uses
        self.dropout_key, self.dropout_uses = key, 0
        try:
            yield
        finally:
            self.dropout_key, self.dropout_uses = saved

    # -- materialisation ------------------------------------------------------------------
    def materialize(self, value: Any, why: str) -> Any:
        if isinstance(value, QuantizedArray):
            return value.dequantize()  # the point of use of a quantised frozen weight, not a LoRA cost
        if not isinstance(value, Factored):
            return value
        path = value.meta.path
        msg = (
            f"lora_jax.wrap: the adapted weight {path!r} is consumed by {why}, which lora_jax cannot keep "
            "factored, so W + s·A@B is formed there. The result is correct, but it costs a "
            "full-size weight and its gradient, which LoRA is meant to avoid."
        )
        if self.strict:
            raise MaterializationError(msg + " (strict=True makes this an error; pass strict=False to allow it.)")
        if (why, path) not in self.warned:
            self.warned.add((why, path))
            warnings.warn(msg + " Pass strict=True to make this an error.", MaterializationWarning, stacklevel=4)
        return value.full()

    def materialize_all(self, values: Sequence[Any], why: str) -> list[Any]:
        return [self.materialize(v, why) for v in values]

    # -- evaluation -----------------------------------------------------------------------
    def eval(self, jaxpr: prims.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if isinstance(v, prims.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            if any(isinstance(x, Factored) for x in invals):
                rule = _RULES.get(eqn.primitive.name)
                why = f"the primitive '{eqn.primitive.name}'"
                try:
                    outs = rule(self, eqn, invals) if rule is not None else None
                except prims.UnknownLayout as e:
                    outs, why = None, str(e)
                if outs is None:
                    invals = self.materialize_all(invals, why)
                    outs = self.bind(eqn, invals)
            elif any(isinstance(x, QuantizedArray) for x in invals):
                # A quantised frozen weight travels into bodies (a scan slices its codes per layer) and is
                # dequantised by the first operation that uses it, inside the same compiled program.
                role = prims.ROLES.get(eqn.primitive.name)
                outs = None
                if role in _BODY_ROLES:
                    outs = _RULES[eqn.primitive.name](self, eqn, invals)
                elif role is prims.Role.CAST:
                    outs = _lazy_cast(eqn, invals[0])
                if outs is None:
                    outs = _bind_dequantizing(eqn, invals)
            else:
                outs = self.bind(eqn, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, prims.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    bind = staticmethod(prims.bind)

    def eval_closed(self, closed: Any, args: Sequence[Any]) -> list[Any]:
        if isinstance(closed, prims.ClosedJaxpr):
            return self.eval(closed.jaxpr, closed.consts, args)
        return self.eval(closed, (), args)


# -- rules: each returns the outputs (a value, or a list for multiple_results),
# or None to fall back to materialising. ------------------------------------------------
_ROLE_RULES: dict[prims.Role, Callable[[_Interpreter, prims.JaxprEqn, list], Any]] = {}


def _rule(role: prims.Role):
    def register(fn):
        _ROLE_RULES[role] = fn
        return fn

    return register


def _with_w(eqn, invals, f: Factored, position: int):
    vals = list(invals)
    vals[position] = _dense(f.w)
    return _Interpreter.bind(eqn, vals)


@_rule(prims.Role.CAST)
def _cast(interp, eqn, invals):
    (f,) = invals
    # A and B keep their own dtype; they are cast to W's at the point of use.
    if isinstance(f.w, QuantizedArray):
        lazy = _lazy_cast(eqn, f.w)
        if lazy is not None:
            return f.replace(w=lazy)
    return f.replace(w=_with_w(eqn, invals, f, 0))


@_rule(prims.Role.TRANSPOSE)
def _transpose(interp, eqn, invals):
    (f,) = invals
    inv = np.argsort(prims.params(eqn)["permutation"])
    m = f.meta
    return f.replace(
        w=_with_w(eqn, invals, f, 0),
        stack=tuple(int(inv[i]) for i in m.stack),
        a_axes=tuple(int(inv[i]) for i in m.a_axes),
        b_axes=tuple(int(inv[i]) for i in m.b_axes),
    )


@_rule(prims.Role.RESHAPE)
def _reshape(interp, eqn, invals):
    # Splitting or merging axes within one group (stack, in side, out side)
    # commutes with the factorisation: reshape A or B the same way.
    if len(invals) != 1 or prims.params(eqn).get("dimensions") or invals[0].magnitude is not None:
        return None
    (f,) = invals
    m = f.meta
    new_shape = tuple(prims.params(eqn)["new_sizes"])
    chunks = reshape_chunks(f.w.shape, new_shape)
    groups = {"stack": m.stack, "a": m.a_axes, "b": m.b_axes}
    if chunks is None or any(tuple(sorted(axes)) != tuple(axes) for axes in groups.values()):
        return None
    group_of = {ax: g for g, axes in groups.items() for ax in axes}
    new_group: dict[int, str] = {}
    for olds, news in chunks:
        owners = {group_of[o] for o in olds}
        if len(owners) != 1:
            return None
        owner = owners.pop()
        new_group.update((n, owner) for n in news)
    new = {g: tuple(n for n in range(len(new_shape)) if new_group[n] == g) for g in groups}
    size = lambda g: [new_shape[n] for n in new[g]]
    rank = f.a.shape[-1]
    return f.replace(
        w=_with_w(eqn, invals, f, 0),
        a=f.a.reshape(*size("stack"), *size("a"), rank),
        b=f.b.reshape(*size("stack"), rank, *size("b")),
        stack=new["stack"],
        a_axes=new["a"],
        b_axes=new["b"],
    )


def _full_outside_stack(f: Factored, out_shape: Sequence[int]) -> bool:
    shape = f.w.shape
    return all(out_shape[i] == shape[i] for i in range(len(shape)) if i not in f.meta.stack)


@_rule(prims.Role.SLICE)
def _slice_any(interp, eqn, invals):
    if eqn.primitive.name == "dynamic_slice":
        return _dynamic_slice(interp, eqn, invals)
    return _slice(interp, eqn, invals)


def _slice(interp, eqn, invals):
    (f,) = invals
    p = prims.params(eqn)
    if not _full_outside_stack(f, eqn.outvars[0].aval.shape) or any(s not in (None, 1) for s in p["strides"] or ()):
        return None
    m, ns = f.meta, len(f.meta.stack)

    def cut(x, pos_of, r_pos):
        start, limit = [0] * x.ndim, list(x.shape)
        for ax in m.stack:
            start[pos_of(ax)], limit[pos_of(ax)] = p["start_indices"][ax], p["limit_indices"][ax]
        return jax.lax.slice(x, start, limit)

    magnitude = None if f.magnitude is None else cut(f.magnitude, f.a_pos, -1)
    return f.replace(
        w=_with_w(eqn, invals, f, 0), a=cut(f.a, f.a_pos, -1), b=cut(f.b, f.b_pos, ns), magnitude=magnitude
    )


def _dynamic_slice(interp, eqn, invals):
    f, *starts = invals
    if any(isinstance(s, Factored) for s in starts) or not _full_outside_stack(f, prims.params(eqn)["slice_sizes"]):
        return None
    m = f.meta

    def cut(x, pos_of):
        idx, sizes = [0] * x.ndim, list(x.shape)
        for ax in m.stack:
            idx[pos_of(ax)], sizes[pos_of(ax)] = starts[ax], prims.params(eqn)["slice_sizes"][ax]
        return jax.lax.dynamic_slice(x, idx, sizes)

    magnitude = None if f.magnitude is None else cut(f.magnitude, f.a_pos)
    return f.replace(w=_with_w(eqn, invals, f, 0), a=cut(f.a, f.a_pos), b=cut(f.b, f.b_pos), magnitude=magnitude)


@_rule(prims.Role.SQUEEZE)
def _squeeze(interp, eqn, invals):
    (f,) = invals
    dims = tuple(prims.params(eqn)["dimensions"])
    m = f.meta
    if not set(dims) <= set(m.stack):
        return None
    a = jnp.squeeze(f.a, tuple(f.a_pos(d) for d in dims))
    b = jnp.squeeze(f.b, tuple(f.b_pos(d) for d in dims))
    magnitude = None if f.magnitude is None else jnp.squeeze(f.magnitude, tuple(f.a_pos(d) for d in dims))
    return f.replace(
        w=_with_w(eqn, invals, f, 0),
        a=a,
        b=b,
        magnitude=magnitude,
        stack=_renumber([s for s in m.stack if s not in dims], dims),
        a_axes=_renumber(m.a_axes, dims),
        b_axes=_renumber(m.b_axes, dims),
    )


@_rule(prims.Role.CONTRACT)
def _dot_general(interp, eqn, invals):
    """``act · W`` as ``act · W + s·(act · A) · B`` for any dimension numbers.

    The activation's contracted axes meet ``W``'s, and ``W``'s axes belong to
    three groups (`_Meta`): ``stack`` (per-layer, must be the dot's batch
    axes), ``a`` (carried by ``A``) and ``b`` (carried by ``B``). The low-rank
    path contracts the activation first with the *inner* factor, the one that
    holds the contracted axes, giving ``low`` with a rank axis, then contracts
    ``low`` with the *outer* factor over the rank (and any remaining
    contracted axes), and finally transposes ``up`` into the order
    ``dot_general`` gives the base product.

    Worked example: ``jnp.einsum("bsd,dhk->bshk", x, W)``, a ``DenseGeneral``
    query projection, ``W`` ``[d, h, k]`` with ``a = (0,)``, ``b = (1, 2)``,
    so ``A`` is ``[d, r]`` and ``B`` is ``[r, h, k]``.

    * dimension numbers: ``x`` contracts axis 2 with ``W``'s axis 0, no batch.
      ``pairs_a = [(2, 0)]`` (W's axis 0 is on A's side), ``pairs_b = []``;
      so ``inner = A``, ``outer = B``.
    * ``low = dot_general(x, A)`` contracting x's 2 with A's 0:
      ``[b, s, r]``; its rank axis is ``low_rank = 2``.
    * ``up = dot_general(low, B)`` contracting low's 2 with B's 0:
      ``[b, s, h, k]``, labelled ``[("act", 0), ("act", 1), ("w", 1), ("w", 2)]``.
    * the base ``x · W`` is ``[b, s, h, k]`` too (x's free axes, then W's),
      so the transpose is the identity and ``base + up`` is the answer.
    """
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        lhs = interp.materialize(lhs, "a dot_general with another adapted weight")
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = prims.params(eqn)["dimension_numbers"]
    if isinstance(rhs, Factored):
        weight, act, w_contract, w_batch, x_contract, x_batch, weight_is_lhs = (
            rhs,
            lhs,
            rhs_contract,
            rhs_batch,
            lhs_contract,
            lhs_batch,
            False,
        )
    else:
        weight, act, w_contract, w_batch, x_contract, x_batch, weight_is_lhs = (
            lhs,
            rhs,
            lhs_contract,
            lhs_batch,
            rhs_contract,
            rhs_batch,
            True,
        )
    meta = weight.meta
    if set(w_batch) != set(meta.stack):
        return None  # contracting or broadcasting over a stacked axis: not a per-layer matmul
    if weight.magnitude is not None and set(w_contract) != set(meta.a_axes):
        return None  # DoRA's norm is per output column: only a use that contracts exactly the input axes
    w_dtype = jnp.dtype(weight.w.dtype)
    base = _bind_dequantizing(eqn, [weight.w, act] if weight_is_lhs else [act, weight.w])
    precision = prims.params(eqn).get("precision")
    pref = prims.params(eqn).get("preferred_element_type")
    a, b = weight.a.astype(w_dtype), weight.b.astype(w_dtype)
    pairs_a = [(act_axis, w_axis) for act_axis, w_axis in zip(x_contract, w_contract) if w_axis in meta.a_axes]
    pairs_b = [(act_axis, w_axis) for act_axis, w_axis in zip(x_contract, w_contract) if w_axis in meta.b_axes]
    # Contract the activation first with the factor that holds its contracted axes, so the
    # intermediate is [..., rank] rather than an outer product.
    if pairs_a or not pairs_b:
        inner, inner_pos, inner_pairs, outer, outer_pos, outer_pairs = (
            a,
            weight.a_pos,
            pairs_a,
            b,
            weight.b_pos,
            pairs_b,
        )
        inner_rank, outer_rank = a.ndim - 1, len(meta.stack)
    else:
        inner, inner_pos, inner_pairs, outer, outer_pos, outer_pairs = (
            b,
            weight.b_pos,
            pairs_b,
            a,
            weight.a_pos,
            pairs_a,
        )
        inner_rank, outer_rank = len(meta.stack), a.ndim - 1
    n_batch = len(x_batch)
    inner_dims = (
        ([act_axis for act_axis, _ in inner_pairs], [inner_pos(w_axis) for _, w_axis in inner_pairs]),
        (list(x_batch), [inner_pos(w) for w in w_batch]),
    )
    x_free = [i for i in range(act.ndim) if i not in x_batch and i not in [act_axis for act_axis, _ in inner_pairs]]
    inner_used = {inner_pos(w_axis) for _, w_axis in inner_pairs} | {inner_pos(w) for w in w_batch}
    inner_free = [i for i in range(inner.ndim) if i not in inner_used]
    x_spec = _explicit_spec(act)
    # With explicit mesh axes JAX asks for the output sharding of a contraction
    # over sharded axes: keep act's sharding on its free axes, replicate the rest.
    low_sharding = None if x_spec is None else P(*[x_spec[i] for i in (*x_batch, *x_free)], *[None] * len(inner_free))
    low = jax.lax.dot_general(
        interp.dropout(act, meta.dropout), inner, inner_dims, precision=precision, out_sharding=low_sharding
    )
    low_pos_of_x = {act_axis: n_batch + k for k, act_axis in enumerate(x_free)}
    low_rank = n_batch + len(x_free) + inner_free.index(inner_rank)
    low = low * jnp.asarray(meta.scale, low.dtype)
    outer_dims = (
        (
            [low_pos_of_x[act_axis] for act_axis, _ in outer_pairs] + [low_rank],
            [outer_pos(w_axis) for _, w_axis in outer_pairs] + [outer_rank],
        ),
        (list(range(n_batch)), [outer_pos(w) for w in w_batch]),
    )
    # Label up's axes, then put them in dot_general's output order.
    w_axis_of_inner = _w_axis_of(weight, inner is a)
    w_axis_of_outer = _w_axis_of(weight, inner is not a)
    low_free_labels = [("act", act_axis) for act_axis in x_free] + [
        ("w", w_axis_of_inner[i]) for i in inner_free if i != inner_rank
    ]
    labels = [("batch", k) for k in range(n_batch)]
    labels += [
        label
        for label in low_free_labels
        if label[0] == "act" and label[1] not in [act_axis for act_axis, _ in outer_pairs]
    ]
    labels += [label for label in low_free_labels if label[0] == "w"]
    outer_used = {outer_pos(w_axis) for _, w_axis in outer_pairs} | {outer_pos(w) for w in w_batch} | {outer_rank}
    labels += [("w", w_axis_of_outer[i]) for i in range(outer.ndim) if i not in outer_used]
    x_out = [("act", i) for i in range(act.ndim) if i not in x_batch and i not in x_contract]
    w_out = [("w", i) for i in range(weight.w.ndim) if i not in w_batch and i not in w_contract]
    target = [("batch", k) for k in range(n_batch)] + (w_out + x_out if weight_is_lhs else x_out + w_out)
    base_spec = _explicit_spec(base)
    up_sharding = None if base_spec is None else P(*[base_spec[target.index(label)] for label in labels])
    if n_batch == 0 and up_sharding is None and interp.remat_depth:
        # Inside a remat body, a unit batch axis (which XLA drops) keeps a "dots" policy
        # (dots_with_no_batch_dims_saveable) from saving this [tokens, out] product next to the base
        # one: it is cheap to recompute from `low`. Outside remat nothing is saved by policy.
        (low_c, outer_c), _ = outer_dims
        unit_dims = (([c + 1 for c in low_c], [c + 1 for c in outer_c]), ([0], [0]))
        up = jax.lax.dot_general(low[None], outer[None], unit_dims, precision=precision, preferred_element_type=pref)
        up = up[0]
    else:
        up = jax.lax.dot_general(
            low, outer, outer_dims, precision=precision, preferred_element_type=pref, out_sharding=up_sharding
        )
    up = jnp.transpose(up, [labels.index(label) for label in target])
    out = base + up.astype(base.dtype)
    if weight.magnitude is None:
        return out
    # DoRA: (W + s·A@B) x scaled per output column by m / ||W + s·A@B||, which commutes with the matmul.
    factor = weight.magnitude.astype(jnp.float32) / _dora_norm(weight, a, b)  # [*stack, *b]
    ns = len(meta.stack)
    positions = [
        meta.stack.index(w_batch[label[1]])
        if label[0] == "batch"
        else ns + meta.b_axes.index(label[1])
        if label[0] == "w"
        else None
        for label in target
    ]
    factor = jnp.transpose(factor, [p for p in positions if p is not None])
    sizes = iter(factor.shape)
    factor = factor.reshape([next(sizes) if p is not None else 1 for p in positions])
    return (out * factor).astype(out.dtype)


def _dora_norm(weight: Factored, a: jax.Array, b: jax.Array) -> jax.Array:
    """``||W + s·A@B||`` per output column, ``[*stack, *b]`` float32, without forming ``W + s·A@B``.

    ``||V_j||² = ||W_j||² + 2s·(AᵀW ⊙ B)_j + s²·(Bᵀ AᵀA B)_jj``: one ``AᵀW``
    product (``in·out·rank`` multiply-adds, as a LoRA forward of ``in``
    tokens) and products of rank-sized matrices. Treated as a constant for
    differentiation, as DoRA prescribes.
    """
    meta = weight.meta
    ns = len(meta.stack)
    w = jax.lax.stop_gradient(_dense(weight.w)).astype(jnp.float32)
    a = jax.lax.stop_gradient(a).astype(jnp.float32)
    b = jax.lax.stop_gradient(b).astype(jnp.float32)
    stack = list(range(ns))
    a_in = [ns + i for i in range(len(meta.a_axes))]
    w_sq = jnp.square(_tree.column_norm(w, meta.stack, meta.a_axes, meta.b_axes))
    # AᵀW: [*stack, r, *b] with the b axes in W's order, then in B's order.
    atw = jax.lax.dot_general(a, w, ((a_in, list(meta.a_axes)), (stack, list(meta.stack))))
    in_w_order = sorted(meta.b_axes)
    atw = jnp.transpose(atw, [*range(ns + 1), *(ns + 1 + in_w_order.index(ax) for ax in meta.b_axes)])
    cross = jnp.sum(atw * b, axis=ns)
    gram = jax.lax.dot_general(a, a, ((a_in, a_in), (stack, stack)))  # [*stack, r, r]
    b_flat = b.reshape(*b.shape[: ns + 1], -1)
    gram_b = jax.lax.dot_general(gram, b_flat, (([ns + 1], [ns]), (stack, stack)))
    ab_sq = jnp.sum(b_flat * gram_b, axis=ns).reshape(*b.shape[:ns], *b.shape[ns + 1 :])
    s = meta.scale
    return jnp.sqrt(jnp.maximum(w_sq + 2 * s * cross + s * s * ab_sq, 0.0))


def _explicit_spec(x: Any) -> tuple | None:
    """``x``'s partition spec, one entry per axis, if it lives on a mesh with explicit axes."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    if not any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _w_axis_of(f: Factored, of_a: bool) -> dict[int, int | None]:
    """Map from a factor's axis position to W's axis (None for the rank axis)."""
    m = f.meta
    if of_a:
        order = [*m.stack, *m.a_axes, None]
    else:
        order = [*m.stack, None, *m.b_axes]
    return dict(enumerate(order))


@_rule(prims.Role.CONV)
def _conv(interp, eqn, invals):
    x, f = invals
    if isinstance(x, Factored) or not isinstance(f, Factored) or f.magnitude is not None:
        return None
    p = prims.params(eqn)
    m = f.meta
    out_dim, in_dim, *window = p["dimension_numbers"].rhs_spec
    if m.stack or m.b_axes != (out_dim,) or set(m.a_axes) != {in_dim, *window}:
        return None
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    base = _bind_dequantizing(eqn, [x, f.w])
    a, b = f.a.astype(jnp.dtype(f.w.dtype)), f.b.astype(jnp.dtype(f.w.dtype))
    # A as a kernel with W's axis order and `rank` output channels.
    kernel = jnp.transpose(a, [a.ndim - 1 if i == out_dim else f.a_pos(i) for i in range(f.w.ndim)])
    params = dict(p, preferred_element_type=None)
    t = jax.lax.conv_general_dilated_p.bind(interp.dropout(x, m.dropout), kernel, **params)
    t = t * jnp.asarray(m.scale, t.dtype)
    channel = p["dimension_numbers"].out_spec[1]
    u = jax.lax.dot_general(t, b, (((channel,), (0,)), ((), ())), precision=p.get("precision"))
    u = jnp.moveaxis(u, -1, channel)
    return base + u.astype(base.dtype)


@_rule(prims.Role.GATHER)
def _gather(interp, eqn, invals):
    f, idx = invals
    if isinstance(idx, Factored) or not isinstance(f, Factored) or f.magnitude is not None:
        return None
    p = prims.params(eqn)
    dn = p["dimension_numbers"]
    m = f.meta
    rows = set(m.a_axes)
    if m.stack or dn.operand_batching_dims or set(dn.collapsed_slice_dims) != rows or set(dn.start_index_map) != rows:
        return None
    if any(p["slice_sizes"][i] != (1 if i in rows else f.w.shape[i]) for i in range(f.w.ndim)):
        return None
    base = _Interpreter.bind(eqn, [_dense(f.w), idx])
    a, b = f.a.astype(jnp.dtype(f.w.dtype)), f.b.astype(jnp.dtype(f.w.dtype))
    batch_rank = base.ndim - len(m.b_axes)
    a_dn = jax.lax.GatherDimensionNumbers(
        offset_dims=(batch_rank,),
        collapsed_slice_dims=tuple(sorted(f.a_pos(i) for i in m.a_axes)),
        start_index_map=tuple(f.a_pos(i) for i in dn.start_index_map),
    )
    a_rows = jax.lax.gather(
        a,
        idx,
        a_dn,
        (*([1] * len(m.a_axes)), a.shape[-1]),
        indices_are_sorted=p["indices_are_sorted"],
        unique_indices=p["unique_indices"],
        mode=p["mode"],
        fill_value=p["fill_value"],
    )
    a_rows = a_rows * jnp.asarray(m.scale, a_rows.dtype)
    u = jax.lax.dot_general(a_rows, b, (((batch_rank,), (0,)), ((), ())))  # [*batch, *b_axes]
    # W's kept axes appear at offset_dims in increasing W order; batch dims fill the rest.
    b_sorted = [batch_rank + m.b_axes.index(ax) for ax in sorted(m.b_axes)]
    offsets = sorted(dn.offset_dims)
    batch_iter = iter(range(batch_rank))
    perm = [b_sorted[offsets.index(i)] if i in offsets else next(batch_iter) for i in range(base.ndim)]
    return base + jnp.transpose(u, perm).astype(base.dtype)


# -- higher-order primitives ----------------------------------------------------------------


@_rule(prims.Role.CALL)
def _inline(interp, eqn, invals):
    # Inlining keeps the computation; a custom derivative rule written for the
    # plain weight cannot take a factored one, so JAX differentiates the body.
    body = prims.body(eqn)
    return interp.eval_closed(body, invals)


@_rule(prims.Role.REMAT)
def _remat(interp, eqn, invals):
    p = prims.params(eqn)
    body = prims.body(eqn)

    def fn(*args):
        interp.remat_depth += 1
        try:
            return interp.materialize_all(interp.eval_closed(body, args), "the output of a remat body")
        finally:
            interp.remat_depth -= 1

    return jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


@_rule(prims.Role.SCAN)
def _scan(interp, eqn, invals):
    p = prims.params(eqn)
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts = invals[:nc]
    init = interp.materialize_all(invals[nc : nc + ncarry], "a scan carry")
    xs = [_sliceable(interp, x) for x in invals[nc + ncarry :]]

    keys = None
    if interp.dropout_key is not None:
        keys = jax.random.split(jax.random.fold_in(interp.dropout_key, interp.dropout_uses), p["length"])
        interp.dropout_uses += 1

    def body(carry, x):
        x, key = x
        with interp.keyed(key if keys is not None else interp.dropout_key):
            outs = interp.eval_closed(prims.body(eqn), [*consts, *carry, *x])
        outs = interp.materialize_all(outs, "the output of a scan body")
        return outs[:ncarry], outs[ncarry:]

    carry, ys = jax.lax.scan(body, init, (xs, keys), length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


def _sliceable(interp: _Interpreter, x: Any) -> Any:
    """A factored `scan` input whose leaves all slice to one layer's factors.

    `scan` slices axis 0 of every leaf; that is one layer of the stack when
    W's axis 0 is stacked. A and B get that axis moved to the front and the
    metadata describes a single layer, which is what the body sees.
    """
    if not isinstance(x, Factored):
        return x
    m = x.meta
    if 0 not in m.stack:
        return interp.materialize(x, "a scan over one of its unstacked axes")
    a = jnp.moveaxis(x.a, x.a_pos(0), 0)
    b = jnp.moveaxis(x.b, x.b_pos(0), 0)
    magnitude = None if x.magnitude is None else jnp.moveaxis(x.magnitude, x.a_pos(0), 0)
    rest = [s for s in m.stack if s != 0]
    return Factored(
        x.w,
        a,
        b,
        dataclasses.replace(
            m, stack=_renumber(rest, [0]), a_axes=_renumber(m.a_axes, [0]), b_axes=_renumber(m.b_axes, [0])
        ),
        magnitude,
    )


@_rule(prims.Role.WHILE)
def _while(interp, eqn, invals):
    p = prims.params(eqn)
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc : nc + nb]
    init = interp.materialize_all(invals[nc + nb :], "a while_loop carry")

    def cond_fun(carry):
        return interp.eval_closed(p["cond_jaxpr"], [*cond_consts, *carry])[0]

    def body_fun(carry):
        outs = interp.eval_closed(p["body_jaxpr"], [*body_consts, *carry])
        return interp.materialize_all(outs, "the output of a while_loop body")

    return list(jax.lax.while_loop(cond_fun, body_fun, list(init)))


@_rule(prims.Role.COND)
def _cond(interp, eqn, invals):
    index, *ops = invals
    index = interp.materialize(index, "the index of a cond")

    def branch(closed):
        def run(*args):
            return interp.materialize_all(interp.eval_closed(closed, args), "the output of a cond branch")

        return run

    return list(jax.lax.switch(index, [branch(br) for br in prims.params(eqn)["branches"]], *ops))


_RULES: dict[str, Callable[[_Interpreter, prims.JaxprEqn, list], Any]] = {
    name: _ROLE_RULES[role] for name, role in prims.ROLES.items()
}
"""The rule of each primitive of `lora_jax._primitives.ROLES`, by name."""


# -- the public transform -------------------------------------------------------------------


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _signature(x: Any) -> Any:
    if isinstance(x, QuantizedArray):
        return (QuantizedArray, jax.tree.structure(x), tuple(jax.typeof(c) for c in jax.tree.leaves(x)))
    return jax.typeof(x)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class RetraceWarning(UserWarning):
    """`wrap` could not cache its compiled program for a call (an unhashable static argument)."""


def wrap(apply_fn: Callable[..., Any], *, strict: bool = False, cache_size: int | None = 32) -> Callable[..., Any]:
    """Turns ``apply_fn(params, *args)`` into ``f(frozen, adapters, *args)``.

    The returned function computes what ``apply_fn`` computes on
    ``merge(frozen, adapters)``, but with every adapted weight used as
    ``W x + s·B(A x)`` on the fly: ``W + s·A@B`` is never formed, and the
    gradient with respect to ``adapters`` never forms a gradient of ``W``, so
    a training step costs about two thirds of full fine-tuning. It composes
    with `jax.jit`, `jax.grad` and `jax.vmap` like any function.

    Args:
      apply_fn: a function whose first argument is the params tree (for
        example ``model.apply`` of a Flax linen module). Array arguments
        (anywhere in ``args``/``kwargs``) are traced; everything else is
        passed as a static Python value.
      strict: raise `MaterializationError` instead of warning when an adapted
        weight is used in a way that forces ``W + s·A@B`` to be formed.
      cache_size: how many compiled programs the returned function keeps,
        least recently used first out; ``None`` keeps every one, ``0`` none.

    Compilation cache:
      Called eagerly, the returned function traces ``apply_fn`` and compiles
      the interpreter with `jax.jit` once per signature (the tree structures,
      the shapes and dtypes of the arrays, and the values of the static
      arguments), and reuses that program on later calls with the same
      signature. Beyond ``cache_size`` signatures the least recently used
      program is dropped (and recompiled if it is needed again). A static
      argument that cannot be hashed (a set, or an object without
      ``__hash__``; lists, tuples and dicts are flattened, and arrays are
      dynamic) cannot be part of that key: such calls are traced and run
      without the cache every time, with a `RetraceWarning` the first time;
      pass a hashable value (a frozenset, a tuple) instead. Inside an outer `jax.jit` none of this matters: the outer
      trace compiles everything once.

    Returns:
      ``wrapped(frozen, adapters, *args, lora_dropout_key=None, **kwargs)``
      with ``apply_fn``'s outputs. ``lora_dropout_key`` (a PRNG key) turns on
      the dropout of adapters whose spec set ``dropout > 0``: pass one while
      training, none to evaluate. Dropout acts on the low-rank path only.

    Raises:
      ValueError: (when called) the adapters do not belong to ``frozen``, or
        ``adapters`` is a full parameter tree (plain arrays where ``frozen``
        holds arrays, which would train every weight); in strict mode, a use
        that cannot stay factored.

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lora
    >>> params = {"w": jnp.ones((3, 4))}
    >>> frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> apply = lambda p, x: x @ p["w"]
    >>> lora.wrap(apply)(frozen, adapters, jnp.ones((2, 3))).shape
    (2, 4)
    """
    if not callable(apply_fn):
        raise TypeError(f"wrap: `apply_fn` must be callable; got {type(apply_fn).__name__}.")
    if cache_size is not None and (isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0):
        raise ValueError(f"wrap: `cache_size` must be a non-negative int or None; got {cache_size!r}.")
    cache: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    warned_unhashable = False

    @functools.wraps(apply_fn)
    def wrapped(
        frozen: Any, adapters: Any, *args: Any, lora_dropout_key: jax.Array | None = None, **kwargs: Any
    ) -> Any:
        factors: dict[str, LoraFactors] = {}

        def keep_w(path, w, f):
            factors[path] = f
            return w

        params = _tree.combine(frozen, adapters, keep_w, caller="wrap")
        flat, treedef = _tree._flatten(params, is_leaf=_is_quantized)
        param_leaves = [x for _, _, x in flat]
        arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = [_is_dynamic(x) for x in arg_leaves]
        dyn_leaves = [x for x, d in zip(arg_leaves, dynamic) if d]
        static_leaves = tuple(None if d else x for x, d in zip(arg_leaves, dynamic))

        def flat_fn(p_leaves, d_leaves):
            it = iter(d_leaves)
            leaves = [next(it) if d else s for s, d in zip(static_leaves, dynamic)]
            a, kw = jax.tree_util.tree_unflatten(arg_tree, leaves)
            return apply_fn(jax.tree_util.tree_unflatten(treedef, p_leaves), *a, **kw)

        avals = tuple(_signature(x) for x in (*param_leaves, *dyn_leaves))
        try:
            cache_key = (treedef, arg_tree, tuple(dynamic), static_leaves, avals)
            hash(cache_key)
        except TypeError:
            cache_key = None
            nonlocal warned_unhashable
            if not warned_unhashable:
                warned_unhashable = True
                unhashable = [type(x).__name__ for x in static_leaves if x is not None and not _hashable(x)]
                warnings.warn(
                    f"lora_jax.wrap: a static argument of type {unhashable[:3]} cannot be hashed, so this call is "
                    "traced and run without wrap's compile cache, and every later call like it will be too. Pass "
                    "a hashable value (a frozenset instead of a set, a tuple) or an array.",
                    RetraceWarning,
                    stacklevel=2,
                )
        run = cache.get(cache_key) if cache_key is not None else None
        if run is not None:
            cache.move_to_end(cache_key)
        if run is None:
            # A quantised weight is traced as the array it stands for.
            traced = [
                jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _is_quantized(x) else x for x in param_leaves
            ]
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(traced, dyn_leaves)
            out_tree = jax.tree_util.tree_structure(out_shape)

            def run(values, dyn, dropout_key, consts):
                interp = _Interpreter(strict, dropout_key)
                outs = interp.eval(closed.jaxpr, consts, [*values, *dyn])
                outs = interp.materialize_all(outs, "the function's output (it returns the weight itself)")
                return jax.tree_util.tree_unflatten(out_tree, outs)

            # Compiled once per input signature, so eager calls run at jit speed;
            # under an outer transform it is just a nested jit. Constants the
            # function closes over are passed as arguments rather than baked
            # into the program.
            if cache_key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
                run = functools.partial(jax.jit(run), consts=closed.consts)
                if cache_size is None or cache_size > 0:
                    cache[cache_key] = run
                    if cache_size is not None and len(cache) > cache_size:
                        cache.popitem(last=False)
            else:
                run = functools.partial(run, consts=closed.consts)

        values: list[Any] = []
        for path, _, leaf in flat:
            f = factors.get(path)
            if f is None:
                values.append(leaf)
            else:
                meta = _Meta(f.scale, f.stack_axes, f.a_axes, f.b_axes, path, f.dropout)
                values.append(Factored(leaf, f.lora_a, f.lora_b, meta, f.magnitude))
        return run(values, dyn_leaves, lora_dropout_key)

    return wrapped
