"""Meta-World (MT1 / MT10 / MT50) as a vision-language host env: camera, proprio and instruction.

Why this env: VLReach is this project's own 2-D task; VLA fine-tuning is judged
on real physics with images and language, and Meta-World is the benchmark that
runs here: it installs from PyPI with its assets (extra `[metaworld]`), runs
offline on a CPU, reports `info["success"]` and ships a scripted expert for
each of its 50 tasks (`metaworld.policies`).

    env.name: "metaworld:MT10"       the 10 MT10 tasks (or "metaworld:MT50")
    env.name: "metaworld:reach-v3"   MT1: one task
    (equivalently env.type: "metaworld" with the same names, "metaworld:" optional)

Episodes (each copy, every reset)
  A task is drawn uniformly from the benchmark's tasks (or `tasks`, a subset),
  then a goal uniformly from the benchmark's 50 goals of that task (Meta-World's
  `train_tasks`, fixed by `benchmark_seed`: the goal set published MT10 / MT50
  numbers use). The instruction says which task ("open the drawer"); the goal
  is seen in the image. An episode terminates on `info["success"]` (success
  True) and is truncated at `max_episode_steps`.

Observation (a flat dict)
  rgb            uint8 [S, S, 3] from camera `camera` (default "corner"), S =
                 `image_size` (default 64), upright (`metaworld_render`); absent
                 with camera None (state-only runs)
  proprio        float32 [4]: end-effector position (m, world frame) and the
                 gripper opening in [0, 1] (Meta-World's first 4 state entries)
  language       int32 [L] ids of the instruction (`tokenizer()`), 0-padded
  language_mask  bool [L]
  state          float32 [39] (only with state_obs=True): Meta-World's own
                 state vector (hand, objects, previous frame, goal), for
                 state-based baselines; the scripted experts read it
  Step infos carry "success" and "task_id" (the index in `task_names` of the
  task whose episode the step belongs to), for per-task success reports.

Actions: Box(-1, 1, (4,)): end-effector velocity xyz and gripper effort, as
Meta-World takes them (clipped to the box before stepping).

Instructions: `INSTRUCTIONS`, one sentence per task; `instructions` replaces
some of them. The tokenizer's vocabulary is the words of all 50 built-in
sentences (then those of the replacements), unless `vocab` gives one (e.g. the
vocabulary a checkpoint was trained with): a word outside it is an error
naming the word, not a silent <unk>.

Memory: each task instance is a MuJoCo model (~26 MB, mostly meshes) with its
own GL context; a copy keeps the last `cache_size` tasks it ran (default 10:
all of MT10) and rebuilds others on demand (~0.15 s each).
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from jaxrl_vla.envs.base import Box
from jaxrl_vla.tokenizer import WordTokenizer

BENCHMARKS = ("MT10", "MT50")
ACTION_DIM = 4
PROPRIO_DIM = 4
STATE_DIM = 39
# Meta-World's hand space (SawyerXYZEnv._HAND_SPACE) and the gripper opening in [0, 1]
PROPRIO_LOW = (-0.525, 0.348, -0.0525, 0.0)
PROPRIO_HIGH = (0.525, 1.025, 0.7, 1.0)

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "put the ball into the basket",
    "bin-picking-v3": "move the puck from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "insert the gripper into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "open the faucet",
    "faucet-close-v3": "close the faucet",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it behind the wall",
    "pick-out-of-hole-v3": "pick the puck out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate into the goal from the side",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate back out of the goal from the side",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the bottle with the stick",
    "stick-pull-v3": "pull the bottle with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}
"""One instruction per Meta-World v3 task (what the task's success check asks for)."""


def instruction_words(sentences: Sequence[str]) -> tuple[str, ...]:
    """The distinct words of `sentences` in order of first appearance (the tokenizer's vocabulary)."""
    split = WordTokenizer((), 1).split
    seen: dict[str, None] = {}
    for sentence in sentences:
        for word in split(sentence):
            seen.setdefault(word, None)
    return tuple(seen)


VOCAB: tuple[str, ...] = instruction_words(list(INSTRUCTIONS.values()))
"""The words of every built-in instruction: word VOCAB[i] has token id i + 2 (0 pad, 1 unk)."""
INSTRUCTION_LENGTH = max(len(WordTokenizer((), 1).split(s)) for s in INSTRUCTIONS.values())


def _import_metaworld() -> Any:
    try:
        import metaworld
    except ImportError as err:
        raise ImportError(f"the metaworld env needs the [metaworld] extra: pip install -e '.[metaworld]' ({err})") from None
    return metaworld


def task_names_of(benchmark: str) -> list[str]:
    """The tasks of "MT10" / "MT50" (Meta-World's order), or [name] for an MT1 task name."""
    env_dict = _import_metaworld().env_dict
    if benchmark == "MT10":
        return list(env_dict.MT10_V3)
    if benchmark == "MT50":
        return list(env_dict.ALL_V3_ENVIRONMENTS)
    if benchmark in env_dict.ALL_V3_ENVIRONMENTS:
        return [benchmark]
    known = list(BENCHMARKS) + list(env_dict.ALL_V3_ENVIRONMENTS)
    close = difflib.get_close_matches(benchmark, known, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"env.name: unknown Meta-World benchmark or task {benchmark!r}{hint} (MT10, MT50 or a task such as reach-v3)")


@functools.lru_cache(maxsize=4)
def benchmark_tasks(benchmark: str, seed: int) -> tuple[dict[str, type], dict[str, tuple]]:
    """(task name -> env class, task name -> its 50 goal `Task`s) of a benchmark, built once per process.

    Building MT10 resets each task 50 times (~4 s); cached so that every copy and
    every spec of one process share it.
    """
    metaworld = _import_metaworld()
    task_names_of(benchmark)  # names the closest ones when unknown
    bench = metaworld.MT1(benchmark, seed=seed) if benchmark not in BENCHMARKS else getattr(metaworld, benchmark)(seed=seed)
    classes = dict(bench.train_classes)
    goals: dict[str, list] = {name: [] for name in classes}
    for task in bench.train_tasks:
        goals[task.env_name].append(task)
    return classes, {name: tuple(g) for name, g in goals.items()}


def encode_instructions(tasks: Sequence[str], sentences: dict[str, str], tokenizer: WordTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T, L] int32, mask [T, L] bool) of each task's sentence; unknown words and overlong ones raise."""
    for task in tasks:
        words = tokenizer.split(sentences[task])
        missing = [w for w in words if w not in tokenizer.word_to_id]
        if missing:
            raise ValueError(
                f"env.instructions: the instruction for {task!r} ({sentences[task]!r}) has the word {missing[0]!r}, "
                f"which is not in the tokenizer's vocabulary ({tokenizer.vocab_size - 2} words)"
            )
        if len(words) > tokenizer.max_length:
            raise ValueError(
                f"env.instruction_length: the instruction for {task!r} ({sentences[task]!r}) has {len(words)} words "
                f"> {tokenizer.max_length}"
            )
    return tokenizer.encode([sentences[t] for t in tasks])


