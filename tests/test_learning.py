"""Learning test: ReVal must clearly improve the shipped model on the embedded task."""

import json

import pytest

from reval.config import TrainConfig
from reval.metrics import read_metrics
from reval.train import train


@pytest.mark.slow
def test_reval_raises_test_accuracy(tmp_path):
    cfg = TrainConfig(algo="reval", rounds=6, out=tmp_path / "run", progress=False, checkpoint_every=0)
    cfg.eval.every = 0  # evaluate at the start and the end only
    cfg.eval.samples = 0
    train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r]
    start, end = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
    print(json.dumps({"start": start, "end": end}))
    assert start < 0.5
    assert end >= start + 0.20, (start, end)
