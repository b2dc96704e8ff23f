"""Parity of the decoder twin (DecoderLM) with transformers' LlamaModel / Qwen2Model / GemmaModel.

Torch references are built from small configs with random weights (no
download); weights cross through the bridge's rule table, the Flax config
comes from the HF config dict (`DecoderConfig.from_hf_dict`), so the family
mappings are tested too. JAX matmuls run at "highest" precision.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bridge.vla_loading import export_to_torch, find_twin, load_vla_model, read_checkpoint  # noqa: E402
from jaxrl_vla.config import ConfigError  # noqa: E402
from jaxrl_vla.models.vla import (  # noqa: E402
    DecoderConfig,
    DecoderConfigError,
    DecoderForCausalLM,
    DecoderLM,
    block_causal_mask,
    causal_mask,
    position_ids_from_mask,
)

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaModel, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaModel, transformers.GemmaForCausalLM),
}

# (family, config overrides): kv heads < heads, tied/untied, two rope_theta values, odd hidden sizes,
# Gemma's head_dim independent of hidden.
CASES = [
    ("llama", dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)),
    ("llama", dict(hidden_size=27, num_attention_heads=3, num_key_value_heads=1, head_dim=12, rope_theta=500000.0,
                   tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    ("qwen2", dict(hidden_size=28, num_attention_heads=2, num_key_value_heads=1, rope_theta=1000000.0)),
    ("qwen2", dict(hidden_size=33, num_attention_heads=3, num_key_value_heads=3, head_dim=10, rope_theta=10000.0,
                   tie_word_embeddings=True)),
    ("gemma", dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=1, head_dim=10, rope_theta=10000.0)),
    ("gemma", dict(hidden_size=27, num_attention_heads=2, num_key_value_heads=2, head_dim=16, rope_theta=250000.0,
                   tie_word_embeddings=False)),
]


def hf_config(family: str, **overrides):
    kwargs = dict(vocab_size=97, intermediate_size=40, num_hidden_layers=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, attn_implementation="eager", pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)
    kwargs.update(overrides)
    return HF_CLASSES[family][0](**kwargs)


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """RMSNorm weights away from their init (1 for Llama, 0 for Gemma), so the (1 + w) form is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def build(family: str, overrides: dict, seed: int, causal_lm: bool = False):
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    ref = HF_CLASSES[family][2 if causal_lm else 1](cfg).eval()
    randomize_norms(ref, seed)
    twin = find_twin(type(ref))
    variables = twin.convert_fn(ref, ref.state_dict())
    return cfg, ref, variables


IDS_MASKS = {
    "none": [[1] * 9] * 3,
    "right": [[1] * 6 + [0] * 3, [1] * 9, [1] * 8 + [0]],
    "left": [[0] * 3 + [1] * 6, [1] * 9, [0] + [1] * 8],
}


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_hidden_states_match_transformers(family, overrides):
    seed = CASES.index((family, overrides))
    cfg, ref, variables = build(family, overrides, seed)
    model = DecoderLM(DecoderConfig.from_hf_dict(cfg.to_dict()))
    apply = jax.jit(model.apply)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(seed))
    for padding, mask_list in IDS_MASKS.items():
        mask = torch.tensor(mask_list)
        # positions: HF's default (0..T-1) and, for left padding, the mask-derived ones `generate` uses
        position_sets = [None] + ([position_ids_from_mask(jnp.asarray(mask.numpy()))] if padding == "left" else [])
        for pos in position_sets:
            with torch.no_grad():
                want = ref(input_ids=ids, attention_mask=mask,
                           position_ids=None if pos is None else torch.tensor(np.asarray(pos)).long())
            got = apply(variables, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), position_ids=pos)
            rows = mask.numpy().astype(bool)  # padded query rows are junk in both and never read
            assert got.shape == tuple(want.last_hidden_state.shape)
            err = max_abs(np.asarray(got)[rows], want.last_hidden_state.numpy()[rows])
            assert err <= 1e-5, (family, padding, pos is not None, err)


