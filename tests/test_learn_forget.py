"""The learn-vs-forget study: the smoke run end to end (killed and resumed), and its parts on known answers."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lora
from lora_jax import checkpoint
from lora_jax.experiments.learn_forget import (
    PRESETS,
    CellStore,
    Method,
    StudyConfig,
    cell_id,
    intruder_records,
    parse_methods,
    summarise,
    update_spectra,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "learn_forget.py"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study, killed once two cells are stored, then run again to completion."""
    out = tmp_path_factory.mktemp("learn_forget")
    cmd = [sys.executable, str(EXAMPLE), "--smoke", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((out / "cells").glob("*-lr*.json"))) < 2:
            assert proc.poll() is None, "the run ended before it was killed: " + proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no two cells within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    stored = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*-lr*.json")}
    assert proc.returncode == -signal.SIGKILL
    main = __import__("runpy").run_path(str(EXAMPLE), run_name="not_main")["main"]
    results = main(["--smoke", "--no-progress", "--out", str(out)])
    return results, out, stored


def test_smoke_resumes_after_a_kill(smoke):
    results, out, stored = smoke
    config = PRESETS["smoke"]
    assert [c["id"] for c in results["cells"]] == [cell_id(d, m, lr) for d, m, lr in config.cells()]
    assert 2 <= len(stored) < len(results["cells"])  # killed midway
    by_id = {c["id"]: c for c in results["cells"]}
    for cid, record in stored.items():
        assert json.loads(json.dumps(by_id[cid])) == record  # reused from the store, not trained again
    # What is written is what is returned.
    assert json.loads((out / "results.json").read_text())["cells"] == json.loads(json.dumps(results["cells"]))
    report = (out / "report.md").read_text()
    assert "## code: each method at its best learning rate" in report and "## math" in report
    for name in ("learn_forget.png", "lr_sweep.png", "spectra.png"):
        assert (out / name).stat().st_size > 10_000


def test_smoke_cells_learn_and_are_measured(smoke):
    results, out, _ = smoke
    base = results["base"]
    for cell in results["cells"]:
        learn, forget = cell["learning"], cell["forgetting"]
        if cell["domain"] == "code":
            assert set(learn) == {"code_ppl", "humaneval_nll", "pass_at_1"}
            assert learn["code_ppl"] < 0.9 * base["learning"]["code"]["code_ppl"], cell["id"]
        else:
            assert set(learn) == {"math_accuracy", "math_answer_nll"}
            assert learn["math_answer_nll"] < base["learning"]["math"]["math_answer_nll"], cell["id"]
        # The random model answers no probe right, so there is nothing to retain: no probe scores.
        assert forget["probe_nll"] is None and forget["probe_retained"] is None and forget["english_ppl"] > 1
        assert cell["intruders"]["num_matrices"] == 2 * 7
        assert 0 <= cell["intruders"]["mean"] <= PRESETS["smoke"].intruder_top_k
        assert ("update_rank" in cell) == (cell["method"] == "full")
    full = next(c for c in results["cells"] if c["method"] == "full")
    assert full["trainable_params"] == results["total_params"]
    lora4 = next(c for c in results["cells"] if c["method"] == "lora4")
    # 2 layers x 7 projections, each [in, 4] + [4, out] with hidden 64, MLP 128, 2 of 4 heads for K/V.
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert lora4["trainable_params"] == 2 * per_layer


