"""Data-dependent adapter initialisations: PiSSA and OLoRA.

Both start the adapter from a low-rank part of the pretrained weight ``W``
instead of from zero, and move that part out of the frozen weight, so the
adapted model still starts exactly at the base model:

* PiSSA puts the top ``rank`` singular triples of ``W`` in the factors.
* OLoRA puts the first ``rank`` columns of the QR decomposition of ``W``
  (in PyTorch's ``[out, in]`` layout) in the factors.

`init_factors` returns ``(lora_a, lora_b, residual)``. The caller must
replace the frozen weight by ``residual``: ``residual + scale·A@B == W`` up
to rounding, so outputs at step 0 equal the base model's. The frozen tree
then no longer holds the pretrained weights; merging the adapters gives
``W`` back, and a PEFT export of these adapters only makes sense together
with the residual base weights.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("pissa", "olora")
"""The values `init_factors` accepts for ``method``."""

_PEFT_NITER = re.compile(r"pissa_niter_(\d+)")


def init_factors(
    w: Any,
    *,
    stack: tuple[int, ...],
    a_axes: tuple[int, ...],
    b_axes: tuple[int, ...],
    rank: int,
    scale: float,
    method: str,
    key: jax.Array | None = None,
    niter: int | None = None,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Adapter factors taken from the weight itself, and the residual weight.

    ``W`` is read as a matrix ``M`` of shape ``[in, out]`` with
    ``in = prod(W[a_axes])`` and ``out = prod(W[b_axes])``, one per entry of
    the ``stack`` axes (each stacked entry is factorised independently).
    The factors have `LoraFactors`' layout: ``lora_a`` is
    ``[*W[stack], *W[a_axes], rank]`` and ``lora_b`` is
    ``[*W[stack], rank, *W[b_axes]]``.

    * ``"pissa"``: with the thin SVD ``M = U S V^T`` and its top ``rank``
      triples, ``A = U_r sqrt(S_r / scale)`` and ``B = sqrt(S_r / scale) V_r^T``,
      so ``scale·A@B = U_r S_r V_r^T``, the best rank-``rank`` approximation
      of ``M``. ``A^T A = B B^T = diag(S_r) / scale``. This is PEFT's
      ``init_lora_weights="pissa"`` transposed to the ``[in, out]`` layout.
      With ``niter=k`` the SVD is a randomised one (Halko et al. 2011,
      Algorithm 4.4: a Gaussian sketch of ``rank`` columns of the longer
      side, no oversampling, and ``k`` subspace iterations), as PEFT's
      ``"pissa_niter_k"`` does with ``torch.svd_lowrank(W, rank, niter=k)``.
      It only approximates the top singular triples: close to exact when
      the spectrum decays fast, and closer with more iterations. The
      residual is still exact, ``W - scale·A@B``, whatever ``A@B`` is.
    * ``"olora"``: as PEFT's ``init_lora_weights="olora"``, which in
      PyTorch's layout ``weight = M^T`` (``[out, in]``) takes
      ``Q, R = qr(weight)``, ``lora_B = Q[:, :rank]`` and
      ``lora_A = R[:rank]``, with no rescaling by ``scale``. In the
      ``[in, out]`` layout that is ``A = R[:rank]^T`` (``[in, rank]``) and
      ``B = Q[:, :rank]^T`` (``[rank, out]``), so ``B`` has orthonormal rows
      (``B B^T = I``) and ``scale·A@B = scale·(Q_r R_r)^T``: unlike PiSSA,
      the adapter's delta grows with ``scale``, and the residual absorbs it.

    The decompositions run in float32 (float64 for a float64 ``W``); the
    residual is ``W - scale·A@B`` computed from the factors *after* their
    cast to ``dtype``, so ``residual + scale·A@B`` reproduces ``W`` as
    closely as those factors allow.

    The frozen weight must be replaced by ``residual``: then outputs at step
    0 equal the base model's up to rounding. The frozen tree no longer holds
    the pretrained weights; merging the adapters into it gives ``W`` back,
    and exporting the adapters to PEFT needs the residual weights as the
    base model.

    Args:
      w: the pretrained weight, a float array.
      stack: axes of ``w`` that index independent layers (an ``nn.scan``
        stack), each factorised on its own.
      a_axes: axes of ``w`` contracted with the input (carried by ``A``).
      b_axes: axes of ``w`` that are outputs (carried by ``B``).
        ``stack``, ``a_axes`` and ``b_axes`` together name every axis of
        ``w`` once.
      rank: the adapter's rank, at most ``min(in, out)``.
      scale: the adapter's scale ``s`` (``alpha / rank``), positive.
      method: ``"pissa"`` or ``"olora"``.
      key: a PRNG key; needed with ``niter`` (the randomised SVD's sketch)
        and ignored by the exact methods.
      niter: ``None`` for PiSSA's exact SVD, or the number of subspace
        iterations of the randomised SVD (PEFT's ``"pissa_niter_<niter>"``).
        PiSSA only.
      dtype: dtype of ``lora_a`` and ``lora_b``; ``None`` keeps ``w``'s.

    Returns:
      ``(lora_a, lora_b, residual)``; ``residual`` has ``w``'s shape and dtype.

    Raises:
      ValueError: an unknown ``method``, axes that do not name every axis of
        ``w`` once, a ``rank`` out of ``[1, min(in, out)]``, a non-positive
        ``scale``, a negative ``niter`` or ``niter`` with OLoRA.
      TypeError: a non-float ``w`` or ``dtype``, or ``niter`` without ``key``.

    References:
      Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
      Vectors Adaptation of Large Language Models".
      Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large
      Language Models".
      Halko, Martinsson and Tropp 2011, "Finding Structure with Randomness:
      Probabilistic Algorithms for Constructing Approximate Matrix
      Decompositions".

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (8, 6))
    >>> a, b, residual = init_factors(w, stack=(), a_axes=(0,), b_axes=(1,), rank=2, scale=2.0, method="pissa")
    >>> a.shape, b.shape
    ((8, 2), (2, 6))
    >>> bool(jnp.allclose(residual + 2.0 * a @ b, w, atol=1e-5))
    True
    """
    w = _check_weight(w)
    stack, a_axes, b_axes = _check_axes(w, stack, a_axes, b_axes)
    method = _check_method(method, niter)
    m = math.prod(w.shape[i] for i in a_axes)
    n = math.prod(w.shape[i] for i in b_axes)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"init_factors: `rank` must be an integer in [1, min(in, out)] = [1, {min(m, n)}] for a weight of "
            f"shape {tuple(w.shape)} (in = {m}, out = {n}); got {rank!r}. Lower the rank."
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"init_factors: `scale` must be a positive number (alpha / rank); got {type(scale).__name__}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"init_factors: `scale` must be a positive finite number (alpha / rank); got {scale!r}.")
    if niter is not None:
        if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 0:
            raise ValueError(
                f"init_factors: `niter` must be None (exact SVD) or a non-negative integer number of subspace "
                f"iterations; got {niter!r}."
            )
        if not isinstance(key, jax.Array):
            raise TypeError(
                f"init_factors: method='pissa' with niter={niter} is a randomised SVD and needs `key`, a JAX PRNG "
                f"key such as key=jax.random.key(0); got {type(key).__name__}. Pass a key, or niter=None for the "
                "exact SVD."
            )
    out_dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"init_factors: `dtype` must be a float dtype for the factors; got {out_dtype}.")
    return _factorise(
        w,
        key if niter is not None else None,
        stack=stack,
        a_axes=a_axes,
        b_axes=b_axes,
        rank=int(rank),
        scale=float(scale),
        method=method,
        niter=None if niter is None else int(niter),
        out_dtype=out_dtype,
    )


