"""What PPO's budget could teach the pretrained VLA with perfect labels: the fine-tuning ceiling.

    python benchmarks/probes/finetune_ceiling.py                     # ~15 min on 2 cores
    python benchmarks/probes/finetune_ceiling.py --runs vision:3e-4 --rounds 25 --no-write

Why this exists: PPO fine-tuning of the behaviour-cloned checkpoint
(benchmarks/finetune_curve.py) holds its success rate flat, and
benchmarks/finetune_signal.py shows that one PPO minibatch's gradient is only
about half as well aimed as the expert's. This script removes the RL signal
from the question. Each round does what one PPO iteration of the example
config does (64 envs x 32 on-policy steps from the current stochastic policy,
then 2 epochs of 2 shuffled minibatches of 1,024 through the learner's own
optimiser: `ppo.make_optimizer`, global-norm clipping + Adam, the config's
`policy.freeze` as its mask), except that the loss is the mean-squared error
between the policy's action means and the privileged scripted expert's
actions on the same states (DAgger). If even these labels lift the success
rate little within PPO's sample and update budget, PPO cannot be expected to
do better, and the limit is how fast this model learns grounding from an
action loss, not the reward, the advantages or the exploration.

Each run is `FREEZE:LR` (FREEZE: comma-free path prefix of `policy.freeze`, e.g.
"vision", or empty for none). Success is measured on the same 256 deterministic
episodes (`finetune_signal.outcome_flips`) every `--every` rounds. One JSON line
per measurement on stdout; the `finetune_ceiling` section of BENCHMARKS.md
(--no-write to skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder and benchmarks/ for _report and finetune_signal (its collection, evaluation, config arguments)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import finetune_signal  # noqa: E402
from _report import machine, machine_line, write_section  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    finetune_signal.add_config_arguments(p)
    p.add_argument("--runs", default="vision:3e-4,vision:1e-3,:1e-3",
                   help="comma-separated FREEZE:LR runs (FREEZE a policy.freeze prefix, empty for none)")
    p.add_argument("--rounds", type=int, default=50, help="rounds (one PPO iteration's data and updates each) per run")
    p.add_argument("--every", type=int, default=25, help="evaluate every this many rounds")
    p.add_argument("--eval-episodes", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    return p.parse_args(argv)


def emit(record: dict) -> None:
    print(json.dumps({"bench": "finetune_ceiling", **record}), flush=True)


def parse_runs(spec: str) -> list[tuple[list[str], float]]:
    runs = []
    for item in spec.split(","):
        freeze, sep, lr = item.partition(":")
        if not sep:
            raise SystemExit(f"--runs: {item!r} is not FREEZE:LR")
        runs.append(([freeze] if freeze else [], float(lr)))
    return runs


def make_train_round(policy: Any, optimizer: Any, mask: Any, epochs: int, minibatches: int):
    """Jitted `(variables, opt_state, obs [B, ...], expert [B, A], key) -> (variables, opt_state, loss)`:
    `epochs` passes of `minibatches` shuffled minibatches of expert-action MSE, nested `lax.scan`s."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxrl_vla.algo.ppo import stop_frozen_gradients

    def loss_fn(variables, obs, expert):
        mean = policy.apply(stop_frozen_gradients(variables, mask), obs)[0].mean
        return jnp.mean(jnp.sum(jnp.square(mean - expert), axis=-1))

    def train_round(variables, opt_state, obs, expert, key):
        n = expert.shape[0]

        def epoch(carry, epoch_key):
            def minibatch(carry, rows):
                variables, opt_state = carry
                take = lambda x: x[rows]  # noqa: E731
                loss, grads = jax.value_and_grad(loss_fn)(variables, jax.tree_util.tree_map(take, obs), expert[rows])
                updates, opt_state = optimizer.update(grads, opt_state, variables)
                return (optax.apply_updates(variables, updates), opt_state), loss

            order = jax.random.permutation(epoch_key, n).reshape(minibatches, -1)
            return jax.lax.scan(minibatch, carry, order)

        (variables, opt_state), losses = jax.lax.scan(epoch, (variables, opt_state), jax.random.split(key, epochs))
        return variables, opt_state, losses.mean()

    return jax.jit(train_round, donate_argnums=(0, 1))


def run_one(args: argparse.Namespace, freeze: list[str], lr: float) -> list[dict]:
    import jax

    from jaxrl_vla.algo import ppo
    from jaxrl_vla.build import build_algorithm
    from jaxrl_vla.models.vla_policy import trainable_mask

    sets = list(args.set) + [f"policy.freeze={json.dumps(freeze)}", f"algorithm.cfg.learning_rate={lr}"]
    cfg, env, policy, variables = finetune_signal.build(argparse.Namespace(config=args.config, set=sets))
    algo = build_algorithm(cfg["algorithm"])
    envs, steps = cfg["trainer"]["num_envs"], cfg["trainer"]["buffer_size"]
    minibatches = envs * steps // algo.batch_size
    mask = trainable_mask(variables, freeze)
    optimizer = ppo.make_optimizer(dataclasses.replace(algo, lr_schedule="constant"), 1, mask)
    opt_state = optimizer.init(variables)
    collect = finetune_signal.make_collect(env, policy, envs, steps)
    train_round = make_train_round(policy, optimizer, mask, algo.n_epochs, minibatches)
    flatten = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [T, N, ...] -> [T * N, ...]

    def evaluate() -> float:
        flips = finetune_signal.outcome_flips(env, policy, variables, args.eval_episodes, args.seed + 123)
        return flips["success_deterministic"]

    label = f"freeze {freeze or 'nothing'}, lr {lr:g}"
    rows = [{"run": label, "round": 0, "env_steps": 0, "adam_steps": 0, "success": evaluate(), "loss": None}]
    emit(rows[-1])
    key = jax.random.PRNGKey(args.seed)
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):
        key, collect_key, train_key = jax.random.split(key, 3)
        rollout, _, expert, _ = collect(variables, collect_key)
        obs = jax.tree_util.tree_map(flatten, rollout.obs)
        variables, opt_state, loss = train_round(variables, opt_state, obs, flatten(expert), train_key)
        if r % args.every == 0 or r == args.rounds:
            rows.append({"run": label, "round": r, "env_steps": r * envs * steps,
                         "adam_steps": r * algo.n_epochs * minibatches, "success": evaluate(), "loss": float(loss),
                         "seconds": time.perf_counter() - t0})
            emit(rows[-1])
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "## finetune_ceiling",
        "",
        "PPO's budget with perfect labels (DAgger): each round collects one PPO iteration of the example config "
        f"(`{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}`: 64 envs x 32 "
        "steps from the current stochastic policy) and runs its update (2 epochs x 2 minibatches of 1,024, the "
        "learner's optimiser and freeze mask), with the loss replaced by the action-mean MSE to the privileged "
        "scripted expert on the same states. Success: the same 256 deterministic episodes at every row. "
        "Produced by `python benchmarks/probes/finetune_ceiling.py`.",
        "",
        "| run | round | env steps | Adam steps | success | expert-action MSE (last round) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        lines.append(f"| {r['run']} | {r['round']} | {r['env_steps']:,} | {r['adam_steps']:,} | {r['success']:.1%} | {loss} |")
    lines += ["", f"Measured in {seconds:.0f} s. {machine_line(machine())}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows = [row for freeze, lr in parse_runs(args.runs) for row in run_one(args, freeze, lr)]
    if not args.no_write:
        path = write_section("finetune_ceiling", markdown(rows, args, time.perf_counter() - t0))
        print(f"# wrote the finetune_ceiling section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
