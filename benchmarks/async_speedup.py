"""Benchmark: what VLA async mode buys over standard mode, measured against its limit.

Why: the seed claimed "2-3x" for its async mode and never measured it. Overlap
can at best hide the shorter of collection and training, so with collect time C
and train time T (measured in standard mode) one collector's speedup is bounded
by (C + T) / max(C, T). This script measures sync and async runs that do the
same env steps and the same PPO updates and reports the speedup next to that
limit, then the speedup with several collectors when inference dominates.

The slow policy: every inference waits `latency` seconds on the host around the
jitted call (`time.sleep`, which releases the GIL like a call into a remote
inference server or an accelerator would). With the default `--latency-model
per-obs` the wait scales with the batch (latency x batch / num_envs: a
collector with num_envs / K envs waits latency / K), which is how a
compute-bound model behaves when each collector has its own inference replica
or device; with `--latency-model per-call` every inference waits the full
latency whatever its batch, and extra collectors cannot help (each still makes
one call per step). Env: gymnasium CartPole on the host.

Scenarios (defaults; one JSON line per run, per comparison and per summary = medians over repeats):
  balanced     heavy learner (MLP 1024x1024, many epochs) so T ~ C:  sync vs async x1
  inference    light learner, inference dominates:                   sync vs async x1 vs async xK

On a CPU-only machine the learner and the collectors share the cores: by
default XLA's CPU backend is limited to one intra-op thread
(`--xla_cpu_multi_thread_eigen=false`, set before JAX starts, in sync and async
runs alike) so that training leaves a core to the collector, as a GPU learner
would; `--xla-multi-thread` keeps XLA's default.

Times are sums of the iterations' wall times as the trainer logs them
(pipeline fill and drain included; run setup and the final checkpoint are not).
Compilation is taken out of the timed runs with a warm-up run per scenario and
JAX's persistent compilation cache.

    python benchmarks/async_speedup.py [--latency 0.05] [--iterations 12] [--repeats 3] [--collectors 4] [--no-write]
"""

from __future__ import annotations

import os
import sys

if "--xla-multi-thread" not in sys.argv:  # must precede JAX's backend start (see docstring)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.envs.host import make_gymnasium_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training.async_trainer import AsyncTrainer, PolicySnapshot

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _report
from _report import machine_line, write_section  # noqa: E402


