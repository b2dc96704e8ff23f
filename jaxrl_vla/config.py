"""Run configuration: the seed's JSON format, validated before anything runs.

    {"trainer": {...}, "algorithm": {"name": "ppo", "cfg": {...}}, "policy": {...}, "env": {...}}

JSON may carry `//` and `/* */` comments (the seed's own examples do); YAML
files (.yaml/.yml) are read too. Every field is declared once in SCHEMA with its
type, default, range and meaning; docs/config.md is generated from it.

Errors are `ConfigError`s naming the file and line (unreadable files), the full
field path (wrong type or range) or the unknown key and the closest valid one.
The CLI turns them into exit code 2 before any file is written.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user."""


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human form of `check`, for messages and docs
    nullable: bool = False


def is_safe_run_name(name: str) -> bool:
    """True for a name that keeps the run directory inside trainer.output_dir (no separators, no '..')."""
    return bool(name) and "/" not in name and "\\" not in name and ".." not in name and name.strip() == name and "\0" not in name


def _pos(x: Any) -> bool:
    return x > 0


def _nonneg(x: Any) -> bool:
    return x >= 0


def _unit(x: Any) -> bool:
    return 0.0 <= x <= 1.0


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda x: x in choices), "one of " + ", ".join(repr(c) for c in choices)


_BUFFER_TYPE = _one_of("standard", "vla")
_SCHEDULE = _one_of("constant", "linear", "cosine")
_ACTIVATION = _one_of("tanh", "relu", "gelu", "elu", "silu")
_POLICY = _one_of("actor_critic", "vla")
_ENV_TYPE = _one_of("jax", "gymnasium", "torchrl", "tensordict", "metaworld")
_DTYPE = _one_of("float32", "bfloat16")

# "free" marks a section whose keys are not fixed (env kwargs, model_config).
FREE = "free"

