"""The SmolVLM CLI example end to end: make the Hugging Face directory, fine-tune it from the example config
(a short run; the token head, and the Gaussian head whose parameters export beside the VLM), export it back,
and transformers loads the export with the trained weights."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bridge import tiny_smolvlm  # noqa: E402


def test_make_train_export_and_transformers_loads_it(tmp_path):
    vlm = tiny_smolvlm.make(tmp_path / "tiny_smolvlm")
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "jaxrl_vla.train", "--config", "configs/vla_example/smolvlm_tokens.json", "--no-progress",
         "--set", f"policy.vla_config.model_path={json.dumps(str(vlm))}", "--set", "trainer.iterations=2",
         "--set", "trainer.num_envs=4", "--set", "trainer.buffer_size=8", "--set", "trainer.eval_freq=0",
         "--set", "algorithm.cfg.batch_size=16", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = out.iterdir()
    exported = tiny_smolvlm.export(run, tmp_path / "exported")
    model = transformers.SmolVLMForConditionalGeneration.from_pretrained(exported).eval()
    start = transformers.SmolVLMForConditionalGeneration.from_pretrained(vlm).eval()
    trained, initial = model.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # PPO moved the weights
    from jaxrl_vla.eval import load_run

    lm = load_run(run).params["params"]["model"]["lm"]
    np.testing.assert_array_equal(trained["lm_head.weight"].numpy(), np.asarray(lm["lm_head"]["kernel"]).T)


@pytest.mark.slow  # ~45 s on 2 cores: a CLI training subprocess
def test_gaussian_head_config_trains_and_exports_the_vlm_with_its_head(tmp_path):
    from safetensors.numpy import load_file

    from jaxrl_vla.eval import load_run
    from jaxrl_vla.models.vla.gaussian_vla import HEAD_FILE

    vlm = tiny_smolvlm.make(tmp_path / "tiny_smolvlm")
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "jaxrl_vla.train", "--config", "configs/vla_example/smolvlm_gaussian.json",
         "--no-progress", "--set", f"policy.vla_config.model_path={json.dumps(str(vlm))}", "--set",
         "trainer.iterations=1", "--set", "trainer.num_envs=4", "--set", "trainer.buffer_size=8", "--set",
         "trainer.eval_freq=0", "--set", "algorithm.cfg.batch_size=16", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = out.iterdir()
    exported = tiny_smolvlm.export(run, tmp_path / "exported")
    model = transformers.SmolVLMForConditionalGeneration.from_pretrained(exported).eval()
    start = transformers.SmolVLMForConditionalGeneration.from_pretrained(vlm).eval()
    trained, initial = model.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # PPO moved the VLM's weights
    params = load_run(run).params["params"]["model"]
    np.testing.assert_array_equal(trained["model.text_model.embed_tokens.weight"].numpy(),
                                  np.asarray(params["lm"]["model"]["text_model"]["embed_tokens"]["embedding"]))
    head = load_file(str(exported / HEAD_FILE))  # the trained Gaussian head, in torch's layout, beside it
    np.testing.assert_array_equal(head["action_mean.weight"], np.asarray(params["action_mean"]["kernel"]).T)
    np.testing.assert_array_equal(head["log_std"], np.asarray(params["log_std"]))
    assert set(head) == {"log_std", "action_mean.weight", "action_mean.bias", "proprio_proj.weight",
                         "proprio_proj.bias", "value_head.weight", "value_head.bias"}
