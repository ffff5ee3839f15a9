"""Orbax checkpoints of a LoRA training run: save, restore exactly, export merged params.

A checkpoint is one step directory written by orbax's `CheckpointManager`
(atomically: a save that dies midway leaves the previous steps intact), with
four items:

- ``adapters``: the adapter arrays, as a nested dict keyed like the params
  (``lora_a``/``lora_b`` under each adapted weight, the array of each leaf
  trained in full);
- ``opt_state``: the optimizer state, if one was saved;
- ``rng``: the raw data of a PRNG key, if one was saved;
- ``lora``: JSON metadata: the static metadata of every `LoraFactors`
  (scale, axes, dropout) with each array's shape and dtype, the `LoraSpec`,
  the step, the caller's own JSON state (a data position, say) and metrics.

So a checkpoint restores with no template at all: the adapter tree, its
`LoraFactors` nodes included, is rebuilt from the checkpoint itself. Given
the base weights' shardings, each device reads only its own shards.

>>> import jax, jax.numpy as jnp, optax, tempfile
>>> import lora_jax as lora
>>> from lora_jax import checkpoint
>>> frozen, adapters = lora.split({"w": jnp.ones((4, 8))}, lora.LoraSpec(rank=2, targets="w"), key=jax.random.key(0))
>>> opt = optax.adam(1e-3)
>>> with checkpoint.CheckpointManager(tempfile.mkdtemp(), max_to_keep=3) as ckpt:
...     _ = ckpt.save(10, adapters, opt_state=opt.init(adapters), data={"batch": 10})
...     state = ckpt.restore(optimizer=opt)
>>> state.step, state.data, state.adapters["w"].scale
(10, {'batch': 10}, 2.0)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Sharding, SingleDeviceSharding

from lora_jax import _spec, _tree, sharding
from lora_jax._spec import ALL_LINEAR, LoraSpec
from lora_jax._tree import LoraFactors

__all__ = ["CheckpointManager", "TrainState", "restore", "save_merged", "spec_from_json", "spec_to_json"]

PyTree = Any

FORMAT = "lora_jax.checkpoint"
FORMAT_VERSION = 1
_ADAPTERS, _OPT_STATE, _RNG, _META = "adapters", "opt_state", "rng", "lora"


class TrainState(NamedTuple):
    """What `CheckpointManager.restore` returns.

    Attributes:
      step: the step the checkpoint was saved at.
      adapters: the adapter tree, with `LoraFactors` nodes as `lora_jax.split` made them.
      opt_state: the optimizer state, or ``None`` if none was saved. Without
        ``optimizer=`` or an ``opt_state=`` template it comes back as orbax
        stores it (named tuples as lists, empty states as ``None``).
      rng: the saved PRNG key (typed if it was saved typed), or ``None``.
      data: the caller's JSON state given to ``save(data=...)`` (``{}`` if none).
      spec: the `LoraSpec` saved with the adapters, or ``None`` (none saved, or
        it had callable filters, which cannot be stored).
      metrics: the metrics given to ``save(metrics=...)``, or ``None``.
    """

    step: int
    adapters: PyTree
    opt_state: PyTree | None
    rng: jax.Array | None
    data: dict
    spec: LoraSpec | None
    metrics: dict | None


# -- LoraSpec <-> JSON ----------------------------------------------------------------------


def _filter_to_json(value: Any) -> Any:
    if value is ALL_LINEAR:
        return "all-linear"  # read back by LoraSpec as the sentinel
    if value is None or isinstance(value, str):
        return value
    if callable(value):
        return {"callable": getattr(value, "__qualname__", repr(value))}
    return [_filter_to_json(v) for v in value]


def spec_to_json(spec: LoraSpec) -> dict:
    """A JSON-able description of a `LoraSpec`. Callable filters are kept by name only.

    >>> spec_to_json(LoraSpec(rank=4, targets="w.*"))["targets"]
    'w.*'
    """
    return {
        "rank": int(spec.rank),
        "alpha": None if spec.alpha is None else float(spec.alpha),
        "targets": _filter_to_json(spec.targets),
        "exclude": _filter_to_json(spec.exclude),
        "train": _filter_to_json(spec.train),
        "rslora": bool(spec.rslora),
        "rank_pattern": {k: int(v) for k, v in spec.rank_pattern.items()},
        "alpha_pattern": {k: float(v) for k, v in spec.alpha_pattern.items()},
        "init": spec.init,
        "dtype": None if spec.dtype is None else jnp.dtype(spec.dtype).name,
        "dropout": float(spec.dropout),
    }


def spec_from_json(data: Mapping[str, Any]) -> LoraSpec | None:
    """The `LoraSpec` described by `spec_to_json`, or ``None`` if it had callable filters.

    >>> spec_from_json(spec_to_json(LoraSpec(rank=4, targets="w.*"))) == LoraSpec(rank=4, targets="w.*")
    True
    """
    filters = {name: data.get(name) for name in ("targets", "exclude", "train")}
    if any(isinstance(v, dict) for v in filters.values()):
        return None
    return LoraSpec(
        rank=data["rank"],
        alpha=data["alpha"],
        targets=filters["targets"],
        exclude=filters["exclude"],
        train=filters["train"],
        rslora=data["rslora"],
        rank_pattern=dict(data["rank_pattern"]),
        alpha_pattern=dict(data["alpha_pattern"]),
        init=data["init"],
        dtype=None if data["dtype"] is None else jnp.dtype(data["dtype"]),
        dropout=data["dropout"],
    )


# -- adapter trees <-> (arrays, metadata) ---------------------------------------------------------------


def _array_meta(x: Any) -> dict:
    return {"shape": [int(d) for d in np.shape(x)], "dtype": jnp.dtype(x.dtype).name}


def _check_array(where: str, path: str, x: Any) -> None:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"checkpoint.save: `{where}` at {path!r} is a traced value; save outside jax.jit/grad, "
            "with the concrete arrays a training step returned."
        )
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise TypeError(
            f"checkpoint.save: `{where}` at {path!r} is a {type(x).__name__}; expected a jax or numpy array."
        )


def _describe_adapters(adapters: PyTree) -> tuple[dict, list[dict]]:
    """(nested dict of arrays to store, JSON entries describing every adapter)."""
    _tree.adapter_entries(adapters)  # a TypeError for anything but an adapter tree
    flat, _ = _tree._flatten(adapters, is_leaf=_tree._is_factors)
    stored, meta = [], []
    for path, parts, x in flat:
        if isinstance(x, LoraFactors):
            _check_array("adapters", f"{path}/lora_a", x.lora_a)
            _check_array("adapters", f"{path}/lora_b", x.lora_b)
            arrays = {"lora_a": x.lora_a, "lora_b": x.lora_b}
            if x.magnitude is not None:
                _check_array("adapters", f"{path}/magnitude", x.magnitude)
                arrays["magnitude"] = x.magnitude
            stored.append((parts, arrays))
            meta.append(
                {
                    "path": list(parts),
                    "kind": "lora",
                    "scale": float(x.scale),
                    "stack_axes": list(x.stack_axes),
                    "a_axes": list(x.a_axes),
                    "b_axes": list(x.b_axes),
                    "dropout": float(x.dropout),
                    "lora_a": _array_meta(x.lora_a),
                    "lora_b": _array_meta(x.lora_b),
                    **({} if x.magnitude is None else {"magnitude": _array_meta(x.magnitude)}),
                }
            )
        else:
            _check_array("adapters", path, x)
            stored.append((parts, x))
            meta.append({"path": list(parts), "kind": "array", **_array_meta(x)})
    return _tree._nest(iter(stored)), meta


def _struct(m: Mapping[str, Any], sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(m["shape"]), jnp.dtype(m["dtype"]), sharding=sharding)


def _abstract_adapters(meta: list[dict]) -> PyTree:
    """The adapter tree the metadata describes, with `jax.ShapeDtypeStruct` leaves."""
    items = []
    for e in meta:
        if e["kind"] == "lora":
            value: Any = LoraFactors(
                _struct(e["lora_a"]),
                _struct(e["lora_b"]),
                float(e["scale"]),
                tuple(e["stack_axes"]),
                tuple(e["a_axes"]),
                tuple(e["b_axes"]),
                float(e["dropout"]),
                _struct(e["magnitude"]) if "magnitude" in e else None,
            )
        else:
            value = _struct(e)
        items.append((tuple(e["path"]), value))
    return _tree._nest(iter(items))


def _with_shardings(abstract: PyTree, shardings: PyTree | None, default: Sharding) -> PyTree:
    """Puts a sharding on every leaf of an abstract tree (``default`` where ``shardings`` has none)."""
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=default), abstract)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    shard_leaves = sharding._sharding_leaves(shardings)
    if len(shard_leaves) != len(leaves):
        raise ValueError(
            f"checkpoint.restore: the shardings given have {len(shard_leaves)} leaves but the checkpoint's tree "
            f"has {len(leaves)}; derive them from the checkpoint's own tree (pass param_shardings=) or from the "
            "same adapters and optimizer."
        )
    out = []
    for s, sh in zip(leaves, shard_leaves):
        if sh is not None and not isinstance(sh, Sharding):
            raise TypeError(
                f"checkpoint.restore: shardings must be jax.sharding.Sharding objects (e.g. NamedSharding); got "
                f"{type(sh).__name__}. Give PartitionSpecs a mesh: NamedSharding(mesh, spec)."
            )
        out.append(jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh if sh is not None else default))
    return jax.tree_util.tree_unflatten(treedef, out)


def _factor_arrays(x: LoraFactors) -> dict:
    arrays = {"lora_a": x.lora_a, "lora_b": x.lora_b}
    if x.magnitude is not None:
        arrays["magnitude"] = x.magnitude
    return arrays


def _stored_form(adapters: PyTree) -> PyTree:
    """An adapter tree (arrays, structs or shardings as leaves) in the nested-dict form it is stored in."""
    flat, _ = _tree._flatten(adapters, is_leaf=_tree._is_factors)
    items = [(parts, _factor_arrays(x) if isinstance(x, LoraFactors) else x) for _, parts, x in flat]
    return _tree._nest(iter(items))


def _from_stored(stored: PyTree, meta: list[dict]) -> PyTree:
    items = []
    for e in meta:
        node = stored
        for p in e["path"]:
            node = node[p]
        if e["kind"] == "lora":
            node = LoraFactors(
                node["lora_a"],
                node["lora_b"],
                float(e["scale"]),
                tuple(e["stack_axes"]),
                tuple(e["a_axes"]),
                tuple(e["b_axes"]),
                float(e["dropout"]),
                node.get("magnitude"),
            )
        items.append((tuple(e["path"]), node))
    return _tree._nest(iter(items))


def _leaf_table(tree: PyTree) -> list[tuple[str, tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), tuple(int(d) for d in np.shape(x)), jnp.dtype(x.dtype).name) for p, x in flat]


# -- checks that a checkpoint belongs to what it is restored into -----------------------------------------


def _shape_str(e: Mapping[str, Any]) -> str:
    if e["kind"] == "lora":
        return f"lora_a {tuple(e['lora_a']['shape'])}, lora_b {tuple(e['lora_b']['shape'])}"
    return f"array {tuple(e['shape'])}"


def _check_against_like(where: str, meta: list[dict], like: PyTree) -> None:
    want = {path: x for path, x in _tree.adapter_entries(like).items()}
    have = {"/".join(e["path"]): e for e in meta}
    for path in sorted(set(want) | set(have)):
        if path not in have:
            raise ValueError(f"{where}: `like` has an adapter at {path!r} that the checkpoint does not have.")
        if path not in want:
            raise ValueError(f"{where}: the checkpoint has an adapter at {path!r} that `like` does not have.")
        e, x = have[path], want[path]
        if isinstance(x, LoraFactors) != (e["kind"] == "lora"):
            kind = "LoraFactors" if isinstance(x, LoraFactors) else "a plain array"
            raise ValueError(f"{where}: at {path!r} the checkpoint holds {_shape_str(e)} but `like` holds {kind}.")
        if isinstance(x, LoraFactors):
            got = (tuple(x.lora_a.shape), tuple(x.lora_b.shape))
            saved = (tuple(e["lora_a"]["shape"]), tuple(e["lora_b"]["shape"]))
            if got != saved:
                raise ValueError(
                    f"{where}: at {path!r} the checkpoint holds {_shape_str(e)} but `like` has lora_a {got[0]}, "
                    f"lora_b {got[1]}."
                )
            fields = ("scale", "stack_axes", "a_axes", "b_axes", "dropout")
            ours = (float(x.scale), list(x.stack_axes), list(x.a_axes), list(x.b_axes), float(x.dropout))
            for name, a, b in zip(fields, (e[f] for f in fields), ours):
                if a != b:
                    raise ValueError(f"{where}: at {path!r} the checkpoint's {name} is {a} but `like`'s is {b}.")
        elif tuple(np.shape(x)) != tuple(e["shape"]):
            raise ValueError(
                f"{where}: at {path!r} the checkpoint holds {_shape_str(e)} but `like` has shape {tuple(np.shape(x))}."
            )


def _check_against_frozen(where: str, meta: list[dict], frozen: PyTree) -> None:
    flat, _ = _tree._flatten(frozen, is_leaf=lambda x: x is None)
    weights = {path: x for path, _, x in flat}
    for e in meta:
        path = "/".join(e["path"])
        if path not in weights:
            raise ValueError(
                f"{where}: the checkpoint has an adapter at {path!r} but `frozen` has no leaf there (its paths look "
                f"like {_spec.nearest_paths(path, list(weights))}); this checkpoint belongs to another model."
            )
        w = weights[path]
        if e["kind"] == "array":
            if w is not None and tuple(np.shape(w)) != tuple(e["shape"]):
                raise ValueError(
                    f"{where}: at {path!r} the checkpoint holds {_shape_str(e)} but `frozen` has shape "
                    f"{tuple(np.shape(w))}."
                )
            continue
        if w is None:
            raise ValueError(f"{where}: the checkpoint has LoRA factors at {path!r} but `frozen` holds None there.")
        shape = tuple(np.shape(w))
        axes = (*e["stack_axes"], *e["a_axes"], *e["b_axes"])
        r = e["lora_a"]["shape"][-1]
        ok = sorted(axes) == list(range(len(shape)))
        if ok:
            want_a = [*(shape[i] for i in e["stack_axes"]), *(shape[i] for i in e["a_axes"]), r]
            want_b = [*(shape[i] for i in e["stack_axes"]), r, *(shape[i] for i in e["b_axes"])]
            ok = want_a == list(e["lora_a"]["shape"]) and want_b == list(e["lora_b"]["shape"])
        if not ok:
            raise ValueError(
                f"{where}: at {path!r} the checkpoint holds {_shape_str(e)}, which does not fit the frozen weight "
                f"of shape {shape}; this checkpoint belongs to another model or layout."
            )


def _check_against_spec(where: str, meta: list[dict], spec: LoraSpec) -> None:
    for e in meta:
        if e["kind"] != "lora":
            continue
        path = "/".join(e["path"])
        rank, scale = e["lora_a"]["shape"][-1], e["scale"]
        if spec.rank_for(path) != rank:
            raise ValueError(
                f"{where}: at {path!r} the checkpoint's adapter has rank {rank} (lora_a {tuple(e['lora_a']['shape'])})"
                f" but `spec` gives rank {spec.rank_for(path)}."
            )
        if not np.isclose(spec.scale_for(path), scale, rtol=1e-6, atol=0):
            raise ValueError(
                f"{where}: at {path!r} the checkpoint's adapter has scale {scale} but `spec` gives "
                f"{spec.scale_for(path)} (check alpha, alpha_pattern and rslora)."
            )
        if not np.isclose(spec.dropout, e["dropout"]):
            raise ValueError(
                f"{where}: at {path!r} the checkpoint's adapter has dropout {e['dropout']} but `spec` has "
                f"{spec.dropout}."
            )


def _check_opt_state(where: str, saved: list, target: PyTree) -> None:
    want = _leaf_table(target)
    have = [(p, tuple(s), d) for p, s, d in saved]
    for i, (a, b) in enumerate(zip(have, want)):
        if a != b:
            raise ValueError(
                f"{where}: the optimizer state does not match the checkpoint's: leaf {i} is {a[0]} {a[1]} {a[2]} "
                f"in the checkpoint but {b[0]} {b[1]} {b[2]} in the optimizer's state. Restore with the optimizer "
                "the checkpoint was trained with."
            )
    if len(have) != len(want):
        raise ValueError(
            f"{where}: the optimizer state in the checkpoint has {len(have)} leaves but the optimizer's has "
            f"{len(want)}. Restore with the optimizer the checkpoint was trained with."
        )


# -- the manager ------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores LoRA training state with orbax: adapters, optimizer state, step, RNG and data position.

    Saves are atomic (orbax writes each step to a temporary directory and
    renames it when complete) and, by default, asynchronous: `save` returns
    once the arrays are copied off the devices, and the next `save`,
    `wait_until_finished` or `close` waits for the write.

    Args:
      directory: where the step directories go.
      max_to_keep: keep at most this many checkpoints (the newest, or the
        best ones with ``best_metric``); ``None`` keeps all.
      best_metric: the name of a metric given to ``save(metrics=...)``; with
        it, retention keeps the best ``max_to_keep`` checkpoints by that
        metric rather than the newest, and every save must report it.
      best_mode: ``"min"`` or ``"max"``: which values of ``best_metric`` are best.
      async_save: write in a background thread (default) or block in `save`.
      save_interval_steps: save only every this many steps (others are
        skipped unless ``force=True``).
      create: create ``directory`` if it does not exist; with ``False`` a
        missing directory is a `FileNotFoundError`.

    Raises:
      FileNotFoundError: ``directory`` does not exist and ``create=False``.
      ValueError: an invalid ``max_to_keep``, ``best_mode`` or ``save_interval_steps``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        save_interval_steps: int = 1,
        create: bool = True,
    ) -> None:
        self._directory = pathlib.Path(directory).absolute()
        if not create and not self._directory.is_dir():
            raise FileNotFoundError(f"CheckpointManager: `directory` {str(self._directory)!r} does not exist.")
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(
                f"CheckpointManager: `max_to_keep` must be a positive integer or None; got {max_to_keep!r}."
            )
        if best_mode not in ("min", "max"):
            raise ValueError(f"CheckpointManager: `best_mode` must be 'min' or 'max'; got {best_mode!r}.")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(
                f"CheckpointManager: `save_interval_steps` must be a positive integer; got {save_interval_steps!r}."
            )
        self._best_metric = best_metric
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric is not None else None,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=best_metric is None,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=create,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options)

    @property
    def directory(self) -> pathlib.Path:
        """The directory holding the step directories."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Every step with a complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest step without one)."""
        return self._manager.best_step()

    def wait_until_finished(self) -> None:
        """Blocks until an asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def save(
        self,
        step: int,
        adapters: PyTree,
        *,
        opt_state: PyTree | None = None,
        rng: jax.Array | None = None,
        data: Mapping[str, Any] | None = None,
        spec: LoraSpec | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves one training state as step ``step``.

        Args:
          step: the step number (a non-negative integer, increasing between saves).
          adapters: the adapter tree from `lora_jax.split` (trained).
          opt_state: the optimizer state for the adapters.
          rng: a PRNG key (typed, ``jax.random.key``, or raw ``uint32``) the
            run needs to continue exactly, e.g. its dropout key.
          data: JSON-able state of the caller: where the data loader is, the
            epoch, a config. Restored as ``TrainState.data``.
          spec: the `LoraSpec` the adapters were split with, kept as JSON.
          metrics: ``{name: number}``; required with ``best_metric``.
          force: save even where ``save_interval_steps`` would skip the step.

        Returns:
          Whether a checkpoint was written (``False`` for a skipped step).

        Raises:
          TypeError: ``adapters`` is not an adapter tree, holds traced values,
            ``spec`` is not a `LoraSpec`, or ``rng`` is not a key.
          ValueError: ``data`` or ``metrics`` is not JSON-able, ``best_metric``
            is missing from ``metrics``, or ``step`` is not new.
        """
        where = "CheckpointManager.save"
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{where}: `step` must be a non-negative integer; got {step!r}.")
        step = int(step)
        if step in self._manager.all_steps():
            raise ValueError(f"{where}: step {step} already exists in {str(self._directory)!r}; save a new step.")
        if spec is not None and not isinstance(spec, LoraSpec):
            raise TypeError(f"{where}: `spec` must be a lora_jax.LoraSpec or None; got {type(spec).__name__}.")
        stored, adapter_meta = _describe_adapters(adapters)
        metrics = None if metrics is None else dict(metrics)
        if self._best_metric is not None and (metrics is None or self._best_metric not in metrics):
            raise ValueError(
                f"{where}: this manager keeps the best checkpoints by {self._best_metric!r}, so `metrics` must "
                f"include it; got metrics={metrics!r}."
            )
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "adapters": adapter_meta,
            "spec": None if spec is None else spec_to_json(spec),
            "data": {} if data is None else dict(data),
            "metrics": metrics,
            "opt_state": None,
            "rng": None,
        }
        items: dict[str, Any] = {_ADAPTERS: ocp.args.StandardSave(stored)}
        if opt_state is not None:
            for keypath, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
                _check_array("opt_state", jax.tree_util.keystr(keypath), x)
            meta["opt_state"] = [[p, list(s), d] for p, s, d in _leaf_table(opt_state)]
            items[_OPT_STATE] = ocp.args.StandardSave(opt_state)
        if rng is not None:
            if not isinstance(rng, jax.Array):
                raise TypeError(f"{where}: `rng` must be a JAX PRNG key; got {type(rng).__name__}.")
            typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
            if not typed and rng.dtype != jnp.uint32:
                raise TypeError(f"{where}: `rng` must be a PRNG key or raw uint32 key data; got dtype {rng.dtype}.")
            meta["rng"] = {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None}
            items[_RNG] = ocp.args.StandardSave({"key_data": jax.random.key_data(rng) if typed else rng})
        for name in ("data", "metrics"):
            try:
                json.dumps(meta[name], allow_nan=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: `{name}` must be JSON-able (numbers, strings, lists, dicts): {e}.") from e
        items[_META] = ocp.args.JsonSave(meta)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force))

    def restore(
        self,
        step: int | None = None,
        *,
        optimizer: optax.GradientTransformation | None = None,
        opt_state: PyTree | None = None,
        param_shardings: PyTree | None = None,
        shardings: PyTree | None = None,
        opt_state_shardings: PyTree | None = None,
        frozen: PyTree | None = None,
        spec: LoraSpec | None = None,
        like: PyTree | None = None,
    ) -> TrainState:
        """Restores a training state; with no arguments, the latest step as it was saved.

        The adapter tree, `LoraFactors` metadata included, comes from the
        checkpoint itself. Everything that checks the checkpoint against the
        model (``frozen``, ``spec``, ``like``) runs on its metadata before any
        array is read.

        Args:
          step: the step to restore; ``None`` for the latest.
          optimizer: the optax transformation the state was made with; its
            state's structure is derived from the restored adapters
            (``optimizer.init``), so no template is needed.
          opt_state: a template of the optimizer state (concrete or
            abstract) instead of ``optimizer``.
          param_shardings: shardings of the base params (a tree like the
            params, as for `lora_jax.sharding.adapter_shardings`); the
            adapters' shardings, and with ``optimizer`` the optimizer
            state's, are derived from them, and each device reads only its
            own shards.
          shardings: the adapters' shardings, given directly (a tree like the
            adapters) instead of ``param_shardings``.
          opt_state_shardings: the optimizer state's shardings, given directly.
          frozen: the frozen params the adapters will be used with; every
            adapter must fit its weight.
          spec: the `LoraSpec` the run uses; every adapter's rank, scale
            and dropout must agree with it.
          like: an adapter tree (concrete or abstract, e.g. ``jax.eval_shape``
            of a split) the checkpoint must equal in paths, shapes and metadata.

        Returns:
          A `TrainState`. Arrays are placed on the given shardings, else on
          the first local device.

        Raises:
          FileNotFoundError: no checkpoint in the directory, or no such step.
          ValueError: the checkpoint does not match ``frozen``/``spec``/``like``
            or the optimizer (naming the first mismatching path and both
            shapes), or it is corrupt or not a lora_jax checkpoint.
        """
        where = f"CheckpointManager.restore({str(self._directory)!r})"
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{where}: no complete checkpoint in the directory.")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{where}: there is no step {step}; the steps there are {steps}.")
        where = f"{where} step {step}"
        meta = self._read_meta(where, step)
        if frozen is not None:
            _check_against_frozen(where, meta["adapters"], frozen)
        if spec is not None:
            if not isinstance(spec, LoraSpec):
                raise TypeError(f"{where}: `spec` must be a lora_jax.LoraSpec; got {type(spec).__name__}.")
            _check_against_spec(where, meta["adapters"], spec)
        if like is not None:
            _check_against_like(where, meta["adapters"], like)
        if optimizer is not None and opt_state is not None:
            raise ValueError(f"{where}: pass `optimizer` or an `opt_state` template, not both.")
        if param_shardings is not None and shardings is not None:
            raise ValueError(f"{where}: pass `param_shardings` or the adapters' `shardings`, not both.")

        default = SingleDeviceSharding(jax.local_devices()[0])
        abstract = _abstract_adapters(meta["adapters"])
        if param_shardings is not None:
            shardings = sharding.adapter_shardings(param_shardings, abstract)
        stored_shardings = None if shardings is None else _stored_form(shardings)
        target = _with_shardings(_stored_form(abstract), stored_shardings, default)
        items: dict[str, Any] = {_ADAPTERS: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}

        opt_target = None
        if meta["opt_state"] is not None:
            if optimizer is not None:
                opt_target = jax.eval_shape(optimizer.init, abstract)
                if opt_state_shardings is None and shardings is not None:
                    opt_state_shardings = sharding.optimizer_state_shardings(optimizer, abstract, shardings)
            elif opt_state is not None:
                opt_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), opt_state)
                if opt_state_shardings is None:
                    opt_state_shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), opt_state)
            if opt_target is not None:
                _check_opt_state(where, meta["opt_state"], opt_target)
                opt_target = _with_shardings(opt_target, opt_state_shardings, default)
                items[_OPT_STATE] = ocp.args.StandardRestore(opt_target)
            else:
                items[_OPT_STATE] = ocp.args.StandardRestore()
        elif optimizer is not None or opt_state is not None:
            raise ValueError(f"{where}: the checkpoint has no optimizer state; it was saved without `opt_state=`.")
        if meta["rng"] is not None:
            items[_RNG] = ocp.args.StandardRestore()

        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise ValueError(
                f"{where}: the checkpoint could not be read ({type(e).__name__}: {e}). Its files are incomplete or "
                "corrupt; restore an earlier step."
            ) from e

        adapters = _from_stored(out[_ADAPTERS], meta["adapters"])
        rng = None
        if meta["rng"] is not None:
            key_data = jnp.asarray(out[_RNG]["key_data"])
            rng = jax.random.wrap_key_data(key_data, impl=meta["rng"]["impl"]) if meta["rng"]["typed"] else key_data
        saved_spec = None if meta["spec"] is None else spec_from_json(meta["spec"])
        return TrainState(
            step=int(meta["step"]),
            adapters=adapters,
            opt_state=out[_OPT_STATE] if meta["opt_state"] is not None else None,
            rng=rng,
            data=dict(meta["data"]),
            spec=saved_spec,
            metrics=meta["metrics"],
        )

    def _read_meta(self, where: str, step: int) -> dict:
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
            meta = out[_META]
        except Exception as e:
            raise ValueError(
                f"{where}: its metadata could not be read ({type(e).__name__}: {e}). It is not a lora_jax "
                "checkpoint, or it is incomplete or corrupt."
            ) from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{where}: not a lora_jax checkpoint (its metadata has no format {FORMAT!r}).")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{where}: written by a newer lora_jax (format version {meta['version']} > {FORMAT_VERSION}); "
                "upgrade lora_jax to read it."
            )
        return meta


