"""Replay buffer and collation: `Experience` records in, padded `Batch` tensors out.

The buffer is a FIFO ring of capacity M with uniform sampling (method.md section 6), or,
beyond the paper, prioritised or age-decayed sampling (`buffer.sampling`, docs/replay.md). It stores what the sampler produced (token ids, rewards, group statistics, versions),
never the policy's log-probabilities: those are recomputed under the current policy at
every update. (The reference's, which only change at a reference reset, are cached
separately, tagged with the reference version: `reval.reference.RefCache`.)
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from reval.rollout import Experience


SAMPLING = ("uniform", "residual", "variance", "recency")


class ReplayBuffer:
    """FIFO buffer of trajectories; the oldest are evicted first once `capacity` is hit.

    `draw` samples a batch by `sampling`:
      uniform   every stored answer alike, without replacement (the paper);
      residual  prioritised replay (Schaul et al., 2016): P(i) ~ (|delta_i| + eps)^alpha, delta_i the
                answer's soft Bellman residual at its last use (a new answer gets the largest priority
                seen, so it is drawn soon); `update_priorities` writes them back after each update;
      variance  P(i) ~ (std of its group's rewards + eps)^alpha: answers from groups that disagree;
      recency   P(i) ~ 2^(-age_i / half_life), age in rounds behind the newest stored answer: a replay
                ratio that falls with staleness.
    The non-uniform schemes draw with replacement, so P(i) is exact and each drawn answer gets the
    importance weight w_i = (N P(i))^-correction / max_j (N P(j))^-correction (<= 1), which the loss
    multiplies its squared residual by: correction 1 removes the sampling bias, 0 keeps it.
    """

    def __init__(self, capacity: int, sampling: str = "uniform", alpha: float = 0.6, correction: float = 0.4,
                 half_life: float = 5.0, eps: float = 0.01):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if sampling not in SAMPLING:
            raise ValueError(f"buffer sampling must be one of {SAMPLING}, got {sampling!r}")
        self.capacity = capacity
        self.sampling, self.alpha, self.correction, self.half_life, self.eps = \
            sampling, alpha, correction, half_life, eps
        self._items: deque[Experience] = deque(maxlen=capacity)
        self._residual: dict[int, float] = {}  # uid -> |delta| at its last use (sampling "residual")

    def __len__(self) -> int:
        return len(self._items)

    def add(self, experiences: list[Experience]) -> None:
        self._items.extend(experiences)  # deque(maxlen) drops from the left: FIFO
        if self._residual:
            live = {e.uid for e in self._items}
            self._residual = {u: d for u, d in self._residual.items() if u in live}

    def uids(self) -> list[int]:
        return [e.uid for e in self._items]

    def sample(self, n: int, rng: random.Random) -> list[Experience]:
        """`n` trajectories uniformly, without replacement (all of them if fewer)."""
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        return rng.sample(list(self._items), min(n, len(self._items)))

    def priorities(self) -> list[float]:
        """The unnormalised sampling weight of every stored answer (oldest first)."""
        items = list(self._items)
        if self.sampling == "residual":
            top = max(self._residual.values(), default=1.0)
            return [(self._residual.get(e.uid, top) + self.eps) ** self.alpha for e in items]
        if self.sampling == "variance":
            return [(e.group_std + self.eps) ** self.alpha for e in items]
        if self.sampling == "recency":
            # relative to the newest answer, and at most 2^-60 below it (no underflow to 0)
            newest = max(e.round for e in items)
            return [2.0 ** -min((newest - e.round) / self.half_life, 60.0) for e in items]
        return [1.0] * len(items)

    def draw(self, n: int, rng: random.Random) -> tuple[list[Experience], list[float]]:
        """`n` trajectories by the buffer's sampling scheme and their importance weights (all 1 for uniform)."""
        if self.sampling == "uniform":
            picked = self.sample(n, rng)
            return picked, [1.0] * len(picked)
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        items, p = list(self._items), self.priorities()
        total, N = sum(p), len(items)
        idx = rng.choices(range(N), weights=p, k=min(n, N))
        # w_i = (N P(i))^-c over its expectation under the draw, sum_j P(j) (N P(j))^-c: weights average 1
        expected = sum(q / total * (N * q / total) ** -self.correction for q in p)
        return [items[i] for i in idx], [(N * p[i] / total) ** -self.correction / expected for i in idx]

    def update_priorities(self, uids: torch.Tensor, abs_residual: torch.Tensor) -> None:
        """Record each answer's |delta| from the update that just used it (sampling "residual")."""
        if self.sampling != "residual":
            return
        live = set(self.uids())
        for u, d in zip(uids.tolist(), abs_residual.tolist()):
            if u in live and math.isfinite(d):
                self._residual[u] = d

    # Saved as flat tensors (token ids concatenated, one tensor per field) so a checkpoint
    # stores them in safetensors; floats as float64, which holds a Python float exactly.
    _INT_FIELDS = ("group_id", "version", "round", "uid")
    _FLOAT_FIELDS = ("reward", "group_mean", "group_std")

    def state_dict(self) -> dict:
        items = list(self._items)
        ids = lambda name: torch.tensor([t for e in items for t in getattr(e, name)], dtype=torch.long)  # noqa: E731
        lengths = lambda name: torch.tensor([len(getattr(e, name)) for e in items], dtype=torch.long)  # noqa: E731
        return {"capacity": self.capacity, "prompt_ids": ids("prompt_ids"), "prompt_lengths": lengths("prompt_ids"),
                "response_ids": ids("response_ids"), "response_lengths": lengths("response_ids"),
                "truncated": torch.tensor([e.truncated for e in items], dtype=torch.bool),
                **{f: torch.tensor([getattr(e, f) for e in items], dtype=torch.long) for f in self._INT_FIELDS},
                **{f: torch.tensor([getattr(e, f) for e in items], dtype=torch.float64)
                   for f in self._FLOAT_FIELDS},
                # |delta| at last use (NaN: not used yet), for sampling "residual"
                "residual": torch.tensor([self._residual.get(e.uid, math.nan) for e in items], dtype=torch.float64),
                # latent codes, one per response token (empty when the tokens are the actions)
                "action_ids": ids("action_ids")}

    @staticmethod
    def stored_size(state: dict) -> int:
        """Trajectories in a `state_dict` (ValueError if its fields disagree)."""
        if "items" in state:  # the pre-safetensors layout: a list of dicts
            return len(state["items"])
        n = len(state["reward"])
        fields = ("prompt_lengths", "response_lengths", "truncated", *ReplayBuffer._INT_FIELDS,
                  *ReplayBuffer._FLOAT_FIELDS)
        if "action_ids" in state and len(state["action_ids"]) not in (0, len(state["response_ids"])):
            raise ValueError("its latent codes (action_ids) do not match its answers' tokens")
        if any(len(state[f]) != n for f in fields) or ("residual" in state and len(state["residual"]) != n) or \
                int(state["prompt_lengths"].sum()) != len(state["prompt_ids"]) or \
                int(state["response_lengths"].sum()) != len(state["response_ids"]):
            raise ValueError("its fields have different lengths")
        if n > state["capacity"]:
            raise ValueError(f"{n} answers in a buffer of capacity {state['capacity']}")
        return n

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        if "items" in state:  # the pre-safetensors layout
            items = [{**d, "prompt_ids": tuple(d["prompt_ids"]), "response_ids": tuple(d["response_ids"])}
                     for d in state["items"]]
        else:
            prompts = torch.split(state["prompt_ids"], state["prompt_lengths"].tolist())
            responses = torch.split(state["response_ids"], state["response_lengths"].tolist())
            cols = {f: state[f].tolist() for f in ("truncated", *self._INT_FIELDS, *self._FLOAT_FIELDS)}
            codes = state.get("action_ids", torch.zeros(0, dtype=torch.long))
            actions = torch.split(codes, state["response_lengths"].tolist()) if len(codes) else [()] * len(prompts)
            items = [{"prompt_ids": tuple(p.tolist()), "response_ids": tuple(r.tolist()),
                      "action_ids": tuple(a.tolist()) if len(a) else (), **{f: v[i] for f, v in cols.items()}}
                     for i, (p, r, a) in enumerate(zip(prompts, responses, actions))]
        self._items = deque((Experience(**d) for d in items), maxlen=self.capacity)
        residual = state["residual"].tolist() if "residual" in state else []  # older checkpoints: none
        self._residual = {e.uid: d for e, d in zip(self._items, residual) if not math.isnan(d)}


@dataclass
class Batch:
    """B trajectories, stored as their distinct prompts (left-padded) and responses (right-padded).

    The G answers to a prompt share one row of `prompt_ids`; `prompt_index` maps each
    trajectory to it. So the model can run every prompt once and share its KV cache with
    all of its answers (`reval.logprobs`), and per-token quantities (log-probs, masks)
    live on the H response positions only: token h of `response_ids` is predicted from
    the prompt plus tokens before h.
    """

    prompt_ids: torch.Tensor  # (U, P) distinct prompts, left-padded (all end at column P - 1)
    prompt_mask: torch.Tensor  # (U, P) 1 on real prompt tokens
    prompt_index: torch.Tensor  # (B,) row of prompt_ids that each trajectory answers
    response_ids: torch.Tensor  # (B, H) right-padded
    response_mask: torch.Tensor  # (B, H) float, 1 on real response tokens
    reward: torch.Tensor  # (B,) verifier reward
    group_mean: torch.Tensor  # (B,)
    group_std: torch.Tensor  # (B,)
    version: torch.Tensor  # (B,) policy version that sampled each trajectory
    truncated: torch.Tensor  # (B,) bool
    uid: torch.Tensor  # (B,) trajectory id (-1: none), the key of the reference cache
    weight: torch.Tensor = field(default=None)  # (B,) importance weight of prioritised replay (1: none)
    # (B, H) the latent codes played (`reval.latent`): the actions the log-probs are of; None: the tokens
    action_ids: torch.Tensor | None = None

    def __post_init__(self):
        if self.weight is None:
            self.weight = torch.ones(self.reward.shape)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """(B,) prompt tokens of each trajectory."""
        return self.prompt_mask.sum(1)[self.prompt_index]

    def prompt(self, i: int) -> list[int]:
        """The prompt token ids of trajectory i, without padding."""
        u = self.prompt_index[i]
        return self.prompt_ids[u][self.prompt_mask[u].bool()].tolist()

    def to(self, device) -> "Batch":
        return Batch(**{k: v if v is None else v.to(device) for k, v in vars(self).items()})

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows start:stop with only their prompts, trimmed to their longest prompt and answer."""
        rows = {k: v if v is None else v[start:stop] for k, v in vars(self).items()
                if k not in ("prompt_ids", "prompt_mask", "prompt_index")}
        used, index = torch.unique(self.prompt_index[start:stop], return_inverse=True)  # sorted
        mask = self.prompt_mask[used]
        P = int(mask.sum(1).max())  # left padding: keep the last P columns
        H = max(int(rows["response_mask"].sum(1).max()), 1)
        return Batch(prompt_ids=self.prompt_ids[used, -P:], prompt_mask=mask[:, -P:], prompt_index=index,
                     response_ids=rows.pop("response_ids")[:, :H], response_mask=rows.pop("response_mask")[:, :H],
                     action_ids=None if rows["action_ids"] is None else rows.pop("action_ids")[:, :H],
                     **{k: v for k, v in rows.items() if k != "action_ids"})


def collate(experiences: list[Experience], pad_id: int, weights: list[float] | None = None) -> Batch:
    """Pack trajectories into a `Batch`, answers to the same prompt next to each other; `weights`: each
    one's importance weight (`ReplayBuffer.draw`), else 1.

    Rows are reordered (stably) so that trajectories with identical prompt ids are
    adjacent: a micro-batch then holds whole groups and each prompt is computed once.
    """
    if not experiences:
        raise ValueError("cannot collate an empty list of experiences")
    prompts: dict[tuple[int, ...], int] = {}
    for e in experiences:
        prompts.setdefault(e.prompt_ids, len(prompts))
    order = sorted(range(len(experiences)), key=lambda i: prompts[experiences[i].prompt_ids])
    rows = [experiences[i] for i in order]
    U, B = len(prompts), len(rows)
    P = max(len(p) for p in prompts)
    H = max(max(len(e.response_ids) for e in rows), 1)
    prompt_ids = torch.full((U, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((U, P), dtype=torch.long)
    for p, u in prompts.items():
        prompt_ids[u, P - len(p):] = torch.tensor(p)
        prompt_mask[u, P - len(p):] = 1
    response_ids = torch.full((B, H), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, H), dtype=torch.float32)
    for i, e in enumerate(rows):
        response_ids[i, : len(e.response_ids)] = torch.tensor(e.response_ids, dtype=torch.long)
        response_mask[i, : len(e.response_ids)] = 1.0
    actions = None
    if any(e.action_ids for e in rows):  # latent codes, one per response token
        if any(len(e.action_ids) != len(e.response_ids) for e in rows):
            raise ValueError("every answer of a latent-action batch needs one code per token (action_ids)")
        actions = torch.zeros((B, H), dtype=torch.long)
        for i, e in enumerate(rows):
            actions[i, : len(e.action_ids)] = torch.tensor(e.action_ids, dtype=torch.long)
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(e, name) for e in rows], dtype=dtype)  # noqa: E731
    return Batch(prompt_ids, prompt_mask, torch.tensor([prompts[e.prompt_ids] for e in rows]), response_ids,
                 response_mask, col("reward"), col("group_mean"), col("group_std"), col("version", torch.long),
                 col("truncated", torch.bool), col("uid", torch.long),
                 torch.tensor([weights[i] for i in order] if weights is not None else [1.0] * B, dtype=torch.float32),
                 actions)
