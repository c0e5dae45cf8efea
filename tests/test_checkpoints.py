"""Checkpoints a user can trust: no code runs from a run directory, every checkpoint is
verified against its manifest on resume, a damaged one is set aside for the previous one,
and the resumed run equals the uninterrupted one. One process per run directory."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from reval.buffer import ReplayBuffer
from reval.checkpoint import (CheckpointError, RunLock, atomic_write_text, find_resumable, list_checkpoints,
                              load_state, save_state, verify_checkpoint, write_manifest)
from reval.config import TrainConfig
from reval.reference import RefCache
from reval.train import train

CMD = [sys.executable, "-m", "reval.cli", "train"]
SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32",
         "--optim.micro-batch-size", "8", "--task.num-test", "8", "--eval.samples", "0", "--eval.every", "1",
         "--checkpoint-every", "1", "--no-progress", "--loss.ref-reset-every", "1"]


def _cfg(tiny_dir, out, rounds: int) -> TrainConfig:
    """SMALL as a config: a reference reset every round, so every checkpoint has a reference/."""
    cfg = TrainConfig(rounds=rounds, out=out, progress=False, checkpoint_every=1)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 32, 8, 8
    cfg.eval.samples, cfg.eval.every, cfg.loss.ref_reset_every = 0, 1, 1
    return cfg


def _metrics(run_dir):
    from reval.metrics import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"}
            for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """An uninterrupted 4-round run, and a 3-round run with checkpoints round-2 and round-3."""
    root = tmp_path_factory.mktemp("runs")
    train(_cfg(tiny_dir, root / "full", 4))
    train(_cfg(tiny_dir, root / "base", 3))
    assert [p.name for p in list_checkpoints(root / "base")] == ["round-000002", "round-000003"]
    return {"base": root / "base", "reference": _metrics(root / "full")}


def _copy(runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    return run


def _resume(tiny_dir, run, rounds=4) -> dict:
    return train(_cfg(tiny_dir, run, rounds), resume=True)


# -- what a checkpoint holds -----------------------------------------------------------------

def test_state_round_trips_exactly_through_json_and_safetensors(tmp_path):
    import random

    rng = random.Random(3)
    state = {"optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 2)}},
                           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0], "fused": None}]},
             "rng": {"torch": torch.get_rng_state(), "python": {"a": rng.getstate()}},
             "empty": torch.zeros(0, dtype=torch.long), "flags": torch.tensor([True, False]),
             "floats": [0.1, float("inf"), -0.0], "__odd": {"__tensor__": 1}}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back.keys() == state.keys()
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # tuples stay tuples
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["state"][0]["step"].shape == ()
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["empty"].shape == (0,)
    rng2 = random.Random()
    rng2.setstate(back["rng"]["python"]["a"])
    assert rng2.random() == rng.random()
    assert back["floats"] == state["floats"] and back["__odd"] == state["__odd"]
    assert torch.equal(back["flags"], state["flags"])


def test_checkpoint_files_are_data_only_and_listed_in_the_manifest(runs):
    ckpt = list_checkpoints(runs["base"])[-1]
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".pickle"))]
    assert {"state.json", "state.safetensors", "manifest.json", "model/model.safetensors",
            "reference/model.safetensors"} <= files
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert set(listed) == files - {"manifest.json"}
    state = verify_checkpoint(ckpt)
    assert state["counters"]["round"] == 3 and state["buffer_size"] == 32


def test_src_never_unpickles():
    """No pickle load and no `torch.load` without weights_only=True anywhere in the package."""
    src = Path(__file__).parent.parent / "src" / "reval"
    offenders = []
    for path in src.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"weights_only\s*=\s*False", r"pickle\.loads?\(", r"allow_pickle\s*=\s*True",
                        r"torch\.load\((?![^)]*weights_only=True)"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


# -- damage to the newest checkpoint: set aside, the previous one resumed, same run -----------

def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def _rewrite_state(ckpt: Path, change) -> None:
    """A writer bug: the state changed and the manifest rewritten to match it."""
    state = load_state(ckpt, "state")
    change(state)
    for f in ("state.json", "state.safetensors", "manifest.json"):
        (ckpt / f).unlink()
    save_state(state, ckpt, "state")
    write_manifest(ckpt)


def _empty_buffer(state):
    state["buffer"] = ReplayBuffer(32).state_dict()


def _drop_reference(ckpt):
    shutil.rmtree(ckpt / "reference")
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)


DAMAGE = {
    "truncated weights": (lambda c: os.truncate(c / "model/model.safetensors", 1000), "truncated"),
    "zeroed weights": (lambda c: (c / "model/model.safetensors").write_bytes(
        bytes((c / "model/model.safetensors").stat().st_size)), "SHA-256"),
    "bit-flipped weights": (lambda c: _flip_bit(c / "model/model.safetensors"), "SHA-256"),
    "truncated state": (lambda c: os.truncate(c / "state.safetensors", 200), "truncated"),
    "zeroed state": (lambda c: (c / "state.json").write_bytes(bytes((c / "state.json").stat().st_size)),
                     "SHA-256"),
    "missing optimizer": (lambda c: _rewrite_state(c, lambda s: s.pop("optimizer")), "optimizer state is missing"),
    "missing buffer": (lambda c: _rewrite_state(c, lambda s: s.pop("buffer")), "buffer state is missing"),
    "empty buffer": (lambda c: _rewrite_state(c, _empty_buffer), "buffer holds 0 answers, the checkpoint recorded 32"),
    "missing reference": (_drop_reference, "reference model is missing"),
    "missing manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
    "deleted weights": (lambda c: (c / "model/model.safetensors").unlink(), "model/model.safetensors is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(case, runs, tiny_dir, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    damage, message = DAMAGE[case]
    damage(run / "checkpoints" / "round-000003")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        verify_checkpoint(run / "checkpoints" / "round-000003")
    _resume(tiny_dir, run)
    err = capsys.readouterr().err
    assert "round-000003 cannot be resumed from" in err and message in err
    assert "set round-000003 aside as damaged-round-000003; resuming from round-000002" in err
    assert (run / "checkpoints" / "damaged-round-000003").is_dir()  # kept for inspection
    assert _metrics(run) == runs["reference"]  # metrics after round 2 redone, the same as uninterrupted
    assert [p.name for p in list_checkpoints(run)] == ["round-000003", "round-000004"]


def _manifest_names(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../config.json", "model/../../round-000002/state.json"])
def test_a_manifest_naming_files_outside_the_checkpoint_is_refused(runs, tmp_path, name):
    run = _copy(runs, tmp_path)
    ckpt = run / "checkpoints" / "round-000003"
    _manifest_names(ckpt, name)
    with pytest.raises(CheckpointError, match="which is not inside the checkpoint"):
        verify_checkpoint(ckpt)


def test_a_checkpoint_set_aside_mid_replace_is_put_back(runs, tmp_path):
    run = _copy(runs, tmp_path)
    root = run / "checkpoints"
    os.replace(root / "round-000003", root / ".old-round-000003-4242")  # killed between the two renames
    ckpt, state = find_resumable(run)
    assert ckpt.name == "round-000003" and state["counters"]["round"] == 3
    assert not (root / ".old-round-000003-4242").exists()


def test_no_verifiable_checkpoint_is_a_clear_error(runs, tmp_path):
    run = _copy(runs, tmp_path)
    for ckpt in list_checkpoints(run):
        _flip_bit(ckpt / "model/model.safetensors")
    before = (run / "metrics.jsonl").read_text()
    proc = subprocess.run([*CMD, "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no checkpoint in" in proc.stderr and "round-000002: model/model.safetensors does not match" \
        in proc.stderr and "Start the run again in a new directory" in proc.stderr
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched
    assert [p.name for p in list_checkpoints(run)] == ["round-000002", "round-000003"]


def test_garbage_metrics_lines_are_dropped_with_a_note(runs, tiny_dir, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": "x"}\nnot json at all\n[1, 2]\n{"round": 3, "samp')  # the last one torn
    _resume(tiny_dir, run)
    assert "dropped 4 line(s) that are not metric records" in capsys.readouterr().err
    assert _metrics(run) == runs["reference"]


# -- code in a checkpoint never runs -----------------------------------------------------------

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_malicious_pickle_is_refused_and_never_runs(runs, tiny_dir, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    marker = tmp_path / "PWNED"
    newest = run / "checkpoints" / "round-000003"
    # an old-format checkpoint (state.pt, no manifest) whose state runs a command when unpickled
    for f in ("state.json", "state.safetensors", "manifest.json"):
        (newest / f).unlink()
    with open(newest / "state.pt", "wb") as fh:
        pickle.dump({"counters": _Exploit(marker)}, fh, protocol=2)
    # a pickle planted in a current checkpoint, next to its verified state: never read
    with open(run / "checkpoints" / "round-000002" / "state.pt", "wb") as fh:
        pickle.dump(_Exploit(marker), fh, protocol=2)
    _resume(tiny_dir, run)
    err = capsys.readouterr().err
    assert "state.pt (an old-format checkpoint) is refused" in err and "never unpickles code" in err
    assert not marker.exists()
    assert _metrics(run) == runs["reference"]


@pytest.mark.slow
def test_an_old_format_checkpoint_resumes_through_the_safe_loader(runs, tiny_dir, tmp_path):
    """Checkpoints written before manifests (one `state.pt`) still resume, via weights_only=True."""
    run = _copy(runs, tmp_path)
    ckpt = run / "checkpoints" / "round-000003"
    state = verify_checkpoint(ckpt)
    buf, cache = ReplayBuffer(1), RefCache()
    buf.load_state_dict(state["buffer"])
    cache.load_state_dict(state["ref_cache"])
    state["buffer"] = {"capacity": buf.capacity, "items": [asdict(e) for e in buf._items]}  # the old layouts
    state["ref_cache"] = {"entries": cache._entries}
    del state["buffer_size"]
    for f in ("state.json", "state.safetensors", "manifest.json"):
        (ckpt / f).unlink()
    torch.save(state, ckpt / "state.pt")
    with open(run / "metrics.jsonl") as fh:  # round 3's rows: resumed from round 3 itself
        assert max(json.loads(x)["round"] for x in fh) == 3
    _resume(tiny_dir, run)
    assert _metrics(run) == runs["reference"]
    assert (run / "checkpoints" / "round-000004" / "manifest.json").exists()  # written in the new format


# -- a kill while a checkpoint is being written ---------------------------------------------

@pytest.mark.slow
def test_kill_during_the_checkpoint_write_then_resume_is_exact(tiny_dir, tmp_path):
    args = ["--rounds", "4", "--model.path", str(tiny_dir), *SMALL]
    subprocess.run([*CMD, *args, "--out", str(tmp_path / "full")], check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen([*CMD, *args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, staging = run / "checkpoints", []
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # the first write after round 1's
        if root.is_dir() and (staging := [p for p in root.iterdir() if p.name.startswith(".tmp-round-")
                                          and p.name != ".tmp-round-000001"]):
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)  # the moment a checkpoint starts being written
    assert proc.wait() == -signal.SIGKILL and staging, "no checkpoint write was caught"
    written = int(staging[0].name.rsplit("-", 1)[1])
    assert [int(p.name.rsplit("-", 1)[1]) for p in list_checkpoints(run)][-1] == written - 1
    proc = subprocess.run([*CMD, "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _metrics(run) == _metrics(tmp_path / "full")


# -- one process per run directory -------------------------------------------------------------

def test_a_held_run_directory_is_refused_with_the_holders_pid(tiny_dir, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_dir, run, 1))
    before = (run / "metrics.jsonl").read_text(), (run / "config.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from reval.checkpoint import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in (["--out", str(run), "--model.path", str(tiny_dir)], ["--resume", str(run)]):
            proc = subprocess.run([*CMD, *flags, *SMALL], capture_output=True, text=True, timeout=600)
            assert proc.returncode != 0 and "Traceback" not in proc.stderr
            assert f"run directory {run} is in use by another reval process (pid {holder.pid})" in proc.stderr
        assert ((run / "metrics.jsonl").read_text(), (run / "config.json").read_text()) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run):  # the OS released the killed holder's lock
        pass


def test_the_lock_is_held_during_a_run_and_released_after(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path / "run", 1)
    with RunLock(tmp_path / "run"):
        with pytest.raises(ValueError, match="is in use by another reval process"):
            train(cfg)
    train(cfg)
    train(_cfg(tiny_dir, tmp_path / "run", 2), resume=True)  # released at the end of the first
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


def test_a_start_that_fails_leaves_no_run_directory(tmp_path):
    cfg = TrainConfig(rounds=1, out=tmp_path / "run", progress=False)
    cfg.model.path = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text('{"seed": 0}\n')

    def killed(*_):
        raise KeyboardInterrupt  # the process dies after writing the temporary file, before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"seed": 1}\n')
    assert path.read_text() == '{"seed": 0}\n'
    monkeypatch.undo()
    atomic_write_text(path, '{"seed": 1}\n')
    assert path.read_text() == '{"seed": 1}\n'


def test_find_resumable_without_checkpoints(tmp_path):
    assert find_resumable(tmp_path) == (None, None)


# -- malformed model directories -----------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("no tokenizer", "holds no tokenizer"),
    ("garbled config", "config.json is unreadable"),
    ("no config", "config.json is missing"),
    ("garbled tokenizer", "tokenizer.json is unreadable"),
    ("garbled weights", "model.safetensors is unreadable"),
    ("no weights", "holds no weights"),
])
def test_eval_of_a_malformed_model_directory_names_the_file(case, message, tiny_dir, tmp_path, capsys):
    from reval.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    if case == "no tokenizer":
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif case == "no weights":
        (model / "model.safetensors").unlink()
    else:
        name = {"garbled config": "config.json", "no config": "config.json", "garbled tokenizer": "tokenizer.json",
                "garbled weights": "model.safetensors"}[case]
        (model / name).unlink() if case == "no config" else (model / name).write_text("{garbage")
    data = tmp_path / "bench.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(model), "--data", str(data)])
    assert str(e.value).startswith("error:") and message in str(e.value) and str(model) in str(e.value)


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_partial_one_under_a_final_name(tiny_dir, tmp_path,
                                                                                             monkeypatch):
    """Old checkpoints are deleted after a new one is complete; a kill -9 in the middle of that
    deletion once left a checkpoint without model/config.json under its final name. Here the
    deletion stops after its first file, as a kill would leave it."""
    import reval.checkpoint as checkpoint

    def interrupted_rmtree(path, ignore_errors=False):
        files = sorted(f for f in Path(path).rglob("*") if f.is_file())
        if files:
            files[0].unlink()  # ... and the process dies here

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted_rmtree)
    cfg = _cfg(tiny_dir, tmp_path / "run", rounds=3)
    cfg.keep_checkpoints, cfg.task.num_test = 1, 4
    train(cfg)
    assert [p.name for p in list_checkpoints(cfg.out)] == ["round-000003"]
    verify_checkpoint(list_checkpoints(cfg.out)[0])
