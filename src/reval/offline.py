"""Demonstrations and preference pairs as trajectories: the round of the offline algorithms.

The RL algorithms fill a round by sampling answers (`reval.rollout`); the imitation
(`mle`, `iq`) and preference (`dpo`, `qadapter`) algorithms fill it from data instead, and
everything after (the `Batch`, the loss registry, the updates, the reference, evaluation,
metrics, checkpoints and resume) is the same loop. A round draws `rollout.prompts_per_round`
examples and turns each into `Experience` records, which `collate` packs as usual:

- a demonstration (prompt, response) is one trajectory with reward 1;
- a preference pair (prompt, chosen, rejected) is two trajectories of the same group:
  the chosen answer (reward 1) directly followed by the rejected one (reward 0), so rows
  (2i, 2i + 1) of a batch are pair i (`collate` keeps rows of one prompt in order);
- for `dualqdm`, a demonstration (reward 1) and the G answers the policy sampled to its
  prompt (reward 0, never scored: the reward marks who wrote the answer) form one group,
  whose mean reward is therefore 1 / (1 + G) (`with_samples`).

Prompts are formatted exactly as rollout prompts are (template, chat template), and every
response ends with the tokenizer's EOS token, the action that ends an answer.
"""

from __future__ import annotations

import dataclasses
import random

from reval.data import Demonstration, PreferencePair
from reval.model import format_prompt
from reval.rollout import Experience

# rows of a batch per example of each kind of data
ROWS_PER_EXAMPLE = {"rollout": 1, "demonstrations": 1, "preferences": 2}


def load_examples(cfg, kind: str, problems=None) -> list:
    """The training examples of an offline algorithm: `Demonstration`s or `PreferencePair`s.

    From `task.data`, or for demonstrations without data the embedded task's training
    problems (each round then writes a fresh worked solution with the task's habitual
    mistakes, as `reval pretrain` does). `problems` (the Python API) replaces both; question/answer
    rows (`reval.data.Problem`) are refused there: they hold no response to learn from.
    """
    if problems is not None:  # the Python API: records, or the embedded task's problems
        want = PreferencePair if kind == "preferences" else Demonstration
        for p in problems:  # e.g. question/answer rows (`reval.data.Problem`): no response to learn from
            if not isinstance(p, want):
                raise ValueError(
                    f"--algo {cfg.algo} learns from {kind}, got {type(p).__name__} {p!r:.80}: pass "
                    f"reval.data.{want.__name__} records (reval.data.load_{kind} reads a file or dataset)")
        return list(problems)
    if cfg.task.data is not None:
        from reval.data import load_demonstrations, load_preferences

        if kind == "demonstrations":
            return load_demonstrations(cfg.task.data, prompt_field=cfg.task.question_field,
                                       response_field=cfg.task.answer_field)
        return load_preferences(cfg.task.data, prompt_field=cfg.task.question_field)
    if kind == "preferences":
        raise ValueError(f"--algo {cfg.algo} learns from preference pairs: pass --task.data FILE, a JSONL "
                         "(or Parquet / CSV / dataset) with prompt, chosen and rejected fields")
    from reval.tasks import TASKS

    return TASKS[cfg.task.name].split("train", cfg.task.num_train, seed=cfg.seed, digits=cfg.task.digits)


def to_experiences(examples: list, tokenizer, *, template: str, chat: bool, eos_id: int, version: int,
                   round: int, first_group_id: int, first_uid: int, task=None,
                   rng: random.Random | None = None) -> list[Experience]:
    """The trajectories of `examples` (pairs: chosen, then rejected, in one group).

    An embedded-task `Problem` (a `question` without a response) becomes a demonstration of
    `task.warmstart_solution(problem, rng)`.
    """
    out: list[Experience] = []
    for i, ex in enumerate(examples):
        if isinstance(ex, PreferencePair):
            prompt, answers = ex.prompt, [(ex.chosen, 1.0), (ex.rejected, 0.0)]
        elif isinstance(ex, Demonstration):
            prompt, answers = ex.prompt, [(ex.response, 1.0)]
        else:
            prompt, answers = ex.question, [(task.warmstart_solution(ex, rng), 1.0)]
        prompt_ids = tuple(tokenizer(format_prompt(tokenizer, prompt, template, chat),
                                     add_special_tokens=False)["input_ids"])
        for text, reward in answers:
            response_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not response_ids or response_ids[-1] != eos_id:  # an answer ends with one EOS (TRL: the same)
                response_ids += (eos_id,)
            out.append(Experience(prompt_ids, response_ids, reward, group_id=first_group_id + i,
                                  group_mean=sum(r for _, r in answers) / len(answers), group_std=0.0,
                                  version=version, round=round, truncated=False, uid=first_uid + len(out)))
    return out


def with_samples(demonstrations: list[Experience], samples, G: int, *, version: int,
                 first_uid: int) -> list[Experience]:
    """Demonstration i's group extended by the policy's answers G*i .. G*i + G - 1 to its prompt
    (reward 0; the group's mean reward, 1 / (1 + G), on every row). Sample j gets uid first_uid + j."""
    mean = 1.0 / (1 + G)
    out: list[Experience] = []
    for i, demo in enumerate(demonstrations):
        out.append(dataclasses.replace(demo, group_mean=mean))
        for j in range(G * i, G * (i + 1)):
            out.append(Experience(tuple(samples.prompt_ids[j]), tuple(samples.response_ids[j]), 0.0,
                                  group_id=demo.group_id, group_mean=mean, group_std=0.0, version=version,
                                  round=demo.round, truncated=samples.truncated[j], uid=first_uid + j))
    return out


def too_long(examples: list, tokenizer, *, template: str, chat: bool, context: int) -> tuple[int, int] | None:
    """(index, tokens) of the first example whose prompt plus longest answer (+ EOS) does not fit
    in `context` positions, else None. Embedded-task problems are not checked (they fit)."""
    for i, ex in enumerate(examples):
        if isinstance(ex, PreferencePair):
            prompt, answers = ex.prompt, (ex.chosen, ex.rejected)
        elif isinstance(ex, Demonstration):
            prompt, answers = ex.prompt, (ex.response,)
        else:
            return None
        n = len(tokenizer(format_prompt(tokenizer, prompt, template, chat), add_special_tokens=False)["input_ids"])
        n += max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
        if n > context:
            return i, n
    return None
