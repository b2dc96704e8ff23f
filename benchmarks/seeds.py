"""Seeds vmapped in one program: CartPole PPO env steps/s for 1, 8 and 64 agents (`jaxrl_vla.sweep`).

    python benchmarks/seeds.py [--seeds 1 8 64] [--iterations 12]

Each row trains N independent agents (8 envs x 32 steps each per iteration) with
`run_sweep`; the time is measured over the calls after the first (compilation
excluded), and steps/s counts the env steps of all agents. One JSON line per result;
the `seeds` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from _report import machine, machine_line, write_section  # noqa: E402


def measure(num_seeds: int, iterations: int, per_call: int) -> dict:
    import jax

    from jaxrl_vla import Trainer
    from jaxrl_vla.algo import PPOConfig
    from jaxrl_vla.envs import make_env
    from jaxrl_vla.models.actor_critic import ActorCritic
    from jaxrl_vla.training import sweep

    env = make_env("CartPole-v1")
    trainer = Trainer(ActorCritic(env.action_space, (64, 64)), env,
                      PPOConfig(learning_rate=2.5e-3, n_epochs=4, batch_size=64), buffer_size=32, num_envs=8,
                      eval_freq=0, save_freq=0, output_dir=tempfile.mkdtemp(), progress=False)
    times: list[float] = []
    original = sweep.compiler.jit

    def timed_jit(fn, **kw):  # time each call of the sweep's program
        compiled = original(fn, **kw)

        def call(*args):
            start = time.perf_counter()
            out = compiled(*args)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
            return out

        return call

    sweep.compiler.jit = timed_jit
    try:
        result = sweep.run_sweep(trainer, num_seeds, iterations, iterations_per_call=per_call)
    finally:
        sweep.compiler.jit = original
    steady = times[1:] or times
    steps = trainer.samples_per_iteration * num_seeds * per_call * len(steady)
    final = [r[-1].get("episode_return_mean") for r in result.records]
    return {"bench": "seeds", "num_seeds": num_seeds, "env_steps_per_s": steps / sum(steady),
            "first_call_s": times[0], "iterations": iterations,
            "final_return_mean": float(sum(x for x in final if x is not None) / max(1, sum(x is not None for x in final)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--per-call", type=int, default=4)
    args = parser.parse_args(argv)
    rows = []
    for n in args.seeds:
        row = measure(n, args.iterations, args.per_call)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]["env_steps_per_s"]
    table = ["| agents | env steps/s (all agents) | vs 1 agent | first call (compile) s | final training return |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['num_seeds']} | {r['env_steps_per_s']:,.0f} | {r['env_steps_per_s'] / base:.1f}x | "
                     f"{r['first_call_s']:.1f} | {r['final_return_mean']:.1f} |")
    write_section("seeds", f"`python benchmarks/seeds.py` (CartPole PPO, 8 envs x 32 steps per agent per iteration, "
                           f"{args.iterations} iterations, {args.per_call} per call); {machine_line(machine())}\n\n"
                  + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