def test_sdpa_reference_on_real_tokens():
    """transformers' default attention (SDPA) agrees on every non-padding row, left and right padding."""
    cfg, _, variables = build("llama", CASES[0][1], seed=0)
    torch.manual_seed(0)
    ref = transformers.LlamaModel(cfg).eval()
    ref.config._attn_implementation = "sdpa"
    ref.load_state_dict(find_twin(type(ref)).export_fn(ref, variables), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([IDS_MASKS["left"][0], IDS_MASKS["right"][0], IDS_MASKS["none"][0]])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = np.asarray(DecoderLM(DecoderConfig.from_hf_dict(cfg.to_dict())).apply(
        variables, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    rows = mask.numpy().astype(bool)
    assert max_abs(got[rows], want[rows]) <= 1e-5


def test_position_ids_from_mask_matches_generate_convention():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    want = mask.long().cumsum(-1) - 1
    want.masked_fill_(mask == 0, 1)
    assert np.array_equal(np.asarray(position_ids_from_mask(jnp.asarray(mask.numpy()))), want.numpy())


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_inputs_embeds_and_causal_lm_logits(family):
    overrides = dict(CASES[0 if family == "llama" else 4][1])
    for tied in (True, False):
        overrides["tie_word_embeddings"] = tied
        cfg, ref, variables = build(family, overrides, seed=11, causal_lm=True)
        assert ("lm_head" in variables["params"]) is not tied
        model = DecoderForCausalLM(DecoderConfig.from_hf_dict(cfg.to_dict()))
        ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = ref(input_ids=ids).logits.numpy()
            embeds = ref.get_input_embeddings()(ids)  # Gemma's scale included, as HF does
            want_e = ref.model(inputs_embeds=embeds).last_hidden_state.numpy()
        got = model.apply(variables, jnp.asarray(ids.numpy()))
        assert max_abs(got, want) <= 1e-5
        got_e = model.apply(variables, inputs_embeds=jnp.asarray(embeds.numpy()), method=DecoderForCausalLM.hidden)
        assert max_abs(got_e, want_e) <= 1e-5


def test_kv_prefix_equals_one_long_sequence():
    """Attending to a returned k/v prefix is the same as running prefix + suffix as one causal sequence."""
    cfg, _, variables = build("qwen2", CASES[2][1], seed=5)
    variables = {"params": variables["params"]}
    model = DecoderLM(DecoderConfig.from_hf_dict(cfg.to_dict()))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10)))
    full = model.apply(variables, ids)
    _, kv = model.apply(variables, ids[:, :6], return_kv=True)
    assert len(kv) == cfg.num_hidden_layers and kv[0][0].shape == (2, 6, cfg.num_key_value_heads, 14)
    tail = model.apply(variables, ids[:, 6:], position_ids=jnp.arange(6, 10), kv_prefix=kv)
    assert max_abs(tail, full[:, 6:]) <= 1e-5
    # an explicit [B, Tq, Tp + Tq] mask that hides the prefix changes the answer
    hide = jnp.concatenate([jnp.zeros((2, 4, 6), bool), jnp.tril(jnp.ones((4, 4), bool))[None].repeat(2, 0)], -1)
    alone = model.apply(variables, ids[:, 6:], position_ids=jnp.arange(6, 10), kv_prefix=kv, mask=hide)
    assert max_abs(alone, tail) > 1e-3
    with pytest.raises(ValueError, match="attention mask has shape"):
        model.apply(variables, ids[:, 6:], kv_prefix=kv, mask=hide[:, :, 1:])


def test_block_causal_mask_against_loop():
    rng = np.random.default_rng(0)
    valid = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)
    ar = np.array([[0, 0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1, 1], rng.integers(0, 2, 7)])
    got = np.asarray(block_causal_mask(jnp.asarray(valid), jnp.asarray(ar)))
    want = np.zeros((3, 7, 7), bool)
    for b in range(3):
        block = np.cumsum(ar[b])
        for q in range(7):
            for k in range(7):
                want[b, q, k] = valid[b, q] and valid[b, k] and block[k] <= block[q]
    assert np.array_equal(got, want)
    # all-ones ar_mask is the causal mask on real query rows
    causal = np.asarray(causal_mask(jnp.asarray(valid), 3, 7))
    ones = np.asarray(block_causal_mask(jnp.asarray(valid), jnp.ones(7)))
    assert np.array_equal(ones[valid], causal[valid])


