"""Losses: one pure tensor function per algorithm, picked from `ALGORITHMS`.

Each entry says what the training loop must compute for the loss (a reference forward,
old log-probs, V at every position), which data a round is made of (sampled answers,
demonstrations or preference pairs, `reval.offline`) and how to call it. Adding an algorithm is one file here, one entry in
the dict, one docs page and one test file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from reval.losses.dpo import dpo_loss
from reval.losses.dualqdm import dualqdm_loss
from reval.losses.grpo import grpo_advantage, grpo_loss, sampler_weight
from reval.losses.iq import iq_loss, mle_loss
from reval.losses.qadapter import qadapter_loss
from reval.losses.reval import reval_loss
from reval.losses.tbrm import tbrm_loss
from reval.rewards import shape_reward


@dataclass(frozen=True)
class Algorithm:
    needs_reference: bool  # the loss needs log pi_ref and V_ref(s_1)
    replay: bool  # updates after the first sample the replay buffer (else: reuse the fresh batch)
    needs_old_logp: bool  # a PPO ratio against the policy that sampled the batch
    per_token: bool  # loss is a token-mean (else a trajectory-mean)
    default_updates_per_round: int  # K when the config leaves it unset
    # compute(t, cfg, denom) -> (loss, metrics); t holds the tensors named below. denom: the
    # whole batch's tokens (per_token) or examples (trajectories; pairs for preferences)
    compute: Callable[[dict, object, int], tuple[torch.Tensor, dict]]
    data: str = "rollout"  # a round's data: sampled answers, "demonstrations" or "preferences"
    all_values: bool = False  # t["v"] is V(s_t) at every answer position (B, T), not V(s_1) (B,)
    # demonstrations: a round also samples rollout.samples_per_prompt answers to each one's prompt
    samples_demonstrations: bool = False
    # the whole batch's normaliser when it is neither its tokens nor its examples (batch -> int)
    denominator: Callable[[object], int] | None = None


def _reval(t: dict, cfg, denom: int):
    r = shape_reward(t["reward"], t["group_mean"], cfg.reward_variant)
    return reval_loss(t["logp"], t["ref_logp"], t["v"], t["ref_v"], t["mask"], r,
                      beta=cfg.beta, num_trajectories=denom, weight=t.get("weight"))


def _tbrm(t: dict, cfg, denom: int):
    r = shape_reward(t["reward"], t["group_mean"], cfg.reward_variant)
    return tbrm_loss(t["logp"], t["ref_logp"], t["v"], t["mask"], r, beta=cfg.beta,
                     num_trajectories=denom, weight=t.get("weight"))


def _grpo(t: dict, cfg, denom: int):
    adv = grpo_advantage(t["reward"], t["group_mean"], t["group_std"], eps=cfg.grpo_eps)
    weight = sampler_weight(t["old_logp"], t["sampler_logp"], cfg.sampler_weight_cap) \
        if "sampler_logp" in t else None
    return grpo_loss(t["logp"], t["old_logp"], t["mask"], adv, clip_low=cfg.clip_low,
                     clip_high=cfg.clip_high, num_tokens=denom, weight=weight)


def _mle(t: dict, cfg, denom: int):
    return mle_loss(t["logp"], t["mask"], num_tokens=denom)


def _iq(t: dict, cfg, denom: int):
    return iq_loss(t["logp"], t["v"], t["mask"], iq_lambda=cfg.iq_lambda, gamma=cfg.gamma,
                   truncated=t["truncated"], num_tokens=denom)


def _dualqdm(t: dict, cfg, denom: int):
    # a group is one demonstration (reward 1) and its prompt's G samples (reward 0), so the group's
    # mean reward is 1 / (1 + G): each sample's share of the value term is 1/(2G), the demonstration's 1/2
    expert = t["reward"] > 0.5
    g = (1.0 / t["group_mean"] - 1.0).round().clamp(min=1.0)
    weight = torch.where(expert, 0.5, 0.5 / g)
    return dualqdm_loss(t["logp"], t["v"], t["mask"], expert, weight, rho=cfg.dualqdm_rho,
                        r_min=cfg.dualqdm_r_min, r_max=cfg.dualqdm_r_max, gamma=cfg.gamma,
                        box_terminal=cfg.dualqdm_box_terminal, truncated=t["truncated"], num_tokens=denom)


def _demonstration_tokens(batch) -> int:
    """Dual Q-DM's N: the answer tokens of the batch's demonstrations (reward 1)."""
    return max(int((batch.response_mask.sum(1) * (batch.reward > 0.5)).sum()), 1)


def _dpo(t: dict, cfg, denom: int):
    return dpo_loss(t["logp"], t["ref_logp"], t["mask"], beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                    num_pairs=denom)


def _qadapter(t: dict, cfg, denom: int):
    return qadapter_loss(t["logp"], t["ref_logp"], t["v"], t["mask"], alpha=cfg.qadapter_alpha,
                         alpha0=cfg.qadapter_alpha0, gamma=cfg.gamma, chi2=cfg.qadapter_chi2, num_pairs=denom,
                         num_tokens=t["batch_tokens"])


ALGORITHMS: dict[str, Algorithm] = {
    "reval": Algorithm(needs_reference=True, replay=True, needs_old_logp=False, per_token=False,
                       default_updates_per_round=2, compute=_reval),
    # TBRM as published (ReVal paper, section 4.3): on-policy, one update per batch, no replay
    "tbrm": Algorithm(needs_reference=True, replay=False, needs_old_logp=False, per_token=False,
                      default_updates_per_round=1, compute=_tbrm),
    # the ablation: TBRM's residual with ReVal's replay buffer and K
    "tbrm_replay": Algorithm(needs_reference=True, replay=True, needs_old_logp=False, per_token=False,
                             default_updates_per_round=2, compute=_tbrm),
    "grpo": Algorithm(needs_reference=False, replay=False, needs_old_logp=True, per_token=True,
                      default_updates_per_round=1, compute=_grpo),
    # imitation: supervised on demonstrations (SFT), and IQ-Learn's MLE + TD term
    "mle": Algorithm(needs_reference=False, replay=False, needs_old_logp=False, per_token=True,
                     default_updates_per_round=1, compute=_mle, data="demonstrations"),
    "iq": Algorithm(needs_reference=False, replay=False, needs_old_logp=False, per_token=True,
                    default_updates_per_round=1, compute=_iq, data="demonstrations", all_values=True),
    # imitation with the policy's own answers: IQ-Learn plus Bellman constraints (Dual Q-DM)
    "dualqdm": Algorithm(needs_reference=False, replay=False, needs_old_logp=False, per_token=True,
                         default_updates_per_round=1, compute=_dualqdm, data="demonstrations", all_values=True,
                         samples_demonstrations=True, denominator=_demonstration_tokens),
    # preferences: DPO against the reference; Q-Adapter's residual Q on the frozen base
    # (its "reference" is the base under the head, `reval.qhead`)
    "dpo": Algorithm(needs_reference=True, replay=False, needs_old_logp=False, per_token=False,
                     default_updates_per_round=1, compute=_dpo, data="preferences"),
    "qadapter": Algorithm(needs_reference=True, replay=False, needs_old_logp=False, per_token=False,
                          default_updates_per_round=1, compute=_qadapter, data="preferences", all_values=True),
}

__all__ = ["ALGORITHMS", "Algorithm", "dpo_loss", "dualqdm_loss", "grpo_advantage", "grpo_loss", "iq_loss", "mle_loss",
           "qadapter_loss", "reval_loss", "tbrm_loss"]
