"""LoRA fine-tuning of a VLA policy: frozen base weights, trained low-rank adapters and heads.

`policy.lora: {rank, alpha, targets, modules_to_save}` wraps the VLAPolicy in a
`LoraPolicy`. Its variables are the policy's with one more entry under "params":

    {"params": {"model": <base, frozen>, "lora": {"scale": s, "adapters": {<kernel path>: {"A", "B"}}}}, ...}

so the learner, the optimiser, checkpoints and sharding see one ordinary pytree;
the trainable mask (`lora_trainable_mask`) lets only the adapters and the
`modules_to_save` heads (PEFT's name) train, and optax's `set_to_zero` keeps the
frozen base bit-identical with no Adam moments for it. Every `apply` (any
`method=`) first folds the adapters into the kernels (`jaxrl_vla.models.vla.lora`),
so the wrapped model runs unchanged; the scale travels inside the variables, so
`merged_variables` (what export takes) needs nothing but them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.lora import LoraConfig, init_lora, validate_lora

LORA = "lora"  # the adapters' entry in the policy's "params"
MODEL = "model"  # VLAPolicy's scope for the wrapped model (see vla_policy.MODEL)


def _nest(flat: dict[str, dict[str, jax.Array]]) -> dict:
    """{"a/b/kernel": {"A", "B"}} -> nested dicts (path components as keys: checkpoint-safe names)."""
    return traverse_util.unflatten_dict({tuple(path.split("/")): ab for path, ab in flat.items()})


def _flat(nested: dict) -> dict[str, dict[str, jax.Array]]:
    """The inverse of `_nest`: kernel path -> {"A", "B"}."""
    leaves = traverse_util.flatten_dict(nested)
    out: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in leaves.items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    return out


def fold_adapters(model_params: Any, lora: dict) -> Any:
    """Model params with each adapted kernel W replaced by W + scale * A @ B (in W's dtype); jittable."""
    adapters, scale = _flat(lora["adapters"]), lora["scale"]
    flat = traverse_util.flatten_dict(model_params, sep="/")
    missing = sorted(set(adapters) - set(flat))
    if missing:
        raise ValueError(f"LoRA adapters for kernels the model lacks: {missing}")
    for path, ab in adapters.items():
        w = flat[path]
        delta = jnp.einsum("...ir,...ro->...io", ab["A"], ab["B"], precision=jax.lax.Precision.HIGHEST)
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def merged_variables(variables: dict) -> dict:
    """Policy variables without the "lora" entry, the adapters folded into the model's kernels (export)."""
    params = dict(variables["params"])
    lora = params.pop(LORA, None)
    if lora is not None:
        params[MODEL] = fold_adapters(params[MODEL], lora)
    return {**variables, "params": params}


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: jit may key on the policy
class LoraPolicy:
    """A policy whose "params" hold frozen base weights plus LoRA adapters; behaves as the base policy.

    `init` and `apply` have the Flax signatures the trainers, evaluation and the
    auxiliary loss use; other attributes (`action_chunk`, `auxiliary_dim`, ...) are
    the base policy's.
    """

    base: Any
    config: LoraConfig

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "config"):  # not set yet (copy/unpickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.base, name)

    def init(self, key: jax.Array, *args: Any, **kwargs: Any) -> dict:
        base_key, lora_key = jax.random.split(key)
        return add_adapters(self.base.init(base_key, *args, **kwargs), self.config, lora_key)

    def apply(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        return self.base.apply(merged_variables(variables), *args, **kwargs)


def add_adapters(variables: dict, cfg: LoraConfig, key: jax.Array) -> dict:
    """Policy variables with fresh adapters (B = 0: the adapted policy starts equal to the base)."""
    model_params = variables["params"][MODEL]
    validate_lora(model_params, cfg)
    lora = {"scale": jnp.asarray(cfg.scale, jnp.float32), "adapters": _nest(init_lora(key, model_params, cfg))}
    return {**variables, "params": {**variables["params"], LORA: lora}}


def lora_trainable_mask(variables: dict, modules_to_save: Sequence[str]) -> dict:
    """True for the adapters (not their scale) and for model params under `modules_to_save` and other
    non-model entries (an auxiliary head); False for the frozen base and every non-"params" collection."""

    def under(inner: str, prefix: str) -> bool:
        return inner == prefix or inner.startswith(prefix.rstrip("/") + "/")

    mask = {}
    for path in traverse_util.flatten_dict(variables, sep="/"):
        collection, _, rest = path.partition("/")
        scope, _, inner = rest.partition("/")
        if collection != "params":
            mask[path] = False
        elif scope == LORA:
            mask[path] = inner.startswith("adapters/")
        elif scope == MODEL:
            mask[path] = any(under(inner, p) for p in modules_to_save)
        else:  # the auxiliary head: a fresh, training-only head
            mask[path] = True
    return traverse_util.unflatten_dict(mask, sep="/")


def lora_config_from_policy(policy_cfg: dict) -> tuple[LoraConfig, list[str]] | None:
    """(LoraConfig, modules_to_save) from `policy.lora`, or None without one; ConfigError names the field."""
    section = policy_cfg.get("lora")
    if section is None:
        return None
    known = {"rank", "alpha", "targets", "modules_to_save"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"policy.lora.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(known))}")
    defaults = LoraConfig()
    targets = section.get("targets", list(defaults.targets))
    save = section.get("modules_to_save", [])
    if isinstance(save, str) or not all(isinstance(p, str) for p in save):
        raise ConfigError(f"policy.lora.modules_to_save must be a list of parameter path prefixes, got {save!r}")
    rank, alpha = section.get("rank", defaults.rank), section.get("alpha", defaults.alpha)
    if isinstance(rank, bool) or isinstance(alpha, bool):
        raise ConfigError("policy.lora.rank / alpha: numbers, not true/false")
    return LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets) if isinstance(targets, list) else targets), list(save)


def check_modules_to_save(variables: dict, modules_to_save: Sequence[str]) -> None:
    """Each `modules_to_save` prefix must name parameters of the model (a typo would freeze the heads)."""
    paths = list(traverse_util.flatten_dict(variables["params"][MODEL], sep="/"))
    for prefix in modules_to_save:
        if not any(p == prefix or p.startswith(prefix.rstrip("/") + "/") for p in paths):
            tops = sorted({p.split("/")[0] for p in paths})
            raise ConfigError(f"policy.lora.modules_to_save: {prefix!r} names no parameter of the model "
                              f"(its top-level modules: {tops})")
