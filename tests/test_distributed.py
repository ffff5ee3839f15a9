"""Two `jax.distributed` processes on 127.0.0.1 train together and agree with one process.

Each process drives 4 fake CPU devices and the two exchange collectives
through gloo; the reference is one process with 8 fake devices on the same
4 x 2 (data x model) mesh. Both runs are examples/train_sharded.py, so this
is also that example's smoke test. Every subprocess has a timeout and is
killed on failure, so a stuck collective cannot hang the suite.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_sharded.py"
TIMEOUT_S = 240


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands: list[list[str]]) -> list[str]:
    """Runs the commands concurrently; returns their outputs, or fails (killing all) on error or timeout."""
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd in commands
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
            if p.returncode != 0:
                pytest.fail(f"{' '.join(p.args[1:])} exited with {p.returncode}:\n{out[-4000:]}")
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run did not finish within {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


def _final_loss(output: str) -> float:
    lines = [line for line in output.splitlines() if line.startswith("final loss:")]
    assert lines, output[-2000:]
    return float(lines[-1].split(":")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    common = [sys.executable, str(SCRIPT), "--smoke", "--quiet"]
    port = _free_port()
    multi = [
        [*common, "--fake-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), *(["--out", str(tmp / "multi.npz")] if i == 0 else [])]
        for i in range(2)
    ]  # fmt: skip
    multi_out = _run_all(multi)
    (single_out,) = _run_all([[*common, "--fake-devices", "8", "--out", str(tmp / "single.npz")]])
    return multi_out, single_out, np.load(tmp / "multi.npz"), np.load(tmp / "single.npz")


def test_two_processes_form_one_mesh(runs):
    multi_out, _, _, _ = runs
    assert "2 process(es), 8 cpu devices, mesh data=4 x model=2" in multi_out[0]
    # Only process 0 reports.
    assert "final loss:" in multi_out[0] and "final loss:" not in multi_out[1]


def test_two_processes_agree_with_one(runs):
    multi_out, single_out, multi, single = runs
    assert abs(_final_loss(multi_out[0]) - _final_loss(single_out)) <= 1e-5 * abs(_final_loss(single_out))
    assert sorted(multi.files) == sorted(single.files)
    for name in single.files:
        a, b = multi[name], single[name]
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-12), name
    losses = single["_losses"][:, 1]
    assert losses[-1] < losses[0]  # it trains