def test_smoke_summary_and_saved_adapters(smoke):
    results, out, _ = smoke
    summary = results["summary"]
    for domain in ("code", "math"):
        rows = {r["method"]: r for r in summary["best"][domain]}
        assert set(rows) == {"full", "lora4"}
        mine = [c for c in results["cells"] if c["domain"] == domain and c["method"] == "lora4"]
        key = (lambda c: c["learning"]["code_ppl"]) if domain == "code" else (
            lambda c: (-c["learning"]["math_accuracy"], c["learning"]["math_answer_nll"]))  # fmt: skip
        assert rows["lora4"]["cell_id"] == min(mine, key=key)["id"]
        assert summary["lr_ratio"][domain]["lora4"] == pytest.approx(rows["lora4"]["learning_rate"] / 5e-3)
    assert summary["sweep_complete"] is False  # smoke makes no claims
    # Each LoRA cell's adapters are a lora_jax checkpoint with their spec.
    cid = cell_id("code", Method("lora4", 4), 2e-2)
    state = checkpoint.restore(out / "cells" / "adapters" / cid)
    assert state.spec.rank == 4 and state.spec.alpha == 8.0
    f = state.adapters["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert f.lora_a.shape == (2, 64, 4) and f.stack_axes == (0,) and float(jnp.abs(f.lora_b).max()) > 0


def test_store_refuses_another_configuration(tmp_path):
    CellStore(tmp_path, PRESETS["smoke"].to_json())
    CellStore(tmp_path, PRESETS["smoke"].to_json())  # the same study: fine
    other = dataclasses.replace(PRESETS["smoke"], steps=7)
    with pytest.raises(ValueError, match="configured differently \\(steps: 6 there, 7 now\\)"):
        CellStore(tmp_path, other.to_json())


def _cell(domain, method, lr, learn, forget):
    m = parse_methods(method)[0]
    return {
        "id": cell_id(domain, m, lr), "domain": domain, "method": method, "rank": m.rank, "modules": m.modules,
        "learning_rate": lr, "trainable_params": 1, "learning": learn, "forgetting": forget,
        "intruders": {"mean": 0.0}, "median_step_seconds": 1.0,
    }  # fmt: skip


def test_summarise_picks_best_rates_and_matches_learning():
    code = lambda ppl: {"code_ppl": ppl}  # noqa: E731
    # Forgetting is the share of the base model's right probe answers now lost.
    nll = lambda x: {"probe_nll": 9.0, "probe_retained": 1.0 - x, "english_ppl": 50.0}  # noqa: E731
    cells = [
        _cell("code", "full", 1e-5, code(12.0), nll(0.60)),
        _cell("code", "full", 5e-5, code(10.0), nll(0.90)),  # full's best rate
        _cell("code", "full", 2e-4, code(11.0), nll(1.20)),
        _cell("code", "lora16", 1e-4, code(11.8), nll(0.58)),
        _cell("code", "lora16", 5e-4, code(10.9), nll(0.70)),  # LoRA's best: learns less, forgets less
        _cell("code", "lora16", 2e-3, code(13.0), nll(0.99)),
        _cell("math", "full", 5e-5, {"math_accuracy": 0.5, "math_answer_nll": 1.0}, nll(0.7)),
        _cell("math", "full", 1e-4, {"math_accuracy": 0.5, "math_answer_nll": 0.8}, nll(0.8)),  # tie broken by NLL
        _cell("math", "lora16", 5e-4, {"math_accuracy": 0.6, "math_answer_nll": 0.9}, nll(0.9)),
    ]
    results = {
        "cells": cells,
        "config": {"domains": ["code", "math"], "methods": ["full", "lora16"]},
        "base": {"forgetting": nll(0.5)},
    }
    s = summarise(results)
    best = {d: {r["method"]: r["learning_rate"] for r in rows} for d, rows in s["best"].items()}
    assert best == {"code": {"full": 5e-5, "lora16": 5e-4}, "math": {"full": 1e-4, "lora16": 5e-4}}
    assert s["lr_ratio"]["code"]["lora16"] == pytest.approx(10.0)
    v = s["versus_full"]["code"]["lora16"]
    assert v["learns_less"] and v["forgets_less"]
    assert v["forgetting_change"] == pytest.approx(0.70 - 0.90)
    assert s["base_forgetting"] == pytest.approx(0.5)
    # At matched learning the nearest full cell is 2e-4 (ppl 11.0 vs LoRA's 10.9).
    assert v["matched_full_cell"] == "code-full-lr2.0e-04"
    assert v["forgetting_change_at_matched_learning"] == pytest.approx(0.70 - 1.20)
    m = s["versus_full"]["math"]["lora16"]
    assert not m["learns_less"] and m["learning_change"] == pytest.approx(0.1)
    assert s["best_lr_by_rank"]["code"] == {"16": 5e-4}
    assert s["sweep_complete"] is False  # math has fewer than three rates per method


def test_update_spectra_and_intruders_per_layer_of_a_stack():
    rng = np.random.default_rng(0)

    def low_rank(rows, cols, rank):
        return rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))

    # Wide enough that a random direction is far (cosine < 0.5) from every singular vector of the base.
    before = {"w": jnp.asarray(rng.normal(size=(3, 256, 200)), jnp.float32), "v": jnp.zeros((200, 5))}
    # Layer i of the stack gets a rank-(i + 1) update, much larger than the weight: i + 1 intruders.
    after = {
        "w": before["w"] + 30 * jnp.asarray(np.stack([low_rank(256, 200, i + 1) for i in range(3)]), jnp.float32),
        "v": jnp.asarray(low_rank(200, 5, 2), jnp.float32),
    }

    def apply(p, x):
        h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w).sum(-1, keepdims=True), None), x, p["w"])
        return h[:, :200] @ p["v"]

    x = jnp.ones((2, 256))
    _, layouts = lora.split(before, lora.LoraSpec(rank=1, targets="w|v"), key=jax.random.key(0),
                            trace=lambda p: apply(p, x))  # fmt: skip
    ranks = {(r["path"], r["layer"]): (r["rank"], r["max_rank"]) for r in update_spectra(before, after, layouts,
                                                                                          fraction=1.0)}  # fmt: skip
    assert ranks == {("w", 0): (1, 200), ("w", 1): (2, 200), ("w", 2): (3, 200), ("v", None): (2, 5)}
    intruders = intruder_records(before, after, layouts, top_k=3, threshold=0.5, layers=[0, 2])
    counts = {r["layer"]: r["intruders"] for r in intruders if r["path"] == "w"}
    assert counts == {0: 1, 2: 3}  # layer 1 left out by `layers`
    with pytest.raises(ValueError, match="missing"):
        update_spectra({"u": before["v"]}, {"u": before["v"]}, layouts)


