"""Hardening of the model side: master-weight dtypes, the model config checked against the env, GAE's
bootstrap on terminated-and-truncated steps, the ResNet's activations against transformers, and the
non-overwriting VLABuffer under threads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_vla.config import ConfigError
from jaxrl_vla.envs.base import Box
from jaxrl_vla.models.vla_policy import build_vla_policy

CLASS = "bridge.vla_models.GPTVLAModel"
TINY = {
    "vision_encoder": "tiny", "language_model": "tiny", "vocab_size": 32, "max_instruction_length": 6,
    "action_dim": 2, "proprio_dim": 4, "image_size": 32, "value_hidden_dim": 16,
}


class ActionOnlyEnv:
    """An env that describes only its actions (no observation_space): the input checks have nothing to read."""

    action_space = Box(-1.0, 1.0, (2,))


def policy_cfg(model_path=None, dtype="float32", **model_overrides):
    return {"name": "vla", "action_chunk": 1, "action_dim": None, "dtype": dtype, "freeze": [],
            "vla_config": {"model_path": model_path, "model_class": CLASS,
                           "model_config": {**TINY, **model_overrides}, "make_checkpoint": None}}


# ----------------------------------------------------------------------------- 3. master weights


@pytest.mark.torch
@pytest.mark.parametrize("ckpt_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("policy_dtype", ["float32", "bfloat16"])
def test_half_precision_checkpoint_gets_float32_master_weights_and_adam_state(tmp_path, ckpt_dtype, policy_dtype):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bridge.vla_models import GPTVLAModel as TorchGPTVLA
    from jaxrl_vla.algo import ppo

    torch.manual_seed(0)
    half = getattr(torch, ckpt_dtype)
    state = {k: v.to(half) if v.is_floating_point() else v for k, v in TorchGPTVLA(TINY).state_dict().items()}
    torch.save(state, tmp_path / "half.pt")
    policy, variables, mask = build_vla_policy(policy_cfg(str(tmp_path / "half.pt"), policy_dtype), ActionOnlyEnv())
    floating = [leaf for leaf in jax.tree_util.tree_leaves(variables) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    # the values are the checkpoint's, exactly (a half value is representable in float32)
    log_std = state["log_std"].float().numpy()
    assert np.array_equal(np.asarray(variables["params"]["model"]["log_std"]), log_std)
    optimizer = ppo.make_optimizer(ppo.PPOConfig(), 10, mask)
    adam = [leaf for leaf in jax.tree_util.tree_leaves(optimizer.init(variables)) if getattr(leaf, "ndim", 0) > 0]
    assert adam and all(leaf.dtype == jnp.float32 for leaf in adam)
    obs = {"rgb": jnp.zeros((2, 32, 32, 3), jnp.uint8), "proprio": jnp.zeros((2, 4)),
           "language": jnp.full((2, 6), 3, jnp.int32), "language_mask": jnp.ones((2, 6), bool)}
    dist, value = policy.apply(variables, obs)
    assert dist.mean.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(value)))


# ----------------------------------------------------------------------------- 4. model inputs vs the env


def _reach(**kw):
    from jaxrl_vla.envs.vl_reach import VLReach

    return VLReach(**{"image_size": 32, "instruction_length": 6, **kw})


def test_vocab_size_below_the_env_token_ids_is_a_config_error():
    from jaxrl_vla.envs.vl_reach import tokenizer

    env = _reach()
    top = tokenizer(6).vocab_size - 1  # VLReach's largest token id
    assert int(env.observation_space["language"].high) == top
    with pytest.raises(ConfigError) as err:
        build_vla_policy(policy_cfg(vocab_size=top), env)
    assert str(err.value) == (f"policy.vla_config.model_config.vocab_size ({top}) is too small for observation "
                              f"'language': the env's token ids go up to {top} (needs vocab_size >= {top + 1})")
    # exactly enough ids, and the model runs on the env's own observations
    policy, variables, _ = build_vla_policy(policy_cfg(vocab_size=top + 1), env)
    _, obs = env.reset(jax.random.PRNGKey(0))
    dist, value = policy.apply(variables, jax.tree_util.tree_map(lambda x: x[None], obs))
    assert dist.mean.shape == (1, 2) and bool(jnp.isfinite(value).all())


@pytest.mark.parametrize(
    "env_kw, override, needle",
    [
        ({"image_size": 48}, {}, "image_size (32) != observation 'rgb''s size 48 (its shape is (48, 48, 3))"),
        ({}, {"proprio_dim": 2}, "proprio_dim (2) != observation 'proprio''s size 4 (its shape is (4,))"),
        ({"proprio_velocity": False}, {}, "proprio_dim (4) != observation 'proprio''s size 2"),
        ({"instruction_length": 9}, {"n_positions": 16}, "max_instruction_length (6) is below observation "
                                                          "'language''s size 9"),
        ({}, {"use_depth": True}, "the model reads observation 'depth' (image_size=32), which the env does not offer"),
        ({"use_depth": True, "image_size": 40}, {"use_depth": True, "image_size": 40, "vocab_size": 5},
         "vocab_size (5) is too small"),
    ],
    ids=["image_size", "proprio_dim", "proprio_position_only", "instruction_length", "depth_missing", "vocab"],
)
def test_model_config_against_the_observation_space_names_field_key_and_sizes(env_kw, override, needle):
    with pytest.raises(ConfigError) as err:
        build_vla_policy(policy_cfg(**override), _reach(**env_kw))
    message = str(err.value)
    assert message.startswith("policy.vla_config.model_config") and needle in message and "\n" not in message


def test_inputs_are_checked_before_the_checkpoint_is_read(tmp_path):
    """A mismatch is reported from the config alone: the (here unreadable) checkpoint is never opened."""
    (tmp_path / "noise.pt").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="image_size"):
        build_vla_policy(policy_cfg(str(tmp_path / "noise.pt")), _reach(image_size=40))


def test_other_model_families_register_their_own_input_checks(monkeypatch):
    from jaxrl_vla.models import vla_policy

    class Env:
        action_space = Box(-1.0, 1.0, (2,))
        observation_space = {"state": Box(-1.0, 1.0, (5,))}

    monkeypatch.setitem(vla_policy.INPUT_SPECS, "MyVLA", lambda cfg: {
        "state": (vla_policy.InputRequirement("state_dim", cfg["state_dim"], 0),)})
    vla_policy.check_model_inputs("pkg.MyVLA", {"state_dim": 5}, Env())
    with pytest.raises(ConfigError, match=r"model_config\.state_dim \(3\) != observation 'state''s size 5"):
        vla_policy.check_model_inputs("pkg.MyVLA", {"state_dim": 3}, Env())
    vla_policy.check_model_inputs("pkg.Unregistered", {"anything": 1}, Env())  # unknown families: no check


# ----------------------------------------------------------------------------- 6. GAE bootstrap selection


def _numpy_gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Textbook GAE, one step at a time, with Python branches (no masks to multiply)."""
    adv = np.zeros_like(values, dtype=np.float64)
    for n in range(values.shape[1]):
        running = 0.0
        for t in reversed(range(values.shape[0])):
            delta = rewards[t, n] + (0.0 if terminated[t, n] else gamma * next_values[t, n]) - values[t, n]
            running = delta if dones[t, n] else delta + gamma * lam * running
            adv[t, n] = running
    return adv, adv + values


