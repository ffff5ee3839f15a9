"""LoRA learns less and forgets less: the study of Biderman et al. (2024) in miniature.

Continued pre-training of a Llama-style model on Python code (the standard
library's train split), once with full fine-tuning and once per LoRA rank,
on the same batches in the same order, for the same number of steps, with
AdamW. Two held-out perplexities are measured before training and at a few
checkpoints along the way:

* **learning**: perplexity on held-out Python code (standard-library modules
  never trained on);
* **forgetting**: perplexity on held-out English prose (Shakespeare plays
  never seen in any split used here).

A method that learns more lowers the first number more; a method that
forgets less raises the second one less. The study also repeats the paper's
spectral analysis: for every matrix LoRA would adapt, how many singular
directions of full fine-tuning's update ``ΔW = W_after - W_before`` are
needed to explain 90% of its variance (:func:`variance_rank`,
:func:`update_spectra`), to compare with the LoRA rank.

Only the public API is used: ``lora_jax.split`` / ``wrap`` / ``merge``,
``lora_jax.models`` and ``lora_jax.experiments.data``.

References:
    Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax.experiments import data as data_lib
from lora_jax.models import LlamaConfig, LlamaForCausalLM

__all__ = [
    "Method",
    "StudyConfig",
    "StudyData",
    "format_table",
    "parse_methods",
    "plot_results",
    "prepare_data",
    "run_study",
    "update_spectra",
    "variance_rank",
]

PyTree = Any

_METHOD_RE = re.compile(r"^(full|lora(\d+))$")


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method of the study.

    Attributes:
        name: ``"full"`` or ``"lora<rank>"`` (e.g. ``"lora16"``).
        rank: The LoRA rank, or ``None`` for full fine-tuning.

    >>> Method("lora16", 16).is_lora
    True
    """

    name: str
    rank: int | None = None

    @property
    def is_lora(self) -> bool:
        """Whether this method trains low-rank adapters."""
        return self.rank is not None


