"""PPO throughput and time to solve: jaxrl_vla against stable-baselines3 and rejax.

    python benchmarks/ppo_throughput.py            # full run (6-12 minutes on 2 cores, with the load)
    python benchmarks/ppo_throughput.py --quick    # one round, one seed (about 2-3 minutes)
    python benchmarks/ppo_throughput.py --peer-python /tmp/peers/bin/python --no-write

One protocol for every implementation (PROTOCOL below): 8 envs x 128 steps,
4 epochs x 4 minibatches of 256, MLP 64x64 tanh, Adam lr 2.5e-3 decayed
linearly to 0 over 102,400 steps, gamma 0.99, GAE 0.95, clip 0.2, entropy 0.01.

  throughput    steady-state env steps per second of training (collection +
                update), compilation excluded and reported apart. Runs in
                rounds, each running every implementation once, so that the
                load of a shared machine hits all alike; medians over rounds,
                ratios are medians of per-round ratios.
  time to solve wall time from building the trainer (imports excluded, reported
                apart) until the evaluation return first reaches 475 on
                CartPole: setup, compilation and evaluation included. Evaluation
                for all: every 4 iterations (4,096 steps), the first episode of
                10 fresh envs with deterministic actions. Each seed runs in a
                fresh process with no persistent compilation cache; the full run
                adds a rerun of seed 0 with a warm JAX compilation cache.
  Pendulum      jaxrl_vla only, with configs/pendulum.json: steps and wall time
                until the evaluation return reaches -250 (within 1M steps).

Implementations: `jaxrl_vla` (this repository's Trainer as users run it, in
this process for throughput; per-iteration dispatch, metrics fetch and logging
included), `jaxrl_vla[fused]` (diagnostic: the same jitted iteration looped
inside one jit, as rejax does; the gap to `jaxrl_vla` is per-iteration host
cost), `sb3` (stable-baselines3 PPO on gymnasium's CartPole-v1, 1 torch
thread) and `rejax` (rejax 0.1.3 PPO on gymnax 0.0.9's CartPole-v1, the fully
jitted PureJaxRL design). Peers run as subprocesses of the peer venv's python
(--peer-python; benchmarks/README.md sets it up) and are skipped with a note
when missing. Their code is in benchmarks/peers/.

Prints one JSON line per result ({"bench": "ppo_throughput", "impl": ...}) and
one per ratio on stdout (progress notes on stderr), then writes the
`ppo_throughput` section of BENCHMARKS.md (--no-write to skip).
"""

from __future__ import annotations

import time

_T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))

BENCH = "ppo_throughput"
DEFAULT_PEER_PYTHON = "/tmp/peers/bin/python"
PEERS = {"sb3": HERE / "peers" / "sb3_ppo.py", "rejax": HERE / "peers" / "rejax_ppo.py"}

# The shared protocol (CartPole). Peers receive it as JSON; ours maps it onto the config.
PROTOCOL: dict[str, Any] = {
    "env_id": "CartPole-v1",
    "num_envs": 8,
    "num_steps": 128,
    "n_epochs": 4,
    "num_minibatches": 4,
    "learning_rate": 2.5e-3,
    "lr_schedule": "linear",
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_coef": 0.2,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "hidden_sizes": [64, 64],
    "activation": "tanh",
    "seed": 0,
    "total_timesteps": 102_400,  # configs/cartpole.json: 100 iterations; fixes the LR decay
    "eval_every": 4,  # iterations
    "eval_episodes": 10,
    "threshold": 475.0,
}
PENDULUM_CONFIG = REPO / "configs" / "pendulum.json"
PENDULUM_THRESHOLD = -250.0
PENDULUM_MAX_STEPS = 1_000_000


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------- ours


