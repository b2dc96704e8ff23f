"""policy.action_head from the config: a decoder LM (random weights from a config.json-style dict, or a
Hugging Face directory) with a token or flow head, trained by PPO from the CLI's config path on an env with
a token prompt; bad settings name the field."""

import json

import jax
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError, resolve
from jaxrl_vla.models.vla.flow_vla import FlowVLA
from jaxrl_vla.models.vla.token_vla import TokenVLA
from jaxrl_vla.models.vla_policy import build_vla_policy

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "tie_word_embeddings": True}


def policy_cfg(head, chunk=2, **vla):
    return {"name": "vla", "action_chunk": chunk, "dtype": "float32", "freeze": [], "action_head": head,
            "vla_config": {"model_path": None, "model_class": "bridge.vla_models.GPTVLAModel",
                           "model_config": dict(LLAMA), **vla}}


def vl_reach(image_size=16):
    from jaxrl_vla.envs import make_env

    return make_env("VLReach-v0", image_size=image_size)


@pytest.mark.parametrize("head,cls", [({"type": "tokens", "n_bins": 16}, TokenVLA),
                                      ({"type": "flow", "steps": 3, "expert": {"hidden_size": 16, "intermediate_size": 32,
                                                                              "num_heads": 2}}, FlowVLA)])
def test_action_head_builds_a_decoder_vla_reading_the_env_prompt(head, cls):
    env = vl_reach()
    policy, variables, mask = build_vla_policy(policy_cfg(head), env)
    assert isinstance(policy.model, cls) and policy.model.input_key == "language"
    obs = jax.tree_util.tree_map(lambda x: x[None], env.reset(jax.random.PRNGKey(0))[1])
    dist, value = policy.apply(variables, obs)
    actions, log_prob, info = dist.sample(jax.random.PRNGKey(1))
    assert actions.shape == (1, 2, 2) and value.shape == (1, 2)
    assert np.all(np.abs(np.asarray(actions)) <= 1.0 + 1e-6) or cls is FlowVLA
    np.testing.assert_allclose(np.asarray(dist.log_prob_and_entropy(info)[0]), np.asarray(log_prob), atol=1e-4)
    assert all(jax.tree_util.tree_leaves(mask["params"]))


@pytest.mark.parametrize("head,message", [
    ({"type": "diffusion"}, "policy.action_head.type"),
    ({"type": "tokens", "n_bins": 60}, "policy.action_head.n_bins"),
    ({"type": "tokens", "bins": 16}, "policy.action_head.bins: unknown key"),
    ({"type": "flow", "steps": 1, "method": "flow_sde"}, "policy.flow.steps"),
    ({"type": "flow", "expert": {"width": 3}}, "policy.action_head.expert"),
])
def test_bad_action_head_settings_name_the_field(head, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_vla_policy(policy_cfg(head), vl_reach())


def test_env_without_a_token_prompt_is_named():
    from jaxrl_vla.envs import make_env

    with pytest.raises(ConfigError, match="token prompt"):
        build_vla_policy(policy_cfg({"type": "tokens", "n_bins": 16}), make_env("Pendulum-v1"))


def test_config_trains_a_token_head_vla_from_the_cli_path(tmp_path):
    from jaxrl_vla.build import build_trainer

    cfg = resolve({
        "trainer": {"num_envs": 4, "buffer_size": 4, "iterations": 2, "eval_freq": 2, "num_eval_episodes": 4,
                    "progress": False, "output_dir": str(tmp_path), "exp_name": "tokens"},
        "algorithm": {"name": "ppo", "cfg": {"n_epochs": 1, "batch_size": 8}},
        "policy": {"name": "vla", "action_chunk": 2, "action_head": {"type": "tokens", "n_bins": 16},
                   "vla_config": {"model_config": dict(LLAMA)}},
        "env": {"name": "VLReach-v0", "image_size": 16},
    })
    trainer = build_trainer(cfg)
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss/total"]) for r in records)
    assert records[-1].get("eval/return_mean") is not None


SMOLVLM = {"model_type": "smolvlm", "scale_factor": 2, "image_token_id": 30, "tie_word_embeddings": False,
           "vision_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
           "text_config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 24, "intermediate_size": 40,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}


def test_vlm_prefix_from_a_config_trains_on_vl_reach_pixels(tmp_path):
    from jaxrl_vla.build import build_trainer

    cfg = resolve({
        "trainer": {"num_envs": 4, "buffer_size": 4, "iterations": 2, "eval_freq": 0, "progress": False,
                    "output_dir": str(tmp_path), "exp_name": "smolvlm"},
        "algorithm": {"name": "ppo", "cfg": {"n_epochs": 1, "batch_size": 8}},
        "policy": {"name": "vla", "action_head": {"type": "tokens", "n_bins": 16},
                   "vla_config": {"model_config": SMOLVLM}},
        "env": {"name": "VLReach-v0", "image_size": 16},
    })
    trainer = build_trainer(cfg)
    assert trainer.policy.model.vlm is not None
    trainer.train()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["loss/total"]) for r in records)


def test_vlm_settings_that_do_not_fit_the_env_are_named():
    with pytest.raises(ConfigError, match=r"image_size: the VLM's tower takes 16x16 images, the env's rgb is 32x32"):
        build_vla_policy(policy_cfg({"type": "tokens", "n_bins": 16}, model_config=SMOLVLM),
                         vl_reach(image_size=32))
    with pytest.raises(ConfigError, match="image token id 5 lies among the env's token ids"):
        build_vla_policy(policy_cfg({"type": "tokens", "n_bins": 16}, model_config={**SMOLVLM, "image_token_id": 5}),
                         vl_reach())


@pytest.mark.torch
def test_vlm_prefix_loads_a_hugging_face_directory(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.SmolVLMConfig(vision_config=SMOLVLM["vision_config"], text_config=SMOLVLM["text_config"],
                                        scale_factor=2, image_token_id=30, tie_word_embeddings=False)
    transformers.SmolVLMForConditionalGeneration(hf_cfg).save_pretrained(tmp_path / "smolvlm")
    policy, variables, _ = build_vla_policy(policy_cfg({"type": "tokens", "n_bins": 16},
                                                       model_path=str(tmp_path / "smolvlm")), vl_reach())
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "smolvlm" / "model.safetensors"))
    head = np.asarray(variables["params"]["model"]["lm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(head, stored["lm_head.weight"].T)  # the directory's weights, not random ones
    obs = jax.tree_util.tree_map(lambda x: x[None], vl_reach().reset(jax.random.PRNGKey(0))[1])
    dist, _ = policy.apply(variables, obs)
    _, log_prob, bins = dist.sample(jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(dist.log_prob_and_entropy(bins)[0]), np.asarray(log_prob), atol=1e-4)
