"""`python -m jaxrl_vla.eval --run RUN_DIR [--video]` on every kind of env: returns printed, videos drawn.

Each run is a real (tiny: 2 iterations of 32 steps) training run made by `jaxrl_vla.train`'s main in this
process, so eval reads what training writes (config.json, checkpoints/). The renderers of
jaxrl_vla.envs.render are checked against the scene's geometry computed here.
"""

import json
import re

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxrl_vla import eval as evaluate
from jaxrl_vla import train
from jaxrl_vla.envs import cartpole, pendulum, render

TINY = {
    "trainer": {"buffer_size": 16, "num_envs": 2, "iterations": 2, "eval_freq": 0, "save_freq": 0, "seed": 0},
    "algorithm": {"name": "ppo", "cfg": {"learning_rate": 1e-3, "n_epochs": 1, "batch_size": 16}},
    "policy": {"name": "actor_critic", "hidden_sizes": [16]},
}

DOT_ID, DOT_NO_RENDER_ID = "JaxrlVlaTestDot-v0", "JaxrlVlaTestDotNoRender-v0"
DOT_RGB, DOT_BACKGROUND = (230, 40, 40), (30, 30, 60)


class DotEnv(gym.Env):
    """A gymnasium env whose rgb_array render needs no pygame: a dot walking along a line to either end."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.pos = 0.0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = float(self.np_random.uniform(-0.3, 0.3))
        return np.asarray([self.pos], np.float32), {}

    def step(self, action):
        self.pos += 0.25 if int(action) == 1 else -0.25
        done = abs(self.pos) >= 1.0
        return np.asarray([np.clip(self.pos, -1, 1)], np.float32), 1.0 - abs(self.pos), done, False, {}

    def render(self):
        frame = np.zeros((24, 40, 3), np.uint8) + np.asarray(DOT_BACKGROUND, np.uint8)
        col = int(round((np.clip(self.pos, -1, 1) + 1) / 2 * 35))
        frame[10:14, col : col + 4] = DOT_RGB
        return frame


class DotEnvNoRender(DotEnv):
    metadata = {"render_modes": [], "render_fps": 10}


for _id, _cls in ((DOT_ID, DotEnv), (DOT_NO_RENDER_ID, DotEnvNoRender)):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls, max_episode_steps=12)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


_made: dict[str, object] = {}


def make_run(runs_dir, name: str, env: dict):
    """A trained run directory of `env` (made once per module)."""
    if name not in _made:
        cfg = json.loads(json.dumps(TINY))
        cfg["env"] = env
        cfg["trainer"].update(exp_name=name, output_dir=str(runs_dir))
        path = runs_dir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert train.main(["--config", str(path), "--no-progress"]) == 0
        (run,) = runs_dir.glob(f"{name}-*")
        _made[name] = run
    return _made[name]


def printed_returns(out: str) -> list[tuple[float, int]]:
    """(return, length) of each episode line the CLI printed."""
    return [(float(r), int(n)) for r, n in re.findall(r"episode \d+: return ([-+0-9.]+)\s+length (\d+)", out)]


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


def has_colour(image: np.ndarray, rgb, tolerance: int = 12) -> bool:
    return bool((np.abs(image.astype(int) - np.asarray(rgb)).max(-1) <= tolerance).any())


# ---------------------------------------------------------------- renderers, against the scene's geometry


def test_cartpole_render_puts_cart_and_pole_where_the_state_says():
    x_pos, theta = 1.0, 0.3
    state = cartpole.CartPoleState(x=jnp.asarray([x_pos]), x_dot=jnp.zeros(1), theta=jnp.asarray([theta]),
                                   theta_dot=jnp.zeros(1), time=jnp.zeros(1, jnp.int32))
    (frame,) = np.asarray(render.render_cartpole(state))
    assert frame.shape == (160, 240, 3) and frame.dtype == np.uint8
    # the track fills the width: x = +-2.4 m are the image's edges, so 1 m is 50 px right of the centre
    cart_col = 120 + 50 * x_pos
    cart = np.argwhere((frame == 0).all(-1) & (np.abs(np.arange(160)[:, None] - 120) <= 6)[:, :1].repeat(240, 1)
                       & (np.abs(np.arange(240)[None] + 0.5 - cart_col) <= 10.5))
    assert len(cart) > 150, "a 20 x 12 px cart at the state's x"
    pole = np.argwhere((frame == render.POLE_RGB).all(-1))
    # the pole runs from the axle (3 px above the cart's centre) 50 px long (1 m) leaning right by theta
    tip = np.asarray([117 - 50 * np.cos(theta), cart_col + 50 * np.sin(theta)])
    assert np.abs(pole - tip).sum(-1).min() <= 3, "the pole reaches the tip computed from theta"
    assert (pole[:, 1] >= cart_col - 3).all(), "theta > 0 leans right"
    # batched states of any leading shape draw the same pictures
    many = cartpole.CartPoleState(x=jnp.full((2, 3), x_pos), x_dot=jnp.zeros((2, 3)), theta=jnp.full((2, 3), theta),
                                  theta_dot=jnp.zeros((2, 3)), time=jnp.zeros((2, 3), jnp.int32))
    frames = np.asarray(render.render_cartpole(many))
    assert frames.shape == (2, 3, 160, 240, 3) and (frames == frame).all()


def test_pendulum_render_points_the_rod_by_the_angle():
    states = pendulum.PendulumState(th=jnp.asarray([0.0, np.pi / 2]), thdot=jnp.zeros(2), time=jnp.zeros(2, jnp.int32))
    up, left = np.asarray(render.render_pendulum(states))
    rod = render.ROD_RGB
    reach = int(0.9 * render.ROD_LENGTH)
    assert (up[80 - reach, 80] == rod).all() and (up[80 + reach, 80] != rod).any(), "th = 0: upright"
    # gymnasium draws th counter-clockwise: a quarter turn points the rod left
    assert (left[80, 80 - reach] == rod).all() and (left[80, 80 + reach] != rod).any()


# ---------------------------------------------------------------- eval --run on every env


def test_cartpole_returns_and_video(runs_dir, tmp_path, capsys):
    run = make_run(runs_dir, "cartpole", {"name": "CartPole-v1", "max_episode_steps": 20})
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "3"]) == 0
    episodes = printed_returns(capsys.readouterr().out)
    assert len(episodes) == 3
    assert all(ret == length and 1 <= length <= 20 for ret, length in episodes), "CartPole pays 1 per step"
    video = tmp_path / "cartpole.gif"
    assert evaluate.main(["--run", str(run), "--episodes", "2", "--video", str(video)]) == 0
    assert "wrote" in capsys.readouterr().out
    frames = gif_frames(video)
    assert frames[0].shape == (160 + evaluate.CAPTION_HEIGHT, 240, 3)
    assert has_colour(frames[0][:160], render.POLE_RGB) and has_colour(frames[0][:160], render.AXLE_RGB)


def test_pendulum_returns_and_video(runs_dir, tmp_path, capsys):
    run = make_run(runs_dir, "pendulum", {"name": "Pendulum-v1", "max_episode_steps": 15})
    video = tmp_path / "pendulum.gif"
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "2", "--video", str(video)]) == 0
    episodes = printed_returns(capsys.readouterr().out)
    assert [length for _, length in episodes] == [15, 15], "Pendulum never ends before its time limit"
    assert all(ret < 0 for ret, _ in episodes), "Pendulum's reward is minus a cost"
    frames = gif_frames(video)
    assert frames[0].shape == (160 + evaluate.CAPTION_HEIGHT, 160, 3) and has_colour(frames[0][:160], render.ROD_RGB)


def test_gymnasium_env_returns_and_rendered_video(runs_dir, tmp_path, capsys):
    """A host env through the gymnasium adapter, its frames from render_mode="rgb_array"."""
    run = make_run(runs_dir, "dot", {"name": f"gymnasium:{DOT_ID}"})
    video = tmp_path / "dot.gif"
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "3", "--seed", "5", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    episodes = printed_returns(out)
    assert len(episodes) == 3 and all(1 <= length <= 12 for _, length in episodes)
    assert "success" not in out, "its infos carry no success: none is made up"
    # the episodes are gymnasium's own: replay each with the policy's actions in a fresh env and compare
    loaded = evaluate.load_run(run)
    act = evaluate.host_policy_act_fn(loaded.policy, loaded.params, loaded.obs_stats)
    import jax

    for i, (ret, length) in enumerate(episodes):
        env = gym.make(DOT_ID)
        obs, _ = env.reset(seed=5 + i)
        total, steps, done = 0.0, 0, False
        while not done:
            action = act(obs[None], jax.random.PRNGKey(0))[0, 0]
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total, steps, done = total + reward, steps + 1, terminated or truncated
        assert (round(total, 3), steps) == (round(ret, 3), length)
    frames = gif_frames(video)
    scale = 256 // 40
    assert frames[0].shape == (24 * scale + evaluate.CAPTION_HEIGHT, 40 * scale, 3)
    assert has_colour(frames[0][: 24 * scale], DOT_RGB) and has_colour(frames[0][: 24 * scale], DOT_BACKGROUND)
    # the video's frame count: every step plus the final frame of each episode (held a little)
    assert len(frames) >= sum(length for _, length in episodes) // 2


def test_env_that_cannot_render_evaluates_and_refuses_only_video(runs_dir, tmp_path, capsys):
    run = make_run(runs_dir, "dot", {"name": f"gymnasium:{DOT_ID}"})
    # the same spaces without an rgb_array render mode: the checkpoint loads, the frames cannot be made
    blind = tmp_path / "blind"
    blind.mkdir()
    config = json.loads((run / "config.json").read_text())
    config["env"]["name"] = f"gymnasium:{DOT_NO_RENDER_ID}"
    (blind / "config.json").write_text(json.dumps(config))
    (blind / "checkpoints").symlink_to(run / "checkpoints")
    capsys.readouterr()
    assert evaluate.main(["--run", str(blind), "--episodes", "2"]) == 0
    assert len(printed_returns(capsys.readouterr().out)) == 2
    video = tmp_path / "blind.gif"
    assert evaluate.main(["--run", str(blind), "--episodes", "2", "--video", str(video)]) == 2
    err = capsys.readouterr().err
    assert "cannot render" in err and DOT_NO_RENDER_ID in err and len(err.strip().splitlines()) == 1
    assert not video.exists()


def test_gymnasium_cartpole_returns_and_video_or_a_clear_error(runs_dir, tmp_path, capsys):
    """gymnasium's own CartPole: eval always; its video needs pygame (gymnasium[classic-control])."""
    run = make_run(runs_dir, "gym_cartpole", {"name": "gymnasium:CartPole-v1", "max_episode_steps": 20})
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "2"]) == 0
    episodes = printed_returns(capsys.readouterr().out)
    assert len(episodes) == 2 and all(ret == length <= 20 for ret, length in episodes)
    video = tmp_path / "gym_cartpole.gif"
    code = evaluate.main(["--run", str(run), "--episodes", "1", "--video", str(video)])
    try:
        import pygame  # noqa: F401
    except ImportError:
        assert code == 2 and "pygame" in capsys.readouterr().err and not video.exists()
    else:
        assert code == 0 and len(gif_frames(video)) >= 2


