"""Behaviour cloning of the SmolVLM-shaped VLA with the flow-matching head (bridge.tiny_smolvlm bc --head flow):
pi0's flow-matching loss against NumPy and its time convention against heads/flow.py's Euler sampler; a short
bc_flow writes a directory policy.action_head type 'flow' loads with the cloned head and a lower loss; the
smolvlm_flow_noise / smolvlm_flow_sde configs fine-tune it from the CLI and `export` writes the trained head."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import tiny_smolvlm
from jaxrl_vla.models.vla.heads.flow import FlowConfig, sample


def test_flow_matching_loss_equals_numpy_and_its_zero_loss_field_integrates_to_the_data():
    rng = np.random.default_rng(0)
    batch, horizon, dim = 5, 3, 2
    actions = rng.normal(size=(batch, horizon, dim)).astype(np.float32)
    noise = rng.normal(size=(batch, horizon, dim)).astype(np.float32)
    t = rng.uniform(0.01, 1.0, batch).astype(np.float32)
    w = rng.normal(size=(dim, dim)).astype(np.float32)
    c = rng.normal(size=(dim,)).astype(np.float32)

    def field(x, tt):  # any velocity field: linear in x, affine in t
        return x @ w + tt[:, None, None] * c, None

    got = float(tiny_smolvlm.flow_matching_loss(field, jnp.asarray(actions), jnp.asarray(noise), jnp.asarray(t)))
    x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * actions
    want = np.mean((x_t @ w + t[:, None, None] * c - (noise - actions)) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The field with zero loss for one datum a is v(x, t) = (x - a) / t (x_t - a = t (noise - a)); heads/flow.py's
    # Euler steps from t = 1 (noise) to t = 0 must carry any start onto a: the loss and the sampler agree on
    # which end is the data (the opposite sign would integrate away from it).
    target = jnp.asarray(actions)

    def exact(x, tt):
        return (x - target) / tt[:, None, None], None

    assert float(tiny_smolvlm.flow_matching_loss(exact, target, jnp.asarray(noise), jnp.asarray(t))) < 1e-10
    chunk, _, _ = sample(exact, jax.random.PRNGKey(0), actions.shape, FlowConfig(steps=4, method="ode"), True)
    np.testing.assert_allclose(np.asarray(chunk), actions, atol=1e-5)
    times = np.asarray(tiny_smolvlm.flow_times(jax.random.PRNGKey(1), 4096))
    assert times.min() >= 0.001 and times.max() <= 1.0 and abs(times.mean() - (0.6 * 0.999 + 0.001)) < 0.02  # Beta(1.5, 1)


# ----------------------------------------------------------------------------- bc_flow end to end (long)

STEPS, BATCH, EPISODES = 400, 16, 20  # 400 steps: the loss on fixed rows ~1.70 -> ~0.83 (150 steps: 1.58)


@pytest.fixture(scope="module")
def flow_bc(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("flow_bc")
    info = tiny_smolvlm.bc_flow(root / "bc", root / "demos.npz", steps=STEPS, batch_size=BATCH, eval_episodes=4,
                                episodes=EPISODES)
    return root, info


def _policy(path: Path, env):
    from jaxrl_vla.models.lm_policy import build_lm_model

    head = dict(tiny_smolvlm.FLOW_HEAD, method="flow_noise")
    return build_lm_model({"action_chunk": 1, "action_head": head, "vla_config": {"model_path": str(path)}}, env,
                          np.float32)


@pytest.mark.long  # ~2-4 min on 2 busy cores: demos, a jitted BC, a JAX evaluation
def test_bc_flow_writes_a_flow_directory_with_the_cloned_head_and_a_lower_loss(flow_bc):
    from safetensors.numpy import load_file

    from bridge import pretrain_bc as pbc
    from jaxrl_vla.models.vla.flow_vla import HEAD_FILE, FlowVLA, head_state_dict

    root, info = flow_bc
    out = root / "bc"
    assert (out / "config.json").is_file() and (out / HEAD_FILE).is_file()
    saved = json.loads((out / "bc.json").read_text())
    assert saved["head"] == "flow" and saved["steps"] == STEPS and saved["eval"]["episodes"] == 4
    assert [h["step"] for h in saved["history"]] == list(range(50, STEPS + 1, 50))
    env = pbc.make_env()
    trained_module, trained = _policy(out, env)
    init_module, init = _policy(tiny_smolvlm.make(root / "init", 0), env)  # bc_flow's starting point
    file = load_file(str(out / HEAD_FILE))
    assert set(file) == set(head_state_dict(jax.device_get(trained["params"])))
    assert any(k.startswith("head.expert.") for k in file) and any(k.startswith("proprio_proj.") for k in file)
    assert {"head.noise_head.kernel", "value_head.kernel"} <= set(file)
    flat = head_state_dict(jax.device_get(trained["params"]))  # the loaded head is the file's ...
    fresh = head_state_dict(jax.device_get(init["params"]))
    for key in file:
        np.testing.assert_array_equal(flat[key], file[key])
    expert = [k for k in file if k.startswith("head.expert.")]
    moved = [k for k in expert if not np.array_equal(file[k], fresh[k])]
    assert len(moved) == len(expert) and not np.array_equal(file["value_head.kernel"], fresh["value_head.kernel"])
    np.testing.assert_array_equal(file["head.noise_head.kernel"], fresh["head.noise_head.kernel"])  # not cloned
    lm_moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                                                trained["params"]["lm"], init["params"]["lm"]))
    assert sum(lm_moved) > len(lm_moved) // 2  # the VLM (HF files) was cloned with it
    # the flow-matching loss on fixed demo rows, noise and times: the cloned model's well below the start's
    data = pbc.ensure_demos(root / "demos.npz", EPISODES, 0, 0.1, env, pbc.ENV_KWARGS)
    rows = np.arange(0, len(data["action"]), max(len(data["action"]) // 128, 1))[:128]
    obs = pbc.numpy_batch(data, rows)
    actions = jnp.asarray(data["action"][rows])[:, None]
    noise = jax.random.normal(jax.random.PRNGKey(7), actions.shape)
    t = tiny_smolvlm.flow_times(jax.random.PRNGKey(8), len(rows))

    def loss(module, variables):
        dist, _, _ = module.apply(variables, obs, method=FlowVLA.forward)
        return float(tiny_smolvlm.flow_matching_loss(dist.field, actions, noise, t))

    before, after = loss(init_module, init), loss(trained_module, trained)
    assert after < 0.7 * before, (before, after)


def _train(config: str, model_path: Path, out: Path):
    return subprocess.run(
        [sys.executable, "-m", "jaxrl_vla.train", "--config", config, "--no-progress",
         "--set", f"policy.vla_config.model_path={json.dumps(str(model_path))}", "--set", "trainer.iterations=1",
         "--set", "trainer.num_envs=4", "--set", "trainer.buffer_size=8", "--set", "trainer.eval_freq=0",
         "--set", "algorithm.cfg.batch_size=16", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=900)


@pytest.mark.long  # ~1 min per config on 2 cores: a CLI training subprocess
@pytest.mark.parametrize("method", ["flow_noise", "flow_sde"])
def test_flow_config_fine_tunes_the_bc_directory_and_export_writes_the_trained_head(flow_bc, method, tmp_path):
    from safetensors.numpy import load_file

    from jaxrl_vla.eval import load_run
    from jaxrl_vla.models.vla.flow_vla import HEAD_FILE, head_state_dict

    root, _ = flow_bc
    config = f"configs/vla_example/smolvlm_{method}.json"
    result = _train(config, root / "bc", tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert load_run(run).config["policy"]["action_head"]["method"] == method
    assert tiny_smolvlm.main(["export", "--run", str(run), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / HEAD_FILE))
    cloned = load_file(str(root / "bc" / HEAD_FILE))
    assert set(exported) == set(cloned)
    trained = head_state_dict(jax.device_get(load_run(run).params["params"]["model"]))
    for key in exported:
        np.testing.assert_array_equal(exported[key], trained[key])
    assert any(not np.array_equal(exported[k], cloned[k]) for k in exported)  # PPO moved the cloned head
    # the export is a directory the flow configs start from again (the VLM as HF files + the head file)
    from bridge import pretrain_bc as pbc

    _, again = _policy(tmp_path / "exported", pbc.make_env())
    np.testing.assert_array_equal(head_state_dict(jax.device_get(again["params"]))["value_head.kernel"],
                                  trained["value_head.kernel"])


def test_flow_vs_gaussian_report_and_plot_on_fake_rows(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import flow_vs_gaussian as bench

    starts = {"gaussian": {"success_rate": 0.5, "episodes": 128}, "flow_noise": {"success_rate": 0.25, "episodes": 128},
              "flow_sde": {"success_rate": 0.25, "episodes": 128}}
    curves = {name: [{"global_step": 2560 * i, "success_rate": s["success_rate"] + 0.05 * i, "return_mean": 0.0,
                      "wall_s": 60.0 * i if i < 3 else None} for i in range(1, 4)] for name, s in starts.items()}
    finals = {name: {"success_rate": s["success_rate"] + 0.2, "iteration": 30} for name, s in starts.items()}
    results = [bench.summary(n, tmp_path / n, curves[n], starts[n], finals[n], {"steps": 600}) for n in starts]
    assert results[0]["final_success"] == 0.7 and results[0]["best_eval_success"] == pytest.approx(0.65)
    assert results[1]["env_steps"] == 7680 and results[1]["wall_s"] is None and results[1]["bc_steps"] == 600
    info = {"machine": "x86_64", "processor": "cpu", "cpu_count": 2, "cpu_affinity": 2, "python": "3.11",
            "jax": "0.10.2", "jaxlib": "0.10.2", "platform": "Linux"}
    text = bench.markdown(results, 8.0, "3 at once", {"before": (2.0, 1.5, 1.0), "after": (3.0, 2.5, 2.0)}, info)
    assert "(8 min per arm, 3 at once)" in text and "the same 128 seeded evaluation episodes" in text
    assert "| Gaussian head | 50.0% | 70.0% | +20.0 pts | 65.0% | 30 | 7680 | - |" in text
    assert "| flow head, Flow-SDE | 25.0% | 45.0% | +20.0 pts |" in text
    assert "before the runs 2.00/1.50/1.00, after the runs 3.00/2.50/2.00" in text and "Machine: x86_64" in text
    path = bench.plot(curves, starts, tmp_path / "curves.png")
    assert path.stat().st_size > 10000
    with pytest.raises(SystemExit, match="--run 'ppo=runs/x'"):
        bench.parse_runs(["ppo=runs/x"])
