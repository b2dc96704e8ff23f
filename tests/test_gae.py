"""GAE against an independent plain-NumPy loop, with both kinds of episode end."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.algo import ppo
from jaxrl_vla.types import Transition


def numpy_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Textbook GAE, one env and one step at a time."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            bootstrap = 0.0 if terminated[t, n] else next_values[t, n]
            delta = rewards[t, n] + gamma * bootstrap - values[t, n]
            if terminated[t, n] or truncated[t, n]:
                running = delta
            else:
                running = delta + gamma * lam * running
            adv[t, n] = running
    return adv, adv + values


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.default_rng(0)
    T, N = 64, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    next_values = rng.normal(size=(T, N)).astype(np.float32)
    terminated = rng.random((T, N)) < 0.08
    truncated = (rng.random((T, N)) < 0.08) & ~terminated
    dones = terminated | truncated
    adv, ret = ppo.compute_gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(next_values),
        jnp.asarray(terminated), jnp.asarray(dones), gamma, lam,
    )
    ref_adv, ref_ret = numpy_gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_from_final_value_and_termination_does_not():
    """One env, 3 steps: step 0 truncated, step 1 terminated, step 2 runs on."""
    T = 3
    rollout = Transition(
        obs=jnp.zeros((T, 1, 1)),
        action=jnp.zeros((T, 1)),
        log_prob=jnp.zeros((T, 1)),
        value=jnp.array([[1.0], [2.0], [3.0]]),
        reward=jnp.array([[10.0], [20.0], [30.0]]),
        terminated=jnp.array([[False], [True], [False]]),
        truncated=jnp.array([[True], [False], [False]]),
        final_value=jnp.array([[100.0], [0.0], [0.0]]),
        chunk_index=jnp.zeros((T, 1), jnp.int32),
        policy_version=jnp.zeros((T, 1), jnp.int32),
    )
    gamma, lam = 0.5, 0.9
    adv, _ = ppo.gae_from_transitions(rollout, jnp.array([7.0]), gamma, lam)
    adv = np.asarray(adv)[:, 0]
    assert adv[2] == pytest.approx(30 + gamma * 7 - 3)          # bootstraps from last_value
    assert adv[1] == pytest.approx(20 - 2)                      # terminated: no bootstrap
    assert adv[0] == pytest.approx(10 + gamma * 100 - 1)        # truncated: V(final obs), not V(next obs)=2
