"""Tests for VLReach-v0 (renderer, language dependence, expert, env semantics),
the demonstration script and the eval/video CLI.

Statistical checks use a few hundred episodes: the binomial standard deviation
at p = 1/4 and n = 256 is 0.027, so the +-0.08 bands are about 3 sigma.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.envs import VecEnv, make_env
from jaxrl_vla.envs.vl_reach import (
    BACKGROUND_RGB,
    COLOURS,
    COLOUR_RGB,
    EFFECTOR_DOT_RGB,
    EFFECTOR_RGB,
    SHAPES,
    SQUARE_HALF_SIDE,
    VOCAB,
    VLReach,
    expert_action,
    tokenizer,
    word_id,
)
from jaxrl_vla.tasks.demos import expert_act_fn, run_episodes

RED, GREEN, BLUE, YELLOW = range(4)
SQUARE, CIRCLE, TRIANGLE = range(3)


def pixel(x: float, y: float, size: int) -> tuple[int, int]:
    """(row, col) of the pixel containing table point (x, y)."""
    return int(y * size), int(x * size)


def bbox_mask(size: int, centre: tuple[float, float], half: float) -> np.ndarray:
    """Pixels whose centres lie in the square of half-side `half` around `centre`."""
    c = (np.arange(size) + 0.5) / size
    return (np.abs(c[None, :] - centre[0]) <= half) & (np.abs(c[:, None] - centre[1]) <= half)


# ---------------------------------------------------------------- renderer


@pytest.fixture(scope="module")
def scene():
    env = VLReach(num_objects=3, image_size=64, use_depth=True)
    objects = [(0.3, 0.3), (0.7, 0.3), (0.5, 0.72)]
    state = env.state_from_layout(
        objects, [RED, BLUE, GREEN], [SQUARE, CIRCLE, TRIANGLE], target=0, effector=(0.15, 0.85)
    )
    obs = jax.device_get(env.observe(state))
    return env, objects, obs


def test_renderer_puts_each_object_colour_at_its_pixels(scene):
    env, objects, obs = scene
    rgb, size, r = obs["rgb"], env.image_size, env.object_radius
    assert rgb.dtype == np.uint8 and rgb.shape == (size, size, 3)
    for (x, y), colour in zip(objects, [RED, BLUE, GREEN]):
        assert (rgb[pixel(x, y, size)] == COLOUR_RGB[colour]).all()
    # Shape-specific pixels: the square fills its corners, the circle does not,
    # the triangle is wide at its base and narrow near its apex.
    sq, ci, tr = objects
    assert (rgb[pixel(sq[0] - 0.7 * r, sq[1] - 0.7 * r, size)] == COLOUR_RGB[RED]).all()
    assert (rgb[pixel(ci[0] - 0.8 * r, ci[1] - 0.8 * r, size)] == BACKGROUND_RGB).all()
    assert (rgb[pixel(ci[0] - 0.9 * r, ci[1], size)] == COLOUR_RGB[BLUE]).all()
    assert (rgb[pixel(tr[0] - 0.9 * r, tr[1] + 0.8 * r, size)] == COLOUR_RGB[GREEN]).all()
    assert (rgb[pixel(tr[0] - 0.9 * r, tr[1] - 0.8 * r, size)] == BACKGROUND_RGB).all()
    # Areas match the geometry (square of half-side SQUARE_HALF_SIDE r, r circle, 2.2r x 2r triangle)
    # to within the pixel grid.
    areas = {RED: (2 * SQUARE_HALF_SIDE * r) ** 2, BLUE: np.pi * r * r, GREEN: 0.5 * 2.2 * r * 2.0 * r}
    for colour, area in areas.items():
        count = (rgb == COLOUR_RGB[colour]).all(-1).sum()
        assert abs(count - area * size * size) <= 0.2 * area * size * size, (COLOURS[colour], count)


def test_renderer_background_everywhere_else_and_effector_on_top(scene):
    env, objects, obs = scene
    rgb, size = obs["rgb"], env.image_size
    occupied = np.zeros((size, size), bool)
    for centre in objects:
        occupied |= bbox_mask(size, centre, 1.2 * env.object_radius)
    occupied |= bbox_mask(size, (0.15, 0.85), 1.1 * env.effector_radius)
    assert (rgb[~occupied] == BACKGROUND_RGB).all()
    assert (rgb[pixel(0.15, 0.85, size)] == EFFECTOR_DOT_RGB).all()
    assert (rgb[pixel(0.15 + 0.8 * env.effector_radius, 0.85, size)] == EFFECTOR_RGB).all()
    depth = obs["depth"][..., 0]
    assert depth.dtype == np.float32
    assert depth[pixel(*objects[0], size)] == pytest.approx(0.9)
    assert depth[pixel(0.15, 0.85, size)] == pytest.approx(0.8)
    assert (depth[~occupied] == 1.0).all()


# ---------------------------------------------------------------- language dependence and expert


def run_to_goals(env: VLReach, keys: jax.Array, goals: jax.Array) -> np.ndarray:
    """Success of the planner driving episode i to object goals[i] (the target or another)."""

    def episode(key, goal):
        state, _ = env.reset(key)

        def body(carry, _):
            state, done, success = carry
            new, ts = env.step(state, env.expert_action(state, goal))
            ended = (ts.terminated | ts.truncated) & ~done
            success = success | (ended & ts.info["success"])
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), state, new)
            return (state, done | ended, success), None

        (_, _, success), _ = jax.lax.scan(body, (state, False, False), None, length=env.max_episode_steps)
        return success

    return np.asarray(jax.jit(jax.vmap(episode))(keys, goals))


def test_expert_succeeds_and_vision_only_policies_get_about_one_in_k():
    env = VLReach(num_objects=4, image_size=16, max_episode_steps=30)
    n = 256
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    states = jax.device_get(jax.jit(jax.vmap(env.reset))(keys)[0])
    rng = np.random.default_rng(0)
    colour, shape, target = states.object_colour, states.object_shape, states.target
    rows = np.arange(n)

    def random_among(candidates: np.ndarray) -> np.ndarray:
        scores = np.where(candidates, rng.random(candidates.shape), -1.0)
        return scores.argmax(axis=1)

    nearest = np.linalg.norm(states.object_pos - states.effector[:, None], axis=-1).argmin(axis=1)
    same_colour = colour == colour[rows, target][:, None]
    same_shape = shape == shape[rows, target][:, None]
    strategies = {
        "expert": target,
        "random object (no instruction)": rng.integers(0, 4, n),
        "nearest object (no instruction)": nearest,
        "colour word only": random_among(same_colour),
        "shape word only": random_among(same_shape),
    }
    goals = np.concatenate(list(strategies.values())).astype(np.int32)
    success = run_to_goals(env, jnp.tile(keys, (len(strategies), 1)), jnp.asarray(goals)).reshape(len(strategies), n)
    rates = dict(zip(strategies, success.mean(axis=1)))
    assert rates["expert"] >= 0.98, rates
    assert abs(rates["random object (no instruction)"] - 0.25) < 0.08, rates
    assert abs(rates["nearest object (no instruction)"] - 0.25) < 0.08, rates
    # Each object shares its colour with one other object and its shape with another (k = 4): one word is a coin flip.
    assert abs(rates["colour word only"] - 0.5) < 0.1, rates
    assert abs(rates["shape word only"] - 0.5) < 0.1, rates
    # The target is drawn independently of the scene: uniform over object slots.
    assert np.bincount(target, minlength=4).min() > n / 4 * 0.6


def test_module_level_expert_matches_env_method():
    env = VLReach()
    states, _ = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(3), 4))
    np.testing.assert_array_equal(jax.jit(jax.vmap(expert_action))(states), jax.jit(jax.vmap(env.expert_action))(states))


# ---------------------------------------------------------------- env semantics


def test_env_parity_single_vs_vmapped():
    env = VLReach(image_size=32)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    actions = jax.random.uniform(jax.random.PRNGKey(2), (3, 4, 2), minval=-1, maxval=1)
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    batch_state, batch_obs = jax.jit(jax.vmap(env.reset))(keys)
    batch_steps = []
    b_state = batch_state
    for t in range(actions.shape[0]):
        b_state, b_ts = jax.jit(jax.vmap(env.step))(b_state, actions[t])
        batch_steps.append((b_state, b_ts))
    for i, key in enumerate(keys):
        state, obs = reset(key)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b[i]), obs, batch_obs)
        for t in range(actions.shape[0]):
            state, ts = step(state, actions[t, i])
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b[i], atol=1e-6), (state, ts), batch_steps[t])


def test_jit_traces_once():
    env = VLReach(image_size=32)
    traces = {"reset": 0, "step": 0}

    def reset(key):
        traces["reset"] += 1
        return env.reset(key)

    def step(state, action):
        traces["step"] += 1
        return env.step(state, action)

    reset_j, step_j = jax.jit(reset), jax.jit(step)
    for seed in range(3):
        state, _ = reset_j(jax.random.PRNGKey(seed))
        for t in range(2):
            state, _ = step_j(state, jnp.array([0.3 * t - 0.2, 0.5 - seed * 0.1], jnp.float32))
    assert traces == {"reset": 1, "step": 1}


def layout_env_state(env: VLReach, effector, target=0, time=0):
    return env.state_from_layout([(0.5, 0.5), (0.8, 0.8)], [RED, BLUE], [SQUARE, CIRCLE], target, effector, time=time)


def test_touching_the_target_terminates_with_success():
    env = VLReach(num_objects=2)
    state = layout_env_state(env, effector=(0.5, 0.5 + env.touch_radius + 0.03))
    _, ts = jax.jit(env.step)(state, jnp.array([0.0, -1.0]))
    assert bool(ts.terminated) and not bool(ts.truncated)
    assert bool(ts.info["success"]) and not bool(ts.info["wrong_object"])
    assert float(ts.reward) == pytest.approx(env.progress_scale * env.max_speed - env.action_cost + env.success_bonus, abs=1e-4)


def test_touching_another_object_terminates_with_failure():
    env = VLReach(num_objects=2)
    state = layout_env_state(env, effector=(0.5, 0.5 + env.touch_radius + 0.03), target=1)
    _, ts = jax.jit(env.step)(state, jnp.array([0.0, -1.0]))
    assert bool(ts.terminated) and not bool(ts.info["success"]) and bool(ts.info["wrong_object"])
    # No penalty by default (see the module doc): the reward is the step's progress and action cost.
    away = float(jnp.linalg.norm(state.effector - state.object_pos[1]))
    closer = float(jnp.linalg.norm(state.effector + jnp.array([0.0, -env.max_speed]) - state.object_pos[1]))
    assert float(ts.reward) == pytest.approx(env.progress_scale * (away - closer) - env.action_cost, abs=1e-5)
    penalised = VLReach(num_objects=2, wrong_object_penalty=0.7)
    _, ts_penalised = jax.jit(penalised.step)(state, jnp.array([0.0, -1.0]))
    assert float(ts_penalised.reward) == pytest.approx(float(ts.reward) - 0.7, abs=1e-6)


def shortest_path_around_disc(distance_to_centre: float, radius: float) -> float:
    """Length of the shortest path between two points on opposite sides of a disc, both `distance_to_centre`
    from its centre and in line with it: two tangent segments and the arc between them (plane geometry)."""
    tangent = math.sqrt(distance_to_centre**2 - radius**2)
    return 2 * tangent + radius * (math.pi - 2 * math.acos(radius / distance_to_centre))


def test_path_progress_reward_measures_the_route_around_other_objects():
    """progress_distance="path": the distance is the shortest route that keeps clear of the other objects.
    Unblocked it is the straight line; with an object in the way it is the detour around that object's
    keep-out disc (touch radius + the expert's 0.02 margin), within the 8-gon ring's overestimate."""
    path_env = VLReach(num_objects=2, progress_distance="path")
    line_env = VLReach(num_objects=2)
    clear = path_env.state_from_layout([(0.8, 0.5), (0.5, 0.2)], [RED, BLUE], [SQUARE, CIRCLE], 0, (0.2, 0.5))
    assert float(path_env.target_distance(clear)) == pytest.approx(0.6, abs=1e-5)
    blocked = path_env.state_from_layout([(0.8, 0.5), (0.5, 0.5)], [RED, BLUE], [SQUARE, CIRCLE], 0, (0.2, 0.5))
    detour = shortest_path_around_disc(0.3, path_env.touch_radius + 0.02)
    assert detour > 0.65
    assert detour <= float(path_env.target_distance(blocked)) <= 1.02 * detour
    assert float(line_env.target_distance(blocked)) == pytest.approx(0.6, abs=1e-5)
    # The expert's step around the blocker makes more path progress than the step straight at it.
    at_blocker, around = jnp.array([1.0, 0.0]), path_env.expert_action(blocked)
    assert abs(float(around[1])) > 0.3
    path_step = jax.jit(path_env.step)
    assert float(path_step(blocked, around)[1].reward) > float(path_step(blocked, at_blocker)[1].reward) + 0.005
    with pytest.raises(ValueError, match="progress_distance"):
        VLReach(progress_distance="geodesic")


@pytest.mark.parametrize("detour_bias", [0.0, 0.1])
def test_path_progress_rewards_the_expert_step_best(detour_bias):
    """Over random scenes, no step as long as the expert's, in 32 directions, makes more path progress than
    the expert's (it follows the route whose cost the reward measures, detour_bias included), while under
    the line reward some step beats it where the path bends."""
    env = VLReach(progress_distance="path", image_size=16, detour_bias=detour_bias)
    line_env = VLReach(image_size=16)
    angles = 2 * np.pi * np.arange(32) / 32
    directions = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], -1), jnp.float32)

    def rewards(env, state):
        step = lambda a: env.step(state, a)[1].reward  # noqa: E731
        expert = env.expert_action(state)
        return step(expert), jax.vmap(step)(directions * jnp.linalg.norm(expert))  # the box clips a few

    states, _ = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(3), 128))
    expert, others = jax.device_get(jax.jit(jax.vmap(lambda s: rewards(env, s)))(states))
    line_expert, line_others = jax.device_get(jax.jit(jax.vmap(lambda s: rewards(line_env, s)))(states))
    assert (expert >= others.max(axis=1) - 1e-3).mean() >= 0.97  # measured 127/128
    assert (line_expert < line_others.max(axis=1) - 5e-3).sum() >= 3  # measured 4/128 (few paths bend at reset)


def detour_scene(env: VLReach, offset: float):
    """Effector, then a blue circle in the way `offset` below the straight line (image y points down), then
    the red square target, left to right across the table's middle."""
    return env.state_from_layout([(0.85, 0.5), (0.5, 0.5 + offset)], [RED, BLUE], [SQUARE, CIRCLE], 0, (0.15, 0.5))


def test_detour_bias_passes_an_object_in_the_way_on_one_side():
    """Two scenes a hair apart: the shortest path passes the object on opposite sides, the biased expert on the
    same one (the object's right side: below it, heading right) until the other side is shorter by more
    than the bias; the route's cost (the path reward's distance) includes the bias where the route bends left."""
    plain = VLReach(num_objects=2, progress_distance="path")
    biased = VLReach(num_objects=2, progress_distance="path", detour_bias=0.1)
    plan = jax.jit(lambda env, offset: env.target_plan(detour_scene(env, offset)), static_argnums=0)

    def side(env, offset):  # > 0: the first waypoint lies below the line (the traveller's right)
        return float(plan(env, offset).waypoint[1]) - 0.5

    def length(env, offset):
        return float(plan(env, offset).length)

    assert side(plain, 0.01) < 0 < side(plain, -0.01)
    assert side(biased, 0.01) > 0 and side(biased, -0.01) > 0
    assert length(biased, -0.01) == pytest.approx(length(plain, -0.01), abs=1e-6)  # its side is the shortest
    assert length(plain, 0.01) < length(biased, 0.01) < length(plain, 0.01) + 0.1  # the longer side, no bias
    # 0.1 below the line the right side is 0.098 longer: within a bias of 0.1, beyond one of 0.05, where the
    # route bends left and pays the bias.
    assert side(biased, 0.1) > 0 and length(biased, 0.1) < length(plain, 0.1) + 0.1
    small = VLReach(num_objects=2, progress_distance="path", detour_bias=0.05)
    assert side(small, 0.1) < 0
    assert length(small, 0.1) == pytest.approx(length(plain, 0.1) + 0.05, abs=1e-5)
    # The expert drives that route: below the object, to the target.
    state, step = detour_scene(biased, 0.01), jax.jit(biased.step)
    lowest = 0.0
    for _ in range(30):
        state, ts = step(state, biased.expert_action(state))
        lowest = max(lowest, float(state.effector[1]))
        if bool(ts.terminated):
            break
    assert bool(ts.info["success"]) and lowest > 0.6
    with pytest.raises(ValueError, match="detour_bias"):
        VLReach(detour_bias=-0.1)


def test_biased_expert_succeeds_and_keeps_its_side():
    """Random scenes (k = 4): with detour_bias 0.1 the expert still succeeds, and where an object stands in the
    way at reset its first waypoint lies on the line's right far more often than the shortest path's (measured
    on 4,096 scenes: 92% against 50%; expert success 99.1% on 2,048 episodes)."""
    biased = VLReach(num_objects=4, image_size=16, max_episode_steps=50, progress_distance="path", detour_bias=0.1)
    plain = VLReach(num_objects=4, image_size=16, max_episode_steps=50, progress_distance="path")
    keys = jax.random.split(jax.random.PRNGKey(11), 512)
    success = run_to_goals(biased, keys, jax.vmap(lambda k: biased.reset(k)[0].target)(keys))
    assert success.mean() >= 0.97, success.mean()

    def first_leg_goes_right(env, state):
        heading = state.object_pos[state.target] - state.effector
        leg = env.target_plan(state).waypoint - state.effector
        return heading[0] * leg[1] - heading[1] * leg[0] > 0

    for env, low, high in ((plain, 0.35, 0.65), (biased, 0.85, 1.0)):
        states = jax.vmap(lambda k: env.reset(k)[0])(keys)
        blocked = np.asarray(jax.vmap(env.route_detours)(states))
        right = np.asarray(jax.vmap(lambda s: first_leg_goes_right(env, s))(states))
        assert blocked.sum() > 60  # ~21% of scenes
        assert low <= right[blocked].mean() <= high, (env.detour_bias, right[blocked].mean())


def test_detour_margin_keeps_the_route_clear_and_robust_to_noisy_actions():
    """detour_margin: the expert's route keeps half the margin outside the touch radius of the object it goes
    around, and a wider margin is what lets imprecise actions (the expert's plus N(0, 0.3)) still get round
    it (measured on 4,096 episodes: 63% at 0.02, 96% at 0.08 in scenes that start blocked)."""
    def closest_approach(env):
        state, step, closest = detour_scene(env, 0.01), jax.jit(env.step), 1.0
        for _ in range(40):
            state, ts = step(state, env.expert_action(state))
            closest = min(closest, float(jnp.linalg.norm(state.effector - state.object_pos[1])))
            if bool(ts.terminated):
                break
        assert bool(ts.info["success"])
        return closest

    tight, wide = (VLReach(num_objects=2, progress_distance="path", detour_bias=0.1, detour_margin=m) for m in (0.02, 0.08))
    assert tight.touch_radius + 0.01 - 1e-4 <= closest_approach(tight) < tight.touch_radius + 0.04
    assert closest_approach(wide) >= wide.touch_radius + 0.04 - 1e-4

    def blocked_success(env, noise):
        keys = jax.random.split(jax.random.PRNGKey(7), 512)
        rec = jax.jit(lambda k: run_episodes(env, expert_act_fn(env, noise), k))(keys)
        start, _ = jax.vmap(lambda k: env.reset(jax.random.split(k, 2)[0]))(keys)  # run_episodes' resets
        blocked = np.asarray(jax.vmap(env.route_detours)(start))
        return np.asarray(rec["success"] & rec["valid"]).any(axis=1)[blocked].mean()

    tight4, wide4 = (VLReach(num_objects=4, image_size=16, progress_distance="path", detour_bias=0.1, detour_margin=m)
                     for m in (0.02, 0.08))
    assert blocked_success(tight4, 0.3) < 0.8 < 0.9 < blocked_success(wide4, 0.3)
    with pytest.raises(ValueError, match="detour_margin"):
        VLReach(detour_margin=0.0)


def test_time_limit_truncates_without_terminating():
    env = VLReach(num_objects=2, max_episode_steps=10)
    state = layout_env_state(env, effector=(0.1, 0.9), time=8)
    step = jax.jit(env.step)
    state, ts = step(state, jnp.zeros(2))
    assert not bool(ts.truncated) and not bool(ts.terminated)
    _, ts = step(state, jnp.zeros(2))
    assert bool(ts.truncated) and not bool(ts.terminated) and not bool(ts.info["success"])


def test_extra_action_dims_only_cost():
    env = VLReach(action_dim=4, image_size=16)
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0))
    step = jax.jit(env.step)
    moved, ts_plain = step(state, jnp.array([0.5, 0.5, 0.0, 0.0]))
    moved_extra, ts_extra = step(state, jnp.array([0.5, 0.5, 1.0, -1.0]))
    np.testing.assert_array_equal(moved.effector, moved_extra.effector)
    assert float(ts_plain.reward - ts_extra.reward) == pytest.approx(2 * env.action_cost, abs=1e-6)
    assert jax.jit(env.expert_action)(state).shape == (4,)


