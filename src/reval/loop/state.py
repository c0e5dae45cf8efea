"""What survives a crash: writing a checkpoint (N ranks: one shared part, a shard each),
choosing the one to resume from, trimming the metrics to it, the fingerprint of what a run
was given from Python, so a resume with other inputs is refused, and the absolute paths a run
records, so it resumes from any directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from reval.checkpoint import (CheckpointError, atomic_write_text, clear_staging, find_resumable, save_checkpoint,
                              verify_checkpoint)
from reval.distributed import is_sharded
from reval.loop.messages import say
from reval.metrics import read_metrics
from reval.rewards import reward_name


def write_checkpoint(accelerator, policy, run_dir, cfg, model, tokenizer, reference, per_rank: dict, counters,
                extra: dict):
    """Write a checkpoint. With N processes, rank 0 writes the model and shared state and
    every rank adds its own shard (`per_rank`: buffer, reference cache, RNG, optimizer state)
    to the same staging dir."""
    shared = {"counters": dict(counters), "config": cfg.to_dict(), "world_size": accelerator.num_processes,
              **extra}
    if accelerator.num_processes == 1:
        clear_staging(run_dir, counters["round"])
        save_checkpoint(run_dir, counters["round"], model=model, tokenizer=tokenizer,
                        ref_model=reference if counters["ref_version"] else None,  # else: the starting model
                        state={**per_rank, **shared}, keep=cfg.keep_checkpoints)
        return
    from reval.checkpoint import save_state, staging_dir

    full_state = None
    if is_sharded(accelerator):  # FSDP / ZeRO-3: gather the full weights (a collective call)
        gathered = accelerator.get_state_dict(policy) or {}  # rank 0's; ZeRO-3 gives None elsewhere
        full_state = {k.removeprefix("lm."): v for k, v in gathered.items()}
        # a tied weight (embeddings = LM head) was gathered once per name: one tensor again, so
        # that save_pretrained stores it once, as it does for an unsharded model
        tied: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in full_state:
                full_state[name] = tied.setdefault(id(p), full_state[name])
    if accelerator.is_main_process:
        clear_staging(run_dir, counters["round"])
    accelerator.wait_for_everyone()
    save_state(per_rank, staging_dir(run_dir, counters["round"]), f"rank-{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(run_dir, counters["round"], model=model, tokenizer=tokenizer,
                        ref_model=reference if counters["ref_version"] else None, state=shared,
                        keep=cfg.keep_checkpoints, model_state_dict=full_state)
    accelerator.wait_for_everyone()

def choose_checkpoint(run_dir: Path, accelerator, checkpoint: Path | str | None = None):
    """(checkpoint, this rank's state) to resume from: rank 0 verifies (hashes) and sets damaged
    ones aside, then tells the others which one, so every rank resumes the same round.
    `checkpoint`: that one rather than the newest (`find_resumable`)."""
    if accelerator.num_processes == 1:
        return find_resumable(run_dir, log=say, checkpoint=checkpoint)
    from accelerate.utils import broadcast_object_list

    choice = [None]
    if accelerator.is_main_process:
        try:
            ckpt, state = find_resumable(run_dir, log=say, checkpoint=checkpoint)
            choice = [ckpt.name if ckpt else ""]
        except CheckpointError as e:
            choice = [e]
    broadcast_object_list(choice, from_process=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    if accelerator.is_main_process:
        return ckpt, state
    if not choice[0]:
        return None, None
    ckpt = Path(run_dir) / "checkpoints" / choice[0]
    return ckpt, verify_checkpoint(ckpt, accelerator.process_index, hashes=False)  # rank 0 hashed it


def inputs_fingerprint(problems, reward_funcs) -> dict:
    """What a run got from Python rather than its config (ReValTrainer, benchmarks): a
    fingerprint of the training problems and the reward functions' names, saved in checkpoints
    so a resume without them (or with others) is refused instead of training something else."""
    import hashlib

    record: dict = {}
    if problems is not None:
        h = hashlib.sha256()
        for p in problems:  # problems, or an offline algorithm's demonstrations / preference pairs
            text = f"{p.question}\x00{p.answer}" if hasattr(p, "answer") else "\x00".join(dataclasses.astuple(p))
            h.update(f"{text}\x01".encode("utf-8", "surrogatepass"))
        record["problems"] = f"{len(problems)} problems, sha256 {h.hexdigest()[:16]}"
    if reward_funcs:
        record["rewards"] = [reward_name(fn) for fn in reward_funcs]
    return record

def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone),
    and lines that are not records (a line torn by a crash mid-write, garbage), with a note."""
    if path.exists():
        bad: list[int] = []
        keep = [r for r in read_metrics(path, bad_lines=bad) if r["round"] <= last_round]
        if bad:
            say(f"{path}: dropped {len(bad)} line(s) that are not metric records (line "
                 f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def logged_rounds(path: Path) -> int:
    """The last round metrics.jsonl has a record of (0: none, or only the first evaluation)."""
    return max((r["round"] for r in read_metrics(path)), default=0) if path.exists() else 0


def absolute_paths(cfg):
    """Name the run's files by absolute paths: task.data, task.eval_data, the file of a reward
    "file.py:function" and model.path. config.json and the checkpoints then resume from any
    directory, and a file named again on resume by another path compares equal. A value that
    names nothing here (a hub id, a "module:function") is left as it is. Returns `cfg`, changed."""
    def absolute(value):
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    def reward(spec):
        where, _, fn = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
        return f"{absolute(where)}:{fn}" if where.endswith(".py") else spec

    task = cfg.task
    task.data = absolute(task.data) if task.data is not None else None
    task.eval_data = tuple(absolute(source) for source in task.eval_data)
    task.rewards = tuple(reward(spec) for spec in task.rewards)
    cfg.model.path = absolute(cfg.model.path) if cfg.model.path is not None else None
    return cfg
