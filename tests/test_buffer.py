import random

import pytest
import torch

from reval.buffer import ReplayBuffer, collate
from reval.rollout import Experience


def exp(i, prompt_len=3, resp_len=2, **kw):
    d = dict(prompt_ids=tuple(range(10, 10 + prompt_len)), response_ids=tuple(range(50, 50 + resp_len)),
             reward=float(i % 2), group_id=i // 4, group_mean=0.5, group_std=0.5, version=i, round=i,
             truncated=False)
    d.update(kw)
    return Experience(**d)


def test_capacity_and_fifo_eviction():
    buf = ReplayBuffer(capacity=5)
    buf.add([exp(i) for i in range(3)])
    buf.add([exp(i) for i in range(3, 8)])
    assert len(buf) == 5
    assert sorted(e.version for e in buf.sample(5, random.Random(0))) == [3, 4, 5, 6, 7]


def test_sampling_uniform_without_replacement():
    buf = ReplayBuffer(capacity=10)
    buf.add([exp(i) for i in range(10)])
    rng = random.Random(0)
    counts = [0] * 10
    for _ in range(2000):
        s = buf.sample(3, rng)
        assert len({e.version for e in s}) == 3
        for e in s:
            counts[e.version] += 1
    assert min(counts) > 500 and max(counts) < 700  # expected 600 each
    assert len(buf.sample(50, rng)) == 10
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(3).sample(1, rng)


def test_state_round_trip():
    buf = ReplayBuffer(capacity=4)
    buf.add([exp(i) for i in range(6)])
    other = ReplayBuffer(capacity=1)
    other.load_state_dict(buf.state_dict())
    assert other.capacity == 4 and list(other._items) == list(buf._items)


def test_collate_shapes_and_masks():
    batch = collate([exp(0, prompt_len=3, resp_len=2), exp(1, prompt_len=5, resp_len=4)], pad_id=0)
    assert batch.input_ids.shape == (2, 9) and batch.response_mask.shape == (2, 8)
    assert batch.attention_mask.sum(1).tolist() == [5, 9]
    # response targets: row 0 predicts tokens 3..4 from positions 2..3
    assert batch.response_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch.first_index.tolist() == [2, 4]
    assert batch.input_ids[0, 5:].tolist() == [0, 0, 0, 0]
    targets = batch.input_ids[:, 1:][batch.response_mask.bool()]
    assert targets.tolist() == [50, 51, 50, 51, 52, 53]
    assert batch.reward.tolist() == [0.0, 1.0] and batch.version.tolist() == [0, 1]
    micro = batch.slice(0, 1)
    assert micro.input_ids.shape == (1, 5) and micro.response_mask.shape == (1, 4)
    assert torch.equal(micro.response_mask[0], batch.response_mask[0, :4])