def parse_methods(names: str | Sequence[str]) -> list[Method]:
    """Parses method names such as ``"full,lora16,lora64"``.

    Args:
        names: Comma-separated names, or a sequence of names: ``"full"`` for
            full fine-tuning, ``"lora<r>"`` for LoRA of rank ``r`` (alpha
            ``2r``, all linear layers).

    Returns:
        The methods, in the given order.

    Raises:
        ValueError: For an unknown or repeated name, a zero rank, or no names.

    >>> [m.name for m in parse_methods("full,lora16")]
    ['full', 'lora16']
    >>> parse_methods(["lora64"])[0].rank
    64
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    methods = []
    for name in names:
        match = _METHOD_RE.match(name)
        if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ValueError(
                f"unknown method {name!r}: use 'full' for full fine-tuning or 'lora<rank>' with a positive "
                "rank, e.g. 'lora16'."
            )
        methods.append(Method(name, int(match.group(2)) if match.group(2) else None))
    if not methods:
        raise ValueError("no methods given; pass e.g. 'full,lora16'.")
    seen = [m.name for m in methods]
    if len(set(seen)) != len(seen):
        raise ValueError(f"methods must be distinct, got {seen}.")
    return methods


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes and hyper-parameters of one study run.

    The defaults are the run that takes 8 to 14 minutes with SmolLM2-135M on a
    2-core CPU (see ``examples/learn_forget.py``).

    Args:
        steps: Optimiser steps per method (the same batches for every method).
        seq_len: Tokens per training and evaluation row.
        batch_size: Rows per training step.
        methods: Method names, see :func:`parse_methods`.
        full_lr: Peak learning rate of full fine-tuning.
        lora_lr: Peak learning rate of LoRA. Biderman et al. find LoRA's best
            learning rate about ten times full fine-tuning's, hence the default
            ratio of 10.
        weight_decay: AdamW's decoupled weight decay (all methods).
        warmup_steps: Linear warm-up steps; ``None`` means a tenth of ``steps``
            (at least one). Cosine decay to a tenth of the peak follows.
        eval_tokens: Tokens scored per held-out domain at every evaluation.
        eval_points: Evaluations per method after training starts, evenly
            spaced, the last one after the final step (the shared evaluation
            before training is extra).
        eval_batch_size: Rows per evaluation forward pass.
        compute_dtype: Dtype of activations and matmuls; parameters, adapters
            and optimiser state stay float32 (bfloat16 weights would round away
            AdamW's small full fine-tuning updates).
        variance_fraction: Share of ``ΔW``'s squared singular values the
            spectral rank must explain.
        seed: Seed of the data order, evaluation rows and adapter init.

    >>> StudyConfig(steps=10).lora_lr / StudyConfig(steps=10).full_lr
    10.0
    """

    steps: int = 30
    seq_len: int = 128
    batch_size: int = 4
    methods: tuple[str, ...] = ("full", "lora16")
    full_lr: float = 5e-5
    lora_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    eval_tokens: int = 3072
    eval_points: int = 2
    eval_batch_size: int = 8
    compute_dtype: str = "bfloat16"
    variance_fraction: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "eval_tokens", "eval_points", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StudyConfig.{name} must be a positive integer, got {value!r}.")
        if self.seq_len < 2:
            raise ValueError(f"StudyConfig.seq_len must be at least 2 (one input and one target), got {self.seq_len}.")
        if self.eval_points > self.steps:
            raise ValueError(
                f"StudyConfig.eval_points ({self.eval_points}) cannot exceed steps ({self.steps}); "
                "evaluations happen after training steps."
            )
        for name in ("full_lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"StudyConfig.weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"StudyConfig.warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}.")
        if not 0 < self.variance_fraction <= 1:
            raise ValueError(f"StudyConfig.variance_fraction must be in (0, 1], got {self.variance_fraction}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"StudyConfig.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}.")
        parse_methods(self.methods)

    @property
    def eval_steps(self) -> list[int]:
        """Steps after which each method is evaluated (the last is ``steps``).

        >>> StudyConfig(steps=40, eval_points=2).eval_steps
        [20, 40]
        """
        return sorted({round(self.steps * (i + 1) / self.eval_points) for i in range(self.eval_points)})


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudyData:
    """Token arrays of one study: the training batches and the two held-out sets.

    Attributes:
        train_batches: ``steps`` dicts with ``input_ids`` and ``loss_mask``
            ``[batch_size, seq_len]``, in the order every method sees them.
        code: Held-out Python code rows (learning).
        english: Held-out English prose rows (forgetting).
        train_rows: Rows the training split packs into (the pool batches are
            drawn from).
    """

    train_batches: list[dict[str, np.ndarray]]
    code: data_lib.Packed
    english: data_lib.Packed
    train_rows: int


def _spread_rows(packed: data_lib.Packed, tokens: int, seq_len: int, what: str) -> data_lib.Packed:
    """Evenly spaced rows summing to ``tokens``: the set covers every document, not just the first."""
    want = max(1, math.ceil(tokens / seq_len))
    have = len(packed.input_ids)
    if have < want:
        raise ValueError(
            f"the held-out {what} split packs into only {have} rows of {seq_len} tokens, fewer than the "
            f"{want} that eval_tokens={tokens} needs; lower eval_tokens or seq_len."
        )
    index = np.linspace(0, have - 1, want).round().astype(int)
    return data_lib.Packed(packed.input_ids[index], packed.loss_mask[index])


