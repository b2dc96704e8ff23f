"""Checkpoints of the whole TrainState (params, optimiser state, normaliser
statistics, env state, step counters, RNG key) plus the resolved config, with
orbax. Orbax writes into a temporary directory and renames it when complete,
so a crash never leaves a half-written checkpoint that `restore` would load.

Checkpoints hold global arrays, whatever mesh wrote them: `restore` reads them into the placement of the
template (its shardings), so a run written on 4 devices as data 2 x fsdp 2 restores on 1 device, on another
split or on several processes (docs/scaling.md). With several processes every process calls `save` and
writes its own shards (orbax's per-process store), the primary process the metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatch(ValueError):
    """The checkpoint's arrays do not fit the state the config builds (e.g. `--set` changed the architecture)."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_name(path: tuple) -> str:
    """A pytree path as orbax names the stored array: "params.params.Dense_0.kernel"."""
    return ".".join(_key_name(k) for k in path)


def first_shape_mismatch(template_state: Any, stored: Any) -> tuple[str, Any, Any] | None:
    """(name, stored shape, template shape) of the first leaf that differs, or of a leaf one side lacks."""
    stored_shapes = {leaf_name(path): tuple(getattr(meta, "shape", ()) or ())
                     for path, meta in jax.tree_util.tree_leaves_with_path(stored)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(template_state):
        name, shape = leaf_name(path), tuple(getattr(leaf, "shape", ()))
        if name not in stored_shapes:
            return name, None, shape
        if stored_shapes[name] != shape:
            return name, stored_shapes[name], shape
    return None


class Checkpointer:
    def __init__(self, run_dir: Path, max_to_keep: int = 3):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False),
        )

    def save(self, iteration: int, state: Any, metadata: dict) -> Path:
        self._manager.save(
            iteration,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)),
            force=True,
        )
        self._manager.wait_until_finished()
        return self.directory / str(iteration)

    def latest_iteration(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, template_state: Any, iteration: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure, shapes, dtypes and shardings of `template_state`."""
        iteration = self._manager.latest_step() if iteration is None else iteration
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        self._check_shapes(template_state, iteration)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template_state)
        restored = self._manager.restore(
            iteration,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return restored.state, restored.meta

    def _check_shapes(self, template_state: Any, iteration: int) -> None:
        """Name the first array whose stored shape differs from the config's, before orbax fails deep inside."""
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # orbax warns that the step-level metadata file is absent: harmless here
        try:
            stored = ocp.StandardCheckpointer().metadata(self.directory / str(iteration) / "state")
        except Exception:  # unreadable metadata: let the restore itself report the damage
            return
        finally:
            absl_logger.setLevel(level)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
        if not stored:
            return
        mismatch = first_shape_mismatch(template_state, stored)
        if mismatch is None:
            return
        name, have, want = mismatch
        if have is None:
            raise CheckpointMismatch(f"checkpoint {iteration} has no array {name} that the config's state holds "
                                     f"(shape {want}); was the architecture changed (--set)?")
        raise CheckpointMismatch(f"checkpoint {iteration}: {name} has shape {have} but the config makes {want}; "
                                 "a --set changed the architecture (resume with the run's own settings)")

    def close(self) -> None:
        self._manager.close()
