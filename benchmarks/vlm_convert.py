"""Benchmark: a SmolVLM-500M-sized Hugging Face directory into the Flax twin (bridge.hf_dir), time and peak memory.

Why: issue 28's target for checkpoint directories as they lie on disk is a 0.5B model
read in < 15 s on 2 cores with peak extra memory <= 1.3x the weights' bytes.
`benchmarks/hf_convert.py` measures SigLIP towers written by the project's own
writer; this one writes the directory as a team's checkpoint lies: transformers'
`SmolVLMForConditionalGeneration`, random-init from SmolVLM(2)-500M's sizes, in
bf16, with `save_pretrained` (sharded, with model.safetensors.index.json). Writing
is setup and is not timed. The load runs in a fresh subprocess (hf_convert.py's
`--child`, which resets the peak-RSS counter after the imports), so torch's memory
from the setup does not count.

Sizes (SIZES below) are those of SmolVLM-Instruct-500M / SmolVLM2-500M: text model
hidden 960, 32 layers, 15 heads, 5 kv heads (head_dim 64), intermediate 2560,
rope_theta 100000, vocab 49280; SigLIP-base-patch16-512 vision tower (768, 12 layers,
12 heads, intermediate 3072); pixel-shuffle scale_factor 4; untied lm_head.

    python benchmarks/vlm_convert.py [--sizes smolvlm-500m] [--shard-size 500MB] [--no-write]

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
    "smolvlm-500m": dict(
        scale_factor=4, tie_word_embeddings=False,
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=49280, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, head_dim=64,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=2),
    ),
}  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_dir(path: Path, size: str, shard_size: str) -> tuple[int, int]:
    """Save a random-init bf16 SmolVLMForConditionalGeneration of SIZES[size]; (weights' bytes, parameters)."""
    import torch
    import transformers

    spec = SIZES[size]
    cfg = transformers.SmolVLMConfig(vision_config=spec["vision_config"], text_config=spec["text_config"],
                                     scale_factor=spec["scale_factor"], tie_word_embeddings=spec["tie_word_embeddings"])  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the setup memory and time
    try:
        model = transformers.SmolVLMForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path, max_shard_size=shard_size)
    n_params = sum(p.numel() for p in model.state_dict().values())
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
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
        "`python benchmarks/vlm_convert.py`: a random-init SmolVLMForConditionalGeneration with SmolVLM(2)-500M's "
        "sizes, written in bf16 by transformers' `save_pretrained` (sharded, not timed), read into the Flax twin by "
        "`bridge.hf_dir.load_hf_dir` (its own safetensors reader, no torch) in a fresh process. CPU only: no GPU was "
        f"lent to this measurement. 1-minute load average {rows[0]['loadavg_1m']} when it ran (2 cores shared with "
        "other jobs).",
        "",
        "| directory | params | weights | shards | load s (target < 15) | peak extra RSS | / weights (target <= 1.3x) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['size']} bf16 | {r['params'] / 1e6:.0f}M | {r['weights_bytes'] / 1e6:.0f} MB | {r['shards']} | "
                     f"{r['wall_s']:.2f} | {r['peak_extra_bytes'] / 1e6:.0f} MB | {r['peak_extra_over_weights']:.2f}x |")  # fmt: skip
    lines += ["", machine_line(m)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--shard-size", default="500MB", help="save_pretrained's max_shard_size")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / size
            weights, n_params = make_dir(d, size, args.shard_size)
            shards = len(list(d.glob("*.safetensors")))
            res = measure(d)
            row = {"bench": "vlm_convert", "size": size, "dtype": "bfloat16", "params": n_params, "shards": shards,
                   "weights_bytes": weights, "wall_s": round(res["wall_s"], 3),
                   "peak_extra_bytes": res["peak_extra_bytes"],
                   "peak_extra_over_weights": round(res["peak_extra_bytes"] / weights, 3),
                   "loadavg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.no_write:
        from _report import write_section

        write_section("vlm_convert", section(rows))


if __name__ == "__main__":
    main()
