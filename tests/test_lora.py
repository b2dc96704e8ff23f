"""LoRA parameter transform on the Llama-family twin: starts equal to the base, only adapters and heads train,
merged export equals the adapted forward; effective kernels against NumPy; config errors name policy.lora."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM
from jaxrl_vla.models.vla.lora import (
    LoraConfig,
    apply_lora,
    init_lora,
    lora_trainable_mask,
    merge_lora,
    path_str,
    validate_lora,
)

CFG = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
HEADS = ("params/lm_head",)


@pytest.fixture(scope="module")
def model_and_params():
    model = DecoderForCausalLM(CFG)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, CFG.vocab_size)
    params = model.init(jax.random.PRNGKey(0), ids)
    return model, params, ids


def test_effective_kernels_match_numpy_and_only_targets_change(model_and_params):
    model, params, ids = model_and_params
    lora = init_lora(jax.random.PRNGKey(2), params, LORA)
    assert sorted(lora) == sorted(f"params/model/layers_{i}/self_attn/{n}/kernel" for i in range(2)
                                  for n in ("q_proj", "v_proj"))
    r = np.random.default_rng(0)
    lora = {k: {"A": v["A"], "B": jnp.asarray(r.normal(size=v["B"].shape), jnp.float32)} for k, v in lora.items()}
    a0 = np.asarray(lora["params/model/layers_0/self_attn/q_proj/kernel"]["A"])
    assert np.abs(a0).max() <= 1 / np.sqrt(CFG.hidden_size) and a0.std() > 0.1 / np.sqrt(CFG.hidden_size)
    eff = apply_lora(params, lora, LORA)
    for (p, w), (_, we) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree_util.tree_flatten_with_path(eff)[0]):
        ab = lora.get(path_str(p))
        want = np.asarray(w) if ab is None else (
            np.asarray(w, np.float64) + 2.0 * np.asarray(ab["A"], np.float64) @ np.asarray(ab["B"], np.float64))
        np.testing.assert_allclose(np.asarray(we), want, rtol=1e-6, atol=1e-6)


def test_initial_equal_train_only_adapters_and_heads_then_merge(model_and_params):
    model, params, ids = model_and_params
    lora = init_lora(jax.random.PRNGKey(3), params, LORA)
    base_out = model.apply(params, ids)
    np.testing.assert_array_equal(model.apply(apply_lora(params, lora, LORA), ids), base_out)

    mask = lora_trainable_mask(params, lora, HEADS)
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
    tx = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    state0 = {"base": params, "lora": lora}
    opt = tx.init(state0)
    target = jax.random.randint(jax.random.PRNGKey(4), ids.shape, 0, CFG.vocab_size)

    def loss(s):
        logits = model.apply(apply_lora(s["base"], s["lora"], LORA), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

    @jax.jit
    def step(s, o):
        g = jax.grad(loss)(s)
        u, o = tx.update(g, o, s)
        return optax.apply_updates(s, u), o

    s = state0
    for _ in range(3):
        s, opt = step(s, opt)
    for p, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        after = s["base"]
        for k in p:
            after = after[k.key]
        changed = not np.array_equal(np.asarray(before), np.asarray(after))
        assert changed == path_str(p).startswith("params/lm_head/"), path_str(p)
    for k in lora:
        assert not np.array_equal(s["lora"][k]["B"], lora[k]["B"])
        assert not np.array_equal(s["lora"][k]["A"], lora[k]["A"])
    assert loss(s) < loss(state0)

    adapted = jax.jit(lambda b, l: model.apply(apply_lora(b, l, LORA), ids))(s["base"], s["lora"])
    merged = merge_lora(s["base"], s["lora"], LORA)
    assert not np.allclose(adapted, base_out, atol=1e-4)
    np.testing.assert_allclose(model.apply(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_bf16_kernels_keep_their_dtype(model_and_params):
    _, params, _ = model_and_params
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    lora = init_lora(jax.random.PRNGKey(5), p16, LORA)
    eff = apply_lora(p16, lora, LORA)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(eff))


@pytest.mark.parametrize("cfg, field", [
    (LoraConfig(rank=0), "policy.lora.rank"),
    (LoraConfig(alpha=-1.0), "policy.lora.alpha"),
    (LoraConfig(targets=()), "policy.lora.targets"),
    (LoraConfig(targets=("q_proj", "qkv")), "policy.lora.targets: 'qkv'"),
])
def test_config_errors_name_the_field(model_and_params, cfg, field):
    _, params, _ = model_and_params
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_lora(params, cfg)


def test_patterns_and_full_paths(model_and_params):
    _, params, _ = model_and_params
    lora = init_lora(jax.random.PRNGKey(6), params, LoraConfig(rank=2, targets=("*_proj",)))
    assert len(lora) == 2 * 7 and "params/lm_head/kernel" not in lora  # q,k,v,o,gate,up,down per layer
    lora = init_lora(jax.random.PRNGKey(6), params, LoraConfig(rank=2, targets=("params/model/layers_1/*/o_proj/*",)))
    assert list(lora) == ["params/model/layers_1/self_attn/o_proj/kernel"]
