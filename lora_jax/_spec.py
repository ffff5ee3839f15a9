"""`LoraSpec`: which leaves of a parameter tree get adapters, and how.

A leaf is named by its *path*: the keys from the root joined by ``/``
(``params/Dense_0/kernel``, ``layers/3/wq``). Every string pattern in a spec
is a regular expression matched with :func:`re.fullmatch` against that path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PathFilter = str | Sequence[str] | Callable[[str, Any], bool] | None
"""A regex (``re.fullmatch`` on the path), a list of regexes (any matches),
a callable ``(path, leaf) -> bool``, or ``None`` (matches nothing)."""


class _AllLinear:
    """The type of `ALL_LINEAR`: one instance, compared by identity."""

    _instance: _AllLinear | None = None

    def __new__(cls) -> _AllLinear:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "lora_jax.ALL_LINEAR"

    def __reduce__(self):
        return (_AllLinear, ())


ALL_LINEAR = _AllLinear()
"""Preset for ``LoraSpec.targets``: every weight consumed as a matmul/einsum weight.

The string ``"all-linear"`` (PEFT's spelling) means the same and is turned
into this sentinel by `LoraSpec`, alone or inside a list of patterns.
"""

_ALL_LINEAR_NAME = "all-linear"


def _is_all_linear(value: Any) -> bool:
    return value is ALL_LINEAR or (isinstance(value, str) and value == _ALL_LINEAR_NAME)


def _normalise_targets(value: Any) -> Any:
    if _is_all_linear(value):
        return ALL_LINEAR
    if isinstance(value, (list, tuple)):
        return type(value)(ALL_LINEAR if _is_all_linear(v) else v for v in value)
    return value


# Leaves that look like linear weights but are conventionally left alone by
# "all-linear": token embeddings and output heads (PEFT excludes them too).
_EMBED_OR_HEAD = re.compile(
    r"(^|.*/)(embed\w*|wte|wpe|tok_embeddings|embedding|lm_head|head|output|classifier)(/.*|$)",
    re.IGNORECASE,
)
_LINEAR_NAMES = ("kernel", "weight", "w")

Init = Literal["kaiming", "gaussian", "pissa", "olora"] | str
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def path_parts(path: tuple) -> tuple[str, ...]:
    """The components of a `jax.tree_util` key path, as strings.

    A trailing ``.value`` attribute (how `flax.nnx` variables expose their
    array) is dropped, so an NNX state reads ``linear/kernel``.

    >>> import jax
    >>> [path_parts(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    [('a', '0'), ('a', '1')]
    """
    parts = tuple(_key_str(k) for k in path)
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts = parts[:-1]
    return parts


def path_to_str(path: tuple) -> str:
    """Joins a `jax.tree_util` key path into the ``a/b/c`` form used by specs.

    >>> import jax
    >>> [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0]]
    ['a/0', 'a/1']
    """
    return "/".join(path_parts(path))


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _check_filter(name: str, value: PathFilter) -> None:
    if value is ALL_LINEAR and name != "targets":
        raise ValueError(f"LoraSpec.{name}: ALL_LINEAR is a preset for `targets` only.")
    if value is None or value is ALL_LINEAR or callable(value):
        return
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) or p is ALL_LINEAR for p in patterns):
        raise TypeError(
            f"LoraSpec.{name} must be a regex string, a list of regex strings, a callable "
            f"(path, leaf) -> bool or None; got {type(value).__name__}: {value!r}."
        )
    for p in patterns:
        if p is ALL_LINEAR:
            if name != "targets":
                raise ValueError(f"LoraSpec.{name}: ALL_LINEAR is a preset for `targets` only.")
            continue
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"LoraSpec.{name}: {p!r} is not a valid regular expression ({e}).") from e


def matches(filt: PathFilter, path: str, leaf: Any) -> bool:
    """Whether a spec filter selects the leaf at ``path``."""
    if filt is None:
        return False
    if filt is ALL_LINEAR:
        raise TypeError("matches: ALL_LINEAR depends on how a weight is used; split resolves it, not a path match.")
    if callable(filt):
        return bool(filt(path, leaf))
    patterns = [filt] if isinstance(filt, str) else filt
    return any(re.fullmatch(p, path) is not None for p in patterns)


def _lookup(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    for regex, value in pattern.items():
        if re.fullmatch(regex, path) is not None:
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which weights get low-rank adapters, their rank and scale, and what else trains.

    Each adapted weight ``W`` is used as ``W + s·A@B`` with ``A`` of shape
    ``[in, rank]``, ``B`` of shape ``[rank, out]`` and ``s = alpha / rank``
    (``alpha / sqrt(rank)`` with ``rslora=True``). ``A`` starts random and
    ``B`` at zero, so the adapted model starts exactly at the base model.

    Args:
      rank: rank ``r`` of every adapter (overridable per path with ``rank_pattern``).
      alpha: scale numerator; ``None`` means ``2 * rank`` (the advice of
        Biderman et al. 2024), so ``s = 2``.
      targets: which leaves get adapters: a regex matched with ``re.fullmatch``
        against the ``/``-joined path, a list of regexes, a callable
        ``(path, leaf) -> bool``, or `ALL_LINEAR` (also spelled
        ``"all-linear"``, alone or in a list): every weight used as
        the weight operand of a matmul/einsum when ``split`` is given
        ``trace=``, otherwise every 2-D float leaf named ``kernel``/``weight``;
        in both cases except embeddings and output heads.
      exclude: leaves never adapted even if ``targets`` selects them.
      train: leaves trained in full next to the adapters (norm scales,
        biases, a classification head). They move from ``frozen`` to
        ``adapters``.
      rslora: scale by ``alpha / sqrt(rank)`` (Kalajdzievski 2023).
      rank_pattern: ``{regex: rank}`` overrides for matching paths; first match wins.
      alpha_pattern: ``{regex: alpha}`` overrides for matching paths.
      init: how the factors start. ``"kaiming"`` (``A`` uniform with bound
        ``1/sqrt(fan_in)``, PEFT's default) and ``"gaussian"`` (``A`` with
        std ``1/rank``) start ``B`` at zero, so the adapted model starts at
        the base. ``"pissa"`` (Meng et al. 2024: ``A``, ``B`` from the top
        singular vectors and values of ``W``), ``"pissa_niter_<k>"`` (the
        same from a randomised SVD with ``k`` subspace iterations, faster
        for big weights) and ``"olora"`` (Büyükakyüz 2024: from a QR
        decomposition of ``W``) take the factors from the weight itself
        and put the residual ``W - s·A@B`` in the frozen tree, so outputs
        at step 0 still equal the base model's.
      dtype: dtype of the adapter factors; ``None`` keeps each weight's dtype.
      use_dora: weight-decomposed LoRA (Liu et al. 2024, PEFT's ``use_dora``):
        each adapted weight is ``m · (W + s·A@B) / ||W + s·A@B||`` with the
        norm taken per output column (over the input axes) and a trained
        magnitude ``m`` (`LoraFactors.magnitude`) that starts at ``||W||``.
        The norm is a constant for differentiation, as in the paper and
        PEFT; `wrap` computes it from ``W^T A`` and ``A^T A`` without forming
        ``W + s·A@B``. Supported where the weight is used by a matmul or
        einsum that contracts its input axes.
      dropout: probability of dropping an input of the low-rank path
        (``s·B(A·dropout(x))``, as PEFT's ``lora_dropout``). It acts only when
        the wrapped function is called with ``lora_dropout_key=``.

    Raises:
      ValueError: for a non-positive rank or alpha, or an invalid regex.
      TypeError: for filters of the wrong type.

    References:
      Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
      Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA".

    >>> spec = LoraSpec(rank=4, alpha=8, targets=r".*/(query|value)/kernel")
    >>> spec.scale_for("params/query/kernel")
    2.0
    """

    rank: int = 8
    alpha: float | None = None
    targets: PathFilter = ALL_LINEAR
    exclude: PathFilter = None
    train: PathFilter = None
    rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init: Init = "kaiming"
    dtype: Any = None
    dropout: float = 0.0
    use_dora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _normalise_targets(self.targets))
        for name, r in [("rank", self.rank), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
                raise ValueError(f"LoraSpec.{name} must be a positive integer; got {r!r}.")
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for name, a in alphas:
            if a is not None and (not isinstance(a, (int, float, np.number)) or a <= 0):
                raise ValueError(f"LoraSpec.{name} must be a positive number or None; got {a!r}.")
        for name in ("targets", "exclude", "train"):
            _check_filter(name, getattr(self, name))
        for name in ("rank_pattern", "alpha_pattern"):
            for regex in getattr(self, name):
                _check_filter(name, regex)
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoraSpec.use_dora must be True or False; got {self.use_dora!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be a probability in [0, 1); got {self.dropout!r}.")
        if self.init not in ("kaiming", "gaussian", "pissa", "olora") and not (
            isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)
        ):
            raise ValueError(
                "LoraSpec.init must be 'kaiming', 'gaussian', 'pissa', 'pissa_niter_<k>' (k subspace iterations) "
                f"or 'olora'; got {self.init!r}."
            )

    @property
    def init_from_weight(self) -> tuple[str, int | None] | None:
        """``(method, niter)`` when ``init`` takes the factors from the weight (PiSSA, OLoRA), else ``None``."""
        match = _PISSA_NITER.fullmatch(self.init)
        if match:
            return "pissa", int(match.group(1))
        return (self.init, None) if self.init in ("pissa", "olora") else None

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path`` (``rank_pattern`` first, then ``rank``)."""
        return int(_lookup(self.rank_pattern, path, self.rank))

    def scale_for(self, path: str) -> float:
        """The scale ``s`` of the adapter at ``path``: ``alpha / rank`` or ``alpha / sqrt(rank)``."""
        rank = self.rank_for(path)
        alpha = _lookup(self.alpha_pattern, path, self.alpha)
        alpha = 2.0 * rank if alpha is None else float(alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    @property
    def uses_all_linear(self) -> bool:
        """Whether ``targets`` is, or contains, `ALL_LINEAR`."""
        return self.targets is ALL_LINEAR or (
            isinstance(self.targets, (list, tuple)) and any(t is ALL_LINEAR for t in self.targets)
        )

    @property
    def path_targets(self) -> PathFilter:
        """``targets`` without `ALL_LINEAR`: the patterns or callable matched against paths."""
        if self.targets is ALL_LINEAR:
            return []
        if isinstance(self.targets, (list, tuple)):
            return [t for t in self.targets if t is not ALL_LINEAR]
        return self.targets


def default_linear(path: str, leaf: Any) -> bool:
    """The ``"all-linear"`` rule without a trace: 2-D float ``kernel``/``weight``
    leaves that are not embeddings or output heads."""
    name = path.rsplit("/", 1)[-1]
    return (
        name in _LINEAR_NAMES
        and getattr(leaf, "ndim", None) == 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and _EMBED_OR_HEAD.fullmatch(path) is None
    )


def is_embed_or_head(path: str) -> bool:
    return _EMBED_OR_HEAD.fullmatch(path) is not None


def nearest_paths(pattern: Any, paths: Sequence[str], n: int = 5) -> list[str]:
    """Real paths closest to a pattern that matched nothing (for error messages)."""
    if callable(pattern):
        return list(paths[:n])
    text = pattern if isinstance(pattern, str) else " ".join(map(str, pattern))
    close = difflib.get_close_matches(text, paths, n=n, cutoff=0.0)
    return close or list(paths[:n])