def resolve_tasks(benchmark: str, tasks: Sequence[str] | None) -> list[str]:
    """The tasks episodes are drawn from: the benchmark's, or the subset `tasks` (names checked)."""
    names = task_names_of(benchmark)
    if tasks is None:
        return names
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"env.tasks: expected a non-empty list of task names, got {tasks!r}")
    for task in tasks:
        if task not in names:
            close = difflib.get_close_matches(task, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else f"; {benchmark} has {', '.join(names)}"
            raise ValueError(f"env.tasks: unknown task {task!r} in {benchmark}{hint}")
    return list(dict.fromkeys(tasks))


class _Copy:
    """One auto-resetting env copy: its RNG, its cache of task instances and the current episode."""

    def __init__(self, spec: "MetaWorldEnv", rng: np.random.Generator):
        self.spec = spec
        self.rng = rng
        self.cache: OrderedDict[str, tuple[Any, Any]] = OrderedDict()  # task -> (env, renderer or None)
        self.task = -1  # index into spec.task_names
        self.env: Any = None
        self.renderer: Any = None
        self.raw: np.ndarray | None = None  # Meta-World's last state observation
        self.time = 0

    def instance(self, name: str) -> tuple[Any, Any]:
        """The copy's env (and renderer) for task `name`, built on first use, least recently used evicted."""
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        while len(self.cache) >= self.spec.cache_size:
            _, (env, renderer) = self.cache.popitem(last=False)
            close_instance(env, renderer)
        env = self.spec.classes[name]()
        env.max_path_length = self.spec.max_episode_steps  # Meta-World refuses to step past its own limit
        renderer = None
        if self.spec.camera is not None:
            from jaxrl_vla.envs.metaworld_render import CameraRenderer

            renderer = CameraRenderer(env.model, self.spec.camera, self.spec.image_size, self.spec.image_size)
        self.cache[name] = (env, renderer)
        return env, renderer

    def reset(self) -> None:
        """A new episode: a task and one of its goals drawn uniformly."""
        spec = self.spec
        self.task = int(self.rng.integers(len(spec.task_names)))
        name = spec.task_names[self.task]
        goals = spec.goals[name]
        self.env, self.renderer = self.instance(name)
        self.env.set_task(goals[int(self.rng.integers(len(goals)))])
        self.raw, _ = self.env.reset()
        self.time = 0

    def step(self, action: np.ndarray) -> tuple[float, bool]:
        """One step of the current episode: (reward, success)."""
        self.raw, reward, _, _, info = self.env.step(action)
        self.time += 1
        return float(reward), bool(info["success"])

    def close(self) -> None:
        for env, renderer in self.cache.values():
            close_instance(env, renderer)
        self.cache.clear()


def close_instance(env: Any, renderer: Any) -> None:
    if renderer is not None:
        renderer.close()
    env.close()


class MetaWorldVecEnv:
    """`HostVecEnv` of N Meta-World copies stepped in turn in this thread (see module docstring)."""

    def __init__(self, spec: "MetaWorldEnv", num_envs: int, seed: int):
        self.spec = spec
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        self._copies: list[_Copy] = []

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        seed = self.seed if seed is None else int(seed)
        if not self._copies:
            self._copies = [_Copy(self.spec, np.random.default_rng([seed, i])) for i in range(self.num_envs)]
        for i, copy in enumerate(self._copies):
            copy.rng = np.random.default_rng([seed, i])  # equal seeds, equal episodes (seeded_reset)
            copy.reset()
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        if not self._copies or self._copies[0].env is None:
            raise RuntimeError("MetaWorldVecEnv.step before reset")
        actions = np.clip(np.asarray(actions, np.float64).reshape(self.num_envs, ACTION_DIM), -1.0, 1.0)
        n = self.num_envs
        reward = np.zeros(n, np.float32)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        task_id = np.array([c.task for c in self._copies], np.int32)
        for i, copy in enumerate(self._copies):
            r, success = copy.step(actions[i])
            reward[i] = r * self.spec.reward_scale
            terminated[i] = success
            truncated[i] = copy.time >= self.spec.max_episode_steps
        final_obs = self._observe()
        done = terminated | truncated
        for i in np.flatnonzero(done):
            self._copies[i].reset()
        obs = self._observe(final_obs, done) if done.any() else final_obs
        info = {"final_obs": final_obs, "success": terminated.copy(), "task_id": task_id}
        return obs, reward, terminated, truncated, info

    def _observe(self, previous: dict | None = None, only: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batched observation; with `previous`, a copy of it with the rows `only` re-observed."""
        spec = self.spec
        if previous is None:
            out = {key: np.zeros((self.num_envs,) + tuple(space.shape), space.dtype)
                   for key, space in spec.observation_space.items()}
            rows = range(self.num_envs)
        else:
            out = {key: value.copy() for key, value in previous.items()}
            rows = np.flatnonzero(only)
        for i in rows:
            copy = self._copies[i]
            out["proprio"][i] = copy.raw[:PROPRIO_DIM]
            out["language"][i] = spec.language_ids[copy.task]
            out["language_mask"][i] = spec.language_mask[copy.task]
            if copy.renderer is not None:
                out["rgb"][i] = copy.renderer.render(copy.env.data)
            if spec.state_obs:
                out["state"][i] = copy.raw
        return out

    def expert_actions(self) -> np.ndarray:
        """float32 [N, 4]: Meta-World's scripted expert's action for each copy's current state."""
        with warnings.catch_warnings():  # Meta-World's note on its own experts' gains, raised every call
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            actions = [self.spec.expert(c.task).get_action(c.raw) for c in self._copies]
        return np.stack(actions).astype(np.float32)

    def task_names(self) -> list[str]:
        """The task of each copy's current episode."""
        return [self.spec.task_names[c.task] for c in self._copies]

    def close(self) -> None:
        for copy in self._copies:
            copy.close()
        self._copies = []


class MetaWorldEnv:
    """`HostEnvSpec` for a Meta-World benchmark ("MT10", "MT50") or one task (MT1, e.g. "reach-v3")."""

    is_host_env = True
    reports_success = True
    seeded_reset = True  # reset(seed=s) reproduces each copy's tasks, goals and states

    def __init__(
        self,
        benchmark: str = "MT10",
        tasks: Sequence[str] | None = None,
        camera: str | None = "corner",
        image_size: int = 64,
        max_episode_steps: int = 200,
        instruction_length: int = INSTRUCTION_LENGTH,
        instructions: dict[str, str] | None = None,
        vocab: Sequence[str] | None = None,
        reward_scale: float = 1.0,
        state_obs: bool = False,
        benchmark_seed: int = 0,
        cache_size: int = 10,
    ):
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"env.image_size: expected an integer >= 8, got {image_size!r}")
        if not isinstance(max_episode_steps, int) or not 0 < max_episode_steps <= 500:
            raise ValueError(f"env.max_episode_steps: expected an integer in [1, 500] (Meta-World's horizon), got {max_episode_steps!r}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"env.cache_size: expected a positive integer, got {cache_size!r}")
        self.benchmark = benchmark
        self._config = dict(tasks=None if tasks is None else list(tasks), camera=camera, image_size=image_size,
                            max_episode_steps=max_episode_steps, instruction_length=instruction_length,
                            instructions=instructions, vocab=None if vocab is None else list(vocab),
                            reward_scale=reward_scale, state_obs=state_obs, benchmark_seed=benchmark_seed,
                            cache_size=cache_size)
        self.task_names = resolve_tasks(benchmark, tasks)
        instructions = dict(instructions or {})
        for task in instructions:
            if task not in INSTRUCTIONS:
                close = difflib.get_close_matches(task, list(INSTRUCTIONS), n=3, cutoff=0.5)
                raise ValueError(f"env.instructions: unknown task {task!r}; closest: {', '.join(close) or 'none'}")
        self.sentences = {**INSTRUCTIONS, **instructions}
        words = tuple(vocab) if vocab is not None else VOCAB + tuple(
            w for w in instruction_words(list(instructions.values())) if w not in VOCAB)
        self._tokenizer = WordTokenizer(words, instruction_length)
        self.language_ids, self.language_mask = encode_instructions(self.task_names, self.sentences, self._tokenizer)
        self.camera = camera
        self.image_size = image_size
        self._max_episode_steps = max_episode_steps
        self.reward_scale = float(reward_scale)
        self.state_obs = bool(state_obs)
        self.cache_size = cache_size
        classes, goals = benchmark_tasks(benchmark, int(benchmark_seed))
        self.classes = {name: classes[name] for name in self.task_names}
        self.goals = {name: goals[name] for name in self.task_names}
        if camera is not None:
            self._check_camera(camera)
        self._experts: dict[int, Any] = {}

    def _check_camera(self, camera: str) -> None:
        """An unknown camera fails here, listing the model's cameras, not in a collector thread later."""
        from jaxrl_vla.envs.metaworld_render import camera_id

        env = self.classes[self.task_names[0]]()
        try:
            camera_id(env.model, camera)
        finally:
            env.close()

    @property
    def observation_space(self) -> dict[str, Box]:
        length = self._tokenizer.max_length
        space = {
            "proprio": Box(PROPRIO_LOW, PROPRIO_HIGH, (PROPRIO_DIM,), np.float32),
            "language": Box(0, self._tokenizer.vocab_size - 1, (length,), np.int32),
            "language_mask": Box(0, 1, (length,), np.bool_),
        }
        if self.camera is not None:
            space["rgb"] = Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        if self.state_obs:
            space["state"] = Box(-np.inf, np.inf, (STATE_DIM,), np.float32)
        return space

    @property
    def action_space(self) -> Box:
        return Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    @property
    def max_episode_steps(self) -> int:
        return self._max_episode_steps

    def config(self) -> dict[str, Any]:
        """Every constructor argument but the benchmark (what demo files record to rebuild the env)."""
        return dict(self._config)

    def tokenizer(self) -> WordTokenizer:
        """The WordTokenizer whose ids the env emits."""
        return self._tokenizer

    def instruction(self, task: str) -> str:
        """The instruction sentence of task `task`."""
        return self.sentences[task]

    def expert(self, task_id: int) -> Any:
        """Meta-World's scripted policy for task `task_names[task_id]` (it reads the 39-d state)."""
        if task_id not in self._experts:
            from metaworld.policies import ENV_POLICY_MAP

            self._experts[task_id] = ENV_POLICY_MAP[self.task_names[task_id]]()
        return self._experts[task_id]

    def make(self, num_envs: int, seed: int) -> MetaWorldVecEnv:
        return MetaWorldVecEnv(self, num_envs, seed)

    def __repr__(self) -> str:
        return f"MetaWorldEnv({self.benchmark!r}, tasks={len(self.task_names)}, camera={self.camera!r})"


def make_metaworld_env(name: str, **kwargs: Any) -> MetaWorldEnv:
    """The spec of `env.name` "metaworld:<MT10 | MT50 | task>" (the prefix optional); kwargs go to MetaWorldEnv."""
    return MetaWorldEnv(name.removeprefix("metaworld:"), **kwargs)
