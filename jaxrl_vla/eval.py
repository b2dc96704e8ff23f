"""`python -m jaxrl_vla.eval --run RUN_DIR [--video out.gif]`: watch what a policy does.

Loads a run directory (its config.json and latest checkpoint), runs
deterministic evaluation episodes of its env, prints each episode's return (and
success, where the env reports it) and, with --video, writes a video: each
frame scaled up (nearest neighbour, so pixels stay crisp) with the instruction
and the step's running return written underneath. `--expert` records the env's
scripted expert instead of a policy (no run needed; handy for docs).

    python -m jaxrl_vla.eval --run runs/cartpole-20250101-120000
    python -m jaxrl_vla.eval --run runs/vl_reach_scratch-20250101-120000 --video out.gif
    python -m jaxrl_vla.eval --expert --video expert.gif --episodes 4
    python -m jaxrl_vla.eval --expert --env VLReach-v0 --env-kwargs '{"num_objects": 3}' --video x.mp4

Every env evaluates (JAX envs in one jitted scan, host envs -- gymnasium,
TorchRL, Meta-World -- stepped on the host). Where the frames come from
(`frame_source`): an image observation (VLReach's and Meta-World's `rgb`,
TorchRL `pixels`), a drawing of the state (JAX CartPole and Pendulum,
`jaxrl_vla.envs.render`), or gymnasium's `render_mode="rgb_array"`. An env
with none of these evaluates, and fails only when --video is asked.

GIFs are written with pillow; .mp4 needs imageio with imageio-ffmpeg.
Exit codes: 0 done, 2 bad arguments or an unusable run (missing directory,
config or checkpoint; --video for an env that cannot render), nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

CAPTION_HEIGHT = 40
HOLD_FRAMES = 6  # extra copies of an episode's last frame, so the outcome is readable
HOLD_SECONDS = 0.75  # ... and at least this long at fast frame rates


class EvalError(Exception):
    """A problem the user can fix (bad path, missing checkpoint); exit code 2."""


@dataclass
class Episode:
    """One recorded episode: per-step rewards [T] and, when a video is made, frames uint8 [T+1, H, W, 3]
    (the observation each action was taken from, then the one that ended the episode)."""

    frames: np.ndarray | None
    rewards: np.ndarray
    success: bool | None
    instruction: str

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())


@dataclass
class LoadedRun:
    """What evaluation needs from a run directory."""

    config: dict
    env: Any
    policy: Any
    params: Any
    obs_stats: Any
    iteration: int


# ---------------------------------------------------------------------------- loading


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run's env and policy (rebuilt from config.json) and its latest checkpoint's parameters.

    The checkpoint is restored without a template (orbax returns the saved
    tree as dicts), so this works for any trainer that checkpoints a state
    with `params` and `obs_stats`, whatever its optimiser or env state.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"--run {run_dir}: no such directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise EvalError(f"--run {run_dir}: no config.json (is it a run directory made by jaxrl_vla.train?)")
    checkpoints = run_dir / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise EvalError(f"--run {run_dir}: no checkpoint in {checkpoints} (training saves one at the end)")
    from jaxrl_vla.build import build_env, build_policy
    from jaxrl_vla.config import ConfigError, resolve

    try:
        config = resolve(json.loads(config_path.read_text()))
        env = build_env(config["env"])
        policy, _, _ = build_policy(config["policy"], env)
    except (ConfigError, ValueError) as err:
        raise EvalError(f"--run {run_dir}: its config cannot be rebuilt: {err}") from None
    state, iteration = restore_latest(checkpoints)
    return LoadedRun(config, env, policy, state["params"], stats_from_dict(state.get("obs_stats")), iteration)


def restore_latest(directory: Path) -> tuple[dict, int]:
    """The latest checkpoint's state as a dict tree, and its iteration (read-only access)."""
    import logging

    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns that read-only mode is read-only
    manager = ocp.CheckpointManager(
        directory.absolute(),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise EvalError(f"no checkpoint in {directory}")
        # onto this process's first device, whatever mesh the run trained on (trainer.cpu_devices, GPUs):
        # without a target orbax insists on the saved topology
        here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here),
                                        manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    finally:
        manager.close()
    return restored.state, int(step)


