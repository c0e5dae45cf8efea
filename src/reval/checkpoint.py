"""Checkpoints: everything needed to resume a run exactly, written atomically, stored in
formats that cannot run code, and verified before a resume trusts them.

    checkpoints/round-000010/
      model/              the policy: HF `save_pretrained` (safetensors) or a LoRA adapter
      reference/          the reference weights, when a reset made them differ from the start
      state.json          counters, config, world size, and the non-tensor part of the state
      state.safetensors   the tensors: optimizer moments, replay buffer (token ids, rewards, ...),
                          RNG states, cached reference values
      rank-R.json/.safetensors   each rank's shard of the above with N processes
      manifest.json       every other file with its size and SHA-256, written last

A checkpoint is assembled in a temporary sibling directory, flushed, then renamed into
place, so a crash mid-write never leaves a partial checkpoint under the final name. Older
checkpoints are removed only after the new one is complete.

Nothing here unpickles: JSON and safetensors hold data only, so a checkpoint someone else
wrote cannot run code when it is resumed. Checkpoints of earlier versions (`state.pt`) are read
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers;
the next checkpoint of the resumed run is written in the new format.

Why not accelerate's `save_state`: it pickles the optimizer and RNG states (`torch.save`),
writes in place (a kill mid-save leaves a partial directory under the final name), keeps no
manifest to verify, and knows nothing of the replay buffer or the reference model; each of
those is what this module is for. The model itself is saved by transformers / peft.

On resume `find_resumable` verifies the newest checkpoint against its manifest and checks
that every part the resume needs is there and consistent; a damaged one is set aside as
`damaged-round-*` with the reason, and the next newest is tried. A resume that names an
earlier checkpoint sets the newer ones aside as `superseded-round-*`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "round-"
MANIFEST = "manifest.json"
DAMAGED = "damaged-"
SUPERSEDED = "superseded-"  # newer than the checkpoint a resume named
DELETING = ".deleting-"  # an old checkpoint on its way out (`_delete`)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong with it."""


class RunExistsError(ValueError):
    """A fresh run in a directory that already holds one. The message speaks the command line;
    `ReValTrainer.train` says it again in Python terms."""


# ---------------------------------------------------------------------------------------
# state <-> JSON + safetensors

def save_state(state: dict, directory: Path, name: str) -> None:
    """Write `state` (nested dicts / lists / tuples of tensors, numbers, strings, None) as
    `name.json` (structure and plain values) and `name.safetensors` (the tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(tree))


def load_state(directory: Path, name: str) -> dict:
    """Read what `save_state` wrote; `CheckpointError` naming the file if it is unreadable."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / f"{name}.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{name}.safetensors is unreadable ({e})") from None
    try:
        tree = json.loads((directory / f"{name}.json").read_text())
        return _decode(tree, tensors)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{name}.json is unreadable ({type(e).__name__}: {e})") from None


def _encode(obj, path: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = f"{len(tensors)}{path}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # own storage: safetensors refuses shared
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, path, tensors), _encode(v, f"{path}.{k}", tensors)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path or 'the top'} of a checkpoint state")


def _decode(tree, tensors: dict):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------
# the run directory: one process at a time, files replaced whole

LOCK = ".lock"