SCHEMA: dict[str, Any] = {
    "trainer": {
        "buffer_size": Field(int, 2048, "standard mode: steps per env per rollout (a rollout holds buffer_size x num_envs transitions); vla mode: capacity of the circular buffer in transitions, laid out [buffer_size / num_envs, num_envs]", _pos, "> 0"),
        "buffer_type": Field(str, "standard", "'standard': collect a rollout, train, clear; 'vla': a background thread collects into a circular buffer while the learner trains", *_BUFFER_TYPE),
        "iterations": Field(int, 500, "training iterations (one rollout + one PPO update each); --total-timesteps overrides", _pos, "> 0"),
        "num_envs": Field(int, 8, "parallel environments", _pos, "> 0"),
        "seed": Field(int, 0, "seed of every random number in the run", lambda x: 0 <= x < 2**32, ">= 0 and < 2**32 (what jax.random.PRNGKey takes)"),
        "eval_freq": Field(int, 10, "evaluate every this many iterations (and at the end); 0 disables", _nonneg, ">= 0"),
        "num_eval_episodes": Field(int, 10, "episodes per evaluation (deterministic actions)", _pos, "> 0"),
        "save_freq": Field(int, 50, "checkpoint every this many iterations (and always at the end); 0: only at the end", _nonneg, ">= 0"),
        "exp_name": Field(str, "run", "run directory name prefix: OUTPUT_DIR/EXP_NAME-YYYYmmdd-HHMMSS", lambda v: is_safe_run_name(v), "a plain name: no path separators or '..', not empty"),
        "output_dir": Field(str, "runs", "parent directory of run directories"),
        "normalize_observations": Field(bool, False, "normalise float observations by running mean/std kept in the checkpointed state"),
        "normalize_rewards": Field(bool, False, "divide the rewards PPO learns from by the running standard deviation of each env's discounted return (gamma: algorithm.cfg.gamma), clipped to +-10, as SB3's VecNormalize does; the statistics live in the checkpointed state, and logged episode returns stay unscaled. Standard mode, PPO, JAX-native envs"),
        "num_collectors": Field(int, 1, "vla mode: collector threads, each with its own envs", _pos, "> 0"),
        "env_step_timeout": Field((int, float), 60.0, "vla mode: seconds an env step or inference may take before the run fails", _pos, "> 0"),
        "progress": Field(bool, True, "show the progress bar"),
        "max_episode_steps": Field(int, None, "steps after which an evaluation episode is cut, and a run warns once when an env has ended no episode within it (an env without a time limit never reports a return); null: the env's own limit (its max_episode_steps, else 1000)", _pos, "> 0", nullable=True),
        "cpu_devices": Field(int, 0, "CPU only: split the host into this many JAX devices, so the mesh spans the cores (the env batch and every PPO minibatch are split over them; one XLA program per core keeps them busier than one program's threads for a VLA, while a small MLP's update is too short to pay for the all-reduce between devices: BENCHMARKS.md#scaling); must divide num_envs and batch_size; 0: auto, for a vla policy in standard mode with a JAX env the largest count <= the cores that divides both, else 1; 1: off. Takes effect in `python -m jaxrl_vla.train` (before JAX starts); a JAX_NUM_CPU_DEVICES or XLA_FLAGS device count wins; GPU/TPU devices are unaffected", _nonneg, ">= 0"),
        "iterations_per_call": Field(int, 0, "standard mode, JAX-native env: iterations run by one jitted call (a loop over iterations inside jit, which saves the per-call dispatch and sync; metrics.jsonl still gets one record per iteration); must divide eval_freq and save_freq (when > 0) so that no call straddles an evaluation or a checkpoint; 0: auto, each call as many iterations as fill ~0.25 s at the measured iteration time, up to the largest such value <= 32 and <= the run's iterations", _nonneg, ">= 0"),
        "mesh": {
            "data": Field(int, 0, "devices along the mesh's 'data' axis (docs/scaling.md); data x fsdp must equal the device count of all processes; 0: all the devices fsdp leaves", _nonneg, ">= 0"),
            "fsdp": Field(int, 1, "devices along the mesh's 'fsdp' axis: every parameter and its Adam moments of >= 16,384 elements is split along its largest axis that fsdp divides (LoRA adapters and small leaves replicated), so a device holds ~1/fsdp of them; the batch is split over data x fsdp either way; 1: replicated parameters (data parallel)", _pos, "> 0"),
        },
        "distributed": {
            "coordinator": Field(str, None, "several processes (jax.distributed; docs/scaling.md): host:port of process 0's coordinator, the same for every process; null: $JAX_COORDINATOR_ADDRESS, and without it one process", nullable=True),
            "num_processes": Field(int, None, "processes in the run (null: $JAX_NUM_PROCESSES); each contributes its local devices to one mesh", _pos, "> 0", nullable=True),
            "process_id": Field(int, None, "this process's index in [0, num_processes) (null: $JAX_PROCESS_ID); only process 0 logs, writes metrics and config.json, every process writes its shards of the checkpoints", _nonneg, ">= 0", nullable=True),
            "timeout": Field((int, float), 60, "seconds to wait for the coordinator (and every process) before the run fails with a named error", _pos, "> 0"),
        },
        "collectors": {
            "backend": Field(str, "threads", "vla mode: where collectors run: 'threads' (threads of this process) or 'ray' (each collector's envs and an inference copy of the policy in a Ray actor, possibly on another machine; parameters go through Ray's object store once per version; the ray extra, docs/scaling.md)", *_one_of("threads", "ray")),
            "num": Field(int, None, "ray: collector actors, each stepping num_envs / num envs (null: trainer.num_collectors)", _pos, "> 0", nullable=True),
            "address": Field(str, None, "ray: host:port of the Ray cluster's head (`ray start --head` prints it) or 'auto'; null: the cluster this process already joined, else a local one", nullable=True),
            "max_restarts": Field(int, 0, "ray: times a dead collector actor is replaced by a new one (its envs restart from reset) before the run fails with CollectorError", _nonneg, ">= 0"),
        },
    },
    "algorithm": {
        "name": Field(str, "ppo", "algorithm: 'ppo' (clipped PPO with a critic and GAE) or 'grpo' (critic-free: groups of algorithm.cfg.group_size rollouts from one initial state, each step's advantage its episode's outcome normalised within the group; both modes; an env that resets to a given state; the steps per env per iteration are the episode step limit, one episode per env per iteration; vla mode and host envs: each collector's rounds of whole groups, one seeded reset per round)", *_one_of("ppo", "grpo")),
        "demo_path": Field(str, None, "expert demonstrations (.npz of `python -m jaxrl_vla.tasks.demos`, or the one `python -m bridge.pretrain_bc` makes beside its checkpoint) for the demonstration loss weighted by algorithm.cfg.demo_coef; their observations must match the env's", nullable=True),
        "demo_augment": Field(bool, False, "augment every demonstration drawn for the demonstration loss afresh with the env's label-preserving augmentation (its `augment_demonstration`; VLReach: the colours permuted in the image and the instruction together, and the scene mirrored left-right half the time with the expert's action there, the demo file's mirror_action column), as `bridge.pretrain_bc` trains its clone; needs demo_path, raw pixels (not a frozen vision encoder) and an env that has one"),
        "cfg": {
            "learning_rate": Field((int, float), 3e-4, "Adam step size", _pos, "> 0"),
            "lr_schedule": Field(str, "constant", "learning-rate schedule over all gradient steps (linear and cosine decay to 0)", *_SCHEDULE),
            "lr_warmup_steps": Field(int, 0, "gradient steps over which the learning rate rises linearly from 0 before lr_schedule (which then spans the remaining steps); fine-tuning a pretrained policy wants it: Adam's first steps are about lr in size whatever the gradient", _nonneg, ">= 0"),
            "gamma": Field((int, float), 0.99, "discount factor", _unit, "in [0, 1]"),
            "gae_lambda": Field((int, float), 0.95, "GAE lambda", _unit, "in [0, 1]"),
            "n_epochs": Field(int, 10, "passes over each rollout", _pos, "> 0"),
            "batch_size": Field(int, 64, "minibatch size in transitions (a remainder of the rollout is left out of each shuffled epoch)", _pos, "> 0"),
            "clip_coef": Field((int, float), 0.2, "PPO ratio clip", _pos, "> 0"),
            "vf_clip_coef": Field((int, float), None, "clip of the value change (null: no value clipping)", _pos, "> 0", nullable=True),
            "ent_coef": Field((int, float), 0.0, "entropy bonus weight", _nonneg, ">= 0"),
            "vf_coef": Field((int, float), 0.5, "value loss weight", _nonneg, ">= 0"),
            "demo_coef": Field((int, float), 0.0, "weight of the demonstration loss: each PPO minibatch also draws batch_size expert (observation, action) pairs from algorithm.demo_path and adds demo_coef x the squared error of the policy's mean action against the expert's (PPO + behaviour cloning, as DAPG fine-tunes from demonstrations; > 0 needs demo_path, and it needs > 0)", _nonneg, ">= 0"),
            "aux_coef": Field((int, float), 0.0, "weight of the auxiliary loss (the policy's auxiliary head against policy.auxiliary_target; > 0 needs it, and it needs > 0)", _nonneg, ">= 0"),
            "max_grad_norm": Field((int, float), 0.5, "global gradient-norm clip", _pos, "> 0"),
            "target_kl": Field((int, float), None, "stop the iteration's remaining minibatch updates once approx_kl > 1.5 x target_kl (null: never)", _pos, "> 0", nullable=True),
            "normalize_advantage": Field(bool, True, "normalise advantages per minibatch"),
            "group_size": Field(int, 8, "grpo: rollouts per group, all from one initial state (trainer.num_envs must be a multiple; vla mode: num_envs / num_collectors, each collector owning whole groups)", lambda v: v >= 2, ">= 2"),
            "clip_low": Field((int, float), 0.2, "grpo: the ratio's lower clip, 1 - clip_low (SimpleVLA-RL: 0.2)", _pos, "> 0"),
            "clip_high": Field((int, float), 0.28, "grpo: the ratio's upper clip, 1 + clip_high (SimpleVLA-RL: 0.28, DAPO's clip-higher)", _pos, "> 0"),
            "kl_coef": Field((int, float), 0.0, "grpo: weight of the k3 KL penalty to the reference (starting) policy, exp(ref - logp) - (ref - logp) - 1 per token (0: none, and no reference pass)", _nonneg, ">= 0"),
            "loss_agg": Field(str, "token", "grpo: 'token': mean over all valid tokens of a minibatch (a token: one action dimension of a Gaussian step, one categorical step); 'sample': every trajectory weighs the same", *_one_of("token", "sample")),
            "filter_low": Field((int, float), 0.0, "grpo: dynamic sampling, keep only groups whose success rate is >= this (SimpleVLA-RL: 0.1); needs reward 'success'", _unit, "in [0, 1]"),
            "filter_high": Field((int, float), 1.0, "grpo: keep only groups whose success rate is <= this (SimpleVLA-RL: 0.9)", _unit, "in [0, 1]"),
            "reward": Field(str, "success", "grpo: a trajectory's outcome: 'success' (the env's info['success'] at the episode's end, 0 for an episode cut by the step limit) or 'return' (the episode return)", *_one_of("success", "return")),
            "noise_correlation": Field((int, float), 0.0, "continuous actions, standard mode: correlation rho of the exploration noise from one policy step to the next (an AR(1) process, eps_t = rho eps_{t-1} + sqrt(1 - rho^2) z_t: each step's action is still drawn from the policy's Gaussian, but the noise persists for ~1/(1 - rho) steps, so an episode can wander off the mean's path consistently; 0: independent noise per step)", lambda v: 0 <= v < 1, "in [0, 1)"),
        },
    },
    "policy": {
        "name": Field(str, "actor_critic", "'actor_critic' (MLP from scratch) or 'vla' (pretrained torch VLA)", *_POLICY),
        "hidden_sizes": Field(list, [64, 64], "actor_critic: widths of the hidden layers (actor and critic each)", lambda v: len(v) > 0 and all(isinstance(w, int) and w > 0 for w in v), "a non-empty list of positive ints"),
        "activation": Field(str, "tanh", "actor_critic: hidden activation", *_ACTIVATION),
        "log_std_init": Field((int, float), 0.0, "continuous actions: initial log standard deviation"),
        "encoder": Field(str, "mlp", "actor_critic: how image observations (leaves of height x width x up to 4 channels; uint8 scaled to [0, 1]) are read: 'mlp' flattens them with every other leaf; 'nature_cnn' (Mnih et al. 2015, images of at least 36 x 36) or 'impala' (the IMPALA ResNet of Espeholt et al. 2018) is a CNN torso shared by actor and critic, whose features join the other leaves (proprio, instruction ids) flattened, as SB3's CnnPolicy", *_one_of("mlp", "nature_cnn", "impala")),
        "action_chunk": Field(int, 1, "actions per inference (H); the collector executes them in order", _pos, "> 0"),
        "action_dim": Field(int, None, "vla: action dimension (checked against the env)", _pos, "> 0", nullable=True),
        "dtype": Field(str, "float32", "vla: parameter and activation dtype", *_DTYPE),
        "freeze": Field(list, [], "vla: parameter path prefixes kept frozen (e.g. 'vision', 'language/h_0')", lambda v: all(isinstance(p, str) for p in v), "a list of strings"),
        "lr_scale": Field(dict, {}, "vla: learning-rate multipliers by parameter path prefix, e.g. {'language': 0.3, 'auxiliary_head': 1}: a pretrained trunk and a fresh head want different steps; the longest matching prefix wins, unmatched parameters keep 1 (the lr schedule, warm-up included, applies to all)", lambda v: all(isinstance(k, str) and isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for k, x in v.items()), "an object of path prefix -> number > 0"),
        "action_head": Field(dict, None, "vla: a decoder LM (vla_config.model_path a Hugging Face Llama/Qwen2/Gemma directory, or vla_config.model_config a config.json-style dict with model_type for random weights) with an action head: {type: 'tokens', n_bins: 256} (OpenVLA-style bins at the end of the vocabulary) or {type: 'flow', steps, method: flow_noise | flow_sde | ode, noise_level, noise_min, noise_max, expert: {hidden_size, intermediate_size, num_layers, num_heads, ...}} (a pi0-style flow-matching expert); the prompt is the env's input_ids/attention_mask or language/language_mask observation (docs/vla_finetuning.md)", nullable=True),
        "lora": Field(dict, None, "vla: LoRA fine-tuning {rank (32), alpha (32), targets: Dense layer names or patterns (e.g. ['c_attn', 'q_proj', '*_proj']), modules_to_save: parameter path prefixes that train in full (the heads, e.g. ['action_mean', 'value_fc', 'value_out', 'log_std'])}; the rest of the model stays frozen and the adapters are folded into its kernels on export", nullable=True),
        "auxiliary_target": Field((str, list), None, "vla: a privileged observation key (privileged_..., e.g. VLReach's privileged_target_xy with env.privileged_target: true, privileged_waypoint_xy with env.privileged_waypoint: true) or a list of them, that a linear head on the model's readout learns to predict during training, weighted by algorithm.cfg.aux_coef: privileged simulator state as a training-only label, never a policy input; the head is not exported", lambda v: isinstance(v, str) or (len(v) > 0 and all(isinstance(k, str) for k in v)), "a key or a non-empty list of keys", nullable=True),
        "vla_config": {
            "model_path": Field(str, None, "torch checkpoint (.pt/.pth/.safetensors)", nullable=True),
            "model_class": Field(str, "bridge.vla_models.GPTVLAModel", "torch model class 'package.module.Class'"),
            "model_config": FREE,
            "make_checkpoint": Field(str, None, "command that creates model_path when it is missing (shown in the error)", nullable=True),
        },
    },
    "env": FREE,  # {"name": ..., "type": ..., **kwargs}; kwargs are checked against the env's constructor
}

