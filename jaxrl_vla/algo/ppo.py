"""PPO as pure, jittable functions over pytrees.

    compute_gae          reverse lax.scan over [T, N] with terminated/truncated apart
    gae_from_transitions GAE for a rollout of `Transition`s (truncation bootstrapped)
    ppo_loss             clipped surrogate + (optionally clipped) value loss - entropy
    make_optimizer       optax chain: global-norm clip, Adam, learning-rate schedule
    demo_loss            behaviour-cloning loss on expert demonstrations (cfg.demo_coef)
    update               n_epochs x shuffled minibatches as nested scans; target_kl
                         masks the remaining updates (a scan cannot break); with
                         demonstrations, each minibatch also draws a demo minibatch

Hyper-parameters that only enter arithmetic (gamma, clip_coef, ...) are traced
pytree leaves of `PPOConfig`, so they can be vmapped or changed without
recompiling; those that fix shapes or control flow are static.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_vla.types import Batch, Demonstrations, Transition

ApplyFn = Callable[[Any, Any], tuple[Any, jax.Array]]
# (params, obs) -> scalar: a supervised loss added to PPO's with weight cfg.aux_coef (see ppo_loss)
AuxLossFn = Callable[[Any, Any], jax.Array]


@struct.dataclass
class PPOConfig:
    """PPO hyper-parameters (the seed's `algorithm.cfg`). Units in the README."""

    learning_rate: float = struct.field(pytree_node=False, default=3e-4)
    lr_schedule: str = struct.field(pytree_node=False, default="constant")
    lr_warmup_steps: int = struct.field(pytree_node=False, default=0)
    gamma: float = 0.99
    gae_lambda: float = 0.95
    n_epochs: int = struct.field(pytree_node=False, default=10)
    batch_size: int = struct.field(pytree_node=False, default=64)
    clip_coef: float = 0.2
    vf_clip_coef: float | None = struct.field(pytree_node=False, default=None)
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    aux_coef: float = 0.0
    demo_coef: float = 0.0
    max_grad_norm: float = struct.field(pytree_node=False, default=0.5)
    target_kl: float | None = struct.field(pytree_node=False, default=None)
    normalize_advantage: bool = struct.field(pytree_node=False, default=True)
    noise_correlation: float = struct.field(pytree_node=False, default=0.0)

    def num_minibatches(self, num_samples: int) -> int:
        if num_samples < self.batch_size:
            raise ValueError(
                f"algorithm.cfg.batch_size ({self.batch_size}) is larger than the "
                f"{num_samples} samples one iteration collects"
            )
        return num_samples // self.batch_size


# --------------------------------------------------------------------------- GAE


def compute_gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    terminated: jax.Array,
    dones: jax.Array,
    gamma: float | jax.Array,
    gae_lambda: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over [T, N] arrays.

    next_values[t] is V of the true successor of step t (for a truncated step the
    final observation, not the auto-reset one). `terminated` removes that
    bootstrap; `dones` (terminated or truncated) stops the advantage from
    flowing across an episode boundary. Returns (advantages, returns).

    Both are *selected* with `where`, not multiplied by a 0/1 mask: 0 * NaN is NaN,
    so a non-finite next value on a terminated step (a step both terminated and
    truncated carries the final observation's value, which may be anything) or a
    non-finite advantage from across a boundary would otherwise leak in.
    """
    bootstrap = jnp.where(terminated, jnp.zeros_like(next_values), next_values)
    deltas = rewards + gamma * bootstrap - values
    discount = jnp.asarray(gamma * gae_lambda, values.dtype)

    def backward(next_advantage: jax.Array, step: tuple[jax.Array, jax.Array]):
        delta, done = step
        advantage = delta + jnp.where(done, jnp.zeros_like(next_advantage), discount * next_advantage)
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(values[0]), (deltas, dones), reverse=True)
    return advantages, advantages + values


def gae_from_transitions(
    rollout: Transition, last_value: jax.Array, gamma: float | jax.Array, gae_lambda: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """GAE for a time-ordered rollout [T, N]; `last_value` is V(obs after step T-1)."""
    next_values = jnp.concatenate([rollout.value[1:], last_value[None]], axis=0)
    next_values = jnp.where(rollout.truncated, rollout.final_value, next_values)
    dones = jnp.logical_or(rollout.terminated, rollout.truncated)
    return compute_gae(rollout.reward, rollout.value, next_values, rollout.terminated, dones, gamma, gae_lambda)


def make_batch(rollout: Transition, advantages: jax.Array, returns: jax.Array) -> Batch:
    """Flatten [T, N, ...] rollout fields into [T*N, ...] training samples."""

    def flat(x: jax.Array) -> jax.Array:
        return x.reshape((-1,) + x.shape[2:])

    return Batch(
        obs=jax.tree_util.tree_map(flat, rollout.obs),
        action=flat(rollout.action),
        log_prob=flat(rollout.log_prob),
        value=flat(rollout.value),
        advantage=flat(advantages),
        returns=flat(returns),
        chunk_index=flat(rollout.chunk_index),
        sample_info=jax.tree_util.tree_map(flat, rollout.sample_info),
    )


# --------------------------------------------------------------------------- loss


def select_chunk_step(x: jax.Array, chunk_index: jax.Array) -> jax.Array:
    """Pick each sample's executed chunk step from [B, H] -> [B]."""
    return jnp.take_along_axis(x, chunk_index[:, None].astype(jnp.int32), axis=1)[:, 0]


def score_actions(apply_fn: ApplyFn, params: Any, obs: Any, action: jax.Array, chunk_index: jax.Array,
                  sample_info: Any = None):
    """(log_prob, entropy, value) of the executed actions, each [B].

    A policy without chunks returns value [B]. A chunking policy returns value
    [B, H] and a distribution with batch shape [B, H] (one value and one action
    distribution per chunk step, all computed from the chunk's first
    observation); the executed step `chunk_index` is scored. With `sample_info`
    (a flow-matching policy's stored denoising chain) the chain is re-scored: its
    joint log-prob and entropy are the chunk's, shared by every step of it.
    """
    dist, value = apply_fn(params, obs)
    if sample_info is not None:
        log_prob, entropy = dist.log_prob_and_entropy(sample_info)
        return log_prob, entropy, value if value.ndim == 1 else select_chunk_step(value, chunk_index)
    if value.ndim == 1:
        return dist.log_prob(action), dist.entropy(), value
    tiled = jnp.broadcast_to(action[:, None], (action.shape[0], value.shape[1]) + action.shape[1:])
    pick = lambda x: select_chunk_step(x, chunk_index)  # noqa: E731
    return pick(dist.log_prob(tiled)), pick(dist.entropy()), pick(value)


def demo_loss(params: Any, apply_fn: ApplyFn, demos: Demonstrations) -> jax.Array:
    """Behaviour cloning on expert demonstrations: the squared error of the policy's
    mode (a Gaussian's mean) against the expert's action, summed over action
    dimensions and averaged over samples and chunk steps.

    Why the mode and not the log-likelihood (DAPG's form): the likelihood would
    also shrink the Gaussian's std towards the demonstrations' spread and with it
    PPO's exploration, which the clipped objective and the checkpoint's log-std
    own. The squared error is the loss the torch clone was trained with
    (`bridge.pretrain_bc`), so the demonstrations pull on the same quantity.
    """
    dist, _ = apply_fn(params, demos.obs)
    error = jnp.sum(jnp.square(dist.mode() - demos.action), axis=-1)
    return jnp.mean(error)


def draw_demo_rows(key: jax.Array, demos: Demonstrations, count: int) -> jax.Array:
    """`count` row indices of `demos`, with replacement: uniform, or in proportion to
    `demos.weight` (inverse CDF: a binary search per draw, not a [count, D] table)."""
    size = demos.action.shape[0]
    if demos.weight is None:
        return jax.random.randint(key, (count,), 0, size)
    cdf = jnp.cumsum(demos.weight.astype(jnp.float32))
    u = jax.random.uniform(key, (count,), jnp.float32) * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), size - 1)


