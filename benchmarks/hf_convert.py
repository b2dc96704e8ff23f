"""Benchmark: converting a Hugging Face model directory into Flax (bridge.hf_dir), time and peak memory.

Why: issue 28 asks that a directory as it lies on disk converts shard by shard
with peak extra memory <= 1.3x the weights' bytes (and a 0.5B model in < 15 s
on 2 cores). The directory is random-init (no download): shapes from the
twin's own `eval_shape`, values drawn with numpy, written by `save_hf_dir` in
2 GB-or-smaller shards (so it is also a sharded read). Each load runs in a
fresh subprocess that imports everything, resets the kernel's peak-RSS counter
(/proc/self/clear_refs) and reports wall time and peak RSS above that baseline
(VmHWM), against the weights' bytes. One JSON line per result on stdout.

Sizes: `siglip-so400m` (PaliGemma's / pi0's vision tower, ~0.4B params) and
`siglip-base` (SmolVLM-sized vision tower). Decoder families register into
bridge.hf_dir later and can be added to SIZES then.

    python benchmarks/hf_convert.py [--sizes siglip-base siglip-so400m] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "siglip-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=512, patch_size=16),
    "siglip-so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                          image_size=384, patch_size=14),
}  # fmt: skip


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def make_dir(path: Path, size: str, dtype: str) -> int:
    """Write a random-init SiglipVisionModel directory; return the weights' bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bridge import hf_dir

    config = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
              "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True, **SIZES[size]}  # fmt: skip
    module, example = hf_dir.architecture_of(config)[1].factory(config)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)
    rng = np.random.default_rng(0)
    np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.float32
    variables = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(np_dtype), shapes)
    hf_dir.save_hf_dir(path, config, variables, max_shard_bytes=2 * 10**9 // 10)
    return sum(int(np.prod(v.shape)) * np.dtype(np_dtype).itemsize for v in jax.tree.leaves(variables))


def child_load(path: Path) -> None:
    import jax

    from bridge import hf_dir

    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    _, variables, _ = hf_dir.load_hf_dir(path)
    jax.block_until_ready(variables)
    wall = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({"wall_s": wall, "peak_extra_bytes": (peak - base) * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_load(Path(args.child))
        return
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / size
            weights = make_dir(d, size, args.dtype)
            shards = len(list(d.glob("*.safetensors")))
            out = subprocess.run([sys.executable, __file__, "--child", str(d)], capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"bench": "hf_dir_load", "size": size, "dtype": args.dtype, "shards": shards,
                              "weights_bytes": weights, "wall_s": round(res["wall_s"], 3),
                              "peak_extra_bytes": res["peak_extra_bytes"],
                              "peak_extra_over_weights": round(res["peak_extra_bytes"] / weights, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
