"""How fast the VLA's trunk learns VLReach from expert labels, by trunk architecture, on frozen image features.

    python benchmarks/probes/trunk_bc.py                      # ~15 min on 2 cores: four trunks, 4 epochs each
    python benchmarks/probes/trunk_bc.py --variants instruction_first:4 --epochs 2 --save /tmp/trunk.safetensors --no-write

Why this exists: PPO fine-tuning and behaviour cloning of the example model
both stall in the 60-70% range, and `benchmarks/vision_probe.py` shows that
the checkpoint's frozen image tokens tell the scene's objects apart (~99% of
objects read right). So the question is how quickly the part above the
ResNet (image/proprio projections, GPT-2, heads) can learn to ground the
instruction at all. This script isolates it: the BC checkpoint's ResNet
encodes the expert demonstrations once (as the example's rollout does with
the encoder frozen), and a trunk initialised from scratch is behaviour-cloned
in JAX on those features (Adam, action-mean MSE plus 0.5 x value MSE against
the demos' discounted returns). After every epoch: held-out action MSE and closed-loop
success of the deterministic policy (ResNet + trunk) in the JAX env.

A variant is `TOKEN_ORDER:N_LAYER` (the GPTVLAModel config's `token_order`
and `n_layer`). `--save` exports the last variant's model (the checkpoint's
ResNet, the new trunk, log-std -1) as a torch checkpoint loadable by the
example config with the same model_config overrides, so PPO can start from it.

One JSON line per epoch on stdout; the `trunk_bc` section of BENCHMARKS.md
(--no-write to skip).
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
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder and benchmarks/ for _report, finetune_signal (config arguments, build) and vision_probe
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import finetune_signal  # noqa: E402
import vision_probe  # noqa: E402  (its frozen_image_features)
from _report import machine, machine_line, write_section  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    finetune_signal.add_config_arguments(p)
    p.add_argument("--variants", default="image_first:2,instruction_first:2,image_first:4,instruction_first:4",
                   help="comma-separated TOKEN_ORDER:N_LAYER trunks (default: the example's, then three others)")
    p.add_argument("--demos", default=str(REPO / "checkpoints" / "vl_reach_demos.npz"),
                   help="bridge.pretrain_bc's demos (made by it next to the checkpoint)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, decayed linearly to 10%% (as pretrain_bc)")
    p.add_argument("--eval-episodes", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="export the last variant's model to this .safetensors path")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, int]:
    order, _, layers = text.partition(":")
    if not order or not layers.isdigit():
        raise SystemExit(f"--variants: {text!r} is not TOKEN_ORDER:N_LAYER (e.g. instruction_first:4)")
    return order, int(layers)


def demo_dataset(demos_path: str, policy: Any, variables: Any) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(obs with frozen `image_features` [N, I, C], expert actions, returns, episode ids) of the demos."""
    import jax

    from bridge.pretrain_bc import GAMMA, discounted_returns
    from jaxrl_vla.tasks import demos as demo_lib

    if not Path(demos_path).is_file():
        raise SystemExit(f"--demos {demos_path} does not exist: run `python -m bridge.pretrain_bc` first (it makes them)")
    data = demo_lib.load_demos(demos_path)
    features = vision_probe.frozen_image_features(policy, variables, data["rgb"], chunk=2048)
    obs = {"image_features": features, "proprio": data["proprio"], "language": data["language"],
           "language_mask": data["language_mask"]}
    returns = discounted_returns(data["reward"], data["episode_id"], GAMMA)
    return jax.device_put(obs), data["action"], returns, data["episode_id"]


