"""Per-token log-probabilities and V(s_1) of a batch, recomputed from the model.

Logit-as-Q (method.md section 2): Q(s, a) = logit, V(s) = logsumexp_a logit,
log pi(a|s) = Q(s, a) - V(s). The loss needs, per trajectory, log pi of every response
token and V at the first response state (the last prompt position).

Two ways through the decoder, the same numbers (to float rounding; tested):

- **shared prefix** (default): each distinct prompt of the batch runs once, and its KV
  cache is shared by the G answers to it; the answers then run on top of that cache.
  With G = 8 and prompts as long as answers, this does about half the work of running
  every (prompt, answer) pair in full, and the gradient still flows into the prompt's
  keys and values from every answer.
- **concatenated**: each row is prompt + answer in one sequence. Used with gradient
  checkpointing (Hugging Face models keep no KV cache while checkpointing).

Policy and reference must take the same path (and the same autocast) so that at
theta = ref the log-ratio is exactly 0.

The vocabulary projection runs `chunk_size` positions at a time, so the full (B, H, V)
float32 logits never exist at once (a 150k vocabulary times 8K tokens would not fit);
with gradients each chunk is checkpointed and its logits rebuilt during backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from reval.buffer import Batch
from reval.model import cache_argument


def _chunk_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()  # (B, C, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, C) = V(s)
    chosen = logits.gather(-1, targets[..., None])[..., 0]  # (B, C) = Q(s, a)
    return chosen - lse, lse


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens only (left padding does not shift them)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _shared_prefix_hidden(decoder, batch: Batch) -> torch.Tensor:
    """(B, H, D): the hidden state that predicts each response token, prompts run once."""
    out = decoder(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                  position_ids=_positions(batch.prompt_mask), use_cache=True)
    name = cache_argument(decoder)
    cache = out[name]
    cache.batch_select_indices(batch.prompt_index)  # (U, ...) -> (B, ...), differentiable
    first = out.last_hidden_state[batch.prompt_index, -1:]  # (B, 1, D): the last prompt token
    H = batch.response_ids.shape[1]
    if H == 1:
        return first
    response = batch.response_ids[:, :-1]  # the last response token predicts nothing
    attention = torch.cat([batch.prompt_mask[batch.prompt_index], batch.response_mask[:, :-1].long()], 1)
    positions = batch.prompt_lengths[:, None] + torch.arange(H - 1, device=response.device)
    rest = decoder(input_ids=response, attention_mask=attention, position_ids=positions, use_cache=False,
                   **{name: cache}).last_hidden_state  # (B, H-1, D)
    return torch.cat([first, rest], 1)


def _concatenated_hidden(decoder, batch: Batch) -> torch.Tensor:
    """(B, H, D) as above, each row run as prompt + answer in full."""
    P, H = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    ids = torch.cat([batch.prompt_ids[batch.prompt_index], batch.response_ids], 1)  # (B, P+H)
    mask = torch.cat([batch.prompt_mask[batch.prompt_index], batch.response_mask.long()], 1)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).last_hidden_state
    return hidden[:, P - 1: P + H - 1]  # position t predicts token t + 1


def sequence_logprobs(model, batch: Batch, chunk_size: int | None = None, shared_prefix: bool = True,
                      all_values: bool = False):
    """Return `(logp, v_first)`: (B, H) log pi of each response token, (B,) V(s_1).

    `logp` is zero outside `batch.response_mask`. `chunk_size` (positions) bounds the
    memory of the vocabulary projection; None projects every position at once. With
    `all_values` the second tensor is (B, H) V(s_h) at every response position (zero
    outside the mask), which IQ-Learn's temporal-difference term needs.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = (_shared_prefix_hidden if shared_prefix else _concatenated_hidden)(decoder, batch)
    targets = batch.response_ids  # (B, H)
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
    logp = torch.cat(logps, 1) * batch.response_mask  # (B, H)
    if all_values:
        return logp, torch.cat(lses, 1) * batch.response_mask  # (B, H) V(s_h)
    return logp, lses[0][:, 0]  # V(s_1): logsumexp at the position predicting the first token
