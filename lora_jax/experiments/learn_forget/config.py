"""What a study run trains and measures: methods, learning-rate grids, sizes, presets."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DOMAINS", "PRESETS", "Method", "StudyConfig", "parse_methods"]

DOMAINS = ("code", "math")
"""``code``: continued pre-training on standard-library Python. ``math``:
instruction tuning on arithmetic word problems, loss on the answer only."""

_TARGETS = {
    "all": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
    "attn": r".*/(q_proj|k_proj|v_proj|o_proj)/kernel",
    "mlp": r".*/(gate_proj|up_proj|down_proj)/kernel",
}
_METHOD_RE = re.compile(r"^(full|lora(\d+)(?:-(attn|mlp))?)$")


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
      name: ``"full"``, ``"lora<r>"`` (all seven projections), ``"lora<r>-attn"``
        (q, k, v, o) or ``"lora<r>-mlp"`` (gate, up, down).
      rank: the LoRA rank, ``None`` for full fine-tuning.
      modules: ``"all"``, ``"attn"`` or ``"mlp"``.

    >>> m = parse_methods("lora16-attn")[0]
    >>> m.rank, m.modules, m.is_lora
    (16, 'attn', True)
    """

    name: str
    rank: int | None = None
    modules: str = "all"

    @property
    def is_lora(self) -> bool:
        """Whether the method trains low-rank adapters."""
        return self.rank is not None

    @property
    def targets(self) -> str:
        """The regex of the weights this method adapts (``LoraSpec.targets``)."""
        return _TARGETS[self.modules]

    def alpha(self, convention: str) -> float | None:
        """Alpha under a convention: ``"2r"`` (Biderman et al.) or a number such as ``"32"`` (Schulman et al.)."""
        if self.rank is None:
            return None
        return 2.0 * self.rank if convention == "2r" else float(convention)


def parse_methods(names: str | Sequence[str]) -> list[Method]:
    """Parses ``"full,lora16,lora16-attn"`` into methods.

    Raises:
      ValueError: an unknown or repeated name, a rank below 1, or no names.

    >>> [m.name for m in parse_methods("full, lora64")]
    ['full', 'lora64']
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    methods = []
    for name in names:
        match = _METHOD_RE.match(name)
        if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ValueError(
                f"unknown method {name!r}: use 'full', 'lora<rank>' (all seven projections), 'lora<rank>-attn' "
                "or 'lora<rank>-mlp', e.g. 'lora16-mlp'."
            )
        rank = int(match.group(2)) if match.group(2) else None
        methods.append(Method(name, rank, match.group(3) or "all"))
    if not methods:
        raise ValueError("no methods given; pass e.g. 'full,lora16'.")
    seen = [m.name for m in methods]
    if len(set(seen)) != len(seen):
        raise ValueError(f"methods must be distinct; got {seen}.")
    return methods


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One study: domains × methods × learning rates, and how much each cell trains and is measured on.

    Every cell (domain, method, learning rate) starts from the same base
    model and sees the same batches in the same order.

    Args:
      name: the preset's name, recorded in the results.
      domains: a subset of ``("code", "math")``.
      methods: method names (see `parse_methods`).
      learning_rates: ``{method name: (peak rates...)}``; a method missing
        here uses ``full_lrs`` or ``lora_lrs``.
      full_lrs: peak learning rates of full fine-tuning.
      lora_lrs: peak learning rates of every LoRA method.
      alpha: ``"2r"`` (alpha = 2·rank, Biderman et al.) or a fixed alpha such
        as ``"32"`` (Schulman et al.: alpha 32 and 1/r scaling).
      steps: optimiser steps per cell.
      seq_len: tokens per training row.
      batch_size: rows per step.
      weight_decay: AdamW's decoupled weight decay.
      warmup_steps: linear warm-up steps (cosine decay to a tenth follows).
      eval_tokens: tokens per held-out perplexity set (code, English).
      humaneval_problems: HumanEval problems scored (NLL of the canonical
        solution, and pass@1 when ``gen_tokens_code > 0``).
      gen_tokens_code: tokens generated per HumanEval problem (0: no pass@1).
      math_problems: held-out arithmetic problems scored by exact match.
      gen_tokens_math: tokens generated per arithmetic problem.
      probes: forgetting probes scored (0: all of them).
      eval_batch_size: rows per evaluation forward pass.
      compute_dtype: matmul and activation dtype; weights, adapters and
        optimiser state stay float32.
      intruder_top_k: singular vectors per matrix checked for intruders.
      intruder_threshold: a vector is an intruder if its best cosine
        similarity with the base's singular vectors is below this.
      analysis_layers: layers (evenly spaced) whose matrices get the
        intruder-dimension analysis; 0 for all of them.
      seed: seed of the data order and the adapter init.
      note: what this preset is for, printed and recorded.

    >>> StudyConfig(methods=("full", "lora16")).lrs_for(parse_methods("lora16")[0])
    (0.0005,)
    """

    name: str = "custom"
    domains: tuple[str, ...] = DOMAINS
    methods: tuple[str, ...] = ("full", "lora16")
    learning_rates: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    full_lrs: tuple[float, ...] = (5e-5,)
    lora_lrs: tuple[float, ...] = (5e-4,)
    alpha: str = "2r"
    steps: int = 20
    seq_len: int = 128
    batch_size: int = 4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    eval_tokens: int = 2048
    humaneval_problems: int = 20
    gen_tokens_code: int = 64
    math_problems: int = 40
    gen_tokens_math: int = 24
    probes: int = 0
    eval_batch_size: int = 8
    compute_dtype: str = "bfloat16"
    intruder_top_k: int = 10
    intruder_threshold: float = 0.5
    analysis_layers: int = 6
    seed: int = 0
    note: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.domains) - set(DOMAINS))
        if unknown or not self.domains:
            raise ValueError(f"StudyConfig.domains must be a non-empty subset of {DOMAINS}; got {self.domains!r}.")
        methods = parse_methods(self.methods)
        for name in self.learning_rates:
            if name not in self.methods:
                raise ValueError(f"StudyConfig.learning_rates has {name!r}, which is not in methods {self.methods}.")
        for m in methods:
            lrs = self.lrs_for(m)
            if not lrs or any(not lr > 0 for lr in lrs):
                raise ValueError(f"StudyConfig: the learning rates of {m.name} must be positive; got {lrs!r}.")
        for name in ("steps", "seq_len", "batch_size", "eval_tokens", "eval_batch_size", "intruder_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StudyConfig.{name} must be a positive integer; got {value!r}.")
        for name in ("humaneval_problems", "gen_tokens_code", "math_problems", "gen_tokens_math", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StudyConfig.{name} must be a non-negative integer; got {value!r}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"StudyConfig.warmup_steps must be in [0, steps={self.steps}); got {self.warmup_steps}.")
        if self.alpha != "2r":
            try:
                ok = float(self.alpha) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(
                    f"StudyConfig.alpha must be '2r' or a positive number such as '32'; got {self.alpha!r}."
                )
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"StudyConfig.compute_dtype must be 'float32' or 'bfloat16'; got {self.compute_dtype!r}.")

    def lrs_for(self, method: Method) -> tuple[float, ...]:
        """The learning rates swept for ``method``."""
        if method.name in self.learning_rates:
            return tuple(self.learning_rates[method.name])
        return tuple(self.lora_lrs if method.is_lora else self.full_lrs)

    def cells(self) -> list[tuple[str, Method, float]]:
        """Every (domain, method, learning rate) the study trains, in order: method by method, so that
        the cells of one method share its compiled training step."""
        return [(d, m, lr) for m in parse_methods(self.methods) for d in self.domains for lr in self.lrs_for(m)]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["learning_rates"] = {k: list(v) for k, v in self.learning_rates.items()}
        return out


