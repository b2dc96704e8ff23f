"""LeRobot SmolVLA directories: the Flax twin against the torch reference on transformers' SmolVLM (LeRobot's
module tree and maths), the export round trip, LeRobot's normalisation, and the bad-input lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bridge import hf_dir, lerobot_dir  # noqa: E402
from bridge.vla_models import smolvla_torch as st  # noqa: E402
from jaxrl_vla.config import ConfigError  # noqa: E402
from jaxrl_vla.models.vla.heads.flow import FlowConfig  # noqa: E402
from jaxrl_vla.models.vla.smolvla import NormStats, Normaliser  # noqa: E402

IMAGE = 32
# (text config overrides, LeRobot config overrides, stats layout)
CASES = {
    "kv<heads,processor": (dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
                           dict(num_vlm_layers=2, self_attn_every_n_layers=2), "processor"),
    "mqa,every3,buffers": (dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1),
                           dict(num_vlm_layers=3, self_attn_every_n_layers=3, action_mode="MIN_MAX"), "buffers"),
}


def _vlm_dir(root: Path, text: dict) -> Path:
    cfg = transformers.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                         initializer_range=0.1, rms_norm_eps=1e-5, **text),
        scale_factor=2, image_token_id=60)
    cfg.save_pretrained(root / "vlm")
    return root / "vlm"


def _stats(rng: np.random.Generator, state_dim: int, action_dim: int) -> dict:
    return {"observation.state": {"mean": rng.normal(size=state_dim), "std": rng.uniform(0.5, 2, state_dim),
                                  "min": -rng.uniform(1, 2, state_dim), "max": rng.uniform(1, 2, state_dim)},
            "action": {"mean": rng.normal(size=action_dim), "std": rng.uniform(0.5, 2, action_dim),
                       "min": -rng.uniform(1, 2, action_dim), "max": rng.uniform(1, 2, action_dim)},
            "observation.images.top": {"mean": rng.uniform(size=(3, 1, 1)), "std": rng.uniform(size=(3, 1, 1))}}


def _make(root: Path, case: str, seed: int = 0):
    text, overrides, layout = CASES[case]
    vlm = _vlm_dir(root, text)
    config = st.lerobot_config(str(vlm), image_size=IMAGE, **overrides)
    rng = np.random.default_rng(seed)
    stats = _stats(rng, 2, 2)
    vlm_config = json.loads((vlm / "config.json").read_text())
    torch.manual_seed(seed)
    normaliser = Normaliser()  # shapes only: the reference needs no statistics
    cfg = lerobot_dir.twin_config(config, vlm_config, normaliser)
    policy = st.SmolVLAPolicyTorch(cfg, vlm_config, noise_head=True).eval()
    with torch.no_grad():
        for p in policy.parameters():  # non-trivial norms and biases
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    out = st.save_lerobot(policy, str(root / "policy"), config, stats, layout)
    return Path(out), policy, stats, config


def _obs(rng: np.random.Generator, batch: int = 2):
    mask = np.ones((batch, 5), bool)
    mask[0, 3:] = False  # right padding, as LeRobot's tokenizer step pads
    return {"rgb": rng.integers(0, 256, (batch, IMAGE, IMAGE, 3), dtype=np.uint8),
            "proprio": rng.normal(size=(batch, 2)).astype(np.float32),
            "language": rng.integers(0, 59, (batch, 5)).astype(np.int32), "language_mask": mask}


def _np_normalize(x, s: NormStats, layout: str, eps: float = 1e-8, inverse: bool = False):
    """LeRobot's formulas written out in NumPy (normalize_processor.py / the older normalize.py)."""
    a, b = np.asarray(s.a, np.float32), np.asarray(s.b, np.float32)
    if s.mode == "MEAN_STD":
        return x * b + a if inverse else (x - a) / (b + eps)
    if layout == "buffers":
        return (x + 1) / 2 * (b - a) + a if inverse else (x - a) / (b - a + 1e-8) * 2 - 1
    d = np.where(b - a == 0, eps, b - a)
    return (x + 1) / 2 * d + a if inverse else 2 * (x - a) / d - 1