def protocol_overrides(p: dict, output_dir: str) -> list[str]:
    """--set overrides that make configs/cartpole.json exactly the protocol."""
    n_samples = p["num_envs"] * p["num_steps"]
    return [
        f"env.name={p['env_id']}",
        f"trainer.num_envs={p['num_envs']}",
        f"trainer.buffer_size={p['num_steps']}",
        f"trainer.seed={p['seed']}",
        f"trainer.eval_freq={p['eval_every']}",
        f"trainer.num_eval_episodes={p['eval_episodes']}",
        "trainer.save_freq=0",
        "trainer.progress=false",
        "trainer.normalize_observations=false",
        f"trainer.output_dir={output_dir}",
        f"algorithm.cfg.learning_rate={p['learning_rate']}",
        f"algorithm.cfg.lr_schedule={p['lr_schedule']}",
        f"algorithm.cfg.gamma={p['gamma']}",
        f"algorithm.cfg.gae_lambda={p['gae_lambda']}",
        f"algorithm.cfg.n_epochs={p['n_epochs']}",
        f"algorithm.cfg.batch_size={n_samples // p['num_minibatches']}",
        f"algorithm.cfg.clip_coef={p['clip_coef']}",
        f"algorithm.cfg.ent_coef={p['ent_coef']}",
        f"algorithm.cfg.vf_coef={p['vf_coef']}",
        f"algorithm.cfg.max_grad_norm={p['max_grad_norm']}",
        "algorithm.cfg.vf_clip_coef=null",
        "algorithm.cfg.target_kl=null",
        "algorithm.cfg.normalize_advantage=true",
        f"policy.hidden_sizes={json.dumps(p['hidden_sizes'])}",
        f"policy.activation={p['activation']}",
    ]


def build_ours(config_path: Path | None, overrides: list[str]):
    from jaxrl_vla.build import build_trainer
    from jaxrl_vla.config import load_config

    cfg = load_config(config_path, overrides)
    return build_trainer(cfg), cfg


def first_call_size(records: list[dict]) -> int:
    """Iterations run by the first jitted call: its records come together, sharing its wall time
    (in auto mode the first call runs one iteration; later ones are sized to the iteration time)."""
    first = records[0]["iteration_time"]
    return next((i for i, r in enumerate(records) if r["iteration_time"] != first), len(records))


