"""The run: everything around the actor and the learner. The run directory and its lock, the
config, resume, the parts (`reval.loop.build`), metrics, evaluation, checkpoints and the
stopping rules. A schedule (`reval.loop.schedule`) decides when the actor acts and the
learner learns; the run does the rest at the end of each round.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from reval.buffer import ReplayBuffer
from reval.checkpoint import RunExistsError, RunLock, atomic_write_text, latest_checkpoint, rng_state, set_rng_state
from reval.config import OFFLINE_ALGORITHMS, TrainConfig
from reval.data import extra_columns
from reval.distributed import (LogProbModule, all_ranks_true, full_params, load_optimizer_state, make_accelerator,
                               optimizer_state, prepare)
from reval.evaluate import evaluate, truncation_warning
from reval.loop import build
from reval.loop.actor import Actor, Rollout, report_reward_errors
from reval.loop.learner import Learner
from reval.loop.messages import (NO_SIGNAL_ROUNDS, failed_start_message, inputs_message, memory_message,
                                 no_signal_message, nothing_to_run_message, out_of_memory, say, unscored_message)
from reval.loop.state import (absolute_paths, choose_checkpoint, inputs_fingerprint, logged_rounds, truncate_metrics,
                              write_checkpoint)
from reval.losses import ALGORITHMS
from reval.metrics import MetricsLogger, tracker_names
from reval import offline
from reval.model import (auto_prompt, default_model_path, eos_token_ids, prompts_too_long, resolve_template,
                         use_chat_template)
from reval.offline import ROWS_PER_EXAMPLE
from reval.reference import RefCache
from reval.rewards import reward_name
from reval.tasks import TASKS


def train(cfg: TrainConfig, resume: bool | str | os.PathLike = False, *, problems: list | None = None,
          eval_problems: list | None = None, should_stop: Callable[[dict], bool] | None = None,
          reward_funcs: list | None = None) -> dict:
    """Run (or resume) training; returns the final evaluation and counters.

    `resume`: True continues from the newest checkpoint that verifies; a path, from that
    checkpoint of this run (as TRL's `resume_from_checkpoint`): newer checkpoints are set aside
    as `superseded-round-*` and metric lines after its round dropped, as on any resume.

    `reward_funcs` (callables, or names as in `task.rewards`) replaces `task.rewards`; the
    Python API (`reval.ReValTrainer`) passes its callables here. Pass them again on resume.

    For studies that need other data than the task config describes (the benchmark's
    one-prompt setting): `problems` replaces the training split, `eval_problems` the
    evaluation split (objects with `.question` and `.answer`), and `should_stop` is
    called with every evaluation record and ends the run after that round when it
    returns True. None of the three is saved in checkpoints: pass them again on resume.
    """
    from reval.loop.schedule import SCHEDULES

    cfg.validate()
    accelerator = make_accelerator(cfg.model.mixed_precision)
    for name, value in (("rollout.prompts_per_round", cfg.rollout.prompts_per_round),
                        ("buffer.capacity", cfg.buffer.capacity)):
        if value % accelerator.num_processes:
            raise ValueError(f"{name} = {value} must be divisible by the number of processes "
                             f"({accelerator.num_processes})")
    if cfg.schedule.mode == "async" and accelerator.num_processes > 1:
        raise ValueError(f"schedule.mode async runs one learner process; this launch has "
                         f"{accelerator.num_processes}. Launch one process, or use schedule.mode sync")
    # one process per run directory: two would mix their metrics and checkpoints
    with RunLock(cfg.run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        try:
            run = Run(cfg, accelerator, resume, problems, eval_problems, should_stop, reward_funcs)
            return SCHEDULES[cfg.schedule.mode](run)
        except NothingToRun as done:  # a resume with no more rounds than the run has: said in Run._open
            return done.counters
        except (torch.OutOfMemoryError, RuntimeError) as e:  # torch's allocators, GPU and CPU
            if not out_of_memory(e):
                raise
            raise MemoryError(memory_message(cfg, e)) from None


class NothingToRun(Exception):
    """A resume with `rounds` at or below the rounds the run has done. Not an error: `train`
    returns the run's counters (the command exits 0), so a job that resumes until the run is
    done may run once more."""

    def __init__(self, counters: dict):
        super().__init__(counters)
        self.counters = dict(counters)


class Run:
    """One training run on this rank: its parts (actor, learner), its counters and streaks
    (what a checkpoint saves besides the weights), its logger and evaluation sets.

    Built in the order the checks are cheapest: the run directory and the checkpoint to
    resume, the data (a bad row is refused in seconds), then the models and the sampler."""

    def __init__(self, cfg: TrainConfig, accelerator, resume: bool | str | os.PathLike, problems=None,
                 eval_problems=None, should_stop: Callable[[dict], bool] | None = None, reward_funcs=None):
        self.cfg, self.accelerator, self.should_stop = cfg, accelerator, should_stop
        self.rank, self.world, self.main = accelerator.process_index, accelerator.num_processes, \
            accelerator.is_main_process
        self.run_dir = cfg.run_dir
        ckpt, state = self._open(resume)
        self.algo = ALGORITHMS[cfg.algo]
        self.offline_data = self.algo.data != "rollout"
        tracker_names(cfg.report_to)  # a tracker asked for but not installed: said before the model loads
        train_set, self.eval_sets = build.datasets(cfg, problems, eval_problems, self.algo.data)
        self.inputs = inputs_fingerprint(problems, reward_funcs)
        if state is not None and state.get("inputs", self.inputs) != self.inputs:
            raise ValueError(inputs_message(state["inputs"], self.inputs))
        if len(train_set) < cfg.rollout.prompts_per_round // self.world:
            raise ValueError(f"the training data has {len(train_set)} examples, fewer than rollout.prompts_per_round "
                             f"= {cfg.rollout.prompts_per_round} drawn each round; lower it or add data")
        start_path = cfg.model.path or default_model_path(cfg.task.name)
        # what an actor process needs to rebuild the actor (reval.loop.actor_process)
        self.ckpt, self.start_path, self.train_set, self.reward_funcs = ckpt, start_path, train_set, reward_funcs
        self._models(ckpt, start_path)
        if getattr(self.model, "generation_config", None) is not None:  # checkpoints declare the run's budget
            self.model.generation_config.max_new_tokens = cfg.max_new_tokens
        self._prompts_and_rewards(train_set, problems, reward_funcs)
        # asynchronous: the actor process samples; this process evaluates with HF generate
        generator = build.make_generator(cfg, self.model, self.tokenizer, self.eos_ids, start_path,
                                         backend="hf" if cfg.schedule.mode == "async" else None)
        self.remote_sampler = cfg.rollout.backend != "hf" and cfg.schedule.mode == "sync"  # a vLLM engine or server
        self.counters = {"round": 0, "updates": 0, "samples": 0, "seconds": 0.0, "ref_version": 0,
                         "sampler_version": 0}
        # consecutive skipped updates, rounds without a scored answer, rounds without a learning
        # signal: checkpointed, so a resumed run stops or warns where the uninterrupted one would
        self.streaks = {"bad_updates": 0, "unscored_rounds": 0, "no_signal_rounds": 0}
        self.fresh_start = state is None
        if state is not None:
            self._restore(state)
        rows = ROWS_PER_EXAMPLE[self.algo.data] + (cfg.rollout.samples_per_prompt if self.algo.samples_demonstrations
                                                   else 0)  # dualqdm: a demonstration and G answers
        self.rows_per_rank = cfg.rollout.prompts_per_round // self.world * rows if self.offline_data \
            else cfg.batch_size // self.world
        self.actor = Actor(cfg, accelerator, generator, self.tokenizer, train_set, self.rngs["prompts"],
                           self.counters, policy=self.policy, model=self.model, template=self.template,
                           chat=self.chat, reward_fns=self.reward_fns, reward_errors=self.reward_errors,
                           offline_data=self.offline_data,
                           embedded_task=TASKS[cfg.task.name] if self.offline_data and cfg.task.data is None
                           else None)
        self.learner = Learner(cfg, accelerator, self.policy, self.reference, self.optimizer, self.buffer,
                               self.ref_cache, self.rngs["buffer"], self.counters, self.streaks,
                               self.rows_per_rank, self.tokenizer.pad_token_id, self.run_dir, sampler=generator)
        if self.counters["sampler_version"] != self.counters["updates"] or self.remote_sampler:
            self.actor.sync()  # a resumed or fresh vLLM sampler starts from the policy
        self.logger = MetricsLogger(self.run_dir, cfg.report_to, cfg.to_dict()) if self.main else None
        self.last_eval: dict = {}
        self.warned_truncated: set[str] = set()

    # -- building ---------------------------------------------------------------------------

    def _open(self, resume: bool | str | os.PathLike):
        """(checkpoint, its state) to resume from, or (None, None); writes config.json, with
        absolute paths (`absolute_paths`: any directory can resume the run). A resumed run that
        already has `cfg.rounds` rounds raises `NothingToRun`. A directory with neither a
        checkpoint nor a logged round (a start that failed early) is no run: a fresh start
        takes its place."""
        cfg, run_dir = self.cfg, self.run_dir
        absolute_paths(cfg)
        named = None if isinstance(resume, bool) else resume  # a path: that checkpoint, not the newest
        ckpt, state = choose_checkpoint(run_dir, self.accelerator, named) if resume else (None, None)
        if state is not None:
            cfg.check_resumable_from(absolute_paths(TrainConfig.from_saved(state["config"])))
            if state["world_size"] != self.world:
                raise ValueError(f"cannot resume: the run used {state['world_size']} processes, "
                                 f"now {self.world}; resume with the same number")
            done, answers = state["counters"]["round"], state["counters"]["samples"]
            if self.main:
                say(nothing_to_run_message(run_dir, done, cfg.rounds) if done >= cfg.rounds else
                    f"resumed from {ckpt} (round {done} of {cfg.rounds} done, {answers} "
                    f"{'examples' if cfg.algo in OFFLINE_ALGORITHMS else 'answers'} so far)")
            if done >= cfg.rounds:
                raise NothingToRun(state["counters"])
        elif resume:  # killed before its first checkpoint: start the run over
            if self.main:
                print(f"no complete checkpoint in {run_dir / 'checkpoints'}; starting the run from scratch")
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        elif latest_checkpoint(run_dir):
            raise RunExistsError(f"run directory {run_dir} already holds a run; continue it with "
                                 f"--resume {run_dir}, or choose another --out")
        elif logged_rounds(run_dir / "metrics.jsonl"):
            raise ValueError(failed_start_message(run_dir, logged_rounds(run_dir / "metrics.jsonl")))
        elif (run_dir / "config.json").exists() and self.main:
            say(f"{run_dir} holds no checkpoint and no logged round (a start that stopped before its first round): "
                "starting a new run in it")
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.main:
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        return ckpt, state

    def _models(self, ckpt, start_path) -> None:
        """Policy, reference, optimizer, the wrapper (DDP / FSDP / DeepSpeed), buffer, caches, RNGs."""
        cfg, accelerator = self.cfg, self.accelerator
        torch.manual_seed(cfg.seed)
        build.check_latent(cfg, ckpt / "model" if ckpt else start_path, accelerator.num_processes)
        model, self.tokenizer = build.load_policy(cfg, ckpt, start_path)
        reference = build.make_reference(cfg, model, ckpt, start_path, accelerator) \
            if self.algo.needs_reference else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                      weight_decay=cfg.optim.weight_decay)
        # the loss's forward goes through the (DDP / FSDP / DeepSpeed) wrapper
        self.policy, self.optimizer = prepare(
            accelerator, LogProbModule(model, cfg.model.logprob_chunk, cfg.shared_prefix), optimizer,
            cfg.optim.max_grad_norm)
        self.model = model = accelerator.unwrap_model(self.policy).lm
        if reference is not None:
            reference.policy = model
            if accelerator.is_fsdp2:  # a LoRA / Q-Adapter reference pass enters through FSDP2's root
                reference.root = self.policy
        self.reference = reference
        b = cfg.buffer  # this rank's shard (reval.distributed)
        self.buffer = ReplayBuffer(b.capacity // self.world, b.sampling, b.priority_alpha, b.priority_correction,
                                   b.half_life)
        # reference values of stored answers, reused while the reference is unchanged: worth it
        # when an answer is used more than once (replay, or K > 1)
        self.ref_cache = RefCache() if self.algo.needs_reference and cfg.loss.ref_cache and (
            self.algo.replay or cfg.updates_per_round > 1) else None
        # rank 0 keeps the single-process streams, so 1-process runs are unchanged
        self.rngs = {"prompts": random.Random(cfg.seed + 7919 * self.rank),
                     "buffer": random.Random(cfg.seed + 1 + 7919 * self.rank)}

    def _prompts_and_rewards(self, train_set, problems, reward_funcs) -> None:
        """The prompt template, the reward functions, and the checks that the data fits the model."""
        cfg, model, tokenizer = self.cfg, self.model, self.tokenizer
        self.chat = use_chat_template(tokenizer, cfg.model.chat_template)
        embedded = cfg.task.data is None and problems is None
        self.prompt = cfg.task.prompt if cfg.task.prompt != "auto" else auto_prompt(self.chat, embedded=embedded)
        self.template = resolve_template(self.prompt)
        self.reward_fns = build.reward_functions(cfg, reward_funcs)
        self.reward_names = [reward_name(fn) for fn in self.reward_fns]
        self.reward_errors: dict[str, str] = {}  # the first failure of each reward function, shown once
        self.eos_ids = eos_token_ids(model, tokenizer)
        context = model.config.max_position_embeddings
        if self.offline_data:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has no EOS token, which ends every demonstration and answer; "
                                 "set tokenizer.eos_token in the model directory")
            long = offline.too_long(train_set, tokenizer, template=self.template, chat=self.chat, context=context)
            if long:
                raise ValueError(f"training example {long[0]} is {long[1]} tokens with its prompt, more than the "
                                 f"model's context of {context}; shorten or drop it")
            return
        too_long = prompts_too_long(model, tokenizer, [p.question for p in train_set], cfg.max_new_tokens,
                                    self.template, self.chat)
        if too_long:
            i, n = too_long[0]
            raise ValueError(f"training prompt {i} is {n} tokens ({len(too_long)} such prompts); with "
                             f"rollout.max_new_tokens={cfg.max_new_tokens} it exceeds the model's "
                             f"context of {context}")

    def _restore(self, state: dict) -> None:
        """A checkpoint's optimizer, buffer, reference cache, RNGs, counters and streaks."""
        load_optimizer_state(self.optimizer, state["optimizer"])  # FSDP2: shards back into DTensors
        self.buffer.load_state_dict(state["buffer"])
        if self.ref_cache is not None and "ref_cache" in state:  # older checkpoints: recomputed on use
            self.ref_cache.load_state_dict(state["ref_cache"])
        set_rng_state(state["rng"], self.rngs)
        self.counters = {"sampler_version": state["counters"]["updates"], **state["counters"]}
        self.streaks.update(state.get("streaks", {}))
        if self.main:
            truncate_metrics(self.run_dir / "metrics.jsonl", self.counters["round"])

    # -- during the run ---------------------------------------------------------------------

    def check_scored(self, rollout: Rollout) -> None:
        """Stop after `rollout.max_unscored_rounds` rounds in a row in which no answer on any rank
        got a reward: a broken reward function or data, not bad luck."""
        if rollout.samples is None:
            return
        unscored = all_ranks_true(self.accelerator, rollout.unscored)
        self.streaks["unscored_rounds"] = self.streaks["unscored_rounds"] + 1 if unscored else 0
        if self.streaks["unscored_rounds"] >= self.cfg.rollout.max_unscored_rounds:
            raise ValueError(unscored_message(self.cfg, self.reward_names, rollout.columns,
                                              self.streaks["unscored_rounds"], rollout.round + 1,
                                              rollout.reward_failures, len(rollout.rewards)))

    def end_round(self, rollout: Rollout, upd_metrics: list[dict], seconds: float, t_upd: float,
                  extra: dict | None = None) -> bool:
        """Step 7: count the round, log it (with the schedule's `extra` metrics), warn on a run
        without signal, evaluate and checkpoint on schedule. True when the run is over (its last
        round, or `should_stop`)."""
        cfg, counters = self.cfg, self.counters
        counters["seconds"] += seconds
        counters["round"] += 1
        rec = round_record(counters, rollout, upd_metrics, t_upd, len(self.buffer) * self.world)
        rec.update(extra or {})
        if self.logger is not None:  # rank 0's rollout statistics stand for all ranks
            self.logger.log(rec)
        if rollout.samples is not None:  # no signal: every group's answers alike (G = 1: every answer alike)
            flat = rec["rollout/groups_all_same"] == 1.0 if cfg.rollout.samples_per_prompt > 1 else \
                len({x for x in rollout.rewards if x is not None}) <= 1
            self.streaks["no_signal_rounds"] = self.streaks["no_signal_rounds"] + 1 if flat else 0
            if self.main and self.streaks["no_signal_rounds"] == NO_SIGNAL_ROUNDS:
                say(no_signal_message(cfg, self.prompt, self.reward_names, rec, counters["round"]))
        if "rollout/truncated_frac" in rec:
            self._warn_truncated("training", f"round {counters['round']}", rec["rollout/truncated_frac"])
        done = counters["round"] == cfg.rounds
        if self.eval_sets and (done or (cfg.eval.every and counters["round"] % cfg.eval.every == 0)):
            self.evaluate()
            if self.should_stop is not None and self.should_stop(self.last_eval):
                done = True
        if done or self.checkpoint_due():
            self.save()
        self.bar.update(1)
        acc = self.last_eval.get("eval/accuracy", self.last_eval.get(f"eval/mean@{cfg.eval.samples}", float("nan")))
        shown = {"loss": rec.get("loss/total", float("nan"))} if rollout.samples is None else \
            {"reward": rec["rollout/reward_mean"]}
        self.bar.set_postfix(**{k: f"{v:.2f}" for k, v in shown.items()}, acc=f"{acc:.2f}")
        return done

    def checkpoint_due(self) -> bool:
        return bool(self.cfg.checkpoint_every and self.counters["round"] % self.cfg.checkpoint_every == 0)

    def evaluate(self) -> dict:
        """Evaluate the policy on every evaluation set (every rank; rank 0 logs)."""
        cfg, counters, t0 = self.cfg, self.counters, time.time()
        rec = {"round": counters["round"], "samples": counters["samples"], "seconds": counters["seconds"]}
        results = {}
        seen = len(self.reward_errors)
        if self.remote_sampler and counters["sampler_version"] != counters["updates"]:
            self.actor.sync()  # evaluate the policy, not the weights the engine sampled this round with
        with full_params(self.accelerator, self.policy):
            for name, problems_ in self.eval_sets.items():
                results[name] = evaluate(
                    self.model, self.tokenizer, [p.question for p in problems_], [p.answer for p in problems_],
                    samples=cfg.eval.samples, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, template=self.template,
                    chat=self.chat, verifier=self.reward_fns[0], eos_token_ids=self.eos_ids,
                    generator=self.actor.generator if self.remote_sampler else None,
                    columns=extra_columns(problems_), errors=self.reward_errors)
        if self.main:
            report_reward_errors(self.reward_errors, seen, "evaluation", "such answers count as wrong")
        if cfg.task.data is None:  # the embedded task: eval/accuracy, eval/mean@k
            rec.update({f"eval/{k}": v for k, v in next(iter(results.values())).items()})
        elif results:  # benchmarks: eval/<name>/<metric> and their average, as the paper reports
            for name, res in results.items():
                rec.update({f"eval/{name}/{k}": v for k, v in res.items()})
            for k in next(iter(results.values())):
                rec[f"eval/{k}"] = sum(r[k] for r in results.values()) / len(results)
        rec["perf/eval_seconds"] = time.time() - t0
        if self.logger is not None:
            self.logger.log(rec)
        self._warn_truncated("evaluation", f"evaluation after round {counters['round']}", rec["eval/truncated"])
        self.last_eval = rec
        return rec

    def _warn_truncated(self, kind: str, what: str, share: float) -> None:
        """Say once per run and kind (training, evaluation) when many answers hit the budget:
        at the first round, not after a streak, so a short trial is not silently useless."""
        if self.main and kind not in self.warned_truncated:
            warning = truncation_warning(what, share, self.cfg.max_new_tokens,
                                         "rollout.max_new_tokens (--rollout.max-new-tokens)")
            if warning:
                self.warned_truncated.add(kind)
                say("\n" + warning)

    def save(self) -> None:
        per_rank = {"optimizer": optimizer_state(self.optimizer), "buffer": self.buffer.state_dict(),
                    "buffer_size": len(self.buffer), "rng": rng_state(self.rngs)}
        if self.ref_cache is not None:  # saved, so a resumed run uses the very same numbers
            per_rank["ref_cache"] = self.ref_cache.state_dict()
        write_checkpoint(self.accelerator, self.policy, self.run_dir, self.cfg, self.model, self.tokenizer,
                         self.reference, per_rank, self.counters, {"streaks": dict(self.streaks),
                                                                   "inputs": self.inputs})

    @contextlib.contextmanager
    def running(self):
        """The run's span: the first evaluation of a fresh run, the progress bar, Ctrl-C
        deferred to the end of a round (checkpointed there), the logger closed at the end."""
        if self.fresh_start and self.eval_sets:
            self.evaluate()
        self.bar = tqdm(total=self.cfg.rounds, initial=self.counters["round"], desc=f"{self.cfg.algo}",
                        disable=not (self.cfg.progress and self.main), dynamic_ncols=True)
        try:
            with _DeferredInterrupt() as self.interrupt:
                yield self
        finally:
            self.bar.close()
            if self.logger is not None:
                self.logger.close()

    def stop_if_interrupted(self) -> None:
        """After a round: on Ctrl-C, checkpoint the completed round and stop."""
        if self.interrupt.requested:
            if not self.checkpoint_due():
                self.save()
            raise KeyboardInterrupt(f"interrupted after round {self.counters['round']}; "
                                    f"resume with: reval train --resume {self.run_dir}")

    def actor_spec(self):
        """What an actor process needs to act for this run from its current round on."""
        from reval.loop.actor_process import ActorSpec

        return ActorSpec(config=self.cfg.to_dict(), start_path=str(self.start_path),
                         checkpoint=str(self.ckpt) if self.ckpt else None, train_set=self.train_set,
                         reward_funcs=self.reward_funcs, template=self.template, chat=self.chat,
                         first_round=self.counters["round"], rng_state=self.rngs["prompts"].getstate(),
                         rows_per_rank=self.rows_per_rank)

    def result(self) -> dict:
        return {**self.last_eval, **self.counters}


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag checked between rounds; a second one aborts at once.

    A checkpoint taken mid-round would pair a half-updated model with the counters of the
    last complete round, so the loop only stops at a round boundary.
    """

    def __enter__(self):
        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this round, writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def round_record(counters: dict, rollout: Rollout, upd_metrics: list[dict], t_upd: float,
                 buffer_size: int = 0) -> dict:
    """A round's metrics line: counters, the data (sampled answers, or an offline algorithm's
    examples), and the mean over its K updates."""
    rec = {"round": counters["round"], "samples": counters["samples"], "seconds": counters["seconds"],
           "updates": counters["updates"], "perf/generate_seconds": rollout.generate_seconds,
           "perf/update_seconds": t_upd}
    samples, fresh = rollout.samples, rollout.fresh
    if samples is None:
        rec["data/response_len"] = sum(len(e.response_ids) for e in fresh) / len(fresh)
        if rollout.truncated_frac is not None:  # dualqdm: its sampled answers
            rec["rollout/truncated_frac"] = rollout.truncated_frac
    else:
        r = torch.tensor([x for x in rollout.rewards if x is not None] or [0.0])
        rec.update({"rollout/reward_mean": r.mean().item(),
                    "rollout/response_len": sum(map(len, samples.response_ids)) / len(samples.response_ids),
                    "rollout/truncated_frac": sum(samples.truncated) / len(samples.truncated),
                    "rollout/reward_failures": rollout.reward_failures,
                    "rollout/groups_all_same": _groups_all_same(fresh),
                    "rollout/sampler_lag": rollout.sampler_lag,
                    "buffer/size": buffer_size, "q/ref_version": counters["ref_version"]})
    for key in dict.fromkeys(k for m in upd_metrics for k in m):  # mean over the K updates that have it
        values = [m[key] for m in upd_metrics if key in m]  # (replay-only metrics: the replay updates)
        rec[key] = sum(values) / len(values)
    if upd_metrics and samples is not None:
        rec["buffer/staleness_max"] = max(m["buffer/staleness_max"] for m in upd_metrics)
    return rec


def _groups_all_same(experiences) -> float:
    """Fraction of groups whose answers all got the same reward (no learning signal for GRPO)."""
    groups: dict[int, set] = {}
    for e in experiences:
        groups.setdefault(e.group_id, set()).add(e.reward)
    return sum(len(v) == 1 for v in groups.values()) / max(len(groups), 1)


