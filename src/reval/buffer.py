"""Replay buffer and collation: `Experience` records in, padded `Batch` tensors out.

The buffer is a FIFO ring of capacity M with uniform sampling (method.md section 6).
It stores what the sampler produced (token ids, rewards, group statistics, versions),
never the policy's log-probabilities: those are recomputed under the current policy at
every update. (The reference's, which only change at a reference reset, are cached
separately, tagged with the reference version: `reval.reference.RefCache`.)
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import torch

from reval.rollout import Experience


class ReplayBuffer:
    """FIFO buffer of trajectories; the oldest are evicted first once `capacity` is hit."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Experience] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, experiences: list[Experience]) -> None:
        self._items.extend(experiences)  # deque(maxlen) drops from the left: FIFO

    def uids(self) -> list[int]:
        return [e.uid for e in self._items]

    def sample(self, n: int, rng: random.Random) -> list[Experience]:
        """`n` trajectories uniformly, without replacement (all of them if fewer)."""
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        return rng.sample(list(self._items), min(n, len(self._items)))

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
                   for f in self._FLOAT_FIELDS}}

    @staticmethod
    def stored_size(state: dict) -> int:
        """Trajectories in a `state_dict` (ValueError if its fields disagree)."""
        if "items" in state:  # the pre-safetensors layout: a list of dicts
            return len(state["items"])
        n = len(state["reward"])
        fields = ("prompt_lengths", "response_lengths", "truncated", *ReplayBuffer._INT_FIELDS,
                  *ReplayBuffer._FLOAT_FIELDS)
        if any(len(state[f]) != n for f in fields) or \
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
            items = [{"prompt_ids": tuple(p.tolist()), "response_ids": tuple(r.tolist()),
                      **{f: v[i] for f, v in cols.items()}} for i, (p, r) in enumerate(zip(prompts, responses))]
        self._items = deque((Experience(**d) for d in items), maxlen=self.capacity)


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
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows start:stop with only their prompts, trimmed to their longest prompt and answer."""
        rows = {k: v[start:stop] for k, v in vars(self).items()
                if k not in ("prompt_ids", "prompt_mask", "prompt_index")}
        used, index = torch.unique(self.prompt_index[start:stop], return_inverse=True)  # sorted
        mask = self.prompt_mask[used]
        P = int(mask.sum(1).max())  # left padding: keep the last P columns
        H = max(int(rows["response_mask"].sum(1).max()), 1)
        return Batch(prompt_ids=self.prompt_ids[used, -P:], prompt_mask=mask[:, -P:], prompt_index=index,
                     response_ids=rows.pop("response_ids")[:, :H], response_mask=rows.pop("response_mask")[:, :H],
                     **rows)


def collate(experiences: list[Experience], pad_id: int) -> Batch:
    """Pack trajectories into a `Batch`, answers to the same prompt next to each other.

    Rows are reordered (stably) so that trajectories with identical prompt ids are
    adjacent: a micro-batch then holds whole groups and each prompt is computed once.
    """
    if not experiences:
        raise ValueError("cannot collate an empty list of experiences")
    prompts: dict[tuple[int, ...], int] = {}
    for e in experiences:
        prompts.setdefault(e.prompt_ids, len(prompts))
    rows = sorted(experiences, key=lambda e: prompts[e.prompt_ids])
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
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(e, name) for e in rows], dtype=dtype)  # noqa: E731
    return Batch(prompt_ids, prompt_mask, torch.tensor([prompts[e.prompt_ids] for e in rows]), response_ids,
                 response_mask, col("reward"), col("group_mean"), col("group_std"), col("version", torch.long),
                 col("truncated", torch.bool), col("uid", torch.long))
