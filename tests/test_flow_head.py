"""Flow-matching samplers (ode / flow_noise / flow_sde) against an independent NumPy computation of the chain,
and the flow expert in both attention modes on a DecoderLM prefix."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.flow_expert import FlowExpert, FlowExpertConfig
from jaxrl_vla.models.vla.heads.flow import FlowActionHead, FlowConfig, log_prob_and_entropy, sample
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderLM

B, H, A = 3, 4, 2
LO, HI = 0.08, 0.16


def toy_params(seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    return {"w": r.normal(size=(A, A)).astype(np.float32) * 0.5, "b": r.normal(size=(A,)).astype(np.float32),
            "c": r.normal(size=(A,)).astype(np.float32)}


def toy_field(p):
    """v = x W (1 + t) + b t; std = LO + (HI - LO) * sigmoid(c x + t): reproducible in NumPy."""
    def f(x, t):
        tt = t[:, None, None]
        v = (x @ p["w"]) * (1.0 + tt) + p["b"] * tt
        return v, LO + (HI - LO) * jax.nn.sigmoid(p["c"] * x + tt)
    return f


def np_field(p, x, t):
    v = (x @ p["w"]) * (1.0 + t) + p["b"] * t
    return v, LO + (HI - LO) / (1.0 + np.exp(-(p["c"] * x + t)))


def np_logpdf(x, m, s):
    return float(np.sum(-0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)))


def np_reference(p, chain, step, cfg):
    """Per-sample log-probs of a stored chain, written as plain loops (float64)."""
    chain = np.asarray(chain, np.float64)
    k = cfg.steps
    grid = [1.0 - i / k for i in range(k + 1)]
    out = []
    for b in range(chain.shape[0]):
        if cfg.method == "flow_noise":
            lp = np_logpdf(chain[b, 0], 0.0, 1.0)
            for i in range(k):
                v, s = np_field(p, chain[b, i], grid[i])
                lp += np_logpdf(chain[b, i + 1], chain[b, i] - v / k, s)
        else:
            i = int(step[b])
            t, tn = grid[i], grid[i + 1]
            d = t - tn
            sigma = cfg.noise_level * math.sqrt(t / (1.0 - (grid[1] if t == 1.0 else t)))
            v, _ = np_field(p, chain[b, i], t)
            x = chain[b, i]
            mean = (x - t * v) * (1 - tn) + (x + (1 - t) * v) * (tn - sigma**2 * d / (2 * t))
            lp = np_logpdf(chain[b, i + 1], mean, math.sqrt(d) * sigma)
        out.append(lp)
    return np.array(out)


def np_ode(p, x0, steps):
    x = np.asarray(x0, np.float64)
    for i in range(steps):
        t = 1.0 - i / steps
        x = x - np_field(p, x, t)[0] / steps
    return x


@pytest.mark.parametrize("method", ["flow_noise", "flow_sde"])
def test_log_prob_matches_numpy_and_rescoring(method):
    cfg = FlowConfig(steps=5, method=method, noise_level=0.7, noise_min=LO, noise_max=HI)
    p = toy_params()
    jp = jax.tree_util.tree_map(jnp.asarray, p)
    fn = jax.jit(lambda q, key: sample(toy_field(q), key, (B, H, A), cfg))
    x, logp, info = fn(jp, jax.random.PRNGKey(1))
    assert x.shape == (B, H, A) and info.chain.shape == (B, cfg.steps + 1, H, A)
    np.testing.assert_array_equal(info.chain[:, -1], x)
    ref = np_reference(p, info.chain, info.step, cfg)
    np.testing.assert_allclose(logp, ref, rtol=1e-5, atol=1e-4)
    rescored, ent = jax.jit(lambda q, s: log_prob_and_entropy(toy_field(q), s, cfg))(jp, info)
    np.testing.assert_allclose(rescored, ref, rtol=1e-5, atol=1e-4)
    ratio = np.exp(np.asarray(rescored) - np.asarray(logp))
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    assert np.all(np.isfinite(ent))
    if method == "flow_sde":
        # the non-chosen steps are exact ODE steps
        chain = np.asarray(info.chain, np.float64)
        for b in range(B):
            for i in range(cfg.steps):
                if i != int(info.step[b]):
                    v, _ = np_field(p, chain[b, i], 1.0 - i / cfg.steps)
                    np.testing.assert_allclose(chain[b, i + 1], chain[b, i] - v / cfg.steps, atol=1e-5)
    grads = jax.grad(lambda q: log_prob_and_entropy(toy_field(q), info, cfg)[0].sum())(jp)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    used = ("w", "b", "c") if method == "flow_noise" else ("w", "b")  # flow_sde's std is not learned
    assert all(np.any(grads[n] != 0) for n in used)


def test_ode_and_zero_noise_limits():
    p = toy_params(3)
    jp = jax.tree_util.tree_map(jnp.asarray, p)
    key = jax.random.PRNGKey(7)
    ode_x, ode_lp, ode_info = sample(toy_field(jp), key, (B, H, A), FlowConfig(steps=6, method="ode"))
    np.testing.assert_allclose(ode_x, np_ode(p, ode_info.chain[:, 0], 6), atol=1e-5)
    np.testing.assert_array_equal(ode_lp, 0.0)
    sde_x, _, sde_info = sample(toy_field(jp), key, (B, H, A), FlowConfig(steps=6, method="flow_sde", noise_level=0.0))
    np.testing.assert_array_equal(sde_info.chain[:, 0], ode_info.chain[:, 0])  # same initial noise
    np.testing.assert_allclose(sde_x, ode_x, atol=1e-6)
    tiny = lambda x, t: (toy_field(jp)(x, t)[0], jnp.full(x.shape, 1e-9))
    fn_x, _, _ = sample(tiny, key, (B, H, A), FlowConfig(steps=6, method="flow_noise", noise_min=0.0))
    np.testing.assert_allclose(fn_x, ode_x, atol=1e-6)
    det_x, det_lp, _ = sample(toy_field(jp), key, (B, H, A), FlowConfig(steps=6, method="flow_sde"), deterministic=True)
    np.testing.assert_allclose(det_x, ode_x, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="flow_sde.*needs >= 2 steps"):
        FlowConfig(steps=1, method="flow_sde")
    with pytest.raises(ConfigError, match="'ddim' is unknown"):
        FlowConfig(method="ddim")
    with pytest.raises(ConfigError, match="unknown key"):
        FlowConfig.from_dict({"steps": 4, "stepz": 2})
    with pytest.raises(ConfigError, match="head layout"):
        FlowExpertConfig(mode="joint", num_kv_heads=1, prefix_num_kv_heads=2)
    assert FlowConfig.from_dict({"steps": 3, "method": "ode"}).steps == 3


def _prefix():
    dc = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    lm = DecoderLM(dc)
    ids = jax.random.randint(jax.random.PRNGKey(0), (B, 5), 0, 50)
    params = lm.init(jax.random.PRNGKey(0), ids)
    _, kv = lm.apply(params, ids, return_kv=True)
    return kv


@pytest.mark.parametrize("mode,kv_heads,head_dim", [("joint", 2, 8), ("cross", 1, 16)])
def test_expert_on_decoder_prefix(mode, kv_heads, head_dim):
    kv = _prefix()
    ecfg = FlowExpertConfig(chunk=H, action_dim=A, hidden_size=24, intermediate_size=48, num_layers=2, num_heads=2,
                            num_kv_heads=kv_heads, head_dim=head_dim, prefix_num_kv_heads=2, prefix_head_dim=8,
                            mode=mode, self_attn_every=2)
    for method in ("flow_noise", "flow_sde"):
        fcfg = FlowConfig(steps=3, method=method, noise_level=0.5)
        head = FlowActionHead(ecfg, fcfg)
        x = jnp.zeros((B, H, A))
        params = head.init(jax.random.PRNGKey(2), x, jnp.ones((B,)), kv)
        mask = jnp.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        field = lambda q: (lambda xx, t: head.apply(q, xx, t, kv, mask))
        act, logp, info = jax.jit(lambda q, k: sample(field(q), k, (B, H, A), fcfg))(params, jax.random.PRNGKey(3))
        assert act.shape == (B, H, A) and np.all(np.isfinite(act))
        v, std = field(params)(x, jnp.ones((B,)))
        assert v.shape == (B, H, A) and np.all((std >= fcfg.noise_min) & (std <= fcfg.noise_max))
        lp2, _ = log_prob_and_entropy(field(params), info, fcfg)
        np.testing.assert_allclose(lp2, logp, rtol=1e-5, atol=1e-4)
        grads = jax.grad(lambda q: log_prob_and_entropy(field(q), info, fcfg)[0].mean())(params)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)
    # the prefix matters, and a masked prefix token does not
    expert = FlowExpert(ecfg)
    ep = expert.init(jax.random.PRNGKey(4), x, jnp.full((B,), 0.5), kv)
    v1, _ = expert.apply(ep, x + 0.3, jnp.full((B,), 0.5), kv, mask)
    kv_changed = tuple((k.at[0].add(1.0), vv.at[0].add(1.0)) for k, vv in kv)
    v2, _ = expert.apply(ep, x + 0.3, jnp.full((B,), 0.5), kv_changed, mask)
    assert not np.allclose(v1[0], v2[0]) and np.allclose(v1[1:], v2[1:])
    kv_pad = tuple((k.at[2, 0].add(5.0), vv.at[2, 0].add(5.0)) for k, vv in kv)
    v3, _ = expert.apply(ep, x + 0.3, jnp.full((B,), 0.5), kv_pad, mask)
    np.testing.assert_allclose(v3, v1, atol=1e-6)