class SlowInferenceTrainer(AsyncTrainer):
    """AsyncTrainer whose policy inference takes `latency` seconds (a GIL-releasing wait)."""

    def __init__(self, *args: Any, latency: float, per_obs: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.latency = latency
        self.per_obs = per_obs

    def infer(self, snapshot: PolicySnapshot, obs: Any, key: jax.Array, counter: int):
        batch = jax.tree_util.tree_leaves(obs)[0].shape[0]
        time.sleep(self.latency * (batch / self.num_envs if self.per_obs else 1.0))
        return super().infer(snapshot, obs, key, counter)


@dataclass(frozen=True)
class Scenario:
    name: str
    hidden: int
    n_epochs: int


def run_once(
    scenario: Scenario, mode: str, collectors: int, args: argparse.Namespace, iterations: int, out_dir: Path
) -> dict[str, Any]:
    """Train `iterations` iterations; return the summed per-iteration timings."""
    env = make_gymnasium_env("CartPole-v1")
    policy = ActorCritic(env.action_space, hidden_sizes=(scenario.hidden, scenario.hidden))
    records: list[dict] = []
    steps = args.steps_per_env
    trainer = SlowInferenceTrainer(
        policy,
        env,
        PPOConfig(batch_size=args.batch_size, n_epochs=scenario.n_epochs, learning_rate=1e-4),
        buffer_size=steps * args.num_envs if mode == "async" else steps,
        buffer_type="vla" if mode == "async" else "standard",
        num_collectors=collectors,
        num_envs=args.num_envs,
        eval_freq=0,
        save_freq=0,
        output_dir=out_dir,
        progress=False,
        log_fn=records.append,
        latency=args.latency,
        per_obs=args.latency_model == "per-obs",
    )
    trainer.train(total_timesteps=iterations * trainer.samples_per_iteration)
    minibatches = trainer.samples_per_iteration // args.batch_size
    return {
        "bench": "async_speedup",
        "scenario": scenario.name,
        "mode": mode,
        "collectors": collectors,
        "latency_s": args.latency,
        "latency_model": args.latency_model,
        "iterations": iterations,
        "env_steps": iterations * trainer.samples_per_iteration,
        "updates": iterations * scenario.n_epochs * minibatches,
        "wall_s": sum(r["iteration_time"] for r in records),
        # medians per iteration: steady state, robust to other jobs' bursts on a shared machine
        "iter_median_s": float(np.median([r["iteration_time"] for r in records])),
        "collect_median_s": float(np.median([r["collect_time"] for r in records])),
        "train_median_s": float(np.median([r["train_time"] for r in records])),
        "collect_s": sum(r["collect_time"] for r in records),  # async: time the learner waited for data
        "train_s": sum(r["train_time"] for r in records),
        "staleness_mean": float(np.mean([r["staleness"] for r in records])),
    }


def compare(sync: dict, other: dict) -> dict[str, Any]:
    """Speedup of `other` over `sync`, next to the one-collector limit (C+T)/max(C,T)."""
    c, t = sync["collect_s"], sync["train_s"]
    limit = (c + t) / max(c, t)
    k = other["collectors"]
    scale = 1.0 / k if (other["latency_model"] == "per-obs") else 1.0
    ideal_k = (c + t) / max(c * scale, t)  # if collection time shrank exactly by the latency model
    speedup = sync["wall_s"] / other["wall_s"]
    c_med, t_med = sync["collect_median_s"], sync["train_median_s"]
    limit_med = (c_med + t_med) / max(c_med, t_med)
    speedup_med = sync["iter_median_s"] / other["iter_median_s"]
    return {
        "bench": "async_speedup",
        "scenario": sync["scenario"],
        "compare": f"async x{k} vs sync",
        "collectors": k,
        "C_s": round(c, 3),
        "T_s": round(t, 3),
        "sync_wall_s": round(sync["wall_s"], 3),
        "async_wall_s": round(other["wall_s"], 3),
        "speedup": round(speedup, 3),
        "limit_1_collector": round(limit, 3),
        "fraction_of_limit": round(speedup / limit, 3),
        "ideal_with_k": round(ideal_k, 3),
        "steady_speedup": round(speedup_med, 3),
        "steady_limit_1_collector": round(limit_med, 3),
        "steady_fraction_of_limit": round(speedup_med / limit_med, 3),
    }




def markdown(runs: list[dict], comparisons: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "## async_speedup",
        "",
        f"Standard (sync) vs VLA async mode on gymnasium CartPole (host env), {args.num_envs} envs, "
        f"{args.steps_per_env} steps per env per iteration, {args.iterations} iterations, the same env steps and PPO "
        f"updates in every run; XLA CPU {'multi-threaded' if args.xla_multi_thread else 'single-threaded (one core left to the collectors)'}. Slow policy: a GIL-releasing wait of {args.latency * 1e3:.0f} ms per inference over "
        f"all {args.num_envs} envs ({args.latency_model} latency model: "
        + ("a collector with fewer envs waits proportionally less, as with one inference replica per collector"
           if args.latency_model == "per-obs" else "every call waits the full latency")
        + "). C = collect time and T = train time measured in sync mode; limit = (C + T) / max(C, T) is the "
        "best one collector can do. Produced by `python benchmarks/async_speedup.py`.",
        "",
        "Whole run: summed iteration times (the async pipeline's fill and drain included). Steady state: "
        "median iteration time, and the limit from the sync run's median C and T per iteration.",
        "",
        f"Medians over {args.repeats} interleaved repeats (sync, async, sync, async, ...); the speedup's range over the "
        "repeats shows how noisy the machine was.",
        "",
        "| scenario | run | C s | T s | sync s | async s | speedup (range) | limit (1 collector) | % of limit "
        "| steady speedup | steady limit | steady % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        low, high = c["speedup_range"]
        lines.append(
            f"| {c['scenario']} | async x{c['collectors']} vs sync | {c['C_s']:.2f} | {c['T_s']:.2f} | "
            f"{c['sync_wall_s']:.2f} | {c['async_wall_s']:.2f} | {c['speedup']:.2f}x ({low:.2f}-{high:.2f}) | "
            f"{c['limit_1_collector']:.2f}x | {100 * c['fraction_of_limit']:.0f}% | {c['steady_speedup']:.2f}x | "
            f"{c['steady_limit_1_collector']:.2f}x | {100 * c['steady_fraction_of_limit']:.0f}% |"
        )
    stale = ", ".join(
        f"{r['scenario']} x{r['collectors']}: {r['staleness_mean']:.2f}" for r in runs if r["mode"] == "async" and r["repeat"] == 0
    )
    lines += [
        "",
        "Several collectors beat the one-collector limit because each one's inference covers fewer envs "
        "(the latency model above); with a per-call latency they would not. Mean policy staleness "
        f"(learner version - acting version) in the async runs: {stale}.",
        "",
        f"{machine_line()} 1-min load average at the end of the run: {os.getloadavg()[0]:.1f}. The machine was shared with other jobs while measuring, so timings are noisy: "
        "a fraction of the limit above 100% can only be noise (the sync run, from which C, T and the limit "
        "come, was slowed by other jobs more than its paired async run).",
    ]
    return "\n".join(lines)




def enable_compilation_cache(directory: str) -> None:
    """Persistent cache: a warm-up run compiles, the timed runs load the executables."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def summarize(comparisons: list[dict]) -> dict[str, Any]:
    """Median over the repeats of one (scenario, collectors) comparison, and the spread."""
    med = lambda key: round(float(np.median([c[key] for c in comparisons])), 3)  # noqa: E731
    first = comparisons[0]
    keys = ("C_s", "T_s", "sync_wall_s", "async_wall_s", "speedup", "limit_1_collector", "fraction_of_limit",
            "ideal_with_k", "steady_speedup", "steady_limit_1_collector", "steady_fraction_of_limit")
    out = {"bench": "async_speedup", "summary": True, "scenario": first["scenario"], "compare": first["compare"],
           "collectors": first["collectors"], "repeats": len(comparisons)}
    out.update({key: med(key) for key in keys})
    out["speedup_range"] = [min(c["speedup"] for c in comparisons), max(c["speedup"] for c in comparisons)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per inference over all num_envs envs")
    parser.add_argument("--latency-model", choices=("per-obs", "per-call"), default="per-obs")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved sync/async repeats (medians reported)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--steps-per-env", type=int, default=8, help="steps per env per iteration")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--collectors", type=int, default=4, help="collectors of the multi-collector run")
    parser.add_argument("--heavy-hidden", type=int, default=1024)
    parser.add_argument("--heavy-epochs", type=int, default=12)
    parser.add_argument("--scenarios", nargs="+", default=["balanced", "inference"], choices=("balanced", "inference"))
    parser.add_argument("--xla-multi-thread", action="store_true", help="let XLA use every core for training")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()

    scenarios = [Scenario("balanced", args.heavy_hidden, args.heavy_epochs), Scenario("inference", 64, 4)]
    scenarios = [s for s in scenarios if s.name in args.scenarios]
    runs: list[dict] = []
    summaries: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        enable_compilation_cache(os.path.join(tmp, "xla-cache"))
        out_dir = Path(tmp) / "runs"
        for scenario in scenarios:
            plan = [("sync", 1), ("async", 1)]
            if scenario.name == "inference" and args.collectors > 1:
                plan.append(("async", args.collectors))
            for mode, k in plan:  # warm-up: compile every shape this scenario uses
                run_once(scenario, mode, k, args, 1, out_dir)
            per_k: dict[int, list[dict]] = {}
            for repeat in range(args.repeats):  # interleaved, so each pair sees similar machine load
                results = {}
                for mode, k in plan:
                    result = run_once(scenario, mode, k, args, args.iterations, out_dir)
                    result["repeat"] = repeat
                    print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in result.items()}), flush=True)
                    runs.append(result)
                    results[(mode, k)] = result
                for (mode, k), result in results.items():
                    if mode == "async":
                        comparison = compare(results[("sync", 1)], result)
                        comparison["repeat"] = repeat
                        print(json.dumps(comparison), flush=True)
                        per_k.setdefault(k, []).append(comparison)
            for k, comparisons in per_k.items():
                summary = summarize(comparisons)
                print(json.dumps(summary), flush=True)
                summaries.append(summary)
    if not args.no_write:
        write_section("async_speedup", markdown(runs, summaries, args))


if __name__ == "__main__":
    main()
