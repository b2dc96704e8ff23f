"""GRPO (group relative policy optimisation) as pure, jittable functions, beside PPO.

Critic-free: G rollouts start from the same initial state (a group), each gets
one outcome R (its success, or its episode return), and every step of a
trajectory gets the group-normalised advantage (R - mean_group) / (std_group + eps)
(DeepSeekMath's outcome supervision; SimpleVLA-RL fine-tunes VLAs with it).

    episode_mask       [T, N] steps of each env's FIRST episode of the rollout
    group_advantages   outcome [N] -> advantage [N], normalised within groups of G
    group_filter       dynamic sampling: keep groups whose success rate is in [low, high]
    token_log_probs    log-prob of each action "token" (see below) [B, K]
    k3_kl              exp(ref - logp) - (ref - logp) - 1, the KL estimator to the reference
    grpo_loss          clipped ratio with asymmetric bounds (clip_low, clip_high) + KL - entropy
    make_grpo_batch    rollout [T, N] -> GRPOBatch [T*N] with weights, old and reference log-probs
    outcome_rewards    per-step rewards whose rollout sum is the outcome (JAX and host envs alike)
    GroupVecEnv        a VecEnv whose reset gives every group of G envs one initial state and whose
                       rewards stop after each env's first episode (one episode per env per rollout);
                       its host twin, for vla mode and host envs, is `grpo_trainer.GroupHostVecEnv`

Tokens. The ratio, its clip and the KL are per token, as in the LLM/VLA
recipes: for a Gaussian policy (the MLP's, the VLA's) a token is one action
dimension of one executed step (a chunk's steps are separate samples already,
`chunk_index`); a categorical policy has one token per step. `loss_agg`:
  "token"   the mean over all valid tokens of a minibatch (long episodes weigh more;
            DAPO's token-level loss, SimpleVLA-RL's default),
  "sample"  each trajectory weighs the same: a token's weight is 1 / (its
            trajectory's steps), then the weighted mean (verl's seq-mean-token-mean
            in expectation over the shuffled minibatches).

The update reuses PPO's epoch x minibatch scan (`ppo.update(..., loss_fn=grpo_loss)`),
its optimiser, demonstration and auxiliary losses. The policy's value output is
computed by its forward pass but never enters the loss, so a value head gets no
gradient and GRPO needs none.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxrl_vla.algo import ppo
from jaxrl_vla.envs.base import TimeStep
from jaxrl_vla.envs.wrappers import VecEnv, VecEnvState
from jaxrl_vla.models.distributions import Categorical, DiagGaussian
from jaxrl_vla.types import Demonstrations, Transition

ADVANTAGE_EPS = 1e-6  # verl's epsilon in (R - mean) / (std + eps)
LOSS_AGGREGATIONS = ("token", "sample")
OUTCOMES = ("success", "return")


@struct.dataclass
class GRPOConfig(ppo.PPOConfig):
    """GRPO's hyper-parameters: PPO's optimiser, epochs, minibatches, ent/demo/aux coefficients and
    target_kl, plus its own. PPO's gamma, gae_lambda, clip_coef, vf_* and normalize_advantage are unused."""

    group_size: int = struct.field(pytree_node=False, default=8)
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = struct.field(pytree_node=False, default=0.0)  # static: 0 skips the reference pass
    loss_agg: str = struct.field(pytree_node=False, default="token")
    filter_low: float = 0.0
    filter_high: float = 1.0
    reward: str = struct.field(pytree_node=False, default="success")

    def check(self) -> None:
        """ValueErrors naming the field (the config schema checks the same for files)."""
        if self.group_size < 2:
            raise ValueError(f"algorithm.cfg.group_size ({self.group_size}) must be >= 2: a group of one has no "
                             "baseline")
        for name in ("filter_low", "filter_high"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"algorithm.cfg.{name} ({value}) must be in [0, 1] (a success rate)")
        if self.filter_low > self.filter_high:
            raise ValueError(f"algorithm.cfg.filter_low ({self.filter_low}) exceeds algorithm.cfg.filter_high "
                             f"({self.filter_high})")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"algorithm.cfg.loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.reward not in OUTCOMES:
            raise ValueError(f"algorithm.cfg.reward must be one of {OUTCOMES}, got {self.reward!r}")
        if self.reward == "return" and (self.filter_low, self.filter_high) != (0.0, 1.0):
            raise ValueError("algorithm.cfg.filter_low/filter_high filter groups by success rate: they need "
                             "algorithm.cfg.reward 'success'")