def _torch_inputs(obs, normaliser: Normaliser, cfg):
    img = torch.as_tensor(obs["rgb"]).permute(0, 3, 1, 2).float() / 255.0
    state = _np_normalize(obs["proprio"], normaliser.state, normaliser.layout, normaliser.eps)
    state = torch.as_tensor(np.pad(state, ((0, 0), (0, cfg.max_state_dim - state.shape[1]))), dtype=torch.float32)
    return ([img * 2.0 - 1.0], [torch.ones(img.shape[0], dtype=torch.bool)], torch.as_tensor(obs["language"]).long(),
            torch.as_tensor(obs["language_mask"]), state)


def _with_noise_head(variables, policy):
    w = policy.model._noise_head
    head = {"kernel": jnp.asarray(w.weight.detach().numpy().T), "bias": jnp.asarray(w.bias.detach().numpy())}
    params = variables["params"]
    return {**variables, "params": {**params, "head": {**params["head"], "noise_head": head}}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_matches_torch_reference(tmp_path, case):
    path, policy, stats, config = _make(tmp_path, case)
    rng = np.random.default_rng(1)
    obs = _obs(rng)
    model, variables, info = lerobot_dir.read_lerobot_dir(path, flow=FlowConfig(steps=config["num_steps"], method="ode"))
    cfg = model.config
    assert info.layout == CASES[case][2]
    variables = _with_noise_head(variables, policy)
    # ODE: the same initial noise gives the same chunk (and, unnormalised, the same env actions)
    dist, value = model.apply(variables, obs)
    actions, _, sample_info = dist.sample(jax.random.PRNGKey(3))
    noise = torch.as_tensor(np.asarray(sample_info.chain[:, 0]))
    with torch.no_grad():
        want = policy.model.sample_actions(*_torch_inputs(obs, cfg.normaliser, cfg), noise).numpy()
    np.testing.assert_allclose(np.asarray(sample_info.chain[:, -1]), want, atol=1e-4)
    env_want = _np_normalize(want[:, : cfg.n_action_steps, : cfg.action_dim], cfg.normaliser.action,
                             cfg.normaliser.layout, inverse=True)
    np.testing.assert_allclose(np.asarray(actions), env_want, atol=1e-4)
    assert actions.shape == (2, config["n_action_steps"], 2) and value.shape == (2,)
    # Flow-Noise: the twin's chain log-prob equals the reference's Gaussian chain density
    noisy = model.clone(flow=FlowConfig(steps=config["num_steps"], method="flow_noise"))
    dist, _ = noisy.apply(variables, obs)
    _, log_prob, info_noise = dist.sample(jax.random.PRNGKey(4))
    chain = np.asarray(info_noise.chain, np.float64)
    with torch.no_grad():
        cache, pad, _ = policy.model.prefix(*_torch_inputs(obs, cfg.normaliser, cfg))
        k_steps = config["num_steps"]
        ref = (-0.5 * chain[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)).reshape(2, -1).sum(-1)
        for k in range(k_steps):
            t = torch.full((2,), 1.0 - k / k_steps, dtype=torch.float32)
            v, hidden = policy.model.denoise_step(pad, cache, torch.as_tensor(chain[:, k], dtype=torch.float32), t,
                                                  return_hidden=True)
            std = 0.08 + 0.08 * torch.sigmoid(policy.model._noise_head(hidden))
            mean = chain[:, k] + (-1.0 / k_steps) * v.numpy()
            z = (chain[:, k + 1] - mean) / std.numpy()
            ref += (-0.5 * z**2 - np.log(std.numpy()) - 0.5 * math.log(2 * math.pi)).reshape(2, -1).sum(-1)
    np.testing.assert_allclose(np.asarray(log_prob), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dist.log_prob(info_noise)), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trip_is_bit_exact(tmp_path, case):
    path, policy, stats, _ = _make(tmp_path, case)
    model, variables, info = lerobot_dir.read_lerobot_dir(path)
    out = lerobot_dir.save_lerobot_dir(tmp_path / "exported", variables, info)
    names = sorted(p.name for p in path.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [lerobot_dir.RL_HEADS_FILE])
    for name in names:
        if name.endswith(".safetensors"):
            a, b = dict(hf_dir.iter_safetensors(path / name)), dict(hf_dir.iter_safetensors(out / name))
            assert sorted(a) == sorted(b), name
            for key in a:
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (name, key)
        else:
            assert json.loads((path / name).read_text()) == json.loads((out / name).read_text()), name
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if not k.startswith(
        lerobot_dir._BUFFER_PREFIXES)}
    reference = st.SmolVLAPolicyTorch(model.config, info.vlm_config)
    reference.load_state_dict(state, strict=True)
    _, again, _ = lerobot_dir.read_lerobot_dir(out)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), variables, again)