def test_bf16_close_to_float32():
    cfg, _, variables = build("gemma", CASES[4][1], seed=2)
    dcfg = DecoderConfig.from_hf_dict(cfg.to_dict())
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)))
    f32 = DecoderLM(dcfg).apply(variables, ids)
    bf16 = DecoderLM(dcfg, dtype=jnp.bfloat16).apply(variables, ids)
    assert bf16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(f32)))
    assert max_abs(bf16, f32) <= 0.05 * scale


@pytest.mark.parametrize(
    "family,extra,name",
    [
        ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "linear"),
        ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
         "yarn"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "sliding"),
        ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ],
)
def test_unimplemented_options_are_refused_by_name(family, extra, name):
    cfg = hf_config(family, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, **extra).to_dict()
    with pytest.raises(DecoderConfigError, match=name):
        DecoderConfig.from_hf_dict(cfg)
    # the legacy config.json spelling too
    if family == "llama":
        legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
        legacy["rope_scaling"] = {"type": name, "factor": 2.0}
        with pytest.raises(ConfigError, match=name):
            DecoderConfig.from_hf_dict(legacy)


def test_per_layer_rope_parameters_refused():
    cfg = hf_config("llama", hidden_size=16, num_attention_heads=2, num_key_value_heads=2).to_dict()
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(DecoderConfigError, match="per-layer-type rope"):
        DecoderConfig.from_hf_dict(cfg)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(DecoderConfigError, match=r"'mistral'.*gemma.*llama.*qwen2"):
        DecoderConfig.from_hf_dict({"model_type": "mistral", "hidden_size": 8})


def test_legacy_rope_theta_and_real_qwen2_sliding_window_field_accepted():
    cfg = hf_config("qwen2", hidden_size=16, num_attention_heads=2, num_key_value_heads=2).to_dict()
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=12345.0, rope_scaling=None, sliding_window=32768, use_sliding_window=False, layer_types=None)
    assert DecoderConfig.from_hf_dict(cfg).rope_theta == 12345.0
    # Gemma: a legacy hidden_act "gelu" means the tanh GELU (HF's GemmaConfig rewrites it too)
    gemma = hf_config("gemma", hidden_size=16, num_attention_heads=2, num_key_value_heads=2).to_dict()
    gemma["hidden_act"] = "gelu"
    got = DecoderConfig.from_hf_dict(gemma)
    assert got.hidden_act == "gelu_pytorch_tanh" and got.norm_scale_plus_one and got.scale_embeddings


@pytest.mark.parametrize("family,causal_lm,tied", [("llama", False, False), ("qwen2", True, False),
                                                    ("gemma", True, True)])
def test_load_and_export_round_trip_bit_equal(tmp_path, family, causal_lm, tied):
    overrides = dict(CASES[{"llama": 0, "qwen2": 2, "gemma": 4}[family]][1], tie_word_embeddings=tied)
    cfg, ref, _ = build(family, overrides, seed=7, causal_lm=causal_lm)
    src = tmp_path / "model.pt"  # a plain state_dict (a tied head repeats the embedding there)
    torch.save(ref.state_dict(), src)
    cls = type(ref)
    model_config = cfg.to_dict()
    module, variables = load_vla_model(src, cls, model_config)
    assert isinstance(module, DecoderForCausalLM if causal_lm else DecoderLM)
    out = export_to_torch(variables, cls, model_config, tmp_path / "export.safetensors")
    exported = read_checkpoint(out)
    back = cls(cls.config_class.from_dict(model_config)).eval()
    back.load_state_dict(exported, strict=True)
    want = ref.state_dict()
    for key, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[key]), key
