"""The learner: K optimizer updates per round on the fresh answers and the replay buffer, the
reference cache, the reference reset, and the undo of a step that went non-finite.

`update` is one optimizer step on one batch; `Learner.learn` is steps 4-6 of a round (store,
update K times, reset the reference). It knows nothing of how the answers were sampled: a
`Rollout` from the actor (`reval.loop.actor`) is all it takes.
"""

from __future__ import annotations

import math
import random

import torch

from reval.buffer import Batch, ReplayBuffer, collate
from reval.checkpoint import latest_checkpoint
from reval.config import TrainConfig
from reval.distributed import all_ranks_true, micro_batch_sync, to_local
from reval.logprobs import sequence_logprobs
from reval.loop.actor import corrects_sampler
from reval.losses import ALGORITHMS
from reval.losses.reval import ROW_RESIDUAL
from reval.offline import ROWS_PER_EXAMPLE
from reval.reference import RefCache, Reference


def update(policy, reference, optimizer, batch: Batch, cfg: TrainConfig,
           old_logp: list[torch.Tensor] | None = None, accelerator=None,
           ref_cache: RefCache | None = None, ref_version: int = 0,
           sampler_logp: list[torch.Tensor] | None = None) -> dict:
    """One optimizer step on `batch`, accumulated over micro-batches.

    `policy` is a `LogProbModule` (possibly wrapped by DDP / FSDP / DeepSpeed), `reference`
    a `Reference` (or None), `old_logp` GRPO's pi_old per micro-batch (`old_logprobs`),
    `sampler_logp` the sampler's log-probs per micro-batch when it is not the policy.
    Each micro-batch loss is normalised by the whole batch's trajectory (or token) count,
    so the summed gradient equals the full-batch gradient whatever the micro-batch size.
    Reference log-probs come from `ref_cache` when every row of a micro-batch is cached at
    `ref_version`, else from a reference pass that runs before the policy's forward, so
    the two graphs are never alive at once. Returns metrics, with `perf/skipped` = 1 if the
    step was skipped because the loss or gradient was not finite, or undone because it made
    a weight non-finite (on any rank; the weights and optimizer state are restored). For the
    residual losses it also holds `rows/abs_residual`, the (B,) abs(delta) of each trajectory
    (a tensor, not a metric: the learner pops it for prioritised replay).
    """
    algo = ALGORITHMS[cfg.algo]
    device = accelerator.device if accelerator is not None else batch.response_ids.device
    rows = ROWS_PER_EXAMPLE[algo.data]  # 2: a preference pair's two answers are adjacent rows
    tokens = int(batch.response_mask.sum())
    denom = algo.denominator(batch) if algo.denominator else tokens if algo.per_token else len(batch) // rows
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"perf/ref_cache_hits": 0.0} if algo.needs_reference else {}
    total_loss = 0.0
    rows_residual: list[torch.Tensor] = []  # |delta| per trajectory, in batch order (prioritised replay)
    micros = micro_batches(batch, max(cfg.optim.micro_batch_size // rows, 1) * rows)  # whole pairs
    for i, micro in enumerate(micros):
        micro = micro.to(device)
        t = {"mask": micro.response_mask, "reward": micro.reward, "truncated": micro.truncated,
             "group_mean": micro.group_mean, "group_std": micro.group_std, "batch_tokens": tokens,
             "weight": micro.weight}
        if algo.needs_reference:
            hit = ref_cache.get(micro.uid, ref_version, micro.response_ids.shape[1]) if ref_cache is not None \
                else None
            if accelerator is not None and not all_ranks_true(accelerator, hit is not None):
                hit = None  # every rank runs the reference pass, or none does (its collectives must match)
            if hit is None:
                hit = reference.logprobs(micro, cfg.model.logprob_chunk, cfg.shared_prefix)
                if ref_cache is not None:
                    ref_cache.put(micro.uid, *hit, micro.response_mask, ref_version)
            else:
                sums["perf/ref_cache_hits"] += len(micro) / len(batch)
            t["ref_logp"], t["ref_v"] = (x.to(device) for x in hit)
        # gradients all-reduced (DDP) or the step taken (DeepSpeed) after the last micro-batch only
        with micro_batch_sync(accelerator, policy, last=i == len(micros) - 1):
            t["logp"], t["v"] = policy(micro, True) if algo.all_values else policy(micro)
            if algo.needs_old_logp:  # pi_old: the sampling policy (no grad); equals pi_theta on the 1st update
                t["old_logp"] = old_logp[i].to(device) if old_logp is not None else t["logp"].detach()
                if sampler_logp is not None:
                    t["sampler_logp"] = sampler_logp[i].to(device)
            loss, metrics = algo.compute(t, cfg.loss, denom)
            accelerator.backward(loss) if accelerator is not None else loss.backward()
        if ROW_RESIDUAL in metrics:
            rows_residual.append(metrics.pop(ROW_RESIDUAL).detach().float().cpu())
        total_loss += loss.item()
        for k, v in metrics.items():  # max over micro-batches, else a size-weighted mean
            if k.endswith("_max_abs"):
                sums[k] = max(sums.get(k, 0.0), v)
            else:
                sums[k] = sums.get(k, 0.0) + v * len(micro) / len(batch)
    grad_norm, finite = _clip_and_step(policy, optimizer, cfg, accelerator, total_loss)
    optimizer.zero_grad(set_to_none=True)
    out = {**sums, "loss/total": total_loss, "loss/grad_norm": grad_norm.item(),
           "perf/skipped": 0.0 if finite else 1.0}
    if rows_residual:
        out[ROW_RESIDUAL] = torch.cat(rows_residual)  # not a metric: the learner pops it
    return out


def _clip_and_step(policy, optimizer, cfg: TrainConfig, accelerator, total_loss: float) -> tuple[torch.Tensor, bool]:
    """Clip the accumulated gradient and step, unless the loss or gradient is not finite on
    some rank; undo a step that made a weight non-finite. (gradient norm, whether it stepped)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32)
    finite = math.isfinite(total_loss) and torch.isfinite(grad_norm).item()
    if accelerator is not None:
        finite = all_ranks_true(accelerator, finite)  # every rank steps, or none does
    if finite:
        # A finite gradient can still give non-finite weights (a huge step, a custom
        # optimizer): keep a CPU copy to undo such a step, as if it had been skipped.
        # (DeepSpeed steps inside backward and partitions the weights: not checked there.)
        # The copy costs 3x the trainable weights in host memory (weights + AdamW moments), so
        # past UNDO_MAX_PARAMS a bad step stops the run instead (resume from a checkpoint).
        check = accelerator is None or accelerator.distributed_type != "DEEPSPEED"
        undo = check and sum(p.numel() for p in params) <= UNDO_MAX_PARAMS
        if check and accelerator is not None:
            undo = all_ranks_true(accelerator, undo)  # shards differ in size: every rank decides alike
        saved = _snapshot(params, optimizer) if undo else None
        optimizer.step()
        if check:
            finite = _all_finite(params)
            if accelerator is not None:
                finite = all_ranks_true(accelerator, finite)  # every rank undoes it, or none does
            if not finite and saved is None:
                raise FloatingPointError(
                    "an optimizer step made the weights non-finite (the loss and gradient were finite); "
                    f"with more than {UNDO_MAX_PARAMS:.0e} trainable weights the step is not undone, so the "
                    "run stops before anything is saved. Resume from the last checkpoint "
                    "(reval train --resume DIR) with a lower optim.lr")
            if not finite:
                _restore(params, optimizer, saved)
    return grad_norm, finite


UNDO_MAX_PARAMS = 200_000_000  # trainable weights up to which a non-finite step is undone (2.4 GB copy)


def _snapshot(params: list[torch.Tensor], optimizer) -> tuple[list[torch.Tensor], list[dict]]:
    """CPU copies of the trainable weights and of their optimizer state (empty before the first step);
    under FSDP2 of this rank's shards (each rank undoes its own part of the step)."""
    states = [dict(optimizer.state[p]) if p in optimizer.state else {} for p in params]
    tensors = [to_local(p.detach()) for p in params] + [to_local(v) for st in states for v in st.values()
                                                         if torch.is_tensor(v)]
    copies = [torch.empty_like(t, device="cpu") for t in tensors]
    torch._foreach_copy_(copies, tensors)  # one batched copy: half the time of a copy per tensor
    it = iter(copies[len(params):])
    return copies[:len(params)], [{k: next(it) if torch.is_tensor(v) else v for k, v in st.items()} for st in states]


def _all_finite(params: list[torch.Tensor]) -> bool:
    """No NaN or inf in any weight: a sum per tensor is non-finite if an element is (and is
    only otherwise past 3e38 in total); 6x cheaper than `isfinite` per element."""
    return not params or bool(torch.stack([to_local(p.detach()).sum(dtype=torch.float32)
                                           for p in params]).isfinite().all())  # FSDP2: this rank's shards


@torch.no_grad()
def _restore(params: list[torch.Tensor], optimizer, saved: tuple[list[torch.Tensor], list[dict]]) -> None:
    """Put back the weights and optimizer state of `_snapshot`: the step never happened."""
    for p, weight, state in zip(params, *saved):
        to_local(p).copy_(weight)  # FSDP2: the shard, in place
        if not state:
            optimizer.state.pop(p, None)
        for k, v in state.items():
            if torch.is_tensor(v):
                to_local(optimizer.state[p][k]).copy_(v)
            else:
                optimizer.state[p][k] = v


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """The micro-batches of `batch` (rows in order), each trimmed to its own prompts and lengths."""
    return [batch.slice(start, start + size) for start in range(0, len(batch), size)]


@torch.no_grad()
def sampler_logprobs(generator, samples, batch: Batch, cfg: TrainConfig, first_uid: int,
                     accelerator) -> list[torch.Tensor]:
    """log pi_sampler of each answer token, per micro-batch: what the sampler returned (vLLM),
    or a teacher-forced pass of the HF sampler's own (stale) copy of the weights, which takes
    the policy's numerical path, so a freshly synced sampler gives weights of exactly 1."""
    micros = micro_batches(batch, cfg.optim.micro_batch_size)
    if samples.logprobs is None:
        with accelerator.autocast():
            return [sequence_logprobs(generator.model, m.to(accelerator.device), cfg.model.logprob_chunk,
                                      cfg.shared_prefix)[0].float() for m in micros]
    out = []
    for m in micros:  # answer i of the round has uid first_uid + i
        logp = torch.zeros(m.response_ids.shape)
        for row, uid in enumerate(m.uid.tolist()):
            values = samples.logprobs[uid - first_uid]
            logp[row, : len(values)] = torch.tensor(values)
        out.append(logp)
    return out


@torch.no_grad()
def old_logprobs(policy, batch: Batch, cfg: TrainConfig, device) -> list[torch.Tensor]:
    """GRPO's pi_old for PPO-style reuse: the policy's log-probs per micro-batch, before any update
    of the round (the same micro-batches as the updates, so the first ratio is exactly 1)."""
    return [policy(micro.to(device))[0] for micro in micro_batches(batch, cfg.optim.micro_batch_size)]


class Learner:
    """Steps 4-6 of a round for one rank: add the round's answers to the buffer, take K
    updates (the first on the fresh batch, the others on buffer samples; on-policy methods
    reuse the fresh batch), reset the reference on schedule, and drop evicted answers from
    the reference cache. `counters` (updates, ref_version, sampler_version) and `streaks`
    (bad_updates) are the run's, shared, so a checkpoint sees what the learner did."""

    def __init__(self, cfg: TrainConfig, accelerator, policy, reference: Reference | None, optimizer,
                 buffer: ReplayBuffer, ref_cache: RefCache | None, rng: random.Random, counters: dict,
                 streaks: dict, batch_rows: int, pad_id: int, run_dir, sampler=None):
        self.cfg, self.accelerator, self.policy, self.reference = cfg, accelerator, policy, reference
        self.optimizer, self.buffer, self.ref_cache, self.rng = optimizer, buffer, ref_cache, rng
        self.counters, self.streaks, self.batch_rows, self.pad_id = counters, streaks, batch_rows, pad_id
        self.run_dir, self.sampler = run_dir, sampler  # sampler: its stale weights give pi_sampler (HF)
        self.algo = ALGORITHMS[cfg.algo]
        # GRPO's pi_old must be corrected towards the sampler when the sampler is not the policy
        self.correct_sampler = corrects_sampler(cfg)
        self.lag_quantiles = cfg.schedule.mode == "async"
        self.on_update = None  # called after every update that changed the weights (asynchronous: the push)
        # the HF sampler samples from the policy itself at sync_every 1: no lag after an update
        self.follows_policy = cfg.rollout.sync_every == 1 and cfg.rollout.lag == 0 and cfg.rollout.backend == "hf"

    def learn(self, rollout) -> list[dict]:
        """Store the rollout's answers, take the round's K updates; their metrics, one per update."""
        cfg = self.cfg
        offline_data = rollout.samples is None
        if not offline_data and self.algo.replay:
            self.buffer.add(rollout.fresh)
        upd_metrics: list[dict] = []
        fresh_batch = collate(rollout.fresh, self.pad_id) if rollout.fresh else None
        old_logp = sampler_logp = None
        if self.algo.needs_old_logp and cfg.updates_per_round > 1 and fresh_batch is not None:
            old_logp = old_logprobs(self.policy, fresh_batch, cfg, self.accelerator.device)
        if self.correct_sampler and fresh_batch is not None:
            sampler_logp = sampler_logprobs(self.sampler, rollout.samples, fresh_batch, cfg, rollout.first_uid,
                                            self.accelerator)
        for k in range(cfg.updates_per_round):
            if not self.algo.replay or (k == 0 and cfg.buffer.first_update_fresh):
                batch = fresh_batch
            elif len(self.buffer):
                items, weights = self.buffer.draw(self.batch_rows, self.rng)
                batch = collate(items, self.pad_id, weights)
            else:
                batch = None
            m = self.step(batch, old_logp, sampler_logp, rollout.round, track_staleness=not offline_data)
            if m is not None and batch is not fresh_batch and self.buffer.sampling != "uniform":
                m["buffer/is_weight_min"] = batch.weight.min().item()  # the weights average 1 in expectation
                m["buffer/distinct_frac"] = len(set(batch.uid.tolist())) / len(batch)  # drawn with replacement
            if m is not None:
                upd_metrics.append(m)
        # the reference reset, per round (the paper's unit; per update: in `step`)
        if cfg.loss.ref_reset_unit == "rounds":
            self.maybe_reset(rollout.round + 1)
        if self.ref_cache is not None:
            self.ref_cache.keep(self.buffer.uids())  # evicted (or, on-policy, used up) answers leave the cache
        return upd_metrics

    def step(self, batch: Batch | None, old_logp=None, sampler_logp=None, rnd: int = 0,
             track_staleness: bool = True) -> dict | None:
        """One update on `batch` (None on every rank: skipped, returns None), with the
        bad-update stopping rule and the per-update reference reset."""
        cfg, counters = self.cfg, self.counters
        if not all_ranks_true(self.accelerator, batch is not None):
            return None  # every answer was dropped (e.g. all truncated): nothing to learn
        m = update(self.policy, self.reference, self.optimizer, batch, cfg, old_logp, self.accelerator,
                   self.ref_cache, counters["ref_version"], sampler_logp)
        residual = m.pop(ROW_RESIDUAL, None)
        if residual is not None:
            self.buffer.update_priorities(batch.uid, residual)
        self.streaks["bad_updates"] = bad = self.streaks["bad_updates"] + 1 if m["perf/skipped"] else 0
        if bad >= cfg.optim.max_bad_updates:
            last = latest_checkpoint(self.run_dir)
            raise FloatingPointError(
                f"{bad} updates in a row had a non-finite loss, gradient or weights "
                f"(round {rnd + 1}); stopping. Last good checkpoint: {last or 'none'}. "
                "Lower optim.lr or raise loss.beta, then resume or restart.")
        if track_staleness:  # the data of an offline run has no policy version
            lag = (counters["updates"] - batch.version).float()
            m["buffer/staleness_mean"], m["buffer/staleness_max"] = lag.mean().item(), lag.max().item()
            if self.lag_quantiles:  # the lag of the batch as a distribution (asynchronous runs)
                for q, v in zip((10, 50, 90), torch.quantile(lag, torch.tensor([0.1, 0.5, 0.9])).tolist()):
                    m[f"buffer/staleness_p{q}"] = v
        if m["perf/skipped"]:
            return m  # the weights did not change: same policy version, no reset
        counters["updates"] += 1
        if self.follows_policy:
            counters["sampler_version"] = counters["updates"]  # samples from the policy itself
        if cfg.loss.ref_reset_unit == "updates":
            self.maybe_reset(counters["updates"])
        if self.on_update is not None:
            self.on_update()
        return m

    def maybe_reset(self, count: int) -> None:
        """Copy the policy into the reference when `count` (rounds or updates) is a multiple of
        `loss.ref_reset_every`. Replayed trajectories' reference log-probs are recomputed with
        the new reference at their next use."""
        every = self.cfg.loss.ref_reset_every
        if self.reference is not None and every and count % every == 0:
            self.reference.reset(self.optimizer)
            self.counters["ref_version"] += 1
