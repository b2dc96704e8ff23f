"""What a user watches and keeps: a progress bar, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def to_python(value: Any) -> Any:
    """Arrays and numpy scalars -> JSON-ready floats/ints (NaN -> None)."""
    kind = type(value)
    if kind is float:  # the common case, first
        return value if math.isfinite(value) else None
    if kind is int or kind is bool or kind is str or value is None:
        return value
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics_after(path: Path, iteration: int) -> None:
    """Drop the records of iterations past `iteration` (the checkpoint a resumed run restarts from).

    A run killed (kill -9) after its last checkpoint logged iterations that the resumed run repeats:
    without this, metrics.jsonl would hold them twice. A torn last line (killed mid-write) goes too.
    The rewrite is atomic (temporary file + rename)."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line)
            keep = int(record.get("iteration", 0)) <= iteration and line.endswith("\n")
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            changed = True
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


class RunLogger:
    """Appends one JSON object per iteration to metrics.jsonl, mirrors scalars to
    TensorBoard, and drives a rich progress bar (steps/s, return, iteration).

    The files are written by a background thread, so `log` only converts and
    enqueues. That thread competes with training for the GIL and the cores, so
    it works in batches: each wake-up takes everything queued (after waiting
    `LINGER_SECS` for more), writes its JSON lines in one write and one flush,
    and its TensorBoard events, one per record, in one write; the event file is
    flushed at most every `TB_FLUSH_SECS`, and on `close`. Records are written
    in order; `close` writes everything logged before it. An error in that
    thread is raised by the next `log` or by `close`.
    """

    LINGER_SECS = 0.05  # a wake-up waits this long for more records (close ends the wait)
    TB_FLUSH_SECS = 2.0  # the event file is flushed at most this often, and on close
    # Until the first record arrives the first call is compiling (seconds on a laptop, minutes for a VLA):
    # the bar says so from the start; without a terminal one line says so after this long
    COMPILING_TEXT = "compiling…"
    COMPILING_NOTE_SECS = 2.0

    def __init__(self, run_dir: Path, total_iterations: int, start_iteration: int = 0, progress: bool = True,
                 start_step: int | None = None):
        self.run_dir = Path(run_dir)
        truncate_metrics_after(self.run_dir / "metrics.jsonl", start_iteration)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        # a resumed run hides what an earlier process logged past the checkpoint (after a kill -9)
        purge_step = None if not start_iteration or start_step is None else int(start_step) + 1
        self.events = EventFile(self.run_dir / "tensorboard", purge_step=purge_step)
        # (wall time, record) pairs, then None from close(); SimpleQueue: the cheapest put
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._error_raised = False
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
                "train", total=total_iterations, completed=start_iteration, sps="-", ret="-",
                extra=f"[yellow]{self.COMPILING_TEXT}",
            )
            self._progress.start()
        self._last_line = 0.0
        self._start_iteration = start_iteration
        self._compiling = True  # no record yet
        self._compiling_note: threading.Timer | None = None
        if self._progress is not None and self._progress.disable:
            self._compiling_note = threading.Timer(self.COMPILING_NOTE_SECS, self._note_compiling)
            self._compiling_note.daemon = True
            self._compiling_note.start()

    def _note_compiling(self) -> None:
        """Without a terminal: say why nothing moves yet (the timer's thread, once)."""
        if self._compiling:
            self.console.print(f"iter {self._start_iteration}: {self.COMPILING_TEXT} (the first iteration's program; "
                               "training starts when XLA has it)")

    def _compiled(self) -> None:
        self._compiling = False
        if self._compiling_note is not None:
            self._compiling_note.cancel()
        if self._progress is not None:
            self._progress.update(self._task, extra="")

    def log(self, record: dict[str, Any]) -> None:
        if self._error is not None:
            self._raise_error()
        record = {k: to_python(v) for k, v in record.items()}
        self._records.put((time.time(), record))
        self._show(record)

    def _write_files(self) -> None:
        try:
            flushed = -math.inf  # the first batch's events are flushed at once
            dirty = False
            while True:
                timeout = max(0.0, flushed + self.TB_FLUSH_SECS - time.monotonic()) if dirty else None
                try:
                    first = self._records.get(timeout=timeout)
                except queue.Empty:  # nothing new for a while: show TensorBoard what it has
                    self.events.flush()
                    flushed, dirty = time.monotonic(), False
                    continue
                if first is not None:
                    self._closing.wait(self.LINGER_SECS)  # let the burst this wake-up belongs to arrive
                batch = [first]
                while batch[-1] is not None:
                    try:
                        batch.append(self._records.get_nowait())
                    except queue.Empty:
                        break
                done = batch[-1] is None
                if done:
                    batch.pop()
                if batch:
                    self.metrics_file.write("".join([json.dumps(record) + "\n" for _, record in batch]))
                    self.metrics_file.flush()
                    self.events.add_records(batch)
                    dirty = True
                if done:
                    return
                if dirty and time.monotonic() - flushed >= self.TB_FLUSH_SECS:
                    self.events.flush()
                    flushed, dirty = time.monotonic(), False
        except BaseException as error:  # noqa: BLE001 - raised on the caller's thread
            self._error = error

    def _raise_error(self) -> None:
        self._error_raised = True
        raise RuntimeError(f"writing {self.run_dir / 'metrics.jsonl'} or tensorboard/ failed") from self._error

    def _show(self, record: dict[str, Any]) -> None:
        if self._compiling:
            self._compiled()
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
        """Write everything logged so far, then close the files; raises the
        writer thread's error if `log` has not raised it already."""
        self._compiled()
        self._records.put(None)
        self._closing.set()
        self._file_thread.join()
        try:
            if self._progress is not None:
                self._progress.stop()
        finally:
            try:
                self.events.close()
            finally:
                self.metrics_file.close()
        if self._error is not None and not self._error_raised:
            self._raise_error()