ENV_DOC = {
    "name": "registered env id (CartPole-v1, Pendulum-v1, VLReach-v0, gymnax:<id>, gymnasium:<id>, metaworld:<MT10|MT50|task>, ...)",
    "type": "'jax' (default for registered JAX envs), 'gymnasium', 'torchrl', 'tensordict' or 'metaworld'",
    "obs_keys": "torchrl / tensordict envs: the observation keys the policy reads (TorchRL's in_keys; nested keys '/'-joined); default every observation-spec leaf",
    "...": "every other key is passed to the env's constructor, whose signature checks it",
}


# ---------------------------------------------------------------------------- reading


def _strip_json_comments(text: str) -> str:
    """Blank out // and /* */ comments outside strings, keeping line numbers."""
    out, i, n = [], 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                line = text.count("\n", 0, i) + 1
                raise ConfigError(f"unterminated /* comment starting at line {line}")
            chunk = text[i : j + 2]
            out.append(re.sub(r"[^\n]", " ", chunk))
            i = j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    """json object hook: a key given twice is an error (json keeps the later one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the later one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict:
    """Parse a JSON (with comments) or YAML file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        else:
            data = json.loads(_strip_json_comments(text), object_pairs_hook=_unique_json_object)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        raise ConfigError(f"{path}:{where}: malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object with trainer/algorithm/policy/env")
    return data