def train_trunk(model_config: dict, checkpoint_variables: dict, env: Any, dataset: tuple, args: argparse.Namespace,
                label: str) -> tuple[list[dict], dict]:
    """BC of a fresh trunk on the frozen features; per-epoch records and the final full variables."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxrl_vla.models.vla.gpt_vla import GPTVLAModel, VLAModelConfig
    from jaxrl_vla.tasks.demos import run_episodes

    obs, actions, returns, episode_id = dataset
    model = GPTVLAModel(VLAModelConfig.from_dict(model_config))
    frozen = {"vision": checkpoint_variables["params"]["model"]["vision"]}
    batch_stats = checkpoint_variables.get("batch_stats", {}).get("model")
    params = model.init(jax.random.PRNGKey(args.seed), jax.tree_util.tree_map(lambda x: x[:2], obs))["params"]
    params = {k: v for k, v in params.items() if k != "vision"}
    held_out_from = int(episode_id.max() * 0.9)
    train_rows, val_rows = np.flatnonzero(episode_id < held_out_from), np.flatnonzero(episode_id >= held_out_from)
    steps = len(train_rows) // args.batch_size
    optimizer = optax.adam(optax.linear_schedule(args.lr, 0.1 * args.lr, steps * args.epochs))
    actions, returns = jnp.asarray(actions), jnp.asarray(returns)

    def variables_of(p):
        return {"params": {**p, **frozen}, **({"batch_stats": batch_stats} if batch_stats is not None else {})}

    def losses(p, rows):
        """(action-mean MSE, value MSE) on the dataset rows `rows`."""
        o = jax.tree_util.tree_map(lambda x: x[rows], obs)
        dist, value = model.apply(variables_of(p), o)
        return jnp.mean((dist.mean - actions[rows]) ** 2), jnp.mean((value - returns[rows]) ** 2)

    def bc_loss(p, rows):
        action_loss, value_loss = losses(p, rows)
        return action_loss + 0.5 * value_loss

    @jax.jit
    def epoch(p, opt_state, order):
        def step(carry, rows):
            p, s = carry
            loss, grads = jax.value_and_grad(bc_loss)(p, rows)
            updates, s = optimizer.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (p, opt_state), loss = jax.lax.scan(step, (p, opt_state), order)
        return p, opt_state, loss.mean()

    @jax.jit
    def closed_loop_success(p, keys):
        def act(state, o, step_keys):
            mean = model.apply(variables_of(p), o, method="forward")
            return mean[:, None], mean[:, None]

        records = run_episodes(env, act, keys)
        return (records["success"] & records["valid"]).any(axis=1).mean()

    validation = jax.jit(lambda p: losses(p, jnp.asarray(val_rows))[0])
    eval_keys = jax.random.split(jax.random.PRNGKey(args.seed + 7), args.eval_episodes)
    rng = np.random.default_rng(args.seed)
    opt_state = optimizer.init(params)
    records = []
    for e in range(args.epochs):
        t0 = time.perf_counter()
        order = jnp.asarray(rng.permutation(train_rows)[: steps * args.batch_size].reshape(steps, args.batch_size))
        params, opt_state, train_loss = epoch(params, opt_state, order)
        record = {"variant": label, "epoch": e + 1, "train_loss": float(train_loss),
                  "held_out_action_mse": float(validation(params)),
                  "success": float(closed_loop_success(params, eval_keys)),
                  "seconds": round(time.perf_counter() - t0, 1)}
        records.append(record)
        print(json.dumps({"bench": "trunk_bc", **record}), flush=True)
    params = {**params, "log_std": jnp.full_like(params["log_std"], -1.0)}
    return records, variables_of(params)


def markdown(rows: list[dict], info: dict, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "## trunk_bc",
        "",
        f"How fast a trunk learns VLReach from the expert's labels on the frozen image features of "
        f"{info['checkpoint']} ({info['rows']:,} demo steps; the last 10% of episodes held out): a fresh trunk "
        f"per variant, behaviour-cloned in JAX for {args.epochs} epochs (batch {args.batch_size}, Adam "
        f"{args.lr:g} decayed to 10%, action MSE + 0.5 x value MSE); success: {args.eval_episodes} deterministic "
        "episodes of ResNet + trunk in the JAX env. Variants: `token_order` (image_first = [img, proprio, lang], "
        "the example's; instruction_first = [lang, img, proprio]) and GPT-2 layers. "
        "Produced by `python benchmarks/probes/trunk_bc.py`.",
        "",
        "| trunk | epoch | train loss (action + 0.5 x value) | held-out action MSE | success | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['epoch']} | {r['train_loss']:.4f} | {r['held_out_action_mse']:.4f} | "
                     f"{r['success']:.1%} | {r['seconds']:.0f} |")
    lines += ["", f"Measured in {seconds:.0f} s. {machine_line(machine())}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    t0 = time.perf_counter()
    cfg, env, policy, variables = finetune_signal.build(args)
    dataset = demo_dataset(args.demos, policy, variables)
    rows, final, model_config = [], None, None
    for order, layers in variants:
        model_config = {**cfg["policy"]["vla_config"]["model_config"], "token_order": order, "n_layer": layers}
        records, final = train_trunk(model_config, variables, env, dataset, args, f"{order}, {layers} layers")
        rows += records
    if args.save:
        from bridge import export_to_torch

        path = export_to_torch(final, cfg["policy"]["vla_config"]["model_class"], model_config, args.save)
        print(f"# saved {path} (model_config {json.dumps(model_config)})", file=sys.stderr)
    info = {"checkpoint": cfg["policy"]["vla_config"]["model_path"], "rows": len(dataset[1])}
    if not args.no_write:
        path = write_section("trunk_bc", markdown(rows, info, args, time.perf_counter() - t0))
        print(f"# wrote the trunk_bc section of {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
