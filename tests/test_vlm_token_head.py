"""The action-token head on a vision-language prefix (SmolVLM, PaliGemma): the image goes through the VLM's
tower into the image tokens before the instruction, the action tokens follow, and the log-prob PPO re-scores
equals transformers' own torch model run over [image tokens, prompt, action tokens] with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bridge.vla_loading import find_twin  # noqa: E402
from jaxrl_vla.models.vla.heads.tokens import TokenHeadConfig, bins_to_token_ids  # noqa: E402
from jaxrl_vla.models.vla.paligemma import PaliGemmaConfig  # noqa: E402
from jaxrl_vla.models.vla.smolvlm import SmolVLMConfig  # noqa: E402
from jaxrl_vla.models.vla.token_vla import TokenVLA  # noqa: E402
from jaxrl_vla.models.vla_policy import VLAPolicy  # noqa: E402

VOCAB, IMG, BINS, SIZE, PROMPT = 80, 3, 16, 16, 5
VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
              patch_size=4)


def torch_vlm(family):
    torch.manual_seed(0)
    if family == "smolvlm":
        text = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, model_type="llama", pad_token_id=None, bos_token_id=None, eos_token_id=None)
        cfg = transformers.SmolVLMConfig(vision_config=VISION, text_config=text, scale_factor=2, image_token_id=IMG,
                                         tie_word_embeddings=False)
        cls, flax_cfg = transformers.SmolVLMForConditionalGeneration, SmolVLMConfig
    else:
        text = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=8, model_type="gemma")
        cfg = transformers.PaliGemmaConfig(vision_config=dict(VISION, model_type="siglip_vision_model"),
                                           text_config=text, projection_dim=24, image_token_index=IMG)
        cls, flax_cfg = transformers.PaliGemmaForConditionalGeneration, PaliGemmaConfig
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from HF's init, so every tensor matters
            p.add_(0.05 * torch.randn_like(p))
    variables = find_twin(cls).convert_fn(model, model.state_dict())
    return model, variables, flax_cfg.from_hf_dict(cfg.to_dict())


@pytest.mark.parametrize("family", ["smolvlm", "paligemma"])
def test_token_head_on_a_vlm_prefix_matches_transformers(family):
    model, twin_variables, vlm = torch_vlm(family)
    policy = VLAPolicy(TokenVLA(vlm.text, TokenHeadConfig(vocab_size=VOCAB, n_bins=BINS), (2, 2), vlm=vlm))
    rng = np.random.default_rng(0)
    obs = {"input_ids": jnp.asarray(rng.integers(4, 40, (2, PROMPT)), jnp.int32),
           "attention_mask": jnp.ones((2, PROMPT), jnp.int32),
           "rgb": jnp.asarray(rng.integers(0, 256, (2, SIZE, SIZE, 3)), jnp.uint8)}
    params = policy.init(jax.random.PRNGKey(0), obs)
    params = {"params": {**params["params"], "model": {**params["params"]["model"], "lm": twin_variables["params"]}}}
    dist, value = policy.apply(params, obs)
    actions, log_prob, bins = dist.sample(jax.random.PRNGKey(1))
    assert actions.shape == (2, 2, 2) and value.shape == (2, 2)
    pixels = (torch.from_numpy(np.asarray(obs["rgb"], np.float32)) / 255.0 - 0.5) / 0.5
    pixels = pixels.permute(0, 3, 1, 2)
    n_img = vlm.image_seq_len if family == "smolvlm" else vlm.num_image_tokens
    action_ids = np.asarray(bins_to_token_ids(bins.reshape(2, -1), VOCAB))
    ids = np.concatenate([np.full((2, n_img), IMG), np.asarray(obs["input_ids"]), action_ids], axis=1)
    with torch.no_grad():
        inputs = dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                      pixel_values=pixels[:, None] if family == "smolvlm" else pixels)
        if family == "paligemma":  # the twin's prompt is causal (no token types): say so to HF too
            inputs["token_type_ids"] = torch.ones(ids.shape, dtype=torch.long)
        logits = model(**inputs).logits.double().numpy()
    start = n_img + PROMPT - 1
    restricted = logits[:, start : start + action_ids.shape[1], VOCAB - BINS :]
    log_softmax = restricted - np.log(np.exp(restricted - restricted.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - restricted.max(-1, keepdims=True)
    want = np.take_along_axis(log_softmax, (action_ids - (VOCAB - BINS))[..., None], axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(log_prob), want, rtol=1e-4, atol=1e-4)
    rescored, entropy = dist.log_prob_and_entropy(bins)
    np.testing.assert_allclose(np.asarray(rescored), want, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(entropy)))