def test_normalisation_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    a, b = tuple(rng.normal(size=3).tolist()), tuple(rng.uniform(0.5, 2, 3).tolist())
    lo = tuple(rng.uniform(-2, -1, 3).tolist())
    cases = [NormStats("MEAN_STD", a, b), NormStats("MIN_MAX", lo, b), NormStats("MIN_MAX", (0.5, 0.5, 0.5),
                                                                                   (0.5, 1.0, 1.5))]
    for layout in ("processor", "buffers"):
        for s in cases:
            n = Normaliser(state=s, action=s, layout=layout)
            np.testing.assert_allclose(np.asarray(n.normalize_state(x)), _np_normalize(x, s, layout), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(n.unnormalize_action(x)), _np_normalize(x, s, layout, inverse=True), atol=1e-6,
                                       rtol=1e-6)
    assert np.array_equal(np.asarray(Normaliser().normalize_state(x)), x)  # IDENTITY


def _edit(path: Path, name: str, **changes) -> None:
    config = json.loads((path / name).read_text())
    config.update(changes)
    (path / name).write_text(json.dumps(config))


def test_bad_input_lines(tmp_path):
    path, *_ = _make(tmp_path, "kv<heads,processor")
    _edit(path, "config.json", type="pi0")
    with pytest.raises(ConfigError, match=r"'pi0' has no Flax twin; supported: \['smolvla'\]"):
        lerobot_dir.read_lerobot_dir(path)
    _edit(path, "config.json", type="smolvla")
    (path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(ConfigError, match="policy_postprocessor_step_0_unnormalizer_processor.safetensors"):
        lerobot_dir.read_lerobot_dir(path)
    path2, *_ = _make(tmp_path / "b", "mqa,every3,buffers")
    tensors = dict(hf_dir.iter_safetensors(path2 / "model.safetensors"))
    hf_dir._write_shard(path2 / "model.safetensors", [(k, v) for k, v in tensors.items() if "unnormalize" not in k])
    with pytest.raises(ConfigError, match=r"\['unnormalize_outputs.buffer_action.min', "
                                          r"'unnormalize_outputs.buffer_action.max'\] are missing"):
        lerobot_dir.read_lerobot_dir(path2)
    with pytest.raises(ConfigError, match="steps=1 with method 'flow_sde': needs >= 2 steps"):
        FlowConfig(steps=1, method="flow_sde")


def _train_config(policy_dir: Path, out: Path, **policy) -> dict:
    return {
        "trainer": {"buffer_type": "standard", "num_envs": 2, "buffer_size": 4, "iterations": 1, "seed": 0,
                    "eval_freq": 0, "save_freq": 1, "exp_name": "lerobot_smolvla", "output_dir": str(out)},
        "algorithm": {"name": "ppo", "cfg": {"learning_rate": 1e-4, "n_epochs": 1, "batch_size": 4,
                                             "gamma": 0.9, "gae_lambda": 0.9}},
        "policy": {"name": "vla", "action_chunk": 2,
                   "vla_config": {"model_path": str(policy_dir), "model_config": {"flow": {"method": "flow_sde"}}},
                   **policy},
        "env": {"name": "VLReach-v0", "num_objects": 2, "image_size": IMAGE, "action_dim": 2,
                "max_episode_steps": 8, "proprio_velocity": False},
    }


def _run_cli(config: dict, tmp_path: Path):
    import subprocess
    import sys

    file = tmp_path / "train.json"
    file.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "jaxrl_vla.train", "--config", str(file), "--no-progress"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a CLI training subprocess on a LeRobot directory
def test_cli_trains_one_iteration_from_a_lerobot_dir_and_names_env_mismatches(tmp_path):
    path, *_ = _make(tmp_path, "kv<heads,processor")
    result = _run_cli(_train_config(path, tmp_path / "runs"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert any((run / "checkpoints").iterdir())
    bad = _train_config(path, tmp_path / "runs_bad", action_chunk=4)
    result = _run_cli(bad, tmp_path)
    assert result.returncode == 2 and "policy.action_chunk (4) != n_action_steps (2)" in result.stderr
    bad["policy"]["action_chunk"], bad["env"]["action_dim"] = 2, 3
    result = _run_cli(bad, tmp_path)
    assert result.returncode == 2 and "output_features.action has dimension 2, the env's actions have shape (3,)" \
        in result.stderr
    assert not (tmp_path / "runs_bad").exists()


def _export_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "bridge.lerobot_dir", "export", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.long  # 1-4 min on 2 cores (4 when busy): a CLI training subprocess, then the export
def test_export_cli_writes_the_trained_run_back_as_a_lerobot_dir(tmp_path, capsys):
    from jaxrl_vla.eval import load_run
    from jaxrl_vla.models.vla_policy import unwrap_variables

    path, *_ = _make(tmp_path, "kv<heads,processor")
    result = _run_cli(_train_config(path, tmp_path / "runs"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "exported"
    assert lerobot_dir.main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    # LeRobot's names and layout: the source's files (config.json and the statistics as they were) + the RL heads
    names = sorted(p.name for p in path.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [lerobot_dir.RL_HEADS_FILE])
    for name in names:
        if name == lerobot_dir.MODEL_FILE:
            a, b = dict(hf_dir.iter_safetensors(path / name)), dict(hf_dir.iter_safetensors(out / name))
            assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype for k in a)
            assert any(not np.array_equal(a[k], b[k]) for k in a)  # PPO moved LeRobot's weights
        elif name.endswith(".safetensors"):  # the normaliser statistics, bit for bit
            a, b = dict(hf_dir.iter_safetensors(path / name)), dict(hf_dir.iter_safetensors(out / name))
            assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a), name
        else:
            assert json.loads((path / name).read_text()) == json.loads((out / name).read_text()), name
    # it reads back with the run's trained weights (RL heads included) and the source's statistics
    model, variables, info = lerobot_dir.read_lerobot_dir(out)
    source_model, source_variables, source = lerobot_dir.read_lerobot_dir(path)
    assert info.layout == source.layout == "processor"
    assert model.config.normaliser == source_model.config.normaliser
    assert model.config.normaliser.state.mode != "IDENTITY" and model.config.normaliser.action.b
    trained = unwrap_variables(load_run(run).params)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y, np.asarray(x).dtype)),
                           variables, {"params": trained["params"]})
    assert not np.array_equal(np.asarray(variables["params"]["value_head"]["kernel"]),
                              np.asarray(source_variables["params"]["value_head"]["kernel"]))
    # bad input: an existing --out without --overwrite, a run not trained from a LeRobot directory: exit 2, one line
    before = (out / lerobot_dir.MODEL_FILE).read_bytes()
    assert lerobot_dir.main(["export", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} exists; pass --overwrite" in err[0]
    assert (out / lerobot_dir.MODEL_FILE).read_bytes() == before
    assert lerobot_dir.main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 0
    not_lerobot = tmp_path / "run_from_hf"
    not_lerobot.mkdir()
    config = json.loads((run / "config.json").read_text())
    config["policy"]["vla_config"]["model_path"] = str(tmp_path / "vlm")  # a Hugging Face directory
    (not_lerobot / "config.json").write_text(json.dumps(config))
    result = _export_cli("--run", str(not_lerobot), "--out", str(tmp_path / "never"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --run {not_lerobot}: policy.vla_config.model_path {str(tmp_path / 'vlm')!r} is not a LeRobot "
        f"directory (a config.json with LeRobot's 'type'; needed for the layout and the statistics)")
    assert not (tmp_path / "never").exists()
