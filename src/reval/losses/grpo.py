"""GRPO (arXiv 2402.03300) with DAPO's asymmetric clipping, no KL, no entropy term.

For G answers to one prompt with rewards r_i (method.md section 7):

    A_i     = (r_i - mean(r)) / (std(r) + eps)          same A for every token of y_i
    ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)
    L       = - token-mean of min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i)

Token-mean aggregation: the sum over every response token of the batch divided by the
number of those tokens (DAPO), not a mean of per-sequence means. std is the population
std of the group (ddof = 0).
"""

from __future__ import annotations

import torch


def grpo_advantage(reward: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """(B,) group-normalised advantage; zero for groups whose answers all scored the same."""
    return (reward - group_mean) / (group_std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
              advantage: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.28,
              num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss and metrics.

    Args:
        logp: (B, T) log pi_theta of each taken token (with grad).
        old_logp: (B, T) log pi_old, the policy that sampled the batch (no grad).
        mask: (B, T) 1 on response tokens.
        advantage: (B,) per-trajectory advantage.
        num_tokens: response tokens in the whole optimisation batch, for gradient
            accumulation (defaults to mask.sum()).
    """
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantage[:, None]  # (B, 1)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    loss = (per_token * mask).sum() / (num_tokens or mask.sum().clamp(min=1))
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = ((ratio * adv) > (clipped * adv)).float()
        metrics = {
            "loss/clip_fraction": ((was_clipped * mask).sum() / n).item(),
            "loss/ratio_mean": ((ratio * mask).sum() / n).item(),
            "loss/advantage_abs_mean": advantage.abs().mean().item(),
        }
    return loss, metrics
