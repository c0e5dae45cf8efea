"""Per-token log-probabilities and V(s_1) of a batch, recomputed from the model.

Logit-as-Q (method.md section 2): Q(s, a) = logit, V(s) = logsumexp_a logit,
log pi(a|s) = Q(s, a) - V(s). The loss needs, per trajectory, log pi of every response
token and V at the first response state. Both are computed from the hidden states one
chunk of positions at a time, so the full (B, T, V) float32 logits never exist at once
(a 150k vocabulary times 8K tokens would not fit); with gradients each chunk is
checkpointed so its logits are rebuilt during backward instead of being stored.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from reval.buffer import Batch


def _chunk_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()  # (B, C, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, C) = V(s)
    chosen = logits.gather(-1, targets[..., None])[..., 0]  # (B, C) = Q(s, a)
    return chosen - lse, lse


def sequence_logprobs(model, batch: Batch, chunk_size: int | None = None):
    """Return `(logp, v_first)`: (B, T-1) log pi of each target token, (B,) V(s_1).

    `logp` is zero outside `batch.response_mask`. `chunk_size` (positions) bounds the
    memory of the vocabulary projection; None projects the whole sequence at once.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = hidden[:, :-1]  # (B, T-1, D): position t predicts token t+1
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    step = chunk_size or hidden.shape[1]
    logps, lses = [], []
    for s in range(0, hidden.shape[1], step):
        args = (head, hidden[:, s:s + step], targets[:, s:s + step])
        if torch.is_grad_enabled() and chunk_size:
            lp, lse = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, lse = _chunk_stats(*args)
        logps.append(lp)
        lses.append(lse)
    logp = torch.cat(logps, 1) * batch.response_mask  # (B, T-1)
    v_first = torch.cat(lses, 1).gather(1, batch.first_index[:, None])[:, 0]  # (B,)
    return logp, v_first
