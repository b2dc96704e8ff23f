"""Meta-World MT10 in vla (async) mode: env steps/s against the number of collectors.

    MUJOCO_GL=egl python benchmarks/metaworld_collectors.py                  # 1, 2, 4 collectors
    MUJOCO_GL=egl python benchmarks/metaworld_collectors.py --collectors 1 2 --iterations 6

Why: the simulator is CPU-bound (~140-175 steps/s per core at 64 px, see
metaworld_steps), so vla mode's collectors are what should scale collection.
Each run is the real CLI on configs/metaworld/train_config_async.json (8 envs,
split evenly across the collectors; the learner trains concurrently) with the
model from random weights (`policy.vla_config.model_path: null`), so no BC
checkpoint is needed: the speed of stepping does not depend on the weights.
Reported: the median of the trainer's own `sps` (env steps per second of wall
time per iteration) over the iterations after the first two (GL contexts, env
instances and XLA compilation happen there). One JSON line per run; the
`metaworld_collectors` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from _report import machine, machine_line, write_section  # noqa: E402

CONFIG = REPO / "configs" / "metaworld" / "train_config_async.json"
WARMUP_ITERATIONS = 2


def run(collectors: int, iterations: int, output_dir: Path) -> dict:
    """One CLI run with `collectors` collectors; its iterations' sps from metrics.jsonl."""
    overrides = {"trainer.num_collectors": collectors, "trainer.iterations": iterations, "trainer.eval_freq": 0,
                 "trainer.save_freq": 0, "policy.vla_config.model_path": None}
    command = [sys.executable, "-m", "jaxrl_vla.train", "--config", str(CONFIG), "--no-progress",
               "--output-dir", str(output_dir)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    load_before = os.getloadavg()[0]
    subprocess.run(command, cwd=REPO, env=env, check=True)
    (run_dir,) = [p for p in output_dir.iterdir() if p.is_dir()]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sps = [line["sps"] for line in lines if "sps" in line]
    timed = sps[WARMUP_ITERATIONS:]
    if not timed:
        raise RuntimeError(f"{run_dir}: fewer than {WARMUP_ITERATIONS + 1} iterations logged")
    return {"bench": "metaworld_collectors", "collectors": collectors, "num_envs": 8,
            "steps_per_s": round(statistics.median(timed), 1), "iterations_timed": len(timed),
            "sps_all": [round(s, 1) for s in sps], "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2)}


def markdown(results: list[dict], info: dict) -> str:
    base = results[0]["steps_per_s"]
    rows = ["| collectors | envs per collector | env steps/s | vs first row | load avg before / after |",
            "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['collectors']} | {8 // r['collectors']} | {r['steps_per_s']:,.1f} | "
                    f"{r['steps_per_s'] / base:.2f}x | {r['loadavg_1m_before']} / {r['loadavg_1m_after']} |")
    return ("`MUJOCO_GL=egl python benchmarks/metaworld_collectors.py` (configs/metaworld/train_config_async.json, "
            "MT10 at 64 px, 8 envs, random-init model, learner training concurrently; median iteration sps after "
            f"the first {WARMUP_ITERATIONS}); {machine_line(info)}.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collectors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    if any(8 % k for k in args.collectors):
        parser.error("--collectors: each count must divide the config's 8 envs")
    results = []
    for collectors in args.collectors:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(collectors, args.iterations, Path(tmp))
        print(json.dumps(result), flush=True)
        results.append(result)
    if not args.no_write:
        write_section("metaworld_collectors", markdown(results, machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
