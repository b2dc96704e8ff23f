"""stable-baselines3 PPO on gymnasium's CartPole-v1, for benchmarks/ppo_throughput.py.

Runs in the peer venv (see benchmarks/README.md), never imports jaxrl_vla:

    python sb3_ppo.py --mode throughput --config '{"iterations": 30, ...}'
    python sb3_ppo.py --mode solve --config '{"seed": 0, "threshold": 475, ...}'

The config is the benchmark's shared protocol (keys: env_id, num_envs,
num_steps, n_epochs, num_minibatches, learning_rate, lr_schedule, gamma,
gae_lambda, clip_coef, ent_coef, vf_coef, max_grad_norm, hidden_sizes,
activation, seed, total_timesteps / iterations, eval_every, eval_episodes,
threshold). Prints one line `RESULT {json}`.

Evaluation, as in jaxrl_vla's Trainer: every `eval_every` iterations, the first
episode of each of `eval_episodes` fresh envs with deterministic actions.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.logger import Logger  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

IMPORT_S = time.perf_counter() - _T_START
ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def build(cfg: dict) -> tuple[PPO, object]:
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    n_samples = cfg["num_envs"] * cfg["num_steps"]
    lr = float(cfg["learning_rate"])
    schedule = (lambda progress_remaining: progress_remaining * lr) if cfg["lr_schedule"] == "linear" else lr
    env = make_vec_env(cfg["env_id"], n_envs=cfg["num_envs"], seed=cfg["seed"], vec_env_cls=DummyVecEnv)
    model = PPO(
        "MlpPolicy",
        env,
        learning_rate=schedule,
        n_steps=cfg["num_steps"],
        batch_size=n_samples // cfg["num_minibatches"],
        n_epochs=cfg["n_epochs"],
        gamma=cfg["gamma"],
        gae_lambda=cfg["gae_lambda"],
        clip_range=cfg["clip_coef"],
        ent_coef=cfg["ent_coef"],
        vf_coef=cfg["vf_coef"],
        max_grad_norm=cfg["max_grad_norm"],
        policy_kwargs=dict(
            net_arch=dict(pi=list(cfg["hidden_sizes"]), vf=list(cfg["hidden_sizes"])),
            activation_fn=ACTIVATIONS[cfg["activation"]],
        ),
        device="cpu",
        seed=cfg["seed"],
        verbose=0,
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default makes a /tmp/SB3-* folder per run
    return model, env


class IterationClock(BaseCallback):
    """Wall time at the start of every iteration (collect + train), and the
    periodic deterministic evaluation that stops training once solved."""

    def __init__(self, cfg: dict, t0: float, evaluate: bool):
        super().__init__()
        self.cfg = cfg
        self.t0 = t0
        self.evaluate = evaluate
        self.starts: list[float] = []
        self.evals: list[tuple[int, float]] = []
        self.eval_s = 0.0
        self.solved: dict | None = None
        self.eval_env = None
        if evaluate:
            self.eval_env = make_vec_env(
                cfg["env_id"], n_envs=cfg["eval_episodes"], seed=cfg["seed"] + 1, vec_env_cls=DummyVecEnv
            )

    def _eval(self) -> None:
        t = time.perf_counter()
        # With n_envs == n_eval_episodes, SB3 counts the first episode of each env.
        mean, _ = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.cfg["eval_episodes"], deterministic=True)
        now = time.perf_counter()
        self.eval_s += now - t
        self.evals.append((int(self.num_timesteps), float(mean)))
        if self.solved is None and mean >= self.cfg["threshold"]:
            self.solved = {"steps": int(self.num_timesteps), "time_s": now - self.t0}

    def _on_rollout_start(self) -> None:
        self.starts.append(time.perf_counter())
        iteration = len(self.starts) - 1  # iterations completed so far
        if self.evaluate and iteration > 0 and iteration % self.cfg["eval_every"] == 0:
            self._eval()

    def _on_training_end(self) -> None:
        self.starts.append(time.perf_counter())
        if self.evaluate and self.solved is None:
            self._eval()

    def _on_step(self) -> bool:
        return self.solved is None


def throughput(cfg: dict) -> dict:
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    model, _ = build(cfg)
    setup_s = time.perf_counter() - t0
    clock = IterationClock(cfg, t0, evaluate=False)
    steps_per_iteration = cfg["num_envs"] * cfg["num_steps"]
    model.learn(total_timesteps=cfg["iterations"] * steps_per_iteration, callback=clock)
    times = np.diff(np.asarray(clock.starts))  # one duration per iteration
    warm = 2 if len(times) > 4 else 1
    steady = times[warm:]
    steady_iteration_s = float(np.median(steady))
    return {
        "sps": float(steps_per_iteration * len(steady) / steady.sum()),
        "sps_median": float(steps_per_iteration / steady_iteration_s),
        "compile_s": 0.0,
        "first_iteration_s": float(times[0]),
        "steady_iteration_s": steady_iteration_s,
        "setup_s": setup_s,
        "import_s": IMPORT_S,
        "iterations": len(times),
        "torch_threads": torch.get_num_threads(),
    }


def solve(cfg: dict) -> dict:
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    model, _ = build(cfg)
    clock = IterationClock(cfg, t0, evaluate=True)
    model.learn(total_timesteps=cfg["total_timesteps"], callback=clock)
    wall = time.perf_counter() - t0
    solved = clock.solved
    return {
        "time_to_solve_s": None if solved is None else solved["time_s"],
        "steps_to_solve": None if solved is None else solved["steps"],
        "final_eval": clock.evals[-1][1] if clock.evals else None,
        "eval_s": clock.eval_s,
        "wall_s": wall,
        "import_s": IMPORT_S,
        "evals": clock.evals,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("throughput", "solve"), required=True)
    parser.add_argument("--config", required=True, help="the protocol as JSON")
    args = parser.parse_args(argv)
    cfg = json.loads(args.config)
    out = throughput(cfg) if args.mode == "throughput" else solve(cfg)
    import stable_baselines3

    out.update(
        impl="sb3",
        env=cfg["env_id"],
        seed=cfg["seed"],
        versions={"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__},
    )
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
