"""Learning and forgetting, measured on plain parameters (a merged LoRA model or a fine-tuned one)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.experiments import data as data_lib
from lora_jax.experiments import execution, probes, scoring
from lora_jax.experiments.learn_forget.config import StudyConfig
from lora_jax.experiments.learn_forget.tasks import Tasks
from lora_jax.models import LlamaForCausalLM, generate_many

__all__ = ["Evaluator"]

PyTree = Any


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class Evaluator:
    """Scores parameters on every held-out set of a study; compiled functions are shared by all cells.

    Learning, per domain:

    - code: perplexity of held-out standard-library modules; the NLL (nats
      per token) of HumanEval's canonical solutions given their prompts; and
      HumanEval pass@1 of greedy completions, executed against the problem's
      tests in a guarded subprocess.
    - math: exact-match accuracy of greedy answers to held-out arithmetic
      problems, and the NLL of the reference answers.

    Forgetting: the NLL of the probe set's reference answers under the chat
    template, the fraction of the probes the base model answered right that
    are still answered right, and Shakespeare perplexity.

    Args:
      model: the Llama, with the study's compute dtype.
      tokenizer: its tokenizer.
      config: the study's sizes.
      tasks: the held-out sets.
      probe_set: the forgetting probes to score.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Any,
        config: StudyConfig,
        tasks: Tasks,
        probe_set: Sequence[probes.Probe],
    ) -> None:
        self.model, self.tokenizer, self.config, self.tasks = model, tokenizer, config, tasks
        self.probes = list(probe_set)
        self.kept: list[int] | None = None  # indices of the probes the base model answers right

        @jax.jit
        def nll_rows(params: PyTree, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = model.apply(params, ids)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
            m = mask[:, 1:].astype(jnp.float32)
            return (nll * m).sum(-1), m.sum(-1)

        self._nll_rows = nll_rows

    # -- building blocks ------------------------------------------------------------------------

    def _rows_nll(self, params: PyTree, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row summed NLL and target counts, in fixed-size batches (one compile per row length)."""
        b = self.config.eval_batch_size
        sums, counts = [], []
        for start in range(0, len(ids), b):
            chunk_ids, chunk_mask = ids[start : start + b], mask[start : start + b]
            pad = b - len(chunk_ids)
            if pad:
                chunk_ids = np.concatenate([chunk_ids, np.repeat(chunk_ids[:1], pad, 0)])
                chunk_mask = np.concatenate([chunk_mask, np.zeros((pad, chunk_mask.shape[1]), chunk_mask.dtype)])
            s, c = self._nll_rows(params, chunk_ids, chunk_mask)
            sums.append(np.asarray(s)[: b - pad])
            counts.append(np.asarray(c)[: b - pad])
        return np.concatenate(sums), np.concatenate(counts)

    def perplexity(self, params: PyTree, packed: data_lib.Packed) -> float:
        """``exp`` of the mean NLL per target token."""
        sums, counts = self._rows_nll(params, packed.input_ids, packed.loss_mask)
        return math.exp(float(sums.sum()) / float(counts.sum()))

    def completion_nll(self, params: PyTree, pairs: Sequence[tuple[list[int], list[int]]]) -> float:
        """Mean NLL per token of each completion given its prompt (teacher forcing), over all completions."""
        length = _round_up(max(len(p) + len(c) for p, c in pairs), 64)
        ids = np.full((len(pairs), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(pairs), length), np.float32)
        for i, (p, c) in enumerate(pairs):
            ids[i, : len(p) + len(c)] = [*p, *c]
            mask[i, len(p) : len(p) + len(c)] = 1.0
        sums, counts = self._rows_nll(params, ids, mask)
        return float(sums.sum() / counts.sum())

    def greedy(self, params: PyTree, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts, decoded."""
        tokens = generate_many(
            self.model, params, prompts, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, batch_size=max(self.config.eval_batch_size, 16),
            length_multiple=32,
        )  # fmt: skip
        return [self.tokenizer.decode(t) for t in tokens]

    # -- the measurements ---------------------------------------------------------------------------

    def learning(self, params: PyTree, domain: str) -> dict[str, Any]:
        """The target domain's metrics (see the class docstring)."""
        tok, cfg = self.tokenizer, self.config
        if domain == "code":
            out: dict[str, Any] = {"code_ppl": self.perplexity(params, self.tasks.code_heldout)}
            problems = self.tasks.humaneval
            if problems:
                pairs = [(tok.encode(p["prompt"]), tok.encode(p["canonical_solution"])) for p in problems]
                out["humaneval_nll"] = self.completion_nll(params, pairs)
                if cfg.gen_tokens_code:
                    texts = self.greedy(params, [tok.encode(p["prompt"]) for p in problems], cfg.gen_tokens_code)
                    completions = [execution.truncate_completion(t) for t in texts]
                    result = execution.pass_at_1(problems, completions)
                    out["pass_at_1"] = float(result["pass_at_1"])
            return out
        if domain == "math":
            problems = self.tasks.math_heldout
            prompts = [
                tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=True) for p in problems
            ]
            answers = [int(p["answer"]) for p in problems]
            pairs = [(list(pr), [*tok.encode(p["response"]), tok.eos_token_id]) for pr, p in zip(prompts, problems)]
            texts = self.greedy(params, prompts, cfg.gen_tokens_math)
            return {
                "math_accuracy": float(scoring.math_accuracy(texts, answers)),
                "math_answer_nll": self.completion_nll(params, pairs),
            }
        raise ValueError(f"unknown domain {domain!r}")

    def forgetting(self, params: PyTree) -> dict[str, Any]:
        """Forgetting: on the probes the base model answers right, the NLL of their reference answers
        (``probe_nll``) and the fraction still answered right (``probe_retained``); Shakespeare perplexity.

        The first call scores the base model: it answers every probe, and the
        ones it gets right are kept for every later call (its ``probe_nll_all``
        and ``probe_accuracy`` are over all of them).
        """
        out: dict[str, Any] = {"english_ppl": self.perplexity(params, self.tasks.english)}
        if not self.probes:
            return out
        batch = max(self.config.eval_batch_size, 16)
        if self.kept is None:  # the base model
            answers = probes.greedy_answers(self.model, params, self.tokenizer, self.probes, batch_size=batch)
            correct = [probes.is_correct(a, p) for a, p in zip(answers, self.probes)]
            self.kept = [i for i, c in enumerate(correct) if c]
            nll = probes.answer_nll(self.model.apply, params, self.tokenizer, self.probes, batch_size=batch)
            out["probe_correct"] = correct
            out["probe_accuracy"] = float(np.mean(correct))
            out["probe_nll_all"] = float(np.mean(nll))
            out["probe_nll"] = float(np.mean(nll[self.kept])) if self.kept else None
            out["probe_retained"] = 1.0 if self.kept else None
            return out
        kept = [self.probes[i] for i in self.kept]
        if not kept:
            return {**out, "probe_nll": None, "probe_retained": None}
        nll = probes.answer_nll(self.model.apply, params, self.tokenizer, kept, batch_size=batch)
        answers = probes.greedy_answers(self.model, params, self.tokenizer, kept, batch_size=batch)
        out["probe_nll"] = float(np.mean(nll))
        out["probe_retained"] = float(np.mean([probes.is_correct(a, p) for a, p in zip(answers, kept)]))
        return out
