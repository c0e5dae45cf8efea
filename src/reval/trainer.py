"""The Python API, in the shape TRL users know:

    from reval import ReValConfig, ReValTrainer

    def short(completions, **kwargs):
        return [1.0 if len(c) < 200 else 0.0 for c in completions]

    trainer = ReValTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=[short, "math_verify"],
                           train_dataset=dataset, args=ReValConfig(algo="reval", beta=0.02, output_dir="runs/a"))
    trainer.train()

A thin layer over `reval.train.train`, the loop the `reval train` command runs: the
trainer only turns its arguments into a `TrainConfig`, problems and reward functions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from reval.config import TrainConfig, close_names

# TRL GRPOConfig names -> ours, so a TRL config's keywords carry over
TRL_NAMES = {
    "learning_rate": "optim.lr",
    "num_generations": "rollout.samples_per_prompt",
    "max_completion_length": "rollout.max_new_tokens",
    "num_iterations": "buffer.updates_per_round",
    "output_dir": "out",
    "max_grad_norm": "optim.max_grad_norm",
    "weight_decay": "optim.weight_decay",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "reward_weights": "task.reward_weights",
}


class ReValConfig(TrainConfig):
    """`TrainConfig` built from keywords: a dotted name ("loss.beta"), a field's own name when
    only one section has it ("beta", "lr", "samples_per_prompt"), section and field joined by
    "_" ("eval_every", "rollout_prompts_per_round"), or a TRL `GRPOConfig` name
    ("learning_rate", "num_generations", "output_dir", ...). `reval train --help` lists them all."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        for key, value in kwargs.items():
            _set(self, config_key(key), value)


def config_key(key: str) -> str:
    """The dotted field name a `ReValConfig` keyword refers to; ValueError naming the nearest
    known names otherwise."""
    names = _names()
    found = names.get(key, [])
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"ReValConfig: {key!r} is ambiguous; write one of {', '.join(found)}")
    near: dict[str, str] = {}  # the nearest spelling of each field
    for name in close_names(key, list(names)):
        near.setdefault(names[name][0], name if name == names[name][0] else f"{name} ({names[name][0]})")
    hint = f" (did you mean {' or '.join(near.values())}?)" if near else ""
    raise ValueError(f"ReValConfig: unknown setting {key!r}{hint}; see `reval train --help` for the names "
                     "(dotted like loss.beta, a field's own name like beta, or section_field like eval_every)")


def _names() -> dict[str, list[str]]:
    """Every keyword `ReValConfig` accepts -> the dotted field(s) it may mean: top-level fields,
    dotted names, own names, section_field names and TRL's names."""
    cfg, names = TrainConfig(), {}
    for f in dataclasses.fields(cfg):
        names.setdefault(f.name, []).append(f.name)
        section = getattr(cfg, f.name)
        for leaf in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
            dotted = f"{f.name}.{leaf.name}"
            for name in (dotted, leaf.name, f"{f.name}_{leaf.name}"):
                names.setdefault(name, []).append(dotted)
    for trl, ours in TRL_NAMES.items():
        names[trl] = [ours]
    return names


def _set(cfg: TrainConfig, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part, None)
        if target is None or not dataclasses.is_dataclass(target):
            raise ValueError(f"ReValConfig: unknown setting {dotted!r}")
    if name not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"ReValConfig: unknown setting {dotted!r}")
    if name == "out" and value is not None:
        value = Path(value)
    elif isinstance(value, list):
        value = tuple(value)
    setattr(target, name, value)


