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
* ``gather`` (an embedding lookup): gather rows of ``A``, then ``@ B``; a
  gather of whole matrices (a mixture of experts' ``w[experts]``) gathers
  ``W``, ``A`` and ``B`` alike and stays factored.

What each adapted weight does in those uses is up to its kind (LoRA, DoRA;
a dense or a quantised frozen part): see `lora_jax._adapted`. This module
is the interpreter and the rules that read each primitive's parameters and
hand the weight to its kind.

Higher-order primitives are re-entered through their public ops
(`jax.lax.scan`, `jax.checkpoint`, `jax.lax.switch`, `jax.lax.while_loop`)
with factored values passed through as pytrees. Anything else forms
``W + s·A@B`` at that point (correct, but it defeats LoRA) and says so.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _adapted, _tree
from lora_jax import _primitives as prims
from lora_jax._adapted import QUANTIZED, Factored, _renumber
from lora_jax._quantize import QuantizedArray
from lora_jax._tree import LoraFactors


class MaterializationWarning(UserWarning):
    """An adapted weight had to be formed in full (``W + s·A@B``) inside `wrap`."""


class MaterializationError(ValueError):
    """`wrap(..., strict=True)` met a use of an adapted weight it cannot keep factored."""


_BODY_ROLES = frozenset({prims.Role.CALL, prims.Role.REMAT, prims.Role.SCAN, prims.Role.WHILE, prims.Role.COND})
"""Roles whose rules pass values into a body as pytrees, so a quantised weight can travel into it."""

_RELAYOUT_ROLES = frozenset(
    {prims.Role.CAST, prims.Role.TRANSPOSE, prims.Role.RESHAPE, prims.Role.SLICE, prims.Role.SQUEEZE}
)
"""Roles that re-lay a weight out: a quantised frozen weight stays quantised through them where it can."""


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
                if role in _BODY_ROLES:
                    outs = _RULES[eqn.primitive.name](self, eqn, invals)
                elif role in _RELAYOUT_ROLES and not any(isinstance(x, QuantizedArray) for x in invals[1:]):
                    outs = QUANTIZED.relayout(eqn, invals)
                else:
                    outs = _adapted.bind(eqn, invals)
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


def _dequantized(x: Any) -> Any:
    """The other operand of a use: a quantised frozen weight there is dequantised."""
    return x.dequantize() if isinstance(x, QuantizedArray) else x


def _relaid_w(eqn, invals, f: Factored) -> Any:
    """The frozen ``W`` of ``f`` after ``eqn`` (a cast or re-layout), in the form its frozen kind keeps."""
    return f.frozen.relayout(eqn, [f.w, *invals[1:]])


@_rule(prims.Role.CAST)
def _cast(interp, eqn, invals):
    # A and B keep their own dtype; they are cast to W's at the point of use.
    (f,) = invals
    return f.replace(w=_relaid_w(eqn, invals, f))


@_rule(prims.Role.TRANSPOSE)
def _transpose(interp, eqn, invals):
    (f,) = invals
    return f.transpose(_relaid_w(eqn, invals, f), prims.params(eqn)["permutation"])


@_rule(prims.Role.RESHAPE)
def _reshape(interp, eqn, invals):
    # Splitting or merging axes within one group (stack, in side, out side)
    # commutes with the factorisation: reshape A or B the same way.
    if len(invals) != 1 or prims.params(eqn).get("dimensions"):
        return None
    (f,) = invals
    return f.reshape(_relaid_w(eqn, invals, f), tuple(prims.params(eqn)["new_sizes"]))


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

    def cut(x, pos_of):
        start, limit = [0] * x.ndim, list(x.shape)
        for ax in f.meta.stack:
            start[pos_of(ax)], limit[pos_of(ax)] = p["start_indices"][ax], p["limit_indices"][ax]
        return jax.lax.slice(x, start, limit)

    return f.map_stack(_relaid_w(eqn, invals, f), cut)


def _dynamic_slice(interp, eqn, invals):
    f, *starts = invals
    sizes = prims.params(eqn)["slice_sizes"]
    if any(isinstance(s, Factored) for s in starts) or not _full_outside_stack(f, sizes):
        return None

    def cut(x, pos_of):
        idx, shape = [0] * x.ndim, list(x.shape)
        for ax in f.meta.stack:
            idx[pos_of(ax)], shape[pos_of(ax)] = starts[ax], sizes[ax]
        return jax.lax.dynamic_slice(x, idx, shape)

    return f.map_stack(_relaid_w(eqn, invals, f), cut)


@_rule(prims.Role.SQUEEZE)
def _squeeze(interp, eqn, invals):
    (f,) = invals
    dims = tuple(prims.params(eqn)["dimensions"])
    m = f.meta
    if not set(dims) <= set(m.stack):
        return None
    return f.map_stack(
        _relaid_w(eqn, invals, f),
        lambda x, pos_of: jnp.squeeze(x, tuple(pos_of(d) for d in dims)),
        stack=_renumber([s for s in m.stack if s not in dims], dims),
        a_axes=_renumber(m.a_axes, dims),
        b_axes=_renumber(m.b_axes, dims),
    )


@_rule(prims.Role.CONTRACT)
def _dot_general(interp, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        lhs = interp.materialize(lhs, "a dot_general with another adapted weight")
    if isinstance(rhs, Factored):
        return rhs.contract(interp, eqn, _dequantized(lhs), weight_is_lhs=False)
    return lhs.contract(interp, eqn, _dequantized(rhs), weight_is_lhs=True)


@_rule(prims.Role.CONV)
def _conv(interp, eqn, invals):
    x, f = invals
    if not isinstance(f, Factored):
        return None
    x = interp.materialize(x, "a convolution with another adapted weight")
    return f.conv(interp, eqn, _dequantized(x))


@_rule(prims.Role.GATHER)
def _gather(interp, eqn, invals):
    f, idx = invals
    if not isinstance(f, Factored) or isinstance(idx, Factored):
        return None
    out = f.gather(interp, eqn, idx)  # rows of a table: an embedding lookup
    return out if out is not None else f.take_layers(eqn, idx)  # whole layers: experts picked per token


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
    one_layer = x.scan_slice()
    if one_layer is None:
        return interp.materialize(x, "a scan over one of its unstacked axes")
    return one_layer


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
                values.append(_adapted.adapted(leaf, f, path))
        return run(values, dyn_leaves, lora_dropout_key)

    return wrapped
