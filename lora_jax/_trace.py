"""Abstract trace of a function of params: where and how each weight is used.

`split(..., trace=fn)` runs `jax.make_jaxpr(fn)` on the shapes of the params
and walks the program, following each parameter through the operations
that keep it a weight (dtype casts, transposes, slicing a stacked axis,
`jit`/`remat`/`custom_*` bodies, `scan` over a stack, `cond`, `while`) to
the operations that consume it. From those uses it reads the weight's
layout: which axes are contracted with activations (carried by ``A``), which
are outputs (carried by ``B``) and which are stacked layers (one independent
adapter each).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from lora_jax import _primitives as prims


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight's axes split between the two factors.

    ``A`` has shape ``[*W[stack], *W[a], rank]`` and ``B`` has shape
    ``[*W[stack], rank, *W[b]]``; axes are indices into ``W.shape``.
    """

    stack: tuple[int, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]


@dataclasses.dataclass
class Uses:
    """Everything the trace saw one leaf do."""

    dots: list[tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    """(contracted axes, batch axes) of each `dot_general` use."""
    convs: list[tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    """(output-feature axes, input-feature and window axes) of each conv use."""
    gathers: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    """Indexed (row) axes of each gather use, as in an embedding lookup."""
    sliced: set[int] = dataclasses.field(default_factory=set)
    """Axes sliced one entry at a time (`scan` over a stack, ``W[i]``)."""
    other: set[str] = dataclasses.field(default_factory=set)
    """Primitives that consume the weight in a way LoRA cannot factor."""


# A tagged value: which leaf it is and, for each of its axes, the leaf axes it
# covers (one, except after a reshape merged several).
_Tag = tuple[int, tuple[tuple[int, ...], ...]]


def _leaf_axes(axes: Sequence[tuple[int, ...]], positions: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({a for p in positions for a in axes[p]}))


def reshape_chunks(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pairs (old axes, new axes) of a reshape whose sizes multiply to the same number.

    Each chunk is a run of consecutive old axes merged or split into a run of
    consecutive new axes; size-1 axes join a neighbour. ``None`` if the
    reshape cannot be cut that way.

    >>> reshape_chunks((4, 6), (4, 2, 3))
    [([0], [0]), ([1], [1, 2])]
    """
    if math.prod(old) != math.prod(new) or 0 in old or not old or not new:
        return None
    chunks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    try:
        while i < len(old) and j < len(new):
            olds, news, po, pn = [i], [j], old[i], new[j]
            i, j = i + 1, j + 1
            while po != pn:
                if po < pn:
                    po, i = po * old[i], i + 1
                    olds.append(i - 1)
                else:
                    pn, j = pn * new[j], j + 1
                    news.append(j - 1)
            chunks.append((olds, news))
    except IndexError:
        return None
    chunks[-1][0].extend(range(i, len(old)))
    chunks[-1][1].extend(range(j, len(new)))
    return chunks


def _walk(jaxpr: prims.Jaxpr, tags: Sequence[_Tag | None], uses: list[Uses]) -> None:
    env: dict[Any, _Tag] = {v: t for v, t in zip(jaxpr.invars, tags) if t is not None}

    def tag_of(v: Any) -> _Tag | None:
        return None if isinstance(v, prims.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        in_tags = [tag_of(v) for v in eqn.invars]
        if not any(t is not None for t in in_tags):
            continue
        role = prims.role_of(eqn)
        handler = _HANDLERS.get(role) if role is not None else None
        try:
            handled = handler is not None and handler(eqn, in_tags, env, uses) is not False
        except prims.UnknownLayout as e:
            for t in in_tags:
                if t is not None:
                    uses[t[0]].other.add(str(e))
            continue
        if not handled:
            for t in in_tags:
                if t is not None:
                    uses[t[0]].other.add(eqn.primitive.name)


# -- one handler per role: record uses, tag outputs; False means "not a use LoRA can factor". ------


def _cast(eqn, in_tags, env, uses):
    env[eqn.outvars[0]] = in_tags[0]


def _transpose(eqn, in_tags, env, uses):
    leaf, axes = in_tags[0]
    env[eqn.outvars[0]] = (leaf, tuple(axes[p] for p in prims.param(eqn, "permutation")))


def _reshape(eqn, in_tags, env, uses):
    if len(in_tags) != 1 or prims.param(eqn, "dimensions", None):
        return False
    leaf, axes = in_tags[0]
    chunks = reshape_chunks(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
    if chunks is None:
        return False
    new_axes: list[tuple[int, ...]] = [()] * len(eqn.outvars[0].aval.shape)
    for olds, news in chunks:
        for n in news:
            new_axes[n] = _leaf_axes(axes, olds)
    env[eqn.outvars[0]] = (leaf, tuple(new_axes))


def _slice(eqn, in_tags, env, uses):
    if in_tags[0] is None:  # the weight is an index, not the operand
        return False
    leaf, axes = in_tags[0]
    shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    uses[leaf].sliced.update(_leaf_axes(axes, [i for i in range(len(axes)) if out_shape[i] != shape[i]]))
    env[eqn.outvars[0]] = in_tags[0]


def _squeeze(eqn, in_tags, env, uses):
    leaf, axes = in_tags[0]
    dims = set(prims.param(eqn, "dimensions"))
    uses[leaf].sliced.update(_leaf_axes(axes, dims))
    env[eqn.outvars[0]] = (leaf, tuple(a for i, a in enumerate(axes) if i not in dims))


def _call(eqn, in_tags, env, uses):
    _walk(prims.open_body(prims.body(eqn))[0], in_tags, uses)


def _scan(eqn, in_tags, env, uses):
    body, _ = prims.open_body(prims.body(eqn))
    n_consts, n_carry = prims.param(eqn, "num_consts"), prims.param(eqn, "num_carry")
    body_tags = list(in_tags)
    for i in range(n_consts, n_consts + n_carry):
        if in_tags[i] is not None:
            uses[in_tags[i][0]].other.add("scan carry")
            body_tags[i] = None
    for i in range(n_consts + n_carry, len(in_tags)):
        if in_tags[i] is not None:
            leaf, axes = in_tags[i]
            uses[leaf].sliced.update(axes[0])
            body_tags[i] = (leaf, axes[1:])
    _walk(body, body_tags, uses)


def _while(eqn, in_tags, env, uses):
    nc, nb = prims.param(eqn, "cond_nconsts"), prims.param(eqn, "body_nconsts")
    _walk(prims.param(eqn, "cond_jaxpr").jaxpr, in_tags[:nc] + [None] * (len(in_tags) - nc - nb), uses)
    _walk(prims.param(eqn, "body_jaxpr").jaxpr, in_tags[nc:], uses)
    for t in in_tags[nc + nb :]:
        if t is not None:
            uses[t[0]].other.add("while carry")


def _cond(eqn, in_tags, env, uses):
    for branch in prims.param(eqn, "branches"):
        _walk(branch.jaxpr, in_tags[1:], uses)


def _contract(eqn, in_tags, env, uses):
    (lc, rc), (lb, rb) = prims.param(eqn, "dimension_numbers")
    for tag, contract, batch in ((in_tags[0], lc, lb), (in_tags[1], rc, rb)):
        if tag is not None:
            leaf, axes = tag
            uses[leaf].dots.append((_leaf_axes(axes, contract), _leaf_axes(axes, batch)))


def _conv(eqn, in_tags, env, uses):
    if in_tags[1] is None or in_tags[0] is not None:
        return False
    leaf, axes = in_tags[1]
    out_dim, in_dim, *window = prims.param(eqn, "dimension_numbers").rhs_spec
    if prims.param(eqn, "feature_group_count") == 1 and prims.param(eqn, "batch_group_count") == 1:
        uses[leaf].convs.append((_leaf_axes(axes, [out_dim]), _leaf_axes(axes, (in_dim, *window))))
    else:
        uses[leaf].other.add("grouped conv_general_dilated")


def _gather(eqn, in_tags, env, uses):
    if in_tags[0] is None or in_tags[1] is not None:
        return False
    leaf, axes = in_tags[0]
    dn = prims.param(eqn, "dimension_numbers")
    if dn.operand_batching_dims:
        uses[leaf].other.add("batched gather")
        return
    picked = _leaf_axes(axes, dn.collapsed_slice_dims)
    uses[leaf].gathers.append(picked)
    shape, sizes = eqn.invars[0].aval.shape, prims.param(eqn, "slice_sizes")
    kept = [i for i in range(len(shape)) if i not in dn.collapsed_slice_dims]
    if len(kept) >= 2 and all(sizes[i] == shape[i] for i in kept):
        # Whole matrices picked by index (a mixture of experts' `w[experts]`): the result is still a weight,
        # one per pick, so follow it. Its index axes stand for the picked axes; a rows lookup (an embedding,
        # one vector per pick) ends here.
        out_ndim = len(eqn.outvars[0].aval.shape)
        offsets = sorted(dn.offset_dims)
        out_axes = [axes[kept[offsets.index(i)]] if i in offsets else picked for i in range(out_ndim)]
        env[eqn.outvars[0]] = (leaf, tuple(out_axes))


_HANDLERS = {
    prims.Role.CAST: _cast,
    prims.Role.TRANSPOSE: _transpose,
    prims.Role.RESHAPE: _reshape,
    prims.Role.SLICE: _slice,
    prims.Role.SQUEEZE: _squeeze,
    prims.Role.CALL: _call,
    prims.Role.REMAT: _call,
    prims.Role.SCAN: _scan,
    prims.Role.WHILE: _while,
    prims.Role.COND: _cond,
    prims.Role.CONTRACT: _contract,
    prims.Role.CONV: _conv,
    prims.Role.GATHER: _gather,
}
"""How the trace follows a weight through each role of `lora_jax._primitives`."""


def trace_uses(fn: Callable[[Any], Any], params: Any) -> list[Uses]:
    """Traces ``fn(params)`` abstractly; returns the uses of each leaf (flat order)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    closed = jax.make_jaxpr(lambda flat: fn(jax.tree_util.tree_unflatten(treedef, flat)))(abstract)
    uses = [Uses() for _ in leaves]
    tags = [(i, tuple((a,) for a in range(len(x.shape)))) for i, x in enumerate(leaves)]
    _walk(closed.jaxpr, tags, uses)
    return uses


def layout_from_uses(uses: Uses, ndim: int) -> tuple[Layout | None, str]:
    """The layout a leaf's uses imply, or ``None`` and the reason there is none."""
    stack = set(uses.sliced)
    for _, batch in uses.dots:
        stack.update(batch)
    if uses.gathers and not set(uses.gathers[0]) <= stack:
        a = set(uses.gathers[0])  # rows looked up: the input side, as for an embedding
    elif uses.convs:
        a = set(uses.convs[0][1])
    elif uses.dots:
        a = set(uses.dots[0][0])
    else:
        why = f"it is only used by {sorted(uses.other)}" if uses.other else "the traced function never uses it"
        return None, why
    a -= stack
    b = set(range(ndim)) - a - stack
    if not a or not b:
        return None, "its uses contract all or none of its non-stacked axes, so there is no in/out split"
    return Layout(tuple(sorted(stack)), tuple(sorted(a)), tuple(sorted(b))), ""


def is_linear_weight(uses: Uses) -> bool:
    """``"all-linear"`` with a trace: used as a matmul/einsum operand and never gathered."""
    return bool(uses.dots) and not uses.gathers
