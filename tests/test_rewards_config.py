import re

import pytest

from reval.config import TrainConfig
from reval.rewards import correctness_reward, score


def test_correctness_reward_trl_signature():
    out = correctness_reward(["\\boxed{3}", "\\boxed{4}", "nothing"], answer=["3", "3", "3"], extra=[1, 2, 3])
    assert out == [1.0, 0.0, 0.0]


def test_score_weights_and_failures():
    def boom(completions, **_):
        raise RuntimeError("reward server down")

    def half_bad(completions, **_):
        return [1, "x", float("nan")]

    comps, cols = ["\\boxed{3}", "\\boxed{4}", "\\boxed{3}"], {"answer": ["3", "3", "3"]}
    rewards, failures = score([correctness_reward, correctness_reward], comps, cols, weights=[1.0, 0.5])
    assert rewards == [1.5, 0.0, 1.5] and failures == 0
    rewards, failures = score([correctness_reward, half_bad], comps, cols)
    assert rewards == [2.0, None, None] and failures == 2
    rewards, failures = score([boom], comps, cols)
    assert rewards == [None, None, None] and failures == 3


@pytest.mark.parametrize("field,value,message", [
    ("loss.beta", 0.0, "loss.beta = 0.0 is invalid: must be > 0"),
    ("buffer.updates_per_round", 0, "buffer.updates_per_round"),
    ("buffer.capacity", 10, "buffer.capacity = 10 is invalid: must be >= one round"),
    ("algo", "ppo", "algo = 'ppo' is invalid: must be one of"),
    ("loss.reward_variant", "x", "loss.reward_variant"),
    ("optim.micro_batch_size", 0, "optim.micro_batch_size"),
    # issue 15: values that used to pass and broke the run later
    ("rollout.reward_timeout", float("inf"),
     "rollout.reward_timeout = inf is invalid: must be finite and in (0, 86400]"),
    ("rollout.reward_timeout", 1e10, "rollout.reward_timeout = 10000000000.0 is invalid: must be in (0, 86400]"),
    ("rollout.max_unscored_rounds", 0, "rollout.max_unscored_rounds = 0 is invalid: must be >= 1"),
    ("optim.lr", float("inf"), "optim.lr = inf is invalid: must be finite and in (0, 1]"),
    ("optim.lr", 1e30, "optim.lr = 1e+30 is invalid: must be in (0, 1]"),
    ("optim.lr", float("nan"), "optim.lr = nan is invalid: must be finite"),
    ("rollout.temperature", float("inf"), "rollout.temperature = inf is invalid: must be finite and > 0"),
    ("loss.beta", float("inf"), "loss.beta = inf is invalid: must be finite and > 0"),
    ("model.dtype", "float64", "model.dtype = 'float64' is invalid: must be one of ('float32', 'bfloat16')"),
    ("seed", 10**23, "seed = 100000000000000000000000 is invalid: must be in [0, 4294967295]"),
])
def test_invalid_config_is_rejected_with_the_field_name(field, value, message):
    cfg = TrainConfig()
    obj = cfg
    *path, last = field.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate()


def test_config_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig(algo="grpo")
    cfg.loss.beta = 0.1
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config key.*loss.betta"):
        TrainConfig.from_dict({"loss": {"betta": 1}})