class ReValTrainer:
    """Train a model with ReVal (or `args.algo`: TBRM, GRPO) on a dataset with reward functions,
    or with an offline algorithm (mle, iq, dualqdm: prompt / response rows; dpo, qadapter: prompt /
    chosen / rejected rows, no reward functions) on demonstrations or preference pairs.

    - `model`: a directory or hub id, or a `PreTrainedModel` (with its tokenizer as
      `processing_class`; both are saved to `<output_dir>/start-model` so the run can resume).
      None: the shipped warm start of the embedded task.
    - `reward_funcs`: callables with TRL's signature, `f(completions, **columns) -> list[float |
      None]`, or names (`reval.rewards.REWARDS`, "module:function", "file.py:function"). Every
      column of the dataset reaches them as a keyword argument (`answer` is the final answer
      the preset extracts; the rest as they are in the rows).
    - `train_dataset` / `eval_dataset`: a `datasets.Dataset`, a list of dicts, or a path or hub
      id (read with `args.task.preset` and its field names). None: the embedded task.
    """

    def __init__(self, model=None, reward_funcs=None, train_dataset=None, eval_dataset=None,
                 args: TrainConfig | None = None, processing_class=None):
        self.args = args if args is not None else ReValConfig()
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else \
            [reward_funcs] if reward_funcs is not None else None
        if self.reward_funcs is not None:
            from reval.rewards import resolve_rewards, reward_name

            self.reward_funcs = resolve_rewards(self.reward_funcs)  # unknown names fail here, at once
            # recorded in config.json (and checked by validate: one weight per function); a
            # callable's "module:name" cannot be resumed from the command line without naming it
            self.args.task.rewards = tuple(reward_name(fn) for fn in self.reward_funcs)
        self._model = None
        if isinstance(model, (str, os.PathLike)):
            self.args.model.path = str(model)
        elif model is not None:
            if processing_class is None:
                raise ValueError("ReValTrainer: pass the model's tokenizer as processing_class= when model "
                                 "is a PreTrainedModel (or pass the model's directory instead)")
            from reval.qhead import is_qadapter

            if is_qadapter(model):
                raise ValueError("ReValTrainer: the model carries a Q-Adapter head; pass its base model (or the "
                                 "directory it was saved to, which load_model reads with the head)")
            self._model = (model, processing_class)
        self.train_problems = self._problems(train_dataset, "train")
        self.eval_problems = self._problems(eval_dataset, "test")
        if self.train_problems is not None and self.eval_problems is None:
            self.eval_problems = []  # no evaluation rather than the embedded task's
        self.args.validate()

    def _problems(self, dataset, split: str):
        if dataset is None:
            return None
        from reval.data import load_demonstrations, load_preferences, load_problems
        from reval.losses import ALGORITHMS

        task = self.args.task
        kind = ALGORITHMS[self.args.algo].data if self.args.algo in ALGORITHMS else "rollout"
        if kind != "rollout" and split != "train":  # evaluation rows: question / answer, the preset's names
            return load_problems(dataset, preset=task.preset, split=split)
        if split == "train" and kind == "demonstrations":  # prompt / response rows
            return load_demonstrations(dataset, prompt_field=task.question_field, response_field=task.answer_field)
        if split == "train" and kind == "preferences":  # prompt / chosen / rejected rows
            return load_preferences(dataset, prompt_field=task.question_field)
        return load_problems(dataset, preset=task.preset, question_field=task.question_field,
                             answer_field=task.answer_field, split=split)

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = False) -> dict:
        """Run the training in `args.out`, or continue it as TRL does: `resume_from_checkpoint=True`
        from the newest checkpoint, a path (`<output_dir>/checkpoints/round-000002`) from that one.
        Resuming from an earlier round sets the newer checkpoints aside as `superseded-round-*`
        and drops the metric lines after it, so that round's successors are trained once again
        rather than mixed in. Returns the final evaluation and counters."""
        from reval.checkpoint import RunExistsError, latest_checkpoint
        from reval.train import train

        resume = resume_from_checkpoint or False
        occupied = RunExistsError(
            f"output_dir {self.args.run_dir} already holds a run; continue it with "
            "trainer.train(resume_from_checkpoint=True), or give ReValConfig(output_dir=...) a new directory")
        if not resume and latest_checkpoint(self.args.run_dir):  # before start-model/ is overwritten below
            raise occupied
        if self._model is not None:
            start = self.args.run_dir / "start-model"
            fresh = not resume or not (start / "config.json").exists()
            if fresh and int(os.environ.get("RANK", "0")) == 0:  # other ranks load it after a barrier
                model, tokenizer = self._model
                model.save_pretrained(start)  # a fresh run replaces what an earlier attempt left
                tokenizer.save_pretrained(start)
            self.args.model.path = str(start)
        try:
            return train(self.args, resume=resume, problems=self.train_problems,
                         eval_problems=self.eval_problems, reward_funcs=self.reward_funcs)
        except RunExistsError:  # said in the terms of this API rather than the command line's
            raise occupied from None
