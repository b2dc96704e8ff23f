"""A SmolVLM-shaped VLA from Hugging Face files to PPO and back: the CLI example of policy.action_head.

    python -m bridge.tiny_smolvlm make --out checkpoints/tiny_smolvlm        # random-init HF directory
    python -m jaxrl_vla.train --config configs/vla_example/smolvlm_tokens.json
    python -m bridge.tiny_smolvlm export --run runs/smolvlm_tokens-<stamp> --out exported_smolvlm

`make` builds transformers' `SmolVLMForConditionalGeneration` from a small config sized for
VLReach (64x64 images through a 2-layer SigLIP tower and the pixel-shuffle connector into 16
image tokens, a 2-layer Llama text model whose last 32 ids are the action bins) and saves it with
`save_pretrained`, as a team's own checkpoint directory would be. The config fine-tunes it with
the action-token head. `export` writes the trained VLM back as a Hugging Face directory (the same
config.json, the weights in transformers' layout) that `from_pretrained` loads; the value head,
a training-only addition, is left out.

`bc --head flow` behaviour-clones the flow-matching head instead (`bc_flow`, in JAX on the twin:
configs/vla_example/smolvlm_flow_noise.json and smolvlm_flow_sde.json fine-tune it by PPO).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_TOKEN_ID = 40  # above VLReach's word ids, below the 32 action bins at the end of the vocabulary
CONFIG = {
    "model_type": "smolvlm", "scale_factor": 2, "image_token_id": IMAGE_TOKEN_ID, "tie_word_embeddings": False,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 8},
    "text_config": {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None},
}


# the flow head the flow BC trains and the smolvlm_flow_*.json configs fine-tune (policy.action_head, less the
# method): a 2-layer joint expert of width 32 on the VLM's kv layout, 5 Euler steps, pi-RL's Flow-Noise bounds
FLOW_HEAD = {"type": "flow", "steps": 5, "noise_min": 0.08, "noise_max": 0.16, "noise_level": 0.5,
             "expert": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2}}


def make(out: Path, seed: int = 0) -> Path:
    """Save a random-init SmolVLMForConditionalGeneration of CONFIG's shape at `out` (save_pretrained)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.SmolVLMConfig(vision_config=CONFIG["vision_config"], text_config=CONFIG["text_config"],
                                     scale_factor=CONFIG["scale_factor"], image_token_id=IMAGE_TOKEN_ID,
                                     tie_word_embeddings=CONFIG["tie_word_embeddings"])
    transformers.SmolVLMForConditionalGeneration(cfg).save_pretrained(out)
    return out


