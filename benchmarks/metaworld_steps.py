"""Meta-World env steps per second through jaxrl_vla's host env, with and without a camera, on one core.

    python benchmarks/metaworld_steps.py                 # MT10, 1 copy, no camera / 64 px / 128 px
    python benchmarks/metaworld_steps.py --steps 2000 --num-envs 1 4 --sizes 64

What it measures: `MetaWorldVecEnv.step` with uniform random actions (episodes
truncate at max_episode_steps = 200 and auto-reset, so resets are included, as
in collection), after a warm-up that has built every task's instance. The
process is pinned to one CPU and Mesa's llvmpipe to one rasterizer thread
(LP_NUM_THREADS=1), so the numbers are per core: a collector per core scales
them. Prints one JSON line per result.
"""

from __future__ import annotations

import os

os.environ.setdefault("LP_NUM_THREADS", "1")  # before any GL context: llvmpipe on one thread

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def measure(benchmark: str, camera: str | None, size: int, num_envs: int, steps: int, seed: int = 0) -> dict:
    from jaxrl_vla.envs.metaworld import MetaWorldEnv

    spec = MetaWorldEnv(benchmark, camera=camera, image_size=size, max_episode_steps=200)
    vec = spec.make(num_envs, seed)
    rng = np.random.default_rng(seed)
    try:
        vec.reset()
        for _ in range(len(spec.task_names) * 2):  # warm-up: build each copy's task instances
            for copy in vec._copies:
                copy.reset()
        vec.reset()
        actions = rng.uniform(-1, 1, (steps, num_envs, 4)).astype(np.float32)
        start = time.perf_counter()
        for t in range(steps):
            vec.step(actions[t])
        elapsed = time.perf_counter() - start
    finally:
        vec.close()
    return {
        "bench": "metaworld_steps", "benchmark": benchmark, "camera": camera, "image_size": size if camera else None,
        "num_envs": num_envs, "env_steps": steps * num_envs, "seconds": round(elapsed, 3),
        "env_steps_per_s": round(steps * num_envs / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="MT10")
    parser.add_argument("--camera", default="corner")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=1000, help="vector steps per measurement")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for n in args.num_envs:
        print(json.dumps(measure(args.benchmark, None, 64, n, args.steps)), flush=True)
        for size in args.sizes:
            print(json.dumps(measure(args.benchmark, args.camera, size, n, max(args.steps // 4, 50))), flush=True)


if __name__ == "__main__":
    main()
