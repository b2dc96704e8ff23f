"""configs/metaworld: they fit the BC script's model and env, and fine-tune a checkpoint from the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("metaworld", reason="Meta-World is not installed: pip install -e '.[metaworld]'")
torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from bridge import pretrain_bc, pretrain_bc_metaworld  # noqa: E402
from jaxrl_vla import train  # noqa: E402
from jaxrl_vla.config import read_config_file  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "metaworld"
NAMES = ("train_config.json", "train_config_async.json", "train_config_grpo.json")


@pytest.mark.parametrize("name", NAMES)
def test_configs_match_the_bc_model_and_env(name):
    cfg = read_config_file(CONFIGS / name)
    vla = cfg["policy"]["vla_config"]
    env = pretrain_bc_metaworld.make_env()
    assert vla["model_config"] == {**pretrain_bc_metaworld.model_config(env), "init_log_std": -1.0}
    assert vla["model_class"] == pretrain_bc.MODEL_CLASS
    assert "--env metaworld" in vla["make_checkpoint"] and vla["model_path"] in vla["make_checkpoint"]
    env_cfg = dict(cfg["env"])
    assert env_cfg.pop("name") == f"metaworld:{pretrain_bc_metaworld.BENCHMARK}"
    assert env_cfg == pretrain_bc_metaworld.ENV_KWARGS  # the value head's reward scale included
    if cfg["algorithm"]["name"] == "ppo":  # GRPO has no critic: no discount to match
        assert cfg["algorithm"]["cfg"]["gamma"] == pretrain_bc.GAMMA


def tiny_checkpoint(path: Path) -> dict:
    """A random-weight GPTVLAModel of the configs' shape but one layer, saved as pretrain_bc saves."""
    from bridge.vla_models import GPTVLAModel

    config = {**pretrain_bc_metaworld.model_config(pretrain_bc_metaworld.make_env()), "n_layer": 1,
              "init_log_std": -1.0}
    torch.manual_seed(0)
    model = GPTVLAModel(config).eval()
    pretrain_bc.save_safetensors(model.state_dict(), path, {"format": "pt", "model_class": pretrain_bc.MODEL_CLASS,
                                                            "model_config": json.dumps(config)})
    return config


@pytest.mark.slow
def test_async_config_fine_tunes_a_checkpoint_from_the_cli(tmp_path):
    """One iteration of configs/metaworld/train_config_async.json, shrunk (2 collectors x 1 env, 20-step episodes) but otherwise as is."""
    path = tmp_path / "bc.safetensors"
    tiny_checkpoint(path)
    demos = tmp_path / "demos.npz"  # the config's demonstration loss reads the BC demos: two short expert episodes
    pretrain_bc_metaworld.ensure_demos(demos, 1, 0, 0.0, pretrain_bc_metaworld.make_env({**pretrain_bc_metaworld.ENV_KWARGS, "max_episode_steps": 20}))
    overrides = ["trainer.iterations=1", "trainer.num_collectors=2", "trainer.num_envs=2", "trainer.buffer_size=32",
                 "algorithm.cfg.batch_size=32", "trainer.eval_freq=0", f"policy.vla_config.model_path={path}",
                 "policy.vla_config.model_config.n_layer=1", "env.max_episode_steps=20",
                 f"algorithm.demo_path={demos}"]
    argv = ["--config", str(CONFIGS / "train_config_async.json"), "--output-dir", str(tmp_path / "runs"),
            "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    assert train.main(argv) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["global_step"] == 32
    assert all(v == v for v in records[-1].values() if isinstance(v, float))  # finite losses (no NaN)


def test_metaworld_bc_defaults_leave_the_given_flags_and_vl_reach_alone():
    argv = ["--env", "metaworld", "--out", "x.safetensors", "--epochs", "3"]
    args = pretrain_bc.parse_args(argv)
    pretrain_bc_metaworld.apply_defaults(args, argv)
    assert args.epochs == 3 and args.episodes == pretrain_bc_metaworld.DEFAULTS["episodes"]
    assert not args.augment and args.aux_coef == 0 and args.critic_episodes == 0
    vl_reach = pretrain_bc.parse_args(["--out", "x.safetensors"])
    assert (vl_reach.env, vl_reach.episodes, vl_reach.epochs, vl_reach.augment) == ("vl_reach", 10000, 2, True)
    argv = ["--env", "metaworld", "--out", "x.safetensors", "--aux-coef", "1"]
    with pytest.raises(ValueError, match="no augmentation, auxiliary labels"):
        pretrain_bc_metaworld.apply_defaults(pretrain_bc.parse_args(argv), argv)
