"""rejax's PPO on gymnax's CartPole-v1 (the PureJaxRL design), for benchmarks/ppo_throughput.py.

Runs in the peer venv (rejax 0.1.3 with gymnax 0.0.9; see benchmarks/README.md):

    python rejax_ppo.py --mode throughput --config '{"iterations": 200, ...}'
    python rejax_ppo.py --mode solve --config '{"seed": 0, "threshold": 475, ...}'

The config is the benchmark's shared protocol (see sb3_ppo.py). Prints one line
`RESULT {json}`.

What is matched to the protocol beyond rejax's own fields (a subclass, so the
design, one jitted function for the whole training, is untouched):
  * optimiser: global-norm gradient clipping and Adam(eps=1e-5) with the linear
    learning-rate decay to 0 over all updates, as SB3 and jaxrl_vla do (rejax
    0.1.3 clips each gradient element and keeps the rate constant);
  * evaluation: the first episode of `eval_episodes` envs with deterministic
    (argmax) actions, every `eval_every` iterations (rejax's default samples
    actions over 128 episodes).
Left as rejax has it: separate actor and critic optimisers, value clipping with
the policy clip range, no truncation bootstrapping (gymnax reports `done`), and
an evaluation schedule fixed at compile time (training cannot stop early: the
time to solve is the compile time plus the share of the run up to the solving
evaluation; `wall_s` is the whole run).

Throughput mode jits `lax.fori_loop` over `train_iteration` (collect + GAE +
update, no evaluation), compiled ahead of time so compile and run are apart.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import struct  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402
from rejax import PPO  # noqa: E402
from rejax.algos.algorithm import register_init  # noqa: E402
from rejax.evaluate import evaluate  # noqa: E402

IMPORT_S = time.perf_counter() - _T_START


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


class MatchedPPO(PPO):
    """rejax PPO with the protocol's optimiser (see the module docstring)."""

    linear_lr: bool = struct.field(pytree_node=False, default=True)

    @register_init
    def initialize_network_params(self, rng):
        rng, rng_actor, rng_critic = jax.random.split(rng, 3)
        obs_ph = jnp.empty([1, *self.env.observation_space(self.env_params).shape])
        actor_params = self.actor.init(rng_actor, obs_ph, rng_actor)
        critic_params = self.critic.init(rng_critic, obs_ph)
        iterations = -(-self.total_timesteps // (self.num_envs * self.num_steps))
        updates = iterations * self.num_epochs * self.num_minibatches
        lr = optax.linear_schedule(self.learning_rate, 0.0, updates) if self.linear_lr else self.learning_rate
        tx = optax.chain(optax.clip_by_global_norm(self.max_grad_norm), optax.adam(learning_rate=lr, eps=1e-5))
        return {
            "actor_ts": TrainState.create(apply_fn=(), params=actor_params, tx=tx),
            "critic_ts": TrainState.create(apply_fn=(), params=critic_params, tx=tx),
        }


def make_eval_callback(num_episodes: int):
    def eval_callback(algo, ts, rng):
        def act(obs, _rng):
            if getattr(algo, "normalize_observations", False):
                obs = algo.normalize_obs(ts.obs_rms_state, obs)
            dist = algo.actor.apply(ts.actor_ts.params, obs[None], method="_action_dist")
            return jnp.squeeze(dist.mode())

        max_steps = algo.env_params.max_steps_in_episode
        return evaluate(act, rng, algo.env, algo.env_params, num_episodes, max_steps)

    return eval_callback


def build(cfg: dict, total_timesteps: int, eval_freq: int) -> MatchedPPO:
    n_samples = cfg["num_envs"] * cfg["num_steps"]
    assert n_samples % cfg["num_minibatches"] == 0
    algo = MatchedPPO.create(
        env=cfg["env_id"],
        num_envs=cfg["num_envs"],
        num_steps=cfg["num_steps"],
        num_epochs=cfg["n_epochs"],
        num_minibatches=cfg["num_minibatches"],
        learning_rate=cfg["learning_rate"],
        max_grad_norm=cfg["max_grad_norm"],
        gamma=cfg["gamma"],
        gae_lambda=cfg["gae_lambda"],
        clip_eps=cfg["clip_coef"],
        ent_coef=cfg["ent_coef"],
        vf_coef=cfg["vf_coef"],
        total_timesteps=total_timesteps,
        eval_freq=eval_freq,
        skip_initial_evaluation=True,
        linear_lr=cfg["lr_schedule"] == "linear",
        agent_kwargs={"activation": cfg["activation"], "hidden_layer_sizes": tuple(cfg["hidden_sizes"])},
    )
    return algo.replace(eval_callback=make_eval_callback(cfg["eval_episodes"]))


def throughput(cfg: dict, repeats: int) -> dict:
    n_samples = cfg["num_envs"] * cfg["num_steps"]
    iterations = int(cfg["iterations"])
    t0 = time.perf_counter()
    algo = build(cfg, total_timesteps=iterations * n_samples, eval_freq=iterations * n_samples)
    ts = jax.jit(algo.init_state)(jax.random.PRNGKey(cfg["seed"]))
    jax.block_until_ready(ts)
    setup_s = time.perf_counter() - t0

    def run(ts):
        return jax.lax.fori_loop(0, iterations, lambda _, s: algo.train_iteration(s), ts)

    t = time.perf_counter()
    compiled = jax.jit(run).lower(ts).compile()
    compile_s = time.perf_counter() - t
    run_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = compiled(ts)
        jax.block_until_ready(out)
        run_times.append(time.perf_counter() - t)
    best = min(run_times)
    median = statistics.median(run_times)
    return {
        "sps": iterations * n_samples / median,
        "sps_best": iterations * n_samples / best,
        "compile_s": compile_s,
        "steady_iteration_s": median / iterations,
        "setup_s": setup_s,
        "import_s": IMPORT_S,
        "iterations": iterations,
        "repeats": repeats,
        "run_times_s": run_times,
    }


def solve(cfg: dict) -> dict:
    n_samples = cfg["num_envs"] * cfg["num_steps"]
    eval_freq = cfg["eval_every"] * n_samples
    t0 = time.perf_counter()
    algo = build(cfg, total_timesteps=cfg["total_timesteps"], eval_freq=eval_freq)
    rng = jax.random.PRNGKey(cfg["seed"])
    compiled = jax.jit(algo.train).lower(rng).compile()
    t_compiled = time.perf_counter()
    _, (lengths, returns) = compiled(rng)
    returns = jax.device_get(returns)
    t_end = time.perf_counter()
    means = [float(r) for r in returns.mean(axis=-1)]
    steps = [(i + 1) * eval_freq for i in range(len(means))]
    first = next((i for i, m in enumerate(means) if m >= cfg["threshold"]), None)
    run_s = t_end - t_compiled
    return {
        "time_to_solve_s": None if first is None else (t_compiled - t0) + run_s * (first + 1) / len(means),
        "steps_to_solve": None if first is None else steps[first],
        "final_eval": means[-1],
        "compile_s": t_compiled - t0,
        "wall_s": t_end - t0,
        "import_s": IMPORT_S,
        "evals": list(zip(steps, means)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("throughput", "solve"), required=True)
    parser.add_argument("--config", required=True, help="the protocol as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="throughput: timed runs of the compiled loop")
    args = parser.parse_args(argv)
    cfg = json.loads(args.config)
    out = throughput(cfg, args.repeats) if args.mode == "throughput" else solve(cfg)
    import importlib.metadata as md

    out.update(
        impl="rejax",
        env="gymnax:" + cfg["env_id"],
        seed=cfg["seed"],
        versions={p: md.version(p) for p in ("rejax", "gymnax", "jax", "jaxlib", "flax")},
    )
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
