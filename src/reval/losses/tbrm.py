"""TBRM (arXiv 2505.15311): ReVal's residual without the -V_ref(s_1) term.

    delta(tau) = V_theta(s_1) + sum_h [log pi_theta - log pi_ref] - r / beta
    L = mean_tau delta(tau)^2

Not calibrated: with theta = ref and r = 0, delta = V_ref(s_1) != 0, so it moves the
policy even without reward. Offered as an ablation of ReVal.
"""

from __future__ import annotations

import torch

from reval.losses.reval import _residual_metrics


def tbrm_loss(logp: torch.Tensor, ref_logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              reward: torch.Tensor, *, beta: float,
              num_trajectories: int | None = None, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """TBRM loss; arguments and shapes as in `reval_loss`, minus `ref_v`."""
    log_ratio = ((logp - ref_logp) * mask).sum(-1)  # (B,)
    delta = v + log_ratio - reward / beta  # (B,)
    sq = delta.pow(2) if weight is None else weight * delta.pow(2)
    loss = sq.sum() / (num_trajectories or delta.shape[0])
    return loss, _residual_metrics(delta, log_ratio, v)