class RunLock:
    """Hold `run_dir` for this process: an exclusive OS lock (flock) on `run_dir/.lock`.

    A second `reval train` on the same directory, fresh or `--resume`, is refused with the
    holder's pid. The OS drops the lock when the process ends, however it ends, so a crash
    never leaves a stale lock. A fresh run that fails before its first round (bad model path,
    prompts too long, ...) removes the directory it created: no half-made run is left behind.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __enter__(self) -> "RunLock":
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(f"output directory {self.run_dir} is not writable ({e.strerror}); "
                          "choose another --out") from None
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip()
            os.close(self._fd)
            raise ValueError(f"run directory {self.run_dir} is in use by another reval process"
                             f"{f' (pid {holder})' if holder else ''}; wait for it to end, stop it, or "
                             "choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is not None and self._created and not (self.run_dir / "metrics.jsonl").exists() \
                and not (self.run_dir / "checkpoints").exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)  # failed before its first round: leave nothing
        os.close(self._fd)  # releases the lock
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` whole: a temporary file, flushed, renamed over it. A crash
    leaves the old content or the new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


# ---------------------------------------------------------------------------------------
# writing

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


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """List every file under `directory` with its size and SHA-256 in `manifest.json`."""
    files = {f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": sha256(f)}
             for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def save_checkpoint(run_dir: Path, round_: int, *, model, tokenizer, ref_model, state: dict,
                    keep: int = 2, model_state_dict: dict | None = None) -> Path:
    """Write checkpoint `round_` atomically; keep only the newest `keep` complete ones.

    `ref_model` is anything with `save(directory)` (a `Reference`) or a HF model, or None.
    `model_state_dict` replaces the model's own (full weights gathered from FSDP / ZeRO-3 shards).
    Files other ranks put in the staging directory (`rank-R.*`) are part of the checkpoint.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{round_:06d}"
    tmp = staging_dir(run_dir, round_)
    tmp.mkdir(exist_ok=True)  # prepared empty by `clear_staging`; other ranks may have written to it
    try:
        from reval.qhead import is_qadapter, save_qadapter

        save = (lambda d, **kw: save_qadapter(model, d, **kw)) if is_qadapter(model) else model.save_pretrained
        save(tmp / "model", **({"state_dict": model_state_dict} if model_state_dict else {}))
        tokenizer.save_pretrained(tmp / "model")
        if ref_model is not None:
            if hasattr(ref_model, "save"):  # a `Reference`; a LoRA base comes from the gathered weights
                ref_model.save(tmp / "reference", policy_state_dict=model_state_dict)
            else:
                ref_model.save_pretrained(tmp / "reference")
        save_state(state, tmp, "state")
        write_manifest(tmp)  # last: a checkpoint with a manifest has every part it lists
        _fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # disk full, permissions: keep the old ones
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
        _delete(old)
    for leftover in root.glob(f"{DELETING}*"):  # a deletion a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _delete(ckpt: Path) -> None:
    """Delete a checkpoint: renamed out of the checkpoints' names first, so a kill in the middle
    of the deletion never leaves a partial checkpoint under a final name (a resume would find
    it damaged, and a test that every final name verifies would fail)."""
    doomed = ckpt.with_name(f"{DELETING}{ckpt.name}-{os.getpid()}")
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
    """Checkpoints under their final name, oldest first (staging and set-aside ones excluded).

    The rename makes them complete when written; `verify_checkpoint` says whether they
    still are."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and p.name[len(PREFIX):].isdigit())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------
# verifying and reading

def verify_checkpoint(ckpt: Path, rank: int = 0, hashes: bool = True) -> dict:
    """The state of checkpoint `ckpt` for `rank` (shared part merged with the rank's shard),
    after checking it against its manifest (sizes, and SHA-256 with `hashes`) and that every
    part a resume needs is present and consistent. Raises `CheckpointError` saying what is
    wrong otherwise. A rank past the run's world size gets the shared part only (the caller
    then says the number of processes differs)."""
    try:
        return _verify(Path(ckpt), rank, hashes)
    except OSError as e:  # a file vanished or is unreadable between the checks
        raise CheckpointError(f"cannot read {e.filename or ckpt}: {e.strerror or e}") from None


def _verify(ckpt: Path, rank: int, hashes: bool) -> dict:
    if not (ckpt / MANIFEST).exists():
        if (ckpt / "state.pt").exists() and not (ckpt / "state.json").exists():
            return _legacy_state(ckpt, rank)
        raise CheckpointError(f"{MANIFEST} is missing (the checkpoint was altered or only partly copied)")
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        listed = {str(name): (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    root = ckpt.resolve()
    for name, (size, digest) in listed.items():
        path = ckpt / name
        if Path(name).is_absolute() or root not in path.resolve().parents:
            raise CheckpointError(f"{MANIFEST} names {name!r}, which is not inside the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{name} is {path.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if hashes and sha256(path) != digest:
            raise CheckpointError(f"{name} does not match its SHA-256 in the manifest (the file is damaged)")

    def require(what: str, *names: str) -> None:
        if not any(n in listed for n in names):
            raise CheckpointError(f"{what} is missing ({' or '.join(names)} not in the manifest)")

    require("the training state", "state.json")
    require("the training state's tensors", "state.safetensors")
    require("the model's config", "model/config.json", "model/adapter_config.json")
    if not any(n.startswith("model/") and n.endswith(".safetensors") for n in listed):
        raise CheckpointError("the model's weights are missing (no model/*.safetensors in the manifest)")
    state = load_state(ckpt, "state")
    _check_shared(ckpt, state)
    world = state["world_size"]
    if rank >= world:
        return state
    if world > 1:
        for r in range(world):
            require(f"rank {r}'s shard (its buffer, optimizer and RNG state)", f"rank-{r}.json")
            require(f"rank {r}'s shard tensors", f"rank-{r}.safetensors")
        state.update(load_state(ckpt, f"rank-{rank}"))
    if state["counters"].get("ref_version", 0) > 0 and not any(n.startswith("reference/") for n in listed):
        raise CheckpointError("the reference model is missing (reference/; a reference reset made it "
                              "differ from the starting model)")
    _check_rank_part(state, rank)
    return state


def _check_shared(ckpt: Path, state: dict) -> None:
    for key in ("counters", "config", "world_size"):
        if key not in state:
            raise CheckpointError(f"state.json has no {key!r}")
    counters = state["counters"]
    for key in ("round", "updates", "samples", "ref_version"):
        if not isinstance(counters.get(key), int):
            raise CheckpointError(f"state.json: counters.{key} is missing or not an integer")
    if f"{PREFIX}{counters['round']:06d}" != ckpt.name:
        raise CheckpointError(f"state.json is for round {counters['round']}, the directory for "
                              f"round {ckpt.name[len(PREFIX):].lstrip('0') or 0}")
    if not isinstance(state["world_size"], int) or state["world_size"] < 1:
        raise CheckpointError(f"state.json: world_size {state['world_size']!r} is not a positive integer")


def _check_rank_part(state: dict, rank: int) -> None:
    where = "state" if state.get("world_size", 1) == 1 else f"rank-{rank}"
    for key in ("optimizer", "buffer", "rng"):
        if key not in state:
            raise CheckpointError(f"{where}: the {key} state is missing")
    opt = state["optimizer"]
    if isinstance(opt, dict) and "optimizer_state_dict" in opt:  # DeepSpeed ZeRO's, around torch's
        opt = opt["optimizer_state_dict"]
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        raise CheckpointError(f"{where}: the optimizer state is malformed")
    if state["counters"]["updates"] > 0 and not opt["state"]:
        raise CheckpointError(f"{where}: the optimizer state is empty after "
                              f"{state['counters']['updates']} updates")
    buf = state["buffer"]
    if "buffer_size" in state:
        from reval.buffer import ReplayBuffer

        try:
            n = ReplayBuffer.stored_size(buf)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: the replay buffer is malformed ({e})") from None
        if n != state["buffer_size"]:
            raise CheckpointError(f"{where}: the replay buffer holds {n} answers, the checkpoint recorded "
                                  f"{state['buffer_size']}")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng:
        raise CheckpointError(f"{where}: the RNG state is malformed")


def _legacy_state(ckpt: Path, rank: int) -> dict:
    """A checkpoint from before manifests (`state.pt`, `rank-R.pt`): loaded without unpickling
    code (`weights_only=True`); it cannot be verified, only checked for its parts."""
    import pickle

    def load(name: str) -> dict:
        try:
            return torch.load(ckpt / name, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{name} (an old-format checkpoint) is refused: it does not load as plain tensors and "
                f"containers ({first}). It is damaged or holds code, and reval never unpickles code. "
                "Start the run again") from None

    state = load("state.pt")
    if not isinstance(state, dict):
        raise CheckpointError("state.pt does not hold a training state")
    _check_shared(ckpt, state)
    if rank >= state["world_size"]:
        return state
    if state["world_size"] > 1:
        state.update(load(f"rank-{rank}.pt"))
    if state["counters"].get("ref_version", 0) > 0 and not (ckpt / "reference").is_dir():
        raise CheckpointError("the reference model is missing (reference/)")
    _check_rank_part(state, rank)
    return state


def find_resumable(run_dir: Path, log=print, checkpoint: Path | str | None = None) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of `run_dir` that verifies, with its state (rank 0's part).

    Each newer one that does not verify is reported through `log` and renamed to
    `damaged-round-*` (kept for inspection, never resumed). Returns (None, None) when the
    run has no checkpoint; raises `CheckpointError` when it has some and none verifies.
    Called on rank 0 only: the other ranks read the one it chose (`verify_checkpoint`).

    `checkpoint` names the one to resume from instead (TRL's `resume_from_checkpoint="PATH"`):
    it must be one of this run's and verify, or `CheckpointError` names it. The newer ones
    are set aside as `superseded-round-*` (kept, never resumed: the run continues from the
    named round, and a later resume must not pick them as the newest).
    """
    _recover_interrupted_replace(run_dir)
    found = list_checkpoints(run_dir)
    named = _of_run(run_dir, found, checkpoint) if checkpoint is not None else None
    problems = []
    for ckpt in [named] if named else reversed(found):
        try:
            state = verify_checkpoint(ckpt)
        except CheckpointError as e:
            if named:
                raise CheckpointError(f"cannot resume from {checkpoint}: {e}") from None
            problems.append(f"{ckpt.name}: {e}")
            log(f"checkpoint {ckpt} cannot be resumed from: {e}")
            continue
        for newer in found[found.index(ckpt) + 1:]:
            aside = _set_aside(newer, SUPERSEDED if named else DAMAGED)
            log(f"set {newer.name} aside as {aside.name}; resuming from {ckpt.name}")
        return ckpt, state
    if not found:
        return None, None
    raise CheckpointError(
        f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be resumed from:\n  " + "\n  ".join(problems)
        + f"\nStart the run again in a new directory (reval train --config {Path(run_dir) / 'config.json'} "
          "--out NEW_DIR), or delete the checkpoints and metrics.jsonl of this one.")


