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
float32 logits never exist at once (a 150k vocabulary times 8K tokens would not fit):

- **fused** (`fused_logprobs`, used whenever `chunk_size` is set and the head allows it):
  one autograd function whose forward keeps only log pi(a_t|s_t) and V(s_t), (B, H) each,
  and whose backward rebuilds each chunk's (B, C, V) logits and turns them in place into
  their gradient, softmax * (dV - dlogp) + onehot(a_t) * dlogp, before projecting it onto
  the hidden states (B, C, D) and adding it to the head weight's (V, D) fp32 gradient.
  At most one chunk's float32 logits are alive (under bf16 autocast also their bf16 copy,
  a bf16 copy of the weight and one chunk's (V, D) bf16 weight gradient). Log-probs and V
  are bit-identical to the checkpointed path. Gradients: the hidden states' agree to
  1e-6 relative (equal in the tests); the head weight's to 1e-7 in fp32, and under bf16 autocast to bf16
  rounding, because the checkpointed path adds the chunks' bf16 weight gradients in bf16
  (autocast casts the weight once for all chunks) where this one adds them in fp32.
  CPU, 1 x 2,048 tokens, 151,936 vocabulary, forward + backward: +0.21 GiB at chunk 256
  (0.047x of HF's `.logits` path, 1.4x one chunk's logits), against +0.77 GiB checkpointed
  (benchmarks/logprob_memory.py).
