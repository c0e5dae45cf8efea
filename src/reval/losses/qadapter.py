"""Q-Adapter (arXiv 2407.03856): a residual Q-function for a new preference, learned from pairs.

The base model pi_base is read as the soft-optimal policy of an unknown reward r1. The
customised policy (`reval.qhead.QAdapterHead`) is

    log pi(a|s) = (Q_res(s, a) + alpha_0 log pi_base(a|s)) / alpha~ - V_res(s) / alpha~,
    V_res(s)    = alpha~ logsumexp_a [(Q_res(s, a) + alpha_0 log pi_base(a|s)) / alpha~]

and Q_res satisfies a soft Bellman equation driven by the new reward r2 alone, so the
reward each token implies is

    r_t = Q_res(s_t, a_t) - gamma V_res(s_t+1),        V_res(terminal) = 0.

The new reward is learned with Bradley-Terry on whole answers, plus the authors' chi-squared
term on the implied per-token reward:

    R(y) = sum_t r_t,   L = mean_pairs -log sigmoid(R(y_w) - R(y_l)) + c mean_tokens r_t^2

From the loss's tensors: Q_res(s_t, a_t) = alpha~ (log pi(a_t|s_t) + v_t) - alpha_0 log pi_base(a_t|s_t),
where v_t = logsumexp of the customised logits = V_res(s_t) / alpha~. With gamma = 1 the sum
telescopes to V_res(s_1) + sum_t [alpha~ log pi - alpha_0 log pi_base], and V_res(s_1) cancels
between two answers to one prompt. Rows (2i, 2i + 1) are (chosen, rejected) of pair i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qadapter_loss(logp: torch.Tensor, base_logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                  alpha: float = 1.0, alpha0: float = 1.0, gamma: float = 1.0, chi2: float = 0.1,
                  num_pairs: int | None = None, num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Q-Adapter loss and metrics.

    Args:
        logp: (2N, T) log pi(a_t|s_t) under the customised policy (with grad).
        base_logp: (2N, T) log pi_base(a_t|s_t) of the frozen base (no grad).
        v: (2N, T) logsumexp of the customised logits at each answer position, zero outside
            `mask` (`sequence_logprobs(..., all_values=True)`).
        mask: (2N, T) 1 on answer tokens (right-padded).
        alpha, alpha0: alpha~ and alpha_0 of the customised policy.
        gamma: discount of V_res(s_t+1).
        chi2: weight c of the squared implied reward.
        num_pairs, num_tokens: pairs and answer tokens in the whole optimisation batch,
            for gradient accumulation (default: this batch's).
    """
    if logp.shape[0] % 2:
        raise ValueError(f"Q-Adapter needs (chosen, rejected) row pairs, got {logp.shape[0]} rows")
    q = alpha * (logp + v) - alpha0 * base_logp  # (2N, T) Q_res(s_t, a_t)
    v_res = alpha * v  # (2N, T) V_res(s_t)
    v_next = torch.cat([v_res[:, 1:], torch.zeros_like(v_res[:, :1])], 1)  # 0 after the last token
    r = (q - gamma * v_next) * mask  # (2N, T) implied new reward per token
    total = r.sum(-1)  # (2N,) R(y)
    z = total[0::2] - total[1::2]  # (N,)
    preference = -F.logsigmoid(z).sum() / (num_pairs or z.shape[0])
    chi = r.pow(2).sum() / (num_tokens or mask.sum().clamp(min=1))
    loss = preference + chi2 * chi if chi2 else preference
    with torch.no_grad():
        m = mask.sum().clamp(min=1)
        metrics = {"loss/preference": -F.logsigmoid(z).mean().item(), "loss/chi2": chi.item(),
                   "rewards/chosen": total[0::2].mean().item(), "rewards/rejected": total[1::2].mean().item(),
                   "rewards/margin": z.mean().item(), "rewards/accuracy": (z > 0).float().mean().item(),
                   "q/residual_mean": ((q * mask).sum() / m).item()}
    return loss, metrics
