"""Resuming: a --set that changes the architecture names the parameter (exit 2, nothing written), and
TensorBoard shows each step once after a kill -9 and --resume (the resumed run purges what the killed
process logged past its checkpoint, as metrics.jsonl is truncated)."""

import json
import subprocess
import sys
import time

import pytest

from jaxrl_vla.training.checkpoint import first_shape_mismatch, leaf_name
from jaxrl_vla.training.logging import RunLogger


def _log(run_dir, iterations, start=0, start_step=None, value=0.0):
    logger = RunLogger(run_dir, iterations[-1], start, progress=False, start_step=start_step)
    for i in iterations:
        logger.log({"iteration": i, "global_step": 64 * i, "loss/policy": value + i})
    logger.close()


def _scalars(run_dir, tag):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(s.step, s.value) for s in acc.Scalars(tag)]


def test_resumed_run_purges_tensorboard_steps_past_its_checkpoint(tmp_path):
    _log(tmp_path, list(range(1, 11)))  # killed at iteration 10; its last checkpoint was iteration 5
    time.sleep(1.1)  # event files are named by the second they were opened
    _log(tmp_path, list(range(6, 13)), start=5, start_step=64 * 5, value=100.0)
    got = _scalars(tmp_path, "loss/policy")
    assert [step for step, _ in got] == [64 * i for i in range(1, 13)]  # each step once
    assert [v for _, v in got] == [float(i) for i in range(1, 6)] + [100.0 + i for i in range(6, 13)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 13))


def test_without_the_purge_tensorboard_would_show_duplicates(tmp_path):
    _log(tmp_path, list(range(1, 11)))
    time.sleep(1.1)
    _log(tmp_path, list(range(6, 13)), start=5, start_step=None, value=100.0)  # no purge step
    steps = [step for step, _ in _scalars(tmp_path, "loss/policy")]
    assert steps.count(64 * 6) == 2 and len(steps) == 17  # TensorBoard alone keeps both copies of 6..10


def test_first_shape_mismatch_names_the_leaf():
    import numpy as np

    class Meta:
        def __init__(self, shape):
            self.shape = shape

    template = {"params": {"Dense_0": {"kernel": np.zeros((4, 32)), "bias": np.zeros(32)}}}
    stored = {"params": {"Dense_0": {"kernel": Meta((4, 64)), "bias": Meta((64,))}}}
    assert first_shape_mismatch(template, stored)[0] in ("params.Dense_0.kernel", "params.Dense_0.bias")
    assert first_shape_mismatch(template, {"params": {"Dense_0": {"kernel": Meta((4, 32))}}}) == (
        "params.Dense_0.bias", None, (32,))
    same = {"params": {"Dense_0": {"kernel": Meta((4, 32)), "bias": Meta((32,))}}}
    assert first_shape_mismatch(template, same) is None


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxrl_vla.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_resume_with_a_changed_architecture_names_the_parameter(tmp_path):
    out = tmp_path / "runs"
    first = _cli(["--set", "trainer.iterations=1", "--set", "trainer.save_freq=1", "--set", "trainer.eval_freq=0",
                  "--set", "trainer.num_envs=4", "--set", "trainer.buffer_size=16", "--set", "algorithm.cfg.batch_size=32", "--no-progress",
                  "--output-dir", str(out)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = out.iterdir()
    before = sorted(str(p.relative_to(run)) + str(p.stat().st_size) for p in run.rglob("*") if p.is_file())
    result = _cli(["--resume", str(run), "--set", "policy.hidden_sizes=[32, 32]", "--set", "trainer.iterations=2",
                   "--no-progress"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "has shape (64,) but the config makes (32,)" in lines[0], lines
    assert "actor_trunk.Dense_0" in lines[0] or "Dense_0" in lines[0]
    after = sorted(str(p.relative_to(run)) + str(p.stat().st_size) for p in run.rglob("*") if p.is_file())
    assert after == before  # nothing written
