"""lora_jax.checkpoint: orbax save/restore, exact resume across processes, interrupted saves, sharded restore."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lora
from lora_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "_checkpoint_jobs.py"
KEY = jax.random.key(0)
TIMEOUT_S = 300


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"
    return env


def _job(*args: str, devices: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(JOBS), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=TIMEOUT_S)


def _setup():
    """A stacked weight, a plain weight, a leaf trained in full, non-zero A and B, a non-default spec."""
    params = {"stack": jax.random.normal(KEY, (3, 8, 16)), "head": {"kernel": jnp.ones((16, 4)), "bias": jnp.zeros(4)}}

    def fn(p):
        x = jnp.ones((2, 8))
        return [x @ p["stack"][i] @ p["head"]["kernel"] + p["head"]["bias"] for i in range(3)]

    spec = lora.LoraSpec(
        rank=4, alpha=8, targets=["stack", r"head/kernel"], train=r"head/bias", rslora=True,
        rank_pattern={"head/.*": 2}, dropout=0.1, dtype=jnp.bfloat16,
    )  # fmt: skip
    frozen, adapters = lora.split(params, spec, key=KEY, trace=fn)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = treedef.unflatten([jax.random.normal(k, x.shape).astype(x.dtype) for k, x in zip(keys, leaves)])
    return params, spec, frozen, adapters


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # LoraFactors metadata is part of the structure
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_everything_without_a_template(tmp_path):
    params, spec, frozen, adapters = _setup()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = opt.init(adapters)
    opt_state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, opt_state)
    rng = jax.random.key(7)
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
        assert ckpt.save(
            12, adapters, opt_state=opt_state, rng=rng, data={"epoch": 1, "offset": 4096}, spec=spec,
            metrics={"loss": 1.25},
        )  # fmt: skip
    state = checkpoint.restore(tmp_path)  # a fresh manager, no template of any kind
    assert (state.step, state.data, state.metrics) == (12, {"epoch": 1, "offset": 4096}, {"loss": 1.25})
    assert state.spec == spec
    _assert_same_tree(state.adapters, adapters)
    f = state.adapters["stack"]
    assert (f.scale, f.stack_axes, f.a_axes, f.b_axes, f.dropout) == (8 / 2.0, (0,), (1,), (2,), 0.1)
    assert state.adapters["head"]["kernel"].scale == pytest.approx(8 / np.sqrt(2))
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(rng))
    assert jax.random.key_impl(state.rng) == jax.random.key_impl(rng)
    # The optimizer state comes back exactly as saved, with its structure from the optimizer.
    restored = checkpoint.restore(tmp_path, optimizer=opt, frozen=frozen, spec=spec, like=adapters)
    _assert_same_tree(restored.opt_state, opt_state)
    # ... or from a template; and without either, as orbax stores it (lists for named tuples), values intact.
    _assert_same_tree(checkpoint.restore(tmp_path, opt_state=opt_state).opt_state, opt_state)
    raw = jax.tree.leaves(state.opt_state)
    assert len(raw) == len(jax.tree.leaves(opt_state))
    # The restored adapters work: wrap on them equals apply(merge) on the originals.
    fn = lambda p, x: x @ p["head"]["kernel"]
    x = jnp.ones((2, 16))
    ref = fn(lora.merge(frozen, adapters), x)
    np.testing.assert_allclose(lora.wrap(fn)(frozen, state.adapters, x), ref, rtol=1e-5, atol=1e-5)


def test_raw_uint32_key_and_no_extras(tmp_path):
    _, _, _, adapters = _setup()
    raw = jax.random.key_data(jax.random.key(3))
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, adapters, rng=raw)
    state = checkpoint.restore(tmp_path)
    assert state.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(state.rng, raw)
    assert (state.opt_state, state.spec, state.data, state.metrics) == (None, None, {}, None)
    with pytest.raises(ValueError, match="no optimizer state"):
        checkpoint.restore(tmp_path, optimizer=optax.adam(1e-3))


def test_retention_newest_and_best(tmp_path):
    _, _, _, adapters = _setup()
    with checkpoint.CheckpointManager(tmp_path / "newest", max_to_keep=2) as ckpt:
        for step in range(4):
            ckpt.save(step, adapters, data={"step": step})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    with checkpoint.CheckpointManager(tmp_path / "best", max_to_keep=2, best_metric="loss") as ckpt:
        for step, loss in enumerate([5.0, 1.0, 4.0, 3.0, 6.0]):
            ckpt.save(step, adapters, metrics={"loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 3] and ckpt.best_step() == 1
        with pytest.raises(ValueError, match="must include it"):
            ckpt.save(9, adapters)
    assert checkpoint.restore(tmp_path / "best", 1).metrics == {"loss": 1.0}
    with checkpoint.CheckpointManager(tmp_path / "max", max_to_keep=1, best_metric="acc", best_mode="max") as ckpt:
        for step, acc in enumerate([0.2, 0.9, 0.5]):
            ckpt.save(step, adapters, metrics={"acc": acc})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1]
    with checkpoint.CheckpointManager(tmp_path / "interval", save_interval_steps=3) as ckpt:
        saved = [ckpt.save(step, adapters) for step in range(7)]
        assert ckpt.save(8, adapters, force=True)
        ckpt.wait_until_finished()
        assert saved == [True, False, False, True, False, False, True] and ckpt.all_steps() == [0, 3, 6, 8]


def test_exact_resume_across_processes(tmp_path):
    n, k = 7, 6
    total = ["--total", str(n + k)]
    ref = _job("resume", "--dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.npz"), "--steps", str(n + k),
               *total)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = _job("resume", "--dir", str(tmp_path / "run"), "--out", str(tmp_path / "first.npz"), "--steps", str(n),
                 "--mode", "save-and-die", *total)  # fmt: skip
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]  # killed, as a preempted job is
    second = _job("resume", "--dir", str(tmp_path / "run"), "--out", str(tmp_path / "second.npz"), "--steps", str(k),
                  "--mode", "resume", *total)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    ref, first, second = (np.load(tmp_path / f"{name}.npz") for name in ("ref", "first", "second"))
    losses = np.concatenate([first["losses"], second["losses"]])
    assert losses.shape == (n + k,) and len(set(losses.tolist())) > 5  # the loss moves: it is a real run
    np.testing.assert_array_equal(losses, ref["losses"])  # bitwise
    names = [name for name in ref.files if name != "losses"]
    assert len(names) == 5  # 2 x (lora_a, lora_b) + the bias trained in full
    for name in names:
        np.testing.assert_array_equal(second[name], ref[name], err_msg=name)
        assert not np.array_equal(first[name], ref[name])  # the K resumed steps changed every leaf


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    cmd = [sys.executable, str(JOBS), "big-save", "--dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "the job ended before its big save: " + "".join(lines)[-3000:]
            lines.append(line)
            if line.startswith("SAVING"):
                break
        # Kill it as soon as the big save has started writing into its temporary directory.
        deadline = time.monotonic() + 120
        while not any(p.name.startswith("2") and p.name != "2" for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the big save never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert not (tmp_path / "2").exists(), "the save finished before the kill; the test did not interrupt it"
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        state = ckpt.restore()
        assert state.step == 1 and state.data == {"which": "small"}
        np.testing.assert_array_equal(state.adapters["layers"]["w3"].lora_a, np.ones((16, 64)))
        ckpt.save(2, state.adapters)  # the interrupted step can be written again
    assert checkpoint.restore(tmp_path).step == 2


def test_restore_onto_eight_devices_with_shardings(tmp_path):
    out = _job("sharded", "--dir", str(tmp_path), devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    assert report["leaves"] == 5 + 2 * 5 + 1, report  # adapters, Adam's mu and nu, its count
    assert report["mismatch"] == [] and report["sharding"] == [], report
    assert report["up_lora_b_shard"] == [3, 4, 16]  # each device holds only its half of B's output axis
    assert report["spec_ok"]


def test_mismatch_errors_name_path_and_shapes(tmp_path):
    params, spec, frozen, adapters = _setup()
    opt = optax.adam(1e-3)
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
        ckpt.save(3, adapters, opt_state=opt.init(adapters), spec=spec)
    where = r"restore\(.*\) step 3"
    other = dict(frozen, stack=jnp.ones((3, 8, 32)))
    with pytest.raises(ValueError, match=where + r".*'stack'.*lora_a \(3, 8, 4\), lora_b \(3, 4, 16\).*\(3, 8, 32\)"):
        checkpoint.restore(tmp_path, frozen=other)
    with pytest.raises(ValueError, match=r"'head/kernel' but `frozen` has no leaf there"):
        checkpoint.restore(tmp_path, frozen={"stack": frozen["stack"], "head": {"bias": None}})
    with pytest.raises(
        ValueError, match=r"'head/bias' the checkpoint holds array \(4,\) but `frozen` has shape \(5,\)"
    ):
        checkpoint.restore(
            tmp_path, frozen=dict(frozen, head={"kernel": frozen["head"]["kernel"], "bias": jnp.ones(5)})
        )
    with pytest.raises(ValueError, match=r"'stack'.*rank 4 .*lora_a \(3, 8, 4\).*`spec` gives rank 8"):
        checkpoint.restore(tmp_path, spec=dataclasses.replace(spec, rank=8))
    with pytest.raises(ValueError, match=r"'head/kernel'.*scale .* but `spec` gives"):
        checkpoint.restore(tmp_path, spec=dataclasses.replace(spec, rslora=False))
    with pytest.raises(ValueError, match=r"'head/kernel'.*dropout 0.1 but `spec` has 0.0"):
        checkpoint.restore(tmp_path, spec=dataclasses.replace(spec, dropout=0.0))
    _, small = lora.split(params, lora.LoraSpec(rank=2, targets="head/kernel"), key=KEY)
    with pytest.raises(ValueError, match=r"checkpoint has an adapter at 'head/bias' that `like` does not have"):
        checkpoint.restore(tmp_path, like=small)
    like = jax.tree.map(lambda x: x, adapters)
    like["head"]["kernel"] = lora.LoraFactors(jnp.ones((16, 3)), jnp.ones((3, 4)), like["head"]["kernel"].scale)
    with pytest.raises(ValueError, match=r"'head/kernel'.*lora_a \(16, 2\), lora_b \(2, 4\) but `like` has lora_a"):
        checkpoint.restore(tmp_path, like=like)
    with pytest.raises(ValueError, match=r"optimizer state does not match.*leaf 0"):
        checkpoint.restore(tmp_path, optimizer=optax.sgd(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="not both"):
        checkpoint.restore(tmp_path, optimizer=opt, opt_state=opt.init(adapters))
    specs = {"stack": P(), "head": {"kernel": P(), "bias": P()}}
    with pytest.raises(TypeError, match=r"must be jax.sharding.Sharding objects.*Give PartitionSpecs a mesh"):
        checkpoint.restore(tmp_path, param_shardings=specs)


def test_missing_and_corrupt_checkpoints(tmp_path):
    _, _, _, adapters = _setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "empty")
    with checkpoint.CheckpointManager(tmp_path / "run") as ckpt:
        ckpt.save(1, adapters)
        ckpt.save(2, adapters)
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match="step 2 already exists"):
            ckpt.save(2, adapters)
    with pytest.raises(FileNotFoundError, match=r"no step 5; the steps there are \[1, 2\]"):
        checkpoint.restore(tmp_path / "run", 5)
    (tmp_path / "run" / "2" / "lora" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=r"step 2: its metadata could not be read"):
        checkpoint.restore(tmp_path / "run")
    # A plain orbax checkpoint is not a lora_jax checkpoint.
    with ocp.CheckpointManager(tmp_path / "plain") as mngr:
        mngr.save(0, args=ocp.args.Composite(lora=ocp.args.JsonSave({"hello": 1})))
    with pytest.raises(ValueError, match="not a lora_jax checkpoint"):
        checkpoint.restore(tmp_path / "plain")


def test_corrupt_array_files_are_a_clear_error(tmp_path):
    _, _, _, adapters = _setup()
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, adapters)
    for chunk in (tmp_path / "1" / "adapters").rglob("d/*"):
        chunk.write_bytes(b"garbage")
    # In a subprocess: after a failed read of corrupt files, orbax's other pending reads can call back into
    # its closed event loop at any later moment, which would surface in whichever test runs then.
    out = _job("restore", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"ValueError: .*step 1: the checkpoint could not be read.*corrupt", out.stdout), out.stdout


def test_bad_save_arguments(tmp_path):
    params, spec, frozen, adapters = _setup()
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="adapter tree returned by lora_jax.split"):
            ckpt.save(0, [adapters])
        with pytest.raises(ValueError, match="holds no LoraFactors"):
            lora.merge(frozen, params)
        with pytest.raises(ValueError, match="`data` must be JSON-able"):
            ckpt.save(0, adapters, data={"x": object()})
        with pytest.raises(ValueError, match="non-negative integer"):
            ckpt.save(-1, adapters)
        with pytest.raises(TypeError, match="`rng` must be a PRNG key or raw uint32"):
            ckpt.save(0, adapters, rng=jnp.ones(2))
        with pytest.raises(TypeError, match="`spec` must be a lora_jax.LoraSpec"):
            ckpt.save(0, adapters, spec={"rank": 4})

        @jax.jit
        def inside(ad):
            ckpt.save(0, ad)
            return ad

        with pytest.raises(TypeError, match="traced value; save outside jax.jit"):
            inside(adapters)
    with pytest.raises(ValueError, match="best_mode"):
        checkpoint.CheckpointManager(tmp_path, best_mode="lowest")
    with pytest.raises(ValueError, match="max_to_keep"):
        checkpoint.CheckpointManager(tmp_path, max_to_keep=0)


def test_callable_targets_are_recorded_by_name(tmp_path):
    params = {"w": jnp.ones((4, 6))}

    def is_w(path, leaf):
        return path == "w"

    spec = lora.LoraSpec(rank=2, targets=is_w)
    _, adapters = lora.split(params, spec, key=KEY)
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
        ckpt.save(0, adapters, spec=spec)
    assert checkpoint.restore(tmp_path).spec is None
    meta = json.loads((tmp_path / "0" / "lora" / "metadata").read_text())
    assert meta["spec"]["targets"] == {"callable": "test_callable_targets_are_recorded_by_name.<locals>.is_w"}
    assert checkpoint.spec_from_json(checkpoint.spec_to_json(lora.LoraSpec(rank=3, alpha=5.0))) == lora.LoraSpec(
        rank=3, alpha=5.0
    )


def test_merged_export_loads_with_orbax_alone(tmp_path):
    params, spec, frozen, adapters = _setup()
    path = checkpoint.save_merged(tmp_path / "merged", frozen, adapters)
    out = _job("read-merged", "--dir", str(path), "--out", str(tmp_path / "merged.npz"))
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = np.load(tmp_path / "merged.npz")
    merged = lora.merge(frozen, adapters)
    flat = jax.tree_util.tree_flatten_with_path(merged)[0]
    assert sorted(loaded.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
    for p, x in flat:
        np.testing.assert_array_equal(loaded[jax.tree_util.keystr(p)], np.asarray(x))
    assert not np.allclose(loaded["['stack']"], np.asarray(params["stack"]), atol=1e-3)  # the adapters are in it
    with pytest.raises(FileExistsError, match="exists"):
        checkpoint.save_merged(path, frozen, adapters)