def ppo_loss(
    params: Any, apply_fn: ApplyFn, batch: Batch, cfg: PPOConfig, aux_loss_fn: AuxLossFn | None = None,
    demos: Demonstrations | None = None,
) -> tuple[jax.Array, dict]:
    """PPO's clipped objective on one minibatch; returns (loss, metrics).

    `aux_loss_fn` adds `cfg.aux_coef` x a supervised loss on the same
    observations (e.g. a probe of privileged simulator state,
    `policy.auxiliary_target`): a gradient into the shared trunk that does not
    wait for the advantages to single out which states matter.

    `demos` (a minibatch of expert demonstrations) adds `cfg.demo_coef` x
    `demo_loss` (DAPG/PPO+BC-style fine-tuning, Rajeswaran et al. 2018): the
    demonstrations keep teaching what exploration rarely finds, e.g. a detour the
    clone never makes, while PPO improves everything its rollouts reach.
    """
    log_prob, entropy, value = score_actions(apply_fn, params, batch.obs, batch.action, batch.chunk_index,
                                             batch.sample_info)
    advantage = batch.advantage
    if cfg.normalize_advantage:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)

    log_ratio = log_prob - batch.log_prob
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - cfg.clip_coef, 1.0 + cfg.clip_coef) * advantage)
    policy_loss = -surrogate.mean()

    value_error = jnp.square(value - batch.returns)
    if cfg.vf_clip_coef is not None:
        clipped = batch.value + jnp.clip(value - batch.value, -cfg.vf_clip_coef, cfg.vf_clip_coef)
        value_error = jnp.maximum(value_error, jnp.square(clipped - batch.returns))
    value_loss = 0.5 * value_error.mean()

    entropy_mean = entropy.mean()
    loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy_mean
    extra = {}
    if aux_loss_fn is not None:
        aux_loss = aux_loss_fn(params, batch.obs)
        loss = loss + cfg.aux_coef * aux_loss
        extra["loss/aux"] = aux_loss
    if demos is not None:
        bc_loss = demo_loss(params, apply_fn, demos)
        loss = loss + cfg.demo_coef * bc_loss
        extra["loss/demo"] = bc_loss
    metrics = {
        "loss/total": loss,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "loss/entropy": entropy_mean,
        # the low-variance estimator k3 = (r - 1) - log r (Schulman), as SB3/CleanRL report
        "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_coef).astype(jnp.float32)),
        **extra,
    }
    return loss, metrics


