"""The flow-matching head (Flow-Noise, Flow-SDE) against the Gaussian head, PPO from behaviour cloning, same wall time.

    python benchmarks/flow_vs_gaussian.py --minutes 15                # the three arms at once, unpinned
    python benchmarks/flow_vs_gaussian.py --minutes 8 --sequential    # one after the other
    python benchmarks/flow_vs_gaussian.py --run gaussian=runs/... --run flow_noise=runs/... --run flow_sde=runs/...

Arms (the SmolVLM-shaped VLA of bridge.tiny_smolvlm on VLReach-v0, the PPO settings of
configs/vla_example/smolvlm_gaussian_bc.json in all three):
- gaussian:   configs/vla_example/smolvlm_gaussian_bc.json, from checkpoints/tiny_smolvlm_bc (torch BC of
              the Gaussian head, `python -m bridge.tiny_smolvlm bc`);
- flow_noise: configs/vla_example/smolvlm_flow_noise.json and
- flow_sde:   configs/vla_example/smolvlm_flow_sde.json, both from checkpoints/tiny_smolvlm_flow_bc (JAX BC of
              the flow head with pi0's flow-matching loss, `python -m bridge.tiny_smolvlm bc --head flow`).
A missing checkpoint is made first with the config's `make_checkpoint` command.

Each run is the real CLI in a subprocess, stopped by SIGINT at the wall budget (`finetune_curve.run_training`;
wall time from process start, imports and compilation included). By default the three run at once, unpinned,
so they share the machine's cores about equally (`--sequential` runs them one after the other). Success
before and after is the Trainer's deterministic evaluation on the same seeded episodes for every arm
(trainer.seed 0: PRNGKey(1), num_eval_episodes of them): before = the BC directory as the config loads it,
after = the run's final checkpoint. Output: one JSON line per arm, the curves against wall time and env
steps in docs/flow_vs_gaussian.png, and the `flow_vs_gaussian` section of BENCHMARKS.md (with the load
averages before and after and the machine line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from _report import machine, machine_line, write_section  # noqa: E402
from finetune_curve import load_config, read_curve, run_training  # noqa: E402

CONFIGS = REPO / "configs" / "vla_example"
ARMS = {"gaussian": CONFIGS / "smolvlm_gaussian_bc.json",
        "flow_noise": CONFIGS / "smolvlm_flow_noise.json",
        "flow_sde": CONFIGS / "smolvlm_flow_sde.json"}
LABELS = {"gaussian": "Gaussian head", "flow_noise": "flow head, Flow-Noise", "flow_sde": "flow head, Flow-SDE"}
PLOT = REPO / "docs" / "flow_vs_gaussian.png"
DEFAULT_SET = ["trainer.eval_freq=10"]  # more points on the curves than the configs' 20
# The configs' 80 iterations took 9 min per arm with the three arms and another benchmark's two runs sharing
# 2 cores (2.7 s per iteration), so they would end before a longer budget: --iterations raises the count so
# that the wall budget stops every arm (the linear rate decay then spans the larger count, in every arm alike).
ITERATIONS = 1000  # ~1.5-3 s each: more than any budget here lets run


def checkpoint_dir(config: dict) -> Path:
    """The config's BC directory, made with its `make_checkpoint` command first when it has no bc.json."""
    vla = config["policy"]["vla_config"]
    path = Path(vla["model_path"])
    path = path if path.is_absolute() else REPO / path
    if not (path / "bc.json").is_file():
        command = vla["make_checkpoint"].split()
        command[command.index("--out") + 1] = str(path)
        print(f"{path} is missing: running {' '.join(command)}", flush=True)
        subprocess.run([sys.executable if command[0] == "python" else command[0], *command[1:]], cwd=REPO, check=True)
    return path


def evaluate(config: dict, model_path: Path, params: dict | None = None) -> dict:
    """The Trainer's deterministic evaluation (its episodes: PRNGKey(trainer.seed + 1)) of the config's policy
    loaded from `model_path`, or with the policy parameters `params` (a run's checkpoint) in its place."""
    import jax

    from bridge.pretrain_bc import evaluate_policy
    from jaxrl_vla.build import build_env, build_policy
    from jaxrl_vla.models.vla_policy import unwrap_variables

    policy_cfg = json.loads(json.dumps(config["policy"]))
    policy_cfg["vla_config"]["model_path"] = str(model_path)
    env = build_env(config["env"])
    policy, variables, _ = build_policy(policy_cfg, env)
    if params is not None:
        variables = jax.tree_util.tree_map(jax.numpy.asarray, params)
    trainer = config["trainer"]
    return evaluate_policy(policy.model, unwrap_variables(variables), env, trainer["num_eval_episodes"],
                           trainer["seed"] + 1)


def final_level(config: dict, model_path: Path, run_dir: Path) -> dict:
    from jaxrl_vla.eval import load_run

    run = load_run(run_dir)
    return {**evaluate(config, model_path, run.params), "iteration": run.iteration}


def plot(curves: dict[str, list[dict]], starts: dict[str, dict], path: Path) -> Path:
    """Evaluation success against wall time and against env steps, one line per arm from its BC level."""
    from _report import plot_success_curves

    return plot_success_curves(path, curves, {name: starts[name]["success_rate"] for name in curves},
                               "VLReach-v0, SmolVLM-shaped VLA: PPO from BC", labels=LABELS,
                               colours={"gaussian": "tab:blue", "flow_noise": "tab:orange", "flow_sde": "tab:green"})


