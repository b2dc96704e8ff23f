"""Flow-matching action heads: K-step Euler samplers with exact log-probs for PPO (pi-RL's Flow-Noise / Flow-SDE).

Time convention (pi0's, see flow_expert.py): t runs from 1 (Gaussian noise) to 0
(the action chunk) on the grid t_k = 1 - k / K, k = 0..K, step dt = -1/K, the ODE
step x_{k+1} = x_k + dt * v(x_k, t_k).

Methods (`FlowConfig.method`):
- "ode": deterministic (evaluation); no density (log-prob and entropy are 0).
- "flow_noise": every step is Gaussian with the ODE step as mean and a std from a
  learned noise network bounded in [noise_min, noise_max]; the log-prob is the
  joint density of the whole chain x_0..x_K, x_0 ~ N(0, I) included.
- "flow_sde": the ODE becomes the SDE of RLinf's pi-RL: with delta = t_k - t_{k+1},
  sigma_k = noise_level * sqrt(t_k / (1 - t_k)) (t_k = 1 replaced by t_1 in the
  denominator, as RLinf does, since sigma is singular there), the predicted data
  x0 = x - t v and noise x1 = x + (1 - t) v, the step's mean is
  x0 * (1 - t_{k+1}) + x1 * (t_{k+1} - sigma_k^2 delta / (2 t_k)) and its std
  sqrt(delta) * sigma_k. In a rollout one denoising step per sample (uniform) is
  stochastic, the others are ODE steps; the log-prob is that step's density.
  At noise_level 0 the mean is exactly the ODE step.

A sampler returns the chunk x_K [B, H, A], its log-prob [B] and a `FlowSample`
(the chain x_0..x_K and flow_sde's stochastic step index), which is what the
rollout stores; `log_prob_and_entropy(field, sample, cfg)` re-scores it under the
current parameters (flow_noise re-evaluates the K steps, flow_sde the one step).

The velocity field is any pure function `field(x [B, H, A], t [B]) -> (v, std)`
(std [B, H, A], or None where the method does not need it), e.g. a closure over
parameters: `lambda x, t: FlowActionHead(...).apply(params, x, t, prefix_kv)`.
Steps run under lax.scan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.config import ConfigError
from jaxrl_vla.models.vla.flow_expert import FlowExpert, FlowExpertConfig
from jaxrl_vla.models.vla.layers import KV

METHODS = ("ode", "flow_noise", "flow_sde")
_LOG_2PI = math.log(2.0 * math.pi)

Field = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """`policy.flow`: Euler steps, sampler, Flow-SDE's noise level a, Flow-Noise's std bounds."""

    steps: int = 10
    method: str = "flow_noise"
    noise_level: float = 0.5
    noise_min: float = 0.08
    noise_max: float = 0.16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"policy.flow.method {self.method!r} is unknown; choose one of {list(METHODS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"policy.flow.steps must be an integer >= 1, got {self.steps!r}")
        if self.method == "flow_sde" and self.steps < 2:
            raise ConfigError(
                f"policy.flow.steps={self.steps} with method 'flow_sde': needs >= 2 steps, since sigma_t = "
                f"noise_level * sqrt(t / (1 - t)) is singular at t = 1 and is bounded by the second time step"
            )
        if self.noise_level < 0:
            raise ConfigError(f"policy.flow.noise_level must be >= 0, got {self.noise_level}")
        if not 0 <= self.noise_min <= self.noise_max:
            raise ConfigError(
                f"policy.flow.noise_min ({self.noise_min}) and noise_max ({self.noise_max}) need 0 <= min <= max"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlowConfig":
        """From the `policy.flow` mapping; an unknown key is named."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"policy.flow: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


@struct.dataclass
class FlowSample:
    """What re-scoring needs: the chain [B, K+1, H, A] (x_0 = the initial noise) and flow_sde's step [B]."""

    chain: jax.Array
    step: jax.Array


def timesteps(steps: int) -> jax.Array:
    """t_k = 1 - k / K for k = 0..K (float32 [K+1])."""
    return 1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Diagonal Gaussian log-density summed over all but the batch axis -> [B]."""
    z = (x - mean) / std
    per = -0.5 * z * z - jnp.log(std) - 0.5 * _LOG_2PI
    return per.reshape(per.shape[0], -1).sum(-1)


def gaussian_entropy(std: jax.Array) -> jax.Array:
    """Entropy of a diagonal Gaussian summed over all but the batch axis -> [B]."""
    per = jnp.log(std) + 0.5 * (1.0 + _LOG_2PI)
    return per.reshape(per.shape[0], -1).sum(-1)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(t, x.shape[:1]).reshape((-1,) + (1,) * (x.ndim - 1))


def step_mean_std(
    cfg: FlowConfig, x: jax.Array, v: jax.Array, std: jax.Array | None, t: jax.Array, t_next: jax.Array,
    t_1: jax.Array, sde_on: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean and std [B, H, A] of the step from x at time t [B] to t_next [B] (t_1: the grid's second time).

    flow_sde: `sde_on` [B] (default all) marks the stochastic samples; the others get sigma = 0, the ODE step.
    """
    tb, nb = _bcast(t, x), _bcast(t_next, x)
    if cfg.method == "flow_sde":
        delta = tb - nb
        denom = 1.0 - jnp.where(tb == 1.0, t_1, tb)
        sigma = cfg.noise_level * jnp.sqrt(tb / denom)
        if sde_on is not None:
            sigma = jnp.where(_bcast(sde_on, x), sigma, 0.0)
        x0, x1 = x - tb * v, x + (1.0 - tb) * v
        mean = x0 * (1.0 - nb) + x1 * (nb - sigma**2 * delta / (2.0 * tb))
        return mean, jnp.broadcast_to(jnp.sqrt(delta) * sigma, x.shape)
    mean = x + (nb - tb) * v
    if cfg.method == "flow_noise":
        if std is None:
            raise ValueError("flow_noise needs the field to return a std")
        return mean, jnp.broadcast_to(std, x.shape)
    return mean, jnp.zeros_like(x)