# ---------------------------------------------------------------------------- validation


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(kind: type | tuple[type, ...]) -> str:
    """The type as users say it: an integer is a number too, so (int, float) reads "a number"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if int in kinds and float in kinds:
        kinds = tuple(k for k in kinds if k is not int)
    names = {int: "an integer", float: "a number", str: "text", bool: "true/false", list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _non_finite_or_bool_item(value: Any) -> str | None:
    """A description of the first NaN/Infinity number (anywhere) or boolean list item in `value`, or None.

    JSON admits NaN and Infinity, and Python's bool is an int: neither is ever a valid setting of a
    number field (a NaN learning rate or log-std trains to null losses and exits 0), nor is `true` a
    layer width."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, bool):
                return f"the list item {json.dumps(item)} (true/false is not a number)"
            found = _non_finite_or_bool_item(item)
            if found:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _non_finite_or_bool_item(item)
            if found:
                return found
    return None


def _check_value(path: str, spec: Field, value: Any) -> Any:
    if value is None:
        if spec.nullable or spec.default is None:
            return None
        raise ConfigError(f"{path}: must not be null; expected {_type_name(spec.kind)}")
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(spec.kind)}, got {json.dumps(value)}")
    bad = _non_finite_or_bool_item(value)
    if bad:
        raise ConfigError(f"{path}: {bad} is not allowed; numbers must be finite")
    if spec.check is not None and not spec.check(value):
        raise ConfigError(f"{path}: {json.dumps(value)} is out of range; must be {spec.rule}")
    return value