def summary(name: str, run_dir: Path, curve: list[dict], start: dict, final: dict, bc: dict) -> dict:
    last = curve[-1] if curve else {}
    return {"bench": "flow_vs_gaussian", "arm": name, "run_dir": str(run_dir),
            "bc_success": start["success_rate"], "final_success": final["success_rate"],
            "best_eval_success": max((p["success_rate"] for p in curve), default=None),
            "final_iteration": final.get("iteration"), "env_steps": last.get("global_step"),
            "wall_s": last.get("wall_s"), "evaluations": len(curve), "episodes": start["episodes"],
            "bc_train_seconds": bc.get("train_seconds"), "bc_steps": bc.get("steps")}


def markdown(results: list[dict], minutes: float | None, mode: str, load: dict, info: dict) -> str:
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    rows = ["| arm | BC success | final success | change | best eval | iterations | env steps | wall s (last eval) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        change = None if r["final_success"] is None else r["final_success"] - r["bc_success"]
        rows.append(f"| {LABELS.get(r['arm'], r['arm'])} | {pct(r['bc_success'])} | {pct(r['final_success'])} | "
                    f"{'-' if change is None else f'{100 * change:+.1f} pts'} | {pct(r['best_eval_success'])} | "
                    f"{r['final_iteration'] if r['final_iteration'] is not None else '-'} | {r['env_steps'] or '-'} | "
                    f"{r['wall_s'] or '-'} |")
    budget = f"{minutes:g} min per arm, {mode}" if minutes else "existing runs"
    iterations = results[0].get("iterations_planned") if results else None
    if iterations:
        budget += f", trainer.iterations={iterations}"
    loads = ", ".join(f"{k} the runs {v[0]:.2f}/{v[1]:.2f}/{v[2]:.2f}" for k, v in load.items() if v)
    episodes = results[0]["episodes"] if results else "-"
    return (f"`python benchmarks/flow_vs_gaussian.py` ({budget}). The SmolVLM-shaped VLA of bridge.tiny_smolvlm "
            "on VLReach-v0, PPO with the settings of configs/vla_example/smolvlm_gaussian_bc.json in every arm: "
            "the Gaussian head (smolvlm_gaussian_bc.json, from the torch BC checkpoints/tiny_smolvlm_bc) against "
            "the flow-matching head sampled by Flow-Noise (smolvlm_flow_noise.json) and by Flow-SDE "
            "(smolvlm_flow_sde.json), both from the JAX flow-matching BC checkpoints/tiny_smolvlm_flow_bc. "
            f"Success: deterministic, on the same {episodes} seeded evaluation episodes for every arm; BC = the "
            "directory as the config loads it, final = the run's last checkpoint. Curves: docs/flow_vs_gaussian.png."
            f"\n\n" + "\n".join(rows) + f"\n\n1/5/15-min load averages: {loads}. {machine_line(info)}\n")


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, _, path = item.partition("=")
        if name not in ARMS or not path:
            raise SystemExit(f"error: --run {item!r}: expected ARM=RUN_DIR with ARM one of {list(ARMS)}")
        runs[name] = Path(path)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget per arm (default 15)")
    parser.add_argument("--sequential", action="store_true", help="one arm after the other (default: all at once)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "flow_vs_gaussian")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"config override for every arm (default {DEFAULT_SET})")
    parser.add_argument("--run", action="append", default=[], metavar="ARM=RUN_DIR",
                        help="re-report an existing run for that arm instead of training it")
    parser.add_argument("--iterations", type=int, default=ITERATIONS,
                        help=f"trainer.iterations of every arm (default {ITERATIONS}, so the wall budget binds; "
                             "0: the configs' own 80)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args(argv)
    overrides = list(DEFAULT_SET if args.set is None else args.set)
    if args.iterations:
        overrides.append(f"trainer.iterations={args.iterations}")
    existing = parse_runs(args.run)
    os.chdir(REPO)  # the configs' model_path is relative to the repository, as in the runs' own processes
    configs = {name: load_config(ARMS[name], overrides) for name in args.arms}
    dirs = {name: checkpoint_dir(configs[name]) for name in args.arms}
    bc = {name: json.loads((dirs[name] / "bc.json").read_text()) for name in args.arms}
    load = {"before": _load()}
    todo = [name for name in args.arms if name not in existing]
    train = lambda name: run_training(ARMS[name], overrides, args.output_dir / name, args.minutes)  # noqa: E731
    t0 = time.perf_counter()
    if args.sequential:
        runs = {name: train(name) for name in todo}
    else:
        with ThreadPoolExecutor(max_workers=max(len(todo), 1)) as pool:
            runs = dict(zip(todo, pool.map(train, todo)))
    load["after"] = _load()
    print(f"training: {time.perf_counter() - t0:.0f} s; evaluating (BC and final, the same episodes)", flush=True)
    runs.update(existing)
    # the evaluations after the timed runs, so none of them shares the cores with a run
    starts = {name: evaluate(configs[name], dirs[name]) for name in args.arms}
    curves = {name: read_curve(runs[name]) for name in args.arms}
    finals = {name: final_level(configs[name], dirs[name], runs[name]) for name in args.arms}
    results = [{**summary(name, runs[name], curves[name], starts[name], finals[name], bc[name]),
                "iterations_planned": configs[name]["trainer"]["iterations"]} for name in args.arms]
    for result in results:
        print(json.dumps(result), flush=True)
    plot(curves, starts, PLOT)
    mode = "one after the other" if args.sequential else f"{len(todo)} at once, unpinned, sharing the cores"
    write_section("flow_vs_gaussian", markdown(results, None if existing else args.minutes, mode, load, machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
