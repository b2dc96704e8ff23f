"""Token and flow heads in vla (async) mode: the collectors carry each chunk's sample (bins, denoising
chain) through the circular buffer to the learner, which re-scores it; training runs and stays finite."""

import json

import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo.ppo import PPOConfig

from test_flow_ppo import TokenTarget, flow_policy
from test_token_ppo import token_policy


@pytest.mark.parametrize("make", [token_policy, flow_policy])
def test_vla_mode_trains_a_chain_head(tmp_path, make):
    trainer = Trainer(make(), TokenTarget(), PPOConfig(learning_rate=1e-3, batch_size=32, n_epochs=1),
                      buffer_type="vla", buffer_size=64, num_envs=8, iterations=3, eval_freq=3, num_eval_episodes=8,
                      save_freq=0, output_dir=tmp_path, progress=False, seed=0)
    state = trainer.train()
    assert int(state.iteration) == 3
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss/policy"]) and np.isfinite(r["approx_kl"]) for r in records)
    assert records[-1]["eval/return_mean"] is not None
