"""Short chat questions that measure what fine-tuning makes a chat model forget.

SmolLM2-135M-Instruct's "source skill" is answering short questions in its
chat format. The packaged probe set (``probes.jsonl``, next to this module)
holds short factual questions with short reference answers: geography,
science, arithmetic facts, opposites, word forms, colours, animals, units,
history and everyday knowledge. Two measurements come out of it:

* **accuracy**: greedy generation, exact match after :func:`normalize`
  (:func:`is_correct`); the study keeps the probes the base model gets right
  and counts how many a fine-tuned model still gets right;
* **answer NLL**: the mean negative log-likelihood per token of the
  reference answer and the end-of-turn token under teacher forcing
  (:func:`answer_nll`), a continuous signal that moves before accuracy does.

The prompt (:func:`prompt_ids`) is the tokenizer's chat template, its
default system prompt included: the three fixed question/answer turns of
:data:`EXAMPLES`, then the probe's question as the last user turn, each
question followed by :data:`INSTRUCTION`, then the assistant header. A
135M-parameter chat model ignores an instruction alone and restates the
question ("The capital of France is Paris."); after a few terse turns it
answers tersely, so exact match measures knowledge rather than phrasing, and
the reference answer is the continuation the base model itself prefers.

References:
    Biderman et al., "LoRA Learns Less and Forgets Less", TMLR 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.generate import generate_many
from lora_jax.models.llama import LlamaForCausalLM

__all__ = [
    "EXAMPLES",
    "INSTRUCTION",
    "Probe",
    "answer_nll",
    "evaluate_probes",
    "greedy_answers",
    "is_correct",
    "load_probes",
    "normalize",
    "prompt_ids",
]

PyTree = Any
ApplyFn = Callable[..., Any]

INSTRUCTION = "Answer with a single word or number."
"""Appended to every question, after one space, asking for a bare answer."""

EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is the capital of Poland?", "Warsaw"),
    ("What is 6 plus 3?", "9"),
    ("What is the opposite of good?", "Bad"),
)
"""Chat turns shown before every probe (none of them is a probe) so the model answers in a word or two."""

PROBES_FILE = "probes.jsonl"
_FIELDS = ("id", "category", "question", "answer", "aliases")
# Longer reference answers would not be "short answers"; the packaged set stays within this.
_MAX_ANSWER_WORDS = 3
# Sequences are padded to a multiple of this, so each padded length compiles once.
_LENGTH_MULTIPLE = 16

_ARTICLES = ("the ", "a ", "an ")
_TRAILING = ".,;:!?"
_QUOTES = "\"'`*“”‘’«»"
_END_OF_TURN = "<|im_end|>"


class _Tokenizer(Protocol):
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]: ...


@dataclasses.dataclass(frozen=True)
class Probe:
    """One question with its reference answer.

    Attributes:
        id: Unique identifier, ``"<category prefix>-<number>"`` (``"geo-001"``).
        category: Topic, e.g. ``"geography"``.
        question: The question as asked (without :data:`INSTRUCTION`).
        answer: The reference answer (1-3 words or a number); its tokens are
            the target of :func:`answer_nll`.
        aliases: Other answers also counted correct by :func:`is_correct`.

    >>> Probe("ari-001", "arithmetic", "What is 2 plus 2?", "4", ("four",)).answer
    '4'
    """

    id: str
    category: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()


def _probe_from_record(record: Any, where: str) -> Probe:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    missing = [f for f in _FIELDS if f not in record]
    extra = sorted(set(record) - set(_FIELDS))
    if missing or extra:
        raise ValueError(
            f"{where}: a probe needs exactly the fields {list(_FIELDS)}; missing {missing}, unexpected {extra}."
        )
    for name in ("id", "category", "question", "answer"):
        value = record[name]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}.")
    aliases = record["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"{where}: field 'aliases' must be a list of non-empty strings, got {aliases!r}.")
    words = len(record["answer"].split())
    if words > _MAX_ANSWER_WORDS:
        raise ValueError(
            f"{where}: answer {record['answer']!r} has {words} words; probe answers must be short "
            f"(at most {_MAX_ANSWER_WORDS} words) so exact match is fair."
        )
    return Probe(record["id"], record["category"], record["question"], record["answer"], tuple(aliases))


def load_probes(path: str | os.PathLike[str] | None = None) -> list[Probe]:
    """Reads probes from a JSON-lines file, one object per line.

    Each line is ``{"id", "category", "question", "answer", "aliases"}``;
    blank lines are skipped.

    Args:
        path: The ``.jsonl`` file; defaults to the packaged ``probes.jsonl``.

    Returns:
        The probes, in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a line is not valid JSON, a field is missing, unexpected,
            empty or of the wrong type, an answer is longer than three words,
            an id repeats, or the file holds no probes.

    >>> probes = load_probes()
    >>> probes[0].id, probes[0].category
    ('geo-001', 'geography')
    """
    path = pathlib.Path(__file__).with_name(PROBES_FILE) if path is None else pathlib.Path(path)
    probes: list[Probe] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}).") from error
        probe = _probe_from_record(record, where)
        if probe.id in seen:
            raise ValueError(f"{where}: id {probe.id!r} already used on line {seen[probe.id]}; ids must be unique.")
        seen[probe.id] = number
        probes.append(probe)
    if not probes:
        raise ValueError(f"{path}: no probes found.")
    return probes


def prompt_ids(tokenizer: _Tokenizer, probe: Probe) -> list[int]:
    """Token ids of the chat prompt for one probe.

    The turns of :data:`EXAMPLES` (user: ``f"{question} {INSTRUCTION}"``,
    assistant: the answer), then the user turn ``f"{probe.question}
    {INSTRUCTION}"``, formatted with the tokenizer's chat template and ending
    with the assistant header.

    Args:
        tokenizer: A tokenizer with ``apply_chat_template`` (e.g.
            :func:`lora_jax.models.load_smollm2_tokenizer`).
        probe: The probe.

    Returns:
        The prompt's token ids.

    >>> tok = load_smollm2_tokenizer()  # doctest: +SKIP
    >>> tok.decode(prompt_ids(tok, load_probes()[0]), skip_special_tokens=False)  # doctest: +SKIP
    '<|im_start|>system\\n...<|im_start|>user\\nWhat is the capital of France? Answer with ...'
    """
    messages: list[dict[str, str]] = []
    for question, answer in EXAMPLES:
        messages.append({"role": "user", "content": f"{question} {INSTRUCTION}"})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"{probe.question} {INSTRUCTION}"})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def normalize(text: str) -> str:
    """Reduces a generated or reference answer to the form :func:`is_correct` compares.

    In order: keep the text before the first ``<|im_end|>``; drop leading
    whitespace and keep the first line; lowercase; collapse runs of
    whitespace to one space; then repeatedly strip surrounding whitespace,
    surrounding quotes (``" ' ` *`` and typographic quotes; ``*`` for
    Markdown bold) and trailing ``. , ; : ! ?``; finally drop one leading
    article (``the``, ``a``, ``an`` followed by a space). Nothing else is
    changed: ``"7"`` and ``"seven"`` stay different (aliases cover those).

    Args:
        text: The text.

    Returns:
        The normalised text (possibly empty).

    >>> normalize('  The Pacific Ocean.\\nIt is the largest.')
    'pacific ocean'
    >>> normalize('"Paris!"')
    'paris'
    """
    text = text.split(_END_OF_TURN, 1)[0].lstrip()
    text = text.split("\n", 1)[0].lower()
    text = re.sub(r"\s+", " ", text)
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES).rstrip(_TRAILING)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :].lstrip()
            break
    return text


def is_correct(generated: str, probe: Probe) -> bool:
    """Whether a generated answer matches the probe's answer exactly, after normalisation.

    Both sides go through :func:`normalize` (first line, lowercase, surrounding
    whitespace, quotes and trailing punctuation stripped, one leading article
    dropped); the generation is correct if the result equals the normalised
    answer or one of the normalised aliases. A sentence that merely contains
    the answer ("The capital of France is Paris.") is wrong: the instruction
    asks for the bare answer, and exact match keeps the score free of
    keyword-matching noise.

    Args:
        generated: The model's decoded answer.
        probe: The probe.

    Returns:
        ``True`` if the answer matches.

    >>> probe = Probe("geo-001", "geography", "What is the capital of France?", "Paris", ())
    >>> is_correct("Paris.", probe), is_correct("The capital of France is Paris.", probe)
    (True, False)
    """
    accepted = {normalize(probe.answer), *(normalize(a) for a in probe.aliases)}
    return normalize(generated) in accepted


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _masked_nll(params: PyTree, input_ids: jax.Array, target_mask: jax.Array, *, apply_fn: ApplyFn) -> jax.Array:
    """Per-row summed NLL of the tokens ``target_mask`` marks (each predicted from the position before it)."""
    logits = apply_fn(params, input_ids).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, input_ids[:, 1:, None], axis=-1)[..., 0]
    return -(token_logprobs * target_mask[:, 1:]).sum(axis=1)


def answer_nll(
    apply_fn: ApplyFn,
    params: PyTree,
    tokenizer: _Tokenizer,
    probes: Sequence[Probe],
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Mean NLL per token of each probe's reference answer, given its prompt.

    Each row is ``prompt_ids(tokenizer, probe) + encode(probe.answer) +
    [eos_token_id]``; the loss covers exactly the answer tokens and the
    end-of-turn token (teacher forcing), each predicted from the position
    before it. Rows are right-padded to a multiple of 16 tokens and batches
    filled up to ``batch_size`` with masked copies, so each padded length
    compiles once per ``apply_fn``. Right padding needs no attention mask:
    attention is causal, so padding never influences the tokens before it.

    Args:
        apply_fn: ``apply_fn(params, input_ids) -> logits [batch, seq, vocab]``,
            e.g. ``LlamaForCausalLM(config).apply`` or ``lora_jax.wrap`` of it
            (pass the same object each call to reuse the compiled program).
        params: Parameters for ``apply_fn`` (``{"params": ...}`` for a Flax model).
        tokenizer: The model's tokenizer.
        probes: The probes.
        batch_size: Rows per forward pass.

    Returns:
        float64 ``[len(probes)]``: nats per target token.

    Raises:
        ValueError: If ``probes`` is empty or ``batch_size`` is not positive.

    >>> config, params = load_smollm2()  # doctest: +SKIP
    >>> nll = answer_nll(LlamaForCausalLM(config).apply, params, tok, load_probes()[:4])  # doctest: +SKIP
    >>> nll.shape  # doctest: +SKIP
    (4,)
    """
    _check_batch_size(batch_size)
    if not probes:
        raise ValueError("`probes` is empty; pass at least one probe.")
    rows, masks = [], []
    for probe in probes:
        prompt = prompt_ids(tokenizer, probe)
        target = [*tokenizer.encode(probe.answer), tokenizer.eos_token_id]
        rows.append(prompt + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    out = np.zeros(len(probes), np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        length = _round_up(max(len(r) for r in rows[chunk]), _LENGTH_MULTIPLE)
        ids = np.full((batch_size, length), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for i, (row, row_mask) in enumerate(zip(rows[chunk], masks[chunk])):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = row_mask
        sums = np.asarray(_masked_nll(params, ids, mask, apply_fn=apply_fn), np.float64)
        n = len(rows[chunk])
        out[start : start + n] = sums[:n] / mask[:n].sum(axis=1)
    return out


def greedy_answers(
    model: LlamaForCausalLM,
    params: PyTree,
    tokenizer: _Tokenizer,
    probes: Sequence[Probe],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    apply_fn: ApplyFn | None = None,
) -> list[str]:
    """Greedy answers to the probes, batched.

    Prompts are left-padded (with ``prompt_mask``) to a multiple of 16 tokens
    and batches filled up to ``batch_size`` with copies, so
    :func:`lora_jax.models.generate` compiles once per padded length. Each
    answer is cut at the first end-of-turn token and decoded with special
    tokens skipped.

    Args:
        model: The model (its config sizes the KV cache).
        params: Parameters for ``model.apply`` / ``apply_fn``.
        tokenizer: The model's tokenizer.
        probes: The probes.
        max_new_tokens: Most tokens generated per answer.
        batch_size: Prompts per call to ``generate``.
        apply_fn: Forward function with ``model.apply``'s signature (e.g.
            ``lora_jax.wrap(model.apply)`` with its adapters bound); defaults
            to ``model.apply``.

    Returns:
        One decoded answer per probe.

    Raises:
        ValueError: If ``probes`` is empty or ``batch_size`` is not positive.

    >>> greedy_answers(model, params, tok, load_probes()[:1])  # doctest: +SKIP
    ['Paris']
    """
    _check_batch_size(batch_size)
    if not probes:
        raise ValueError("`probes` is empty; pass at least one probe.")
    prompts = [prompt_ids(tokenizer, probe) for probe in probes]
    tokens = generate_many(
        model, params, prompts, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, batch_size=batch_size, length_multiple=_LENGTH_MULTIPLE,
        apply_fn=apply_fn,
    )  # fmt: skip
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def evaluate_probes(
    model: LlamaForCausalLM,
    params: PyTree,
    tokenizer: _Tokenizer,
    probes: Sequence[Probe],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 32,
    apply_fn: ApplyFn | None = None,
) -> dict[str, Any]:
    """Greedy accuracy and reference-answer NLL on a probe set.

    Args:
        model: The model.
        params: Parameters for ``model.apply`` / ``apply_fn``.
        tokenizer: The model's tokenizer.
        probes: The probes.
        max_new_tokens: Most tokens generated per answer.
        batch_size: Rows per forward pass or ``generate`` call.
        apply_fn: Forward function with ``model.apply``'s signature, used for
            both generation and the NLL; defaults to ``model.apply``.

    Returns:
        ``{"accuracy": float, "mean_nll": float, "correct": list[bool],
        "nll": np.ndarray, "answers": list[str], "by_category": {category:
        accuracy}}``, lists and array in probe order.

    Raises:
        ValueError: If ``probes`` is empty or ``batch_size`` is not positive.

    >>> result = evaluate_probes(model, params, tok, load_probes())  # doctest: +SKIP
    >>> sorted(result)  # doctest: +SKIP
    ['accuracy', 'answers', 'by_category', 'correct', 'mean_nll', 'nll']
    """
    answers = greedy_answers(
        model, params, tokenizer, probes, max_new_tokens=max_new_tokens, batch_size=batch_size, apply_fn=apply_fn
    )
    nll = answer_nll(model.apply if apply_fn is None else apply_fn, params, tokenizer, probes, batch_size=batch_size)
    correct = [is_correct(a, p) for a, p in zip(answers, probes)]
    by_category: dict[str, list[bool]] = {}
    for probe, ok in zip(probes, correct):
        by_category.setdefault(probe.category, []).append(ok)
    return {
        "accuracy": float(np.mean(correct)),
        "mean_nll": float(nll.mean()),
        "correct": correct,
        "nll": nll,
        "answers": answers,
        "by_category": {c: float(np.mean(v)) for c, v in by_category.items()},
    }
