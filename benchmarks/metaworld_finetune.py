"""Meta-World MT10: PPO fine-tuning of the behaviour-cloned torch VLA against its random-init twin, per task.

    MUJOCO_GL=egl python benchmarks/metaworld_finetune.py --minutes 60      # both arms at once, one core each
    MUJOCO_GL=egl python benchmarks/metaworld_finetune.py --bc-run runs/metaworld_finetune/bc/... \\
        --scratch-run runs/metaworld_finetune/scratch/...                   # re-report existing runs

Issue 32's measurement. The fine-tuned arm is configs/metaworld/train_config_async.json (vla mode,
collector threads stepping MuJoCo while the learner trains) from `checkpoints/metaworld_bc.safetensors`
(made by `python -m bridge.pretrain_bc --env metaworld` when missing); the scratch arm is the same
config with `policy.vla_config.model_path: null` (same model, PPO settings and wall budget).

The two arms run at the same time, each pinned to one of the machine's cores
(`os.sched_setaffinity`, inherited by the CLI subprocess), so they get the same
compute under the same background load; each is the real CLI stopped by SIGINT at
`--minutes` (`finetune_curve.run_training`). Before and after, the policy's
deterministic success is counted per task (the instruction names it) on the same
`--eval-episodes` episodes (seeded resets, so both checkpoints see the same tasks
and goals), with `jaxrl_vla.eval`'s host-env recorder. Output: one JSON line per
arm, docs/metaworld_finetune.png (training-time eval success against wall time),
and the `metaworld_finetune` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from _report import load_averages, machine, machine_line, plot_success_curves, write_section  # noqa: E402
from finetune_curve import ensure_checkpoint, load_config, read_curve, run_training  # noqa: E402

CONFIG = REPO / "configs" / "metaworld" / "train_config_async.json"
# 400 iterations (205k env steps) sets the linear learning-rate decay near what 60 min on one core reaches;
# the in-run evaluation (20 episodes) every 40 iterations keeps its share of the budget small. Each env
# copy keeps `env.cache_size` task instances with their renderers: the default 10 gives a training process
# with 8 + 20 evaluation copies ~10 GB, two of which do not fit in 24 GB (one was OOM-killed); 3 gives
# ~7-8 GB, but evicting instances while collector threads render crashed the bc arm's trainer with a
# segmentation fault 3 times (docs/environments.md): an open bug, so a run may end early.
# The config's plain PPO (lr 3e-4 from the first step, no demonstrations) took the BC clone from 70% to 0%
# deterministic success by iteration 40 (measured; approx_kl 0.18 and clip fraction 0.55 on the first update):
# the arms add what the VLReach example fine-tunes with, the demonstration loss on the demos the clone was
# made from (DAPG-style, demo_coef 3) and a learning-rate warm-up (Adam's first steps are ~lr whatever the
# gradient), 80 steps = 10 iterations.
DAPG = ["algorithm.demo_path=checkpoints/metaworld_mt10_demos.npz", "algorithm.cfg.demo_coef=3.0",
        "algorithm.cfg.lr_warmup_steps=80"]
COMMON = ["trainer.iterations=400", "trainer.eval_freq=40", "env.cache_size=3"] + DAPG
ARMS = {"bc": COMMON, "scratch": COMMON + ["policy.vla_config.model_path=null"]}
PLOT = REPO / "docs" / "metaworld_finetune.png"
EVAL_BATCH = 25  # envs stepped together by the recorder (one GL context each)


def per_task_success(policy: Any, params: Any, obs_stats: Any, env: Any, episodes: int, seed: int) -> dict:
    """{instruction: [successes, episodes]} and the mean over all episodes, deterministic actions."""
    import numpy as np

    from jaxrl_vla.eval import host_policy_act_fn, record_host_episodes, success_by_instruction
    from jaxrl_vla.models.policy import action_chunk_size

    act = host_policy_act_fn(policy, params, obs_stats)
    recorded = []
    for start in range(0, episodes, EVAL_BATCH):
        count = min(EVAL_BATCH, episodes - start)
        recorded += record_host_episodes(env, act, count, seed + start, action_chunk_size(policy))
    table = {k: list(v) for k, v in success_by_instruction(recorded).items()}
    return {"mean": float(np.mean([ep.success for ep in recorded])), "per_task": table}


def evaluate_start(arm: str, episodes: int, seed: int) -> dict:
    """The arm's starting policy (BC checkpoint or random init) on the evaluation episodes."""
    from jaxrl_vla.build import build_env, build_policy

    config = load_config(CONFIG, ARMS[arm])
    env = build_env(config["env"])
    policy, variables, _ = build_policy(json.loads(json.dumps(config["policy"])), env)
    return per_task_success(policy, variables, None, env, episodes, seed)


