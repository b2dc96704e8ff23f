"""Hardening of the model side: master-weight dtypes, the model config checked against the env, GAE's
bootstrap on terminated-and-truncated steps, the ResNet's activations against transformers, and the
non-overwriting VLABuffer under threads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs.base import Box
from jaxrl_vla.models.vla_policy import build_vla_policy

CLASS = "bridge.vla_models.GPTVLAModel"
TINY = {
    "vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 32, "max_instruction_length": 6,
    "action_dim": 2, "proprio_dim": 4, "image_size": 32, "value_hidden_dim": 16,
}


class ActionOnlyEnv:
    """An env that describes only its actions (no observation_space): the input checks have nothing to read."""

    action_space = Box(-1.0, 1.0, (2,))


def policy_cfg(model_path=None, dtype="float32", **model_overrides):
    return {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": dtype, "freeze": [],
            "vla_config": {"model_path": model_path, "model_class": CLASS,
                           "model_config": {**TINY, **model_overrides}, "make_checkpoint": None}}


# ----------------------------------------------------------------------------- 3. master weights


@pytest.mark.torch
@pytest.mark.parametrize("ckpt_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("policy_dtype", ["float32", "bfloat16"])
def test_half_precision_checkpoint_gets_float32_master_weights_and_adam_state(tmp_path, ckpt_dtype, policy_dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bridge.vla_models import GPTVLAModel as TorchGPTVLA
    from jaxrl_vla.algo import ppo

    torch.manual_seed(0)
    half = getattr(torch, ckpt_dtype)
    state = {k: v.to(half) if v.is_floating_point() else v for k, v in TorchGPTVLA(TINY).state_dict().items()}
    torch.save(state, tmp_path / "half.pt")
    policy, variables, mask = build_vla_policy(policy_cfg(str(tmp_path / "half.pt"), policy_dtype), ActionOnlyEnv())
    floating = [leaf for leaf in jax.tree_util.tree_leaves(variables) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    # the values are the checkpoint's, exactly (a half value is representable in float32)
    log_std = state["log_std"].float().numpy()
    assert np.array_equal(np.asarray(variables["params"]["model"]["log_std"]), log_std)
    optimizer = ppo.make_optimizer(ppo.PPOConfig(), 10, mask)
    adam = [leaf for leaf in jax.tree_util.tree_leaves(optimizer.init(variables)) if getattr(leaf, "ndim", 0) > 0]
    assert adam and all(leaf.dtype == jnp.float32 for leaf in adam)
    obs = {"rgb": jnp.zeros((2, 32, 32, 3), jnp.uint8), "proprio": jnp.zeros((2, 4)),
           "language": jnp.full((2, 6), 3, jnp.int32), "language_mask": jnp.ones((2, 6), bool)}
    dist, value = policy.apply(variables, obs)
    assert dist.mean.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(value)))
