"""Schedules: when the actor acts and the learner learns. The run (`reval.loop.run.Run`)
does the rest: metrics, evaluation, checkpoints and the stopping rules, at the end of every
round.

`synchronous`, the default: one round is act (sample P x G answers, score them) then learn
(K updates), in turn, on every rank.

`asynchronous`: the actor runs in a process of its own (`reval.loop.actor_process`) and
samples round after round, up to `schedule.queue_size` rounds ahead, with the newest weights
the learner pushed (every `schedule.push_every` updates). The learner takes each round as it
arrives, adds it to the buffer and takes its K updates: the same replay ratio as the
synchronous loop (K updates per P x G fresh answers), with the answers up to a few policy
versions stale. ReVal's and TBRM's losses hold for answers from any sampler, so they take
them as they come; GRPO corrects towards the sampler's log-probs and drops answers older
than `max_staleness` versions, as every asynchronous GRPO does.
"""

from __future__ import annotations

import time

from reval.loop.run import Run


def synchronous(run: Run) -> dict:
    """Rounds of act -> learn -> log / evaluate / checkpoint, until `cfg.rounds` or `should_stop`."""
    with run.running():
        if run.cfg.rollout.lag:  # a staleness study: the actor keeps the versions it will sample with
            run.learner.on_update = run.actor.remember
        while run.counters["round"] < run.cfg.rounds:
            t_round = time.time()
            rollout = run.actor.act(run.counters["round"], run.rows_per_rank)
            run.check_scored(rollout)
            t_upd = time.time()
            upd_metrics = run.learner.learn(rollout)
            t_upd = time.time() - t_upd
            if run.end_round(rollout, upd_metrics, time.time() - t_round, t_upd):
                break
            run.stop_if_interrupted()
    return run.result()


def asynchronous(run: Run) -> dict:
    """Rounds arrive from the actor process while the learner updates; logged, evaluated and
    checkpointed as in the synchronous loop. A resume restarts the actor at the next round
    the learner has not used, with the checkpoint's weights and prompt stream."""
    from reval.loop.actor_process import ActorProcess

    cfg, counters, learner = run.cfg, run.counters, run.learner
    with run.running(), ActorProcess(run.actor_spec(), cfg, run.model) as actor:
        def push_on_schedule() -> None:
            if counters["updates"] % cfg.schedule.push_every == 0:
                actor.push(counters["updates"], counters["ref_version"])

        learner.on_update = push_on_schedule
        actor.push(counters["updates"], counters["ref_version"])  # the weights it starts from
        while counters["round"] < cfg.rounds:
            t_round, waited = time.time(), actor.waited
            rollout = actor.next_rollout()
            extra = _arrive(run, rollout)
            extra["perf/learner_wait_seconds"] = actor.waited - waited
            run.check_scored(rollout)
            t_upd = time.time()
            upd_metrics = learner.learn(rollout)
            t_upd = time.time() - t_upd
            if run.end_round(rollout, upd_metrics, time.time() - t_round, t_upd, extra):
                break
            run.stop_if_interrupted()
    learner.on_update = None
    return run.result()


def _arrive(run: Run, rollout) -> dict:
    """Take in a round from the actor process: count its answers, keep its prompt stream's
    state (checkpointed: a resume draws the next round's prompts), measure how stale it is,
    and drop it past the staleness cap. Returns the round's asynchronous metrics."""
    counters, cap = run.counters, run.cfg.max_staleness
    counters["samples"] += len(rollout.samples.response_ids)
    run.rngs["prompts"].setstate(rollout.rng_state)
    rollout.sampler_lag = counters["updates"] - rollout.policy_version  # versions behind at first use
    dropped = 0
    if cap is not None and rollout.sampler_lag > cap:
        dropped, rollout.fresh = len(rollout.fresh), []
    return {"rollout/dropped_stale": dropped, "perf/actor_wait_seconds": rollout.actor_wait_seconds}


SCHEDULES = {"sync": synchronous, "async": asynchronous}