def test_methods_and_config():
    assert [(m.name, m.rank, m.modules) for m in parse_methods("full, lora16,lora4-attn,lora8-mlp")] == [
        ("full", None, "all"), ("lora16", 16, "all"), ("lora4-attn", 4, "attn"), ("lora8-mlp", 8, "mlp"),
    ]  # fmt: skip
    for bad, match in [("lora", "unknown"), ("lora0", "unknown"), ("lora4-ffn", "unknown"), ("", "no methods"),
                       ("full,full", "distinct")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_methods(bad)
    assert Method("lora16", 16).alpha("2r") == 32 and Method("lora16", 16).alpha("32") == 32.0
    assert Method("lora4", 4, "attn").alpha("32") == 32.0 and Method("full").alpha("2r") is None
    for name, preset in PRESETS.items():
        assert preset.name == name
    # The presets that make claims sweep at least three rates for every method.
    for name in ("long", "gpu"):
        preset = PRESETS[name]
        assert all(len(preset.lrs_for(m)) >= 3 for m in parse_methods(preset.methods)), name
    order = [(d, m.name) for d, m, _ in StudyConfig(methods=("full", "lora16")).cells()]
    assert order == [("code", "full"), ("math", "full"), ("code", "lora16"), ("math", "lora16")]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domains": ("code", "vision")}, "domains"),
        ({"methods": ("full", "adapter")}, "unknown method"),
        ({"learning_rates": {"lora64": (1e-3,)}}, "not in methods"),
        ({"full_lrs": (0.0,)}, "must be positive"),
        ({"steps": 0}, "steps"),
        ({"warmup_steps": 20, "steps": 20}, "warmup_steps"),
        ({"alpha": "r"}, "alpha"),
        ({"probes": -1}, "probes"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
    ],
)
def test_study_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_cli_rejects_unknown_method(capsys):
    main = __import__("runpy").run_path(str(EXAMPLE), run_name="not_main")["main"]
    with pytest.raises(SystemExit):
        main(["--methods", "full,qlora"])
    assert "unknown method" in capsys.readouterr().err


def test_notebook_walks_through_the_smoke_run(smoke, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    results, out, _ = smoke
    monkeypatch.setenv("LORA_JAX_STUDY_RESULTS", str(out / "results.json"))
    nb = nbformat.read(ROOT / "notebooks" / "02_learns_less_forgets_less.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "preset smoke: 6 cells" in text and "best rate by LoRA rank" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3


def test_forgetting_scores_only_the_probes_the_base_model_answers(monkeypatch):
    from lora_jax.experiments import probes
    from lora_jax.experiments.data import Packed
    from lora_jax.experiments.learn_forget.evaluate import Evaluator
    from lora_jax.experiments.learn_forget.smoke import ByteTokenizer, tiny_model
    from lora_jax.experiments.learn_forget.tasks import Tasks
    from lora_jax.models import LlamaForCausalLM

    config, params = tiny_model()
    model = LlamaForCausalLM(config)
    tok = ByteTokenizer()
    rows = Packed(np.full((2, 16), 65, np.int32), np.ones((2, 16), np.float32))
    tasks = Tasks({}, rows, rows, [], [], {})
    probe_set = probes.load_probes()[:4]
    right = {probe_set[1].id, probe_set[3].id}
    monkeypatch.setattr(probes, "is_correct", lambda answer, probe: probe.id in right)
    ev = Evaluator(model, tok, PRESETS["smoke"], tasks, probe_set)
    base = ev.forgetting(params)
    assert base["probe_correct"] == [False, True, False, True] and ev.kept == [1, 3]
    nll_all = probes.answer_nll(model.apply, params, tok, probe_set, batch_size=16)
    assert base["probe_nll_all"] == pytest.approx(float(np.mean(nll_all)), rel=1e-5)
    assert base["probe_nll"] == pytest.approx(float(np.mean(nll_all[[1, 3]])), rel=1e-5)
    right.discard(probe_set[3].id)  # after "training", one of the two is forgotten
    after = ev.forgetting(params)
    assert after["probe_retained"] == 0.5 and after["probe_nll"] == pytest.approx(base["probe_nll"], rel=1e-5)


def test_smoke_study_in_bfloat16_trains_the_adapters():
    """The study's own setting: bfloat16 compute over float32 weights and adapters; LoRA must still learn."""
    from lora_jax.experiments.learn_forget import run_study
    from lora_jax.experiments.learn_forget.smoke import ByteTokenizer, tiny_model

    config = dataclasses.replace(
        PRESETS["smoke"], compute_dtype="bfloat16", domains=("code",), methods=("lora4",), lora_lrs=(5e-2,),
        humaneval_problems=0, probes=1,
    )  # fmt: skip
    model_config, params = tiny_model()
    results = run_study(config, model_config, params, ByteTokenizer(), train_documents=8, eval_documents=4,
                        log=lambda line: None)  # fmt: skip
    (cell,) = results["cells"]
    assert cell["train_loss"][-1] < cell["train_loss"][0] - 0.1
    assert cell["learning"]["code_ppl"] < 0.9 * results["base"]["learning"]["code"]["code_ppl"]
