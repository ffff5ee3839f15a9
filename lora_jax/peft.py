"""Hugging Face PEFT interop: adapter export and import, merged checkpoint export.

An adapter tree from :func:`lora_jax.split` is written in the layout that
``peft.PeftModel.from_pretrained`` loads (:func:`export_peft`), a PEFT LoRA
adapter directory is read back into an adapter tree and a
:class:`~lora_jax.LoraSpec` (:func:`import_peft`), and a fine-tuned
:class:`~lora_jax.models.LlamaForCausalLM` is written as a plain transformers
checkpoint with the adapters folded in (:func:`export_merged_hf`).

Paths in the parameter tree are translated to Hugging Face module names by a
:class:`NameMap`; :func:`llama_name_map` is the one for this package's Llama.

On disk (what PEFT itself writes):

* ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) with keys
  ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``.lora_B.weight`` ``[out, r]`` for a ``Linear``,
  ``base_model.model.<module>.lora_embedding_A`` ``[r, vocab]`` and
  ``.lora_embedding_B`` ``[dim, r]`` for an ``Embedding``, and
  ``base_model.model.<module>.<weight|bias>`` for modules trained in full
  (PEFT's ``modules_to_save``);
* ``adapter_config.json`` with ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``rank_pattern``/``alpha_pattern``, ``use_rslora`` and
  the rest of the fields PEFT reads when it loads.

PEFT computes ``W + s·B_pt@A_pt`` with ``s = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``), exactly as ``merge`` does here,
so logits agree to floating-point rounding.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _tree
from lora_jax._spec import LoraSpec
from lora_jax._tree import LoraFactors

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "NameMap",
    "export_merged_hf",
    "export_peft",
    "frozen_for",
    "import_peft",
    "llama_name_map",
]

PyTree = Any

ADAPTER_CONFIG_NAME = "adapter_config.json"
"""File name of a PEFT adapter's configuration."""
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""File name of a PEFT adapter's tensors."""

# PeftModel wraps the base model as `base_model.model`, and saves keys with that prefix.
_PREFIX = "base_model.model."
_SAFETENSORS_METADATA = {"format": "pt"}
# HF module names that are `nn.Embedding`s in the common architectures.
_EMBEDDING_MODULES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "tok_embeddings",
        "embed_in",
        "embed_positions",
        "shared",
    }
)
# Flax leaf name -> the parameter name of the torch module that owns it.
_HF_PARAM = {"kernel": "weight", "scale": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}
# A PEFT key of an adapted module that is neither a LoRA factor nor trained in
# full: the base weight of a targeted embedding, which PEFT saves next to its
# factors by default (`save_embedding_layers="auto"`).
_BASE_LAYER = ".base_layer"

# PEFT config fields whose features change the forward in ways a LoRA factor
# pair cannot hold; any truthy value is refused by `import_peft`.
_UNSUPPORTED_FEATURES = {
    "use_qalora": "QALoRA (pooled inputs)",
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE expert tensors)",
    "layer_replication": "replicated layers (a different model structure)",
    "trainable_token_indices": "trainable tokens (sparse embedding updates)",
    "alora_invocation_tokens": "activated LoRA (the adapter acts only after invocation tokens)",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
}
# `init_lora_weights` values after which the saved factors apply to the
# unmodified base weights. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the
# base weights at init, so their unconverted adapters only fit a rewritten base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class NameMap:
    """How parameter paths here correspond to Hugging Face module names.

    Args:
      to_hf: ``(path, layer) -> module``: the ``/``-joined path of a leaf
        (``params/model/layers_3/self_attn/q_proj/kernel``) and, for a leaf
        that stacks layers (an ``nn.scan`` stack), the index along the stack
        (``None`` otherwise) -> the Hugging Face module that owns the weight
        (``model.layers.3.self_attn.q_proj``).
      from_hf: ``module -> (path, layer)``: the inverse, giving the path of
        the module's ``weight`` leaf here and its index within a stacked
        leaf (``None`` if the leaf is not a stack).
      stacked: ``path -> bool``: whether a leaf trained in full holds a stack
        of layers on its leading axis. (LoRA factors carry their own stack
        axes; plain arrays do not.)
      is_embedding: ``module -> bool``: whether the Hugging Face module is an
        ``nn.Embedding`` (exported as ``lora_embedding_A``/``lora_embedding_B``)
        rather than an ``nn.Linear`` (``lora_A``/``lora_B``). The default
        recognises the usual names (``embed_tokens``, ``wte``, ...).

    Leaves are read with Flax's conventions: a leaf named ``kernel`` is
    ``[in, out]``, the transpose of torch's ``Linear.weight``; any other leaf
    (``embedding``, ``scale``, ``bias``, ``weight``) has torch's layout. A
    ``kernel``, ``scale``, ``embedding`` or ``weight`` leaf is the module's
    ``weight``, a ``bias`` leaf its ``bias`` (a sibling of the weight leaf).

    >>> names = NameMap(
    ...     to_hf=lambda path, layer: path.rsplit("/", 1)[0].replace("/", "."),
    ...     from_hf=lambda module: (module.replace(".", "/") + "/kernel", None),
    ... )
    >>> names.to_hf("encoder/dense/kernel", None)
    'encoder.dense'
    """

    to_hf: Callable[[str, int | None], str]
    from_hf: Callable[[str], tuple[str, int | None]]
    stacked: Callable[[str], bool] = lambda path: False
    is_embedding: Callable[[str], bool] = lambda module: module.rsplit(".", 1)[-1] in _EMBEDDING_MODULES


