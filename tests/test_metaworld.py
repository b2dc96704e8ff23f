"""Meta-World host env (jaxrl_vla.envs.metaworld): the MT10 smoke test CI runs, and its bad-input errors.

Skipped only when metaworld is not installed (the [metaworld] extra, which CI installs).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: the reference renderer reads it

import numpy as np
import pytest

pytest.importorskip("metaworld", reason="Meta-World is not installed: pip install -e '.[metaworld]'")

import mujoco  # noqa: E402

from jaxrl_vla import envs  # noqa: E402
from jaxrl_vla.build import build_env  # noqa: E402
from jaxrl_vla.config import ConfigError  # noqa: E402
from jaxrl_vla.envs import metaworld_render  # noqa: E402
from jaxrl_vla.envs.metaworld import INSTRUCTIONS, VOCAB, MetaWorldEnv  # noqa: E402

TASKS = ["reach-v3", "drawer-open-v3"]
SIZE = 64


@pytest.fixture(scope="module")
def spec() -> MetaWorldEnv:
    return MetaWorldEnv("MT10", tasks=TASKS, image_size=SIZE, max_episode_steps=40, state_obs=True)


def reference_frame(model, data, camera: str) -> np.ndarray:
    """The same camera through mujoco's own Renderer (top row first), shadows and reflections off as ours."""
    with mujoco.Renderer(model, SIZE, SIZE) as renderer:
        renderer.update_scene(data, camera=camera)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return renderer.render().copy()


def test_mt10_smoke_two_tasks_two_episodes(spec):
    vec = spec.make(2, seed=0)
    try:
        obs = vec.reset()
        space = spec.observation_space
        tok = spec.tokenizer()
        episodes = dict.fromkeys(TASKS, 0)  # finished episodes per task
        time = np.zeros(2, int)
        seen_tasks = set()
        for _ in range(8 * spec.max_episode_steps):
            for key, box in space.items():
                assert obs[key].shape == (2,) + box.shape and obs[key].dtype == box.dtype, key
            assert obs["rgb"].std() > 10  # a picture, not a blank buffer
            # the instruction ids decode to the sentence of the copy's current task
            assert tok.decode(obs["language"], obs["language_mask"]) == [INSTRUCTIONS[t] for t in vec.task_names()]
            seen_tasks.update(vec.task_names())
            np.testing.assert_allclose(obs["proprio"], obs["state"][:, :4])
            tasks_before = vec.task_names()
            obs, reward, terminated, truncated, info = vec.step(vec.expert_actions())
            time += 1
            assert reward.dtype == np.float32 and reward.shape == (2,)
            np.testing.assert_array_equal(info["success"], terminated)  # episodes end on success
            np.testing.assert_array_equal(truncated, time >= spec.max_episode_steps)  # or at the step limit
            assert [spec.task_names[i] for i in info["task_id"]] == tasks_before
            done = terminated | truncated
            for i in np.flatnonzero(done):  # the final observation is the episode's, obs already the next one's
                assert not np.array_equal(info["final_obs"]["proprio"][i], obs["proprio"][i])
                episodes[tasks_before[i]] += 1
            time[done] = 0
            if min(episodes.values()) >= 2:
                break
        assert min(episodes.values()) >= 2, episodes
        assert seen_tasks == set(TASKS)
        # seeded reset: equal seeds, equal episodes
        first = vec.reset(seed=5)
        again = vec.reset(seed=5)
        for key in first:
            np.testing.assert_array_equal(first[key], again[key])
    finally:
        vec.close()


def test_image_is_upright_and_matches_mujoco_renderer(spec):
    """Meta-World's corner cameras are rolled 180 degrees: our frame is mujoco's frame rotated back."""
    vec = spec.make(1, seed=1)
    try:
        obs = vec.reset()
        copy = vec._copies[0]
        model, data = copy.env.model, copy.env.data
        cam = metaworld_render.camera_id(model, "corner")
        assert metaworld_render.camera_is_rolled(data, cam)
        assert not metaworld_render.camera_is_rolled(data, metaworld_render.camera_id(model, "topview"))
        raw = reference_frame(model, data, "corner")
        np.testing.assert_array_equal(obs["rgb"][0], np.rot90(raw, 2))
        assert not np.array_equal(obs["rgb"][0], raw[::-1])  # a rotation, not a vertical flip (a mirror)
    finally:
        vec.close()


