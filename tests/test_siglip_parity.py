"""The Flax SigLIP vision tower against transformers' SiglipVisionModel (small configs, random weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig as HFSiglipVisionConfig
from transformers import SiglipVisionModel as HFSiglipVisionModel

import bridge
from bridge.vla_loading import flax_to_torch, torch_to_flax
from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel

# Two image sizes and patch grids; odd-ish widths; two layer-norm epsilons.
CONFIGS = {
    "img16_p4": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     image_size=16, patch_size=4),
    "img30_p6": dict(hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3,
                     image_size=30, patch_size=6, layer_norm_eps=1e-5),
}  # fmt: skip


def _hf_model(name: str, use_head: bool, seed: int = 0) -> HFSiglipVisionModel:
    torch.manual_seed(seed)
    config = HFSiglipVisionConfig(**CONFIGS[name], vision_use_head=use_head)
    config._attn_implementation = "eager"
    model = HFSiglipVisionModel(config).eval()
    with torch.no_grad():  # HF's init leaves biases and LayerNorms trivial: make every tensor matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _pixels(model: HFSiglipVisionModel, batch: int = 2, seed: int = 1) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_head", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_transformers(name: str, use_head: bool) -> None:
    hf = _hf_model(name, use_head)
    pixels = _pixels(hf)
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
    twin = SiglipVisionModel(SiglipVisionConfig.from_hf_dict(hf.config.to_dict()))
    variables = torch_to_flax(hf, hf.state_dict())
    nhwc = jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())
    hidden, pooled = jax.jit(twin.apply)(variables, nhwc)
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    if use_head:
        assert pooled.shape == (2, hf.config.hidden_size)
        np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    else:
        assert pooled is None and ref.pooler_output is None
    # HF's own NCHW layout gives the same numbers.
    hidden_cf, _ = twin.apply(variables, jnp.asarray(pixels.numpy()), channels_first=True)
    np.testing.assert_allclose(np.asarray(hidden_cf), ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_head", [True, False])
def test_export_round_trip_bit_equal(use_head: bool) -> None:
    hf = _hf_model("img30_p6", use_head)
    variables = torch_to_flax(hf, {k: v.clone() for k, v in hf.state_dict().items()})
    fresh = _hf_model("img30_p6", use_head, seed=7)
    fresh.load_state_dict(flax_to_torch(fresh, variables), strict=True)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_bf16_compute_close_to_float32() -> None:
    hf = _hf_model("img16_p4", True)
    twin = SiglipVisionModel(SiglipVisionConfig.from_hf_dict(hf.config.to_dict()))
    variables = torch_to_flax(hf, hf.state_dict())
    nhwc = jnp.asarray(_pixels(hf).permute(0, 2, 3, 1).numpy())
    h32, p32 = twin.apply(variables, nhwc)
    h16, p16 = twin.clone(dtype=jnp.bfloat16).apply(variables, nhwc)
    assert h16.dtype == jnp.bfloat16 and p16.dtype == jnp.bfloat16
    for lo, hi in ((h16, h32), (p16, p32)):
        err = np.abs(np.asarray(lo, np.float32) - np.asarray(hi)).max() / np.abs(np.asarray(hi)).max()
        assert err < 5e-2


def test_load_vla_model_through_the_registry(tmp_path) -> None:
    hf = _hf_model("img16_p4", True)
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    module, variables = bridge.load_vla_model(path, type(hf), hf.config.to_dict())
    pixels = _pixels(hf)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).pooler_output.numpy()
    _, pooled = module.apply(variables, jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(pooled), ref, atol=1e-5, rtol=0)


def test_wrong_image_size_names_both_sizes() -> None:
    cfg = SiglipVisionConfig.from_hf_dict(CONFIGS["img16_p4"])
    twin = SiglipVisionModel(cfg)
    with pytest.raises(ValueError, match=r"24x24.*image_size 16x16"):
        twin.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))
    with pytest.raises(ValueError, match="channels"):
        twin.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16, 16)))


@pytest.mark.parametrize(
    "extra, needle",
    [({"hidden_act": "quick_gelu"}, "hidden_act"), ({"num_attention_heads": 5}, "num_attention_heads"),
     ({"model_type": "siglip2_vision_model"}, "siglip2_vision_model"), ({"num_patches": 256}, "num_patches")],
)  # fmt: skip
def test_unsupported_config_refused_by_name(extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SiglipVisionConfig.from_hf_dict({**CONFIGS["img16_p4"], **extra})


def test_full_siglip_config_takes_vision_config() -> None:
    cfg = SiglipVisionConfig.from_hf_dict({"model_type": "siglip", "vision_config": CONFIGS["img30_p6"]})
    assert (cfg.image_size, cfg.patch_size, cfg.num_patches) == (30, 6, 25)