@pytest.mark.parametrize("limit", ["clip", "scale"])
def test_velocity_limit_moves_the_effector_as_documented(limit):
    """"clip" cuts each axis to [-1, 1] (a command past the box turns toward the diagonal); "scale" shrinks the
    velocity into the box along its own direction (why: the reward then still depends on the direction of a
    policy mean past the box). Inside the box both are the identity; extra entries are clipped either way."""
    env = VLReach(action_dim=3, image_size=16, velocity_limit=limit)
    state = env.state_from_layout([[0.9, 0.9], [0.1, 0.9]], [0, 1], [0, 1], target=0, effector=[0.5, 0.5])
    step = jax.jit(env.step)
    command = np.array([3.0, 1.5, -4.0], np.float32)
    expected = np.array([1.0, 1.0, -1.0]) if limit == "clip" else np.array([1.0, 0.5, -1.0])
    moved, ts = step(state, jnp.asarray(command))
    np.testing.assert_allclose(np.asarray(moved.effector), 0.5 + env.max_speed * expected[:2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ts.obs["proprio"])[2:], expected[:2], atol=1e-6)
    # the extra entry pays the action cost of its clipped value (-4 costs what -1 does)
    _, at_bound = step(state, jnp.asarray([3.0, 1.5, -1.0]))
    assert float(ts.reward) == pytest.approx(float(at_bound.reward), abs=1e-6)
    inside, _ = step(state, jnp.asarray([0.3, -0.6, 0.2]))
    np.testing.assert_allclose(np.asarray(inside.effector), [0.5 + 0.3 * env.max_speed, 0.5 - 0.6 * env.max_speed], atol=1e-6)
    with pytest.raises(ValueError, match="velocity_limit"):
        VLReach(velocity_limit="wrap")


