"""Replay beyond the paper's uniform draw (`buffer.sampling`, docs/replay.md): prioritised by the
Bellman residual or by the group's reward spread, age-decayed sampling, the importance weights
that correct the draw, and a run that resumes exactly with its priorities."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from reval.buffer import ReplayBuffer, collate
from reval.config import TrainConfig
from reval.losses import reval_loss
from reval.metrics import read_metrics
from reval.rollout import Experience
from reval.train import train


def _exp(uid: int, rnd: int = 0, std: float = 0.0, reward: float = 0.0) -> Experience:
    return Experience(prompt_ids=(1, 2 + uid % 3), response_ids=(3, uid + 4), reward=reward, group_id=uid,
                      group_mean=0.0, group_std=std, version=0, round=rnd, truncated=False, uid=uid)


def _freq(buf: ReplayBuffer, draws: int = 4000) -> tuple[dict, dict]:
    """Each uid's share of `draws` draws (batches of the buffer's size), and its last importance weight."""
    rng, seen, weights = random.Random(0), Counter(), {}
    for _ in range(draws // len(buf)):
        items, w = buf.draw(len(buf), rng)
        for e, wi in zip(items, w):
            seen[e.uid] += 1
            weights[e.uid] = wi
    total = sum(seen.values())
    return {u: c / total for u, c in seen.items()}, weights


def test_uniform_draw_is_the_papers_sample_with_unit_weights():
    buf = ReplayBuffer(8)
    buf.add([_exp(i) for i in range(8)])
    items, w = buf.draw(5, random.Random(3))
    assert items == buf.sample(5, random.Random(3)) and w == [1.0] * 5
    assert len({e.uid for e in items}) == 5  # without replacement


def test_residual_priorities_set_the_draw_and_new_answers_come_first():
    buf = ReplayBuffer(8, "residual", alpha=1.0, correction=1.0)
    buf.add([_exp(i) for i in range(4)])
    buf.update_priorities(torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 1.0, 2.0, 4.0]))
    p = [(d + 0.01) for d in (0.0, 1.0, 2.0, 4.0)]
    seen, _ = _freq(buf)
    for uid in range(4):
        assert seen[uid] == pytest.approx(p[uid] / sum(p), abs=0.02)
    # importance weights (N P(i))^-1 over their expectation (1 at correction 1): exactly 1 / (N P(i))
    items, w = buf.draw(4, random.Random(5))
    for e, wi in zip(items, w):
        assert wi == pytest.approx(sum(p) / (4 * p[e.uid]))
    for (e1, w1), (e2, w2) in zip(zip(items, w), zip(items[1:], w[1:])):
        assert w1 / w2 == pytest.approx(p[e2.uid] / p[e1.uid])
    # a new answer gets the largest priority seen
    buf.add([_exp(4)])
    assert buf.priorities()[-1] == pytest.approx(buf.priorities()[3])
    # priorities of answers that left the buffer are forgotten
    small = ReplayBuffer(2, "residual")
    small.add([_exp(0), _exp(1)])
    small.update_priorities(torch.tensor([0, 1]), torch.tensor([5.0, 1.0]))
    small.add([_exp(2)])
    assert 0 not in small._residual and small.priorities()[0] == pytest.approx((1.0 + 0.01) ** 0.6)


def test_corrected_weights_give_the_uniform_expectation():
    """With correction 1 the weighted batch mean of f estimates the uniform mean of f: the draw is unbiased;
    with correction 0 it is the prioritised mean. The weights average 1 either way."""
    stds = [0.0, 0.1, 0.3, 0.5] * 10
    f = {i: float(i % 4 + 1) ** 2 for i in range(40)}  # larger where the group disagrees more
    uniform = sum(f.values()) / 40
    for c, expect_unbiased in ((1.0, True), (0.0, False)):
        buf = ReplayBuffer(40, "variance", alpha=1.0, correction=c)
        buf.add([_exp(i, std=s) for i, s in enumerate(stds)])
        rng, estimates, weights = random.Random(1), [], []
        for _ in range(400):
            items, w = buf.draw(40, rng)
            weights += w
            estimates.append(sum(wi * f[e.uid] for e, wi in zip(items, w)) / len(items))
        est = sum(estimates) / len(estimates)
        assert sum(weights) / len(weights) == pytest.approx(1.0, rel=0.05)
        if expect_unbiased:
            assert est == pytest.approx(uniform, rel=0.03)
        else:
            assert est > 1.3 * uniform
    # uncorrected: weights 1, and the draw favours the groups that disagree
    buf0 = ReplayBuffer(8, "variance", alpha=1.0, correction=0.0)
    buf0.add([_exp(i, std=s) for i, s in enumerate(stds[:4])])
    seen, weights = _freq(buf0)
    assert set(weights.values()) == {1.0} and seen[3] > 10 * seen.get(0, 0)


def test_recency_halves_the_draw_every_half_life():
    buf = ReplayBuffer(8, "recency", half_life=2.0, correction=0.0)
    buf.add([_exp(0, rnd=0), _exp(1, rnd=2), _exp(2, rnd=4)])
    assert buf.priorities() == [0.25, 0.5, 1.0]  # ages counted from the newest answer
    seen, _ = _freq(buf, 6000)
    assert seen[2] == pytest.approx(1 / 1.75, abs=0.02) and seen[0] == pytest.approx(0.25 / 1.75, abs=0.02)


def test_recency_never_underflows():
    buf = ReplayBuffer(8, "recency", half_life=0.01, correction=1.0)
    buf.add([_exp(0, rnd=0), _exp(1, rnd=50)])  # 5,000 half-lives apart
    assert min(buf.priorities()) > 0
    items, w = buf.draw(2, random.Random(0))
    assert all(x > 0 and x == x for x in w)


def test_priorities_survive_a_checkpoint_round_trip():
    buf = ReplayBuffer(8, "residual")
    buf.add([_exp(i) for i in range(5)])
    buf.update_priorities(torch.tensor([1, 3]), torch.tensor([0.5, 7.0]))
    other = ReplayBuffer(1, "residual")
    other.load_state_dict(buf.state_dict())
    assert other._residual == buf._residual and other.priorities() == buf.priorities()
    a, b = buf.draw(6, random.Random(2)), other.draw(6, random.Random(2))
    assert a == b
    legacy = {k: v for k, v in buf.state_dict().items() if k != "residual"}  # a checkpoint from before
    other.load_state_dict(legacy)
    assert other._residual == {} and len(other) == 5


def test_weighted_residual_loss_and_collate_keep_weights_with_their_rows():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    v, ref_v, mask = torch.randn(3, generator=g), torch.randn(3, generator=g), torch.ones(3, 4)
    r, w = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.2, 1.0, 0.5])
    loss, m = reval_loss(logp, ref, v, ref_v, mask, r, beta=0.5, weight=w)
    delta = (v - ref_v) + (logp - ref).sum(-1) - r / 0.5
    assert loss.item() == pytest.approx((w * delta ** 2).sum().item() / 3, rel=1e-6)
    torch.testing.assert_close(m["rows/abs_residual"], delta.abs())
    # collate regroups rows by prompt: each weight follows its row
    exps = [_exp(0), _exp(1), _exp(3), _exp(2)]  # prompts (1,2), (1,3), (1,2), (1,4)
    batch = collate(exps, 0, [0.1, 0.2, 0.3, 0.4])
    assert dict(zip(batch.uid.tolist(), batch.weight.tolist())) == pytest.approx({0: 0.1, 1: 0.2, 3: 0.3, 2: 0.4})
    assert collate(exps, 0).weight.tolist() == [1.0] * 4
    half = batch.slice(1, 3)
    assert half.weight.tolist() == pytest.approx(batch.weight[1:3].tolist())


def test_sampling_needs_a_replay_algorithm():
    cfg = TrainConfig(algo="grpo")
    cfg.buffer.sampling = "residual"
    with pytest.raises(ValueError, match="buffer.sampling"):
        cfg.validate()
    cfg.algo = "reval"
    cfg.validate()
    cfg.buffer.priority_correction = 2.0
    with pytest.raises(ValueError, match="buffer.priority_correction"):
        cfg.validate()


def _cfg(tiny_dir, out: Path, rounds: int, sampling: str) -> TrainConfig:
    cfg = TrainConfig(rounds=rounds, out=out, progress=False, checkpoint_every=1)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.buffer.updates_per_round, cfg.optim.micro_batch_size = 48, 3, 8
    cfg.task.num_test, cfg.eval.every, cfg.buffer.sampling = 8, 1, sampling
    return cfg


@pytest.mark.parametrize("sampling", ["residual", "recency"])
def test_a_prioritised_run_trains_and_resumes_exactly(sampling, tiny_dir, tmp_path):
    train(_cfg(tiny_dir, tmp_path / "full", 4, sampling))
    train(_cfg(tiny_dir, tmp_path / "part", 2, sampling))
    train(_cfg(tiny_dir, tmp_path / "part", 4, sampling), resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"}  # noqa: E731
                          for r in rows]
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert strip(full) == strip(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    replayed = [r for r in full if "buffer/is_weight_min" in r and r["buffer/is_weight_min"] < 1]
    assert replayed, "no update drew a non-uniform, weighted batch"
    assert all(0 < r["buffer/distinct_frac"] <= 1 for r in replayed)
    assert all("rows/abs_residual" not in r for r in full)  # the priorities are not logged as metrics
