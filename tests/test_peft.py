"""PEFT interop against PEFT and transformers themselves, on a tiny random Llama."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.models import LlamaForCausalLM, load_hf_checkpoint
from lora_jax.peft import NameMap, export_merged_hf, export_peft, frozen_for, import_peft, llama_name_map
from tests._hf import ROPE_THETA, SMALL, random_hf_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(2, 11))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-4


def _is_factors(x) -> bool:
    return isinstance(x, lora.LoraFactors)


@contextlib.contextmanager
def _third_party_warnings():
    """Tolerates the deprecation notices transformers and PEFT emit on their own code paths.

    pytest turns warnings into errors here. These two come from the libraries
    calling each other (PEFT reading a transformers attribute that transformers
    deprecated; PEFT announcing that it saves a targeted embedding's base
    weight), not from anything under test. Warnings about missing or
    unexpected adapter keys are still errors.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`.*", category=UserWarning)
        yield


def _hf_model(tied: bool, seed: int = 0):
    """A random transformers Llama with randomised norms too."""
    return random_hf_llama(tied=tied, seed=seed)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(request, tmp_path_factory):
    """(transformers model, its checkpoint directory, tied)."""
    directory = tmp_path_factory.mktemp("tied" if request.param else "untied")
    model = _hf_model(request.param)
    model.save_pretrained(directory)
    return model, directory, request.param


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(transformers model, its checkpoint directory) with an untied head, shared by most tests."""
    directory = tmp_path_factory.mktemp("base")
    model = _hf_model(False)
    model.save_pretrained(directory)
    return model, directory


def _load(directory, scan_layers: bool):
    config, variables = load_hf_checkpoint(directory, scan_layers=scan_layers)
    return config, LlamaForCausalLM(config), variables


def _perturb(adapters, seed: int):
    """Random non-zero factors (and fully trained leaves), so every comparison can fail."""
    rng = np.random.default_rng(seed)

    def noise(shape, dtype):
        return jnp.asarray(rng.normal(0.0, 0.1, shape), dtype)

    def one(x):
        if _is_factors(x):
            magnitude = (
                None if x.magnitude is None else x.magnitude * (1.0 + noise(x.magnitude.shape, x.magnitude.dtype))
            )
            return dataclasses.replace(
                x,
                lora_a=noise(x.lora_a.shape, x.lora_a.dtype),
                lora_b=noise(x.lora_b.shape, x.lora_b.dtype),
                magnitude=magnitude,
            )
        return x + noise(x.shape, x.dtype)

    return jax.tree.map(one, adapters, is_leaf=_is_factors)


def _split(model, variables, spec, seed: int = 1):
    frozen, adapters = lora.split(
        variables, spec, key=jax.random.key(seed), trace=lambda p: model.apply(p, jnp.asarray(IDS))
    )
    return frozen, _perturb(adapters, seed)


def _ours(model, frozen, adapters) -> np.ndarray:
    return np.asarray(lora.wrap(model.apply)(frozen, adapters, jnp.asarray(IDS)))


def _assert_same_trees(x, y) -> None:
    assert jax.tree.structure(x, is_leaf=_is_factors) == jax.tree.structure(y, is_leaf=_is_factors)
    for a, b in zip(jax.tree.leaves(x, is_leaf=_is_factors), jax.tree.leaves(y, is_leaf=_is_factors)):
        if _is_factors(a):
            assert (a.scale, a.stack_axes, a.a_axes, a.b_axes, a.dropout) == (
                b.scale,
                b.stack_axes,
                b.a_axes,
                b.b_axes,
                b.dropout,
            )
            np.testing.assert_array_equal(a.lora_a, b.lora_a)
            np.testing.assert_array_equal(a.lora_b, b.lora_b)
            assert (a.magnitude is None) == (b.magnitude is None)
            if a.magnitude is not None:
                np.testing.assert_array_equal(a.magnitude, b.magnitude)
        else:
            np.testing.assert_array_equal(a, b)


def _load_in_peft(hf_model, directory):
    """PeftModel on a copy of ``hf_model``; checks every file key was loaded and none is missing."""
    with _third_party_warnings():
        model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), directory).eval()
        loaded = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    written = safetensors_numpy.load_file(directory / "adapter_model.safetensors")
    assert set(loaded) == set(written), (
        f"missing in the file: {sorted(set(loaded) - set(written))}; not loaded: {sorted(set(written) - set(loaded))}"
    )
    for key, value in written.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    return model


# ----------------------------------------------------------------------------
# Export: lora_jax -> PEFT
# ----------------------------------------------------------------------------

SPECS = {
    "plain": lora.LoraSpec(rank=4, targets="all-linear"),
    "patterns": lora.LoraSpec(
        rank=4,
        alpha=8,
        targets="all-linear",
        rank_pattern={r".*/q_proj/kernel": 2, r".*layers_1/mlp/down_proj/kernel": 3},
        alpha_pattern={r".*/v_proj/kernel": 3.0, r".*layers_0/mlp/up_proj/kernel": 5.0},
        rslora=True,
        train=r".*norm.*",
    ),
    "embedding": lora.LoraSpec(
        rank=4, alpha=16, targets=["all-linear", r".*/embed_tokens/embedding"], train=".*/norm/.*"
    ),
    "dora": lora.LoraSpec(rank=4, alpha=8, targets="all-linear", use_dora=True),
}


@pytest.mark.parametrize("variant", sorted(SPECS))
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_export_loads_in_peft_with_the_same_logits(untied, tmp_path, variant, scan_layers) -> None:
    hf_model, checkpoint = untied
    _, model, variables = _load(checkpoint, scan_layers)
    spec = SPECS[variant]
    frozen, adapters = _split(model, variables, spec)
    ours = _ours(model, frozen, adapters)
    assert np.abs(ours - _torch_logits(hf_model)).max() > 0.1  # the adapters matter

    directory = export_peft(adapters, spec, tmp_path / "adapter", base_model_name_or_path=str(checkpoint))
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is (variant == "dora") and config["bias"] == "none"
    assert config["base_model_name_or_path"] == str(checkpoint)
    expected_targets = sorted(PROJECTIONS + (["embed_tokens"] if variant == "embedding" else []))
    assert config["target_modules"] == expected_targets
    assert config["use_rslora"] is spec.rslora
    with safetensors_numpy.safe_open(directory / "adapter_model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] == [4, 64]
    assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] == [32, 4]
    if variant == "patterns":
        assert config["rank_pattern"] == (
            {"q_proj": 2} if scan_layers else {"q_proj": 2, "model.layers.1.mlp.down_proj": 3}
        )
        assert config["alpha_pattern"] == (
            {"v_proj": 3} if scan_layers else {"v_proj": 3, "model.layers.0.mlp.up_proj": 5}
        )
        assert "model.layers.1.post_attention_layernorm" in config["modules_to_save"]
        assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == [2, 64]
    if variant == "dora":
        assert shapes["base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"] == [32]
    if variant == "embedding":
        assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == [4, 128]
        assert shapes["base_model.model.model.embed_tokens.lora_embedding_B"] == [64, 4]
        assert config["modules_to_save"] == ["model.norm"]

    peft_model = _load_in_peft(hf_model, directory)
    np.testing.assert_allclose(_torch_logits(peft_model), ours, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------
# Import: PEFT -> lora_jax
# ----------------------------------------------------------------------------

PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=PROJECTIONS,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        lora_dropout=0.1,
        modules_to_save=["input_layernorm", "model.norm"],
    ),
    "embedding": dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS, use_dora=True),
}


def _peft_adapter(hf_model, directory: pathlib.Path, seed: int = 0, **config) -> np.ndarray:
    """Saves a PEFT LoRA adapter with random factors and returns the PEFT model's logits."""
    with _third_party_warnings():
        model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(task_type="CAUSAL_LM", **config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    with _third_party_warnings():
        model.save_pretrained(directory)  # default save_embedding_layers: writes a targeted embedding's base too
    return _torch_logits(model)


@pytest.mark.parametrize("variant", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_import_of_a_peft_adapter_gives_peft_logits(untied, tmp_path, variant, scan_layers) -> None:
    hf_model, checkpoint = untied
    theirs = _peft_adapter(hf_model, tmp_path, **PEFT_CONFIGS[variant])
    assert np.abs(theirs - _torch_logits(hf_model)).max() > 0.1
    _, model, variables = _load(checkpoint, scan_layers)

    adapters, spec = import_peft(tmp_path, variables)
    frozen = frozen_for(variables, adapters)
    np.testing.assert_allclose(_ours(model, frozen, adapters), theirs, atol=ATOL, rtol=0)
    if variant != "patterns":
        assert frozen is variables  # nothing trains in full

    # split with the returned spec selects the same leaves and makes the same frozen tree.
    split_frozen, fresh = lora.split(
        variables, spec, key=jax.random.key(0), trace=lambda p: model.apply(p, jnp.asarray(IDS))
    )
    assert jax.tree.structure(fresh, is_leaf=_is_factors) == jax.tree.structure(adapters, is_leaf=_is_factors)
    assert jax.tree.structure(split_frozen) == jax.tree.structure(frozen)
    jax.tree.map(lambda x, y: x is y or pytest.fail("split's frozen leaf differs"), split_frozen, frozen)
    for path, f in _entries(adapters).items():
        if _is_factors(f):
            assert spec.scale_for(path) == f.scale and spec.rank_for(path) == f.rank
            assert f.stack_axes == ((0,) if scan_layers and "/layers/" in path else ())
            assert f.dropout == PEFT_CONFIGS[variant].get("lora_dropout", 0.0)
    merged = LlamaForCausalLM(model.config).apply(lora.merge(frozen, adapters), jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(merged), theirs, atol=ATOL, rtol=0)

    if variant == "patterns":
        trained = [p for p, x in _entries(adapters).items() if not _is_factors(x)]
        assert ("params/model/layers/input_layernorm/scale" in trained) == scan_layers
        assert "params/model/norm/scale" in trained and spec.rslora
        assert jax.tree.leaves(frozen["params"]["model"]["norm"]) == []  # None where a leaf trains in full


def _entries(adapters):
    flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_factors)[0]
    return {"/".join(str(k.key) for k in path): x for path, x in flat}


def test_import_of_per_layer_ranks_needs_an_unscanned_tree(untied, tmp_path) -> None:
    hf_model, checkpoint = untied
    theirs = _peft_adapter(
        hf_model,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["down_proj"],
        rank_pattern={"model.layers.1.mlp.down_proj": 6},
    )
    _, model, variables = _load(checkpoint, False)
    adapters, spec = import_peft(tmp_path, variables)
    assert spec.rank_for("params/model/layers_1/mlp/down_proj/kernel") == 6
    assert spec.rank_for("params/model/layers_0/mlp/down_proj/kernel") == 4
    np.testing.assert_allclose(_ours(model, variables, adapters), theirs, atol=ATOL, rtol=0)
    _, _, scanned = _load(checkpoint, True)
    with pytest.raises(ValueError, match=r"layers whose \(rank, alpha\) differ.*unscanned"):
        import_peft(tmp_path, scanned)


def test_import_of_some_layers_needs_an_unscanned_tree(untied, tmp_path) -> None:
    hf_model, checkpoint = untied
    _peft_adapter(hf_model, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1])
    _, _, variables = _load(checkpoint, False)
    adapters, _ = import_peft(tmp_path, variables)
    assert (
        "layers_0" not in adapters["params"]["model"]
        and "q_proj" in adapters["params"]["model"]["layers_1"]["self_attn"]
    )
    _, _, scanned = _load(checkpoint, True)
    with pytest.raises(ValueError, match=r"factors for layers \[1\] only \(missing \[0\]\)"):
        import_peft(tmp_path, scanned)


# ----------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_export_then_import_gives_the_same_adapters(untied, tmp_path, scan_layers) -> None:
    _, checkpoint = untied
    _, model, variables = _load(checkpoint, scan_layers)
    for name in ("patterns", "embedding"):
        spec = SPECS[name]
        _, adapters = _split(model, variables, spec)
        directory = export_peft(adapters, spec, tmp_path / name)
        imported, imported_spec = import_peft(directory, variables)
        _assert_same_trees(adapters, imported)
        assert imported_spec.rslora == spec.rslora and imported_spec.dropout == spec.dropout
        for path, f in _entries(imported).items():
            if _is_factors(f):
                assert imported_spec.scale_for(path) == spec.scale_for(path) == f.scale


def test_bfloat16_adapters_round_trip(tmp_path) -> None:
    params = {"dense": {"kernel": jnp.ones((16, 8), jnp.bfloat16)}}
    spec = lora.LoraSpec(rank=2, targets="dense/kernel")
    _, adapters = lora.split(params, spec, key=jax.random.key(0))
    adapters = _perturb(adapters, 4)
    names = NameMap(to_hf=lambda path, layer: "dense", from_hf=lambda module: ("dense/kernel", None))
    directory = export_peft(adapters, spec, tmp_path / "bf16", name_map=names)
    with safetensors_numpy.safe_open(directory / "adapter_model.safetensors", "np") as f:
        assert f.get_slice("base_model.model.dense.lora_A.weight").get_dtype() == "BF16"
    imported, _ = import_peft(directory, params, name_map=names)
    assert imported["dense"]["kernel"].lora_a.dtype == jnp.bfloat16
    _assert_same_trees(adapters, imported)


def test_export_replaces_a_previous_adapter_but_nothing_else(untied, tmp_path) -> None:
    _, checkpoint = untied
    _, model, variables = _load(checkpoint, False)
    spec = lora.LoraSpec(rank=2, targets=r".*/q_proj/kernel")
    _, first = _split(model, variables, spec, seed=1)
    _, second = _split(model, variables, spec, seed=2)
    (tmp_path / "empty").mkdir()
    export_peft(first, spec, tmp_path / "empty")
    export_peft(second, spec, tmp_path / "empty")
    _assert_same_trees(import_peft(tmp_path / "empty", variables)[0], second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary directories left behind

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt.*refusing"):
        export_peft(first, spec, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------
# Merged checkpoint
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_merged_export_loads_in_transformers_and_here(base, tmp_path, scan_layers) -> None:
    hf_model, checkpoint, tied = base
    config, model, variables = _load(checkpoint, scan_layers)
    spec = lora.LoraSpec(rank=4, targets="all-linear", train=r".*/norm/.*")
    frozen, adapters = _split(model, variables, spec)
    ours = _ours(model, frozen, adapters)
    assert np.abs(ours - _torch_logits(hf_model)).max() > 0.1

    sharded = scan_layers  # one layout each way keeps the test short
    directory = export_merged_hf(
        frozen, adapters, config, tmp_path / "merged", max_shard_size=30_000 if sharded else "5GB"
    )
    files = sorted(p.name for p in directory.iterdir())
    if sharded:
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted(["config.json", "model.safetensors.index.json", *shards])
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(
            v.nbytes for s in shards for v in safetensors_numpy.load_file(directory / s).values()
        )
        keys = set(index["weight_map"])
    else:
        assert files == ["config.json", "model.safetensors"]
        keys = set(safetensors_numpy.load_file(directory / "model.safetensors"))
    assert ("lm_head.weight" in keys) == (not tied)
    assert "model.layers.1.self_attn.q_proj.weight" in keys

    with _third_party_warnings():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert loaded.config.tie_word_embeddings == tied
    np.testing.assert_allclose(_torch_logits(loaded), ours, atol=ATOL, rtol=0)

    config_back, variables_back = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert config_back.rope_theta == ROPE_THETA and config_back.tie_word_embeddings == tied
    jax.tree.map(np.testing.assert_array_equal, variables_back, lora.merge(frozen, adapters))


def test_merged_export_casts_to_dtype(untied, tmp_path) -> None:
    _, checkpoint = untied
    config, _, variables = _load(checkpoint, False)
    directory = export_merged_hf(variables, {}, config, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((directory / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, back = load_hf_checkpoint(directory, dtype=jnp.bfloat16)
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    jax.tree.map(np.testing.assert_array_equal, back, expected)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(untied, tmp_path_factory):
    """An exported adapter (unscanned) and the params it belongs to, for corrupting."""
    _, checkpoint = untied
    _, model, variables = _load(checkpoint, False)
    spec = lora.LoraSpec(rank=4, targets=r".*/(q_proj|down_proj)/kernel", train=r".*/norm/scale")
    _, adapters = _split(model, variables, spec)
    directory = export_peft(adapters, spec, tmp_path_factory.mktemp("exported") / "adapter")
    return directory, variables, adapters, spec


def _corrupt(exported, tmp_path, *, config=None, tensors=None) -> pathlib.Path:
    """A copy of the exported adapter with config fields and tensors changed (``None`` deletes)."""
    source = exported[0]
    cfg = json.loads((source / "adapter_config.json").read_text())
    weights = dict(safetensors_numpy.load_file(source / "adapter_model.safetensors"))
    for key, value in (config or {}).items():
        cfg[key] = value
    for key, value in (tensors or {}).items():
        if value is None:
            del weights[key]
        else:
            weights[key] = value
    target = tmp_path / "corrupt"
    target.mkdir()
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file(weights, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config={"use_dora": True}), r"q_proj' lacks a lora_magnitude_vector but the config says use_dora=True"),
        (dict(config={"peft_type": "IA3"}), r"peft_type is 'IA3'; only 'LORA'"),
        (dict(config={"lora_bias": True}), r"lora_bias=True"),
        (dict(config={"target_parameters": ["experts.w1"]}), r"target_parameters"),
        (dict(config={"bias": "all"}), r"bias='all'"),
        (dict(config={"init_lora_weights": "pissa"}), r"init_lora_weights='pissa'.*rewrites the base"),
        (
            dict(tensors={f"{Q0}.lora_magnitude_vector": np.ones(64, np.float32)}),
            r"q_proj' has a lora_magnitude_vector but the config says use_dora=False",
        ),
        (dict(tensors={"model.layers.0.q_proj.lora_A.weight": np.ones((4, 64), np.float32)}), r"does not start"),
        (
            dict(
                tensors={
                    "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": np.ones((4, 64), np.float32),
                    "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": np.ones((96, 4), np.float32),
                }
            ),
            r"layers\.7\.mlp\.up_proj.*not a leaf of `params`",
        ),
        (dict(tensors={f"{Q0}.lora_B.weight": None}), r"q_proj' has only \['lora_A\.weight'\]"),
        (
            dict(tensors={f"{Q0}.lora_A.weight": np.ones((4, 48), np.float32)}),
            r"48x64 update.*q_proj/kernel.*shape \(64, 64\).*\(4, 48\) and \(64, 4\)",
        ),
        (dict(config={"r": 8}), r"rank 4 in the file but the config gives it r=8"),
        (
            dict(tensors={"base_model.model.model.norm.weight": np.ones(32, np.float32)}),
            r"norm/scale.*shape \(32,\).*\(64,\)",
        ),
    ],
)
def test_import_rejects(exported, tmp_path, change, message) -> None:
    directory = _corrupt(exported, tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        import_peft(directory, exported[1])


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"base_model.model.model.layers.0.input_layernorm.weight": np.ones(32, np.float32)}, r"layer 0: .*\(32,\)"),
        (
            {
                "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.ones((4, 64), np.float32),
                "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": np.ones((64, 4), np.float32),
            },
            r"layer 5 of 'params/model/layers/self_attn/q_proj/kernel', which stacks 2 layers",
        ),
    ],
    ids=["stacked-shape", "layer-out-of-range"],
)
def test_import_into_a_scanned_tree_rejects(untied, exported, tmp_path, tensors, message) -> None:
    _, _, scanned = _load(untied[1], True)
    import_peft(exported[0], scanned)  # the unscanned export is fine for a scanned tree
    with pytest.raises(ValueError, match=message):
        import_peft(_corrupt(exported, tmp_path, tensors=tensors), scanned)


def test_import_rejects_more(exported, tmp_path) -> None:
    cases = {
        "pair": ({f"{Q0}.lora_B.weight": np.ones((64, 3), np.float32)}, r"\(4, 64\) and \(64, 3\) do not form"),
        "both": ({f"{Q0}.weight": np.ones((64, 64), np.float32)}, r"q_proj/kernel' has both LoRA factors and a full"),
        "none": (
            {k: None for k in safetensors_numpy.load_file(exported[0] / "adapter_model.safetensors") if "lora_" in k},
            r"the file holds no LoRA factors",
        ),
    }
    for name, (tensors, message) in cases.items():
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError, match=message):
            import_peft(_corrupt(exported, tmp_path / name, tensors=tensors), exported[1])


def test_frozen_for(exported) -> None:
    _, variables, adapters, _ = exported
    frozen = frozen_for(variables, adapters)
    assert frozen["params"]["model"]["norm"]["scale"] is None
    assert frozen["params"]["lm_head"]["kernel"] is variables["params"]["lm_head"]["kernel"]
    with pytest.raises(ValueError, match=r"frozen_for: the adapters train \['params/model/norm/scale'\] in full"):
        frozen_for(variables["params"], adapters)


def test_import_lists_every_problem(exported, tmp_path) -> None:
    directory = _corrupt(
        exported,
        tmp_path,
        config={"use_qalora": True, "lora_bias": True},
        tensors={f"{Q0}.lora_B.weight": None, f"{Q0}.extra": np.ones(2, np.float32)},
    )
    with pytest.raises(ValueError) as info:
        import_peft(directory, exported[1])
    assert "use_qalora" in str(info.value) and "lora_bias" in str(info.value)
    # Features are checked before tensors are read; once they pass, all tensor problems are listed.
    (tmp_path / "b").mkdir()
    directory = _corrupt(exported, tmp_path / "b", tensors={f"{Q0}.lora_B.weight": None, f"{Q0}.extra": np.ones(2)})
    with pytest.raises(ValueError, match=r"(?s)unknown tensor key.*extra.*has only \['lora_A\.weight'\]"):
        import_peft(directory, exported[1])


def test_import_rejects_missing_files(exported, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_peft(tmp_path / "nowhere", exported[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        import_peft(tmp_path / "empty", exported[1])
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors \(it has adapter_model\.bin.*safetensors"):
        import_peft(tmp_path / "pickled", exported[1])


def test_import_rejects_a_changed_base_embedding(untied, tmp_path) -> None:
    hf_model, checkpoint = untied
    _peft_adapter(hf_model, tmp_path, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    _, _, variables = _load(checkpoint, False)
    import_peft(tmp_path, variables)  # the saved base embedding equals the one in params: fine
    shifted = jax.tree.map(lambda x: x, variables)
    embedding = variables["params"]["model"]["embed_tokens"]["embedding"]
    shifted["params"]["model"]["embed_tokens"]["embedding"] = embedding + 1
    with pytest.raises(ValueError, match=r"base weight for 'model\.embed_tokens'.*differs"):
        import_peft(tmp_path, shifted)


def test_import_rejects_an_embedding_adapter_on_a_tied_head(tmp_path) -> None:
    tied = _hf_model(True)
    tied.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="ensure_weight_tying"):  # PEFT's own caveat about exactly this case
        _peft_adapter(tied, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    _, _, variables = _load(tmp_path / "base", False)
    with pytest.raises(ValueError, match=r"ties its output head to that embedding"):
        import_peft(tmp_path / "adapter", variables)


def _factors(shape_a, shape_b, **axes):
    return lora.LoraFactors(jnp.ones(shape_a), jnp.ones(shape_b), 1.0, **axes)


@pytest.mark.parametrize(
    "adapters, kwargs, message",
    [
        (
            {
                "params": {
                    "model": {
                        "layers_0": {
                            "self_attn": {
                                "q_proj": {"kernel": _factors((4, 16, 2), (2, 64), a_axes=(0, 1), b_axes=(2,))}
                            }
                        }
                    }
                }
            },
            {},
            r"q_proj/kernel' has per-layer factors A \(4, 16, 2\).*2 input and 1 output axes.*supported are 2-D",
        ),
        (
            {
                "params": {
                    "model": {
                        "layers": {
                            "mlp": {
                                "up_proj": {
                                    "kernel": _factors(
                                        (2, 3, 64, 2), (2, 3, 2, 96), stack_axes=(0, 1), a_axes=(2,), b_axes=(3,)
                                    )
                                }
                            }
                        }
                    }
                }
            },
            {},
            r"up_proj/kernel' has 2 stack axes \(0, 1\)",
        ),
        (
            {"params": {"lm_head": {"kernel": _factors((64, 2), (2, 128)), "bias": jnp.zeros(128)}}},
            {},
            r"module 'lm_head' has LoRA factors and a leaf trained in full",
        ),
        (
            {
                "params": {
                    "lm_head": {"kernel": _factors((64, 2), (2, 128))},
                    "model": {"norm": {"scale": jnp.ones(64)}},
                }
            },
            {"modules_to_save": False},
            r"norm/scale' is trained in full; pass modules_to_save=True",
        ),
        ({"params": {"model": {"norm": {"scale": jnp.ones(64)}}}}, {}, r"holds no LoRA factors"),
        (
            {
                "params": {
                    "lm_head": {"kernel": dataclasses.replace(_factors((64, 2), (2, 128)), dropout=0.1)},
                    "model": {"layers_0": {"mlp": {"up_proj": {"kernel": _factors((64, 2), (2, 96))}}}},
                }
            },
            {},
            r"different dropout rates \[0\.0, 0\.1\]",
        ),
    ],
    ids=["multi-axis", "two-stack-axes", "lora-and-full", "no-modules-to-save", "no-factors", "dropouts"],
)
def test_export_rejects(tmp_path, adapters, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        export_peft(adapters, lora.LoraSpec(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_rejects_what_the_name_map_cannot_place(tmp_path) -> None:
    factors = _factors((8, 2), (2, 16))
    same = NameMap(to_hf=lambda path, layer: "encoder.dense", from_hf=lambda module: ("a/kernel", None))
    with pytest.raises(ValueError, match=r"'b/kernel' and 'a/kernel' both map to the PEFT key"):
        export_peft(
            {"a": {"kernel": factors}, "b": {"kernel": factors}}, lora.LoraSpec(), tmp_path / "o", name_map=same
        )

    def refuse(path, layer):
        raise ValueError("no such module")

    failing = NameMap(to_hf=refuse, from_hf=lambda module: ("a/kernel", None))
    with pytest.raises(ValueError, match=r"the name map cannot name 'a/kernel': no such module"):
        export_peft({"a": {"kernel": factors}}, lora.LoraSpec(), tmp_path / "o", name_map=failing)
    odd = {"params": {"lm_head": {"kernel": factors}, "model": {"norm": {"gain": jnp.ones(64)}}}}
    with pytest.raises(ValueError, match=r"norm/gain' is trained in full but its leaf name is none of"):
        export_peft(odd, lora.LoraSpec(), tmp_path / "o")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        export_peft(
            {"params": {"lm_head": {"kernel": _factors((64, 2), (2, 128))}}}, lora.LoraSpec(), tmp_path / "file"
        )


def test_export_argument_errors(tmp_path) -> None:
    adapters = {"lm_head": {"kernel": _factors((64, 2), (2, 128))}}
    with pytest.raises(TypeError, match="`spec` must be a lora_jax.LoraSpec"):
        export_peft(adapters, None, tmp_path / "out")
    with pytest.raises(TypeError, match="`adapters` must be the adapter tree"):
        export_peft(adapters["lm_head"]["kernel"], lora.LoraSpec(), tmp_path / "out")
    with pytest.raises(ValueError, match="max_shard_size"):
        export_merged_hf({}, {}, _llama_config(), tmp_path / "out", max_shard_size="lots")
    with pytest.raises(TypeError, match="`config` must be a lora_jax.models.LlamaConfig"):
        export_merged_hf({}, {}, {"vocab_size": 1}, tmp_path / "out")
    with pytest.raises(ValueError, match="expected a LlamaForCausalLM parameter tree with a 'model' entry"):
        export_merged_hf({"params": {"encoder": jnp.ones(2)}}, {}, _llama_config(), tmp_path / "out")


def _llama_config():
    from lora_jax.models import LlamaConfig

    return LlamaConfig(**SMALL)


# ----------------------------------------------------------------------------
# Name maps
# ----------------------------------------------------------------------------


def test_llama_name_map_round_trips() -> None:
    flat = llama_name_map(scan_layers=False)
    assert flat.to_hf("params/model/layers_3/self_attn/q_proj/kernel", None) == "model.layers.3.self_attn.q_proj"
    assert flat.from_hf("model.layers.3.self_attn.q_proj") == ("params/model/layers_3/self_attn/q_proj/kernel", None)
    assert flat.from_hf("model.embed_tokens") == ("params/model/embed_tokens/embedding", None)
    assert flat.is_embedding("model.embed_tokens") and not flat.is_embedding("lm_head")
    assert not flat.stacked("params/model/layers_0/input_layernorm/scale")
    scanned = llama_name_map(scan_layers=True, root="")
    assert scanned.to_hf("model/layers/input_layernorm/scale", 1) == "model.layers.1.input_layernorm"
    assert scanned.from_hf("model.layers.1.input_layernorm") == ("model/layers/input_layernorm/scale", 1)
    assert scanned.stacked("model/layers/input_layernorm/scale") and not scanned.stacked("model/norm/scale")


def test_custom_name_map(tmp_path) -> None:
    """A two-layer MLP exported with its own names, loaded back through the same map."""
    params = {"encoder": {"dense": {"kernel": jnp.ones((16, 16))}, "out": {"kernel": jnp.ones((16, 16))}}}
    names = NameMap(
        to_hf=lambda path, layer: re.sub(r"/kernel$", "", path).replace("/", "."),
        from_hf=lambda module: (module.replace(".", "/") + "/kernel", None),
    )
    spec = lora.LoraSpec(rank=2, alpha=4, targets=r"encoder/.*/kernel")
    _, adapters = lora.split(params, spec, key=jax.random.key(0))
    adapters = _perturb(adapters, 3)
    directory = export_peft(adapters, spec, tmp_path / "mlp", name_map=names, task_type=None)
    keys = set(safetensors_numpy.load_file(directory / "adapter_model.safetensors"))
    assert "base_model.model.encoder.dense.lora_A.weight" in keys
    assert json.loads((directory / "adapter_config.json").read_text())["target_modules"] == ["dense", "out"]
    imported, imported_spec = import_peft(directory, params, name_map=names)
    _assert_same_trees(adapters, imported)
    np.testing.assert_allclose(
        lora.merge(params, imported)["encoder"]["dense"]["kernel"],
        lora.merge(params, adapters)["encoder"]["dense"]["kernel"],
    )
    assert imported_spec.scale_for("encoder/out/kernel") == 2.0

    both = NameMap(to_hf=names.to_hf, from_hf=lambda module: ("encoder/out/kernel", None))
    with pytest.raises(ValueError, match=r"mapping to 'encoder/out/kernel' layer None appear twice"):
        import_peft(directory, {"encoder": {"out": {"kernel": jnp.ones((16, 16))}}}, name_map=both)
