"""Two processes on the CPU (gloo): the same loop under torchrun / accelerate launch.

Each rank generates half the prompts and keeps its own buffer shard; rank 0 logs and
writes the shared checkpoint, every rank adds its shard; resume needs the same world size.
Multi-GPU (NCCL, FSDP, ZeRO-3) runs are marked `gpu` and skipped here.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from reval.buffer import ReplayBuffer
from reval.checkpoint import verify_checkpoint


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