def _resolve_section(path: str, schema: dict, given: Any) -> dict:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: expected an object, got {json.dumps(given)}")
    for key in given:
        if key not in schema:
            raise ConfigError(f"{path}.{key}: unknown key{_closest(key, list(schema))}".lstrip("."))
    out = {}
    for key, spec in schema.items():
        sub = f"{path}.{key}" if path else key
        if spec == FREE:
            value = given.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{sub}: expected an object, got {json.dumps(value)}")
            out[key] = copy.deepcopy(value)
        elif isinstance(spec, dict):
            out[key] = _resolve_section(sub, spec, given.get(key))
        else:
            out[key] = _check_value(sub, spec, copy.deepcopy(given.get(key, spec.default)))
    return out


def check_iterations_per_call(iterations_per_call: int, eval_freq: int, save_freq: int) -> None:
    """An explicit trainer.iterations_per_call (0 is auto) must divide every period
    at which the host needs the state between calls (evaluation, checkpoints)."""
    for name, period in (("eval_freq", eval_freq), ("save_freq", save_freq)):
        if iterations_per_call > 0 and period > 0 and period % iterations_per_call:
            raise ConfigError(
                f"trainer.iterations_per_call ({iterations_per_call}) must divide trainer.{name} ({period}): "
                f"a jitted call of {iterations_per_call} iterations would straddle an "
                f"{'evaluation' if name == 'eval_freq' else 'checkpoint'}; use a divisor, or 0 (auto)"
            )


