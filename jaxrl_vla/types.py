"""Pytree records that flow between collection, buffers and the learner."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import struct

PyTree = Any


@struct.dataclass
class Transition:
    """One env step of N envs (leaves [N, ...]), or a stack of them ([T, N, ...]).

    obs           the observation the executed action was computed from. For action
                  chunks this is the observation at the chunk's start: the policy
                  factorises over chunk steps, so (obs, chunk_index) is what the
                  PPO loss re-scores.
    action        the executed action (one step of a chunk).
    log_prob      log pi_old(action | obs) at acting time (PPO's old log-prob).
    value         V(obs) at acting time (for a chunk, the value of this chunk step).
    reward        reward of this step.
    terminated    true end of the episode: no bootstrap.
    truncated     cut by a time limit: bootstrap from `final_value`.
    final_value   V(final observation) where truncated, else 0.
    chunk_index   index of `action` within its chunk (0 without chunks).
    policy_version  version of the parameters that acted (async staleness).
    sample_info   what re-scoring the action needs beyond the action itself, for policies whose
                  log-prob is not a density of the executed action: a flow-matching head's
                  denoising chain (`FlowSample`, the same for every step of its chunk). None
                  (no leaves, no cost) for Gaussian and categorical policies.
    """

    obs: PyTree
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_value: jax.Array
    chunk_index: jax.Array
    policy_version: jax.Array
    sample_info: PyTree = None


@struct.dataclass
class Batch:
    """Flattened training samples [B, ...] for the PPO update."""

    obs: PyTree
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    advantage: jax.Array
    returns: jax.Array
    chunk_index: jax.Array
    sample_info: PyTree = None  # Transition.sample_info, flattened alike


@struct.dataclass
class Demonstrations:
    """Expert (observation, action) pairs for PPO's demonstration loss (`algorithm.cfg.demo_coef`).

    obs      observations [D, ...] as the policy reads them (for a frozen vision
             encoder, its precomputed features instead of the pixels)
    action   the expert's labels shaped like the policy's action mode for one
             observation: [D, A], or [D, H, A] for a policy that emits chunks of H
    weight   [D] relative sampling weights (None: uniform), e.g. more draws from the
             demonstrations of the hard scenes a clone gets wrong
    augment_labels  {name: [D, ...]} further per-row labels that `augment` reads (VLReach:
             "mirror_action", the expert's action in the mirrored scene), or None
    augment  (key, obs, action, augment_labels) -> (obs, action) for ONE demonstration
             (static, not a leaf): a label-preserving augmentation applied afresh to
             every draw (`VLReach.augment_demonstration`; `algorithm.demo_augment`), or None
    """

    obs: PyTree
    action: jax.Array
    weight: jax.Array | None = None
    augment_labels: PyTree = None
    augment: Callable[[jax.Array, PyTree, jax.Array, PyTree], tuple[PyTree, jax.Array]] | None = struct.field(
        pytree_node=False, default=None)

    @property
    def size(self) -> int:
        return int(self.action.shape[0])
