"""What a user watches and keeps: a progress bar, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def to_python(value: Any) -> Any:
    """Arrays and numpy scalars -> JSON-ready floats/ints (NaN -> None)."""
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Appends one JSON object per iteration to metrics.jsonl, mirrors scalars to
    TensorBoard, and drives a rich progress bar (steps/s, return, iteration)."""

    def __init__(self, run_dir: Path, total_iterations: int, start_iteration: int = 0, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = summary_writer_class()(str(self.run_dir / "tensorboard"), flush_secs=10)
        # files are written by a background thread: the training loop only enqueues
        self._records: queue.Queue = queue.Queue()
        self._file_thread = threading.Thread(target=self._write_files, name="metrics-writer", daemon=True)
        self._file_thread.start()
        self.console = Console(stderr=True, soft_wrap=True)  # no hard wraps in logs and CI
        self._progress = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]iter {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[sps]} steps/s"),
                TextColumn("return {task.fields[ret]}"),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                disable=not sys.stderr.isatty(),
            )
            self._task = self._progress.add_task(
                "train", total=total_iterations, completed=start_iteration, sps="-", ret="-", extra=""
            )
            self._progress.start()
        self._last_line = 0.0

    def log(self, record: dict[str, Any]) -> None:
        record = {k: to_python(v) for k, v in record.items()}
        self._records.put(record)
        self._show(record)

    def _write_files(self) -> None:
        while (record := self._records.get()) is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            step = int(record["global_step"])
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "global_step":
                    self.writer.add_scalar(name, value, step)

    def _show(self, record: dict[str, Any]) -> None:
        ret = record.get("episode_return_mean")
        ret_text = "-" if ret is None else f"{ret:.1f}"
        extra = ""
        if record.get("eval/return_mean") is not None:
            extra = f"eval {record['eval/return_mean']:.1f}"
            if record.get("eval/success_rate") is not None:
                extra += f" success {record['eval/success_rate']:.0%}"
        if self._progress is not None and not self._progress.disable:
            self._progress.update(
                self._task, completed=record["iteration"], sps=f"{record.get('sps', 0):,.0f}", ret=ret_text, extra=extra
            )
        elif self._progress is not None and (time.time() - self._last_line > 5.0 or extra):
            # no terminal (CI, redirected output): a plain line at most every 5 s
            self._last_line = time.time()
            self.console.print(
                f"iter {record['iteration']} step {record['global_step']} "
                f"{record.get('sps', 0):,.0f} steps/s return {ret_text} {extra}".rstrip()
            )

    def close(self) -> None:
        """Write everything logged so far, then close the files."""
        self._records.put(None)
        self._file_thread.join()
        if self._progress is not None:
            self._progress.stop()
        self.writer.close()
        self.metrics_file.close()


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing torch.

    tensorboardX imports torch whenever it is installed (only to accept torch
    tensors, which we never pass); that costs seconds at start-up, and a user
    training a JAX env must not pay for torch. If torch is not imported yet, it
    is hidden during this one import.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