def bc(out: Path, demos: Path, steps: int = 600, batch_size: int = 64, lr: float = 1e-3, log_std: float = -1.0,
       value_coef: float = 0.5, aux_coef: float = 1.0, seed: int = 0, threads: int = 2,
       eval_episodes: int = 256) -> dict:
    """Behaviour-clone the random-init SmolVLM with the Gaussian head on the VLReach demos; save it at `out`.

    As `bridge.pretrain_bc` makes the GPTVLAModel checkpoint, in torch on transformers' own model
    (`bridge.smolvlm_gaussian`, the twin of GaussianVLA): Adam on the action means' MSE against the
    expert's actions, `value_coef` x the value head's MSE against the demos' discounted returns (GAMMA)
    and `aux_coef` x a training-only probe's MSE from the readout to the instructed object's position
    (pretrain_bc's target label: a direct signal for grounding), `steps` minibatches, the rate decayed
    linearly to 10%. Then log_std is set to `log_std`. Written: the VLM with `save_pretrained`, the head
    as `action_head.safetensors` (which `policy.action_head` type 'gaussian' loads from the directory),
    and `bc.json` with the settings, the losses and the JAX evaluation of the saved directory as
    fine-tuning loads it (deterministic, `eval_episodes` episodes, the Trainer's evaluation).
    """
    import time

    import numpy as np
    import torch
    import transformers
    from safetensors.torch import save_file

    from bridge import pretrain_bc as pbc
    from bridge.smolvlm_gaussian import SmolVLMGaussianVLA
    from jaxrl_vla.models.vla.gaussian_vla import HEAD_FILE

    env = pbc.make_env()
    data = pbc.ensure_demos(Path(demos), 10000, 0, 0.1, env, pbc.ENV_KWARGS)
    _, target_xy = pbc.scene_labels(data, pbc.episode_scenes(data, env))
    returns = pbc.discounted_returns(data["reward"], data["episode_id"], pbc.GAMMA)
    train_rows, val_rows = pbc.split_episodes(data["episode_id"], 0.05)
    pbc.set_determinism(seed, threads)
    cfg = transformers.SmolVLMConfig(vision_config=CONFIG["vision_config"], text_config=CONFIG["text_config"],
                                     scale_factor=CONFIG["scale_factor"], image_token_id=IMAGE_TOKEN_ID,
                                     tie_word_embeddings=CONFIG["tie_word_embeddings"])
    cfg._attn_implementation = "sdpa"
    model = SmolVLMGaussianVLA(transformers.SmolVLMForConditionalGeneration(cfg), data["proprio"].shape[1],
                               data["action"].shape[1])
    probe = torch.nn.Linear(cfg.text_config.hidden_size, 2)
    params = list(model.parameters()) + list(probe.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - 0.9 * min(i / max(steps, 1), 1.0))
    order = np.random.default_rng(seed).permutation(np.resize(train_rows, steps * batch_size))
    t0, history = time.perf_counter(), []

    def losses(index: np.ndarray) -> dict:
        h = model.features(pbc.to_torch(pbc.numpy_batch(data, index)))
        mean, value = model.heads(h)
        return {"action": torch.mean((mean - torch.from_numpy(data["action"][index])) ** 2),
                "value": torch.mean((value - torch.from_numpy(returns[index])) ** 2),
                "aux": torch.mean((probe(h) - torch.from_numpy(target_xy[index])) ** 2)}

    model.train()
    for step in range(steps):
        parts = losses(order[step * batch_size:(step + 1) * batch_size])
        loss = parts["action"] + value_coef * parts["value"] + aux_coef * parts["aux"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, **{k: round(v.item(), 4) for k, v in parts.items()},
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
    model.eval()
    with torch.no_grad():
        model.log_std.fill_(log_std)
        val = [losses(val_rows[i:i + 256])["action"].item() * len(val_rows[i:i + 256]) for i in range(0, len(val_rows), 256)]
    out = Path(out)
    model.vlm.save_pretrained(out)
    save_file(model.head_state_dict(), str(out / HEAD_FILE))
    info = {"demos": str(demos), "steps": steps, "batch_size": batch_size, "lr": lr, "log_std": log_std,
            "value_coef": value_coef, "aux_coef": aux_coef, "seed": seed, "threads": threads,
            "train_seconds": round(time.perf_counter() - t0, 1), "history": history,
            "val_action_mse": round(sum(val) / max(len(val_rows), 1), 4),
            "make": f"python -m bridge.tiny_smolvlm bc --out {out} --steps {steps}"}
    if eval_episodes:
        from jaxrl_vla.models.lm_policy import build_lm_model

        module, variables = build_lm_model({"action_chunk": 1, "action_head": {"type": "gaussian"},
                                            "vla_config": {"model_path": str(out)}}, env, np.float32)
        info["eval"] = {**pbc.evaluate_policy(module, variables, env, eval_episodes), "seed": 1, "deterministic": True}
    pbc.write_json_atomic(out / "bc.json", info)
    return info


def flow_matching_loss(field, actions, noise, t):
    """pi0's flow-matching loss: mean of |v(x_t, t) - (noise - actions)|^2 at x_t = t noise + (1 - t) actions.

    `field(x [B, H, A], t [B]) -> (v, std)` (`FlowChainDist.field`); t = 1 is noise, t = 0 the data, the
    convention of heads/flow.py, whose Euler steps from t = 1 to 0 then follow the learned velocity."""
    tb = t[:, None, None]
    v, _ = field(tb * noise + (1.0 - tb) * actions, t)
    return ((v - (noise - actions)) ** 2).mean()


def flow_times(key, batch: int):
    """pi0's training times t ~ Beta(1.5, 1) * 0.999 + 0.001 (more weight near the noise end, never 0)."""
    import jax

    return jax.random.beta(key, 1.5, 1.0, (batch,)) * 0.999 + 0.001


def bc_flow(out: Path, demos: Path, steps: int = 2400, batch_size: int = 64, lr: float = 1e-3, value_coef: float = 0.5,
            aux_coef: float = 1.0, seed: int = 0, eval_episodes: int = 256, head: dict | None = None,
            episodes: int = 10000) -> dict:
    """Behaviour-clone the random-init SmolVLM (`make`, seed 0, as `bc` starts) with the flow head on the VLReach demos.

    The Gaussian `bc`'s recipe with the flow-matching loss (`flow_matching_loss`) in place of the means' MSE,
    in JAX on the twin (FlowVLA, the policy fine-tuning builds): Adam, gradient norm clipped at 1, the rate
    decayed linearly to 10%, `value_coef` x the value head's MSE against the demos' discounted returns and
    `aux_coef` x a training-only probe's MSE to the instructed object's position. Chunk length 1 (the
    Gaussian example's). The noise network is not cloned (its std stays mid-bounds). Written: the VLM as an
    HF directory (bridge.hf_dir), `flow_head.safetensors` (expert, noise head, value head, proprio token,
    `flow_vla.head_state_dict`) that `policy.action_head` type 'flow' loads from it, and `bc.json` with the
    settings, the losses and the deterministic (ODE) evaluation of the saved directory as fine-tuning loads it.
    `episodes`: the demo file's expert episodes (bridge.pretrain_bc's 10000; fewer only for tests).
    """
    import tempfile
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from safetensors.numpy import save_file

    from bridge import hf_dir
    from bridge import pretrain_bc as pbc
    from jaxrl_vla.models.lm_policy import build_lm_model
    from jaxrl_vla.models.vla.flow_vla import HEAD_FILE, FlowVLA, head_state_dict

    head = dict(FLOW_HEAD if head is None else head, method="flow_noise")
    env = pbc.make_env()
    data = pbc.ensure_demos(Path(demos), episodes, 0, 0.1, env, pbc.ENV_KWARGS)
    _, target_xy = pbc.scene_labels(data, pbc.episode_scenes(data, env))
    returns = pbc.discounted_returns(data["reward"], data["episode_id"], pbc.GAMMA).astype(np.float32)
    train_rows, val_rows = pbc.split_episodes(data["episode_id"], 0.05)
    with tempfile.TemporaryDirectory() as tmp:  # transformers' random init, the Gaussian bc's starting point
        init_dir = make(Path(tmp) / "init", seed)
        config = hf_dir.read_config(init_dir)
        module, variables = build_lm_model({"action_chunk": 1, "action_head": head,
                                            "vla_config": {"model_path": str(init_dir)}}, env, np.float32)
    width = module.decoder.hidden_size
    params = {"model": variables["params"], "probe": {"w": jnp.zeros((width, 2)), "b": jnp.zeros((2,))}}
    schedule = optax.linear_schedule(lr, 0.1 * lr, steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    shape = (1,) + tuple(data["action"].shape[1:])

    def losses(p, batch, key):
        dist, value, readout = module.apply({"params": p["model"]}, batch["obs"], method=FlowVLA.forward)
        k_noise, k_t = jax.random.split(key)
        actions = batch["action"].reshape((-1,) + shape)
        noise = jax.random.normal(k_noise, actions.shape)
        flow = flow_matching_loss(dist.field, actions, noise, flow_times(k_t, actions.shape[0]))
        aux = jnp.mean((readout @ p["probe"]["w"] + p["probe"]["b"] - batch["target_xy"]) ** 2)
        return {"flow": flow, "value": jnp.mean((value - batch["returns"]) ** 2), "aux": aux}

    def total(p, batch, key):
        parts = losses(p, batch, key)
        return parts["flow"] + value_coef * parts["value"] + aux_coef * parts["aux"], parts

    @jax.jit
    def update(p, state, batch, key):
        (_, parts), grads = jax.value_and_grad(total, has_aux=True)(p, batch, key)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, parts

    def rows(index):
        return {"obs": pbc.numpy_batch(data, index), "action": data["action"][index], "returns": returns[index],
                "target_xy": target_xy[index].astype(np.float32)}

    order = np.random.default_rng(seed).permutation(np.resize(train_rows, steps * batch_size))
    key, t0, history = jax.random.PRNGKey(seed), time.perf_counter(), []
    for step in range(steps):  # one jitted update per minibatch (host-fed demos, as the Gaussian bc)
        key, sub = jax.random.split(key)
        params, opt_state, parts = update(params, opt_state, rows(order[step * batch_size:(step + 1) * batch_size]), sub)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, **{k: round(float(v), 4) for k, v in parts.items()},
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
    score = jax.jit(lambda p, b, k: losses(p, b, k)["flow"])
    val = [float(score(params, rows(val_rows[i:i + 256]), jax.random.PRNGKey(i))) * len(val_rows[i:i + 256])
           for i in range(0, len(val_rows), 256)]
    out = Path(out)
    model = jax.device_get(params["model"])
    hf_dir.save_hf_dir(out, config, {"params": model["lm"]}, overwrite=True)
    save_file(head_state_dict(model), str(out / HEAD_FILE))
    info = {"head": "flow", "action_head": head, "demos": str(demos), "steps": steps, "batch_size": batch_size,
            "lr": lr, "value_coef": value_coef, "aux_coef": aux_coef, "seed": seed,
            "train_seconds": round(time.perf_counter() - t0, 1), "history": history,
            "val_flow_loss": round(sum(val) / max(len(val_rows), 1), 4),
            "make": f"python -m bridge.tiny_smolvlm bc --head flow --out {out} --steps {steps}"}
    if eval_episodes:
        module, variables = build_lm_model({"action_chunk": 1, "action_head": head,
                                            "vla_config": {"model_path": str(out)}}, env, np.float32)
        info["eval"] = {**pbc.evaluate_policy(module, variables, env, eval_episodes), "seed": 1, "deterministic": True}
    pbc.write_json_atomic(out / "bc.json", info)
    return info


def export(run_dir: Path, out: Path) -> Path:
    """The run's trained VLM as a Hugging Face directory with the source directory's config.json."""
    from bridge import hf_dir
    from jaxrl_vla.eval import load_run

    run = load_run(run_dir)
    source = run.config["policy"]["vla_config"].get("model_path")
    if not source:
        raise ValueError(f"--run {run_dir}: its policy was not loaded from a Hugging Face directory "
                         "(policy.vla_config.model_path)")
    config = hf_dir.read_config(source)
    model = run.params["params"]["model"]
    path = hf_dir.save_hf_dir(out, config, {"params": model["lm"]})
    if "action_mean" in model:  # the Gaussian head (policy.action_head type 'gaussian') beside it, as bc writes it
        from safetensors.numpy import save_file

        from jaxrl_vla.models.vla.gaussian_vla import HEAD_FILE, head_state_dict

        save_file(head_state_dict({k: v for k, v in model.items() if k != "lm"}), str(Path(path) / HEAD_FILE))
    if "head" in model:  # the flow head (policy.action_head type 'flow'), as bc --head flow writes it
        from safetensors.numpy import save_file

        from jaxrl_vla.models.vla import flow_vla

        save_file(flow_vla.head_state_dict(model), str(Path(path) / flow_vla.HEAD_FILE))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write the random-init SmolVLM directory")
    p_make.add_argument("--out", type=Path, default=Path("checkpoints/tiny_smolvlm"))
    p_make.add_argument("--seed", type=int, default=0)
    p_export = sub.add_parser("export", help="write a trained run's VLM as a Hugging Face directory")
    p_export.add_argument("--run", type=Path, required=True)
    p_export.add_argument("--out", type=Path, required=True)
    p_bc = sub.add_parser("bc", help="behaviour-clone it with the Gaussian (or flow) head on the VLReach demos")
    p_bc.add_argument("--head", choices=("gaussian", "flow"), default="gaussian",
                      help="gaussian (torch, bc) or flow (JAX, bc_flow: flow-matching loss)")
    p_bc.add_argument("--out", type=Path, help="default checkpoints/tiny_smolvlm_bc (flow: checkpoints/tiny_smolvlm_flow_bc)")
    p_bc.add_argument("--demos", type=Path, default=Path("checkpoints/vl_reach_demos.npz"),
                      help="the demos bridge.pretrain_bc uses (made there when missing)")
    p_bc.add_argument("--steps", type=int, default=600, help="Adam steps (default 600)")
    p_bc.add_argument("--batch-size", type=int, default=64)
    p_bc.add_argument("--lr", type=float, default=1e-3)
    p_bc.add_argument("--log-std", type=float, default=-1.0, help="the Gaussian head's log-std after BC (default -1.0)")
    p_bc.add_argument("--eval-episodes", type=int, default=256)
    p_bc.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "bc" and (args.steps < 1 or args.batch_size < 1):
        print("error: --steps and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.command == "bc" and args.head == "flow":
            args.out = args.out or Path("checkpoints/tiny_smolvlm_flow_bc")
            info = bc_flow(args.out, args.demos, args.steps, args.batch_size, args.lr, seed=args.seed,
                           eval_episodes=args.eval_episodes)
            print(json.dumps({"command": "bc", "head": "flow", "out": str(args.out), "eval": info.get("eval")}))
            return 0
        if args.command == "bc":
            args.out = args.out or Path("checkpoints/tiny_smolvlm_bc")
            info = bc(args.out, args.demos, args.steps, args.batch_size, args.lr, args.log_std, seed=args.seed,
                      eval_episodes=args.eval_episodes)
            print(json.dumps({"command": "bc", "out": str(args.out), "eval": info.get("eval")}))
            return 0
        path = make(args.out, args.seed) if args.command == "make" else export(args.run, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, "out": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
