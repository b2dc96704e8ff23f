"""The composite VLM twins (SmolVLM, PaliGemma) against transformers 5, built from small random configs.

Weights cross through the bridge's rule table (`find_twin(...).convert_fn`) or a
Hugging Face directory (`bridge.hf_dir`); the Flax configs come from the HF
config dicts, so the config mappings are tested too. Padded query rows are junk
in both implementations and are not compared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bridge import hf_dir  # noqa: E402
from bridge.vla_loading import export_to_torch, find_twin, load_vla_model, read_checkpoint  # noqa: E402
from jaxrl_vla.config import ConfigError  # noqa: E402
from jaxrl_vla.models.vla import paligemma, smolvlm  # noqa: E402
from jaxrl_vla.models.vla.siglip import _torch_arange_f32, navit_position_ids  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor away from HF's init (norms at 1/0, zero biases), so each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ----------------------------------------------------------------------------- SmolVLM

SMOL_CASES = {
    # kv heads < heads, image 16 / patch 4 / scale 2 (4 image tokens per image), untied
    "gqa": dict(vision=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=4),
                text=dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
                    rope_type="default", rope_theta=10000.0)),
                scale_factor=2, tie_word_embeddings=False),
    # odd widths, scale 3 on a 6x6 grid, tied head, another rope_theta
    "tied": dict(vision=dict(hidden_size=18, intermediate_size=20, num_hidden_layers=1, num_attention_heads=3,
                             image_size=24, patch_size=4, layer_norm_eps=1e-5),
                 text=dict(hidden_size=27, num_attention_heads=3, num_key_value_heads=3, head_dim=10,
                           rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
                 scale_factor=3, tie_word_embeddings=True),
}  # fmt: skip
VOCAB, IMG = 61, 60  # image token id inside the vocabulary (SmolVLM's is)


def smol_config(case: str) -> "transformers.SmolVLMConfig":
    c = SMOL_CASES[case]
    text = dict(vocab_size=VOCAB, intermediate_size=40, num_hidden_layers=2, model_type="llama", pad_token_id=None,
                bos_token_id=None, eos_token_id=None, **c["text"])
    cfg = transformers.SmolVLMConfig(vision_config=c["vision"], text_config=text, scale_factor=c["scale_factor"],
                                     image_token_id=IMG, tie_word_embeddings=c["tie_word_embeddings"])
    cfg._attn_implementation = "eager"
    return cfg


def build_smol(case: str, conditional: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cls = transformers.SmolVLMForConditionalGeneration if conditional else transformers.SmolVLMModel
    ref = perturb(cls(smol_config(case)), seed)
    variables = find_twin(cls).convert_fn(ref, ref.state_dict())
    return ref, variables


def image_ids(batch: int, n_images: list[int], per_image: int, text: int, seed: int) -> torch.Tensor:
    """[B, T]: `text` random tokens, then each sample's image tokens, then 2 more text tokens (T fixed)."""
    gen = torch.Generator().manual_seed(seed)
    length = text + max(n_images) * per_image + 2
    ids = torch.randint(0, IMG, (batch, length), generator=gen)
    for b, n in enumerate(n_images):
        ids[b, text : text + n * per_image] = IMG
    return ids


def smol_inputs(cfg, size: int, seed: int, padding: str):
    """Two samples: 2 images and 1 image + a padding (all-zero) image; padding on the text."""
    per_image = (size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor**2
    ids = image_ids(2, [2, 1], per_image, text=3, seed=seed)
    pix = torch.randn(2, 2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    pix[1, 1] = 0.0  # a padding image: HF drops it, the twin must never read its features
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, -2:] = 0
    elif padding == "left":  # left-padded rows: the pads sit before the text
        ids[1] = torch.roll(ids[1], 2)
        mask[1, :2] = 0
    return ids, mask, pix


def jit_apply(model):
    """model.apply under jit (eager dispatch of the many tiny ops costs more than compiling them once)."""
    return jax.jit(model.apply, static_argnames=("method", "channels_first"))


def run_smol(apply, variables, ids, mask, pix, pixel_mask=None):
    pm = None if pixel_mask is None else jnp.asarray(pixel_mask.numpy())
    args = (jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), jnp.asarray(pix.numpy()), pm)
    return np.asarray(apply(variables, *args, channels_first=True))


