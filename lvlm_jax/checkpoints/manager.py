"""The orbax CheckpointManager of a run: train state (params, optimizer state, step, RNG) plus
the grain iterator state (one JSON per process, merged on restore onto any number of
processes), async saves every N steps, the last K kept,
and restore onto whatever mesh the resuming run has.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed during a save leaves no checkpoint that `latest_step` would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs with shardings: restore places every shard straight onto its device."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves and restores `{state, data}` under DIR/checkpoints."""

    def __init__(self, workdir: str, every_steps: int = 0, keep: int = 3,
                 async_save: bool = True, every_minutes: float = 0.0,
                 best_metric: str = "eval_loss", best_mode: str = "min"):
        self.every_steps = int(every_steps)
        self.keep = int(keep or 0)
        self.best_metric, self.best_mode = best_metric, best_mode
        self._metrics_path = os.path.join(checkpoint_dir(workdir), "metrics.json")
        self._metrics: dict[str, dict] = {}
        if os.path.exists(self._metrics_path):
            with open(self._metrics_path) as f:
                self._metrics = json.load(f)
        self.every_seconds = 60.0 * float(every_minutes or 0.0)
        self._last_save = time.monotonic()
        # Pruning is ours (the last K plus the best by a metric), not orbax's max_to_keep.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Every N steps and/or every M minutes of wall time (all processes must agree, so the
        time rule follows process 0's clock through a tiny broadcast only when it is set)."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_seconds:
            due = time.monotonic() - self._last_save >= self.every_seconds
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                due = bool(multihost_utils.broadcast_one_to_all(due))
            return due
        return False

    def record(self, step: int, metrics: dict) -> None:
        """Eval metrics of `step`, used to keep the best checkpoint."""
        self._metrics.setdefault(str(step), {}).update(
            {k: float(v) for k, v in metrics.items()})

    def best_step(self) -> int | None:
        scored = [(v[self.best_metric], int(s)) for s, v in self._metrics.items()
                  if self.best_metric in v and int(s) in self.manager.all_steps()]
        if not scored:
            return None
        return (min(scored) if self.best_mode == "min" else max(scored))[1]

    def _prune(self, room: int = 0) -> None:
        """Deletes all but the last `keep - room` finished steps and the best one."""
        if not self.keep:
            return
        steps = sorted(self.manager.all_steps())
        n = max(self.keep - room, 0)
        keep = set(steps[-n:]) if n else set()
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for s in steps:
            if s not in keep:
                self.manager.delete(s)

    def save(self, step: int, state: Any, data_iterator: Any = None) -> None:
        # The previous async save has had a whole step to finish; once it has, older steps
        # are pruned, leaving room for this one.
        self.manager.wait_until_finished()
        self._prune(room=1)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._last_save = time.monotonic()
        if jax.process_index() == 0 and self._metrics:
            os.makedirs(os.path.dirname(self._metrics_path), exist_ok=True)
            with open(self._metrics_path, "w") as f:
                json.dump(self._metrics, f)


    def restore(self, abstract_state: Any, data_iterator: Any = None,
                step: int | None = None) -> tuple[Any, int]:
        """(state restored onto `abstract_state`'s shardings, step); the data iterator, if
        given, is moved to where it was at that step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        from data_pipelines.lanes import merge_lane_states

        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_dir = os.path.join(str(self.manager.directory), str(step), "data")
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        lanes = None
        if data_iterator is not None and os.path.isdir(data_dir):
            # The loader's state is one state per row of the global batch (data_pipelines/
            # lanes.py), the same in any process: every process takes its rows from the merged
            # files, whatever number of processes wrote them.
            lanes = merge_lane_states(data_dir)
            if lanes is None and os.path.exists(os.path.join(data_dir, mine)):
                import grain

                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            elif lanes is None:
                # Worker processes' states are per worker and per process: they do not move.
                logging.warning("the data-iterator state of step %d was saved by another "
                                "number of processes (no %s) with data.worker_count > 0; the "
                                "input restarts from the beginning of its order", step, mine)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if lanes is not None:
            data_iterator.set_state(lanes)
        return restored["state"], step

    def saved_items(self, step: int) -> list[str]:
        path = os.path.join(str(self.manager.directory), str(step))
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._prune()
        self.manager.close()


def _host_target(state_dir: str) -> Any:
    """The saved state's shapes and dtypes on this host's CPU device: the shardings it was saved
    with name devices of the topology that wrote it, which need not exist here."""
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)
        if hasattr(m, "shape") and hasattr(m, "dtype") else m, tree)


def _placed_target(saved: Any, target: Any) -> Any:
    """The saved params' shapes placed for this run: a parameter that this run has with the same
    path and shape goes straight onto its sharding in its dtype (each process reads only its
    shards); any other (a LoRA source's adapters, a head this run lacks, a mismatch for
    `merge_params` to report) is replicated over the same mesh."""
    from lvlm_jax.param_paths import flat_paths, path_of

    mine = flat_paths(target)
    mesh = next(iter(mine.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(kp, m):
        own = mine.get(path_of(kp))
        if own is not None and tuple(own.shape) == tuple(m.shape):
            return jax.ShapeDtypeStruct(own.shape, own.dtype, sharding=own.sharding)
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated)

    return jax.tree_util.tree_map_with_path(place, saved)


def restore_params(workdir: str, step: int | None = None, target: Any = None
                   ) -> tuple[Any, int]:
    """The params of another run's checkpoint, for stage chaining and export; the run may have
    been on any number of processes and devices.

    Without `target`: numpy, whole on the host (export, tools). With `target` (this run's
    abstract params: ShapeDtypeStructs with shardings): only the params are read (not the
    optimizer state), each straight onto this run's sharding (`_placed_target`), so no host
    ever holds the whole model, which a multi-host run could not."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory) and os.path.isdir(os.path.join(workdir, "params")):
        # `lvlm import` output (params only, as step 0): HF weights that start a run.
        from lvlm_jax.checkpoints.export import load_params_only

        return load_params_only(workdir)[1], 0
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} holds no checkpoints (no {directory})")
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        state_dir = os.path.join(directory, str(step), "state")
        if target is None:
            args = ocp.args.StandardRestore(_host_target(state_dir))
        else:
            saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
            item = {"params": _placed_target(saved["params"], target)}
            args = ocp.args.PyTreeRestore(
                item=item, partial_restore=True, restore_args=jax.tree.map(
                    lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                   dtype=s.dtype), item))
        restored = manager.restore(step, args=ocp.args.Composite(state=args))
    state = restored["state"]
    params = state["params"] if isinstance(state, dict) else state.params
    if target is not None:
        return params, step
    return jax.tree.map(lambda x: jax.device_get(x), params), step