@struct.dataclass
class GRPOBatch:
    """Flattened samples [B, ...] for the GRPO update.

    weight           the sample's share of the loss: 0 after its env's first episode ended and for
                     filtered groups; 1 ("token") or 1 / trajectory steps ("sample") otherwise
    token_log_prob   [B, K] log pi_old of each token (re-scored before the update)
    ref_log_prob     [B, K] log pi_ref of each token, or None without a KL term
    """

    obs: Any
    action: jax.Array
    chunk_index: jax.Array
    advantage: jax.Array
    weight: jax.Array
    token_log_prob: jax.Array
    ref_log_prob: jax.Array | None = None
    sample_info: Any = None  # token / flow heads: what re-scoring needs (`Transition.sample_info`)


# --------------------------------------------------------------------------- outcomes and groups


def episode_mask(dones: jax.Array) -> jax.Array:
    """[T, N] bool: the steps of each env's first episode, its ending step included (a cumulative
    count of the ends before each step, not a loop). Steps after it belong to auto-reset episodes
    that GRPO does not score; an episode still running at step T is cut there (the step limit)."""
    dones = dones.astype(jnp.int32)
    ends_before = jnp.cumsum(dones, axis=0) - dones
    return ends_before == 0


def group_advantages(outcome: jax.Array, group_size: int, eps: float = ADVANTAGE_EPS) -> jax.Array:
    """(R - mean_group) / (std_group + eps) for outcomes [N] laid out as N / G consecutive groups.
    std is the unbiased one (ddof 1), as verl's GRPO computes it; a group of equal outcomes gets 0."""
    groups = outcome.astype(jnp.float32).reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    return ((groups - mean) / (std + eps)).reshape(-1)


def group_filter(success: jax.Array, group_size: int, low: float | jax.Array, high: float | jax.Array) -> jax.Array:
    """[N] bool: the env's group has a success rate in [low, high] (DAPO's dynamic sampling;
    SimpleVLA-RL keeps 0.1-0.9: groups that all succeed or all fail carry no signal). The dropped
    groups' steps are masked (weight 0), not replaced by fresh draws: shapes stay static, and the
    minibatches' means are over the kept groups only."""
    rate = success.astype(jnp.float32).reshape(-1, group_size).mean(axis=1)
    keep = jnp.logical_and(rate >= low, rate <= high)
    return jnp.repeat(keep, group_size)


def outcome_rewards(reward: Any, success: Any, live: Any, first_end: Any, outcome: str) -> Any:
    """[N] rewards whose sum over a rollout is each env's outcome (what `rollout_outcomes` sums): the
    env's reward while its first episode runs ("return"), or its success on the step that ends that
    episode ("success"); 0 after it. Arithmetic only, so the JAX envs (`GroupVecEnv`, jnp arrays) and
    the host collectors (`grpo_trainer.GroupHostVecEnv`, numpy arrays) score steps the same way."""
    if outcome == "success":
        return first_end * success.astype("float32")
    return live * reward.astype("float32")