@pytest.mark.parametrize("case", sorted(SMOL_CASES))
def test_smolvlm_hidden_states_match_transformers(case):
    ref, variables = build_smol(case)
    cfg = smol_config(case)
    apply = jit_apply(smolvlm.SmolVLMModel(smolvlm.SmolVLMConfig.from_hf_dict(cfg.to_dict())))
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    smaller = (grid - cfg.scale_factor) * cfg.vision_config.patch_size  # a second image size (bucketed positions)
    for size, padding in ((cfg.vision_config.image_size, "right"), (smaller, "left")):
        ids, mask, pix = smol_inputs(cfg, size, seed=size, padding=padding)
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask, pixel_values=pix).last_hidden_state.numpy()
        got = run_smol(apply, variables, ids, mask, pix)
        rows = mask.numpy().astype(bool)
        assert max_abs(got[rows], want[rows]) <= TOL, (case, size, padding)


def test_smolvlm_pixel_attention_mask_and_logits():
    """Images padded inside the frame (the processor's pixel mask) and the LM head, tied and untied."""
    for case in ("gqa", "tied"):
        ref, variables = build_smol(case, conditional=True, seed=3)
        cfg = smol_config(case)
        assert ("lm_head" in variables["params"]) is not cfg.tie_word_embeddings
        model = smolvlm.SmolVLMForConditionalGeneration(smolvlm.SmolVLMConfig.from_hf_dict(cfg.to_dict()))
        ids, mask, pix = smol_inputs(cfg, cfg.vision_config.image_size, seed=5, padding="none")
        pixel_mask = torch.ones(2, 2, *pix.shape[-2:], dtype=torch.bool)
        p = cfg.vision_config.patch_size
        pixel_mask[0, 1, -2 * p :, :] = False  # the second image of sample 0: its last two patch rows are padding
        pixel_mask[0, 1, :, -p - 1 :] = False  # and a bit more than its last patch column
        pix = pix * pixel_mask[:, :, None]
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask, pixel_values=pix, pixel_attention_mask=pixel_mask)
            plain = ref(input_ids=ids, attention_mask=mask, pixel_values=pix).logits.numpy()
        got = run_smol(jit_apply(model), variables, ids, mask, pix, pixel_mask)
        assert max_abs(got, out.logits.numpy()) <= TOL
        assert max_abs(plain, out.logits.numpy()) > 1e-3  # the mask mattered


def test_idefics3_uses_the_smolvlm_twin(tmp_path):
    """Idefics3 (SmolVLM's parent): same twin; logits, export bit for bit, directory round trip."""
    c = smol_config("gqa").to_dict()
    cfg = transformers.Idefics3Config(vision_config=dict(SMOL_CASES["gqa"]["vision"]), text_config=c["text_config"],
                                      scale_factor=2, image_token_id=IMG, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = perturb(transformers.Idefics3ForConditionalGeneration(cfg), 0)
    twin = find_twin(type(ref))
    variables = twin.convert_fn(ref, ref.state_dict())
    model = smolvlm.SmolVLMForConditionalGeneration(smolvlm.SmolVLMConfig.from_hf_dict(cfg.to_dict()))
    ids, mask, pix = smol_inputs(smol_config("gqa"), 16, seed=4, padding="right")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pix).logits.numpy()
    got = run_smol(jit_apply(model), variables, ids, mask, pix)
    rows = mask.numpy().astype(bool)
    assert max_abs(got[rows], want[rows]) <= TOL
    fresh = transformers.Idefics3ForConditionalGeneration(cfg)
    fresh.load_state_dict(twin.export_fn(fresh, variables), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], t) for k, t in ref.state_dict().items())
    ref.save_pretrained(tmp_path / "m")
    module, loaded, config = hf_dir.load_hf_dir(tmp_path / "m")
    assert isinstance(module, smolvlm.SmolVLMForConditionalGeneration)
    back = type(ref).from_pretrained(hf_dir.save_hf_dir(tmp_path / "out", config, loaded))
    assert all(torch.equal(back.state_dict()[k], t) for k, t in ref.state_dict().items())


