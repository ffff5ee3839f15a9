"""The learn/forget study: the --smoke run end to end, and the spectral helpers on known matrices."""

import json
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax.experiments.study import StudyConfig, parse_methods, update_spectra, variance_rank

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn_forget")
    argv = ["--smoke", "--no-progress", "--out", str(out)]
    old = sys.argv
    sys.argv = ["learn_forget.py", *argv]
    try:
        results = runpy.run_path(str(ROOT / "examples" / "learn_forget.py"), run_name="not_main")["main"](argv)
    finally:
        sys.argv = old
    return results, out


def test_smoke_results_structure(smoke):
    results, out = smoke
    assert set(results["methods"]) == {"full", "lora4"}
    for key in ("code_ppl", "english_ppl"):
        assert np.isfinite(results["baseline"][key]) and results["baseline"][key] > 1
    steps = results["config"]["steps"]
    for rec in results["methods"].values():
        assert len(rec["train_loss"]) == len(rec["step_seconds"]) == steps
        assert [e["step"] for e in rec["evals"]] == StudyConfig(steps=steps, eval_points=2).eval_steps
        assert rec["final"]["code_ppl"] == rec["evals"][-1]["code_ppl"]
        assert rec["median_step_seconds"] > 0
    assert results["step_time_ratio"]["lora4"] > 0
    # What is written is what is returned (the JSON is rewritten with the total wall time).
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "learn_forget.png").stat().st_size > 10_000


def test_smoke_training_reduces_loss(smoke):
    results, _ = smoke
    for name, rec in results["methods"].items():
        # The same batch before and after training: free of batch-to-batch noise.
        assert rec["first_batch_loss_after"] < rec["first_batch_loss_before"] - 0.05, name
        assert rec["train_loss_last"] < rec["train_loss_first"], name


def test_smoke_lora_trains_far_fewer_parameters(smoke):
    results, _ = smoke
    full, lora4 = results["methods"]["full"], results["methods"]["lora4"]
    assert full["trainable_params"] == results["total_params"]
    assert lora4["trainable_params"] < 0.1 * full["trainable_params"]  # (3.6% for SmolLM2-135M at rank 16)
    # 2 layers x 7 projections, each [in, 4] + [4, out] with hidden 64, MLP 128, 2 of 4 heads for K/V.
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert lora4["trainable_params"] == 2 * per_layer


def test_smoke_spectral_summary(smoke):
    results, _ = smoke
    spectral = results["spectral"]
    assert spectral["num_matrices"] == 2 * 7  # every projection of both layers of the scan stack
    assert {r["layer"] for r in spectral["per_matrix"]} == {0, 1}
    assert all(0 < r["rank"] <= r["max_rank"] for r in spectral["per_matrix"])
    assert spectral["min_rank"] <= spectral["median_rank"] <= spectral["max_rank"]


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_variance_rank_of_low_rank_matrix(rank):
    rng = np.random.default_rng(rank)
    matrix = rng.normal(size=(96, rank)) @ rng.normal(size=(rank, 80))
    assert 1 <= variance_rank(matrix, fraction=0.9) <= rank
    assert variance_rank(matrix, fraction=1.0) == rank


def test_variance_rank_known_spectrum():
    # Singular values sqrt(5), sqrt(3), sqrt(1), sqrt(1): energies 5, 3, 1, 1 of 10.
    matrix = np.diag(np.sqrt([5.0, 3.0, 1.0, 1.0]))
    assert variance_rank(matrix, fraction=0.5) == 1
    assert variance_rank(matrix, fraction=0.8) == 2
    assert variance_rank(matrix, fraction=0.9) == 3
    assert variance_rank(np.zeros((3, 3))) == 0
    assert variance_rank(np.eye(100)) == 90


@pytest.mark.parametrize(
    ("delta", "fraction", "match"),
    [(np.ones(4), 0.9, "2-D"), (np.ones((2, 2)), 0.0, "fraction"), (np.ones((2, 2)), 1.5, "fraction")],
)
def test_variance_rank_errors(delta, fraction, match):
    with pytest.raises(ValueError, match=match):
        variance_rank(delta, fraction=fraction)


def test_update_spectra_per_layer_of_a_stack():
    rng = np.random.default_rng(0)

    def low_rank(rows, cols, rank):
        return rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))

    before = {"w": jnp.zeros((3, 16, 12)), "v": jnp.zeros((12, 5))}
    # Layer i of the stack gets a rank-(i + 1) update; `v` a rank-2 one.
    after = {
        "w": jnp.asarray(np.stack([low_rank(16, 12, i + 1) for i in range(3)]), jnp.float32),
        "v": jnp.asarray(low_rank(12, 5, 2), jnp.float32),
    }

    def apply(p, x):
        # The stack is used like an nn.scan over layers: layer i multiplies by p["w"][i].
        def layer(h, w):
            return h + jnp.tanh(h @ w).sum(-1, keepdims=True), None

        h, _ = jax.lax.scan(layer, x, p["w"])
        return h[:, :12] @ p["v"]

    x = jnp.ones((2, 16))
    spec = lora.LoraSpec(rank=1, targets="all-linear")
    _, adapters = lora.split(before, spec, key=jax.random.key(0), trace=lambda p: apply(p, x))
    records = update_spectra(before, after, adapters, fraction=1.0)
    by_key = {(r["path"], r["layer"]): r for r in records}
    assert {k: r["rank"] for k, r in by_key.items()} == {("w", 0): 1, ("w", 1): 2, ("w", 2): 3, ("v", None): 2}
    assert by_key[("w", 0)]["shape"] == [16, 12] and by_key[("v", None)]["max_rank"] == 5


def test_update_spectra_rejects_foreign_params():
    _, adapters = lora.split({"w": jnp.zeros((4, 4))}, lora.LoraSpec(rank=1, targets="w"), key=jax.random.key(0))
    with pytest.raises(ValueError, match="missing"):
        update_spectra({"u": jnp.zeros((4, 4))}, {"u": jnp.zeros((4, 4))}, adapters)


def test_parse_methods():
    assert [(m.name, m.rank) for m in parse_methods("full, lora16,lora64")] == [
        ("full", None),
        ("lora16", 16),
        ("lora64", 64),
    ]
    for bad, match in [
        ("lora", "unknown method"),
        ("full,sgd", "unknown method"),
        ("lora0", "positive"),
        ("", "no methods"),
        ("full,full", "distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_methods(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"seq_len": 1}, "seq_len"),
        ({"eval_points": 5, "steps": 3}, "eval_points"),
        ({"full_lr": 0.0}, "full_lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"warmup_steps": 10, "steps": 10}, "warmup_steps"),
        ({"variance_fraction": 0.0}, "variance_fraction"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
        ({"methods": ("full", "adapter")}, "unknown method"),
    ],
)
def test_study_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_cli_rejects_unknown_method(capsys):
    main = runpy.run_path(str(ROOT / "examples" / "learn_forget.py"), run_name="not_main")["main"]
    with pytest.raises(SystemExit):
        main(["--methods", "full,qlora"])
    assert "unknown method" in capsys.readouterr().err
