"""DPO (arXiv 2305.18290), read as a token-level soft Q-function (arXiv 2404.12358).

For a preference pair (x, y_w chosen, y_l rejected), with the log-ratio of a whole answer
to the reference

    h(y) = sum_t [log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)]
    z    = beta (h(y_w) - h(y_l))
    L    = mean_pairs [ -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) ]      (eps: label smoothing)

"From r to Q*" shows that beta h(y) is the sum of the per-token rewards that the logits,
read as the optimal soft Q-function of a KL-regularised problem, imply (their V(s_1)
terms cancel between two answers to the same prompt), so DPO trains the same
logit-as-Q object as ReVal, from preferences instead of a verifier. With eps = 0 this is
TRL's `DPOTrainer` default (`loss_type="sigmoid"`); a test checks the value against it.

Rows come in pairs: row 2i is the chosen answer of pair i, row 2i + 1 its rejected one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0, num_pairs: int | None = None) -> tuple[torch.Tensor, dict]:
    """DPO loss and metrics.

    Args:
        logp, ref_logp: (2N, T) log pi_theta / log pi_ref of each answer token; rows
            (2i, 2i + 1) are (chosen, rejected) of pair i.
        mask: (2N, T) 1 on answer tokens.
        beta: KL strength (TRL's default is 0.1).
        label_smoothing: eps, the assumed probability that a preference label is flipped.
        num_pairs: pairs in the whole optimisation batch, for gradient accumulation
            (defaults to N).
    """
    if logp.shape[0] % 2:
        raise ValueError(f"DPO needs (chosen, rejected) row pairs, got {logp.shape[0]} rows")
    h = ((logp - ref_logp) * mask).sum(-1)  # (2N,)
    chosen, rejected = h[0::2], h[1::2]  # (N,), (N,)
    z = beta * (chosen - rejected)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = per_pair.sum() / (num_pairs or z.shape[0])
    with torch.no_grad():
        metrics = {"loss/dpo": per_pair.mean().item(),
                   "rewards/chosen": (beta * chosen).mean().item(),
                   "rewards/rejected": (beta * rejected).mean().item(),
                   "rewards/margin": z.mean().item(),
                   "rewards/accuracy": (z > 0).float().mean().item()}
    return loss, metrics
