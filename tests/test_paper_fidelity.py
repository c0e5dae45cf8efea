"""Where the paper's setup must hold exactly: the calibrated start under mixed precision,
one-answer groups, the reference-reset unit, TBRM as published, the paper presets."""

import json
import random
from pathlib import Path

import pytest
import torch

import reval.train as train_mod
from reval.loop import build
from reval.buffer import collate
from reval.cli import _preset_or_path, _read_config
from reval.config import TrainConfig
from reval.distributed import LogProbModule, make_accelerator
from reval.losses import ALGORITHMS
from reval.metrics import read_metrics
from reval.rollout import Experience, Samples, to_experiences

from conftest import build_real_style


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    """A tiny Qwen2 with a 20,000-token vocabulary (logits rounded by bf16 matter here)."""
    return build_real_style(tmp_path_factory.mktemp("bigvocab"), "qwen2", vocab_size=20_000)


def _long_answers(n: int, length: int, vocab: int, seed: int = 0) -> list[Experience]:
    rng = random.Random(seed)
    return [Experience(prompt_ids=tuple(rng.randrange(3, 90) for _ in range(12 + i)),
                       response_ids=tuple(rng.randrange(3, vocab) for _ in range(length - i)),
                       reward=0.0, group_id=i // 2, group_mean=0.0, group_std=0.0, version=0, round=0,
                       truncated=False) for i in range(n)]


@pytest.mark.parametrize("lora", [False, True])
def test_calibrated_start_is_exact_under_bf16_autocast(big_vocab_dir, lora):
    """theta = ref and r = 0 under bf16 autocast: log-ratio, V gap, loss and gradient are exactly 0,
    with 256-token answers, for the frozen-copy reference and for the LoRA adapter-off reference."""
    cfg = TrainConfig(algo="reval")
    cfg.model.path, cfg.model.mixed_precision, cfg.model.lora_rank = str(big_vocab_dir), "bf16", 8 if lora else 0
    cfg.model.logprob_chunk = 64
    cfg.optim.micro_batch_size = 2
    accelerator = make_accelerator("bf16")
    model, tok = build.load_policy(cfg, None, big_vocab_dir)
    reference = build.make_reference(cfg, model, None, big_vocab_dir, accelerator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    policy, optimizer = accelerator.prepare(LogProbModule(model, cfg.model.logprob_chunk), optimizer)
    batch = collate(_long_answers(4, 256, 20_000), tok.pad_token_id)
    before = [p.detach().clone() for p in model.parameters()]
    m = train_mod.update(policy, reference, optimizer, batch, cfg, accelerator=accelerator)
    assert m["q/log_ratio_mean"] == 0.0 and m["q/v_gap_mean"] == 0.0
    assert m["loss/total"] == 0.0 and m["loss/grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_bf16_first_update_logs_exact_zero(tmp_path, big_vocab_dir):
    """`reval train --model.mixed-precision bf16 --rounds 1 --buffer.updates-per-round 1`: round 1's
    log-ratio and V gap are exactly 0 (the policy is the reference at the first update)."""
    from reval.cli import main

    out = tmp_path / "run"
    main(["train", "--model.path", str(tiny_path(tmp_path)), "--model.mixed-precision", "bf16", "--rounds", "1",
          "--buffer.updates-per-round", "1", "--out", str(out), "--no-progress", "--rollout.prompts-per-round", "4",
          "--buffer.capacity", "32", "--optim.micro-batch-size", "8", "--task.num-test", "4",
          "--eval.samples", "0"])
    rounds = [r for r in read_metrics(out / "metrics.jsonl") if "q/log_ratio_mean" in r]
    assert rounds[0]["q/log_ratio_mean"] == 0.0 and rounds[0]["q/v_gap_mean"] == 0.0


def tiny_path(tmp_path):
    """The tiny char model of conftest, saved once per test directory."""
    from reval.model import build_char_tokenizer, build_tiny_model

    path = tmp_path / "tiny-model"
    if not path.exists():
        tok = build_char_tokenizer()
        build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=0).save_pretrained(path)
        tok.save_pretrained(path)
    return path


# -- groups of one answer ----------------------------------------------------------------------


def test_singleton_group_sees_its_raw_reward():
    s = Samples(prompt_ids=[[1]] * 3, response_ids=[[2]] * 3, truncated=[False] * 3)
    exps = to_experiences(s, [1.0, 0.0, 1.0], samples_per_prompt=1, version=0, round=0)
    assert [(e.group_mean, e.group_std) for e in exps] == [(0.0, 1.0)] * 3  # verl: mean 0, std 1
    from reval.losses.grpo import grpo_advantage
    from reval.rewards import shape_reward

    r = torch.tensor([e.reward for e in exps])
    adv = grpo_advantage(r, torch.tensor([e.group_mean for e in exps]), torch.tensor([e.group_std for e in exps]))
    assert adv.tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-5)
    assert shape_reward(r, torch.zeros(3), "group_mean").tolist() == [1.0, 0.0, 1.0]


