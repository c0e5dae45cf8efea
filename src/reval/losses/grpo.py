"""GRPO (arXiv 2402.03300) with DAPO's asymmetric clipping, no KL, no entropy term.

For G answers to one prompt with rewards r_i (method.md section 7):

    A_i     = (r_i - mean(r)) / (std(r) + eps)          same A for every token of y_i
    ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    L       = - token-mean of min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i)

Token-mean aggregation: the sum over every response token of the batch divided by the
number of those tokens (DAPO), not a mean of per-sequence means. std is the population
std of the group (ddof = 0) and eps 1e-6 by default; `loss.grpo_std sample` with
`loss.grpo_eps 1e-4` is TRL's advantage (tests/test_grpo_trl.py checks the two agree).

When the sampler is not the trained policy (vLLM, or `rollout.sync_every > 1`), pi_old is
still the trainer's policy before the round's updates (the proximal policy of the clip),
and each token's loss is weighted by min(pi_old / pi_sampler, cap) (`sampler_weight`).
"""

from __future__ import annotations

import torch


def grpo_advantage(reward: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """(B,) group-normalised advantage; zero for groups whose answers all scored the same."""
    return (reward - group_mean) / (group_std + eps)


def sampler_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """(B, T) truncated importance weight min(pi_old / pi_sampler, cap) of each token.

    When the answers came from a sampler that is not pi_old (a stale copy, vLLM), this is
    the correction between sampler and trainer (the ReVal paper's appendix A compensation
    term; verl's TIS, TRL's `vllm_importance_sampling_correction` in token_truncate mode).
    """
    return torch.exp(old_logp - sampler_logp).clamp(max=cap)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
              advantage: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.28,
              num_tokens: int | None = None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss and metrics.

    Args:
        logp: (B, T) log pi_theta of each taken token (with grad).
        old_logp: (B, T) log pi_old, the policy before this round's updates (no grad).
        mask: (B, T) 1 on response tokens.
        advantage: (B,) per-trajectory advantage.
        num_tokens: response tokens in the whole optimisation batch, for gradient
            accumulation (defaults to mask.sum()).
        weight: (B, T) per-token importance weight (`sampler_weight`), or None.
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantage[:, None]  # (B, 1)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if weight is not None:
        per_token = per_token * weight
    loss = (per_token * mask).sum() / (num_tokens or mask.sum().clamp(min=1))
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = ((ratio * adv) > (clipped * adv)).float()
        metrics = {
            "loss/clip_fraction": ((was_clipped * mask).sum() / n).item(),
            "loss/ratio_mean": ((ratio * mask).sum() / n).item(),
            "loss/advantage_abs_mean": advantage.abs().mean().item(),
        }
        if weight is not None:
            metrics["loss/sampler_weight_mean"] = ((weight * mask).sum() / n).item()
    return loss, metrics
