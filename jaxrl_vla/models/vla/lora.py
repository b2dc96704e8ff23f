"""LoRA as a parameter transform: low-rank adapters on named Dense kernels, for every twin without model edits.

`policy.lora: {rank, alpha, targets}`: each Dense kernel W [in, out] whose Flax
param path has a module name matching one of `targets` (fnmatch patterns such as
"q_proj", "v_proj", "*_proj"; a pattern with "/" is matched against the whole
"/"-joined path) gets A [in, r] and B [r, out]; the effective kernel is
W + (alpha / r) A @ B. Init as PEFT's default (`init_lora_weights=True`):
A = kaiming_uniform(a=sqrt(5)) of torch's [r, in] weight, i.e. U(-1/sqrt(in),
1/sqrt(in)); B = 0, so the adapted model starts equal to the base model.

Everything is pure over pytrees: `apply_lora(params, lora, cfg)` runs inside the
jitted loss (the model's own `apply` then sees ordinary kernels), `merge_lora` is
the same computation for export, and `lora_trainable_mask` marks what trains
(all adapters, and base params under the caller's head prefixes).

Cost: per forward, one [in, r] x [r, out] matmul per adapted kernel, small
against the activations' matmuls for rank 32 (in * out * r flops vs
batch * seq * in * out); memory: the frozen base stays as it is (no optimiser
state for it under the mask), the adapters add r (in + out) per kernel, and the
effective kernels are temporaries of the forward.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxrl_vla.config import ConfigError

Params = Any


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r > 0, alpha (scaling alpha / r), targets: module-name patterns of the Dense layers to adapt."""

    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_str(path: tuple) -> str:
    return "/".join(_path_names(path))


def _matches(names: tuple[str, ...], pattern: str) -> bool:
    if "/" in pattern:
        return fnmatch.fnmatchcase("/".join(names), pattern)
    return any(fnmatch.fnmatchcase(n, pattern) for n in names[:-1])


def _dense_kernels(params: Params) -> list[tuple[tuple[str, ...], jax.Array]]:
    """(path names, leaf) of every Dense kernel (a leaf named "kernel", >= 2 dims: [..., in, out])."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(_path_names(p), x) for p, x in leaves if _path_names(p)[-1] == "kernel" and jnp.ndim(x) >= 2]


def targeted_kernels(params: Params, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{"a/b/q_proj/kernel": shape} of the kernels the targets select."""
    return {
        "/".join(n): tuple(x.shape) for n, x in _dense_kernels(params) if any(_matches(n, t) for t in cfg.targets)
    }


def validate_lora(params: Params, cfg: LoraConfig) -> None:
    """ConfigError naming the `policy.lora` field at fault (rank, alpha, a target that adapts nothing)."""
    if not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise ConfigError(f"policy.lora.rank must be a positive integer, got {cfg.rank!r}")
    if not (isinstance(cfg.alpha, (int, float)) and math.isfinite(cfg.alpha) and cfg.alpha > 0):
        raise ConfigError(f"policy.lora.alpha must be a positive number, got {cfg.alpha!r}")
    if isinstance(cfg.targets, str) or not cfg.targets:
        raise ConfigError(f"policy.lora.targets must be a non-empty list of layer names, got {cfg.targets!r}")
    kernels = _dense_kernels(params)
    for t in cfg.targets:
        if not any(_matches(n, t) for n, _ in kernels):
            names = sorted({n[-2] for n, _ in kernels if len(n) >= 2})
            raise ConfigError(
                f"policy.lora.targets: {t!r} matches no Dense kernel of the model (its Dense layers: {names})"
            )


def init_lora(key: jax.Array, params: Params, cfg: LoraConfig) -> dict[str, dict[str, jax.Array]]:
    """{kernel path: {"A": [..., in, r], "B": [..., r, out]}}, A ~ U(+-1/sqrt(in)) (PEFT), B = 0 (float32)."""
    validate_lora(params, cfg)
    shapes = targeted_kernels(params, cfg)
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (path, shape) in zip(keys, sorted(shapes.items())):
        *lead, fan_in, fan_out = shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (*lead, fan_in, cfg.rank), jnp.float32, -bound, bound)
        out[path] = {"A": a, "B": jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32)}
    return out


def apply_lora(params: Params, lora: Mapping[str, Mapping[str, jax.Array]], cfg: LoraConfig) -> Params:
    """The effective params: each adapted kernel becomes W + scale * A @ B (in W's dtype); jittable."""

    def one(path, w):
        ab = lora.get(path_str(path))
        if ab is None:
            return w
        delta = jnp.einsum("...ir,...ro->...io", ab["A"], ab["B"], precision=jax.lax.Precision.HIGHEST)
        return (w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype)

    missing = set(lora) - set(targeted_kernels(params, cfg))
    if missing:
        raise ConfigError(f"LoRA adapters for kernels the params lack: {sorted(missing)}")
    return jax.tree_util.tree_map_with_path(one, params)


def merge_lora(params: Params, lora: Mapping[str, Mapping[str, jax.Array]], cfg: LoraConfig) -> Params:
    """For export: the base with the adapters folded in (the same computation as `apply_lora`)."""
    return apply_lora(params, lora, cfg)


def lora_trainable_mask(params: Params, lora: Any, head_prefixes: Sequence[str] = ()) -> dict[str, Any]:
    """Mask for the pytree {"base": params, "lora": lora}: all adapters True; a base leaf True only when its
    "/"-joined path starts with one of `head_prefixes` (e.g. "params/value_head"). Use with optax.masked /
    multi_transform (frozen leaves: optax.set_to_zero) so only adapters and heads train."""

    def base(path, _):
        p = path_str(path)
        return any(p == h or p.startswith(h.rstrip("/") + "/") for h in head_prefixes)

    return {
        "base": jax.tree_util.tree_map_with_path(base, params),
        "lora": jax.tree_util.tree_map(lambda _: True, lora),
    }
