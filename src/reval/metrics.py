"""Metrics: one JSON line per round (and per evaluation), plus the trackers users already use
(TensorBoard, W&B, MLflow) through accelerate's tracker classes (`--report-to`).

Every record carries `samples` (answers generated so far) and `seconds` (training
wall-clock so far: generation + updates, evaluation excluded), so every curve can be
drawn against either axis. Namespaces: rollout/, buffer/, loss/, q/, eval/, perf/.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """metrics.jsonl, plus the trackers in `report_to` (accelerate's: TensorBoard, W&B, MLflow)."""

    def __init__(self, run_dir: Path, report_to: str = "auto", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.trackers = start_trackers(report_to, Path(run_dir), config or {})

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and "/" in k}
        for tracker in self.trackers:  # x axis: answers generated, as in every curve of ours
            tracker.log(scalars, step=record.get("samples", 0))

    def close(self) -> None:
        self._fh.close()
        for tracker in self.trackers:
            tracker.finish()


def tracker_names(report_to: str) -> list[str]:
    """The trackers `report_to` asks for; ValueError naming the extra if one is not installed."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    names = [] if report_to == "none" else [t.strip() for t in report_to.split(",")]
    for name in names:
        if not available[name]():
            raise ValueError(f"report_to {name}: {name} is not installed; pip install -e \".[{name}]\" "
                              "(or --report-to none)")
    return names


def start_trackers(report_to: str, run_dir: Path, config: dict) -> list:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    trackers = []
    for name in tracker_names(report_to):
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # run_dir/tensorboard, where it always was
            tracker = cls("tensorboard", str(run_dir))
        elif name == "mlflow":
            tracker = cls(experiment_name=run_dir.name, logging_dir=str(run_dir / "mlruns"))
        else:  # wandb: one project per run directory name
            tracker = cls(run_dir.name)
        if hasattr(tracker, "start"):  # accelerate >= 1.8 starts trackers lazily
            tracker.start()
        tracker.store_init_configuration(_flat(config))
        trackers.append(tracker)
    return trackers


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:  # trackers take numbers and strings
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def read_metrics(path: Path, bad_lines: list[int] | None = None) -> list[dict]:
    """All records. A line that is not one (torn by a crash mid-write, or garbage: not JSON,
    not an object, no integer `round`) is skipped; its line number goes to `bad_lines`."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                row = None
            if isinstance(row, dict) and type(row.get("round")) is int:
                rows.append(row)
            elif bad_lines is not None and line.strip():
                bad_lines.append(n)
    return rows
