"""Optax helpers for LoRA: one-tree training, LoRA+ and decay on adapters only.

The adapter tree from `lora_jax.split` is a plain pytree, so any optax
optimizer trains it as it is. These helpers cover the rest:

* `only_adapters` (with `trainable_mask`) for code that keeps ONE tree
  (``{"frozen": ..., "adapters": ...}``, or params with `LoraFactors` in
  place of the adapted weights): frozen leaves get zero updates and no
  optimizer state at all.
* `lora_plus`: a larger learning rate for ``B`` than for ``A`` (LoRA+).
* `adamw`: AdamW with decay on the LoRA factors only, optionally with LoRA+.

Leaves are told apart by their path: a leaf reached through a `LoraFactors`
field ``lora_a`` or ``lora_b`` is a factor; anything else is a leaf trained
in full (or, in one tree, frozen).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from lora_jax import _spec
from lora_jax._spec import PathFilter
from lora_jax._tree import LoraFactors, _is_factors

__all__ = ["adamw", "factor_labels", "lora_plus", "only_adapters", "trainable_mask"]

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree]

LORA_A = "lora_a"
LORA_B = "lora_b"
FULL = "full"
FROZEN = "frozen"
TRAIN = "train"
ADAPTERS_KEY = "adapters"


def _factor_name(keypath: tuple) -> str | None:
    """``"lora_a"``/``"lora_b"`` for a leaf reached through that `LoraFactors` field, else None."""
    last = keypath[-1] if keypath else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name in (LORA_A, LORA_B):
        return last.name
    return None


def factor_labels(tree: PyTree) -> PyTree:
    """Labels each leaf ``"lora_a"``, ``"lora_b"`` or ``"full"`` (anything else).

    This is the labelling `lora_plus` hands to `optax.multi_transform`; it is
    public so other per-factor rules can reuse it.

    Args:
      tree: an adapter tree (or any tree holding `LoraFactors`).

    Returns:
      A tree of the same structure with string leaves.

    >>> import jax.numpy as jnp
    >>> import lora_jax as lora
    >>> tree = {"w": lora.LoraFactors(jnp.zeros((4, 2)), jnp.zeros((2, 3))), "norm": jnp.ones(3)}
    >>> labels = factor_labels(tree)
    >>> labels["w"].lora_a, labels["w"].lora_b, labels["norm"]
    ('lora_a', 'lora_b', 'full')
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: _factor_name(p) or FULL, tree)


def trainable_mask(tree: PyTree, *, train: PathFilter = None) -> PyTree:
    """Which leaves of a one-tree model train: ``True`` for adapters, ``False`` for frozen weights.

    Two layouts are understood:

    * a dict with an ``"adapters"`` key (``{"frozen": frozen, "adapters":
      adapters}``): every leaf under ``"adapters"`` trains (LoRA factors and
      leaves trained in full), every other leaf is frozen;
    * any other tree that holds `LoraFactors` (for example params with the
      factors in place of the weights they adapt): the factors train, and
      so do the leaves whose path matches ``train``; all else is frozen.

    A bare adapter tree from `lora_jax.split` needs no mask at all: all of it
    trains, so pass it to a plain optax optimizer.

    Args:
      tree: the tree handed to the optimizer (params, or gradients of them).
      train: in the second layout, leaves besides the factors that train in
        full: a regex matched with ``re.fullmatch`` against the ``/``-joined
        path, a list of regexes, or a callable ``(path, leaf) -> bool``
        (as ``LoraSpec.train``).

    Returns:
      A tree of bools with the structure of ``tree``.

    Raises:
      ValueError: nothing in ``tree`` trains (no ``"adapters"`` key, no
        `LoraFactors`, and nothing matched by ``train``).

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lora
    >>> params = {"w": jnp.ones((4, 4)), "norm": jnp.ones(4)}
    >>> frozen, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w", train="norm"), key=jax.random.key(0))
    >>> mask = trainable_mask({"frozen": frozen, "adapters": adapters})
    >>> mask["frozen"]["w"], mask["adapters"]["w"].lora_b, mask["adapters"]["norm"]
    (False, True, True)
    """
    if isinstance(tree, Mapping) and ADAPTERS_KEY in tree:
        # The map runs over the whole tree so the mask mirrors every node.
        def in_adapters(keypath: tuple, _: Any) -> bool:
            head = keypath[0] if keypath else None
            return isinstance(head, jax.tree_util.DictKey) and head.key == ADAPTERS_KEY

        mask = jax.tree_util.tree_map_with_path(in_adapters, tree)
    else:

        def rule(keypath: tuple, leaf: Any) -> bool:
            return _factor_name(keypath) is not None or _spec.matches(train, _spec.path_to_str(keypath), leaf)

        mask = jax.tree_util.tree_map_with_path(rule, tree)
    if not any(jax.tree.leaves(mask)):
        has_factors = any(isinstance(x, LoraFactors) for x in jax.tree.leaves(tree, is_leaf=_is_factors))
        if has_factors or not jax.tree.leaves(tree):
            # Inside an outer mask the trainable leaves may all be hidden; that is not an error.
            return mask
        raise ValueError(
            "trainable_mask: nothing in `tree` trains: it has no 'adapters' key, holds no lora_jax.LoraFactors, "
            f"and train={train!r} matches no leaf. Pass {{'frozen': frozen, 'adapters': adapters}}, a tree with "
            "LoraFactors in place of the adapted weights, or an explicit boolean mask."
        )
    return mask


