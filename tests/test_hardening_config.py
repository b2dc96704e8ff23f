"""Config hardening: names that would leave the output directory, non-finite numbers, booleans as
numbers, duplicate keys and non-UTF-8 files are each one clear error naming the field, key or file."""

import json
import subprocess
import sys

import pytest

from jaxrl_vla.config import ConfigError, is_safe_run_name, load_config, read_config_file
from jaxrl_vla.training.trainer import new_run_dir


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxrl_vla.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "a\\b", "", " lead"])
def test_unsafe_exp_names_are_refused(name):
    assert not is_safe_run_name(name)
    with pytest.raises(ConfigError, match="trainer.exp_name"):
        load_config(overrides=[f"trainer.exp_name={name!r}".replace("'", '"')])


def test_plain_exp_names_pass():
    for name in ("run", "cartpole_ppo-2", "a.b"):
        assert is_safe_run_name(name)
        assert load_config(overrides=[f'trainer.exp_name="{name}"'])["trainer"]["exp_name"] == name


def test_python_api_run_dir_stays_inside_output_dir(tmp_path):
    with pytest.raises(ValueError, match="plain name"):
        new_run_dir(tmp_path / "runs", "../escape")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
    run = new_run_dir(tmp_path / "runs", "ok")
    assert run.parent == tmp_path / "runs"


@pytest.mark.parametrize("override,field", [
    ("policy.log_std_init=NaN", "policy.log_std_init"),
    ("algorithm.cfg.learning_rate=Infinity", "algorithm.cfg.learning_rate"),
    ("algorithm.cfg.clip_eps=-Infinity", "algorithm.cfg.clip_eps"),
    ("policy.hidden_sizes=[true, true]", "policy.hidden_sizes"),
    ("policy.hidden_sizes=[64, NaN]", "policy.hidden_sizes"),
])
def test_non_finite_numbers_and_booleans_are_refused(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_duplicate_json_key_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"trainer": {"num_envs": 4, "num_envs": 8}}')
    with pytest.raises(ConfigError, match="c.json: key 'num_envs' appears twice"):
        read_config_file(path)


def test_duplicate_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 3: key 'seed' appears twice"):
        read_config_file(path)


def test_non_utf8_config_names_file_and_offset(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b'{"trainer": {"exp_name": "caf\xe9"}}')
    with pytest.raises(ConfigError, match=r"c.json: not UTF-8 text \(byte 0xe9 at offset 29\)"):
        read_config_file(path)


@pytest.mark.parametrize("args,message", [
    (["--set", 'trainer.exp_name="../../x"'], "trainer.exp_name"),
    (["--set", "policy.log_std_init=NaN"], "policy.log_std_init: NaN is not allowed"),
    (["--set", "policy.hidden_sizes=[true,true]"], "policy.hidden_sizes"),
])
def test_cli_exits_2_and_writes_nothing(tmp_path, args, message):
    work = tmp_path / "work"
    work.mkdir()
    out = run_cli([*args, "--output-dir", str(work / "runs")], cwd=work)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []


def test_a_run_whose_losses_become_non_finite_stops_with_exit_3(tmp_path):
    """A learning rate of 1e30 makes the first update's statistics NaN: the run stops naming the iteration and
    the metric, logs no NaN record and saves no NaN checkpoint (instead of 'succeeding' with null losses)."""
    out = run_cli(["--set", "algorithm.cfg.learning_rate=1e30", "--set", "trainer.iterations=4",
                   "--set", "trainer.save_freq=1", "--no-progress", "--output-dir", str(tmp_path / "runs")],
                  cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "iteration 1: " in out.stderr and "(non-finite); training stopped" in out.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "metrics.jsonl").read_text().strip() == ""
    assert not any(p for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))


def test_first_non_finite_metric_names_iteration_and_key():
    from jaxrl_vla.training.trainer import first_non_finite_metric

    reports = [{"loss": 1.0, "global_step": 8}, {"loss": 0.5, "kl": float("inf")}, {"loss": float("nan")}]
    assert first_non_finite_metric(5, reports) == (6, "kl", float("inf"))
    assert first_non_finite_metric(5, reports[:1]) is None