def test_navit_position_ids_match_transformers():
    """SmolVLM's bucketed positions, read off HF's embedding module (conv zeroed, table row r = r)."""
    for side in range(1, 65):
        want = torch.arange(1 / side, 1.0, 1 / side).numpy()
        assert np.array_equal(_torch_arange_f32(1 / side, 1.0, 1 / side), want), side
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionConfig, SmolVLMVisionEmbeddings

    for side in (19, 32):
        emb = SmolVLMVisionEmbeddings(SmolVLMVisionConfig(hidden_size=1, image_size=side, patch_size=1))
        with torch.no_grad():
            emb.patch_embedding.weight.zero_()
            emb.patch_embedding.bias.zero_()
            emb.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
        grid = side + 3
        mask = torch.zeros(3, grid, grid, dtype=torch.bool)
        mask[0, :side, :side] = True  # the full grid
        mask[1, : side - 1, :] = True  # taller than the table, one row short
        mask[2, :2, : max(1, side // 2)] = True
        with torch.no_grad():
            want = emb(torch.zeros(3, 3, grid, grid), mask)[..., 0].numpy().astype(np.int64)
        got = np.asarray(navit_position_ids(jnp.asarray(mask.numpy()), side))
        assert np.array_equal(got, want), side


# ----------------------------------------------------------------------------- PaliGemma

PALI_CASES = {
    "img16": dict(vision=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, vision_use_head=False),
                  text=dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                  tie_word_embeddings=True),
    "img15": dict(vision=dict(hidden_size=18, intermediate_size=20, num_hidden_layers=1, num_attention_heads=3,
                              image_size=15, patch_size=5, vision_use_head=True),
                  text=dict(hidden_size=27, num_attention_heads=2, num_key_value_heads=2, head_dim=12,
                            rope_parameters=dict(rope_type="default", rope_theta=250000.0)),
                  tie_word_embeddings=False),
}  # fmt: skip
PALI_IMG = 70  # image_token_index >= vocab (as in PaliGemma): HF embeds id 0 there


def pali_config(case: str) -> "transformers.PaliGemmaConfig":
    c = PALI_CASES[case]
    text = dict(vocab_size=VOCAB, intermediate_size=40, num_hidden_layers=2, model_type="gemma", **c["text"])
    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(c["vision"], model_type="siglip_vision_model"), text_config=text,
        projection_dim=c["text"]["hidden_size"], image_token_index=PALI_IMG,
        tie_word_embeddings=c["tie_word_embeddings"],
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    return cfg


def build_pali(case: str, conditional: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cls = transformers.PaliGemmaForConditionalGeneration if conditional else transformers.PaliGemmaModel
    ref = perturb(cls(pali_config(case)), seed)
    variables = find_twin(cls).convert_fn(ref, ref.state_dict())
    return ref, variables


def pali_inputs(cfg, seed: int, padding: str):
    """[image tokens][prefix 3][suffix 3] per sample, the processor's layout; token_type 1 on the suffix."""
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, n + 6), generator=gen)
    ids[:, :n] = PALI_IMG
    token_type = torch.zeros_like(ids)
    token_type[:, -3:] = 1
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, -2:] = 0
    else:
        ids[0], token_type[0] = torch.roll(ids[0], 2), torch.roll(token_type[0], 2)
        mask[0, :2] = 0
        ids[0, :2] = 1
    pix = torch.randn(3, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen)
    return ids, mask, token_type, pix


@pytest.mark.parametrize("case", sorted(PALI_CASES))
def test_paligemma_hidden_states_and_logits_match_transformers(case):
    ref, variables = build_pali(case, seed=1)
    cfg = pali_config(case)
    assert ("lm_head" in variables["params"]) is not cfg.tie_word_embeddings
    model = paligemma.PaliGemmaForConditionalGeneration(paligemma.PaliGemmaConfig.from_hf_dict(cfg.to_dict()))

    @jax.jit
    def hidden_and_logits(variables, *args):
        hidden = model.apply(variables, *args, method="hidden", channels_first=True)
        return hidden, model.apply(variables, hidden, method="head")

    outputs = []
    for padding, with_tt in (("right", True), ("right", False), ("left", True)):
        ids, mask, token_type, pix = pali_inputs(cfg, seed=2, padding=padding)
        for tt in [token_type if with_tt else None]:
            with torch.no_grad():
                out = ref(input_ids=ids, attention_mask=mask, pixel_values=pix, token_type_ids=tt,
                          output_hidden_states=True)
            args = (jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), jnp.asarray(pix.numpy()),
                    None if tt is None else jnp.asarray(tt.numpy()))
            hidden, logits = (np.asarray(x) for x in hidden_and_logits(variables, *args))
            rows = mask.numpy().astype(bool)
            assert max_abs(hidden[rows], out.hidden_states[-1].numpy()[rows]) <= TOL, (case, padding, tt is None)
            assert max_abs(logits[rows], out.logits.numpy()[rows]) <= TOL
            outputs.append(out.logits.numpy()[rows])
    assert max_abs(outputs[0], outputs[1]) > 1e-3  # the bidirectional prefix mattered


