"""Behaviour-clone the torch GPTVLAModel on VLReach-v0 expert demonstrations.

    python -m bridge.pretrain_bc --out checkpoints/vl_reach_bc.safetensors

This makes the "pretrained VLA" of the fine-tuning demo the way a VLA team
makes one: supervised learning in torch on demonstrations, saved as a plain
state_dict. The JAX side only ever sees the file (through
`bridge.load_vla_model`), exactly as it would see a checkpoint from outside.

What it does, in order:
1. Demonstrations: reads `--demos` (default: `vl_reach_demos.npz` beside
   `--out`), generating it first with `jaxrl_vla.tasks.demos` when missing.
   The default lives under `checkpoints/` because that folder is git-ignored.
2. Trains a TINY `GPTVLAModel` (`MODEL_CONFIG`: a 2-stage ResNet of widths
   32/64 whose 4x4 feature map becomes 16 image tokens, and a 4-layer,
   64-wide GPT-2 over the env's 18-word vocabulary that reads the instruction
   before the image), small enough that PPO fine-tuning in JAX runs at ~500
   env steps/s on 2 CPU cores, with the
   ResNet's BatchNorm layers in training mode (`train_batchnorm_statistics`).
   Loss: MSE of the action
   means against the expert's labels, plus `--value-coef` x MSE of the value
   head against the demos' discounted Monte-Carlo returns, so that PPO starts
   with a critic that already tracks progress (a random critic makes the first
   advantages noise, and its gradients flow into the shared trunk).
3. Sets the action log-std to `--log-std` (default -1.0, std 0.37): BC fits
   only the means, and PPO needs exploration noise that is large enough to
   find better actions yet small enough that the first sampled rollouts still
   behave like the pretrained policy (std 1 on a [-1, 1] action box would
   swamp it).
4. Saves the state_dict as .safetensors (atomically: temp file + rename) and a
   JSON sidecar (`<out>.json`) with the model_config, the training settings and
   the evaluation below.
5. Evaluates the checkpoint the way fine-tuning will see it: converted with
   `bridge.load_vla_model`, deterministic actions, in the JAX env, jitted and
   vmapped (`evaluate_policy`, reused by benchmarks/finetune_curve.py).

Determinism: torch.manual_seed, torch.use_deterministic_algorithms(True), a
fixed number of intra-op threads (`--threads`, default 2) and a data order drawn
from a seeded generator. The demos are themselves a function of their seed, so
two runs with the same arguments write bit-identical tensors and metadata on the same
machine and thread count (the file bytes may differ: safetensors writes its
metadata map in hash order).

The target is a useful but imperfect policy (evaluation success roughly
30-70%); `--episodes` and `--epochs` set where it lands (the defaults were
tuned for that, see the sidecar's `eval`). Since the policy reads the effector
position only (ENV_KWARGS' proprio_velocity=False, 2026-12-06; before, the last
velocity command was an input zeroed during BC): held-out action MSE 0.42, 0.27
and 62.1% success (256 episodes; 58.6% on 1,024: 20.9% in the 27.5% of scenes
that start with an object in the way, 72.9% elsewhere) with the default 2
epochs; 0.42, 0.19, 0.16 and 81.2% (83.5%: 42.6%, 99.1%) with 3, past the range.
The numbers below are from the velocity-input model. With MODEL_CONFIG's 4-layer
instruction-first trunk grounding arrives late and at once: on the shortest-
path expert's demos, held-out action MSE 0.34, 0.23, 0.12 after epochs 1-3 of
a 3-epoch run (63.3% success), and 0.24 -> 0.07 -> 0.05 over epochs 2-4 of a
4-epoch run (79.3%), so the default was 3 epochs. On the demos of ENV_KWARGS'
expert (detour_bias 0.1, detour_margin 0.08; 99,393 steps, 17% more), with
value targets at GAMMA 0.9: 0.42, 0.37, 0.28 and 58.6% success (256 episodes;
54.4% on 1,024: 18.8% in the 27.5% of scenes that start with an object in the
way, 67.9% elsewhere). That is the file as `collect_demos` makes it since 2026-12-06 (with
the weight column, DEMO_DETOUR_WEIGHT); the earlier file, identical but for the
rewards of 0.4% of its steps (VLReach's path reward has changed since), gave
0.42, 0.36, 0.26 and 65.2% (61.3% on 1,024, 23% of them in the 27.5% of scenes
that start with an object in the way, 76% elsewhere): the value targets move the
clone through the shared trunk. The numbers below were measured with GAMMA 0.5 (the
value loss shares the trunk, so the discount moves the clone a little): 0.43,
0.37, 0.24 and 67.2% (65.0% on 1,024, 22% in those scenes). With detour_bias
alone (margin 0.02): 0.41, 0.29, 0.21, 71.9% (75.1%; 24% in the 21% of
scenes that need a detour, against 11% cloned from the shortest-path expert,
whose side there is a coin toss). `--detour-weight 3` (the detour episodes'
rows 3 times per epoch, 1.6x the steps): 0.26, 0.15, 0.13 and 89.8% (91.7% on
1,024, 71% in those scenes), past the range; with `--epochs 1`, 29.3%;
`--detour-weight 5 --epochs 1`, 52.7% (24% in those scenes). At GAMMA 0.9,
`--detour-weight 3 --epochs 2`: 80.1% (47% in those scenes), and with
`--lr 6e-4` too, 52.0% (18%): the detours come after the grounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV_ID = "VLReach-v0"
# The env the checkpoint is made for (VLReach's defaults, spelled out so that a change of default
# there cannot silently change what this script trains on). The example configs use the same.
# progress_distance="path": the shaped reward measures progress along the route that keeps clear of
# the other objects, so it rewards the detour the expert takes instead of punishing it (with the
# straight-line distance and gamma 0.99, a 256-sample PPO minibatch's gradient pointed ~5x less well
# at the expert's direction: benchmarks/probes/finetune_signal.py, README "The fine-tuning example").
# detour_bias=0.1: the expert passes an object in its way on the object's right side unless the left
# is shorter by more than 0.1 (a side chosen by the layout jitter is a coin toss that a cloned policy
# averages into the straight line; see VLReach's docstring), and the path reward measures that route.
# detour_margin=0.08: the route keeps 0.08 outside the touch radius instead of 0.02, so a clone's
# imprecise steps do not clip the object it goes around (the expert with N(0, 0.3) action noise: 96%
# success in those scenes against 63%).
ENV_KWARGS: dict[str, Any] = {"num_objects": 4, "image_size": 64, "action_dim": 2, "max_episode_steps": 50,
                              "wrong_object_penalty": 0.0, "progress_distance": "path", "detour_bias": 0.1,
                              "detour_margin": 0.08, "proprio_velocity": False}
MODEL_CLASS = "bridge.vla_models.GPTVLAModel"
# A tiny GPTVLAModel for 64x64 images. The ResNet (stem 64 -> 16 px, then stages at 8 and 4 px) keeps
# its 4x4 feature map as 16 spatial image tokens, one per cell of VLReach's 4x4 layout grid, so the
# instruction tokens can attend to the cell that holds the named object (a single pooled token has to
# squeeze every object's position and identity into one vector first: with it, BC reached 43% in
# twice the time per epoch). The 32-channel stem has room for colour x shape detectors.
MODEL_CONFIG: dict[str, Any] = {
    "vision_encoder": "tiny",
    "vision_embedding_size": 32,
    "downsample_in_first_stage": True,
    "vision_hidden_sizes": [32, 64],
    "vision_depths": [1, 1],
    "image_tokens": "spatial",  # 16 tokens from the 4x4 feature map
    "n_positions": 32,  # 16 image + 1 proprio + 8 instruction tokens fit
    "language_model": "tiny",  # GPT-2 with n_embd 64, n_head 4 (n_layer below)
    "vocab_size": 18,  # len(VOCAB) + <pad> + <unk>: checked against the env's tokenizer
    "max_instruction_length": 8,
    "action_dim": 2,
    "action_chunk": 1,
    "proprio_dim": 2,  # the effector position (proprio_velocity=False, below)
    "image_size": 64,
    "value_hidden_dim": 64,
    "init_log_std": -1.0,
    # Depth and order decide how well the trunk grounds the instruction (benchmarks/probes/trunk_bc.py, BENCHMARKS.md
    # #trunk_bc: on the same frozen image features, 4 layers instruction-first cloned to 78% and held-out action
    # MSE 0.080, 2 layers image-first to 66% / 0.152). Instruction first, each image token can attend to the words
    # and flag whether it holds the named object; the readout (last token) then attends to the flagged one.
    "n_layer": 4,
    "token_order": "instruction_first",
}
OBS_KEYS = ("rgb", "proprio", "language", "language_mask")
# proprio_velocity=False (ENV_KWARGS): the policy sees the effector's position, not its last velocity
# command. That command is almost the expert's next label (its paths are straight lines), so a policy
# cloned with it as an input learns to repeat its previous action ("copycat"): lower training loss,
# worse in closed loop. Earlier checkpoints zeroed that input during BC only, and PPO's demonstration
# loss (algorithm.demo_path) then taught the trainable input to copy it again (one epoch of BC with
# it: closed-loop success 76.7% against 83.2%, docs/finetune_findings.md); without the input there is
# nothing to copy in BC, in PPO or in its demonstrations.
# Discount of the value targets: the example configs' algorithm.cfg.gamma (a test checks they agree),
# so the critic PPO starts from is calibrated to the returns it will be trained on. 0.9, not shorter:
# at 0.5 a wrong touch 4 steps ahead costs the current action 0.06 of return, and PPO fine-tuning
# unlearns the cloned detours around objects in the way (docs/finetune_findings.md).
GAMMA = 0.9
# The demo file's "weight" column (`jaxrl_vla.tasks.demos.collect_demos(detour_weight=)`): the steps of
# episodes whose route bends around an object at reset weigh this much when the example's PPO draws
# its demonstration minibatches (`algorithm.demo_path`). BC here ignores the column (--detour-weight
# is its own oversampling). 3: the K of the detour-weighted BC runs that learnt the detours.
DEMO_DETOUR_WEIGHT = 3.0


# ---------------------------------------------------------------------------- environment & demos


def make_env(env_kwargs: dict[str, Any] | None = None) -> Any:
    """The VLReach env the checkpoint is trained and evaluated on."""
    from jaxrl_vla.build import build_env

    return build_env({"name": ENV_ID, **(ENV_KWARGS if env_kwargs is None else env_kwargs)})


def check_model_fits_env(model_config: dict[str, Any], env: Any) -> None:
    """Fail early (not deep inside torch) when the model and the env disagree on a shape."""
    space = env.observation_space
    expected = {
        "vocab_size": env.tokenizer().vocab_size,
        "max_instruction_length": space["language"].shape[0],
        "proprio_dim": space["proprio"].shape[0],
        "image_size": space["rgb"].shape[0],
        "action_dim": env.action_space.shape[0],
    }
    wrong = {k: (model_config.get(k), v) for k, v in expected.items() if model_config.get(k) != v}
    if wrong:
        raise ValueError(f"model_config does not fit {ENV_ID}: (model, env) = {wrong}")


def ensure_demos(path: Path, episodes: int, seed: int, noise_std: float, env: Any, env_kwargs: dict) -> dict[str, Any]:
    """Load the demo file, generating it first when missing.

    An existing file must have been made with the same episodes, seed, noise,
    env and detour weight (DEMO_DETOUR_WEIGHT, the largest entry of its weight
    column), or the checkpoint would silently depend on whatever was on disk.
    """
    from jaxrl_vla.tasks import demos as demo_lib

    if not path.is_file():
        t0 = time.perf_counter()
        arrays = demo_lib.collect_demos(env, episodes, seed, noise_std, detour_weight=DEMO_DETOUR_WEIGHT)
        demo_lib.save_demos(path, arrays, ENV_ID, env_kwargs, env.tokenizer().vocab, seed, noise_std)
        print(f"generated {path}: {episodes} expert episodes, {len(arrays['step'])} steps "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    data = demo_lib.load_demos(path)
    detour_weight = float(data["weight"].max()) if "weight" in data else 1.0
    made_with = (len(data["episode_success"]), data["seed"], data["noise_std"], data["env_id"], detour_weight)
    wanted = (episodes, seed, noise_std, ENV_ID, DEMO_DETOUR_WEIGHT)
    same_env = data["env_id"] == ENV_ID and make_env(data["env_kwargs"]) == env  # equal envs: equal configs
    if made_with != wanted or not same_env or "mirror_action" not in data:
        raise ValueError(
            f"{path} was made with (episodes, seed, noise_std, env, detour weight) = {made_with} and env_kwargs "
            f"{data['env_kwargs']}{'' if 'mirror_action' in data else ', without a mirror_action column'}, "
            f"not {wanted} and {env_kwargs}; "
            f"delete it or pass another --demos"
        )
    return data


def discounted_returns(reward: np.ndarray, episode_id: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo return of every step, within its episode (steps stored episode by episode)."""
    out = np.zeros_like(reward, dtype=np.float64)
    running = 0.0
    for i in range(len(reward) - 1, -1, -1):
        if i == len(reward) - 1 or episode_id[i + 1] != episode_id[i]:
            running = 0.0
        running = float(reward[i]) + gamma * running
        out[i] = running
    return out.astype(np.float32)


