"""`reval plot RUN [RUN ...]`: any run's curves from its `metrics.jsonl`.

    reval plot runs/reval runs/grpo --out compare.png

Draws evaluation accuracy and mean reward against answers generated and against
training seconds, one line per run, so runs can be compared on either budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

from reval.metrics import read_metrics


@dataclass
class PlotArgs:
    """Draw accuracy and reward against answers generated and against seconds, one line per run."""

    runs: tyro.conf.Positional[tuple[Path, ...]]
    """Run directories (each holds a metrics.jsonl) or metrics.jsonl files."""
    out: Path | None = None
    """The image to write (.png, .pdf, .svg); default: plot.png in the first run directory."""
    metric: str = "auto"
    """The evaluation metric to draw (e.g. eval/accuracy, eval/mean@8); auto: eval/accuracy if
    logged, else the first eval/ metric found."""


def _metrics_file(run: Path) -> Path:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl there; pass a run directory written by reval train")
    return path


def _eval_metric(rows: list[dict], wanted: str) -> str | None:
    keys = [k for r in rows for k in r if k.startswith("eval/") and isinstance(r[k], (int, float))]
    if wanted != "auto":
        return wanted if wanted in keys else None
    return "eval/accuracy" if "eval/accuracy" in keys else (keys[0] if keys else None)


def plot_runs(args: PlotArgs) -> Path:
    """Write the figure; returns its path. A run without the metric contributes its reward only."""
    if not args.runs:
        raise ValueError("reval plot: name at least one run directory")
    series = {}
    for run in args.runs:
        rows = read_metrics(_metrics_file(run))
        if not rows:
            raise ValueError(f"{run}: metrics.jsonl holds no records yet")
        metric = _eval_metric(rows, args.metric)
        label = run.name if run.is_dir() else run.parent.name
        series[label if label not in series else str(run)] = {
            "metric": metric,
            "eval": [r for r in rows if metric is not None and metric in r],
            "train": [r for r in rows if "rollout/reward_mean" in r],
        }
    if args.metric != "auto" and all(s["metric"] is None for s in series.values()):
        raise ValueError(f"--metric {args.metric}: no run logged it")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for label, s in series.items():
        for col, x in enumerate(("samples", "seconds")):
            if s["eval"]:
                axes[0, col].plot([r[x] for r in s["eval"]], [100 * r[s["metric"]] for r in s["eval"]],
                                  marker="o", markersize=3, label=label)
            axes[1, col].plot([r[x] for r in s["train"]], [r["rollout/reward_mean"] for r in s["train"]],
                              label=label)
    metrics = sorted({s["metric"] for s in series.values() if s["metric"]})
    for col, xlabel in enumerate(("answers generated", "training seconds (generation + updates)")):
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel(f"{', '.join(metrics) or 'no eval metric'} (%)")
    axes[1, 0].set_ylabel("mean reward of the round's answers")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "plot.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