def prepare_data(
    tokenizer: data_lib.TokenizerLike,
    config: StudyConfig,
    *,
    train_documents: int | None = None,
    eval_documents: int | None = None,
) -> StudyData:
    """Builds the training batches and the held-out sets of a study.

    Training rows are packed from the standard library's train split and
    drawn in one seeded order, so every method sees the same tokens. The
    held-out sets are evenly spaced rows of the packed held-out modules
    (Python) and held-out plays (English).

    Args:
        tokenizer: Anything :func:`~lora_jax.experiments.data.pack_texts` accepts.
        config: Sizes and seed.
        train_documents: Use only this many training modules (a seeded random
            choice); ``None`` uses all of them.
        eval_documents: Use only the first held-out documents of each domain
            (for quick runs); ``None`` uses all of them.

    Returns:
        The :class:`StudyData`.

    Raises:
        ValueError: If a split is too small for the requested sizes.

    >>> data = prepare_data(load_smollm2_tokenizer(), StudyConfig(steps=4))  # doctest: +SKIP
    >>> len(data.train_batches)  # doctest: +SKIP
    4
    """
    texts = list(data_lib.python_code("train")["text"])
    if train_documents is not None:
        texts = random.Random(config.seed).sample(texts, min(train_documents, len(texts)))
    train = data_lib.pack_texts(texts, tokenizer, seq_len=config.seq_len)
    if len(train.input_ids) < config.batch_size:
        raise ValueError(
            f"the training texts pack into {len(train.input_ids)} rows, fewer than batch_size="
            f"{config.batch_size}; use more train_documents or a smaller seq_len."
        )
    # epochs=None repeats with a fresh permutation per epoch, so small pools still give `steps` batches.
    stream = data_lib.batches(train, batch_size=config.batch_size, shuffle=True, seed=config.seed, epochs=None)
    train_batches = [next(stream) for _ in range(config.steps)]

    def heldout(rows: Any, what: str) -> data_lib.Packed:
        docs = list(rows["text"])[:eval_documents]
        packed = data_lib.pack_texts(docs, tokenizer, seq_len=config.seq_len)
        return _spread_rows(packed, config.eval_tokens, config.seq_len, what)

    return StudyData(
        train_batches=train_batches,
        code=heldout(data_lib.python_code("heldout"), "Python code"),
        english=heldout(data_lib.shakespeare("heldout"), "English prose"),
        train_rows=len(train.input_ids),
    )


# ----------------------------------------------------------------------------
# Spectral analysis of weight updates
# ----------------------------------------------------------------------------


