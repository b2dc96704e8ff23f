"""Trainer with K iterations per jitted call: the plan of calls, the K choice,
and per-iteration behaviour (records, evaluation, checkpoints, stop, resume)
identical to one iteration per call."""

import json

import jax
import numpy as np
import pytest

from jaxrl_vla import Trainer
from jaxrl_vla.algo import PPOConfig
from jaxrl_vla.config import ConfigError, load_config
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training.trainer import (
    MAX_AUTO_ITERATIONS_PER_CALL,
    adaptive_call_iterations,
    auto_iterations_per_call,
    call_size,
)

CFG = PPOConfig(learning_rate=2.5e-3, lr_schedule="linear", n_epochs=4, batch_size=256, ent_coef=0.01)


def make_trainer(tmp_path, **kw):
    env = make_env("CartPole-v1")
    defaults = dict(buffer_size=64, num_envs=8, output_dir=tmp_path, exp_name="t", eval_freq=0, save_freq=0,
                    normalize_observations=True, progress=False)
    defaults.update(kw)
    return Trainer(ActorCritic(env.action_space, (32, 32)), env, CFG, **defaults)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def leaves_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: np.array_equal(x, y), a, b)))


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    "eval_freq, save_freq, total, expected",
    [(10, 50, 100, 10), (0, 0, 100, 32), (4, 0, 100, 4), (12, 0, 100, 12), (3, 50, 100, 1), (0, 50, 5, 5),
     (10, 0, 3, 2), (40, 0, 100, 20)],
)
def test_auto_k_divides_the_periods_and_is_capped(eval_freq, save_freq, total, expected):
    assert auto_iterations_per_call(eval_freq, save_freq, total) == expected
    assert expected <= MAX_AUTO_ITERATIONS_PER_CALL


@pytest.mark.parametrize(
    "max_k, seconds, expected",
    [(32, None, 1), (32, 0.006, 32), (32, 0.01, 16), (32, 0.2, 1), (32, 7.0, 1), (20, 0.03, 5), (12, 0.05, 4),
     (1, 0.001, 1)],
)
def test_auto_calls_are_sized_to_the_measured_iteration_time(max_k, seconds, expected):
    """A divisor of the compiled maximum (so calls still end on evaluations and checkpoints) that
    fits CALL_TARGET_SECONDS (0.25 s); one iteration per call until one has been timed."""
    assert adaptive_call_iterations(max_k, seconds) == expected


def call_sizes(start: int, total: int, k: int) -> list[int]:
    """The calls a run with a fixed K makes from `start` to `total` iterations (as the Trainer's loop)."""
    sizes, done = [], start
    while done < total:
        sizes.append(call_size(done, total, k))
        done += sizes[-1]
    return sizes


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("start, total", [(0, 100), (0, 7), (13, 100), (5, 6), (6, 6)])
def test_calls_end_at_every_iteration_the_host_needs(k, start, total):
    sizes = call_sizes(start, total, k)
    assert sum(sizes) == total - start and all(1 <= size <= k for size in sizes)
    ends, done = set(), start
    for size in sizes:
        assert size == k or (done + size) % k == 0 or done + size == total  # short: only a head or the tail
        done += size
        ends.add(done)
    # any period K divides (eval_freq, save_freq) has each multiple at a call end
    for period in (k, 2 * k, 5 * k):
        assert {i for i in range(start + 1, total + 1) if i % period == 0} <= ends
    assert call_sizes(0, 100, 8) == [8] * 12 + [4]
    assert call_sizes(13, 30, 8) == [3, 8, 6]


