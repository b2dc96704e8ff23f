"""What pretraining buys: PPO fine-tuning of the behaviour-cloned torch VLA against its random-init twin.

    python benchmarks/finetune_curve.py                   # ~45 min on 2 cores: BC checkpoint (if missing), both runs
    python benchmarks/finetune_curve.py --minutes 5       # a shorter wall-clock budget per run
    python benchmarks/finetune_curve.py --pretrained-run runs/finetune_curve/pretrained/vla_example-... \\
        --scratch-run runs/finetune_curve/scratch/vla_scratch-...         # re-plot and re-report existing runs

The headline demo of the project (issues 6 and 7), measured end to end:
1. the torch checkpoint `checkpoints/vl_reach_bc.safetensors` (made by
   `python -m bridge.pretrain_bc` when missing) is fine-tuned by
   `python -m jaxrl_vla.train --config configs/vla_example/train_config.json`;
2. the same run from random weights (`configs/vla_example/scratch_config.json`:
   same model, same PPO settings, same env steps and wall-clock cap);
3. evaluation success rate and return against env steps are plotted to
   docs/finetune_curve.png, with the pretrained (BC) level as a horizontal line
   and each run's step-0 level measured the Trainer's way (same episodes);
4. the fine-tuned parameters are exported back to torch (`unwrap_variables`,
   then `bridge.export_to_torch`), loaded into the torch class with
   strict=True, and its action means compared with the JAX policy's on a
   batch of observations: the round trip a VLA team needs;
5. one JSON line per result, and the `finetune` section of BENCHMARKS.md.

Runs are subprocesses of the real CLI. Wall time is measured from the start of
that process (imports, checkpoint conversion and compilation included), by
stamping each metrics.jsonl line as it appears; the stamps are kept in the run
directory (`wall_clock.jsonl`) so re-reporting an existing run keeps them. A
run past its `--minutes` budget gets SIGINT, which the Trainer answers by
finishing its iteration and checkpointing (exit code 130).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # for _report
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from _report import machine, machine_line, write_section  # noqa: E402

PRETRAINED_CONFIG = REPO / "configs" / "vla_example" / "train_config.json"
SCRATCH_CONFIG = REPO / "configs" / "vla_example" / "scratch_config.json"
WALL_CLOCK = "wall_clock.jsonl"
TARGET = 0.9


# ---------------------------------------------------------------------------- running


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained-run", help="existing run directory of the fine-tuning (skips running it)")
    parser.add_argument("--scratch-run", help="existing run directory of the random-init twin (skips running it)")
    parser.add_argument("--skip-scratch", action="store_true", help="no random-init baseline")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap per run (default 20)")
    parser.add_argument("--iterations", type=int, help="override trainer.iterations of both runs (same env steps)")
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "finetune_curve"), help="where new runs go")
    parser.add_argument("--checkpoint", default=None,
                        help="BC checkpoint (default: the config's model_path; made with its make_checkpoint when missing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for both runs (repeatable)")
    parser.add_argument("--png", default=str(REPO / "docs" / "finetune_curve.png"), help="plot path")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return parser.parse_args(argv)


def load_config(path: Path, overrides: list[str]) -> dict:
    """The resolved config a run will use (validated like the CLI does)."""
    from jaxrl_vla.config import load_config as load

    return load(path, overrides)


def ensure_checkpoint(config: dict) -> Path:
    """The config's checkpoint, made with its `make_checkpoint` command first if it is missing."""
    vla = config["policy"]["vla_config"]
    path = Path(vla["model_path"])
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        command = vla["make_checkpoint"].split()
        command[command.index("--out") + 1] = str(path)
        print(f"{path} is missing: running {' '.join(command)}", flush=True)
        subprocess.run([sys.executable if command[0] == "python" else command[0], *command[1:]], cwd=REPO, check=True)
    return path


