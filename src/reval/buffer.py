"""Replay buffer and collation: `Experience` records in, padded `Batch` tensors out.

The buffer is a FIFO ring of capacity M with uniform sampling (method.md section 6).
It stores token ids and rewards only, never log-probabilities: those are recomputed by
the loss under the current policy and reference at every update.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass

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

    def sample(self, n: int, rng: random.Random) -> list[Experience]:
        """`n` trajectories uniformly, without replacement (all of them if fewer)."""
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        return rng.sample(list(self._items), min(n, len(self._items)))

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [asdict(e) for e in self._items]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self._items = deque(
            (Experience(**{**d, "prompt_ids": tuple(d["prompt_ids"]),
                           "response_ids": tuple(d["response_ids"])}) for d in state["items"]),
            maxlen=self.capacity,
        )


@dataclass
class Batch:
    """Right-padded tensors for B trajectories of at most T tokens (prompt + response).

    Position t of `logits` predicts token t + 1, so per-token quantities live on the
    T - 1 "target" positions and `response_mask` marks the response tokens among them.
    """

    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T-1) 1 where the target token is a response token
    first_index: torch.Tensor  # (B,) position whose logits predict the first response token
    reward: torch.Tensor  # (B,) verifier reward
    group_mean: torch.Tensor  # (B,)
    group_std: torch.Tensor  # (B,)
    version: torch.Tensor  # (B,) policy version that sampled each trajectory
    truncated: torch.Tensor  # (B,) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})

    def slice(self, start: int, stop: int) -> "Batch":
        """Rows start:stop, trimmed to their own longest sequence (micro-batching)."""
        rows = {k: v[start:stop] for k, v in vars(self).items()}
        T = int(rows["attention_mask"].sum(1).max())
        for k in ("input_ids", "attention_mask"):
            rows[k] = rows[k][:, :T]
        rows["response_mask"] = rows["response_mask"][:, : T - 1]
        return Batch(**rows)


def collate(experiences: list[Experience], pad_id: int) -> Batch:
    """Pack trajectories into a right-padded `Batch`."""
    if not experiences:
        raise ValueError("cannot collate an empty list of experiences")
    B = len(experiences)
    T = max(len(e.prompt_ids) + len(e.response_ids) for e in experiences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T - 1), dtype=torch.float32)
    first_index = torch.empty(B, dtype=torch.long)
    for i, e in enumerate(experiences):
        P, H = len(e.prompt_ids), len(e.response_ids)
        input_ids[i, : P + H] = torch.tensor(e.prompt_ids + e.response_ids)
        attention_mask[i, : P + H] = 1
        response_mask[i, P - 1 : P + H - 1] = 1.0  # targets P..P+H-1 are predicted from P-1..
        first_index[i] = P - 1
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(e, name) for e in experiences], dtype=dtype)  # noqa: E731
    return Batch(input_ids, attention_mask, response_mask, first_index, col("reward"),
                 col("group_mean"), col("group_std"), col("version", torch.long),
                 col("truncated", torch.bool))
