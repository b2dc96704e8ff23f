"""Tests for the JAX-native envs, their gymnasium parity, VecEnv and the registry.

Parity notes (why the comparisons look the way they do): gymnasium keeps its
CartPole/Pendulum state in float64, ours is float32. Over a short episode that
only changes the last digits, so random-action episodes run free and are
compared at atol 1e-5. A 500-step balanced CartPole episode cannot run free:
the upright pole is open-loop unstable (errors grow ~e^4 per simulated second),
so any float32-vs-float64 rounding difference grows to O(1) within a few hundred
steps whatever the implementation. For those episodes we re-sync our state to
gymnasium's (cast to float32) before every step, which still checks dynamics,
reward, termination and the time limit at every visited state.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Callable

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jaxrl_vla.envs as envs
from jaxrl_vla.envs import Box, Discrete, Env, VecEnv, make_env, register_env
from jaxrl_vla.envs.cartpole import CartPole, CartPoleState
from jaxrl_vla.envs.gymnax_adapter import GymnaxEnv, split_done
from jaxrl_vla.envs.pendulum import Pendulum, PendulumState

OBS_ATOL = 1e-5


# ---------------------------------------------------------------- gymnasium parity


def cartpole_to_gym(state: CartPoleState) -> np.ndarray:
    return np.array([state.x, state.x_dot, state.theta, state.theta_dot], np.float64)


def cartpole_from_gym(state: CartPoleState, g: np.ndarray) -> CartPoleState:
    f = [jnp.float32(v) for v in g]
    return state.replace(x=f[0], x_dot=f[1], theta=f[2], theta_dot=f[3])


def pendulum_to_gym(state: PendulumState) -> np.ndarray:
    return np.array([state.th, state.thdot], np.float64)


def pendulum_from_gym(state: PendulumState, g: np.ndarray) -> PendulumState:
    return state.replace(th=jnp.float32(g[0]), thdot=jnp.float32(g[1]))


def compare_episode(
    env: Any,
    gym_env: gymnasium.Env,
    key: jax.Array,
    policy: Callable[[np.ndarray], Any],
    to_gym: Callable,
    from_gym: Callable,
    resync: bool,
) -> tuple[bool, bool, int]:
    """Run one episode in both envs from the same start; assert they agree each step.

    Actions come from `policy(gymnasium's obs)` and go to both envs. Returns
    gymnasium's (terminated, truncated, length) for the episode.
    """
    step = jax.jit(env.step)
    state, obs = env.reset(key)
    gym_env.reset(seed=0)  # resets TimeLimit and the "stepped after done" bookkeeping
    gym_env.unwrapped.state = to_gym(state)
    obs = np.asarray(obs)
    for t in range(env.max_episode_steps + 1):
        if resync:
            state = from_gym(state, gym_env.unwrapped.state)
        action = policy(obs)
        state, ts = step(state, action)
        g_obs, g_rew, g_term, g_trunc, _ = gym_env.step(action)
        np.testing.assert_allclose(np.asarray(ts.obs), g_obs, rtol=0, atol=OBS_ATOL, err_msg=f"t={t}")
        np.testing.assert_allclose(float(ts.reward), g_rew, rtol=1e-5, atol=1e-5, err_msg=f"t={t}")
        assert (bool(ts.terminated), bool(ts.truncated)) == (g_term, g_trunc), f"t={t}"
        assert ts.obs.dtype == jnp.float32
        obs = g_obs
        if g_term or g_trunc:
            return g_term, g_trunc, t + 1
    raise AssertionError("gymnasium did not end the episode within the time limit")


def balance(obs: np.ndarray) -> int:
    """A linear state-feedback controller that keeps CartPole up for 500 steps."""
    return int(0.1 * obs[0] + 0.5 * obs[1] + 10.0 * obs[2] + 2.0 * obs[3] > 0)


@pytest.mark.parametrize("sutton_barto", [False, True])
def test_cartpole_matches_gymnasium_random_actions(sutton_barto: bool) -> None:
    env = CartPole(sutton_barto_reward=sutton_barto)
    gym_env = gymnasium.make("CartPole-v1", sutton_barto_reward=sutton_barto)
    rng = np.random.default_rng(0)
    lengths = []
    for ep in range(12 if not sutton_barto else 3):
        term, trunc, n = compare_episode(
            env, gym_env, jax.random.key(ep), lambda o: int(rng.integers(2)),
            cartpole_to_gym, cartpole_from_gym, resync=False,
        )
        assert term and not trunc
        lengths.append(n)
    assert sutton_barto or sum(lengths) > 150  # several hundred steps in all


def test_cartpole_matches_gymnasium_through_truncation() -> None:
    env = CartPole()
    gym_env = gymnasium.make("CartPole-v1")
    term, trunc, n = compare_episode(
        env, gym_env, jax.random.key(7), balance, cartpole_to_gym, cartpole_from_gym, resync=True
    )
    assert (term, trunc, n) == (False, True, 500)


def test_pendulum_matches_gymnasium() -> None:
    env = Pendulum()
    gym_env = gymnasium.make("Pendulum-v1")
    rng = np.random.default_rng(1)
    # Actions beyond +-2 check the torque clipping.
    policy = lambda o: rng.uniform(-3.0, 3.0, size=(1,)).astype(np.float32)  # noqa: E731
    for ep in range(2):
        term, trunc, n = compare_episode(
            env, gym_env, jax.random.key(ep), policy, pendulum_to_gym, pendulum_from_gym, resync=True
        )
        assert (term, trunc, n) == (False, True, 200)


def test_pendulum_short_free_run_matches_gymnasium() -> None:
    """Without re-syncing, the first steps agree too (no hidden dependence on the sync)."""
    env = Pendulum(max_episode_steps=40)
    gym_env = gymnasium.make("Pendulum-v1", max_episode_steps=40)
    rng = np.random.default_rng(2)
    policy = lambda o: rng.uniform(-2.5, 2.5, size=(1,)).astype(np.float32)  # noqa: E731
    assert compare_episode(
        env, gym_env, jax.random.key(3), policy, pendulum_to_gym, pendulum_from_gym, resync=False
    ) == (False, True, 40)


# ---------------------------------------------------------------- raw envs under jit/vmap


@pytest.mark.parametrize("env", [CartPole(), Pendulum()], ids=["cartpole", "pendulum"])
def test_raw_env_jit_vmap_scan(env: Any) -> None:
    assert isinstance(env, Env)
    n = 64
    keys = jax.random.split(jax.random.key(0), n)
    states, obs = jax.jit(jax.vmap(env.reset))(keys)
    assert obs.shape == (n,) + env.observation_space.shape and obs.dtype == jnp.float32

    def body(states: Any, key: jax.Array) -> tuple[Any, Any]:
        actions = jax.vmap(env.action_space.sample)(jax.random.split(key, n))
        states, ts = jax.vmap(env.step)(states, actions)
        return states, ts

    states, traj = jax.jit(lambda s, k: jax.lax.scan(body, s, jax.random.split(k, 5)))(
        states, jax.random.key(1)
    )
    assert traj.obs.shape == (5, n) + env.observation_space.shape
    for x in (traj.reward, traj.terminated, traj.truncated):
        assert x.shape == (5, n)
    assert traj.reward.dtype == jnp.float32 and traj.terminated.dtype == jnp.bool_
    assert np.all(np.asarray(states.time) == 5)


def test_reset_distributions() -> None:
    keys = jax.random.split(jax.random.key(0), 512)
    _, obs = jax.vmap(CartPole().reset)(keys)
    assert np.all(np.abs(np.asarray(obs)) <= 0.05)
    states, obs = jax.vmap(Pendulum().reset)(keys)
    th, thdot = np.asarray(states.th), np.asarray(states.thdot)
    assert np.all(np.abs(th) <= np.pi) and np.all(np.abs(thdot) <= 1.0)
    assert th.min() < -2.5 and th.max() > 2.5  # covers the whole circle
    np.testing.assert_allclose(np.asarray(obs)[:, 0], np.cos(th), atol=1e-6)


def test_spaces() -> None:
    cp, pd = CartPole(), Pendulum()
    assert cp.action_space == Discrete(2) and cp.max_episode_steps == 500
    assert pd.action_space == Box(-2.0, 2.0, (1,)) and pd.max_episode_steps == 200
    assert pd.observation_space.shape == (3,) and cp.observation_space.shape == (4,)
    assert CartPole(max_episode_steps=10).max_episode_steps == 10


# ---------------------------------------------------------------- VecEnv


def vec_rollout(venv: VecEnv, key: jax.Array, steps: int) -> tuple[Any, Any, Any]:
    """Random-action rollout; returns (env states before each step, actions, timesteps).

    `key` is a raw uint32 key (jax.random.PRNGKey): VecEnv's key bookkeeping
    (`jnp.where(done[:, None], ...)`) assumes the raw [N, 2] layout.
    """
    state, _ = venv.reset(key)

    def body(state: Any, k: jax.Array) -> tuple[Any, Any]:
        actions = jax.vmap(venv.action_space.sample)(jax.random.split(k, venv.num_envs))
        new_state, ts = venv.step(state, actions)
        return new_state, (state.env_state, actions, ts)

    run = jax.jit(lambda s, k: jax.lax.scan(body, s, jax.random.split(k, steps))[1])
    return jax.tree_util.tree_map(np.asarray, run(state, jax.random.fold_in(key, 1)))


def test_vecenv_autoreset_keeps_final_obs_and_episode_stats() -> None:
    env = CartPole(max_episode_steps=20)  # short limit: both endings show up
    venv = VecEnv(env, num_envs=8)
    before, actions, ts = vec_rollout(venv, jax.random.PRNGKey(0), 60)
    raw_step = jax.jit(env.step)
    running_return = np.zeros(8)
    running_length = np.zeros(8, int)
    seen = {"terminated": 0, "truncated": 0}
    for t in range(60):
        for i in range(8):
            one = jax.tree_util.tree_map(lambda x: x[t, i], before)
            _, single = raw_step(one, actions[t, i])
            final_obs = ts.info["final_obs"][t, i]
            np.testing.assert_allclose(final_obs, np.asarray(single.obs), atol=1e-6)
            assert ts.terminated[t, i] == bool(single.terminated)
            assert ts.truncated[t, i] == bool(single.truncated)
            running_return[i] += ts.reward[t, i]
            running_length[i] += 1
            if not ts.info["done"][t, i]:
                np.testing.assert_array_equal(ts.obs[t, i], final_obs)
                continue
            # A fresh episode started: its obs is a reset obs, not the final one.
            assert not np.array_equal(ts.obs[t, i], final_obs)
            assert np.all(np.abs(ts.obs[t, i]) <= 0.05)
            if t + 1 < 60:
                assert before.time[t + 1, i] == 0
            assert ts.info["episode_length"][t, i] == running_length[i]
            assert ts.info["episode_return"][t, i] == pytest.approx(running_return[i])
            if ts.truncated[t, i]:
                assert running_length[i] == 20
                seen["truncated"] += 1
            if ts.terminated[t, i]:
                assert running_length[i] <= 20
                seen["terminated"] += 1
            running_return[i], running_length[i] = 0.0, 0
    assert seen["terminated"] > 0 and seen["truncated"] > 0


def test_vecenv_pendulum_truncates_only() -> None:
    venv = VecEnv(Pendulum(max_episode_steps=7), num_envs=4)
    _, _, ts = vec_rollout(venv, jax.random.PRNGKey(3), 21)
    assert not ts.terminated.any()
    np.testing.assert_array_equal(ts.truncated, np.tile((np.arange(21) % 7 == 6)[:, None], (1, 4)))
    ends = ts.info["done"]
    np.testing.assert_array_equal(ts.info["episode_length"][ends], 7)
    returns = ts.reward.reshape(3, 7, 4).sum(1)
    np.testing.assert_allclose(ts.info["episode_return"][ends].reshape(3, 4), returns, rtol=1e-5)


# ---------------------------------------------------------------- registry


def test_registry_builtins_and_kwargs() -> None:
    assert {"CartPole-v1", "Pendulum-v1"} <= set(envs.available_envs())
    assert isinstance(make_env("CartPole-v1"), CartPole)
    assert make_env("Pendulum-v1", max_episode_steps=50).max_episode_steps == 50
    assert make_env("Pendulum-v1", g=9.81).g == 9.81


def test_registry_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match="CartPole-v2") as err:
        make_env("CartPole-v2")
    assert "Did you mean 'CartPole-v1'" in str(err.value)
    with pytest.raises(ValueError, match="Pendulum-v1"):
        make_env("pendulum-v1")


def test_register_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "_REGISTRY", dict(envs._REGISTRY))
    register_env("ShortPole-v0", lambda **kw: CartPole(max_episode_steps=5, **kw))
    register_env("LazyPole-v0", "jaxrl_vla.envs.cartpole:CartPole")
    assert make_env("ShortPole-v0").max_episode_steps == 5
    assert make_env("LazyPole-v0", max_episode_steps=3).max_episode_steps == 3
    assert "ShortPole-v0" in envs.available_envs()
    with pytest.raises(ValueError, match="already registered"):
        register_env("CartPole-v1", CartPole)
    register_env("CartPole-v1", Pendulum, overwrite=True)
    assert isinstance(make_env("CartPole-v1"), Pendulum)
    with pytest.raises(ValueError, match="module:attr"):
        register_env("Bad-v0", "no_colon_here")


def test_importing_envs_imports_no_env_module() -> None:
    code = (
        "import sys, jaxrl_vla.envs\n"
        "mods = ['jaxrl_vla.envs.cartpole', 'jaxrl_vla.envs.pendulum',"
        " 'jaxrl_vla.envs.gymnax_adapter', 'gymnax']\n"
        "print([m for m in mods if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- gymnax adapter


@struct.dataclass
class CounterParams:
    max_steps_in_episode: int = 4
    goal: int = 3


@struct.dataclass
class CounterState:
    time: jax.Array
    pos: jax.Array


class OldApiCounter:
    """A tiny gymnax-0.0.x-style env: `done` merges reaching the goal and the time limit."""

    default_params = CounterParams()

    def reset_env(self, key: jax.Array, params: CounterParams) -> tuple[jax.Array, CounterState]:
        state = CounterState(jnp.int32(0), jnp.int32(0))
        return state.pos[None].astype(jnp.float32), state

    def _advance(self, state: CounterState, action: jax.Array) -> CounterState:
        return CounterState(state.time + 1, state.pos + action)

    def step_env(self, key, state, action, params):  # noqa: ANN001, ANN201
        s = self._advance(state, action)
        done = (s.pos >= params.goal) | (s.time >= params.max_steps_in_episode)
        return s.pos[None].astype(jnp.float32), s, 1.0, done, {"pos": s.pos}

    def observation_space(self, params: CounterParams) -> Any:
        return SimpleNamespace(low=np.zeros(1), high=np.full(1, 10.0), shape=(1,), dtype=jnp.float32)

    def action_space(self, params: CounterParams) -> Any:
        return SimpleNamespace(n=2)


class NewApiCounter(OldApiCounter):
    """gymnax >= 1.0 style: `step_env` returns `terminated`; `is_truncated` gives the limit."""

    def step_env(self, key, state, action, params):  # noqa: ANN001, ANN201
        s = self._advance(state, action)
        return s.pos[None].astype(jnp.float32), s, 1.0, s.pos >= params.goal, {"pos": s.pos}

    def is_truncated(self, state: CounterState, params: CounterParams) -> jax.Array:
        return state.time >= params.max_steps_in_episode


def run_counter(env: GymnaxEnv, action: int) -> tuple[bool, bool, int]:
    state, _ = env.reset(jax.random.key(0))
    step = jax.jit(env.step)
    for t in range(10):
        old_key = jax.random.key_data(state.key)
        state, ts = step(state, jnp.int32(action))
        assert not np.array_equal(old_key, jax.random.key_data(state.key))
        if ts.terminated or ts.truncated:
            return bool(ts.terminated), bool(ts.truncated), t + 1
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("api", [OldApiCounter, NewApiCounter], ids=["old", "new"])
def test_gymnax_adapter_splits_termination(api: type) -> None:
    assert run_counter(GymnaxEnv(api()), 1) == (True, False, 3)  # goal reached
    assert run_counter(GymnaxEnv(api()), 0) == (False, True, 4)  # time limit
    both = run_counter(GymnaxEnv(api(), max_steps_in_episode=3), 1)
    # Goal and limit on the same step: only the new API can report both.
    assert both == ((True, True, 3) if api is NewApiCounter else (False, True, 3))
    env = GymnaxEnv(api(), max_steps_in_episode=9)
    assert env.max_episode_steps == 9
    assert env.action_space == Discrete(2)
    assert env.observation_space == Box((0.0,), (10.0,), (1,))


def test_split_done() -> None:
    done = jnp.array([True, True, False])
    time = jnp.array([2, 5, 5])
    term, trunc = split_done(done, time, 5)
    assert term.tolist() == [True, False, False] and trunc.tolist() == [False, True, False]


def test_gymnax_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gymnax", None)  # makes `import gymnax` fail
    with pytest.raises(ImportError, match="pip install gymnax"):
        make_env("gymnax:CartPole-v1")


def test_gymnax_cartpole_matches_ours_and_truncates() -> None:
    pytest.importorskip("gymnax")
    genv = make_env("gymnax:CartPole-v1", max_steps_in_episode=30)
    assert isinstance(genv, GymnaxEnv) and genv.max_episode_steps == 30
    assert genv.action_space == Discrete(2)
    ours = CartPole(max_episode_steps=30)
    g_state, g_obs = genv.reset(jax.random.key(0))
    o_state, _ = ours.reset(jax.random.key(0))
    o_state = cartpole_from_gym(o_state, np.asarray(g_obs, np.float64))
    g_step, o_step = jax.jit(genv.step), jax.jit(ours.step)
    for t in range(30):
        action = jnp.int32(balance(np.asarray(g_obs)))
        g_state, g_ts = g_step(g_state, action)
        o_state, o_ts = o_step(o_state, action)
        g_obs = g_ts.obs
        np.testing.assert_allclose(np.asarray(g_ts.obs), np.asarray(o_ts.obs), atol=1e-5)
        assert bool(g_ts.terminated) == bool(o_ts.terminated) is False
        assert bool(g_ts.truncated) == bool(o_ts.truncated) == (t == 29)
    # And through VecEnv with auto-reset.
    venv = VecEnv(genv, num_envs=4)
    _, _, ts = vec_rollout(venv, jax.random.PRNGKey(1), 35)
    assert ts.info["done"].any() and ts.info["final_obs"].shape == (35, 4, 4)


def test_gymnax_pendulum_spaces() -> None:
    pytest.importorskip("gymnax")
    env = make_env("gymnax:Pendulum-v1")
    assert env.action_space == Box(-2.0, 2.0, (1,))
    assert env.max_episode_steps == 200
    state, obs = env.reset(jax.random.key(0))
    state, ts = jax.jit(env.step)(state, jnp.array([0.5]))
    assert ts.obs.shape == (3,) and not bool(ts.terminated)


def test_gymnax_cartpole_trains(tmp_path: Any) -> None:
    """A few PPO iterations on a gymnax env through the Trainer: one compilation, episodes logged,
    returns up from a random policy's (~22) and a deterministic evaluation that runs."""
    pytest.importorskip("gymnax")
    import json

    from jaxrl_vla import Trainer
    from jaxrl_vla.algo import PPOConfig
    from jaxrl_vla.models.actor_critic import ActorCritic

    env = make_env("gymnax:CartPole-v1")
    cfg = PPOConfig(learning_rate=2.5e-3, n_epochs=4, batch_size=256, ent_coef=0.01)
    trainer = Trainer(ActorCritic(env.action_space, (32, 32)), env, cfg, buffer_size=64, num_envs=8, iterations=12,
                      eval_freq=12, num_eval_episodes=4, output_dir=tmp_path, exp_name="gymnax", progress=False)
    trainer.train()
    assert trainer.trace_count == 1 and int(trainer.state.iteration) == 12
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return_mean"] for r in records if "episode_return_mean" in r]
    assert len(records) == 12 and returns and max(returns[-3:]) > 40  # random: ~22
    assert records[-1]["eval/episodes"] == 4
