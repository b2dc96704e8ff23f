"""The VLA circular buffer: the seed's overwrite example, oldest-first reads, GAE
across the wrap point, field-naming errors, and one-writer/one-reader safety."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.algo import ppo
from jaxrl_vla.buffer import BufferClosed, RolloutBuffer, VLABuffer
from jaxrl_vla.buffer import circular
from jaxrl_vla.types import Transition


# jitted once for the module: eager dispatch of every op would dominate the test time
ADD = jax.jit(circular.add)
GAE = jax.jit(circular.gae)
REF_GAE = jax.jit(ppo.gae_from_transitions)


def make_step(rng: np.random.Generator, n: int, p_term: float = 0.1, p_trunc: float = 0.05) -> Transition:
    """A random step of n envs with sparse episode ends."""
    terminated = rng.random(n) < p_term
    truncated = rng.random(n) < p_trunc
    return Transition(
        obs=rng.normal(size=(n, 3)).astype(np.float32),
        action=rng.integers(0, 2, n).astype(np.int32),
        log_prob=rng.normal(size=n).astype(np.float32),
        value=rng.normal(size=n).astype(np.float32),
        reward=rng.normal(size=n).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        final_value=np.where(truncated, rng.normal(size=n), 0.0).astype(np.float32),
        chunk_index=np.zeros(n, np.int32),
        policy_version=np.zeros(n, np.int32),
    )


def stack(steps: list) -> Transition:
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *steps)


def test_rollout_buffer_still_exported() -> None:
    assert RolloutBuffer is not None


def test_seed_overwrite_example_capacity_4() -> None:
    """[T0,_,_,_] -> ... -> [T0,T1,T2,T3] -> [T4,T1,T2,T3] -> [T4,T5,T2,T3], exactly."""
    buffer = VLABuffer({"t": np.zeros((1,), np.int32)}, capacity=4)
    expected_slots = [
        [0, None, None, None],
        [0, 1, None, None],
        [0, 1, 2, None],
        [0, 1, 2, 3],
        [4, 1, 2, 3],
        [4, 5, 2, 3],
    ]
    for i, slots in enumerate(expected_slots):
        buffer.add({"t": np.array([i], np.int32)})
        stored = np.asarray(buffer.state.data["t"])[:, 0]
        filled = [s for s in slots if s is not None]
        assert stored[: len(filled)].tolist() == filled
        assert buffer.is_full() == (i >= 3)
        assert len(buffer) == min(i + 1, 4)
    # get: oldest first, flattened
    assert np.asarray(buffer.get()["t"]).tolist() == [2, 3, 4, 5]
    assert np.asarray(buffer.get(flatten=False)["t"]).shape == (4, 1)
    buffer.clear()
    assert len(buffer) == 0 and not buffer.is_full()
    buffer.add({"t": np.array([6], np.int32)})
    assert np.asarray(buffer.get()["t"]).tolist() == [6]


def test_get_oldest_first_with_several_envs_and_add_batch() -> None:
    n, capacity = 3, 12  # T = 4
    state = circular.init({"x": jnp.zeros((n,), jnp.int32)}, circular.steps_for_capacity(capacity, n))
    add = jax.jit(circular.add, donate_argnums=0)
    for t in range(6):  # wraps once
        state = add(state, {"x": jnp.arange(n, dtype=jnp.int32) + 10 * t})
    got = np.asarray(circular.get(state, flatten=False)["x"])
    np.testing.assert_array_equal(got, np.arange(2, 6)[:, None] * 10 + np.arange(n))
    flat = np.asarray(circular.get(state)["x"])
    np.testing.assert_array_equal(flat, got.reshape(-1))
    # add_batch of K steps equals K adds, also when K exceeds T
    for k in (3, 9):
        one_by_one, batched = state, state
        steps = {"x": (np.arange(k)[:, None] * 100 + np.arange(n)).astype(np.int32)}
        for t in range(k):
            one_by_one = ADD(one_by_one, {"x": steps["x"][t]})
        batched = circular.add_batch(batched, steps)
        np.testing.assert_array_equal(np.asarray(one_by_one.data["x"]), np.asarray(batched.data["x"]))
        assert int(one_by_one.write_index) == int(batched.write_index)
        assert int(one_by_one.count) == int(batched.count)


def test_capacity_must_be_multiple_of_num_envs() -> None:
    with pytest.raises(ValueError, match=r"buffer_size \(10\).*num_envs \(4\)"):
        VLABuffer({"x": np.zeros((4,), np.float32)}, capacity=10)


def test_shape_and_dtype_errors_name_the_field() -> None:
    rng = np.random.default_rng(0)
    step = make_step(rng, 2)
    buffer = VLABuffer(step, capacity=8, example_obs=step.obs)
    with pytest.raises(ValueError, match=r"\.reward.*float32"):
        buffer.add(step.replace(reward=np.zeros((2,), np.int32)), step.obs)
    with pytest.raises(ValueError, match=r"\.obs.*\(2, 5\)"):
        buffer.add(step.replace(obs=np.zeros((2, 5), np.float32)), step.obs)
    with pytest.raises(ValueError, match="next_obs"):
        buffer.add(step, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="next_obs"):
        buffer.add(step)


@pytest.mark.parametrize("num_adds", [5, 9, 13])
def test_gae_on_wrapped_ring_equals_gae_on_unrolled_steps(num_adds: int) -> None:
    """Episodes span the wrap point; the newest step bootstraps from V(next_obs)."""
    rng = np.random.default_rng(num_adds)
    n, T = 3, 5
    gamma, lam = 0.97, 0.9
    steps = [make_step(rng, n, p_term=0.15, p_trunc=0.1) for _ in range(num_adds)]
    next_obs = rng.normal(size=(n, 3)).astype(np.float32)
    last_value = rng.normal(size=n).astype(np.float32)

    state = circular.init(steps[0], T, steps[0].obs)
    for step in steps:
        state = ADD(state, step, next_obs)
    assert num_adds <= T or int(state.write_index) != 0  # really wrapped mid-ring
    advantages, returns = GAE(state, jnp.asarray(last_value), gamma, lam)

    kept = steps[-T:]
    rollout = stack(kept)
    # reference 1: the lead's GAE on the same steps, time ordered
    ref_adv, ref_ret = REF_GAE(jax.tree_util.tree_map(jnp.asarray, rollout), jnp.asarray(last_value), gamma, lam)
    np.testing.assert_allclose(np.asarray(advantages)[: len(kept)], np.asarray(ref_adv), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(returns)[: len(kept)], np.asarray(ref_ret), rtol=1e-5, atol=1e-5)
    # reference 2: compute_gae on the unrolled arrays, next values built by hand
    values = rollout.value
    next_values = np.concatenate([values[1:], last_value[None]])
    next_values = np.where(rollout.truncated, rollout.final_value, next_values)
    dones = rollout.terminated | rollout.truncated
    adv2, _ = ppo.compute_gae(rollout.reward, values, next_values, rollout.terminated, dones, gamma, lam)
    np.testing.assert_allclose(np.asarray(advantages)[: len(kept)], np.asarray(adv2), rtol=1e-5, atol=1e-5)
    # a ring that never wrapped, holding the same steps, gives the same GAE
    fresh = circular.init(steps[0], T, steps[0].obs)
    for step in kept:
        fresh = ADD(fresh, step, next_obs)
    fresh_adv, _ = GAE(fresh, jnp.asarray(last_value), gamma, lam)
    np.testing.assert_allclose(np.asarray(fresh_adv), np.asarray(advantages), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.next_obs), next_obs)


def test_gae_envs_never_mix_and_partial_fill() -> None:
    """Changing one env's rewards leaves every other env's advantages unchanged;
    a partly filled ring gives GAE over just its steps."""
    rng = np.random.default_rng(1)
    steps = [make_step(rng, 4, p_term=0.0, p_trunc=0.0) for _ in range(3)]
    last_value = jnp.asarray(rng.normal(size=4).astype(np.float32))
    state = circular.init(steps[0], 6, steps[0].obs)
    for step in steps:
        state = ADD(state, step, steps[0].obs)
    adv, ret = GAE(state, last_value, 0.99, 0.95)
    ref, _ = REF_GAE(jax.tree_util.tree_map(jnp.asarray, stack(steps)), last_value, 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(adv[:3]), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv[3:]) == 0) and np.all(np.asarray(ret[3:]) == 0)

    changed = [s.replace(reward=s.reward.copy()) for s in steps]
    for s in changed:
        s.reward[2] += 5.0
    state2 = circular.init(steps[0], 6, steps[0].obs)
    for step in changed:
        state2 = ADD(state2, step, steps[0].obs)
    adv2, _ = GAE(state2, last_value, 0.99, 0.95)
    others = [0, 1, 3]
    np.testing.assert_array_equal(np.asarray(adv)[:, others], np.asarray(adv2)[:, others])
    assert not np.allclose(np.asarray(adv)[:3, 2], np.asarray(adv2)[:3, 2])


def test_object_gae_matches_pure_function() -> None:
    rng = np.random.default_rng(2)
    steps = [make_step(rng, 2) for _ in range(7)]
    buffer = VLABuffer(steps[0], capacity=10, example_obs=steps[0].obs)
    for step in steps:
        buffer.add(step, step.obs)
    adv, ret = buffer.gae(jnp.ones(2), 0.99, 0.95)
    ref_adv, ref_ret = GAE(buffer.state, jnp.ones(2), 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(adv), np.asarray(ref_adv), rtol=1e-5, atol=1e-6)
    assert adv.shape == (5, 2)


# ------------------------------------------------------------------ concurrency


def tagged_step(uid: int, n: int) -> Transition:
    """Every field of env e's transition encodes the same id (uid * n + e): a torn
    write (fields from two different adds) shows as a mismatch."""
    ids = uid * n + np.arange(n)
    return Transition(
        obs=np.stack([ids, -ids], axis=1).astype(np.float32),
        action=ids.astype(np.int32),
        log_prob=ids.astype(np.float32),
        value=ids.astype(np.float32),
        reward=ids.astype(np.float32),
        terminated=(ids % 2).astype(bool),
        truncated=(ids % 3 == 0),
        final_value=ids.astype(np.float32),
        chunk_index=(ids % 7).astype(np.int32),
        policy_version=ids.astype(np.int32),
    )


def check_not_torn(data: Transition) -> np.ndarray:
    ids = np.asarray(data.action).astype(np.int64)
    for field in (data.log_prob, data.value, data.reward, data.final_value, data.policy_version):
        np.testing.assert_array_equal(np.asarray(field).astype(np.int64), ids)
    obs = np.asarray(data.obs)
    np.testing.assert_array_equal(obs[..., 0].astype(np.int64), ids)
    np.testing.assert_array_equal(obs[..., 1].astype(np.int64), -ids)
    np.testing.assert_array_equal(np.asarray(data.terminated), ids % 2 == 1)
    np.testing.assert_array_equal(np.asarray(data.truncated), ids % 3 == 0)
    np.testing.assert_array_equal(np.asarray(data.chunk_index), ids % 7)
    return ids


def test_concurrent_writer_and_reader_lose_nothing() -> None:
    """Thousands of adds from a writer thread, gets and takes from a reader thread:
    no transition torn, lost or delivered twice."""
    n, num_adds = 2, 3200  # a multiple of the 16 rows, so every take is full
    buffer = VLABuffer(tagged_step(0, n), capacity=16 * n, example_obs=tagged_step(0, n).obs, overwrite=False)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for uid in range(num_adds):
                step = tagged_step(uid, n)
                buffer.add(step, step.obs)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    received: list[np.ndarray] = []
    gets = 0
    while len(received) * n * 16 < num_adds * n:
        peek = buffer.get(flatten=False)  # a non-consuming read while the writer writes
        check_not_torn(peek)
        gets += 1
        data, next_obs = buffer.take(timeout=30)
        ids = check_not_torn(data)
        # oldest first within the taken block, and the kept next_obs follows the newest row
        assert np.all(np.diff(ids[:, 0]) == n)
        np.testing.assert_array_equal(np.asarray(next_obs)[:, 0], ids[-1])
        received.append(ids)
    thread.join(10)
    assert not thread.is_alive() and not errors
    all_ids = np.concatenate([r.reshape(-1) for r in received])
    assert len(all_ids) == num_adds * n
    assert len(np.unique(all_ids)) == len(all_ids)  # nothing twice
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(num_adds * n))  # nothing lost
    assert gets >= num_adds // 16


def test_concurrent_overwrite_mode_reads_are_consistent() -> None:
    """Seed semantics (overwrite) under concurrency: every read is an untorn run of
    consecutive steps, oldest first, and never goes backwards in time."""
    n = 3
    buffer = VLABuffer(tagged_step(0, n), capacity=8 * n)
    stop = threading.Event()

    def writer() -> None:
        uid = 0
        while not stop.is_set() and uid < 5000:
            buffer.add(tagged_step(uid, n))
            uid += 1

    thread = threading.Thread(target=writer)
    thread.start()
    newest_seen = -1
    for _ in range(500):
        data = buffer.get(flatten=False)
        if len(np.asarray(data.action)) == 0:
            continue
        ids = check_not_torn(data)
        steps = ids[:, 0] // n
        assert np.all(np.diff(steps) == 1)
        assert steps[-1] >= newest_seen
        newest_seen = steps[-1]
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_close_wakes_a_blocked_writer() -> None:
    buffer = VLABuffer({"x": np.zeros((1,), np.float32)}, capacity=2, overwrite=False)
    buffer.add({"x": np.zeros((1,), np.float32)})
    buffer.add({"x": np.zeros((1,), np.float32)})
    outcome: list[str] = []

    def writer() -> None:
        try:
            buffer.add({"x": np.zeros((1,), np.float32)})
            outcome.append("added")
        except BufferClosed:
            outcome.append("closed")

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # waiting: the buffer is full and untaken
    buffer.close()
    thread.join(5)
    assert outcome == ["closed"]
