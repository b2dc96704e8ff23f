"""Shared helpers for benchmark scripts: the machine's description and BENCHMARKS.md sections.

    from _report import machine, machine_line, write_section   # run from benchmarks/
    write_section("ppo_throughput", markdown)

Each benchmark owns one section of BENCHMARKS.md, delimited by
`<!-- NAME:start -->` and `<!-- NAME:end -->`. `write_section` replaces only that
section (appending it when absent, creating the file when needed). Several
scripts may write concurrently: the file is re-read under an exclusive lock
right before writing and replaced atomically, so other sections are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on. Versions are read from package metadata
    (torch is not imported); jax is imported for its backend and devices."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
    }
    try:
        load = os.getloadavg()
        info["loadavg_1m"] = round(load[0], 2)
    except OSError:
        pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception as err:  # noqa: BLE001 - a description must not fail the benchmark
        info["jax_backend"] = f"unavailable ({err.__class__.__name__})"
        info["jax_devices"] = []
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One Markdown line describing the machine, for the end of a section."""
    m = machine() if info is None else info
    parts = [
        f"{m['machine']} ({m['processor']})",
        f"{m['cpu_affinity'] or m['cpu_count']} CPUs",
    ]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    parts.append(f"jax {m['jax']} / jaxlib {m['jaxlib']} (backend {m.get('jax_backend')}, {len(m.get('jax_devices', []))} device(s))")
    if m.get("flax"):
        parts.append(f"flax {m['flax']}")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    parts.append(f"Python {m['python']}")
    parts.append(m["platform"])
    return "Machine: " + ", ".join(parts) + "."


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '.', '-': {name!r}")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, markdown: str) -> str:
    """`text` with section `name` replaced by `markdown` (appended when absent)."""
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if not text.strip():
        text = HEADER
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(name: str, markdown: str, path: str | Path = BENCHMARKS_MD) -> Path:
    """Replace section `name` of `path` (BENCHMARKS.md) with `markdown`; returns the path.

    Concurrent writers are serialised by a lock file in the temp directory, and
    the file is re-read under the lock, so only this section changes.
    """
    path = Path(path).resolve()
    lock_name = "benchmarks-" + hashlib.sha1(str(path).encode()).hexdigest()[:16] + ".lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            new = replace_section(text, name, markdown)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(new)
                if path.exists():
                    os.chmod(tmp, path.stat().st_mode & 0o777)
                else:
                    os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def plot_success_curves(path: Path, curves: dict, starts: dict, title: str, baseline: float | None = None,
                        labels: dict | None = None, colours: dict | None = None) -> Path:
    """Evaluation success against wall time and against env steps, one line per arm from its start level.

    curves: {arm: [{"global_step", "success_rate", "wall_s" (None when unknown)}, ...]} (finetune_curve.read_curve);
    starts: {arm: success rate before training}; baseline: a grey dashed line (the shared checkpoint's level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, colours = labels or {}, colours or {}
    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        timed = [p for p in curve if p["wall_s"] is not None]
        style = {"marker": ".", "color": colours.get(name), "label": labels.get(name, name)}
        by_time.plot([0] + [p["wall_s"] / 60 for p in timed], [starts[name]] + [p["success_rate"] for p in timed], **style)
        by_steps.plot([0] + [p["global_step"] for p in curve], [starts[name]] + [p["success_rate"] for p in curve], **style)
    for ax in (by_time, by_steps):
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="BC checkpoint")
        ax.set(ylabel="eval success rate (deterministic)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    by_time.set(xlabel="wall time (min, process start included)", title=title)
    by_steps.set(xlabel="env steps", title="same runs against env steps")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_averages() -> str:
    """`uptime`'s load averages (1/5/15 min) as "a/b/c": the 2 cores are shared, so each section says how busy they were."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())
