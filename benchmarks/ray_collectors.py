"""Env steps/s against the number of collectors, Ray actors (trainer.collectors.backend 'ray')
and threads, for a slow host env.

    python benchmarks/ray_collectors.py [--delay 0.005] [--iterations 16] [--no-write]

The env sleeps `delay` seconds per env copy per step (a CPU simulator stepping its copies
one after another), so one collector of N envs spends N x delay per step and two
collectors of N/2 envs each halve that. One JSON line per result; the BENCHMARKS.md
section `ray_collectors` is rewritten unless --no-write. Steps/s counts the iterations
after the first (which includes compiling and starting the actors): transitions
trained / wall time from the end of iteration 1 to the end of the last.

A sleep releases the GIL, so threads scale on it as well; Ray's point is envs that
hold the GIL or the host's cores, and collectors on other machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _report
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import machine_line, write_section  # noqa: E402


class SlowVecEnv:
    """A 4-d observation, 2 actions, episodes of 50 steps; sleeps delay x num_envs per step."""

    def __init__(self, num_envs: int, seed: int, delay: float):
        self.num_envs, self.delay = num_envs, delay
        self.rng = np.random.default_rng(seed)
        self.t = np.zeros(num_envs, np.int64)

    def _obs(self) -> np.ndarray:
        return self.rng.standard_normal((self.num_envs, 4)).astype(np.float32)

    def reset(self, seed: int | None = None) -> np.ndarray:
        return self._obs()

    def step(self, actions: np.ndarray):
        time.sleep(self.delay * self.num_envs)
        self.t += 1
        truncated = self.t % 50 == 0
        obs = self._obs()
        reward = (np.asarray(actions) == 1).astype(np.float32)
        return obs, reward, np.zeros(self.num_envs, bool), truncated, {"final_obs": obs}

    def close(self) -> None:
        pass


class SlowEnv:
    is_host_env = True
    max_episode_steps = 50
    reports_success = False

    def __init__(self, delay: float):
        from jaxrl_vla.envs.base import Box, Discrete

        self.delay = delay
        self.observation_space = Box(-10.0, 10.0, (4,), np.float32)
        self.action_space = Discrete(2)

    def make(self, num_envs: int, seed: int) -> SlowVecEnv:
        return SlowVecEnv(num_envs, seed, self.delay)


def measure(backend: str, num: int, args: argparse.Namespace) -> dict:
    from jaxrl_vla.algo.ppo import PPOConfig
    from jaxrl_vla.models.actor_critic import ActorCritic
    from jaxrl_vla.training.async_trainer import AsyncTrainer

    env = SlowEnv(args.delay)
    ends: list[float] = []  # wall clock at the end of each iteration
    with tempfile.TemporaryDirectory() as out:
        trainer = AsyncTrainer(
            ActorCritic(env.action_space, hidden_sizes=(64, 64)), env, PPOConfig(batch_size=64, n_epochs=1),
            buffer_size=args.steps * args.num_envs, num_envs=args.num_envs, num_collectors=num, eval_freq=0,
            save_freq=0, output_dir=out, progress=False, seed=0,
            collectors={"backend": backend, "num": num}, callback=lambda record: ends.append(time.perf_counter()),
        )
        trainer.train(total_timesteps=args.iterations * trainer.samples_per_iteration)
        records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = ends[-1] - ends[0]
    steps = (len(ends) - 1) * args.steps * args.num_envs
    return {"benchmark": "ray_collectors", "backend": backend, "collectors": num, "num_envs": args.num_envs,
            "delay_per_env_step_s": args.delay, "env_steps_per_s": round(steps / seconds, 1),
            "iterations_timed": len(records), "staleness_mean": round(float(np.mean([r["staleness"] for r in records])), 2)}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    ideal = 1.0 / args.delay
    lines = [
        "## Remote collectors on Ray (`benchmarks/ray_collectors.py`)", "",
        f"{machine_line()}", "",
        f"A host env that sleeps {args.delay * 1e3:.0f} ms per env copy per step ({args.num_envs} envs, "
        f"{args.steps} steps per env per iteration, vla mode, an MLP policy); env steps/s over iterations "
        f"2-{args.iterations} (one collector's ceiling is {ideal:.0f} steps/s). Local Ray cluster "
        "(`ray.init(num_cpus=2)`), one CPU per actor.", "",
        "| backend | collectors | env steps/s | mean staleness |", "|---|---|---|---|",
    ]
    lines += [f"| {r['backend']} | {r['collectors']} | {r['env_steps_per_s']:.0f} | {r['staleness_mean']} |" for r in results]
    lines += ["", "A sleep releases the GIL, so threads scale on it too; Ray is for envs that hold the GIL or the "
              "host's cores, and for collectors on other machines (docs/scaling.md). Here the two actors, the Ray "
              "daemons and the learner share 2 cores, and every chunk is a remote call (an object-store round trip) "
              "and each new parameter version one ray.put, which is where Ray's 2 collectors fall short of threads'.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.005, help="seconds per env copy per step")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="steps per env per iteration")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()
    import ray

    warnings.filterwarnings("ignore", message="config.json cannot name the env")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for backend in ("ray", "threads"):
            for num in (1, 2):
                result = measure(backend, num, args)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        ray.shutdown()
    if not args.no_write:
        write_section("ray_collectors", markdown(results, args))


if __name__ == "__main__":
    main()