def _check_cross_fields(cfg: dict) -> None:
    trainer, env, policy = cfg["trainer"], cfg["env"], cfg["policy"]
    check_iterations_per_call(trainer["iterations_per_call"], trainer["eval_freq"], trainer["save_freq"])
    if "name" not in env or not isinstance(env["name"], str):
        raise ConfigError("env.name: required (a string such as \"CartPole-v1\")")
    if "type" in env and not _ENV_TYPE[0](env["type"]):
        raise ConfigError(f"env.type: {json.dumps(env['type'])} must be {_ENV_TYPE[1]}")
    if trainer["buffer_type"] == "vla" and trainer["buffer_size"] % trainer["num_envs"]:
        raise ConfigError(
            f"trainer.buffer_size ({trainer['buffer_size']}) must be divisible by trainer.num_envs "
            f"({trainer['num_envs']}) in vla mode: the circular buffer is laid out "
            f"[buffer_size / num_envs, num_envs]"
        )
    steps = trainer["buffer_size"] if trainer["buffer_type"] == "standard" else trainer["buffer_size"] // trainer["num_envs"]
    if steps % policy["action_chunk"]:
        raise ConfigError(
            f"policy.action_chunk ({policy['action_chunk']}) must divide the steps per env per rollout ({steps})"
        )
    samples = steps * trainer["num_envs"]
    batch = cfg["algorithm"]["cfg"]["batch_size"]
    if batch > samples:
        raise ConfigError(
            f"algorithm.cfg.batch_size ({batch}) exceeds the {samples} transitions one iteration trains on"
        )
    if policy["name"] == "vla" and not policy["vla_config"]["model_class"]:
        raise ConfigError("policy.vla_config.model_class: required when policy.name is 'vla'")
    aux_coef, target = cfg["algorithm"]["cfg"]["aux_coef"], policy["auxiliary_target"]
    if target is not None and policy["name"] != "vla":
        raise ConfigError("policy.auxiliary_target: only a vla policy has an auxiliary head")
    if (aux_coef > 0) != (target is not None):
        raise ConfigError("algorithm.cfg.aux_coef > 0 needs policy.auxiliary_target (the label it weights)" if aux_coef > 0
                          else "policy.auxiliary_target is set but algorithm.cfg.aux_coef is 0: the head would never train")


    demo_coef, demo_path = cfg["algorithm"]["cfg"]["demo_coef"], cfg["algorithm"]["demo_path"]
    if (demo_coef > 0) != (demo_path is not None):
        raise ConfigError("algorithm.cfg.demo_coef > 0 needs algorithm.demo_path (the demonstrations it weights)"
                          if demo_coef > 0 else "algorithm.demo_path is set but algorithm.cfg.demo_coef is 0: "
                          "the demonstrations would be unused")
    if cfg["algorithm"]["demo_augment"] and demo_path is None:
        raise ConfigError("algorithm.demo_augment needs algorithm.demo_path (the demonstrations it augments)")
    if cfg["algorithm"]["name"] == "grpo":
        _check_grpo(cfg)


