"""The headline demo end to end, on a tiny budget: torch BC checkpoint -> JAX PPO (both modes) -> torch.

What is checked (issue 6 "End to end", issue 7 "Expert and pretraining"):
- `python -m bridge.pretrain_bc` is deterministic (two runs: bit-identical tensors and metadata) and writes a
  checkpoint that `bridge.load_vla_model` accepts, plus its JSON sidecar;
- the example configs are the BC script's model and run end to end through `jaxrl_vla.train`'s CLI
  from a freshly made checkpoint, in standard mode and in vla (async) mode;
- a missing checkpoint is a config error (exit code 2) that names the command making it;
- the fine-tuned parameters export to torch, load with strict=True and give the JAX policy's means.

The budget keeps the whole module well under a minute and a half on 2 cores: a shrunken model
(narrow ResNet, 1-layer GPT-2; the same code paths) trained on a dozen demo episodes, and 2 PPO
iterations of 2 envs x 4 steps per mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from bridge import pretrain_bc  # noqa: E402
from jaxrl_vla import train  # noqa: E402
from jaxrl_vla.config import read_config_file  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "configs" / "vla_example"
# A shrunken variant of pretrain_bc.MODEL_CONFIG for speed (same architecture family and code paths).
SMALL = {"vision_embedding_size": 8, "vision_hidden_sizes": [8, 8], "vision_depths": [1, 1], "n_layer": 1,
         "value_hidden_dim": 8}
TINY_RUN = [
    "trainer.num_envs=2", "trainer.buffer_size=4", "trainer.iterations=2", "trainer.eval_freq=2",
    "trainer.num_eval_episodes=2", "trainer.save_freq=0", "algorithm.cfg.batch_size=4", "algorithm.cfg.n_epochs=1",
]


def small_model_config() -> dict:
    return {**pretrain_bc.MODEL_CONFIG, **SMALL}


def bc(out: Path, demos: Path, *extra: str) -> int:
    return pretrain_bc.main([
        "--out", str(out), "--demos", str(demos), "--episodes", "12", "--epochs", "1", "--batch-size", "16",
        "--eval-episodes", "0", "--model-config", json.dumps(SMALL), *extra,
    ])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small BC checkpoint, made once for the module (the determinism test makes it twice)."""
    root = tmp_path_factory.mktemp("bc")
    assert bc(root / "a.safetensors", root / "demos.npz") == 0
    return root / "a.safetensors"


def run_cli(config: Path, tmp_path: Path, *overrides: str) -> int:
    args = ["--config", str(config), "--no-progress", "--output-dir", str(tmp_path / "runs")]
    for override in overrides:
        args += ["--set", override]
    return train.main(args)


def only_run_dir(tmp_path: Path) -> Path:
    (run_dir,) = list((tmp_path / "runs").iterdir())
    return run_dir


