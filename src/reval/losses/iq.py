"""IQ-Learn for language (arXiv 2409.01369): maximum likelihood plus a temporal-difference term.

With the logits as the soft Q-function (Q(s, a) = logit, V(s) = logsumexp_a Q(s, a),
log pi(a|s) = Q(s, a) - V(s); method.md section 2), the chi-squared-regularised inverse
soft-Q objective of IQ-Learn, estimated on the demonstrations only (offline), is

    J = E[ (Q(s_t, a_t) - gamma V(s_t+1)) - (V(s_t) - gamma V(s_t+1)) ] - 1/(4 alpha) E[ r_t^2 ]
      = E[ log pi(a_t|s_t) ] - lambda E[ r_t^2 ],     r_t = Q(s_t, a_t) - gamma V(s_t+1),  lambda = 1/(4 alpha)

where r_t is the per-token reward the Q-function implies. We minimise the token mean

    L = - mean_t log pi(a_t|s_t) + lambda mean_t r_t^2

over every demonstration token. lambda = 0 is exactly MLE (`mle_loss`), loss and gradient.
The state after the last token of a finished demonstration (it ends with EOS) is terminal:
V(s_T+1) = 0, so r_T = Q(s_T, a_T). A demonstration cut before its EOS (`truncated`) has no
known next state after its last token, so that token carries no TD term (its likelihood
still counts).
"""

from __future__ import annotations

import torch


def mle_loss(logp: torch.Tensor, mask: torch.Tensor, *,
             num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Token-mean negative log-likelihood of the demonstrations: the usual SFT loss.

    Args:
        logp: (B, T) log pi_theta of each demonstration token (with grad).
        mask: (B, T) 1 on response tokens.
        num_tokens: response tokens in the whole optimisation batch, for gradient
            accumulation (defaults to mask.sum()).
    """
    n = num_tokens or mask.sum().clamp(min=1)
    nll = -(logp * mask).sum() / n
    with torch.no_grad():  # this micro-batch's own token mean (`update` averages micro-batches)
        metric = -(logp * mask).sum() / mask.sum().clamp(min=1)
    return nll, {"loss/nll": metric.item()}


def iq_loss(logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, iq_lambda: float,
            gamma: float = 1.0, truncated: torch.Tensor | None = None,
            num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """IQ-Learn loss (MLE + lambda * mean squared implied reward) and metrics.

    Args:
        logp: (B, T) log pi_theta(a_t|s_t) of each demonstration token (with grad).
        v: (B, T) V_theta(s_t) = logsumexp of the logits that predict token t, zero
            outside `mask` (`sequence_logprobs(..., all_values=True)`).
        mask: (B, T) 1 on response tokens (right-padded: real tokens come first).
        iq_lambda: weight of the TD term, 1/(4 alpha) of IQ-Learn's chi-squared regulariser.
        gamma: discount of V(s_t+1).
        truncated: (B,) bool, rows whose last token is not terminal (None: all terminal).
        num_tokens: as in `mle_loss`.
    """
    n = num_tokens or mask.sum().clamp(min=1)
    q = logp + v  # (B, T) Q(s_t, a_t)
    # (B, T) V(s_t+1): 0 after the last real token (masked, so whatever v holds on padding)
    v_next = torch.cat([(v * mask)[:, 1:], torch.zeros_like(v[:, :1])], 1)
    reward = q - gamma * v_next  # (B, T) r_t, implied per-token reward
    td_mask = mask
    if truncated is not None and bool(truncated.any()):
        last = mask.sum(1).long() - 1  # (B,) index of each row's last real token
        td_mask = mask.clone()
        rows = truncated.nonzero()[:, 0]
        td_mask[rows, last[rows]] = 0.0  # unknown next state: no TD term
    nll = -(logp * mask).sum() / n
    td = (reward.pow(2) * td_mask).sum() / n
    loss = nll + iq_lambda * td if iq_lambda else nll
    with torch.no_grad():  # this micro-batch's own token means (`update` averages micro-batches)
        m = mask.sum().clamp(min=1)
        metrics = {"loss/nll": (-(logp * mask).sum() / m).item(),
                   "loss/td": ((reward.pow(2) * td_mask).sum() / m).item(),
                   "q/reward_mean": ((reward * mask).sum() / m).item(),
                   "q/v_mean": ((v * mask).sum() / m).item()}
    return loss, metrics
