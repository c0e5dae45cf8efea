"""The asynchronous schedule: an actor process samples while the learner updates.

Its runs are not reproducible bit for bit (how stale an answer is depends on timing), so the
tests check what must hold whatever the timing: the counts, the lag bookkeeping, the weight
push, and the fault cases (kill -9 and resume, Ctrl-C, a dead actor)."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from reval.config import TrainConfig
from reval.metrics import read_metrics

SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32",
         "--optim.micro-batch-size", "8", "--task.num-test", "8", "--eval.every", "0", "--no-progress",
         "--report-to", "none", "--schedule.mode", "async"]
CMD = [sys.executable, "-m", "reval.cli", "train"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(tiny_dir, tmp_path, **overrides) -> TrainConfig:
    cfg = TrainConfig(rounds=4, out=tmp_path / "run", progress=False, checkpoint_every=0, report_to="none")
    cfg.model.path = str(tiny_dir)
    cfg.schedule.mode = "async"
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 32, 8, 8
    for k, v in overrides.items():
        section, name = k.split("__")
        setattr(getattr(cfg, section), name, v)
    return cfg


def _rounds(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "rollout/reward_mean" in r]


@pytest.mark.slow
def test_async_run_counts_every_answer_once_and_logs_the_lag(tiny_dir, tmp_path):
    from reval.train import train

    result = train(_config(tiny_dir, tmp_path, buffer__updates_per_round=3))
    assert (result["round"], result["samples"], result["updates"]) == (4, 4 * 16, 4 * 3)
    rounds = _rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and [r["samples"] for r in rounds] == [16, 32, 48, 64]
    assert rounds[0]["rollout/sampler_lag"] == 0  # the actor waits for the first weights
    for r in rounds:  # the lag of each batch as a distribution; never negative, never beyond the oldest answer
        assert 0 <= r["buffer/staleness_p10"] <= r["buffer/staleness_p50"] <= r["buffer/staleness_p90"] \
            <= r["buffer/staleness_max"] <= r["updates"]
        assert r["rollout/sampler_lag"] >= 0 and r["rollout/dropped_stale"] == 0  # ReVal: no cap
        assert r["perf/learner_wait_seconds"] >= 0 and r["perf/actor_wait_seconds"] >= 0


@pytest.mark.slow
def test_async_grpo_caps_staleness_and_corrects_towards_the_sampler(tiny_dir, tmp_path):
    from reval.train import train

    cfg = _config(tiny_dir, tmp_path, schedule__max_staleness=0, buffer__updates_per_round=2)
    cfg.algo = "grpo"
    assert TrainConfig(algo="grpo").max_staleness == 4 and TrainConfig().max_staleness is None
    result = train(cfg)
    rounds = _rounds(tmp_path / "run")
    assert rounds[0]["rollout/dropped_stale"] == 0 and rounds[0]["updates"] == 2
    # rounds sampled before the learner's latest update are dropped at cap 0: no update on them
    dropped = [r for r in rounds if r["rollout/dropped_stale"] > 0]
    assert dropped and all(r["rollout/sampler_lag"] > 0 for r in dropped)
    assert result["updates"] == 2 * (4 - len(dropped))
    kept = [r for r in rounds if r["rollout/dropped_stale"] == 0]
    assert all("loss/sampler_weight_mean" in r for r in kept)  # pi_old corrected by the sampler's log-probs


def test_a_push_after_a_lora_reference_reset_carries_the_merged_base(tiny_dir, tmp_path):
    """The learner sends only trainable weights, except after a reference reset, when it sends
    all of them: a LoRA reset merges the adapter into the base, which the actor must see."""
    from reval.loop import build
    from reval.loop.actor_process import ActorProcess, _load_newest, decode_weights, encode_weights
    from reval.reference import Reference

    cfg = _config(tiny_dir, tmp_path, model__lora_rank=4)
    learner_model, _ = build.load_policy(cfg, None, tiny_dir)
    actor_model, _ = build.load_policy(cfg, None, tiny_dir)
    with torch.no_grad():
        for name, p in learner_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 3, 7, 2]])
    pusher = ActorProcess.__new__(ActorProcess)  # the push alone, without a process
    pusher.model, pusher.pushed_ref_version, pusher.weights = learner_model, None, queue.Queue()
    stop, counters = threading.Event(), {"updates": 0, "sampler_version": 0}

    pusher.push(version=1, ref_version=0)  # the first push is complete
    _load_newest(actor_model, pusher.weights, counters, block=False, stop=stop)
    assert torch.equal(actor_model(ids).logits, learner_model(ids).logits) and counters["updates"] == 1
    pusher.push(version=2, ref_version=0)
    assert all("lora" in name for name in decode_weights(pusher.weights.get()[1]))  # then the adapter only

    optimizer = torch.optim.AdamW([p for p in learner_model.parameters() if p.requires_grad])
    Reference(learner_model).reset(optimizer)  # merge the adapter into the base, restart it at zero
    stale = actor_model(ids).logits
    pusher.push(version=3, ref_version=1)
    _load_newest(actor_model, pusher.weights, counters, block=False, stop=stop)
    assert torch.allclose(actor_model(ids).logits, learner_model(ids).logits, atol=1e-5)
    assert torch.allclose(stale, learner_model(ids).logits, atol=1e-4)  # a reset keeps the policy
    base = [n for n, _ in learner_model.named_parameters() if "lora" not in n and "q_proj.base_layer" in n][0]
    assert torch.equal(dict(actor_model.named_parameters())[base], dict(learner_model.named_parameters())[base])

    # pushes the actor has not taken are replaced: one waits; and a complete push (a reset) that a
    # later trainable-only push replaces still reaches the actor (the bug: the base stayed stale)
    Reference(learner_model).reset(optimizer)
    with torch.no_grad():
        for name, p in learner_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pusher.push(version=4, ref_version=2)
    pusher.push(version=5, ref_version=2)
    pusher.push(version=6, ref_version=2)
    assert pusher.weights.qsize() == 1
    _load_newest(actor_model, pusher.weights, counters, block=False, stop=stop)
    assert counters["updates"] == 6
    assert torch.allclose(actor_model(ids).logits, learner_model(ids).logits, atol=1e-5)
    assert torch.equal(dict(actor_model.named_parameters())[base], dict(learner_model.named_parameters())[base])
    # the actor side alone: a complete push followed by a trainable-only one, both waiting
    pusher.weights.put((7, encode_weights({base: torch.zeros_like(dict(learner_model.named_parameters())[base])}),
                        True))
    pusher.weights.put((8, encode_weights({}), False))
    _load_newest(actor_model, pusher.weights, counters, block=False, stop=stop)
    assert counters["updates"] == 8 and dict(actor_model.named_parameters())[base].abs().sum() == 0


@pytest.mark.slow
def test_async_lora_with_reference_resets_trains(tiny_dir, tmp_path):
    from reval.train import train

    result = train(_config(tiny_dir, tmp_path, model__lora_rank=4, loss__ref_reset_every=1, optim__lr=1e-3))
    rounds = _rounds(tmp_path / "run")
    assert result["updates"] == 8 and [r["q/ref_version"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["perf/skipped"] == 0 for r in rounds)


def test_async_refuses_what_it_cannot_do(tiny_dir, tmp_path):
    from reval.train import train

    for overrides, message in (({"rollout__lag": 2}, "rollout.lag = 2.*sync schedule"),
                               ({"schedule__push_every": 0}, "schedule.push_every = 0")):
        with pytest.raises(ValueError, match=message):
            _config(tiny_dir, tmp_path, **overrides).validate()
    cfg = _config(tiny_dir, tmp_path)
    cfg.algo = "mle"
    with pytest.raises(ValueError, match="sync for the offline algorithms"):
        cfg.validate()
    with pytest.raises(ValueError, match="must be picklable"):  # the actor process needs them
        train(_config(tiny_dir, tmp_path, optim__lr=1e-4), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)])


def _wait_for(predicate, seconds: float, proc=None) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc is None or proc.poll() is None, "the run ended early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _actor_pid(proc) -> int:
    children = []

    def found() -> bool:
        children[:] = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        return bool(children)

    _wait_for(found, 120, proc)
    return children[0].pid


@pytest.mark.slow
def test_kill_9_then_resume_loses_nothing_and_counts_nothing_twice(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--model.path", str(tiny_dir), "--rounds", "6", "--checkpoint-every", "1", "--out", str(run)]
    proc = subprocess.Popen([*CMD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    _wait_for(lambda: (run / "checkpoints" / "round-000002").exists(), 300, proc)
    actor = psutil.Process(_actor_pid(proc))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def actor_gone() -> bool:  # an orphaned actor would hold its memory until killed by hand
        try:
            return actor.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    deadline = time.time() + 120
    while not actor_gone() and time.time() < deadline:
        time.sleep(0.2)
    if not actor_gone():
        info = actor.as_dict(["status", "ppid", "num_threads", "cpu_times"])
        actor.kill()
        pytest.fail(f"the actor outlived the killed learner (pid {proc.pid}) by 120 s: {info}")
    # the kill lands after checkpoint 2, or (on a fast or a starved machine) a round or two later:
    # the resume starts after the newest checkpoint, whichever that is
    from reval.checkpoint import find_resumable

    resumed = find_resumable(run, log=lambda *_: None)[1]["counters"]["round"]
    assert 2 <= resumed < 6, f"the run was killed after round {resumed}"
    before = [r for r in read_metrics(run / "metrics.jsonl") if r["round"] <= resumed]
    done = subprocess.run([*CMD, "--resume", str(run), "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r for r in records if r["round"] <= resumed] == before  # what was recorded stays as it was
    rounds = [r for r in records if "rollout/reward_mean" in r]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]  # each round once
    assert [r["samples"] for r in rounds] == [16 * i for i in range(1, 7)]
    assert [r["updates"] for r in rounds] == [2 * i for i in range(1, 7)]
    assert rounds[resumed]["rollout/sampler_lag"] == 0  # the new actor starts from the checkpoint's weights


@pytest.mark.slow
def test_ctrl_c_stops_both_processes_with_a_checkpoint(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--model.path", str(tiny_dir), "--rounds", "500", "--checkpoint-every", "0", "--out", str(run)]
    proc = subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ONE_THREAD, start_new_session=True)
    actor = _actor_pid(proc)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and '"rollout/reward_mean"' in
              (run / "metrics.jsonl").read_text(), 120, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to both processes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err and "resume with: reval train --resume" in err
    _wait_for(lambda: not psutil.pid_exists(actor) or psutil.Process(actor).status() == psutil.STATUS_ZOMBIE, 30)
    from reval.checkpoint import list_checkpoints, verify_checkpoint

    assert verify_checkpoint(list_checkpoints(run)[-1])["counters"]["round"] >= 1


@pytest.mark.slow
def test_a_dead_actor_stops_the_run_with_a_clear_message(tiny_dir, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, "--model.path", str(tiny_dir), "--rounds", "500", "--checkpoint-every", "0", "--out", str(run)]
    proc = subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    actor = _actor_pid(proc)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and '"rollout/reward_mean"' in
              (run / "metrics.jsonl").read_text(), 120, proc)
    os.kill(actor, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # no hang
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert f"the actor process (pid {actor}) died with exit code -9" in err and "resume" in err


def boxed_solution(completions, solution, **_):
    """A reward function the actor process can import (module level, so it pickles by name)."""
    return [1.0 if f"{{{s}}}" in c else 0.0 for c, s in zip(completions, solution)]


@pytest.mark.slow
def test_the_python_api_runs_the_asynchronous_schedule(tmp_path):
    from reval import ReValConfig, ReValTrainer
    from reval.tasks import TASKS

    rows = [{"question": p.question, "answer": p.answer, "solution": p.answer}
            for p in TASKS["add"].split("train", 32, seed=0)]
    args = ReValConfig(output_dir=tmp_path / "run", rounds=2, prompts_per_round=4, num_generations=4, capacity=32,
                       micro_batch_size=8, progress=False, report_to="none", mode="async")
    result = ReValTrainer(reward_funcs=[boxed_solution], train_dataset=rows, args=args).train()
    assert args.schedule.mode == "async" and (result["round"], result["samples"]) == (2, 32)
    assert any(r["rollout/reward_mean"] > 0 for r in _rounds(tmp_path / "run"))  # scored in the actor process


BLOCKED_ACTOR = """
import multiprocessing as mp, os, sys, threading, time
from reval.loop.actor_process import _exit_when_orphaned

def actor(parent):
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    r, w = os.pipe()
    os.read(r, 1)  # blocked for good, as on a weight push the learner died while writing

if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=actor, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def test_an_actor_blocked_for_good_still_leaves_when_the_learner_dies(tmp_path):
    """The watchdog, not the main thread, notices the learner is gone (kill -9 mid-push left an
    actor blocked in a pipe read, for good, in one CI run)."""
    script = tmp_path / "learner.py"
    script.write_text(BLOCKED_ACTOR)
    learner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    actor = psutil.Process(int(learner.stdout.readline()))
    time.sleep(1)
    assert actor.is_running() and actor.status() != psutil.STATUS_ZOMBIE
    learner.kill()
    learner.wait()
    try:
        actor.wait(timeout=30)
    except psutil.TimeoutExpired:
        actor.kill()
        pytest.fail("the blocked actor outlived the learner")
    except psutil.NoSuchProcess:
        pass
