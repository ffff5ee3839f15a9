"""Adapted weights inside `wrap`: the kinds and the interface they share.

`wrap`'s interpreter (`_transform.py`) replaces every adapted weight by a
value of this module and asks that value, not a table of special cases, how
to take part in each operation. An adapted weight is two independent
choices:

* its **frozen part**, how ``W`` is stored: `DENSE` (an array) or
  `QUANTIZED` (a `QuantizedArray`, QLoRA's base). A frozen part knows how to
  give ``W`` in full at its point of use (`FrozenKind.dense`), how to run an
  operation that consumes ``W`` (`FrozenKind.bind`: a quantised one
  dequantises inside a `jax.checkpoint`, so neither pass keeps ``W`` in full
  precision) and how to re-lay ``W`` out (`FrozenKind.relayout`: a quantised
  one stays quantised through a cast, or a slice of leading axes);
* its **update kind**, how the trained factors change ``W``: `LowRank`
  (LoRA, ``W + s·A@B``) or `Dora` (``m · (W + s·A@B) / ||W + s·A@B||``, the
  norm per output column).

QLoRA is a `LowRank` over a quantised frozen part, and a DoRA update over a
quantised base needs nothing more. An update kind is a subclass of
`Factored` and implements:

=============================  ==================================================
``transpose`` ``reshape``      follow a re-layout of ``W`` (the axis groups, and
``map_stack`` ``take_layers``  the factors: slice, squeeze, scan or gather a stack)
``contract``                   ``dot_general`` with an activation
``conv`` ``gather``            a convolution kernel; an embedding table
``finish``                     the kind's last step on the output of a use
``full``                       the adapted weight formed in full (the fallback)
``merge``                      the same for `lora_jax.merge`, from `LoraFactors`
=============================  ==================================================

A method returns ``None`` for a use it cannot keep factored; the interpreter
then forms the weight in full, warns, and goes on.

Layout. ``W``'s axes fall into three groups (`Meta`): ``stack`` (a leading
per-layer axis of a scanned stack, carried by both factors), ``a_axes``
(carried by ``A``, the input side) and ``b_axes`` (carried by ``B``).
``A`` is ``[*stack, *a, rank]`` and ``B`` is ``[*stack, rank, *b]``. An
update kind may carry more arrays laid out per output column,
``[*stack, *b]`` (`Factored.COLUMNS`, DoRA's magnitude); the layout methods
of `Factored` move them along with ``A`` and ``B``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from lora_jax import _primitives as prims
from lora_jax import _tree
from lora_jax._quantize import QuantizedArray
from lora_jax._trace import reshape_chunks
from lora_jax._tree import LoraFactors

# -- the frozen part ---------------------------------------------------------------------------


class FrozenKind:
    """How the frozen ``W`` of an adapted weight (or a frozen weight on its own) is stored."""

    name: ClassVar[str]

    def dense(self, w: Any) -> jax.Array:
        """``W`` in full precision, where it is used."""
        raise NotImplementedError

    def bind(self, eqn: prims.JaxprEqn, invals: Sequence[Any]) -> Any:
        """Runs ``eqn``, an operation that consumes ``W`` (the base matmul), on ``invals``."""
        raise NotImplementedError

    def relayout(self, eqn: prims.JaxprEqn, invals: Sequence[Any]) -> Any:
        """Runs ``eqn``, a cast or re-layout of ``W`` (its first input), keeping this kind where it can."""
        raise NotImplementedError


class _Dense(FrozenKind):
    name = "dense"

    def dense(self, w):
        return w

    def bind(self, eqn, invals):
        return prims.bind(eqn, invals)

    def relayout(self, eqn, invals):
        return prims.bind(eqn, invals)


class _Quantized(FrozenKind):
    name = "quantized"

    def dense(self, w):
        return w.dequantize()

    def bind(self, eqn, invals):
        # Without the checkpoint the backward pass would keep the dequantised weight from the forward pass
        # (a matmul's input gradient needs it); with it, the backward pass keeps the codes and dequantises
        # again.
        return jax.checkpoint(lambda *vals: prims.bind(eqn, [self.dense(v) if _is_q(v) else v for v in vals]))(*invals)

    def relayout(self, eqn, invals):
        q, *rest = invals
        lazy = self._lazy(eqn, q, rest)
        return lazy if lazy is not None else self.bind(eqn, invals)

    @staticmethod
    def _lazy(eqn, q: QuantizedArray, rest: Sequence[Any]) -> QuantizedArray | None:
        """``eqn`` applied to the codes, when it leaves the quantisation blocks (the last axis) alone."""
        name, p = eqn.primitive.name, prims.params(eqn)
        last = q.ndim - 1
        if name == "convert_element_type":
            if jnp.issubdtype(p["new_dtype"], jnp.floating):
                return dataclasses.replace(q, dtype=jnp.dtype(p["new_dtype"]).name)
            return None
        if name in ("copy", "copy_p"):
            return q
        if name == "transpose" and p["permutation"][last] == last:
            return q.map_leading(lambda c: jnp.transpose(c, p["permutation"]))
        if name == "reshape" and not p.get("dimensions") and p["new_sizes"] and p["new_sizes"][-1] == q.shape[-1]:
            return q.map_leading(lambda c: c.reshape(*p["new_sizes"][:-1], c.shape[-1]))
        if name == "squeeze" and last not in p["dimensions"]:
            return q.map_leading(lambda c: jax.lax.squeeze(c, p["dimensions"]))
        if name == "slice" and p["limit_indices"][last] - p["start_indices"][last] == q.shape[last]:
            if p["strides"] is not None and p["strides"][last] != 1:
                return None
            return q.map_leading(
                lambda c: jax.lax.slice(
                    c,
                    (*p["start_indices"][:last], 0),
                    (*p["limit_indices"][:last], c.shape[-1]),
                    None if p["strides"] is None else (*p["strides"][:last], 1),
                )
            )
        if name == "dynamic_slice" and p["slice_sizes"][last] == q.shape[last]:
            starts = rest[:last]
            if any(isinstance(s, (QuantizedArray, Factored)) for s in starts):
                return None
            return q.map_leading(
                lambda c: jax.lax.dynamic_slice(c, (*starts, 0), (*p["slice_sizes"][:last], c.shape[-1]))
            )
        return None


DENSE: FrozenKind = _Dense()
QUANTIZED: FrozenKind = _Quantized()


def _is_q(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def frozen_kind(w: Any) -> FrozenKind:
    """The kind of a frozen weight: `QUANTIZED` for a `QuantizedArray`, else `DENSE`."""
    return QUANTIZED if _is_q(w) else DENSE


def bind(eqn: prims.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Runs ``eqn`` on inputs that may hold quantised frozen weights, each dequantised where it is used."""
    return QUANTIZED.bind(eqn, invals) if any(_is_q(x) for x in invals) else prims.bind(eqn, invals)


