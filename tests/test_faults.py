"""Fault cases: kill -9 and resume, Ctrl-C, hanging/raising rewards, non-finite updates."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from reval.checkpoint import list_checkpoints, verify_checkpoint
from reval.config import TrainConfig
from reval.model import load_model
from reval.rewards import correctness_reward, score

SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32",
         "--optim.micro-batch-size", "8", "--task.num-test", "8", "--eval.samples", "0", "--eval.every", "2",
         "--checkpoint-every", "1", "--no-progress", "--loss.ref-reset-every", "3"]
CMD = [sys.executable, "-m", "reval.cli", "train"]


def _metrics(run_dir):
    from reval.metrics import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"}
            for r in read_metrics(run_dir / "metrics.jsonl")]


def _rounds_logged(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"rollout/reward_mean"') if path.exists() else 0


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_reproduces_the_run(tiny_dir, tmp_path):
    args = ["--rounds", "6", "--model.path", str(tiny_dir), *SMALL]
    start = time.monotonic()
    subprocess.run([*CMD, *args, "--out", str(tmp_path / "ref")], check=True, capture_output=True, timeout=600)
    duration = time.monotonic() - start
    reference = _metrics(tmp_path / "ref")
    # Kill at points of the run's own progress (a shared machine's speed varies too much for
    # fixed times): during model loading, just after round 1 is logged (its checkpoint is
    # being written), inside round 4, and just after round 5 (one round left).
    for seen, delay in ((0, round(0.2 * duration, 2)), (1, 0.0), (3, 0.1), (5, 0.0)):
        run = tmp_path / f"killed-{seen}-{delay}"
        proc = subprocess.Popen([*CMD, *args, "--out", str(run)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while seen and _rounds_logged(run) < seen and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"the run ended before the kill after round {seen} + {delay}s"
        for ckpt in list_checkpoints(run):  # whatever is under a final name is complete
            verify_checkpoint(ckpt)  # raises if anything is missing or damaged
        cmd = [*CMD, "--resume", str(run)] if (run / "config.json").exists() else [*CMD, *args, "--out", str(run)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        assert _metrics(run) == reference, f"killed after {delay}s"


def test_leftover_temp_checkpoint_is_ignored(tiny_dir, tmp_path):
    run = tmp_path / "run"
    subprocess.run([*CMD, "--rounds", "1", "--model.path", str(tiny_dir), *SMALL, "--out", str(run)],
                   check=True, capture_output=True, timeout=600)
    junk = run / "checkpoints" / ".tmp-round-000002-999"
    junk.mkdir()
    (junk / "state.json").write_bytes(b"half a checkpoint")
    assert [p.name for p in list_checkpoints(run)] == ["round-000001"]
    proc = subprocess.run([*CMD, "--resume", str(run), "--rounds", "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in list_checkpoints(run)] == ["round-000001", "round-000002"]


def test_resume_with_incompatible_config_is_refused(tiny_dir, tmp_path):
    run = tmp_path / "run"
    subprocess.run([*CMD, "--rounds", "1", "--model.path", str(tiny_dir), *SMALL, "--out", str(run)],
                   check=True, capture_output=True, timeout=600)
    proc = subprocess.run([*CMD, "--resume", str(run), "--algo", "grpo"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "algo: run has 'reval', now 'grpo'" in proc.stderr


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--rounds", "500", "--model.path", str(tiny_dir), *SMALL, "--checkpoint-every", "0",
            "--out", str(run)]
    proc = subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least one round is logged
        if (run / "metrics.jsonl").exists() and '"rollout/reward_mean"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "resume with: reval train --resume" in err
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1
    state = verify_checkpoint(ckpts[0])
    assert 1 <= state["counters"]["round"] < 500


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run([*CMD, "--out", str(blocker / "run")], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_hanging_reward_times_out_and_is_skipped():
    def hangs(completions, **_):
        time.sleep(30)
        return [1.0] * len(completions)

    start = time.time()
    rewards, failures = score([hangs], ["a", "b"], {}, timeout=0.5)
    assert time.time() - start < 5
    assert rewards == [None, None] and failures == 2
    rewards, failures = score([correctness_reward], ["\\boxed{1}"], {"answer": ["1"]}, timeout=5)
    assert rewards == [1.0] and failures == 0


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_dir, tmp_path, monkeypatch):
    import reval.losses as losses
    from reval.train import train

    real = losses.ALGORITHMS["reval"]

    def nan_loss(t, cfg, denom):
        loss, metrics = real.compute(t, cfg, denom)
        return loss * float("nan"), metrics

    monkeypatch.setitem(losses.ALGORITHMS, "reval", losses.Algorithm(
        needs_reference=True, replay=True, needs_old_logp=False, per_token=False, default_updates_per_round=2,
        compute=nan_loss))
    cfg = TrainConfig(rounds=5, out=tmp_path / "run", progress=False, checkpoint_every=1)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 32, 8, 8
    cfg.eval.samples = 0
    cfg.optim.max_bad_updates = 3
    before = load_model(tiny_dir)[0].state_dict()
    with pytest.raises(FloatingPointError, match="3 updates in a row had a non-finite loss"):
        train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["perf/skipped"] for r in rows if "perf/skipped" in r] == [1.0]  # round 1: both updates skipped
    # The checkpoint of round 1 holds the untouched weights: skipped updates changed nothing.
    saved = load_model(tmp_path / "run" / "checkpoints" / "round-000001" / "model")[0].state_dict()
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_disk_full_during_checkpoint_keeps_the_previous_one(tiny_dir, tmp_path, monkeypatch):
    import errno

    import reval.checkpoint as ckpt_mod
    from reval.train import train

    real_save, calls = ckpt_mod.save_state, []

    def save_then_fail(state, directory, name):
        calls.append(directory)
        if len(calls) > 1:  # the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, directory, name)

    monkeypatch.setattr(ckpt_mod, "save_state", save_then_fail)
    cfg = TrainConfig(rounds=3, out=tmp_path / "run", progress=False, checkpoint_every=1)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 32, 8, 8
    cfg.eval.samples = 0
    with pytest.raises(OSError, match="could not write checkpoint .*No space left on device.*intact"):
        train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["round-000001"]  # no temp directory left
    assert verify_checkpoint(root / "round-000001")["counters"]["round"] == 1
