"""JAX-native environments and the name -> env registry.

    env = make_env("CartPole-v1")                 # built-in
    env = make_env("Pendulum-v1", max_episode_steps=100)
    env = make_env("gymnax:Acrobot-v1")          # any gymnax id (needs gymnax)

The registry maps names to factories given as "module:attr" strings, so that
importing `jaxrl_vla.envs` imports no env module (and none of their heavy or
optional dependencies) until that env is made. Adding an env is one line in
`_REGISTRY` below, or `register_env(name, factory)` from user code.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from jaxrl_vla.envs.base import Box, Discrete, Env, TimeStep
from jaxrl_vla.envs.wrappers import VecEnv, VecEnvState

__all__ = [
    "Box",
    "Discrete",
    "Env",
    "TimeStep",
    "VecEnv",
    "VecEnvState",
    "available_envs",
    "make_env",
    "register_env",
]

Factory = Callable[..., Env]

GYMNAX_PREFIX = "gymnax:"
METAWORLD_PREFIX = "metaworld:"  # "metaworld:MT10", "metaworld:reach-v3": a host env (jaxrl_vla.envs.metaworld)

# name -> factory: a callable, or a lazily imported "module:attr" string.
_REGISTRY: dict[str, str | Factory] = {
    "CartPole-v1": "jaxrl_vla.envs.cartpole:CartPole",
    "Pendulum-v1": "jaxrl_vla.envs.pendulum:Pendulum",
    "VLReach-v0": "jaxrl_vla.envs.vl_reach:VLReach",
}


def register_env(name: str, factory: str | Factory, *, overwrite: bool = False) -> None:
    """Make `make_env(name, **kw)` call `factory(**kw)`.

    `factory` is a callable or a "module:attr" string imported on first use.
    Re-registering a name raises unless `overwrite=True`, so two envs cannot
    silently shadow each other.
    """
    if name.startswith(GYMNAX_PREFIX) or name.startswith(METAWORLD_PREFIX):
        raise ValueError(f"names starting with {name.split(':')[0] + ':'!r} are reserved for gymnax / Meta-World envs")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"factory string must look like 'module:attr', got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"env {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_envs() -> list[str]:
    """Registered names, sorted. Any "gymnax:<id>" also works when gymnax is installed."""
    return sorted(_REGISTRY)


def _resolve(factory: str | Factory) -> Factory:
    """Import a "module:attr" factory; callables are returned as they are."""
    if not isinstance(factory, str):
        return factory
    module_name, _, attr = factory.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _unknown_env_error(name: str) -> ValueError:
    """An error that names the closest registered env, since typos are the usual cause."""
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    known = ", ".join(available_envs())
    return ValueError(f"unknown env {name!r}.{hint} Known envs: {known} (or 'gymnax:<id>').")


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the env registered as `name`, passing `kwargs` to its constructor."""
    if name.startswith(GYMNAX_PREFIX):
        from jaxrl_vla.envs.gymnax_adapter import GymnaxEnv

        return GymnaxEnv(name[len(GYMNAX_PREFIX) :], **kwargs)
    if name.startswith(METAWORLD_PREFIX):
        from jaxrl_vla.envs.metaworld import make_metaworld_env

        return make_metaworld_env(name, **kwargs)
    if name not in _REGISTRY:
        raise _unknown_env_error(name)
    return _resolve(_REGISTRY[name])(**kwargs)
