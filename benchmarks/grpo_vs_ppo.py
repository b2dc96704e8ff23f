"""PPO against GRPO on the VLA example, from the same behaviour-cloned torch checkpoint, at the same wall time.

    python benchmarks/grpo_vs_ppo.py --minutes 10     # both runs, one after the other (BC checkpoint if missing)
    python benchmarks/grpo_vs_ppo.py --ppo-run runs/grpo_vs_ppo/ppo/... --grpo-run runs/grpo_vs_ppo/grpo/...

The PPO arm is configs/vla_example/train_config.json, the GRPO arm
configs/vla_example/train_config_grpo.json (same checkpoint, model, demonstration and
auxiliary losses, env and env-step budget; groups of 8 episodes from one scene, the
binary success as outcome, SimpleVLA-RL's dynamic-sampling filter 0.1-0.9 and clip
0.2 / 0.28). Each run is the real CLI in a subprocess, stopped by SIGINT at the wall
budget (`finetune_curve.run_training`). Output: one JSON line per run, the success
curves against wall time and env steps in docs/grpo_vs_ppo.png, and the `grpo_vs_ppo`
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from _report import machine, machine_line, write_section  # noqa: E402
from finetune_curve import ensure_checkpoint, initial_level, load_config, read_curve, run_training  # noqa: E402

ARMS = {"ppo": REPO / "configs" / "vla_example" / "train_config.json",
        "grpo": REPO / "configs" / "vla_example" / "train_config_grpo.json"}
PLOT = REPO / "docs" / "grpo_vs_ppo.png"


def plot(curves: dict[str, list[dict]], start: dict, path: Path) -> Path:
    """Evaluation success against wall time and against env steps, one line per algorithm."""
    from _report import plot_success_curves

    return plot_success_curves(path, curves, {name: start["success_rate"] for name in curves}, "VLReach-v0: PPO vs GRPO",
                               baseline=start["success_rate"], labels={name: name.upper() for name in curves})


def summary(name: str, run_dir: Path, curve: list[dict], start: dict) -> dict:
    last = curve[-1] if curve else {}
    return {"bench": "grpo_vs_ppo", "algorithm": name, "run_dir": str(run_dir),
            "initial_success": start["success_rate"], "final_success": last.get("success_rate"),
            "best_success": max((p["success_rate"] for p in curve), default=None),
            "env_steps": last.get("global_step"), "wall_s": last.get("wall_s"), "evaluations": len(curve)}


def markdown(results: list[dict], minutes: float | None, info: dict) -> str:
    rows = ["| algorithm | BC start | final success | best success | env steps | wall s |", "|---|---|---|---|---|---|"]
    for r in results:
        pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        rows.append(f"| {r['algorithm'].upper()} | {pct(r['initial_success'])} | {pct(r['final_success'])} | "
                    f"{pct(r['best_success'])} | {r['env_steps'] or '-'} | {r['wall_s'] or '-'} |")
    budget = f"{minutes:g} min per run" if minutes else "existing runs"
    return (f"`python benchmarks/grpo_vs_ppo.py` ({budget}); {machine_line(info)}. Same BC checkpoint, model, "
            "demonstration and auxiliary losses; PPO: configs/vla_example/train_config.json, GRPO: "
            "configs/vla_example/train_config_grpo.json. Curves: docs/grpo_vs_ppo.png.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per run")
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "grpo_vs_ppo")
    parser.add_argument("--ppo-run", type=Path, help="re-report an existing PPO run instead of training")
    parser.add_argument("--grpo-run", type=Path, help="re-report an existing GRPO run instead of training")
    args = parser.parse_args(argv)
    configs = {name: load_config(path, []) for name, path in ARMS.items()}
    checkpoint = ensure_checkpoint(configs["ppo"])
    start = initial_level(configs["ppo"], checkpoint)
    existing = {"ppo": args.ppo_run, "grpo": args.grpo_run}
    runs = {name: existing[name] or run_training(ARMS[name], [], args.output_dir / name, args.minutes) for name in ARMS}
    curves = {name: read_curve(run) for name, run in runs.items()}
    results = [summary(name, runs[name], curves[name], start) for name in ARMS]
    for result in results:
        print(json.dumps(result))
    plot(curves, start, PLOT)
    fresh = not (args.ppo_run or args.grpo_run)
    write_section("grpo_vs_ppo", markdown(results, args.minutes if fresh else None, machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
