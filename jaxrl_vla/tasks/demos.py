"""Expert demonstrations for behaviour cloning, collected entirely in JAX.

    python -m jaxrl_vla.tasks.demos --out demos/vl_reach.npz --episodes 2000 --seed 0

Each episode runs the env's privileged scripted expert (`env.expert_action`)
from its own reset; all episodes of a batch step together under `vmap` and the
time loop is a `lax.scan`, so collection is one jitted call per batch. Episode
e uses keys folded from (seed, e) alone, so the file is identical whatever the
batch size, and identical across runs with the same seed on the same backend.

DART-style noise (Laskey et al. 2017), `--noise-std` (default 0.1): the env
executes expert + N(0, noise_std^2) (clipped to the action box), while the
recorded label `action` stays the expert's clean action at the state actually
visited. The demonstrations then cover the small deviations a cloned policy
makes and show how to recover from them, which plain expert trajectories
never visit. 0 gives pure expert rollouts.

File format (np.savez_compressed; every step array has the same first axis N,
steps stored episode by episode in time order):

  observation keys, exactly as the env emits them (what the VLA consumes):
    rgb             uint8   [N, H, W, 3]
    depth           float32 [N, H, W, 1]   only if the env was made with use_depth
    proprio         float32 [N, P]
    language        int32   [N, L]         ids of the `vocab` below
    language_mask   bool    [N, L]
  action            float32 [N, A]  the expert's label: the behaviour-cloning target
  executed_action   float32 [N, A]  what the env executed (label + noise, clipped)
  reward            float32 [N]
  terminated        bool    [N]
  truncated         bool    [N]
  success           bool    [N]     info["success"] of the step
  episode_id        int32   [N]     0 .. E-1
  weight            float32 [N]     optional (--detour-weight): the step's sampling weight in
                                    PPO's demonstration loss (`algorithm.demo_path`)
  mirror_action     float32 [N, A]  for envs with `demo_augment_labels` (VLReach): the expert's
                                    action in the step's scene mirrored left-right, the label
                                    of the mirror augmentation (`algorithm.demo_augment`)
  step              int32   [N]     index of the step within its episode
  episode_success   bool    [E]     the episode ended with success
  episode_length    int32   [E]
  episode_return    float32 [E]
  env_id            str             registry id, e.g. "VLReach-v0"
  env_kwargs        str             JSON of the env's constructor arguments (all of them,
                                    defaults included, when the env has a config() method)
  vocab             str     [V]     token strings by id (0 "<pad>", 1 "<unk>", ...)
  seed              int64
  noise_std         float64
  format_version    int64           FORMAT_VERSION

`load_demos` reads it back (metadata decoded); `observation_keys(demos)` lists
the observation entries present; `as_demonstrations` turns a loaded file into the
(observation, action) pairs of PPO's demonstration loss (`algorithm.demo_path`).
"""

from __future__ import annotations

import argparse
import functools
import json
import zipfile
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
OBS_KEYS = ("rgb", "depth", "proprio", "language", "language_mask")
STEP_KEYS = ("action", "executed_action", "reward", "terminated", "truncated", "success")

# act(state [E], obs [E], keys [E]) -> (executed [E, H, ...], label [E, H, ...])
ActFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array]]