def checkpoint_overrides(path: Path) -> list[str]:
    """The example config on the small checkpoint, its demonstration loss on the demos it was cloned from."""
    return [f"policy.vla_config.model_path={path}",
            f"policy.vla_config.model_config={json.dumps(small_model_config())}",
            f"algorithm.demo_path={path.parent / 'demos.npz'}"]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same tensors (bit for bit) and metadata. Not the same bytes: safetensors writes its metadata
    map in hash order, which changes from one save to the next."""
    from safetensors import safe_open

    with safe_open(a, "np") as fa, safe_open(b, "np") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            np.testing.assert_array_equal(fa.get_tensor(key), fb.get_tensor(key), err_msg=key)


def without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def test_example_configs_match_the_bc_model():
    """The configs must describe exactly the model the BC script saves, or loading would fail."""
    for name in ("train_config.json", "train_config_async.json", "scratch_config.json"):
        raw = read_config_file(EXAMPLE / name)
        assert raw["policy"]["vla_config"]["model_config"] == pretrain_bc.MODEL_CONFIG, name
        assert {k: raw["env"][k] for k in pretrain_bc.ENV_KWARGS} == pretrain_bc.ENV_KWARGS, name
        assert raw["algorithm"]["cfg"]["gamma"] == pretrain_bc.GAMMA, name  # the BC critic's discount
    pretrained = read_config_file(EXAMPLE / "train_config.json")
    scratch, vla_mode = read_config_file(EXAMPLE / "scratch_config.json"), read_config_file(EXAMPLE / "train_config_async.json")
    assert vla_mode["trainer"]["buffer_type"] == "vla"
    assert scratch["policy"]["vla_config"]["model_path"] is None
    # each twin differs from train_config.json only where it must
    assert scratch["algorithm"] == pretrained["algorithm"] and scratch["env"] == pretrained["env"]
    assert without(scratch["trainer"], "exp_name") == without(pretrained["trainer"], "exp_name")
    # both train everything; the pretrained ResNet at a lower rate, the random one at the full rate
    assert scratch["policy"]["freeze"] == [] and pretrained["policy"]["freeze"] == []
    assert pretrained["policy"]["lr_scale"] == {"vision": 0.3} and "lr_scale" not in scratch["policy"]
    assert without(scratch["policy"], "freeze", "lr_scale", "vla_config") == without(pretrained["policy"], "freeze", "lr_scale", "vla_config")
    assert vla_mode["algorithm"] == pretrained["algorithm"] and vla_mode["env"] == pretrained["env"]
    assert vla_mode["policy"] == pretrained["policy"]
    vla_only = ("exp_name", "buffer_type", "buffer_size", "num_collectors")
    assert without(vla_mode["trainer"], *vla_only) == without(pretrained["trainer"], *vla_only)
    # the circular buffer holds one standard-mode rollout
    assert vla_mode["trainer"]["buffer_size"] == pretrained["trainer"]["num_envs"] * pretrained["trainer"]["buffer_size"]
    make = pretrained["policy"]["vla_config"]["make_checkpoint"]
    assert make.startswith("python -m bridge.pretrain_bc --out checkpoints/vl_reach_bc.safetensors")


def test_detour_oversampling_repeats_the_rows_of_episodes_whose_route_bends():
    """`--detour-weight K`: an epoch holds each detour episode's rows K times and every other row once; which
    episodes detour is read from the env's own route at reset (a hand-made scene with an object on the line
    bends, the same scene with the object moved aside does not)."""
    import jax

    from jaxrl_vla.envs.vl_reach import VLReach

    episode_id = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    rows = np.arange(len(episode_id))[:9]  # episode 3 held out
    detour = np.array([False, True, False, True])
    got = pretrain_bc.oversampled_rows(rows, episode_id, detour, 3)
    counts = np.bincount(got, minlength=len(episode_id))
    np.testing.assert_array_equal(counts, [1, 1, 1, 3, 3, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(pretrain_bc.oversampled_rows(rows, episode_id, detour, 1), rows)
    with pytest.raises(ValueError, match="--detour-weight must be >= 1"):
        pretrain_bc.oversampled_rows(rows, episode_id, detour, 0)

    env = VLReach(**{**pretrain_bc.ENV_KWARGS, "num_objects": 2})
    in_the_way = env.state_from_layout([(0.85, 0.5), (0.5, 0.51)], [0, 2], [0, 1], 0, (0.15, 0.5))
    aside = env.state_from_layout([(0.85, 0.5), (0.5, 0.85)], [0, 2], [0, 1], 0, (0.15, 0.5))
    scenes = jax.tree_util.tree_map(lambda a, b: np.stack([np.asarray(a), np.asarray(b)]), in_the_way, aside)
    np.testing.assert_array_equal(pretrain_bc.detour_episodes(scenes, env), [True, False])
    assert pretrain_bc.check_args(pretrain_bc.parse_args(["--out", "x", "--detour-weight", "0"])) == "--detour-weight must be >= 1"


def test_bc_is_deterministic_and_loadable(checkpoint, tmp_path):
    from bridge import load_vla_model

    again = tmp_path / "b.safetensors"
    assert bc(again, checkpoint.parent / "demos.npz") == 0  # the same demos file, read back
    assert_same_checkpoint(again, checkpoint)
    info = json.loads(pretrain_bc.sidecar_path(checkpoint).read_text())
    assert info["model_config"] == small_model_config()
    module, variables = load_vla_model(checkpoint, pretrain_bc.MODEL_CLASS, info["model_config"])
    np.testing.assert_array_equal(np.asarray(variables["params"]["log_std"]), [-1.0, -1.0])
    # the policy reads the effector position only: no last command to copy (copycat)
    assert np.asarray(variables["params"]["proprio_proj"]["kernel"]).shape[0] == 2


def test_bc_learns_batchnorm_statistics(checkpoint):
    """BC trains the ResNet's BatchNorm layers (train_batchnorm_statistics): every layer's running
    statistics moved off their initial (0, 1), and the Flax twin carries them."""
    import jax
    from safetensors.numpy import load_file

    from bridge import load_vla_model

    tensors = load_file(checkpoint)
    layers = [k[: -len(".running_var")] for k in tensors if k.startswith("vision.") and k.endswith(".running_var")]
    assert layers
    for layer in layers:
        assert tensors[f"{layer}.num_batches_tracked"] > 0, layer
        assert not np.allclose(tensors[f"{layer}.running_var"], 1.0), layer
        assert np.abs(tensors[f"{layer}.running_mean"]).max() > 0, layer
    info = json.loads(pretrain_bc.sidecar_path(checkpoint).read_text())
    _, variables = load_vla_model(checkpoint, pretrain_bc.MODEL_CLASS, info["model_config"])
    converted = np.sort(np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(variables["batch_stats"])]))
    saved = np.sort(np.concatenate([tensors[f"{layer}.{s}"].ravel() for layer in layers for s in ("running_mean", "running_var")]))
    np.testing.assert_array_equal(converted, saved)


def test_bc_refuses_demos_made_differently(checkpoint, tmp_path, capsys):
    code = pretrain_bc.main(["--out", str(tmp_path / "c.safetensors"), "--demos", str(checkpoint.parent / "demos.npz"),
                             "--episodes", "13", "--epochs", "1", "--eval-episodes", "0"])
    assert code == 2
    assert "delete it or pass another --demos" in capsys.readouterr().err


def test_missing_checkpoint_names_the_command(tmp_path, capsys):
    code = run_cli(EXAMPLE / "train_config.json", tmp_path, f"policy.vla_config.model_path={tmp_path / 'nope.safetensors'}")
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "python -m bridge.pretrain_bc --out checkpoints/vl_reach_bc.safetensors" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def one_observation(batch: int = 1) -> dict[str, np.ndarray]:
    """A random VLReach-shaped observation batch."""
    rng = np.random.default_rng(0)
    return {
        "rgb": rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8),
        "proprio": rng.uniform(-1, 1, (batch, pretrain_bc.MODEL_CONFIG["proprio_dim"])).astype(np.float32),
        "language": rng.integers(2, 18, (batch, 8)).astype(np.int32),
        "language_mask": np.arange(8)[None].repeat(batch, 0) < rng.integers(3, 9, (batch, 1)),
    }


def test_finetune_standard_mode_then_export_round_trip(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from bridge import export_to_torch
    from bridge.vla_models import GPTVLAModel
    from jaxrl_vla.eval import load_run
    from jaxrl_vla.models.vla_policy import unwrap_variables

    assert run_cli(EXAMPLE / "train_config.json", tmp_path, *checkpoint_overrides(checkpoint), *TINY_RUN) == 0
    run_dir = only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [8, 16]
    assert "eval/success_rate" in records[-1]
    assert "loss/demo" in records[-1]  # the example's demonstration loss, on the demos the checkpoint was cloned from

    run = load_run(run_dir)
    before = load_file(checkpoint)
    path = export_to_torch(unwrap_variables(run.params), pretrain_bc.MODEL_CLASS, small_model_config(),
                           tmp_path / "finetuned.safetensors")
    model = GPTVLAModel(small_model_config())
    state = load_file(path)
    model.load_state_dict(state, strict=True)
    model.eval()
    assert any(not torch.equal(state[k], before[k]) for k in before)  # PPO did change the weights
    obs = one_observation(5)
    jax_means = np.asarray(run.policy.apply(run.params, obs)[0].mean)
    with torch.no_grad():
        torch_means = model({k: torch.from_numpy(v) for k, v in obs.items()}).numpy()
    np.testing.assert_allclose(torch_means, jax_means, atol=1e-4)


def test_finetune_vla_mode(checkpoint, tmp_path):
    overrides = [o.replace("trainer.buffer_size=4", "trainer.buffer_size=8") for o in TINY_RUN]
    assert run_cli(EXAMPLE / "train_config_async.json", tmp_path, *checkpoint_overrides(checkpoint), *overrides) == 0
    records = [json.loads(line) for line in (only_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [8, 16]
    assert "staleness" in records[-1]


def test_finetune_on_two_cpu_devices(checkpoint, tmp_path):
    """The example as `python -m jaxrl_vla.train` runs it on a multi-core CPU: its auto `trainer.cpu_devices`
    splits the host into devices, and the pretrained parameters (loaded onto one device) are replicated over
    the mesh before training (they used to be refused as committed to another device)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    args = [sys.executable, "-m", "jaxrl_vla.train", "--config", str(EXAMPLE / "train_config.json"), "--no-progress",
            "--output-dir", str(tmp_path / "runs")]
    for override in [*checkpoint_overrides(checkpoint), *TINY_RUN, "trainer.cpu_devices=2"]:
        args += ["--set", override]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data-parallel over 2 cpu devices" in out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [8, 16]
    assert "eval/success_rate" in records[-1]
    # its checkpoint (saved sharded over 2 devices) loads and resumes in this one-device process
    from jaxrl_vla.eval import load_run

    run = load_run(run_dir)
    assert int(run.iteration) == 2
    assert np.isfinite(np.asarray(run.policy.apply(run.params, one_observation())[0].mean)).all()
    assert train.main(["--resume", str(run_dir), "--no-progress", "--set", "trainer.iterations=3"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [8, 16, 24]