def _check_grpo(cfg: dict) -> None:
    """GRPO's cross-field rules (the env's ability to reset to a given state is checked where it is built)."""
    trainer, algo = cfg["trainer"], cfg["algorithm"]["cfg"]
    if trainer["buffer_type"] == "vla":  # each collector owns whole groups (grpo_trainer.AsyncGRPOTrainer)
        if trainer["collectors"]["backend"] != "threads":
            raise ConfigError(f"trainer.collectors.backend {trainer['collectors']['backend']!r}: GRPO's round "
                              "collectors run as threads (backend 'threads')")
        collectors = trainer["num_collectors"]
        if trainer["num_envs"] % (collectors * algo["group_size"]):
            raise ConfigError(f"trainer.num_envs ({trainer['num_envs']}) must be a multiple of trainer.num_collectors "
                              f"({collectors}) x algorithm.cfg.group_size ({algo['group_size']}): each collector "
                              "owns whole groups")
    if trainer["num_envs"] % algo["group_size"]:
        raise ConfigError(f"trainer.num_envs ({trainer['num_envs']}) must be a multiple of algorithm.cfg.group_size "
                          f"({algo['group_size']})")
    if algo["filter_low"] > algo["filter_high"]:
        raise ConfigError(f"algorithm.cfg.filter_low ({algo['filter_low']}) exceeds algorithm.cfg.filter_high "
                          f"({algo['filter_high']})")
    if algo["reward"] == "return" and (algo["filter_low"], algo["filter_high"]) != (0, 1):
        raise ConfigError("algorithm.cfg.filter_low/filter_high filter groups by success rate: they need "
                          "algorithm.cfg.reward 'success'")
    if algo["noise_correlation"] > 0:
        raise ConfigError("algorithm.cfg.noise_correlation is PPO-only (GRPO's rollouts draw independent noise)")


