"""One cell of the study: a method at a learning rate on a domain, trained from the base model."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lora_jax as lora
from lora_jax.experiments.learn_forget.config import Method, StudyConfig
from lora_jax.models import LlamaForCausalLM

__all__ = ["TrainedCell", "train_cell"]

PyTree = Any


class TrainedCell:
    """What a cell's training leaves: its record, the trained parameters, and for LoRA the adapters and spec."""

    def __init__(self, record: dict, params: PyTree, adapters: PyTree | None, spec: lora.LoraSpec | None) -> None:
        self.record, self.params, self.adapters, self.spec = record, params, adapters, spec


def _count(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _optimizer(learning_rate: jax.Array, config: StudyConfig) -> optax.GradientTransformation:
    # The peak rate is an argument of the compiled step, so every rate of a method reuses one program.
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, config.warmup_steps, config.steps, end_value=0.1)
    return optax.adamw(lambda count: learning_rate * unit(count), weight_decay=config.weight_decay)


_STEPS: dict[tuple, Any] = {}  # (id(model), method, config) -> (spec, frozen, compiled step); reused across rates


def _setup(method: Method, model: LlamaForCausalLM, params: PyTree, sample: jax.Array, config: StudyConfig):
    key = (id(model), id(params), method, id(config))
    if key in _STEPS:
        return _STEPS[key]
    spec = frozen = None
    if method.is_lora:
        spec = lora.LoraSpec(rank=method.rank, alpha=method.alpha(config.alpha), targets=method.targets)
        frozen, _ = lora.split(params, spec, key=jax.random.key(config.seed), trace=lambda p: model.apply(p, sample))
        wrapped = lora.wrap(model.apply)
        apply_fn = lambda t, f, *args, **kw: wrapped(f, t, *args, **kw)  # noqa: E731
    else:
        apply_fn = lambda t, f, *args, **kw: model.apply(t, *args, **kw)  # noqa: E731

    def loss_fn(trainable, frozen, ids, mask):
        # The library's chunked cross-entropy: no whole-batch [batch, seq, vocab] logits.
        return apply_fn(trainable, frozen, ids, loss_mask=mask, method="loss")

    # `frozen` is an argument, not a closure constant, so XLA does not embed the base weights in the program.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, ids, mask, learning_rate):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask)
        updates, opt_state = _optimizer(learning_rate, config).update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    _STEPS.clear()  # one method at a time: the cells of a method are consecutive
    _STEPS[key] = (spec, frozen, step)
    return _STEPS[key]


def train_cell(
    method: Method,
    learning_rate: float,
    batches: list[dict[str, Any]],
    *,
    model: LlamaForCausalLM,
    params: PyTree,
    config: StudyConfig,
    progress: Callable[[Iterable[int], str], Iterable[int]] | None = None,
) -> TrainedCell:
    """Trains one method at one peak learning rate on the given batches, from ``params``.

    AdamW with a linear warm-up and cosine decay to a tenth of the peak. LoRA
    adapts ``method.targets`` in every layer (alpha by ``config.alpha``), with
    ``lora_jax.split``/``wrap``; full fine-tuning updates every parameter.
    The compiled step takes the rate as an argument, so the rates of one
    method share one program.

    Returns:
      A `TrainedCell`: the record (losses, step times, trainable count) and
      the trained parameters (merged for LoRA).
    """
    sample = jnp.asarray(batches[0]["input_ids"][:1])
    spec, frozen, step = _setup(method, model, params, sample, config)
    if method.is_lora:
        # Every rate starts from the same adapters: A drawn from the same key, B = 0.
        _, trainable = lora.split(params, spec, key=jax.random.key(config.seed), trace=lambda p: model.apply(p, sample))
    else:
        # A private copy: the step donates its input buffers, and `params` is still needed.
        trainable = jax.tree.map(jnp.copy, params)
    opt_state = _optimizer(jnp.float32(learning_rate), config).init(trainable)
    rate = jnp.float32(learning_rate)

    record: dict[str, Any] = {
        "method": method.name,
        "rank": method.rank,
        "modules": method.modules,
        "alpha": method.alpha(config.alpha),
        "learning_rate": learning_rate,
        "trainable_params": _count(trainable),
        "train_loss": [],
        "step_seconds": [],
    }
    steps = range(config.steps)
    for i in progress(steps, f"{method.name} lr {learning_rate:g}") if progress else steps:
        start = time.perf_counter()
        batch = batches[i]
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch["input_ids"], batch["loss_mask"], rate)
        record["train_loss"].append(float(loss))  # waits for the step, so the time is the step's
        record["step_seconds"].append(time.perf_counter() - start)
    steady = record["step_seconds"][1:] or record["step_seconds"]
    record["median_step_seconds"] = float(statistics.median(steady))  # the first step may include compilation
    if method.is_lora:
        return TrainedCell(record, jax.jit(lora.merge)(frozen, trainable), trainable, spec)
    return TrainedCell(record, trainable, None, None)
