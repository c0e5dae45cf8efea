"""Dual Q-DM (arXiv 2603.22713): IQ-Learn's distribution matching plus Bellman constraints.

Notation of method.md section 2 and docs/iq.md: Q(s, a) = logit, V(s) = logsumexp_a Q(s, a),
log pi(a|s) = Q(s, a) - V(s), s_t = prompt plus the tokens before a_t, V = 0 after EOS, and the
reward the Q-function implies for a token, r_t = Q(s_t, a_t) - gamma V(s_t+1). A round holds,
for each prompt, a demonstration y^E and G of the policy's own sampled answers y^pi. The loss,
every term a sum over tokens divided by one normaliser N (the demonstrations' tokens in the
whole batch), is

    L = - 1/N sum_{t in y^E} r_t                                          (1) demonstrations' reward up
        + 1/N sum_{y in y^E, y^pi} w_y sum_t [V(s_t) - gamma V(s_t+1)]     (2) value of every answer's states down
        + rho/N sum_{t in y^E, y^pi} [relu(r_lo - r~_t)^2 + relu(r~_t - r_hi)^2]   (3) Bellman constraint

with r~_t = Q(s_t, a_t) - gamma sg(V(s_t+1)) (the next state's value held fixed, as in the
authors' code) and w_y = 1/2 for a demonstration and 1/(2G) for each sample: the value term
is over a batch that is half demonstrations, half the policy's answers. (1) + (2) is IQ-Learn's
online objective with the total-variation divergence. At gamma = 1 it telescopes to
-1/N sum log pi(y^E | x): exactly maximum likelihood, whatever the policy sampled (the
paper's "IQ-Learn reduces to behaviour cloning"). The sampled answers then enter only through
(3), which keeps every implied reward, of demonstrated and sampled tokens alike, inside
[r_lo, r_hi]: a sampled token the model finds very unlikely has its Q raised towards r_lo
instead of being pushed down without bound. rho = 0 is IQ-Learn (and MLE at gamma = 1).

A token whose next state is unknown (the last one of an answer cut before its EOS, `truncated`)
has no r_t: it is left out of (1) and (3). The value term (2) takes every token of every answer,
with V = 0 after its last: at gamma = 1 an answer's value steps telescope to V(s_1), as a cut
answer's unseen continuation would too, so rho = 0 is MLE whatever the policy sampled. The last token of a finished answer (EOS) has
r_T = Q(s_T, EOS), the state's absolute logit level, which a softmax leaves free; it is boxed
only with `box_terminal` (docs/dualqdm.md, choice 4).
"""

from __future__ import annotations

import torch


def dualqdm_loss(logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, expert: torch.Tensor,
                 value_weight: torch.Tensor, *, rho: float, r_min: float, r_max: float, gamma: float = 1.0,
                 box_terminal: bool = False, truncated: torch.Tensor | None = None,
                 num_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Dual Q-DM loss and metrics.

    Args:
        logp: (B, T) log pi_theta(a_t|s_t) of each answer token (with grad).
        v: (B, T) V_theta(s_t) at every answer position (`sequence_logprobs(..., all_values=True)`).
        mask: (B, T) 1 on answer tokens (right-padded).
        expert: (B,) bool, True for a demonstration row, False for a sampled answer.
        value_weight: (B,) w_y of each row in the value term (1/2; 1/(2G) for each of G samples).
        rho: weight of the Bellman-constraint penalty (0: IQ-Learn).
        r_min, r_max: the box [r_lo, r_hi] every implied reward is held in.
        gamma: discount of V(s_t+1).
        box_terminal: also box r_T = Q(s_T, EOS) of a finished answer.
        truncated: (B,) bool, rows whose last token is not terminal (None: all terminal).
        num_tokens: N, the demonstrations' tokens in the whole optimisation batch (defaults to
            this micro-batch's), so gradient accumulation gives the full-batch gradient.
    """
    e = expert.to(mask.dtype)[:, None]  # (B, 1)
    n = num_tokens or (mask * e).sum().clamp(min=1)
    q = logp + v  # (B, T) Q(s_t, a_t)
    v_next = torch.cat([(v * mask)[:, 1:], torch.zeros_like(v[:, :1])], 1)  # (B, T) V(s_t+1), 0 after the end
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) each row's last answer token
    rows = torch.arange(mask.shape[0], device=mask.device)
    known = mask.clone()  # tokens whose next state is known
    if truncated is not None and bool(truncated.any()):
        known[rows[truncated], last[truncated]] = 0.0
    reward = q - gamma * v_next  # (B, T) r_t
    expert_term = -(reward * known * e).sum() / n
    # every token, cut or not: at gamma = 1 each answer's value steps telescope to V(s_1), as the
    # unseen continuation of a cut answer would too
    value_term = (value_weight.to(v.dtype)[:, None] * (v - gamma * v_next) * mask).sum() / n
    loss = expert_term + value_term
    boxed = known
    if not box_terminal:  # the EOS token of a finished answer: its r_T is the state's free logit level
        boxed = known.clone()
        finished = mask.sum(1) > 0
        if truncated is not None:
            finished = finished & ~truncated
        boxed[rows[finished], last[finished]] = 0.0
    r_box = q - gamma * v_next.detach()
    violation = (torch.relu(r_min - r_box).pow(2) + torch.relu(r_box - r_max).pow(2)) * boxed
    penalty = violation.sum() / n
    if rho:
        loss = loss + rho * penalty
    with torch.no_grad():  # this micro-batch's own means (`update` averages micro-batches)
        p = 1.0 - e
        outside = ((r_box < r_min) | (r_box > r_max)).to(mask.dtype) * boxed
        metrics = {"loss/nll": (-(logp * mask * e).sum() / (mask * e).sum().clamp(min=1)).item(),
                   "loss/bellman": (violation.sum() / boxed.sum().clamp(min=1)).item(),
                   "q/reward_expert": ((reward * known * e).sum() / (known * e).sum().clamp(min=1)).item(),
                   "q/reward_policy": ((reward * known * p).sum() / (known * p).sum().clamp(min=1)).item(),
                   "q/outside_box_expert": ((outside * e).sum() / (boxed * e).sum().clamp(min=1)).item(),
                   "q/outside_box_policy": ((outside * p).sum() / (boxed * p).sum().clamp(min=1)).item(),
                   "q/v_mean": ((v * mask).sum() / mask.sum().clamp(min=1)).item()}
    return loss, metrics