def episode_scenes(data: dict[str, Any], env: Any) -> Any:
    """Each demo episode's reset state (a VLReachState with a leading episode axis).

    Objects never move after reset, so an episode's scene is its reset: the
    demos' episode e was reset with the first half of the split of
    `episode_keys(seed, e, 1)` (see `jaxrl_vla.tasks.demos.run_episodes`). That
    coupling is checked, not assumed: the re-rendered first frames must equal
    the recorded ones exactly.
    """
    import jax

    from jaxrl_vla.tasks.demos import episode_keys

    episodes = int(data["episode_id"].max()) + 1
    keys = episode_keys(int(data["seed"]), 0, episodes)
    reset_keys = jax.vmap(lambda k: jax.random.split(k, 2)[0])(keys)
    states, obs = jax.device_get(jax.jit(jax.vmap(env.reset))(reset_keys))
    first = np.flatnonzero(data["step"] == 0)
    if not np.array_equal(np.asarray(obs["rgb"])[data["episode_id"][first]], data["rgb"][first]):
        raise ValueError("the demos' first frames do not match re-run resets: cannot derive privileged labels")
    return states


def scene_labels(data: dict[str, Any], states: Any) -> tuple[np.ndarray, np.ndarray]:
    """Privileged per-row labels for the auxiliary losses: (scene table [N, C, S, 3], target xy [N, 2]).

    The scene table holds, for every colour x shape pair, (present, x, y) of
    that object (x, y mapped to [-1, 1] like the proprio); `states` are the
    episodes' scenes (`episode_scenes`).
    """
    from jaxrl_vla.envs.vl_reach import COLOURS, SHAPES

    episodes = len(states.target)
    table = np.zeros((episodes, len(COLOURS), len(SHAPES), 3), np.float32)
    rows = np.arange(episodes)[:, None]
    xy = 2.0 * np.asarray(states.object_pos) - 1.0  # [E, k, 2]
    table[rows, states.object_colour, states.object_shape, 0] = 1.0
    table[rows, states.object_colour, states.object_shape, 1:] = xy
    target_xy = xy[np.arange(episodes), states.target]
    return table[data["episode_id"]], target_xy[data["episode_id"]].astype(np.float32)