# -- the update kinds --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Meta:
    """Static facts about an adapted weight: its scale, axis groups, path and dropout rate."""

    scale: float
    stack: tuple[int, ...]
    a_axes: tuple[int, ...]
    b_axes: tuple[int, ...]
    path: str
    dropout: float = 0.0


def _renumber(axes: Sequence[int], removed: Sequence[int]) -> tuple[int, ...]:
    return tuple(ax - sum(r < ax for r in removed) for ax in axes)


class Factored:
    """An adapted weight inside the interpreter: a frozen ``W`` and factors, never summed.

    The base class holds what every update kind shares (``W``, ``A``, ``B``,
    `Meta`, arrays laid out per output column) and how they follow a
    re-layout of ``W``. Subclasses say how the update takes part in a use.
    Each subclass is a pytree of its own.
    """

    COLUMNS: ClassVar[tuple[str, ...]] = ()
    """Names of extra arrays laid out ``[*stack, *b]`` (one value per output column of each layer)."""

    def __init__(self, w: Any, a: Any, b: Any, meta: Meta, **columns: Any):
        self.w, self.a, self.b, self.meta = w, a, b, meta
        if set(columns) != set(self.COLUMNS):
            raise TypeError(f"{type(self).__name__} takes the per-column arrays {self.COLUMNS}; got {sorted(columns)}")
        self.columns = columns

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._flatten, cls._unflatten)

    def _flatten(self):
        return (self.w, self.a, self.b, *(self.columns[n] for n in self.COLUMNS)), self.meta

    @classmethod
    def _unflatten(cls, meta, children):
        w, a, b, *cols = children
        return cls(w, a, b, meta, **dict(zip(cls.COLUMNS, cols)))

    @property
    def frozen(self) -> FrozenKind:
        return frozen_kind(self.w)

    def replace(self, w=None, a=None, b=None, columns: dict | None = None, **meta) -> Factored:
        return type(self)(
            self.w if w is None else w,
            self.a if a is None else a,
            self.b if b is None else b,
            dataclasses.replace(self.meta, **meta),
            **(self.columns if columns is None else columns),
        )

    # -- where W's axes sit in each array --
    def a_pos(self, axis: int) -> int:
        """Position in ``A`` of W's axis ``axis`` (stack or a side)."""
        m = self.meta
        return m.stack.index(axis) if axis in m.stack else len(m.stack) + m.a_axes.index(axis)

    def b_pos(self, axis: int) -> int:
        """Position in ``B`` of W's axis ``axis`` (stack or b side)."""
        m = self.meta
        return m.stack.index(axis) if axis in m.stack else len(m.stack) + 1 + m.b_axes.index(axis)

    def col_pos(self, axis: int) -> int:
        """Position in a per-column array of W's axis ``axis`` (stack or b side)."""
        m = self.meta
        return m.stack.index(axis) if axis in m.stack else len(m.stack) + m.b_axes.index(axis)

    def w_axis_of(self, of_a: bool) -> dict[int, int | None]:
        """Map from a factor's axis position to W's axis (None for the rank axis)."""
        m = self.meta
        order = [*m.stack, *m.a_axes, None] if of_a else [*m.stack, None, *m.b_axes]
        return dict(enumerate(order))

    # -- re-layouts of W --
    def transpose(self, w: Any, permutation: Sequence[int]) -> Factored:
        """``W`` transposed (already, in ``w``): only the axis groups are renumbered."""
        inv = np.argsort(permutation)
        m = self.meta
        return self.replace(
            w=w,
            stack=tuple(int(inv[i]) for i in m.stack),
            a_axes=tuple(int(inv[i]) for i in m.a_axes),
            b_axes=tuple(int(inv[i]) for i in m.b_axes),
        )

    def reshape(self, w: Any, new_shape: Sequence[int]) -> Factored | None:
        """``W`` reshaped (already, in ``w``), when every axis it splits or merges lies within one group."""
        m = self.meta
        chunks = reshape_chunks(self.w.shape, tuple(new_shape))
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

        def size(g):
            return [new_shape[n] for n in new[g]]

        rank = self.a.shape[-1]
        return self.replace(
            w=w,
            a=self.a.reshape(*size("stack"), *size("a"), rank),
            b=self.b.reshape(*size("stack"), rank, *size("b")),
            columns={n: c.reshape(*size("stack"), *size("b")) for n, c in self.columns.items()},
            stack=new["stack"],
            a_axes=new["a"],
            b_axes=new["b"],
        )

    def map_stack(self, w: Any, fn: Callable[[jax.Array, Callable[[int], int]], jax.Array], **meta) -> Factored:
        """Applies ``fn(array, pos_of)`` to every factor, for an operation on stack axes only.

        ``pos_of`` maps W's axis to its position in that array; ``meta``
        updates the axis groups if the operation removed or moved axes.
        """
        return self.replace(
            w=w,
            a=fn(self.a, self.a_pos),
            b=fn(self.b, self.b_pos),
            columns={n: fn(c, self.col_pos) for n, c in self.columns.items()},
            **meta,
        )

    def scan_slice(self) -> Factored | None:
        """The value `scan` hands its body for one step over W's axis 0, or None if that axis is not stacked."""
        m = self.meta
        if 0 not in m.stack:
            return None
        rest = [s for s in m.stack if s != 0]
        return self.map_stack(
            self.w,
            lambda x, pos_of: jnp.moveaxis(x, pos_of(0), 0),
            stack=_renumber(rest, [0]),
            a_axes=_renumber(m.a_axes, [0]),
            b_axes=_renumber(m.b_axes, [0]),
        )

    def take_layers(self, eqn: prims.JaxprEqn, idx: Any) -> Factored | None:
        """``W[idx]`` for a ``gather`` that picks whole layers (experts): the same gather of every factor.

        A mixture of experts that indexes its expert weights per token,
        ``w[experts]``, gives each token its experts' ``[in, out]`` matrices;
        gathering ``A`` and ``B`` alike keeps one adapter per expert, and the
        gathered axes become the result's stack axes, used by the matmul that
        follows. The base gather is the model's own.
        """
        if isinstance(idx, Factored):
            return None
        p = prims.params(eqn)
        dn = p["dimension_numbers"]
        m = self.meta
        stack = set(m.stack)
        if not stack or dn.operand_batching_dims or set(dn.collapsed_slice_dims) != stack:
            return None
        if set(dn.start_index_map) != stack:
            return None
        if any(p["slice_sizes"][i] != (1 if i in stack else self.w.shape[i]) for i in range(self.w.ndim)):
            return None
        w = self.frozen.bind(eqn, [self.w, idx])
        offsets = sorted(dn.offset_dims)
        kept = [i for i in range(self.w.ndim) if i not in stack]  # W's axes at the offset dims, in order
        out_of_w = dict(zip(kept, offsets))
        picked = [i for i in range(w.ndim) if i not in offsets]  # the index's batch axes: one per pick

        def take(x, pos_of):
            rest = x.ndim - len(m.stack)
            numbers = jax.lax.GatherDimensionNumbers(
                offset_dims=tuple(range(len(picked), len(picked) + rest)),
                collapsed_slice_dims=tuple(range(len(m.stack))),
                start_index_map=tuple(pos_of(ax) for ax in dn.start_index_map),
            )
            sizes = (*([1] * len(m.stack)), *x.shape[len(m.stack) :])
            return jax.lax.gather(
                x,
                idx,
                numbers,
                sizes,
                indices_are_sorted=p["indices_are_sorted"],
                unique_indices=p["unique_indices"],
                mode=p["mode"],
                fill_value=p["fill_value"],
            )

        return self.map_stack(
            w,
            take,
            stack=tuple(picked),
            a_axes=tuple(out_of_w[ax] for ax in m.a_axes),
            b_axes=tuple(out_of_w[ax] for ax in m.b_axes),
        )

    # -- uses --
    def contract(self, interp: Any, eqn: prims.JaxprEqn, act: Any, weight_is_lhs: bool) -> Any:
        """The ``dot_general`` ``eqn`` of ``act`` with this weight, or None."""
        raise NotImplementedError

    def conv(self, interp: Any, eqn: prims.JaxprEqn, x: Any) -> Any:
        """The convolution ``eqn`` of ``x`` with this weight as its kernel, or None."""
        return None

    def gather(self, interp: Any, eqn: prims.JaxprEqn, idx: Any) -> Any:
        """The ``gather`` ``eqn`` of rows of this weight at ``idx``, or None."""
        return None

    def full(self) -> jax.Array:
        """The adapted weight in full (the materialising fallback)."""
        return self.merge(self.frozen.dense(self.w), self.factors())

    def factors(self) -> LoraFactors:
        m = self.meta
        return LoraFactors(self.a, self.b, m.scale, m.stack, m.a_axes, m.b_axes, m.dropout, **self.columns)

    @classmethod
    def merge(cls, w: jax.Array, f: LoraFactors, sign: float = 1.0) -> jax.Array:
        """The adapted weight in full from a dense ``w`` and its `LoraFactors` (``sign=-1``: undo it)."""
        raise NotImplementedError

    @classmethod
    def from_factors(cls, w: Any, f: LoraFactors, path: str) -> Factored:
        meta = Meta(f.scale, f.stack_axes, f.a_axes, f.b_axes, path, f.dropout)
        return cls(w, f.lora_a, f.lora_b, meta, **{n: getattr(f, n) for n in cls.COLUMNS})