def group_reset_keys(key: jax.Array, num_envs: int, group_size: int) -> jax.Array:
    """[N] reset keys, env n using its group's (n // G): equal keys give a pure JAX env equal states."""
    return jnp.repeat(jax.random.split(key, num_envs // group_size), group_size, axis=0)


@struct.dataclass
class GroupVecState:
    """A VecEnv's state and, per env, whether its first episode of the rollout has ended."""

    inner: VecEnvState
    finished: jax.Array  # [N] bool


class GroupVecEnv(VecEnv):
    """N = (N / G) x G env copies for GRPO: `reset(key)` starts each group of G consecutive envs from
    ONE initial state (`group_reset_keys`); `step` zeroes the reward after an env's first episode
    (its auto-reset continuation is not scored) and, with outcome "success", replaces the reward
    by the env's info["success"] on the step that ends the first episode, so the summed reward of
    a rollout is the outcome either way. info["done"] marks first episodes only, so the episode
    statistics describe what is trained on; info["episode_return"] keeps the env's own return.
    """

    def __init__(self, env: Any, num_envs: int, group_size: int, outcome: str = "return"):
        super().__init__(env, num_envs)
        if num_envs % group_size:
            raise ValueError(f"trainer.num_envs ({num_envs}) must be a multiple of algorithm.cfg.group_size "
                             f"({group_size})")
        self.group_size = group_size
        self.outcome = outcome

    def reset(self, key: jax.Array) -> tuple[GroupVecState, Any]:
        reset_key, next_key = jax.random.split(key)
        env_state, obs = jax.vmap(self.env.reset)(group_reset_keys(reset_key, self.num_envs, self.group_size))
        zeros = jnp.zeros((self.num_envs,), jnp.float32)
        inner = VecEnvState(env_state, jax.random.split(next_key, self.num_envs), zeros,
                            jnp.zeros((self.num_envs,), jnp.int32))
        return GroupVecState(inner, jnp.zeros((self.num_envs,), bool)), obs

    def step(self, state: GroupVecState, action: jax.Array) -> tuple[GroupVecState, TimeStep]:
        inner, ts = super().step(state.inner, action)
        live = ~state.finished
        first_end = jnp.logical_and(ts.info["done"], live)
        reward = outcome_rewards(ts.reward, ts.info.get("success"), live, first_end, self.outcome)
        info = dict(ts.info, done=first_end)
        finished = jnp.logical_or(state.finished, ts.info["done"])
        return GroupVecState(inner, finished), TimeStep(ts.obs, reward, ts.terminated, ts.truncated, info)


# --------------------------------------------------------------------------- loss


def token_log_probs(dist: Any, action: jax.Array) -> jax.Array:
    """Per-token log-probs [..., K]: a diagonal Gaussian's per-dimension terms (K = A; their sum is
    its log_prob), a categorical's log-prob as one token (K = 1)."""
    if isinstance(dist, DiagGaussian):
        log_std = jnp.broadcast_to(dist.log_std, dist.mean.shape)
        z = (action - dist.mean) * jnp.exp(-log_std)
        return -0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    if isinstance(dist, Categorical):
        return dist.log_prob(action)[..., None]
    raise TypeError(f"GRPO has no token split for {type(dist).__name__}")


def score_tokens(apply_fn: ppo.ApplyFn, params: Any, obs: Any, action: jax.Array,
                 chunk_index: jax.Array, sample_info: Any = None) -> tuple[jax.Array, jax.Array]:
    """(token log-probs [B, K], entropy [B]) of the executed actions; a chunking policy's executed
    chunk step is picked as in `ppo.score_actions`. The value output is discarded.

    With `sample_info` (a token or flow head's stored sample) the stored sample is re-scored: an
    action-token head's tokens are GRPO's tokens (K = H x A), a flow head's chain is one (K = 1)."""
    dist, value = apply_fn(params, obs)
    if sample_info is not None:
        if hasattr(dist, "token_log_probs_and_entropy"):
            return dist.token_log_probs_and_entropy(sample_info)
        log_prob, entropy = dist.log_prob_and_entropy(sample_info)
        return log_prob[:, None], entropy
    if value.ndim == 1:
        return token_log_probs(dist, action), dist.entropy()
    horizon = value.shape[1]
    tiled = jnp.broadcast_to(action[:, None], (action.shape[0], horizon) + action.shape[1:])
    tokens = token_log_probs(dist, tiled)  # [B, H, K]
    index = chunk_index.astype(jnp.int32)[:, None, None]
    picked = jnp.take_along_axis(tokens, jnp.broadcast_to(index, (tokens.shape[0], 1, tokens.shape[2])), axis=1)
    return picked[:, 0], ppo.select_chunk_step(dist.entropy(), chunk_index)


def k3_kl(log_prob: jax.Array, ref_log_prob: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1
    (>= 0, unbiased under samples of pi, as GRPO's KL penalty)."""
    delta = ref_log_prob - log_prob
    return jnp.exp(delta) - delta - 1.0


def _weighted_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
    """sum(w x) / sum(w); 0 for a minibatch without a weighted sample."""
    total = weight.sum()
    return jnp.where(total > 0, (weight * x).sum() / jnp.where(total > 0, total, 1.0), 0.0)


def grpo_loss(
    params: Any, apply_fn: ppo.ApplyFn, batch: GRPOBatch, cfg: GRPOConfig, aux_loss_fn: ppo.AuxLossFn | None = None,
    demos: Demonstrations | None = None,
) -> tuple[jax.Array, dict]:
    """GRPO's objective on one minibatch: -weighted mean over tokens of
    min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef x k3 - ent_coef x entropy
    (+ PPO's demonstration and auxiliary terms). The asymmetric clip (DAPO's clip-higher) lets
    unlikely tokens with positive advantage rise further before their gradient stops."""
    log_prob, entropy = score_tokens(apply_fn, params, batch.obs, batch.action, batch.chunk_index, batch.sample_info)
    weight = jnp.broadcast_to(batch.weight[:, None], log_prob.shape)
    advantage = batch.advantage[:, None]
    log_ratio = log_prob - batch.token_log_prob
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate = jnp.minimum(ratio * advantage, clipped * advantage)
    policy_loss = -_weighted_mean(surrogate, weight)
    entropy_mean = _weighted_mean(entropy, batch.weight)
    loss = policy_loss - cfg.ent_coef * entropy_mean
    extra = {}
    if batch.ref_log_prob is not None:
        kl = _weighted_mean(k3_kl(log_prob, batch.ref_log_prob), weight)
        loss = loss + cfg.kl_coef * kl
        extra["loss/kl"] = kl
    if aux_loss_fn is not None:
        aux_loss = aux_loss_fn(params, batch.obs)
        loss = loss + cfg.aux_coef * aux_loss
        extra["loss/aux"] = aux_loss
    if demos is not None:
        bc_loss = ppo.demo_loss(params, apply_fn, demos)
        loss = loss + cfg.demo_coef * bc_loss
        extra["loss/demo"] = bc_loss
    metrics = {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/entropy": entropy_mean,
        "approx_kl": _weighted_mean((ratio - 1.0) - log_ratio, weight),
        "clip_fraction_low": _weighted_mean((ratio < 1.0 - cfg.clip_low).astype(jnp.float32), weight),
        "clip_fraction_high": _weighted_mean((ratio > 1.0 + cfg.clip_high).astype(jnp.float32), weight),
        **extra,
    }
    return loss, metrics


# --------------------------------------------------------------------------- batch and update


def score_all(apply_fn: ppo.ApplyFn, params: Any, obs: Any, action: jax.Array, chunk_index: jax.Array,
              rows: int, sample_info: Any = None) -> jax.Array:
    """Token log-probs [B, K] of every sample, `rows` at a time (`lax.map`: a VLA's batch of a whole
    rollout need not fit through the model at once)."""
    def score_one(sample):  # lax.map vmaps this over `rows` samples at a time
        one = jax.tree_util.tree_map(lambda x: x[None], sample)
        return score_tokens(apply_fn, params, *one)[0][0]

    return jax.lax.map(score_one, (obs, action, chunk_index, sample_info), batch_size=rows)


def rollout_outcomes(rollout: Transition, cfg: GRPOConfig) -> tuple[jax.Array, jax.Array, dict]:
    """(advantage [N], step weight [T, N], metrics) of a `GroupVecEnv` rollout [T, N]."""
    valid = episode_mask(jnp.logical_or(rollout.terminated, rollout.truncated))
    outcome = jnp.sum(rollout.reward * valid, axis=0)  # GroupVecEnv's rewards: the outcome's parts
    advantage = group_advantages(outcome, cfg.group_size)
    if cfg.reward == "success":
        kept = group_filter(outcome, cfg.group_size, cfg.filter_low, cfg.filter_high)
    else:
        kept = jnp.ones_like(outcome, bool)
    steps = valid.sum(axis=0)
    weight = valid * kept[None]
    if cfg.loss_agg == "sample":
        weight = weight / jnp.maximum(steps, 1)[None]
    metrics = {
        "grpo/outcome_mean": outcome.mean(),
        "grpo/groups_kept": kept.reshape(-1, cfg.group_size)[:, 0].mean(),
        "grpo/valid_fraction": valid.mean(),
        "grpo/finished_fraction": jnp.any(jnp.logical_or(rollout.terminated, rollout.truncated), axis=0).mean(),
    }
    return advantage, weight.astype(jnp.float32), metrics


def make_grpo_batch(apply_fn: ppo.ApplyFn, params: Any, ref_params: Any, rollout: Transition,
                    cfg: GRPOConfig) -> tuple[GRPOBatch, dict]:
    """The rollout [T, N] as GRPOBatch [T*N] (advantages broadcast to every step of a trajectory),
    with the old token log-probs scored by `params` (the acting ones: the first epoch's ratio is 1)
    and, where kl_coef > 0, the reference's by `ref_params`."""
    advantage, weight, metrics = rollout_outcomes(rollout, cfg)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    obs = jax.tree_util.tree_map(flat, rollout.obs)
    action, chunk_index = flat(rollout.action), flat(rollout.chunk_index)
    sample_info = jax.tree_util.tree_map(flat, rollout.sample_info)
    rows = min(cfg.batch_size, action.shape[0])
    old = jax.lax.stop_gradient(score_all(apply_fn, params, obs, action, chunk_index, rows, sample_info))
    ref = None
    if cfg.kl_coef > 0:
        ref = jax.lax.stop_gradient(score_all(apply_fn, ref_params, obs, action, chunk_index, rows, sample_info))
    batch = GRPOBatch(obs=obs, action=action, chunk_index=chunk_index,
                      advantage=flat(jnp.broadcast_to(advantage[None], weight.shape)), weight=flat(weight),
                      token_log_prob=old, ref_log_prob=ref, sample_info=sample_info)
    return batch, metrics


def update(params: Any, opt_state: Any, batch: GRPOBatch, key: jax.Array, **kwargs) -> tuple[Any, Any, dict]:
    """PPO's epoch x minibatch machinery (`ppo.update`) with `grpo_loss`."""
    return ppo.update(params, opt_state, batch, key, loss_fn=grpo_loss, **kwargs)