def _transitions(rng, T, N, bad):
    from jaxrl_vla.types import Transition

    terminated = rng.random((T, N)) < 0.15
    truncated = rng.random((T, N)) < 0.15
    terminated[3, 0] = truncated[3, 0] = True  # at least one step ends both ways
    both = terminated & truncated
    final_value = np.where(truncated, rng.normal(size=(T, N)), 0.0).astype(np.float32)
    final_value = np.where(both, np.float32(bad), final_value)  # V(final obs) of a terminated step: garbage
    zeros = np.zeros((T, N), np.int32)
    return Transition(obs=np.zeros((T, N, 1), np.float32), action=zeros, log_prob=np.zeros((T, N), np.float32),
                      value=rng.normal(size=(T, N)).astype(np.float32), reward=rng.normal(size=(T, N)).astype(np.float32),
                      terminated=terminated, truncated=truncated, final_value=final_value, chunk_index=zeros,
                      policy_version=zeros)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_gae_ignores_the_final_value_of_a_terminated_and_truncated_step(bad):
    from jaxrl_vla.algo import ppo

    rng = np.random.default_rng(0)
    T, N, gamma, lam = 12, 3, 0.97, 0.9
    rollout = _transitions(rng, T, N, bad)
    last_value = rng.normal(size=N).astype(np.float32)
    adv, ret = jax.jit(ppo.gae_from_transitions)(jax.tree_util.tree_map(jnp.asarray, rollout),
                                                   jnp.asarray(last_value), gamma, lam)
    assert bool(jnp.all(jnp.isfinite(adv))) and bool(jnp.all(jnp.isfinite(ret)))
    next_values = np.concatenate([rollout.value[1:], last_value[None]])
    next_values = np.where(rollout.truncated, rollout.final_value, next_values)
    dones = rollout.terminated | rollout.truncated
    ref_adv, ref_ret = _numpy_gae(rollout.reward, rollout.value, next_values, rollout.terminated, dones, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
    # the same rollout with an honest 0 there gives bit-identical advantages
    clean = rollout.replace(final_value=np.where(rollout.terminated, 0.0, rollout.final_value).astype(np.float32))
    clean_adv, _ = jax.jit(ppo.gae_from_transitions)(jax.tree_util.tree_map(jnp.asarray, clean),
                                                     jnp.asarray(last_value), gamma, lam)
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(clean_adv))