# ---------------------------------------------------------------------------- torch training


def set_determinism(seed: int, threads: int) -> None:
    """Everything that makes two runs bit-identical on one machine."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def augment(batch: dict[str, np.ndarray], labels: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict, dict]:
    """Label-preserving VLReach augmentations, drawn per sample: a colour permutation and an x-mirror.

    Why: a few thousand scenes are easy to memorise (scene -> action) and the
    memorised policy ignores the instruction. Permuting the colour palette in
    the image AND the colour words of the instruction together leaves the
    expert's action unchanged but makes it unpredictable without matching the
    instruction to the image. Mirroring left-right (the image's columns, x of
    the proprio and the scene labels; the action label becomes the expert's
    in the mirrored scene, the demo file's mirror_action column) is exact for this scene:
    every shape is symmetric about the vertical axis and pixel centres map
    onto pixel centres.
    """
    from jaxrl_vla.envs.vl_reach import COLOUR_RGB, COLOURS, word_id

    rgb, language = batch["rgb"].copy(), batch["language"].copy()
    size = len(rgb)
    perm = rng.permuted(np.tile(np.arange(len(COLOURS)), (size, 1)), axis=1)  # [B, C]: colour c -> perm[b, c]
    palette = COLOUR_RGB.astype(np.uint8)
    is_colour = np.all(batch["rgb"][:, :, :, None, :] == palette, axis=-1)  # [B, H, W, C]
    colour_ids = np.asarray([word_id(w) for w in COLOURS], np.int32)
    for c in range(len(COLOURS)):
        pixels = is_colour[..., c]
        rgb[pixels] = palette[np.broadcast_to(perm[:, c, None, None], pixels.shape)[pixels]]
        words = batch["language"] == colour_ids[c]
        language[words] = np.broadcast_to(colour_ids[perm[:, c]][:, None], words.shape)[words]
    labels = {key: value.copy() for key, value in labels.items()}
    scene = np.empty_like(labels["scene"])
    scene[np.arange(size)[:, None], perm] = labels["scene"]  # row perm[b, c] <- colour c
    labels["scene"] = scene
    mirror = rng.random(size) < 0.5
    rgb[mirror] = rgb[mirror, :, ::-1]
    proprio = batch["proprio"].copy()
    proprio[mirror, 0] *= -1.0  # x in [-1, 1]
    labels["action"][mirror] = labels["mirror_action"][mirror]  # the expert's own label there (not -x)
    labels["target_xy"][mirror, 0] *= -1.0
    labels["scene"][mirror, :, :, 1] *= -1.0
    return {**batch, "rgb": rgb, "language": language, "proprio": proprio}, labels


def numpy_batch(data: dict[str, Any], index: np.ndarray) -> dict[str, np.ndarray]:
    """The demo rows `index` as observation arrays."""
    return {key: np.ascontiguousarray(data[key][index]) for key in OBS_KEYS}


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """numpy arrays -> torch tensors (shared memory)."""
    import torch

    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}


def split_episodes(episode_id: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): the last `val_fraction` of the episodes are held out.

    Whole episodes, so validation states are not near-copies of training ones;
    the held-out loss is what tells memorising (which closed-loop success
    punishes) from learning.
    """
    episodes = int(episode_id.max()) + 1
    held_out = int(round(episodes * val_fraction))
    cut = episodes - held_out
    rows = np.arange(len(episode_id))
    return rows[episode_id < cut], rows[episode_id >= cut]


def detour_episodes(states: Any, env: Any) -> np.ndarray:
    """bool [E]: the episodes whose scene makes the expert's route bend around another object at reset."""
    import jax

    return np.asarray(jax.jit(jax.vmap(env.route_detours))(states))


def oversampled_rows(rows: np.ndarray, episode_id: np.ndarray, detour: np.ndarray, weight: int) -> np.ndarray:
    """`rows`, with the rows of detour episodes `weight` times (every other row once): one epoch's sample.

    Why: a detour is a minority of the demos (~27% of scenes, and only the
    first steps of each bend), and a clone that reads "something is in the way"
    unsure regresses to the straight line: it turns a median 10 degrees where
    the expert turns 18 (README, "What bounds it now").
    """
    if weight < 1:
        raise ValueError(f"--detour-weight must be >= 1, got {weight}")
    extra = rows[detour[episode_id[rows]]]
    return np.concatenate([rows] + [extra] * (weight - 1))


class AuxiliaryHeads:
    """Training-only linear probes that give BC a direct signal for grounding (never saved).

    Grounding an instruction needs two things learned together: image
    features that say where each colour x shape object is, and a trunk that
    picks the instructed one. Neither helps the action loss until the other
    exists, so plain BC sits on "go to some object" (~1/k success). These
    heads break the deadlock with privileged labels that the demos imply:
      scene   pooled image features -> (present, x, y) of every colour x shape pair
      target  the readout features  -> (x, y) of the instructed object
    A forward hook on the vision encoder captures its pooled output, so the
    model's own forward pass is reused.
    """

    def __init__(self, model: Any, num_colours: int, num_shapes: int):
        import torch

        cfg = model.config
        self.shape = (num_colours, num_shapes, 3)
        self.scene = torch.nn.Linear(cfg.resnet_config().output_dim, num_colours * num_shapes * 3)
        self.target = torch.nn.Linear(cfg.gpt2_config().n_embd, 2)
        self.pooled = None
        model.vision.register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        self.pooled = output.pooler_output.flatten(1)

    def parameters(self) -> list[Any]:
        return list(self.scene.parameters()) + list(self.target.parameters())

    def loss(self, features: Any, labels: dict[str, Any]) -> Any:
        """BCE on presence + masked MSE on positions, plus MSE on the target's position."""
        import torch

        scene = self.scene(self.pooled).view(-1, *self.shape)
        present = labels["scene"][..., 0]
        presence_loss = torch.nn.functional.binary_cross_entropy_with_logits(scene[..., 0], present)
        position_error = ((scene[..., 1:] - labels["scene"][..., 1:]) ** 2).sum(-1)
        position_loss = (position_error * present).sum() / present.sum().clamp(min=1.0)
        target_loss = torch.mean((self.target(features) - labels["target_xy"]) ** 2)
        return presence_loss + position_loss + target_loss


def train_batchnorm_statistics(model: Any) -> None:
    """Put the vision encoder's BatchNorm layers in training mode (batch statistics, running averages updated).

    `GPTVLAModel.train()` keeps them on their running statistics, which is
    right for RL fine-tuning (small, correlated batches would corrupt them)
    but not for supervised pretraining from scratch: frozen at their initial
    statistics (mean 0, var 1) they normalise nothing, and the ResNet trains
    like an unnormalised network. Measured on VLReach (spatial tiny model, 4
    epochs): held-out action MSE 0.15 vs 0.22 and closed-loop success 62% vs
    48%. Pretraining ends with `model.eval()`, so the checkpoint carries the
    learned running statistics, which both twins then use.
    """
    import torch

    for module in model.vision.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()


def bc_losses(model: Any, batch: dict[str, np.ndarray], labels: dict[str, np.ndarray],
              aux: AuxiliaryHeads | None = None) -> dict[str, Any]:
    """Action-mean MSE, value MSE and (with `aux`) the auxiliary loss on one batch."""
    import torch

    labels = to_torch(labels)
    features = model.features(to_torch(batch))
    mean, value = model._heads(features)
    losses = {
        "action": torch.mean((mean - labels["action"]) ** 2),
        "value": torch.mean((value[:, 0] - labels["returns"]) ** 2),
    }
    if aux is not None:
        losses["aux"] = aux.loss(features, labels)
    return losses


def row_labels(labels: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The label rows `index` (copies, safe to augment in place)."""
    return {key: value[index] for key, value in labels.items()}


def validation_mse(model: Any, data: dict[str, Any], labels: dict[str, np.ndarray], rows: np.ndarray,
                   batch: int = 512) -> float | None:
    """Action-mean MSE on held-out rows (None when none are held out)."""
    import torch

    if len(rows) == 0:
        return None
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            index = rows[start:start + batch]
            total += bc_losses(model, numpy_batch(data, index), row_labels(labels, index))["action"].item() * len(index)
    return total / len(rows)


def train_bc(model: Any, data: dict[str, Any], labels: dict[str, np.ndarray], args: argparse.Namespace,
             detour: np.ndarray | None = None) -> list[dict]:
    """Adam on action-mean MSE (+ value and auxiliary losses) over shuffled minibatches; per-epoch losses.

    The learning rate decays linearly to 10% over the run so the last epochs
    settle instead of bouncing between minibatches. With `detour` (per episode,
    see `run`), detour episodes' rows come `args.detour_weight` times per epoch.
    """
    import torch

    train_rows, val_rows = split_episodes(data["episode_id"], args.val_fraction)
    if detour is not None:
        train_rows = oversampled_rows(train_rows, data["episode_id"], detour, args.detour_weight)
    n = len(train_rows)
    steps_per_epoch = max(1, n // args.batch_size)
    total = steps_per_epoch * args.epochs
    aux = None
    if args.aux_coef > 0:  # VLReach's privileged scene labels (the Meta-World path turns it off)
        from jaxrl_vla.envs.vl_reach import COLOURS, SHAPES

        aux = AuxiliaryHeads(model, len(COLOURS), len(SHAPES))
    parameters = list(model.parameters()) + (aux.parameters() if aux else [])
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * min(s, total) / total)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    weights = {"action": 1.0, "value": args.value_coef, "aux": args.aux_coef}
    history = []
    for epoch in range(args.epochs):
        model.train()
        train_batchnorm_statistics(model)
        order = train_rows[torch.randperm(n, generator=generator).numpy()]
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            index = np.sort(order[step * args.batch_size:(step + 1) * args.batch_size])
            batch, batch_labels = numpy_batch(data, index), row_labels(labels, index)
            if args.augment:
                batch, batch_labels = augment(batch, batch_labels, rng)
            losses = bc_losses(model, batch, batch_labels, aux)
            optimizer.zero_grad(set_to_none=True)
            sum(weights[k] * v for k, v in losses.items()).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item() / steps_per_epoch
        model.eval()
        record = {"epoch": epoch + 1, **{f"{k}_loss": v for k, v in sums.items()},
                  "val_action_mse": validation_mse(model, data, labels, val_rows)}
        history.append(record)
        held_out = "-" if record["val_action_mse"] is None else f"{record['val_action_mse']:.4f}"
        print(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in sums.items())
              + f" (held-out action {held_out})", flush=True)
    return history


def policy_rollouts(module: Any, variables: dict, env: Any, episodes: int, seed: int, log_std: float,
                    batch: int = 256) -> dict[str, np.ndarray]:
    """Episodes of the cloned policy acting as PPO will act (Gaussian samples at `log_std`), in the JAX env.

    Returns the valid steps' observations, rewards and episode ids (the demo
    file's layout, via `jaxrl_vla.tasks.demos`), one jitted call per batch.
    """
    import jax

    from jaxrl_vla.tasks.demos import episode_keys, flatten_valid, run_episodes
    from jaxrl_vla.training import compiler

    std = float(np.exp(log_std))

    def act(state: Any, obs: Any, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = module.apply(variables, obs, method="forward")
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        action = mean + std * noise
        return action[:, None], action[:, None]

    collect = compiler.jit(lambda keys: run_episodes(env, act, keys))
    parts = []
    for start in range(0, episodes, batch):
        records = jax.device_get(collect(episode_keys(seed, start, batch)))
        keep = min(batch, episodes - start)
        parts.append(flatten_valid(jax.tree_util.tree_map(lambda x: x[:keep], records), start))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def calibrate_critic(model: Any, rollouts: dict[str, np.ndarray], epochs: int, seed: int,
                     batch: int = 256, gamma: float = GAMMA) -> dict[str, float]:
    """Fit the value head alone to the cloned policy's own Monte-Carlo returns; (MSE before, after).

    Why: the value head learnt from the expert's returns during BC, but PPO's
    critic must value the cloned policy, which fails where the expert does not.
    A critic that is off at the first PPO update gives noisy advantages AND
    sends large value-loss gradients into the trunk the actor shares, which
    undoes the pretraining before the actor can improve. The trunk is frozen
    here (features are computed once), so the actor is unchanged.
    """
    import torch

    returns = torch.from_numpy(discounted_returns(rollouts["reward"], rollouts["episode_id"], gamma))
    with torch.no_grad():
        features = torch.cat([model.features(to_torch({k: rollouts[k][i:i + 512] for k in OBS_KEYS}))
                              for i in range(0, len(returns), 512)])
    head = list(model.value_fc.parameters()) + list(model.value_out.parameters())
    optimizer = torch.optim.Adam(head, lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 2)

    def mse() -> float:
        with torch.no_grad():
            return torch.mean((model._heads(features)[1][:, 0] - returns) ** 2).item()

    before = mse()
    for _ in range(epochs):
        order = torch.randperm(len(returns), generator=generator)
        for i in range(0, len(order), batch):
            index = order[i:i + batch]
            loss = torch.mean((model._heads(features[index])[1][:, 0] - returns[index]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"states": int(len(returns)), "value_mse_before": before, "value_mse_after": mse(),
            "return_var": float(returns.var()), "policy_success": float(np.mean(rollouts["episode_success"]))}


def scale_token_embeddings(model: Any, std: float, seed: int) -> None:
    """Re-initialise the word embeddings at N(0, std^2) before training.

    GPT-2 initialises them at std 0.02, made for a language model whose every
    token is a word. Here they share the sequence with the image and proprio
    tokens, whose projections come out ~100x larger, so the instruction is a
    whisper in the readout's residual stream and BC learns to ignore it
    (swapping the colour word moved the cloned actions by ~1e-3). Starting
    the words at the other tokens' scale lets the instruction steer the policy.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        weight = model.language.wte.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def set_log_std(model: Any, log_std: float) -> None:
    """Reset the Gaussian head's log-std (BC does not train it) to PPO's starting exploration."""
    import torch

    with torch.no_grad():
        model.log_std.fill_(float(log_std))


def save_safetensors(state_dict: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Write beside `path`, then rename: a reader (or a crash) never sees half a checkpoint."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """JSON written the same atomic way as the checkpoint it describes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where the JSON description of a checkpoint lives: `<checkpoint>.json`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".json")


# ---------------------------------------------------------------------------- evaluation (JAX)


def evaluate_policy(module: Any, variables: dict, env: Any, num_episodes: int = 256, seed: int = 1) -> dict[str, float]:
    """Deterministic evaluation of a Flax VLA model in the JAX env: success rate, return, length.

    One episode per env copy, all vmapped and the time loop scanned, in one
    jitted call. It is the Trainer's own evaluation function
    (`make_evaluate_fn`), so the number is comparable with the `eval/*`
    metrics of a fine-tuning run that uses the same episodes (the Trainer
    evaluates with PRNGKey(trainer.seed + 1): seed=1 for trainer.seed 0).
    """
    import jax

    from jaxrl_vla.envs.wrappers import VecEnv
    from jaxrl_vla.models.vla_policy import VLAPolicy, wrap_variables
    from jaxrl_vla.training import compiler
    from jaxrl_vla.training.rollout import make_evaluate_fn

    policy = VLAPolicy(module)
    evaluate = compiler.jit(make_evaluate_fn(policy.apply, VecEnv(env, num_episodes), int(env.max_episode_steps)))
    stats = jax.device_get(evaluate(wrap_variables(variables), None, jax.random.PRNGKey(seed)))
    count = max(float(stats.count), 1.0)
    return {
        "episodes": int(stats.count),
        "success_rate": float(stats.success_sum) / count,
        "return_mean": float(stats.return_sum) / count,
        "length_mean": float(stats.length_sum) / count,
    }


def evaluate_checkpoint(path: str | Path, model_config: dict[str, Any], env: Any, num_episodes: int = 256,
                        seed: int = 1) -> dict[str, float]:
    """`evaluate_policy` of a torch checkpoint, converted exactly as fine-tuning converts it."""
    from bridge.vla_loading import load_vla_model

    module, variables = load_vla_model(path, MODEL_CLASS, model_config)
    return evaluate_policy(module, variables, env, num_episodes, seed)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bridge.pretrain_bc", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .safetensors (a JSON sidecar <out>.json is written too)")
    parser.add_argument("--env", choices=("vl_reach", "metaworld"), default="vl_reach",
                        help="VLReach-v0 (default) or Meta-World MT10 (bridge.pretrain_bc_metaworld; its own defaults)")
    parser.add_argument("--demos", help="demo .npz (default: vl_reach_demos.npz beside --out); made when missing")
    parser.add_argument("--episodes", type=int, default=10000, help="expert episodes in the demos (default 10000)")
    parser.add_argument("--noise-std", type=float, default=0.1, help="DART noise of the demos (default 0.1)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the demos (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size (default 128)")
    parser.add_argument("--detour-weight", type=int, default=1,
                        help="times per epoch the rows of episodes whose route bends around an object come (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, decayed linearly to 10%% (default 1e-3)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the demo episodes held out to report a validation MSE (default 0.1)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train without the colour-permutation and mirror augmentation")
    parser.add_argument("--embedding-std", type=float, default=1.0,
                        help="std of the word embeddings at init (default 1.0; 0 keeps GPT-2's 0.02)")
    parser.add_argument("--aux-coef", type=float, default=1.0,
                        help="weight of the training-only grounding losses (AuxiliaryHeads; default 1.0; 0: off)")
    parser.add_argument("--value-coef", type=float, default=0.5, help="weight of the value-head loss (default 0.5; 0: skip)")
    parser.add_argument("--log-std", type=float, default=MODEL_CONFIG["init_log_std"],
                        help="action log-std written into the checkpoint for PPO (default -1.0)")
    parser.add_argument("--model-config", default="{}",
                        help="JSON merged into MODEL_CONFIG (e.g. a smaller model for tests); the sidecar records the result")
    parser.add_argument("--critic-episodes", type=int, default=512,
                        help="episodes of the cloned policy whose returns calibrate the value head (default 512; 0: skip)")
    parser.add_argument("--critic-epochs", type=int, default=20, help="value-head epochs on them (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demos, the init and the data order (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2; part of determinism)")
    parser.add_argument("--eval-episodes", type=int, default=256,
                        help="deterministic evaluation episodes in the JAX env after saving (default 256; 0: skip)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The message for an argument out of range, or None."""
    for name in ("episodes", "epochs", "batch_size", "threads", "detour_weight"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.lr <= 0 or args.noise_std < 0 or args.value_coef < 0 or args.eval_episodes < 0 or args.critic_episodes < 0:
        return "--lr must be > 0 and --noise-std, --value-coef, --eval-episodes, --critic-episodes >= 0"
    if not 0 <= args.val_fraction < 1:
        return "--val-fraction must be in [0, 1)"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Demos -> BC -> checkpoint + sidecar -> evaluation; returns the sidecar's content."""
    import torch

    from bridge.vla_models import GPTVLAModel

    out = Path(args.out)
    demos_path = Path(args.demos) if args.demos else out.with_name("vl_reach_demos.npz")
    model_config = {**MODEL_CONFIG, **json.loads(args.model_config), "init_log_std": float(args.log_std)}
    env = make_env()
    check_model_fits_env(model_config, env)
    data = ensure_demos(demos_path, args.episodes, args.seed, args.noise_std, env, ENV_KWARGS)
    scenes = episode_scenes(data, env)
    scene, target_xy = scene_labels(data, scenes)
    labels = {"action": data["action"], "returns": discounted_returns(data["reward"], data["episode_id"], GAMMA),
              "scene": scene, "target_xy": target_xy}
    if args.augment:
        labels["mirror_action"] = data["mirror_action"]  # the expert's action in the mirrored scene (collect_demos)

    set_determinism(args.seed, args.threads)
    model = GPTVLAModel(model_config)
    if args.embedding_std > 0:
        scale_token_embeddings(model, args.embedding_std, args.seed)
    t0 = time.perf_counter()
    detour = detour_episodes(scenes, env) if args.detour_weight > 1 else None
    history = train_bc(model, data, labels, args, detour)
    train_seconds = time.perf_counter() - t0
    set_log_std(model, args.log_std)
    metadata = {"format": "pt", "model_class": MODEL_CLASS, "model_config": json.dumps(model_config, sort_keys=True)}
    save_safetensors(model.state_dict(), out, metadata)
    critic = None
    if args.critic_episodes:
        from bridge.vla_loading import load_vla_model

        module, variables = load_vla_model(out, MODEL_CLASS, model_config)
        rollouts = policy_rollouts(module, variables, env, args.critic_episodes, args.seed + 1, args.log_std)
        critic = calibrate_critic(model, rollouts, args.critic_epochs, args.seed)
        save_safetensors(model.state_dict(), out, metadata)

    info: dict[str, Any] = {
        "model_class": MODEL_CLASS,
        "model_config": model_config,
        "env": {"name": ENV_ID, **ENV_KWARGS},
        "demos": {"path": str(demos_path), "episodes": args.episodes, "steps": int(len(data["action"])),
                  "noise_std": args.noise_std, "seed": args.seed,
                  "expert_success": float(np.mean(data["episode_success"]))},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "value_coef": args.value_coef,
                     "log_std": args.log_std, "seed": args.seed, "threads": args.threads,
                     "val_fraction": args.val_fraction, "aux_coef": args.aux_coef, "augment": args.augment,
                     "embedding_std": args.embedding_std, "detour_weight": args.detour_weight,
                     "final_epoch": history[-1],
                     "torch": torch.__version__},
        "critic_calibration": critic,
        "timing": {"train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1)},
        "make_checkpoint": f"python -m bridge.pretrain_bc --out {out}",
    }
    if args.eval_episodes:
        info["eval"] = {**evaluate_checkpoint(out, model_config, env, args.eval_episodes), "seed": 1,
                        "deterministic": True}
    write_json_atomic(sidecar_path(out), info)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env == "metaworld":
        from bridge.pretrain_bc_metaworld import apply_defaults, run as run_env
        apply_defaults(args, argv)
    else:
        run_env = run
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if not isinstance(json.loads(args.model_config), dict):
            raise ValueError("--model-config must be a JSON object")
        info = run_env(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = f"wrote {args.out} ({info['training']['epochs']} epochs in {info['timing']['train_seconds']} s)"
    if "eval" in info and "per_task" in info["eval"]:
        e = info["eval"]
        summary += (f"; deterministic eval, {e['episodes_per_task']} episodes per task: mean success "
                    f"{e['success_rate']:.1%} (" + ", ".join(f"{k} {v:.0%}" for k, v in e["per_task"].items()) + ")")
    elif "eval" in info:
        e = info["eval"]
        summary += (f"; deterministic eval over {e['episodes']} episodes: success {e['success_rate']:.1%}, "
                    f"return {e['return_mean']:.3f}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