def run_training(config_path: Path, overrides: list[str], output_dir: Path, minutes: float) -> Path:
    """Run the training CLI in a subprocess; returns its run directory (with wall_clock.jsonl).

    Polls metrics.jsonl twice a second and stamps each new line with the time
    since the process started; SIGINT after `minutes` (a clean stop).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.iterdir())
    command = [sys.executable, "-m", "jaxrl_vla.train", "--config", str(config_path), "--no-progress",
               "--output-dir", str(output_dir)]
    for override in overrides:
        command += ["--set", override]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    stamps: list[dict] = []
    run_dir, interrupted = None, False
    while True:
        done = process.poll() is not None
        if run_dir is None:
            new = sorted(set(output_dir.iterdir()) - before)
            run_dir = new[0] if new else None
        if run_dir is not None:
            stamps += new_stamps(run_dir / "metrics.jsonl", len(stamps), time.perf_counter() - start)
        if done:
            break
        if not interrupted and time.perf_counter() - start > minutes * 60:
            print(f"wall-clock budget of {minutes} min reached: stopping the run (SIGINT)", flush=True)
            process.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.5)
    if process.returncode not in (0, 130) or run_dir is None:
        raise RuntimeError(f"training exited with {process.returncode}: {' '.join(command)}")
    with open(run_dir / WALL_CLOCK, "w", encoding="utf-8") as f:
        for stamp in stamps:
            f.write(json.dumps(stamp) + "\n")
    return run_dir


def new_stamps(metrics: Path, seen: int, wall_s: float) -> list[dict]:
    """Wall-clock stamps for the complete metrics lines past the first `seen`."""
    if not metrics.is_file():
        return []
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    complete = [line for line in lines[seen:] if line.endswith("\n")]
    return [{"iteration": json.loads(line)["iteration"], "wall_s": round(wall_s, 2)} for line in complete]


# ---------------------------------------------------------------------------- reading


def read_curve(run_dir: Path) -> list[dict]:
    """The run's evaluations: global_step, success_rate, return_mean, wall_s (None when unknown)."""
    stamps = {}
    if (run_dir / WALL_CLOCK).is_file():
        for line in (run_dir / WALL_CLOCK).read_text().splitlines():
            stamp = json.loads(line)
            stamps[stamp["iteration"]] = stamp["wall_s"]
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("eval/success_rate") is not None:
            curve.append({"global_step": record["global_step"], "success_rate": record["eval/success_rate"],
                          "return_mean": record["eval/return_mean"], "wall_s": stamps.get(record["iteration"])})
    return curve


