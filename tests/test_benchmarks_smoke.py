"""benchmarks/ppo_update_vs_torch.py at a toy size: the JAX and torch PPO losses agree and both updates run.

The script asserts that jaxrl_vla's ppo_loss on GaussianVLA (Flax Llama twin read by bridge.hf_dir)
equals the torch loss on transformers' LlamaModel with the same head maths, with and without LoRA;
a drift in either side's maths (or in the conversion) fails here before it skews a benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_ppo_update_vs_torch_toy():
    import ppo_update_vs_torch as bench

    rows = bench.main(["--size", "toy", "--repeats", "1", "--no-write"])
    assert [r["variant"] for r in rows] == ["full", "lora"]
    for r in rows:
        assert np.isclose(r["loss_jax"], r["loss_torch"], rtol=1e-4)
        assert r["jax_update_s"] > 0 and r["torch_update_s"] > 0
    assert rows[1]["trainable"] < rows[0]["trainable"]  # LoRA trains only adapters and heads
    assert rows[0]["loss_jax"] != rows[1]["loss_jax"]  # the adapters (B != 0) take part in the loss


def test_vlm_convert_toy():
    """benchmarks/vlm_convert.py at the toy size: the row counts the toy SmolVLM's weights and the load ran."""
    import vlm_convert as bench

    (row,) = bench.main(["--sizes", "toy", "--no-write"])
    # the toy config's parameters by hand: SigLIP (conv patch embed, 16 positions, 1 layer, post-norm),
    # the connector (hidden 16 * scale 2**2 -> 24, no bias), Llama (embed, attention with 2 of 4 kv heads, MLP, norms)
    # and the untied head
    layer = 4 * (16 * 16 + 16) + 2 * 2 * 16 + (16 * 24 + 24) + (24 * 16 + 16)
    vision = (3 * 4 * 4 * 16 + 16) + 16 * 16 + layer + 2 * 16
    connector = 16 * 2**2 * 24
    text = 64 * 24 + (2 * 24 * 24 + 2 * 24 * 12) + 3 * 24 * 40 + 2 * 24 + 24
    assert row["params"] == vision + connector + text + 64 * 24
    assert row["weights_bytes"] == 2 * row["params"] == bench.weights_estimate("toy")  # bf16
    assert row["shards"] == 1 and row["wall_s"] > 0 and row["peak_extra_bytes"] > 0
    assert row["peak_extra_over_weights"] == round(row["peak_extra_bytes"] / row["weights_bytes"], 3)
    table = bench.section([row])
    assert f"| toy bf16 | 0M | 0 MB | 1 | {row['wall_s']:.2f} |" in table
    assert f"{row['peak_extra_over_weights']:.2f}x | {row['load_before']} / {row['load_after']} |" in table


def test_vlm_convert_skips_a_size_that_does_not_fit(monkeypatch):
    """Too little free memory: the row says so (weights, available), nothing is written or loaded."""
    import vlm_convert as bench

    monkeypatch.setattr(bench, "_available_bytes", lambda: 10**9)
    monkeypatch.setattr(bench, "make_dir", lambda *a: pytest.fail("wrote a directory that cannot be loaded"))
    (row,) = bench.main(["--sizes", "paligemma-3b", "--no-write"])
    assert row["skipped"] and row["available_bytes"] == 10**9
    assert 5.8e9 < row["weights_bytes"] < 5.9e9  # PaliGemma-3B in bf16, the tied head once
    assert "| paligemma-3b bf16 | not run: its weights (5.8 GB) need 2x free memory, 1.0 GB was available" in (
        bench.section([row])
    )
