"""Checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is a directory `checkpoints/round-000010/` holding the policy (HF
`save_pretrained`, safetensors), the reference model when it differs from the starting
model (after a reference reset), `state.pt` with the optimizer, replay buffer, RNG states
and counters. It is written into a temporary sibling directory, flushed, then renamed
into place, so a crash mid-write never leaves a half-written checkpoint under the final
name. Older checkpoints are removed only after the new one is complete.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

PREFIX = "round-"


def _fsync(path: Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (and `path` itself) to disk."""
    for f in [*path.rglob("*"), path]:
        _fsync(f)  # works for files and directories alike


def save_checkpoint(run_dir: Path, round_: int, *, model, tokenizer, ref_model, state: dict,
                    keep: int = 2, model_state_dict: dict | None = None) -> Path:
    """Write checkpoint `round_` atomically; keep only the newest `keep` complete ones.

    `ref_model` is anything with `save(directory)` (a `Reference`) or a HF model, or None.
    `model_state_dict` replaces the model's own (full weights gathered from FSDP / ZeRO-3 shards).
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{round_:06d}"
    tmp = staging_dir(run_dir, round_)
    tmp.mkdir(exist_ok=True)  # prepared empty by `clear_staging`; other ranks may have written to it
    try:
        model.save_pretrained(tmp / "model", **({"state_dict": model_state_dict} if model_state_dict else {}))
        tokenizer.save_pretrained(tmp / "model")
        if ref_model is not None:
            (ref_model.save if hasattr(ref_model, "save") else ref_model.save_pretrained)(tmp / "reference")
        torch.save(state, tmp / "state.pt")
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:  # disk full, permissions: keep the old checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {final} ({e}); the previous checkpoints in "
                      f"{root} are intact. Free space or choose another --out, then --resume.") from e
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # re-saving the same round: set the old copy aside until the new is in
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(root)  # make the rename itself durable
    shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def staging_dir(run_dir: Path, round_: int) -> Path:
    """The temporary directory a checkpoint is assembled in (one name for all ranks)."""
    return Path(run_dir) / "checkpoints" / f".tmp-{PREFIX}{round_:06d}"


def clear_staging(run_dir: Path, round_: int) -> Path:
    """Empty the staging directory (leftovers of a crashed save) and return it."""
    tmp = staging_dir(run_dir, round_)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.pt").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state(py_rngs: dict[str, random.Random]) -> dict:
    return {"torch": torch.get_rng_state(), "python": {k: r.getstate() for k, r in py_rngs.items()}}


def set_rng_state(state: dict, py_rngs: dict[str, random.Random]) -> None:
    torch.set_rng_state(state["torch"])
    for k, r in py_rngs.items():
        r.setstate(state["python"][k])
