"""GRPO needs no critic: a torch VLA checkpoint saved without its value head (a behaviour-cloned policy)
loads for GRPO and trains, its value head the twin's own fresh initialisation; PPO (which needs the
critic) still refuses it naming the keys, and half a value head is refused."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from bridge import load_vla_model  # noqa: E402
from bridge.vla_loading import MissingKeysError  # noqa: E402
from bridge.vla_models import GPTVLAModel as TorchGPTVLA  # noqa: E402
from jaxrl_vla.models.vla import dummy_obs  # noqa: E402

CLASS = "bridge.vla_models.GPTVLAModel"
TINY = {"vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 18, "max_instruction_length": 8,
        "action_dim": 2, "proprio_dim": 4, "image_size": 32, "value_hidden_dim": 16}


def checkpoint_without(tmp_path, prefixes, name="bc.safetensors"):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in TorchGPTVLA(**TINY).state_dict().items()
             if not any(k.startswith(p + ".") for p in prefixes)}
    save_file(state, str(tmp_path / name))
    return tmp_path / name, state


def test_checkpoint_without_value_head_loads_for_critic_free_training(tmp_path):
    path, state = checkpoint_without(tmp_path, ("value_fc", "value_out"))
    with pytest.raises(MissingKeysError, match="value_fc"):
        load_vla_model(path, CLASS, TINY)  # PPO's load: the critic is required
    module, variables = load_vla_model(path, CLASS, TINY, value_head_optional=True)
    params = variables["params"]
    np.testing.assert_array_equal(np.asarray(params["action_mean"]["kernel"]),
                                  state["action_mean.weight"].numpy().T)  # the checkpoint's weights
    fresh = module.init(jax.random.PRNGKey(0), dummy_obs(module.config, batch=1))["params"]
    np.testing.assert_array_equal(np.asarray(params["value_fc"]["kernel"]), np.asarray(fresh["value_fc"]["kernel"]))
    assert np.all(np.isfinite(np.asarray(params["value_out"]["kernel"])))


def test_half_a_value_head_is_refused(tmp_path):
    path, _ = checkpoint_without(tmp_path, ("value_out",))
    with pytest.raises(MissingKeysError, match="part of the value head"):
        load_vla_model(path, CLASS, TINY, value_head_optional=True)


def test_grpo_trains_from_a_checkpoint_without_value_head(tmp_path):
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import ConfigError, resolve

    path, _ = checkpoint_without(tmp_path, ("value_fc", "value_out"))

    def config(algorithm):
        return resolve({
            "trainer": {"num_envs": 4, "buffer_size": 8, "iterations": 1, "eval_freq": 0, "progress": False,
                        "output_dir": str(tmp_path / algorithm), "exp_name": "vla"},
            "algorithm": {"name": algorithm, "cfg": {"n_epochs": 1, "batch_size": 16,
                                                     **({"group_size": 2, "reward": "return"} if algorithm == "grpo" else {})}},
            "policy": {"name": "vla", "vla_config": {"model_path": str(path), "model_config": TINY}},
            "env": {"name": "VLReach-v0", "image_size": 32},
        })

    with pytest.raises(ConfigError, match="value_fc"):
        build_trainer(config("ppo"))
    trainer = build_trainer(config("grpo"))
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["loss/total"]) for r in records)
