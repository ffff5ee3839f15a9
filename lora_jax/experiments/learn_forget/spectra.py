"""How a fine-tuning run changed each adapted matrix: the rank of the update and its intruder dimensions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import lora_jax as lora
from lora_jax import analysis

__all__ = ["intruder_records", "summarise", "update_spectra"]

PyTree = Any


def _factors(tree: Any, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], lora.LoraFactors]]:
    if isinstance(tree, lora.LoraFactors):
        yield parts, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _factors(v, (*parts, str(k)))


def _get(tree: Any, parts: Sequence[str], what: str) -> np.ndarray:
    node = tree
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"the adapted weight {'/'.join(parts)!r} is missing from `{what}`.")
        node = node[p]
    return np.asarray(node, np.float32)


def _matrices(
    before: PyTree, after: PyTree, layouts: PyTree
) -> Iterator[tuple[str, int | None, np.ndarray, np.ndarray]]:
    """``(path, layer, W_before, W_after)`` per adapted matrix, each as ``[out, in]`` (torch's layout)."""
    for parts, f in _factors(layouts):
        w0, w1 = _get(before, parts, "before"), _get(after, parts, "after")
        if w0.shape != w1.shape:
            raise ValueError(f"{'/'.join(parts)!r} has shape {w0.shape} before but {w1.shape} after.")
        order = (*f.stack_axes, *f.b_axes, *f.a_axes)
        rows = math.prod(w0.shape[i] for i in f.b_axes)
        cols = math.prod(w0.shape[i] for i in f.a_axes)
        m0 = np.transpose(w0, order).reshape(-1, rows, cols)
        m1 = np.transpose(w1, order).reshape(-1, rows, cols)
        for i in range(len(m0)):
            yield "/".join(parts), (i if f.stack_axes else None), m0[i], m1[i]


def update_spectra(before: PyTree, after: PyTree, layouts: PyTree, *, fraction: float = 0.9) -> list[dict[str, Any]]:
    """The ``fraction``-variance rank of ``after - before`` for every matrix ``layouts`` adapts.

    ``layouts`` is an adapter tree (any rank): its `LoraFactors` say which
    weights are adapted and how each is laid out, so a stacked weight gives
    one matrix per layer.

    Returns:
      One record per matrix: ``path``, ``layer``, ``rank``, ``max_rank``.

    >>> import jax, jax.numpy as jnp
    >>> before = {"w": jnp.zeros((8, 6))}
    >>> after = {"w": jnp.outer(jnp.arange(8.0), jnp.ones(6))}
    >>> _, layouts = lora.split(before, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> [(r["path"], r["rank"], r["max_rank"]) for r in update_spectra(before, after, layouts)]
    [('w', 1, 6)]
    """
    return [
        {"path": path, "layer": layer, "rank": analysis.variance_rank(w1 - w0, fraction=fraction),
         "max_rank": min(w0.shape)}
        for path, layer, w0, w1 in _matrices(before, after, layouts)
    ]  # fmt: skip


def intruder_records(
    before: PyTree,
    after: PyTree,
    layouts: PyTree,
    *,
    top_k: int = 10,
    threshold: float = 0.5,
    layers: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Intruder dimensions (Shuttleworth et al. 2024) of every adapted matrix (of the given layers).

    Returns:
      One record per matrix: ``path``, ``layer``, ``intruders`` (of the top ``top_k``).

    >>> records = intruder_records(params, tuned, layouts, layers=[0, 15, 29])  # doctest: +SKIP
    """
    out = []
    for path, layer, w0, w1 in _matrices(before, after, layouts):
        if layers is not None and layer is not None and layer not in layers:
            continue
        count = analysis.intruder_dimensions(w0, w1, top_k=top_k, threshold=threshold)
        out.append({"path": path, "layer": layer, "intruders": int(count)})
    return out


def _module(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("kernel", "weight")]
    return parts[-1] if parts else path


def summarise(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Median, mean and range of ``key`` over matrices, and its median per projection."""
    values = [r[key] for r in records]
    by_module: dict[str, list[float]] = {}
    for r in records:
        by_module.setdefault(_module(r["path"]), []).append(r[key])
    return {
        "num_matrices": len(values),
        "median": float(statistics.median(values)) if values else None,
        "mean": float(statistics.fmean(values)) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "median_by_module": {k: float(statistics.median(v)) for k, v in sorted(by_module.items())},
    }