def test_ring_buffer_gae_ignores_a_nan_final_value_of_a_terminated_step():
    """The async mode's GAE (over the VLABuffer's ring) shares the selection."""
    from jaxrl_vla.algo import ppo
    from jaxrl_vla.buffer import circular

    rng = np.random.default_rng(1)
    T, N = 8, 3
    rollout = _transitions(rng, T, N, np.nan)
    state = circular.init(jax.tree_util.tree_map(lambda x: x[0], rollout), T)
    state = circular.add_batch(state, rollout)
    last_value = jnp.asarray(rng.normal(size=N).astype(np.float32))
    adv, ret = circular.gae(state, last_value, 0.99, 0.95)
    ref_adv, _ = ppo.gae_from_transitions(jax.tree_util.tree_map(jnp.asarray, rollout), last_value, 0.99, 0.95)
    assert bool(jnp.all(jnp.isfinite(adv))) and bool(jnp.all(jnp.isfinite(ret)))
    np.testing.assert_allclose(np.asarray(adv), np.asarray(ref_adv), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 7. ResNet activations


@pytest.mark.torch
@pytest.mark.parametrize("hidden_act", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_hidden_act_matches_transformers(hidden_act, layer_type):
    """hidden_act acts in the stem and after each residual sum; inside a residual layer transformers uses ReLU."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bridge.vla_loading import torch_to_flax
    from jaxrl_vla.models.vla import ResNetModel, resnet_config

    sizes = {"basic": dict(hidden_sizes=(8, 16), depths=(2, 1)), "bottleneck": dict(hidden_sizes=(16, 32), depths=(1, 2))}
    cfg = resnet_config("tiny", layer_type=layer_type, hidden_act=hidden_act, **sizes[layer_type])
    torch.manual_seed(0)
    ref = transformers.ResNetModel(transformers.ResNetConfig(**cfg.to_hf_kwargs()))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BN statistics and affine terms away from identity, so every activation sees negatives
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0.0, 0.3, generator=gen)
    ref.eval()
    pixels = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    with jax.default_matmul_precision("highest"):
        pooled, hidden = ResNetModel(cfg).apply(torch_to_flax(ref, ref.state_dict()),
                                                jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    want = out.last_hidden_state.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(hidden), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.flatten(1).numpy(), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- 9. VLABuffer without overwrite


def _steps(first: int, k: int, n: int = 2, chunk: bool = False):
    """K time-ordered steps [K, N, ...] whose every field encodes the step's id (first + k) * n + env."""
    from jaxrl_vla.types import Transition

    ids = (first + np.arange(k))[:, None] * n + np.arange(n)[None]
    return Transition(obs=np.stack([ids, -ids], axis=-1).astype(np.float32), action=ids.astype(np.int32),
                      log_prob=ids.astype(np.float32), value=ids.astype(np.float32), reward=ids.astype(np.float32),
                      terminated=np.zeros(ids.shape, bool), truncated=np.zeros(ids.shape, bool),
                      final_value=np.zeros(ids.shape, np.float32),
                      chunk_index=(np.arange(k)[:, None] % 2 * np.ones(n, int) if chunk else 0 * ids).astype(np.int32),
                      policy_version=ids.astype(np.int32))


def _buffer(num_steps: int, n: int = 2):
    from jaxrl_vla.buffer import VLABuffer

    one = jax.tree_util.tree_map(lambda x: x[0], _steps(0, 1, n))
    return VLABuffer(one, capacity=num_steps * n, example_obs=one.obs, overwrite=False)


def _run(target, *args):
    """`target(*args)` in a daemon thread; (thread, errors) so a test can join it with a timeout."""
    import threading

    errors: list[BaseException] = []

    def body():
        try:
            target(*args)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("already, k", [(2, 5), (0, 11), (3, 4), (1, 3)])
def test_add_of_more_rows_than_the_room_left_hands_the_full_buffer_over(already, k):
    """One writer adds K rows that overflow the room left while one reader takes full buffers: the writer
    fills what fits, the reader gets the full buffer, the rest follows. Every row once, in order."""
    T, n = 4, 2
    buffer = _buffer(T, n)
    if already:
        buffer.add(_steps(0, already, n), _steps(already, 1, n).obs[0], timeout=5)
    total = already + k
    tail = (-total) % T  # single steps that complete the last buffer
    final_obs = _steps(total + tail, 1, n).obs[0]

    def write():
        buffer.add(_steps(already, k, n), _steps(total, 1, n).obs[0], timeout=20)
        for i in range(tail):
            buffer.add(jax.tree_util.tree_map(lambda x: x[0], _steps(total + i, 1, n)),
                       final_obs if i == tail - 1 else _steps(total + i + 1, 1, n).obs[0], timeout=20)

    writer, errors = _run(write)
    taken = []
    for _ in range((total + tail) // T):
        data, next_obs = buffer.take(timeout=20)
        ids = np.asarray(data.action)
        assert ids.shape == (T, n)
        # next_obs is the observation after the newest taken row (the first row of the next step)
        np.testing.assert_array_equal(np.asarray(next_obs)[:, 0], ids[-1] + n)
        np.testing.assert_array_equal(np.asarray(data.obs)[..., 0], ids)  # not torn
        taken.append(ids)
    writer.join(20)
    assert not writer.is_alive(), "writer still blocked"
    assert not errors, errors
    np.testing.assert_array_equal(np.concatenate(taken).reshape(-1), np.arange((total + tail) * n))
    assert len(buffer) == 0


@pytest.mark.timeout(30)
def test_add_without_a_reader_times_out_after_writing_what_fits():
    buffer = _buffer(4)
    buffer.add(_steps(0, 3), _steps(3, 1).obs[0], timeout=1)
    with pytest.raises(TimeoutError, match="room in the buffer"):
        buffer.add(_steps(3, 3), _steps(6, 1).obs[0], timeout=0.3)
    assert buffer.is_full()
    data, next_obs = buffer.take(timeout=1)
    np.testing.assert_array_equal(np.asarray(data.action)[:, 0], [0, 2, 4, 6])
    np.testing.assert_array_equal(np.asarray(next_obs)[:, 0], [8, 9])  # step 4's obs: the one after step 3


@pytest.mark.timeout(30)
def test_close_wakes_a_writer_waiting_inside_a_split_add():
    from jaxrl_vla.buffer import BufferClosed

    buffer = _buffer(4)
    writer, errors = _run(lambda: buffer.add(_steps(0, 6), _steps(6, 1).obs[0], timeout=20))
    import time

    deadline = time.monotonic() + 10
    while not buffer.is_full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert buffer.is_full()
    buffer.close()
    writer.join(10)
    assert not writer.is_alive() and len(errors) == 1 and isinstance(errors[0], BufferClosed)


@pytest.mark.timeout(30)
def test_split_inside_an_action_chunk_is_refused_before_anything_is_written():
    """The next_obs of a piece that ends inside an action chunk is unknown (obs there is the chunk's start)."""
    buffer = _buffer(4)
    buffer.add(_steps(0, 1), _steps(1, 1).obs[0], timeout=1)
    with pytest.raises(ValueError, match=r"observation after step 2 is unknown .*step 3 is inside an action chunk"):
        buffer.add(_steps(1, 4, chunk=True), _steps(5, 1).obs[0], timeout=1)  # room 3: split before row 3
    assert len(buffer) == 2  # still only the first step (2 envs)
    buffer.add(_steps(1, 3, chunk=True), _steps(4, 1).obs[0], timeout=1)  # fits whole: no split, no question
    assert buffer.is_full()


def test_gpt_vla_runs_without_language_so_its_absence_is_no_error():
    from jaxrl_vla.models import vla_policy

    class Env:
        action_space = Box(-1.0, 1.0, (2,))
        observation_space = {"rgb": Box(0, 255, (32, 32, 3), jnp.uint8), "proprio": Box(-1.0, 1.0, (4,))}

    vla_policy.check_model_inputs(CLASS, dict(TINY), Env())
    with pytest.raises(ConfigError, match="reads observation 'proprio' \\(proprio_dim=4\\), which the env does not"):
        vla_policy.check_model_inputs(CLASS, dict(TINY), type("NoProprio", (Env,), {
            "observation_space": {"rgb": Env.observation_space["rgb"]}})())