def ours_throughput(p: dict, iterations: int) -> dict:
    """Our Trainer as a user runs it, in this process, without evaluation."""
    out_dir = tempfile.mkdtemp(prefix="bench-ppo-")
    try:
        overrides = protocol_overrides(p, out_dir) + ["trainer.eval_freq=0"]
        stamps: list[tuple[float, dict]] = []
        t0 = time.perf_counter()
        trainer, _ = build_ours(REPO / "configs" / "cartpole.json", overrides)
        trainer.log_fn = lambda record: stamps.append((time.perf_counter(), record))
        n_samples = p["num_envs"] * p["num_steps"]
        t_train = time.perf_counter()
        trainer.train(total_timesteps=iterations * n_samples)
        t_end = time.perf_counter()
        # a jitted call runs k iterations; their records are logged together, each with
        # the call's wall time divided by k as iteration_time
        k = getattr(trainer, "call_iterations", 1)
        times = [r["iteration_time"] for _, r in stamps]
        first = first_call_size([r for _, r in stamps])
        warm = k * -(-3 // k)  # whole calls (at least 3 iterations) left out of the steady window
        steady = times[warm:]
        wall_per_iteration = (stamps[-1][0] - stamps[warm - 1][0]) / len(steady)
        call_per_iteration = sum(steady) / len(steady)  # the jitted call and the metrics fetch
        return {
            "sps": n_samples / wall_per_iteration,
            "sps_iteration": n_samples / statistics.median(steady),
            "compile_s": first * (times[0] - statistics.median(steady)),
            "setup_s": (stamps[0][0] - t_train - first * times[0]) + (t_train - t0),
            "steady_iteration_s": wall_per_iteration,
            "dispatch_and_compute_s": call_per_iteration,
            "host_overhead_s": wall_per_iteration - call_per_iteration,
            "teardown_s": t_end - stamps[-1][0],
            "iterations": len(stamps),
            "trace_count": getattr(trainer, "trace_count", None),
            "iterations_per_call": k,
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


class FusedLoop:
    """Diagnostic: our jitted iteration looped inside one jit (rejax's design).

    Compiled once (the first `run`), then timed in every round. Uses Trainer
    internals (_build, _init_state, _iteration); raises when they change.
    """

    def __init__(self, p: dict, iterations: int):
        self.p, self.iterations = p, iterations
        self.compiled = None

    def _compile(self) -> None:
        import jax

        out_dir = tempfile.mkdtemp(prefix="bench-ppo-")
        try:
            trainer, _ = build_ours(REPO / "configs" / "cartpole.json", protocol_overrides(self.p, out_dir))
            trainer._build(self.iterations)
            self.state = jax.jit(trainer._init_state)(jax.random.PRNGKey(self.p["seed"]))
            step = trainer._iteration

            def loop(s):
                return jax.lax.fori_loop(0, self.iterations, lambda _, s: step(s, None)[0], s)

            t = time.perf_counter()
            self.compiled = jax.jit(loop).lower(self.state).compile()
            self.compile_s = time.perf_counter() - t
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def run(self) -> dict:
        import jax

        if self.compiled is None:
            self._compile()
        t = time.perf_counter()
        jax.block_until_ready(self.compiled(self.state))
        elapsed = time.perf_counter() - t
        n = self.iterations * self.p["num_envs"] * self.p["num_steps"]
        return {"sps": n / elapsed, "compile_s": self.compile_s, "steady_iteration_s": elapsed / self.iterations,
                "iterations": self.iterations}


def ours_solve(spec: dict) -> dict:
    """One time-to-threshold run (called in a fresh process by --_worker)."""
    t_imports = time.perf_counter()
    import jaxrl_vla.build  # noqa: F401
    import jaxrl_vla.training.trainer  # noqa: F401

    import_s = (time.perf_counter() - t_imports) + spec.get("process_import_s", 0.0)
    out_dir = tempfile.mkdtemp(prefix="bench-ppo-")
    try:
        overrides = [s.replace("{OUT}", out_dir) for s in spec["overrides"]]
        t0 = time.perf_counter()
        trainer, cfg = build_ours(Path(spec["config"]), overrides)
        threshold = spec["threshold"]
        n_samples = cfg["trainer"]["num_envs"] * cfg["trainer"]["buffer_size"]
        stamps: list[tuple[float, dict]] = []
        solved: dict = {}

        def log_fn(record: dict) -> None:
            now = time.perf_counter()
            stamps.append((now, record))
            ret = record.get("eval/return_mean")
            if ret is not None and not solved and ret >= threshold:
                solved.update(time_s=now - t0, steps=int(record["global_step"]))
                trainer.request_stop()

        trainer.log_fn = log_fn
        trainer.train(total_timesteps=spec["total_timesteps"])
        wall = time.perf_counter() - t0
        evals = [(int(r["global_step"]), r["eval/return_mean"]) for _, r in stamps if r.get("eval/return_mean") is not None]
        # k iterations per jitted call: records come k at a time, each with the call's wall time / k
        k = getattr(trainer, "call_iterations", 1)
        times = [r["iteration_time"] for _, r in stamps]
        warm = k * -(-2 // k)  # whole calls (at least 2 iterations) left out of the steady values
        if k == 1:  # steady sps between consecutive iterations that ran no evaluation
            eval_iters = {i for i, (_, r) in enumerate(stamps) if r.get("eval/return_mean") is not None}
            gaps = [stamps[i][0] - stamps[i - 1][0] for i in range(3, len(stamps)) if i not in eval_iters]
        else:  # calls end at evaluations: the iterations' shares of their calls (evaluation excluded)
            gaps = times[warm:]
        steady = statistics.median(times[warm:]) if len(times) > warm + 1 else None
        first = first_call_size([r for _, r in stamps]) if stamps else 1
        return {
            "time_to_solve_s": solved.get("time_s"),
            "steps_to_solve": solved.get("steps"),
            "final_eval": evals[-1][1] if evals else None,
            "wall_s": wall,
            "import_s": import_s,
            "compile_s": first * (times[0] - steady) if steady else None,
            "first_iteration_at_s": stamps[0][0] - t0 if stamps else None,
            "setup_s": (stamps[0][0] - t0 - first * times[0]) if stamps else None,
            "sps": (n_samples / statistics.median(gaps)) if gaps else None,
            "evals": evals,
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- subprocesses


def run_json(cmd: list[str], timeout: float, label: str, env: dict | None = None) -> dict | None:
    """Run `cmd`; return the JSON after its `RESULT ` line, or None (with a note)."""
    # cold by default: a persistent compilation cache the caller may have set would hide compile times
    full_env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=full_env)
    except subprocess.TimeoutExpired:
        note(f"{label}: timed out after {timeout:.0f} s; skipped")
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    note(f"{label}: failed (exit {proc.returncode}); skipped. Last output:\n{tail}")
    return None


def ours_solve_subprocess(spec: dict, timeout: float, env: dict | None = None) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    return run_json(cmd, timeout, f"jaxrl_vla solve ({spec['label']})", env)


def compile_cache_env(directory: str) -> dict:
    """Environment that turns on JAX's persistent compilation cache for every compile."""
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def peer_available(python: str | None) -> dict[str, str | None]:
    """{peer: None when usable, else the reason}."""
    reasons: dict[str, str | None] = {}
    if not python or not Path(python).exists():
        why = f"peer python {python!r} not found (see benchmarks/README.md)"
        return {name: why for name in PEERS}
    probes = {"sb3": "import stable_baselines3, gymnasium, torch", "rejax": "import rejax, gymnax, jax"}
    for name, code in probes.items():
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        reasons[name] = None if proc.returncode == 0 else f"`{code}` fails in {python}: {last}"
    return reasons


def peer_run(python: str, peer: str, mode: str, cfg: dict, timeout: float, env: dict | None = None) -> dict | None:
    cmd = [python, str(PEERS[peer]), "--mode", mode, "--config", json.dumps(cfg)]
    return run_json(cmd, timeout, f"{peer} {mode}", env)


# ----------------------------------------------------------------------------- report


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x == float("inf"):
        return "not solved"
    if isinstance(x, (int, float)) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def per_seed(values: list | None, digits: int = 1) -> str:
    if not values:
        return "-"
    return ", ".join("x" if v is None else fmt(float(v), digits) for v in values)


def describe_config(path: Path) -> str:
    from jaxrl_vla.config import load_config

    c = load_config(path)
    t, a = c["trainer"], c["algorithm"]["cfg"]
    n = t["num_envs"] * t["buffer_size"]
    return (
        f"{t['num_envs']} envs x {t['buffer_size']} steps, {a['n_epochs']} epochs x {n // a['batch_size']} minibatches of "
        f"{a['batch_size']}, MLP {'x'.join(map(str, c['policy']['hidden_sizes']))} {c['policy']['activation']}, "
        f"lr {a['learning_rate']:g} {a['lr_schedule']}, gamma {a['gamma']}, GAE {a['gae_lambda']}, clip {a['clip_coef']}, "
        f"entropy {a['ent_coef']}, observation normalisation {'on' if t['normalize_observations'] else 'off'}; "
        f"evaluation every {t['eval_freq']} iterations = {t['eval_freq'] * n:,} steps"
    )


def targets_line(results: dict, ratios: list[dict]) -> str:
    """Issue 3's targets on a 2-core CPU, each with what this run measured."""
    by = {r["ratio"]: r for r in ratios}
    ours, pend = results.get("jaxrl_vla", {}), results.get("jaxrl_vla/pendulum", {})

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    sps = by.get("jaxrl_vla/rejax", {}).get("sps")
    fused = by.get("jaxrl_vla[fused]/rejax", {}).get("sps")
    tts = ours.get("time_to_solve_s")
    warm = (ours.get("warm_cache") or {}).get("time_to_solve_s")
    steps = pend.get("steps_to_solve")
    parts = [
        f"steady steps/s >= rejax's: {verdict(None if sps is None else sps >= 1.0)} "
        f"(Trainer {fmt(sps, 2)}x rejax" + (f"; its jitted iteration alone {fmt(fused, 2)}x" if fused else "") + ")",
        f"CartPole solved in < 10 s including compilation: {verdict(None if tts is None else tts < 10.0)} "
        f"(median {fmt(tts)} s cold" + (f", {fmt(warm)} s with a warm compilation cache" if warm else "") + ")",
        f"Pendulum >= {PENDULUM_THRESHOLD:g} within {PENDULUM_MAX_STEPS:,} steps: "
        f"{verdict(None if not pend else (steps is not None and steps <= PENDULUM_MAX_STEPS))} "
        f"({pend.get('solved', '-')} seeds, median {fmt(steps, 0)} steps)",
    ]
    return "Targets (issue 3): " + "; ".join(parts) + "."


ROW_ORDER = ("jaxrl_vla", "jaxrl_vla[fused]", "rejax", "sb3")


def markdown(results: dict, ratios: list[dict], args: argparse.Namespace, info: dict, notes: list[str], elapsed: float) -> str:
    from _report import machine_line

    p = PROTOCOL
    mb = p["num_envs"] * p["num_steps"] // p["num_minibatches"]
    cmd = "python benchmarks/ppo_throughput.py" + (" --quick" if args.quick else "")
    lines = [
        f"PPO on CartPole-v1, one protocol for all: {p['num_envs']} envs x {p['num_steps']} steps, {p['n_epochs']} epochs x "
        f"{p['num_minibatches']} minibatches of {mb}, MLP {'x'.join(map(str, p['hidden_sizes']))} {p['activation']}, "
        f"Adam {p['learning_rate']} decayed linearly to 0 over {p['total_timesteps']:,} steps, gamma {p['gamma']}, "
        f"GAE {p['gae_lambda']}, clip {p['clip_coef']}, entropy {p['ent_coef']}, grad-norm clip {p['max_grad_norm']}. "
        f"Produced by `{cmd}`: {args.rounds} throughput round(s), {args.seeds} seed(s) per time to solve, "
        f"{elapsed / 60:.1f} min in all.",
        "",
        "| impl | env | steps/s (steady) | compile s | setup s | time to 475 s (median) | per seed s | steps to 475 (median) | solved |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for key in ROW_ORDER:
        r = results.get(key)
        if not r:
            continue
        lines.append(
            f"| {key} | {r['env']} | {fmt(r.get('sps'), 0)} | {fmt(r.get('compile_s'), 2)} | {fmt(r.get('setup_s'), 2)} "
            f"| {fmt(r.get('time_to_solve_s'))} | {per_seed(r.get('time_to_solve_runs_s'))} "
            f"| {fmt(r.get('steps_to_solve'), 0)} | {r.get('solved', '-')} |"
        )
    for key in ("jaxrl_vla", "rejax"):
        w = results.get(key, {}).get("warm_cache")
        if w:
            lines.append(
                f"| {key}, warm compile cache | {results[key]['env']} | | | | {fmt(w.get('time_to_solve_s'))} | seed 0 "
                f"| {fmt(w.get('steps_to_solve'), 0)} | |"
            )
    if ratios:
        lines += ["", "| ratio | steps/s | time to 475 (< 1: the first is faster) |", "|---|---:|---:|"]
        for r in ratios:
            rounds = f" (rounds: {per_seed(r.get('sps_rounds'), 2)})" if r.get("sps_rounds") and len(r["sps_rounds"]) > 1 else ""
            x = lambda v: "-" if v is None else f"{fmt(v, 2)}x"  # noqa: E731
            lines.append(f"| {r['ratio']} | {x(r.get('sps'))}{rounds} | {x(r.get('time_to_solve'))} |")
    lines += ["", targets_line(results, ratios)]
    pend = results.get("jaxrl_vla/pendulum")
    if pend:
        lines += [
            "",
            f"Pendulum-v1, jaxrl_vla with `configs/pendulum.json` ({describe_config(PENDULUM_CONFIG)}): "
            f"evaluation return >= {PENDULUM_THRESHOLD:g} reached by {pend['solved']} seeds, median "
            f"{fmt(pend.get('steps_to_solve'), 0)} steps and {fmt(pend.get('time_to_solve_s'))} s wall "
            f"(compile {fmt(pend.get('compile_s'))} s; {fmt(pend.get('sps'), 0)} steps/s steady); per seed "
            + "; ".join(f"{fmt(s.get('steps_to_solve'), 0)} steps, {fmt(s.get('time_to_solve_s'))} s" for s in pend["runs"])
            + ".",
        ]
    ours = results.get("jaxrl_vla")
    if ours and ours.get("dispatch_and_compute_s"):
        fused = results.get("jaxrl_vla[fused]")
        lines += [
            "",
            f"Where jaxrl_vla's time goes (the median round): one iteration (1,024 steps) takes "
            f"{1000 * ours['steady_iteration_s']:.2f} ms of wall time on average, "
            f"{1000 * ours['dispatch_and_compute_s']:.2f} ms of it in the jitted call and the metrics fetch and "
            f"{1000 * ours['host_overhead_s']:.2f} ms in host work between iterations (records, metrics.jsonl, TensorBoard)"
            + (f"; the same iteration looped inside one jit takes {1000 * fused['steady_iteration_s']:.2f} ms (median "
               f"over rounds)" if fused else "")
            + f". In a fresh process (median over the time-to-solve runs): {fmt(ours.get('setup_s'))} s of setup "
            f"(building the Trainer to the first dispatch) and {fmt(ours.get('compile_s'))} s compiling the iteration"
            + (f"; the first iteration completes {fmt(ours.get('first_iteration_at_s'))} s after building starts"
               if ours.get("first_iteration_at_s") else "")
            + ".",
        ]
    lines += [
        "",
        "How it is measured. Steps/s: env steps of training (collection + update) per wall second, compilation excluded, "
        "median over rounds, each round running every implementation once so a shared machine's load hits all alike; "
        "jaxrl_vla is the Trainer as users run it (per-iteration dispatch, metrics fetch and logging included); "
        "`jaxrl_vla[fused]` is a diagnostic that loops the same jitted iteration inside one jit (rejax's design, no "
        "metrics or logging); rejax is timed on a jitted `fori_loop` over its `train_iteration`, compiled ahead of time; "
        "sb3 runs with 1 torch thread (faster than 2 on this machine, and far steadier under load). Compile and setup are "
        "fresh-process values: jaxrl_vla's compile is its first iteration minus a steady one, its setup the time from "
        "building the Trainer to the first dispatch (median over the time-to-solve runs); rejax's compile is the "
        "ahead-of-time `lower().compile()` of its loop, its setup building the algorithm and its initial state. Time to 475: "
        "from building the trainer (imports excluded) to the first evaluation with mean return >= 475 (first episode of "
        "10 fresh envs, deterministic actions, every 4 iterations), setup, compilation and evaluation included, in a "
        "fresh process per seed with no persistent compilation cache (the warm-cache rows rerun seed 0 with JAX's "
        "persistent cache filled by a previous run). rejax compiles its whole training with the evaluation schedule "
        "and cannot stop early: its time is its compile plus the share of the run up to the solving evaluation. sb3 "
        "evaluates with `evaluate_policy` on a DummyVecEnv of 10 gymnasium envs. rejax runs with the protocol's "
        "optimiser (global-norm clipping, linear decay, Adam eps 1e-5) through a subclass and keeps its own value "
        "clipping and separate actor and critic optimisers; it does not bootstrap truncated episodes (gymnax reports "
        "`done` only), jaxrl_vla and sb3 do.",
    ]
    lines += [f"- {n}" for n in notes]
    load = [x for x in (info.get("loadavg_1m"), info.get("loadavg_end")) if x is not None]
    cpus = info.get("cpu_affinity") or info.get("cpu_count") or 1
    lines += ["", machine_line(info) + f" Load average (1 min) at start {info.get('loadavg_1m')}, at end {info.get('loadavg_end')}"
              + (f": the machine was shared with other jobs ({max(load) / cpus:.1f} runnable per core), so absolute "
                 "times are inflated and noisy; the per-round ratios are the steadier numbers." if load and max(load) > 1.5 * cpus else ".")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, one seed, shorter runs, no warm-cache rows (about 2-3 minutes)")
    default_peer = DEFAULT_PEER_PYTHON if Path(DEFAULT_PEER_PYTHON).exists() else None
    parser.add_argument("--peer-python", default=default_peer, help=f"python of the peer venv (default {DEFAULT_PEER_PYTHON} if it exists)")
    parser.add_argument("--no-peers", action="store_true", help="run jaxrl_vla only")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 3; --quick 1)")
    parser.add_argument("--seeds", type=int, help="seeds per time to solve (default 3; --quick 1)")
    parser.add_argument("--sb3-torch-threads", type=int, default=1, help="torch threads for sb3 (default 1; 0: torch's default)")
    parser.add_argument("--no-warm-cache", action="store_true", help="skip the warm-compilation-cache reruns")
    parser.add_argument("--skip-pendulum", action="store_true")
    parser.add_argument("--skip-solve", action="store_true", help="throughput only")
    parser.add_argument("--no-write", action="store_true", help="print the results, do not write BENCHMARKS.md")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.warm_cache = not (args.quick or args.no_warm_cache)
    return args


def summarize_solves(res: dict, runs: list[dict]) -> None:
    """Median time and steps to solve; an unsolved seed counts as never (so it can be the median)."""
    solved = [r for r in runs if r.get("time_to_solve_s") is not None]
    res["solved"] = f"{len(solved)}/{len(runs)}"
    inf = float("inf")
    tts = statistics.median([r["time_to_solve_s"] if r.get("time_to_solve_s") is not None else inf for r in runs])
    sts = statistics.median([r["steps_to_solve"] if r.get("steps_to_solve") is not None else inf for r in runs])
    res["time_to_solve_s"] = None if tts == inf else tts
    res["steps_to_solve"] = None if sts == inf else sts
    res["time_to_solve_runs_s"] = [r.get("time_to_solve_s") for r in runs]
    res["steps_to_solve_runs"] = [r.get("steps_to_solve") for r in runs]
    res["solve_wall_s"] = [r.get("wall_s") for r in runs]
    res["import_s"] = median([r.get("import_s") for r in runs])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        spec["process_import_s"] = time.perf_counter() - _T_PROCESS
        print("RESULT " + json.dumps(ours_solve(spec)), flush=True)
        return 0

    t_start = time.perf_counter()
    from _report import machine, write_section

    info = machine()
    notes: list[str] = []
    thr_iterations = 40 if args.quick else 100
    sb3_iterations = 10 if args.quick else 20
    p = PROTOCOL
    sb3_protocol = dict(p, torch_threads=args.sb3_torch_threads)
    envs = {"jaxrl_vla": "CartPole-v1", "jaxrl_vla[fused]": "CartPole-v1", "rejax": "gymnax:CartPole-v1",
            "sb3": "gymnasium:CartPole-v1"}

    peers_ok: dict[str, str | None] = {name: "--no-peers" for name in PEERS}
    if not args.no_peers:
        peers_ok = peer_available(args.peer_python)
    for name, why in peers_ok.items():
        if why:
            note(f"peer {name} skipped: {why}")
            notes.append(f"{name} not run: {why}.")

    # ------------------------------------------------------------ throughput rounds
    rounds: dict[str, list[dict]] = {key: [] for key in ROW_ORDER}
    fused: FusedLoop | None = FusedLoop(p, thr_iterations)
    for k in range(args.rounds):
        note(f"CartPole throughput, round {k + 1}/{args.rounds}")
        rounds["jaxrl_vla"].append(ours_throughput(p, thr_iterations))
        if fused is not None:
            try:
                rounds["jaxrl_vla[fused]"].append(fused.run())
            except Exception as err:  # noqa: BLE001 - a diagnostic over Trainer internals, which may change
                note(f"jaxrl_vla[fused] skipped: {err!r}")
                fused = None
        if not peers_ok["rejax"]:
            r = peer_run(args.peer_python, "rejax", "throughput", dict(p, iterations=thr_iterations), 600)
            if r:
                rounds["rejax"].append(r)
        if not peers_ok["sb3"]:
            r = peer_run(args.peer_python, "sb3", "throughput", dict(sb3_protocol, iterations=sb3_iterations), 600)
            if r:
                rounds["sb3"].append(r)

    results: dict[str, dict] = {}
    for impl, runs in rounds.items():
        if not runs:
            continue
        res = {"bench": BENCH, "impl": impl, "env": envs[impl], "rounds": len(runs)}
        for key in ("sps", "sps_iteration", "compile_s", "setup_s", "steady_iteration_s"):
            vals = [r.get(key) for r in runs if r.get(key) is not None]
            if vals:
                res[key] = median(vals)
        # the time breakdown from one round (the median one by steps/s), so that its parts add up
        middle = sorted(runs, key=lambda r: r["sps"])[(len(runs) - 1) // 2]
        for key in ("steady_iteration_s", "dispatch_and_compute_s", "host_overhead_s"):
            if middle.get(key) is not None:
                res[key] = middle[key]
        res["sps_rounds"] = [r["sps"] for r in runs]
        results[impl] = res

    # ------------------------------------------------------------ CartPole time to solve
    def ours_spec(seed: int) -> dict:
        return {
            "label": f"CartPole seed {seed}",
            "config": str(REPO / "configs" / "cartpole.json"),
            "overrides": protocol_overrides(dict(p, seed=seed), "{OUT}"),
            "total_timesteps": p["total_timesteps"],
            "threshold": p["threshold"],
        }

    if not args.skip_solve:
        solve_runs: dict[str, list[dict]] = {"jaxrl_vla": [], "rejax": [], "sb3": []}
        for seed in range(args.seeds):
            note(f"CartPole time to {p['threshold']:g}, seed {seed}")
            r = ours_solve_subprocess(ours_spec(seed), 600)
            if r:
                solve_runs["jaxrl_vla"].append(r)
            for peer in ("rejax", "sb3"):
                if not peers_ok[peer]:
                    r = peer_run(args.peer_python, peer, "solve", dict(sb3_protocol if peer == "sb3" else p, seed=seed), 900)
                    if r:
                        solve_runs[peer].append(r)
        for impl, runs in solve_runs.items():
            if runs:
                res = results.setdefault(impl, {"bench": BENCH, "impl": impl, "env": envs[impl]})
                summarize_solves(res, runs)
                if impl == "sb3":
                    res["eval_s"] = [r.get("eval_s") for r in runs]
                if impl == "jaxrl_vla":
                    # fresh-process values: the throughput rounds after the first reuse this process's
                    # caches of small eager computations, so their setup looks cheaper than a user's
                    res["warm_process_compile_s"] = res.get("compile_s")
                    res["warm_process_setup_s"] = res.get("setup_s")
                    res["compile_s"] = median([r.get("compile_s") for r in runs])
                    res["setup_s"] = median([r.get("setup_s") for r in runs])
                    res["first_iteration_at_s"] = median([r.get("first_iteration_at_s") for r in runs])

        if args.warm_cache:
            note("CartPole time to solve with a warm persistent compilation cache, seed 0")
            for impl in ("jaxrl_vla", "rejax"):
                if impl == "rejax" and peers_ok["rejax"]:
                    continue
                cache = tempfile.mkdtemp(prefix="bench-jax-cache-")
                try:
                    env = compile_cache_env(cache)
                    for attempt in range(2):  # the first fills the cache, the second is measured
                        if impl == "jaxrl_vla":
                            r = ours_solve_subprocess(ours_spec(0), 600, env)
                        else:
                            r = peer_run(args.peer_python, "rejax", "solve", dict(p, seed=0), 900, env)
                    if r and impl in results:
                        results[impl]["warm_cache"] = {k: r.get(k) for k in ("time_to_solve_s", "steps_to_solve", "compile_s", "wall_s")}
                finally:
                    shutil.rmtree(cache, ignore_errors=True)

    # ------------------------------------------------------------ Pendulum (ours)
    if not args.skip_pendulum and not args.skip_solve:
        if not PENDULUM_CONFIG.exists():
            notes.append(f"Pendulum skipped: {PENDULUM_CONFIG} missing.")
        else:
            runs = []
            for seed in range(args.seeds):
                note(f"Pendulum time to {PENDULUM_THRESHOLD:g}, seed {seed}")
                spec = {
                    "label": f"Pendulum seed {seed}",
                    "config": str(PENDULUM_CONFIG),
                    "overrides": [f"trainer.seed={seed}", "trainer.output_dir={OUT}", "trainer.progress=false",
                                  "trainer.save_freq=0"],
                    "total_timesteps": PENDULUM_MAX_STEPS,
                    "threshold": PENDULUM_THRESHOLD,
                }
                r = ours_solve_subprocess(spec, 900)
                if r:
                    runs.append(r)
            if runs:
                res = {"bench": BENCH, "impl": "jaxrl_vla", "env": "Pendulum-v1", "threshold": PENDULUM_THRESHOLD,
                       "max_steps": PENDULUM_MAX_STEPS, "sps": median([r.get("sps") for r in runs]),
                       "compile_s": median([r.get("compile_s") for r in runs])}
                summarize_solves(res, runs)
                res["final_eval"] = median([r.get("final_eval") for r in runs])
                res["runs"] = [{k: r.get(k) for k in ("time_to_solve_s", "steps_to_solve", "final_eval", "wall_s")} for r in runs]
                results["jaxrl_vla/pendulum"] = res

    # ------------------------------------------------------------ ratios
    def ratio(a: str, b: str) -> dict | None:
        if not (results.get(a) and results.get(b)):
            return None
        out = {"bench": BENCH, "ratio": f"{a}/{b}", "env": "CartPole-v1"}
        pairs = list(zip(rounds[a], rounds[b]))
        if pairs:
            out["sps"] = median([x["sps"] / y["sps"] for x, y in pairs])
            out["sps_rounds"] = [x["sps"] / y["sps"] for x, y in pairs]
        ta, tb = results[a].get("time_to_solve_s"), results[b].get("time_to_solve_s")
        out["time_to_solve"] = (ta / tb) if ta and tb else None
        return out

    ratios = [r for r in (ratio("jaxrl_vla", "rejax"), ratio("jaxrl_vla", "sb3"), ratio("jaxrl_vla[fused]", "rejax"),
                          ratio("rejax", "sb3")) if r]

    elapsed = time.perf_counter() - t_start
    try:
        info["loadavg_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for res in results.values():
        emit(res)
    for r in ratios:
        emit(r)
    for r in ratios:
        x = lambda v: "-" if v is None else f"{fmt(v, 2)}x"  # noqa: E731
        note(f"{r['ratio']}: steps/s {x(r.get('sps'))}, time to solve {x(r.get('time_to_solve'))}"
             " (time ratio < 1: the first is faster)")
    if not args.no_write:
        path = write_section(BENCH, "## ppo_throughput\n\n" + markdown(results, ratios, args, info, notes, elapsed))
        note(f"wrote section {BENCH} of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