def variance_rank(delta: np.ndarray | jax.Array, *, fraction: float = 0.9) -> int:
    """Smallest ``k`` whose top ``k`` singular values explain ``fraction`` of ``delta``'s variance.

    "Variance" is the squared Frobenius norm, ``sum(σ_i²)``, as in Biderman
    et al. (2024), Section 6. A zero matrix needs rank 0.

    Args:
        delta: A 2-D matrix, e.g. a weight update ``W_after - W_before``.
        fraction: Share of ``sum(σ_i²)`` to explain, in ``(0, 1]``.

    Returns:
        The rank, between 0 and ``min(delta.shape)``.

    Raises:
        ValueError: If ``delta`` is not 2-D or ``fraction`` is outside ``(0, 1]``.

    >>> rng = np.random.default_rng(0)
    >>> low_rank = rng.normal(size=(64, 5)) @ rng.normal(size=(5, 48))
    >>> variance_rank(low_rank) <= 5
    True
    >>> variance_rank(np.eye(10))
    9

    References:
        Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    delta = np.asarray(delta, np.float32)  # float32 SVDs: plenty for a 90% threshold, and fast
    if delta.ndim != 2:
        raise ValueError(f"`delta` must be a 2-D matrix, got shape {delta.shape}.")
    energy = np.linalg.svd(delta, compute_uv=False).astype(np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(energy) / total
    # A small tolerance so that an exactly sufficient prefix is not pushed one further by rounding.
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaves_by_path(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {_path_str(p): x for p, x in flat}


def update_spectra(
    before: PyTree,
    after: PyTree,
    adapters: PyTree,
    *,
    fraction: float = 0.9,
) -> list[dict[str, Any]]:
    """The 90%-variance rank of ``after - before`` for every matrix LoRA adapts.

    ``adapters`` (from :func:`lora_jax.split`) says which weights are
    adapted and how each is laid out: a stacked weight (an ``nn.scan`` layer
    axis) gives one matrix per layer, and the ``lora_a`` / ``lora_b`` sides of
    a weight become the matrix's rows and columns, so ``ΔW`` is analysed in
    exactly the shape a LoRA update ``A @ B`` has.

    Args:
        before: Parameters before full fine-tuning.
        after: Parameters after it (same structure).
        adapters: An adapter tree for ``before`` (trained or not; only its
            paths and layouts are read).
        fraction: Share of the update's variance to explain.

    Returns:
        One record per matrix: ``path``, ``layer`` (index along the stacked
        axes, or ``None``), ``shape`` (rows, columns), ``rank`` (the
        variance rank) and ``max_rank`` (``min(shape)``).

    Raises:
        ValueError: If an adapted path is missing from ``before``/``after``
            or the two differ in shape there.

    >>> import jax, jax.numpy as jnp
    >>> before = {"w": jnp.zeros((8, 6))}
    >>> after = {"w": jnp.outer(jnp.arange(8.0), jnp.ones(6))}  # a rank-1 update
    >>> _, adapters = lora.split(before, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
    >>> [(r["path"], r["rank"], r["max_rank"]) for r in update_spectra(before, after, adapters)]
    [('w', 1, 6)]
    """
    factors = _leaves_by_path(adapters, is_leaf=lambda x: isinstance(x, lora.LoraFactors))
    before_leaves, after_leaves = _leaves_by_path(before), _leaves_by_path(after)
    records = []
    for path, f in factors.items():
        if not isinstance(f, lora.LoraFactors):
            continue  # a leaf trained in full next to the adapters: not a low-rank target
        if path not in before_leaves or path not in after_leaves:
            raise ValueError(
                f"update_spectra: adapted weight {path!r} is missing from `before` or `after`; pass the "
                "parameter trees the adapters were split from."
            )
        w0, w1 = np.asarray(before_leaves[path], np.float32), np.asarray(after_leaves[path], np.float32)
        if w0.shape != w1.shape:
            raise ValueError(f"update_spectra: {path!r} has shape {w0.shape} before but {w1.shape} after.")
        # Stack axes first, then the `lora_a` side as rows and the `lora_b` side as columns.
        delta = np.transpose(w1 - w0, (*f.stack_axes, *f.a_axes, *f.b_axes))
        stack_shape = delta.shape[: len(f.stack_axes)]
        rows = math.prod(w0.shape[i] for i in f.a_axes)
        cols = math.prod(w0.shape[i] for i in f.b_axes)
        delta = delta.reshape(-1, rows, cols)
        for i, matrix in enumerate(delta):
            layer = int(np.unravel_index(i, stack_shape)[0]) if len(stack_shape) == 1 else None
            if len(stack_shape) > 1:
                layer = [int(j) for j in np.unravel_index(i, stack_shape)]
            records.append(
                {
                    "path": path,
                    "layer": layer,
                    "shape": [rows, cols],
                    "rank": variance_rank(matrix, fraction=fraction),
                    "max_rank": min(rows, cols),
                }
            )
    return records


def _module_name(path: str) -> str:
    # ".../self_attn/q_proj/kernel" -> "q_proj": the projection, across layers.
    parts = [p for p in path.split("/") if p not in ("kernel", "weight")]
    return parts[-1] if parts else path


def _summarise_spectra(records: Sequence[Mapping[str, Any]], fraction: float) -> dict[str, Any]:
    ranks = [r["rank"] for r in records]
    relative = [r["rank"] / r["max_rank"] for r in records if r["max_rank"]]
    by_module: dict[str, list[int]] = {}
    for r in records:
        by_module.setdefault(_module_name(r["path"]), []).append(r["rank"])
    return {
        "fraction": fraction,
        "num_matrices": len(records),
        "median_rank": float(statistics.median(ranks)),
        "mean_rank": float(statistics.fmean(ranks)),
        "min_rank": min(ranks),
        "max_rank": max(ranks),
        "median_rank_over_max": float(statistics.median(relative)),
        "median_rank_by_module": {k: float(statistics.median(v)) for k, v in sorted(by_module.items())},
        "max_rank_by_module": {_module_name(r["path"]): r["max_rank"] for r in records},
        "per_matrix": list(records),
    }


# ----------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------


def _token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over targets, and the number of targets.

    ``loss_mask[:, t]`` marks token ``t`` as a target predicted from the logits at ``t - 1``.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()


def _count(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _schedule(config: StudyConfig, peak: float) -> optax.Schedule:
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 10)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=config.steps, end_value=peak / 10
    )


class _Evaluator:
    """Held-out perplexity of plain parameters; one compiled forward shared by every method."""

    def __init__(self, model: LlamaForCausalLM, batch_size: int):
        self.batch_size = batch_size

        @jax.jit
        def nll(params: PyTree, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
            return _token_nll(model.apply(params, input_ids), input_ids, loss_mask)

        self._nll = nll

    def perplexity(self, params: PyTree, packed: data_lib.Packed) -> float:
        total, count = 0.0, 0.0
        n = len(packed.input_ids)
        for start in range(0, n, self.batch_size):
            ids = packed.input_ids[start : start + self.batch_size]
            mask = packed.loss_mask[start : start + self.batch_size]
            if len(ids) < self.batch_size:
                # Pad the last batch with masked rows so the forward compiles only once.
                pad = self.batch_size - len(ids)
                ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
                mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
            s, c = self._nll(params, ids, mask)
            total, count = total + float(s), count + float(c)
        return math.exp(total / count)


def _train_one(
    method: Method,
    *,
    model: LlamaForCausalLM,
    params: PyTree,
    data: StudyData,
    config: StudyConfig,
    evaluator: _Evaluator,
    progress: bool,
) -> tuple[dict[str, Any], PyTree]:
    """Trains one method; returns its record and its trained parameters or adapters."""
    sample_ids = jnp.asarray(data.train_batches[0]["input_ids"][:1])
    if method.is_lora:
        spec = lora.LoraSpec(rank=method.rank, alpha=2 * method.rank, targets="all-linear")
        frozen, trainable = lora.split(
            params, spec, key=jax.random.key(config.seed), trace=lambda p: model.apply(p, sample_ids)
        )
        wrapped = lora.wrap(model.apply)

        def logits_fn(trainable: PyTree, frozen: PyTree, ids: jax.Array) -> jax.Array:
            return wrapped(frozen, trainable, ids)

        # Compiled once, rather than one small program per operation at every evaluation.
        merge_jit = jax.jit(lora.merge)

        def merged(trainable: PyTree) -> PyTree:
            return merge_jit(frozen, trainable)

        lr = config.lora_lr
    else:
        # A private copy: the step donates its input buffers, and `params` is still needed.
        frozen, trainable = None, jax.tree.map(jnp.copy, params)

        def logits_fn(trainable: PyTree, frozen: PyTree, ids: jax.Array) -> jax.Array:
            return model.apply(trainable, ids)

        def merged(trainable: PyTree) -> PyTree:
            return trainable

        lr = config.full_lr

    optimizer = optax.adamw(_schedule(config, lr), b1=0.9, b2=0.999, weight_decay=config.weight_decay)
    opt_state = optimizer.init(trainable)

    def loss_fn(trainable: PyTree, frozen: PyTree, ids: jax.Array, mask: jax.Array) -> jax.Array:
        total, count = _token_nll(logits_fn(trainable, frozen, ids), ids, mask)
        return total / jnp.maximum(count, 1.0)

    # `frozen` is an argument, not a closure constant, so XLA does not embed the base weights in the program.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trainable, opt_state, frozen, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    record: dict[str, Any] = {
        "method": method.name,
        "kind": "lora" if method.is_lora else "full",
        "rank": method.rank,
        "alpha": 2 * method.rank if method.is_lora else None,
        "learning_rate": lr,
        "trainable_params": _count(trainable),
        "train_loss": [],
        "step_seconds": [],
        "evals": [],
    }
    eval_steps = set(config.eval_steps)
    bar = _progress(range(config.steps), desc=method.name, enabled=progress)
    for step in bar:
        batch = data.train_batches[step]
        start = time.perf_counter()
        trainable, opt_state, loss = train_step(trainable, opt_state, frozen, batch["input_ids"], batch["loss_mask"])
        loss = float(loss)  # waits for the step, so the time below is the step's
        record["step_seconds"].append(time.perf_counter() - start)
        record["train_loss"].append(loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.3f}")
        if step + 1 in eval_steps:
            p = merged(trainable)
            record["evals"].append(
                {
                    "step": step + 1,
                    "tokens": (step + 1) * config.batch_size * config.seq_len,
                    "code_ppl": evaluator.perplexity(p, data.code),
                    "english_ppl": evaluator.perplexity(p, data.english),
                }
            )
    # The first batch's loss before training (step 1's loss) against after: a noise-free "did it learn".
    first = data.train_batches[0]
    record["first_batch_loss_before"] = record["train_loss"][0]
    record["first_batch_loss_after"] = math.log(
        evaluator.perplexity(merged(trainable), data_lib.Packed(first["input_ids"], first["loss_mask"]))
    )
    steady = record["step_seconds"][1:] or record["step_seconds"]
    # The first step includes compilation; the median of the rest is robust to other load on the machine.
    record["compile_and_first_step_seconds"] = record["step_seconds"][0]
    record["median_step_seconds"] = float(statistics.median(steady))
    window = max(1, min(5, config.steps // 4))
    record["train_loss_first"] = float(statistics.fmean(record["train_loss"][:window]))
    record["train_loss_last"] = float(statistics.fmean(record["train_loss"][-window:]))
    return record, trainable


def _progress(iterable: Iterable[int], *, desc: str, enabled: bool) -> Iterable[int]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=f"{desc:>8}", unit="step", dynamic_ncols=True)


def run_study(
    model_config: LlamaConfig,
    params: PyTree,
    tokenizer: data_lib.TokenizerLike,
    config: StudyConfig,
    *,
    out_dir: str | pathlib.Path | None = None,
    model_name: str = "model",
    train_documents: int | None = None,
    eval_documents: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the study: every method from the same start, on the same batches, then evaluations.

    Args:
        model_config: Configuration of the Llama model ``params`` belong to
            (``scan_layers`` either way). Its compute dtype is replaced by
            ``config.compute_dtype``.
        params: Pretrained float32 parameters; not modified.
        tokenizer: The model's tokenizer (``encode``, ``eos_token_id``, ``pad_token_id``).
        config: Sizes and hyper-parameters.
        out_dir: If given, ``results.json`` and ``learn_forget.png`` are written there.
        model_name: Name recorded in the results.
        train_documents: Passed to :func:`prepare_data`.
        eval_documents: Passed to :func:`prepare_data`.
        progress: Show a progress bar per method.

    Returns:
        The results: ``config``, ``data`` sizes, ``baseline`` perplexities,
        one record per method under ``methods`` (learning rate, trainable
        parameters, training losses, step times, evaluations), ``spectral``
        (when full fine-tuning ran), ``step_time_ratio`` (each LoRA method's
        median step time over full fine-tuning's) and ``wall_seconds``.

    Raises:
        ValueError: For parameters that are not float32, or data too small
            for the configuration.

    >>> config, params = load_smollm2(scan_layers=True)  # doctest: +SKIP
    >>> results = run_study(config, params, load_smollm2_tokenizer(), StudyConfig(steps=4))  # doctest: +SKIP
    >>> sorted(results["methods"])  # doctest: +SKIP
    ['full', 'lora16']

    References:
        Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
    """
    start = time.perf_counter()
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    if dtypes != {"float32"}:
        raise ValueError(
            f"run_study: `params` must be float32 (got dtypes {sorted(dtypes)}); load them with "
            "dtype=jnp.float32 and choose the matmul precision with StudyConfig.compute_dtype."
        )
    methods = parse_methods(config.methods)
    model = LlamaForCausalLM(model_config.replace(dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32))
    data = prepare_data(tokenizer, config, train_documents=train_documents, eval_documents=eval_documents)
    evaluator = _Evaluator(model, config.eval_batch_size)

    baseline = {
        "code_ppl": evaluator.perplexity(params, data.code),
        "english_ppl": evaluator.perplexity(params, data.english),
    }
    results: dict[str, Any] = {
        "model": model_name,
        "config": dataclasses.asdict(config),
        "data": {
            "train_split": "Python standard library, train modules",
            "train_rows_available": data.train_rows,
            "train_tokens_per_method": config.steps * config.batch_size * config.seq_len,
            "code_eval": "Python standard library, held-out modules",
            "english_eval": "Shakespeare, held-out plays",
            "code_eval_tokens": int(data.code.loss_mask[:, 1:].sum()),
            "english_eval_tokens": int(data.english.loss_mask[:, 1:].sum()),
        },
        "total_params": _count(params),
        "baseline": baseline,
        "methods": {},
    }
    full_after = layouts = None
    for method in methods:
        record, trained = _train_one(
            method, model=model, params=params, data=data, config=config, evaluator=evaluator, progress=progress
        )
        final = record["evals"][-1]
        record["final"] = {
            "code_ppl": final["code_ppl"],
            "english_ppl": final["english_ppl"],
            "code_ppl_change": final["code_ppl"] - baseline["code_ppl"],
            "english_ppl_change": final["english_ppl"] - baseline["english_ppl"],
        }
        results["methods"][method.name] = record
        if method.is_lora:
            layouts = trained  # any rank will do: only the adapted paths and their layouts are read
        else:
            full_after = trained

    if full_after is not None:
        if layouts is None:
            # The matrices LoRA would adapt ("all-linear"), with their layouts, from a throw-away split.
            sample_ids = jnp.asarray(data.train_batches[0]["input_ids"][:1])
            _, layouts = lora.split(
                params,
                lora.LoraSpec(rank=1, targets="all-linear"),
                key=jax.random.key(0),
                trace=lambda p: model.apply(p, sample_ids),
            )
        records = update_spectra(params, full_after, layouts, fraction=config.variance_fraction)
        results["spectral"] = _summarise_spectra(records, config.variance_fraction)

    full = results["methods"].get("full")
    if full is not None:
        results["step_time_ratio"] = {
            name: rec["median_step_seconds"] / full["median_step_seconds"]
            for name, rec in results["methods"].items()
            if rec["kind"] == "lora"
        }
    results["wall_seconds"] = time.perf_counter() - start
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_results(results, out / "learn_forget.png")
    return results


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------

_COLORS = {"full": "tab:red"}
_LORA_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]


