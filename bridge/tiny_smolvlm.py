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
    lm = run.params["params"]["model"]["lm"]
    return hf_dir.save_hf_dir(out, config, {"params": lm})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write the random-init SmolVLM directory")
    p_make.add_argument("--out", type=Path, default=Path("checkpoints/tiny_smolvlm"))
    p_make.add_argument("--seed", type=int, default=0)
    p_export = sub.add_parser("export", help="write a trained run's VLM as a Hugging Face directory")
    p_export.add_argument("--run", type=Path, required=True)
    p_export.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        path = make(args.out, args.seed) if args.command == "make" else export(args.run, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"command": args.command, "out": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
