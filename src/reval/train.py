"""The training loop: rounds of generate -> score -> store -> K updates -> evaluate.

    reval train --algo reval --rounds 40 --out runs/my-run
    reval train --resume runs/my-run

One round (blocks below come in the same order as the package's files):
  1. task      draw P training prompts
  2. rollout   sample G answers per prompt with the current policy (KV cache)
  3. rewards   score each answer; group statistics while the group is together
  4. buffer    add the round's trajectories to the FIFO replay buffer
  5. updates   K optimizer updates; the first on the fresh batch, the others on a uniform
               sample of the buffer (on-policy GRPO reuses the fresh batch instead).
               Log-probs and V_ref are recomputed under the current policy and
               reference at every update, never cached.
  6. reference copy the policy into the reference every `ref_reset_every` updates
  7. eval / log / checkpoint

Single process and plain PyTorch, so `breakpoint()` works anywhere.
"""

from __future__ import annotations

import json
import os
import math
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from reval.buffer import Batch, ReplayBuffer, collate
from reval.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from reval.config import TrainConfig
from reval.evaluate import evaluate
from reval.logprobs import sequence_logprobs
from reval.losses import ALGORITHMS
from reval.metrics import MetricsLogger, read_metrics
from reval.model import default_model_path, format_prompt, load_model, prompts_too_long
from reval.rewards import correctness_reward, score
from reval.rollout import generate, to_experiences
from reval.tasks.arithmetic import EVAL_SEED, split

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def update(model, ref_model, optimizer, batch: Batch, cfg: TrainConfig,
           old_logp: torch.Tensor | None = None) -> dict:
    """One optimizer step on `batch`, accumulated over micro-batches.

    Each micro-batch loss is normalised by the whole batch's trajectory (or token)
    count, so the summed gradient equals the full-batch gradient whatever the
    micro-batch size. Returns metrics, with `perf/skipped` = 1 if the step was skipped
    because the loss or gradient was not finite.
    """
    algo = ALGORITHMS[cfg.algo]
    denom = int(batch.response_mask.sum()) if algo.per_token else len(batch)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    total_loss = 0.0
    mb = cfg.optim.micro_batch_size
    for start in range(0, len(batch), mb):
        micro = batch.slice(start, start + mb)
        t = {"mask": micro.response_mask, "reward": micro.reward,
             "group_mean": micro.group_mean, "group_std": micro.group_std}
        t["logp"], t["v"] = sequence_logprobs(model, micro, cfg.model.logprob_chunk)
        if algo.needs_reference:
            with torch.no_grad():
                t["ref_logp"], t["ref_v"] = sequence_logprobs(ref_model, micro, cfg.model.logprob_chunk)
        if algo.on_policy:  # pi_old: the sampling policy (no grad); equals pi_theta on the 1st update
            t["old_logp"] = (old_logp[start:start + mb, : micro.response_mask.shape[1]]
                             if old_logp is not None else t["logp"].detach())
        loss, metrics = algo.compute(t, cfg.loss, denom)
        loss.backward()
        total_loss += loss.item()
        for k, v in metrics.items():  # max over micro-batches, else a size-weighted mean
            if k.endswith("_max_abs"):
                sums[k] = max(sums.get(k, 0.0), v)
            else:
                sums[k] = sums.get(k, 0.0) + v * len(micro) / len(batch)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    finite = math.isfinite(total_loss) and torch.isfinite(grad_norm).item()
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**sums, "loss/total": total_loss, "loss/grad_norm": grad_norm.item(),
            "perf/skipped": 0.0 if finite else 1.0}


def _load(cfg: TrainConfig, path: str | Path):
    model, tokenizer = load_model(path, DTYPES[cfg.model.dtype])
    # eval mode (dropout off) for updates too: the loss compares policy and reference
    # log-probs exactly, and dropout would break ReVal's delta = 0 at the start.
    model.eval()
    return model, tokenizer


