"""LoRA learns less and forgets less: the study of Biderman et al. (2024), with the checks of Schulman et al. (2025).

Two target domains, each trained from the same base model by every method
at each of its learning rates (a *cell* per domain, method and rate):

- **code**: continued pre-training on standard-library Python; learning is
  held-out code perplexity, the NLL of HumanEval's canonical solutions and
  HumanEval pass@1 (executed);
- **math**: instruction tuning on arithmetic word problems with the loss on
  the answer only; learning is exact-match accuracy on held-out problems.

Forgetting is measured on what the base model could do before: short chat
questions it answered right (the NLL of the reference answers and the
fraction still answered right), and Shakespeare perplexity beside it.
Methods are compared each at its best learning rate, as both papers do.

Modules: `config` (methods, learning-rate grids, presets), `tasks` (data),
`train` (one cell), `evaluate` (learning and forgetting), `spectra` (update
ranks, intruder dimensions), `runner` (the study, resumable through a
`store.CellStore`), `report` (best rates, tables, plots), `smoke` (a tiny
model for tests). Only the public API of lora_jax is used.

References:
  Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
  Schulman et al., "LoRA Without Regret", Thinking Machines Lab, 2025.
  Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024.
"""

from lora_jax.experiments.learn_forget.config import DOMAINS, PRESETS, Method, StudyConfig, parse_methods
from lora_jax.experiments.learn_forget.report import format_report, plot_results, summarise
from lora_jax.experiments.learn_forget.runner import cell_id, run_study
from lora_jax.experiments.learn_forget.spectra import intruder_records, update_spectra
from lora_jax.experiments.learn_forget.store import CellStore

__all__ = [
    "DOMAINS",
    "PRESETS",
    "CellStore",
    "Method",
    "StudyConfig",
    "cell_id",
    "format_report",
    "intruder_records",
    "parse_methods",
    "plot_results",
    "run_study",
    "summarise",
    "update_spectra",
]
