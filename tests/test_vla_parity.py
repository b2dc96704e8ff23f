"""Numerical parity of the Flax twins with transformers' torch models (random weights, no downloads).

Weights go through `bridge.vla_loading.torch_to_flax`, so these tests also
check the conversion rules. Matmuls run at "highest" precision on the JAX side.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bridge.vla_loading import torch_to_flax  # noqa: E402
from bridge.vla_models import GPTVLAModel as TorchGPTVLA  # noqa: E402
from jaxrl_vla.models.vla import (  # noqa: E402
    GPT2Model,
    GPTVLAModel,
    ResNetModel,
    VLAModelConfig,
    gpt2_config,
    resnet_config,
)

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats and affine params, so eval-mode BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                mod.weight.copy_(0.5 + torch.rand(n, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(n, generator=gen))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- GPT-2


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gpt2_hidden_states_match_transformers(attn_implementation):
    cfg = gpt2_config("tiny", vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    ref = transformers.GPT2Model(
        transformers.GPT2Config(**cfg.to_hf_kwargs(), attn_implementation=attn_implementation)
    ).eval()
    variables = torch_to_flax(ref, ref.state_dict())
    ids = torch.randint(0, 100, (3, 9))
    # right padding, left padding, no padding
    mask = torch.tensor([[1] * 6 + [0] * 3, [0] * 2 + [1] * 7, [1] * 9])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = np.asarray(jax.jit(GPT2Model(cfg).apply)(variables, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    # Query rows with no visible key (left-padded positions) are implementation-defined in torch's SDPA.
    rows = np.ones(mask.shape, bool) if attn_implementation == "eager" else mask.numpy().astype(bool)
    assert got.shape == want.shape
    assert max_abs(got[rows], want[rows]) <= 1e-5


def test_gpt2_inputs_embeds_match_transformers():
    cfg = gpt2_config("tiny", vocab_size=100, n_positions=32)
    torch.manual_seed(1)
    ref = transformers.GPT2Model(transformers.GPT2Config(**cfg.to_hf_kwargs())).eval()
    variables = torch_to_flax(ref, ref.state_dict())
    embeds = torch.randn(2, 7, cfg.n_embd)
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    with torch.no_grad():
        want = ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.numpy()
    apply = jax.jit(lambda v, m, e: GPT2Model(cfg).apply(v, attention_mask=m, inputs_embeds=e))
    got = apply(variables, jnp.asarray(mask.numpy()), jnp.asarray(embeds.numpy()))
    assert max_abs(got, want) <= 1e-5


# ----------------------------------------------------------------------------- ResNet

RESNET_CASES = {
    "tiny-basic": (resnet_config("tiny"), 32),
    "tiny-bottleneck": (resnet_config("tiny", layer_type="bottleneck", hidden_sizes=(16, 32), depths=(2, 1)), 32),
    "tiny-bottleneck-downsample-flags": (
        resnet_config(
            "tiny",
            layer_type="bottleneck",
            hidden_sizes=(16, 32),
            depths=(1, 2),
            downsample_in_first_stage=True,
            downsample_in_bottleneck=True,
        ),
        40,
    ),
    "resnet18": (resnet_config("resnet18"), 64),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_resnet_matches_transformers(case):
    cfg, size = RESNET_CASES[case]
    torch.manual_seed(0)
    ref = transformers.ResNetModel(transformers.ResNetConfig(**cfg.to_hf_kwargs()))
    randomize_batchnorm(ref)
    ref.eval()
    variables = torch_to_flax(ref, ref.state_dict())
    assert set(variables) == {"params", "batch_stats"}
    pixels = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    pooled, hidden = jax.jit(ResNetModel(cfg).apply)(variables, jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    want_hidden = out.last_hidden_state.permute(0, 2, 3, 1).numpy()
    assert hidden.shape == want_hidden.shape
    assert max_abs(hidden, want_hidden) <= 1e-5
    assert max_abs(pooled, out.pooler_output.flatten(1).numpy()) <= 1e-5


# ----------------------------------------------------------------------------- whole VLA


def tiny_vla_config(**overrides) -> dict:
    cfg = dict(
        vision_encoder="tiny",
        language_model="tiny",
        vocab_size=64,
        n_positions=16,
        max_instruction_length=6,
        proprio_dim=5,
        action_dim=3,
        image_size=32,
        value_hidden_dim=32,
        init_log_std=-0.3,
    )
    cfg.update(overrides)
    return cfg


def random_obs(cfg: VLAModelConfig, batch: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    size, length = cfg.image_size, cfg.max_instruction_length
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    obs = {
        "rgb": torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8),
        "language": torch.randint(0, cfg.vocab_size, (batch, length), generator=gen, dtype=torch.int32),
        "language_mask": torch.arange(length)[None] < lengths[:, None],
    }
    if cfg.proprio_dim:
        obs["proprio"] = torch.randn(batch, cfg.proprio_dim, generator=gen)
    if cfg.use_depth:
        obs["depth"] = torch.rand(batch, size, size, 1, generator=gen)
    return obs


def to_jax(obs: dict) -> dict:
    return {k: jnp.asarray(v.numpy()) for k, v in obs.items()}


def build_pair(**overrides):
    cfg = VLAModelConfig.from_dict(tiny_vla_config(**overrides))
    torch.manual_seed(0)
    ref = TorchGPTVLA(cfg)
    randomize_batchnorm(ref)
    with torch.no_grad():  # non-zero heads so the comparison is not trivially about biases
        ref.action_mean.weight.normal_(0.0, 0.1)
    ref.eval()
    return cfg, ref, GPTVLAModel(cfg), torch_to_flax(ref, ref.state_dict())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"action_chunk": 2, "use_depth": True}, {"proprio_dim": 0}, {"image_tokens": "spatial", "n_positions": 32},
     {"image_tokens": "spatial", "n_positions": 32, "token_order": "instruction_first"},
     {"proprio_dim": 0, "token_order": "instruction_first"}],
    ids=["plain", "chunk2-depth", "no-proprio", "spatial-image-tokens", "instruction-first", "instruction-first-no-proprio"],
)
def test_vla_outputs_match_torch(overrides):
    cfg, ref, model, variables = build_pair(**overrides)
    obs = random_obs(cfg)
    shape = (4, cfg.action_chunk, cfg.action_dim) if cfg.action_chunk > 1 else (4, cfg.action_dim)
    actions = torch.randn(*shape)
    with torch.no_grad():
        want_mean = ref(obs).numpy()
        want_value = ref.get_value(obs).numpy()
        want_logp, want_ent = (t.numpy() for t in ref.evaluate_actions(obs, actions))

    @jax.jit  # one compilation for all four entry points
    def outputs(variables, obs, actions):
        return (
            model.apply(variables, obs),
            model.apply(variables, obs, actions, method="evaluate_actions"),
            model.apply(variables, obs, method="forward"),
            model.apply(variables, obs, method="get_value"),
        )

    (dist, value), (got_logp, got_ent), got_mean, got_value = outputs(
        variables, to_jax(obs), jnp.asarray(actions.numpy())
    )
    assert dist.mean.shape == want_mean.shape and value.shape == (4,)
    assert max_abs(got_mean, want_mean) <= 1e-4
    assert max_abs(got_value, want_value) <= 1e-4
    assert max_abs(value, want_value[:, 0]) <= 1e-4
    assert got_logp.shape == (4,) and max_abs(got_logp, want_logp) <= 1e-4
    assert max_abs(got_ent, want_ent) <= 1e-4


def test_spatial_image_tokens_follow_the_feature_map():
    """One token per cell of the last feature map, and the sequence length the config predicts."""
    cfg = VLAModelConfig.from_dict(tiny_vla_config(image_tokens="spatial", n_positions=32))
    model = GPTVLAModel(cfg)
    obs = to_jax(random_obs(cfg, batch=2))
    variables = model.init(jax.random.key(0), obs)
    _, state = model.apply(variables, obs, capture_intermediates=True, mutable=["intermediates"])
    _, feature_map = state["intermediates"]["vision"]["__call__"][0]
    side = feature_map.shape[1]
    assert feature_map.shape[1:3] == (side, side) and cfg.num_image_tokens == side * side > 1
    image_tokens = state["intermediates"]["image_proj"]["__call__"][0]
    assert image_tokens.shape[:2] == (2, side * side)
    # row-major order: token r*side + c is cell (r, c)
    want = model.apply(variables, feature_map[:, 1, 0], method=lambda m, x: m.image_proj(x))
    np.testing.assert_allclose(np.asarray(image_tokens[:, side]), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_instruction_first_order_reads_out_after_the_image_and_ignores_padding():
    """[lang, img, proprio]: the readout (last token) sees the whole instruction, padding ids do not matter,
    and a left-padded instruction (slot 0 masked) stays finite and equal in both twins (slot 0 is kept visible)."""
    cfg, ref, model, variables = build_pair(token_order="instruction_first")
    obs = random_obs(cfg, batch=4, seed=5)
    obs["language_mask"] = torch.tensor([[True] * 6, [True, True, True, False, False, False],
                                         [False, False, True, True, True, True], [False] * 5 + [True]])
    mean = jax.jit(lambda v, o: model.apply(v, o, method="forward"))
    base = np.asarray(mean(variables, to_jax(obs)))
    with torch.no_grad():
        np.testing.assert_allclose(base, ref(obs).numpy(), atol=1e-4)
    assert np.isfinite(base).all()
    # ids under the mask (other than slot 0, which stays visible) change nothing
    other = dict(obs, language=torch.where(obs["language_mask"], obs["language"], (obs["language"] + 7) % cfg.vocab_size))
    other["language"][:, 0] = obs["language"][:, 0]
    np.testing.assert_allclose(np.asarray(mean(variables, to_jax(other))), base, atol=1e-6)
    # a visible instruction word does change the action: the readout attends to the instruction
    changed = dict(obs, language=obs["language"].clone())
    changed["language"][0, 2] = (changed["language"][0, 2] + 1) % cfg.vocab_size
    assert np.abs(np.asarray(mean(variables, to_jax(changed)))[0] - base[0]).max() > 1e-6
    # and the two orders are different models on the same weights
    image_first = GPTVLAModel(VLAModelConfig.from_dict(tiny_vla_config()))
    assert np.abs(np.asarray(image_first.apply(variables, to_jax(obs), method="forward")) - base).max() > 1e-4


def ppo_loss_terms(logp, entropy, value, old_logp, advantages, returns):
    """Clipped surrogate + value loss - entropy bonus; works on torch tensors and JAX arrays alike."""
    lib = torch if isinstance(logp, torch.Tensor) else jnp
    ratio = lib.exp(logp - old_logp)
    clipped = lib.clip(ratio, 0.8, 1.2)
    policy_loss = -lib.minimum(ratio * advantages, clipped * advantages).mean()
    value_loss = ((value - returns) ** 2).mean()
    return policy_loss + 0.5 * value_loss - 0.01 * entropy.mean()


@pytest.mark.parametrize("image_tokens,token_order", [("pooled", "image_first"), ("spatial", "image_first"),
                                                      ("spatial", "instruction_first")])
def test_ppo_gradients_match_torch(image_tokens, token_order):
    cfg, ref, model, variables = build_pair(action_chunk=1, image_tokens=image_tokens, n_positions=32,
                                            token_order=token_order)
    ref.train()  # the twin keeps BatchNorm frozen even in train mode; dropout is off
    obs = random_obs(cfg, batch=6, seed=3)
    gen = torch.Generator().manual_seed(4)
    actions = torch.randn(6, cfg.action_dim, generator=gen)
    advantages, returns = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    logp, entropy = ref.evaluate_actions(obs, actions)
    # old log-probs near the current ones: some ratios fall inside the clip range, some outside
    old_logp = logp.detach() + 0.3 * torch.randn(6, generator=gen)
    loss_t = ppo_loss_terms(logp, entropy, ref.get_value(obs)[:, 0], old_logp, advantages, returns)
    loss_t.backward()
    grads_t = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    grads_t = torch_to_flax(ref, grads_t, strict=False)["params"]

    jobs = to_jax(obs)
    j = lambda t: jnp.asarray(t.numpy())

    def loss_j(params):
        dist, value = model.apply({**variables, "params": params}, jobs)
        return ppo_loss_terms(dist.log_prob(j(actions)), dist.entropy(), value, j(old_logp), j(advantages), j(returns))

    loss_value, grads_j = jax.jit(jax.value_and_grad(loss_j))(variables["params"])
    assert abs(float(loss_value) - loss_t.item()) <= 1e-4

    flat_t = dict(jax.tree_util.tree_leaves_with_path(grads_t))
    flat_j = dict(jax.tree_util.tree_leaves_with_path(grads_j))
    assert set(flat_t) == set(flat_j)
    worst = 0.0
    for path, g_t in flat_t.items():
        g_t, g_j = np.asarray(g_t, np.float64), np.asarray(flat_j[path], np.float64)
        scale = max(np.max(np.abs(g_t)), 1e-6)
        rel = np.max(np.abs(g_t - g_j)) / scale
        worst = max(worst, rel)
        assert rel <= 1e-4, (jax.tree_util.keystr(path), rel)
    assert worst <= 1e-4
