"""How much does one PPO batch teach the pretrained VLA? Policy-gradient quality on VLReach.

    python benchmarks/probes/finetune_signal.py                       # ~10 min on 2 cores
    python benchmarks/probes/finetune_signal.py --lambdas 0.95 --batches 2 --no-write

Why this exists: fine-tuning the behaviour-cloned checkpoint with PPO
(benchmarks/finetune_curve.py) does not raise its success rate within the
20-minute budget, across learning rates, GAE lambdas, batch sizes, exploration
noise and reward settings. This script measures the reason instead of guessing
it: the quality of the learning signal one PPO (mini)batch carries.

On-policy data is collected from the pretrained policy (stochastic actions, as
PPO collects them) while the privileged scripted expert labels every visited
state with its action. Two gradients are then compared on the same states:

  PPO   the gradient of PPO's policy loss (`jaxrl_vla.algo.ppo.ppo_loss`, value
        and entropy terms off, advantages by `ppo.gae_from_transitions` and
        normalised per batch, as the learner does);
  BC    the gradient of the mean-squared error between the policy's action
        means and the expert's actions: what the policy would learn from labels.

The reference direction is the BC gradient pooled over every collected sample.
For each batch size the script reports the mean cosine between a batch's PPO
gradient and that direction ("alignment"; 1 = PPO teaches exactly what the
expert would), the same for a batch's own BC gradient (the supervised signal at
that size), and the mean cosine between the PPO gradients of disjoint batches
("consistency": near 0 means a batch's update is mostly noise, which Adam
normalises to a full-size step anyway).

One JSON line per result on stdout; the `finetune_signal` section of
BENCHMARKS.md (--no-write to skip).
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
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder and benchmarks/ for _report
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from _report import machine, machine_line, write_section  # noqa: E402

CONFIG = REPO / "configs" / "vla_example" / "train_config.json"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config and --set, as `build` reads them (shared with finetune_ceiling.py)."""
    p.add_argument("--config", type=Path, default=CONFIG, help="the fine-tuning config (policy, env, PPO settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--lambdas", default="0.8,0.95", help="GAE lambdas to compare (comma-separated; the config uses 0.8)")
    p.add_argument("--sizes", default="256,1024,8192", help="batch sizes (comma-separated; each divides envs x steps)")
    p.add_argument("--batches", type=int, default=3, help="independent rollouts of --envs x --steps samples")
    p.add_argument("--envs", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512, help="samples per gradient evaluation (memory bound)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--flip-episodes", type=int, default=1024,
                   help="paired deterministic / stochastic episodes for the outcome-flip measurement")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    return p.parse_args(argv)


def emit(record: dict) -> None:
    print(json.dumps({"bench": "finetune_signal", **record}), flush=True)


def build(args: argparse.Namespace) -> tuple[dict, Any, Any, Any]:
    """(config, env, policy, variables) as `jaxrl_vla.train` would build them."""
    from jaxrl_vla.build import build_env, build_policy
    from jaxrl_vla.config import load_config

    cfg = load_config(args.config, args.set)
    env = build_env(cfg["env"])
    policy, variables, _ = build_policy(cfg["policy"], env)
    return cfg, env, policy, variables


def make_collect(env: Any, policy: Any, num_envs: int, num_steps: int):
    """Jitted `collect(variables, key) -> (Transition [T, N], last_value [N], expert actions [T, N, A],
    success [T, N])`."""
    import jax
    import jax.numpy as jnp

    from jaxrl_vla.envs.wrappers import VecEnv
    from jaxrl_vla.types import Transition

    vec = VecEnv(env, num_envs)

    def collect(variables, key):
        reset_key, key = jax.random.split(key)
        vec_state, obs = vec.reset(reset_key)

        def step(carry, step_key):
            vec_state, obs = carry
            dist, value = policy.apply(variables, obs)
            action = dist.sample(step_key)
            expert = jax.vmap(env.expert_action)(vec_state.env_state)
            vec_state, ts = vec.step(vec_state, action)
            final_value = jnp.where(ts.truncated, policy.apply(variables, ts.info["final_obs"])[1], 0.0)
            zeros = jnp.zeros(ts.reward.shape, jnp.int32)
            transition = Transition(obs=obs, action=action, log_prob=dist.log_prob(action), value=value,
                                    reward=ts.reward.astype(jnp.float32), terminated=ts.terminated,
                                    truncated=ts.truncated, final_value=final_value, chunk_index=zeros,
                                    policy_version=zeros)
            return (vec_state, ts.obs), (transition, expert, ts.info["success"])

        (_, obs), (rollout, expert, success) = jax.lax.scan(step, (vec_state, obs), jax.random.split(key, num_steps))
        return rollout, policy.apply(variables, obs)[1], expert, success

    return jax.jit(collect)


