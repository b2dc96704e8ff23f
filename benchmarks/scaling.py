"""Scaling on this CPU: the example VLA's PPO iteration against device count and data x fsdp splits.

    python benchmarks/scaling.py                 # 1, 2, 4 forced host devices, and 4 as 4x1, 2x2, 1x4 (~5 min on 2 cores)
    python benchmarks/scaling.py --iterations 4 --no-write
    python benchmarks/scaling.py --splits 2:2:1 4:2:2     # DEVICES:DATA:FSDP

The model is configs/vla_example's (tiny ResNet + 4-layer 64-wide GPT-2, 32 envs x 16 steps, 2 epochs x 8
minibatches of 64), from random weights (scratch_config.json) and without the demonstration loss, so that
nothing needs the BC checkpoint. Each split runs in a fresh process whose CPU is split into DEVICES JAX
devices (XLA_FLAGS=--xla_force_host_platform_device_count; what `trainer.cpu_devices` does), with
`trainer.mesh: {data, fsdp}`. Measured per split:

  sps, iteration_s   the Trainer's env steps per second and seconds per iteration as it logs them (rollout +
                     update, one jitted call per iteration), median over the iterations after the first
  update_s           the PPO update alone (GAE + 2 epochs x 8 minibatches) on one rollout, jitted with the
                     run's shardings, median of 3
  rollout_s          the rollout alone (16 steps of 32 envs), median of 3
  state_mib_per_device  parameters + Adam state held by one device (its addressable shards)
  program_mib_per_device  XLA's memory analysis of the iteration program per device: arguments + outputs -
                     aliased (donated) + temporaries

Prints one JSON line per split ({"bench": "scaling", ...}) on stdout, then writes the `scaling` section of
BENCHMARKS.md (--no-write to skip). On a 2-core machine more than 2 devices only timeshare the cores: the
rows say what the split costs in collectives and memory, not what more cores would buy. GPU figures come
from a lent device (docs/scaling.md), not from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRATCH = REPO / "configs" / "vla_example" / "scratch_config.json"
DEFAULT_SPLITS = ["1:1:1", "2:2:1", "4:4:1", "4:2:2", "4:1:4"]
MIB = 2**20


def overrides(iterations: int, data: int, fsdp: int, output_dir: str) -> list[str]:
    return [
        "algorithm.demo_path=null", "algorithm.demo_augment=false", "algorithm.cfg.demo_coef=0",
        f"trainer.iterations={iterations}", "trainer.eval_freq=0", "trainer.save_freq=0",
        "trainer.iterations_per_call=1", "trainer.progress=false", f"trainer.output_dir={output_dir}",
        f"trainer.mesh.data={data}", f"trainer.mesh.fsdp={fsdp}",
    ]


def _median_time(fn, repeats: int = 3) -> float:
    import jax

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(devices: int, data: int, fsdp: int, iterations: int) -> dict:
    """One split, in this (fresh) process: train, then time the rollout and the update apart."""
    import jax

    sys.path.insert(0, str(REPO))
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config
    from jaxrl_vla.training import sharding

    assert jax.device_count() == devices, (jax.device_count(), devices)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(SCRATCH, overrides(iterations, data, fsdp, tmp))
        trainer = build_trainer(cfg)
        trainer.log_fn = records.append
        t0 = time.perf_counter()
        state = trainer.train()
        wall = time.perf_counter() - t0
        steady = records[1:] or records
        program = trainer._step().memory_analysis()
        # the rollout and the update apart, with the run's shardings
        rollout, learn = trainer._rollout_and_learn(trainer.policy.apply, trainer._demo_encoder)
        replicated = sharding.replicated(trainer.mesh)
        roll = jax.jit(lambda s: rollout(s.params, s.obs_stats, s.env_state, s.obs, s.key, s.iteration))
        _, _, transitions, last_value, _ = jax.block_until_ready(roll(state))
        update = jax.jit(lambda s, t, v: learn(s, t, v, None), out_shardings=(trainer._state_shardings, replicated))
        jax.block_until_ready(update(state, transitions, last_value))  # compile
        update_s = _median_time(lambda: update(state, transitions, last_value))
        rollout_s = _median_time(lambda: roll(state))
    held = jax.tree_util.tree_leaves((state.params, state.opt_state))
    first = jax.devices()[0]
    state_bytes = sum(s.data.nbytes for x in held for s in x.addressable_shards if s.device == first)
    program_bytes = (program.argument_size_in_bytes + program.output_size_in_bytes - program.alias_size_in_bytes
                     + program.temp_size_in_bytes)
    return {
        "bench": "scaling",
        "devices": devices, "data": data, "fsdp": fsdp,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
        "sharded_params": sharding.describe_params(trainer.mesh, state.params),
        "iterations": iterations,
        "sps": statistics.median(r["sps"] for r in steady),
        "iteration_s": statistics.median(r["iteration_time"] for r in steady),
        "first_iteration_s": records[0]["iteration_time"],
        "update_s": update_s,
        "rollout_s": rollout_s,
        "state_mib_per_device": state_bytes / MIB,
        "program_mib_per_device": program_bytes / MIB,
        "wall_s": wall,
    }


def run_split(split: str, iterations: int) -> dict:
    devices, data, fsdp = (int(x) for x in split.split(":"))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [sys.executable, __file__, "--child", split, "--iterations", str(iterations)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        return {"bench": "scaling", "devices": devices, "data": data, "fsdp": fsdp,
                "error": (errors or proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], iterations: int, info: dict) -> str:
    from _report import machine_line

    lines = [
        "## scaling",
        "",
        f"`python benchmarks/scaling.py` (configs/vla_example's model from random weights, no demonstration loss; "
        f"{iterations} iterations per split, medians after the first). CPU only: no GPU was lent to this measurement. "
        f"Host devices are forced on {info.get('cpu_affinity')} cores shared with other jobs "
        f"(load {info.get('loadavg_1m')}), so 4 devices timeshare 2 cores; read the rows for the cost of a split "
        "(collectives, memory per device), not for speed-up.",
        "",
        "| devices | data x fsdp | env steps/s | iteration s | update s | rollout s | params+Adam MiB / device | program MiB / device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['devices']} | {r['data']} x {r['fsdp']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['devices']} | {r['data']} x {r['fsdp']} | {r['sps']:,.0f} | {r['iteration_s']:.3f} | "
                     f"{r['update_s']:.3f} | {r['rollout_s']:.3f} | {r['state_mib_per_device']:.2f} | "
                     f"{r['program_mib_per_device']:.1f} |")
    ok = [r for r in results if "error" not in r]
    if ok:
        lines += ["", f"Parameters: {ok[0]['params']:,}; with fsdp > 1, " +
                  "; ".join(f"{r['data']}x{r['fsdp']}: {r['sharded_params']}" for r in ok if r["fsdp"] > 1) + "."]
    return "\n".join(lines) + "\n\n" + machine_line(info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6, help="training iterations per split (the first compiles)")
    parser.add_argument("--splits", nargs="+", default=DEFAULT_SPLITS, metavar="DEVICES:DATA:FSDP")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--child", metavar="DEVICES:DATA:FSDP", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first iteration compiles)")
    if args.child:
        devices, data, fsdp = (int(x) for x in args.child.split(":"))
        print(json.dumps(child(devices, data, fsdp, args.iterations)), flush=True)
        return 0
    for split in args.splits:
        parts = split.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--splits {split!r}: expected DEVICES:DATA:FSDP, positive integers")
        if int(parts[1]) * int(parts[2]) != int(parts[0]):
            parser.error(f"--splits {split!r}: data x fsdp must equal the device count")
    sys.path.insert(0, str(HERE))
    from _report import machine, write_section

    results = []
    for split in args.splits:
        print(f"split {split} ...", file=sys.stderr, flush=True)
        result = run_split(split, args.iterations)
        print(json.dumps(result), flush=True)
        results.append(result)
    if not args.no_write:
        info = machine()
        write_section("scaling", markdown(results, args.iterations, info))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
