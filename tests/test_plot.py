"""`python -m jaxrl_vla.plot`, and what it plots that the trainer newly logs: the learning rate each
iteration, and the progress bar's "compiling" until the first iteration arrives."""

import json
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxrl_vla import plot, train
from jaxrl_vla.training.logging import RunLogger

ITERATIONS = 4
LEARNING_RATE = 4e-3
SEEDS = (0, 1)  # the two runs compared differ by seed alone: one compiled program (XLA's cache) serves both


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny CartPole runs with linear learning-rate decay, one per seed."""
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for i, seed in enumerate(SEEDS):
        cfg = {
            "trainer": {"buffer_size": 16, "num_envs": 2, "iterations": ITERATIONS, "eval_freq": 2, "save_freq": 0,
                        "num_eval_episodes": 2, "exp_name": f"seed{i}", "output_dir": str(root), "seed": seed},
            "algorithm": {"name": "ppo", "cfg": {"learning_rate": LEARNING_RATE, "lr_schedule": "linear", "n_epochs": 1,
                                                 "batch_size": 16}},
            "policy": {"name": "actor_critic", "hidden_sizes": [16]},
            "env": {"name": "CartPole-v1", "max_episode_steps": 20},
        }
        path = root / f"seed{i}.json"
        path.write_text(json.dumps(cfg))
        assert train.main(["--config", str(path), "--no-progress"]) == 0
        (run,) = root.glob(f"seed{i}-*")
        runs.append(run)
    return runs


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_learning_rate_logged_each_iteration_follows_the_linear_schedule(two_runs):
    for run in two_runs:
        lr = LEARNING_RATE
        logged = [r["learning_rate"] for r in records(run)]
        # 32 samples / 16 per minibatch x 1 epoch = 2 Adam steps per iteration; linear decay from lr to 0 over
        # all 8: iteration i starts at step 2 (i - 1), so its rate is lr (1 - (i - 1) / 4)
        expected = [lr * (1 - (i - 1) / ITERATIONS) for i in range(1, ITERATIONS + 1)]
        np.testing.assert_allclose(logged, expected, rtol=1e-6)


def test_plot_two_runs_in_one_png(two_runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert plot.main([str(r) for r in two_runs] + ["--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # one panel per default metric the runs log (success rate: CartPole reports none), three columns
    runs = [plot.read_run(r) for r in two_runs]
    assert len(plot.panels_for(runs, None)) == 7
    assert pixels.shape[:2] == (3 * 340, 3 * 520)
    # both runs are drawn, each in its own colour (matplotlib's first two: C0 blue, C1 orange)
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - rgb).max(-1) <= 10).sum() > 200


def test_plot_one_run_chosen_metrics_default_output(two_runs):
    out = two_runs[0] / "learning_curves.png"
    assert plot.main([str(two_runs[0]), "--metrics", "return", "learning_rate", "grad_norm", "--x", "iteration"]) == 0
    with Image.open(out) as image:
        assert image.size == (2 * 520, 2 * 340)  # three panels: two columns, two rows


def test_bad_run_dir_or_metric_is_one_line_exit_2(two_runs, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert plot.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert plot.main([str(tmp_path), "--out", str(out)]) == 2  # a directory without metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "glob')  # only a torn line
    assert plot.main([str(tmp_path), "--out", str(out)]) == 2
    assert plot.main([str(two_runs[0]), "--metrics", "nope", "--out", str(out)]) == 2
    assert plot.main([str(two_runs[0]), "--out", str(tmp_path / "x.jpg")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)
    assert "missing" in errors[0] and "metrics.jsonl" in errors[1] and "nope" in errors[3] and "loss/value" in errors[3]
    assert not out.exists()


def test_without_matplotlib_says_how_to_install_it(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert plot.main([str(two_runs[0]), "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- "compiling" until the first iteration


def test_progress_bar_says_compiling_until_the_first_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar draws only on a terminal
    logger = RunLogger(tmp_path, 3, progress=True)
    try:
        assert not logger._progress.disable
        time.sleep(0.3)  # rich redraws the bar 10 times a second
        assert "compiling" in capsys.readouterr().err
        logger.log({"iteration": 1, "global_step": 8, "sps": 10.0})
        assert "compiling" not in logger._progress.tasks[0].fields["extra"]
    finally:
        logger.close()


def test_without_a_terminal_one_line_says_compiling(tmp_path, capsys, monkeypatch):
    """Under pytest stderr is no terminal: the bar is off, and a plain line says why nothing moves yet."""
    monkeypatch.setattr(RunLogger, "COMPILING_NOTE_SECS", 0.05)
    (tmp_path / "a").mkdir()
    logger = RunLogger(tmp_path / "a", 3, progress=True)
    logger._compiling_note.join(5)  # a threading.Timer: returns once the note is printed
    logger.log({"iteration": 1, "global_step": 8, "sps": 10.0})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("compiling") == 1 and err.index("compiling") < err.index("iter 1 step 8")
    # a first iteration that arrives before the note is due: no note, ever
    monkeypatch.setattr(RunLogger, "COMPILING_NOTE_SECS", 0.3)
    (tmp_path / "b").mkdir()
    logger = RunLogger(tmp_path / "b", 3, progress=True)
    logger.log({"iteration": 1, "global_step": 8, "sps": 10.0})
    time.sleep(0.5)
    logger.close()
    assert "compiling" not in capsys.readouterr().err
