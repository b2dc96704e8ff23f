"""trainer.distributed: several processes with jax.distributed (gloo collectives on CPU). Bad settings are named
before anything starts; 2 processes of 2 host devices train the same params as 1 process of 4 (slow: 6 CLI
runs), write one run directory whose checkpoints restore on 1 device, and resume across topologies."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrl_vla import train
from jaxrl_vla.config import ConfigError, load_config
from jaxrl_vla.training import distributed

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A localhost port nothing listens on (bound then released: no coordinator there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_env(monkeypatch):
    for var in distributed.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


def spec(**fields):
    return distributed.resolve_spec({"coordinator": None, "num_processes": None, "process_id": None, "timeout": 5,
                                     **fields})


def test_one_process_without_settings(no_env):
    assert spec() is None
    assert load_config(None)["trainer"]["distributed"] == {"coordinator": None, "num_processes": None,
                                                          "process_id": None, "timeout": 60}


def test_settings_from_config_or_environment(no_env, monkeypatch):
    got = spec(coordinator="10.0.0.1:1234", num_processes=4, process_id=3)
    assert (got.host_port, got.num_processes, got.process_id) == (("10.0.0.1", 1234), 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    got = spec()
    assert (got.coordinator, got.num_processes, got.process_id) == ("host0:999", 2, 1)
    assert spec(process_id=0).process_id == 0  # a config field wins over its variable


@pytest.mark.parametrize(("fields", "message"), [
    ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2},
     "trainer.distributed.process_id: 2 is out of range; must be in [0, 2)"),
    ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": -1},
     "trainer.distributed.process_id: -1 is out of range"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, "trainer.distributed.coordinator: 'localhost' must be host:port"),
    ({"coordinator": "localhost:99999", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"coordinator": "localhost:1234", "process_id": 0}, "trainer.distributed.num_processes: required"),
    ({"coordinator": "localhost:1234", "num_processes": 2}, "trainer.distributed.process_id: required"),
    ({"num_processes": 2, "process_id": 1}, "trainer.distributed.coordinator: required"),
])
def test_bad_settings_name_the_field(no_env, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        spec(**fields)


def test_a_bad_environment_variable_is_named(no_env, monkeypatch):
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ConfigError, match=r"trainer.distributed.process_id: \$JAX_PROCESS_ID='one'"):
        spec(coordinator="localhost:1", num_processes=2)


def test_an_unreachable_coordinator_is_named_within_the_timeout(no_env):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"trainer.distributed.coordinator: 127.0.0.1:{port} cannot be reached within "
                                          r"trainer.distributed.timeout \(1 s\)"):
        distributed.wait_for_coordinator(spec(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                                              timeout=1))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.distributed.process_id=5", "trainer.distributed.num_processes=2",
      "trainer.distributed.coordinator=127.0.0.1:1"], "trainer.distributed.process_id: 5 is out of range"),
    (["trainer.distributed.process_id=1", "trainer.distributed.num_processes=2",
      "trainer.distributed.coordinator=127.0.0.1:{port}", "trainer.distributed.timeout=1"],
     "trainer.distributed.coordinator: 127.0.0.1:{port} cannot be reached"),
    (["trainer.distributed.timeout=0"], "trainer.distributed.timeout: 0 is out of range"),
])
def test_cli_exits_2_with_one_line_and_writes_nothing(no_env, tmp_path, capsys, overrides, message):
    port = free_port()
    args = ["--no-progress", "--output-dir", str(tmp_path / "runs")]
    for override in overrides:
        args += ["--set", override.format(port=port)]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert message.format(port=port) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- 2 processes x 2 devices

SMALL = ["trainer.iterations=2", "trainer.eval_freq=2", "trainer.save_freq=0", "trainer.num_envs=8",
         "trainer.buffer_size=16", "trainer.num_eval_episodes=4", "algorithm.cfg.batch_size=32",
         "algorithm.cfg.n_epochs=2", "policy.hidden_sizes=[128, 128]", "trainer.mesh.fsdp=2"]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", *distributed.ENV_VARS.values())}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    return env


def _cli(overrides: list[str], output: Path, resume: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "jaxrl_vla.train", "--no-progress"]
    args += ["--resume", str(resume)] if resume else ["--output-dir", str(output)]
    for override in overrides:
        args += ["--set", override]
    return args


def one_process(output: Path, overrides: list[str], resume: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(overrides, output, resume), capture_output=True, text=True, timeout=600, env=_env(4),
                          cwd=ROOT)


def two_processes(output: Path, overrides: list[str], resume: Path | None = None) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for pid in (1, 0):  # process 1 first: it waits for the coordinator process 0 starts
        extra = [f"trainer.distributed.coordinator=127.0.0.1:{port}", "trainer.distributed.num_processes=2",
                 f"trainer.distributed.process_id={pid}", "trainer.distributed.timeout=120"]
        procs.append(subprocess.Popen(_cli(overrides + extra, output, resume), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=_env(2), cwd=ROOT))
    done = []
    for proc in procs[::-1]:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done  # [process 0, process 1]


def final_params(run_dir: Path) -> tuple[dict, int]:
    from jaxrl_vla.eval import restore_latest

    state, iteration = restore_latest(run_dir / "checkpoints")  # onto this (one-device) test process
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}, iteration


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one_process_of_four_devices_and_checkpoints_move(tmp_path):
    single = one_process(tmp_path / "single", SMALL)
    assert single.returncode == 0, single.stderr[-3000:]
    pair = two_processes(tmp_path / "pair", SMALL)
    for pid, proc in enumerate(pair):
        assert proc.returncode == 0, (pid, proc.stderr[-3000:])
    # one run directory, written by process 0; process 1 prints nothing of its own
    (single_dir,) = (tmp_path / "single").iterdir()
    (pair_dir,) = (tmp_path / "pair").iterdir()
    assert "mesh data 2 x fsdp 2 over 4 cpu devices in 2 processes (this one steps 4 envs)" in pair[0].stderr
    assert "finished iteration 2" in pair[0].stderr and "finished iteration 2" not in pair[1].stderr
    assert len(list((pair_dir / "tensorboard").iterdir())) == 1  # one writer of events
    # every process wrote its own shards of the checkpoint (orbax's ocdbt store per process)
    for pid in (0, 1):
        assert any((pair_dir / "checkpoints" / "2" / "state" / f"ocdbt.process_{pid}" / "d").iterdir())
    records = [json.loads(line) for line in (pair_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and records[-1]["eval/episodes"] == 4
    reference = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval/return_mean"] == pytest.approx(reference[-1]["eval/return_mean"])
    # the same params for the same global batch, to float tolerance (a checkpoint of 2 processes read on 1 device)
    ref, it_ref = final_params(single_dir)
    got, it_got = final_params(pair_dir)
    assert it_ref == it_got == 2
    assert max_diff(ref, got) < 1e-5
    # across topologies: the 1-process checkpoint resumed on 2 processes, there as a 1 x 4 mesh (fsdp groups
    # spanning both processes), and the 2-process one on 1 process
    shutil.copytree(single_dir, tmp_path / "single_to_pair")
    shutil.copytree(pair_dir, tmp_path / "pair_to_single")
    more = ["trainer.iterations=3", "trainer.eval_freq=3"]
    for pid, proc in enumerate(two_processes(tmp_path, more + ["trainer.mesh.data=1", "trainer.mesh.fsdp=4"],
                                             resume=tmp_path / "single_to_pair")):
        assert proc.returncode == 0, (pid, proc.stderr[-3000:])
    back = one_process(tmp_path, more + ["trainer.distributed.coordinator=null", "trainer.distributed.num_processes=null",
                                         "trainer.distributed.process_id=null"], resume=tmp_path / "pair_to_single")
    assert back.returncode == 0, back.stderr[-3000:]
    a, it_a = final_params(tmp_path / "single_to_pair")
    b, it_b = final_params(tmp_path / "pair_to_single")
    assert it_a == it_b == 3
    assert max_diff(a, b) < 1e-5 and max_diff(a, ref) > 1e-6  # the third iteration moved them, the same way
