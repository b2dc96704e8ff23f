"""policy.lora: a VLA fine-tuned through LoRA adapters. The adapted policy starts equal to the base, PPO
moves only the adapters and the modules_to_save heads (the base stays bit-identical and carries no Adam
moments), the export folds the adapters in (the torch model computes what the JAX policy computes), and
bad settings are named."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxrl_vla.algo import ppo
from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.lora_policy import LoraPolicy, fold_adapters, merged_variables
from jaxrl_vla.models.vla_policy import build_vla_policy, unwrap_variables

from test_vla_policy import NO_DEMOS, FakeEnv, obs, policy_cfg, random_batch

HEADS = ["action_mean", "value_fc", "value_out", "log_std"]
LORA = {"rank": 4, "alpha": 8, "targets": ["c_attn", "c_fc"], "modules_to_save": HEADS}


def flat(tree):
    return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, tree), sep="/")


def test_adapted_policy_starts_equal_to_the_base():
    base_policy, base_vars, _ = build_vla_policy(policy_cfg(), FakeEnv())
    policy, variables, mask = build_vla_policy(policy_cfg(lora=LORA), FakeEnv())
    assert isinstance(policy, LoraPolicy)
    leaves = flat(variables)
    adapters = [k for k in leaves if k.startswith("params/lora/adapters/")]
    assert adapters and all(("/c_attn/" in k or "/c_fc/" in k) for k in adapters)
    # B = 0 at init: the same outputs as the base policy with the same base weights
    assert all(np.array_equal(leaves[k], flat(base_vars)[k]) for k in flat(base_vars))
    (d0, v0), (d1, v1) = base_policy.apply(base_vars, obs()), policy.apply(variables, obs())
    np.testing.assert_array_equal(np.asarray(d0.mean), np.asarray(d1.mean))
    np.testing.assert_array_equal(np.asarray(v0), np.asarray(v1))
    m = flat(mask)
    assert all(m[k] for k in adapters) and not m["params/lora/scale"]
    assert m["params/model/action_mean/kernel"] and not m["params/model/language/h_0/attn/c_attn/kernel"]
    assert not any(v for k, v in m.items() if k.startswith("batch_stats/"))


def test_ppo_updates_move_only_adapters_and_heads_and_the_export_folds_them_in():
    policy, variables, mask = build_vla_policy(policy_cfg(lora=LORA), FakeEnv())
    algo = ppo.PPOConfig(n_epochs=2, batch_size=4, learning_rate=1e-2)
    opt = ppo.make_optimizer(algo, 10, mask)
    opt_state = opt.init(variables)
    batch = random_batch(policy, variables)
    new, _, _ = jax.jit(lambda p, s: ppo.update(p, s, batch, jax.random.PRNGKey(0), apply_fn=policy.apply,
                                                 optimizer=opt, cfg=algo, trainable_mask=mask))(variables, opt_state)
    before, after = flat(variables), flat(new)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any(k.startswith("params/lora/adapters/") and k.endswith("/B") for k in changed)
    assert any(k.startswith("params/model/action_mean/") for k in changed)
    frozen = [k for k in before if k.startswith("params/model/") and not any(f"/model/{h}" in k for h in HEADS)]
    assert frozen and not (changed & set(frozen))  # the base is bit-identical
    assert "params/lora/scale" not in changed
    # Adam holds moments only for what trains: far fewer floats than the whole model
    moments = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "size") and x.ndim > 0)
    trainable = sum(before[k].size for k, t in flat(mask).items() if t)
    assert moments <= 2 * trainable + 8
    # export: the adapters folded into the kernels give the adapted policy's outputs from the base model alone
    merged = merged_variables(new)
    assert "lora" not in merged["params"]
    (d_adapted, v_adapted), (d_merged, v_merged) = policy.apply(new, obs()), policy.base.apply(merged, obs())
    np.testing.assert_allclose(np.asarray(d_adapted.mean), np.asarray(d_merged.mean), rtol=1e-6, atol=1e-6)
    kernel = "language/h_0/attn/c_attn/kernel"
    ab = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, new["params"]["lora"]["adapters"]), sep="/")
    expected = before["params/model/" + kernel] + float(new["params"]["lora"]["scale"]) * (
        ab[kernel + "/A"].astype(np.float64) @ ab[kernel + "/B"])
    np.testing.assert_allclose(flat(unwrap_variables(new))["params/" + kernel], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_exported_torch_model_matches_the_adapted_policy(tmp_path):
    torch = pytest.importorskip("torch")
    from bridge import export_to_torch
    from bridge.vla_loading import resolve_model_class
    from safetensors.torch import load_file

    cfg = policy_cfg(lora=LORA)
    policy, variables, mask = build_vla_policy(cfg, FakeEnv())
    variables = jax.tree_util.tree_map(np.asarray, variables)
    adapters = variables["params"]["lora"]["adapters"]
    variables["params"]["lora"]["adapters"] = jax.tree_util.tree_map(  # as if trained: B != 0
        lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype), adapters)
    model_config = cfg["vla_config"]["model_config"]
    path = export_to_torch(unwrap_variables(variables), cfg["vla_config"]["model_class"], model_config,
                           tmp_path / "lora.safetensors")
    torch_model = resolve_model_class(cfg["vla_config"]["model_class"])(**model_config)
    torch_model.load_state_dict(load_file(str(path)), strict=True)
    torch_model.eval()
    o = jax.tree_util.tree_map(np.asarray, obs())
    with torch.no_grad():
        mean = torch_model.forward({k: torch.from_numpy(np.array(v)) for k, v in o.items()})  # the action mean
    jax_mean = np.asarray(policy.apply(variables, obs())[0].mean)
    np.testing.assert_allclose(mean.numpy(), jax_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora,message", [
    ({"rank": 0, "targets": ["c_attn"]}, "policy.lora.rank"),
    ({"rank": 4, "targets": ["q_proj"]}, "policy.lora.targets: 'q_proj' matches no Dense kernel"),
    ({"rank": 4, "targets": ["c_attn"], "modules_to_save": ["value_head"]}, "policy.lora.modules_to_save: 'value_head'"),
    ({"rank": 4, "targets": ["c_attn"], "dropout": 0.1}, "policy.lora.dropout: unknown key"),
])
def test_bad_lora_settings_name_the_field(lora, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_vla_policy(policy_cfg(lora=lora), FakeEnv())


def test_lora_with_policy_freeze_is_refused():
    with pytest.raises(ConfigError, match="policy.freeze: with policy.lora"):
        build_vla_policy(policy_cfg(lora=LORA, freeze=["vision"]), FakeEnv())


def test_trainer_fine_tunes_through_lora_from_the_config(tmp_path):
    """From the config: one iteration trains, checkpoints and resumes with the adapters in the state."""
    import json

    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config

    overrides = [
        "trainer.num_envs=4", "trainer.buffer_size=4", "trainer.iterations=1", "trainer.eval_freq=0",
        "trainer.save_freq=0", "algorithm.cfg.batch_size=16", "algorithm.cfg.n_epochs=1",
        "policy.vla_config.model_config.vision_embedding_size=8", "policy.vla_config.model_config.vision_hidden_sizes=[8, 8]",
        "policy.vla_config.model_config.n_layer=1", f"policy.lora={json.dumps(LORA)}",
        f"trainer.output_dir={tmp_path}", *NO_DEMOS,
    ]
    trainer = build_trainer(load_config("configs/vla_example/scratch_config.json", overrides))
    start = flat(trainer.init_params)
    trainer.train()
    end = flat(trainer.state.params)
    assert not np.array_equal(start["params/model/action_mean/kernel"], end["params/model/action_mean/kernel"])
    assert np.array_equal(start["params/model/language/h_0/attn/c_attn/kernel"],
                          end["params/model/language/h_0/attn/c_attn/kernel"])
    assert any(not np.array_equal(start[k], end[k]) for k in start if k.startswith("params/lora/adapters/"))
    assert np.isfinite(fold_adapters(trainer.state.params["params"]["model"],
                                     trainer.state.params["params"]["lora"])["action_mean"]["kernel"]).all()
