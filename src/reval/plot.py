"""`reval plot RUN [RUN ...]`: any run's curves from its `metrics.jsonl`.

    reval plot runs/reval runs/grpo --out compare.png

Draws evaluation accuracy and mean reward against answers generated and against
training seconds, one line per run, so runs can be compared on either budget. Offline runs
(mle, iq, dpo, qadapter) generate no answers and earn no reward: their x axis is the
examples they learned from (demonstrations or pairs, what `samples` counts for them) and
their training curve is the loss, as a TRL trainer's log shows it.
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
    """The metric of the top row: any metric a run logged (eval/accuracy, eval/mean@8, loss/nll,
    rewards/accuracy, ...); auto: eval/accuracy if logged, else the first eval/ metric found."""


# The bottom row, by what a run logged: an online run's mean reward per round, else an offline
# run's loss; with the x axis's meaning (`samples`) and the y axis's label
TRAIN_METRICS = {
    "rollout/reward_mean": ("answers generated", "mean reward of the round's answers"),
    "loss/total": ("examples learned from (demonstrations or pairs)", "training loss"),
}
COUNTERS = ("round", "samples", "seconds", "updates")  # the x axes, not metrics


def _metrics_file(run: Path) -> Path:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl there; pass a run directory written by reval train")
    return path


def _logged(rows: list[dict]) -> list[str]:
    """The numeric metrics a run logged, in the order they first appear."""
    return list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in COUNTERS and isinstance(v, (int, float)) and not isinstance(v, bool)))


def _top_metric(logged: list[str], wanted: str) -> str | None:
    if wanted != "auto":
        return wanted if wanted in logged else None
    evals = [k for k in logged if k.startswith("eval/")]
    return "eval/accuracy" if "eval/accuracy" in evals else (evals[0] if evals else None)


def plot_runs(args: PlotArgs) -> Path:
    """Write the figure; returns its path. A run without the top row's metric contributes its
    training curve only; a run with nothing to draw is an error, never an empty figure."""
    if not args.runs:
        raise ValueError("reval plot: name at least one run directory")
    series = {}
    for run in args.runs:
        rows = read_metrics(_metrics_file(run))
        if not rows:
            raise ValueError(f"{run}: metrics.jsonl holds no records yet")
        logged = _logged(rows)
        metric = _top_metric(logged, args.metric)
        train = next((m for m in TRAIN_METRICS if m in logged), None)
        label = run.name if run.is_dir() else run.parent.name
        series[label if label not in series else str(run)] = s = {
            "metric": metric, "logged": logged, "train_metric": train,
            "eval": [r for r in rows if metric is not None and metric in r],
            "train": [r for r in rows if train is not None and train in r],
        }
        if not s["eval"] and not s["train"]:
            raise ValueError(f"{run}: nothing to plot: no eval/ metric, {' or '.join(TRAIN_METRICS)}; it logged: "
                             f"{', '.join(logged) or 'no metrics'}")
    if args.metric != "auto" and all(s["metric"] is None for s in series.values()):
        raise ValueError(f"--metric {args.metric}: no run logged it; they logged: "
                         + "; ".join(f"{label}: {', '.join(s['logged'])}" for label, s in series.items()))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({s["metric"] for s in series.values() if s["eval"]})
    drawn = [m for m in TRAIN_METRICS if any(s["train_metric"] == m for s in series.values())]
    panels = {}  # the rows with data, and their y labels
    if metrics:
        panels["eval"] = ", ".join(metrics) + (" (%)" if all(m.startswith("eval/") for m in metrics) else "")
    if drawn:
        panels["train"] = "\n".join(TRAIN_METRICS[m][1] for m in drawn)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 0.5 + 3.3 * len(panels)), sharey="row", squeeze=False)
    for row, (key, ylabel) in enumerate(panels.items()):
        for label, s in series.items():
            metric = s["metric"] if key == "eval" else s["train_metric"]
            scale = 100 if metric and metric.startswith("eval/") else 1  # accuracies in percent
            style = {"marker": "o", "markersize": 3} if key == "eval" else {}
            for col, x in enumerate(("samples", "seconds")):
                if s[key]:
                    axes[row, col].plot([r[x] for r in s[key]], [scale * r[metric] for r in s[key]], label=label,
                                        **style)
        axes[row, 0].set_ylabel(ylabel)
    budget = " / ".join(TRAIN_METRICS[m][0] for m in drawn) or "answers generated"  # what `samples` counts
    for col, xlabel in enumerate((budget, "training seconds (generation + updates)")):
        axes[-1, col].set_xlabel(xlabel)
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
