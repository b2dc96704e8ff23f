"""FlowVLA: (dist, value) as the PPO learner takes them; a sampled chain re-scores to the same log-prob."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.models.vla.flow_expert import FlowExpertConfig
from jaxrl_vla.models.vla.flow_vla import FlowVLA
from jaxrl_vla.models.vla.heads.flow import FlowConfig
from jaxrl_vla.models.vla.llama import DecoderConfig


def test_flow_vla_ratio_one_and_grads():
    dc = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2)
    ec = FlowExpertConfig(chunk=3, action_dim=2, hidden_size=24, intermediate_size=48, num_layers=2,
                          num_heads=2, num_kv_heads=2, head_dim=8, prefix_num_kv_heads=2, prefix_head_dim=8)
    model = FlowVLA(dc, ec, FlowConfig(steps=3, method="flow_noise"))
    obs = {"input_ids": jax.random.randint(jax.random.PRNGKey(0), (2, 5), 0, 40),
           "attention_mask": jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}
    params = model.init(jax.random.PRNGKey(1), obs)
    dist, value = model.apply(params, obs)
    chunk, logp, info = jax.jit(lambda d, k: d.sample(k))(dist, jax.random.PRNGKey(2))
    assert chunk.shape == (2, 3, 2) and value.shape == (2,)

    def loss(p):
        d, v = model.apply(p, obs)
        lp, ent = d.log_prob_and_entropy(info)
        return jnp.mean(jnp.exp(lp - logp)) + jnp.mean(v) - 0.01 * jnp.mean(ent), lp

    (val, lp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(np.exp(lp - logp), 1.0, atol=1e-5)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert np.any(grads["params"]["lm"]["layers_0"]["self_attn"]["k_proj"]["kernel"] != 0)  # prefix is trained
    assert np.any(grads["params"]["head"]["noise_head"]["kernel"] != 0)  # the noise network is trained
    assert np.any(grads["params"]["value_head"]["kernel"] != 0)