@pytest.mark.slow  # ~20 s on 2 cores: a VLReach training run and its rgb video
def test_vl_reach_returns_success_and_video(runs_dir, tmp_path, capsys):
    run = make_run(runs_dir, "vl_reach", {"name": "VLReach-v0", "image_size": 16, "max_episode_steps": 10})
    video = tmp_path / "reach.gif"
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "2", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    assert len(printed_returns(out)) == 2 and "success rate" in out
    frames = gif_frames(video)
    assert frames[0].shape == (256 + evaluate.CAPTION_HEIGHT, 256, 3)


def test_frame_source_names_each_kind():
    from jaxrl_vla.envs.host import make_gymnasium_env
    from jaxrl_vla.envs.vl_reach import VLReach

    assert evaluate.frame_source(VLReach(image_size=16)).path == ("rgb",)
    assert evaluate.frame_source(cartpole.CartPole()).kind == "state"
    assert evaluate.frame_source(make_gymnasium_env(DOT_ID)).kind == "gymnasium"
    # nested image observations (TorchRL's "pixels" under a sub-dict), channel-first floats included
    from jaxrl_vla.envs.base import Box

    space = {"state": Box(-1.0, 1.0, (4,)), "agent": {"pixels": Box(0.0, 1.0, (3, 32, 32))}}
    assert evaluate.image_path(space) == ("agent", "pixels")
    chw = np.full((2, 3, 32, 32), 0.5, np.float32)
    assert render.to_rgb_uint8(chw).shape == (2, 32, 32, 3) and (render.to_rgb_uint8(chw) == 128).all()


