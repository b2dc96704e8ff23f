"""How well the pretrained VLA's frozen image tokens tell VLReach's objects apart: a probe per cell.

    python benchmarks/probes/vision_probe.py                 # ~2 min on 2 cores
    python benchmarks/probes/vision_probe.py --no-write

Why this exists: the example fine-tuned with the BC-trained ResNet frozen
(`policy.freeze: ["vision"]`) until 2026-12-06 (it now trains it at 0.3 of the
lr), so the trunk could only ground an instruction in what the 16 image tokens
(one per cell of the 4x4 feature map, one per cell of VLReach's layout grid)
already say. This script asks how much that is: it
renders fresh scenes, encodes them with the checkpoint's frozen encoder
(`VLAPolicy.with_image_features`, exactly what the rollout stores), labels
every token with what stands in its layout cell (nothing, or one colour x
shape pair, from the env's privileged state) and fits probes on held-out
scenes: a linear one (softmax regression) and a one-hidden-layer MLP. If even
the MLP misreads some occupied cells, a policy reading these tokens must
confuse those objects, whatever fine-tuning does to the layers above them.

One JSON line per probe on stdout; the `vision_probe` section of BENCHMARKS.md (--no-write to skip).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder and benchmarks/ for _report and finetune_signal (its config arguments and build)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import finetune_signal  # noqa: E402
from _report import machine, machine_line, write_section  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    finetune_signal.add_config_arguments(p)
    p.add_argument("--scenes", type=int, default=8192, help="scenes rendered (default 8192)")
    p.add_argument("--train-fraction", type=float, default=0.75, help="scenes the probes are fitted on")
    p.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps per probe")
    p.add_argument("--hidden", type=int, default=128, help="the MLP probe's hidden width")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    return p.parse_args(argv)


def cell_labels(states: Any, grid: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """[scenes, grid * grid] class per layout cell (0: empty, k: the k-th (colour, shape) pair), and the pairs.

    Cells are row-major (row = y), the order of the feature map's tokens.
    """
    pos, colour, shape = (np.asarray(x) for x in (states.object_pos, states.object_colour, states.object_shape))
    cell = np.clip((pos * grid).astype(int), 0, grid - 1)
    index = cell[..., 1] * grid + cell[..., 0]
    pairs = sorted(set(zip(colour.ravel().tolist(), shape.ravel().tolist())))
    ids = {pair: k + 1 for k, pair in enumerate(pairs)}
    labels = np.zeros((pos.shape[0], grid * grid), np.int32)
    rows = np.arange(pos.shape[0])[:, None]
    labels[rows, index] = np.vectorize(lambda c, s: ids[(c, s)])(colour, shape)
    return labels, pairs


def fit_probe(x_train, y_train, x_test, y_test, classes: int, hidden: int, steps: int, seed: int) -> dict:
    """Softmax regression (hidden 0) or a ReLU MLP on token features -> cell class; held-out accuracies."""
    import jax
    import jax.numpy as jnp
    import optax

    dim = x_train.shape[-1]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    if hidden:
        params = {"w1": jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim), "b1": jnp.zeros(hidden),
                  "w": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden), "b": jnp.zeros(classes)}
    else:
        params = {"w": jnp.zeros((dim, classes)), "b": jnp.zeros(classes)}

    def logits(p, x):
        if hidden:
            x = jax.nn.relu(x @ p["w1"] + p["b1"])
        return x @ p["w"] + p["b"]

    optimizer = optax.adam(3e-3)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x_train), y_train).mean()

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = optimizer.update(grads, s)
            return (optax.apply_updates(p, updates), s), value

        (p, _), losses = jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
        return p, losses[-1]

    params, train_loss = fit(params)
    predicted = np.asarray(jnp.argmax(logits(params, x_test), axis=-1))
    y = np.asarray(y_test)
    occupied = y > 0
    return {"train_loss": float(train_loss), "cell_accuracy": float((predicted == y).mean()),
            "occupied_accuracy": float((predicted[occupied] == y[occupied]).mean()),
            "empty_accuracy": float((predicted[~occupied] == 0).mean())}


def frozen_image_features(policy: Any, variables: Any, rgb: Any, chunk: int = 1024) -> np.ndarray:
    """[N, I, C] image tokens of the policy's vision encoder for rgb [N, H, W, 3], `chunk` images per call.

    Exactly what the example's rollout stores with the encoder frozen (`VLAPolicy.with_image_features`).
    """
    from jaxrl_vla.models.vla_policy import VLAPolicy
    from jaxrl_vla.training import compiler

    encode = compiler.jit(lambda v, o: policy.apply(v, o, method=VLAPolicy.with_image_features)["image_features"])
    return np.concatenate([np.asarray(encode(variables, {"rgb": rgb[i:i + chunk]})) for i in range(0, len(rgb), chunk)])


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    import jax

    from jaxrl_vla.envs.vl_reach import GRID_CELLS

    cfg, env, policy, variables = finetune_signal.build(args)
    states, obs = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(args.seed), args.scenes))
    features = frozen_image_features(policy, variables, obs["rgb"])
    if features.shape[1] != GRID_CELLS * GRID_CELLS:
        raise SystemExit(f"the model gives {features.shape[1]} image tokens, not one per cell of VLReach's "
                         f"{GRID_CELLS}x{GRID_CELLS} layout grid (policy.vla_config.model_config.image_tokens 'spatial')")
    labels, pairs = cell_labels(states, GRID_CELLS)
    cut = int(args.scenes * args.train_fraction)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  [scenes, cells, ...] -> [scenes * cells, ...]
    split = (flat(features[:cut]), flat(labels[:cut]), flat(features[cut:]), flat(labels[cut:]))
    rows = []
    for hidden in (0, args.hidden):
        record = {"probe": "linear" if hidden == 0 else f"MLP ({hidden} hidden)",
                  **fit_probe(*split, len(pairs) + 1, hidden, args.steps, args.seed)}
        rows.append(record)
        print(json.dumps({"bench": "vision_probe", **record}), flush=True)
    info = {"scenes": args.scenes, "train_scenes": cut, "pairs": len(pairs), "objects": env.num_objects,
            "tokens": features.shape[1], "channels": features.shape[2],
            "checkpoint": cfg["policy"]["vla_config"]["model_path"]}
    return rows, info


def markdown(rows: list[dict], info: dict, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "## vision_probe",
        "",
        f"What the frozen image tokens of the pretrained VLA ({info['checkpoint']}) say about each cell of VLReach's "
        f"layout grid: {info['scenes']:,} fresh scenes ({info['objects']} objects, {info['pairs']} colour x shape pairs "
        f"in all), encoded by the checkpoint's ResNet into {info['tokens']} tokens of {info['channels']} channels "
        "(what the example's rollout stores with the encoder frozen); each token labelled with its cell's content "
        f"(empty or one pair) from the env's state; probes fitted on {info['train_scenes']:,} scenes ({args.steps} "
        "full-batch Adam steps), accuracies on the rest. Produced by `python benchmarks/probes/vision_probe.py`.",
        "",
        "| probe | occupied cells: pair read right | empty cells read empty | all cells | train loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['probe']} | {r['occupied_accuracy']:.1%} | {r['empty_accuracy']:.1%} | "
                     f"{r['cell_accuracy']:.1%} | {r['train_loss']:.3f} |")
    best = max(r["occupied_accuracy"] for r in rows)
    lines += ["", f"Reading: with every one of a scene's {info['objects']} objects read right with probability "
              f"{best:.1%} independently, all of them are read right in about {best ** info['objects']:.0%} of scenes; "
              "a policy on top of these tokens confuses objects in the rest unless it works around the errors.",
              "", f"Measured in {seconds:.0f} s. {machine_line(machine())}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    rows, info = measure(args)
    if not args.no_write:
        path = write_section("vision_probe", markdown(rows, info, args, time.perf_counter() - t0))
        print(f"# wrote the vision_probe section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