def stats_from_dict(stats: Any) -> Any:
    """Observation-normaliser statistics back into a RunningStats (None when the run had none)."""
    if stats is None:
        return None
    from jaxrl_vla.training.normalizer import RunningStats

    return RunningStats(count=stats["count"], mean=stats["mean"], var=stats["var"])


# ---------------------------------------------------------------------------- frames


IMAGE_KEYS = ("rgb", "pixels", "image")  # preferred names of an image observation
OBS_VIDEO_FPS = 8  # image-observation envs (VLReach, Meta-World): few, telling steps
MAX_RENDER_SIDE = 320  # gymnasium renders larger than this are reduced (box filter) to keep videos small


@dataclass(frozen=True)
class FrameSource:
    """Where an env's video frames come from, and the frame rate its video plays at by default.

    kind "obs": the image observation at `path` (keys into the observation dict);
    "state": `renderer` draws the JAX env's state (`jaxrl_vla.envs.render`);
    "gymnasium": the host env's gymnasium envs made with render_mode="rgb_array".
    """

    kind: str
    fps: int
    path: tuple[str, ...] = ()
    renderer: Any = None


def image_path(space: Any, prefix: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The key path of an image in an observation space (a Box [H, W, C] or [C, H, W], C 1 or 3), or None.

    A leaf named rgb / pixels / image wins; else the first uint8 image."""
    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, sub in node.items():
                walk(sub, path + (str(key),))
            return
        shape = tuple(getattr(node, "shape", ()))
        if len(shape) != 3:
            return
        height_width = shape[:2] if shape[-1] in (1, 3) else shape[1:] if shape[0] in (1, 3) else (0,)
        if min(height_width) >= 8:  # smaller "images" are feature maps or tiny grids, not pictures
            found.append((path, node))

    walk(space, prefix)
    for path, _ in found:
        if path and path[-1] in IMAGE_KEYS:
            return path
    for path, leaf in found:
        if np.dtype(getattr(leaf, "dtype", np.float32)) == np.uint8:
            return path
    return None


def frame_source(env: Any) -> FrameSource:
    """How `env`'s frames are made (see FrameSource); EvalError naming what is missing when it cannot render."""
    from jaxrl_vla.envs.host import GymnasiumEnv, is_host_env
    from jaxrl_vla.envs.render import renderer_for

    path = image_path(env.observation_space)
    if path is not None:
        return FrameSource("obs", OBS_VIDEO_FPS, path=path)
    if isinstance(env, GymnasiumEnv):
        import gymnasium as gym

        probe = gym.make(env.name, **env.kwargs)
        try:
            modes, fps = probe.metadata.get("render_modes", []), probe.metadata.get("render_fps")
        finally:
            probe.close()
        if "rgb_array" not in modes:
            raise EvalError(f"--video: gymnasium env {env.name!r} cannot render rgb_array frames "
                            f"(its render modes: {list(modes)}); run without --video")
        return FrameSource("gymnasium", int(fps or 30))
    renderer = None if is_host_env(env) else renderer_for(env)
    if renderer is not None:
        return FrameSource("state", renderer.fps, renderer=renderer)
    raise EvalError(f"--video: {env!r} cannot render: its observations hold no image (a uint8 [H, W, 3] leaf such "
                    "as 'rgb' or 'pixels') and jaxrl_vla.envs.render has no drawing of it (CartPole-v1, Pendulum-v1); "
                    "run without --video")


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------- acting


def policy_act_fn(policy: Any, params: Any, obs_stats: Any):
    """Deterministic (mode) actions of a policy, as a demos.ActFn."""
    from jaxrl_vla.training.acting import act_chunk

    def act(state: Any, obs: Any, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        actions, _, _ = act_chunk(policy.apply, params, obs_stats, obs, keys[0], deterministic=True)
        return actions, actions

    return act


def policy_collector(env: Any, act, chunk: int = 1):
    """`keys [E] -> run_episodes records` acting with `act`, jitted."""
    from jaxrl_vla.tasks.demos import run_episodes
    from jaxrl_vla.training import compiler

    return compiler.jit(lambda keys: run_episodes(env, act, keys, chunk))


def record_episodes(env: Any, collect, num_episodes: int, seed: int,
                    source: FrameSource | None = None) -> list[Episode]:
    """Run `num_episodes` episodes of a JAX env with a collector and keep each one's rewards, outcome and,
    with a `source`, frames."""
    from jaxrl_vla.tasks.demos import episode_keys

    records = jax.device_get(collect(episode_keys(seed, 0, num_episodes)))
    lengths = np.asarray(records["valid"]).sum(axis=1).astype(int)
    frames, last = None, None
    if source is not None and source.kind == "obs":
        frames, last = get_path(records["obs"], source.path), get_path(records["final_obs"], source.path)
    elif source is not None:  # drawn from the states: every step of every episode in one program
        frames, last = source.renderer.draw(records["state"]), source.renderer.draw(records["final_state"])
    if frames is not None:
        from jaxrl_vla.envs.render import to_rgb_uint8

        frames, last = to_rgb_uint8(jax.device_get(frames)), to_rgb_uint8(jax.device_get(last))
    episodes = []
    for e in range(num_episodes):
        length = int(lengths[e])
        video = None if frames is None else np.concatenate([frames[e][:length], last[e][None]])
        success = bool(records["success"][e][:length].any()) if getattr(env, "reports_success", False) else None
        language = records["obs"] if isinstance(records["obs"], dict) else {}
        episodes.append(Episode(video, records["reward"][e][:length], success,
                                instruction_of(env, language, e, step_axis=True)))
    return episodes


def instruction_of(env: Any, obs: dict, episode: int, step_axis: bool) -> str:
    """The episode's instruction as text ('' for envs without language); `obs` leaves are [E, T, ...]
    (`step_axis`) or [E, ...]."""
    tokenizer = getattr(env, "tokenizer", None)  # VLReach's is a method, a host env's may be the object
    if tokenizer is not None and not hasattr(tokenizer, "decode") and callable(tokenizer):
        tokenizer = tokenizer()
    if "language" not in obs or "language_mask" not in obs or not hasattr(tokenizer, "decode"):
        return ""
    ids, mask = np.asarray(obs["language"][episode]), np.asarray(obs["language_mask"][episode])
    ids, mask = (ids[:1], mask[:1]) if step_axis else (ids[None], mask[None])
    return tokenizer.decode(ids, mask)[0]


def host_policy_act_fn(policy: Any, params: Any, obs_stats: Any) -> Callable[[Any, jax.Array], np.ndarray]:
    """`(obs [E, ...] numpy, key) -> actions [E, H, ...] numpy`: the policy's deterministic chunk, jitted
    (the parameters are arguments, not constants baked into the program)."""
    from jaxrl_vla.training.acting import act_chunk

    act = jax.jit(lambda p, stats, obs, key: act_chunk(policy.apply, p, stats, obs, key, deterministic=True)[0])
    return lambda obs, key: np.asarray(jax.device_get(act(params, obs_stats, obs, key)))


class RenderedGymnasiumVecEnv:
    """The host env protocol (`jaxrl_vla.envs.host`) over N gymnasium envs made with render_mode="rgb_array":
    what GymnasiumVecEnv steps, plus `render()` of every copy and, in the step's info, "final_frame": the
    frame of the state that ended an episode (SAME_STEP auto-reset would otherwise draw the next one)."""

    def __init__(self, spec: Any, num_envs: int, seed: int):
        import gymnasium as gym

        self.spec, self.num_envs, self.seed = spec, int(num_envs), int(seed)
        self._envs = [gym.make(spec.name, render_mode="rgb_array", **spec.kwargs) for _ in range(self.num_envs)]

    def reset(self, seed: int | None = None) -> Any:
        from jaxrl_vla.envs.host import _cast_like_space

        base = self.seed if seed is None else seed
        obs = [env.reset(seed=base + i)[0] for i, env in enumerate(self._envs)]
        return _cast_like_space(stack_tree(obs), self.spec.observation_space)

    def _action(self, action: np.ndarray) -> Any:
        from jaxrl_vla.envs.base import Box

        space = self.spec.action_space
        return np.clip(action, space.low, space.high) if isinstance(space, Box) else int(action)

    def step(self, actions: np.ndarray) -> tuple:
        from jaxrl_vla.envs.host import _cast_like_space

        obs, final_obs, final_frames, reward, terminated, truncated, success = [], [], [], [], [], [], []
        reports_success = False  # as GymnasiumVecEnv: "success" only where the env's infos carry it
        for env, action in zip(self._envs, np.asarray(actions)):
            o, r, term, trunc, info = env.step(self._action(action))
            final_obs.append(o)
            final_frames.append(self._frame(env) if term or trunc else None)
            reports_success |= "success" in info or "is_success" in info
            success.append(bool(info.get("success", info.get("is_success", False))))
            if term or trunc:
                o, _ = env.reset()
            obs.append(o)
            reward.append(r), terminated.append(term), truncated.append(trunc)
        frames = [f for f in final_frames if f is not None]
        blank = np.zeros_like(frames[0]) if frames else None
        info = {"final_obs": _cast_like_space(stack_tree(final_obs), self.spec.observation_space),
                "final_frame": None if blank is None else np.stack([blank if f is None else f for f in final_frames])}
        if reports_success:
            info["success"] = np.asarray(success)
        return (_cast_like_space(stack_tree(obs), self.spec.observation_space), np.asarray(reward, np.float32),
                np.asarray(terminated, bool), np.asarray(truncated, bool), info)

    def render(self) -> np.ndarray:
        """uint8 [N, H, W, 3]: every copy's current frame."""
        return np.stack([self._frame(env) for env in self._envs])

    @staticmethod
    def _frame(env: Any) -> np.ndarray:
        import gymnasium as gym
        from PIL import Image

        try:
            frame = np.asarray(env.render(), np.uint8)
        except gym.error.DependencyNotInstalled as err:
            raise EvalError(f"--video: gymnasium cannot render {env.spec.id if env.spec else env}: {err}") from None
        factor = -(-max(frame.shape[:2]) // MAX_RENDER_SIDE)
        return frame if factor <= 1 else np.asarray(Image.fromarray(frame[..., :3]).reduce(factor))

    def close(self) -> None:
        for env in self._envs:
            env.close()


def stack_tree(items: list[Any]) -> Any:
    """A list of observations (arrays or dicts of them) -> one with a leading [N] axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)


def record_host_episodes(spec: Any, act: Callable, num_episodes: int, seed: int, chunk: int,
                         source: FrameSource | None = None) -> list[Episode]:
    """The first episode of each of `num_episodes` copies of a host env (gymnasium, TorchRL, Meta-World),
    stepped together until every one has ended (or spec.max_episode_steps steps), acting with
    `act(obs, key) -> actions [E, chunk, ...]`."""
    from jaxrl_vla.envs.render import to_rgb_uint8

    gymnasium_frames = source is not None and source.kind == "gymnasium"
    venv = RenderedGymnasiumVecEnv(spec, num_episodes, seed) if gymnasium_frames else spec.make(num_episodes, seed)
    max_steps = int(spec.max_episode_steps)
    rewards = np.zeros((num_episodes, max_steps), np.float32)
    lengths = np.zeros(num_episodes, int)
    running = np.ones(num_episodes, bool)
    success = np.zeros(num_episodes, bool)
    reports_success = bool(getattr(spec, "reports_success", False))

    def frames_of(obs: Any) -> np.ndarray | None:
        if source is None:
            return None
        return venv.render() if gymnasium_frames else to_rgb_uint8(get_path(obs, source.path))

    try:
        obs = venv.reset(seed=seed)
        first_obs = obs
        frames = [frames_of(obs)]
        key = jax.random.PRNGKey(seed)
        while running.any() and int(lengths.max()) < max_steps:
            key, act_key = jax.random.split(key)
            actions = act(obs, act_key)
            for j in range(chunk):
                obs, reward, terminated, truncated, info = venv.step(actions[:, j])
                rewards[running, lengths[running]] = reward[running]
                lengths += running
                ended = running & (terminated | truncated)
                if "success" in info:
                    reports_success = True
                    success |= ended & np.asarray(info["success"], bool)
                if source is not None:
                    final = (info["final_frame"] if gymnasium_frames
                             else to_rgb_uint8(get_path(info["final_obs"], source.path)))
                    now = frames_of(obs)
                    frames.append(np.where(ended[:, None, None, None], final, now) if ended.any() else now)
                running &= ~ended
                if not running.any() or int(lengths.max()) >= max_steps:
                    break
    finally:
        venv.close()
    language = first_obs if isinstance(first_obs, dict) else {}
    video = None if source is None else np.stack(frames, axis=1)  # [E, steps + 1, H, W, 3]
    return [Episode(None if video is None else video[e][: lengths[e] + 1], rewards[e][: lengths[e]],
                    bool(success[e]) if reports_success else None, instruction_of(spec, language, e, step_axis=False))
            for e in range(num_episodes)]


# ---------------------------------------------------------------------------- drawing


def upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling [H, W, 3] -> [H*s, W*s, 3]: no blur on tiny renders."""
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def captioned(frame: np.ndarray, lines: list[str], colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The frame with a black caption band underneath holding up to two lines of text."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = frame.shape[:2]
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(frame), (0, 0))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # pillow < 10.1 has one fixed-size bitmap font
        font = ImageFont.load_default()
    for i, line in enumerate(lines[:2]):
        draw.text((4, height + 3 + 18 * i), line, fill=colour if i else (255, 255, 255), font=font)
    return np.asarray(canvas)


def outcome(episode: Episode) -> tuple[str, tuple[int, int, int]]:
    """The text and colour of an episode's result line."""
    if episode.success is None:
        return "done", (255, 255, 255)
    return ("SUCCESS", (80, 230, 80)) if episode.success else ("FAILED", (240, 80, 80))


def episode_frames(episode: Episode, index: int, scale: int, hold: int = HOLD_FRAMES) -> list[np.ndarray]:
    """Captioned, upscaled frames of one episode, its last frame held for `hold` more frames."""
    caption = f'"{episode.instruction}"' if episode.instruction else f"episode {index}"
    returns = np.concatenate([[0.0], np.cumsum(episode.rewards)])
    out = []
    for t, frame in enumerate(episode.frames):
        last = t == len(episode.frames) - 1
        status, colour = outcome(episode) if last else ("", (200, 200, 200))
        line = f"ep {index}  t={t}  return {returns[t]:+.2f}  {status}".rstrip()
        out.append(captioned(upscale(frame, scale), [caption, line], colour))
    return out + [out[-1]] * hold


def check_video_backend(path: Path) -> None:
    """Fail before any episode runs when the video cannot be written."""
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise EvalError(f"--video {path}: unsupported extension {suffix!r}; use .gif or .mp4")
    if suffix == ".mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401  (the writer backend)
        except ImportError:
            raise EvalError("writing .mp4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg); or use .gif") from None


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """GIF via pillow; MP4 via imageio-ffmpeg (a clear error when it is not installed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    else:
        check_video_backend(path)
        import imageio.v2 as imageio

        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_vla.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run directory (config.json + checkpoints/)")
    parser.add_argument("--expert", action="store_true", help="record the env's scripted expert instead of a policy")
    parser.add_argument("--env", default="VLReach-v0", help="--expert without --run: env id (default VLReach-v0)")
    parser.add_argument("--env-kwargs", default="{}", help="--expert without --run: JSON of env constructor arguments")
    parser.add_argument("--video", help="output .gif or .mp4 (omit to only print returns)")
    parser.add_argument("--episodes", type=int, default=4, help="evaluation episodes (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episodes' resets (default 0)")
    parser.add_argument("--fps", type=int, default=0,
                        help="video frames per second (default 0: the env's: 50 for CartPole, 8 for image observations)")
    parser.add_argument("--scale", type=int, default=0, help="upscaling factor (default: to about 256 pixels)")
    return parser.parse_args(argv)


def expert_env(args: argparse.Namespace) -> Any:
    """The env an --expert recording uses: the run's when --run is given, else --env/--env-kwargs."""
    if args.run:
        return load_run(args.run).env
    from jaxrl_vla.build import build_env
    from jaxrl_vla.config import ConfigError

    try:
        kwargs = json.loads(args.env_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise EvalError(f"--env-kwargs must be a JSON object: {err}") from None
    try:
        return build_env({"name": args.env, **kwargs})
    except ConfigError as err:
        raise EvalError(str(err)) from None


def success_by_instruction(episodes: list[Episode]) -> dict[str, tuple[int, int]]:
    """{instruction: (successes, episodes)}, sorted by instruction; empty where the env reports no success.

    Multi-task envs (Meta-World MT10 / MT50) say the task in the instruction, so this is the
    per-task success that a single mean hides."""
    tally: dict[str, list[int]] = {}
    for ep in episodes:
        if ep.success is None or not ep.instruction:
            continue
        wins_count = tally.setdefault(ep.instruction, [0, 0])
        wins_count[0] += int(ep.success)
        wins_count[1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(tally.items())}


def run(args: argparse.Namespace) -> list[Episode]:
    """Record the episodes that the arguments ask for and write the video if requested."""
    if args.episodes < 1 or args.fps < 0 or args.scale < 0:
        raise EvalError("--episodes must be >= 1, --fps and --scale >= 0")
    if not args.run and not args.expert:
        raise EvalError("give --run RUN_DIR (or --expert to record the scripted expert)")
    if args.video:
        check_video_backend(Path(args.video))
    if args.expert:
        from jaxrl_vla.tasks.demos import expert_collector

        env = expert_env(args)
        if not hasattr(env, "expert_action"):
            raise EvalError(f"{type(env).__name__} has no scripted expert (expert_action)")
        source = frame_source(env) if args.video else None
        episodes = record_episodes(env, expert_collector(env, 0.0), args.episodes, args.seed, source)
        who = "scripted expert"
    else:
        from jaxrl_vla.envs.host import is_host_env
        from jaxrl_vla.models.policy import action_chunk_size

        loaded = load_run(args.run)
        env, chunk = loaded.env, action_chunk_size(loaded.policy)
        source = frame_source(env) if args.video else None  # before any episode runs: nothing written on error
        if is_host_env(env):
            act = host_policy_act_fn(loaded.policy, loaded.params, loaded.obs_stats)
            episodes = record_host_episodes(env, act, args.episodes, args.seed, chunk, source)
        else:
            act = policy_act_fn(loaded.policy, loaded.params, loaded.obs_stats)
            episodes = record_episodes(env, policy_collector(env, act, chunk), args.episodes, args.seed, source)
        who = f"{args.run} @ iteration {loaded.iteration}"
    print(f"{who}: {args.episodes} episodes")
    for i, ep in enumerate(episodes):
        result = "" if ep.success is None else ("  success" if ep.success else "  failure")
        line = f"  episode {i}: return {ep.episode_return:+.3f}  length {len(ep.rewards)}{result}  {ep.instruction}"
        print(line.rstrip())
    returns = [ep.episode_return for ep in episodes]
    summary = f"mean return {np.mean(returns):+.3f}"
    if episodes[0].success is not None:
        summary += f", success rate {np.mean([ep.success for ep in episodes]):.0%}"
    print(summary)
    by_instruction = success_by_instruction(episodes)
    if len(by_instruction) > 1:
        print("success per instruction (a task each on Meta-World):")
        for instruction, (wins, count) in by_instruction.items():
            print(f"  {wins / count:4.0%}  ({wins}/{count})  {instruction}")
    if args.video:
        size = max(episodes[0].frames.shape[1:3])
        scale = args.scale or max(1, 256 // size)
        fps = args.fps or source.fps
        hold = max(HOLD_FRAMES, round(HOLD_SECONDS * fps))
        frames = [f for i, ep in enumerate(episodes) for f in episode_frames(ep, i, scale, hold)]
        write_video(Path(args.video), frames, fps)
        print(f"wrote {args.video} ({len(frames)} frames)")
    return episodes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
