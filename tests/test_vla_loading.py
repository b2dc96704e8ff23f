"""Loading torch VLA checkpoints into Flax twins, the error cases, export, and the twin registry."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bridge import export_to_torch, load_vla_model, register_twin  # noqa: E402
from bridge.vla_loading import (  # noqa: E402
    CheckpointNotFoundError,
    conversion_plan,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnknownModelClassError,
    UnsafeCheckpointError,
)
from bridge.vla_models import GPTVLAModel as TorchGPTVLA  # noqa: E402
from jaxrl_vla.models.vla import GPTVLAModel, VLAConfigError, dummy_obs  # noqa: E402

pytestmark = pytest.mark.torch

CLASS = "bridge.vla_models.GPTVLAModel"
CONFIG = dict(
    vision_encoder="tiny",
    language_model="tiny",
    vocab_size=40,
    n_positions=12,
    max_instruction_length=4,
    proprio_dim=3,
    action_dim=2,
    image_size=24,
    value_hidden_dim=16,
)


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = TorchGPTVLA(CONFIG)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-default BN stats and log_std so the round trip carries information
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
        model.log_std.normal_(generator=gen)
    return model.eval()


@pytest.fixture()
def checkpoints(torch_model, tmp_path):
    state = torch_model.state_dict()
    pt, st = tmp_path / "vla.pt", tmp_path / "vla.safetensors"
    torch.save(state, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    return {"pt": pt, "safetensors": st}


def sample_obs(batch: int = 3) -> dict:
    gen = torch.Generator().manual_seed(2)
    size, length = CONFIG["image_size"], CONFIG["max_instruction_length"]
    return {
        "rgb": torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8),
        "proprio": torch.randn(batch, CONFIG["proprio_dim"], generator=gen),
        "language": torch.randint(0, CONFIG["vocab_size"], (batch, length), generator=gen, dtype=torch.int32),
        "language_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
    }


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_matches_torch_model(fmt, checkpoints, torch_model):
    module, variables = load_vla_model(checkpoints[fmt], CLASS, CONFIG)
    assert isinstance(module, GPTVLAModel)
    assert set(variables) == {"params", "batch_stats"}
    obs = sample_obs()
    with torch.no_grad():
        want = torch_model(obs).numpy()
    got = jax.jit(lambda v, o: module.apply(v, o, method="forward"))(
        variables, {k: jnp.asarray(v.numpy()) for k, v in obs.items()}
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_seed_class_path_alias(checkpoints):
    module, _ = load_vla_model(checkpoints["pt"], "vla_models.GPTVLAModel", CONFIG)
    assert isinstance(module, GPTVLAModel)


@pytest.mark.parametrize(
    "model_class, needle",
    [("bridge.vla_models.NoSuchModel", "NoSuchModel"), ("no_such_package.models.VLA", "no_such_package")],
)
def test_unknown_model_class(model_class, needle, checkpoints):
    with pytest.raises(UnknownModelClassError, match=needle) as info:
        load_vla_model(checkpoints["pt"], model_class, CONFIG)
    assert isinstance(info.value, ValueError)


def test_unknown_config_key(checkpoints):
    with pytest.raises(VLAConfigError, match="visoin_encoder"):
        load_vla_model(checkpoints["pt"], CLASS, {**CONFIG, "visoin_encoder": "resnet18"})


@pytest.mark.parametrize("key, value", [("token_order", "text_first"), ("image_tokens", "patches")])
def test_bad_config_value_names_the_key_and_the_choices(key, value):
    from jaxrl_vla.models.vla import VLAModelConfig

    with pytest.raises(VLAConfigError, match=f"{key} must be one of .*{value}"):
        VLAModelConfig.from_dict({**CONFIG, key: value})


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope.pt") as info:
        load_vla_model(path, CLASS, CONFIG)
    assert isinstance(info.value, FileNotFoundError)


def test_extra_checkpoint_key(torch_model, tmp_path):
    state = {**torch_model.state_dict(), "extra_head.weight": torch.zeros(2, 2)}
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(UnexpectedKeysError, match="extra_head.weight"):
        load_vla_model(tmp_path / "extra.pt", CLASS, CONFIG)


def test_missing_checkpoint_key(torch_model, tmp_path):
    state = dict(torch_model.state_dict())
    del state["value_out.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(MissingKeysError, match="value_out.bias"):
        load_vla_model(tmp_path / "missing.pt", CLASS, CONFIG)


def test_shape_mismatch(torch_model, tmp_path):
    state = dict(torch_model.state_dict())
    state["action_mean.weight"] = torch.zeros(5, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"action_mean\.weight.*\(5, 64\).*\(2, 64\)"):
        load_vla_model(tmp_path / "bad.safetensors", CLASS, CONFIG)


class _Payload:
    """Unpickling this would create `path` (it never should)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_refused_without_running_code(torch_model, tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({**torch_model.state_dict(), "payload": _Payload(str(sentinel))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_vla_model(tmp_path / "evil.pt", CLASS, CONFIG)
    assert not sentinel.exists()
    torch.save(torch_model, tmp_path / "whole_module.pt")  # a pickled nn.Module is refused too
    with pytest.raises(UnsafeCheckpointError):
        load_vla_model(tmp_path / "whole_module.pt", CLASS, CONFIG)


def test_export_round_trip_is_bit_exact(checkpoints, torch_model, tmp_path):
    _, variables = load_vla_model(checkpoints["pt"], CLASS, CONFIG)
    out = tmp_path / "sub" / "exported.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"stale")  # an existing file is replaced atomically
    export_to_torch(variables, CLASS, CONFIG, out)
    assert os.listdir(out.parent) == ["exported.safetensors"]  # no temp file left behind
    exported = load_file(str(out))
    fresh = TorchGPTVLA(CONFIG)
    fresh.load_state_dict(exported, strict=True)
    for key, tensor in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    # and back again: JAX -> torch -> JAX is exact too
    _, again = load_vla_model(out, CLASS, CONFIG)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_export_rejects_incomplete_variables(checkpoints, tmp_path):
    _, variables = load_vla_model(checkpoints["pt"], CLASS, CONFIG)
    params = dict(variables["params"])
    del params["value_out"]
    with pytest.raises(MissingKeysError, match="value_out"):
        export_to_torch({**variables, "params": params}, CLASS, CONFIG, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- a user's own class


class MLPPolicy(torch.nn.Module):
    """A user's small torch policy: Sequential MLP with a ReLU, and a bare log_std parameter."""

    def __init__(self, obs_dim: int, hidden: int, action_dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, action_dim)
        )
        self.norm = torch.nn.LayerNorm(obs_dim)
        self.log_std = torch.nn.Parameter(torch.zeros(action_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class FlaxMLPPolicy(nn.Module):
    """Its Flax twin; list items in `setup` are named net_0, net_2 like torch's net.0, net.2."""

    hidden: int
    action_dim: int
    extra_param: bool = False

    def setup(self):
        self.norm = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
        self.net = [nn.Dense(self.hidden), nn.relu, nn.Dense(self.action_dim)]
        self.log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        if self.extra_param:
            self.bonus = self.param("bonus", nn.initializers.zeros, (1,))

    def __call__(self, x):
        x = self.norm(x)
        for layer in self.net:
            x = layer(x)
        return x


MLP_CONFIG = {"obs_dim": 4, "hidden": 8, "action_dim": 2}


def _mlp_twin(cfg, **kwargs):
    return FlaxMLPPolicy(cfg["hidden"], cfg["action_dim"], **kwargs), jnp.zeros((1, cfg["obs_dim"]))


def test_registry_with_user_class(tmp_path):
    register_twin(MLPPolicy, _mlp_twin)
    torch.manual_seed(0)
    ref = MLPPolicy(**MLP_CONFIG)
    with torch.no_grad():
        ref.log_std.fill_(-0.7)
        ref.norm.weight.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), tmp_path / "mlp.pth")
    module, variables = load_vla_model(tmp_path / "mlp.pth", MLPPolicy, MLP_CONFIG)
    assert set(variables["params"]) == {"net_0", "net_2", "norm", "log_std"}
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = ref(x).numpy()
    np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(x.numpy()))), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(variables["params"]["log_std"]), ref.log_std.detach().numpy())

    export_to_torch(variables, MLPPolicy, MLP_CONFIG, tmp_path / "mlp.safetensors")
    back = MLPPolicy(**MLP_CONFIG)
    back.load_state_dict(load_file(str(tmp_path / "mlp.safetensors")), strict=True)
    for key, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_twin_parameter_nothing_fills(tmp_path):
    """A twin with a parameter the torch model lacks names that Flax path."""
    register_twin(MLPPolicy, lambda cfg: _mlp_twin(cfg, extra_param=True))
    try:
        torch.save(MLPPolicy(**MLP_CONFIG).state_dict(), tmp_path / "mlp.pt")
        with pytest.raises(MissingKeysError, match="params/bonus"):
            load_vla_model(tmp_path / "mlp.pt", MLPPolicy, MLP_CONFIG)
    finally:
        register_twin(MLPPolicy, _mlp_twin)