def test_two_envs_in_one_process_render_their_own_frames():
    reach = MetaWorldEnv("MT10", tasks=["reach-v3"], image_size=SIZE).make(1, seed=0)
    drawer = MetaWorldEnv("MT10", tasks=["drawer-open-v3"], image_size=SIZE).make(1, seed=0)
    try:
        reach.reset()
        drawer.reset()
        for _ in range(3):  # interleaved: each step renders after the other env's context was current
            a = reach.step(reach.expert_actions())[0]["rgb"][0]
            b = drawer.step(drawer.expert_actions())[0]["rgb"][0]
        assert not np.array_equal(a, b)
        for vec, frame in ((reach, a), (drawer, b)):
            copy = vec._copies[0]
            np.testing.assert_array_equal(frame, np.rot90(reference_frame(copy.env.model, copy.env.data, "corner"), 2))
    finally:
        reach.close()
        drawer.close()


def test_env_reset_in_one_thread_renders_in_another(spec):
    """The async trainer resets in the main thread and steps in a collector thread (EGL contexts are per thread)."""
    import threading

    vec = spec.make(1, seed=2)
    try:
        vec.reset()
        frames: list = []
        worker = threading.Thread(target=lambda: frames.append(vec.step(np.zeros((1, 4)))[0]["rgb"][0]))
        worker.start()
        worker.join()
        assert len(frames) == 1, "stepping in another thread raised"
        copy = vec._copies[0]
        np.testing.assert_array_equal(frames[0], np.rot90(reference_frame(copy.env.model, copy.env.data, "corner"), 2))
    finally:
        vec.close()


def test_expert_succeeds_on_reach_within_the_step_limit():
    spec = envs.make_env("metaworld:reach-v3", camera=None, max_episode_steps=150, state_obs=True)
    vec = spec.make(1, seed=0)
    try:
        vec.reset()
        successes = 0
        for _ in range(2 * spec.max_episode_steps):
            _, _, terminated, truncated, info = vec.step(vec.expert_actions())
            if terminated[0] or truncated[0]:
                assert terminated[0] and info["success"][0] and not truncated[0], "the reach expert ran out of steps"
                final = info["final_obs"]["state"][0]
                assert np.linalg.norm(final[:3] - final[-3:]) < 0.1  # the hand is at the goal (Meta-World's check: 5 cm)
                successes += 1
                if successes == 2:
                    break
        assert successes == 2
    finally:
        vec.close()


def test_config_builds_the_env_and_checks_keys():
    env = build_env({"name": "metaworld:MT10", "tasks": ["reach-v3"], "camera": None})
    assert env.is_host_env and env.task_names == ["reach-v3"] and "rgb" not in env.observation_space
    with pytest.raises(ConfigError, match="env.camra: unknown key; did you mean 'camera'"):
        build_env({"name": "metaworld:MT10", "camra": "corner"})
    with pytest.raises(ConfigError, match="reach-v3"):
        build_env({"name": "metaworld:MT10", "tasks": ["reach-v2"]})


# ---------------------------------------------------------------------------- bad input


def test_unknown_task_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown Meta-World benchmark or task 'drawer-opn-v3'; closest: drawer-open-v3"):
        MetaWorldEnv("drawer-opn-v3")
    with pytest.raises(ValueError, match=r"'MT11'; closest: MT10"):
        MetaWorldEnv("MT11")
    with pytest.raises(ValueError, match=r"env.tasks: unknown task 'reach-v2' in MT10; closest: reach-v3"):
        MetaWorldEnv("MT10", tasks=["reach-v2"])


