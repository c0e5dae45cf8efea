"""The actor in a process of its own, for the asynchronous schedule (`reval.loop.schedule`).

The child process builds the policy the way the learner does (`build.load_policy`, so a LoRA
model has the same parameter names), then samples and scores round after round with the
same `Actor` as the synchronous loop (HF generate from that model, or `rollout.backend`'s
vLLM engine or vLLM server, loaded with its weights at every new version), and puts each
`Rollout` on a bounded queue. It blocks only when the queue is full: generation never waits
for an update. Before each round it loads the newest weights the learner pushed
(`ActorProcess.push`), and tags the round's answers with that policy version.

Weights travel as safetensors bytes through a pipe, not as shared-memory tensors: torch's
file-descriptor sharing runs a server thread in the learner that prints a traceback whenever
the actor dies mid-handshake (killed, or stopped by Ctrl-C). Rollouts are pickled. The child
ignores Ctrl-C (the learner stops it at a round boundary) and reports a failure as a message
on the queue before it exits; the learner also notices a child that died without a word
(killed, out of memory) by its exit code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import signal
import threading
import time
import traceback

import torch

from reval.config import TrainConfig

POLL_SECONDS = 0.5  # how often a waiting side checks that the other is still there


@dataclasses.dataclass
class ActorSpec:
    """What the child needs to act as the run's actor (picklable)."""
    config: dict
    start_path: str
    checkpoint: str | None
    train_set: list
    reward_funcs: list | None
    template: str
    chat: bool
    first_round: int
    rng_state: tuple
    rows_per_rank: int


class ActorDied(ChildProcessError):
    """The actor process failed or vanished; the message says how and what to do."""


