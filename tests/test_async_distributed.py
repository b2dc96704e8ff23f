"""vla (async) mode on several processes: 2 processes x 2 CPU devices (gloo), each with its own host collectors
(gymnasium CartPole) over its half of the envs, the learner's update one SPMD program over the 4 devices.

Each process is this file run as a script (`worker`), building the trainer from a config as the CLI does; the
Ctrl-C test runs the CLI itself. What is checked: both processes end with the same acting params, global_step
counts the envs of both, process 0's metrics.jsonl has the episodes of both, every process writes its checkpoint
shards and the run resumes; a stop (callback on process 0, Ctrl-C on process 1) or a collector error on one
process stops both at the same iteration with a final checkpoint; and with learning rate 1e-30 (params fixed, so
each collector's rows are deterministic whatever the threads' timing) the learner sees the same global batch
as one process of 4 devices running all 4 collectors: the same losses per iteration."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "gymnasium_cartpole.json"
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

SMALL = ["trainer.buffer_type=vla", "trainer.num_envs=8", "trainer.num_collectors=2", "trainer.buffer_size=128",
         "trainer.iterations=3", "trainer.eval_freq=3", "trainer.num_eval_episodes=4", "trainer.save_freq=0",
         "trainer.progress=false", "algorithm.cfg.batch_size=32", "algorithm.cfg.n_epochs=2",
         "policy.hidden_sizes=[32, 32]"]
# learn metrics that depend only on the global batch (and the fixed params), not on the threads' timing
BATCH_METRICS = ("loss/total", "loss/policy", "loss/value", "loss/entropy")


# ---------------------------------------------------------------------------- the worker (one process)


class FailingSpec:
    """A host env spec whose envs raise at their `fail_at`-th step on process 1 only (an injected collector
    fault); otherwise the wrapped spec."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at = inner, fail_at

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def make(self, num_envs: int, seed: int):
        import jax

        env = self.inner.make(num_envs, seed)
        if jax.process_index() != 1:
            return env
        fail_at, step = self.fail_at, env.step
        count = [0]

        def failing_step(actions):
            count[0] += 1
            if count[0] == fail_at:
                raise RuntimeError("injected env fault on process 1")
            return step(actions)

        env.step = failing_step
        return env


def worker(args: dict) -> int:
    """One process of the run: join, build the trainer from the config (with a failing env or a stopping
    callback when asked), train (or resume), print one JSON line of what the test checks."""
    from jaxrl_vla.training import distributed

    if args.get("port"):
        distributed.initialize({"coordinator": f"127.0.0.1:{args['port']}", "num_processes": 2,
                                "process_id": args["pid"], "timeout": 120})
    import jax

    from jaxrl_vla.build import build_algorithm, build_env, build_policy, trainer_kwargs
    from jaxrl_vla.config import load_config
    from jaxrl_vla.training.trainer import Trainer

    cfg = load_config(str(CONFIG), args["overrides"] + [f"trainer.output_dir={args['out']}"])
    env = build_env(cfg["env"])
    if args.get("fail_at"):
        env = FailingSpec(env, args["fail_at"])
    stop_at = args.get("stop_at")
    t = cfg["trainer"]
    trainer = Trainer(build_policy(cfg["policy"], env)[0], env, build_algorithm(cfg["algorithm"]), config=cfg,
                      num_collectors=t["num_collectors"], env_step_timeout=t["env_step_timeout"],
                      callback=(lambda record: record["iteration"] < stop_at) if stop_at else None,
                      **trainer_kwargs(cfg))
    out: dict = {"pid": jax.process_index()}
    try:
        trainer.train(resume=args.get("resume"))
        rc = 0
    except Exception as err:  # noqa: BLE001 - reported to the test
        out["error"] = f"{type(err).__name__}: {err}"
        rc = 1
    snap = trainer.store.snapshot()
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(snap.params):
        digest.update(np.asarray(leaf).tobytes())
    out.update(rc=rc, iteration=int(trainer.state.iteration), global_step=int(trainer.state.global_step),
               params=digest.hexdigest(), version=snap.version, run_dir=str(trainer.run_dir),
               stopped_by_callback=trainer.stopped_by_callback, interrupted=getattr(trainer, "interrupted", None),
               threads=sorted(th.name for th in __import__("threading").enumerate() if th.name.startswith("jaxrl-")))
    print("RESULT " + json.dumps(out), flush=True)
    return rc