def llama_name_map(*, scan_layers: bool, root: str = "params") -> NameMap:
    """The `NameMap` of :class:`lora_jax.models.LlamaForCausalLM`.

    Built on :func:`lora_jax.models.hf_key` and :func:`lora_jax.models.flax_path`:
    ``params/model/layers_3/self_attn/q_proj/kernel`` <-> ``model.layers.3.self_attn.q_proj``,
    and with ``scan_layers=True`` ``params/model/layers/self_attn/q_proj/kernel``
    (layer ``3``) <-> the same module.

    Args:
      scan_layers: whether the tree stacks the decoder layers on a leading axis.
      root: the top-level key above ``model`` (``"params"`` for Flax
        ``variables``; ``""`` for ``variables["params"]``).

    Returns:
      The name map.

    >>> names = llama_name_map(scan_layers=True)
    >>> names.to_hf("params/model/layers/mlp/up_proj/kernel", 2)
    'model.layers.2.mlp.up_proj'
    >>> names.from_hf("model.layers.2.mlp.up_proj")
    ('params/model/layers/mlp/up_proj/kernel', 2)
    """
    from lora_jax.models.llama import flax_path, hf_key

    prefix = f"{root}/" if root else ""

    def to_hf(path: str, layer: int | None) -> str:
        return hf_key(path.removeprefix(prefix), layer=layer).rsplit(".", 1)[0]

    def from_hf(module: str) -> tuple[str, int | None]:
        parts, layer = flax_path(f"{module}.weight", scan_layers=scan_layers)
        return prefix + "/".join(parts[1:]), layer

    def stacked(path: str) -> bool:
        return scan_layers and path.removeprefix(prefix).startswith("model/layers/")

    return NameMap(to_hf=to_hf, from_hf=from_hf, stacked=stacked)


