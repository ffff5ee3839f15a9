"""Where a study keeps its finished cells, so that a stopped run resumes where it left off."""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import lora_jax as lora
from lora_jax import checkpoint

__all__ = ["CellStore"]

# Fields that change what a cell computes; a store refuses to mix cells made under different values.
_IDENTITY = (
    "domains", "steps", "seq_len", "batch_size", "weight_decay", "warmup_steps", "eval_tokens", "humaneval_problems",
    "gen_tokens_code", "math_problems", "gen_tokens_math", "probes", "compute_dtype", "alpha", "seed",
    "intruder_top_k", "intruder_threshold", "analysis_layers",
)  # fmt: skip


class CellStore:
    """A directory of finished cells: one JSON record each (written atomically) and, for LoRA, the adapters.

    The adapters of each LoRA cell are saved with `lora_jax.checkpoint`, so
    any of them can be restored, evaluated again or exported to PEFT later.

    Args:
      directory: the store's directory (created if missing).
      config: the study's configuration as JSON (``StudyConfig.to_json()``);
        a store made under a configuration that differs in a field that
        changes results refuses to be reused.

    Raises:
      ValueError: the directory holds cells of a different configuration.
    """

    def __init__(self, directory: str | os.PathLike[str], config: dict[str, Any]) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        identity = json.loads(json.dumps({k: config[k] for k in _IDENTITY}))  # tuples read back as lists
        stamp = self.directory / "study_config.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text())
            diff = sorted(k for k in _IDENTITY if old.get(k) != identity[k])
            if diff:
                raise ValueError(
                    f"{str(self.directory)!r} holds cells of a study configured differently ({diff[0]}: "
                    f"{old.get(diff[0])!r} there, {identity[diff[0]]!r} now); use another output directory or "
                    "start afresh."
                )
        else:
            self._write(stamp, identity)

    @staticmethod
    def _write(path: pathlib.Path, value: Any) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(value, indent=1) + "\n")
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one

    def _path(self, cell_id: str) -> pathlib.Path:
        if not re.fullmatch(r"[\w.+-]+", cell_id):
            raise ValueError(f"cell id {cell_id!r} must be made of letters, digits, '.', '+', '-' and '_'.")
        return self.directory / f"{cell_id}.json"

    def has(self, cell_id: str) -> bool:
        """Whether the cell finished."""
        return self._path(cell_id).is_file()

    def load(self, cell_id: str) -> dict[str, Any]:
        """The finished cell's record."""
        return json.loads(self._path(cell_id).read_text())

    def save(self, cell_id: str, record: dict[str, Any]) -> None:
        """Stores a finished cell's record."""
        self._write(self._path(cell_id), record)

    def save_adapters(self, cell_id: str, adapters: Any, spec: lora.LoraSpec) -> pathlib.Path:
        """Saves a LoRA cell's trained adapters as a `lora_jax.checkpoint` checkpoint (step 0)."""
        path = self.directory / "adapters" / cell_id
        with checkpoint.CheckpointManager(path, max_to_keep=1) as manager:
            if 0 not in manager.all_steps():
                manager.save(0, adapters, spec=spec)
        return path
