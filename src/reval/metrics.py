"""Metrics: one JSON line per round (and per evaluation), plus TensorBoard when installed.

Every record carries `samples` (answers generated so far) and `seconds` (training
wall-clock so far: generation + updates, evaluation excluded), so every curve can be
drawn against either axis. Namespaces: rollout/, buffer/, loss/, q/, eval/, perf/.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def log(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and "/" in k:
                    self._tb.add_scalar(k, v, global_step=record.get("samples", 0))

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


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