def resolve(raw: dict) -> dict:
    """Validate a raw config and fill every default; returns a new dict."""
    cfg = _resolve_section("", SCHEMA, raw)
    _check_cross_fields(cfg)
    return cfg


# ---------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'algorithm.cfg.learning_rate=1e-4' -> (['algorithm','cfg','learning_rate'], 1e-4)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    # One grammar: VALUE is JSON (1e-4, true, null, [64, 64], {"a": 1}, "text"); anything that is not JSON
    # is taken as a plain string (CartPole-v1, runs/x). No YAML fallback: YAML 1.1 would turn on/no/yes
    # into booleans behind the user's back.
    parsed: Any = value
    if value.strip():
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply --set overrides to a raw (unresolved) config; validation follows."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                # name the config's own field: the override may be one the CLI added (--no-progress, --output-dir)
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: expected an object, got {json.dumps(nxt)} "
                                  f"(while setting {'.'.join(parts)})")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Read (or take the embedded default), apply overrides, validate."""
    raw = read_config_file(path) if path is not None else copy.deepcopy(DEFAULT_CONFIG)
    return resolve(apply_overrides(raw, overrides or []))


# The embedded default: PPO on the JAX-native CartPole (configs/cartpole.json is a copy).
DEFAULT_CONFIG: dict = {
    "trainer": {
        "buffer_size": 128,
        "buffer_type": "standard",
        "iterations": 100,
        "num_envs": 8,
        "seed": 0,
        "eval_freq": 10,
        "num_eval_episodes": 10,
        "save_freq": 50,
        "exp_name": "cartpole",
        "output_dir": "runs",
    },
    "algorithm": {
        "name": "ppo",
        "cfg": {
            "learning_rate": 2.5e-3,
            "lr_schedule": "linear",
            "gamma": 0.99,
            "gae_lambda": 0.95,
            "n_epochs": 4,
            "batch_size": 256,
            "clip_coef": 0.2,
            "ent_coef": 0.01,
            "vf_coef": 0.5,
            "max_grad_norm": 0.5,
        },
    },
    "policy": {"name": "actor_critic", "hidden_sizes": [64, 64], "activation": "tanh"},
    "env": {"name": "CartPole-v1"},
}


# ---------------------------------------------------------------------------- docs


def schema_markdown() -> str:
    """Markdown reference of every field (docs/config.md is generated from this)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(prefix: str, schema: dict) -> None:
        for key, spec in schema.items():
            path = f"{prefix}.{key}" if prefix else key
            if spec == FREE:
                if path == "env":
                    for k, doc in ENV_DOC.items():
                        lines.append(f"| `env.{k}` | | | {doc} |")
                else:
                    lines.append(f"| `{path}` | object | {{}} | passed to the model class's constructor |")
            elif isinstance(spec, dict):
                walk(path, spec)
            else:
                rule = f" ({spec.rule})" if spec.rule else ""
                lines.append(f"| `{path}` | {_type_name(spec.kind)} | `{json.dumps(spec.default)}` | {spec.doc}{rule} |")

    walk("", SCHEMA)
    return "\n".join(lines) + "\n"


def env_kind(env_cfg: dict) -> str:
    """Where the env steps: "jax" (in the jitted program), "gymnasium", "torchrl", "tensordict" or "metaworld" (host)."""
    kind = env_cfg.get("type", "jax")
    if kind == "jax" and str(env_cfg.get("name", "")).startswith("gymnasium:"):
        return "gymnasium"
    if kind == "jax" and str(env_cfg.get("name", "")).startswith("metaworld:"):
        return "metaworld"
    return kind
