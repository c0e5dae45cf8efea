"""`reval demo`: ReVal vs GRPO from a shipped warm start, same budget of generated answers.

Trains each algorithm on an embedded task from the same warm start, with the same prompts
per round, answers per prompt and number of rounds, then prints a table (start / final
test accuracy, answers to a threshold, answers generated, seconds), writes `summary.json`
and a PNG of test accuracy against answers generated (and against seconds).

The default task is `mul`, where learning is gradual and the methods separate; `--task
add` is the two-round habit flip of the addition task. Each algorithm's settings below
were tuned on the validation split (`mul`: ReVal and GRPO by the staged grid of
benchmarks/replay_study.py, results/replay/grid.json, stage D: learning rate, reuse K, the
shape P x G of a round of 128 answers and, for ReVal, the buffer and reference reset; TBRM
by benchmarks/results/mul/tuning.json; `add`: benchmarks/tune_demo.sh); the demo reports
the test split. Every algorithm generates the same 128 answers a round; the shape of the
round is part of what was tuned.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from reval.config import TrainConfig
from reval.metrics import read_metrics
from reval.train import train

# Per task: the demo's length and, per algorithm, the settings that differ from TrainConfig's
# defaults, tuned on the validation split.
DEMOS: dict[str, dict] = {
    "mul": {"rounds": 20, "eval_every": 2, "threshold": 0.6, "algos": {
        # benchmarks/results/replay/grid.json, stage D (3 seeds, validation)
        "reval": {"buffer.updates_per_round": 8, "optim.lr": 1e-4, "rollout.prompts_per_round": 32,
                  "rollout.samples_per_prompt": 4, "buffer.capacity": 2560},  # no reference reset: the default
        "grpo": {"buffer.updates_per_round": 4, "optim.lr": 5e-5, "rollout.prompts_per_round": 32,
                 "rollout.samples_per_prompt": 4},
        # benchmarks/results/mul/tuning.json (TBRM is not in the staged grid)
        "tbrm": {"buffer.updates_per_round": 1, "optim.lr": 1e-4},
    }},
    "add": {"rounds": 15, "eval_every": 1, "threshold": 0.9, "algos": {
        "reval": {"buffer.updates_per_round": 2, "optim.lr": 3e-4},
        "tbrm": {"buffer.updates_per_round": 1, "optim.lr": 3e-4},
        "grpo": {"buffer.updates_per_round": 1, "optim.lr": 3e-4},
    }},
}


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    """Directory for the runs, summary.json and demo.png."""
    task: Literal["mul", "add"] = "mul"
    """Embedded task: mul (gradual, where methods separate) or add (a two-round habit flip)."""
    rounds: int | None = None
    """Generation rounds per algorithm (each: 128 answers, P x G as tuned); None: the task's demo length."""
    algos: tuple[str, ...] = ("reval", "grpo")
    """Algorithms to compare."""
    seed: int = 0
    """Seed shared by all algorithms."""
    eval_every: int | None = None
    """Evaluate on the test split (200 problems, greedy) every N rounds; None: the task's."""
    threshold: float | None = None
    """The table reports the answers generated until test accuracy first reaches this; None: the task's."""
    progress: bool = True
    """Show progress bars."""
    model_path: str | None = None
    """Start from this model instead of the task's shipped warm start."""


def set_field(cfg: TrainConfig, dotted: str, value) -> None:
    """Set a nested config field by its dotted name ("loss.beta")."""
    *parents, name = dotted.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    if not hasattr(target, name):
        raise ValueError(f"unknown config field {dotted!r}")
    setattr(target, name, value)


def demo_config(algo: str, cfg: DemoConfig) -> TrainConfig:
    demo = DEMOS[cfg.task]
    tc = TrainConfig(algo=algo, rounds=cfg.rounds or demo["rounds"], seed=cfg.seed, out=cfg.out / algo,
                     progress=cfg.progress, checkpoint_every=0)
    tc.task.name = cfg.task
    tc.eval.every = cfg.eval_every or demo["eval_every"]
    tc.model.path = cfg.model_path
    for k, v in demo["algos"].get(algo, {}).items():
        set_field(tc, k, v)
    return tc


def run_demo(cfg: DemoConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    threshold = cfg.threshold if cfg.threshold is not None else DEMOS[cfg.task]["threshold"]
    summary = {}
    for algo in cfg.algos:
        tc = demo_config(algo, cfg)
        tc.eval.samples = 0  # greedy accuracy only: the demo's time goes to training
        shutil.rmtree(tc.run_dir, ignore_errors=True)  # the demo's own runs: start afresh
        t0 = time.time()
        train(tc)
        rows = read_metrics(tc.run_dir / "metrics.jsonl")
        evals = [r for r in rows if "eval/accuracy" in r]
        summary[algo] = {
            "task": cfg.task,
            "updates_per_round": tc.updates_per_round,
            "lr": tc.optim.lr,
            "prompts_per_round": tc.rollout.prompts_per_round,
            "samples_per_prompt": tc.rollout.samples_per_prompt,
            "initial_accuracy": evals[0]["eval/accuracy"],
            "final_accuracy": evals[-1]["eval/accuracy"],
            "samples_generated": evals[-1]["samples"],
            "seconds": round(time.time() - t0, 1),
            "train_seconds": round(evals[-1]["seconds"], 1),
            "generate_seconds": round(sum(r.get("perf/generate_seconds", 0.0) for r in rows), 1),
            "update_seconds": round(sum(r.get("perf/update_seconds", 0.0) for r in rows), 1),
            "torch_threads": torch.get_num_threads(),  # float sums, so the sampled answers, depend on it
            "samples_to_threshold": next((r["samples"] for r in evals if r["eval/accuracy"] >= threshold), None),
            "threshold": threshold,
            "curve": [{"samples": r["samples"], "seconds": round(r["seconds"], 2),
                       "accuracy": r["eval/accuracy"]} for r in evals],
        }
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(summary, cfg.out / "demo.png")
    print_table(summary)
    print(f"wrote {cfg.out / 'summary.json'} and {cfg.out / 'demo.png'}")
    return summary


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for algo, s in summary.items():
        xs = [p["samples"] for p in s["curve"]]
        ts = [p["seconds"] for p in s["curve"]]
        ys = [100 * p["accuracy"] for p in s["curve"]]
        axes[0].plot(xs, ys, marker="o", label=algo)
        axes[1].plot(ts, ys, marker="o", label=algo)
    axes[0].set_xlabel("answers generated")
    axes[1].set_xlabel("training seconds (generation + updates)")
    for ax in axes:
        ax.set_ylabel("test accuracy, greedy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    task = next(iter(summary.values()))["task"]
    fig.suptitle(f"Embedded task `{task}`, from its shipped warm start (test split, 200 problems)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reval demo (test split, greedy accuracy)")
    threshold = next(iter(summary.values()))["threshold"]
    for col in ("algorithm", "K", "lr", "P x G", "start acc", "final acc", f"answers to {100 * threshold:.0f}%",
                "answers", "seconds"):
        table.add_column(col, justify="right")
    for algo, s in summary.items():
        reached = s["samples_to_threshold"]
        table.add_row(algo, str(s["updates_per_round"]), f"{s['lr']:g}",
                      f"{s['prompts_per_round']} x {s['samples_per_prompt']}", f"{100 * s['initial_accuracy']:.1f}%",
                      f"{100 * s['final_accuracy']:.1f}%",
                      "never" if reached is None else str(reached), str(s["samples_generated"]),
                      f"{s['seconds']:.0f}")
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no terminal width to fit, keep the headers whole
        console = Console(width=120)
    console.print(table)
