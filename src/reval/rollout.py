"""Rollout: sample answers with the KV cache and turn each into a frozen `Experience`.

Generation uses Hugging Face `generate` (left padding, KV cache, temperature / top-p,
stop at any EOS token) by default, or vLLM (`reval.rollout_vllm`, optional, GPU). Both
sit behind the same two methods, `generate(prompts, ...) -> Samples` and
`sync_weights(model)`, and produce the same records. One call samples
`samples_per_prompt` answers for each prompt, each prompt prefilled once; the G answers
of one prompt share a `group_id`. Rewards are attached by the caller
(`reval.rewards.score`), and group statistics right after, while the whole group is
still together (the replay buffer later samples trajectories one by one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reval.latent import copy_of, generate_latent, is_latent
from reval.model import cache_argument


@dataclass(frozen=True)
class Experience:
    """One sampled answer, as stored in the replay buffer.

    Only what the sampler produced is stored. Log-probabilities are never stored as
    truths: the loss recomputes them under the current policy and reference.
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # includes the EOS token when one was produced
    reward: float  # the verifier's reward, before any reward variant
    group_id: int  # answers to the same prompt in the same round share it
    group_mean: float  # mean reward of the group (for `group_mean` rewards and GRPO)
    group_std: float  # std of the group's rewards (GRPO's advantage normalisation)
    version: int  # optimizer updates done when this answer was sampled
    round: int  # generation round that produced it
    truncated: bool  # hit max_new_tokens without EOS
    uid: int = -1  # unique within a run (-1: none); keys the reference cache
    # the latent codes played, one per response token (`reval.latent`); empty: the tokens are the actions
    action_ids: tuple[int, ...] = ()