# ---------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", *ENV_VARS)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    return env


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (proc.returncode, proc.stderr[-3000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_workers(out: Path, overrides: list[str], processes: int = 2, devices: int = 2, **extra) -> list[dict]:
    """`processes` workers (2: joined by jax.distributed; 1: alone with `devices` devices); their results,
    process 0 first."""
    port = free_port() if processes > 1 else None
    procs = []
    for pid in range(processes)[::-1]:  # process 1 first: it waits for the coordinator process 0 starts
        args = {"pid": pid, "port": port, "overrides": overrides, "out": str(out), **extra}
        procs.append(subprocess.Popen([sys.executable, __file__, json.dumps(args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_env(devices), cwd=ROOT))
    done = []
    for proc in procs[::-1]:
        stdout, stderr = proc.communicate(timeout=600)
        done.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)) |
                    {"returncode": proc.returncode, "stderr": stderr})
    return done


def records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_stop(results: list[dict]) -> None:
    """Both processes stopped at the same iteration with the same params, no collector thread left."""
    assert results[0]["iteration"] == results[1]["iteration"], results
    assert results[0]["params"] == results[1]["params"]
    assert results[0]["threads"] == results[1]["threads"] == []
    checkpoints = Path(results[0]["run_dir"]) / "checkpoints"
    assert str(results[0]["iteration"]) in [p.name for p in checkpoints.iterdir()]


# ---------------------------------------------------------------------------- tests


def test_num_envs_not_split_by_processes_and_collectors_is_named_on_both(tmp_path):
    port = free_port()
    procs = []
    for pid in (1, 0):
        cmd = [sys.executable, "-m", "jaxrl_vla.train", "--no-progress", "--output-dir", str(tmp_path / "runs")]
        for override in SMALL + ["trainer.num_envs=6", "trainer.buffer_size=96",
                                 f"trainer.distributed.coordinator=127.0.0.1:{port}",
                                 "trainer.distributed.num_processes=2", f"trainer.distributed.process_id={pid}"]:
            cmd += ["--set", override]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(1),
                                      cwd=ROOT))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        assert ("config error: trainer.num_envs (6) must be divisible by the processes (2) x trainer.num_collectors "
                "(2)") in err, err[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_processes_train_in_vla_mode_and_resume(tmp_path):
    pair = run_workers(tmp_path / "pair", SMALL)
    for result in pair:
        assert result["returncode"] == 0 and result["rc"] == 0, result["stderr"][-3000:]
    p0, p1 = pair
    assert p0["run_dir"] == p1["run_dir"]
    run_dir = Path(p0["run_dir"])
    # the learner's update is one program: both processes' acting copies are the same params, version 3
    assert p0["params"] == p1["params"] and p0["version"] == p1["version"] == 3
    assert p0["global_step"] == p1["global_step"] == 3 * 128  # 16 steps x 8 envs (4 per process) per iteration
    assert "(this one steps 4 envs in 2 collector(s))" in p0["stderr"] and "finished iteration 3" not in p1["stderr"]
    logged = records(run_dir)
    assert [r["iteration"] for r in logged] == [1, 2, 3] and [r["global_step"] for r in logged] == [128, 256, 384]
    for r in logged:
        assert all(np.isfinite(r[k]) for k in BATCH_METRICS)
        assert r["staleness_max"] <= 2
    # episodes of both processes: CartPole's random-ish episodes last ~10-40 steps, so 8 envs x 48 steps end
    # far more than 4 processes' worth of one process alone could (each process steps 4 envs)
    episodes = sum(r.get("episodes", 0) or 0 for r in logged)
    lengths = [r["episode_length_mean"] for r in logged if r.get("episode_length_mean")]
    assert episodes > 4 * 48 / max(lengths) * 1.5, (episodes, lengths)
    assert logged[-1]["eval/episodes"] == 4  # process 0 evaluated its 4 envs alone
    for pid in (0, 1):
        assert any((run_dir / "checkpoints" / "3" / "state" / f"ocdbt.process_{pid}" / "d").iterdir())
    # resume on both processes from iteration 3 to 4
    more = run_workers(tmp_path / "unused", SMALL + ["trainer.iterations=4", "trainer.eval_freq=4"],
                       resume=str(run_dir))
    for result in more:
        assert result["returncode"] == 0, result["stderr"][-3000:]
        assert result["iteration"] == 4 and result["global_step"] == 4 * 128
    assert more[0]["params"] == more[1]["params"] != p0["params"]
    assert [r["iteration"] for r in records(run_dir)] == [1, 2, 3, 4]


@pytest.mark.long  # two processes x JAX start-up and compile: ~30-40 s on 2 quiet cores; CI keeps the train+resume test
def test_a_stop_or_a_fault_on_one_process_stops_both_at_the_same_iteration(tmp_path):
    # the callback runs on process 0 (it sees the logged records) and stops after iteration 2
    stopped = run_workers(tmp_path / "callback", SMALL + ["trainer.iterations=50"], stop_at=2)
    for result in stopped:
        assert result["returncode"] == 0 and result["stopped_by_callback"] and not result["interrupted"], result
    assert stopped[0]["iteration"] == 2
    assert_same_stop(stopped)
    # an env fault in one of process 1's collectors: re-raised there, named on process 0, both checkpoint
    failed = run_workers(tmp_path / "fault", SMALL + ["trainer.iterations=50"], fail_at=40)
    p0, p1 = failed
    assert p1["returncode"] == 1 and p1["error"].startswith("CollectorError: collector ") \
        and "injected env fault on process 1" in p1["error"], p1
    assert p0["returncode"] == 1 and p0["error"].startswith("CollectorError: process(es) 1 failed"), p0
    assert 1 <= p0["iteration"] < 50
    assert_same_stop(failed)


@pytest.mark.long  # two processes x JAX start-up and compile: ~30-40 s on 2 quiet cores; CI keeps the train+resume test
def test_ctrl_c_on_one_process_stops_both_from_the_cli(tmp_path):
    port = free_port()
    procs = []
    for pid in (1, 0):
        cmd = [sys.executable, "-m", "jaxrl_vla.train", "--config", str(CONFIG), "--output-dir", str(tmp_path)]
        for override in SMALL + ["trainer.iterations=100000", f"trainer.distributed.coordinator=127.0.0.1:{port}",
                                 "trainer.distributed.num_processes=2", f"trainer.distributed.process_id={pid}"]:
            cmd += ["--set", override]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2),
                                      cwd=ROOT))
    p1, p0 = procs
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/metrics.jsonl")) or not list(tmp_path.glob("*/metrics.jsonl"))[0].read_text():
        assert time.monotonic() < deadline and p0.poll() is None and p1.poll() is None
        time.sleep(0.5)
    p1.send_signal(signal.SIGINT)  # Ctrl-C in process 1 only
    outs = [proc.communicate(timeout=300) for proc in (p0, p1)]
    assert p0.returncode == p1.returncode == 130, [o[1][-2000:] for o in outs]
    (run_dir,) = tmp_path.iterdir()
    last = records(run_dir)[-1]["iteration"]
    assert f"interrupted at iteration {last}" in outs[0][1]
    assert str(last) in [p.name for p in (run_dir / "checkpoints").iterdir()]


