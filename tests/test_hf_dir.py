"""Hugging Face model directories in and out (bridge.hf_dir), against transformers' save/from_pretrained."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from bridge import hf_dir
from jaxrl_vla.config import ConfigError

CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)


def _hf(use_head: bool = True, dtype: torch.dtype = torch.float32) -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(**CFG, vision_use_head=use_head)
    config._attn_implementation = "eager"
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def _check_forward(module, variables, hf: SiglipVisionModel, atol: float = 1e-5) -> None:
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.float()(pixel_values=pixels)
    hidden, pooled = module.apply(variables, jnp.asarray(pixels.numpy()), channels_first=True)
    np.testing.assert_allclose(np.asarray(hidden, np.float32), ref.last_hidden_state.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled, np.float32), ref.pooler_output.numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_single_file_and_sharded_dirs_load(tmp_path, shard) -> None:
    hf = _hf()
    hf.save_pretrained(tmp_path / "m", **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert (hf_dir.INDEX_FILE in files) == bool(shard)
    if shard:
        assert len(hf_dir.shard_files(tmp_path / "m")) > 1
    module, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    assert config["architectures"] == ["SiglipVisionModel"]
    _check_forward(module, variables, hf)


def test_bf16_dir_keeps_or_casts_dtype(tmp_path) -> None:
    hf = _hf(dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "m")
    _, variables, _ = hf_dir.load_hf_dir(tmp_path / "m")
    kernel = variables["params"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = hf.encoder.layers[0].mlp.fc1.weight.detach().T.float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), want)  # bf16 bits read exactly
    module, v32, _ = hf_dir.load_hf_dir(tmp_path / "m", param_dtype=jnp.float32)
    assert v32["params"]["post_layernorm"]["scale"].dtype == jnp.float32
    _check_forward(module, v32, hf)


@pytest.mark.parametrize("use_head", [True, False])
def test_round_trip_from_pretrained(tmp_path, use_head: bool) -> None:
    hf = _hf(use_head)
    hf.save_pretrained(tmp_path / "m")
    _, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    out = hf_dir.save_hf_dir(tmp_path / "out", config, variables, max_shard_bytes=10_000)
    index = json.loads((out / hf_dir.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    back = SiglipVisionModel.from_pretrained(out)
    assert set(back.state_dict()) == set(hf.state_dict())
    fresh = SiglipVisionModel(hf.config)
    fresh.load_state_dict(back.state_dict(), strict=True)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    # single file when it fits; replacing needs overwrite=True and leaves no temp dirs
    with pytest.raises(ConfigError, match="exists"):
        hf_dir.save_hf_dir(out, config, variables)
    hf_dir.save_hf_dir(out, config, variables, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    assert torch.equal(SiglipVisionModel.from_pretrained(out).state_dict()["head.probe" if use_head else
                                                                          "post_layernorm.weight"],
                       hf.state_dict()["head.probe" if use_head else "post_layernorm.weight"])


def test_failed_export_leaves_nothing(tmp_path) -> None:
    hf = _hf()
    hf.save_pretrained(tmp_path / "m")
    _, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    variables["params"]["stray"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(ConfigError, match="stray"):
        hf_dir.save_hf_dir(tmp_path / "out", config, variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_hub_id_says_download_first(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="download it first"):
        hf_dir.load_hf_dir("google/siglip-base-patch16-224")


def test_dir_without_config_says_what_it_expected(tmp_path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.json.*model\.safetensors"):
        hf_dir.load_hf_dir(tmp_path / "m")


def test_missing_shard_named(tmp_path) -> None:
    _hf().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    victim = hf_dir.shard_files(tmp_path / "m")[1]
    victim.unlink()
    with pytest.raises(hf_dir.MissingShardError, match=victim.name):
        hf_dir.load_hf_dir(tmp_path / "m")


def test_mismatched_tensor_names_key_and_both_shapes(tmp_path) -> None:
    _hf().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_dir.TensorShapeError, match=r"'encoder\.layers\.0\.mlp\.fc1\.bias' has shape \(48,\).*needs \(40,\)"):
        hf_dir.load_hf_dir(tmp_path / "m")


def test_unknown_architecture_lists_supported(tmp_path) -> None:
    _hf().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(architectures=["DinoV2Model"], model_type="dinov2")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_dir.UnsupportedArchitectureError, match=r"DinoV2Model.*supported: \[.*SiglipVisionModel"):
        hf_dir.load_hf_dir(tmp_path / "m")


def test_old_vision_model_prefix_and_unexpected_keys(tmp_path) -> None:
    hf = _hf()
    hf.save_pretrained(tmp_path / "m")
    _, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    hf_dir.save_hf_dir(tmp_path / "old", config, variables, key_prefix="vision_model.")
    module, v2, _ = hf_dir.load_hf_dir(tmp_path / "old")
    _check_forward(module, v2, hf)
    config["vision_use_head"] = False
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_dir.TensorKeyError, match="head.probe"):
        hf_dir.load_hf_dir(tmp_path / "m")


# ----------------------------------------------------------------------------- decoder language models

import jax  # noqa: E402
import transformers  # noqa: E402

from bridge.vla_loading import find_twin  # noqa: E402

DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaModel, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaModel, transformers.GemmaForCausalLM),
}


def _decoder(family: str, causal_lm: bool, tied: bool):
    torch.manual_seed(1)
    config_cls, base, causal = DECODERS[family]
    config = config_cls(vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=6, tie_word_embeddings=tied)
    model = (causal if causal_lm else base)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "family,causal_lm,tied",
    [("llama", True, False), ("llama", True, True), ("qwen2", False, False), ("qwen2", True, True),
     ("gemma", True, True), ("gemma", False, True)],
)  # fmt: skip
def test_decoder_dirs_round_trip(tmp_path, family, causal_lm, tied) -> None:
    """save_pretrained -> load_hf_dir (the rule table's variables, bit for bit) -> save_hf_dir -> from_pretrained."""
    hf = _decoder(family, causal_lm, tied)
    hf.save_pretrained(tmp_path / "m", max_shard_size="30KB")
    on_disk = json.loads((tmp_path / "m" / hf_dir.INDEX_FILE).read_text())["weight_map"]
    if causal_lm:  # a tied head is not on disk
        assert ("lm_head.weight" in on_disk) is not tied
    module, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    assert ("lm_head" in variables["params"]) == (causal_lm and not tied)
    want = find_twin(type(hf)).convert_fn(hf, hf.state_dict())
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, want)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 53, (1, 5)))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(np.asarray(ids)))
    got = module.apply(variables, ids)
    want_out = ref.logits if causal_lm else ref.last_hidden_state
    np.testing.assert_allclose(np.asarray(got), want_out.numpy(), atol=1e-5, rtol=0)
    out = hf_dir.save_hf_dir(tmp_path / "out", config, variables, max_shard_bytes=20_000)
    written = json.loads((out / hf_dir.INDEX_FILE).read_text())["weight_map"]
    assert set(written) == set(on_disk)
    back = type(hf).from_pretrained(out)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_tied_head_present_on_disk_is_skipped(tmp_path) -> None:
    """Some writers keep the tied copy: it is read past, not reported as unexpected."""
    from safetensors.torch import save_file

    hf = _decoder("llama", True, True)
    hf.save_pretrained(tmp_path / "m")
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in state
    save_file(state, str(tmp_path / "m" / hf_dir.SINGLE_FILE), metadata={"format": "pt"})
    _, variables, _ = hf_dir.load_hf_dir(tmp_path / "m")
    assert "lm_head" not in variables["params"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["tie_word_embeddings"] = False  # untied: the head must be there and is read
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    _, untied, _ = hf_dir.load_hf_dir(tmp_path / "m")
    np.testing.assert_array_equal(np.asarray(untied["params"]["lm_head"]["kernel"]), state["lm_head.weight"].numpy().T)
