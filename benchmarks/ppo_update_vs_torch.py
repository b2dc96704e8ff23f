"""Benchmark: one PPO update of a small Llama-family VLA, jaxrl_vla's jitted `ppo.update` against torch eager.

Why: issue 28 asks whether fine-tuning a torch VLA through its Flax twin pays on the
learner side (target: JAX >= 1.2x torch eager in wall time), fully and with LoRA.

The model: GaussianVLA on a DecoderLM (Llama: RMSNorm, RoPE, GQA, SwiGLU) from SIZES,
[instruction tokens (right-padded), proprio token] -> readout at the last position ->
Gaussian action mean + learned log-std, value head. The torch side is transformers'
own LlamaModel from the same config and the same weights (the JAX side reads them
from its save_pretrained directory with bridge.hf_dir) with the same head maths
written in torch; LoRA (rank 16 on q_proj / v_proj, alpha 32) as W + (alpha/r) A B with
the same A and B on both sides (B drawn non-zero, so the adapters take part in the
loss check), only adapters and heads trained. The same loss (PPO clipped surrogate,
value loss, entropy bonus, normalised advantages), optimiser (global-norm clip 0.5,
Adam eps 1e-5) and batch. Before timing, both sides' loss on the same batch is
asserted equal (rtol 1e-4).

One update = n_epochs x minibatches of `--minibatch` rows: jaxrl_vla.algo.ppo.update
jitted (lax.scan over minibatches) against the same loop in torch eager. Timed:
median of `--repeats` updates after a warm-up; the JAX compile (first call) is
reported apart. Both sides run in this process one after the other, 2 torch threads.

    python benchmarks/ppo_update_vs_torch.py [--size small] [--repeats 5] [--no-write]

One JSON line per result on stdout, then the `ppo_update_vs_torch` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import load_averages  # noqa: E402

SIZES = {
    "toy": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, seq=6, proprio=3, action=2, minibatch=8, minibatches=2),
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, seq=24, proprio=8, action=4, minibatch=32, minibatches=4),
}  # fmt: skip
LORA = dict(rank=16, alpha=32.0, targets=("q_proj", "v_proj"))
HEADS = ("proprio_proj", "action_mean", "log_std", "value_head")
CLIP, VF_COEF, ENT_COEF, MAX_GRAD_NORM, LR = 0.2, 0.5, 0.01, 0.5, 1e-4


def llama_config(size: dict):
    import transformers

    return transformers.LlamaConfig(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                                    intermediate_size=size["intermediate_size"],
                                    num_hidden_layers=size["num_hidden_layers"],
                                    num_attention_heads=size["num_attention_heads"],
                                    num_key_value_heads=size["num_key_value_heads"], rms_norm_eps=1e-6,
                                    max_position_embeddings=256, tie_word_embeddings=False,
                                    pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip


def make_batch(size: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A PPO batch as a rollout would leave it (random, right-padded instructions of varied lengths)."""
    rng = np.random.default_rng(seed)
    n, t = size["minibatch"] * size["minibatches"], size["seq"]
    lengths = rng.integers(t // 2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {
        "ids": (rng.integers(0, size["vocab_size"], (n, t)) * mask).astype(np.int32), "mask": mask,
        "proprio": rng.standard_normal((n, size["proprio"])).astype(np.float32),
        "action": rng.standard_normal((n, size["action"])).astype(np.float32),
        "log_prob": (rng.standard_normal(n) - 4.0).astype(np.float32),
        "value": rng.standard_normal(n).astype(np.float32),
        "advantage": rng.standard_normal(n).astype(np.float32),
        "returns": rng.standard_normal(n).astype(np.float32),
    }  # fmt: skip


# ----------------------------------------------------------------------------- torch side