def test_twin_shape_mismatch(tmp_path):
    """A twin built with other sizes than the torch model reports the Flax path and both shapes."""
    register_twin(MLPPolicy, lambda cfg: _mlp_twin({**cfg, "hidden": 16}))
    try:
        torch.save(MLPPolicy(**MLP_CONFIG).state_dict(), tmp_path / "mlp.pt")
        with pytest.raises(ShapeMismatchError, match=r"params/net_0/bias'.*\(8,\) vs twin shape \(16,\)"):
            load_vla_model(tmp_path / "mlp.pt", MLPPolicy, MLP_CONFIG)
    finally:
        register_twin(MLPPolicy, _mlp_twin)


# ----------------------------------------------------------------------------- full sizes, without weights


@pytest.mark.parametrize("vision, language", [("resnet18", "gpt2"), ("resnet34", "tiny"), ("resnet50", "gpt2-medium")])
def test_full_size_layouts_agree(vision, language):
    """The real-size torch twin (built on the meta device: no memory) and the Flax twin have identical layouts."""
    config = {"vision_encoder": vision, "language_model": language, "action_chunk": 4, "freeze_vision_encoder": False}
    with torch.device("meta"):
        ref = TorchGPTVLA(config)
    plan, ignored = conversion_plan(ref)
    cfg = ref.config
    abstract = jax.eval_shape(lambda: GPTVLAModel(cfg).init(jax.random.PRNGKey(0), dummy_obs(cfg)))
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    state = ref.state_dict()
    assert set(plan) | ignored == set(state)
    assert {t.name for t in plan.values()} == set(flat)
    for key, target in plan.items():
        assert tuple(target.rule.to_flax(state[key]).shape) == flat[target.name].shape, key


def test_jaxrl_vla_never_imports_torch():
    code = "import sys, jaxrl_vla.models.vla; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_safetensors_are_read_into_aligned_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    from bridge.vla_loading import UnsupportedCheckpointError, read_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    read = read_safetensors(path)
    reference = load_file(str(path))
    assert set(read) == set(reference)
    for key, tensor in read.items():
        assert tensor.data_ptr() % 64 == 0, key
        assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key])
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UnsupportedCheckpointError, match="outside the file|ends inside"):
        read_safetensors(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(UnsupportedCheckpointError, match="not a safetensors file"):
        read_safetensors(garbage)
