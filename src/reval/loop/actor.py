"""The actor: steps 1-3 of a round. Draw the round's prompts, sample G answers to each with
the sampler (HF `generate` or vLLM), score them, and hand them on as a `Rollout` of frozen
`Experience` records; for the offline algorithms, draw the round's demonstrations or pairs.

The actor owns the sampler and the prompt stream, nothing else: it never touches the
optimizer, the buffer or the reference (`reval.loop.learner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time

import torch

from reval import offline
from reval.config import TrainConfig
from reval.data import Demonstration, extra_columns
from reval.distributed import full_params
from reval.loop.messages import say
from reval.losses import ALGORITHMS
from reval.model import format_prompt
from reval.rewards import score
from reval.rollout import Samples, to_experiences


@dataclasses.dataclass
class Rollout:
    """One round's data, as the actor hands it to the learner. `samples` is None for an
    offline algorithm's examples. `sampler_lag`: how many updates the sampler's weights were
    behind the policy's when it sampled (asynchronous: at its first use); `unscored`: no answer got a reward (before truncated
    answers are zeroed or dropped)."""
    round: int
    fresh: list
    generate_seconds: float = 0.0
    samples: Samples | None = None
    rewards: list | None = None
    reward_failures: int = 0
    columns: dict | None = None
    first_uid: int = 0
    sampler_lag: int = 0
    unscored: bool = False
    policy_version: int = 0  # the policy version (updates) of the weights that sampled it
    rng_state: tuple | None = None  # asynchronous actor: its prompt stream's state after this round
    actor_wait_seconds: float = 0.0  # asynchronous actor: time it waited on a full queue before this round
    truncated_frac: float | None = None  # dualqdm: share of its sampled answers cut at max_new_tokens


def corrects_sampler(cfg: TrainConfig) -> bool:
    """Whether GRPO's pi_old is corrected towards the sampler: when the sampler is not the policy."""
    from reval.losses import ALGORITHMS

    return ALGORITHMS[cfg.algo].needs_old_logp and cfg.loss.sampler_weight_cap > 0 and (
        cfg.rollout.sync_every > 1 or cfg.rollout.lag > 0 or cfg.rollout.backend != "hf"
        or cfg.schedule.mode == "async")


