"""`python -m jaxrl_vla.eval --run RUN_DIR --video out.gif`: watch what a policy does.

Loads a run directory (its config.json and latest checkpoint), runs
deterministic evaluation episodes of its env, prints each episode's return and
success, and writes a video: every frame is the env's rgb observation scaled
up (nearest neighbour, so pixels stay crisp) with the instruction and the
step's running return written underneath. `--expert` records the env's
scripted expert instead of a policy (no run needed; handy for docs).

    python -m jaxrl_vla.eval --run runs/vl_reach_scratch-20250101-120000 --video out.gif
    python -m jaxrl_vla.eval --expert --video expert.gif --episodes 4
    python -m jaxrl_vla.eval --expert --env VLReach-v0 --env-kwargs '{"num_objects": 3}' --video x.mp4

GIFs are written with pillow; .mp4 needs imageio with imageio-ffmpeg.
Exit codes: 0 done, 2 bad arguments or an unusable run (missing directory,
config or checkpoint; an env without rgb observations), nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

CAPTION_HEIGHT = 40
HOLD_FRAMES = 6  # extra copies of an episode's last frame, so the outcome is readable


class EvalError(Exception):
    """A problem the user can fix (bad path, missing checkpoint); exit code 2."""


@dataclass
class Episode:
    """One recorded episode: frames [T+1, H, W, 3] and per-step rewards [T]."""

    frames: np.ndarray
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


def record_episodes(env: Any, collect, num_episodes: int, seed: int) -> list[Episode]:
    """Run `num_episodes` episodes with a collector and keep each one's frames, rewards and outcome."""
    from jaxrl_vla.tasks.demos import episode_keys

    if not isinstance(env.observation_space, dict) or "rgb" not in env.observation_space:
        raise EvalError(f"{type(env).__name__} has no 'rgb' observation to render")
    records = jax.device_get(collect(episode_keys(seed, 0, num_episodes)))
    episodes = []
    for e in range(num_episodes):
        valid = np.asarray(records["valid"][e])
        length = int(valid.sum())
        frames = np.concatenate([records["obs"]["rgb"][e][:length], records["final_obs"]["rgb"][e][None]])
        success = bool(records["success"][e][:length].any()) if getattr(env, "reports_success", False) else None
        episodes.append(Episode(frames, records["reward"][e][:length], success, instruction_of(env, records["obs"], e)))
    return episodes


def instruction_of(env: Any, obs: dict, episode: int) -> str:
    """The episode's instruction as text ('' for envs without language)."""
    if "language" not in obs or not hasattr(env, "tokenizer"):
        return ""
    ids, mask = obs["language"][episode][:1], obs["language_mask"][episode][:1]
    return env.tokenizer().decode(ids, mask)[0]


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


def episode_frames(episode: Episode, index: int, scale: int) -> list[np.ndarray]:
    """Captioned, upscaled frames of one episode, its last frame held for HOLD_FRAMES."""
    caption = f'"{episode.instruction}"' if episode.instruction else f"episode {index}"
    returns = np.concatenate([[0.0], np.cumsum(episode.rewards)])
    out = []
    for t, frame in enumerate(episode.frames):
        last = t == len(episode.frames) - 1
        status, colour = outcome(episode) if last else ("", (200, 200, 200))
        line = f"ep {index}  t={t}  return {returns[t]:+.2f}  {status}".rstrip()
        out.append(captioned(upscale(frame, scale), [caption, line], colour))
    return out + [out[-1]] * HOLD_FRAMES


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
    parser.add_argument("--fps", type=int, default=8, help="video frames per second (default 8)")
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


def run(args: argparse.Namespace) -> list[Episode]:
    """Record the episodes that the arguments ask for and write the video if requested."""
    if args.episodes < 1 or args.fps < 1 or args.scale < 0:
        raise EvalError("--episodes and --fps must be >= 1, --scale >= 0")
    if not args.run and not args.expert:
        raise EvalError("give --run RUN_DIR (or --expert to record the scripted expert)")
    if args.video:
        check_video_backend(Path(args.video))
    if args.expert:
        from jaxrl_vla.tasks.demos import expert_collector

        env = expert_env(args)
        if not hasattr(env, "expert_action"):
            raise EvalError(f"{type(env).__name__} has no scripted expert (expert_action)")
        collect, who = expert_collector(env, 0.0), "scripted expert"
    else:
        from jaxrl_vla.models.policy import action_chunk_size

        loaded = load_run(args.run)
        env = loaded.env
        act = policy_act_fn(loaded.policy, loaded.params, loaded.obs_stats)
        collect = policy_collector(env, act, action_chunk_size(loaded.policy))
        who = f"{args.run} @ iteration {loaded.iteration}"
    episodes = record_episodes(env, collect, args.episodes, args.seed)
    print(f"{who}: {args.episodes} episodes")
    for i, ep in enumerate(episodes):
        result = "" if ep.success is None else ("  success" if ep.success else "  failure")
        print(f"  episode {i}: return {ep.episode_return:+.3f}  length {len(ep.rewards)}{result}  {ep.instruction}")
    returns = [ep.episode_return for ep in episodes]
    summary = f"mean return {np.mean(returns):+.3f}"
    if episodes[0].success is not None:
        summary += f", success rate {np.mean([ep.success for ep in episodes]):.0%}"
    print(summary)
    if args.video:
        size = episodes[0].frames.shape[1]
        scale = args.scale or max(1, 256 // size)
        frames = [f for i, ep in enumerate(episodes) for f in episode_frames(ep, i, scale)]
        write_video(Path(args.video), frames, args.fps)
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
