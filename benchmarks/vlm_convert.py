"""Benchmark: SmolVLM-500M- and PaliGemma-3B-sized Hugging Face directories into the Flax twins (bridge.hf_dir).

Why: issue 28's target for checkpoint directories as they lie on disk is a 0.5B model
read in < 15 s on 2 cores with peak extra memory <= 1.3x the weights' bytes (and a
PaliGemma-3B-sized one where it fits in the machine's memory).
`benchmarks/hf_convert.py` measures SigLIP towers written by the project's own
writer; this one writes the directory as a team's checkpoint lies: transformers'
`SmolVLMForConditionalGeneration` / `PaliGemmaForConditionalGeneration`, random-init
from the real models' sizes, in bf16, with `save_pretrained` (sharded, with model.safetensors.index.json). Writing
is setup and is not timed. The load runs in a fresh subprocess (hf_convert.py's
`--child`, which resets the peak-RSS counter after the imports), so torch's memory
from the setup does not count. The shards were just written, so the load reads them
from the page cache: a cold disk adds its read time on top.

Sizes (SIZES below): `smolvlm-500m` is SmolVLM-Instruct-500M / SmolVLM2-500M: text model
hidden 960, 32 layers, 15 heads, 5 kv heads (head_dim 64), intermediate 2560,
rope_theta 100000, vocab 49280; SigLIP-base-patch16-512 vision tower (768, 12 layers,
12 heads, intermediate 3072); pixel-shuffle scale_factor 4; untied lm_head.
`paligemma-3b` is paligemma-3b-pt-224 (see the entry). `toy` is for the smoke test.

    python benchmarks/vlm_convert.py [--sizes smolvlm-500m paligemma-3b] [--shard-size 500MB] [--no-write]

One JSON line per result on stdout, then the `vlm_convert` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {
    "toy": dict(
        scale_factor=2, tie_word_embeddings=False,
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=24, intermediate_size=40,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, pad_token_id=2),
    ),
    "smolvlm-500m": dict(
        scale_factor=4, tie_word_embeddings=False,
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=49280, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, head_dim=64,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=2),
    ),
    # PaliGemma-3B (pi0's VLM): SigLIP-so400m/14 at 224 px + linear projector + Gemma-2B (18 layers, 8 heads,
    # 1 kv head, head_dim 256, vocab 257216), tied lm_head
    "paligemma-3b": dict(
        architecture="paligemma", projection_dim=2048, image_token_index=257152, tie_word_embeddings=True,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=27, num_attention_heads=16, image_size=224, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="gemma", vocab_size=257216, hidden_size=2048, intermediate_size=16384,
                         num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                         hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                         pad_token_id=0),
    ),
}  # fmt: skip
from _report import load_averages  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# run a size only where MemAvailable holds this multiple of its weights: the writer's torch model (1x, freed
# before the load) and the load's peak (target 1.3x) with room for the reader's and jax's own memory
MEMORY_NEEDED = 2.0



def _model(size: str):
    """(transformers class, config) of SIZES[size]."""
    import transformers

    spec = dict(SIZES[size])
    if spec.pop("architecture", "smolvlm") == "paligemma":
        return transformers.PaliGemmaForConditionalGeneration, transformers.PaliGemmaConfig(**spec)
    return transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMConfig(**spec)


def weights_estimate(size: str) -> int:
    """bf16 bytes of SIZES[size]'s parameters (tied ones once), from a model on torch's meta device (no memory)."""
    import torch

    cls, cfg = _model(size)
    with torch.device("meta"):
        model = cls(cfg)
    return 2 * sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def make_dir(path: Path, size: str, shard_size: str) -> tuple[int, int]:
    """Save a random-init bf16 SmolVLM / PaliGemma ForConditionalGeneration of SIZES[size].

    Returns (weights' bytes, parameters).

    Bytes and parameters count each stored tensor once (a tied lm_head is not on disk, nor counted)."""
    import torch

    cls, cfg = _model(size)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the setup memory and time
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path, max_shard_size=shard_size)
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # tied weights once
    n_params = sum(t.numel() for t in tensors)
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return weights, n_params


def measure(path: Path) -> dict:
    """hf_convert.py's child: wall time and peak RSS above the post-import baseline of one load_hf_dir."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("hf_convert.py")), "--child", str(path)],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(rows: list[dict]) -> str:
    from _report import machine, machine_line

    m = machine()
    lines = [
        "## vlm_convert",
        "",
        "`python benchmarks/vlm_convert.py`: random-init SmolVLMForConditionalGeneration / "
        "PaliGemmaForConditionalGeneration with the sizes of SmolVLM(2)-500M and paligemma-3b-pt-224, written in bf16 "
        "by transformers' `save_pretrained` (sharded, not timed), read into the Flax twin by "
        "`bridge.hf_dir.load_hf_dir` (its own safetensors reader, no torch) in a fresh process, from the page cache "
        "(the shards were just written). Weights count each stored tensor once (PaliGemma's tied head is not on disk). "
        "CPU only: no GPU was "
        "lent to this measurement; 2 cores shared with other jobs (their `uptime` load averages, 1/5/15 min, "
        "before and after each row's run are in the table; the row's own setup, writing the directory, adds to them).",
        "",
        "| directory | params | weights | shards | load s (target < 15) | peak extra RSS | / weights (target <= 1.3x) | "
        "load before / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']} bf16 | not run: its weights ({r['weights_bytes'] / 1e9:.1f} GB) need "
                         f"{MEMORY_NEEDED:g}x free memory, {r['available_bytes'] / 1e9:.1f} GB was available "
                         "| | | | | | |")  # fmt: skip
            continue
        lines.append(f"| {r['size']} bf16 | {r['params'] / 1e6:.0f}M | {r['weights_bytes'] / 1e6:.0f} MB | {r['shards']} | "
                     f"{r['wall_s']:.2f} | {r['peak_extra_bytes'] / 1e6:.0f} MB | {r['peak_extra_over_weights']:.2f}x | "
                     f"{r['load_before']} / {r['load_after']} |")  # fmt: skip
    lines += ["", machine_line(m)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["smolvlm-500m", "paligemma-3b"], choices=list(SIZES))
    ap.add_argument("--shard-size", default="500MB", help="save_pretrained's max_shard_size")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes:
        load_before = load_averages()
        estimate, available = weights_estimate(size), _available_bytes()
        if available < MEMORY_NEEDED * estimate:  # the torch model while writing, then the load's peak
            row = {"bench": "vlm_convert", "size": size, "dtype": "bfloat16", "skipped": True,
                   "weights_bytes": estimate, "available_bytes": available}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / size
            weights, n_params = make_dir(d, size, args.shard_size)
            shards = len(list(d.glob("*.safetensors")))
            res = measure(d)
            row = {"bench": "vlm_convert", "size": size, "dtype": "bfloat16", "params": n_params, "shards": shards,
                   "weights_bytes": weights, "wall_s": round(res["wall_s"], 3),
                   "peak_extra_bytes": res["peak_extra_bytes"],
                   "peak_extra_over_weights": round(res["peak_extra_bytes"] / weights, 3),
                   "load_before": load_before, "load_after": load_averages()}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.no_write:
        from _report import write_section

        write_section("vlm_convert", section(rows))
    return rows


if __name__ == "__main__":
    main()