- **checkpointed** (`_chunk_stats` under `torch.utils.checkpoint`): any other head. It
  peaks at about 5x a chunk's logits (the rebuilt logits, logsumexp's backward
  temporaries, the gather's scatter), but calls the head module itself, which the fused
  path does not: a peft LoRA layer on the head, Q-Adapter's residual head (`reval.qhead`),
  a head whose weight FSDP2 or ZeRO-3 gathers in a module hook, or a DTensor weight.
  (peft's "all-linear" leaves the head a plain Linear, so LoRA training is fused.)

`chunk_size=None` projects every position at once through the head module.

GPU kernels for fused linear cross-entropy are not used. Cut Cross-Entropy
(`linear_cross_entropy(reduction="none")`) and Liger Kernel
(`LigerFusedLinearCrossEntropyFunction`) return the per-token loss -log pi(a|s) but not
V(s) with its own gradient; V could be rebuilt as loss + the chosen logit from a second
gather, with other rounding than the kernel's. Worse for this loss: CCE merges the
vocabulary blocks' logsumexp under a spin lock in arbitrary order (the policy's and the
reference's log-probs would not be bit-equal at theta = ref), and Liger's per-token
gradients were silently wrong with reduction="none" until PR #1298 (2026). The fused
path above already holds the memory to one chunk; a kernel would mainly save time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from reval.buffer import Batch
from reval.model import cache_argument


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """(...) logsumexp over the last dim, overwriting `logits` (..., V) with exp(logits - max).

    The same operations as torch.logsumexp (ATen's composite: amax, infinite maxima set to
    0, exp of the shifted logits, sum, log, + max), so the result is bit-identical, without
    its (..., V) temporary."""
    m = logits.amax(-1, keepdim=True)  # (..., 1)
    m.masked_fill_(m.abs() == float("inf"), 0)
    return logits.sub_(m).exp_().sum(-1).log_().add_(m[..., 0])


def _cast(dtype: torch.dtype | None, *tensors):
    """The head's operands as autocast hands them to the matmul (`dtype` None: unchanged)."""
    return [t if t is None or dtype is None else t.to(dtype) for t in tensors]


def _fused_forward(hidden, weight, bias, targets, chunk: int):
    """(B, H) log pi(a_t|s_t) and (B, H) V(s_t), one (B, C, V) chunk of logits at a time.

    `weight`, `bias` are already in the matmul's dtype; each chunk's logits are computed
    and rounded exactly as `_chunk_stats` computes them (the head, then `.float()`)."""
    B, H = targets.shape
    logp = hidden.new_empty((B, H), dtype=torch.float32)
    lse = torch.empty_like(logp)
    for s in range(0, H, chunk):
        h = hidden[:, s:s + chunk].to(weight.dtype)  # (B, C, D)
        logits = torch.nn.functional.linear(h, weight, bias).float()  # (B, C, V)
        chosen = logits.gather(-1, targets[:, s:s + chunk, None])[..., 0]  # (B, C) = Q(s, a)
        lse[:, s:s + chunk] = _logsumexp_(logits)  # logits are spent after this
        logp[:, s:s + chunk] = chosen - lse[:, s:s + chunk]
        del logits  # before the next chunk's matmul, or two chunks are alive
    return logp, lse


class _FusedLogProbs(torch.autograd.Function):
    """(logp, lse) of `_fused_forward`, with a backward that never holds more than one chunk
    of logits: it rebuilds them and overwrites them with their own gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(dtype, weight, bias)
            logp, lse = _fused_forward(hidden, w, b, targets, chunk)
        # the cast weight is not kept (V x D): backward casts it again
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return logp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_lse):  # (B, H) each; zero where the loss does not look
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 sums over chunks (Linear's backward under autocast also returns each chunk's
        # bf16 gradient to the fp32 weight, where autograd adds them in fp32)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        coef = g_lse - g_logp  # (B, H): every logit's softmax weight; the chosen one adds g_logp
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _cast(ctx.dtype, weight, bias)
            for s in range(0, targets.shape[1], chunk):
                h = hidden[:, s:s + chunk].to(w.dtype)  # (B, C, D)
                g = torch.nn.functional.linear(h, w, b).float()  # (B, C, V) logits again, then in place:
                g.sub_(lse[:, s:s + chunk, None]).exp_()  # softmax, as logsumexp's backward forms it
                g.mul_(coef[:, s:s + chunk, None])
                g.scatter_add_(-1, targets[:, s:s + chunk, None], g_logp[:, s:s + chunk, None])
                g = g.to(w.dtype)  # (B, C, V) d loss / d logits, in the matmul's dtype
                if need_h:
                    grad_h[:, s:s + chunk] = g @ w  # (B, C, D)
                flat = g.flatten(0, 1)  # (B*C, V)
                if need_w and flat.dtype == torch.float32:
                    grad_w.addmm_(flat.T, h.flatten(0, 1))  # (V, D), no (V, D) temporary
                elif need_w:
                    grad_w.add_(flat.T @ h.flatten(0, 1))  # a (V, D) bf16 chunk sum, added in fp32
                if need_b:
                    grad_b.add_(flat.sum(0))
                del g, flat  # before the next chunk's matmul
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H) log pi(a_t|s_t) and (B, H) V(s_t) = logsumexp of `hidden @ weight.T + bias`.

    hidden (B, H, D), weight (V, D), bias (V,) or None, targets (B, H) token ids. Under
    autocast the matmul runs in the autocast dtype, as the head module's would. A tied
    weight (the input embedding) receives this gradient once, through autograd, next to
    the embedding's own. Without gradients nothing is saved.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _FusedLogProbs.apply(hidden, weight, bias, targets, chunk_size, dtype)
    with torch.autocast(device, enabled=False):
        return _fused_forward(hidden, *_cast(dtype, weight, bias), targets, chunk_size)


def _fusable(head, hidden: torch.Tensor) -> bool:
    """Whether `fused_logprobs` computes what `head(hidden)` computes: a plain Linear (not a
    peft LoRA layer, the Q-Adapter head or an FSDP2-wrapped class), no hooks or replaced
    forward that gather or move its weight first (ZeRO-3, accelerate offload), and an
    ordinary full weight here (not a DTensor shard or a ZeRO-3 placeholder)."""
    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and not (head._forward_pre_hooks or head._forward_hooks)
            and "forward" not in vars(head) and type(w) in (torch.Tensor, torch.nn.Parameter)
            and w.shape == (head.out_features, hidden.shape[-1]) and w.device == hidden.device)


def _chunk_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()  # (B, C, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, C) = V(s)
    chosen = logits.gather(-1, targets[..., None])[..., 0]  # (B, C) = Q(s, a)
    return chosen - lse, lse


def _checkpointed_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None):
    """(B, H) log pi(a_t|s_t) and (B, H) V(s_t) through the head module itself, `chunk_size`
    positions at a time (None: all at once), each chunk checkpointed when there are gradients."""
    step = chunk_size or hidden.shape[1]
    stats = []
    for s in range(0, hidden.shape[1], step):
        args = (head, hidden[:, s:s + step], targets[:, s:s + step])
        if torch.is_grad_enabled() and chunk_size:
            stats.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            stats.append(_chunk_stats(*args))
    logps, lses = zip(*stats)
    return torch.cat(logps, 1), torch.cat(lses, 1)


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
                      all_values: bool = False, fused: bool = True):
    """Return `(logp, v_first)`: (B, H) log pi of each response token, (B,) V(s_1).

    `logp` is zero outside `batch.response_mask`. `chunk_size` (positions) bounds the
    memory of the vocabulary projection; None projects every position at once. With
    `all_values` the second tensor is (B, H) V(s_h) at every response position (zero
    outside the mask), which IQ-Learn's temporal-difference term needs. `fused=False`
    keeps the checkpointed chunks even where the fused head applies (benchmarks, tests).
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = (_shared_prefix_hidden if shared_prefix else _concatenated_hidden)(decoder, batch)
    # (B, H) the actions: the tokens, or the latent codes played (the policy's head scores the codes)
    targets = batch.response_ids if batch.action_ids is None else batch.action_ids
    if chunk_size and fused and _fusable(head, hidden):
        logp, lse = fused_logprobs(hidden, head.weight, head.bias, targets, chunk_size)  # (B, H) each
    else:
        logp, lse = _checkpointed_logprobs(head, hidden, targets, chunk_size)
    logp = logp * batch.response_mask
    if all_values:
        return logp, lse * batch.response_mask  # (B, H) V(s_h)
    return logp, lse[:, 0]  # V(s_1): logsumexp at the position predicting the first token
