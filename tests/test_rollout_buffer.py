"""RolloutBuffer: [T, N] layout, add/get/is_full/clear, shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.buffer import RolloutBuffer
from jaxrl_vla.buffer import rollout as rb


def step(t, n=3):
    return {"obs": jnp.full((n, 2), float(t)), "reward": jnp.arange(n, dtype=jnp.float32) + 10 * t}


def test_add_whole_rollout_then_get_flat_and_unflat():
    buf = RolloutBuffer(step(0), num_steps=4)
    assert not buf.is_full() and len(buf) == 0
    rollout = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[step(t) for t in range(4)])
    buf.add(rollout)
    assert buf.is_full()
    flat = buf.get(flatten=True)
    assert flat["obs"].shape == (12, 2)
    # row-major [T, N] -> [T*N]: index t*N + n
    np.testing.assert_array_equal(np.asarray(flat["reward"]), np.concatenate([np.arange(3) + 10 * t for t in range(4)]))
    assert buf.get(flatten=False)["obs"].shape == (4, 3, 2)
    buf.clear()
    assert not buf.is_full() and len(buf) == 0


def test_add_step_by_step_until_full_then_writes_are_dropped():
    buf = RolloutBuffer(step(0), num_steps=3)
    for t in range(3):
        buf.add(step(t + 1))
    assert buf.is_full()
    buf.add(step(99))  # beyond capacity: ignored, nothing overwritten
    np.testing.assert_array_equal(np.asarray(buf.get(flatten=False)["obs"][:, 0, 0]), [1, 2, 3])


def test_pure_functions_jit_with_donation():
    state = rb.init(step(0), 2)
    add_step = jax.jit(rb.add_step, donate_argnums=0)
    state = add_step(state, step(5))
    state = add_step(state, step(6))
    assert bool(rb.is_full(state))
    assert rb.get(state)["obs"].shape == (6, 2)
    assert not bool(rb.is_full(rb.clear(state)))


def test_wrong_shapes_and_dtypes_name_the_field():
    buf = RolloutBuffer(step(0), num_steps=2)
    with pytest.raises(ValueError, match=r"\['obs'\] has shape \(3, 5\)"):
        buf.add({"obs": jnp.zeros((3, 5)), "reward": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"\['reward'\].*int32"):
        buf.add({"obs": jnp.zeros((3, 2)), "reward": jnp.zeros(3, jnp.int32)})