def _where(mask: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Per-episode select between pytrees whose leaves lead with the episode axis."""
    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, on_true, on_false)


def run_episodes(env: Any, act: ActFn, keys: jax.Array, chunk: int = 1) -> dict[str, Any]:
    """One episode per key, stepped together; everything recorded per step.

    Unlike VecEnv there is no auto-reset: an episode that ends is frozen (its
    state and observation stop changing) and its later steps are marked
    invalid. `act` returns chunks of `chunk` actions that are executed in
    order. Pure and traceable (jit it with `env`, `act`, `chunk` static).

    Returns arrays with axes [E, T, ...] (T = chunks x chunk >= the time
    limit): "obs" and "state" (the observation and env state each action
    was taken from), "action"
    (label), "executed_action", "reward", "terminated", "truncated",
    "success", "valid"; and "final_obs" [E, ...] and "final_state" [E, ...],
    the observation and env state that ended each episode, and "initial_state"
    [E, ...], each episode's state after its reset.
    """
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    reset_keys, act_keys = split[:, 0], split[:, 1]
    state, obs = jax.vmap(env.reset)(reset_keys)
    initial_state = state
    num_chunks = -(-int(env.max_episode_steps) // chunk)
    done = jnp.zeros((keys.shape[0],), bool)

    def run_chunk(carry, c):
        state, obs, done = carry
        chunk_keys = jax.vmap(lambda k: jax.random.fold_in(k, c))(act_keys)
        executed, label = act(state, obs, chunk_keys)

        def env_step(inner, j):
            state, obs, done = inner
            new_state, ts = jax.vmap(env.step)(state, executed[:, j])
            success = ts.info.get("success", jnp.zeros_like(ts.terminated))
            record = dict(
                obs=obs, state=state, action=label[:, j], executed_action=executed[:, j], reward=ts.reward,
                terminated=ts.terminated, truncated=ts.truncated, success=success, valid=~done,
            )
            ended = ts.terminated | ts.truncated
            state = _where(done, state, new_state)
            obs = _where(done, obs, ts.obs)
            return (state, obs, done | ended), record

        return jax.lax.scan(env_step, (state, obs, done), jnp.arange(chunk))

    (state, obs, done), records = jax.lax.scan(run_chunk, (state, obs, done), jnp.arange(num_chunks))
    # [chunks, H, E, ...] -> [E, T, ...]
    records = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x.reshape((-1,) + x.shape[2:]), 0, 1), records)
    records["final_obs"] = obs
    records["final_state"] = state
    records["initial_state"] = initial_state
    return records


def expert_act_fn(env: Any, noise_std: float = 0.0) -> ActFn:
    """The env's scripted expert as an ActFn: label = expert, executed = label + DART noise."""
    space = env.action_space

    def act(state: Any, obs: Any, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        label = jax.vmap(env.expert_action)(state)
        noise = jax.vmap(lambda k: jax.random.normal(k, label.shape[1:], label.dtype))(keys)
        executed = jnp.clip(label + noise_std * noise, space.low, space.high)
        return executed[:, None], label[:, None]

    return act


@functools.lru_cache(maxsize=8)
def expert_collector(env: Any, noise_std: float = 0.0) -> Callable[[jax.Array], dict[str, Any]]:
    """`keys [E] -> run_episodes records` of the expert, jitted and cached per (env, noise).

    Envs with equal configs compare equal (VLReach defines __eq__), so the
    demo script and `jaxrl_vla.eval --expert` share one compiled program.
    """
    return jax.jit(lambda keys: run_episodes(env, expert_act_fn(env, noise_std), keys))


def episode_keys(seed: int, start: int, count: int) -> jax.Array:
    """Keys of episodes start .. start+count-1: each depends only on (seed, index)."""
    root = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(start, start + count))


def flatten_valid(records: dict[str, Any], first_episode: int, extra_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """[E, T, ...] records (host arrays) -> the valid steps, episode-major, plus ids and per-episode stats
    (with the per-step `extra_keys` of `records` beside STEP_KEYS)."""
    valid = np.asarray(records["valid"])
    episodes, steps = np.nonzero(valid)  # row-major: episode by episode, time in order
    out = {key: np.asarray(value)[episodes, steps] for key, value in records["obs"].items()}
    for key in STEP_KEYS + tuple(extra_keys):
        out[key] = np.asarray(records[key])[episodes, steps]
    out["episode_id"] = (episodes + first_episode).astype(np.int32)
    out["step"] = steps.astype(np.int32)
    reward = np.where(valid, np.asarray(records["reward"]), 0.0)
    out["episode_return"] = reward.sum(axis=1).astype(np.float32)
    out["episode_length"] = valid.sum(axis=1).astype(np.int32)
    out["episode_success"] = (np.asarray(records["success"]) & valid).any(axis=1)
    return out


def collect_demos(
    env: Any, num_episodes: int, seed: int = 0, noise_std: float = 0.1, batch_size: int = 128,
    detour_weight: float = 1.0,
) -> dict[str, np.ndarray]:
    """Run the expert for `num_episodes` and return the file's step and episode arrays.

    Batches have a fixed size (the last is padded and trimmed) so the collector
    compiles once. `detour_weight` != 1 adds the "weight" column: the steps of
    episodes whose expert route bends around another object at reset
    (`env.route_detours`) weigh `detour_weight`, the others 1. Why: those are the
    scenes a cloned policy gets wrong most (it cuts past the object), and a few
    percent of the data, so PPO's demonstration loss draws them more often. An env
    with `demo_augment_labels(state)` adds its columns (VLReach: "mirror_action"),
    the labels its `augment_demonstration` reads.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    if not detour_weight > 0:
        raise ValueError(f"detour_weight must be > 0, got {detour_weight}")
    if detour_weight != 1.0 and not hasattr(env, "route_detours"):
        raise ValueError(f"detour_weight: {type(env).__name__} has no route_detours(state) to tell the detour scenes")
    if not hasattr(env, "expert_action"):
        raise ValueError(f"{type(env).__name__} has no expert_action(state); demonstrations need a scripted expert")
    batch = min(batch_size, num_episodes)
    collect = expert_collector(env, float(noise_std))
    route_detours = jax.jit(jax.vmap(env.route_detours)) if detour_weight != 1.0 else None
    augment_labels = jax.jit(jax.vmap(jax.vmap(env.demo_augment_labels))) if hasattr(env, "demo_augment_labels") else None
    parts = []
    for start in range(0, num_episodes, batch):
        records = collect(episode_keys(seed, start, batch))
        labels = {} if augment_labels is None else augment_labels(records["state"])  # [E, T, ...] each
        records = jax.device_get({**records, **labels})
        keep = min(batch, num_episodes - start)
        records = jax.tree_util.tree_map(lambda x: x[:keep], records)
        part = flatten_valid(records, start, tuple(labels))
        if detour_weight != 1.0:
            detours = np.asarray(route_detours(records["initial_state"]))
            part["weight"] = np.where(detours[part["episode_id"] - start], detour_weight, 1.0).astype(np.float32)
        parts.append(part)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def save_demos(path: str | Path, arrays: dict[str, np.ndarray], env_id: str, env_kwargs: dict, vocab: list[str] | None,
               seed: int, noise_std: float) -> Path:
    """Write the .npz (see module docstring); creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        env_id=np.asarray(env_id),
        env_kwargs=np.asarray(json.dumps(env_kwargs, sort_keys=True)),
        vocab=np.asarray(vocab if vocab is not None else [], dtype=str),
        seed=np.asarray(seed, np.int64),
        noise_std=np.asarray(noise_std, np.float64),
        format_version=np.asarray(FORMAT_VERSION, np.int64),
    )
    with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other suffixes
        np.savez_compressed(f, **arrays, **meta)
    return path


def _read_demo_archive(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive, or ValueError saying what the file is not.

    numpy's own errors would call random bytes "pickled (object) data" and suggest
    `allow_pickle`, which a demo file never needs and an untrusted one must never get.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a demo file (not an .npz archive; make one with python -m jaxrl_vla.tasks.demos)")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {}
            for key in data.files:
                try:
                    out[key] = data[key]
                except ValueError:
                    raise ValueError(f"{path}: not a demo file (entry {key!r} holds Python objects, "
                                     "which demo files never contain)") from None
            return out
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable demo file ({err})") from None


def load_demos(path: str | Path) -> dict[str, Any]:
    """Arrays of a demo file, with env_kwargs as a dict, vocab as a list and scalars as Python values."""
    out = _read_demo_archive(Path(path))
    if "format_version" not in out:
        raise ValueError(f"{path}: not a demo file (an .npz archive without the 'format_version' entry that "
                         "jaxrl_vla.tasks.demos writes)")
    version = int(out["format_version"])
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: demo format_version {version}, this reader expects {FORMAT_VERSION}")
    out["env_id"] = str(out["env_id"])
    out["env_kwargs"] = json.loads(str(out["env_kwargs"]))
    out["vocab"] = [str(w) for w in out["vocab"]]
    out["seed"] = int(out["seed"])
    out["noise_std"] = float(out["noise_std"])
    out["format_version"] = version
    return out


def observation_keys(demos: dict[str, Any]) -> list[str]:
    """The observation entries present in a loaded demo file (depth only when recorded)."""
    return [key for key in OBS_KEYS if key in demos]


def chunk_labels(action: np.ndarray, episode_id: np.ndarray, chunk: int) -> np.ndarray:
    """Labels for a policy that emits `chunk` actions per observation: row i gets the expert's
    actions of steps i .. i+chunk-1 of its episode, the episode's last action repeated past
    its end ([N, A] -> [N, chunk, A]); rows must be stored episode by episode in time order."""
    rows = np.arange(len(action))
    last_row = np.searchsorted(episode_id, episode_id, side="right") - 1  # the final row of each row's episode
    index = np.minimum(rows[:, None] + np.arange(chunk)[None, :], last_row[:, None])
    return action[index]


def clip_to_action_box(action: np.ndarray, space: Any) -> np.ndarray:
    """Expert labels clipped to the env's action box (unchanged for a space without bounds).

    Why: the env executes an action clipped to its box, so what the expert did is the clipped
    label; Meta-World's scripted experts emit up to +-12 in a [-1, 1] box, and pulling the
    policy's mean towards the raw values (as the demonstration loss did) drags a clone made on
    the clipped labels (bridge.pretrain_bc_metaworld) away from what it learned."""
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None:
        return action
    return np.clip(action, np.asarray(low, np.float32), np.asarray(high, np.float32)).astype(action.dtype)


def as_demonstrations(demos: dict[str, Any], env: Any, chunk: int = 1) -> Any:
    """A loaded demo file -> `jaxrl_vla.types.Demonstrations` for PPO's demonstration loss on `env`.

    The observations are the env's (every key of its observation space except the
    training-only `privileged_*` labels, which demonstrations need not carry) with
    the env's per-step shapes and dtypes, and the words behind the token ids must be
    the env tokenizer's: a demo file made for another variant of the task would
    otherwise teach the policy silently wrong pairs. Raises ValueError naming the
    key. `chunk` > 1 gives [N, chunk, A] labels (`chunk_labels`). Labels outside the
    env's action box are clipped to it (`clip_to_action_box`).
    """
    from jaxrl_vla.envs.base import PRIVILEGED_PREFIX
    from jaxrl_vla.types import Demonstrations

    obs = {}
    for key, space in env.observation_space.items():
        if key.startswith(PRIVILEGED_PREFIX):
            continue
        if key not in demos:
            raise ValueError(f"observation key {key!r} of the env is missing from the demonstrations "
                             f"(they have {', '.join(observation_keys(demos))})")
        value = demos[key]
        if tuple(value.shape[1:]) != tuple(space.shape) or value.dtype != np.dtype(space.dtype):
            raise ValueError(f"observation {key!r}: demonstrations have {value.dtype}{list(value.shape[1:])} per step, "
                             f"the env {np.dtype(space.dtype)}{list(space.shape)}")
        obs[key] = value
    action = np.asarray(demos["action"], np.float32)
    action_shape = tuple(env.action_space.shape)
    if tuple(action.shape[1:]) != action_shape:
        raise ValueError(f"action: demonstrations have {list(action.shape[1:])} per step, the env {list(action_shape)}")
    action = clip_to_action_box(action, env.action_space)
    vocab = env.tokenizer().vocab if hasattr(env, "tokenizer") else None
    if vocab is not None and demos.get("vocab") and list(demos["vocab"]) != list(vocab):
        raise ValueError("vocab: the demonstrations' token ids name other words than the env's tokenizer")
    if chunk > 1:
        action = chunk_labels(action, np.asarray(demos["episode_id"]), chunk)
    weight = demos.get("weight")
    if weight is not None:
        weight = np.asarray(weight, np.float32)
        if weight.shape != (len(action),) or not np.all(np.isfinite(weight)) or weight.min() < 0 or weight.sum() <= 0:
            raise ValueError(f"weight: expected {len(action)} finite weights >= 0 with a positive sum, "
                             f"got shape {list(weight.shape)}")
    labels = {key: np.asarray(demos[key], np.float32) for key in getattr(env, "demo_augment_label_keys", ())
              if key in demos}
    return Demonstrations(obs=obs, action=action, weight=weight, augment_labels=labels or None)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_vla.tasks.demos", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--episodes", type=int, default=1000, help="number of episodes (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every reset and noise draw (default 0)")
    parser.add_argument("--env", default="VLReach-v0", help="registered env id with an expert_action (default VLReach-v0)")
    parser.add_argument("--env-kwargs", default="{}", help='JSON of env constructor arguments, e.g. \'{"num_objects": 3}\'')
    parser.add_argument("--noise-std", type=float, default=0.1, help="DART noise on executed actions (default 0.1; 0: pure expert)")
    parser.add_argument("--batch-size", type=int, default=128, help="episodes per jitted batch (memory only; the file does not depend on it)")
    parser.add_argument("--detour-weight", type=float, default=1.0,
                        help="sampling weight of the steps of episodes whose route bends around an object at reset, "
                             "for PPO's demonstration loss (default 1: no weight column)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.episodes < 1 or args.batch_size < 1 or args.noise_std < 0:
        print("error: --episodes and --batch-size must be >= 1 and --noise-std >= 0", file=sys.stderr)
        return 2
    try:
        env_kwargs = json.loads(args.env_kwargs)
        if not isinstance(env_kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        print(f"error: --env-kwargs must be a JSON object: {err}", file=sys.stderr)
        return 2
    from jaxrl_vla.build import build_env
    from jaxrl_vla.config import ConfigError

    try:
        env = build_env({"name": args.env, **env_kwargs})
        arrays = collect_demos(env, args.episodes, args.seed, args.noise_std, args.batch_size, args.detour_weight)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vocab = env.tokenizer().vocab if hasattr(env, "tokenizer") else None
    full_kwargs = env.config() if hasattr(env, "config") else env_kwargs  # every argument, defaults included
    path = save_demos(args.out, arrays, args.env, full_kwargs, vocab, args.seed, args.noise_std)
    n = len(arrays["episode_success"])
    print(
        f"wrote {path}: {n} episodes, {len(arrays['step'])} steps, expert success "
        f"{arrays['episode_success'].mean():.1%}, mean length {arrays['episode_length'].mean():.1f}, "
        f"{path.stat().st_size / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