def actor_main(spec: ActorSpec, weights: "queue.Queue", out: "queue.Queue", stop) -> None:
    """The child's entry point: act until `stop` is set or the learner is gone, pushing
    rollouts to `out`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when to stop
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    try:
        _act_forever(spec, weights, out, stop)
    except BaseException as e:  # noqa: BLE001 - reported to the learner, which raises it
        _put(out, ("error", f"{type(e).__name__}: {e}", traceback.format_exc()), stop)


def _act_forever(spec: ActorSpec, weights, out, stop) -> None:
    import random
    from pathlib import Path

    from reval.distributed import make_accelerator
    from reval.loop import build
    from reval.loop.actor import Actor
    from reval.model import eos_token_ids
    from reval.rollout import HFGenerator

    cfg = TrainConfig.from_dict(spec.config)
    torch.set_num_threads(cfg.schedule.actor_threads)
    accelerator = make_accelerator(cfg.model.mixed_precision)
    ckpt = Path(spec.checkpoint) if spec.checkpoint else None
    model, tokenizer = build.load_policy(cfg, ckpt, spec.start_path)
    model.requires_grad_(False)
    rng = random.Random()
    rng.setstate(spec.rng_state)
    counters = {"updates": 0, "sampler_version": 0, "samples": 0}
    reward_fns = build.reward_functions(cfg, spec.reward_funcs)
    eos = eos_token_ids(model, tokenizer)
    # HF generate samples from `model` itself; vLLM (an engine in this process, or a server) is
    # loaded with `model`'s weights whenever a new version arrives
    hf = cfg.rollout.backend == "hf"
    generator = HFGenerator(model, tokenizer, eos) if hf else build.make_generator(cfg, model, tokenizer, eos,
                                                                                   spec.start_path)
    actor = Actor(cfg, accelerator, generator, tokenizer, spec.train_set, rng, counters, policy=model, model=model,
                  template=spec.template, chat=spec.chat, reward_fns=reward_fns, reward_errors={})
    rnd, waited = spec.first_round, 0.0
    while not stop.is_set():
        version = counters["sampler_version"]
        _load_newest(model, weights, counters, block=rnd == spec.first_round, stop=stop)
        if not hf and (rnd == spec.first_round or counters["sampler_version"] != version):
            generator.sync_weights(model)
        rollout = actor.act(rnd, spec.rows_per_rank)
        rollout.rng_state = rng.getstate()  # the learner saves it: a resume draws the next prompts
        rollout.actor_wait_seconds = waited
        t0 = time.time()
        if not _put(out, rollout, stop):
            return
        waited = time.time() - t0
        rnd += 1


@torch.no_grad()
def _load_newest(model, weights, counters: dict, block: bool, stop) -> None:
    """Load the newest weights waiting in `weights`; with `block`, wait for the first push (the
    learner's weights at the start or the resumed checkpoint). Older trainable-only pushes are
    skipped; the newest complete one (after a reference reset: the merged base) is loaded first."""
    pending = []
    while True:
        try:
            pending.append(weights.get(timeout=POLL_SECONDS) if block and not pending else weights.get_nowait())
        except queue.Empty:
            if pending or not block or stop.is_set():
                break
    if not pending:
        return
    complete = [item for item in pending[:-1] if item[2]]
    for version, data, _ in (complete[-1:] + pending[-1:]):
        _copy_into(model, decode_weights(data))
    counters["updates"] = counters["sampler_version"] = pending[-1][0]


def _copy_into(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, tensor in state.items():  # trainable weights, or every weight after a reference reset
        target = params.get(name)
        if target is None:
            target = model.get_buffer(name)
        target.copy_(tensor)


def encode_weights(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (each tensor copied out, contiguous)."""
    from safetensors.torch import save

    return save({name: t.contiguous().clone() for name, t in state.items()})


def decode_weights(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _exit_when_orphaned(parent_pid: int) -> None:
    """A watchdog thread: once the learner has died without stopping the actor (kill -9), the
    actor's parent is no longer the learner; leave at once, from wherever the main thread is
    (it may be blocked for good reading a weight push the learner died while writing), so that
    no actor holds its memory (a vLLM engine: its GPU memory) into the resumed run."""
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    os._exit(0)  # nothing to flush and no one to tell: skip the exit handlers too


def _put(out, item, stop) -> bool:
    """Put `item` on the bounded queue, waiting while it is full; False if told to stop first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


class ActorProcess:
    """The learner's side: starts the child, pushes weights, receives rollouts, stops it.

    `waited` counts the seconds the learner spent waiting for a rollout (its idle time)."""

    def __init__(self, spec: ActorSpec, cfg: TrainConfig, model):
        import torch.multiprocessing as mp

        self.cfg, self.model, self.waited = cfg, model, 0.0
        ctx = mp.get_context("spawn")
        self.weights, self.out = ctx.Queue(), ctx.Queue(maxsize=cfg.schedule.queue_size)
        self.stop = ctx.Event()
        self.process = ctx.Process(target=actor_main, args=(spec, self.weights, self.out, self.stop),
                                   name="reval-actor", daemon=True)
        self.pushed_ref_version: int | None = None

    def __enter__(self) -> "ActorProcess":
        try:
            self.process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError("schedule.mode async sends the data and reward functions to an actor process, "
                             "so they must be picklable: module-level functions, not lambdas or closures "
                             f"({type(e).__name__}: {e})") from None
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Stop the child: tell it, drain what it is blocked on, and end it if it does not."""
        self.stop.set()
        deadline = time.time() + 10
        while self.process.is_alive() and time.time() < deadline:
            try:
                self.out.get(timeout=0.1)
            except (queue.Empty, OSError, EOFError):
                pass
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        for q in (self.out, self.weights):
            q.cancel_join_thread()
            q.close()

    @torch.no_grad()
    def push(self, version: int, ref_version: int) -> None:
        """Send the policy's weights, tagged with its version: the trainable ones, or all of them
        after a reference reset (a LoRA reset merges the adapter into the base weights). A push
        the actor has not taken yet is replaced (complete if either was): while the actor samples
        a round, at most one copy waits, not one per update."""
        full = ref_version != self.pushed_ref_version
        while True:  # one push waits at a time: the actor would load only the newest anyway
            try:
                full = self.weights.get_nowait()[2] or full  # a waiting complete push is not lost
            except queue.Empty:
                break
        state = {name: p.detach() for name, p in self.model.named_parameters() if full or p.requires_grad}
        if full:
            state.update({name: b.detach() for name, b in self.model.named_buffers()})
        self.weights.put((version, encode_weights(state), full))
        self.pushed_ref_version = ref_version

    def next_rollout(self):
        """The next round's rollout; raises `ActorDied` if the child failed or is gone."""
        t0 = time.time()
        try:
            while True:
                try:
                    item = self.out.get(timeout=POLL_SECONDS)
                except (EOFError, OSError) as e:  # the pipe broke under a dying actor
                    raise ActorDied(f"the actor process (pid {self.process.pid}) is gone ({e}). Completed "
                                    "checkpoints are intact; resume with reval train --resume DIR") from None
                except queue.Empty:
                    if not self.process.is_alive():
                        raise ActorDied(
                            f"the actor process (pid {self.process.pid}) died with exit code "
                            f"{self.process.exitcode} and sent no error: killed, or out of memory. Completed "
                            "checkpoints are intact; resume with reval train --resume DIR") from None
                    continue
                if isinstance(item, tuple) and item and item[0] == "error":
                    raise ActorDied(f"the actor process failed: {item[1]}\n--- the actor's traceback ---\n{item[2]}")
                return item
        finally:
            self.waited += time.time() - t0