def make_outcomes(env: Any, policy: Any):
    """Jitted `outcomes(variables, keys [E], stochastic) -> (object touched [E] (-1: none), target [E])`.

    One episode per key (`jaxrl_vla.tasks.demos.run_episodes`: the same
    scene for the same key), acting on the Gaussian means or on samples as
    PPO collects them. Which object an episode ends on is the whole of what
    the instruction decides, so comparing the two on the same scenes shows how
    often exploration noise changes that choice: the only episodes from which
    a policy gradient can learn to pick another object.
    """
    import jax
    import jax.numpy as jnp

    from jaxrl_vla.tasks.demos import run_episodes

    def outcomes(variables, keys, stochastic):
        def act(state, obs, step_keys):
            dist, _ = policy.apply(variables, obs)
            noise = jax.vmap(lambda k: jax.random.normal(k, dist.mean.shape[1:], dist.mean.dtype))(step_keys)
            action = dist.mean + stochastic * jnp.exp(dist.log_std) * noise
            return action[:, None], action[:, None]

        records = run_episodes(env, act, keys)
        final = records["final_state"]
        terminated = (records["terminated"] & records["valid"]).any(axis=1)
        gap = jnp.linalg.norm(final.effector[:, None] - final.object_pos, axis=-1)  # the env's touch rule
        return jnp.where(terminated, jnp.argmin(gap, axis=-1), -1), final.target

    return jax.jit(outcomes)


def outcome_flips(env: Any, policy: Any, variables: Any, episodes: int, seed: int) -> dict:
    """How often the stochastic policy ends an episode on another object than the deterministic one."""
    import jax

    from jaxrl_vla.tasks.demos import episode_keys

    outcomes = make_outcomes(env, policy)
    keys = episode_keys(seed, 0, episodes)
    det, target = jax.device_get(outcomes(variables, keys, 0.0))
    sto, _ = jax.device_get(outcomes(variables, keys, 1.0))
    det_ok, sto_ok = det == target, sto == target
    return {
        "episodes": episodes,
        "success_deterministic": float(det_ok.mean()),
        "success_stochastic": float(sto_ok.mean()),
        "outcome_changed": float((det != sto).mean()),
        "noise_rescues": float((~det_ok & sto_ok).sum() / max((~det_ok).sum(), 1)),
        "noise_spoils": float((det_ok & ~sto_ok).sum() / max(det_ok.sum(), 1)),
    }


def make_gradients(policy: Any, cfg: Any):
    """Jitted per-chunk gradients (flattened) of PPO's policy loss and of the expert-BC loss."""
    import jax
    import jax.numpy as jnp

    from jaxrl_vla.algo import ppo

    policy_only = dataclasses.replace(cfg, vf_coef=0.0, ent_coef=0.0, normalize_advantage=False)

    def flat(tree) -> jax.Array:
        return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])

    def ppo_grad(variables, batch):
        return flat(jax.grad(lambda v: ppo.ppo_loss(v, policy.apply, batch, policy_only)[0])(variables))

    def bc_grad(variables, obs, expert):
        def loss(v):
            mean = policy.apply(v, obs)[0].mean
            return jnp.mean(jnp.sum(jnp.square(mean - expert), axis=-1))

        return flat(jax.grad(loss)(variables))

    return jax.jit(ppo_grad), jax.jit(bc_grad)