class Actor:
    """Samples and scores one rank's share of each round (P / N prompts x G answers).
    `counters` are the run's: the actor reads the policy version (`updates`) and keeps
    `sampler_version` (the version its weights are) and `samples`."""

    def __init__(self, cfg: TrainConfig, accelerator, generator, tokenizer, train_set: list, rng: random.Random,
                 counters: dict, *, policy, model, template: str, chat: bool, reward_fns: list,
                 reward_errors: dict, offline_data: bool = False, embedded_task=None):
        self.cfg, self.accelerator, self.generator, self.tokenizer = cfg, accelerator, generator, tokenizer
        self.train_set, self.rng, self.counters = train_set, rng, counters
        self.policy, self.model, self.template, self.chat = policy, model, template, chat
        self.reward_fns, self.reward_errors = reward_fns, reward_errors
        self.offline_data, self.embedded_task = offline_data, embedded_task  # the task builds flawed demonstrations
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.prompts_per_rank = cfg.rollout.prompts_per_round // self.world
        # GRPO's correction needs the sampler's log-probs: vLLM returns them, and so does the
        # asynchronous actor's HF sampler (its weights are not the learner's)
        self.return_logprobs = corrects_sampler(cfg) and (cfg.rollout.backend != "hf"
                                                          or cfg.schedule.mode == "async")
        self.versions: dict[int, list[torch.Tensor]] = {}  # rollout.lag: the policy's recent weights

    def remember(self) -> None:
        """Keep the policy's weights at this version (`rollout.lag`: a later round samples with them)."""
        with torch.no_grad():
            self.versions[self.counters["updates"]] = [t.detach().clone() for t in self.model.state_dict().values()]

    def _lagged_sync(self) -> None:
        """Load the sampler with the newest kept weights at least `rollout.lag` updates old."""
        want = self.counters["updates"] - self.cfg.rollout.lag
        if not self.versions:
            self.remember()
        version = max([v for v in self.versions if v <= want] or [min(self.versions)])
        self.versions = {v: w for v, w in self.versions.items() if v >= version}
        with torch.no_grad():
            for dst, src in zip(self.generator.model.state_dict().values(), self.versions[version]):
                dst.copy_(src)
        self.counters["sampler_version"] = version

    def sync(self) -> None:
        """Push the policy's weights to the sampler (vLLM, or the HF sampler's own copy)."""
        with full_params(self.accelerator, self.policy):
            self.generator.sync_weights(self.model)
        self.counters["sampler_version"] = self.counters["updates"]

    def act(self, rnd: int, rows_per_rank: int) -> Rollout:
        """Round `rnd`'s data; answer i of this rank has uid (rnd * N + rank) * rows_per_rank + i."""
        first_uid = (rnd * self.world + self.rank) * rows_per_rank
        first_group = (rnd * self.world + self.rank) * self.prompts_per_rank
        if self.offline_data:
            return self._examples(rnd, first_uid, first_group)
        return self._sample(rnd, first_uid, first_group)

    def _examples(self, rnd: int, first_uid: int, first_group: int) -> Rollout:
        """An offline algorithm's round: demonstrations or preference pairs from the data (reval.offline);
        for dualqdm also G answers the policy samples to each demonstration's prompt."""
        examples = self.rng.sample(self.train_set, self.prompts_per_rank)
        fresh = offline.to_experiences(
            examples, self.tokenizer, template=self.template, chat=self.chat, eos_id=self.tokenizer.eos_token_id,
            version=self.counters["updates"], round=rnd, first_group_id=first_group, first_uid=first_uid,
            task=self.embedded_task, rng=self.rng)
        self.counters["samples"] += len(examples) * self.world
        if not ALGORITHMS[self.cfg.algo].samples_demonstrations:
            return Rollout(rnd, fresh, first_uid=first_uid)
        t0, G = time.time(), self.cfg.rollout.samples_per_prompt
        prompts = [format_prompt(self.tokenizer, ex.prompt if isinstance(ex, Demonstration) else ex.question,
                                 self.template, self.chat) for ex in examples]
        samples, _ = self._generate(prompts, rnd)
        fresh = offline.with_samples(fresh, samples, G, version=self.counters["sampler_version"],
                                     first_uid=first_uid + len(fresh))
        self.counters["samples"] += len(samples.response_ids) * self.world
        return Rollout(rnd, fresh, time.time() - t0, first_uid=first_uid, policy_version=self.counters["sampler_version"],
                       truncated_frac=sum(samples.truncated) / max(len(samples.truncated), 1))

    def _generate(self, prompts: list[str], rnd: int) -> tuple[Samples, int]:
        """G answers to each prompt from the sampler (synced or lagged as configured), and its lag in
        updates. The generation seed depends only on (seed, round, rank): reproducible on resume."""
        cfg, counters = self.cfg, self.counters
        seed = cfg.seed * 1_000_003 + rnd + 7919 * self.rank
        torch.manual_seed(seed)
        if cfg.rollout.lag:
            self._lagged_sync()
        elif rnd % cfg.rollout.sync_every == 0 and counters["sampler_version"] != counters["updates"]:
            self.sync()
        lag = counters["updates"] - counters["sampler_version"]  # updates the sampler is behind
        with full_params(self.accelerator, self.policy) if cfg.rollout.backend == "hf" else contextlib.nullcontext():
            samples = self.generator.generate(prompts, samples_per_prompt=cfg.rollout.samples_per_prompt,
                                              temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                              max_new_tokens=cfg.max_new_tokens, seed=seed,
                                              return_logprobs=self.return_logprobs)
        return samples, lag

    def _sample(self, rnd: int, first_uid: int, first_group: int) -> Rollout:
        cfg, counters, t0 = self.cfg, self.counters, time.time()
        # 1. task: this round's prompts (P / N on each of N ranks)
        problems = self.rng.sample(self.train_set, self.prompts_per_rank)
        prompts = [format_prompt(self.tokenizer, p.question, self.template, self.chat) for p in problems]
        # 2. rollout
        samples, lag = self._generate(prompts, rnd)
        G = cfg.rollout.samples_per_prompt
        t_gen = time.time() - t0
        # 3. rewards
        completions = self.tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
        columns = reward_columns(problems, G)
        seen = len(self.reward_errors)
        rewards, failures = score(self.reward_fns, completions, columns, weights=cfg.task.reward_weights or None,
                                  timeout=cfg.rollout.reward_timeout, errors=self.reward_errors)
        if self.accelerator.is_main_process:
            report_reward_errors(self.reward_errors, seen, f"round {rnd + 1}",
                                 "such answers are skipped and counted in rollout/reward_failures")
        unscored = all(r is None for r in rewards)
        for i, trunc in enumerate(samples.truncated):
            if trunc and rewards[i] is not None:
                rewards[i] = None if cfg.loss.drop_truncated else 0.0  # no EOS: reward 0
        fresh = to_experiences(samples, rewards, samples_per_prompt=G, version=counters["sampler_version"],
                               round=rnd, first_group_id=first_group, first_uid=first_uid,
                               std_ddof=1 if cfg.loss.grpo_std == "sample" else 0)
        counters["samples"] += len(completions) * self.world
        return Rollout(rnd, fresh, t_gen, samples, rewards, failures, columns, first_uid, lag, unscored,
                       policy_version=counters["sampler_version"])


def reward_columns(problems, G: int) -> dict[str, list]:
    """What reward functions get besides the completions: `answer`, `question` and every other
    column of the rows (None where a row lacks it), each repeated for the G answers."""
    columns = {"answer": [p.answer for p in problems for _ in range(G)],
               "question": [p.question for p in problems for _ in range(G)]}
    columns.update({k: [v for v in values for _ in range(G)] for k, values in extra_columns(problems).items()})
    return columns


def report_reward_errors(errors: dict[str, str], seen: int, where: str, outcome: str) -> None:
    """Print the reward failures recorded after the first `seen` (each function's first one, once)."""
    for name, error in list(errors.items())[seen:]:
        say(f"{where}: reward function {name} failed on an answer: {error}\n  (shown once; {outcome})")