def _detect_llama_map(paths: Iterable[str]) -> NameMap:
    paths = list(paths)
    root = "params" if paths and all(p.startswith("params/") for p in paths) else ""
    scanned = any(re.search(r"(^|/)model/layers/", p) for p in paths)
    return llama_name_map(scan_layers=scanned, root=root)


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def export_peft(
    adapters: PyTree,
    spec: LoraSpec,
    directory: str | os.PathLike[str],
    *,
    name_map: NameMap | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    modules_to_save: bool = True,
) -> pathlib.Path:
    """Writes adapters as a PEFT LoRA adapter directory.

    ``peft.PeftModel.from_pretrained(hf_model, directory)`` then computes what
    ``lora_jax.wrap(apply)(frozen, adapters, ...)`` computes here. Each adapted
    module gets its own rank (``lora_a.shape[-1]``) and ``lora_alpha``
    (recovered from the factors' scale: ``scale * r``, or
    ``scale * sqrt(r)`` with ``spec.rslora``); the config's ``r`` and
    ``lora_alpha`` are the most common values and ``rank_pattern`` /
    ``alpha_pattern`` list the modules that differ (keyed by module-name
    suffix when all modules of that name agree, else by full module name).
    ``target_modules`` is the sorted list of adapted module-name suffixes
    (``["down_proj", "gate_proj", ...]``). PEFT matches those suffixes in every
    layer: a module with that name but no factors in the file gets PEFT's
    zero-initialised adapter, which leaves its output unchanged.

    A stacked adapter (an ``nn.scan`` layer stack) is written as one entry per
    layer. A module is an ``Embedding`` when ``name_map.is_embedding`` says
    so, otherwise a ``Linear``. Leaves trained in full (``LoraSpec(train=...)``)
    are written as PEFT ``modules_to_save`` entries: the module's tensor under
    ``base_model.model.<module>.<weight|bias>`` (transposed to torch's layout
    for a ``kernel``) and its full name in the config's ``modules_to_save``.

    The directory is written atomically: files go to a new sibling directory
    that then replaces ``directory``. An existing ``directory`` is replaced
    only if it is empty or holds nothing but a previous adapter
    (``adapter_config.json``, ``adapter_model.safetensors``); anything else
    in it is never deleted (``FileExistsError``).

    A model that ties its output head to its input embedding applies an
    embedding adapter (or a fully trained embedding) to both uses here, but
    PEFT applies it to the input lookup only; such adapters do not reproduce
    the outputs in PEFT.

    Args:
      adapters: the adapter tree from :func:`lora_jax.split`, trained or not.
      spec: the spec the adapters were split with (``rslora`` decides how
        ``lora_alpha`` is recovered from each scale).
      directory: where to write ``adapter_config.json`` and
        ``adapter_model.safetensors``.
      name_map: maps paths to Hugging Face module names; ``None`` means
        :func:`llama_name_map`, scanned or not as the adapter paths show
        (``model/layers/...`` vs ``model/layers_<i>/...``).
      base_model_name_or_path: written to the config (the hub id or path of
        the base model), so ``AutoPeftModel`` can find it.
      task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ... or ``None``).
      modules_to_save: write leaves trained in full as ``modules_to_save``
        entries; with ``False`` such leaves are an error (for consumers that
        load LoRA factors only, such as vLLM).

    Returns:
      The directory written.

    Raises:
      ValueError: a factor that is not one 2-D ``A``/``B`` pair per module
        (multi-axis ``DenseGeneral`` or conv factors, more than one stack
        axis), adapters without LoRA factors, a module that has both factors
        and a fully trained leaf, two paths mapping to one module, factors
        with different dropout rates, or fully trained leaves with
        ``modules_to_save=False``. All such problems are listed at once.
      TypeError: ``adapters`` is not an adapter tree or ``spec`` not a LoraSpec.
      FileExistsError: ``directory`` holds files other than a previous adapter.

    >>> export_peft(adapters, spec, "out/adapter",  # doctest: +SKIP
    ...             base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"export_peft: `spec` must be a lora_jax.LoraSpec; got {type(spec).__name__}.")
    entries = _tree.adapter_entries(adapters)
    names = name_map if name_map is not None else _detect_llama_map(entries)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}  # tensor key -> path it came from
    lora_modules: dict[str, tuple[int, float, float]] = {}  # module -> (rank, alpha, dropout)
    trained_modules: dict[str, str] = {}  # module -> path
    problems: list[str] = []

    def put(key: str, value: np.ndarray, path: str) -> None:
        if key in tensors:
            problems.append(f"{path!r} and {origin[key]!r} both map to the PEFT key {key!r}")
            return
        tensors[key] = np.ascontiguousarray(value)
        origin[key] = path

    for path, entry in entries.items():
        if isinstance(entry, LoraFactors):
            layout = _per_layer_layout(path, entry)
            if isinstance(layout, str):
                problems.append(layout)
                continue
            stack_axis, reversed_ab = layout
            a, b = np.asarray(entry.lora_a), np.asarray(entry.lora_b)
            rank = a.shape[-1]
            alpha = _tidy(entry.scale * (math.sqrt(rank) if spec.rslora else rank))
            kernel = path.rsplit("/", 1)[-1] == "kernel"
            layers = [None] if stack_axis is None else range(a.shape[0])
            for layer in layers:
                a_i, b_i = (a, b) if layer is None else (a[layer], b[layer])
                module = _to_hf(names, path, layer, problems)
                if module is None:
                    continue
                # PEFT's update in torch layout is H = P @ Q (Linear: P = lora_B, Q = lora_A;
                # Embedding: P = lora_embedding_A.T, Q = lora_embedding_B.T). Here the update is
                # A @ B, transposed when W's a-side comes second; a kernel is H transposed.
                p, q = (b_i.T, a_i.T) if kernel != reversed_ab else (a_i, b_i)
                if names.is_embedding(module):
                    put(f"{_PREFIX}{module}.lora_embedding_A", p.T, path)
                    put(f"{_PREFIX}{module}.lora_embedding_B", q.T, path)
                else:
                    put(f"{_PREFIX}{module}.lora_A.weight", q, path)
                    put(f"{_PREFIX}{module}.lora_B.weight", p, path)
                if entry.magnitude is not None:
                    # PEFT's DoRA magnitude is one value per output feature of a Linear: our kernel's columns.
                    if names.is_embedding(module) or not kernel or reversed_ab:
                        problems.append(
                            f"{path!r} is a DoRA adapter on a weight that is not a Linear kernel [in, out]; PEFT's "
                            "DoRA magnitude is per output feature of a Linear only"
                        )
                        continue
                    magnitude = np.asarray(entry.magnitude)
                    put(
                        f"{_PREFIX}{module}.lora_magnitude_vector",
                        magnitude if layer is None else magnitude[layer],
                        path,
                    )
                lora_modules[module] = (rank, alpha, float(entry.dropout))
        else:
            if not modules_to_save:
                problems.append(
                    f"{path!r} is trained in full; pass modules_to_save=True to write it as a PEFT modules_to_save "
                    "entry, or leave it out of spec.train"
                )
                continue
            value = np.asarray(entry)
            param = _HF_PARAM.get(path.rsplit("/", 1)[-1])
            if param is None:
                problems.append(
                    f"{path!r} is trained in full but its leaf name is none of {sorted(_HF_PARAM)}, so its torch "
                    "parameter name is unknown"
                )
                continue
            stacked = names.stacked(path)
            layers = [None] if not stacked else range(value.shape[0])
            for layer in layers:
                v = value if layer is None else value[layer]
                module = _to_hf(names, path, layer, problems)
                if module is None:
                    continue
                if path.rsplit("/", 1)[-1] == "kernel" and v.ndim == 2:
                    v = v.T
                put(f"{_PREFIX}{module}.{param}", v, path)
                trained_modules[module] = path

    for module in sorted(set(lora_modules) & set(trained_modules)):
        problems.append(
            f"module {module!r} has LoRA factors and a leaf trained in full ({trained_modules[module]!r}); PEFT "
            "cannot adapt a module listed in modules_to_save"
        )
    if not lora_modules and not problems:
        problems.append("the adapter tree holds no LoRA factors")
    dora = {
        isinstance(e, LoraFactors) and e.magnitude is not None for e in entries.values() if isinstance(e, LoraFactors)
    }
    if len(dora) > 1:
        problems.append("some factors are DoRA and some plain LoRA; PEFT's use_dora holds for a whole adapter")
    dropouts = sorted({d for _, _, d in lora_modules.values()})
    if len(dropouts) > 1:
        problems.append(f"the factors use different dropout rates {dropouts}; PEFT has one lora_dropout per adapter")
    if problems:
        raise ValueError(
            "export_peft: cannot write these adapters as a PEFT LoRA adapter:\n  - " + "\n  - ".join(problems)
        )

    config = _peft_config(
        lora_modules,
        sorted(trained_modules),
        rslora=spec.rslora,
        dropout=dropouts[0],
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        use_dora=dora == {True},
    )

    def write(tmp: pathlib.Path) -> None:
        from safetensors.numpy import save_file

        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata=_SAFETENSORS_METADATA)
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    owned = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME}
    return _write_atomically(directory, write, lambda name: name in owned, caller="export_peft")


def _per_layer_layout(path: str, f: LoraFactors) -> tuple[int | None, bool] | str:
    """``(stack axis or None, whether W's a-side comes after its b-side)``, or a problem."""
    supported = (
        "supported are 2-D weights (one A [in, r], B [r, out] pair) and nn.scan stacks of them with one stack axis"
    )
    if len(f.stack_axes) > 1:
        return f"{path!r} has {len(f.stack_axes)} stack axes {f.stack_axes}; {supported}"
    if len(f.a_axes) != 1 or len(f.b_axes) != 1:
        return (
            f"{path!r} has per-layer factors A {tuple(f.lora_a.shape)} and B {tuple(f.lora_b.shape)} over "
            f"{len(f.a_axes)} input and {len(f.b_axes)} output axes (a multi-axis DenseGeneral or a conv kernel); "
            f"{supported}"
        )
    stack = f.stack_axes[0] if f.stack_axes else None
    # Number W's axes as they are within one layer.
    a_axis = f.a_axes[0] - (stack is not None and f.a_axes[0] > stack)
    b_axis = f.b_axes[0] - (stack is not None and f.b_axes[0] > stack)
    return stack, a_axis > b_axis


def _to_hf(names: NameMap, path: str, layer: int | None, problems: list[str]) -> str | None:
    try:
        return names.to_hf(path, layer)
    except (ValueError, KeyError) as e:
        problems.append(
            f"the name map cannot name {path!r}" + (f" (layer {layer})" if layer is not None else "") + f": {e}"
        )
        return None


def _tidy(x: float) -> float | int:
    """``8.000000000000002 -> 8``: alphas recovered from a float scale, written as people write them."""
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return float(f"{x:.12g}")


def _suffix(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """Keys PEFT matches (``re.match(rf"(.*\\.)?({key})$", module)``) to exactly the modules that differ."""
    by_suffix: dict[str, set] = collections.defaultdict(set)
    for module, value in values.items():
        by_suffix[_suffix(module)].add(value)
    out = {}
    for module, value in sorted(values.items()):
        if value == default:
            continue
        suffix = _suffix(module)
        if len(by_suffix[suffix]) == 1:
            out[suffix] = value
        else:
            out[module] = value
    return out


def _most_common(values: Iterable[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -list(counts).index(v)))


def _peft_config(
    lora_modules: Mapping[str, tuple[int, float, float]],
    trained_modules: list[str],
    *,
    rslora: bool,
    dropout: float,
    base_model_name_or_path: str | None,
    task_type: str | None,
    use_dora: bool = False,
) -> dict[str, Any]:
    modules = sorted(lora_modules)
    ranks = {m: lora_modules[m][0] for m in modules}
    alphas = {m: lora_modules[m][1] for m in modules}
    rank, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": _patterns(ranks, rank),
        "alpha_pattern": _patterns(alphas, alpha),
        "target_modules": sorted({_suffix(m) for m in modules}),
        "modules_to_save": trained_modules or None,
        "use_rslora": bool(rslora),
        "use_dora": bool(use_dora),
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "revision": None,
        "auto_mapping": None,
    }


# ----------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------


def import_peft(
    directory: str | os.PathLike[str],
    params: PyTree,
    *,
    name_map: NameMap | None = None,
) -> tuple[dict, LoraSpec]:
    """Reads a PEFT LoRA adapter directory into an adapter tree for ``params``.

    The adapters belong to the base ``params`` the adapter was trained on::

        adapters, spec = import_peft("adapter_dir", params)
        frozen = frozen_for(params, adapters)
        logits = lora_jax.wrap(model.apply)(frozen, adapters, ids)
        merged = lora_jax.merge(frozen, adapters)

    :func:`frozen_for` puts ``None`` where a leaf that PEFT trained in full
    (``modules_to_save``) lives in ``adapters``, as :func:`lora_jax.split`
    does; without such leaves it returns ``params`` as they are.
    ``lora_jax.split(params, spec, key=key, trace=...)`` gives the same frozen
    tree: ``spec`` selects exactly the imported paths, with the same ranks
    and scales.

    Each module's rank is read from its tensors (and must equal the rank the
    config gives it), its scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``) with ``rank_pattern``/``alpha_pattern`` looked up as PEFT
    does. Factors come in the file's dtype and the natural layout here
    (``A [in, r]``, ``B [r, out]`` for a ``kernel``; ``A [vocab, r]``,
    ``B [r, dim]`` for an embedding). For a scanned tree the per-layer entries
    of one stacked leaf become one `LoraFactors` with ``stack_axes=(0,)``;
    every layer must be present and share the rank and scale. A module's own
    ``weight``/``bias`` in the file (``modules_to_save``) replaces the leaf,
    as it does when PEFT loads it: it is returned as a leaf trained in full,
    cast to the dtype of ``params``; a stacked one takes the layers the file
    lacks from ``params``. The base weight PEFT saves next to a targeted
    embedding's factors must equal the one in ``params``.

    Args:
      directory: a directory holding ``adapter_config.json`` and
        ``adapter_model.safetensors`` (PEFT's ``save_pretrained`` output).
      params: the base parameters the adapter belongs to (a Flax
        ``variables`` dict or any pytree the name map describes).
      name_map: maps Hugging Face module names to paths; ``None`` means
        :func:`llama_name_map`, scanned or not as ``params`` shows.

    Returns:
      ``(adapters, spec)``: a nested dict keyed like ``params`` holding a
      `LoraFactors` per adapted leaf and the array of each leaf trained in
      full, and a `LoraSpec` that selects the same leaves (``targets`` and
      ``train`` as lists of escaped exact paths) with the same ranks, alphas,
      ``rslora`` and ``dropout``.

    Raises:
      FileNotFoundError: the directory or ``adapter_config.json`` is missing.
      ValueError: the adapter is not one this can hold, with every problem
        listed: ``peft_type`` other than LORA; DoRA, ``lora_bias``,
        ``target_parameters``, a ``bias`` other than ``"none"`` or another
        feature beyond plain LoRA; an initialisation that rewrites the base
        weights (PiSSA, OLoRA, ...); weights only in ``adapter_model.bin``
        (safetensors only); unknown tensor keys; modules the name map cannot
        place in ``params``; factor shapes that do not fit the weight (path
        and both shapes); a ``lora_A`` without ``lora_B`` or the reverse; a
        rank that differs from the config's; an incomplete or uneven layer
        stack; with the default Llama map, an embedding adapter on a model
        whose head is tied to its embedding.

    >>> adapters, spec = import_peft("adapter_dir", variables)  # doctest: +SKIP
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"import_peft: `directory` {str(directory)!r} does not exist or is not a directory.")
    config_file = directory / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"import_peft: {str(directory)!r} has no {ADAPTER_CONFIG_NAME}; expected a PEFT adapter directory "
            "written by PeftModel.save_pretrained."
        )
    config = json.loads(config_file.read_text())
    problems = _config_problems(config)
    weights_file = directory / ADAPTER_WEIGHTS_NAME
    if not weights_file.is_file():
        other = "adapter_model.bin"
        found = (
            f" (it has {other}, a pickle: re-save it with safe_serialization=True)"
            if (directory / other).exists()
            else ""
        )
        problems.append(f"{str(directory)!r} has no {ADAPTER_WEIGHTS_NAME}{found}; only safetensors adapters are read")
    if problems:
        raise _import_error(problems)

    from lora_jax.models.loaders import _read_safetensors

    tensors = {key: np.array(value) for key, value in _read_safetensors(weights_file)}
    flat, _ = _tree._flatten(params)
    leaves = {path: leaf for path, _, leaf in flat}
    parts_of = {path: parts for path, parts, _ in flat}
    names = name_map if name_map is not None else _detect_llama_map(leaves)

    lora: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)  # module -> {kind: tensor}
    replaced: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)  # module -> {param: tensor}
    base_layers: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            problems.append(f"tensor key {key!r} does not start with {_PREFIX!r}")
            continue
        name = key[len(_PREFIX) :]
        match = re.fullmatch(
            r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)", name
        )
        if match:
            lora[match.group(1)][match.group(2)] = value
            continue
        module, _, param = name.rpartition(".")
        if "lora_" in name or not module or param not in ("weight", "bias"):
            problems.append(
                f"unknown tensor key {key!r} (expected <module>.lora_A.weight, .lora_B.weight, .lora_embedding_A, "
                ".lora_embedding_B, or a module's weight/bias)"
            )
        elif module.endswith(_BASE_LAYER):
            base_layers[module.removesuffix(_BASE_LAYER)][param] = value
        else:
            replaced[module][param] = value

    rank_default, alpha_default = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0) or 0.0)
    use_dora = bool(config.get("use_dora", False))

    # path -> {layer: (A, B, rank, alpha, DoRA magnitude or None)}
    pieces: dict[str, dict[int | None, tuple]] = collections.defaultdict(dict)
    for module, kinds in sorted(lora.items()):
        magnitude = kinds.pop("lora_magnitude_vector", None)
        if (magnitude is not None) != use_dora:
            problems.append(
                f"module {module!r} {'has' if magnitude is not None else 'lacks'} a lora_magnitude_vector but the "
                f"config says use_dora={use_dora}"
            )
            continue
        if "lora_A.weight" in kinds and "lora_B.weight" in kinds:
            p, q = kinds["lora_B.weight"], kinds["lora_A.weight"]  # H [out, in] = P @ Q
        elif "lora_embedding_A" in kinds and "lora_embedding_B" in kinds:
            p, q = kinds["lora_embedding_A"].T, kinds["lora_embedding_B"].T
        else:
            problems.append(f"module {module!r} has only {sorted(kinds)} (LoRA factors come in A/B pairs)")
            continue
        located = _locate(names, module, leaves, problems)
        if located is None:
            continue
        path, layer = located
        w_shape = tuple(np.shape(leaves[path]))
        if layer is not None:
            w_shape = w_shape[1:]
        if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[0]:
            problems.append(
                f"module {module!r}: factors of shapes {tuple(q.shape)} and {tuple(p.shape)} do not form a low-rank "
                "pair"
            )
            continue
        kernel = path.rsplit("/", 1)[-1] == "kernel"
        # Here the weight is W = H.T for a kernel and W = H otherwise; A is [W rows, r], B [r, W cols].
        a, b = (q.T, p.T) if kernel else (p, q)
        if w_shape != (a.shape[0], b.shape[1]):
            problems.append(
                f"module {module!r}: the factors make a {a.shape[0]}x{b.shape[1]} update for {path!r}"
                + (f" (layer {layer})" if layer is not None else "")
                + f", whose weight has shape {w_shape} (factor tensors {tuple(q.shape)} and {tuple(p.shape)})"
            )
            continue
        rank = a.shape[1]
        expected = int(_pattern_value(rank_pattern, module, rank_default))
        if rank != expected:
            problems.append(f"module {module!r} has rank {rank} in the file but the config gives it r={expected}")
            continue
        if layer in pieces[path]:
            problems.append(f"modules mapping to {path!r} layer {layer} appear twice")
            continue
        if magnitude is not None and (not kernel or "lora_A.weight" not in kinds or magnitude.shape != (b.shape[1],)):
            problems.append(
                f"module {module!r}: a DoRA magnitude of shape {tuple(magnitude.shape)} needs a Linear kernel with "
                f"{b.shape[1]} outputs"
            )
            continue
        pieces[path][layer] = (a, b, rank, _pattern_value(alpha_pattern, module, alpha_default), magnitude)

    factors: dict[str, LoraFactors] = {}
    scales: dict[str, tuple[int, float]] = {}
    for path, by_layer in sorted(pieces.items()):
        if None in by_layer:
            a, b, rank, alpha, magnitude = by_layer[None]
            factors[path] = LoraFactors(
                jnp.asarray(a),
                jnp.asarray(b),
                _scale(alpha, rank, rslora),
                dropout=dropout,
                magnitude=None if magnitude is None else jnp.asarray(magnitude),
            )
            scales[path] = (rank, alpha)
            continue
        count = np.shape(leaves[path])[0]
        missing = sorted(set(range(count)) - set(by_layer))
        if missing:
            problems.append(
                f"{path!r} stacks {count} layers but the file has factors for layers {sorted(by_layer)} only "
                f"(missing {missing}); a stacked leaf takes one adapter per layer. Import into an unscanned tree "
                "(scan_layers=False) instead"
            )
            continue
        kinds = {(r, al) for _, _, r, al, _ in by_layer.values()}
        if len(kinds) > 1:
            problems.append(
                f"{path!r} stacks layers whose (rank, alpha) differ: {sorted(kinds)}; one stacked leaf has one rank "
                "and scale. Import into an unscanned tree (scan_layers=False) instead"
            )
            continue
        ((rank, alpha),) = kinds
        a = np.stack([by_layer[i][0] for i in range(count)])
        b = np.stack([by_layer[i][1] for i in range(count)])
        magnitude = None if not use_dora else jnp.asarray(np.stack([by_layer[i][4] for i in range(count)]))
        factors[path] = LoraFactors(
            jnp.asarray(a), jnp.asarray(b), _scale(alpha, rank, rslora), (0,), (1,), (2,), dropout, magnitude
        )
        scales[path] = (rank, alpha)

    trained = _replaced_leaves(names, replaced, leaves, problems)
    for path in sorted(set(trained) & set(factors)):
        problems.append(f"{path!r} has both LoRA factors and a full replacement weight in the file")
    _check_base_layers(names, base_layers, leaves, problems)
    if name_map is None:
        _check_tied_embedding(leaves, factors, trained, problems)
    if not factors and not problems:
        problems.append("the file holds no LoRA factors")
    if problems:
        raise _import_error(problems)

    entries = [(parts_of[p], f) for p, f in factors.items()] + [(parts_of[p], v) for p, v in trained.items()]
    adapters = _tree._nest(iter(sorted(entries, key=lambda e: e[0])))
    spec = LoraSpec(
        rank=rank_default,
        alpha=alpha_default,
        targets=[re.escape(p) for p in sorted(factors)],
        train=[re.escape(p) for p in sorted(trained)] or None,
        rslora=rslora,
        rank_pattern={re.escape(p): r for p, (r, _) in sorted(scales.items()) if r != rank_default},
        alpha_pattern={re.escape(p): al for p, (_, al) in sorted(scales.items()) if al != alpha_default},
        dropout=dropout,
        use_dora=use_dora,
    )
    return adapters, spec


def frozen_for(params: PyTree, adapters: PyTree) -> PyTree:
    """The frozen tree that goes with imported adapters: ``params`` with ``None``
    at every leaf the adapters train in full.

    This is the tree :func:`lora_jax.split` returns as ``frozen`` for the same
    spec; ``wrap`` and ``merge`` take it with the adapters of
    :func:`import_peft`.

    Args:
      params: the base parameters.
      adapters: an adapter tree for ``params`` (from :func:`import_peft` or
        :func:`lora_jax.split`).

    Returns:
      ``params`` with the same structure, ``None`` at the fully trained leaves.

    Raises:
      ValueError: an adapter's path is not a leaf of ``params``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}
    >>> frozen_for(params, {"norm": jnp.zeros(2)})["norm"] is None
    True
    """
    trained = {p for p, x in _tree.adapter_entries(adapters).items() if not isinstance(x, LoraFactors)}
    if not trained:
        return params
    flat, treedef = _tree._flatten(params)
    missing = sorted(trained - {path for path, _, _ in flat})
    if missing:
        raise ValueError(
            f"frozen_for: the adapters train {missing[:5]} in full, which are not leaves of `params`; these "
            "adapters do not belong to these params."
        )
    return jax.tree_util.tree_unflatten(treedef, [None if path in trained else x for path, _, x in flat])


def _import_error(problems: list[str]) -> ValueError:
    return ValueError("import_peft: cannot read this PEFT adapter:\n  - " + "\n  - ".join(problems))


def _config_problems(config: Mapping[str, Any]) -> list[str]:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"peft_type is {peft_type!r}; only 'LORA' adapters are read"]
    problems = []
    for field, what in _UNSUPPORTED_FEATURES.items():
        if config.get(field):
            problems.append(f"{field}={config[field]!r}: {what} is not supported (only plain LoRA is)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases are not supported (only bias='none' is)")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        problems.append(
            f"init_lora_weights={init!r}: this initialisation rewrites the base weights, so the factors fit only "
            "that rewritten base. Convert the adapter to plain LoRA (save_pretrained with "
            "path_initial_model_for_weight_conversion=...) first"
        )
    return problems


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _locate(
    names: NameMap, module: str, leaves: Mapping[str, Any], problems: list[str]
) -> tuple[str, int | None] | None:
    try:
        path, layer = names.from_hf(module)
    except (ValueError, KeyError) as e:
        problems.append(f"module {module!r} cannot be placed in `params` by the name map: {e}")
        return None
    if path not in leaves:
        problems.append(
            f"module {module!r} maps to {path!r}, which is not a leaf of `params` (is the name map right, scanned "
            "or not?)"
        )
        return None
    count = np.shape(leaves[path])[0] if layer is not None else None
    if layer is not None and not 0 <= layer < count:
        problems.append(f"module {module!r} maps to layer {layer} of {path!r}, which stacks {count} layers")
        return None
    return path, layer


def _param_path(weight_path: str, param: str) -> str:
    return weight_path if param == "weight" else f"{weight_path.rsplit('/', 1)[0]}/{param}"


def _replaced_leaves(
    names: NameMap,
    replaced: Mapping[str, Mapping[str, np.ndarray]],
    leaves: Mapping[str, Any],
    problems: list[str],
) -> dict[str, np.ndarray]:
    """Leaves the file replaces in full (``modules_to_save``), in the layout and dtype of ``params``."""
    per_layer: dict[str, dict[int | None, np.ndarray]] = collections.defaultdict(dict)
    for module, params in sorted(replaced.items()):
        located = _locate(names, module, leaves, problems)
        if located is None:
            continue
        weight_path, layer = located
        for param, value in params.items():
            path = _param_path(weight_path, param)
            if path not in leaves:
                problems.append(f"tensor {module}.{param} maps to {path!r}, which is not a leaf of `params`")
                continue
            if path.rsplit("/", 1)[-1] == "kernel" and value.ndim == 2:
                value = value.T
            per_layer[path][layer] = value
    out = {}
    for path, by_layer in per_layer.items():
        leaf = leaves[path]
        dtype = np.dtype(leaf.dtype)
        if None in by_layer:
            value = by_layer[None]
        else:
            value = np.array(leaf, dtype=dtype)
            for layer, v in by_layer.items():
                if v.shape != value.shape[1:]:
                    value = None
                    problems.append(
                        f"{path!r} layer {layer}: the file's tensor has shape {tuple(v.shape)}, the leaf "
                        f"{tuple(np.shape(leaf)[1:])} per layer"
                    )
                    break
                value[layer] = v.astype(dtype)
            if value is None:
                continue
        if value.shape != np.shape(leaf):
            problems.append(
                f"{path!r}: the file's tensor has shape {tuple(value.shape)} (torch layout: "
                f"{tuple(by_layer[None].shape)}) but the leaf in `params` has shape {tuple(np.shape(leaf))}"
            )
            continue
        out[path] = jnp.asarray(value.astype(dtype))
    return out


def _check_base_layers(
    names: NameMap,
    base_layers: Mapping[str, Mapping[str, np.ndarray]],
    leaves: Mapping[str, Any],
    problems: list[str],
) -> None:
    """PEFT saves the base weight of a targeted embedding; accept it only if it is the weight of ``params``."""
    for module, params in sorted(base_layers.items()):
        located = _locate(names, module, leaves, problems)
        if located is None:
            continue
        weight_path, layer = located
        for param, value in params.items():
            path = _param_path(weight_path, param)
            leaf = leaves.get(path)
            if leaf is None:
                problems.append(f"tensor {module}.base_layer.{param} maps to {path!r}, which is not a leaf of `params`")
                continue
            base = np.asarray(leaf if layer is None else leaf[layer])
            if path.rsplit("/", 1)[-1] == "kernel" and value.ndim == 2:
                value = value.T
            # Compare in the lower of the two precisions: a float32 file for bfloat16 params is the same weight.
            low = min((np.dtype(value.dtype), np.dtype(base.dtype)), key=lambda d: d.itemsize)
            if value.shape != base.shape or not np.array_equal(value.astype(low), base.astype(low)):
                problems.append(
                    f"the file carries a base weight for {module!r} ({module}.base_layer.{param}) that differs from "
                    f"{path!r} in `params` (a resized or retrained embedding); only adapters for the unchanged base "
                    "weights are read"
                )


def _check_tied_embedding(leaves: Mapping[str, Any], factors: Mapping, trained: Mapping, problems: list[str]) -> None:
    # The Llama here reads the output head from the embedding when it has no lm_head; PEFT adapts
    # (or replaces) the input lookup only, so importing would change the head too.
    embedding = [p for p in leaves if re.search(r"(^|/)model/embed_tokens/embedding$", p)]
    if not embedding or any(re.search(r"(^|/)lm_head/", p) for p in leaves):
        return
    for path in embedding:
        if path in factors or path in trained:
            problems.append(
                f"{path!r} is adapted, but this model ties its output head to that embedding while PEFT changed only "
                "the input lookup; load the adapter into an untied copy of the model (tie_word_embeddings=False "
                "with lm_head set to the embedding)"
            )


# ----------------------------------------------------------------------------
# Merged checkpoint
# ----------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _parse_size(size: int | str) -> int:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0:
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
    if match and match.group(2).upper() in _SIZE_UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    raise ValueError(
        f"export_merged_hf: `max_shard_size` must be a positive number of bytes or a string such as '5GB' or "
        f"'500MiB'; got {size!r}."
    )


def export_merged_hf(
    frozen: PyTree,
    adapters: PyTree,
    config: Any,
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> pathlib.Path:
    """Writes a fine-tuned Llama as a plain transformers checkpoint, adapters folded in.

    ``merge(frozen, adapters)`` is written as ``config.json`` and
    ``model.safetensors`` (or ``model-00001-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` when it exceeds ``max_shard_size``), which
    ``transformers.AutoModelForCausalLM.from_pretrained`` and
    :func:`lora_jax.models.load_hf_checkpoint` load. A scanned tree is
    unstacked, kernels are transposed to torch's ``[out, in]``, and a tied
    model gets no ``lm_head.weight``. The config writes ``rope_theta`` both at
    the top level and in ``rope_parameters`` so old and new transformers read
    it. Written atomically, as :func:`export_peft` writes: an existing
    ``directory`` is replaced only if it is empty or holds nothing but a
    previous checkpoint of this form.

    Args:
      frozen: the frozen tree from :func:`lora_jax.split` (or the full params).
      adapters: the adapter tree.
      config: the model's :class:`lora_jax.models.LlamaConfig`.
      directory: where to write the checkpoint.
      max_shard_size: the largest shard in bytes, or a string such as
        ``"5GB"`` (powers of 1000) or ``"500MiB"`` (powers of 1024). A single
        tensor larger than this gets a shard of its own.
      dtype: dtype of the written floating-point tensors (e.g.
        ``jnp.bfloat16``); ``None`` keeps the merged weights' dtypes.

    Returns:
      The directory written.

    Raises:
      TypeError: ``config`` is not a ``LlamaConfig``.
      ValueError: the adapters do not belong to ``frozen``, the tree is not
        this Llama's, or ``max_shard_size`` is malformed.
      FileExistsError: ``directory`` holds files other than a previous checkpoint.

    >>> export_merged_hf(frozen, adapters, config, "out/merged", dtype=jnp.bfloat16)  # doctest: +SKIP
    """
    from lora_jax.models.llama import LlamaConfig, hf_key, unstack_layers

    if not isinstance(config, LlamaConfig):
        raise TypeError(
            f"export_merged_hf: `config` must be a lora_jax.models.LlamaConfig; got {type(config).__name__}."
        )
    shard_bytes = _parse_size(max_shard_size)
    params = _tree.merge(frozen, adapters)
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    if not isinstance(params, Mapping) or "model" not in params:
        raise ValueError(
            "export_merged_hf: expected a LlamaForCausalLM parameter tree with a 'model' entry (optionally under "
            f"'params'); got top-level keys {sorted(params) if isinstance(params, Mapping) else type(params)}."
        )
    if "layers" in params["model"]:
        params = unstack_layers(params)

    tensors: dict[str, np.ndarray] = {}
    for path, _, leaf in _tree._flatten(params)[0]:
        key = hf_key(path)
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        value = np.asarray(leaf)
        if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(jnp.dtype(dtype))
        if path.endswith("/kernel"):
            value = value.T
        tensors[key] = np.ascontiguousarray(value)

    floats = [v.dtype for v in tensors.values() if jnp.issubdtype(v.dtype, jnp.floating)]
    dtype_name = _most_common(str(d) for d in floats) if floats else "float32"
    hf_config = _llama_hf_config(config, dtype_name)

    shards: list[list[str]] = []
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if not shards or (size + nbytes > shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    def write(tmp: pathlib.Path) -> None:
        from safetensors.numpy import save_file

        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(tensors, tmp / "model.safetensors", metadata=_SAFETENSORS_METADATA)
            return
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, tmp / name, metadata=_SAFETENSORS_METADATA)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def owned(name: str) -> bool:
        return name in ("config.json", "model.safetensors", "model.safetensors.index.json") or bool(
            re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)
        )

    return _write_atomically(directory, write, owned, caller="export_merged_hf")


def _llama_hf_config(config: Any, dtype_name: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ----------------------------------------------------------------------------
# Atomic directory writes
# ----------------------------------------------------------------------------


def _write_atomically(
    directory: str | os.PathLike[str],
    write: Callable[[pathlib.Path], None],
    owned: Callable[[str], bool],
    *,
    caller: str,
) -> pathlib.Path:
    """Writes into a fresh sibling directory, then moves it to ``directory``.

    A reader of ``directory`` sees the old complete export or the new one,
    never a partial one. An existing ``directory`` is replaced only if every
    entry in it is a file this exporter writes.
    """
    directory = pathlib.Path(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir() or directory.is_symlink():
            raise FileExistsError(f"{caller}: {str(directory)!r} exists and is not a directory (or is a symlink).")
        foreign = sorted(p.name for p in directory.iterdir() if not (owned(p.name) and p.is_file()))
        if foreign:
            raise FileExistsError(
                f"{caller}: {str(directory)!r} already holds {foreign[:8]}, which this export would not write; "
                "refusing to replace it. Choose a new directory or remove those files."
            )
    target = directory.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{tag}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
