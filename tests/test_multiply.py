"""The multiplication task: splits, worked solutions, the warm start's two kinds of mistakes."""

import json
import random
from collections import Counter

import pytest

from reval.tasks import TASKS, multiply
from reval.tasks.arithmetic import verify
from reval.tasks.multiply import SLIPS, error_kind, solution, split, split_of


def test_pairs_never_cross_splits_in_either_order():
    pairs = {name: {tuple(sorted((p.a, p.b))) for p in split(name, 600, seed=s)}
             for name, s in (("train", 3), ("validation", 0), ("test", 0))}
    assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
    assert not pairs["validation"] & pairs["test"]
    assert all(split_of(a, b) == split_of(b, a) for a, b in pairs["test"])
    assert split("test", 20) == split("test", 20) and split("train", 20, seed=1) != split("train", 20)
    shares = Counter(split_of(a, b) for a in range(12, 100) for b in range(12, 100))
    assert 0.6 < shares["train"] / sum(shares.values()) < 0.8  # 70 / 15 / 15 by the hash
    with pytest.raises(ValueError, match="unknown split"):
        split("dev", 3)


def test_worked_solution():
    assert solution(47, 36) == "7*6=42|4*6+4=28|282|7*3=21|4*3+2=14|1410|2+0=2|8+1=9|2+4=6|0+1=1|\\boxed{1692}"
    for p in split("validation", 300):
        assert verify(solution(p.a, p.b), p.answer)
        assert error_kind(solution(p.a, p.b), p.a, p.b) is None


def test_two_kinds_of_mistakes_at_different_rates():
    """The warm start's data: fact slips (per-fact rates) and dropped carries, each named."""
    rng = random.Random(0)
    problems = split("train", 1500)
    kinds = Counter(error_kind(solution(p.a, p.b, rng), p.a, p.b) for p in problems)
    assert kinds["fact_slip"] > kinds["dropped_carry"] > 0.03 * len(problems)
    assert 0.2 < kinds[None] / len(problems) < 0.45
    # a slipped fact is written consistently: 7*8=54 carries 5
    assert "8*7=54|" in solution(78, 77, _Always())
    # a carry of 4 or more is dropped with probability 0.6: the worked step loses its "+c"
    assert error_kind("7*6=42|4*6=24|242|7*3=21|4*3+2=14|1410|2+0=2|4+1=5|2+4=6|0+1=1|\\boxed{1652}",
                      47, 36) == "dropped_carry"
    assert error_kind("7*6=42|4*6+4=28|282|7*3=21|4*3+2=14|1410|2+0=2|8+1=9|2+4=6|0+1=1|\\boxed{1692}",
                      47, 36) is None
    assert error_kind("7*6=48|4*6+4=28|\\boxed{1}", 47, 36) == "fact_slip"
    assert error_kind("garbage", 47, 36) == "other"
    assert 0.1 <= min(p for _, p in SLIPS.values()) < max(p for _, p in SLIPS.values()) <= 0.7


class _Always(random.Random):
    def random(self):
        return 0.0  # every slip happens


def test_shipped_warm_start_makes_both_kinds_of_mistakes():
    """The shipped `mul` warm start, as its pretrain.json reports it (validation split)."""
    from reval.model import default_model_path

    path = default_model_path("mul")
    report = json.loads((path / "pretrain.json").read_text())
    assert 0.10 <= report["accuracy"] <= 0.40 and 0.20 <= report["mean@8"] <= 0.50
    greedy = report["mistakes"]["greedy"]
    assert greedy["fact_slip"] > 0.05 and greedy["dropped_carry"] > 0.02
    assert greedy["fact_slip"] != greedy["dropped_carry"]
    assert report["params"] <= 10_000_000
    assert TASKS["mul"].max_new_tokens >= 100
    assert multiply.LOW == 12 and multiply.HIGH == 99