def evaluate_end(run_dir: Path, episodes: int, seed: int) -> dict:
    """The run's latest checkpoint on the evaluation episodes."""
    from jaxrl_vla.eval import load_run

    loaded = load_run(run_dir)
    return per_task_success(loaded.policy, loaded.params, loaded.obs_stats, loaded.env, episodes, seed)


def run_arm(name: str, minutes: float, output_dir: Path, core: int | None, episodes: int, seed: int,
            reuse_before: bool = False) -> dict:
    """Train one arm (pinned to `core`), evaluate before and after; returns its result line.

    Each evaluation runs in a fresh spawned process: its 25 MuJoCo envs with their GL contexts
    hold ~6 GB, which a Python process does not give back, and two arms' evaluators beside two
    training processes exceed the machine's 24 GB (an evaluator was OOM-killed once)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    overrides = ARMS[name]
    saved = output_dir / f"{name}_before.json"
    if reuse_before and saved.is_file():  # the starting policy's evaluation does not depend on the run
        before = json.loads(saved.read_text())
    else:
        before = in_subprocess(evaluate_start, name, episodes, seed)
        saved.write_text(json.dumps(before))
    print(json.dumps({"arm": name, "before": before}), flush=True)
    load_before = load_averages()
    run_dir = run_training(CONFIG, overrides, output_dir / name, minutes)
    load_after = load_averages()
    return {**summary(name, run_dir, before, episodes, seed, core), "load_before": load_before, "load_after": load_after}


def in_subprocess(fn: Any, *args: Any) -> Any:
    """fn(*args) in a fresh spawned process (its memory is returned to the machine when it ends)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()



def summary(name: str, run_dir: Path, before: dict, episodes: int, seed: int, core: int | None) -> dict:
    after = in_subprocess(evaluate_end, run_dir, episodes, seed)
    curve = read_curve(run_dir)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"bench": "metaworld_finetune", "arm": name, "run_dir": str(run_dir.relative_to(REPO)),
            "core": core, "eval_episodes": episodes, "before": before, "after": after,
            "env_steps": last.get("global_step"), "iterations": last.get("iteration"),
            "wall_s": curve[-1]["wall_s"] if curve else None, "curve": curve}


def plot(results: list[dict], path: Path) -> Path:
    """In-run evaluation success against wall time and env steps, each arm from its starting level."""
    return plot_success_curves(path, {r["arm"]: r["curve"] for r in results},
                               {r["arm"]: r["before"]["mean"] for r in results},
                               "Meta-World MT10: PPO in vla mode (one core per arm)",
                               labels={r["arm"]: f"{r['arm']} (start {r['before']['mean']:.0%})" for r in results})


