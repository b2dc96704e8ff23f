"""N independent agents in one program: the Trainer's iteration vmapped over seeds (rejax / PureJaxRL style).

    python -m jaxrl_vla.sweep --config configs/cartpole.json --num-seeds 8 [--set key=value ...]

Each seed is a whole agent: its own parameters, optimiser state, envs and RNG
stream, initialised from `jax.random.PRNGKey(seed)` exactly as a single run with
`trainer.seed = seed` is (so seed s of a sweep follows the same trajectory as that
run, to float tolerance: `vmap` may change XLA's reduction order). One jitted call
runs `iterations_per_call` iterations of all seeds (`lax.scan` over the vmapped
iteration), so small policies fill the device instead of one agent leaving it idle.
Output: `<output_dir>/<exp_name>-sweep-<stamp>/seed_<s>/metrics.jsonl` (and
TensorBoard) per seed, and the final parameters of every seed in `params.msgpack`.

Standard mode with a JAX-native env only (host envs step outside the program);
no evaluation episodes or checkpoints inside a sweep: its curves are the training
episodes' returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_vla.training import compiler
from jaxrl_vla.training.logging import RunLogger


@dataclasses.dataclass
class SweepResult:
    """The final states (leading axis: seed), the seeds and where each seed's metrics are."""

    states: Any
    seeds: list[int]
    run_dir: Path | None
    records: list[list[dict]]  # per seed, per iteration


def check_sweepable(trainer: Any) -> None:
    """ValueError naming what a sweep cannot run (see module docstring)."""
    if getattr(trainer, "buffer_type", "standard") != "standard" or getattr(trainer.env, "is_host_env", False):
        raise ValueError("sweep: standard mode with a JAX-native env only (vla mode and host envs step on the host)")
    if getattr(trainer, "demos", None) is not None:
        raise ValueError("sweep: algorithm.demo_path is not supported (each seed would need the encoded demos)")


def _records(trainer: Any, reports: np.ndarray, steps: np.ndarray, start: int, seconds: float,
             learning_rates: np.ndarray) -> list[list[dict]]:
    """Per seed, the metrics.jsonl records of a call's iterations (reports [K, N, M], steps [K, N])."""
    from jaxrl_vla.training.trainer import episode_summary

    k, n = reports.shape[:2]
    out: list[list[dict]] = [[] for _ in range(n)]
    for i in range(k):
        for s in range(n):
            metrics, episodes = jax.tree_util.tree_unflatten(trainer._report_treedef, list(reports[i, s]))
            record = {"iteration": start + i + 1, "global_step": int(steps[i, s]),
                      "sps": trainer.samples_per_iteration * n * k / seconds,
                      "learning_rate": float(learning_rates[start + i])}
            record.update(episode_summary(episodes))
            record.update({key: float(value) for key, value in metrics.items()})
            out[s].append(record)
    return out


def run_sweep(trainer: Any, num_seeds: int, iterations: int, seeds: Sequence[int] | None = None,
              iterations_per_call: int = 10, output_dir: str | Path | None = None) -> SweepResult:
    """Train `num_seeds` copies of `trainer`'s agent for `iterations`, vmapped in one program.

    `seeds` default to trainer.seed, trainer.seed + 1, ...; `output_dir` (default: none
    written) gets a run directory with one metrics stream per seed.
    """
    check_sweepable(trainer)
    seeds = list(seeds) if seeds is not None else [int(trainer.seed) + i for i in range(num_seeds)]
    if len(seeds) != num_seeds or num_seeds < 1:
        raise ValueError(f"sweep: num_seeds ({num_seeds}) must be >= 1 and match the {len(seeds)} seeds given")
    from jaxrl_vla.training.trainer import learning_rate_per_iteration

    iteration = trainer._make_iteration(iterations)
    learning_rates = learning_rate_per_iteration(trainer.cfg, iterations, trainer.samples_per_iteration)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    init_params = trainer.init_params
    states = jax.jit(jax.vmap(lambda key: trainer._init_state(key, init_params)))(keys)
    vmapped = jax.vmap(lambda state: iteration(state, None))

    def program(states: Any, size: int) -> tuple[Any, jax.Array, jax.Array]:
        def body(carry: Any, _: Any) -> tuple[Any, tuple[jax.Array, jax.Array]]:
            carry, report, step = vmapped(carry)
            return carry, (report, step)

        states, (reports, steps) = jax.lax.scan(body, states, None, length=size)
        return states, reports, steps

    compiled = compiler.jit(program, static_argnums=1, donate_argnums=0)
    run_dir, loggers = None, []
    if output_dir is not None:
        from jaxrl_vla.training.trainer import new_run_dir

        run_dir = new_run_dir(output_dir, f"{trainer.exp_name}-sweep")
        for s in seeds:
            (run_dir / f"seed_{s}").mkdir(parents=True, exist_ok=True)
            loggers.append(RunLogger(run_dir / f"seed_{s}", iterations, progress=False))
    records: list[list[dict]] = [[] for _ in seeds]
    done = 0
    try:
        while done < iterations:
            size = min(iterations_per_call, iterations - done)
            start = time.perf_counter()
            states, reports, steps = compiled(states, size)
            reports, steps = np.asarray(jax.device_get(reports)), np.asarray(jax.device_get(steps))
            seconds = time.perf_counter() - start
            for s, seed_records in enumerate(_records(trainer, reports, steps, done, seconds, learning_rates)):
                records[s] += seed_records
                for record in seed_records:
                    if loggers:
                        loggers[s].log(record)
            done += size
    finally:
        for logger in loggers:
            logger.close()
    if run_dir is not None:
        from flax import serialization

        (run_dir / "params.msgpack").write_bytes(serialization.to_bytes(jax.device_get(states.params)))
    return SweepResult(states=states, seeds=seeds, run_dir=run_dir, records=records)


def main(argv: list[str] | None = None) -> int:
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config file (default: the embedded CartPole config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--num-seeds", type=int, required=True, help="independent agents, seeds trainer.seed + 0..N-1")
    parser.add_argument("--iterations-per-call", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        if args.num_seeds < 1:
            raise ConfigError(f"--num-seeds must be >= 1, got {args.num_seeds}")
        cfg = load_config(args.config, args.set)
        cfg["trainer"]["progress"] = False
        trainer = build_trainer(cfg)
        check_sweepable(trainer)
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    result = run_sweep(trainer, args.num_seeds, int(cfg["trainer"]["iterations"]),
                       iterations_per_call=args.iterations_per_call, output_dir=cfg["trainer"]["output_dir"])
    finals = [r[-1].get("episode_return_mean") for r in result.records]
    print(f"{args.num_seeds} seeds, {cfg['trainer']['iterations']} iterations; final training return per seed: "
          + ", ".join("-" if x is None else f"{x:.1f}" for x in finals) + f"; outputs in {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