def first_reach(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target` success."""
    return next((point for point in curve if point["success_rate"] >= target), None)


def initial_level(config: dict, checkpoint: Path | None) -> dict:
    """Step-0 evaluation of a run's starting policy on the Trainer's evaluation episodes.

    The Trainer evaluates num_eval_episodes first episodes with key
    PRNGKey(seed + 1) and deterministic actions; `evaluate_policy` is that same
    function, so this point sits on the run's curve.
    """
    from bridge.pretrain_bc import evaluate_policy
    from jaxrl_vla.build import build_env, build_policy
    from jaxrl_vla.models.vla_policy import unwrap_variables

    policy_cfg = json.loads(json.dumps(config["policy"]))
    policy_cfg["vla_config"]["model_path"] = str(checkpoint) if checkpoint else None
    env = build_env(config["env"])
    policy, variables, _ = build_policy(policy_cfg, env)
    trainer = config["trainer"]
    return evaluate_policy(policy.model, unwrap_variables(variables), env, trainer["num_eval_episodes"],
                           trainer["seed"] + 1)


# ---------------------------------------------------------------------------- export round trip


def export_round_trip(run_dir: Path, batch: int = 64) -> dict:
    """Export the run's final policy to torch, reload it strictly, compare action means with JAX."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from bridge import export_to_torch
    from bridge.vla_loading import resolve_model_class
    from jaxrl_vla.eval import load_run
    from jaxrl_vla.models.vla_policy import unwrap_variables

    run = load_run(run_dir)
    vla = run.config["policy"]["vla_config"]
    path = export_to_torch(unwrap_variables(run.params), vla["model_class"], vla["model_config"],
                           run_dir / "export" / "vl_reach_ppo.safetensors",
                           source=vla.get("model_path"))  # keeps BatchNorm's num_batches_tracked
    model = resolve_model_class(vla["model_class"])(vla["model_config"])
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    obs = observation_batch(run.env, batch)
    jax_means = np.asarray(run.policy.apply(run.params, obs)[0].mean)
    with torch.no_grad():
        torch_means = model({k: torch.from_numpy(np.array(v)) for k, v in obs.items()}).numpy()
    return {"path": str(path), "batch": batch, "max_abs_diff": float(np.abs(jax_means - torch_means).max()),
            "bytes": path.stat().st_size}


def observation_batch(env: Any, batch: int, seed: int = 7) -> dict:
    """Observations from fresh resets plus a few random steps (effectors away from their start)."""
    import jax

    from jaxrl_vla.envs.wrappers import VecEnv

    vec = VecEnv(env, batch)
    key = jax.random.PRNGKey(seed)
    state, obs = vec.reset(key)
    for i in range(3):
        action = jax.random.uniform(jax.random.fold_in(key, i), (batch,) + env.action_space.shape, minval=-1, maxval=1)
        state, step = vec.step(state, action)
        obs = step.obs
    return jax.device_get(obs)


# ---------------------------------------------------------------------------- plot & report


def plot(curves: dict[str, list[dict]], starts: dict[str, dict], bc_level: float, path: Path) -> Path:
    """Success rate and return against env steps, the BC level and the 90% target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_success, ax_return) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"pretrained": "tab:blue", "scratch": "tab:orange"}
    labels = {"pretrained": "PPO from the BC checkpoint", "scratch": "PPO from random init"}
    for name, curve in curves.items():
        steps = [0] + [p["global_step"] for p in curve]
        ax_success.plot(steps, [starts[name]["success_rate"]] + [p["success_rate"] for p in curve],
                        marker=".", color=colours[name], label=labels[name])
        ax_return.plot(steps, [starts[name]["return_mean"]] + [p["return_mean"] for p in curve],
                       marker=".", color=colours[name], label=labels[name])
    ax_success.axhline(bc_level, color="tab:blue", linestyle="--", linewidth=1, label=f"pretrained (BC) level {bc_level:.0%}")
    ax_success.axhline(TARGET, color="grey", linestyle=":", linewidth=1, label=f"target {TARGET:.0%}")
    ax_success.set(xlabel="env steps", ylabel="eval success rate (deterministic)", ylim=(0, 1.02),
                   title="VLReach-v0: success")
    ax_return.set(xlabel="env steps", ylabel="eval return (deterministic)", title="VLReach-v0: return")
    ax_success.legend(loc="lower right", fontsize=8)
    ax_return.legend(loc="lower right", fontsize=8)
    for ax in (ax_success, ax_return):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_episode_lengths(run_dir: Path, window: int = 10) -> tuple[float | None, float | None]:
    """Mean training-episode length over the first and the last `window` iterations.

    Why it is reported: a policy that cannot yet tell the target from the
    other objects can learn to touch nothing (a timeout) when a wrong touch
    costs more than it expects to win, which shows as episodes getting longer
    while success does not rise. VLReach's default reward (no wrong-object
    penalty) removes that incentive; this column shows whether it worked.
    """
    lengths = [json.loads(line).get("episode_length_mean") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lengths = [x for x in lengths if x is not None]
    if not lengths:
        return None, None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return mean(lengths[:window]), mean(lengths[-window:])


def summarise(name: str, run_dir: Path, curve: list[dict], start: dict) -> dict:
    """One result line: start, final and best success, and steps / wall time to the target."""
    reach = first_reach(curve, TARGET)
    last = curve[-1] if curve else {}
    early_length, late_length = training_episode_lengths(run_dir)
    return {
        "bench": "finetune", "run": name, "run_dir": str(run_dir),
        "initial_success": start["success_rate"], "final_success": last.get("success_rate"),
        "best_success": max((p["success_rate"] for p in curve), default=None),
        "final_return": last.get("return_mean"), "env_steps": last.get("global_step"), "wall_s": last.get("wall_s"),
        "steps_to_target": reach["global_step"] if reach else None,
        "wall_s_to_target": reach["wall_s"] if reach else None, "target": TARGET,
        "episode_length_first_10": early_length, "episode_length_last_10": late_length,
    }


def reading(result: dict) -> str:
    """One sentence per run saying, from its numbers, whether it reached the target and what changed."""
    name = {"pretrained": "From the BC checkpoint", "scratch": "From random weights"}.get(result["run"], result["run"])
    start, final, best = result["initial_success"], result["final_success"], result["best_success"]
    if result["steps_to_target"] is not None:
        verdict = (f"reached {TARGET:.0%} success after {result['steps_to_target']:,} env steps "
                   f"({fmt(result['wall_s_to_target'], '.0f')} s)")
    else:
        verdict = f"did not reach the {TARGET:.0%} target within {fmt(result['env_steps'], ',')} env steps"
    sentence = (f"{name}: {verdict}; success {fmt(start, '.1%')} at step 0, best {fmt(best, '.1%')}, "
                f"final {fmt(final, '.1%')}")
    early, late = result["episode_length_first_10"], result["episode_length_last_10"]
    if early is not None and late is not None:
        sentence += f"; training episodes went from {early:.1f} to {late:.1f} steps"
        if late > 1.3 * early and final is not None and start is not None and final < start:
            sentence += (" (longer episodes with lower success: the policy learned to move slower and hesitate "
                         "near objects rather than to tell the target apart)")
    return sentence + "."


def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def aux_text(config: dict) -> str:
    """The run's auxiliary loss in words (the section must say when PPO had a supervised helper)."""
    target, coef = config["policy"].get("auxiliary_target"), config["algorithm"]["cfg"].get("aux_coef", 0.0)
    if not target:
        return "none"
    names = " and ".join([target] if isinstance(target, str) else target)
    return f"{coef} x MSE of a head predicting {names} (privileged, training only)"


def lr_scale_text(config: dict) -> str:
    """policy.lr_scale as "vision x0.3" (the per-module learning rates), or "none"."""
    scales = config["policy"].get("lr_scale") or {}
    return ", ".join(f"{prefix} x{scale:g}" for prefix, scale in sorted(scales.items())) or "none"


def demo_text(config: dict) -> str:
    """The run's demonstration loss in words (both runs use it when the config does)."""
    path, coef = config["algorithm"].get("demo_path"), config["algorithm"]["cfg"].get("demo_coef", 0.0)
    if not path:
        return "none"
    augmented = ", each draw recoloured and mirrored afresh (algorithm.demo_augment)" if config["algorithm"].get(
        "demo_augment") else ""
    return (f"{coef} x squared error of the mean action against expert actions drawn from {path} "
            f"(its weight column, when present, sets the draws{augmented})")


def model_text(config: dict) -> str:
    """The trunk's depth and token order, which set how fast it grounds the instruction (the model's own
    defaults and presets fill what the config leaves out)."""
    from jaxrl_vla.models.vla.gpt_vla import VLAModelConfig

    model = VLAModelConfig.from_dict(config["policy"]["vla_config"]["model_config"])
    return f"{model.gpt2_config().n_layer}-layer GPT-2, token order {model.token_order}"


def markdown(results: list[dict], export: dict | None, config: dict, bc_info: dict | None, info: dict,
             load_before: float, run_trainer: dict) -> str:
    """The BENCHMARKS.md section (`run_trainer`: the trainer section the pretrained run saved)."""
    t, a = config["trainer"], config["algorithm"]["cfg"]
    rows = [
        f"| {r['run']} | {fmt(r['initial_success'], '.1%')} | {fmt(r['final_success'], '.1%')} | "
        f"{fmt(r['best_success'], '.1%')} | {fmt(r['steps_to_target'], ',')} | {fmt(r['wall_s_to_target'], '.0f')} | "
        f"{fmt(r['env_steps'], ',')} | {fmt(r['wall_s'], '.0f')} | "
        f"{fmt(r['episode_length_first_10'], '.1f')} -> {fmt(r['episode_length_last_10'], '.1f')} |"
        for r in results
    ]
    bc = ""
    if bc_info:
        d, tr = bc_info.get("demos", {}), bc_info.get("training", {})
        bc = (f"The checkpoint: `python -m bridge.pretrain_bc` behaviour-cloned the torch GPTVLAModel on "
              f"{d.get('episodes', '?'):,} expert episodes ({d.get('steps', '?'):,} steps) for {tr.get('epochs')} epochs "
              f"in {bc_info.get('timing', {}).get('train_seconds')} s of torch training; its own evaluation "
              f"({bc_info.get('eval', {}).get('episodes')} episodes) gave {fmt(bc_info.get('eval', {}).get('success_rate'), '.1%')} success. ")
    lines = [
        "## finetune",
        "",
        "PPO fine-tuning in JAX of a behaviour-cloned torch VLA (`configs/vla_example/train_config.json`) against the same "
        "model from random weights (`configs/vla_example/scratch_config.json`), on VLReach-v0 (4 objects, 64x64 rgb, "
        f"instruction). {t['num_envs']} envs x {t['buffer_size']} steps per iteration, {a['n_epochs']} epochs of "
        f"minibatches of {a['batch_size']}, Adam {a['learning_rate']} ({a['lr_schedule']}), target_kl {a['target_kl']}, "
        f"gamma {a['gamma']}, GAE lambda {a['gae_lambda']}, reward progress_distance "
        f"\"{config['env']['progress_distance']}\"; auxiliary loss: "
        f"{aux_text(config)}; demonstration loss: {demo_text(config)}; model: {model_text(config)}; "
        "frozen in the pretrained run: "
        f"{', '.join(config['policy'].get('freeze', [])) or 'nothing'}; "
        f"lr multipliers there: {lr_scale_text(config)}. "
        f"Evaluation: {t['num_eval_episodes']} deterministic episodes every {t['eval_freq']} iterations (the same episodes "
        "each time); step 0 is the starting policy on those episodes. Wall time counts from the start of the training "
        "process (imports, conversion, compilation and evaluations included); the runs were given "
        f"trainer.iterations {run_trainer['iterations']} and trainer.cpu_devices "
        f"{run_trainer.get('cpu_devices', 0) or 'auto'}, and stop at the wall-clock cap or those iterations, whichever comes first. Produced by "
        "`python benchmarks/finetune_curve.py` (with `--iterations N` for the iterations above when they differ from "
        "the config's); plot: [docs/finetune_curve.png](docs/finetune_curve.png).",
        "",
        bc.strip(),
        "",
        f"| run | success at step 0 | final success | best success | env steps to {TARGET:.0%} | wall s to {TARGET:.0%} | env steps | wall s | training episode length, first -> last 10 iterations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    lines += [f"- {reading(r)}" for r in results] + [""]
    if export:
        lines += [
            f"Export: the fine-tuned parameters went back to torch with `bridge.export_to_torch` "
            f"({export['bytes'] / 1e6:.2f} MB safetensors), loaded into `bridge.vla_models.GPTVLAModel` with strict=True; "
            f"its action means on {export['batch']} observations differ from the JAX policy's by at most "
            f"{export['max_abs_diff']:.2e}.",
            "",
        ]
    lines.append(
        machine_line(info) + f" 1-min load average {load_before:.1f} before the runs"
        + (" (other jobs were running, so wall times are noisy; env steps are not)." if load_before > 0.5 else
           " (a quiet machine).")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    overrides = list(args.overrides) + ([f"trainer.iterations={args.iterations}"] if args.iterations else [])
    if args.checkpoint:
        overrides.append(f"policy.vla_config.model_path={args.checkpoint}")
    config = load_config(PRETRAINED_CONFIG, overrides)
    scratch_config = load_config(SCRATCH_CONFIG, [o for o in overrides if not o.startswith("policy.vla_config.model_path")])
    checkpoint = ensure_checkpoint(config)
    overrides = [o for o in overrides if not o.startswith("policy.vla_config.model_path")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, Path] = {}
    if args.pretrained_run:
        runs["pretrained"] = Path(args.pretrained_run)
    else:
        runs["pretrained"] = run_training(PRETRAINED_CONFIG, overrides + [f"policy.vla_config.model_path={checkpoint}"],
                                          Path(args.output_dir) / f"pretrained-{stamp}", args.minutes)
    if args.scratch_run:
        runs["scratch"] = Path(args.scratch_run)
    elif not args.skip_scratch:
        runs["scratch"] = run_training(SCRATCH_CONFIG, overrides, Path(args.output_dir) / f"scratch-{stamp}", args.minutes)

    starts = {"pretrained": initial_level(config, checkpoint)}
    if "scratch" in runs:
        starts["scratch"] = initial_level(scratch_config, None)
    curves = {name: read_curve(run_dir) for name, run_dir in runs.items()}
    results = [summarise(name, runs[name], curves[name], starts[name]) for name in runs]
    for result in results:
        print(json.dumps(result))
    png = plot(curves, starts, starts["pretrained"]["success_rate"], Path(args.png))
    export = export_round_trip(runs["pretrained"])
    print(json.dumps({"bench": "finetune", "export": export}))
    print(f"wrote {png}")
    sidecar = Path(str(checkpoint) + ".json")
    bc_info = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    if not args.no_write:
        run_trainer = json.loads((runs["pretrained"] / "config.json").read_text())["trainer"]
        section = markdown(results, export, config, bc_info, machine(), load_before, run_trainer)
        print(f"wrote the finetune section of {write_section('finetune', section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