def markdown(results: list[dict], minutes: float | None, info: dict) -> str:
    tasks = sorted({t for r in results for part in ("before", "after") for t in r[part]["per_task"]})
    pct = lambda wins_count: f"{wins_count[0] / wins_count[1]:.0%} ({wins_count[0]}/{wins_count[1]})"  # noqa: E731
    head = "| task | " + " | ".join(f"{r['arm']} before | {r['arm']} after" for r in results) + " |"
    rows = [head, "|---" * (1 + 2 * len(results)) + "|"]
    for task in tasks:
        cells = [pct(r[part]["per_task"].get(task, [0, 0])) if task in r[part]["per_task"] else "-"
                 for r in results for part in ("before", "after")]
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{r[part]['mean']:.1%}**" for r in results
                                            for part in ("before", "after")) + " |")
    runs = "; ".join(f"{r['arm']}: {r['env_steps']:,} env steps, {r['iterations']} iterations, {r['wall_s']} s"
                     + (f", load average 1/5/15 min {r['load_before']} at its start and {r['load_after']} at its end"
                        if r.get("load_before") else "")
                     for r in results)
    budget = f"{minutes:g} min per arm" if minutes else "existing runs"
    return (f"`MUJOCO_GL=egl python benchmarks/metaworld_finetune.py` ({budget}, both arms at once, each pinned to one "
            f"of the 2 cores); {machine_line(info)}. configs/metaworld/train_config_async.json from "
            "checkpoints/metaworld_bc.safetensors (bc) and from random weights (scratch); deterministic success "
            f"per task on the same {results[0]['eval_episodes']} seeded episodes before and after. {runs}. "
            "Curves: docs/metaworld_finetune.png.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget per arm")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the evaluation episodes' resets")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "metaworld_finetune")
    parser.add_argument("--arm", choices=sorted(ARMS), help="run only this arm (the parent runs both)")
    parser.add_argument("--core", type=int, help="pin --arm to this CPU core")
    parser.add_argument("--result", type=Path, help="--arm: write its result JSON here")
    parser.add_argument("--bc-run", type=Path, help="re-report an existing bc run")
    parser.add_argument("--scratch-run", type=Path, help="re-report an existing scratch run")
    parser.add_argument("--reuse-before", action="store_true",
                        help="take each arm's starting evaluation from OUTPUT_DIR/<arm>_before.json when it is there")
    args = parser.parse_args(argv)
    if args.arm:
        result = run_arm(args.arm, args.minutes, args.output_dir, args.core, args.eval_episodes, args.seed,
                         args.reuse_before)
        args.result.write_text(json.dumps(result))
        return 0
    ensure_checkpoint(load_config(CONFIG, []))
    existing = {"bc": args.bc_run, "scratch": args.scratch_run}
    results = []
    if all(existing.values()):
        for name, run_dir in existing.items():  # an arm's saved result or starting evaluation is reused
            finished = args.output_dir / f"{name}_result.json"
            if finished.is_file() and (REPO / json.loads(finished.read_text())["run_dir"]).resolve() == run_dir.resolve():
                results.append(json.loads(finished.read_text()))
                continue
            saved = args.output_dir / f"{name}_before.json"
            before = (json.loads(saved.read_text()) if saved.is_file()
                      else in_subprocess(evaluate_start, name, args.eval_episodes, args.seed))
            results.append(summary(name, run_dir.resolve(), before, args.eval_episodes, args.seed, None))
    else:
        cores = sorted(os.sched_getaffinity(0))
        args.output_dir.mkdir(parents=True, exist_ok=True)
        children = {}
        for i, name in enumerate(ARMS):
            out = args.output_dir / f"{name}_result.json"
            command = [sys.executable, __file__, "--arm", name, "--core", str(cores[i % len(cores)]),
                       "--minutes", str(args.minutes), "--eval-episodes", str(args.eval_episodes),
                       "--seed", str(args.seed), "--output-dir", str(args.output_dir), "--result", str(out)]
            command += ["--reuse-before"] if args.reuse_before else []
            children[name] = (subprocess.Popen(command, cwd=REPO), out)
        for name, (process, out) in children.items():
            if process.wait() != 0:
                raise SystemExit(f"arm {name} failed (exit {process.returncode})")
            results.append(json.loads(out.read_text()))
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}))
    plot(results, PLOT)
    write_section("metaworld_finetune", markdown(results, None if all(existing.values()) else args.minutes, machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
