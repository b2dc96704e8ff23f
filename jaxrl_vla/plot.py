"""`python -m jaxrl_vla.plot RUN_DIR [RUN_DIR ...]`: learning curves of one or several runs in one PNG.

Reads each run's metrics.jsonl (one JSON object per iteration, written by
`jaxrl_vla.training.logging.RunLogger`) and draws one panel per metric --
return (training episodes solid, evaluation dashed), success rate, the PPO
losses, approx_kl, steps/s, learning rate -- with every run overlaid in its
own colour, so runs are compared panel by panel.

    python -m jaxrl_vla.plot runs/cartpole-20250101-120000
    python -m jaxrl_vla.plot runs/a runs/b --out compare.png --metrics return approx_kl loss/value
    python -m jaxrl_vla.plot runs/a --x iteration

Metrics are metrics.jsonl keys, or the panel names below (return, success_rate);
a panel no run has is left out, unless it was asked for by --metrics (then an
error names what the runs have). matplotlib (the dev extra) draws, with the Agg
backend (no display needed). Exit codes: 0 written, 2 bad arguments or a run
directory without metrics (one line; nothing written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# panel name -> (title, [(metrics.jsonl key, line style)]): the first of the pairs is the panel's main curve
PANELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "return": ("episode return (solid: training, dashed: evaluation)",
               [("episode_return_mean", "-"), ("eval/return_mean", "--")]),
    "success_rate": ("success rate (solid: training, dashed: evaluation)",
                     [("success_rate", "-"), ("eval/success_rate", "--")]),
    "loss/policy": ("policy loss", [("loss/policy", "-")]),
    "loss/value": ("value loss", [("loss/value", "-")]),
    "loss/entropy": ("entropy", [("loss/entropy", "-")]),
    "approx_kl": ("approx KL", [("approx_kl", "-")]),
    "sps": ("env steps per second", [("sps", "-")]),
    "learning_rate": ("learning rate", [("learning_rate", "-")]),
}
DEFAULT_METRICS = tuple(PANELS)
X_AXES = ("global_step", "iteration")


class PlotError(Exception):
    """A problem the user can fix (a directory without metrics, an unknown metric): exit code 2."""


@dataclass
class Run:
    """One run's metrics: its label and its records in iteration order."""

    label: str
    path: Path
    records: list[dict]

    def series(self, key: str, x_axis: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records holding a finite `key` (evaluation metrics exist only every eval_freq)."""
        xs, ys = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(record.get(x_axis, record.get("iteration")))
                ys.append(float(value))
        return xs, ys

    def has(self, key: str) -> bool:
        return any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in self.records)


def read_run(path: str | Path) -> Run:
    """A run directory's metrics.jsonl; a line that is not a JSON object (the torn last line of a killed
    run) is skipped. PlotError when the directory or its metrics are missing."""
    path = Path(path)
    if not path.is_dir():
        raise PlotError(f"{path}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{path}: no metrics.jsonl (is it a run directory made by jaxrl_vla.train?)")
    records = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            records.append(record)
    if not records:
        raise PlotError(f"{metrics}: no iteration logged yet")
    records.sort(key=lambda r: r["iteration"])
    return Run(path.name, path, records)


def unique_labels(runs: list[Run]) -> None:
    """Runs with the same directory name are labelled by their parent too (runs/a/x vs runs/b/x)."""
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"


def panels_for(runs: list[Run], metrics: list[str] | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels to draw: `metrics` (panel names or metrics.jsonl keys, each present in some run), or the
    default panels that some run has."""
    if metrics is None:
        chosen = [PANELS[name] for name in DEFAULT_METRICS
                  if any(run.has(key) for run in runs for key, _ in PANELS[name][1])]
        if not chosen:
            raise PlotError("the runs log none of the default metrics; name some with --metrics")
        return chosen
    out = []
    for name in metrics:
        panel = PANELS.get(name, (name, [(name, "-")]))
        if not any(run.has(key) for run in runs for key, _ in panel[1]):
            available = sorted({k for run in runs for r in run.records for k, v in r.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)} - set(X_AXES))
            raise PlotError(f"--metrics {name}: no run logs it; they log {', '.join(available)}")
        out.append(panel)
    return out


def plot_runs(runs: list[Run], out: Path, metrics: list[str] | None = None, x_axis: str = "global_step") -> Path:
    """Draw the panels of `runs` into the PNG `out` (its directory is made)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("jaxrl_vla.plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    panels = panels_for(runs, metrics)
    columns = min(len(panels), 3 if len(panels) > 4 else 2) if len(panels) > 1 else 1
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            for key, style in keys:
                xs, ys = run.series(key, x_axis)
                if xs:
                    ax.plot(xs, ys, style, color=colours[i % len(colours)], linewidth=1.4,
                            marker="o" if len(xs) == 1 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("env steps" if x_axis == "global_step" else "iteration", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # one legend for the figure: a colour per run, the same in every panel
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], linewidth=2) for i in range(len(runs))]
    legend_rows = -(-len(runs) // 3)
    fig.legend(handles, [run.label for run in runs], loc="upper center", ncol=min(len(runs), 3), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.15 + 0.22 * legend_rows) / (3.4 * rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxrl_vla.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", help="output .png (default: RUN_DIR/learning_curves.png for one run, "
                                      "./learning_curves.png for several)")
    parser.add_argument("--metrics", nargs="+",
                        help=f"panels or metrics.jsonl keys (default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--x", default="global_step", choices=X_AXES, help="x axis (default global_step)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    default_dir = Path(args.runs[0]) if len(args.runs) == 1 else Path(".")
    out = Path(args.out) if args.out else default_dir / "learning_curves.png"
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {out}: write a .png")
    runs = [read_run(path) for path in args.runs]
    unique_labels(runs)
    return plot_runs(runs, out, args.metrics, args.x)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
