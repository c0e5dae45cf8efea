"""Latent actions (BWArea, arXiv 2405.17039; CoLA, arXiv 2503.21383): generation as decisions
among K learned codes instead of ~10^2-10^5 tokens.

Three parts, as in the papers (docs/latent.md):

- **world model** p(x_t+1 | x_<=t, z_t): the language model conditioned on a latent code. The
  LM's last hidden state h_t and the code's embedding c_z go through a merge module (two
  residual SwiGLU blocks over [h_t; c_z], the authors' count), then the LM's own head:
      logits_t = W_lm (h_t + merge(h_t, c_z))
  Decoding takes the world model's most likely token (`world_logits(...).argmax`), so the
  codes alone decide the text: the transitions of the code-level MDP are deterministic, which
  ReVal's telescoped residual needs (method.md section 2).
- **inverse dynamics** q(z_t | h_t, x_t+1): which code explains the token that came next. A
  small MLP of the LM state and the next token's embedding (the authors': 4 transformer blocks
  over the sequence). Trained jointly with the world model through straight-through
  Gumbel-softmax at temperature 2 (the authors' value): the forward pass uses a one-hot
  code, the backward pass the soft sample's gradient.
- **policy** pi(z_t | x_<=t): which code to play. Its own decoder, initialised from the world
  model's, with a head over the K codes instead of the vocabulary (the authors: 8 blocks on
  the LM's states). This keeps it a standard causal LM to the rest of the library: the loss's
  log-probs (`reval.logprobs`, shared-prefix KV cache, fused head), the reference copy, the
  reference reset and the optimiser all see an LM whose "tokens" are codes, and latent RL
  trains as many weights as token RL does.

`LatentActionModel` holds the three; to the training loop it is the policy (`forward`,
`get_decoder`, `get_output_embeddings` are the policy's), the world model and the inverse
dynamics are frozen (`requires_grad` False after loading), and `generate_latent` replaces
Hugging Face `generate`: at every step the policy samples a code and the world model writes
its token. The sampled codes travel with each answer (`Experience.action_ids`) and are what
the loss's log-probabilities are of.

On disk: the world model's HF `config.json` and `generation_config.json`, the tokenizer,
`latent.json` (K and the module sizes) and `latent.safetensors` (every weight);
`reval.model.load_model` recognises `latent.json`, so `reval eval`, `reval train` and
checkpoints work on it. Built by `reval pretrain --latent-codes K` (`pretrain_latent` below).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from reval.model import cache_argument

CONFIG, WEIGHTS = "latent.json", "latent.safetensors"
GUMBEL_TAU = 2.0  # the authors' straight-through Gumbel-softmax temperature


class SwiGLUBlock(torch.nn.Module):
    """x + W_down(silu(W_gate [x; c]) * W_up [x; c]); W_down starts at zero (the block starts as
    the identity, so the world model starts as the LM it was built from)."""

    def __init__(self, dim: int, cond: int, hidden: int):
        super().__init__()
        self.gate = torch.nn.Linear(dim + cond, hidden, bias=False)
        self.up = torch.nn.Linear(dim + cond, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        torch.nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        u = torch.cat([x, c], -1)
        return x + self.down(F.silu(self.gate(u)) * self.up(u))


class LatentActionModel(torch.nn.Module):
    def __init__(self, world, policy, codes: int = 64, merge_hidden: int | None = None, idm_hidden: int | None = None,
                 idm_embed: int = 64):
        super().__init__()
        D, V = world.config.hidden_size, world.config.vocab_size
        merge_hidden, idm_hidden = merge_hidden or 2 * D, idm_hidden or 2 * D  # default: twice the LM's width
        self.world, self.policy = world, policy  # HF causal LMs; the policy's head is (K, D)
        self.codes, self.merge_hidden, self.idm_hidden, self.idm_embed = codes, merge_hidden, idm_hidden, idm_embed
        self.code_embed = torch.nn.Embedding(codes, D)
        self.merge = torch.nn.ModuleList([SwiGLUBlock(D, D, merge_hidden) for _ in range(2)])
        self.idm_token = torch.nn.Embedding(V, idm_embed)
        self.idm = torch.nn.Sequential(torch.nn.Linear(D + idm_embed, idm_hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(idm_hidden, codes))

    # --- what the training loop sees: the policy, an LM over codes ---
    @property
    def config(self):
        return self.policy.config

    @property
    def generation_config(self):
        return self.world.generation_config

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def get_decoder(self):
        return self.policy.get_decoder()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    FROZEN = ("world", "code_embed", "merge", "idm_token", "idm")  # what RL never changes

    def freeze_world(self) -> "LatentActionModel":
        """RL trains the policy only: the world model, its codes and the inverse dynamics stay fixed."""
        for name in self.FROZEN:
            getattr(self, name).requires_grad_(False)
        return self

    # --- the world model and the inverse dynamics ---
    def world_logits(self, hidden: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """(..., V) next-token logits from the LM state (..., D) and a code: ids (...) or one-hot (..., K)."""
        c = code.to(self.code_embed.weight.dtype) @ self.code_embed.weight if code.is_floating_point() \
            else self.code_embed(code)
        x = hidden
        for block in self.merge:
            x = block(x, c)
        return self.world.get_output_embeddings()(x).float()

    def idm_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """(..., K) inverse dynamics: which code explains `next_ids` (...) after state `hidden` (..., D)."""
        return self.idm(torch.cat([hidden, self.idm_token(next_ids)], -1)).float()

    def world_states(self, batch) -> torch.Tensor:
        """(B, H, D) the world model's state before each answer token of a collated `Batch`."""
        from reval.logprobs import _shared_prefix_hidden

        return _shared_prefix_hidden(self.world.get_decoder(), batch)

    @torch.no_grad()
    def infer_codes(self, batch) -> torch.Tensor:
        """(B, H) the inverse dynamics' most likely code behind each answer token (0 on padding)."""
        codes = self.idm_logits(self.world_states(batch), batch.response_ids).argmax(-1)
        return codes * batch.response_mask.long()

    def save_pretrained(self, directory, state_dict: dict | None = None, **_) -> None:
        """The world model's HF config, `latent.json` and every weight in `latent.safetensors`."""
        from safetensors.torch import save_model

        if state_dict is not None:
            raise ValueError("a latent-action model is saved whole (it does not train sharded)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.world.config.save_pretrained(directory)
        self.world.generation_config.save_pretrained(directory)
        (directory / CONFIG).write_text(json.dumps(self.sizes(), indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS))  # tied tensors stored once

    def sizes(self) -> dict:
        return {"codes": self.codes, "merge_hidden": self.merge_hidden, "idm_hidden": self.idm_hidden,
                "idm_embed": self.idm_embed}


def code_policy(world, codes: int):
    """A copy of `world` whose head scores the K codes: a causal LM over codes."""
    policy = copy.deepcopy(world).requires_grad_(True)
    D = world.config.hidden_size
    head = torch.nn.Linear(D, codes, bias=False).to(device=world.device, dtype=world.dtype)
    torch.nn.init.normal_(head.weight, std=0.02)
    policy.set_output_embeddings(head)
    policy.config.tie_word_embeddings = False  # the input embeddings stay the vocabulary's
    return policy


def build_latent(world, codes: int = 64, **sizes) -> LatentActionModel:
    """A latent-action model around the causal LM `world` (taken over, not copied); the policy
    starts as a copy of it with a fresh head over `codes` codes."""
    if codes < 2:
        raise ValueError(f"a latent action space needs at least 2 codes, got {codes}")
    model = LatentActionModel(world, code_policy(world, codes), codes, **sizes)
    return model.to(device=world.device, dtype=world.dtype)


def share_frozen(replica, model):
    """`replica` (a reference or a stale sampler of a latent `model`) takes `model`'s frozen world
    model, codes and inverse dynamics instead of holding its own: only the policy is copied. The
    weights are equal (both frozen from the same start), so nothing it computes changes; a
    non-latent pair is returned as it is."""
    if is_latent(replica) and is_latent(model):
        for name in LatentActionModel.FROZEN:
            setattr(replica, name, getattr(model, name))
    return replica


def copy_of(model):
    """A deep copy of `model`; of a latent model only its policy is copied (`share_frozen`), without
    ever holding a second world model in memory."""
    frozen = [getattr(model, name) for name in LatentActionModel.FROZEN] if is_latent(model) else []
    return copy.deepcopy(model, memo={id(m): m for m in frozen})


def is_latent(model) -> bool:
    return isinstance(model, LatentActionModel)


def load_latent(directory, dtype: torch.dtype = torch.float32) -> LatentActionModel:
    """The model `save_pretrained` wrote, its world model and inverse dynamics frozen."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    try:
        sizes = json.loads((directory / CONFIG).read_text())
        world = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
        if (directory / "generation_config.json").is_file():
            world.generation_config = GenerationConfig.from_pretrained(directory)
        model = build_latent(world, int(sizes.pop("codes")), **{k: int(v) for k, v in sizes.items()})
        missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
        if missing or unexpected:
            raise KeyError(f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise OSError(f"{directory}: the latent-action model ({CONFIG}, {WEIGHTS}) is unreadable "
                      f"({type(e).__name__}: {e}); build it again with reval pretrain --latent-codes") from None
    return model.freeze_world().eval()


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(N, K) logits with everything outside the smallest set of probability >= top_p at -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    outside = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) >= top_p  # (N, K)
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


@torch.no_grad()
def generate_latent(model: LatentActionModel, tokenizer, prompts: list[str], *, samples_per_prompt: int = 1,
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64, greedy: bool = False,
                    return_logprobs: bool = False, eos_token_ids: list[int] | None = None, codes=None, **_):
    """`reval.rollout.generate` for a latent-action model: each step the policy samples a code
    (temperature / top-p over the K codes; greedy: the most likely) and the world model writes
    its most likely token given it. Returns `Samples` whose `actions` are the codes played.

    `codes` (N, T) plays these codes instead of the policy's (decoding inferred codes, tests)."""
    from reval.rollout import Samples

    eos = torch.tensor(sorted(set(eos_token_ids or [tokenizer.eos_token_id])), device=model.device)
    was_training = model.training
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    G = samples_per_prompt
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (N / G, P): each prompt is prefilled once
    decoders = (model.policy.get_decoder(), model.world.get_decoder())
    name = cache_argument(decoders[0])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [d(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True) for d in decoders]
    caches = [o[name] for o in outs]
    for cache in caches:  # then its KV cache is shared by its G answers
        cache.batch_repeat_interleave(G)
    h_pol, h_world = (o.last_hidden_state[:, -1].repeat_interleave(G, 0) for o in outs)  # (N, D) each
    mask, pos = mask.repeat_interleave(G, 0), positions[:, -1].repeat_interleave(G, 0)
    N = mask.shape[0]
    tokens, actions, logps = [], [], []
    done = torch.zeros(N, dtype=torch.bool, device=ids.device)
    policy_head = model.policy.get_output_embeddings()
    for t in range(max_new_tokens):
        code_logits = policy_head(h_pol).float()  # (N, K)
        if codes is not None:
            z = codes[:, t] if t < codes.shape[1] else torch.zeros(N, dtype=torch.long, device=ids.device)
        elif greedy:
            z = code_logits.argmax(-1)
        else:
            probs = _top_p(code_logits / temperature, top_p).softmax(-1)
            z = torch.multinomial(probs, 1)[:, 0]  # (N,) torch's global RNG, seeded by the loop
        tok = model.world_logits(h_world, z).argmax(-1)  # (N,) the world model's token for the code
        tok = torch.where(done, tokenizer.pad_token_id, tok)
        tokens.append(tok)
        actions.append(z)
        if return_logprobs:  # raw code log-probs of the policy, before temperature / top-p
            logps.append(code_logits.log_softmax(-1).gather(-1, z[:, None])[:, 0])
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        outs = [d(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                  **{name: c}) for d, c in zip(decoders, caches)]
        h_pol, h_world = (o.last_hidden_state[:, -1] for o in outs)
    model.train(was_training)
    seqs, acts = torch.stack(tokens, 1).tolist(), torch.stack(actions, 1).tolist()  # (N, T)
    lps = torch.stack(logps, 1).tolist() if return_logprobs else None
    eos_set = set(eos.tolist())
    plain = [[t for t, m in zip(row, mk) if m] for row, mk in
             zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())]
    out = Samples([], [], [], [] if return_logprobs else None, actions=[])
    for i, seq in enumerate(seqs):
        eos_at = next((j for j, t in enumerate(seq) if t in eos_set), None)
        cut = len(seq) if eos_at is None else eos_at + 1
        out.prompt_ids.append(plain[i // G])
        out.response_ids.append(seq[:cut])
        out.actions.append(acts[i][:cut])
        out.truncated.append(eos_at is None)
        if lps is not None:
            out.logprobs.append(lps[i][:cut])
    return out


def reconstruction(model: LatentActionModel, batch) -> dict:
    """How well the inferred codes reproduce the text of a collated `Batch` (teacher-forced):
    token accuracy (the world model's token for the inferred code is the next token), the share
    of answers reproduced exactly, the codes used and the codes' perplexity."""
    with torch.no_grad():
        h = model.world_states(batch)  # (B, H, D)
        codes = model.idm_logits(h, batch.response_ids).argmax(-1)  # (B, H)
        right = (model.world_logits(h, codes).argmax(-1) == batch.response_ids).float() * batch.response_mask
        m = batch.response_mask.bool()
        used = torch.bincount(codes[m], minlength=model.codes).float()
        p = used / used.sum()
        return {"token_accuracy": (right.sum() / batch.response_mask.sum()).item(),
                "exact": (right.sum(1) == batch.response_mask.sum(1)).float().mean().item(),
                "codes_used": int((used > 0).sum()),
                "code_perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))}


def world_loss(model: LatentActionModel, batch, tau: float = GUMBEL_TAU,
               usage: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Stage 1: the world model's token NLL given the code the inverse dynamics infers, sampled with
    straight-through Gumbel-softmax (one-hot forward, soft gradient), token mean over the answers;
    plus `usage` x (log K - the entropy of the batch's mean code distribution), which keeps codes
    from going unused (ours; 0: off)."""
    h = model.world_states(batch)  # (B, H, D)
    logits_z = model.idm_logits(h, batch.response_ids)  # (B, H, K)
    z = F.gumbel_softmax(logits_z, tau=tau, hard=True)  # (B, H, K)
    logits = model.world_logits(h, z)  # (B, H, V)
    nll = F.cross_entropy(logits.transpose(1, 2), batch.response_ids, reduction="none")  # (B, H)
    m = batch.response_mask
    nll = (nll * m).sum() / m.sum()
    mean_q = (logits_z.softmax(-1) * m[..., None]).sum((0, 1)) / m.sum()  # (K,)
    spread = math.log(model.codes) + (mean_q * mean_q.clamp(min=1e-12).log()).sum()  # >= 0, 0: all codes alike
    loss = nll + usage * spread if usage else nll
    return loss, {"loss/world_nll": nll.item(), "loss/code_usage_gap": spread.item()}


def policy_loss(model: LatentActionModel, batch, codes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Stage 2: behaviour cloning of the inferred codes (B, H), token mean over the answers."""
    from reval.logprobs import sequence_logprobs

    logp, _ = sequence_logprobs(model, _with_actions(batch, codes))
    loss = -logp.sum() / batch.response_mask.sum()
    return loss, {"loss/policy_nll": loss.item()}


def _with_actions(batch, codes: torch.Tensor):
    from dataclasses import replace

    return replace(batch, action_ids=codes)
