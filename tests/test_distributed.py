"""Two processes on the CPU (gloo): the same loop under torchrun / accelerate launch.

Each rank generates half the prompts and keeps its own buffer shard; rank 0 logs and
writes the shared checkpoint, every rank adds its shard; resume needs the same world size.
DDP runs under torchrun; FSDP2 and DeepSpeed ZeRO-3 under `accelerate launch --config_file
configs/accelerate/{fsdp,zero3}-cpu.yaml` (sharded weights and AdamW states,
docs/distributed.md). NCCL and multi-node runs need GPUs and are not run here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reval.buffer import ReplayBuffer
from reval.checkpoint import verify_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, *args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
           "-m", "reval.cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32",
         "--optim.micro-batch-size", "4", "--task.num-test", "8", "--eval.samples", "0", "--no-progress"]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(2, "--rounds", "2", "--out", out, "--model.path", tiny_dir, "--checkpoint-every", "1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"round": 2') == 1  # one summary, from rank 0
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "updates" in x]
    assert [r["round"] for r in rounds] == [1, 2]  # logged once per round, by rank 0
    assert [r["samples"] for r in rounds] == [16, 32]  # 2 ranks x 2 prompts x 4 answers per round
    assert rounds[-1]["buffer/size"] == 32  # the union of the two shards
    ckpt = out / "checkpoints" / "round-000002"
    shards = [verify_checkpoint(ckpt, rank=r) for r in (0, 1)]
    assert all(s["buffer_size"] == 16 and s["buffer"]["capacity"] == 16 for s in shards)
    prompts = []
    for s in shards:
        buf = ReplayBuffer(1)
        buf.load_state_dict(s["buffer"])
        prompts.append({e.prompt_ids for e in buf._items})
    assert prompts[0] != prompts[1]  # each rank drew its own prompts
    assert shards[0]["world_size"] == 2

    proc = _torchrun(2, "--resume", out, "--rounds", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "updates" in x]
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[-1]["updates"] == 6

    proc = subprocess.run([sys.executable, "-m", "reval.cli", "train", "--resume", str(out), "--rounds", "4"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "used 2 processes, now 1" in proc.stderr


def _launch(config: str, *args):
    """`accelerate launch --config_file configs/accelerate/CONFIG -m reval.cli train ARGS` (the
    config picks a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), "-m",
           "reval.cli", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _rounds(out) -> list[dict]:
    """The per-round training records, without wall-clock times."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"updates"' in x]
    return [{k: v for k, v in r.items() if k != "seconds" and not k.endswith("_seconds")} for r in recs]


# A reward with signal on the random tiny model (the task's own is ~always 0, so losses would be 0).
# One update per round (so a round's logged loss is that update's), drawn from the buffer (so the
# restored buffer shards and their RNGs are used); a reference reset at round 2 (the sharded
# policy gathered into the frozen copy; reference/ saved in the checkpoint resumed from).
DIGITS = ("def digits(completions, **_):\n"
          "    return [sum(c.isdigit() for c in s) / max(len(s), 1) for s in completions]\n")
SHARDED_ARGS = [*SMALL, "--checkpoint-every", "1", "--loss.ref-reset-every", "2", "--buffer.updates-per-round", "1",
                "--buffer.no-first-update-fresh"]


def _reward(tmp_path) -> list[str]:
    (tmp_path / "rewards.py").write_text(DIGITS)
    return ["--task.rewards", f"{tmp_path / 'rewards.py'}:digits"]


def _stop_and_resume(config: str, tmp_path, tiny_dir) -> tuple[list[dict], list[dict], dict]:
    """3 rounds in one go, and 2 rounds then a resume to 3: their metrics and final weights must
    be equal exactly. Returns the rounds' records, the final checkpoint's rank states and weights."""
    reward = _reward(tmp_path)
    common = ["--model.path", tiny_dir, *SHARDED_ARGS, *reward]
    full, part = tmp_path / "full", tmp_path / "part"
    for args in (["--rounds", "3", "--out", full, *common], ["--rounds", "2", "--out", part, *common],
                 ["--resume", part, "--rounds", "3", *reward]):
        proc = _launch(config, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _rounds(full)
    assert [r["round"] for r in expected] == [1, 2, 3] and expected[0]["loss/total"] > 0
    assert [r["q/ref_version"] for r in expected] == [0, 1, 1]
    assert _rounds(part) == expected  # every metric, exactly
    ckpts = [run / "checkpoints" / "round-000003" for run in (full, part)]
    weights = [load_file(c / "model" / "model.safetensors") for c in ckpts]
    assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    assert (ckpts[0] / "reference" / "model.safetensors").is_file()  # the reset reference
    shards = [verify_checkpoint(ckpts[0], rank=r) for r in (0, 1)]
    assert all(s["world_size"] == 2 for s in shards)
    return expected, shards, weights[0]


def _rank0_share(tmp_path, tiny_dir) -> dict:
    """Round 1 of one process given rank 0's share: P / 2 prompts, buffer M / 2.

    Rank r draws its own prompts (stream seeded by r), and rank 0 keeps the single-process
    streams and generation seed, so this process samples the very same answers and updates on
    the very same batch as rank 0 of a 2-process run, from the same weights: its first loss
    must equal that run's logged one (rank 0's) bit for bit."""
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "reval.cli", "train", "--rounds", "1", "--out", str(one),
                           "--model.path", str(tiny_dir), *SHARDED_ARGS, *_reward(tmp_path),
                           "--rollout.prompts-per-round", "2", "--buffer.capacity", "16"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rounds(one)[0]


def _same_first_update(single: dict, sharded: dict) -> None:
    assert single["loss/total"] == sharded["loss/total"]  # bit for bit: gathered shards, same forward
    assert all(single[k] == sharded[k] for k in single if k.startswith(("rollout/", "q/", "loss/residual")))


@pytest.mark.slow
def test_fsdp2_two_processes_resume_exactly_and_match_one_process_and_ddp(tiny_dir, tmp_path):
    """FSDP2 over gloo (fsdp-cpu.yaml): train, checkpoint (full weights gathered for rank 0,
    each rank's AdamW shards), stop, resume: the same metrics as without the stop. The first
    update equals one process's on rank 0's share; the averaged gradient is checked against DDP."""
    expected, shards, weights = _stop_and_resume("fsdp-cpu.yaml", tmp_path, tiny_dir)
    # AdamW's moments are sharded: the two ranks' exp_avg together hold one value per weight
    moments = sum(st["exp_avg"].numel() for s in shards for st in s["optimizer"]["state"].values())
    assert moments == sum(t.numel() for t in weights.values())
    _same_first_update(_rank0_share(tmp_path, tiny_dir), expected[0])

    ddp = tmp_path / "ddp"  # the same data split under DDP
    proc = _torchrun(2, "--rounds", "2", "--out", ddp, "--model.path", tiny_dir, *SHARDED_ARGS, *_reward(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_rounds = _rounds(ddp)
    assert ddp_rounds[0]["loss/total"] == expected[0]["loss/total"]
    # The total gradient norm is summed in another order (DDP: over the full gradients; FSDP: per
    # shard, then all-reduced), measured 7e-8 apart; so is the clipped step, and round 2 differs by
    # float rounding (measured: losses 1.2e-7 relative, log-ratio means 7e-7 absolute)
    for d, f in zip(ddp_rounds, expected):
        for k in ("loss/total", "loss/grad_norm", "loss/residual_mean", "q/log_ratio_mean", "rollout/reward_mean"):
            assert d[k] == pytest.approx(f[k], rel=1e-4, abs=1e-5), (d["round"], k)


@pytest.mark.slow
def test_zero3_two_processes_resume_exactly_and_match_one_process(tiny_dir, tmp_path):
    """DeepSpeed ZeRO-3 on its CPU accelerator over gloo (zero3-cpu.yaml), fp32: the same
    checks. Its optimizer state is DeepSpeed's own (this rank's fp32 weight partition and AdamW
    state on it), stored as plain tensors."""
    pytest.importorskip("deepspeed")
    expected, shards, weights = _stop_and_resume("zero3-cpu.yaml", tmp_path, tiny_dir)
    flat = sum(t.numel() for s in shards for t in s["optimizer"]["fp32_flat_groups"])
    total = sum(t.numel() for t in weights.values())
    assert total <= flat < 2 * total  # each rank holds a partition (padded), not a copy
    _same_first_update(_rank0_share(tmp_path, tiny_dir), expected[0])
