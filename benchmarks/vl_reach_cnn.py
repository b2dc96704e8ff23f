"""VLReach from pixels with the CNN actor-critic (`policy.encoder`) against the MLP on privileged state.

Three agents, the same PPO settings (configs/vl_reach_cnn.json's) and env steps:
  cnn         ActorCritic(encoder=ENCODER) on the env's own observation (rgb, proprio, instruction ids)
  privileged  ActorCritic (MLP) on proprio + the instructed object's position (privileged_target_xy,
              renamed so that the policy reads it): the task with vision and language solved for it
  random      the untrained CNN policy's deterministic evaluation (iteration 0)
Prints one Markdown row per agent: evaluation success and return over the same deterministic episodes.

    python benchmarks/vl_reach_cnn.py [--iterations N] [--encoder nature_cnn|impala]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax

from jaxrl_vla import Trainer
from jaxrl_vla.build import build_algorithm
from jaxrl_vla.config import read_config_file, resolve
from jaxrl_vla.envs import make_env
from jaxrl_vla.envs.vl_reach import PRIVILEGED_TARGET_KEY
from jaxrl_vla.models.actor_critic import ActorCritic


class PrivilegedState:
    """VLReach whose observation is {proprio, target_xy}: no pixels, no instruction."""

    def __init__(self, env):
        self.env = env
        self.action_space = env.action_space
        self.max_episode_steps = env.max_episode_steps
        self.reports_success = True
        space = env.observation_space
        self.observation_space = {"proprio": space["proprio"], "target_xy": space[PRIVILEGED_TARGET_KEY]}

    def _obs(self, obs):
        return {"proprio": obs["proprio"], "target_xy": obs[PRIVILEGED_TARGET_KEY]}

    def reset(self, key):
        state, obs = self.env.reset(key)
        return state, self._obs(obs)

    def step(self, state, action):
        state, ts = self.env.step(state, action)
        info = dict(ts.info)
        return state, ts.replace(obs=self._obs(ts.obs), info=info)


def run(name, env, policy, cfg, iterations, out):
    t = cfg["trainer"]
    trainer = Trainer(policy, env, build_algorithm(cfg["algorithm"]), buffer_size=t["buffer_size"],
                      num_envs=t["num_envs"], seed=t["seed"], iterations=iterations, eval_freq=iterations,
                      num_eval_episodes=t["num_eval_episodes"], save_freq=0, output_dir=out, exp_name=name,
                      progress=False)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1], wall, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/vl_reach_cnn.json")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--set", nargs="*", default=[], help="algorithm.cfg overrides, e.g. learning_rate=0.001")
    args = parser.parse_args()
    raw = read_config_file(args.config)
    for item in args.set:
        key, value = item.split("=")
        raw["algorithm"]["cfg"][key] = json.loads(value)
    cfg = resolve(raw)
    iterations = args.iterations or cfg["trainer"]["iterations"]
    encoder = args.encoder or cfg["policy"]["encoder"]
    env_kwargs = {k: v for k, v in cfg["env"].items() if k != "name"}
    env = make_env(cfg["env"]["name"], **env_kwargs)
    p = cfg["policy"]
    out = tempfile.mkdtemp()
    privileged_env = PrivilegedState(make_env(cfg["env"]["name"], **env_kwargs, privileged_target=True))
    mlp = ActorCritic(env.action_space, tuple(p["hidden_sizes"]), p["activation"], p["log_std_init"])
    plast, pwall, _ = run("privileged", privileged_env, mlp, cfg, iterations, out)
    print("privileged:", plast, flush=True)
    cnn = ActorCritic(env.action_space, tuple(p["hidden_sizes"]), p["activation"], p["log_std_init"], encoder)
    last, wall, trainer = run("cnn", env, cnn, cfg, iterations, out)
    # iteration 0: the same evaluation episodes with the untrained CNN's parameters
    init = trainer._init_state(jax.random.PRNGKey(cfg["trainer"]["seed"]))
    trainer.state = trainer.state.replace(params=init.params)
    random = trainer.evaluate()
    steps = last["global_step"]
    print(f"| agent | env steps | eval success | eval return | wall s |")
    print(f"|---|---|---|---|---|")
    print(f"| random (untrained {encoder}) | 0 | {random['eval/success_rate']:.3f} | {random['eval/return_mean']:.3f} | |")
    print(f"| {encoder} from pixels | {steps:,} | {last['eval/success_rate']:.3f} | {last['eval/return_mean']:.3f} | {wall:.0f} |")
    print(f"| MLP on privileged state | {steps:,} | {plast['eval/success_rate']:.3f} | {plast['eval/return_mean']:.3f} | {pwall:.0f} |")


if __name__ == "__main__":
    main()
