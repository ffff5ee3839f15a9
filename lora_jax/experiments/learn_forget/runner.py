"""Runs a study: the base model's scores, then every cell, each trained from the base and measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lora
from lora_jax.experiments import probes
from lora_jax.experiments.learn_forget import report, spectra
from lora_jax.experiments.learn_forget.config import Method, StudyConfig
from lora_jax.experiments.learn_forget.evaluate import Evaluator
from lora_jax.experiments.learn_forget.store import CellStore
from lora_jax.experiments.learn_forget.tasks import prepare_tasks
from lora_jax.experiments.learn_forget.train import train_cell
from lora_jax.models import LlamaConfig, LlamaForCausalLM

__all__ = ["cell_id", "run_study"]

PyTree = Any
_ALL_PROJECTIONS = Method("lora1", 1, "all").targets


def cell_id(domain: str, method: Method, learning_rate: float) -> str:
    """A cell's name, e.g. ``code-lora16-attn-lr1.5e-04`` (two significant digits of the rate).

    >>> cell_id("code", Method("lora16", 16), 5e-4)
    'code-lora16-lr5.0e-04'
    """
    return f"{domain}-{method.name}-lr{learning_rate:.1e}"


def _spaced(count: int, total: int) -> list[int] | None:
    if count == 0 or count >= total:
        return None
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})


def run_study(
    config: StudyConfig,
    model_config: LlamaConfig,
    params: PyTree,
    tokenizer: Any,
    *,
    store: CellStore | None = None,
    model_name: str = "model",
    train_documents: int | None = None,
    eval_documents: int | None = None,
    progress: Callable[[Iterable[int], str], Iterable[int]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs every cell of ``config`` (domain × method × learning rate) and returns the results.

    Every cell starts from ``params`` and sees the same batches. After
    training, each cell is measured on its domain (learning) and on the
    forgetting probes and Shakespeare (forgetting); its matrices' intruder
    dimensions are counted, and for full fine-tuning the rank of its update.
    With a ``store``, finished cells are kept there as they complete and
    skipped when the study runs again, so a stopped run resumes.

    Args:
      config: the study.
      model_config: the model's configuration (its compute dtype is replaced
        by ``config.compute_dtype``).
      params: float32 pretrained parameters; not modified.
      tokenizer: the model's tokenizer.
      store: where finished cells go, or ``None`` to keep nothing.
      model_name: recorded in the results.
      train_documents: passed to `prepare_tasks`.
      eval_documents: passed to `prepare_tasks`.
      progress: wraps each cell's step range, e.g. in a progress bar.
      log: where progress lines go (default: printed at once).

    Returns:
      ``model``, ``config``, ``data`` (sizes), ``base`` (the base model's
      scores), ``cells`` (one record per cell), ``summary`` (best learning
      rate per method and the comparisons, see `report.summarise`),
      ``total_params`` and ``wall_seconds``.

    Raises:
      ValueError: ``params`` are not float32, or the data is too small.

    >>> results = run_study(PRESETS["default"], *load_smollm2(scan_layers=True), tok)  # doctest: +SKIP
    """
    start = time.perf_counter()
    log = log or (lambda line: print(line, flush=True))
    dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
    if dtypes != {"float32"}:
        raise ValueError(
            f"run_study: `params` must be float32 (got {sorted(dtypes)}); choose the matmul precision with "
            "StudyConfig.compute_dtype."
        )
    model = LlamaForCausalLM(model_config.replace(dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32))
    tasks = prepare_tasks(tokenizer, config, train_documents=train_documents, eval_documents=eval_documents)
    probe_set = probes.load_probes()
    probe_set = probe_set[: config.probes] if config.probes else probe_set
    evaluator = Evaluator(model, tokenizer, config, tasks, probe_set)

    if store is not None and store.has("base"):
        base = store.load("base")
        correct = base["forgetting"].get("probe_correct", [])
        evaluator.kept = [i for i, c in enumerate(correct) if c]
        log("base model: scores from the store")
    else:
        log("base model: scoring")
        t0 = time.perf_counter()
        base = {
            "learning": {d: evaluator.learning(params, d) for d in config.domains},
            "forgetting": evaluator.forgetting(params),
        }
        base["seconds"] = time.perf_counter() - t0
        log(f"base model: scored in {base['seconds']:.0f} s")
        if store is not None:
            store.save("base", base)

    # The seven projections of every layer with their layouts, from a throw-away rank-1 split.
    sample = jnp.asarray(next(iter(tasks.train.values()))[0]["input_ids"][:1])
    _, layouts = lora.split(
        params, lora.LoraSpec(rank=1, targets=_ALL_PROJECTIONS), key=jax.random.key(0),
        trace=lambda p: model.apply(p, sample),
    )  # fmt: skip
    layers = _spaced(config.analysis_layers, model_config.num_hidden_layers)

    cells = []
    todo = config.cells()
    for n, (domain, method, lr) in enumerate(todo, 1):
        cid = cell_id(domain, method, lr)
        if store is not None and store.has(cid):
            cells.append(store.load(cid))
            log(f"[{n}/{len(todo)}] {cid}: from the store")
            continue
        t0 = time.perf_counter()
        trained = train_cell(
            method, lr, tasks.train[domain], model=model, params=params, config=config, progress=progress
        )
        record = {"id": cid, "domain": domain, **trained.record}
        record["learning"] = evaluator.learning(trained.params, domain)
        record["forgetting"] = evaluator.forgetting(trained.params)
        record["forgetting"].pop("probe_correct", None)
        intruders = spectra.intruder_records(
            params, trained.params, layouts, top_k=config.intruder_top_k, threshold=config.intruder_threshold,
            layers=layers,
        )  # fmt: skip
        record["intruders"] = spectra.summarise(intruders, "intruders")
        if not method.is_lora:
            ranks = spectra.update_spectra(params, trained.params, layouts, fraction=0.9)
            record["update_rank"] = {**spectra.summarise(ranks, "rank"), "per_matrix": ranks}
        record["cell_seconds"] = time.perf_counter() - t0
        if store is not None:
            if trained.adapters is not None:
                store.save_adapters(cid, trained.adapters, trained.spec)
            store.save(cid, record)
        cells.append(record)
        log(f"[{n}/{len(todo)}] {cid}: {report.one_line(record)} ({record['cell_seconds']:.0f} s)")
        del trained

    results: dict[str, Any] = {
        "model": model_name,
        "config": config.to_json(),
        "data": tasks.sizes,
        "probes_scored": len(probe_set),
        "probes_base_correct": len(evaluator.kept or []),
        "total_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "base": base,
        "cells": cells,
    }
    results["summary"] = report.summarise(results)
    results["wall_seconds"] = time.perf_counter() - start
    return results
