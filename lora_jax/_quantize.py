"""Block-wise quantisation of a frozen base, for QLoRA.

QLoRA keeps the frozen base weights in 4 bits and trains LoRA adapters in
higher precision on top. This module stores a weight as small integer codes
plus one float scale (the absolute maximum, "absmax") per block of
``block_size`` consecutive values:

* ``"nf4"``: 4-bit NormalFloat. Each value is divided by its block's absmax
  and replaced by the index of the nearest of the 16 `NF4_CODE` values;
  two indices are packed per byte.
* ``"int8"``: symmetric 8-bit integers, ``round(x / absmax * 127)``.

Blocks run along the **last axis only**: an array of shape ``[*lead, n]``
has ``n // block_size`` blocks per row, and every stored array keeps the
``lead`` axes in front. Indexing a leading axis therefore commutes with
quantisation (one layer of a stacked ``[L, in, out]`` weight is a
`QuantizedArray` of that layer), which is what `QuantizedArray.map_leading`
and ``jax.lax.scan`` over a `QuantizedArray` rely on.

With ``double_quant=True`` the per-block absmax values are themselves
quantised, as in QLoRA: along each row, groups of up to 256 absmax values
have their mean subtracted and are stored as int8 with one float32 scale
and one float32 mean per group. That cuts the scale overhead from 32 bits
per block to a little over 8.

References:
  Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _spec

__all__ = [
    "NF4_CODE",
    "QuantizedArray",
    "dequantize",
    "dequantize_tree",
    "is_quantized",
    "nf4_code_from_normal",
    "quantize",
    "quantize_array",
]

PyTree = Any
Format = Literal["nf4", "int8"]

FORMATS = ("nf4", "int8")
INT8_MAX = 127
"""Largest int8 code; the symmetric int8 grid is ``-127..127`` (``-128`` is unused)."""
NF4_LEVELS = 16
ABSMAX_BLOCK_SIZE = 256
"""Absmax values per second-level block with ``double_quant=True`` (QLoRA's choice)."""

NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The 16 NormalFloat-4 values, ascending, as published with QLoRA (read-only float32).

Quantiles of N(0, 1) rescaled to ``[-1, 1]``: 7 negative values, an exact
zero and 8 positive values; `nf4_code_from_normal` recomputes them.
"""
NF4_CODE.flags.writeable = False

# Decision thresholds between neighbouring code values: a normalised value is
# mapped to the number of midpoints strictly below it, i.e. to the nearest
# code, with an exact tie going to the lower code.
_NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).astype(np.float32)


def nf4_code_from_normal() -> np.ndarray:
    """Recomputes the NF4 values from quantiles of the standard normal distribution.

    QLoRA builds an asymmetric 4-bit code with an exact zero: 8 positive
    values are the N(0, 1) quantiles at 8 probabilities spaced evenly from
    ``delta`` down towards (not including) 0.5, the 7 negative values mirror
    the quantiles at 7 such probabilities, zero is added, and everything is
    divided by the largest value so the code spans ``[-1, 1]``. The quantile
    at probability 1 is infinite, so the top probability is ``delta``, the
    mean of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)`` (the centres of the last
    of 15 and of 16 equal probability bins): ``delta = 0.96770833...``.

    The result differs from the published `NF4_CODE` by less than ``2e-7``
    per value: the published table was computed with ``delta`` rounded to
    ``0.9677083`` and in float32.

    Returns:
      A float64 NumPy array of the 16 values, ascending.

    References:
      Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3.

    >>> code = nf4_code_from_normal()
    >>> code.shape, float(code[0]), float(code[7]), float(code[-1])
    ((16,), -1.0, 0.0, 1.0)
    >>> bool(np.abs(code - NF4_CODE).max() < 1e-6)
    True
    """
    delta = 1.0 - (1.0 / 30 + 1.0 / 32) / 2
    quantile = NormalDist().inv_cdf
    positive = [quantile(p) for p in np.linspace(delta, 0.5, NF4_LEVELS // 2 + 1)[:-1]]
    negative = [-quantile(p) for p in np.linspace(delta, 0.5, NF4_LEVELS // 2)[:-1]]
    values = np.sort(np.array([*positive, *negative, 0.0]))
    return values / values.max()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(repr=False)
class QuantizedArray:
    """An array stored block-wise quantised along its last axis.

    For an original array of shape ``[*lead, n]`` with ``B = block_size``:

    * ``codes``: ``"nf4"``: uint8 ``[*lead, n // 2]``, two 4-bit indices into
      `NF4_CODE` per byte (element ``2j`` in the high nibble, ``2j + 1`` in
      the low one); ``"int8"``: int8 ``[*lead, n]``.
    * ``absmax``: the largest ``|x|`` of each block, float32
      ``[*lead, n // B]``; with double quantisation, int8 codes of
      ``absmax - mean`` in that shape.
    * ``absmax_scale``, ``absmax_mean``: only with double quantisation,
      float32 ``[*lead, ceil((n // B) / absmax_block_size)]``: the largest
      ``|absmax - mean|`` and the mean of each group of ``absmax_block_size``
      consecutive absmax values of a row. ``None`` otherwise.

    The arrays are the pytree children; ``dtype`` (the original dtype's
    name, e.g. ``"bfloat16"``), ``format``, ``block_size`` and
    ``absmax_block_size`` are static metadata. ``shape`` is read from
    ``codes``, so slicing the leading axes of every child, whether by
    `map_leading`, ``jax.lax.scan`` or ``jax.vmap``, gives a valid
    `QuantizedArray` of the slice.

    Build one with `quantize_array`; the fields are documented so that the
    format can be stored and read back, not to be filled by hand.

    >>> import jax.numpy as jnp
    >>> q = quantize_array(jnp.ones((4, 128), jnp.bfloat16))
    >>> q.shape, q.dtype, q.codes.shape, q.absmax.shape
    ((4, 128), 'bfloat16', (4, 64), (4, 2))
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None = None
    absmax_mean: jax.Array | None = None
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    format: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    absmax_block_size: int = dataclasses.field(default=ABSMAX_BLOCK_SIZE, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the original (dequantised) array."""
        *lead, last = self.codes.shape
        return (*lead, last * 2 if self.format == "nf4" else last)

    @property
    def ndim(self) -> int:
        """Number of axes of the original array."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements of the original array."""
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        """Whether the per-block absmax values are themselves quantised."""
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes, scales and second-level scales)."""
        arrays = [a for a in (self.codes, self.absmax, self.absmax_scale, self.absmax_mean) if a is not None]
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The array back in floating point; see `dequantize`.

        >>> import jax.numpy as jnp
        >>> quantize_array(jnp.full((2, 64), 0.5)).dequantize()[0, :3]
        Array([0.5, 0.5, 0.5], dtype=float32)
        """
        return dequantize(self, dtype)

    def map_leading(self, fn: Callable[[jax.Array], jax.Array]) -> QuantizedArray:
        """Applies ``fn`` to every stored array, for functions of the leading axes.

        Every stored array has the original array's leading axes in front and
        one trailing axis of its own, so a function that indexes, slices or
        reorders leading axes only (``lambda a: a[3]``,
        ``lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)``,
        ``lambda a: a[:, ::2]``) maps a quantised ``x`` to the quantised
        ``fn(x)``: ``q.map_leading(fn).dequantize() == fn(q.dequantize())``.

        Args:
          fn: a function from an array to an array that keeps the last axis
            as it is.

        Returns:
          A `QuantizedArray` of the same format whose leading axes are those
          ``fn`` produced.

        Raises:
          ValueError: if ``fn`` changed a last axis, removed it, or gave the
            stored arrays different leading axes.

        >>> import jax.numpy as jnp
        >>> stack = quantize_array(jnp.ones((3, 8, 64)))  # [L, in, out]
        >>> stack.map_leading(lambda a: a[1]).shape
        (8, 64)
        """
        names = ["codes", "absmax"] + (["absmax_scale", "absmax_mean"] if self.double_quant else [])
        new = {name: fn(getattr(self, name)) for name in names}
        lead = None
        for name in names:
            old_shape, new_shape = tuple(getattr(self, name).shape), tuple(np.shape(new[name]))
            if not new_shape or new_shape[-1] != old_shape[-1]:
                raise ValueError(
                    f"QuantizedArray.map_leading: `fn` turned {name} of shape {old_shape} into shape {new_shape}; "
                    "it must keep the last axis (the quantisation blocks) as it is. Index or slice only the "
                    "leading axes, e.g. fn=lambda a: a[i]."
                )
            if lead is None:
                lead = new_shape[:-1]
            elif new_shape[:-1] != lead:
                raise ValueError(
                    f"QuantizedArray.map_leading: `fn` gave codes the leading axes {lead} but {name} the leading "
                    f"axes {new_shape[:-1]}; it must treat every stored array alike. Use a function of the "
                    "leading axes only, e.g. fn=lambda a: a[i]."
                )
        return dataclasses.replace(self, **new)

    def __repr__(self) -> str:
        extra = f", double_quant=True, absmax_block_size={self.absmax_block_size}" if self.double_quant else ""
        try:
            shape = self.shape
        except AttributeError:  # children replaced by non-arrays, e.g. by jax.tree.map
            shape = "?"
        return (
            f"QuantizedArray(shape={shape}, dtype={self.dtype}, format={self.format}, "
            f"block_size={self.block_size}{extra})"
        )


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a `QuantizedArray`.

    >>> import jax.numpy as jnp
    >>> is_quantized(quantize_array(jnp.ones((2, 64)))), is_quantized(jnp.ones((2, 64)))
    (True, False)
    """
    return isinstance(x, QuantizedArray)


def _check_format(format: Any, caller: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"{caller}: `format` must be one of {FORMATS}; got {format!r}.")


def _check_block_size(block_size: Any, format: str, caller: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"{caller}: `block_size` must be a positive integer, e.g. 64; got {block_size!r}.")
    if format == "nf4" and block_size % 2:
        raise ValueError(
            f"{caller}: `block_size` must be even for format='nf4' (two 4-bit codes share a byte); got "
            f"{block_size}. Use {block_size + 1} or {block_size - 1 or 2}."
        )


def _suggest_block_size(n: int, block_size: int, format: str) -> str:
    """A hint naming the largest usable block size below ``block_size`` for a last axis of ``n``."""
    step = 2 if format == "nf4" else 1
    for b in range(min(block_size, n), 0, -1):
        if b % step == 0 and n % b == 0:
            return f"Use a block_size that divides {n}, e.g. block_size={b}."
    return f"No even block_size divides {n}, so format='nf4' cannot store it; use format='int8' or pad the axis."


def _check_array(x: Any, format: str, block_size: int, caller: str) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{caller}: `x` must be a float array; got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{caller}: `x` must have a floating dtype; got {x.dtype}. Only float weights are quantised; "
            "convert with x.astype(jnp.float32) or leave it out."
        )
    if len(x.shape) == 0:
        raise ValueError(
            f"{caller}: `x` is a scalar (0-d); quantisation needs at least one axis to cut into blocks. "
            "Keep scalars as they are."
        )
    if math.prod(x.shape) == 0:
        raise ValueError(f"{caller}: `x` of shape {tuple(x.shape)} is empty; there is nothing to quantise.")
    n = x.shape[-1]
    if n % block_size:
        raise ValueError(
            f"{caller}: the last axis of `x` (shape {tuple(x.shape)}) has size {n}, which is not divisible by "
            f"block_size={block_size}; blocks run along the last axis. " + _suggest_block_size(n, block_size, format)
        )


def quantize_array(
    x: jax.Array,
    format: Format = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = False,
) -> QuantizedArray:
    """Quantises an array block-wise along its last axis.

    Each block of ``block_size`` consecutive values of the last axis is
    scaled by its absolute maximum ``absmax``. ``"nf4"`` stores the index
    of the `NF4_CODE` value nearest to ``x / absmax`` (an exact tie goes to
    the lower value); ``"int8"`` stores ``round(x / absmax * 127)``. A block
    of zeros has ``absmax = 0`` and stores the code of zero, so it
    dequantises to zeros. Works on traced values (inside ``jit``) too.

    Args:
      x: a float array with at least one axis, whose last axis is divisible
        by ``block_size``.
      format: ``"nf4"`` (4 bits per value) or ``"int8"`` (8 bits).
      block_size: values per block along the last axis; even for ``"nf4"``.
      double_quant: also quantise the absmax values (QLoRA's double
        quantisation): along each row, groups of 256 absmax values minus
        their mean are stored as int8 with a float32 scale and mean each.

    Returns:
      A `QuantizedArray`; ``dequantize`` gives back an array of ``x``'s
      shape and dtype.

    Raises:
      TypeError: if ``x`` is not a float array.
      ValueError: for an unknown ``format``, a ``block_size`` that is not a
        positive integer (even for ``"nf4"``), a scalar or empty ``x``, or a
        last axis not divisible by ``block_size`` (the message suggests one
        that divides it).

    References:
      Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

    >>> import jax.numpy as jnp
    >>> x = jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)
    >>> q = quantize_array(x, "nf4", block_size=64)
    >>> q.codes.dtype, q.codes.shape, q.absmax.shape
    (dtype('uint8'), (2, 64), (2, 2))
    >>> bool(jnp.abs(q.dequantize() - x).max() < 0.15)  # half the widest NF4 gap, times absmax
    True
    """
    caller = "quantize_array"
    _check_format(format, caller)
    _check_block_size(block_size, format, caller)
    if not isinstance(double_quant, bool):
        raise TypeError(f"{caller}: `double_quant` must be True or False; got {double_quant!r}.")
    _check_array(x, format, block_size, caller)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype).name
    codes, absmax, scale, mean = _quantize(jnp.asarray(x), format, int(block_size), double_quant)
    return QuantizedArray(codes, absmax, scale, mean, dtype=dtype, format=format, block_size=int(block_size))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, format: str, block_size: int, double_quant: bool):
    *lead, n = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, n // block_size, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # A zero block divides by 1 instead of 0: its values are 0 and stay 0.
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    normalised = blocks / safe
    if format == "nf4":
        # Counting the midpoints below each value: 15 compares that XLA fuses
        # into one elementwise pass (a searchsorted is an order of magnitude slower on CPU).
        index = jnp.zeros(normalised.shape, jnp.uint8)
        for midpoint in _NF4_MIDPOINTS:
            index = index + (normalised > midpoint).astype(jnp.uint8)
        index = index.reshape(*lead, n)
        codes = (index[..., 0::2] << 4) | index[..., 1::2]
    else:
        codes = jnp.clip(jnp.round(normalised * INT8_MAX), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        codes = codes.reshape(*lead, n)
    if not double_quant:
        return codes, absmax, None, None
    absmax_codes, scale, mean = _quantize_absmax(absmax, ABSMAX_BLOCK_SIZE)
    return codes, absmax_codes, scale, mean


def _quantize_absmax(absmax: jax.Array, group: int):
    """int8 codes of ``absmax - mean`` per group of ``group`` values along the last axis."""
    *lead, nb = absmax.shape
    groups = -(-nb // group)
    pad = groups * group - nb
    valid = np.arange(groups * group).reshape(groups, group) < nb
    padded = jnp.pad(absmax, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, groups, group)
    count = valid.sum(axis=-1)
    mean = jnp.sum(padded, axis=-1) / count
    centred = jnp.where(valid, padded - mean[..., None], 0.0)
    scale = jnp.max(jnp.abs(centred), axis=-1)
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    codes = jnp.clip(jnp.round(centred / safe * INT8_MAX), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return codes.reshape(*lead, groups * group)[..., :nb], scale, mean


def _dequantize_absmax(q: QuantizedArray) -> jax.Array:
    *lead, nb = q.absmax.shape
    groups = q.absmax_scale.shape[-1]
    pad = groups * q.absmax_block_size - nb
    codes = jnp.pad(q.absmax, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, groups, q.absmax_block_size)
    step = q.absmax_scale.astype(jnp.float32)[..., None] / INT8_MAX
    values = codes.astype(jnp.float32) * step + q.absmax_mean.astype(jnp.float32)[..., None]
    return values.reshape(*lead, groups * q.absmax_block_size)[..., :nb]


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """Turns a `QuantizedArray` back into a dense array.

    ``"nf4"``: ``NF4_CODE[index] * absmax``; ``"int8"``: ``code * absmax / 127``,
    blockwise, computed in float32. Pure ``jax.numpy``, so it can be used
    inside ``jit``, ``scan`` and ``grad`` (the codes get no gradient).

    Args:
      q: the quantised array.
      dtype: the floating dtype of the result; ``None`` gives the dtype the
        array had before quantisation.

    Returns:
      An array of shape ``q.shape``.

    Raises:
      TypeError: if ``q`` is not a `QuantizedArray` or ``dtype`` is not a
        floating dtype.
      ValueError: if ``q.format`` is unknown.

    >>> import jax.numpy as jnp
    >>> q = quantize_array(jnp.eye(64, dtype=jnp.bfloat16), "int8", block_size=32)
    >>> dequantize(q).dtype, bool((dequantize(q, jnp.float32) == jnp.eye(64)).all())
    (dtype(bfloat16), True)
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(
            f"dequantize: `q` must be a QuantizedArray (from quantize_array); got {type(q).__name__}. "
            "For a whole tree use dequantize_tree."
        )
    _check_format(q.format, "dequantize")
    out_dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"dequantize: `dtype` must be a floating dtype such as jnp.bfloat16; got {out_dtype}.")
    return _dequantize(q, out_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QuantizedArray, out_dtype: Any) -> jax.Array:
    absmax = _dequantize_absmax(q) if q.double_quant else q.absmax.astype(jnp.float32)
    *lead, n = q.shape
    if q.format == "nf4":
        packed = q.codes
        index = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*lead, n)
        values = jnp.asarray(NF4_CODE)[index]
        scale = absmax
    else:
        values = q.codes.astype(jnp.float32)
        scale = absmax / INT8_MAX
    blocks = values.reshape(*lead, n // q.block_size, q.block_size) * scale[..., None]
    return blocks.reshape(*lead, n).astype(out_dtype)


def _is_leaf(x: Any) -> bool:
    return x is None or isinstance(x, QuantizedArray)


def _compile_include(include: Any) -> list[re.Pattern] | None:
    if include is None:
        return None
    patterns = [include] if isinstance(include, str) else include
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"quantize: `include` must be a regex string, a list of regex strings or None; got {include!r}."
        )
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"quantize: `include` pattern {p!r} is not a valid regular expression ({e}).") from e
    return out


def quantize(
    tree: PyTree,
    format: Format = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = False,
    include: str | Sequence[str] | None = None,
    min_size: int = 4096,
) -> PyTree:
    """Quantises the large float weights of a pytree, leaving the rest as it is.

    A leaf is quantised when it is a float array with at least 2 axes, at
    least ``min_size`` elements and a last axis divisible by ``block_size``
    (and, if ``include`` is given, its path matches). Everything else (norm
    scales, biases, small arrays, integer arrays, ``None`` placeholders, leaves
    already quantised) is returned unchanged. Typical use is on the frozen
    tree from `lora_jax.split`, which holds ``None`` where a leaf trains in
    full; those ``None`` leaves are kept.

    Args:
      tree: any pytree of arrays.
      format: ``"nf4"`` or ``"int8"``; see `quantize_array`.
      block_size: values per block along the last axis.
      double_quant: also quantise the per-block scales; see `quantize_array`.
      include: a regex (or a list of regexes, any may match) that a leaf's
        ``/``-joined path must match in full (``re.fullmatch``), or ``None``
        for every leaf.
      min_size: leaves with fewer elements stay as they are.

    Returns:
      A tree of the same structure with a `QuantizedArray` at every
      quantised leaf.

    Raises:
      TypeError: for an ``include`` that is not a regex or list of regexes.
      ValueError: for an invalid ``format``, ``block_size``, ``min_size`` or
        regex, an ``include`` that matches no leaf, or a leaf that
        ``include`` selects but whose last axis is not divisible by
        ``block_size`` (the message names its path).

    References:
      Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}, "head": None}
    >>> q = quantize(params, min_size=1024)
    >>> is_quantized(q["dense"]["kernel"]), is_quantized(q["dense"]["bias"]), q["head"]
    (True, False, None)
    """
    caller = "quantize"
    _check_format(format, caller)
    _check_block_size(block_size, format, caller)
    if not isinstance(double_quant, bool):
        raise TypeError(f"{caller}: `double_quant` must be True or False; got {double_quant!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"{caller}: `min_size` must be a non-negative integer, e.g. 4096; got {min_size!r}.")
    patterns = _compile_include(include)

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    paths = [_spec.path_to_str(p) for p, _ in flat]
    leaves, matched = [], False
    for path, leaf in zip(paths, (x for _, x in flat)):
        selected = patterns is None or any(p.fullmatch(path) for p in patterns)
        matched = matched or selected
        eligible = (
            selected
            and not _is_leaf(leaf)
            and hasattr(leaf, "dtype")
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and len(leaf.shape) >= 2
            and math.prod(leaf.shape) >= min_size
        )
        if not eligible:
            leaves.append(leaf)
            continue
        n = leaf.shape[-1]
        if n % block_size:
            if patterns is None:
                leaves.append(leaf)
                continue
            raise ValueError(
                f"{caller}: `include` selects {path!r} (shape {tuple(leaf.shape)}), but its last axis has size "
                f"{n}, which is not divisible by block_size={block_size}. "
                + _suggest_block_size(n, block_size, format)
                + " Or narrow `include` to leave it out."
            )
        leaves.append(quantize_array(leaf, format, block_size=block_size, double_quant=double_quant))
    if patterns is not None and not matched:
        raise ValueError(
            f"{caller}: `include`={include!r} matches no leaf (patterns are matched with re.fullmatch against "
            f"'/'-joined paths). Nearest paths: {_spec.nearest_paths(include, paths)}."
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def dequantize_tree(tree: PyTree, dtype: Any = None) -> PyTree:
    """Replaces every `QuantizedArray` in a tree by its dequantised array.

    Other leaves, including ``None``, are returned unchanged.

    Args:
      tree: a pytree, typically one returned by `quantize`.
      dtype: the floating dtype of the dequantised arrays; ``None`` keeps
        each array's original dtype.

    Returns:
      A tree of the same structure without `QuantizedArray` leaves.

    Raises:
      TypeError: if ``dtype`` is not a floating dtype.

    >>> import jax.numpy as jnp
    >>> q = quantize({"w": jnp.ones((8, 64)), "b": None}, min_size=0)
    >>> out = dequantize_tree(q)
    >>> out["w"].shape, out["b"]
    ((8, 64), None)
    """
    return jax.tree.map(lambda x: dequantize(x, dtype) if isinstance(x, QuantizedArray) else x, tree, is_leaf=_is_leaf)
