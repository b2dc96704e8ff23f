"""RunLogger: metrics.jsonl and TensorBoard events, in order, complete, readable."""

import json
import math
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_vla.training.logging import RunLogger, _tensorboardx_protos, to_python

Summary, Event, _ = _tensorboardx_protos()  # first: tensorboardX imported without torch
from tensorboardX.record_writer import masked_crc32c  # noqa: E402  # tensorboardX's own (per-byte) checksum


def read_events(tb_dir: Path) -> list:
    """Every Event in the run's event file, its TFRecord framing and checksums checked."""
    (path,) = [p for p in Path(tb_dir).iterdir() if "tfevents" in p.name]
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        assert len(body) == length, "truncated record"
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def scalars(events) -> list[tuple[int, str, float]]:
    return [(e.step, v.tag, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value]


def record(i: int, **extra) -> dict:
    rng = random.Random(i)
    out = {"iteration": i, "global_step": 64 * i, "sps": 1e5 * rng.random(), "episodes": 3}
    out.update({f"loss/m{j}": rng.uniform(-10, 10) for j in range(17)})
    out.update(extra)
    return out


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_record_in_order_one_event_each(tmp_path):
    records = [record(i) for i in range(1, 2001)]
    logger = RunLogger(tmp_path, len(records), progress=False)
    before = time.time()
    for r in records:
        logger.log(r)
    logger.close()
    assert read_jsonl(tmp_path) == records

    events = read_events(tmp_path / "tensorboard")
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 1 + len(records)
    for event, r in zip(events[1:], records):
        assert event.step == r["global_step"]
        assert before - 1 <= event.wall_time <= time.time() + 1
        expected = [(k, np.float32(v)) for k, v in r.items() if k != "global_step"]
        assert [(v.tag, np.float32(v.simple_value)) for v in event.summary.value] == expected


def test_same_scalars_as_tensorboardx_add_scalar(tmp_path):
    """What the old writer (SummaryWriter.add_scalar per value) wrote, tag for tag."""
    from tensorboardX import SummaryWriter

    records = [
        record(1, **{"eval/return_mean": 2.5, "bad name!": 1.0, "/lead": 2.0}),
        record(2, nan=float("nan"), inf=np.float32("inf"), missing=None, flag=True, text="x", arr=np.float64(4.5)),
        record(3, big=10**12, small=np.int32(-7)),
    ]
    (tmp_path / "new").mkdir()
    logger = RunLogger(tmp_path / "new", 3, progress=False)
    for r in records:
        logger.log(r)
    logger.close()

    reference = SummaryWriter(str(tmp_path / "old"))
    for r in (dict((k, to_python(v)) for k, v in r.items()) for r in records):
        for name, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "global_step":
                reference.add_scalar(name, value, r["global_step"])
    reference.close()

    new = scalars(read_events(tmp_path / "new" / "tensorboard"))
    old = scalars(read_events(tmp_path / "old"))
    assert new == old
    tags = {tag for _, tag, _ in new}
    assert {"eval/return_mean", "bad_name_", "lead", "arr", "big", "small"} <= tags
    assert not tags & {"nan", "inf", "missing", "flag", "text", "global_step"}
    rows = read_jsonl(tmp_path / "new")
    assert rows[1]["nan"] is None and rows[1]["inf"] is None and rows[1]["missing"] is None
    assert rows[1]["flag"] is True and rows[1]["text"] == "x" and rows[1]["arr"] == 4.5
    assert rows[2]["small"] == -7 and isinstance(rows[2]["small"], int)


def test_tensorboard_reads_it(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    records = [record(i, **{"eval/return_mean": float(i)}) for i in range(1, 51)]
    logger = RunLogger(tmp_path, 50, progress=False)
    for r in records:
        logger.log(r)
    logger.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert sorted(tags) == sorted(k for k in records[0] if k != "global_step")
    for tag in tags:
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        assert got == [(r["global_step"], pytest.approx(float(np.float32(r[tag])))) for r in records]


def test_written_while_running_without_close(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLogger, "TB_FLUSH_SECS", 0.1)
    logger = RunLogger(tmp_path, 10, progress=False)
    try:
        logger.log(record(1))
        deadline = time.time() + 10
        while time.time() < deadline:
            if len(read_jsonl(tmp_path)) == 1 and len(read_events(tmp_path / "tensorboard")) == 2:
                break
            time.sleep(0.02)
        assert read_jsonl(tmp_path) == [record(1)]
        assert read_events(tmp_path / "tensorboard")[1].step == 64
        # a later record, flushed by the interval (no new record, no close)
        logger.log(record(2))
        deadline = time.time() + 10
        while time.time() < deadline and len(read_events(tmp_path / "tensorboard")) < 3:
            time.sleep(0.02)
        assert [e.step for e in read_events(tmp_path / "tensorboard")[1:]] == [64, 128]
    finally:
        logger.close()


def test_writer_error_is_raised_by_log(tmp_path):
    logger = RunLogger(tmp_path, 10, progress=False)
    logger.log({"iteration": 1, "loss": 1.0})  # no global_step: the event cannot be written
    logger._file_thread.join(timeout=10)
    assert not logger._file_thread.is_alive()
    with pytest.raises(RuntimeError, match="failed") as info:
        logger.log(record(2))
    assert isinstance(info.value.__cause__, KeyError)
    logger.close()  # already raised: not again; the files are closed
    assert logger.metrics_file.closed


def test_writer_error_is_raised_by_close(tmp_path):
    logger = RunLogger(tmp_path, 10, progress=False)
    logger.log(record(1))
    logger.log({"iteration": 2})
    with pytest.raises(RuntimeError) as info:
        logger.close()
    assert isinstance(info.value.__cause__, KeyError)
    assert read_jsonl(tmp_path)[0] == record(1)


def test_close_is_prompt(tmp_path):
    logger = RunLogger(tmp_path, 10, progress=False)
    logger.log(record(1))
    start = time.perf_counter()
    logger.close()
    assert time.perf_counter() - start < RunLogger.TB_FLUSH_SECS
    assert len(read_events(tmp_path / "tensorboard")) == 2


def test_to_python():
    assert to_python(1.5) == 1.5 and to_python(float("nan")) is None and to_python(float("-inf")) is None
    assert to_python(np.float32(2.0)) == 2.0 and type(to_python(np.float32(2.0))) is float
    assert to_python(np.array(3)) == 3 and type(to_python(np.array(3))) is int
    assert to_python(np.float64("nan")) is None
    assert to_python(True) is True and to_python(None) is None and to_python("a") == "a"


def test_event_checksum_is_crc32c():
    """The TFRecord checksum in use is CRC-32C (the standard check value), masked as TFRecord masks it."""
    _, _, masked = _tensorboardx_protos()
    crc = 0xE3069283  # CRC-32C of b"123456789"
    assert masked(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_torch_not_imported(tmp_path):
    """A JAX user must not pay for importing torch (tensorboardX imports it when installed)."""
    path = Path(__file__).parents[1] / "jaxrl_vla" / "training" / "logging.py"
    code = (
        "import importlib.util, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('run_logging', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"logger = mod.RunLogger(Path({str(tmp_path)!r}), 1, progress=False)\n"
        "logger.log({'iteration': 1, 'global_step': 8, 'loss': 0.5}); logger.close()\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert math.isclose(read_events(tmp_path / "tensorboard")[1].summary.value[1].simple_value, 0.5)