def explained_variance(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """1 - Var[target - predicted] / Var[target] (NaN-free: 0 when Var[target] = 0)."""
    var_target = jnp.var(target)
    return jnp.where(var_target > 0, 1.0 - jnp.var(target - predicted) / jnp.where(var_target > 0, var_target, 1.0), 0.0)


# --------------------------------------------------------------------------- optimiser


def learning_rate_schedule(cfg: PPOConfig, total_gradient_steps: int) -> optax.Schedule:
    """constant | linear (to 0, as SB3/CleanRL anneal) | cosine (to 0), after `lr_warmup_steps` of linear
    warm-up from 0 (the decay then spans the remaining steps).

    Why warm-up: Adam's first steps move every parameter by about the learning
    rate whatever the gradient's size, and from a pretrained policy that is a
    jump PPO's clipping does not stop (its momentum carries on). Measured on
    the VLA example at lr 1e-3: the first iteration's approx KL was 2.0 (3.0
    without the auxiliary loss) and the rollouts' success fell from 71% to 50%
    (18%) within 3 iterations, before PPO climbed back.
    """
    warmup = max(int(cfg.lr_warmup_steps), 0)
    steps = max(int(total_gradient_steps) - warmup, 1)
    if cfg.lr_schedule == "constant":
        decay = optax.constant_schedule(cfg.learning_rate)
    elif cfg.lr_schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, steps)
    elif cfg.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, steps)
    else:
        raise ValueError(f"algorithm.cfg.lr_schedule must be constant, linear or cosine, got {cfg.lr_schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def make_optimizer(
    cfg: PPOConfig, total_gradient_steps: int, trainable_mask: Any = None, lr_scales: Any = None
) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with the schedule.

    `trainable_mask` (a pytree of bools shaped like the params) freezes the
    False leaves: their updates are exactly zero, so frozen weights stay
    bit-identical and carry no Adam moments. `lr_scales` (a pytree of floats
    shaped like the params, e.g. from `policy.lr_scale`) multiplies each leaf's
    step: per-module learning rates that share one clip, one schedule and one
    Adam (its moments do not depend on the rate).
    """
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adam(learning_rate_schedule(cfg, total_gradient_steps), eps=1e-5),
    )
    if trainable_mask is not None:
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    if lr_scales is not None:
        tx = optax.chain(tx, optax.stateless(lambda updates, params=None: jax.tree_util.tree_map(
            lambda update, scale: update * scale, updates, lr_scales)))
    return tx


# --------------------------------------------------------------------------- update


def stop_frozen_gradients(params: Any, trainable_mask: Any) -> Any:
    """`params` with `lax.stop_gradient` on every leaf whose mask is False (identity without a mask)."""
    if trainable_mask is None:
        return params
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable_mask)


class UpdateState(NamedTuple):
    params: Any
    opt_state: Any


def update(
    params: Any,
    opt_state: Any,
    batch: Batch,
    key: jax.Array,
    *,
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    cfg: PPOConfig,
    trainable_mask: Any = None,
    minibatch_sharding: jax.sharding.Sharding | None = None,
    aux_loss_fn: AuxLossFn | None = None,
    demos: Demonstrations | None = None,
    loss_fn: Callable[..., tuple[jax.Array, dict]] | None = None,
) -> tuple[Any, Any, dict]:
    """n_epochs passes of shuffled minibatch SGD over `batch`; pure and jittable.

    `loss_fn(params, apply_fn, minibatch, cfg, aux_loss_fn, demos) -> (loss, metrics)`
    (default `ppo_loss`) is the objective of each minibatch step: GRPO
    (`jaxrl_vla.algo.grpo`) runs its own loss and batch type through this same
    epoch x minibatch machinery. Its metrics need "approx_kl" where target_kl is set.

    `minibatch_sharding` (e.g. `NamedSharding(mesh, P(None, "data"))`) splits
    every minibatch over the devices: each computes the loss and gradients of
    its share and XLA all-reduces the gradient (data parallelism, the same
    maths as one device). Without it the shuffle's global gather leaves the
    minibatches replicated and every device would run the whole update.

    `trainable_mask` (the optimiser's, see `make_optimizer`) puts
    `stop_gradient` on the frozen leaves, so their gradients are never
    computed (a frozen vision encoder costs no convolution backward pass) and
    `grad_norm` measures what clipping sees.

    With `target_kl`, a minibatch whose approx_kl exceeds 1.5 x target_kl (SB3's
    rule) and every update after it in this call are masked out: parameters and
    optimiser state are carried through unchanged. Returned metrics average the
    updates that were applied.

    `demos` (all of them, [D, ...]): every minibatch step also scores a demo
    minibatch of `batch_size` rows drawn with replacement, uniformly or by
    `demos.weight` (`draw_demo_rows`; `ppo_loss`'s demonstration term), each draw
    augmented afresh by `demos.augment` when it has one; without them the keys
    and results are as before.
    """
    num_samples = batch.advantage.shape[0]
    num_minibatches = cfg.num_minibatches(num_samples)
    used = num_minibatches * cfg.batch_size
    objective = ppo_loss if loss_fn is None else loss_fn
    grad_fn = jax.value_and_grad(
        lambda p, *args: objective(stop_frozen_gradients(p, trainable_mask), *args), has_aux=True
    )

    def minibatch_step(carry, minibatch: tuple[Batch, Demonstrations | None]):
        state, stopped = carry
        minibatch, demo_minibatch = minibatch
        (_, metrics), grads = grad_fn(state.params, apply_fn, minibatch, cfg, aux_loss_fn, demo_minibatch)
        if cfg.target_kl is not None:
            stopped = jnp.logical_or(stopped, metrics["approx_kl"] > 1.5 * cfg.target_kl)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = UpdateState(optax.apply_updates(state.params, updates), new_opt_state)
        if cfg.target_kl is not None:  # without it nothing stops: no per-leaf select to pay for
            keep_old = lambda new, old: jnp.where(stopped, old, new)  # noqa: E731
            new_state = jax.tree_util.tree_map(keep_old, new_state, state)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["applied"] = 1.0 - stopped.astype(jnp.float32)
        return (new_state, stopped), metrics

    def gather(tree: Any, rows: jax.Array) -> Any:
        """Rows [M * mb] of every leaf as [M, mb, ...], split over the devices when sharded."""
        picked = jax.tree_util.tree_map(
            lambda x: jnp.take(x, rows, axis=0).reshape((num_minibatches, cfg.batch_size) + x.shape[1:]), tree
        )
        if minibatch_sharding is not None:  # [M, mb, ...]: split the mb axis over the devices
            picked = jax.lax.with_sharding_constraint(picked, minibatch_sharding)
        return picked

    def epoch(carry, epoch_key: jax.Array):
        demo_minibatches = None
        if demos is not None:
            epoch_key, demo_key = jax.random.split(epoch_key)
            if demos.augment is None:
                pairs = Demonstrations(obs=demos.obs, action=demos.action)
                demo_minibatches = gather(pairs, draw_demo_rows(demo_key, demos, used))
            else:  # [M, mb] draws, each augmented with its own key
                demo_key, augment_key = jax.random.split(demo_key)
                drawn = gather((demos.obs, demos.action, demos.augment_labels), draw_demo_rows(demo_key, demos, used))
                keys = jax.random.split(augment_key, (num_minibatches, cfg.batch_size))
                obs, action = jax.vmap(jax.vmap(demos.augment))(keys, *drawn)
                demo_minibatches = Demonstrations(obs=obs, action=action)
                if minibatch_sharding is not None:
                    demo_minibatches = jax.lax.with_sharding_constraint(demo_minibatches, minibatch_sharding)
        order = jax.random.permutation(epoch_key, num_samples)[:used]
        return jax.lax.scan(minibatch_step, carry, (gather(batch, order), demo_minibatches))

    init = (UpdateState(params, opt_state), jnp.asarray(False))
    (final, stopped), metrics = jax.lax.scan(epoch, init, jax.random.split(key, cfg.n_epochs))
    applied = metrics.pop("applied")
    weight = applied / jnp.maximum(applied.sum(), 1.0)
    summary = {k: jnp.sum(v * weight) for k, v in metrics.items()}
    summary["updates_applied"] = applied.sum()
    summary["early_stopped"] = stopped.astype(jnp.float32)
    if isinstance(batch, Batch):  # a critic's fit (GRPO's batches have no value)
        summary["explained_variance"] = explained_variance(batch.value, batch.returns)
    return final.params, final.opt_state, summary