@dataclass
class Samples:
    """Raw generation output for a batch of prompts, in prompt-major order."""

    prompt_ids: list[list[int]]  # (N,) one per answer, prompts repeated G times
    response_ids: list[list[int]]  # (N,) cut after the first EOS
    truncated: list[bool]  # (N,)
    logprobs: list[list[float]] | None = None  # (N, H) sampler log-probs, only if asked
    actions: list[list[int]] | None = None  # (N, H) latent codes played (`reval.latent`), else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, samples_per_prompt: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
             greedy: bool = False, return_logprobs: bool = False,
             eos_token_ids: list[int] | None = None, shared_prefix: bool = True) -> Samples:
    """Sample `samples_per_prompt` answers per prompt; answers of a prompt are adjacent.

    An answer ends at the first of `eos_token_ids` (default: the tokenizer's EOS), which
    is kept as its last token; one that never produces it is marked truncated.

    With `shared_prefix` each prompt is prefilled once and its KV cache copied to its G
    answers, instead of prefilling it G times (`num_return_sequences`). The samples are the
    same for the same seed (the answers of a prompt are adjacent either way).
    """
    if is_latent(model):  # a code from the policy, then the world model's token, step by step
        return generate_latent(model, tokenizer, prompts, samples_per_prompt=samples_per_prompt,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy,
                               return_logprobs=return_logprobs, eos_token_ids=eos_token_ids)
    eos = set(eos_token_ids or [tokenizer.eos_token_id])
    was_training = model.training
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    G = samples_per_prompt
    if shared_prefix and G > 1 and enc["input_ids"].shape[1] > 1:
        inputs = {"input_ids": enc["input_ids"].repeat_interleave(G, 0),
                  "attention_mask": enc["attention_mask"].repeat_interleave(G, 0), **_prefill(model, enc, G)}
        G = 1
    else:
        inputs = dict(enc)
    out = model.generate(
        **inputs,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_p=top_p if not greedy else None,
        top_k=None,  # HF otherwise applies a default top_k=50 when sampling
        max_new_tokens=max_new_tokens,
        num_return_sequences=G,
        eos_token_id=sorted(eos),
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=return_logprobs,
    )
    model.train(was_training)
    seqs = out.sequences[:, enc["input_ids"].shape[1]:].tolist()  # (N, <=max_new_tokens)
    step_logprobs = None
    if return_logprobs:  # raw logits of the sampler, before temperature / top-p
        logits = torch.stack(out.logits, dim=1).float()  # (N, T, V)
        chosen = out.sequences[:, enc["input_ids"].shape[1]:]
        step_logprobs = torch.log_softmax(logits, -1).gather(-1, chosen[..., None])[..., 0].tolist()

    plain_prompts = [
        [t for t, m in zip(ids, mask) if m] for ids, mask in
        zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())
    ]
    samples = Samples([], [], [], [] if return_logprobs else None)
    for i, seq in enumerate(seqs):
        eos_at = next((j for j, t in enumerate(seq) if t in eos), None)
        cut = len(seq) if eos_at is None else eos_at + 1
        samples.prompt_ids.append(plain_prompts[i // samples_per_prompt])
        samples.response_ids.append(seq[:cut])
        samples.truncated.append(eos_at is None)
        if step_logprobs is not None:
            samples.logprobs.append(step_logprobs[i][:cut])
    return samples


def _prefill(model, enc, G: int) -> dict:
    """The KV cache of every prompt but its last token, computed once and repeated G times;
    `generate` then runs only the last prompt token and the answers on top of it."""
    decoder = model.get_decoder()
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                  use_cache=True)
    name = cache_argument(decoder)
    cache = out[name]
    cache.batch_repeat_interleave(G)
    return {name: cache}


class HFGenerator:
    """HF `generate` behind the rollout-backend interface (the default backend).

    With `sync_every == 1` it samples from the policy itself. Otherwise it samples from
    its own copy of the weights, refreshed only when `sync_weights` is called: rollouts
    then come from a policy up to `sync_every - 1` rounds stale, as with an asynchronous
    or vLLM sampler. ReVal and TBRM never use the sampler's log-probs, so they are
    unaffected; GRPO's ratio assumes the sampler is pi_old and becomes approximate.
    """

    def __init__(self, model, tokenizer, eos_token_ids: list[int], separate_copy: bool = False):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self.model = copy_of(model).requires_grad_(False) if separate_copy else model
        self.separate_copy = separate_copy

    def generate(self, prompts: list[str], **kwargs) -> Samples:
        kwargs.pop("seed", None)  # HF sampling draws from torch's global RNG, seeded by the loop
        return generate(self.model, self.tokenizer, prompts, eos_token_ids=self.eos_token_ids, **kwargs)

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        if self.separate_copy:
            for dst, src in zip(self.model.state_dict().values(), model.state_dict().values()):
                dst.copy_(src)


def group_stats(rewards: list[float], ddof: int = 0) -> tuple[float, float]:
    """(mean, std) of one group's rewards, the baseline of `group_mean` rewards and GRPO.

    std is the population std (ddof = 0) or the sample std (ddof = 1, TRL's). A group of one answer (G = 1, or one scored
    answer) has no group to compare with: it gets mean 0 and std 1, so both methods see
    its raw reward (verl's convention); with its own mean and std 0 it would give every
    method a zero signal.
    """
    if len(rewards) == 1:
        return 0.0, 1.0
    r = torch.tensor(rewards)
    return r.mean().item(), r.std(correction=ddof).item()


def to_experiences(samples: Samples, rewards: list[float | None], *, samples_per_prompt: int,
                   version: int, round: int, first_group_id: int = 0, first_uid: int = -1,
                   std_ddof: int = 0) -> list[Experience]:
    """Attach rewards and group statistics (`group_stats` with `std_ddof`); answers whose reward
    is None are dropped.

    With `first_uid` >= 0, answer i (in sampling order) gets uid `first_uid + i`."""
    out = []
    for g in range(len(samples.response_ids) // samples_per_prompt):
        idx = range(g * samples_per_prompt, (g + 1) * samples_per_prompt)
        valid = [i for i in idx if rewards[i] is not None]
        if not valid:
            continue
        mean, std = group_stats([float(rewards[i]) for i in valid], std_ddof)
        for i in valid:
            out.append(Experience(
                prompt_ids=tuple(samples.prompt_ids[i]), response_ids=tuple(samples.response_ids[i]),
                reward=float(rewards[i]), group_id=first_group_id + g, group_mean=mean,
                group_std=std, version=version, round=round, truncated=samples.truncated[i],
                uid=first_uid + i if first_uid >= 0 else -1,
                action_ids=tuple(samples.actions[i]) if samples.actions is not None else (),
            ))
    return out