def cosine(a, b) -> float:
    import numpy as np

    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def batch_gradients(ppo_grad, bc_grad, variables, batch, expert, rows, chunk: int):
    """Mean PPO and BC gradients over `rows` of a flat batch (advantages normalised over `rows`),
    accumulated in chunks of `chunk` samples."""
    import jax
    import numpy as np

    adv = batch.advantage[rows]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    sub = jax.tree_util.tree_map(lambda x: x[rows], batch).replace(advantage=adv)
    sub_expert = expert[rows]
    g_ppo = g_bc = 0.0
    for start in range(0, len(rows), chunk):
        part = slice(start, min(start + chunk, len(rows)))
        weight = (part.stop - part.start) / len(rows)
        piece = jax.tree_util.tree_map(lambda x: x[part], sub)
        g_ppo = g_ppo + weight * np.asarray(ppo_grad(variables, piece))
        g_bc = g_bc + weight * np.asarray(bc_grad(variables, piece.obs, sub_expert[part]))
    return g_ppo, g_bc


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import jax
    import numpy as np

    from jaxrl_vla.algo import ppo
    from jaxrl_vla.build import build_algorithm

    cfg, env, policy, variables = build(args)
    algo = build_algorithm(cfg["algorithm"])
    sizes = [int(s) for s in args.sizes.split(",")]
    per_batch = args.envs * args.steps
    for size in sizes:
        if per_batch % size:
            raise SystemExit(f"--sizes: {size} does not divide --envs x --steps = {per_batch}")
    if max(sizes) != per_batch:  # the reference direction pools the largest batches: every sample
        raise SystemExit(f"--sizes: the largest must be --envs x --steps = {per_batch}, got {max(sizes)}")
    collect = make_collect(env, policy, args.envs, args.steps)
    ppo_grad, bc_grad = make_gradients(policy, algo)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    rows_out: list[dict] = []
    t0 = time.perf_counter()
    rollouts = [jax.device_get(collect(variables, jax.random.PRNGKey(args.seed + i))) for i in range(args.batches)]
    finished = sum(float((r[0].terminated | r[0].truncated).sum()) for r in rollouts)
    successes = sum(float(r[3].sum()) for r in rollouts)
    info = {"samples": per_batch * args.batches, "episodes": finished,
            "success_rate_stochastic": successes / max(finished, 1.0),
            "flips": outcome_flips(env, policy, variables, args.flip_episodes, args.seed)}
    emit({"outcome_flips": info["flips"]})
    for lam in lambdas:
        grads: dict[int, list[tuple[Any, Any]]] = {size: [] for size in sizes}
        for rollout, last_value, expert, _ in rollouts:
            adv, ret = ppo.gae_from_transitions(rollout, last_value, algo.gamma, lam)
            batch = ppo.make_batch(rollout, adv, ret)
            flat_expert = np.asarray(expert).reshape(per_batch, -1)
            order = np.random.default_rng(args.seed).permutation(per_batch)
            for size in sizes:
                # small batches: disjoint ones covering up to 4,096 samples of the rollout (compute bound)
                count = max(1, min(per_batch // size, 4096 // size if size < 4096 else 1))
                for j in range(count):
                    rows = order[j * size:(j + 1) * size]
                    grads[size].append(batch_gradients(ppo_grad, bc_grad, variables, batch, flat_expert, rows,
                                                       args.chunk))
        largest = max(sizes)
        reference = np.mean([g_bc for _, g_bc in grads[largest]], axis=0)  # pooled over every sample
        for size in sizes:
            pairs = grads[size]
            ppo_align = [cosine(-g_ppo, -reference) for g_ppo, _ in pairs]
            bc_align = [cosine(-g_bc, -reference) for _, g_bc in pairs]
            consistency = [cosine(pairs[i][0], pairs[i + 1][0]) for i in range(0, len(pairs) - 1, 2)]
            row = {"gae_lambda": lam, "batch_size": size, "batches": len(pairs),
                   "ppo_alignment": float(np.mean(ppo_align)), "bc_alignment": float(np.mean(bc_align)),
                   "ppo_consistency": float(np.mean(consistency)) if consistency else None}
            rows_out.append(row)
            emit(row)
        pooled = np.mean([g for g, _ in grads[largest]], axis=0)
        row = {"gae_lambda": lam, "batch_size": "all", "samples": per_batch * args.batches,
               "ppo_alignment": cosine(-pooled, -reference)}
        rows_out.append(row)
        emit(row)
    info["seconds"] = time.perf_counter() - t0
    info["config"] = str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config)
    info["checkpoint"] = cfg["policy"].get("vla_config", {}).get("model_path")
    info["gamma"] = algo.gamma
    info["progress_distance"] = env.progress_distance  # as the env resolved it (its default when unset)
    return rows_out, info


def markdown(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        "## finetune_signal",
        "",
        f"What one PPO batch teaches the pretrained VLA ({info['checkpoint']}, {info['config']}): on-policy data "
        f"from its stochastic policy ({args.batches} rollouts of {args.envs} envs x {args.steps} steps, "
        f"{info['episodes']:.0f} episodes, success {info['success_rate_stochastic']:.1%}), every state labelled by "
        f"the scripted expert. Reward: VLReach's progress_distance \"{info['progress_distance']}\", gamma "
        f"{info['gamma']}. alignment = cosine between a batch's gradient and the expert-BC gradient pooled over "
        "all samples (PPO: policy loss with normalised GAE advantages; BC: action-mean MSE to the expert, the "
        "supervised signal at the same size); consistency = cosine between the PPO gradients of disjoint batches. "
        "Produced by `python benchmarks/probes/finetune_signal.py`.",
        "",
        "| GAE lambda | batch | batches | PPO alignment | BC alignment | PPO consistency |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["batch_size"] == "all":
            lines.append(f"| {r['gae_lambda']} | all {r['samples']:,} | 1 | {fmt(r['ppo_alignment'])} | 1 (reference) | - |")
        else:
            lines.append(f"| {r['gae_lambda']} | {r['batch_size']:,} | {r['batches']} | {fmt(r['ppo_alignment'])} | "
                         f"{fmt(r['bc_alignment'])} | {fmt(r['ppo_consistency'])} |")
    f = info["flips"]
    lines += [
        "",
        f"Exploration and the choice of object ({f['episodes']:,} scenes, each run once on the policy's means and once "
        f"with sampled actions): success {f['success_deterministic']:.1%} deterministic, "
        f"{f['success_stochastic']:.1%} stochastic; the sampled episode ended on another object (or none) than the "
        f"deterministic one in {f['outcome_changed']:.1%} of scenes. Of the deterministic failures, noise turned "
        f"{f['noise_rescues']:.1%} into successes; of the successes it spoiled {f['noise_spoils']:.1%}. Only episodes "
        "whose outcome the noise changes carry a policy-gradient signal about which object the instruction names.",
    ]
    lines += ["", f"Measured in {info['seconds']:.0f} s. {machine_line(machine())}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, info = measure(args)
    emit({"summary": info})
    if not args.no_write:
        path = write_section("finetune_signal", markdown(rows, info, args))
        print(f"# wrote the finetune_signal section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
