"""Checkpoints of the whole TrainState (params, optimiser state, normaliser
statistics, env state, step counters, RNG key) plus the resolved config, with
orbax. Orbax writes into a temporary directory and renames it when complete,
so a crash never leaves a half-written checkpoint that `restore` would load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


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
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template_state)
        restored = self._manager.restore(
            iteration,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return restored.state, restored.meta

    def close(self) -> None:
        self._manager.close()