class TorchVLA:
    """transformers' LlamaModel + proprio token + GaussianVLA's head maths, in torch."""

    def __init__(self, lm, size: dict, head: dict[str, np.ndarray], lora: dict[str, tuple[np.ndarray, np.ndarray]] | None):
        import torch

        self.lm, self.size = lm, size
        self.head = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in head.items()}
        self.lora: dict[str, tuple] = {}
        self.scale = LORA["alpha"] / LORA["rank"]
        if lora is not None:  # {"layers_i/q_proj": (A [in, r], B [r, out])} as forward hooks on the Linear
            for name, (a, b) in lora.items():
                i, proj = re.fullmatch(r"layers_(\d+)/(\w+)", name).groups()
                linear = getattr(lm.layers[int(i)].self_attn, proj)
                pa, pb = torch.nn.Parameter(torch.from_numpy(np.array(a))), torch.nn.Parameter(torch.from_numpy(np.array(b)))
                self.lora[name] = (pa, pb)
                linear.register_forward_hook(lambda mod, inp, out, pa=pa, pb=pb: out + self.scale * (inp[0] @ pa) @ pb)
            for p in lm.parameters():
                p.requires_grad_(False)

    def trainable(self) -> list:
        adapters = [p for ab in self.lora.values() for p in ab]
        return list(self.head.values()) + (adapters if self.lora else list(self.lm.parameters()))

    def loss(self, b: dict) -> "torch.Tensor":
        import torch

        h = self.head
        embeds = self.lm.embed_tokens(b["ids"].long())
        proprio = b["proprio"] @ h["proprio_proj.kernel"] + h["proprio_proj.bias"]
        embeds = torch.cat([embeds, proprio[:, None]], dim=1)
        mask = torch.cat([b["mask"].long(), torch.ones(embeds.shape[0], 1, dtype=torch.long)], dim=1)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        readout = hidden[:, -1]  # the proprio token: always the last real position
        mean = readout @ h["action_mean.kernel"] + h["action_mean.bias"]
        value = (readout @ h["value_head.kernel"] + h["value_head.bias"])[:, 0]
        log_std = h["log_std"].expand_as(mean)
        z = (b["action"] - mean) * torch.exp(-log_std)
        log_prob = (-0.5 * z * z - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        entropy = (0.5 + 0.5 * np.log(2 * np.pi) + log_std).sum(-1)
        adv = b["advantage"]
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
        ratio = torch.exp(log_prob - b["log_prob"])
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
        value_loss = 0.5 * ((value - b["returns"]) ** 2).mean()
        return -surrogate.mean() + VF_COEF * value_loss - ENT_COEF * entropy.mean()


def torch_update(model: TorchVLA, opt, batch: dict, size: dict, gen) -> None:
    """One epoch of shuffled minibatch steps, as ppo.update with n_epochs=1."""
    import torch

    params = model.trainable()
    order = torch.randperm(size["minibatch"] * size["minibatches"], generator=gen)
    for m in range(size["minibatches"]):
        rows = order[m * size["minibatch"] : (m + 1) * size["minibatch"]]
        loss = model.loss({k: v[rows] for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()


# ----------------------------------------------------------------------------- benchmark



def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeats` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def run(size_name: str, repeats: int, threads: int = 2) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from bridge import hf_dir
    from jaxrl_vla.algo import ppo
    from jaxrl_vla.models.vla.gaussian_vla import GaussianVLA
    from jaxrl_vla.models.vla.llama import DecoderConfig
    from jaxrl_vla.models.vla.lora import LoraConfig, apply_lora, init_lora, lora_trainable_mask
    from jaxrl_vla.types import Batch

    torch.set_num_threads(threads)
    load_before = load_averages()
    size = SIZES[size_name]
    torch.manual_seed(0)
    lm = transformers.LlamaModel(llama_config(size)).float()
    initial = copy.deepcopy(lm.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_pretrained(tmp)
        config = hf_dir.read_config(tmp)
        _, lm_vars, _ = hf_dir.load_hf_dir(tmp)
    model = GaussianVLA(DecoderConfig.from_hf_dict(config), (1, size["action"]), proprio_dim=size["proprio"],
                        input_key="ids", mask_key="mask")  # fmt: skip
    data = make_batch(size)
    obs = {k: jnp.asarray(data[k]) for k in ("ids", "mask", "proprio")}
    fresh = jax.jit(model.init)(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[:1], obs))  # jitted: one compile
    rng = np.random.default_rng(1)
    params = {**fresh["params"], "lm": lm_vars["params"]}
    for k in ("action_mean", "value_head"):  # non-trivial heads, so the readout matters in the loss check
        params[k] = {"kernel": jnp.asarray(0.05 * rng.standard_normal(params[k]["kernel"].shape), jnp.float32),
                     "bias": params[k]["bias"]}  # fmt: skip
    variables = {"params": params}
    head = {f"{m}.{leaf}": np.asarray(params[m][leaf]) for m in ("proprio_proj", "action_mean", "value_head") for leaf in ("kernel", "bias")}
    head["log_std"] = np.asarray(params["log_std"])
    batch = Batch(obs=obs, action=jnp.asarray(data["action"]), log_prob=jnp.asarray(data["log_prob"]),
                  value=jnp.asarray(data["value"]), advantage=jnp.asarray(data["advantage"]),
                  returns=jnp.asarray(data["returns"]), chunk_index=jnp.zeros(len(data["value"]), jnp.int32))  # fmt: skip
    tbatch = {k: torch.from_numpy(v) for k, v in data.items()}
    cfg = ppo.PPOConfig(learning_rate=LR, n_epochs=1, batch_size=size["minibatch"], clip_coef=CLIP, vf_coef=VF_COEF,
                        ent_coef=ENT_COEF, max_grad_norm=MAX_GRAD_NORM)  # fmt: skip
    samples = size["minibatch"] * size["minibatches"]
    results = []
    for variant in ("full", "lora"):
        if variant == "full":
            train_params, mask = variables, None
            apply_fn = model.apply
            torch_lora = None
        else:
            lcfg = LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"], targets=LORA["targets"])
            lora = init_lora(jax.random.PRNGKey(2), variables, lcfg)
            lora = {p: {"A": ab["A"], "B": jnp.asarray(0.02 * rng.standard_normal(ab["B"].shape), jnp.float32)}
                    for p, ab in lora.items()}  # fmt: skip
            train_params = {"base": variables, "lora": lora}
            mask = lora_trainable_mask(variables, lora, head_prefixes=[f"params/{h}" for h in HEADS])
            apply_fn = lambda p, o, lcfg=lcfg: model.apply(apply_lora(p["base"], p["lora"], lcfg), o)  # noqa: E731
            torch_lora = {re.search(r"layers_\d+/self_attn/(\w+)", p).group(0).replace("/self_attn", ""): (ab["A"], ab["B"])
                          for p, ab in lora.items()}  # fmt: skip
        tmodel = TorchVLA(lm, size, head, torch_lora)
        # the same loss on the same batch, before any step
        jax_loss = float(jax.jit(lambda p: ppo.ppo_loss(p, apply_fn, batch, cfg)[0])(train_params))
        with torch.no_grad():
            torch_loss = float(tmodel.loss(tbatch))
        if not np.isclose(jax_loss, torch_loss, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{variant}: JAX loss {jax_loss!r} != torch loss {torch_loss!r}")
        optimizer = ppo.make_optimizer(cfg, 10**6, trainable_mask=mask)
        step = jax.jit(lambda p, s, k: ppo.update(p, s, batch, k, apply_fn=apply_fn, optimizer=optimizer, cfg=cfg,
                                                  trainable_mask=mask)[:2])  # fmt: skip
        state = {"p": train_params, "s": optimizer.init(train_params), "k": jax.random.PRNGKey(3)}

        def jax_once():
            state["k"], key = jax.random.split(state["k"])
            state["p"], state["s"] = jax.block_until_ready(step(state["p"], state["s"], key))

        compile_s, jax_s = _median_time(jax_once, repeats)
        opt = torch.optim.Adam(tmodel.trainable(), lr=LR, eps=1e-5)
        gen = torch.Generator().manual_seed(0)
        warm_s, torch_s = _median_time(lambda: torch_update(tmodel, opt, tbatch, size, gen), repeats)
        n_train = sum(int(np.prod(p.shape)) for p in tmodel.trainable())
        n_all = sum(p.numel() for p in lm.parameters()) + sum(v.size for v in head.values())
        row = {"bench": "ppo_update_vs_torch", "size": size_name, "variant": variant, "params": int(n_all),
               "trainable": n_train, "samples_per_update": samples, "minibatch": size["minibatch"],
               "seq": size["seq"] + 1, "loss_jax": jax_loss, "loss_torch": torch_loss,
               "jax_compile_s": round(compile_s, 3), "jax_update_s": round(jax_s, 5), "torch_first_s": round(warm_s, 3),
               "torch_update_s": round(torch_s, 5), "jax_samples_per_s": round(samples / jax_s, 1),
               "torch_samples_per_s": round(samples / torch_s, 1), "jax_over_torch": round(torch_s / jax_s, 3),
               "loadavg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
        row["load_before"], row["load_after"] = load_before, load_averages()
        print(json.dumps(row), flush=True)
        results.append(row)
        if variant == "full":  # the LoRA variant starts from the same, untrained base weights
            lm = transformers.LlamaModel(llama_config(size)).float()
            lm.load_state_dict(initial, strict=True)
    return results


def section(rows: list[dict]) -> str:
    from _report import machine, machine_line

    r0 = rows[0]
    lines = [
        "## ppo_update_vs_torch",
        "",
        f"`python benchmarks/ppo_update_vs_torch.py`: one PPO update ({r0['samples_per_update']} samples, minibatches of "
        f"{r0['minibatch']}, sequence {r0['seq']} tokens) of GaussianVLA on a Llama DecoderLM "
        f"({r0['params'] / 1e6:.1f}M parameters), jaxrl_vla's jitted `ppo.update` against transformers' LlamaModel + the "
        "same head, loss, clip and Adam in torch eager (sdpa attention, 2 threads), same weights and batch; both losses "
        "asserted equal first. Median of the timed updates after the first. CPU only: no GPU was lent to this "
        f"measurement; 2 cores shared with other jobs (load average 1/5/15 min {r0['load_before']} before the run, "
        f"{rows[-1]['load_after']} after it), so "
        "read the ratios, measured side by side in one process, rather than the absolute rates.",
        "",
        "| variant | trainable params | loss JAX / torch | JAX compile s | JAX update s | torch update s | "
        "JAX samples/s | torch samples/s | JAX / torch (target >= 1.2x) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['loss_jax']:.5f} / {r['loss_torch']:.5f} | "
                     f"{r['jax_compile_s']:.1f} | {r['jax_update_s']:.4f} | {r['torch_update_s']:.4f} | "
                     f"{r['jax_samples_per_s']:,.0f} | {r['torch_samples_per_s']:,.0f} | {r['jax_over_torch']:.2f}x |")
    lines += ["", machine_line(machine())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=5, help="timed updates per side after the first")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    rows = run(args.size, args.repeats)
    if not args.no_write:
        from _report import write_section

        write_section("ppo_update_vs_torch", section(rows))
    return rows


if __name__ == "__main__":
    main()
