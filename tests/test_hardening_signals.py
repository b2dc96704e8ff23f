"""Signals: a second Ctrl-C while the final checkpoint is written cannot abort it, and Ctrl-C while a
collector's env step hangs stops within seconds (saying what it waits for), abandoning that collector
as the env-step timeout does, with the learner's final checkpoint written."""

import os
import signal
import threading
import time
import warnings

import pytest

from jaxrl_vla.algo import PPOConfig
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training import checkpoint as checkpoint_module
from jaxrl_vla.training.checkpoint import Checkpointer

from test_async import IdEnv, collector_threads, make_trainer as make_async_trainer


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test (a shell's background job may ignore SIGINT)."""
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def test_second_ctrl_c_during_the_final_save_does_not_abort_it(tmp_path, monkeypatch, capfd, python_sigint):
    from jaxrl_vla import Trainer

    original_save = checkpoint_module.Checkpointer.save
    saves = []

    def save_with_a_second_ctrl_c(self, iteration, state, metadata):
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C, as the save begins
        time.sleep(0.05)  # let the handler run inside the save
        saves.append(iteration)
        return original_save(self, iteration, state, metadata)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "save", save_with_a_second_ctrl_c)

    def first_ctrl_c(record):
        if record["iteration"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    env = make_env("CartPole-v1")
    trainer = Trainer(ActorCritic(env.action_space, (16,)), env, PPOConfig(batch_size=128, n_epochs=1),
                      buffer_size=32, num_envs=4, iterations=50, eval_freq=0, save_freq=0, output_dir=tmp_path,
                      progress=False, log_fn=first_ctrl_c)
    state = trainer.train()  # no KeyboardInterrupt escapes
    assert trainer.interrupted and saves == [int(state.iteration)]
    assert "saving the final checkpoint" in capfd.readouterr().err
    latest = Checkpointer(trainer.run_dir).latest_iteration()
    assert latest == int(state.iteration)
    assert not list((trainer.run_dir / "checkpoints").glob("*tmp*"))  # complete, renamed


def test_ctrl_c_while_an_env_step_hangs_stops_within_seconds(tmp_path, capfd, python_sigint):
    env = IdEnv(hang_at=20)  # the 20th step of the only collector never returns (until released)
    trainer = make_async_trainer(env, tmp_path, env_step_timeout=60.0, num_collectors=1)
    sent = []

    def ctrl_c_once_hung():
        while env.hang_started is None:
            time.sleep(0.01)
        time.sleep(0.2)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_hung, daemon=True).start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = trainer.train(total_timesteps=1000 * trainer.samples_per_iteration)
        stopped_after = time.monotonic() - sent[0]
        assert trainer.interrupted
        assert stopped_after < 4.0, stopped_after  # ~2 s grace, not env_step_timeout's 60 s
        assert "collector 0 is inside env.step" in capfd.readouterr().err  # said at once
        assert any("abandoning" in str(w.message) for w in caught)
        assert Checkpointer(trainer.run_dir).latest_iteration() == int(state.iteration) >= 1
        assert not env.made[0].closed  # the stuck thread still holds it: never closed under it
    finally:
        env.release.set()
        for thread in collector_threads():
            thread.join(5)
    assert collector_threads() == []