PRESETS: dict[str, StudyConfig] = {
    "smoke": StudyConfig(
        name="smoke",
        methods=("full", "lora4"),
        full_lrs=(5e-3,),
        lora_lrs=(2e-2, 5e-2),
        steps=6,
        seq_len=192,
        batch_size=4,
        warmup_steps=1,
        eval_tokens=384,
        humaneval_problems=1,
        gen_tokens_code=8,
        math_problems=2,
        gen_tokens_math=6,
        probes=3,
        eval_batch_size=4,
        compute_dtype="float32",
        intruder_top_k=4,
        note="a tiny random model, for tests: no claims",
    ),
    "default": StudyConfig(
        name="default",
        methods=("full", "lora16"),
        full_lrs=(5e-5,),
        lora_lrs=(5e-4,),
        steps=16,
        humaneval_problems=10,
        gen_tokens_code=0,
        math_problems=32,
        analysis_layers=3,
        note=(
            "a subset of the grid that finishes in under 20 minutes on a 2-core CPU: one learning rate per "
            "method, so it makes no claim about best rates; run --preset long for the sweep"
        ),
    ),
    "long": StudyConfig(
        name="long",
        domains=("code",),
        methods=("full", "lora16", "lora16-mlp", "lora16-attn"),
        full_lrs=(2e-5, 5e-5, 1.5e-4),
        lora_lrs=(2e-4, 5e-4, 1.5e-3),
        steps=20,
        humaneval_problems=10,
        gen_tokens_code=0,
        math_problems=32,
        analysis_layers=3,
        note=(
            "the sweep that fits a 2-core CPU in under an hour: code only, three learning rates for full "
            "fine-tuning and for rank-16 LoRA on all projections, on the MLP only and on attention only; the "
            "math domain, ranks 1-256 and HumanEval pass@1 are in the gpu preset"
        ),
    ),
    "gpu": StudyConfig(
        name="gpu",
        methods=("full", "lora1", "lora4", "lora16", "lora64", "lora256", "lora16-attn", "lora16-mlp"),
        full_lrs=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4),
        lora_lrs=(1e-4, 2e-4, 5e-4, 1e-3, 2e-3),
        steps=500,
        seq_len=512,
        batch_size=16,
        warmup_steps=25,
        eval_tokens=32768,
        humaneval_problems=164,
        gen_tokens_code=256,
        math_problems=500,
        gen_tokens_math=32,
        eval_batch_size=32,
        analysis_layers=0,
        note="the full grid, for an accelerator",
    ),
}