_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w\.]")  # as tensorboardX's add_scalar cleans tags
_file_numbers = itertools.count()
_pack_u32 = struct.Struct("<I").pack


class EventFile:
    """A TensorBoard event file written in the calling thread: one `Event` per
    record, holding a `Summary` with all of the record's scalars.

    tensorboardX's SummaryWriter writes one event per scalar and hands each to
    its own writer thread through a multiprocessing queue (a pickle and a pipe
    per scalar), and checksums the file in pure Python: about 1 ms per record
    of 20 scalars. This uses its protobufs and the same file format (TFRecord:
    length, masked CRC-32C of the length, data, masked CRC-32C of the data),
    checksummed by tensorboardX's `masked_crc32c`, which runs in C with the
    `crc32c` package (a dependency for that reason).
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        """`purge_step`: TensorBoard drops the events of earlier files from this step on (what a
        resumed run logs again), as tensorboardX's `SummaryWriter(purge_step=)` does: a
        SessionLog START event at that step."""
        Summary, Event, self._masked_crc = _tensorboardx_protos()
        self._Summary, self._Value, self._Event = Summary, Summary.Value, Event
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads every file with "tfevents" in its name; pid and number keep names unique
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}"
        self.path = logdir / name
        self._file = open(self.path, "ab")
        self._tags: dict[str, str] = {}
        self.write([Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()])
        if purge_step is not None:
            from tensorboardX.proto.event_pb2 import SessionLog

            start = Event(wall_time=time.time(), step=int(purge_step), session_log=SessionLog(status=SessionLog.START))
            self.write([start.SerializeToString()])
        self.flush()

    def add_records(self, items: list[tuple[float, dict[str, Any]]]) -> None:
        """One event per (wall time, record): its int and float values but
        global_step (the event's step); None (NaN, inf), bools and strings are left out."""
        events = []
        for wall_time, record in items:
            values = [
                self._Value(tag=self._tag(name), simple_value=value)
                for name, value in record.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "global_step"
            ]
            step = int(record["global_step"])
            event = self._Event(wall_time=wall_time, step=step, summary=self._Summary(value=values))
            events.append(event.SerializeToString())
        self.write(events)

    def _tag(self, name: str) -> str:
        tag = self._tags.get(name)
        if tag is None:
            tag = self._tags[name] = _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")
        return tag

    def write(self, events: list[bytes]) -> None:
        """Appends serialized `Event`s as TFRecords (to the file's buffer)."""
        crc, parts = self._masked_crc, []
        for event in events:
            header = struct.pack("<Q", len(event))
            parts += (header, _pack_u32(crc(header)), event, _pack_u32(crc(event)))
        self._file.write(b"".join(parts))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _tensorboardx_protos() -> tuple[type, type, Callable[[bytes], int]]:
    """tensorboardX's Summary and Event protobufs and TFRecord checksum, imported without importing torch.

    tensorboardX imports torch whenever it is installed (only to accept torch
    tensors, which we never pass); that costs seconds at start-up, and a user
    training a JAX env must not pay for torch. If torch is not imported yet, it
    is hidden during this one import.
    """
    hide = "torch" not in sys.modules and "tensorboardX.writer" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import masked_crc32c
    finally:
        if hide:
            del sys.modules["torch"]
    return Summary, Event, masked_crc32c
