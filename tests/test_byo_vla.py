"""docs/bring_your_own_vla.md's worked example, as a user would run it: a torch policy with its Flax twin,
its checkpoint trained from a config naming the torch class, the result exported back to torch and
matching the JAX policy."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

from bridge import export_to_torch, load_vla_model  # noqa: E402
from bridge.examples.tiny_vla import TinyVLA  # noqa: E402  (registers the twin)
from jaxrl_vla.build import build_trainer  # noqa: E402
from jaxrl_vla.config import resolve  # noqa: E402
from jaxrl_vla.envs import make_env  # noqa: E402
from jaxrl_vla.models.vla_policy import unwrap_variables  # noqa: E402

CLASS = "bridge.examples.tiny_vla.TinyVLA"
MODEL_CONFIG = {"image_size": 32, "proprio_dim": 2, "vocab_size": 18, "action_dim": 2, "hidden": 32}
ENV = {"name": "VLReach-v0", "image_size": 32, "proprio_velocity": False}


def observations(batch=6):
    env = make_env("VLReach-v0", image_size=32, proprio_velocity=False)
    keys = jax.random.split(jax.random.PRNGKey(3), batch)
    obs = jax.vmap(lambda k: env.reset(k)[1])(keys)
    return {k: np.asarray(v) for k, v in obs.items() if not k.startswith("privileged_")}


def torch_obs(obs):
    return {k: torch.from_numpy(np.array(v)) for k, v in obs.items()}


def test_twin_matches_the_torch_policy(tmp_path):
    torch.manual_seed(0)
    model = TinyVLA(**MODEL_CONFIG).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    module, variables = load_vla_model(tmp_path / "tiny.pt", CLASS, MODEL_CONFIG)
    obs = observations()
    dist, value = module.apply(variables, obs)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(dist.mean), model(torch_obs(obs)).numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(value), model.get_value(torch_obs(obs)).numpy(), atol=1e-5)
        log_prob, _, _ = model.evaluate_actions(torch_obs(obs), torch.from_numpy(np.array(dist.mean)))
    np.testing.assert_allclose(np.asarray(dist.log_prob(dist.mean)), log_prob.numpy(), atol=1e-5)


def test_train_from_a_config_naming_the_torch_class_and_export_back(tmp_path):
    torch.manual_seed(0)
    torch.save(TinyVLA(**MODEL_CONFIG).state_dict(), tmp_path / "tiny.pt")
    cfg = resolve({
        "trainer": {"num_envs": 8, "buffer_size": 8, "iterations": 3, "eval_freq": 3, "num_eval_episodes": 8,
                    "progress": False, "output_dir": str(tmp_path / "runs"), "exp_name": "byo"},
        "algorithm": {"name": "ppo", "cfg": {"n_epochs": 2, "batch_size": 32, "learning_rate": 1e-3}},
        "policy": {"name": "vla", "vla_config": {"model_path": str(tmp_path / "tiny.pt"), "model_class": CLASS,
                                                 "model_config": MODEL_CONFIG}},
        "env": ENV,
    })
    trainer = build_trainer(cfg)
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["loss/total"]) for r in records)
    variables = unwrap_variables(trainer.state.params)
    path = export_to_torch(variables, CLASS, MODEL_CONFIG, tmp_path / "tiny_finetuned.safetensors")
    back = TinyVLA(**MODEL_CONFIG).eval()
    back.load_state_dict(load_file(str(path)), strict=True)
    obs = observations()
    dist, _ = trainer.policy.apply(trainer.state.params, obs)
    with torch.no_grad():
        np.testing.assert_allclose(back(torch_obs(obs)).numpy(), np.asarray(dist.mean), atol=1e-5)
    start = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert not torch.equal(start["action_mean.weight"], back.state_dict()["action_mean.weight"])  # it trained