def kind_of(f: LoraFactors) -> type[Factored]:
    """The update kind of a factor pair: `Dora` when it has a magnitude, else `LowRank`."""
    return Dora if f.magnitude is not None else LowRank


def adapted(w: Any, f: LoraFactors, path: str) -> Factored:
    """The interpreter's value for the frozen ``w`` adapted by ``f``."""
    return kind_of(f).from_factors(w, f, path)


class LowRank(Factored):
    """LoRA: ``W + s·A@B``, used as ``W x + s·B(A x)``."""

    def finish(self, out: jax.Array, out_w_axes: Sequence[int | None]) -> jax.Array | None:
        """The kind's last step on ``out`` (``W' x``), whose axes carry ``out_w_axes`` of W (None: not W's)."""
        return out

    @classmethod
    def merge(cls, w, f, sign=1.0):
        return _tree.add_delta(w, f.lora_a, f.lora_b, f.scale, f.stack_axes, f.a_axes, f.b_axes, sign=sign)

    def contract(self, interp, eqn, act, weight_is_lhs):
        """``act · W`` as ``act · W + s·(act · A) · B`` for any dimension numbers.

        The activation's contracted axes meet ``W``'s, and ``W``'s axes
        belong to three groups: ``stack`` (layers or experts, carried by both
        factors), ``a`` (carried by ``A``) and ``b`` (carried by ``B``). The
        low-rank path contracts the activation first with the *inner* factor,
        the one that holds the contracted axes, giving ``low`` with a rank
        axis, then contracts ``low`` with the *outer* factor over the rank
        (and any remaining contracted axes), and finally transposes ``up``
        into the order ``dot_general`` gives the base product.

        A stack axis pairs ``A``'s and ``B``'s slices, so it is a batch axis
        of both products wherever the base product uses it: a batch axis of
        the dot (a scanned layer, an expert buffer), a free axis (every
        expert applied to the same tokens: batch in the second product only)
        or a contracted one (a sum over experts: batch in the first product,
        contracted with the rank in the second).

        Worked example: ``jnp.einsum("bsd,dhk->bshk", x, W)``, a
        ``DenseGeneral`` query projection, ``W`` ``[d, h, k]`` with
        ``a = (0,)``, ``b = (1, 2)``, so ``A`` is ``[d, r]`` and ``B`` is
        ``[r, h, k]``.

        * dimension numbers: ``x`` contracts axis 2 with ``W``'s axis 0, no
          batch. ``pairs_a = [(2, 0)]`` (W's axis 0 is on A's side),
          ``pairs_b = []``; so ``inner = A``, ``outer = B``.
        * ``low = dot_general(x, A)`` contracting x's 2 with A's 0:
          ``[b, s, r]``; its rank axis is ``low_rank = 2``.
        * ``up = dot_general(low, B)`` contracting low's 2 with B's 0:
          ``[b, s, h, k]``, labelled
          ``[("act", 0), ("act", 1), ("w", 1), ("w", 2)]``.
        * the base ``x · W`` is ``[b, s, h, k]`` too (x's free axes, then
          W's), so the transpose is the identity and ``base + up`` is the
          answer.
        """
        p = prims.params(eqn)
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = p["dimension_numbers"]
        if weight_is_lhs:
            w_contract, w_batch, x_contract, x_batch = lhs_contract, lhs_batch, rhs_contract, rhs_batch
        else:
            w_contract, w_batch, x_contract, x_batch = rhs_contract, rhs_batch, lhs_contract, lhs_batch
        meta = self.meta
        if not set(w_batch) <= set(meta.stack):
            return None  # a batch axis that is not a layer axis: W's slices are not independent weights
        if not self.contracts_ok(w_contract):
            return None
        w_dtype = jnp.dtype(self.w.dtype)
        base = self.frozen.bind(eqn, [self.w, act] if weight_is_lhs else [act, self.w])
        precision = p.get("precision")
        pref = p.get("preferred_element_type")
        a, b = self.a.astype(w_dtype), self.b.astype(w_dtype)
        pairs = list(zip(x_contract, w_contract))
        pairs_a = [(act_axis, w_axis) for act_axis, w_axis in pairs if w_axis in meta.a_axes]
        pairs_b = [(act_axis, w_axis) for act_axis, w_axis in pairs if w_axis in meta.b_axes]
        summed = [(act_axis, w_axis) for act_axis, w_axis in pairs if w_axis in meta.stack]  # a sum over layers
        free_stack = [s for s in meta.stack if s not in w_batch and s not in w_contract]
        # Contract the activation first with the factor that holds its contracted axes, so the
        # intermediate is [..., rank] rather than an outer product.
        if pairs_a or not pairs_b:
            inner, inner_pos, inner_pairs, outer, outer_pos, outer_pairs = (
                a,
                self.a_pos,
                pairs_a,
                b,
                self.b_pos,
                pairs_b,
            )
            outer_rank = len(meta.stack)
        else:
            inner, inner_pos, inner_pairs, outer, outer_pos, outer_pairs = (
                b,
                self.b_pos,
                pairs_b,
                a,
                self.a_pos,
                pairs_a,
            )
            outer_rank = a.ndim - 1
        n_batch, n_summed = len(x_batch), len(summed)
        # First product: the dot's batch axes and the summed stack axes are batch axes.
        lead_x = [*x_batch, *(act_axis for act_axis, _ in summed)]
        lead_w = [*w_batch, *(w_axis for _, w_axis in summed)]
        inner_dims = (
            ([act_axis for act_axis, _ in inner_pairs], [inner_pos(w_axis) for _, w_axis in inner_pairs]),
            (lead_x, [inner_pos(w) for w in lead_w]),
        )
        x_free = [i for i in range(act.ndim) if i not in lead_x and i not in [act_axis for act_axis, _ in inner_pairs]]
        inner_used = {inner_pos(w_axis) for _, w_axis in inner_pairs} | {inner_pos(w) for w in lead_w}
        inner_free = [i for i in range(inner.ndim) if i not in inner_used]
        x_spec = _explicit_spec(act)
        # With explicit mesh axes JAX asks for the output sharding of a contraction
        # over sharded axes: keep act's sharding on its free axes, replicate the rest.
        low_sharding = (
            None if x_spec is None else P(*[x_spec[i] for i in (*lead_x, *x_free)], *[None] * len(inner_free))
        )
        low = jax.lax.dot_general(
            interp.dropout(act, meta.dropout), inner, inner_dims, precision=precision, out_sharding=low_sharding
        )
        low = low * jnp.asarray(meta.scale, low.dtype)
        # low: [*lead, *x_free, *inner_free]; where each activation axis and each W axis (None: rank) sits.
        low_pos_of_x = {act_axis: len(lead_x) + k for k, act_axis in enumerate(x_free)}
        w_axis_of_inner = self.w_axis_of(inner is a)
        low_pos_of_w = {w_axis_of_inner[i]: len(lead_x) + len(x_free) + k for k, i in enumerate(inner_free)}
        # Second product: the rank, the outer factor's contracted axes and the summed stack axes are
        # contracted; the dot's batch axes and the free stack axes are batch axes.
        outer_dims = (
            (
                [low_pos_of_x[act_axis] for act_axis, _ in outer_pairs]
                + [n_batch + k for k in range(n_summed)]
                + [low_pos_of_w[None]],
                [outer_pos(w_axis) for _, w_axis in outer_pairs]
                + [outer_pos(w_axis) for _, w_axis in summed]
                + [outer_rank],
            ),
            (
                list(range(n_batch)) + [low_pos_of_w[s] for s in free_stack],
                [outer_pos(w) for w in w_batch] + [outer_pos(s) for s in free_stack],
            ),
        )
        # Label up's axes, then put them in dot_general's output order.
        labels = [("batch", k) for k in range(n_batch)] + [("w", s) for s in free_stack]
        labels += [("act", i) for i in x_free if i not in [act_axis for act_axis, _ in outer_pairs]]
        labels += [("w", w_axis_of_inner[i]) for i in inner_free if w_axis_of_inner[i] not in (None, *free_stack)]
        (_, outer_contract), (_, outer_batch) = outer_dims
        w_axis_of_outer = self.w_axis_of(inner is not a)
        labels += [
            ("w", w_axis_of_outer[i]) for i in range(outer.ndim) if i not in outer_contract and i not in outer_batch
        ]
        x_out = [("act", i) for i in range(act.ndim) if i not in x_batch and i not in x_contract]
        w_out = [("w", i) for i in range(self.w.ndim) if i not in w_batch and i not in w_contract]
        target = [("batch", k) for k in range(n_batch)] + (w_out + x_out if weight_is_lhs else x_out + w_out)
        base_spec = _explicit_spec(base)
        up_sharding = None if base_spec is None else P(*[base_spec[target.index(label)] for label in labels])
        if not outer_batch and up_sharding is None and interp.remat_depth:
            # Inside a remat body, a unit batch axis (which XLA drops) keeps a "dots" policy
            # (dots_with_no_batch_dims_saveable) from saving this [tokens, out] product next to the base
            # one: it is cheap to recompute from `low`. Outside remat nothing is saved by policy.
            (low_c, outer_c), _ = outer_dims
            unit_dims = (([c + 1 for c in low_c], [c + 1 for c in outer_c]), ([0], [0]))
            up = jax.lax.dot_general(
                low[None], outer[None], unit_dims, precision=precision, preferred_element_type=pref
            )
            up = up[0]
        else:
            up = jax.lax.dot_general(
                low, outer, outer_dims, precision=precision, preferred_element_type=pref, out_sharding=up_sharding
            )
        up = jnp.transpose(up, [labels.index(label) for label in target])
        out_w_axes = [w_batch[k] if kind == "batch" else (k if kind == "w" else None) for kind, k in target]
        return self.finish(base + up.astype(base.dtype), out_w_axes)

    def contracts_ok(self, w_contract: Sequence[int]) -> bool:
        """Whether a ``dot_general`` contracting W's axes ``w_contract`` can stay factored for this kind."""
        return True

    def conv(self, interp, eqn, x):
        if isinstance(x, Factored):
            return None
        p = prims.params(eqn)
        m = self.meta
        out_dim, in_dim, *window = p["dimension_numbers"].rhs_spec
        if m.stack or m.b_axes != (out_dim,) or set(m.a_axes) != {in_dim, *window}:
            return None
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None
        base = self.frozen.bind(eqn, [x, self.w])
        a, b = self.a.astype(jnp.dtype(self.w.dtype)), self.b.astype(jnp.dtype(self.w.dtype))
        # A as a kernel with W's axis order and `rank` output channels.
        kernel = jnp.transpose(a, [a.ndim - 1 if i == out_dim else self.a_pos(i) for i in range(self.w.ndim)])
        params = dict(p, preferred_element_type=None)
        low = jax.lax.conv_general_dilated_p.bind(interp.dropout(x, m.dropout), kernel, **params)
        low = low * jnp.asarray(m.scale, low.dtype)
        channel = p["dimension_numbers"].out_spec[1]
        up = jax.lax.dot_general(low, b, (((channel,), (0,)), ((), ())), precision=p.get("precision"))
        up = jnp.moveaxis(up, -1, channel)
        out_w_axes = [out_dim if i == channel else None for i in range(base.ndim)]
        return self.finish(base + up.astype(base.dtype), out_w_axes)

    def gather(self, interp, eqn, idx):
        if isinstance(idx, Factored):
            return None
        p = prims.params(eqn)
        dn = p["dimension_numbers"]
        m = self.meta
        rows = set(m.a_axes)
        if (
            m.stack
            or dn.operand_batching_dims
            or set(dn.collapsed_slice_dims) != rows
            or set(dn.start_index_map) != rows
        ):
            return None
        if any(p["slice_sizes"][i] != (1 if i in rows else self.w.shape[i]) for i in range(self.w.ndim)):
            return None
        base = self.frozen.bind(eqn, [self.w, idx])
        a, b = self.a.astype(jnp.dtype(self.w.dtype)), self.b.astype(jnp.dtype(self.w.dtype))
        batch_rank = base.ndim - len(m.b_axes)
        a_dn = jax.lax.GatherDimensionNumbers(
            offset_dims=(batch_rank,),
            collapsed_slice_dims=tuple(sorted(self.a_pos(i) for i in m.a_axes)),
            start_index_map=tuple(self.a_pos(i) for i in dn.start_index_map),
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
        up = jax.lax.dot_general(a_rows, b, (((batch_rank,), (0,)), ((), ())))  # [*batch, *b_axes]
        # W's kept axes appear at offset_dims in increasing W order; batch dims fill the rest.
        b_sorted = sorted(m.b_axes)
        offsets = sorted(dn.offset_dims)
        batch_iter = iter(range(batch_rank))
        perm = [
            batch_rank + m.b_axes.index(b_sorted[offsets.index(i)]) if i in offsets else next(batch_iter)
            for i in range(base.ndim)
        ]
        out_w_axes = [b_sorted[offsets.index(i)] if i in offsets else None for i in range(base.ndim)]
        return self.finish(base + jnp.transpose(up, perm).astype(base.dtype), out_w_axes)


class Dora(LowRank):
    """DoRA: ``m · V / ||V||`` with ``V = W + s·A@B``, the norm per output column.

    The norm is a constant for differentiation, as DoRA prescribes, so each
    use is LoRA's followed by a per-column scale ``m / ||V||`` (`finish`):
    it commutes with any use that does not sum over output columns. The norm
    comes from ``AᵀW`` and ``AᵀA`` (`_norm`), never from ``V`` formed in full.
    """

    COLUMNS = ("magnitude",)

    @classmethod
    def merge(cls, w, f, sign=1.0):
        if sign != 1.0:
            raise ValueError("a DoRA weight m·V/||V|| cannot be undone from the merged weight alone")
        return _tree.dora_weight(w, f.lora_a, f.lora_b, f.scale, f.stack_axes, f.a_axes, f.b_axes, f.magnitude)

    def contracts_ok(self, w_contract):
        # Summing over output columns, or over layers, would mix columns of different scales.
        return not set(w_contract) & {*self.meta.b_axes, *self.meta.stack}

    def finish(self, out, out_w_axes):
        meta = self.meta
        if not set(meta.stack) | set(meta.b_axes) <= set(out_w_axes):
            return None
        w_dtype = jnp.dtype(self.w.dtype)
        factor = self.columns["magnitude"].astype(jnp.float32) / self._norm(
            self.a.astype(w_dtype), self.b.astype(w_dtype)
        )
        positions = [None if ax is None or ax in meta.a_axes else self.col_pos(ax) for ax in out_w_axes]
        factor = jnp.transpose(factor, [p for p in positions if p is not None])
        sizes = iter(factor.shape)
        factor = factor.reshape([next(sizes) if p is not None else 1 for p in positions])
        return (out * factor).astype(out.dtype)

    def _norm(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``||W + s·A@B||`` per output column, ``[*stack, *b]`` float32, without forming ``W + s·A@B``.

        ``||V_j||² = ||W_j||² + 2s·(AᵀW ⊙ B)_j + s²·(Bᵀ AᵀA B)_jj``: one
        ``AᵀW`` product (``in·out·rank`` multiply-adds, as a LoRA forward of
        ``in`` tokens) and products of rank-sized matrices.
        """
        meta = self.meta
        ns = len(meta.stack)
        w = jax.lax.stop_gradient(self.frozen.dense(self.w)).astype(jnp.float32)
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
