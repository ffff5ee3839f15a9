"""Spectra of weight updates: effective rank, intruder dimensions, subspace overlap.

Three measures of how fine-tuning changed a weight matrix, each computed from
singular value decompositions on the host with NumPy:

* `variance_rank`: how many singular directions a weight *update*
  ``W_after - W_before`` needs to explain a share of its variance. Biderman et
  al. (2024) found full fine-tuning's updates need a rank 10-100x larger than
  typical LoRA ranks.
* `intruder_dimensions` / `intruder_report`: how many of the fine-tuned
  weight's top singular vectors resemble none of the base weight's
  (Shuttleworth et al. 2024). LoRA tends to create such "intruders", full
  fine-tuning rarely does.
* `subspace_overlap`: how much two matrices' top-``k`` left singular
  subspaces share.

All functions take one 2-D matrix (NumPy or JAX array, any float dtype). For a
stack of layers ``[L, m, n]``, call them once per layer
(``[variance_rank(d) for d in delta]``): the results are Python numbers, and a
stacked input is an error rather than a silently batched one. Float64 inputs
are decomposed in float64, anything else in float32, which is plenty for these
thresholds and much faster on large matrices.

References:
    Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
    Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["IntruderReport", "intruder_dimensions", "intruder_report", "subspace_overlap", "variance_rank"]

ArrayLike = Any  # a NumPy or JAX array

# Lets a prefix that explains exactly `fraction` count, despite rounding in the cumulative sum.
_FRACTION_TOLERANCE = 1e-12


def _matrix(name: str, x: ArrayLike) -> np.ndarray:
    """``x`` as a 2-D float32 (or float64) NumPy array, or a ValueError naming ``name``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D matrix, got shape {x.shape}. For a stack of layers [L, m, n], "
            f"call once per layer, e.g. `[f(m) for m in {name}]`."
        )
    if np.iscomplexobj(x) or x.dtype.kind not in "fiuV":  # "V": ml_dtypes' bfloat16 and friends
        raise ValueError(f"`{name}` must hold real numbers, got dtype {x.dtype}.")
    try:
        return x.astype(np.float64 if x.dtype == np.float64 else np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must hold real numbers, got dtype {x.dtype}.") from err


def _left_vectors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD's left singular vectors ``[m, min(m, n)]`` and singular values, descending."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u, s


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def variance_rank(delta: ArrayLike, *, fraction: float = 0.9) -> int:
    """Smallest ``k`` whose top ``k`` singular values explain ``fraction`` of ``delta``'s variance.

    "Variance" is the squared Frobenius norm ``sum(σ_i²)``, as in Biderman et
    al. (2024), Section 6: the result is the smallest ``k`` with
    ``sum(σ_1² .. σ_k²) >= fraction * sum(σ_i²)``. A prefix that explains
    exactly ``fraction`` is enough (up to a ``1e-12`` tolerance for rounding).
    A zero matrix needs rank 0.

    Args:
        delta: A 2-D matrix ``[m, n]``, e.g. a weight update ``W_after - W_before``.
        fraction: Share of ``sum(σ_i²)`` to explain, in ``(0, 1]``.

    Returns:
        The rank, between 0 and ``min(m, n)``.

    Raises:
        ValueError: If ``delta`` is not 2-D or ``fraction`` is outside ``(0, 1]``.

    >>> rng = np.random.default_rng(0)
    >>> low_rank = rng.normal(size=(64, 5)) @ rng.normal(size=(5, 48))
    >>> variance_rank(low_rank) <= 5
    True
    >>> variance_rank(np.eye(10))  # each direction explains 10%
    9

    References:
        Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be a number in (0, 1], got {fraction!r}.")
    delta = _matrix("delta", delta)
    energy = np.linalg.svd(delta, compute_uv=False).astype(np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(energy) / total
    rank = int(np.searchsorted(cumulative, fraction - _FRACTION_TOLERANCE) + 1)
    return min(rank, energy.size)  # rounding can leave cumulative[-1] a hair under 1


class IntruderReport(NamedTuple):
    """How closely each of a fine-tuned matrix's top left singular vectors matches the base's.

    Attributes:
        similarity: ``[top_k]`` float: for the ``i``-th top left singular vector
            of the fine-tuned matrix, its largest absolute cosine similarity
            with any left singular vector of the base, in ``[0, 1]``.
        best_match: ``[top_k]`` int: the index (in the base's descending order)
            of the base vector that attains it.
        singular_values: ``[top_k]`` float: the fine-tuned matrix's top singular values.
    """

    similarity: np.ndarray
    best_match: np.ndarray
    singular_values: np.ndarray


def _check_pair(base: ArrayLike, tuned: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    base, tuned = _matrix("base", base), _matrix("tuned", tuned)
    if base.shape != tuned.shape:
        raise ValueError(
            f"`base` and `tuned` must have the same shape (the same weight before and after fine-tuning), "
            f"got {base.shape} and {tuned.shape}."
        )
    return base, tuned


def _check_top_k(top_k: Any, shape: tuple[int, ...]) -> int:
    top_k = _check_positive_int("top_k", top_k)
    if top_k > min(shape):
        raise ValueError(
            f"`top_k` must be at most min(m, n) = {min(shape)} for matrices of shape {shape}, got {top_k}."
        )
    return top_k


def intruder_report(base: ArrayLike, tuned: ArrayLike, *, top_k: int = 10) -> IntruderReport:
    """Per-vector similarity of ``tuned``'s top ``top_k`` left singular vectors to ``base``'s.

    Both matrices are decomposed with a thin SVD, so each has ``min(m, n)`` left
    singular vectors in ``R^m``. Each of ``tuned``'s top ``top_k`` vectors is
    compared with *all* of ``base``'s by absolute cosine similarity (singular
    vectors are defined up to sign), and the largest value is kept.

    Args:
        base: The weight before fine-tuning, ``[m, n]``.
        tuned: The same weight after fine-tuning, ``[m, n]``.
        top_k: How many of ``tuned``'s leading singular vectors to examine,
            between 1 and ``min(m, n)``.

    Returns:
        An `IntruderReport` with the similarity, the best-matching base index
        and the singular value of each examined vector.

    Raises:
        ValueError: If either matrix is not 2-D, their shapes differ, or
            ``top_k`` is not an integer in ``[1, min(m, n)]``.

    >>> w = np.diag([3.0, 2.0, 1.0])
    >>> intruder_report(w, 2 * w, top_k=2).similarity
    array([1., 1.])

    References:
        Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
    """
    base, tuned = _check_pair(base, tuned)
    top_k = _check_top_k(top_k, base.shape)
    u_base, _ = _left_vectors(base)
    u_tuned, s_tuned = _left_vectors(tuned)
    # Unit vectors, so dot products are cosines; clip rounding just above 1.
    cosines = np.minimum(np.abs(u_tuned[:, :top_k].T @ u_base), 1.0)  # [top_k, min(m, n)]
    return IntruderReport(
        similarity=cosines.max(axis=1),
        best_match=cosines.argmax(axis=1),
        singular_values=s_tuned[:top_k],
    )


def intruder_dimensions(base: ArrayLike, tuned: ArrayLike, *, top_k: int = 10, threshold: float = 0.5) -> int:
    """Counts the intruder dimensions of a fine-tuned weight matrix.

    An intruder dimension is one of ``tuned``'s top ``top_k`` left singular
    vectors whose largest absolute cosine similarity with *any* left singular
    vector of ``base`` is below ``threshold``: a new direction that fine-tuning
    placed among the matrix's most important ones. Shuttleworth et al. (2024)
    find LoRA creates them and full fine-tuning rarely does, and that they go
    with forgetting. Both matrices use a thin SVD (``min(m, n)`` left singular
    vectors each); the per-vector similarities are in `intruder_report`.

    Args:
        base: The weight before fine-tuning, ``[m, n]``.
        tuned: The same weight after fine-tuning, ``[m, n]``.
        top_k: How many of ``tuned``'s leading singular vectors to examine,
            between 1 and ``min(m, n)``.
        threshold: Similarity below which a vector counts as an intruder, in
            ``(0, 1]``. Lower values count only the most foreign directions.

    Returns:
        The number of intruder dimensions, between 0 and ``top_k``.

    Raises:
        ValueError: If either matrix is not 2-D, their shapes differ, ``top_k``
            is not an integer in ``[1, min(m, n)]``, or ``threshold`` is outside
            ``(0, 1]``.

    >>> base = np.diag(np.arange(8.0, 0.0, -1.0))
    >>> intruder_dimensions(base, 0.5 * base, top_k=3)  # rescaling creates no new direction
    0
    >>> update = 10 * np.ones((8, 8))  # left direction (1, ..., 1) / √8: cosine 0.35 with each axis
    >>> intruder_dimensions(base, base + update, top_k=3)
    1

    References:
        Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 < threshold <= 1:
        raise ValueError(f"`threshold` must be a cosine similarity in (0, 1], got {threshold!r}.")
    report = intruder_report(base, tuned, top_k=top_k)
    return int(np.count_nonzero(report.similarity < threshold))


def subspace_overlap(a: ArrayLike, b: ArrayLike, *, k: int) -> float:
    """Overlap of the top-``k`` left singular subspaces of two matrices.

    With ``U_a`` and ``U_b`` the ``[m, k]`` leading left singular vectors, the
    overlap is ``||U_a^T U_b||_F² / k``: the mean squared cosine of the
    principal angles between the two subspaces. It is 1 for the same subspace
    and 0 for orthogonal ones. If a matrix's ``k``-th and ``k+1``-th singular
    values are equal its top-``k`` subspace is not unique and the result
    depends on which one the SVD returns.

    Args:
        a: A 2-D matrix ``[m, n_a]``.
        b: A 2-D matrix ``[m, n_b]`` with the same number of rows.
        k: Dimension of the subspaces, between 1 and ``min(m, n_a, n_b)``.

    Returns:
        The overlap, a float in ``[0, 1]``.

    Raises:
        ValueError: If either matrix is not 2-D, their row counts differ, or
            ``k`` is not an integer in ``[1, min(m, n_a, n_b)]``.

    >>> subspace_overlap(np.diag([2.0, 1.0, 0.0]), np.diag([5.0, 3.0, 1.0]), k=2)
    1.0
    >>> subspace_overlap(np.diag([2.0, 1.0, 0.0]), np.diag([0.0, 0.0, 1.0]), k=1)
    0.0
    """
    a, b = _matrix("a", a), _matrix("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`a` and `b` must have the same number of rows (left singular vectors live in R^m), "
            f"got shapes {a.shape} and {b.shape}."
        )
    k = _check_positive_int("k", k)
    limit = min(a.shape[0], a.shape[1], b.shape[1])
    if k > limit:
        raise ValueError(f"`k` must be at most {limit} for shapes {a.shape} and {b.shape}, got {k}.")
    u_a, _ = _left_vectors(a)
    u_b, _ = _left_vectors(b)
    overlap = np.sum((u_a[:, :k].T @ u_b[:, :k]).astype(np.float64) ** 2) / k
    return float(np.clip(overlap, 0.0, 1.0))