@pytest.mark.slow  # imports torch
def test_tensordict_env_with_pixels_returns_success_and_video(runs_dir, tmp_path, capsys):
    """A torch (seed-contract TensorDict) host env through the bridge: frames from its uint8 rgb observation."""
    pytest.importorskip("torch")
    pytest.importorskip("tensordict")
    env = {"name": "bridge.testing_envs:make_target_reach", "type": "tensordict", "image_size": 8,
           "max_episode_steps": 6}
    run = make_run(runs_dir, "target_reach", env)
    video = tmp_path / "reach_td.gif"
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--episodes", "2", "--video", str(video)]) == 0
    out = capsys.readouterr().out
    episodes = printed_returns(out)
    assert len(episodes) == 2 and all(1 <= length <= 6 for _, length in episodes) and "success rate" in out
    frames = gif_frames(video)
    assert frames[0].shape == (8 * 32 + evaluate.CAPTION_HEIGHT, 8 * 32, 3)
    assert len(frames) >= 2


def test_success_per_instruction_matches_the_episode_lines(capsys):
    """The per-instruction table (a task each on Meta-World) tallies the printed episodes, none lost."""
    kwargs = json.dumps({"image_size": 16, "max_episode_steps": 25})
    assert evaluate.main(["--expert", "--episodes", "8", "--env-kwargs", kwargs]) == 0
    out = capsys.readouterr().out
    episodes = re.findall(r"episode \d+: .*  (success|failure)  (.+)", out)
    assert len(episodes) == 8
    expected: dict[str, list[int]] = {}
    for result, instruction in episodes:
        expected.setdefault(instruction, []).append(result == "success")
    table = dict((instr, (int(w), int(n))) for w, n, instr in re.findall(r"\((\d+)/(\d+)\)  (.+)", out))
    assert table == {k: (sum(v), len(v)) for k, v in expected.items()}
    assert len(table) > 1 and sum(n for _, n in table.values()) == 8


def test_success_by_instruction_skips_episodes_without_success_or_instruction():
    ep = lambda success, instruction: evaluate.Episode(None, np.zeros(3), success, instruction)  # noqa: E731
    tally = evaluate.success_by_instruction([ep(True, "b"), ep(False, "a"), ep(True, "a"), ep(None, "a"), ep(True, "")])
    assert tally == {"a": (1, 2), "b": (1, 1)} and list(tally) == ["a", "b"]
