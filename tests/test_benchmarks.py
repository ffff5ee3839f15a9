"""Smoke runs of the step benchmarks on CPU: each prints one JSON line with the keys the device suite reads.

Timings are never asserted (they are noise on a shared CPU); the losses are, since the same
step through ``wrap`` must start where full fine-tuning does.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TIMEOUT_S = 240
TINY = ["--model", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1"]
LLAMA_KEYS = {
    "mode", "model", "levers", "params", "trainable", "step_ms", "tokens_per_s", "peak_gib", "compile_s", "gflops",
    "temp_gib", "argument_gib", "first_loss", "loss", "device", "jax",
}  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # torch's spinning threads crawl on a shared CPU
    return env


def _start(script: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(BENCH / script), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _record(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.args} failed:\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def llama_runs():
    """Three llama_step.py runs side by side: full and wrap (chunked loss), and wrap on the plain path."""
    common = [*TINY, "--dtype", "float32", "--attention", "xla", "--chunk", "16"]
    procs = {
        "full": _start("llama_step.py", "full", *common),
        "wrap": _start("llama_step.py", "wrap", *common),
        "plain": _start(
            "llama_step.py", "wrap", *common, "--attention", "einsum", "--chunk", "none", "--remat-policy", "dots"
        ),
    }
    return {name: _record(proc) for name, proc in procs.items()}


@pytest.mark.slow
def test_llama_step_records(llama_runs):
    for name, record in llama_runs.items():
        assert LLAMA_KEYS <= record.keys(), (name, LLAMA_KEYS - record.keys())
        assert math.isfinite(record["first_loss"]) and math.isfinite(record["loss"]), record
        assert record["step_ms"] > 0 and record["tokens_per_s"] > 0
    full, wrap, plain = llama_runs["full"], llama_runs["wrap"], llama_runs["plain"]
    assert full["trainable"] == full["params"] > wrap["trainable"] == plain["trainable"] > 0
    assert wrap["levers"] == {"attention": "xla", "remat_policy": "none", "chunk": 16, "scan_layers": True}
    assert plain["levers"] == {"attention": "einsum", "remat_policy": "dots", "chunk": None, "scan_layers": True}


@pytest.mark.slow
def test_llama_step_first_losses_agree(llama_runs):
    # B starts at zero, so the first step's loss is the frozen model's, whichever way it is computed.
    first = {name: record["first_loss"] for name, record in llama_runs.items()}
    assert first["wrap"] == pytest.approx(first["full"], rel=1e-5)
    assert first["plain"] == pytest.approx(first["full"], rel=1e-5)
    # and training moves it
    assert llama_runs["full"]["loss"] != first["full"]


@pytest.mark.slow
def test_step_ratio_smoke():
    record = _record(_start("step_ratio.py", "--size", "tiny", "--steps", "3", "--warmup", "1"))
    keys = {"wrap_median_ms", "hand_median_ms", "ratio", "wrap_min_ms", "hand_min_ms", "ratio_min", "first_loss"}
    assert keys <= record.keys()
    assert record["ratio"] > 0 and record["wrap_median_ms"] > 0 and record["hand_median_ms"] > 0
    # wrap and the hand-written LoRA are the same function of the same initial weights
    assert record["first_loss"]["wrap"] == pytest.approx(record["first_loss"]["hand"], rel=1e-5)


def test_peft_step_smoke():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    procs = [_start("peft_step.py", mode, *TINY) for mode in ("full", "peft")]
    records = [_record(proc) for proc in procs]
    for record in records:
        assert {"step_ms", "tokens_per_s", "peak_gib", "device", "torch", "transformers", "peft"} <= record.keys()
        assert math.isfinite(record["first_loss"]) and math.isfinite(record["loss"])
    full, peft = records
    assert full["params"] == peft["params"] == full["trainable"] > peft["trainable"]
    assert peft["first_loss"] == pytest.approx(full["first_loss"], rel=1e-4)  # PEFT's B starts at zero too


def test_peft_presets_match_flops_models():
    sys.path.insert(0, str(BENCH))
    try:
        import flops

        text = (BENCH / "peft_step.py").read_text()
    finally:
        sys.path.remove(str(BENCH))
    namespace = {}
    start, end = text.index("MODELS = {"), text.index("}  # fmt: skip")
    exec(text[start : end + 1], namespace)
    for name, shape in namespace["MODELS"].items():
        assert shape == {k: v for k, v in flops.MODELS[name].items() if k in shape}, name


def test_table_from_records(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import llama_step
    finally:
        sys.path.remove(str(BENCH))
    records = [
        {"run": "full", "status": "ok", "step_ms": 100.0, "tokens_per_s": 80000, "peak_gib": 30.0,
         "levers": {"attention": "cudnn", "chunk": 1024}},
        {"run": "wrap [cudnn]", "status": "failed", "error": "RuntimeError: cuDNN | x"},
        {"run": "wrap", "status": "ok", "step_ms": 80.0, "tokens_per_s": 100000, "peak_gib": None},
        {"run": "plain full", "status": "ok", "step_ms": 110.0, "tok_s": 74000, "peak_gib": 31.9},
    ]  # fmt: skip
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = llama_step.main(["--table", str(path)])
    rows = text.splitlines()
    assert len(rows) == 2 + len(records)
    assert rows[2].startswith("| full | 100.0 | 80000 | 30.00 | 1.00 | 0.91 |")
    assert "| wrap [cudnn] | failed |" in rows[3] and "cuDNN / x" in rows[3]
    assert rows[4].startswith("| wrap | 80.0 | 100000 | – | 0.80 | 0.73 |")
    assert rows[5].startswith("| plain full | 110.0 | 74000 | 31.90 | 1.10 | 1.00 |")


def test_device_suite_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(BENCH / "device_suite.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