def test_paligemma_base_model_and_wrong_image_size():
    ref, variables = build_pali("img16", conditional=False, seed=4)
    cfg = pali_config("img16")
    model = paligemma.PaliGemmaModel(paligemma.PaliGemmaConfig.from_hf_dict(cfg.to_dict()))
    ids, mask, token_type, pix = pali_inputs(cfg, seed=5, padding="right")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pix, token_type_ids=token_type)
    nhwc = jnp.asarray(pix.permute(0, 2, 3, 1).numpy())
    got = np.asarray(jit_apply(model)(variables, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), nhwc,
                                      jnp.asarray(token_type.numpy())))
    rows = mask.numpy().astype(bool)
    assert max_abs(got[rows], want.last_hidden_state.numpy()[rows]) <= TOL
    with torch.no_grad():  # text only: image ids (outside the vocabulary) embed as id 0, nothing scattered
        text_only = ref(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    assert max_abs(got[rows], text_only[rows]) <= TOL
    with pytest.raises(ValueError, match=r"24x24.*image_size 16x16"):
        model.apply(variables, jnp.asarray(ids.numpy()), pixel_values=jnp.zeros((3, 24, 24, 3)))
    with pytest.raises(ValueError, match=r"15 image tokens.*16 feature rows"):
        model.apply(variables, jnp.asarray(ids.numpy())[:1, 1:], pixel_values=nhwc[:1])


# ----------------------------------------------------------------------------- export and directories

ALL_CLASSES = [
    ("smol", "gqa", transformers.SmolVLMModel),
    ("smol", "tied", transformers.SmolVLMForConditionalGeneration),
    ("smol", "gqa", transformers.SmolVLMForConditionalGeneration),
    ("pali", "img16", transformers.PaliGemmaForConditionalGeneration),
    ("pali", "img15", transformers.PaliGemmaForConditionalGeneration),
    ("pali", "img15", transformers.PaliGemmaModel),
]


def _build(kind, case, cls, seed):
    torch.manual_seed(seed)
    return perturb(cls(smol_config(case) if kind == "smol" else pali_config(case)), seed)


@pytest.mark.parametrize("kind,case,cls", ALL_CLASSES, ids=[f"{c.__name__}-{k}" for _, k, c in ALL_CLASSES])
def test_export_back_bit_equal(kind, case, cls):
    ref = _build(kind, case, cls, seed=6)
    twin = find_twin(cls)
    variables = twin.convert_fn(ref, {k: v.clone() for k, v in ref.state_dict().items()})
    fresh = _build(kind, case, cls, seed=7)
    fresh.load_state_dict(twin.export_fn(fresh, variables), strict=True)
    for key, tensor in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_load_vla_model_and_export_to_torch_files(tmp_path):
    ref = _build("pali", "img16", transformers.PaliGemmaForConditionalGeneration, seed=8)
    src = tmp_path / "pali.pt"  # a plain state_dict: the tied head repeats the embedding there
    torch.save(ref.state_dict(), src)
    config = ref.config.to_dict()
    module, variables = load_vla_model(src, type(ref), config)
    assert isinstance(module, paligemma.PaliGemmaForConditionalGeneration)
    out = export_to_torch(variables, type(ref), config, tmp_path / "export.safetensors")
    back = type(ref)(type(ref).config_class.from_dict(config))
    back.load_state_dict(read_checkpoint(out), strict=True)
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


@pytest.mark.parametrize("kind,case,cls", [ALL_CLASSES[i] for i in (0, 1, 3, 4, 5)],
                         ids=["SmolVLMModel", "SmolVLM-tied", "PaliGemma-tied", "PaliGemma-untied", "PaliGemmaModel"])
def test_hf_directory_round_trip(tmp_path, kind, case, cls):
    ref = _build(kind, case, cls, seed=9)
    ref.save_pretrained(tmp_path / "m", max_shard_size="50KB")
    assert (tmp_path / "m" / hf_dir.INDEX_FILE).is_file()
    tied = bool(getattr(ref.config, "tie_word_embeddings", False)) and hasattr(ref, "lm_head")
    on_disk = json.loads((tmp_path / "m" / hf_dir.INDEX_FILE).read_text())["weight_map"]
    if hasattr(ref, "lm_head"):  # transformers leaves a tied head off the disk
        assert any(k.endswith("lm_head.weight") for k in on_disk) is not tied
    module, variables, config = hf_dir.load_hf_dir(tmp_path / "m")
    want = find_twin(cls).convert_fn(ref, ref.state_dict())
    flat_got = jax.tree_util.tree_leaves_with_path(variables)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(flat_got) == len(flat_want)
    for path, leaf in flat_got:
        assert np.array_equal(np.asarray(leaf), np.asarray(flat_want[path])), path
    out = hf_dir.save_hf_dir(tmp_path / "out", config, variables, max_shard_bytes=20_000)
    assert len(hf_dir.shard_files(out)) > 1
    written = json.loads((out / hf_dir.INDEX_FILE).read_text())["weight_map"]
    assert set(written) == set(on_disk)  # the layout save_pretrained writes (PaliGemma: language_model.model.*)
    back = cls.from_pretrained(out)
    assert set(back.state_dict()) == set(ref.state_dict())
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    if tied:
        assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()


def test_paligemma_transformers4_layout_on_disk(tmp_path):
    """transformers 4 wrote the tower as `vision_tower.vision_model.*` (what google/paligemma-* directories hold)."""
    ref = _build("pali", "img15", transformers.PaliGemmaForConditionalGeneration, seed=10)
    ref.save_pretrained(tmp_path / "m")
    legacy = {}
    for key, tensor in ref.state_dict().items():
        key = key.replace("model.language_model.", "language_model.model.")
        key = key.replace("lm_head.", "language_model.lm_head.")
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.").replace(
            "model.multi_modal_projector.", "multi_modal_projector.")
        legacy[key] = tensor.contiguous()
    assert "vision_tower.vision_model.post_layernorm.weight" in legacy
    (tmp_path / "m" / hf_dir.SINGLE_FILE).unlink()
    save_file(legacy, str(tmp_path / "m" / hf_dir.SINGLE_FILE), metadata={"format": "pt"})
    _, variables, _ = hf_dir.load_hf_dir(tmp_path / "m")
    want = find_twin(type(ref)).convert_fn(ref, ref.state_dict())
    assert jax.tree_util.tree_all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, want))