def _of_run(run_dir: Path, found: list[Path], checkpoint: Path | str) -> Path:
    """`checkpoint` as one of `found` (the run's checkpoints); `CheckpointError` otherwise."""
    for ckpt in found:
        if ckpt.resolve() == Path(checkpoint).resolve():
            return ckpt
    raise CheckpointError(f"{checkpoint} is not a checkpoint of the run in {run_dir} (its checkpoints: "
                          f"{', '.join(c.name for c in found) or 'none'}); name one of them, or resume from "
                          "the newest")


def _recover_interrupted_replace(run_dir: Path) -> None:
    """A kill while a round's checkpoint was saved a second time (Ctrl-C after a save) can leave
    the old copy as `.old-round-*` with no `round-*`: put it back; otherwise delete it."""
    root = Path(run_dir) / "checkpoints"
    for old in root.glob(f".old-{PREFIX}*") if root.is_dir() else ():
        final = root / old.name[len(".old-"):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _set_aside(ckpt: Path, prefix: str = DAMAGED) -> Path:
    aside = ckpt.with_name(prefix + ckpt.name)
    n = 1
    while aside.exists():
        aside = ckpt.with_name(f"{prefix}{ckpt.name}.{n}")
        n += 1
    os.replace(ckpt, aside)
    return aside


def rng_state(py_rngs: dict[str, random.Random]) -> dict:
    return {"torch": torch.get_rng_state(), "python": {k: r.getstate() for k, r in py_rngs.items()}}


def set_rng_state(state: dict, py_rngs: dict[str, random.Random]) -> None:
    torch.set_rng_state(state["torch"])
    for k, r in py_rngs.items():
        r.setstate(state["python"][k])
