"""From a resolved config to the objects a run needs: env, policy, PPOConfig, Trainer.

Each builder checks what only it can check (env constructor arguments, the
policy's fit to the env) and raises ConfigError naming the field, so the CLI
still fails with exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any

from jaxrl_vla.algo.ppo import PPOConfig
from jaxrl_vla.config import ConfigError, env_kind


def _check_kwargs(factory: Any, kwargs: dict, where: str) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(params) or 'none'}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")


_TYPE_WORDS = {bool: "true/false", int: "an integer", float: "a number", str: "text", tuple: "a list", list: "a list"}


def _accepts(expected: Any, value: Any) -> bool | None:
    """Whether `value` fits the annotation `expected` (None: the annotation is not one we can judge)."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(expected)]
        return None if None in verdicts else any(verdicts)
    if expected is type(None):
        return value is None
    expected = origin or expected
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if expected in (tuple, list):
        return isinstance(value, (tuple, list))
    return None


def _check_kwarg_types(factory: Any, kwargs: dict, where: str) -> None:
    """Refuse a constructor argument of the wrong type by its key, before the env trips over it.

    A string where an integer belongs otherwise surfaces as "'<=' not supported between
    int and str" from deep inside the env. The expected type is the parameter's annotation,
    or the type of its default where the annotation cannot be resolved.
    """
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
        params = inspect.signature(factory).parameters
    except Exception:  # an annotation naming something unimportable: judge by defaults only
        hints, params = {}, inspect.signature(factory).parameters
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None:
            continue
        expected = hints.get(key)
        if expected is None and param.default not in (inspect.Parameter.empty, None):
            expected = type(param.default)
        if expected is None or _accepts(expected, value) is not False:
            continue
        wanted = _TYPE_WORDS.get(typing.get_origin(expected) or expected)
        wanted = wanted or " or ".join(
            _TYPE_WORDS.get(typing.get_origin(a) or a, "null" if a is type(None) else str(a)) for a in typing.get_args(expected)
        )
        raise ConfigError(f"{where}.{key}: expected {wanted}, got {value!r}")


def env_kwargs(env_cfg: dict) -> dict:
    return {k: v for k, v in env_cfg.items() if k not in ("name", "type")}


def build_env(env_cfg: dict) -> Any:
    """A JAX-native env from the registry (`env.type` "jax", the default)."""
    from jaxrl_vla import envs

    name, kind = env_cfg["name"], env_kind(env_cfg)
    kwargs = env_kwargs(env_cfg)
    if kind == "gymnasium":
        from jaxrl_vla.envs.host import make_gymnasium_env

        return make_gymnasium_env(name.removeprefix("gymnasium:"), **kwargs)
    if kind == "metaworld":
        from jaxrl_vla.envs.metaworld import MetaWorldEnv

        _check_kwargs(MetaWorldEnv, kwargs, "env")
        _check_kwarg_types(MetaWorldEnv, kwargs, "env")
        try:
            return MetaWorldEnv(name.removeprefix("metaworld:"), **kwargs)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if kind in ("torchrl", "tensordict"):
        from bridge.envs import make_torch_env  # the bridge owns torch envs

        return make_torch_env(name, kind, **kwargs)
    if name.startswith(envs.GYMNAX_PREFIX):
        try:
            return envs.make_env(name, **kwargs)
        except ImportError:
            raise ConfigError(f"env.name: {name!r} needs gymnax, which is not installed: pip install -e '.[gymnax]'") from None
    if name not in envs.available_envs():
        close = difflib.get_close_matches(name, envs.available_envs(), n=1)
        if _is_gymnasium_id(name):
            hint = f"; gymnasium has it: did you mean 'gymnasium:{name}'?"
        elif close:
            hint = f"; did you mean '{close[0]}'?"
        else:
            hint = f"; known: {', '.join(envs.available_envs())} (or 'gymnasium:<id>', 'gymnax:<id>')"
        raise ConfigError(f"env.name: unknown env {name!r}{hint}")
    factory = envs._resolve(envs._REGISTRY[name])
    _check_kwargs(factory, kwargs, "env")
    _check_kwarg_types(factory, kwargs, "env")
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"env: {name} rejected its arguments: {err}") from None


def _is_gymnasium_id(name: str) -> bool:
    """Whether gymnasium's registry knows `name` (False when gymnasium is not installed)."""
    try:
        import gymnasium
    except ImportError:
        return False
    return name in gymnasium.registry


INTEGER_FIELDS = ("n_epochs", "batch_size", "lr_warmup_steps", "group_size")


def build_algorithm(algo_cfg: dict) -> PPOConfig:
    """PPOConfig (or, for algorithm.name 'grpo', GRPOConfig) from `algorithm.cfg`, given the
    fields its class has; JSON integers in float fields become floats (so `"gamma": 1` and
    `"gamma": 1.0` trace to the same program)."""
    cls = PPOConfig
    if algo_cfg.get("name", "ppo") == "grpo":
        from jaxrl_vla.algo.grpo import GRPOConfig as cls

    def as_field(name: str, value: Any) -> Any:
        if name in INTEGER_FIELDS or isinstance(value, (bool, str)) or value is None:
            return value
        return float(value)

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: as_field(name, value) for name, value in algo_cfg["cfg"].items() if name in names})