def _check_mask(name: str, mask: Any) -> None:
    if mask is not None and not callable(mask) and not isinstance(mask, (Mapping, list, tuple, LoraFactors)):
        raise TypeError(
            f"{name}: `trainable` must be a tree of bools, a callable params -> tree of bools, or None; "
            f"got {type(mask).__name__}."
        )


def only_adapters(
    inner: optax.GradientTransformation, *, trainable: Mask | None = None
) -> optax.GradientTransformation:
    """Runs ``inner`` on the trainable leaves of one tree; frozen leaves get zero updates and no state.

    Built on `optax.multi_transform`: the frozen leaves are hidden from
    ``inner`` (so Adam keeps no moments for them, and its state is about
    twice the size of the adapters, not of the model) and receive
    `optax.set_to_zero` updates, which read nothing from their gradients.
    Under `jax.jit` XLA therefore drops the frozen gradients altogether.

    Args:
      inner: the optimizer for what trains, e.g. ``optax.adam(1e-4)`` or `lora_plus`.
      trainable: a tree of bools with the structure of the params, or a
        callable ``params -> tree of bools``; ``None`` means `trainable_mask`.

    Returns:
      An `optax.GradientTransformation` over the whole tree.

    Raises:
      TypeError: ``inner`` is not an optax transformation, or ``trainable``
        is neither a tree nor a callable.

    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_jax as lora
    >>> spec = lora.LoraSpec(rank=2, targets="w")
    >>> frozen, adapters = lora.split({"w": jnp.ones((8, 8))}, spec, key=jax.random.key(0))
    >>> tree = {"frozen": frozen, "adapters": adapters}
    >>> opt = only_adapters(optax.adam(1e-3))
    >>> state = opt.init(tree)
    >>> updates, state = opt.update(jax.tree.map(jnp.ones_like, tree), state, tree)
    >>> float(abs(updates["frozen"]["w"]).sum()), float(abs(updates["adapters"]["w"].lora_b).sum()) > 0
    (0.0, True)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"only_adapters: `inner` must be an optax.GradientTransformation (e.g. optax.adam(1e-4)); "
            f"got {type(inner).__name__}."
        )
    _check_mask("only_adapters", trainable)
    mask = trainable_mask if trainable is None else trainable

    def labels(params: PyTree) -> PyTree:
        m = mask(params) if callable(mask) else mask
        return jax.tree.map(lambda t: TRAIN if t else FROZEN, m)

    return optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)


def _scaled(learning_rate: optax.ScalarOrSchedule, ratio: float) -> optax.ScalarOrSchedule:
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def _check_learning_rate(name: str, arg: str, value: Any) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "dtype"):
        raise TypeError(
            f"{name}: `{arg}` must be a number or an optax schedule (step -> rate); got {type(value).__name__}."
        )


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    optimizer: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation] = optax.adam,
    full_learning_rate: optax.ScalarOrSchedule | None = None,
    trainable: Mask | None = None,
) -> optax.GradientTransformation:
    """LoRA+: the same optimizer for ``A`` and ``B``, with ``B``'s learning rate ``ratio`` times ``A``'s.

    With ``B`` starting at zero, a shared rate leaves ``B`` learning too
    slowly once the width is large; Hayou et al. show that the efficient
    choice has ``lr_B / lr_A`` of order the width and recommend ``2**4 = 16``
    as a robust default. Implemented as an `optax.multi_transform` of three
    copies of ``optimizer``: for ``lora_a`` leaves at ``learning_rate``, for
    ``lora_b`` leaves at ``ratio * learning_rate``, and for leaves trained in
    full at ``full_learning_rate``.

    Args:
      learning_rate: the learning rate of ``A``: a number or an optax
        schedule (``B`` then follows ``ratio * schedule(step)``).
      ratio: ``lr_B / lr_A``.
      optimizer: a factory ``learning_rate -> GradientTransformation`` such
        as ``optax.adam`` (the default), ``optax.sgd`` or
        ``functools.partial(optax.adamw, weight_decay=0.01)``.
      full_learning_rate: the rate of leaves trained in full (norms, a
        head); default ``learning_rate``.
      trainable: for one tree that also holds frozen weights, which leaves
        train (as in `only_adapters`; pass `trainable_mask` for its default
        rules). ``None``: every leaf given trains (a bare adapter tree).

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      ValueError: ``ratio`` is not positive.
      TypeError: ``optimizer`` is not callable or a rate is neither a number
        nor a schedule.

    References:
      Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of
      Large Models" (ICML 2024), arXiv:2402.12354.

    >>> import jax, jax.numpy as jnp, optax
    >>> import lora_jax as lora
    >>> spec = lora.LoraSpec(rank=2, targets="w")
    >>> _, adapters = lora.split({"w": jnp.ones((8, 8))}, spec, key=jax.random.key(0))
    >>> opt = lora_plus(0.1, ratio=16.0, optimizer=optax.sgd)
    >>> grads = jax.tree.map(jnp.ones_like, adapters)
    >>> updates, _ = opt.update(grads, opt.init(adapters), adapters)
    >>> round(float(updates["w"].lora_b[0, 0] / updates["w"].lora_a[0, 0]), 4)
    16.0
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"lora_plus: `ratio` (lr_B / lr_A) must be a positive number; got {ratio!r}.")
    if not callable(optimizer):
        raise TypeError(
            "lora_plus: `optimizer` must be a factory learning_rate -> optax.GradientTransformation, such as "
            f"optax.adam or functools.partial(optax.adamw, weight_decay=0.01); got {type(optimizer).__name__}. "
            "Pass the factory, not an optimizer built with a rate."
        )
    _check_learning_rate("lora_plus", "learning_rate", learning_rate)
    if full_learning_rate is not None:
        _check_learning_rate("lora_plus", "full_learning_rate", full_learning_rate)
    _check_mask("lora_plus", trainable)
    transforms = {
        LORA_A: optimizer(learning_rate),
        LORA_B: optimizer(_scaled(learning_rate, float(ratio))),
        FULL: optimizer(learning_rate if full_learning_rate is None else full_learning_rate),
    }
    tx = optax.multi_transform(transforms, factor_labels)
    return tx if trainable is None else only_adapters(tx, trainable=trainable)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 1e-4,
    lora_plus_ratio: float | None = None,
    decay_full: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    trainable: Mask | None = None,
) -> optax.GradientTransformation:
    """AdamW whose weight decay acts on the LoRA factors only.

    Decay pulls the factors towards zero, i.e. the adapted model towards the
    base model; it never touches frozen weights (they get no update at all
    when ``trainable`` is given) and, by default, not the leaves trained in
    full either (norm scales and biases are conventionally not decayed).

    Args:
      learning_rate: a number or an optax schedule (of ``A`` under LoRA+).
      weight_decay: decoupled decay rate, as in `optax.adamw`.
      lora_plus_ratio: if given, ``B``'s learning rate is this times ``A``'s
        (see `lora_plus`); ``None`` uses one rate.
      decay_full: also decay the leaves trained in full.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's denominator epsilon.
      trainable: for one tree that also holds frozen weights, which leaves
        train (as in `only_adapters`); ``None``: every leaf given trains.

    Returns:
      An `optax.GradientTransformation`.

    Raises:
      ValueError: a negative ``weight_decay`` or a non-positive ``lora_plus_ratio``.

    References:
      Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization".
      Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models".

    >>> import jax, jax.numpy as jnp
    >>> import lora_jax as lora
    >>> params = {"w": jnp.ones((8, 8)), "norm": jnp.ones(8)}
    >>> _, adapters = lora.split(params, lora.LoraSpec(rank=2, targets="w", train="norm"), key=jax.random.key(0))
    >>> opt = adamw(1e-3, weight_decay=0.1, lora_plus_ratio=16.0)
    >>> updates, _ = opt.update(jax.tree.map(jnp.zeros_like, adapters), opt.init(adapters), adapters)
    >>> bool((updates["norm"] == 0).all()), bool((updates["w"].lora_a != 0).all())  # factors decay, norm not
    (True, True)
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"adamw: `weight_decay` must be a non-negative number; got {weight_decay!r}.")

    def decay_mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(lambda p, _: _factor_name(p) is not None or decay_full, params)

    def factory(rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

    if lora_plus_ratio is not None:
        if isinstance(lora_plus_ratio, bool) or not isinstance(lora_plus_ratio, (int, float)) or lora_plus_ratio <= 0:
            raise ValueError(f"adamw: `lora_plus_ratio` must be a positive number or None; got {lora_plus_ratio!r}.")
        return lora_plus(learning_rate, ratio=float(lora_plus_ratio), optimizer=factory, trainable=trainable)
    _check_learning_rate("adamw", "learning_rate", learning_rate)
    _check_mask("adamw", trainable)
    tx = factory(learning_rate)
    return tx if trainable is None else only_adapters(tx, trainable=trainable)
