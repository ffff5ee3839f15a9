"""The study's data: training batches per domain and the held-out sets that measure learning and forgetting."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np

from lora_jax.experiments import data as data_lib
from lora_jax.experiments.learn_forget.config import StudyConfig

__all__ = ["Tasks", "prepare_tasks"]


@dataclasses.dataclass(frozen=True)
class Tasks:
    """Everything a study trains on and measures with, as token arrays and problem lists.

    Attributes:
      train: ``{domain: [batch, ...]}``, ``config.steps`` dicts of ``input_ids`` and
        ``loss_mask`` per domain, in the order every cell sees them.
      code_heldout: held-out standard-library modules (learning, code).
      english: held-out Shakespeare (forgetting, raw prose).
      humaneval: HumanEval problems (learning, code): ``prompt``,
        ``canonical_solution``, ``test``, ``entry_point``.
      math_heldout: held-out arithmetic problems (learning, math): ``prompt``,
        ``response``, ``answer``.
      sizes: what each set holds, for the results.
    """

    train: dict[str, list[dict[str, np.ndarray]]]
    code_heldout: data_lib.Packed
    english: data_lib.Packed
    humaneval: list[dict[str, Any]]
    math_heldout: list[dict[str, Any]]
    sizes: dict[str, Any]


def _spread_rows(packed: data_lib.Packed, tokens: int, seq_len: int, what: str) -> data_lib.Packed:
    """Evenly spaced rows summing to ``tokens``, so the set covers every document, not just the first."""
    want = max(1, math.ceil(tokens / seq_len))
    have = len(packed.input_ids)
    if have < want:
        raise ValueError(
            f"the held-out {what} split packs into only {have} rows of {seq_len} tokens, fewer than the {want} "
            f"that eval_tokens={tokens} needs; lower eval_tokens or seq_len."
        )
    index = np.linspace(0, have - 1, want).round().astype(int)
    return data_lib.Packed(packed.input_ids[index], packed.loss_mask[index])


def _stream(packed: data_lib.Packed, config: StudyConfig) -> list[dict[str, np.ndarray]]:
    if len(packed.input_ids) < config.batch_size:
        raise ValueError(
            f"the training data packs into {len(packed.input_ids)} rows, fewer than batch_size={config.batch_size}."
        )
    # epochs=None repeats with a fresh permutation per epoch, so a small pool still gives `steps` batches.
    stream = data_lib.batches(packed, batch_size=config.batch_size, shuffle=True, seed=config.seed, epochs=None)
    return [next(stream) for _ in range(config.steps)]


def prepare_tasks(
    tokenizer: data_lib.TokenizerLike,
    config: StudyConfig,
    *,
    train_documents: int | None = None,
    eval_documents: int | None = None,
) -> Tasks:
    """Builds the training batches and held-out sets of a study.

    - code: rows packed from the standard library's train modules
      (every token a target); held-out modules for perplexity; the first
      ``config.humaneval_problems`` HumanEval problems.
    - math: arithmetic word problems in the chat format with the loss on the
      answer only, packed several to a row; ``config.math_problems`` held-out
      problems (never in the training split).
    - English: held-out Shakespeare rows (forgetting of raw prose).

    Args:
      tokenizer: the model's tokenizer (``encode``, ``eos_token_id``,
        ``pad_token_id``, ``apply_chat_template``).
      config: sizes and seed.
      train_documents: use only this many training modules (a seeded choice).
      eval_documents: use only the first held-out documents (quick runs).

    Returns:
      The `Tasks`.

    Raises:
      ValueError: a split too small for the requested sizes.

    >>> tasks = prepare_tasks(load_smollm2_tokenizer(), PRESETS["default"])  # doctest: +SKIP
    """
    train: dict[str, list[dict[str, np.ndarray]]] = {}
    sizes: dict[str, Any] = {}
    if "code" in config.domains:
        texts = list(data_lib.python_code("train")["text"])
        if train_documents is not None:
            texts = random.Random(config.seed).sample(texts, min(train_documents, len(texts)))
        packed = data_lib.pack_texts(texts, tokenizer, seq_len=config.seq_len)
        train["code"] = _stream(packed, config)
        sizes["code_train_rows"] = len(packed.input_ids)
    if "math" in config.domains:
        # Enough distinct problems that a run rarely sees one twice.
        examples = data_lib.arithmetic("train", num_examples=max(256, 4 * config.steps * config.batch_size))
        packed = data_lib.pack_instructions(examples, tokenizer, seq_len=config.seq_len, on_overflow="drop")
        train["math"] = _stream(packed, config)
        sizes["math_train_rows"] = len(packed.input_ids)

    def heldout(rows: Any, what: str) -> data_lib.Packed:
        docs = list(rows["text"])[:eval_documents]
        return _spread_rows(data_lib.pack_texts(docs, tokenizer, seq_len=config.seq_len), config.eval_tokens,
                            config.seq_len, what)  # fmt: skip

    code_heldout = heldout(data_lib.python_code("heldout"), "Python code")
    english = heldout(data_lib.shakespeare("heldout"), "English prose")
    humaneval = []
    if "code" in config.domains and config.humaneval_problems:
        humaneval = [dict(r) for r in data_lib.humaneval(max_documents=config.humaneval_problems)]
    math_heldout = []
    if "math" in config.domains and config.math_problems:
        math_heldout = [dict(r) for r in data_lib.arithmetic("heldout", num_examples=config.math_problems)]
    sizes.update(
        code_eval_tokens=int(code_heldout.loss_mask[:, 1:].sum()),
        english_eval_tokens=int(english.loss_mask[:, 1:].sum()),
        humaneval_problems=len(humaneval),
        math_problems=len(math_heldout),
        train_tokens_per_cell=config.steps * config.batch_size * config.seq_len,
    )
    return Tasks(train, code_heldout, english, humaneval, math_heldout, sizes)