def test_registry_spaces_and_vecenv():
    env = make_env("VLReach-v0", num_objects=3, image_size=32)
    assert env.reports_success and env.max_episode_steps == 50
    venv = VecEnv(env, 3)
    state, obs = jax.jit(venv.reset)(jax.random.PRNGKey(0))
    for key, space in env.observation_space.items():
        assert obs[key].shape == (3,) + tuple(space.shape) and obs[key].dtype == space.dtype, key
    assert set(obs) == {"rgb", "proprio", "language", "language_mask"}
    _, ts = jax.jit(venv.step)(state, jnp.zeros((3, 2)))
    assert ts.info["success"].dtype == jnp.bool_


# ---------------------------------------------------------------- language


def test_env_language_ids_equal_host_tokenizer():
    env = VLReach(num_objects=4, image_size=16)
    tok = env.tokenizer()
    assert tok.vocab[2:] == list(VOCAB) and tok.vocab_size == len(VOCAB) + 2
    assert tokenizer(8).encode(["touch the red square"])[0][0, :4].tolist() == [word_id(w) for w in ["touch", "the", "red", "square"]]
    states, obs = jax.device_get(jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(5), 64)))
    texts = tok.decode(obs["language"], obs["language_mask"])
    ids, mask = tok.encode(texts)
    np.testing.assert_array_equal(ids, obs["language"])
    np.testing.assert_array_equal(mask, obs["language_mask"])
    for i, text in enumerate(texts):
        t = states.target[i]
        assert COLOURS[states.object_colour[i, t]] in text.split() and SHAPES[states.object_shape[i, t]] in text.split()
    assert len(set(texts)) > 10