def train(cfg: TrainConfig, resume: bool = False, *, problems: list | None = None,
          eval_problems: list | None = None, should_stop: Callable[[dict], bool] | None = None) -> dict:
    """Run (or resume) training; returns the final evaluation and counters.

    For studies that need other data than the task config describes (the benchmark's
    one-prompt setting): `problems` replaces the training split, `eval_problems` the
    evaluation split (objects with `.question` and `.answer`), and `should_stop` is
    called with every evaluation record and ends the run after that round when it
    returns True. None of the three is saved in checkpoints: pass them again on resume.
    """
    cfg.validate()
    run_dir = cfg.run_dir
    ckpt = latest_checkpoint(run_dir) if resume else None
    state = torch.load(ckpt / "state.pt", weights_only=False) if ckpt else None
    if state is not None:
        cfg.check_resumable_from(TrainConfig.from_dict(state["config"]))
    elif resume:  # killed before its first checkpoint: start the run over
        print(f"no complete checkpoint in {run_dir / 'checkpoints'}; starting the run from scratch")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    elif (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir):
        raise ValueError(f"run directory {run_dir} already holds a run; continue it with "
                         f"--resume {run_dir}, or choose another --out")
    _check_writable(run_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    algo = ALGORITHMS[cfg.algo]

    # -- model, reference, optimizer ------------------------------------------------------
    torch.manual_seed(cfg.seed)
    start_path = cfg.model.path or default_model_path()
    model, tokenizer = _load(cfg, ckpt / "model" if ckpt else start_path)
    ref_model = None
    if algo.needs_reference:  # frozen copy of the starting policy
        ref_source = ckpt / "reference" if ckpt and (ckpt / "reference").exists() else start_path
        ref_model = _load(cfg, ref_source)[0].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    buffer = ReplayBuffer(cfg.buffer.capacity)
    rngs = {"prompts": random.Random(cfg.seed), "buffer": random.Random(cfg.seed + 1)}

    # -- data --------------------------------------------------------------------------------
    train_set = problems or split("train", cfg.task.num_train, cfg.task.digits, seed=cfg.seed)
    n_eval = cfg.task.num_test if cfg.task.eval_split == "test" else cfg.task.num_validation
    eval_set = eval_problems or split(cfg.task.eval_split, n_eval, cfg.task.digits,
                                      seed=EVAL_SEED)  # fixed across seeds

    too_long = prompts_too_long(model, tokenizer, [p.question for p in train_set], cfg.rollout.max_new_tokens)
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"training prompt {i} is {n} tokens ({len(too_long)} such prompts); with "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} it exceeds the model's "
                         f"context of {model.config.max_position_embeddings}")

    counters = {"round": 0, "updates": 0, "samples": 0, "seconds": 0.0, "ref_version": 0}
    bad_updates = 0  # consecutive skipped updates
    logger_start = True
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        buffer.load_state_dict(state["buffer"])
        set_rng_state(state["rng"], rngs)
        counters = state["counters"]
        _truncate_metrics(run_dir / "metrics.jsonl", counters["round"])
        logger_start = False
    logger = MetricsLogger(run_dir)

    def run_eval() -> dict:
        t0 = time.time()
        res = evaluate(model, tokenizer, [p.question for p in eval_set], [p.answer for p in eval_set],
                       samples=cfg.eval.samples, max_new_tokens=cfg.rollout.max_new_tokens)
        rec = {f"eval/{k}": v for k, v in res.items()}
        rec.update({"round": counters["round"], "samples": counters["samples"],
                    "seconds": counters["seconds"], "perf/eval_seconds": time.time() - t0})
        logger.log(rec)
        return rec

    last_eval = run_eval() if logger_start else {}
    bar = tqdm(total=cfg.rounds, initial=counters["round"], desc=f"{cfg.algo}", disable=not cfg.progress,
               dynamic_ncols=True)
    with _DeferredInterrupt() as interrupt:
        while counters["round"] < cfg.rounds:
            rnd = counters["round"]
            t_round = time.time()
            # 1. task: this round's prompts
            problems = rngs["prompts"].sample(train_set, cfg.rollout.prompts_per_round)
            prompts = [format_prompt(tokenizer, p.question) for p in problems]
            # 2. rollout: the generation seed depends only on (seed, round) -> reproducible on resume
            torch.manual_seed(cfg.seed * 1_000_003 + rnd)
            G = cfg.rollout.samples_per_prompt
            samples = generate(model, tokenizer, prompts, samples_per_prompt=G,
                               temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                               max_new_tokens=cfg.rollout.max_new_tokens)
            t_gen = time.time() - t_round
            # 3. rewards
            completions = tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
            answers = [p.answer for p in problems for _ in range(G)]
            rewards, reward_failures = score([correctness_reward], completions, {"answer": answers},
                                             timeout=cfg.rollout.reward_timeout)
            for i, trunc in enumerate(samples.truncated):
                if trunc and rewards[i] is not None:
                    rewards[i] = None if cfg.loss.drop_truncated else 0.0  # no EOS: reward 0
            fresh = to_experiences(samples, rewards, samples_per_prompt=G, version=counters["updates"],
                                   round=rnd, first_group_id=rnd * cfg.rollout.prompts_per_round)
            counters["samples"] += len(completions)
            # 4. buffer
            if not algo.on_policy:
                buffer.add(fresh)
            # 5. updates
            t_upd = time.time()
            upd_metrics: list[dict] = []
            fresh_batch = collate(fresh, tokenizer.pad_token_id) if fresh else None
            old_logp = None
            if algo.on_policy and cfg.updates_per_round > 1 and fresh_batch is not None:
                with torch.no_grad():  # pi_old for PPO-style reuse of the fresh batch
                    old_logp = sequence_logprobs(model, fresh_batch, cfg.model.logprob_chunk)[0]
            for k in range(cfg.updates_per_round):
                if algo.on_policy or (k == 0 and cfg.buffer.first_update_fresh):
                    batch = fresh_batch
                elif len(buffer):
                    batch = collate(buffer.sample(cfg.batch_size, rngs["buffer"]), tokenizer.pad_token_id)
                else:
                    batch = None
                if batch is None:  # every answer was dropped (e.g. all truncated): nothing to learn
                    continue
                m = update(model, ref_model, optimizer, batch, cfg, old_logp)
                bad_updates = bad_updates + 1 if m["perf/skipped"] else 0
                if bad_updates >= cfg.optim.max_bad_updates:
                    last = latest_checkpoint(run_dir)
                    raise FloatingPointError(
                        f"{bad_updates} updates in a row had a non-finite loss or gradient "
                        f"(round {rnd}); stopping. Last good checkpoint: {last or 'none'}. "
                        "Lower optim.lr or raise loss.beta, then resume or restart.")
                m["buffer/staleness_mean"] = (counters["updates"] - batch.version.float()).mean().item()
                m["buffer/staleness_max"] = float((counters["updates"] - batch.version).max())
                upd_metrics.append(m)
                if m["perf/skipped"]:
                    continue  # the weights did not change: same policy version, no reset
                counters["updates"] += 1
                # 6. reference reset: the replayed trajectories' ref log-probs are recomputed
                #    with the new reference at the next update (nothing is cached)
                every = cfg.loss.ref_reset_every
                if ref_model is not None and every and counters["updates"] % every == 0:
                    ref_model.load_state_dict(model.state_dict())
                    counters["ref_version"] += 1
            t_upd = time.time() - t_upd
            counters["seconds"] += time.time() - t_round
            counters["round"] += 1

            # 7. log / eval / checkpoint
            r = torch.tensor([x for x in rewards if x is not None] or [0.0])
            rec = {"round": counters["round"], "samples": counters["samples"], "seconds": counters["seconds"],
                   "updates": counters["updates"], "rollout/reward_mean": r.mean().item(),
                   "rollout/response_len": sum(map(len, samples.response_ids)) / len(samples.response_ids),
                   "rollout/truncated_frac": sum(samples.truncated) / len(samples.truncated),
                   "rollout/reward_failures": reward_failures,
                   "rollout/groups_all_same": _groups_all_same(fresh),
                   "buffer/size": len(buffer), "q/ref_version": counters["ref_version"],
                   "perf/generate_seconds": t_gen, "perf/update_seconds": t_upd}
            for key in (upd_metrics[0] if upd_metrics else {}):  # mean over the K updates
                rec[key] = sum(m[key] for m in upd_metrics) / len(upd_metrics)
            if upd_metrics:
                rec["buffer/staleness_max"] = max(m["buffer/staleness_max"] for m in upd_metrics)
            logger.log(rec)
            done = counters["round"] == cfg.rounds
            if done or (cfg.eval.every and counters["round"] % cfg.eval.every == 0):
                last_eval = run_eval()
                if should_stop is not None and should_stop(last_eval):
                    done = True
            if done or (cfg.checkpoint_every and counters["round"] % cfg.checkpoint_every == 0):
                _checkpoint(run_dir, cfg, model, tokenizer, ref_model, optimizer, buffer, rngs, counters)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['rollout/reward_mean']:.2f}",
                            acc=f"{last_eval.get('eval/accuracy', float('nan')):.2f}")
            if done:
                break
            if interrupt.requested:  # Ctrl-C: checkpoint the completed round, stop
                if not (cfg.checkpoint_every and counters["round"] % cfg.checkpoint_every == 0):
                    _checkpoint(run_dir, cfg, model, tokenizer, ref_model, optimizer, buffer, rngs, counters)
                bar.close()
                logger.close()
                raise KeyboardInterrupt(f"interrupted after round {counters['round']}; "
                                        f"resume with: reval train --resume {run_dir}")
    bar.close()
    logger.close()
    return {**last_eval, **counters}


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


def _checkpoint(run_dir, cfg, model, tokenizer, ref_model, optimizer, buffer, rngs, counters):
    save_checkpoint(
        run_dir, counters["round"], model=model, tokenizer=tokenizer,
        ref_model=ref_model if counters["ref_version"] else None,  # else: the starting model
        state={"optimizer": optimizer.state_dict(), "buffer": buffer.state_dict(),
               "rng": rng_state(rngs), "counters": dict(counters), "config": cfg.to_dict()},
        keep=cfg.keep_checkpoints)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output directory {run_dir} is not writable ({e.strerror}); "
                      "choose another --out") from None


def _groups_all_same(experiences) -> float:
    """Fraction of groups whose answers all got the same reward (no learning signal for GRPO)."""
    groups: dict[int, set] = {}
    for e in experiences:
        groups.setdefault(e.group_id, set()).add(e.reward)
    return sum(len(v) == 1 for v in groups.values()) / max(len(groups), 1)


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["round"] <= last_round]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, path)  # a kill during the rewrite leaves the old file whole
