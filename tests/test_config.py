"""Config reading, validation and the CLI's handling of bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_vla.config import (DEFAULT_CONFIG, ConfigError, apply_overrides, load_config, read_config_file,
                              resolve, schema_markdown)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_default_equals_configs_cartpole():
    assert read_config_file(ROOT / "configs" / "cartpole.json") == DEFAULT_CONFIG


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").rglob("*.json")) + sorted((ROOT / "configs").rglob("*.yaml")):
        resolve(read_config_file(path))


def test_json_comments_are_accepted(tmp_path):
    path = write(tmp_path, "c.json", """{
      // the seed's examples carry comments
      "trainer": {"buffer_size": 256, /* steps per env */ "buffer_type": "standard"},
      "algorithm": {"name": "ppo", "cfg": {"learning_rate": 1e-4}},
      "env": {"name": "CartPole-v1", "note": "a // inside a string stays"}
    }""")
    cfg = resolve(read_config_file(path))
    assert cfg["trainer"]["buffer_size"] == 256
    assert cfg["env"]["note"] == "a // inside a string stays"
    assert cfg["algorithm"]["cfg"]["gamma"] == 0.99  # default filled


def test_yaml_is_accepted(tmp_path):
    path = write(tmp_path, "c.yaml", "trainer:\n  num_envs: 4\nenv:\n  name: Pendulum-v1\n")
    cfg = resolve(read_config_file(path))
    assert cfg["trainer"]["num_envs"] == 4 and cfg["env"]["name"] == "Pendulum-v1"


@pytest.mark.parametrize("override,message", [
    ("trainer.bufer_size=10", "trainer.bufer_size: unknown key; did you mean 'buffer_size'?"),
    ("algorithm.cfg.learnig_rate=0.1", "algorithm.cfg.learnig_rate: unknown key; did you mean 'learning_rate'?"),
    ("algorithm.cfg.n_epochs=ten", "algorithm.cfg.n_epochs: expected an integer"),
    ("algorithm.cfg.n_epochs=2.5", "algorithm.cfg.n_epochs: expected an integer"),
    ("algorithm.cfg.gamma=1.5", "algorithm.cfg.gamma: 1.5 is out of range; must be in [0, 1]"),
    ("trainer.num_envs=0", "trainer.num_envs: 0 is out of range"),
    ("trainer.buffer_type=async", "trainer.buffer_type: \"async\" is out of range; must be one of 'standard', 'vla'"),
    ("algorithm.cfg.normalize_advantage=1", "algorithm.cfg.normalize_advantage: expected true/false"),
    ("policy.hidden_sizes=[64, -1]", "policy.hidden_sizes"),
    ("algorithm.cfg.batch_size=99999", "algorithm.cfg.batch_size (99999) exceeds"),
    ("algorithm.cfg.noise_correlation=1", "algorithm.cfg.noise_correlation: 1 is out of range; must be in [0, 1)"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_vla_mode_needs_divisible_buffer():
    with pytest.raises(ConfigError, match=r"trainer.buffer_size \(100\) must be divisible by trainer.num_envs \(8\)"):
        load_config(None, ["trainer.buffer_type=vla", "trainer.buffer_size=100"])


def test_missing_and_malformed_files_name_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: config file not found"):
        read_config_file(tmp_path / "nope.json")
    bad = write(tmp_path, "bad.json", '{\n  "trainer": {\n    "buffer_size": 12,,\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"bad.json:3:\d+: malformed JSON"):
        read_config_file(bad)
    bad_yaml = write(tmp_path, "bad.yaml", "trainer:\n  num_envs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: malformed YAML"):
        read_config_file(bad_yaml)


def test_overrides_parse_values():
    raw = apply_overrides(DEFAULT_CONFIG, ["algorithm.cfg.learning_rate=1e-4", "policy.hidden_sizes=[8, 8]",
                                           "algorithm.cfg.target_kl=null", "trainer.exp_name=abc"])
    assert raw["algorithm"]["cfg"]["learning_rate"] == 1e-4
    assert raw["policy"]["hidden_sizes"] == [8, 8]
    assert raw["trainer"]["exp_name"] == "abc"


def test_schema_docs_cover_every_field():
    table = schema_markdown()
    for key in ("trainer.buffer_size", "algorithm.cfg.target_kl", "policy.vla_config.model_path", "env.name"):
        assert f"`{key}`" in table
    docs = (ROOT / "docs" / "config.md").read_text()
    assert table in docs, "docs/config.md is stale: regenerate with python -m jaxrl_vla.config_docs"


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxrl_vla.train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--config", "missing.json"], "missing.json: config file not found"),
    (["--set", "trainer.bufer_size=1"], "did you mean 'buffer_size'"),
    (["--set", "env.name=CartPol-v1"], "env.name: unknown env 'CartPol-v1'; did you mean 'CartPole-v1'?"),
    (["--set", "env.max_episode_step=10"], "env.max_episode_step: unknown key; did you mean 'max_episode_steps'?"),
    (["--resume", "no_such_run"], "no config.json there"),
    # checked by the Trainer (it needs the env's action space), reported as a config error too
    (["--set", "algorithm.cfg.noise_correlation=0.5"], "algorithm.cfg.noise_correlation (0.5) needs continuous"),
    (["--set", "algorithm.cfg.demo_coef=0.5"], "algorithm.cfg.demo_coef > 0 needs algorithm.demo_path"),
    (["--set", "algorithm.cfg.demo_coef=0.5", "--set", "algorithm.demo_path=none.npz"],
     "algorithm.demo_path: no file none.npz"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = run_cli([*args, "--output-dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
