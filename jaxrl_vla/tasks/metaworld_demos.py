"""Meta-World demonstrations from its scripted experts, with DART-style noise, in `jaxrl_vla.tasks.demos`'s format.

    python -m jaxrl_vla.tasks.metaworld_demos --out demos/mt10.npz --episodes-per-task 20 --seed 0

Why a counterpart of `jaxrl_vla.tasks.demos`: that collector runs a JAX env
under vmap/scan; Meta-World steps MuJoCo on the host, so episodes run here one
after another through `MetaWorldVecEnv` (one copy), as a collector would.

Episodes are balanced over tasks: episodes k K .. (k + 1) K - 1 run task
`task_names[k]` (K = episodes per task), and
its goal, initial state and noise depend only on (seed, e), so the file does
not depend on anything else. DART (Laskey et al. 2017), `--noise-std`
(default 0.1): the env executes expert + N(0, noise_std^2), clipped to the
action box, while the recorded `action` stays the expert's clean action at the
state actually visited, so a clone also sees how to recover from its own small
deviations. The expert reads Meta-World's 39-d state (goal included); the
recorded observations are the env's (rgb, proprio, language, ...).

The file is `jaxrl_vla.tasks.demos`'s format (`load_demos`, `as_demonstrations`
read it; env_id "metaworld:<benchmark>", env_kwargs every constructor
argument), plus `task_id` int32 [N] (index into the benchmark's task list of
env_kwargs) for per-task statistics.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from jaxrl_vla.tasks.demos import save_demos


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of episode `episode` (a function of (seed, episode) only)."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def run_episode(vec: Any, seed: int, episode: int, noise_std: float) -> dict[str, np.ndarray]:
    """One expert episode on a one-copy `MetaWorldVecEnv`: per-step arrays [T, ...]."""
    noise_rng = np.random.default_rng([seed, episode, 1])
    rows: dict[str, list] = {}
    obs = vec.reset(seed=episode_seed(seed, episode))
    for _ in range(vec.spec.max_episode_steps):
        label = vec.expert_actions()
        executed = np.clip(label + noise_std * noise_rng.standard_normal(label.shape), -1.0, 1.0).astype(np.float32)
        next_obs, reward, terminated, truncated, info = vec.step(executed)
        step = {**{k: v[0] for k, v in obs.items()}, "action": label[0], "executed_action": executed[0],
                "reward": reward[0], "terminated": terminated[0], "truncated": truncated[0],
                "success": info["success"][0]}
        for key, value in step.items():
            rows.setdefault(key, []).append(value)
        if terminated[0] or truncated[0]:
            break
        obs = next_obs
    return {key: np.stack(values) for key, values in rows.items()}


def collect_metaworld_demos(spec: Any, episodes_per_task: int, seed: int = 0, noise_std: float = 0.1) -> dict[str, np.ndarray]:
    """Step and episode arrays of `episodes_per_task` x T expert episodes (see module docstring)."""
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    from jaxrl_vla.envs.metaworld import MetaWorldEnv

    parts, lengths, returns, successes = [], [], [], []
    for task, name in enumerate(spec.task_names):  # one task's instance at a time (MT50's would not all fit)
        vec = MetaWorldEnv(spec.benchmark, **{**spec.config(), "tasks": [name]}).make(1, seed)
        try:
            for e in range(task * episodes_per_task, (task + 1) * episodes_per_task):
                part = run_episode(vec, seed, e, noise_std)
                n = len(part["action"])
                part["episode_id"] = np.full(n, e, np.int32)
                part["step"] = np.arange(n, dtype=np.int32)
                part["task_id"] = np.full(n, task, np.int32)
                parts.append(part)
                lengths.append(n)
                returns.append(float(part["reward"].sum()))
                successes.append(bool(part["success"].any()))
        finally:
            vec.close()
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["episode_length"] = np.asarray(lengths, np.int32)
    out["episode_return"] = np.asarray(returns, np.float32)
    out["episode_success"] = np.asarray(successes, bool)
    return out


def per_task_success(arrays: dict[str, np.ndarray], task_names: list[str]) -> dict[str, float]:
    """The expert's success rate per task of a collected set."""
    first = np.searchsorted(arrays["episode_id"], np.arange(len(arrays["episode_length"])))
    task = arrays["task_id"][first]
    return {name: float(arrays["episode_success"][task == i].mean()) for i, name in enumerate(task_names) if (task == i).any()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_vla.tasks.metaworld_demos", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--benchmark", default="MT10", help="MT10, MT50 or one task (MT1), e.g. reach-v3")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the benchmark's tasks")
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-std", type=float, default=0.1, help="DART noise on executed actions (0: pure expert)")
    parser.add_argument("--camera", default="corner")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-episode-steps", type=int, default=200)
    args = parser.parse_args(argv)
    from jaxrl_vla.envs.metaworld import MetaWorldEnv

    try:
        spec = MetaWorldEnv(args.benchmark, tasks=args.tasks, camera=args.camera, image_size=args.image_size,
                            max_episode_steps=args.max_episode_steps)
        arrays = collect_metaworld_demos(spec, args.episodes_per_task, args.seed, args.noise_std)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = save_demos(args.out, arrays, f"metaworld:{args.benchmark}", spec.config(), spec.tokenizer().vocab,
                      args.seed, args.noise_std)
    rates = per_task_success(arrays, spec.task_names)
    print(f"wrote {path}: {len(arrays['episode_length'])} episodes, {len(arrays['step'])} steps, expert success "
          f"{arrays['episode_success'].mean():.1%} ({', '.join(f'{k} {v:.0%}' for k, v in rates.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
