import random

import pytest

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
    a, b = exp(0, prompt_len=3, resp_len=2), exp(1, prompt_len=5, resp_len=4)
    batch = collate([a, b, exp(2, prompt_len=3, resp_len=1)], pad_id=0)
    # distinct prompts, left-padded; answers to the same prompt are made adjacent
    assert batch.prompt_ids.tolist() == [[0, 0, 10, 11, 12], [10, 11, 12, 13, 14]]
    assert batch.prompt_mask.sum(1).tolist() == [3, 5]
    assert batch.prompt_index.tolist() == [0, 0, 1] and batch.version.tolist() == [0, 2, 1]
    assert batch.response_ids.tolist() == [[50, 51, 0, 0], [50, 0, 0, 0], [50, 51, 52, 53]]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch.prompt(2) == [10, 11, 12, 13, 14] and batch.prompt_lengths.tolist() == [3, 3, 5]
    assert batch.reward.tolist() == [0.0, 0.0, 1.0] and batch.uid.tolist() == [-1, -1, -1]
    micro = batch.slice(0, 2)  # one prompt, trimmed to it and to the longest answer
    assert micro.prompt_ids.tolist() == [[10, 11, 12]] and micro.prompt_index.tolist() == [0, 0]
    assert micro.response_ids.shape == (2, 2) and micro.prompt(1) == [10, 11, 12]
    last = batch.slice(2, 3)
    assert last.prompt_ids.tolist() == [[10, 11, 12, 13, 14]] and last.prompt_index.tolist() == [0]


def test_collate_groups_replayed_answers_by_prompt():
    rng = random.Random(0)
    exps = [exp(i, prompt_len=2 + i % 3, uid=i) for i in range(12)]
    rng.shuffle(exps)
    batch = collate(exps, pad_id=0)
    assert batch.prompt_ids.shape[0] == 3
    assert sorted(batch.prompt_index.tolist()) == batch.prompt_index.tolist()  # groups contiguous
    assert sorted(batch.uid.tolist()) == list(range(12))  # every trajectory, once