def _color(name: str, index: int) -> str:
    return _COLORS.get(name, _LORA_COLORS[index % len(_LORA_COLORS)])


def plot_results(results: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Draws the study's figure: learning vs forgetting, training loss, update ranks.

    Left: one trajectory per method from the shared starting point through
    every evaluation, x = held-out code perplexity (lower = learned more),
    y = held-out English perplexity (higher = forgot more). Middle: training
    loss per step. Right (when full fine-tuning ran): the median 90%-variance
    rank of full fine-tuning's update per projection, against the LoRA ranks.

    Args:
        results: What :func:`run_study` returns.
        path: Where to write the PNG.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    >>> plot_results(results, "runs/learn_forget/learn_forget.png")  # doctest: +SKIP
    PosixPath('runs/learn_forget/learn_forget.png')
    """
    # The object-oriented API needs no pyplot and no GUI backend.
    from matplotlib.figure import Figure

    spectral = results.get("spectral")
    panels = 3 if spectral else 2
    fig = Figure(figsize=(5.2 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels)
    base = results["baseline"]
    methods = results["methods"]

    ax = axes[0]
    ax.scatter([base["code_ppl"]], [base["english_ppl"]], color="black", zorder=3, label="before training")
    lora_index = 0
    for name, rec in methods.items():
        color = _color(name, lora_index)
        lora_index += rec["kind"] == "lora"
        xs = [base["code_ppl"], *(e["code_ppl"] for e in rec["evals"])]
        ys = [base["english_ppl"], *(e["english_ppl"] for e in rec["evals"])]
        label = f"{name} (lr {rec['learning_rate']:g}, {rec['trainable_params'] / 1e6:.1f}M trainable)"
        ax.plot(xs, ys, "-o", color=color, label=label, markersize=4)
        ax.annotate(
            f"step {rec['evals'][-1]['step']}",
            (xs[-1], ys[-1]),
            fontsize=7,
            color=color,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set_xlabel("held-out Python code perplexity (lower = learned more)")
    ax.set_ylabel("held-out English perplexity (higher = forgot more)")
    ax.set_title("Learning vs forgetting")
    ax.legend(fontsize=7)

    ax = axes[1]
    lora_index = 0
    for name, rec in methods.items():
        color = _color(name, lora_index)
        lora_index += rec["kind"] == "lora"
        ax.plot(range(1, len(rec["train_loss"]) + 1), rec["train_loss"], color=color, label=name, alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss (same batches for every method)")
    ax.legend(fontsize=7)

    if spectral:
        ax = axes[2]
        modules = list(spectral["median_rank_by_module"])
        ranks = [spectral["median_rank_by_module"][m] for m in modules]
        ceilings = [spectral["max_rank_by_module"][m] for m in modules]
        ax.bar(modules, ceilings, color="lightgray", label="full rank (min of shape)")
        ax.bar(modules, ranks, color="tab:red", label=f"full FT ΔW, {spectral['fraction']:.0%}-variance rank")
        lora_index = 0
        for name, rec in methods.items():
            if rec["kind"] == "lora":
                ax.axhline(
                    rec["rank"], color=_color(name, lora_index), linestyle="--", label=f"LoRA rank {rec['rank']}"
                )
                lora_index += 1
        ax.set_ylabel("rank (median over layers)")
        ax.set_title("Rank of full fine-tuning's update")
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize=7)

    cfg = results["config"]
    title = (
        f"{results['model']}: continued pre-training on Python code, {cfg['steps']} steps "
        f"× {cfg['batch_size']} × {cfg['seq_len']} tokens"
    )
    fig.suptitle(title, fontsize=10)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of the study's numbers, one row per method.

    Args:
        results: What :func:`run_study` returns.

    Returns:
        The table, lines joined with newlines.

    >>> print(format_table(results))  # doctest: +SKIP
    method   trainable  ...
    """
    base = results["baseline"]
    header = (
        f"{'method':<8} {'lr':>8} {'trainable':>11} {'step s':>7} {'loss first→last':>16} "
        f"{'code ppl':>17} {'English ppl':>17}"
    )
    lines = [header, "-" * len(header)]
    for name, rec in results["methods"].items():
        final = rec["final"]
        lines.append(
            f"{name:<8} {rec['learning_rate']:>8.0e} {rec['trainable_params']:>11,} {rec['median_step_seconds']:>7.2f} "
            f"{rec['train_loss_first']:>7.3f}→{rec['train_loss_last']:<8.3f} "
            f"{base['code_ppl']:>7.2f}→{final['code_ppl']:<8.2f} "
            f"{base['english_ppl']:>7.2f}→{final['english_ppl']:<8.2f}"
        )
    spectral = results.get("spectral")
    if spectral:
        lines.append(
            f"full FT ΔW: {spectral['fraction']:.0%}-variance rank median {spectral['median_rank']:.0f}, "
            f"mean {spectral['mean_rank']:.1f} (range {spectral['min_rank']}–{spectral['max_rank']}) over "
            f"{spectral['num_matrices']} matrices"
        )
    for name, ratio in results.get("step_time_ratio", {}).items():
        lines.append(f"step time {name} / full: {ratio:.2f}")
    return "\n".join(lines)
