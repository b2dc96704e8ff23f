"""trainer.mesh {data, fsdp}: the per-parameter fsdp rule on every twin's params, bad meshes named, and (in a
subprocess with 4 forced host devices) the same PPO params on every data x fsdp split as on one device, and
checkpoints that move between topologies with the same torch export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_vla import train
from jaxrl_vla.config import ConfigError, load_config
from jaxrl_vla.training import sharding

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("shape", "fsdp", "expected"),
    [
        ((256, 512), 4, P(None, "fsdp")),     # the largest axis F divides
        ((512, 256), 4, P("fsdp", None)),
        ((512, 300), 4, P("fsdp", None)),     # 300 % 4 != 0: the other axis, though smaller
        ((256, 256), 2, P(None, "fsdp")),     # a tie: the later axis
        ((250, 330), 4, P()),                 # no axis divisible: replicated
        ((64, 64), 2, P()),                   # under MIN_SHARD_SIZE elements: replicated
        ((65536,), 8, P("fsdp")),             # a large vector is split too
        ((3, 3, 64, 128), 4, P(None, None, None, "fsdp")),  # a conv kernel: its output channels
        ((256, 512), 1, P()),                 # fsdp 1: all replicated
    ],
)
def test_fsdp_spec_rule(shape, fsdp, expected):
    assert sharding.fsdp_spec(shape, fsdp) == expected


def _sharded_fraction(params, fsdp: int) -> float:
    leaves = jax.tree_util.tree_leaves(params)
    specs = jax.tree_util.tree_leaves(sharding.param_specs(params, fsdp), is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(specs)
    total = split = 0
    for leaf, spec in zip(leaves, specs):
        size = math.prod(leaf.shape)
        total += size
        if sharding.FSDP_AXIS in tuple(spec):
            axis = tuple(spec).index(sharding.FSDP_AXIS)
            assert leaf.shape[axis] % fsdp == 0
            assert size >= sharding.MIN_SHARD_SIZE
            assert leaf.shape[axis] == max(d for d in leaf.shape if d % fsdp == 0)
            split += size
        else:  # replicated only when small or no axis divides
            assert size < sharding.MIN_SHARD_SIZE or all(d % fsdp for d in leaf.shape)
    return split / total


def _gpt_vla():
    from jaxrl_vla.models.vla.gpt_vla import GPTVLAModel, VLAModelConfig, dummy_obs

    cfg = VLAModelConfig(vision_encoder="resnet18", language_model="gpt2", n_layer=2, image_size=64)
    return jax.eval_shape(GPTVLAModel(cfg).init, jax.random.PRNGKey(0), dummy_obs(cfg))


def _decoder(family: str):
    from jaxrl_vla.models.vla.gemma import gemma_config
    from jaxrl_vla.models.vla.llama import DecoderConfig, DecoderForCausalLM

    sizes = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4)
    cfg = DecoderConfig(**sizes) if family == "llama" else gemma_config(**sizes, head_dim=32)
    return jax.eval_shape(DecoderForCausalLM(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


def _siglip():
    from jaxrl_vla.models.vla.siglip import SiglipVisionConfig, SiglipVisionModel, dummy_pixels

    cfg = SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                             image_size=64, patch_size=16)
    return jax.eval_shape(SiglipVisionModel(cfg).init, jax.random.PRNGKey(0), dummy_pixels(cfg))


@pytest.mark.parametrize("model", ["gpt_vla", "llama", "gemma", "siglip"])
@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_the_twins_are_almost_all_sharded(model, fsdp):
    """Every big weight of each twin has an axis that a power of two divides: > 95% of the elements split."""
    params = {"gpt_vla": _gpt_vla, "llama": lambda: _decoder("llama"), "gemma": lambda: _decoder("gemma"),
              "siglip": _siglip}[model]()
    assert _sharded_fraction(params, fsdp) > 0.95
    sharding.check_shardable(params, fsdp)


def test_lora_adapters_replicated_while_the_base_is_sharded():
    from jaxrl_vla.models.vla.lora import LoraConfig, init_lora

    base = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), _decoder("llama"))
    # rank 64 on 256 x 256 kernels: the adapters are 16,384 elements, as big as the rule's threshold
    lora = init_lora(jax.random.PRNGKey(1), base, LoraConfig(rank=64, alpha=8.0, targets=("q_proj", "v_proj")))
    specs = sharding.param_specs({"base": base, "lora": lora}, 4)
    for spec in jax.tree_util.tree_leaves(specs["lora"], is_leaf=lambda x: isinstance(x, P)):
        assert spec == P()
    q = specs["base"]["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert sharding.FSDP_AXIS in tuple(q)


def test_lora_policy_variables_keep_adapters_replicated():
    """policy.lora's layout ({"params": {"model": base, "lora": {"scale", "adapters"}}}, models.lora_policy):
    rank-64 adapters on 768-wide GPT-2 kernels are 49,152 elements, which the size rule alone would shard."""
    from jaxrl_vla.models.lora_policy import add_adapters
    from jaxrl_vla.models.vla.gpt_vla import GPTVLAModel, VLAModelConfig, dummy_obs
    from jaxrl_vla.models.vla.lora import LoraConfig

    cfg = VLAModelConfig(vision_encoder="tiny", language_model="gpt2", n_layer=1, vocab_size=512, image_size=64)
    shapes = jax.eval_shape(GPTVLAModel(cfg).init, jax.random.PRNGKey(0), dummy_obs(cfg))
    model = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    variables = add_adapters({c: {"model": tree} for c, tree in model.items()},
                             LoraConfig(rank=64, alpha=8.0, targets=("c_attn", "c_fc")), jax.random.PRNGKey(1))
    specs = sharding.param_specs(variables, 4)
    adapters = jax.tree_util.tree_leaves(specs["params"]["lora"], is_leaf=lambda x: isinstance(x, P))
    assert len(adapters) == 5 and all(s == P() for s in adapters)  # scale + A, B of two kernels
    assert sharding.fsdp_spec((768, 64), 4) != P()  # what the adapter A would get without the LoRA rule
    base = specs["params"]["model"]["language"]["h_0"]["attn"]["c_attn"]["kernel"]
    assert sharding.FSDP_AXIS in tuple(base)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "fsdp", "devices", "field"),
    [
        (3, 1, 4, "trainer.mesh: data (3) x fsdp (1) = 3 must equal the number of devices (4)"),
        (2, 4, 4, "trainer.mesh: data (2) x fsdp (4) = 8"),
        (0, 3, 4, "trainer.mesh.fsdp (3) must divide the number of devices (4)"),
        (0, 0, 4, "trainer.mesh.fsdp must be an integer >= 1"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_named(data, fsdp, devices, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        sharding.mesh_shape(data, fsdp, devices)
    assert sharding.mesh_shape(0, 2, 4) == (2, 2) and sharding.mesh_shape(0, 1, 4) == (4, 1)


def test_an_fsdp_split_with_no_shardable_axis_is_named():
    params = {"w": jnp.zeros((129, 127)), "b": jnp.zeros((128,))}  # big but odd, and small
    with pytest.raises(ValueError, match=r"trainer.mesh.fsdp \(2\) leaves no shardable axis"):
        sharding.check_shardable(params, 2)
    sharding.check_shardable(params, 1)


def test_config_fields_checked():
    assert load_config(None)["trainer"]["mesh"] == {"data": 0, "fsdp": 1}
    with pytest.raises(ConfigError, match="trainer.mesh.fsdp"):
        load_config(None, ["trainer.mesh.fsdp=0"])
    with pytest.raises(ConfigError, match="trainer.mesh.dta: unknown key; did you mean 'data'"):
        load_config(None, ["trainer.mesh.dta=2"])


@pytest.mark.parametrize(("overrides", "field"), [
    (["trainer.mesh.data=2"], "trainer.mesh: data (2) x fsdp (1) = 2 must equal the number of devices (1)"),
    (["trainer.mesh.fsdp=2", "trainer.mesh.data=0"], "trainer.mesh.fsdp (2) must divide the number of devices (1)"),
])
def test_cli_bad_mesh_exits_2_and_writes_nothing(tmp_path, capsys, overrides, field):
    args = ["--no-progress", "--output-dir", str(tmp_path / "runs"), "--set", "trainer.iterations=1"]
    for override in overrides:
        args += ["--set", override]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_fsdp_with_nothing_to_shard_exits_2_and_writes_nothing(tmp_path, capsys):
    """The mesh fits (fsdp 1 on one device is fine), so build the rule's error from a 4-device mesh: a
    subprocess. CartPole's 64-wide MLP has no leaf of 16,384 elements: fsdp 2 would shard nothing."""
    code = ("import sys; from jaxrl_vla import train; sys.exit(train.main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", code, "--no-progress", "--output-dir", str(out), "--set",
                           "trainer.iterations=1", "--set", "trainer.mesh.fsdp=2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.mesh.fsdp (2) leaves no shardable axis" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- 4 devices

FOUR_DEVICES = r'''
import json, os, sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.envs import make_env
from jaxrl_vla.models.actor_critic import ActorCritic
from jaxrl_vla.training import sharding
from jaxrl_vla.training.checkpoint import Checkpointer
from jaxrl_vla.training.trainer import Trainer

out = Path(sys.argv[1])
assert jax.device_count() == 4
report = {}

def ppo_params(mesh, name):
    env = make_env("CartPole-v1")
    policy = ActorCritic(action_space=env.action_space, hidden_sizes=(128, 128))
    cfg = PPOConfig(n_epochs=2, batch_size=32, learning_rate=1e-3)
    trainer = Trainer(policy, env, cfg, buffer_size=16, num_envs=8, iterations=2, eval_freq=2, save_freq=0,
                      num_eval_episodes=4, output_dir=out / name, progress=False, mesh=mesh)
    state = trainer.train()
    kernel = state.params["params"]["actor_trunk"]["Dense_1"]["kernel"]
    mu = jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    mu = [x for x in mu if hasattr(x, "mu")][0].mu["params"]["actor_trunk"]["Dense_1"]["kernel"]
    report[name] = {"kernel_shard": list(kernel.addressable_shards[0].data.shape), "mu_shard": list(mu.addressable_shards[0].data.shape),
                    "eval": trainer.final_eval.get("eval/episodes")}
    return jax.tree_util.tree_map(np.asarray, state.params), trainer.run_dir

one_device = sharding.make_mesh(jax.devices()[:1])
reference, _ = ppo_params(one_device, "one")
diffs = {}
for data, fsdp in [(4, 1), (2, 2), (1, 4)]:
    params, run_dir = ppo_params({"data": data, "fsdp": fsdp}, f"d{data}f{fsdp}")
    diffs[f"{data}x{fsdp}"] = max(float(np.max(np.abs(a - b))) for a, b in
                                  zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)))
    if (data, fsdp) == (2, 2):
        two_d_run = run_dir
report["diffs"] = diffs

# vla mode (host-thread collectors, the learner jitted on its own) places the state by the same rule
from jaxrl_vla.training.async_trainer import AsyncTrainer
env = make_env("CartPole-v1")
async_trainer = AsyncTrainer(ActorCritic(action_space=env.action_space, hidden_sizes=(128, 128)), env,
                             PPOConfig(n_epochs=1, batch_size=32), buffer_size=64, buffer_type="vla", num_envs=4,
                             iterations=2, eval_freq=0, save_freq=0, output_dir=out / "async", progress=False,
                             mesh={"data": 2, "fsdp": 2})
state = async_trainer.train()
kernel = state.params["params"]["actor_trunk"]["Dense_1"]["kernel"]
report["async"] = {"iteration": int(state.iteration), "kernel_shard": list(kernel.addressable_shards[0].data.shape),
                   "finite": bool(np.all(np.isfinite(np.asarray(kernel))))}

# a PPO run's checkpoint written on the 2x2 mesh restores on one device, bit for bit
from jaxrl_vla.eval import restore_latest
state, iteration = restore_latest(two_d_run / "checkpoints")
report["restored_iteration"] = iteration

# a VLA's variables (and Adam state) between topologies, and the torch export of each
import optax
from bridge import export_to_torch
from bridge.pretrain_bc import MODEL_CONFIG
from jaxrl_vla.models.vla.gpt_vla import GPTVLAModel, VLAModelConfig, dummy_obs
from safetensors.numpy import load_file

config = dict(MODEL_CONFIG)
model_cfg = VLAModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
variables = GPTVLAModel(model_cfg).init(jax.random.PRNGKey(3), dummy_obs(model_cfg))
tx = optax.adam(1e-3)

def placed(mesh, tree):
    return jax.device_put(tree, sharding.param_shardings(mesh, tree))

def state_on(mesh, variables):
    params = placed(mesh, variables)
    return {"params": params, "opt_state": placed(mesh, tx.init(params))}

def template_on(mesh):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables)
    return state_on(mesh, zeros)

def export(params, name):
    path = export_to_torch(jax.tree_util.tree_map(np.asarray, params), "bridge.vla_models.GPTVLAModel", config, out / f"{name}.safetensors")
    return load_file(str(path))

mesh22 = sharding.make_mesh(data=2, fsdp=2)
mesh14 = sharding.make_mesh(data=1, fsdp=4)
written = state_on(mesh22, variables)
sharded_leaves = sum(1 for x in jax.tree_util.tree_leaves(written["params"]) if not x.sharding.is_fully_replicated)
ckpt = Checkpointer(out / "vla22")
ckpt.save(1, written, {"config": {}})
ckpt.close()
results = {}
for name, mesh in [("one", one_device), ("1x4", mesh14), ("2x2", mesh22)]:
    c = Checkpointer(out / "vla22")
    restored, _ = c.restore(template_on(mesh))
    c.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == t.sharding
               for a, b, t in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(written),
                                  jax.tree_util.tree_leaves(template_on(mesh))))
    results[name] = same
    if name == "one":
        restored_one = restored
# the other way round: written on one device, restored sharded
c = Checkpointer(out / "vla1")
c.save(1, restored_one, {"config": {}})
c.close()
c = Checkpointer(out / "vla1")
back, _ = c.restore(template_on(mesh22))
c.close()
results["one->2x2"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                          zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(written)))
results["one->2x2 sharded"] = sum(1 for x in jax.tree_util.tree_leaves(back["params"]) if not x.sharding.is_fully_replicated)
a, b = export(written["params"], "written22"), export(restored_one["params"], "restored1")
results["export_same"] = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
results["sharded_leaves"] = sharded_leaves

# the VLA's loss gradient with its weights sharded 1 x 4 and the batch split 4 ways = on one device
model = GPTVLAModel(model_cfg)
key = jax.random.PRNGKey(5)
obs = {"rgb": jax.random.randint(key, (8, 64, 64, 3), 0, 255).astype(jnp.uint8),
       "language": jax.random.randint(key, (8, 8), 1, 17), "language_mask": jnp.ones((8, 8), bool),
       "proprio": jax.random.normal(key, (8, 2))}

def loss(params, obs):
    dist, value = model.apply(params, obs)
    return jnp.mean(dist.mean ** 2) + jnp.mean(value ** 2)

def grads_on(mesh):
    params = placed(mesh, variables)
    batch = jax.device_put(obs, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    shardings = sharding.param_shardings(mesh, variables)
    fn = jax.jit(jax.value_and_grad(loss), out_shardings=(sharding.replicated(mesh), shardings))
    value, grads = fn(params, batch)
    sharded = sum(1 for g in jax.tree_util.tree_leaves(grads) if not g.sharding.is_fully_replicated)
    return float(value), jax.tree_util.tree_map(np.asarray, grads), sharded

v1, g1, _ = grads_on(one_device)
v4, g4, sharded_grads = grads_on(mesh14)
results["vla_loss_diff"] = abs(v1 - v4)
results["vla_grad_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g4)))
results["vla_grad_scale"] = max(float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(g1))
results["vla_sharded_grads"] = sharded_grads
results["vla_sharded_expected"] = sum(1 for spec in jax.tree_util.tree_leaves(sharding.param_specs(variables, 4), is_leaf=lambda x: isinstance(x, P))
                                      if sharding.FSDP_AXIS in tuple(spec))
report["vla"] = results
print("REPORT " + json.dumps(report))
'''


@pytest.mark.slow
def test_four_devices_every_split_trains_the_same_and_checkpoints_move(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    # the same params after 2 PPO iterations (2 epochs x 4 minibatches each) on every split as on one device
    for split, diff in report["diffs"].items():
        assert diff < 1e-5, (split, diff)
    # a 128 x 128 kernel and its Adam moment: whole on one device and on 4 x 1, a quarter per device on 1 x 4
    assert report["one"]["kernel_shard"] == [128, 128] == report["d4f1"]["kernel_shard"]
    assert report["d2f2"]["kernel_shard"] == [128, 64] == report["d2f2"]["mu_shard"]
    assert report["d1f4"]["kernel_shard"] == [128, 32] == report["d1f4"]["mu_shard"]
    assert all(report[name]["eval"] == 4 for name in ("one", "d4f1", "d2f2", "d1f4"))  # evaluation on the mesh
    assert report["restored_iteration"] == 2
    assert report["async"] == {"iteration": 2, "kernel_shard": [128, 64], "finite": True}
    vla = report["vla"]
    assert vla["sharded_leaves"] > 0 and vla["one->2x2 sharded"] == vla["sharded_leaves"]
    assert vla["one"] and vla["1x4"] and vla["2x2"] and vla["one->2x2"]
    assert vla["export_same"]
    # GPTVLAModel under fsdp: gradients sharded as the weights, equal to one device's to float tolerance
    assert vla["vla_sharded_grads"] == vla["vla_sharded_expected"] > 0
    assert vla["vla_loss_diff"] < 1e-5 and vla["vla_grad_diff"] < 1e-5 * max(1.0, vla["vla_grad_scale"])
