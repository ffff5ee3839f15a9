"""Reading a study's results: best learning rates, the comparisons both papers make, tables and plots."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["format_report", "one_line", "plot_results", "summarise"]

# The learning metric that picks each method's best learning rate, per domain, and which way is better.
LEARNING = {"code": ("code_ppl", "min"), "math": ("math_accuracy", "max")}


def _learning_key(cell: Mapping[str, Any]) -> tuple[float, ...]:
    """Sort key: smaller is better (math accuracy ties are broken by the answers' NLL)."""
    learn = cell["learning"]
    if cell["domain"] == "code":
        return (learn["code_ppl"],)
    return (-learn["math_accuracy"], learn["math_answer_nll"])


def _forgetting(f: Mapping[str, Any]) -> float:
    """The forgetting measure the comparisons use: the share of the probes the base model answered right
    that are now answered wrong (English perplexity when there are no such probes). Higher is more forgetting.

    The share lost is the direct measure of a lost skill. The NLL of the reference answers is reported
    beside it but not used here: training can make the model more confident on short answers in
    general, lowering that NLL while answers flip.
    """
    return 1.0 - f["probe_retained"] if f.get("probe_retained") is not None else f["english_ppl"]


def one_line(cell: Mapping[str, Any]) -> str:
    """A cell's numbers on one line."""
    parts = [f"{k} {v:.3g}" for k, v in cell["learning"].items() if v is not None]
    parts += [f"{k} {v:.3g}" for k, v in cell["forgetting"].items() if isinstance(v, float)]
    return ", ".join(parts)


def summarise(results: Mapping[str, Any]) -> dict[str, Any]:
    """Each method at its best learning rate, and what the papers compare.

    - ``best``: ``{domain: [{method, learning_rate, cell_id, learning, forgetting, ...}]}``,
      the cell with the best learning metric (lowest held-out code
      perplexity; highest math accuracy) per method.
    - ``lr_ratio``: ``{domain: {method: best LoRA rate / best full rate}}``.
    - ``best_lr_by_rank``: ``{domain: {rank: best rate}}`` for LoRA on all projections.
    - ``versus_full``: per domain and LoRA method, at each one's best rate:
      the change of the learning metric and of forgetting against full
      fine-tuning; and at matched learning, against the full fine-tuning cell
      (any rate) whose learning metric is closest.
    - ``sweep_complete``: whether every method had at least three rates.

    >>> summary = summarise(run_study(PRESETS["long"], config, params, tok))  # doctest: +SKIP
    >>> summary["lr_ratio"]["code"]["lora16"]  # doctest: +SKIP
    10.0
    """
    cells = results["cells"]
    config = results["config"]
    base = results["base"]
    best: dict[str, list[dict[str, Any]]] = {}
    lr_ratio: dict[str, dict[str, float]] = {}
    by_rank: dict[str, dict[str, float]] = {}
    versus: dict[str, dict[str, Any]] = {}
    for domain in config["domains"]:
        rows = []
        for method in config["methods"]:
            mine = [c for c in cells if c["domain"] == domain and c["method"] == method]
            if not mine:
                continue
            top = min(mine, key=_learning_key)
            rows.append(
                {
                    "method": method,
                    "rank": top["rank"],
                    "modules": top["modules"],
                    "learning_rate": top["learning_rate"],
                    "rates_tried": sorted(c["learning_rate"] for c in mine),
                    "cell_id": top["id"],
                    "trainable_params": top["trainable_params"],
                    "learning": top["learning"],
                    "forgetting": top["forgetting"],
                    "intruders_mean": top["intruders"]["mean"],
                    "median_step_seconds": top["median_step_seconds"],
                }
            )
        best[domain] = rows
        full = next((r for r in rows if r["method"] == "full"), None)
        key, direction = LEARNING[domain]
        if full is not None:
            lr_ratio[domain] = {
                r["method"]: r["learning_rate"] / full["learning_rate"] for r in rows if r["method"] != "full"
            }
            fulls = [c for c in cells if c["domain"] == domain and c["method"] == "full"]
            versus[domain] = {}
            for r in rows:
                if r["method"] == "full":
                    continue
                matched = min(fulls, key=lambda c: abs(c["learning"][key] - r["learning"][key]))
                versus[domain][r["method"]] = {
                    "learning_change": r["learning"][key] - full["learning"][key],
                    "learns_less": (r["learning"][key] > full["learning"][key])
                    if direction == "min"
                    else (r["learning"][key] < full["learning"][key]),
                    "forgetting_change": _forgetting(r["forgetting"]) - _forgetting(full["forgetting"]),
                    "forgets_less": _forgetting(r["forgetting"]) < _forgetting(full["forgetting"]),
                    "matched_full_cell": matched["id"],
                    "matched_learning_gap": r["learning"][key] - matched["learning"][key],
                    "forgetting_change_at_matched_learning": _forgetting(r["forgetting"])
                    - _forgetting(matched["forgetting"]),
                }
        by_rank[domain] = {
            str(r["rank"]): r["learning_rate"] for r in rows if r["rank"] is not None and r["modules"] == "all"
        }
    rates = [len(r["rates_tried"]) for rows in best.values() for r in rows]
    return {
        "best": best,
        "lr_ratio": lr_ratio,
        "best_lr_by_rank": by_rank,
        "versus_full": versus,
        "sweep_complete": bool(rates) and min(rates) >= 3,
        "base_forgetting": _forgetting(base["forgetting"]),
    }


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def format_report(results: Mapping[str, Any]) -> str:
    """The study's tables as Markdown (what ``report.md`` holds).

    >>> pathlib.Path("report.md").write_text(format_report(results))  # doctest: +SKIP
    """
    cfg, summary, base = results["config"], results["summary"], results["base"]
    out = [
        f"# LoRA learns less and forgets less: {results['model']}, preset `{cfg['name']}`",
        "",
        f"{cfg['note']}." if cfg["note"] else "",
        "",
        f"- {cfg['steps']} steps × {cfg['batch_size']} × {cfg['seq_len']} tokens per cell, AdamW "
        f"(weight decay {cfg['weight_decay']}), {cfg['warmup_steps']} warm-up steps, cosine decay to a tenth; "
        f"compute in {cfg['compute_dtype']} with float32 weights.",
        f"- LoRA alpha: {'2·rank (Biderman et al.)' if cfg['alpha'] == '2r' else cfg['alpha'] + ' (fixed)'}.",
        f"- Forgetting probes: {results['probes_scored']} scored, {results['probes_base_correct']} answered right by "
        "the base model (accuracy after training is over those).",
        '- Forgetting in the comparisons ("forgets less", "forgetting Δ"): the share of those probes answered '
        "wrong after training. The NLL of their reference answers and Shakespeare perplexity are reported beside it.",
        f"- Wall time: {_fmt(results.get('wall_seconds'), '.0f')} s.",
        "",
    ]
    f0 = base["forgetting"]
    out += [
        "## Base model",
        "",
        "| | " + " | ".join(sorted({k for v in base["learning"].values() for k in v})) + " | probe NLL | probe acc | "
        "English ppl |",
    ]
    keys = sorted({k for v in base["learning"].values() for k in v})
    out.append("|" + "---|" * (len(keys) + 4))
    merged = {k: v for d in base["learning"].values() for k, v in d.items()}
    out.append(
        "| base | " + " | ".join(_fmt(merged.get(k)) for k in keys)
        + f" | {_fmt(f0.get('probe_nll'))} | {_fmt(f0.get('probe_accuracy'))} | {_fmt(f0['english_ppl'])} |"
    )  # fmt: skip
    for domain, rows in summary["best"].items():
        learn_keys = list(rows[0]["learning"]) if rows else []
        out += [
            "",
            f"## {domain}: each method at its best learning rate",
            "",
            "| method | trainable | best lr (of) | " + " | ".join(learn_keys)
            + " | probe NLL | probes retained | English ppl | intruders / matrix | step s |",
            "|" + "---|" * (len(learn_keys) + 8),
        ]  # fmt: skip
        for r in rows:
            f = r["forgetting"]
            out.append(
                f"| {r['method']} | {r['trainable_params']:,} | {r['learning_rate']:.2g} ({len(r['rates_tried'])}) | "
                + " | ".join(_fmt(r["learning"].get(k)) for k in learn_keys)
                + f" | {_fmt(f.get('probe_nll'))} | {_fmt(f.get('probe_retained'))} | {_fmt(f['english_ppl'])} | "
                f"{_fmt(r['intruders_mean'], '.2f')} | {_fmt(r['median_step_seconds'], '.2f')} |"
            )
        versus = summary["versus_full"].get(domain)
        if versus:
            out += ["", "| LoRA method | best lr / full's | learns less | forgets less | forgetting Δ at matched "
                    "learning (vs) |", "|---|---|---|---|---|"]  # fmt: skip
            for name, v in versus.items():
                out.append(
                    f"| {name} | {summary['lr_ratio'][domain][name]:.3g}× | {v['learns_less']} | {v['forgets_less']} "
                    f"| {v['forgetting_change_at_matched_learning']:+.4f} ({v['matched_full_cell']}) |"
                )
    out += ["", "## Every cell", "", "| cell | learning | forgetting | intruders / matrix |", "|---|---|---|---|"]
    for c in results["cells"]:
        learn = ", ".join(f"{k} {_fmt(v)}" for k, v in c["learning"].items())
        forget = ", ".join(f"{k} {_fmt(v)}" for k, v in c["forgetting"].items() if not isinstance(v, list))
        out.append(f"| {c['id']} | {learn} | {forget} | {_fmt(c['intruders']['mean'], '.2f')} |")
    fulls = [c for c in results["cells"] if "update_rank" in c]
    if fulls:
        out += ["", "## Rank of full fine-tuning's update (90% of the variance)", ""]
        for c in fulls:
            u = c["update_rank"]
            by_module = ", ".join(f"{k} {v:.0f}" for k, v in u["median_by_module"].items())
            out.append(
                f"- {c['id']}: median {u['median']:.0f}, mean {u['mean']:.1f}, range {u['min']}–{u['max']} over "
                f"{u['num_matrices']} matrices; median by projection: {by_module}."
            )
    return "\n".join(out) + "\n"


_COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]


