"""Q-Adapter (arXiv 2407.03856): a Q-function for a new preference, learned from pairs.

The base model pi_base is read as the soft-optimal policy of an unknown reward r1. The
customised policy (`reval.qhead.QAdapterHead`) is

    log pi(a|s) = (Q(s, a) + alpha_0 log pi_base(a|s)) / alpha~ - V(s) / alpha~,
    V(s)        = alpha~ logsumexp_a [(Q(s, a) + alpha_0 log pi_base(a|s)) / alpha~],
    Q(s, a)     = (alpha~ - alpha_0) log pi_base(a|s) + Q_res(s, a)      (Q_res: the module, 0 at the start)

and Q satisfies a soft Bellman equation driven by the new reward r2 alone. The reward each
token implies is taken as in the authors' code, against the value of the same state:

    r_t = Q(s_t, a_t) - gamma V(s_t)      (with gamma = 1: alpha~ log pi(a_t|s_t) - alpha_0 log pi_base(a_t|s_t))

(the Bellman form Q(s_t, a_t) - gamma V(s_t+1), V(terminal) = 0, sums to the same R(y) plus
V(s_1) when gamma = 1, and V(s_1) cancels between two answers to one prompt; the two differ
in the chi-squared term, where this form keeps every token of both answers likely). The new
reward is learned with Bradley-Terry on whole answers, plus the authors' chi-squared
term on the implied per-token reward:

    R(y) = sum_t r_t,   L = mean_pairs -log sigmoid(R(y_w) - R(y_l)) + c mean_tokens r_t^2

From the loss's tensors: Q(s_t, a_t) = alpha~ (log pi(a_t|s_t) + v_t) - alpha_0 log pi_base(a_t|s_t),
where v_t = logsumexp of the customised logits = V(s_t) / alpha~. With gamma = 1,
R(y) = sum_t [alpha~ log pi - alpha_0 log pi_base]: alpha_0 is how strongly the base model's own preferences count
against the new ones (the authors' 0.01: hardly; alpha_0 = alpha~ gives DPO's logit with
beta = alpha~). Rows (2i, 2i + 1) are (chosen, rejected) of pair i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qadapter_loss(logp: torch.Tensor, base_logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                  alpha: float = 1.0, alpha0: float = 0.01, gamma: float = 1.0, chi2: float = 0.1,
                  num_pairs: int | None = None, num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Q-Adapter loss and metrics.

    Args:
        logp: (2N, T) log pi(a_t|s_t) under the customised policy (with grad).
        base_logp: (2N, T) log pi_base(a_t|s_t) of the frozen base (no grad).
        v: (2N, T) logsumexp of the customised logits at each answer position, zero outside
            `mask` (`sequence_logprobs(..., all_values=True)`).
        mask: (2N, T) 1 on answer tokens (right-padded).
        alpha, alpha0: alpha~ and alpha_0 of the customised policy.
        gamma: discount of V(s_t).
        chi2: weight c of the squared implied reward.
        num_pairs, num_tokens: pairs and answer tokens in the whole optimisation batch,
            for gradient accumulation (default: this batch's).
    """
    if logp.shape[0] % 2:
        raise ValueError(f"Q-Adapter needs (chosen, rejected) row pairs, got {logp.shape[0]} rows")
    q = alpha * (logp + v) - alpha0 * base_logp  # (2N, T) Q(s_t, a_t)
    r = (q - gamma * alpha * v) * mask  # (2N, T) Q(s_t, a_t) - gamma V(s_t), the authors' per-token reward
    total = r.sum(-1)  # (2N,) R(y)
    z = total[0::2] - total[1::2]  # (N,)
    preference = -F.logsigmoid(z).sum() / (num_pairs or z.shape[0])
    chi = r.pow(2).sum() / (num_tokens or mask.sum().clamp(min=1))
    loss = preference + chi2 * chi if chi2 else preference
    with torch.no_grad():
        m = mask.sum().clamp(min=1)
        metrics = {"loss/preference": -F.logsigmoid(z).mean().item(),
                   "loss/chi2": (r.pow(2).sum() / m).item(),  # this micro-batch's own token mean
                   "rewards/chosen": total[0::2].mean().item(), "rewards/rejected": total[1::2].mean().item(),
                   "rewards/margin": z.mean().item(), "rewards/accuracy": (z > 0).float().mean().item(),
                   "q/q_mean": ((q * mask).sum() / m).item()}
    return loss, metrics
