"""Subprocess runs of the `reval` command, as a user would type them."""

import json
import subprocess
import sys

import pytest

SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32",
         "--optim.micro-batch-size", "8", "--task.num-test", "8", "--eval.samples", "2", "--eval.every", "2",
         "--checkpoint-every", "2", "--no-progress"]


def reval(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "reval.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"reval {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("algo", ["reval", "tbrm", "tbrm_replay", "grpo"])
def test_train_runs_and_writes_run_dir(tiny_dir, tmp_path, algo):
    out = tmp_path / algo
    reval("train", "--algo", algo, "--rounds", "3", "--model.path", tiny_dir, "--out", out, *SMALL)
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == algo and config["rounds"] == 3
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "rollout/reward_mean" in r]
    evals = [r for r in lines if "eval/accuracy" in r]
    assert [r["samples"] for r in rounds] == [16, 32, 48]
    assert [r["round"] for r in evals] == [0, 2, 3]
    assert all(k in rounds[-1] for k in ("loss/total", "buffer/staleness_mean", "perf/generate_seconds"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-000002", "round-000003"]


def test_resume_continues_and_matches_uninterrupted(tiny_dir, tmp_path):
    # A reset every 2 rounds happens at the end of round 2, so the round-2 checkpoint we
    # resume from must carry the reset reference (and a reference cache that the reset made
    # stale), not the starting model.
    common = ["--model.path", tiny_dir, *SMALL, "--loss.ref-reset-every", "2"]
    reval("train", "--rounds", "4", "--out", tmp_path / "a", *common)
    reval("train", "--rounds", "2", "--out", tmp_path / "b", *common)
    assert (tmp_path / "b" / "checkpoints" / "round-000002" / "reference" / "model.safetensors").exists()
    reval("train", "--resume", tmp_path / "b", "--rounds", "4")

    def metrics(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"} for r in rows]

    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a) == 7 and a == b


def test_bad_config_is_a_clear_error(tmp_path):
    proc = reval("train", "--loss.beta", "-1", "--out", tmp_path / "x", check=False)
    assert proc.returncode != 0
    assert "loss.beta = -1.0 is invalid: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = reval("train", "--model.path", tmp_path / "missing", "--out", tmp_path / "y", check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = reval("train", "--resume", tmp_path / "nothing", check=False)
    assert proc.returncode != 0 and "no config.json" in proc.stderr


def test_eval_command(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "What is 2+2?", "answer": "4"}\n{"question": "1+1?", "answer": 2}\n')
    out = tmp_path / "res.json"
    proc = reval("eval", "--model", tiny_dir, "--data", data, "--out", out)
    res = json.loads(out.read_text())["data"]
    assert "benchmark" in proc.stderr and "data" in proc.stderr  # the per-benchmark table
    assert len(res["items"]) == 2
    assert res["accuracy"] == sum(i["correct"] for i in res["items"]) / 2
    assert res["items"][1]["answer"] == "2" and "completion" in res["items"][0]


def test_shipped_model_eval_on_test_split(tmp_path):
    """The shipped warm start scores inside the 10-50% greedy band the task was built for."""
    from reval.tasks.arithmetic import split

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                            for p in split("test", 200)))
    out = tmp_path / "res.json"
    reval("eval", "--data", data, "--out", out)
    acc = json.loads(out.read_text())["test"]["accuracy"]
    assert 0.10 <= acc <= 0.50, acc


def test_config_file_then_command_line_overrides(tiny_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"algo: grpo\nrounds: 1\nmodel:\n  path: {tiny_dir}\nloss:\n  clip_high: 0.3\n")
    out = tmp_path / "run"
    reval("train", "--config", cfg, "--loss.clip-high", "0.25", "--out", out, *SMALL)
    saved = json.loads((out / "config.json").read_text())
    assert saved["algo"] == "grpo" and saved["rounds"] == 1 and saved["loss"]["clip_high"] == 0.25
    bad = tmp_path / "bad.json"
    bad.write_text('{"loss": {"betta": 1}}')
    proc = reval("train", "--config", bad, check=False)
    assert proc.returncode != 0 and "unknown config key(s) loss.betta" in proc.stderr


def test_demo_writes_summary_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    proc = reval("demo", "--rounds", "1", "--model-path", tiny_dir, "--out", out, "--no-progress")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"reval", "grpo"}
    for s in summary.values():
        assert {"initial_accuracy", "final_accuracy", "samples_generated", "seconds"} <= set(s)
        assert s["samples_generated"] == 128  # one round of 128 answers (32 x 4 as tuned), for both
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final acc" in proc.stdout


def test_eval_command_bad_rows(tiny_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "ok", "answer": "1"}\n{"answer": "2"}\n{"question": ""}\n')
    proc = reval("eval", "--model", tiny_dir, "--data", data, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{data}: line 2: missing field 'question'" in proc.stderr and "(and 1 more bad rows)" in proc.stderr
    proc = reval("eval", "--model", tiny_dir, "--data", data, "--skip-bad-rows")
    assert "skipped 2 bad rows" in proc.stderr and '"n": 1' in proc.stdout


def test_eval_prompt_longer_than_context(tiny_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "x" * 300, "answer": "1"}) + "\n"
                    + json.dumps({"question": "ok", "answer": "1"}) + "\n")
    proc = reval("eval", "--model", tiny_dir, "--data", data, check=False)
    assert proc.returncode != 0 and "question 1 is" in proc.stderr and "exceeds the model's context" in proc.stderr
    proc = reval("eval", "--model", tiny_dir, "--data", data, "--skip-bad-rows")
    assert "skipped 1 prompts longer than the context" in proc.stderr and '"n": 1' in proc.stdout


def test_train_refuses_to_mix_two_runs_in_one_directory(tiny_dir, tmp_path):
    out = tmp_path / "run"
    reval("train", "--rounds", "1", "--model.path", tiny_dir, "--out", out, *SMALL)
    proc = reval("train", "--rounds", "1", "--model.path", tiny_dir, "--out", out, *SMALL, check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "--resume" in proc.stderr


@pytest.mark.parametrize("args,content,message", [
    (["--resume"], None, "--resume needs a value"),
    (["--config"], None, "--config needs a value"),
    (["--config", "{cfg}"], "algo: [unclosed", "could not be parsed"),
    (["--config", "{cfg}"], "", "must hold a mapping"),
    (["--config", "{cfg}"], "rounds: ten", "config key rounds must be int, got 'ten'"),
    (["--config", "{cfg}"], "loss: 3", "config key loss must be a mapping"),
    (["--config", "{cfg}"], "model: {dtype: float64}",
     "config key model.dtype must be one of ('float32', 'bfloat16'), got 'float64'"),
    (["--config", "{cfg}", "--resume", "{cfg}"], "rounds: 1", "cannot take --config"),
])
def test_malformed_train_arguments_are_clear_errors(tmp_path, args, content, message):
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_text(content)
    proc = reval("train", *[a.format(cfg=cfg) for a in args], check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_train_prompt_longer_than_context_is_refused(tiny_dir, tmp_path):
    # The tiny model's context is 256 tokens; prompts are ~60, so 250 new tokens cannot fit.
    proc = reval("train", "--model.path", tiny_dir, "--rollout.max-new-tokens", "250", "--out", tmp_path / "r",
                 *SMALL, check=False)
    assert proc.returncode != 0 and "exceeds the model's context of 256" in proc.stderr
    assert "Traceback" not in proc.stderr