def build_policy(policy_cfg: dict, env: Any, critic_free: bool = False) -> tuple[Any, Any, Any]:
    """(policy module, initial params or None, trainable mask or None).

    `critic_free` (GRPO): a VLA checkpoint without a value head loads (`bridge.load_vla_model`)."""
    if policy_cfg["name"] == "actor_critic":
        from jaxrl_vla.models.actor_critic import ActorCritic

        if policy_cfg["action_chunk"] != 1:
            raise ConfigError("policy.action_chunk: actor_critic emits one action per inference; use 1")
        module = ActorCritic(
            env.action_space,
            hidden_sizes=tuple(policy_cfg["hidden_sizes"]),
            activation=policy_cfg["activation"],
            log_std_init=float(policy_cfg["log_std_init"]),
            encoder=policy_cfg["encoder"],
        )
        if module.encoder != "mlp":  # the shapes alone: a bad size or an env without images named before any run
            import jax

            from jaxrl_vla.models.policy import zeros_like_obs

            try:
                jax.eval_shape(module.init, jax.random.PRNGKey(0), zeros_like_obs(env.observation_space, 1))
            except ValueError as err:
                raise ConfigError(str(err)) from err
        return module, None, None
    from jaxrl_vla.models.vla_policy import build_vla_policy

    return build_vla_policy(policy_cfg, env, value_head_optional=critic_free)


def trainer_kwargs(cfg: dict) -> dict:
    t = cfg["trainer"]
    return dict(
        buffer_size=t["buffer_size"],
        buffer_type=t["buffer_type"],
        num_envs=t["num_envs"],
        seed=t["seed"],
        iterations=t["iterations"],
        eval_freq=t["eval_freq"],
        num_eval_episodes=t["num_eval_episodes"],
        save_freq=t["save_freq"],
        output_dir=t["output_dir"],
        exp_name=t["exp_name"],
        normalize_observations=t["normalize_observations"],
        normalize_rewards=t["normalize_rewards"],
        progress=t["progress"],
        iterations_per_call=t["iterations_per_call"],
        mesh=dict(t["mesh"]),
        max_episode_steps=t["max_episode_steps"],
    )


def build_lr_scales(policy_cfg: dict, params: Any) -> Any:
    """Per-parameter learning-rate multipliers from `policy.lr_scale` (None when it is empty)."""
    if not policy_cfg.get("lr_scale"):
        return None
    if policy_cfg["name"] != "vla":
        raise ConfigError("policy.lr_scale: only policy.name 'vla' (named, pretrained modules) takes per-module rates")
    from jaxrl_vla.models.vla_policy import learning_rate_scales

    return learning_rate_scales(params, policy_cfg["lr_scale"])


def build_demonstrations(algo_cfg: dict, env: Any, chunk: int, make_checkpoint: str | None = None) -> Any:
    """`Demonstrations` from `algorithm.demo_path` for the env (None without one), augmented by the env's
    `augment_demonstration` with `algorithm.demo_augment`. A missing file's error names the command that
    makes it: the policy's `make_checkpoint` when given (the BC script writes its demos beside its
    checkpoint), else the demo collector."""
    path = algo_cfg["demo_path"]
    if path is None:
        return None
    from pathlib import Path

    from jaxrl_vla.tasks.demos import as_demonstrations, load_demos

    make = make_checkpoint or f"python -m jaxrl_vla.tasks.demos --out {path}"
    if not Path(path).is_file():
        raise ConfigError(f"algorithm.demo_path: no file {path}; make it with: {make}")
    augment = None
    if algo_cfg["demo_augment"]:
        augment = getattr(env, "augment_demonstration", None)
        if augment is None:
            raise ConfigError(f"algorithm.demo_augment: {type(env).__name__} has no augment_demonstration")
        if chunk > 1:
            raise ConfigError(f"algorithm.demo_augment: the augmentation relabels single actions, but policy.action_chunk "
                              f"is {chunk}")
    try:
        demos = as_demonstrations(load_demos(path), env, chunk)
    except (ValueError, KeyError, OSError) as err:
        message = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
        raise ConfigError(f"algorithm.demo_path: {message}") from None
    if augment is None:  # the augmentation's labels would only travel to the device unread
        return demos.replace(augment_labels=None)
    missing = [key for key in env.demo_augment_label_keys if key not in (demos.augment_labels or {})]
    if missing:
        raise ConfigError(f"algorithm.demo_augment: {path} has no {', '.join(missing)} column (made before it "
                          f"existed?); make it anew with: {make}")
    return demos.replace(augment=augment)


def build_trainer(cfg: dict) -> Any:
    """The Trainer that the config describes (`Trainer` picks its implementation: see its docstring).

    The trainers check the settings that need the env or the policy (discrete actions,
    chunk sizes, collector counts) and raise ValueErrors that name the config field; here
    they become ConfigErrors, so the CLI reports them as config errors (exit 2, no traceback).
    """
    try:
        return _build_trainer(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _build_trainer(cfg: dict) -> Any:
    from jaxrl_vla.training.memory import check_arrays_fit

    env = build_env(cfg["env"])
    check_arrays_fit(env, cfg["trainer"])
    algorithm = build_algorithm(cfg["algorithm"])
    policy, params, mask = build_policy(cfg["policy"], env, critic_free=cfg["algorithm"]["name"] == "grpo")
    kwargs = trainer_kwargs(cfg)
    demos = build_demonstrations(cfg["algorithm"], env, cfg["policy"]["action_chunk"],
                                 cfg["policy"].get("vla_config", {}).get("make_checkpoint"))
    common = dict(init_params=params, trainable_mask=mask, lr_scales=build_lr_scales(cfg["policy"], params), config=cfg,
                  demos=demos)
    from jaxrl_vla.training.trainer import Trainer

    t = cfg["trainer"]
    return Trainer(policy, env, algorithm, num_collectors=t["num_collectors"], env_step_timeout=t["env_step_timeout"],
                   **kwargs, **common)
