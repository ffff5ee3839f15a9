"""LoRA learns less and forgets less (Biderman et al. 2024) on SmolLM2-135M, on a CPU or a GPU.

Trains SmolLM2-135M-Instruct on two target domains, Python code (continued
pre-training) and arithmetic word problems (instruction tuning, loss on the
answer), with full fine-tuning and with LoRA at several ranks and target sets,
each method at each of its learning rates. Measures learning on the target
domain (held-out perplexity, HumanEval NLL and pass@1, math exact match) and
forgetting on what the base model could do (chat probes it answered right,
Shakespeare perplexity), and compares the methods each at its best rate.

Writes ``results.json``, ``report.md`` and PNG plots to ``--out`` (default
``runs/<preset>``). Finished cells are kept in ``--out``/cells, so a stopped run
started again with the same command resumes where it left off.

    python examples/learn_forget.py                     # preset default: ~17 min on 2 CPU cores, no claims
    python examples/learn_forget.py --preset long       # the learning-rate sweep behind the README's results
    python examples/learn_forget.py --preset gpu        # the full grid, for an accelerator
    python examples/learn_forget.py --smoke             # a tiny random model, seconds (for tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any

# Quiet XLA's C++ logging before JAX is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lora_jax.experiments.learn_forget import (  # noqa: E402
    PRESETS,
    CellStore,
    format_report,
    parse_methods,
    plot_results,
    run_study,
)
from lora_jax.experiments.learn_forget.smoke import ByteTokenizer, tiny_model  # noqa: E402


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda steps, desc: tqdm(steps, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the study and returns its results (also written to ``--out``).

    >>> results = main(["--smoke", "--out", "/tmp/learn_forget"])  # doctest: +SKIP
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--smoke", action="store_true", help="the smoke preset on a tiny random model (for tests)")
    p.add_argument("--methods", help="override the preset's methods, e.g. full,lora16,lora16-mlp")
    p.add_argument("--domains", help="override the preset's domains: code, math or code,math")
    p.add_argument("--steps", type=int, help="override the preset's steps per cell")
    p.add_argument("--out", help="output directory (default runs/<preset>)")
    p.add_argument("--fresh", action="store_true", help="discard finished cells in --out and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    config = PRESETS["smoke" if args.smoke else args.preset]
    changes: dict[str, Any] = {}
    if args.methods:
        try:
            changes["methods"] = tuple(m.name for m in parse_methods(args.methods))
        except ValueError as e:
            p.error(str(e))
        changes["learning_rates"] = {k: v for k, v in config.learning_rates.items() if k in changes["methods"]}
    if args.domains:
        changes["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    if args.steps:
        changes["steps"] = args.steps
    if changes:
        try:
            config = dataclasses.replace(config, **changes, name=f"{config.name}+custom")
        except ValueError as e:
            p.error(str(e))
    out = pathlib.Path(args.out or f"runs/{config.name}")
    if args.fresh:
        shutil.rmtree(out / "cells", ignore_errors=True)

    start = time.perf_counter()
    if args.smoke:
        model_config, params = tiny_model()
        tokenizer, name = ByteTokenizer(), "tiny random Llama (byte tokenizer)"
        documents = {"train_documents": 8, "eval_documents": 4}
    else:
        import jax.numpy as jnp

        from lora_jax.models import load_smollm2, load_smollm2_tokenizer

        # Float32 master weights; the matmuls run in config.compute_dtype.
        model_config, params = load_smollm2(scan_layers=True, dtype=jnp.float32)
        tokenizer, name, documents = load_smollm2_tokenizer(), "SmolLM2-135M-Instruct", {}
    cells = config.cells()
    print(f"{name}, preset {config.name}: {len(cells)} cells ({', '.join(config.domains)} × {', '.join(config.methods)}"
          f"), {config.steps} steps × {config.batch_size} × {config.seq_len} tokens each.")  # fmt: skip
    if config.note:
        print(f"({config.note})")
    store = CellStore(out / "cells", config.to_json())
    results = run_study(
        config, model_config, params, tokenizer, store=store, model_name=name,
        progress=_progress(not args.no_progress), **documents,
    )  # fmt: skip
    results["command_wall_seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    text = format_report(results)
    (out / "report.md").write_text(text)
    plots = plot_results(results, out)
    print(text)
    print(f"wall time {results['command_wall_seconds']:.0f} s; wrote {out / 'results.json'}, {out / 'report.md'}, "
          + ", ".join(p.name for p in plots))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
