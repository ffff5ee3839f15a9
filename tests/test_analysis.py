"""Spectral analysis of weight updates, on matrices whose answers are known by construction."""

import doctest

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import analysis
from lora_jax.analysis import intruder_dimensions, intruder_report, subspace_overlap, variance_rank

SHAPES = [(32, 32), (40, 24), (24, 40)]


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` with orthonormal columns (Haar-distributed up to the sign fix)."""
    q, r = np.linalg.qr(rng.normal(size=(rows, cols)))
    return q * np.sign(np.diag(r))


def _hadamard8() -> np.ndarray:
    """An orthogonal 8x8 matrix whose entries are all ±1/√8."""
    h2 = np.array([[1.0, 1.0], [1.0, -1.0]])
    return np.kron(np.kron(h2, h2), h2) / np.sqrt(8)


def _factors(shape: tuple[int, int], seed: int = 0):
    """A base matrix ``U diag(s) Vᵀ`` with distinct singular values 10 > ... > 1, and its factors."""
    m, n = shape
    r = min(m, n)
    rng = np.random.default_rng(seed)
    u, v = _orthonormal(rng, m, r), _orthonormal(rng, n, r)
    s = np.linspace(10.0, 1.0, r)
    return u, s, v, (u * s) @ v.T


def test_doc_examples():
    result = doctest.testmod(analysis, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- variance_rank


@pytest.mark.parametrize(
    "fraction,expected",
    [
        (0.01, 1),
        (9 / 14, 1),  # the top direction explains exactly 9/14
        (9 / 14 + 1e-6, 2),
        (13 / 14, 2),  # the top two explain exactly 13/14
        (13 / 14 + 1e-6, 3),
        (1.0, 3),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variance_rank_exact_thresholds(fraction, expected, dtype):
    # Singular values 3, 2, 1: energies 9, 4, 1 out of 14, in any order and orientation.
    rng = np.random.default_rng(1)
    u, v = _orthonormal(rng, 5, 3), _orthonormal(rng, 4, 3)
    delta = (u * np.array([1.0, 3.0, 2.0])) @ v.T
    assert variance_rank(delta.astype(dtype), fraction=fraction) == expected


def test_variance_rank_identity():
    assert variance_rank(np.eye(10)) == 9
    assert variance_rank(np.eye(10), fraction=0.91) == 10
    assert variance_rank(np.eye(10), fraction=1.0) == 10


@pytest.mark.parametrize("rank", [1, 3, 7])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_variance_rank_of_low_rank_matrix(rank, shape, dtype):
    rng = np.random.default_rng(rank)
    delta = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
    assert variance_rank(delta.astype(dtype), fraction=1 - 1e-9) == rank


def test_variance_rank_matches_brute_force():
    rng = np.random.default_rng(3)
    delta = rng.normal(size=(30, 20)) * np.logspace(0, -2, 20)
    energy = np.linalg.svd(delta, compute_uv=False) ** 2
    for fraction in (0.3, 0.5, 0.9, 0.99):
        expected = next(k for k in range(1, 21) if energy[:k].sum() >= fraction * energy.sum())
        assert variance_rank(delta, fraction=fraction) == expected


def test_variance_rank_zero_and_jax_input():
    assert variance_rank(np.zeros((4, 6))) == 0
    assert variance_rank(jnp.zeros((4, 6), jnp.bfloat16)) == 0
    assert variance_rank(jnp.eye(10, dtype=jnp.bfloat16)) == 9
    assert variance_rank(np.eye(4, dtype=np.int32), fraction=0.5) == 2


@pytest.mark.parametrize(
    "delta,fraction,match",
    [
        (np.ones(4), 0.9, r"`delta` must be a 2-D matrix, got shape \(4,\).*once per layer"),
        (np.ones((2, 3, 4)), 0.9, r"`delta` must be a 2-D matrix, got shape \(2, 3, 4\)"),
        (np.ones((3, 3), np.complex64), 0.9, r"`delta` must hold real numbers, got dtype complex64"),
        (np.ones((3, 3)), 0.0, r"`fraction` must be a number in \(0, 1\], got 0.0"),
        (np.ones((3, 3)), 1.5, r"`fraction` must be a number in \(0, 1\], got 1.5"),
        (np.ones((3, 3)), -0.1, r"`fraction` must be a number in \(0, 1\]"),
        (np.ones((3, 3)), True, r"`fraction` must be a number in \(0, 1\], got True"),
        (np.ones((3, 3)), "0.9", r"`fraction` must be a number in \(0, 1\], got '0.9'"),
    ],
)
def test_variance_rank_errors(delta, fraction, match):
    with pytest.raises(ValueError, match=match):
        variance_rank(delta, fraction=fraction)


# --------------------------------------------------------------------------- intruder dimensions


@pytest.mark.parametrize("num_intruders", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_intruders_from_rotated_directions(num_intruders, shape):
    # Rotate the base's 8 weakest left singular vectors by a Hadamard matrix: each new vector has
    # cosine exactly 1/√8 ≈ 0.354 with 8 base vectors and 0 with the rest. Give `num_intruders` of
    # them the largest singular values and leave the others at the bottom of the spectrum.
    u, s, v, base = _factors(shape)
    u_tuned, s_tuned = u.copy(), s.copy()
    u_tuned[:, -8:] = u[:, -8:] @ _hadamard8()
    s_tuned[-8:] = 0.1
    s_tuned[-8 : -8 + num_intruders] = [100.0, 90.0, 80.0][:num_intruders]
    tuned = (u_tuned * s_tuned) @ v.T

    assert intruder_dimensions(base, tuned) == num_intruders
    assert intruder_dimensions(base, tuned, top_k=num_intruders) == num_intruders
    assert intruder_dimensions(base, tuned, threshold=0.3) == 0  # 0.354 is above it
    report = intruder_report(base, tuned)
    np.testing.assert_allclose(report.similarity[:num_intruders], 1 / np.sqrt(8), atol=1e-5)
    np.testing.assert_allclose(report.similarity[num_intruders:], 1.0, atol=1e-4)
    np.testing.assert_array_equal(report.best_match[num_intruders:], np.arange(10 - num_intruders))
    np.testing.assert_allclose(report.singular_values[:num_intruders], [100.0, 90.0, 80.0][:num_intruders], rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_intruders_from_low_rank_updates(shape):
    # A LoRA-like update `c · w vᵀ`, w an equal mix of 8 base directions (cosine 1/√8 with each), v the
    # base's weakest right singular vector: the update's direction becomes the top one and intrudes.
    u, _, v, base = _factors(shape)
    w = u[:, -8:] @ _hadamard8()
    one = base + 50.0 * np.outer(w[:, 0], v[:, -1])
    two = one + 40.0 * np.outer(w[:, 1], v[:, -2])
    assert intruder_dimensions(base, one) == 1
    assert intruder_dimensions(base, two) == 2
    assert intruder_dimensions(jnp.asarray(base), jnp.asarray(two)) == 2
    # A small update barely moves the spectrum: the top vectors stay the base's.
    assert intruder_dimensions(base, base + 0.01 * np.outer(w[:, 0], v[:, -1])) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_rescaling_singular_values_creates_no_intruders(shape):
    u, s, v, base = _factors(shape)
    rng = np.random.default_rng(7)
    factors = rng.uniform(0.2, 3.0, size=s.shape)  # reorders the spectrum, keeps the vectors
    tuned = (u * (s * factors)) @ v.T
    assert intruder_dimensions(base, tuned, top_k=min(shape)) == 0
    assert intruder_dimensions(base, base) == 0
    assert intruder_dimensions(base, -base) == 0  # sign flips are not new directions
    report = intruder_report(base, tuned, top_k=5)
    np.testing.assert_array_equal(report.best_match, np.argsort(-(s * factors))[:5])


@pytest.mark.parametrize(
    "base,tuned,kwargs,match",
    [
        (np.ones(4), np.ones(4), {}, r"`base` must be a 2-D matrix"),
        (np.eye(4), np.ones((1, 4, 4)), {}, r"`tuned` must be a 2-D matrix, got shape \(1, 4, 4\)"),
        (np.eye(4), np.eye(5), {"top_k": 2}, r"same shape .* got \(4, 4\) and \(5, 5\)"),
        (np.eye(4), np.eye(4), {"top_k": 0}, r"`top_k` must be a positive integer, got 0"),
        (np.eye(4), np.eye(4), {"top_k": 2.5}, r"`top_k` must be a positive integer, got 2.5"),
        (np.eye(4), np.eye(4), {"top_k": 5}, r"`top_k` must be at most min\(m, n\) = 4"),
        (np.eye(4), np.eye(4), {"top_k": 2, "threshold": 0.0}, r"`threshold` must be .* \(0, 1\], got 0.0"),
        (np.eye(4), np.eye(4), {"top_k": 2, "threshold": 1.5}, r"`threshold` must be .* \(0, 1\], got 1.5"),
    ],
)
def test_intruder_errors(base, tuned, kwargs, match):
    with pytest.raises(ValueError, match=match):
        intruder_dimensions(base, tuned, **kwargs)


def test_intruder_report_errors():
    with pytest.raises(ValueError, match=r"`top_k` must be a positive integer, got True"):
        intruder_report(np.eye(4), np.eye(4), top_k=True)


# --------------------------------------------------------------------------- subspace overlap


def test_subspace_overlap_known_values():
    u, s, v, base = _factors((32, 24))
    assert subspace_overlap(base, base, k=5) == pytest.approx(1.0, abs=1e-5)
    assert subspace_overlap(base, 3.0 * base, k=24) == pytest.approx(1.0, abs=1e-5)
    # The same left subspace reached with other right vectors and another width.
    other = (u[:, :5] * [5, 4, 3, 2, 1]) @ np.random.default_rng(1).normal(size=(5, 40))
    assert subspace_overlap(base, other, k=5) == pytest.approx(1.0, abs=1e-5)
    disjoint = (u[:, 5:10] * [5, 4, 3, 2, 1]) @ v[:, :5].T
    assert subspace_overlap(base, disjoint, k=5) == pytest.approx(0.0, abs=1e-6)
    # span{e1, e2} vs span{e1, e3}: principal cosines 1 and 0.
    assert subspace_overlap(np.diag([2.0, 1.0, 0.0]), np.diag([2.0, 0.0, 1.0]), k=2) == pytest.approx(0.5)
    # span{e1} vs span{(e1 + e2) / √2}: cosine² 1/2.
    assert subspace_overlap(np.diag([1.0, 0.0]), np.array([[1.0, 0.0], [1.0, 0.0]]), k=1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "a,b,k,match",
    [
        (np.ones(4), np.eye(4), 1, r"`a` must be a 2-D matrix"),
        (np.eye(4), np.ones((4, 4, 1)), 1, r"`b` must be a 2-D matrix"),
        (np.eye(4), np.eye(5), 1, r"same number of rows .* got shapes \(4, 4\) and \(5, 5\)"),
        (np.eye(4), np.eye(4), 0, r"`k` must be a positive integer, got 0"),
        (np.eye(4), np.eye(4), 1.0, r"`k` must be a positive integer, got 1.0"),
        (np.eye(4), np.ones((4, 2)), 3, r"`k` must be at most 2 for shapes \(4, 4\) and \(4, 2\), got 3"),
    ],
)
def test_subspace_overlap_errors(a, b, k, match):
    with pytest.raises(ValueError, match=match):
        subspace_overlap(a, b, k=k)