def test_explicit_k_must_divide_eval_and_save_freq(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.iterations_per_call \(3\) must divide trainer\.eval_freq \(10\)"):
        load_config(None, ["trainer.iterations_per_call=3"])
    with pytest.raises(ConfigError, match=r"trainer\.iterations_per_call \(4\) must divide trainer\.save_freq \(50\)"):
        load_config(None, ["trainer.iterations_per_call=4", "trainer.eval_freq=0"])
    with pytest.raises(ConfigError, match=r"trainer\.iterations_per_call: -1 is out of range"):
        load_config(None, ["trainer.iterations_per_call=-1"])
    assert load_config(None, ["trainer.iterations_per_call=5"])["trainer"]["iterations_per_call"] == 5
    assert load_config(None)["trainer"]["iterations_per_call"] == 0  # auto
    with pytest.raises(ConfigError, match=r"trainer\.iterations_per_call \(3\) must divide trainer\.eval_freq \(4\)"):
        make_trainer(tmp_path, eval_freq=4, iterations_per_call=3)


# ---------------------------------------------------------------------------- training


def test_k_iterations_per_call_behave_like_one(tmp_path):
    runs = {}
    for k in (1, 4):
        trainer = make_trainer(tmp_path / str(k), iterations=10, eval_freq=4, save_freq=8, iterations_per_call=k)
        trainer.train()
        runs[k] = trainer, read_metrics(trainer.run_dir)
    trainer, records = runs[4]
    assert trainer.call_iterations == 4
    assert "10 iterations, 4 per jitted call" in trainer.describe(10)
    assert trainer.trace_count == 1  # one program: calls of 4, 4 and the tail's 2 iterations
    assert [r["iteration"] for r in records] == list(range(1, 11))
    assert [r["global_step"] for r in records] == [512 * i for i in range(1, 11)]
    assert [r["iteration"] for r in records if "eval/return_mean" in r] == [4, 8, 10]
    assert checkpoints(trainer.run_dir) == [8, 10]
    # the wall time of a call is shared by its iterations
    assert len({r["iteration_time"] for r in records[:4]}) == 1
    assert records[0]["sps"] == pytest.approx(512 / records[0]["iteration_time"])

    single_trainer, single = runs[1]
    assert checkpoints(single_trainer.run_dir) == [8, 10]
    for a, b in zip(records, single):
        assert a.keys() == b.keys()
        for key in a.keys() - {"sps", "iteration_time"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # the same iterations, scanned: on CPU the parameters are in fact bit-identical
    close = jax.tree_util.tree_map(lambda x, y: np.allclose(x, y, rtol=1e-4, atol=1e-6),
                                   trainer.state.params, single_trainer.state.params)
    assert all(jax.tree_util.tree_leaves(close))


def test_auto_call_sizes_keep_every_evaluation_checkpoint_and_result(tmp_path):
    """Auto mode (iterations_per_call 0) sizes its calls by time; every evaluation and checkpoint
    still falls on a call end, and the parameters are those of one iteration per call."""
    kw = dict(iterations=12, eval_freq=4, save_freq=8)
    auto = make_trainer(tmp_path / "auto", iterations_per_call=0, **kw)
    auto.train()
    single = make_trainer(tmp_path / "single", iterations_per_call=1, **kw)
    single.train()
    records = read_metrics(auto.run_dir)
    assert auto.call_iterations == 4 and "up to 4 per jitted call" in auto.describe(12)
    assert auto.trace_count == 1
    assert [r["iteration"] for r in records] == list(range(1, 13))
    assert [r["iteration"] for r in records if "eval/return_mean" in r] == [4, 8, 12]
    assert checkpoints(auto.run_dir) == [8, 12]
    close = jax.tree_util.tree_map(lambda x, y: np.allclose(x, y, rtol=1e-4, atol=1e-6),
                                   auto.state.params, single.state.params)
    assert all(jax.tree_util.tree_leaves(close))


@pytest.mark.parametrize(
    "k, total, save_freq, stop_at, stopped_at",
    [
        # stop mid-call: the call finishes, and so does the call already dispatched behind it
        (2, 8, 0, 3, 6),
        # a checkpoint due at 8: nothing is dispatched ahead of it, so the run stops there;
        # the resumed run ends with the 3-iteration tail call
        (4, 11, 8, 5, 8),
    ],
)
def test_resume_with_k_per_call_ends_with_the_same_parameters(tmp_path, k, total, save_freq, stop_at, stopped_at):
    kw = dict(iterations=total, save_freq=save_freq, iterations_per_call=k)
    uninterrupted = make_trainer(tmp_path / "a", **kw)
    uninterrupted.train()

    stopper = make_trainer(tmp_path / "b", log_fn=lambda r: r["iteration"] == stop_at and stopper.request_stop(), **kw)
    stopper.train()
    assert stopper.interrupted and int(stopper.state.iteration) == stopped_at
    assert [r["iteration"] for r in read_metrics(stopper.run_dir)] == list(range(1, stopped_at + 1))
    assert checkpoints(stopper.run_dir)[-1] == stopped_at

    resumed = make_trainer(tmp_path / "b", **kw)
    resumed.train(resume=stopper.run_dir)
    assert int(resumed.state.iteration) == total
    assert leaves_equal(uninterrupted.state.params, resumed.state.params)
    assert leaves_equal(uninterrupted.state.obs_stats, resumed.state.obs_stats)
    assert leaves_equal(uninterrupted.state.opt_state, resumed.state.opt_state)
    records = read_metrics(stopper.run_dir)
    assert [r["iteration"] for r in records] == list(range(1, total + 1))
    assert [r["global_step"] for r in records] == [512 * i for i in range(1, total + 1)]
