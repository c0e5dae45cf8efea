"""ReVal: trajectory-level soft Bellman residual with the model's logits as Q.

For each trajectory tau = (x, y) with (shaped) reward r (method.md section 3, Eq. 2):

    delta(tau) = [V_theta(s_1) - V_ref(s_1)]
               + sum_h [log pi_theta(a_h|s_h) - log pi_ref(a_h|s_h)]
               - r / beta
    L = mean_tau delta(tau)^2

The per-token residuals telescope into one sum, and the *sum* is squared per trajectory.
With theta = ref and r = 0, delta = 0: no update without reward (calibrated start).
The gradient of V_theta(s_1) is kept (a learned per-prompt log-partition).
"""

from __future__ import annotations

import torch


def reval_loss(logp: torch.Tensor, ref_logp: torch.Tensor, v: torch.Tensor, ref_v: torch.Tensor,
               mask: torch.Tensor, reward: torch.Tensor, *, beta: float,
               num_trajectories: int | None = None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """ReVal loss and metrics.

    Args:
        logp, ref_logp: (B, T) log pi_theta / log pi_ref of each taken token.
        v, ref_v: (B,) V_theta(s_1) / V_ref(s_1), logsumexp of the first response logits.
        mask: (B, T) 1 on response tokens.
        reward: (B,) reward after the reward variant.
        beta: KL strength; the reward is divided by it.
        num_trajectories: trajectories in the whole optimisation batch, so that
            micro-batches summed with gradient accumulation give the batch mean
            (defaults to B).
        weight: (B,) importance weight of each trajectory's squared residual (prioritised
            replay, `reval.buffer.ReplayBuffer.draw`), or None for 1.
    """
    log_ratio = ((logp - ref_logp) * mask).sum(-1)  # (B,)
    delta = (v - ref_v) + log_ratio - reward / beta  # (B,)
    sq = delta.pow(2) if weight is None else weight * delta.pow(2)
    loss = sq.sum() / (num_trajectories or delta.shape[0])
    return loss, _residual_metrics(delta, log_ratio, v - ref_v)


def _residual_metrics(delta: torch.Tensor, log_ratio: torch.Tensor, v_gap: torch.Tensor) -> dict:
    d = delta.detach()
    return {
        "loss/residual_mean": d.mean().item(),
        "loss/residual_abs_mean": d.abs().mean().item(),
        "loss/residual_max_abs": d.abs().max().item(),
        "q/log_ratio_mean": log_ratio.detach().mean().item(),
        "q/v_gap_mean": v_gap.detach().mean().item(),
        ROW_RESIDUAL: d.abs(),  # per trajectory, for prioritised replay (popped by the learner, not logged)
    }


ROW_RESIDUAL = "rows/abs_residual"