@pytest.mark.parametrize("make,expected", [
    (lambda d: (d / "f").write_text("x") and d / "f", "is a file"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "sub", "lies below the file"),
])
def test_output_dir_that_is_or_lies_below_a_file_exits_2(tmp_path, make, expected):
    target = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    out = run_cli(["--output-dir", str(target), "--no-progress"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"trainer.output_dir: {target} {expected}" in out.stderr and "Traceback" not in out.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_resume_without_a_complete_checkpoint_or_with_a_corrupt_config_exits_2(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    out = run_cli(["--resume", str(run)], cwd=tmp_path)
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr, out.stderr
    (run / "checkpoints" / "3").mkdir()
    (run / "config.json").write_bytes(b"{\"trainer\": \xff")
    out = run_cli(["--resume", str(run)], cwd=tmp_path)
    assert out.returncode == 2 and "not a readable config" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_set_values_follow_one_grammar_json_or_plain_string():
    from jaxrl_vla.config import parse_override

    assert parse_override("a.b=on") == (["a", "b"], "on")
    assert parse_override("a=no") == (["a"], "no")
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[64, 64]") == (["a"], [64, 64])
    assert parse_override("a=[x, y]") == (["a"], "[x, y]")  # not JSON: a string, never YAML's list
    with pytest.raises(ConfigError, match="trainer.progress: expected true/false"):
        load_config(overrides=["trainer.progress=on"])


def test_a_section_that_is_not_an_object_is_named_not_the_cli_flag(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"trainer": []}')
    out = run_cli(["--config", str(path), "--no-progress"], cwd=tmp_path)
    assert out.returncode == 2
    assert "trainer: expected an object, got []" in out.stderr and "--set" not in out.stderr, out.stderr


def test_total_timesteps_prints_the_steps_that_will_run(tmp_path):
    out = run_cli(["--total-timesteps", "1500", "--no-progress", "--output-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = " ".join((out.stdout + out.stderr).split())
    assert "total timesteps 1,500: 2 iterations = 2,048 env steps (rounded up to whole iterations of 1,024)" in text


def test_truncate_metrics_after_drops_later_and_torn_records(tmp_path):
    from jaxrl_vla.training.logging import truncate_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"iteration": {i}}}\n' for i in range(1, 6)) + '{"iteration": 6, "lo')
    truncate_metrics_after(path, 3)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_resume_after_a_kill_logs_each_iteration_once(tmp_path):
    """A run killed after checkpoint 2 had logged iterations 3-4: the resumed run (from 2) rewrites them."""
    import shutil

    from jaxrl_vla import Trainer
    from jaxrl_vla.algo import PPOConfig
    from jaxrl_vla.envs import make_env
    from jaxrl_vla.models.actor_critic import ActorCritic

    def trainer(iterations):
        env = make_env("CartPole-v1")
        return Trainer(ActorCritic(env.action_space, (16,)), env, PPOConfig(n_epochs=1, batch_size=128),
                       buffer_size=16, num_envs=8, iterations=iterations, output_dir=tmp_path, exp_name="k",
                       eval_freq=0, save_freq=2, progress=False, iterations_per_call=1)

    first = trainer(4)
    first.train()
    shutil.rmtree(first.run_dir / "checkpoints" / "4")  # as if killed before the final checkpoint
    resumed = trainer(6)
    resumed.train(resume=first.run_dir)
    lines = (first.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", [2**32, 2**64, -1])
def test_seed_outside_what_prngkey_takes_is_a_config_error(seed):
    with pytest.raises(ConfigError, match=r"trainer.seed: .* out of range"):
        load_config(overrides=[f"trainer.seed={seed}"])
    assert load_config(overrides=[f"trainer.seed={2**32 - 1}"])["trainer"]["seed"] == 2**32 - 1