def _check_weight(w: Any) -> jax.Array:
    if not hasattr(w, "dtype") or not hasattr(w, "shape"):
        raise TypeError(f"init_factors: `w` must be a float array (the pretrained weight); got {type(w).__name__}.")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"init_factors: `w` has dtype {w.dtype}; PiSSA and OLoRA decompose float weights only. Dequantise it "
            "first, or exclude it from the targets."
        )
    return jnp.asarray(w)


def _check_axes(w: jax.Array, stack: Any, a_axes: Any, b_axes: Any) -> tuple[tuple[int, ...], ...]:
    try:
        groups = tuple(tuple(int(i) for i in g) for g in (stack, a_axes, b_axes))
    except TypeError as err:
        raise TypeError(
            "init_factors: `stack`, `a_axes` and `b_axes` must be tuples of axis indices of `w`; got "
            f"{stack!r}, {a_axes!r}, {b_axes!r}."
        ) from err
    if sorted(i for g in groups for i in g) != list(range(w.ndim)) or not groups[1] or not groups[2]:
        raise ValueError(
            f"init_factors: stack={groups[0]}, a_axes={groups[1]} and b_axes={groups[2]} must together name each "
            f"axis of `w` (shape {tuple(w.shape)}, axes 0..{w.ndim - 1}) exactly once, with a_axes and b_axes "
            "non-empty. Pass the layout of the weight's LoraFactors (its stack_axes, a_axes, b_axes)."
        )
    return groups