def plot_results(results: Mapping[str, Any], directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes ``learn_forget.png`` (learning vs forgetting, every cell, best rates marked),
    ``lr_sweep.png`` (learning against learning rate per method) and, when full fine-tuning
    ran, ``spectra.png`` (rank of its update by projection; intruder dimensions per method).

    Returns:
      The paths written.

    >>> [p.name for p in plot_results(results, "runs/long")]  # doctest: +SKIP
    ['learn_forget.png', 'lr_sweep.png', 'spectra.png']
    """
    from matplotlib.figure import Figure

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg, cells, base, summary = results["config"], results["cells"], results["base"], results["summary"]
    colors = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(cfg["methods"])}
    domains = cfg["domains"]
    forget_label = (
        "probes lost: share of base's right answers\nnow wrong (higher = forgot more)"
        if base["forgetting"].get("probe_retained") is not None
        else "English perplexity (higher = forgot more)"
    )
    paths = []

    fig = Figure(figsize=(5.6 * len(domains), 4.6), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains):
        key, direction = LEARNING[domain]
        ax.scatter([base["learning"][domain][key]], [_forgetting(base["forgetting"])], color="black", zorder=4,
                   label="base model")  # fmt: skip
        for method in cfg["methods"]:
            mine = [c for c in cells if c["domain"] == domain and c["method"] == method]
            if not mine:
                continue
            xs = [c["learning"][key] for c in mine]
            ys = [_forgetting(c["forgetting"]) for c in mine]
            ax.scatter(xs, ys, color=colors[method], alpha=0.35, s=18)
            top = next(r for r in summary["best"][domain] if r["method"] == method)
            ax.scatter([top["learning"][key]], [_forgetting(top["forgetting"])], color=colors[method], s=70,
                       edgecolor="black", zorder=3, label=f"{method} (best lr {top['learning_rate']:.2g})")  # fmt: skip
        better = "lower" if direction == "min" else "higher"
        ax.set_xlabel(f"{key} ({better} = learned more)")
        ax.set_ylabel(forget_label)
        ax.set_title(f"{domain}: learning vs forgetting (big: best rate)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['model']}, preset {cfg['name']}: {cfg['steps']} steps × {cfg['batch_size']} × "
                 f"{cfg['seq_len']} tokens per cell", fontsize=10)  # fmt: skip
    paths.append(directory / "learn_forget.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(5.6 * len(domains), 4.2), layout="constrained")
    axes = fig.subplots(1, len(domains), squeeze=False)[0]
    for ax, domain in zip(axes, domains):
        key, _ = LEARNING[domain]
        for method in cfg["methods"]:
            mine = sorted((c for c in cells if c["domain"] == domain and c["method"] == method),
                          key=lambda c: c["learning_rate"])  # fmt: skip
            if mine:
                ax.plot([c["learning_rate"] for c in mine], [c["learning"][key] for c in mine], "-o",
                        color=colors[method], label=method, markersize=4)  # fmt: skip
        ax.axhline(base["learning"][domain][key], color="black", linestyle=":", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(key)
        ax.set_title(f"{domain}: learning-rate sweep")
        ax.legend(fontsize=7)
    paths.append(directory / "lr_sweep.png")
    fig.savefig(paths[-1], dpi=120)

    by_id = {c["id"]: c for c in cells}
    fulls = [by_id[r["cell_id"]] for rows in summary["best"].values() for r in rows if r["method"] == "full"]
    if fulls:
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        ax, ax2 = fig.subplots(1, 2)
        u = fulls[0]["update_rank"]
        modules = list(u["median_by_module"])
        ax.bar(modules, [u["median_by_module"][m] for m in modules], color="tab:red",
               label=f"full FT ΔW, 90%-variance rank ({fulls[0]['id']})")  # fmt: skip
        for method in cfg["methods"]:
            rank = next((c["rank"] for c in cells if c["method"] == method and c["rank"]), None)
            if rank:
                ax.axhline(rank, color=colors[method], linestyle="--", label=f"{method} rank")
        ax.set_ylabel("rank (median over layers)")
        ax.set_title("Rank of full fine-tuning's update")
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize=7)
        labels, values, cols = [], [], []
        for domain, rows in summary["best"].items():
            for r in rows:
                labels.append(f"{domain}\n{r['method']}")
                values.append(r["intruders_mean"])
                cols.append(colors[r["method"]])
        ax2.bar(labels, values, color=cols)
        ax2.set_ylim(0, max(1.0, 1.2 * max(values, default=0.0)))  # a row of zeros still reads as zero
        ax2.set_ylabel(f"intruder dimensions per matrix (of top {cfg['intruder_top_k']})")
        ax2.set_title("Intruder dimensions at each method's best rate")
        ax2.tick_params(axis="x", labelsize=7)
        paths.append(directory / "spectra.png")
        fig.savefig(paths[-1], dpi=120)
    return paths
