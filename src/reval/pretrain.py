"""Warm start: supervised training of a tiny model on sometimes-wrong solutions.

    reval pretrain --task add --out DIR     # the shipped reval/assets/warmstart (~16 min, 2 cores)
    reval pretrain --task mul --out DIR     # the shipped reval/assets/warmstart-mul
    reval pretrain --task mul --loss iq --iq-lambda 0.01 --out DIR       # IQ-Learn instead of MLE
    reval pretrain --data demos.jsonl --model DIR --steps 200 --out DIR2  # your prompt/response rows
    reval pretrain --task mul --latent-codes 64 --out DIR   # a latent-action model (docs/latent.md)

builds the character tokenizer and a randomly initialised Qwen2 (or, with `--model`,
continues from an existing model and its tokenizer), then trains it on the task's
training problems with worked solutions that contain the task's systematic mistakes
(`reval.tasks`): dropped carries for `add` (each with probability 0.6), and
multiplication-fact slips plus dropped carries at many rates for `mul`. The model
learns habits, not noise: greedy decoding follows them, sampling sometimes does the
right thing, and RL has room to fix exactly that. Each shipped checkpoint is the output
of this command with the task's defaults (`RECIPES`); `pretrain.json` next to it records
the result, and for `mul` the rate of each kind of mistake.

The loss is the training loop's own (`reval.losses.ALGORITHMS`, on a `collate`d batch of
`reval.offline` demonstrations and `sequence_logprobs`): `--loss mle` (the default, the
token-mean negative log-likelihood of the answer tokens, EOS included: the same maths as
Hugging Face's labels loss the shipped models were trained with) or `--loss iq`
(IQ-Learn: MLE plus `--iq-lambda` times the squared per-token reward the logits imply,
docs/iq.md). `--data FILE` imitates your own prompt/response rows
(`reval.data.load_demonstrations`) instead of the task's solutions; the final report then
holds the last loss, not an accuracy (the rows have no reference answer to verify).
`reval pretrain` runs on the CPU in float32, for the tiny models; for a real model, imitate
with `reval train --algo iq|mle --task.data FILE --model.path DIR` (GPU, LoRA, bf16, resume).

`--latent-codes K` builds a latent-action model (BWArea / CoLA, `reval.latent`, docs/latent.md)
instead, on the task's shipped warm start (or `--model`; `--latent-from fresh`: a fresh tiny
Qwen2): `steps` steps of the world model and the inverse dynamics together, then
`policy_steps` of the policy cloning the codes the inverse dynamics infers. `--corrupt F`
replaces a share F of the training answers by noise (BWArea's dirty-data experiment).
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

from reval import offline
from reval.buffer import collate
from reval.config import LossConfig
from reval.evaluate import evaluate
from reval.latent import build_latent, code_policy, is_latent, policy_loss, reconstruction, world_loss
from reval.logprobs import sequence_logprobs
from reval.losses import ALGORITHMS
from reval.model import (auto_prompt, build_char_tokenizer, build_tiny_model, load_model,
                         num_params, resolve_template, use_chat_template)
from reval.tasks import TASKS, warmstart_path

# Per task: the settings that rebuild its shipped warm start (fields left None below).
RECIPES: dict[str, dict] = {
    "add": {"steps": 1500, "hidden": 128, "layers": 4},
    "mul": {"steps": 1500, "hidden": 128, "layers": 4},
}
LATENT_STEPS = 300  # each stage of a latent-action model from a warm start (world model, then policy)


@dataclass
class PretrainConfig:
    task: Literal["add", "mul"] = "add"
    """Embedded task (`reval.tasks.TASKS`) whose flawed worked solutions are the training data
    (without `data`), and whose recipe and evaluation apply."""
    out: Path | None = None
    """Directory to write the model and tokenizer to (HF format, safetensors);
    default runs/warmstart-<task> (with `data`: runs/pretrain-<data file name>)."""
    model: str | None = None
    """Continue from this model directory (or hub id) and its tokenizer instead of a fresh
    tiny Qwen2 (`hidden` and `layers` then do not apply)."""
    data: str | None = None
    """Your prompt/response rows to imitate: a JSONL (or Parquet / CSV / dataset) read by
    `reval.data.load_demonstrations`; None: the task's flawed worked solutions."""
    loss: Literal["mle", "iq"] = "mle"
    """mle: token-mean negative log-likelihood (the shipped warm starts); iq: IQ-Learn,
    MLE plus iq_lambda x the mean squared implied per-token reward (docs/iq.md)."""
    iq_lambda: float = 0.01
    """iq: weight lambda = 1/(4 alpha) of the temporal-difference term (0 = MLE)."""
    gamma: float = 1.0
    """iq: discount of V(s_t+1) in the implied reward Q(s_t, a_t) - gamma V(s_t+1)."""
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
    latent_codes: int = 0
    """Build a latent-action model with this many codes (docs/latent.md; the authors use 64);
    0: a plain language model."""
    latent_from: Literal["warmstart", "fresh"] = "warmstart"
    """Latent: start the world model from the task's shipped warm start (or `model`), or from a
    fresh tiny Qwen2 of `hidden` x `layers` (the dirty-data study pretrains both kinds from scratch)."""
    latent_usage: float = 0.1
    """Latent: weight of the code-usage term (log K minus the entropy of the batch's mean code
    distribution), against codes going unused (ours, not the papers'; 0: off). From a fresh tiny
    model without it, 9 of 64 codes stayed in use and 86% of tokens were reconstructed; with 0.1,
    41 codes and 100% (docs/latent.md)."""
    policy_steps: int | None = None
    """Latent: steps of the policy's behaviour cloning after the world model's; None: `steps`."""
    corrupt: float = 0.0
    """Share of training answers replaced by noise (BWArea's dirty data): each character of a
    corrupted answer becomes a random one of the task's answer characters with probability 0.3."""

    def resolved(self) -> "PretrainConfig":
        """A copy with the task's recipe filled in where a field is None (checked)."""
        if self.model is not None and (self.hidden is not None or self.layers is not None):
            raise ValueError("--hidden / --layers size a fresh model; with --model the model's own size is used")
        if self.iq_lambda < 0 or not 0 < self.gamma <= 1:
            raise ValueError(f"--iq-lambda must be >= 0 (0 = MLE) and --gamma in (0, 1], got {self.iq_lambda} "
                             f"and {self.gamma}")
        if self.latent_codes < 0 or self.latent_codes == 1:
            raise ValueError(f"--latent-codes must be 0 (a plain LM) or >= 2, got {self.latent_codes}")
        if any(n is not None and n < 0 for n in (self.steps, self.policy_steps)):
            raise ValueError(f"--steps and --policy-steps must be >= 0, got {self.steps} and {self.policy_steps}")
        if not 0 <= self.corrupt < 1:
            raise ValueError(f"--corrupt is a share of the training answers in [0, 1), got {self.corrupt}")
        if self.corrupt and self.data is not None:
            raise ValueError("--corrupt corrupts the task's worked solutions; with --data, corrupt your rows yourself")
        if self.latent_codes and (self.loss != "mle" or self.data is not None):
            raise ValueError("--latent-codes builds a latent-action model from the task's solutions "
                             "(--loss mle, no --data)")
        recipe = RECIPES[self.task]
        if self.latent_codes:  # the world model starts from the shipped warm start, unless told otherwise
            fresh = self.latent_from == "fresh"
            if fresh and self.model is not None:
                raise ValueError("--latent-from fresh builds a fresh model; drop --model")
            return dataclasses.replace(
                self, out=self.out or Path(f"runs/latent-{self.task}"),
                model=None if fresh else self.model or str(warmstart_path(self.task)),
                steps=LATENT_STEPS if self.steps is None else self.steps,
                policy_steps=next(n for n in (self.policy_steps, self.steps, LATENT_STEPS) if n is not None),
                hidden=(self.hidden or recipe["hidden"]) if fresh else None,
                layers=(self.layers or recipe["layers"]) if fresh else None)
        out = self.out or Path(f"runs/pretrain-{Path(self.data).stem}" if self.data else f"runs/warmstart-{self.task}")
        return dataclasses.replace(
            self, out=out, **{k: recipe[k] if getattr(self, k) is None and (k == "steps" or self.model is None)
                              else getattr(self, k) for k in ("steps", "hidden", "layers")})