def _check_method(method: Any, niter: Any) -> str:
    match = _PEFT_NITER.fullmatch(method) if isinstance(method, str) else None
    if match is not None:
        raise ValueError(
            f"init_factors: method={method!r} is PEFT's spelling; here the randomised PiSSA is "
            f"method='pissa', niter={match.group(1)} (with a key=)."
        )
    if method not in METHODS:
        raise ValueError(f"init_factors: `method` must be one of {METHODS}; got {method!r}.")
    if method == "olora" and niter is not None:
        raise ValueError(
            f"init_factors: `niter` ({niter!r}) only applies to method='pissa' (the randomised SVD); OLoRA uses an "
            "exact QR decomposition. Drop niter."
        )
    return method


@functools.partial(
    jax.jit, static_argnames=("stack", "a_axes", "b_axes", "rank", "scale", "method", "niter", "out_dtype")
)
def _factorise(w, key, *, stack, a_axes, b_axes, rank, scale, method, niter, out_dtype):
    stack_shape = tuple(w.shape[i] for i in stack)
    a_shape = tuple(w.shape[i] for i in a_axes)
    b_shape = tuple(w.shape[i] for i in b_axes)
    work = jnp.promote_types(w.dtype, jnp.float32)
    # Every stacked entry becomes one matrix of a batch [P, in, out].
    mat = jnp.transpose(w, (*stack, *a_axes, *b_axes)).astype(work)
    mat = mat.reshape(math.prod(stack_shape), math.prod(a_shape), math.prod(b_shape))
    if method == "pissa":
        if niter is None:
            u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
            u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
        else:
            u, s, vt = _randomised_svd(mat, rank, niter, key)
        root = jnp.sqrt(s / scale)
        a, b = u * root[..., None, :], root[..., :, None] * vt
    else:
        # PEFT factors torch's weight [out, in] = M^T; transposing back gives the [in, out] layout.
        q, r = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))
        a, b = jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)
    a, b = a.astype(out_dtype), b.astype(out_dtype)
    residual = mat - scale * (a.astype(work) @ b.astype(work))
    residual = residual.reshape(*stack_shape, *a_shape, *b_shape)
    residual = jnp.transpose(residual, np.argsort((*stack, *a_axes, *b_axes))).astype(w.dtype)
    a = a.reshape(*stack_shape, *a_shape, rank)
    b = b.reshape(*stack_shape, rank, *b_shape)
    return a, b, residual


def _randomised_svd(mat: jax.Array, rank: int, niter: int, key: jax.Array):
    """Approximate top-``rank`` SVD of a batch of matrices (Halko et al. 2011, Algorithm 4.4)."""
    if mat.shape[-2] < mat.shape[-1]:
        # Like torch.svd_lowrank, build the basis on the longer side: M = (M^T)^T = V S U^T.
        u, s, vt = _randomised_svd(jnp.swapaxes(mat, -1, -2), rank, niter, key)
        return jnp.swapaxes(vt, -1, -2), s, jnp.swapaxes(u, -1, -2)
    omega = jax.random.normal(key, (*mat.shape[:-2], mat.shape[-1], rank), mat.dtype)
    mat_t = jnp.swapaxes(mat, -1, -2)
    basis, _ = jnp.linalg.qr(mat @ omega)
    for _ in range(niter):
        # Re-orthonormalising between the products keeps the small singular directions from rounding away.
        other, _ = jnp.linalg.qr(mat_t @ basis)
        basis, _ = jnp.linalg.qr(mat @ other)
    u_small, s, vt = jnp.linalg.svd(jnp.swapaxes(basis, -1, -2) @ mat, full_matrices=False)
    return basis @ u_small, s, vt