def test_unknown_camera_lists_the_cameras():
    with pytest.raises(ValueError, match=r"unknown camera 'cornr'; this model's cameras are topview, corner, .*gripperPOV"):
        MetaWorldEnv("MT10", tasks=["reach-v3"], camera="cornr")


def test_rendering_that_cannot_start_names_backends_and_packages(monkeypatch):
    monkeypatch.setattr(metaworld_render, "_context_class", None)
    monkeypatch.setitem(metaworld_render.GL_BACKENDS, "egl", ("jaxrl_vla_no_such_egl", "Debian packages libegl1 libegl-mesa0"))
    monkeypatch.setitem(metaworld_render.GL_BACKENDS, "osmesa", ("jaxrl_vla_no_such_osmesa", "Debian package libosmesa6"))
    with pytest.raises(metaworld_render.RenderError) as err:
        metaworld_render.gl_context_class(("egl", "osmesa"))
    message = str(err.value)
    for part in ("MUJOCO_GL=egl", "libegl1", "MUJOCO_GL=osmesa", "libosmesa6", "set MUJOCO_GL"):
        assert part in message
    assert metaworld_render.backend_order({"MUJOCO_GL": "osmesa"}) == ("osmesa",)
    assert metaworld_render.backend_order({}) == ("egl", "osmesa")


def test_instruction_word_outside_the_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"instruction for 'reach-v3' \('touch the goal'\) has the word 'touch'"):
        MetaWorldEnv("MT10", tasks=["reach-v3"], camera=None, instructions={"reach-v3": "touch the goal"}, vocab=VOCAB)
    # without a fixed vocabulary the new words join it
    spec = MetaWorldEnv("MT10", tasks=["reach-v3"], camera=None, instructions={"reach-v3": "touch the goal"})
    ids, mask = spec.tokenizer().encode(["touch the goal"])
    np.testing.assert_array_equal(spec.language_ids[0], ids[0])
    with pytest.raises(ValueError, match=r"'pick-place-v3' \('pick up the puck and place it at the goal'\) has 10 words > 4"):
        MetaWorldEnv("MT10", tasks=["pick-place-v3"], camera=None, instruction_length=4)


# ---------------------------------------------------------------------------- demonstrations


def test_expert_demonstrations_with_dart_noise_round_trip(tmp_path):
    from jaxrl_vla.tasks.demos import as_demonstrations, load_demos, save_demos
    from jaxrl_vla.tasks.metaworld_demos import collect_metaworld_demos, per_task_success

    spec = MetaWorldEnv("MT10", tasks=["reach-v3"], image_size=SIZE, max_episode_steps=150)
    arrays = collect_metaworld_demos(spec, episodes_per_task=1, seed=3, noise_std=0.2)
    again = collect_metaworld_demos(spec, episodes_per_task=1, seed=3, noise_std=0.2)
    for key in arrays:  # a function of the seed alone
        np.testing.assert_array_equal(arrays[key], again[key], err_msg=key)
    assert per_task_success(arrays, spec.task_names) == {"reach-v3": 1.0}
    n = len(arrays["action"])
    assert arrays["episode_length"].tolist() == [n] and arrays["step"].tolist() == list(range(n))
    assert arrays["terminated"][-1] and arrays["success"][-1] and not arrays["terminated"][:-1].any()
    # executed = clip(label + N(0, 0.2^2)): the noise is there, and only where the clip allows
    inside = np.abs(arrays["executed_action"]) < 1.0
    noise = (arrays["executed_action"] - arrays["action"])[inside]
    assert 0.15 < noise.std() < 0.25
    path = save_demos(tmp_path / "mt.npz", arrays, "metaworld:MT10", spec.config(), spec.tokenizer().vocab, 3, 0.2)
    demos = load_demos(path)
    rebuilt = envs.make_env(demos["env_id"], **demos["env_kwargs"])
    pairs = as_demonstrations(demos, rebuilt)  # shapes, dtypes and vocabulary match the env's
    assert pairs.obs["rgb"].shape == (n, SIZE, SIZE, 3) and pairs.action.shape == (n, 4)
