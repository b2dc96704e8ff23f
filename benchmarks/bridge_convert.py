"""Benchmark: TensorDict -> JAX for a VLA-sized batch, zero-copy vs a numpy copy.

Why: the bridge's promise is that handing a collector's batch to the JAX
learner costs per-leaf bookkeeping only, flat in the number of bytes, while
the obvious ``jnp.asarray(t.numpy())`` costs a memcpy that grows with the
batch. This script measures both over batch sizes growing 100x, prints one
JSON line per (batch, method), and rewrites its own section of BENCHMARKS.md.

    python benchmarks/bridge_convert.py [--reps 30] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import torch
from tensordict import TensorDict

from bridge.convert import ALIGNMENT, ConversionStats, aligned_empty, td_to_jax

BATCHES = (1, 4, 16, 64, 100)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _report
from _report import machine_line, write_section  # noqa: E402


def make_batch(b: int, seed: int = 0) -> TensorDict:
    """A VLA observation batch with every leaf in a 64-byte-aligned buffer.

    Leaves are filled once; only the conversion is timed.
    """
    g = torch.Generator().manual_seed(seed)

    def filled(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = aligned_empty(shape, dtype)
        if dtype == torch.uint8:
            out.copy_(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))
        elif dtype == torch.int32:
            out.copy_(torch.randint(0, 1000, shape, generator=g, dtype=torch.int32))
        elif dtype == torch.bool:
            out.copy_(torch.rand(shape, generator=g) > 0.3)
        else:
            out.copy_(torch.rand(shape, generator=g))
        assert out.data_ptr() % ALIGNMENT == 0
        return out

    return TensorDict(
        {
            "observation": {
                "rgb": filled((b, 224, 224, 3), torch.uint8),
                "depth": filled((b, 224, 224, 1), torch.float32),
                "proprio": filled((b, 8), torch.float32),
            },
            "language": {
                "tokens": filled((b, 16), torch.int32),
                "mask": filled((b, 16), torch.bool),
            },
        },
        batch_size=[b],
    )


def zero_copy(td: TensorDict) -> dict[str, Any]:
    """The bridge path; strict so that a silent copy would fail the benchmark."""
    return td_to_jax(td, strict=True)


def numpy_copy(td: TensorDict) -> dict[str, Any]:
    """The naive baseline: one host copy per leaf through numpy."""
    return {
        group: {key: jnp.asarray(t.numpy()) for key, t in sub.items()}
        for group, sub in td.items()
    }


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` including ``block_until_ready`` on its result."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def nbytes(td: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in td.values(include_nested=True, leaves_only=True))




def run(batches: tuple[int, ...], reps: int) -> list[dict[str, Any]]:
    results = []
    for b in batches:
        td = make_batch(b)
        stats = ConversionStats()
        td_to_jax(td, stats=stats)
        assert stats.copies == 0, stats.events  # the zero-copy claim, checked
        for method, fn in (("zero_copy", zero_copy), ("numpy_copy", numpy_copy)):
            row = {
                "bench": "bridge_convert",
                "batch": b,
                "bytes": nbytes(td),
                "method": method,
                "median_ms": round(median_ms(lambda: fn(td), reps), 4),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def markdown(results: list[dict[str, Any]], reps: int) -> str:
    """The BENCHMARKS.md section, markers included."""
    by = {(r["batch"], r["method"]): r for r in results}
    lines = [
        "## bridge_convert",
        "",
        "`td_to_jax` (DLPack, strict zero-copy, 64-byte-aligned sources) vs `jnp.asarray(t.numpy())` per leaf,",
        "for a VLA batch: rgb B x 224 x 224 x 3 uint8, depth B x 224 x 224 x 1 float32, proprio B x 8 float32,",
        f"language tokens B x 16 int32 + mask bool (5 leaves). Median of {reps} runs, `block_until_ready` included.",
        "Produced by `python benchmarks/bridge_convert.py`.",
        "",
        "| batch | MB | zero_copy ms | numpy_copy ms | copy / zero-copy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b in sorted({r["batch"] for r in results}):
        z, c = by[(b, "zero_copy")], by[(b, "numpy_copy")]
        ratio = c["median_ms"] / z["median_ms"] if z["median_ms"] else float("inf")
        lines.append(
            f"| {b} | {z['bytes'] / 1e6:.2f} | {z['median_ms']:.3f} | {c['median_ms']:.3f} | {ratio:.1f}x |"
        )
    lines += ["", machine_line()]
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    results = run(tuple(args.batches), args.reps)
    if not args.no_write:
        write_section("bridge_convert", markdown(results, args.reps))


if __name__ == "__main__":
    main()