def sample(
    field: Field, key: jax.Array, shape: tuple[int, int, int], cfg: FlowConfig, deterministic: bool = False
) -> tuple[jax.Array, jax.Array, FlowSample]:
    """(chunk x_K [B, H, A], log-prob [B], FlowSample) by K Euler steps from N(0, I).

    `deterministic` (evaluation) makes every step its mean (flow_sde: the ODE step;
    flow_noise: the noise-free mean) and returns log-prob 0.
    """
    batch = shape[0]
    grid = timesteps(cfg.steps)
    k_init, k_step, k_noise = jax.random.split(key, 3)
    x0 = jax.random.normal(k_init, shape, jnp.float32)
    stochastic_any = cfg.method != "ode" and not deterministic
    sde_step = jax.random.randint(k_step, (batch,), 0, cfg.steps, jnp.int32)
    eps = jax.random.normal(k_noise, (cfg.steps,) + tuple(shape), jnp.float32)

    def body(carry, inp):
        x, logp = carry
        k, e = inp
        t = jnp.broadcast_to(grid[k], (batch,))
        t_next = jnp.broadcast_to(grid[k + 1], (batch,))
        v, std = field(x, t)
        on = jnp.full((batch,), stochastic_any) if cfg.method != "flow_sde" else (sde_step == k) & stochastic_any
        mean, sd = step_mean_std(cfg, x, v, std, t, t_next, grid[1], on)
        if not stochastic_any:
            return (mean, logp), mean
        x_next = jnp.where(_bcast(on, x), mean + sd * e, mean)
        safe_sd = jnp.where(_bcast(on, x), sd, 1.0)
        logp = logp + jnp.where(on, gaussian_log_prob(x_next, mean, safe_sd), 0.0)
        return (x_next, logp), x_next

    logp0 = jnp.zeros((batch,), jnp.float32)
    if stochastic_any and cfg.method == "flow_noise":
        logp0 = gaussian_log_prob(x0, jnp.zeros_like(x0), jnp.ones_like(x0))
    (x_k, logp), xs = jax.lax.scan(body, (x0, logp0), (jnp.arange(cfg.steps), eps))
    chain = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
    step = sde_step if cfg.method == "flow_sde" else jnp.full((batch,), -1, jnp.int32)
    return x_k, logp, FlowSample(chain=chain, step=step)


def log_prob_and_entropy(field: Field, sample_info: FlowSample, cfg: FlowConfig) -> tuple[jax.Array, jax.Array]:
    """Re-score a stored chain under `field` (the current parameters): (log-prob [B], entropy [B]).

    flow_noise: joint density of x_0..x_K (x_0 under N(0, I)), entropy of all K
    steps plus the initial noise; flow_sde: density and entropy of the stored
    stochastic step; ode: zeros.
    """
    chain = sample_info.chain
    batch, k1 = chain.shape[:2]
    if k1 != cfg.steps + 1:
        raise ValueError(f"stored chain has {k1 - 1} steps; policy.flow.steps is {cfg.steps}")
    grid = timesteps(cfg.steps)
    zero = jnp.zeros((batch,), jnp.float32)
    if cfg.method == "ode":
        return zero, zero
    if cfg.method == "flow_sde":
        idx = sample_info.step
        x = jnp.take_along_axis(chain, idx.reshape(-1, 1, 1, 1), axis=1)[:, 0]
        x_next = jnp.take_along_axis(chain, (idx + 1).reshape(-1, 1, 1, 1), axis=1)[:, 0]
        t, t_next = grid[idx], grid[idx + 1]
        v, std = field(x, t)
        mean, sd = step_mean_std(cfg, x, v, std, t, t_next, grid[1])
        return gaussian_log_prob(x_next, mean, sd), gaussian_entropy(sd)

    def body(carry, k):
        logp, ent = carry
        x, x_next = chain[:, k], chain[:, k + 1]
        t = jnp.broadcast_to(grid[k], (batch,))
        t_next = jnp.broadcast_to(grid[k + 1], (batch,))
        v, std = field(x, t)
        mean, sd = step_mean_std(cfg, x, v, std, t, t_next, grid[1])
        return (logp + gaussian_log_prob(x_next, mean, sd), ent + gaussian_entropy(sd)), None

    x0 = chain[:, 0]
    init = (gaussian_log_prob(x0, jnp.zeros_like(x0), jnp.ones_like(x0)), gaussian_entropy(jnp.ones_like(x0)))
    (logp, ent), _ = jax.lax.scan(body, init, jnp.arange(cfg.steps))
    return logp, ent


class FlowActionHead(nn.Module):
    """FlowExpert + Flow-Noise's noise network: __call__(x, t, prefix_kv, prefix_mask) -> (v, std).

    std = noise_min + (noise_max - noise_min) * sigmoid(Dense(expert hidden)), per
    step and action dim, so it stays inside the configured bounds.
    """

    expert: FlowExpertConfig
    flow: FlowConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, prefix_kv: tuple[KV, ...], prefix_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        v, hidden = FlowExpert(self.expert, self.dtype, name="expert")(x, t, prefix_kv, prefix_mask)
        raw = nn.Dense(self.expert.action_dim, dtype=self.dtype, name="noise_head",
                       kernel_init=nn.initializers.normal(self.expert.initializer_range))(hidden)
        lo, hi = self.flow.noise_min, self.flow.noise_max
        return v, lo + (hi - lo) * jax.nn.sigmoid(raw.astype(jnp.float32))