# ----------------------------------------------------------------------------- refused options


@pytest.mark.parametrize(
    "family,edit,needle",
    [
        ("smol", lambda c: c["text_config"].update(rope_parameters={"rope_type": "linear", "factor": 2.0}), "linear"),
        ("smol", lambda c: c["vision_config"].update(image_size=[16, 24]), "image_size"),
        ("smol", lambda c: c.update(scale_factor=3), "scale_factor"),
        ("smol", lambda c: c["text_config"].update(model_type="mistral"), "mistral"),
        ("smol", lambda c: c.pop("text_config"), "text_config"),
        ("pali", lambda c: c["text_config"].update(sliding_window=16), "sliding_window"),
        ("pali", lambda c: c["text_config"].update(model_type="gemma2"), "gemma2"),
        ("pali", lambda c: c.update(projection_dim=20), "projection_dim"),
        ("pali", lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
        ("pali", lambda c: c["vision_config"].update(num_patches=64), "num_patches"),
    ],
)
def test_unimplemented_options_refused_by_name(family, edit, needle):
    config = (smol_config("gqa") if family == "smol" else pali_config("img16")).to_dict()
    edit(config)
    parse = smolvlm.SmolVLMConfig if family == "smol" else paligemma.PaliGemmaConfig
    with pytest.raises(ConfigError, match=needle):
        parse.from_hf_dict(config)