def test_custom_templates_are_checked():
    env = VLReach(image_size=16, templates=["go to the {shape} that is {colour}"])
    state, _ = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert env.instruction(state).startswith("go to the")
    with pytest.raises(ValueError, match="not in VOCAB"):
        VLReach(templates=["grab the {colour} {shape}"])
    with pytest.raises(ValueError, match="exactly once"):
        VLReach(templates=["touch the {colour} thing"])


# ---------------------------------------------------------------- demonstrations


SMALL_ENV = json.dumps({"image_size": 16, "max_episode_steps": 25})  # shared so compiled programs are reused


def make_demos(path: Path, batch_size: int, noise_std: float = 0.1) -> int:
    from jaxrl_vla.tasks import demos

    return demos.main(["--out", str(path), "--episodes", "5", "--seed", "3", "--env-kwargs", SMALL_ENV,
                       "--batch-size", str(batch_size), "--noise-std", str(noise_std)])


def test_demos_script_is_deterministic_and_has_the_documented_format(tmp_path):
    from jaxrl_vla.tasks.demos import FORMAT_VERSION, load_demos, observation_keys

    assert make_demos(tmp_path / "a.npz", batch_size=3) == 0
    assert make_demos(tmp_path / "b.npz", batch_size=3) == 0
    a, b = load_demos(tmp_path / "a.npz"), load_demos(tmp_path / "b.npz")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    n = len(a["step"])
    expected = {
        "rgb": ((n, 16, 16, 3), np.uint8), "proprio": ((n, 4), np.float32), "language": ((n, 8), np.int32),
        "language_mask": ((n, 8), np.bool_), "action": ((n, 2), np.float32), "executed_action": ((n, 2), np.float32),
        "reward": ((n,), np.float32), "terminated": ((n,), np.bool_), "truncated": ((n,), np.bool_),
        "success": ((n,), np.bool_), "episode_id": ((n,), np.int32), "step": ((n,), np.int32),
        "episode_success": ((5,), np.bool_), "episode_length": ((5,), np.int32), "episode_return": ((5,), np.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert a[key].shape == shape and a[key].dtype == dtype, (key, a[key].shape, a[key].dtype)
    assert observation_keys(a) == ["rgb", "proprio", "language", "language_mask"]
    assert a["env_id"] == "VLReach-v0" and a["env_kwargs"] == VLReach(image_size=16, max_episode_steps=25).config()
    assert VLReach(**a["env_kwargs"]) == VLReach(image_size=16, max_episode_steps=25)
    assert a["vocab"] == tokenizer().vocab and a["seed"] == 3 and a["format_version"] == FORMAT_VERSION
    # Episodes are contiguous and in time order; lengths agree; each ends with termination or truncation.
    np.testing.assert_array_equal(np.bincount(a["episode_id"]), a["episode_length"])
    ends = np.r_[np.nonzero(np.diff(a["episode_id"]))[0], n - 1]
    assert (a["terminated"][ends] | a["truncated"][ends]).all()
    assert (a["step"][ends] == a["episode_length"] - 1).all()
    assert np.abs(a["action"]).max() <= 1.0 and not np.array_equal(a["action"], a["executed_action"])
    assert a["episode_success"].mean() >= 0.8


def test_demos_do_not_depend_on_the_batch_size(tmp_path):
    from jaxrl_vla.tasks.demos import load_demos

    assert make_demos(tmp_path / "c.npz", batch_size=5, noise_std=0.0) == 0
    assert make_demos(tmp_path / "d.npz", batch_size=3, noise_std=0.0) == 0
    c, d = load_demos(tmp_path / "c.npz"), load_demos(tmp_path / "d.npz")
    for key in ("rgb", "action", "episode_id", "reward"):
        np.testing.assert_array_equal(c[key], d[key])
    np.testing.assert_array_equal(c["action"], c["executed_action"])  # no noise: executed = label


def test_run_episodes_returns_the_state_that_ended_each_episode():
    """records["final_state"] is the env state after each episode's last valid step: its observation is
    records["final_obs"], and an expert episode that succeeded ends with the effector touching its target."""
    from jaxrl_vla.tasks.demos import episode_keys, expert_act_fn, run_episodes

    env = VLReach(image_size=16, max_episode_steps=25)
    records = jax.jit(lambda keys: run_episodes(env, expert_act_fn(env), keys))(episode_keys(0, 0, 6))
    final = records["final_state"]
    observed = jax.vmap(env.observe)(final)
    for key in observed:
        np.testing.assert_array_equal(observed[key], records["final_obs"][key], err_msg=key)
    success = np.asarray((records["success"] & records["valid"]).any(axis=1))
    gap = np.linalg.norm(np.asarray(final.effector) - np.asarray(final.object_pos)[np.arange(6), final.target], axis=-1)
    assert success.any()
    assert (gap[success] < env.touch_radius).all()


# ---------------------------------------------------------------- eval / video


def test_eval_expert_writes_a_captioned_gif(tmp_path, capsys):
    from PIL import Image

    from jaxrl_vla import eval as evaluate

    out = tmp_path / "expert.gif"
    assert evaluate.main(["--expert", "--video", str(out), "--episodes", "5", "--env-kwargs", SMALL_ENV]) == 0
    printed = capsys.readouterr().out
    assert "success rate" in printed and "episode 4" in printed
    with Image.open(out) as gif:
        # pillow merges the held (identical) last frames into one longer frame
        assert gif.n_frames >= 4
        assert gif.size == (16 * 16, 16 * 16 + evaluate.CAPTION_HEIGHT)
        first = np.asarray(gif.convert("RGB"))
    assert first[256:].max() > 128, "the caption band has text"
    assert (first[:256:16, ::16] == BACKGROUND_RGB).all(-1).mean() > 0.5, "the frame is the upscaled render"


def test_eval_errors_exit_2(tmp_path):
    from jaxrl_vla import eval as evaluate

    assert evaluate.main(["--run", str(tmp_path / "missing"), "--video", str(tmp_path / "x.gif")]) == 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert evaluate.main(["--run", str(run_dir)]) == 2  # no config.json
    (run_dir / "config.json").write_text(json.dumps({"env": {"name": "VLReach-v0"}}))
    assert evaluate.main(["--run", str(run_dir)]) == 2  # no checkpoint
    assert evaluate.main(["--expert", "--video", str(tmp_path / "x.webm")]) == 2
    assert evaluate.main([]) == 2
    assert not (tmp_path / "x.gif").exists()


def test_scratch_config_builds():
    from jaxrl_vla.build import build_env, build_policy
    from jaxrl_vla.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "vl_reach_scratch.json")
    env = build_env(cfg["env"])
    assert isinstance(env, VLReach)
    build_policy(cfg["policy"], env)


def test_proprio_without_velocity_is_the_effector_position():
    """proprio_velocity=False: proprio is the effector position alone (the last command is not observed), in both
    the space and every observation; the dynamics are unchanged."""
    with_velocity, position_only = VLReach(image_size=16), VLReach(image_size=16, proprio_velocity=False)
    assert position_only.observation_space["proprio"].shape == (2,)
    assert position_only.config()["proprio_velocity"] is False and with_velocity != position_only
    key = jax.random.PRNGKey(3)
    state_a, obs_a = with_velocity.reset(key)
    state_b, obs_b = position_only.reset(key)
    action = jnp.asarray([0.6, -0.3])
    for _ in range(3):
        state_a, step_a = with_velocity.step(state_a, action)
        state_b, step_b = position_only.step(state_b, action)
        np.testing.assert_allclose(step_b.obs["proprio"], 2.0 * np.asarray(state_b.effector) - 1.0, atol=1e-6)
        np.testing.assert_allclose(step_a.obs["proprio"][:2], step_b.obs["proprio"])
        np.testing.assert_allclose(step_a.obs["proprio"][2:], action)  # the default keeps the last command
        assert float(step_a.reward) == float(step_b.reward)


def test_mirrored_state_renders_as_the_mirrored_image():
    """`mirrored` is exact: the mirrored scene's image is the image with its columns reversed (both sizes), and
    the effector and objects sit at x -> 1 - x."""
    for size in (16, 64):
        env = VLReach(image_size=size, use_depth=True)
        state, obs = env.reset(jax.random.PRNGKey(size))
        mirror = env.observe(env.mirrored(state))
        np.testing.assert_array_equal(mirror["rgb"], np.asarray(obs["rgb"])[:, ::-1])
        np.testing.assert_array_equal(mirror["depth"], np.asarray(obs["depth"])[:, ::-1])
        np.testing.assert_allclose(mirror["proprio"][:2], np.asarray(obs["proprio"][:2]) * [-1.0, 1.0], atol=1e-6)


def test_mirror_labels_are_the_experts_in_the_mirrored_scene():
    """collect_demos' mirror_action column: the expert's action in the mirrored scene. For the shortest-path expert
    that is the action with x negated; for the biased one (detour_bias), with an object in the way, it passes the
    object on its own right side of the mirrored route, so it is not -x of the label."""
    from jaxrl_vla.tasks.demos import collect_demos

    plain = VLReach(num_objects=4, image_size=16, progress_distance="path", detour_margin=0.08)
    arrays = collect_demos(plain, 16, 3, 0.1)
    np.testing.assert_allclose(arrays["mirror_action"], arrays["action"] * np.array([-1.0, 1.0]), atol=1e-5)

    biased = VLReach(num_objects=2, image_size=16, progress_distance="path", detour_bias=0.1, detour_margin=0.08)
    # Heading right with a circle 0.01 below the line, the biased expert passes below it (its right side).
    scene = biased.state_from_layout([(0.85, 0.5), (0.5, 0.51)], [0, 2], [0, 1], 0, (0.15, 0.5))
    label = np.asarray(biased.expert_action(scene))
    mirrored_label = np.asarray(biased.demo_augment_labels(scene)["mirror_action"])
    by_hand = biased.state_from_layout([(0.15, 0.5), (0.5, 0.51)], [0, 2], [0, 1], 0, (0.85, 0.5))
    np.testing.assert_allclose(mirrored_label, np.asarray(biased.expert_action(by_hand)), atol=1e-6)
    assert label[1] > 0.3 and mirrored_label[1] < -0.3  # heading left, its right side is above


def test_augment_demonstration_is_the_same_scene_recoloured_or_mirrored():
    """The augmented observation is exactly what the env renders and says for the same scene with the objects'
    colours permuted (found among all 24 permutations), mirrored or not; the label is the expert's action
    there (the mirror label for a mirrored scene). Over many keys both happen and the colours really vary."""
    import itertools

    env = VLReach(image_size=32, proprio_velocity=False, detour_bias=0.1)
    state, obs = env.reset(jax.random.PRNGKey(11))
    state, ts = env.step(state, jnp.asarray([0.3, 0.2]))
    obs = ts.obs
    action = env.expert_action(state)
    labels = env.demo_augment_labels(state)
    augment = jax.jit(env.augment_demonstration)
    colourings, mirrors = set(), []
    for i in range(16):
        out, out_action = augment(jax.random.PRNGKey(i), obs, action, labels)
        found = None
        for perm, mirror in itertools.product(itertools.permutations(range(len(COLOURS))), (False, True)):
            scene = state.replace(object_colour=jnp.asarray(perm, jnp.int32)[state.object_colour])
            expected = env.observe(env.mirrored(scene) if mirror else scene)
            if all(np.array_equal(out[k], expected[k]) for k in ("rgb", "language", "language_mask")) and \
                    np.allclose(out["proprio"], expected["proprio"], atol=1e-6):
                found = (tuple(np.asarray(perm)[np.asarray(state.object_colour)]), mirror)
                break
        assert found is not None, f"key {i}: the augmented observation is no recolouring/mirroring of the scene"
        np.testing.assert_allclose(out_action, labels["mirror_action"] if found[1] else action, atol=1e-6)
        colourings.add(found[0])
        mirrors.append(found[1])
    assert len(colourings) > 3 and 0 < sum(mirrors) < len(mirrors)
