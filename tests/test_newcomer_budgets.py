"""Answer budgets that follow the model, and truncation that is reported wherever accuracy is
(issue: a newcomer's first hour, items 1, 2 and 12)."""

import json
import os
import subprocess
import sys

import pytest

from reval.config import DATA_ANSWER_BUDGET, ModelConfig, TaskConfig, TrainConfig, declared_budget
from reval.model import default_model_path
from reval.tasks import TASKS

CMD = [sys.executable, "-m", "reval.cli"]
MUL = default_model_path("mul")


def _mul_file(path, n):
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                            for p in TASKS["mul"].split("test", n, seed=0)))
    return path


def test_the_shipped_warm_starts_declare_their_task_budget():
    for name, task in TASKS.items():
        assert declared_budget(default_model_path(name)) == task.max_new_tokens


def test_own_data_takes_the_budget_the_model_declares(tmp_path, tiny_dir):
    data = str(tmp_path / "mine.jsonl")
    with_model = TrainConfig(task=TaskConfig(data=data), model=ModelConfig(path=str(MUL)))
    assert with_model.max_new_tokens == TASKS["mul"].max_new_tokens  # was 48: every mul answer cut
    assert TrainConfig(task=TaskConfig(data=data, name="mul")).max_new_tokens == TASKS["mul"].max_new_tokens
    assert TrainConfig(task=TaskConfig(data=data)).max_new_tokens == TASKS["add"].max_new_tokens
    assert TrainConfig(task=TaskConfig(data=data), model=ModelConfig(path=str(tiny_dir))).max_new_tokens \
        == 128  # a model that declares none: 256, at most half its context (the tiny model's: 256)
    assert TrainConfig(task=TaskConfig(data=data), model=ModelConfig(path="no-such-org/no-model")).max_new_tokens \
        == DATA_ANSWER_BUDGET  # a hub id not in the cache: nothing is downloaded
    explicit = TrainConfig(task=TaskConfig(data=data), model=ModelConfig(path=str(MUL)))
    explicit.rollout.max_new_tokens = 20
    assert explicit.max_new_tokens == 20


@pytest.mark.slow
def test_mul_data_with_the_mul_warm_start_is_not_cut_and_checkpoints_carry_the_budget(tmp_path):
    data = _mul_file(tmp_path / "mul30.jsonl", 30)
    out = tmp_path / "run"
    proc = subprocess.run([*CMD, "train", "--task.data", str(data), "--model.path", str(MUL), "--rounds", "1",
                           "--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4",
                           "--buffer.capacity", "16", "--no-progress", "--report-to", "none", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollout/truncated_frac"] <= 0.25  # with the old 48-token budget: 1.0, every answer cut
    assert "hit the answer budget" not in proc.stderr
    model_dir = out / "checkpoints" / "round-000001" / "model"
    assert declared_budget(model_dir) == TASKS["mul"].max_new_tokens  # reval eval on it uses the run's budget


def test_a_budget_that_cuts_the_answers_warns_at_the_first_round(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*CMD, "train", "--rounds", "1", "--rollout.prompts-per-round", "4",
                           "--rollout.samples-per-prompt", "2", "--buffer.capacity", "8", "--rollout.max-new-tokens",
                           "6", "--task.num-test", "4", "--no-progress", "--report-to", "none", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 1: 100% of answers hit the answer budget of 6 tokens" in proc.stderr
    assert "evaluation after round 0: 100% of answers hit the answer budget of 6 tokens" in proc.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line]
    assert evals and all(r["eval/truncated"] == 1.0 for r in evals)


def test_reval_eval_takes_the_model_budget_and_reports_truncation(tmp_path):
    from reval.cli import main

    bench = _mul_file(tmp_path / "q.jsonl", 6)
    fits, cut = tmp_path / "fits.json", tmp_path / "cut.json"
    run = subprocess.run([*CMD, "eval", "--model", str(MUL), "--data", str(bench), "--samples", "2",
                          "--out", str(fits)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "answer budget: 112 tokens" in run.stderr and "hit the answer budget" not in run.stderr
    assert "mean@2" in run.stderr and "truncated" in run.stderr  # the table's columns
    result = json.loads(fits.read_text())["q"]
    assert result["truncated"] <= 0.25
    item = result["items"][0]
    assert item["truncated"] in (False, True) and len(item["samples"]) == 2  # sampled completions kept too
    assert {"completion", "correct", "truncated"} <= set(item["samples"][0])
    main(["eval", "--model", str(MUL), "--data", str(bench), "--max-new-tokens", "40", "--out", str(cut)])
    assert json.loads(cut.read_text())["q"]["truncated"] == 1.0


def test_reval_eval_warns_when_the_budget_cuts_answers(tmp_path, capsys):
    from reval.cli import main

    bench = _mul_file(tmp_path / "q.jsonl", 4)
    main(["eval", "--model", str(MUL), "--data", str(bench), "--max-new-tokens", "40"])
    err = capsys.readouterr().err
    assert "WARNING: q: 100% of answers hit the answer budget of 40 tokens" in err and "--max-new-tokens" in err
    with pytest.raises(SystemExit, match="--max-new-tokens 0"):
        main(["eval", "--data", str(bench), "--max-new-tokens", "0"])


def test_eval_help_names_the_metric_the_table_prints():
    """The table prints mean@k; the help used to call it avg@k (the paper's name) only."""
    proc = subprocess.run([*CMD, "eval", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(proc.stdout.split())
    assert "mean@k" in text and "the paper's avg@k" in text
    assert "avg@" not in text.replace("the paper's avg@k", "")