def pretrain(cfg: PretrainConfig) -> dict:
    cfg = cfg.resolved()
    task = TASKS[cfg.task]
    algo = ALGORITHMS[cfg.loss]  # the training loop's losses: mle_loss / iq_loss
    loss_cfg = LossConfig(iq_lambda=cfg.iq_lambda, gamma=cfg.gamma)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.model is None:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(len(tokenizer), hidden=cfg.hidden, layers=cfg.layers, seed=cfg.seed)
    else:
        model, tokenizer = load_model(cfg.model)
        if is_latent(model):
            raise ValueError(f"--model {cfg.model} is a latent-action model (latent.json); pretrain from a plain "
                             "language model (for a latent one: its world model's warm start)")
    # prompts exactly as `reval train` / `reval eval` format them for this model and data
    chat = use_chat_template(tokenizer, "auto")
    template = resolve_template(auto_prompt(chat, embedded=cfg.data is None))
    if cfg.data is not None:
        from reval.data import load_demonstrations

        examples = load_demonstrations(cfg.data)
        context = getattr(model.config, "max_position_embeddings", None)
        long = context and offline.too_long(examples, tokenizer, template=template, chat=chat, context=context)
        if long:
            raise ValueError(f"{cfg.data}: example {long[0]} is {long[1]} tokens with its prompt, more than the "
                             f"model's context of {context}; shorten or drop it")
    else:  # each step writes fresh worked solutions (with the task's mistakes) for the drawn problems
        examples = task.split("train", cfg.num_problems, seed=cfg.seed, digits=cfg.digits)
    if len(examples) < cfg.batch_size:
        raise ValueError(f"{len(examples)} training examples, fewer than --batch-size {cfg.batch_size}")
    source = task if not cfg.corrupt else _Dirty(task, cfg.corrupt, examples[:200])

    def batch(step: int):  # B demonstrations, each prompt + answer + EOS, the loss on the answer tokens only
        exps = offline.to_experiences(rng.sample(examples, cfg.batch_size), tokenizer, template=template, chat=chat,
                                      eos_id=tokenizer.eos_token_id, version=step, round=step, first_group_id=0,
                                      first_uid=0, task=source, rng=rng)
        return collate(exps, tokenizer.pad_token_id)

    start = time.time()
    if cfg.latent_codes:  # the world model and inverse dynamics together, then the policy clones their codes
        model = build_latent(model, cfg.latent_codes)
        _optimise(model, [p for n, p in model.named_parameters() if not n.startswith("policy.")], cfg, cfg.steps,
                  lambda step: world_loss(model, batch(step), usage=cfg.latent_usage), "latent world model")
        model.freeze_world()
        model.policy = code_policy(model.world, cfg.latent_codes)  # from the world model's own decoder

        def clone(step: int):
            b = batch(step)
            return policy_loss(model, b, model.infer_codes(b))

        loss, metrics = _optimise(model, list(model.policy.parameters()), cfg, cfg.policy_steps, clone, "latent policy")
    else:
        def supervised(step: int):
            b = batch(step)
            # one forward of each row in full (no KV-cache sharing: the prompts rarely repeat)
            logp, v = sequence_logprobs(model, b, shared_prefix=False, all_values=algo.all_values)  # (B, H)
            t = {"logp": logp, "v": v, "mask": b.response_mask, "truncated": b.truncated}
            return algo.compute(t, loss_cfg, int(b.response_mask.sum()))

        loss, metrics = _optimise(model, [p for p in model.parameters() if p.requires_grad], cfg, cfg.steps,
                                  supervised, f"pretrain ({cfg.loss})")
    model.eval()
    if cfg.data is not None:  # the rows have no reference answer: report the last step's losses
        result: dict = {"last_step": {"loss": loss.item(), **metrics}}
    elif cfg.task == "mul":  # which mistakes it makes, greedy and sampled, and how often (None: correct)
        from reval.tasks.multiply import mistake_rates

        report = task.split(cfg.eval_split, cfg.eval_problems, seed=0, digits=cfg.digits)
        mistakes = mistake_rates(model, tokenizer, report, max_new_tokens=task.max_new_tokens)
        result = {"accuracy": mistakes["greedy"]["None"], "mean@8": mistakes["sampled@8"]["None"],
                  "mistakes": mistakes}
    else:
        report = task.split(cfg.eval_split, cfg.eval_problems, seed=0, digits=cfg.digits)
        result = evaluate(model, tokenizer, [p.question for p in report], [p.answer for p in report], samples=8,
                          max_new_tokens=task.max_new_tokens, template=template, chat=chat)
    if cfg.latent_codes:  # how well the codes explain unseen solutions (teacher-forced), and how they are used
        held = task.split(cfg.eval_split, 256, seed=1, digits=cfg.digits)
        exps = offline.to_experiences(held, tokenizer, template=template, chat=chat, eos_id=tokenizer.eos_token_id,
                                      version=0, round=0, first_group_id=0, first_uid=0, task=task, rng=rng)
        result["reconstruction"] = reconstruction(model, collate(exps, tokenizer.pad_token_id))
    result.update(params=num_params(model), seconds=round(time.time() - start, 1), config=asdict(cfg))
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.data is None:  # the warm start declares its task's answer budget (reval eval, train on own data)
        model.generation_config.max_new_tokens = task.max_new_tokens
    model.save_pretrained(cfg.out)
    tokenizer.save_pretrained(cfg.out)
    (cfg.out / "pretrain.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return result


def _optimise(model, params: list, cfg: PretrainConfig, steps: int, step_loss, desc: str):
    """`steps` AdamW steps on `step_loss(step) -> (loss, metrics)`: linear warm-up, cosine decay, clipping."""
    loss, metrics = torch.tensor(float("nan")), {}  # what a run of 0 steps reports
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        loss, metrics = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss, metrics


class _Dirty:
    """The task's worked solutions, a share of them replaced by noise: each character, with
    probability 0.3, becomes a random one of the characters solutions use (BWArea's dirty data)."""

    def __init__(self, task, share: float, sample: list, p_char: float = 0.3):
        probe = random.Random(0)
        self.alphabet = sorted({c for ex in sample for c in task.warmstart_solution(ex, probe)})
        self.task, self.share, self.p_char = task, share, p_char

    def warmstart_solution(self, problem, rng: random.Random) -> str:
        text = self.task.warmstart_solution(problem, rng)
        if rng.random() >= self.share:
            return text
        return "".join(rng.choice(self.alphabet) if rng.random() < self.p_char else c for c in text)