@pytest.mark.long  # two processes x JAX start-up and compile: ~30-40 s on 2 quiet cores; CI keeps the train+resume test
def test_the_learner_sees_the_batch_one_process_of_four_devices_sees(tmp_path):
    # learning rate 1e-30 (0 is refused): float32 params never change, so every collector's rows are deterministic (its env seeds, its
    # key and inference counter) whatever version acted them; 2 processes x 2 collectors are collectors 0-3 of
    # one process running 4 collectors, and the global batch must be the same, in the same order
    fixed = SMALL + ["algorithm.cfg.learning_rate=1e-30", "trainer.eval_freq=0"]
    pair = run_workers(tmp_path / "pair", fixed)
    single = run_workers(tmp_path / "single", fixed + ["trainer.num_collectors=4"], processes=1, devices=4)
    for result in pair + single:
        assert result["returncode"] == 0, result["stderr"][-3000:]
    got, want = records(pair[0]["run_dir"]), records(single[0]["run_dir"])
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        for key in BATCH_METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["iteration"], key)
    assert got[-1]["global_step"] == want[-1]["global_step"]
    # (no bitwise params check: zero-initialised biases do move by ~1e-30, in reduction order)


if __name__ == "__main__":
    sys.exit(worker(json.loads(sys.argv[1])))