def restore(directory: str | os.PathLike[str], step: int | None = None, **kwargs: Any) -> TrainState:
    """Restores a checkpoint from ``directory`` without keeping a manager open.

    Takes the keyword arguments of `CheckpointManager.restore`.

    Raises:
      FileNotFoundError: ``directory`` does not exist or holds no checkpoint.

    >>> state = restore("/tmp/run/checkpoints")  # doctest: +SKIP
    """
    with CheckpointManager(directory, create=False, async_save=False) as manager:
        return manager.restore(step, **kwargs)


def save_merged(directory: str | os.PathLike[str], frozen: PyTree, adapters: PyTree) -> pathlib.Path:
    """Merges the adapters into full params and saves them as a plain orbax checkpoint.

    The result is ``lora_jax.merge(frozen, adapters)`` (the original params'
    structure and dtypes) saved with orbax's `StandardCheckpointer`, so it
    loads back with orbax alone: ``ocp.StandardCheckpointer().restore(path)``.
    The write is atomic.

    Args:
      directory: the checkpoint directory to create; it must not exist yet.
      frozen: the frozen tree from `lora_jax.split`.
      adapters: the trained adapter tree.

    Returns:
      The absolute path written.

    Raises:
      FileExistsError: ``directory`` exists.
      ValueError: the adapters do not belong to ``frozen``.

    >>> save_merged("/tmp/merged", frozen, adapters)  # doctest: +SKIP
    """
    path = pathlib.Path(directory).absolute()
    if path.exists():
        raise FileExistsError(f"save_merged: `directory` {str(path)!r} exists; choose a new directory.")
    params = _tree.merge(frozen, adapters)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path