def test_grpo_with_one_answer_per_prompt_has_an_advantage(tmp_path):
    """`reval train --algo grpo --rollout.samples-per-prompt 1`: a non-zero advantage whenever
    some reward is non-zero (with the group's own mean and std 0 it was always 0)."""
    from reval.cli import main

    out = tmp_path / "g1"
    # the command as given: defaults otherwise (16 answers a round, micro-batch 64 > 16)
    main(["train", "--algo", "grpo", "--rollout.samples-per-prompt", "1", "--rounds", "2", "--out", str(out),
          "--no-progress", "--task.num-test", "4"])
    rounds = [r for r in read_metrics(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert any(r["rollout/reward_mean"] > 0 for r in rounds)  # the shipped model answers some right
    for r in rounds:
        assert (r["loss/advantage_abs_mean"] > 0) == (r["rollout/reward_mean"] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["reval", "grpo"])
def test_both_methods_learn_with_one_answer_per_prompt(tmp_path, algo):
    """G = 1 on the addition task: greedy test accuracy rises for ReVal and for GRPO."""
    cfg = TrainConfig(algo=algo, rounds=6, out=tmp_path / algo, progress=False, checkpoint_every=0)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 128, 1
    cfg.eval.every, cfg.eval.samples, cfg.task.num_test = 0, 0, 100
    result = train_mod.train(cfg)
    evals = [r for r in read_metrics(tmp_path / algo / "metrics.jsonl") if "eval/accuracy" in r]
    assert result["eval/accuracy"] >= evals[0]["eval/accuracy"] + 0.2, (evals[0], result)


# -- reference reset unit, TBRM, presets ------------------------------------------------------


@pytest.mark.parametrize("unit, versions", [("rounds", [0, 1, 1, 2]), ("updates", [1, 2, 3, 4])])
def test_reference_reset_unit(tiny_dir, tmp_path, unit, versions):
    """Every 2 rounds (the paper's unit) vs every 2 updates, with K = 2 updates per round:
    the reference version logged after rounds 1-4."""
    cfg = TrainConfig(algo="reval", rounds=4, out=tmp_path / unit, progress=False, checkpoint_every=0)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 24, 8, 4, 0
    cfg.loss.ref_reset_every, cfg.loss.ref_reset_unit = 2, unit
    assert cfg.updates_per_round == 2
    train_mod.train(cfg)
    rounds = [r for r in read_metrics(tmp_path / unit / "metrics.jsonl") if "q/ref_version" in r]
    assert [r["q/ref_version"] for r in rounds] == versions


def test_tbrm_is_on_policy_and_tbrm_replay_replays():
    assert not ALGORITHMS["tbrm"].replay and TrainConfig(algo="tbrm").updates_per_round == 1
    assert ALGORITHMS["tbrm_replay"].replay and TrainConfig(algo="tbrm_replay").updates_per_round == 2
    assert ALGORITHMS["tbrm"].compute is ALGORITHMS["tbrm_replay"].compute  # same residual


@pytest.mark.parametrize("name, variant, reset", [("paper-r1-distill-1.5b", "binary", 0),
                                                  ("paper-qwen2.5-math-7b", "group_mean", 200)])
def test_presets_follow_the_paper(name, variant, reset):
    """Section 5.3: reward normalisation and reference reset for Qwen2.5-Math-7B only; resets
    counted in rounds; K left to the algorithm, so `--algo grpo` is the paper's on-policy GRPO."""
    base = TrainConfig.from_dict(_read_config(_preset_or_path(Path(name))))
    assert base.loss.reward_variant == variant and base.loss.ref_reset_every == reset
    assert base.loss.ref_reset_unit == "rounds"
    assert base.updates_per_round == 2
    base.algo = "grpo"
    assert base.updates_per_round == 1
    base.algo = "tbrm"
    assert base.updates_per_round == 1
    json.dumps(base.to_dict())


# -- a sampler that is not the policy -----------------------------------------------------------


def test_sampler_weight_truncates_and_scales_the_token_loss():
    from reval.losses.grpo import grpo_loss, sampler_weight

    old = torch.tensor([[0.0, 0.0, -1.0]])
    sampler = torch.tensor([[0.0, -2.0, -0.5]])  # pi_old / pi_sampler = 1, e^2 (capped at 2), e^-0.5
    w = sampler_weight(old, sampler, cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, float(torch.exp(torch.tensor(-0.5)))])
    logp, mask, adv = old.clone(), torch.ones(1, 3), torch.tensor([1.0])
    loss, m = grpo_loss(logp, old, mask, adv, weight=w)
    assert loss.item() == pytest.approx(-w.sum().item() / 3)  # ratio 1: the loss is -A x weight
    assert m["loss/sampler_weight_mean"] == pytest.approx(w.mean().item())


def test_grpo_with_a_stale_sampler_is_corrected(tmp_path):
    """sync_every = 3: the sampler is the policy only in rounds 0, 3, ...; there the weights are
    exactly 1, in the stale rounds they are not (today's code applied no correction at all).
    The shipped model, so that rewards (and updates) are not all zero."""
    cfg = TrainConfig(algo="grpo", rounds=5, out=tmp_path / "stale", progress=False, checkpoint_every=0)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.sync_every = 8, 4, 3
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 32, 16, 4, 0
    cfg.optim.lr = 3e-3  # a visible drift between policy and stale sampler
    train_mod.train(cfg)
    rounds = [r for r in read_metrics(tmp_path / "stale" / "metrics.jsonl") if "rollout/reward_mean" in r]
    weights = [r.get("loss/sampler_weight_mean") for r in rounds]
    assert weights[0] == 1.0 and weights[3] == 1.0
    assert all(w is not None and w != 1.0 for w in (weights[1], weights[2], weights[4]))


def test_a_fixed_lag_samples_with_the_weights_from_exactly_that_many_updates_ago(tmp_path):
    """rollout.lag = 3 with K = 2: round r samples with version max(0, 2r - 3), whatever the
    policy has done since; GRPO corrects towards that sampler. The weights are checked, not
    only the counters: the sampler of the last round equals the checkpoint of version 2r - 3."""
    from reval.loop import actor as actor_mod

    cfg = TrainConfig(algo="grpo", rounds=4, out=tmp_path / "lag", progress=False, checkpoint_every=0)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.lag = 8, 4, 3
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 32, 16, 4, 0
    cfg.buffer.updates_per_round, cfg.optim.lr = 2, 3e-3
    seen = {}
    real_sync = actor_mod.Actor._lagged_sync

    def spy(self):
        real_sync(self)
        first = next(iter(self.generator.model.state_dict().values()))
        seen[self.counters["updates"]] = (self.counters["sampler_version"], first.clone(),
                                          {v: w[0].clone() for v, w in self.versions.items()})
    actor_mod.Actor._lagged_sync = spy
    try:
        train_mod.train(cfg)
    finally:
        actor_mod.Actor._lagged_sync = real_sync
    rounds = [r for r in read_metrics(tmp_path / "lag" / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert [r["rollout/sampler_lag"] for r in rounds] == [0, 2, 3, 3]  # updates 0, 2, 4, 6 at sampling
    assert [seen[u][0] for u in (0, 2, 4, 6)] == [0, 0, 1, 3]
    version, sampler_first, kept = seen[6]
    assert torch.equal(sampler_first, kept[3]) and not torch.equal(kept[3], kept[max(kept)])
    assert all("loss/sampler_weight_mean" in r for r in rounds) and rounds[-1]["loss/sampler_weight_mean"] != 1.0
    with pytest.raises(ValueError, match="rollout.lag"):
        bad = TrainConfig(rounds=1)
        bad.rollout.lag, bad.rollout.sync_every = 2, 3
        bad.validate()


def test_reset_unit_is_validated_and_old_runs_keep_their_meaning():
    with pytest.raises(ValueError, match=r"loss.ref_reset_unit must be one of \('rounds', 'updates'\), got 'round'"):
        TrainConfig.from_dict({"loss": {"ref_reset_unit": "round"}}).validate()
    # a run directory written before the unit existed: its resets counted updates, its tbrm replayed
    old = TrainConfig.from_saved({"algo": "tbrm", "loss": {"ref_reset_every": 3}})
    assert (old.algo, old.loss.ref_reset_unit) == ("tbrm_replay", "updates")
    new = TrainConfig.from_saved(TrainConfig(algo="tbrm").to_dict())
    assert (new.algo, new.loss.ref_reset_unit) == ("tbrm", "rounds")
