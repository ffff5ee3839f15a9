"""The forgetting probes: the packaged set, exact-match scoring, answer NLL and batched greedy answers."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.experiments import probes as probes_lib
from lora_jax.experiments.probes import (
    EXAMPLES,
    INSTRUCTION,
    Probe,
    answer_nll,
    evaluate_probes,
    greedy_answers,
    is_correct,
    load_probes,
    normalize,
    prompt_ids,
)
from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# Printable ASCII maps one to one onto ids FIRST_CHAR_ID .. FIRST_CHAR_ID + 94.
FIRST_CHAR_ID = 3


class CharTokenizer:
    """One token per printable character; 0 pads, 1 starts a sequence, ``eos_token_id`` ends a turn."""

    pad_token_id = 0
    bos_token_id = 1

    def __init__(self, eos_token_id: int = 2):
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return [FIRST_CHAR_ID + ord(c) - 32 if 32 <= ord(c) < 127 else FIRST_CHAR_ID for c in text]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        out = []
        for i in map(int, ids):
            if i in special:
                if not skip_special_tokens:
                    out.append(f"<{i}>")
            elif FIRST_CHAR_ID <= i < FIRST_CHAR_ID + 95:
                out.append(chr(i - FIRST_CHAR_ID + 32))
            else:
                out.append("~")
        return "".join(out)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, tokenize: bool = False):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return [self.bos_token_id, *self.encode(text)] if tokenize else text


PROBES = [
    Probe("t-1", "test", "Capital of France?", "Paris", ()),
    Probe("t-2", "test", "Seven times eight, written as digits, please?", "56", ("fifty-six",)),
    Probe("t-3", "test", "Hot?", "Cold", ()),
]


@pytest.fixture(scope="module")
def tiny():
    model = LlamaForCausalLM(TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    # Larger output weights than the init's make the argmax margins wide, so the
    # cached and uncached greedy paths cannot disagree on a near tie.
    variables = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, variables)
    return model, variables


# ----------------------------------------------------------------------------
# The packaged set
# ----------------------------------------------------------------------------


def test_packaged_probes_load_and_are_well_formed():
    probes = load_probes()
    assert 150 <= len(probes) <= 200
    assert len({p.id for p in probes}) == len(probes)
    assert len({p.category for p in probes}) >= 8
    for probe in probes:
        assert probe.question.strip().endswith("?"), probe
        assert 1 <= len(probe.answer.split()) <= 3, probe
        assert normalize(probe.answer), probe
        assert is_correct(probe.answer, probe), probe
        assert all(normalize(a) for a in probe.aliases), probe
    # None of the fixed examples is also a probe (they would give the answer away).
    questions = {p.question for p in probes}
    assert not questions & {q for q, _ in EXAMPLES}


def _write(tmp_path, lines):
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(**overrides):
    record = {"id": "x-001", "category": "c", "question": "Q?", "answer": "A", "aliases": []}
    record.update(overrides)
    return json.dumps(record)


def test_load_probes_from_a_path_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [_record(), "", _record(id="x-002", aliases=["b"])])
    assert load_probes(path) == [Probe("x-001", "c", "Q?", "A", ()), Probe("x-002", "c", "Q?", "A", ("b",))]


@pytest.mark.parametrize(
    "lines,match",
    [
        (["{not json"], r"probes.jsonl:1: not valid JSON"),
        (["[1, 2]"], r"expected a JSON object, got list"),
        ([_record(), json.dumps({"id": "x-002"})], r"probes.jsonl:2: .*missing \['category', 'question'"),
        ([_record()[:-1] + ', "extra": 1}'], r"unexpected \['extra'\]"),
        ([_record(answer=" ")], r"field 'answer' must be a non-empty string"),
        ([_record(question=3)], r"field 'question' must be a non-empty string"),
        ([_record(aliases="b")], r"field 'aliases' must be a list of non-empty strings"),
        ([_record(aliases=[""])], r"field 'aliases' must be a list of non-empty strings"),
        ([_record(answer="one two three four")], r"has 4 words; probe answers must be short"),
        ([_record(), _record()], r"probes.jsonl:2: id 'x-001' already used on line 1"),
        ([""], r"no probes found"),
    ],
)
def test_load_probes_rejects_bad_files(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        load_probes(_write(tmp_path, lines))


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------

PARIS = Probe("geo-x", "geography", "What is the capital of France?", "Paris", ())
SEVEN_EIGHT = Probe("ari-x", "arithmetic", "What is 7 times 8?", "56", ("fifty-six",))
OCEAN = Probe("geo-y", "geography", "What is the largest ocean?", "Pacific Ocean", ("pacific",))
LETTER = Probe("wrd-x", "words", "What is the first letter of the alphabet?", "A", ())


@pytest.mark.parametrize(
    "generated,probe,expected",
    [
        ("Paris", PARIS, True),
        ("paris", PARIS, True),
        ("  Paris.  ", PARIS, True),
        ("Paris!", PARIS, True),
        ('"Paris"', PARIS, True),
        ("**Paris**", PARIS, True),
        ("Paris\nIt is a large city.", PARIS, True),
        ("Paris<|im_end|>junk", PARIS, True),
        ("London", PARIS, False),
        ("Parisian", PARIS, False),
        ("The capital of France is Paris.", PARIS, False),
        ("Paris, France", PARIS, False),
        ("", PARIS, False),
        ("56", SEVEN_EIGHT, True),
        ("Fifty-six.", SEVEN_EIGHT, True),
        ("56.", SEVEN_EIGHT, True),
        ("65", SEVEN_EIGHT, False),
        ("7 times 8 is 56", SEVEN_EIGHT, False),
        ("The Pacific Ocean.", OCEAN, True),
        ("the pacific", OCEAN, True),
        ("Pacific  Ocean", OCEAN, True),
        ("Atlantic Ocean", OCEAN, False),
        ("A", LETTER, True),
        ("'A'.", LETTER, True),
        ("B", LETTER, False),
    ],
)
def test_is_correct(generated, probe, expected):
    assert is_correct(generated, probe) is expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Nile", "nile"),
        ("An apple.", "apple"),
        ("A cat", "cat"),
        ("a", "a"),
        ("Theory", "theory"),
        ("Washington, D.C.", "washington, d.c"),
        ("“Quoted.”", "quoted"),
        ("\n\nParis\nmore", "paris"),
        ("The the end", "the end"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# ----------------------------------------------------------------------------
# Prompts, NLL and generation on a tiny random model
# ----------------------------------------------------------------------------


def test_prompt_ids_are_the_chat_prompt_with_examples_and_instruction():
    tok = CharTokenizer()
    ids = prompt_ids(tok, PROBES[0])
    text = tok.decode(ids[1:])
    assert ids[0] == tok.bos_token_id
    assert text.endswith(f"<user>{PROBES[0].question} {INSTRUCTION}|<assistant>")
    for question, answer in EXAMPLES:
        assert f"<user>{question} {INSTRUCTION}|<assistant>{answer}|" in text


def _reference_nll(model, variables, tok, probe, shift=0):
    """Mean NLL of answer + end of turn, one unpadded sequence at a time, in NumPy.

    ``shift`` moves the scored window by that many tokens (to show a misplaced mask is caught).
    """
    prompt = prompt_ids(tok, probe)
    target = tok.encode(probe.answer) + [tok.eos_token_id]
    ids = np.asarray(prompt + target)
    logits = np.asarray(model.apply(variables, jnp.asarray(ids[None])), np.float64)[0]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    # Token t is predicted by the logits at t - 1.
    window = range(len(prompt) + shift, min(len(ids), len(ids) + shift))
    picked = [logprobs[t - 1, ids[t]] for t in window]
    if shift == 0:
        assert len(picked) == len(probe.answer) + 1
    return -float(np.mean(picked))


@pytest.mark.parametrize("batch_size", [2, 8])
def test_answer_nll_matches_numpy(tiny, batch_size):
    model, variables = tiny
    tok = CharTokenizer()
    got = answer_nll(model.apply, variables, tok, PROBES, batch_size=batch_size)
    want = [_reference_nll(model, variables, tok, p) for p in PROBES]
    assert got.shape == (len(PROBES),) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # A mask one token early or late gives numbers well outside that tolerance.
    for shift in (-1, 1):
        off = [_reference_nll(model, variables, tok, p, shift) for p in PROBES]
        assert not np.allclose(got, off, rtol=1e-3), shift


def test_answer_nll_is_sensitive_to_the_answer(tiny):
    model, variables = tiny
    tok = CharTokenizer()
    other = [Probe(p.id, p.category, p.question, p.answer + "x", ()) for p in PROBES]
    a = answer_nll(model.apply, variables, tok, PROBES)
    b = answer_nll(model.apply, variables, tok, other)
    assert not np.allclose(a, b)


# Every hand-rolled step runs the full sequence, right-padded to this length so it compiles once;
# attention is causal, so the padding never reaches the position read.
REFERENCE_LENGTH = 384


@jax.jit
def _full_forward(variables, ids):
    return LlamaForCausalLM(TINY).apply(variables, ids)


def _reference_greedy(model, variables, tok, probe, max_new_tokens):
    ids = prompt_ids(tok, probe)
    assert model.config == TINY and len(ids) + max_new_tokens <= REFERENCE_LENGTH
    out = []
    for _ in range(max_new_tokens):
        sequence = ids + out
        padded = np.zeros((1, REFERENCE_LENGTH), np.int32)
        padded[0, : len(sequence)] = sequence
        logits = _full_forward(variables, padded)
        token = int(np.argmax(np.asarray(logits[0, len(sequence) - 1])))
        if token == tok.eos_token_id:
            break
        out.append(token)
    return tok.decode(out, skip_special_tokens=True), out


def test_greedy_answers_match_a_hand_rolled_loop(tiny):
    model, variables = tiny
    tok = CharTokenizer()
    # Probes of different prompt lengths, in batches of 2: left padding and a filled last batch.
    got = greedy_answers(model, variables, tok, PROBES, max_new_tokens=6, batch_size=2)
    want = [_reference_greedy(model, variables, tok, p, 6)[0] for p in PROBES]
    assert got == want
    assert all(len(a) > 0 for a in got)


def test_greedy_answers_stop_at_end_of_turn(tiny):
    model, variables = tiny
    _, tokens = _reference_greedy(model, variables, CharTokenizer(), PROBES[0], 6)
    # Declare the third greedy token the end of turn: the answer is cut before it.
    stop = tokens[2]
    cut = tokens[: tokens.index(stop)]
    tok = CharTokenizer(eos_token_id=stop)
    (answer,) = greedy_answers(model, variables, tok, PROBES[:1], max_new_tokens=6, batch_size=1)
    assert answer == tok.decode(cut)
    assert len(answer) == len(cut) < 6


def test_evaluate_probes(tiny):
    model, variables = tiny
    tok = CharTokenizer()
    result = evaluate_probes(model, variables, tok, PROBES, max_new_tokens=4, batch_size=4)
    assert sorted(result) == ["accuracy", "answers", "by_category", "correct", "mean_nll", "nll"]
    assert result["answers"] == greedy_answers(model, variables, tok, PROBES, max_new_tokens=4, batch_size=4)
    assert result["correct"] == [is_correct(a, p) for a, p in zip(result["answers"], PROBES)]
    np.testing.assert_allclose(result["nll"], answer_nll(model.apply, variables, tok, PROBES), rtol=1e-6)
    assert math.isclose(result["mean_nll"], float(np.mean(result["nll"])))
    assert result["accuracy"] == float(np.mean(result["correct"]))
    assert result["by_category"] == {"test": result["accuracy"]}


@pytest.mark.parametrize("function", ["answer_nll", "greedy_answers"])
def test_bad_arguments_raise(tiny, function):
    model, variables = tiny
    tok = CharTokenizer()
    call = (
        (lambda probes, **kw: answer_nll(model.apply, variables, tok, probes, **kw))
        if function == "answer_nll"
        else (lambda probes, **kw: greedy_answers(model, variables, tok, probes, **kw))
    )
    with pytest.raises(ValueError, match="`probes` is empty"):
        call([])
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        call(PROBES, batch_size=0)


# ----------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_probes():
    from lora_jax.models import loaders
    from lora_jax.models.tokenizer import load_smollm2_tokenizer

    try:
        loaders.smollm2_path()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 is not installed ({loaders.SMOLLM2_INSTALL})")
    config, variables = loaders.load_smollm2(scan_layers=True)
    tok = load_smollm2_tokenizer()
    model = LlamaForCausalLM(config)
    probes = load_probes()
    paris = next(p for p in probes if p.question == "What is the capital of France?")
    subset = [paris, *[p for p in probes[::10] if p is not paris]][:20]
    result = evaluate_probes(model, variables, tok, subset, batch_size=len(subset))
    assert result["answers"][0] == "Paris"
    assert result["correct"][0]
    assert np.isfinite(result["nll"]).all() and (result["nll"] > 0).all()
    # A known answer is likely: well under one nat per token.
    assert result["nll"][0] < 0.5
    assert probes_lib.INSTRUCTION in tok.decode(prompt_ids(tok, paris))
