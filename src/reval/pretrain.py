"""Warm start: supervised training of a tiny model on sometimes-wrong solutions.

    reval pretrain --task add --out DIR     # the shipped reval/assets/warmstart (~16 min, 2 cores)
    reval pretrain --task mul --out DIR     # the shipped reval/assets/warmstart-mul

builds the character tokenizer and a randomly initialised Qwen2, then trains it on the
task's training problems with worked solutions that contain the task's systematic
mistakes (`reval.tasks`): dropped carries for `add` (each with probability 0.6), and
multiplication-fact slips plus dropped carries at many rates for `mul`. The model
learns habits, not noise: greedy decoding follows them, sampling sometimes does the
right thing, and RL has room to fix exactly that. Each shipped checkpoint is the output
of this command with the task's defaults (`RECIPES`); `pretrain.json` next to it records
the result, and for `mul` the rate of each kind of mistake.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from reval.evaluate import evaluate
from reval.model import PROMPT_TEMPLATE, build_char_tokenizer, build_tiny_model, num_params
from reval.tasks import TASKS

# Per task: the settings that rebuild its shipped warm start (fields left None below).
RECIPES: dict[str, dict] = {
    "add": {"steps": 1500, "hidden": 128, "layers": 4},
    "mul": {"steps": 1500, "hidden": 128, "layers": 4},
}


@dataclass
class PretrainConfig:
    task: Literal["add", "mul"] = "add"
    """Embedded task (`reval.tasks.TASKS`) whose flawed worked solutions are the training data."""
    out: Path | None = None
    """Directory to write the model and tokenizer to (HF format, safetensors);
    default runs/warmstart-<task>."""
    steps: int | None = None
    """Optimizer steps; None: the task's recipe."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (linear warm-up, cosine decay)."""
    digits: int = 3
    """`add` only: numbers have 2 to `digits` digits."""
    hidden: int | None = None
    """Model width; None: the task's recipe."""
    layers: int | None = None
    """Transformer layers; None: the task's recipe."""
    num_problems: int = 50_000
    """Distinct training problems (each epoch re-samples which mistakes are made)."""
    eval_problems: int = 500
    """Problems for the final report (greedy accuracy, mean@8, and for `mul` the mistakes made)."""
    eval_split: Literal["validation", "test"] = "validation"
    """Split of the final report (the shipped `add` warm start was reported on test)."""
    seed: int = 0
    """Seeds the model init, the data and the slips."""

    def resolved(self) -> "PretrainConfig":
        """A copy with the task's recipe filled in where a field is None."""
        recipe = RECIPES[self.task]
        return dataclasses.replace(
            self, out=self.out or Path(f"runs/warmstart-{self.task}"),
            **{k: recipe[k] if getattr(self, k) is None else getattr(self, k) for k in ("steps", "hidden", "layers")})


def _encode(tokenizer, question: str, target: str) -> tuple[list[int], int]:
    prompt = tokenizer(PROMPT_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, len(prompt)


def pretrain(cfg: PretrainConfig) -> dict:
    cfg = cfg.resolved()
    task = TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, seed=cfg.seed)
    problems = task.split("train", cfg.num_problems, seed=cfg.seed, digits=cfg.digits)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(cfg.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))))
    model.train()
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        seqs = [_encode(tokenizer, p.question, task.warmstart_solution(p, rng))
                for p in rng.sample(problems, cfg.batch_size)]
        T = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), T), -100)  # loss on the answer tokens only
        for i, (s, p) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p:len(s)] = torch.tensor(s[p:])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id),
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    report = task.split(cfg.eval_split, cfg.eval_problems, seed=0, digits=cfg.digits)
    if cfg.task == "mul":  # which mistakes it makes, greedy and sampled, and how often (None: correct)
        from reval.tasks.multiply import mistake_rates

        mistakes = mistake_rates(model, tokenizer, report, max_new_tokens=task.max_new_tokens)
        result = {"accuracy": mistakes["greedy"]["None"], "mean@8": mistakes["sampled@8"]["None"],
                  "mistakes": mistakes}
    else:
        result = evaluate(model, tokenizer, [p.question for p in report], [p.answer for p in report], samples=8,
                          max_new_tokens=task.max_new_tokens)
    result.update(params=num_params(model), seconds=round(time.time() - start, 1), config=asdict(cfg))
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out)
    tokenizer.save_pretrained(cfg.out)
    (cfg.out / "pretrain.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return result
